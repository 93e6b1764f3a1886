//! A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler and kwok (fake nodes whose pods turn Ready without running anything).

use std::collections::hash_map::RandomState;
use std::ffi::OsStr;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tempfile::TempDir;

use crate::binaries::Binaries;
use crate::pki::Pki;
use crate::process::{Components, DEFAULT_STOP_GRACE, processes_matching};
use crate::wait::wait_for;

/// Bound on kube-apiserver becoming ready (etcd and apiserver start together; 5–20 s typical
/// on 2 loaded cores).
pub const DEFAULT_APISERVER_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on kwok marking the fake nodes Ready.
pub const DEFAULT_NODES_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the controller-manager creating a namespace's `default` ServiceAccount.
pub const DEFAULT_NAMESPACE_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Number of fake nodes, enough for spreading and anti-affinity scenarios.
pub const NODE_COUNT: usize = 3;
/// Log lines per component shown in errors.
pub const LOG_TAIL_LINES: usize = 30;
/// Set to keep the cluster directory (logs, kubeconfig) after the cluster stops.
pub const KEEP_DIR_ENV: &str = "SERVAL_E2E_KEEP";

/// Per-request bound for readiness probes, so a wedged API server cannot stall a bounded wait.
const PROBE_TIMEOUT: &str = "--request-timeout=10s";
/// Cluster IPs of Services: with fake nodes nothing routes them; on a real node kube-proxy does.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The `kubernetes` Service's ClusterIP, the first address of [`SERVICE_CIDR`].
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// Pod IPs that kwok assigns (a real node's CNI uses a /24 of it).
pub const POD_CIDR: &str = "10.244.0.0/16";
const DIR_PREFIX: &str = "serval-e2e-";
const KEPT_MARKER: &str = "KEPT";

/// A running control plane. Dropping it stops every component.
pub struct Cluster {
    dir: Option<TempDir>,
    dir_path: PathBuf,
    binaries: Binaries,
    pki: Pki,
    kubeconfig: PathBuf,
    server: String,
    components: Components,
    namespaces: AtomicU32,
    options: ClusterOptions,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.dir_path)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// How a cluster is laid out.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClusterOptions {
    /// `None`: everything on 127.0.0.1 with kwok's fake nodes. `Some(ip)`: for a real node in
    /// a network namespace of its own: the API server listens on every address of the
    /// namespace and advertises `ip` (a loopback address cannot be a Service endpoint), so the
    /// `kubernetes` Service has an endpoint pods reach; there are no fake nodes.
    pub node_ip: Option<Ipv4Addr>,
}

/// Loopback ports of one cluster.
struct Ports {
    etcd_client: u16,
    etcd_peer: u16,
    apiserver: u16,
    controller_manager: u16,
    scheduler: u16,
}

impl Cluster {
    /// Builds the binaries if needed, starts every component and waits until the API server is
    /// ready, the fake nodes are Ready and the controller-manager populates new namespaces.
    /// Blocking; fine to call from async tests.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(ClusterOptions::default())
    }

    /// [`Cluster::start`] laid out by `options`.
    pub fn start_with(options: ClusterOptions) -> anyhow::Result<Self> {
        sweep_stale_dirs();
        let binaries = Binaries::locate()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .context("creating the cluster directory")?;
        let dir_path = dir.path().to_path_buf();
        let logs = dir_path.join("logs");
        let pki = match options.node_ip {
            None => Pki::generate(&dir_path.join("pki"))?,
            Some(ip) => Pki::generate_for(
                &dir_path.join("pki"),
                &[IpAddr::V4(ip), IpAddr::V4(KUBERNETES_SERVICE_IP)],
                &[
                    "kubernetes",
                    "kubernetes.default",
                    "kubernetes.default.svc",
                    "kubernetes.default.svc.cluster.local",
                ],
            )?,
        };
        let ports = free_ports()?;
        let host = options.node_ip.unwrap_or(Ipv4Addr::LOCALHOST);
        let server = format!("https://{host}:{}", ports.apiserver);
        let token = random_hex();
        std::fs::write(
            dir_path.join("tokens.csv"),
            format!("{token},admin,admin,\"system:masters\"\n"),
        )?;
        let kubeconfig = dir_path.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&server, &pki.ca_cert, &token))?;
        std::fs::create_dir_all(dir_path.join("logs"))?;

        let mut cluster = Self {
            dir: Some(dir),
            dir_path,
            binaries,
            pki,
            kubeconfig,
            server,
            components: Components::new(logs),
            namespaces: AtomicU32::new(0),
            options,
        };
        if let Err(e) = cluster.boot(&ports) {
            let tails = cluster.log_tails(LOG_TAIL_LINES);
            let stopping = match cluster.stop() {
                Ok(()) => String::new(),
                Err(e) => format!("\nthen stopping failed: {e:#}"),
            };
            let kept = cluster.keep_dir();
            bail!(
                "starting the cluster: {e:#}{stopping}\nlogs kept in {}\n{tails}",
                kept.display()
            );
        }
        Ok(cluster)
    }

    /// One cluster per test binary, started on first use. It is never dropped: its processes
    /// get SIGKILL from the kernel when the test process exits (parent-death signal), and its
    /// directory is removed by the next [`Cluster::start`].
    pub fn shared() -> anyhow::Result<&'static Self> {
        static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| Self::start().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("the shared cluster failed to start: {e}"))
    }

    fn boot(&self, ports: &Ports) -> anyhow::Result<()> {
        let d = &self.dir_path;
        let kubeconfig = self.kubeconfig.display().to_string();
        let etcd_client = format!("http://127.0.0.1:{}", ports.etcd_client);
        let etcd_peer = format!("http://127.0.0.1:{}", ports.etcd_peer);
        self.spawn(
            "etcd",
            &self.binaries.etcd(),
            &[
                "--name=node0".into(),
                format!("--data-dir={}", d.join("etcd").display()),
                format!("--listen-client-urls={etcd_client}"),
                format!("--advertise-client-urls={etcd_client}"),
                format!("--listen-peer-urls={etcd_peer}"),
                format!("--initial-advertise-peer-urls={etcd_peer}"),
                format!("--initial-cluster=node0={etcd_peer}"),
                // Test data is disposable; fsync dominates etcd latency on shared disks.
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
        )?;
        let sa_key = self.pki.service_account_key.display().to_string();
        let addresses = match self.options.node_ip {
            // The default reconciler rejects a loopback advertise address.
            None => vec![
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                "--endpoint-reconciler-type=none".into(),
            ],
            // The default (lease) reconciler gives the `kubernetes` Service its endpoint;
            // `kubectl logs` reaches the kubelet at the node's InternalIP.
            Some(ip) => vec![
                "--bind-address=0.0.0.0".into(),
                format!("--advertise-address={ip}"),
                "--kubelet-preferred-address-types=InternalIP".into(),
            ],
        };
        self.spawn(
            "kube-apiserver",
            &self.binaries.kube(),
            &[
                "apiserver".into(),
                format!("--etcd-servers={etcd_client}"),
                format!("--secure-port={}", ports.apiserver),
                format!("--tls-cert-file={}", self.pki.serving_cert.display()),
                format!("--tls-private-key-file={}", self.pki.serving_key.display()),
                format!("--client-ca-file={}", self.pki.ca_cert.display()),
                format!("--token-auth-file={}", d.join("tokens.csv").display()),
                "--authorization-mode=RBAC".into(),
                format!("--service-account-issuer={}", self.server),
                format!(
                    "--service-account-key-file={}",
                    self.pki.service_account_public_key.display()
                ),
                format!("--service-account-signing-key-file={sa_key}"),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--allow-privileged=true".into(),
                format!("--cert-dir={}", d.join("apiserver-certs").display()),
                "--profiling=false".into(),
            ]
            .into_iter()
            .chain(addresses)
            .collect::<Vec<String>>(),
        )?;
        wait_for(
            "kube-apiserver /readyz",
            DEFAULT_APISERVER_READY_TIMEOUT,
            || {
                self.check_running()?;
                let out = self.kubectl(["get", "--raw=/readyz", PROBE_TIMEOUT])?;
                Ok(out.status.success().then_some(()))
            },
        )?;

        let common = |port: u16, certs: &str| -> Vec<String> {
            vec![
                format!("--kubeconfig={kubeconfig}"),
                format!("--authentication-kubeconfig={kubeconfig}"),
                format!("--authorization-kubeconfig={kubeconfig}"),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={port}"),
                format!("--cert-dir={}", d.join(certs).display()),
            ]
        };
        let mut kcm = vec!["controller-manager".to_string()];
        kcm.extend(common(ports.controller_manager, "kcm-certs"));
        kcm.push(format!("--service-account-private-key-file={sa_key}"));
        kcm.push(format!("--root-ca-file={}", self.pki.ca_cert.display()));
        // The default 20 QPS client throttle made the Deployment and ReplicaSet controllers,
        // not the operator, the bottleneck of the 200-Backend scale test.
        kcm.push("--kube-api-qps=100".into());
        kcm.push("--kube-api-burst=200".into());
        self.spawn("kube-controller-manager", &self.binaries.kube(), &kcm)?;

        let mut scheduler = vec!["scheduler".to_string()];
        scheduler.extend(common(ports.scheduler, "scheduler-certs"));
        self.spawn("kube-scheduler", &self.binaries.kube(), &scheduler)?;

        if self.options.node_ip.is_none() {
            self.start_fake_nodes(&kubeconfig)?;
        }
        // A `default` ServiceAccount appearing proves the controller-manager works.
        let probe = self.create_namespace("serval-e2e-probe")?;
        self.kubectl_ok(["delete", "namespace", &probe, "--wait=false"])?;
        Ok(())
    }

    fn start_fake_nodes(&self, kubeconfig: &str) -> anyhow::Result<()> {
        self.spawn(
            "kwok",
            &self.binaries.kwok(),
            &[
                format!("--kubeconfig={kubeconfig}"),
                format!("--config={}", self.binaries.kwok_stages().display()),
                "--manage-all-nodes=true".into(),
                format!("--cidr={POD_CIDR}"),
                "--node-ip=127.0.0.1".into(),
                "--node-lease-duration-seconds=40".into(),
            ],
        )?;

        self.kubectl_with_stdin(["apply", "-f", "-"], &nodes_yaml())?;
        wait_for("fake nodes Ready", DEFAULT_NODES_READY_TIMEOUT, || {
            self.check_running()?;
            let out = self.kubectl([
                "get",
                PROBE_TIMEOUT,
                "nodes",
                "-o",
                r#"jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}"#,
            ])?;
            let ready = String::from_utf8_lossy(&out.stdout);
            Ok((ready.lines().filter(|l| *l == "True").count() == NODE_COUNT).then_some(()))
        })?;
        Ok(())
    }

    fn spawn(&self, name: &'static str, program: &Path, args: &[String]) -> anyhow::Result<()> {
        self.components.spawn(name, program, args)
    }

    /// Fails, with the component's log tail, if any component has exited.
    pub fn check_running(&self) -> anyhow::Result<()> {
        self.components.check_running(LOG_TAIL_LINES)
    }

    /// Path of an admin kubeconfig (token auth, member of `system:masters`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server URL, `https://127.0.0.1:<port>` (or the node IP's).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The directory holding logs, PKI, etcd data and the kubeconfig.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// The cached control-plane binaries (also `helm`).
    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    /// A new admin client. Build one per tokio runtime: a client keeps a background task on
    /// the runtime that created it.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// A `kubectl` command against this cluster, for callers that need to set more options.
    pub fn kubectl_command(&self) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            // Discovery cache per cluster: ports are reused across runs, CRDs differ.
            .arg("--cache-dir")
            .arg(self.dir_path.join("kubectl-cache"))
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the machine's `kubectl` against this cluster and returns its output, successful
    /// or not.
    pub fn kubectl<I, S>(&self, args: I) -> anyhow::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.kubectl_command()
            .args(args)
            .output()
            .context("running kubectl")
    }

    /// Runs `kubectl` and returns stdout, failing with stderr if it exits non-zero.
    pub fn kubectl_ok<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        checked(&args, self.kubectl(&args)?)
    }

    /// Runs `kubectl` with `input` on stdin (e.g. `apply -f -`), failing if it exits non-zero.
    pub fn kubectl_with_stdin<I, S>(&self, args: I, input: &str) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let mut child = self
            .kubectl_command()
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(input.as_bytes())?;
        checked(&args, child.wait_with_output()?)
    }

    /// Creates a namespace named `<prefix>-<n>-<random>` and waits for its `default`
    /// ServiceAccount, so pods can be created in it at once.
    pub fn create_namespace(&self, prefix: &str) -> anyhow::Result<String> {
        let n = self.namespaces.fetch_add(1, Ordering::Relaxed);
        let prefix: String = prefix
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        let name = format!("{}-{n}-{}", prefix.trim_matches('-'), &random_hex()[..6]);
        self.kubectl_ok(["create", "namespace", &name])?;
        wait_for(
            &format!("ServiceAccount default in namespace {name}"),
            DEFAULT_NAMESPACE_READY_TIMEOUT,
            || {
                self.check_running()?;
                Ok(self
                    .kubectl([
                        "get",
                        PROBE_TIMEOUT,
                        "serviceaccount",
                        "default",
                        "-n",
                        &name,
                    ])?
                    .status
                    .success()
                    .then_some(()))
            },
        )
        .map_err(|e| anyhow!("{e:#}\n{}", self.log_tails(LOG_TAIL_LINES)))?;
        Ok(name)
    }

    /// The last `lines` lines of every component's log, for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        self.components.log_tails(lines)
    }

    /// Pids of live processes started for this cluster (matched by its directory in their
    /// command line). Empty after [`Cluster::stop`].
    pub fn surviving_processes(&self) -> anyhow::Result<Vec<u32>> {
        processes_matching(&self.dir_path.display().to_string())
    }

    /// Keeps the cluster directory after drop, marked so [`Cluster::start`] does not sweep it.
    pub fn keep_dir(&mut self) -> PathBuf {
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::write(dir.path().join(KEPT_MARKER), "");
            return dir.keep();
        }
        self.dir_path.clone()
    }

    /// Stops every component (SIGTERM to each process group, SIGKILL after a grace period)
    /// and fails if any of this cluster's processes survive. Idempotent.
    pub fn stop(&self) -> anyhow::Result<()> {
        // Reverse start order: clients before the API server, the API server before etcd.
        self.components.stop(DEFAULT_STOP_GRACE)?;
        let survivors = self.surviving_processes()?;
        if !survivors.is_empty() {
            bail!("processes survived stopping the cluster: {survivors:?}");
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("serval-e2e: {e:#}");
        }
        if std::env::var_os(KEEP_DIR_ENV).is_some() && self.dir.is_some() {
            eprintln!("serval-e2e: kept {}", self.keep_dir().display());
        }
    }
}

fn checked(args: &[std::ffi::OsString], out: Output) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!(
            "kubectl {} failed ({}): {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Distinct free loopback ports. All listeners are held until every port is picked so the
/// same port is not handed out twice; another process may still race for one.
fn free_ports() -> anyhow::Result<Ports> {
    let listeners = (0..5)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("picking free ports")?;
    let p = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Ports {
        etcd_client: p[0],
        etcd_peer: p[1],
        apiserver: p[2],
        controller_manager: p[3],
        scheduler: p[4],
    })
}

/// 128 random bits as hex, from the OS-seeded keys of std's hasher (no extra dependency).
fn random_hex() -> String {
    (0..2)
        .map(|_| format!("{:016x}", RandomState::new().build_hasher().finish()))
        .collect()
}

fn kubeconfig_yaml(server: &str, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: serval-e2e
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: admin
  user:
    token: {token}
contexts:
- name: serval-e2e
  context:
    cluster: serval-e2e
    user: admin
current-context: serval-e2e
",
        ca = ca.display()
    )
}

fn nodes_yaml() -> String {
    (0..NODE_COUNT)
        .map(|i| {
            format!(
                "---
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-{i}
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: \"0\"
  labels:
    kubernetes.io/hostname: kwok-node-{i}
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
status:
  allocatable: {{cpu: \"32\", memory: 256Gi, pods: \"110\"}}
  capacity: {{cpu: \"32\", memory: 256Gi, pods: \"110\"}}
"
            )
        })
        .collect()
}

/// Removes directories of clusters whose test process is gone (shared clusters are never
/// dropped, so nothing else deletes them).
fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() && !entry.path().join(KEPT_MARKER).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
