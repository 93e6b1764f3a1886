//! The `serval-operator` binary as a child process of a test: built on first use, one process
//! group per operator, SIGKILLed on drop and by the kernel if the test process dies.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};

use crate::cluster::Cluster;
use crate::logs::tail_file;
use crate::process::Component;
use crate::wait::wait_for;

/// Path of a prebuilt operator binary; when set, the harness does not run cargo.
pub const OPERATOR_BIN_ENV: &str = "SERVAL_OPERATOR_BIN";
/// Bound on the operator answering `/healthz` after it starts.
pub const DEFAULT_OPERATOR_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an operator gets to exit after SIGTERM before it is SIGKILLed.
pub const DEFAULT_OPERATOR_STOP_GRACE: Duration = Duration::from_secs(10);
/// Log filter: reconcile starts are logged at debug, so a test can see who reconciles.
pub const DEFAULT_OPERATOR_LOG_FILTER: &str = "info,serval_operator=debug,kube=warn";
/// Per-request bound on the operator's HTTP endpoints.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// How to run one operator process.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// `--identity`, the holder name in the Lease.
    pub identity: String,
    /// `--watch-namespace`; all namespaces when `None`.
    pub watch_namespace: Option<String>,
    /// `--lease-name`.
    pub lease_name: String,
    /// `--lease-namespace`.
    pub lease_namespace: String,
    /// `RUST_LOG`.
    pub log_filter: String,
    /// More arguments (e.g. `--signals-file`).
    pub extra_args: Vec<String>,
}

impl OperatorConfig {
    /// An operator confined to `namespace`, holding its Lease there, so tests in other
    /// namespaces run their own operators undisturbed.
    pub fn namespaced(namespace: &str) -> Self {
        Self {
            identity: format!("operator-{namespace}"),
            watch_namespace: Some(namespace.to_owned()),
            lease_name: "serval-operator".to_owned(),
            lease_namespace: namespace.to_owned(),
            log_filter: DEFAULT_OPERATOR_LOG_FILTER.to_owned(),
            extra_args: Vec::new(),
        }
    }

    /// The same configuration with more arguments.
    #[must_use]
    pub fn with_args<I: IntoIterator<Item = String>>(mut self, args: I) -> Self {
        self.extra_args.extend(args);
        self
    }

    /// The same configuration under another Lease identity.
    #[must_use]
    pub fn with_identity(mut self, identity: &str) -> Self {
        self.identity = identity.to_owned();
        self
    }
}

/// A running `serval-operator`. Dropping it SIGKILLs it.
#[derive(Debug)]
pub struct Operator {
    component: Component,
    config: OperatorConfig,
    http_addr: SocketAddr,
}

impl Operator {
    /// Starts the operator against `cluster` and waits until it answers `/healthz`.
    pub fn start(cluster: &Cluster, config: OperatorConfig) -> anyhow::Result<Self> {
        Self::start_with(
            cluster.kubeconfig_path(),
            &cluster.dir().join("logs"),
            config,
        )
    }

    /// Starts the operator with `kubeconfig`, logging into `log_dir`, and waits until it
    /// answers `/healthz`.
    pub fn start_with(
        kubeconfig: &Path,
        log_dir: &Path,
        config: OperatorConfig,
    ) -> anyhow::Result<Self> {
        static STARTS: AtomicU32 = AtomicU32::new(0);
        let binary = operator_binary()?;
        let http_addr = free_loopback_addr()?;
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        let log = log_dir.join(format!(
            "serval-operator-{}-{}-{n}.log",
            config.identity,
            std::process::id()
        ));
        let mut args = vec![
            "--sidecar-image=serval-sidecar:e2e".to_owned(),
            "--router-image=serval-router:e2e".to_owned(),
            format!("--http-addr={http_addr}"),
            format!("--lease-name={}", config.lease_name),
            format!("--lease-namespace={}", config.lease_namespace),
            format!("--identity={}", config.identity),
        ];
        if let Some(ns) = &config.watch_namespace {
            args.push(format!("--watch-namespace={ns}"));
        }
        args.extend(config.extra_args.iter().cloned());
        let envs = [
            ("KUBECONFIG", kubeconfig.as_os_str()),
            ("RUST_LOG", config.log_filter.as_ref()),
            ("NO_COLOR", "1".as_ref()),
            // A panic's message, not a backtrace, belongs in the log tail a failure shows.
            ("RUST_BACKTRACE", "0".as_ref()),
        ];
        let component = Component::spawn_with_env("serval-operator", &binary, args, envs, log)?;
        let mut operator = Self {
            component,
            config,
            http_addr,
        };
        wait_for(
            &format!("operator {} /healthz", operator.config.identity),
            DEFAULT_OPERATOR_START_TIMEOUT,
            || {
                operator.check_running()?;
                Ok(http_get(operator.http_addr, "/healthz")
                    .ok()
                    .filter(|(status, _)| *status == 200)
                    .map(|_| ()))
            },
        )?;
        Ok(operator)
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.component.pid()
    }

    /// The Lease identity.
    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &OperatorConfig {
        &self.config
    }

    /// Address of `/healthz`, `/readyz` and `/metrics`.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Path of the combined stdout/stderr log.
    pub fn log_path(&self) -> &Path {
        &self.component.log
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.component.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.component.log, lines)
    }

    /// Fails, with the log tail, if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.component.exited() {
            bail!(
                "operator {} exited ({status}); log {}:\n{}",
                self.config.identity,
                self.component.log.display(),
                self.log_tail(40)
            );
        }
        Ok(())
    }

    /// The Prometheus exposition from `/metrics`.
    pub fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = http_get(self.http_addr, "/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}: {body}");
        }
        Ok(body)
    }

    /// Peak resident set size in KiB (`VmHWM` of `/proc/<pid>/status`).
    pub fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no VmHWM in {path}"))
    }

    /// SIGKILL, as a crash or an OOM kill would: no Lease release, no cleanup.
    pub fn kill(&mut self) {
        self.component.kill();
    }

    /// SIGTERM, then SIGKILL after [`DEFAULT_OPERATOR_STOP_GRACE`].
    pub fn stop(&mut self) {
        self.component.stop(DEFAULT_OPERATOR_STOP_GRACE);
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.component.kill();
    }
}

/// The operator binary: [`OPERATOR_BIN_ENV`] if set, else built with cargo into the target
/// directory this test runs from (a no-op when it is up to date). Built once per process.
pub fn operator_binary() -> anyhow::Result<PathBuf> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| locate_or_build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn locate_or_build() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os(OPERATOR_BIN_ENV) {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("{OPERATOR_BIN_ENV}={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    // Tests run as <target>/<profile-dir>/deps/<test>-<hash>.
    let exe = std::env::current_exe().context("locating the test executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test executable is not under <target>/<profile>/deps")?;
    let target_dir = profile_dir
        .parent()
        .context("the profile directory has no parent")?;
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_owned(),
        Some(p) => p.to_owned(),
        None => bail!("cannot tell the cargo profile from {}", exe.display()),
    };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the e2e crate has no parent directory")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let shown = format!(
        "CARGO_TARGET_DIR={} cargo build --profile {profile} -p serval-operator --bin serval-operator",
        target_dir.display()
    );
    eprintln!("serval-e2e: {shown}");
    let out = Command::new(&cargo)
        .args([
            "build",
            "--profile",
            &profile,
            "-p",
            "serval-operator",
            "--bin",
            "serval-operator",
        ])
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(workspace)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `{shown}`"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
        bail!(
            "building the operator failed ({}); run it yourself to see why:\n  cd {} && {shown}\n{}",
            out.status,
            workspace.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let bin = profile_dir.join("serval-operator");
    if !bin.is_file() {
        bail!("`{shown}` succeeded but {} is missing", bin.display());
    }
    snapshot(&bin, &profile_dir.join("serval-e2e"))
}

/// A private copy of `bin` for this test process: another build in the same target directory
/// (e.g. a workspace build with other features) may replace the binary while tests run.
/// Copies left by processes that are gone are removed.
fn snapshot(bin: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    const PREFIX: &str = "serval-operator-";
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name();
        let stale = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let copy = dir.join(format!("{PREFIX}{}", std::process::id()));
    let _ = std::fs::remove_file(&copy);
    // Cargo replaces outputs rather than rewriting them, so a hard link is a stable snapshot.
    if std::fs::hard_link(bin, &copy).is_err() {
        std::fs::copy(bin, &copy)
            .with_context(|| format!("copying {} to {}", bin.display(), copy.display()))?;
    }
    Ok(copy)
}

fn free_loopback_addr() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("picking a free port")?;
    Ok(listener.local_addr()?)
}

/// A minimal HTTP/1.1 GET (the harness has no HTTP client): returns status and body.
fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    Ok((status, body.to_owned()))
}
