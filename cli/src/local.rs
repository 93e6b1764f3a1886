//! `serval local`: the operator's desired state, actuated as processes on this machine.
//!
//! One `serval-sidecar` per Backend replica, one `serval-router` reading a routing table file
//! that is planned by the same code as in the operator. A loop every [`TICK`] restarts crashed
//! sidecars, probes readiness, reloads edited manifests, and rewrites the table when it changes.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use serval_api::BackendSpec;
use serval_api::sidecar::sidecar_args;
use serval_operator::desired::routing::{BackendView, plan, traffic_summary};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::manifests::{self, Manifests, resolve_model};

/// How often the supervisor looks at processes and files.
pub const TICK: Duration = Duration::from_millis(250);
/// Time the router gets to pick up a table without a retiring replica before it is stopped:
/// above the router's file poll interval, so no request is sent to a stopping sidecar.
pub const DEFAULT_RETIRE_GRACE: Duration = Duration::from_millis(1500);
/// Bound on a graceful stop before SIGKILL: the sidecar's own drain bound plus margin.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait between restarts of a crash-looping sidecar.
pub const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(30);

/// Settings of one local-mode run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Manifest file or directory.
    pub files: PathBuf,
    /// Router listen address.
    pub listen: SocketAddr,
    /// `serval-sidecar` executable.
    pub sidecar_bin: PathBuf,
    /// `serval-router` executable.
    pub router_bin: PathBuf,
    /// Send demo requests once everything is ready (a PNG, an Open Inference Protocol request).
    pub demo: Option<PathBuf>,
}

struct Replica {
    backend: String,
    id: u32,
    port: u16,
    spec: BackendSpec,
    child: Child,
    ready: bool,
    /// Set when the replica leaves the table; it is stopped once the router has moved on.
    retire_at: Option<Instant>,
    term_sent: bool,
}

#[derive(Default)]
struct Crashes {
    count: u32,
    not_before: Option<Instant>,
}

struct Supervisor {
    opts: Options,
    manifests: Manifests,
    mtimes: Vec<(PathBuf, Option<SystemTime>)>,
    replicas: Vec<Replica>,
    crashes: BTreeMap<String, Crashes>,
    next_id: u32,
    table_path: PathBuf,
    revision: String,
    announced: bool,
}

/// Runs until Ctrl-C or SIGTERM, then stops every process it started.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let manifests = match manifests::load(&opts.files) {
        Ok(m) => m,
        Err(errors) => bail!("invalid manifests:\n  {}", errors.join("\n  ")),
    };
    for (name, (b, file)) in &manifests.backends {
        resolve_model(&b.spec.model.uri, file)
            .map_err(|e| anyhow::anyhow!("Backend {name:?}: {e}"))?;
    }
    for bin in [&opts.sidecar_bin, &opts.router_bin] {
        if !bin.exists() {
            bail!(
                "{} not found: build it with `cargo build --release --workspace` (or `make build`)",
                bin.display()
            );
        }
    }
    // Fail now, with a clear message, if the router's port is taken.
    TcpListener::bind(opts.listen)
        .with_context(|| format!("port {} is not free; pick another with --port", opts.listen))?;

    let state_dir = std::env::temp_dir().join(format!("serval-local-{}", std::process::id()));
    std::fs::create_dir_all(&state_dir)?;
    let table_path = state_dir.join("routing.json");
    let mtimes = manifests::files(&opts.files)?;
    let mut sup = Supervisor {
        opts,
        manifests,
        mtimes,
        replicas: Vec::new(),
        crashes: BTreeMap::new(),
        next_id: 0,
        table_path,
        revision: String::new(),
        announced: false,
    };
    sup.write_table()?;
    let mut router = sup.spawn_router()?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(TICK);
    let mut last_progress = Instant::now();
    let result = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = term.recv() => break Ok(()),
            _ = tick.tick() => {}
        }
        if let Ok(Some(status)) = router.try_wait() {
            break Err(anyhow::anyhow!(
                "serval-router exited ({status}); see its log above"
            ));
        }
        if let Err(e) = sup.step().await {
            break Err(e);
        }
        if !sup.announced && last_progress.elapsed() > Duration::from_secs(2) {
            eprintln!(
                "serval: waiting for models to load and warm up: {}",
                sup.progress()
            );
            last_progress = Instant::now();
        }
        if !sup.announced && sup.all_ready() && sup.router_serves().await {
            sup.announced = true;
            sup.announce();
            if let Some(image) = sup.opts.demo.clone() {
                crate::demo::run(sup.opts.listen, &sup.manifests, &image).await;
            }
        }
    };

    eprintln!(
        "serval: stopping router and {} model server(s)",
        sup.replicas.len()
    );
    stop(&mut router).await;
    for r in &mut sup.replicas {
        signal_term(&r.child);
    }
    for r in &mut sup.replicas {
        stop(&mut r.child).await;
    }
    let _ = std::fs::remove_dir_all(&state_dir);
    result
}

impl Supervisor {
    async fn step(&mut self) -> anyhow::Result<()> {
        self.reload_if_changed();
        self.reap_crashed();
        self.probe_readiness().await;
        self.converge()?;
        self.write_table()?;
        self.stop_retired().await;
        Ok(())
    }

    /// Re-reads the manifests when a file changed; an invalid edit is reported and ignored.
    fn reload_if_changed(&mut self) {
        let Ok(now) = manifests::files(&self.opts.files) else {
            return;
        };
        if now == self.mtimes {
            return;
        }
        self.mtimes = now;
        match manifests::load(&self.opts.files) {
            Ok(m) => {
                let bad: Vec<String> = m
                    .backends
                    .iter()
                    .filter_map(|(n, (b, f))| {
                        resolve_model(&b.spec.model.uri, f)
                            .err()
                            .map(|e| format!("{n}: {e}"))
                    })
                    .collect();
                if bad.is_empty() {
                    eprintln!("serval: manifests changed; applying");
                    self.manifests = m;
                } else {
                    eprintln!(
                        "serval: ignoring the edit, keeping the running state:\n  {}",
                        bad.join("\n  ")
                    );
                }
            }
            Err(errors) => eprintln!(
                "serval: ignoring the edit, keeping the running state:\n  {}",
                errors.join("\n  ")
            ),
        }
    }

    fn reap_crashed(&mut self) {
        let mut crashed = Vec::new();
        for (i, r) in self.replicas.iter_mut().enumerate() {
            if let Ok(Some(status)) = r.child.try_wait() {
                if r.retire_at.is_none() {
                    eprintln!(
                        "serval: model server {}#{} exited ({status}); replacing it",
                        r.backend, r.id
                    );
                }
                crashed.push((i, r.retire_at.is_none(), r.backend.clone()));
            }
        }
        for (i, unexpected, backend) in crashed.into_iter().rev() {
            self.replicas.remove(i);
            if unexpected {
                let c = self.crashes.entry(backend).or_default();
                c.count += 1;
                let delay = Duration::from_millis(250 * 2u64.saturating_pow(c.count.min(8)))
                    .min(MAX_RESTART_BACKOFF);
                c.not_before = Some(Instant::now() + delay);
            }
        }
    }

    async fn probe_readiness(&mut self) {
        for r in self
            .replicas
            .iter_mut()
            .filter(|r| !r.ready && r.retire_at.is_none())
        {
            let url = format!("http://127.0.0.1:{}/v2/health/ready", r.port);
            let ok = crate::demo::http_client()
                .get(&url)
                .timeout(Duration::from_millis(500))
                .send()
                .await
                .is_ok_and(|resp| resp.status().is_success());
            if ok {
                r.ready = true;
                self.crashes.remove(&r.backend);
                eprintln!(
                    "serval: model server {}#{} ready on 127.0.0.1:{}",
                    r.backend, r.id, r.port
                );
            }
        }
    }

    /// Starts and retires replicas towards each Backend's spec, one surge replica at a time
    /// during a rollout so capacity never drops (max surge 1, max unavailable 0).
    fn converge(&mut self) -> anyhow::Result<()> {
        let backends: Vec<(String, BackendSpec, PathBuf)> = self
            .manifests
            .backends
            .iter()
            .map(|(n, (b, f))| (n.clone(), b.spec.clone(), f.clone()))
            .collect();
        for r in self.replicas.iter_mut().filter(|r| r.retire_at.is_none()) {
            if !self.manifests.backends.contains_key(&r.backend) {
                r.retire_at = Some(Instant::now() + DEFAULT_RETIRE_GRACE);
            }
        }
        for (name, spec, file) in backends {
            let desired = usize::try_from(spec.replicas).unwrap_or(0);
            let live = |r: &&Replica| r.backend == name && r.retire_at.is_none();
            let current: Vec<usize> = (0..self.replicas.len())
                .filter(|&i| live(&&self.replicas[i]) && self.replicas[i].spec == spec)
                .collect();
            let outdated: Vec<usize> = (0..self.replicas.len())
                .filter(|&i| live(&&self.replicas[i]) && self.replicas[i].spec != spec)
                .collect();
            let ready_current = current.iter().filter(|&&i| self.replicas[i].ready).count();
            let ready_outdated = outdated.iter().filter(|&&i| self.replicas[i].ready).count();
            let starting = current.len() - ready_current;

            // Retire: extras first, then an outdated replica once a new one can take its place.
            let retire = if current.len() > desired {
                current
                    .iter()
                    .copied()
                    .find(|&i| !self.replicas[i].ready)
                    .or(current.last().copied())
            } else if let Some(&i) = outdated.iter().find(|&&i| !self.replicas[i].ready) {
                Some(i)
            } else if !outdated.is_empty() && ready_current + ready_outdated > desired {
                outdated.first().copied()
            } else {
                None
            };
            if let Some(i) = retire {
                self.replicas[i].retire_at = Some(Instant::now() + DEFAULT_RETIRE_GRACE);
            }

            let backoff = self
                .crashes
                .get(&name)
                .and_then(|c| c.not_before)
                .is_some_and(|t| Instant::now() < t);
            let missing = desired.saturating_sub(current.len());
            let to_start = if backoff || missing == 0 {
                0
            } else if outdated.is_empty() {
                missing
            } else if starting == 0 {
                1
            } else {
                0
            };
            for _ in 0..to_start {
                let model = resolve_model(&spec.model.uri, &file)
                    .map_err(|e| anyhow::anyhow!("Backend {name:?}: {e}"))?;
                let replica = self.spawn_sidecar(&name, &spec, &model)?;
                self.replicas.push(replica);
            }
        }
        Ok(())
    }

    /// SIGTERM once the grace has passed (the sidecar drains in-flight work), SIGKILL if it
    /// is still there a stop timeout later.
    async fn stop_retired(&mut self) {
        let now = Instant::now();
        for r in &mut self.replicas {
            let Some(at) = r.retire_at else { continue };
            if now >= at + DEFAULT_STOP_TIMEOUT {
                let _ = r.child.start_kill();
            } else if now >= at && !r.term_sent {
                signal_term(&r.child);
                r.term_sent = true;
            }
        }
    }

    fn views(&self) -> BTreeMap<String, BackendView> {
        self.manifests
            .backends
            .keys()
            .map(|name| {
                let addresses: Vec<String> = self
                    .replicas
                    .iter()
                    .filter(|r| &r.backend == name && r.ready && r.retire_at.is_none())
                    .map(|r| format!("127.0.0.1:{}", r.port))
                    .collect();
                (
                    name.clone(),
                    BackendView {
                        ready: !addresses.is_empty(),
                        addresses,
                    },
                )
            })
            .collect()
    }

    /// Plans the table exactly as the operator does and writes it when it changed.
    fn write_table(&mut self) -> anyhow::Result<()> {
        let plan = plan(
            self.manifests.endpoints.values().map(|(e, _)| e),
            &self.views(),
        );
        if plan.table.revision == self.revision {
            return Ok(());
        }
        let tmp = self.table_path.with_extension("tmp");
        std::fs::write(&tmp, plan.table.to_json())?;
        std::fs::rename(&tmp, &self.table_path)?; // atomic: the router never reads half a table
        self.revision = plan.table.revision.clone();
        for (name, outcome) in &plan.outcomes {
            match &outcome.conflict_with {
                Some(owner) => eprintln!(
                    "serval: Endpoint {name}: route already claimed by {owner}; not served"
                ),
                None => eprintln!(
                    "serval: routing {name}: {}",
                    traffic_summary(&outcome.traffic)
                ),
            }
        }
        Ok(())
    }

    fn spawn_router(&self) -> anyhow::Result<Child> {
        let mut cmd = Command::new(&self.opts.router_bin);
        cmd.arg("--table").arg(&self.table_path).args([
            "--host",
            &self.opts.listen.ip().to_string(),
            "--port",
            &self.opts.listen.port().to_string(),
            // No load balancer has to notice readiness dropping here: drain at once on stop.
            "--shutdown-delay",
            "0s",
        ]);
        spawn(cmd, "router".to_owned())
    }

    fn spawn_sidecar(
        &mut self,
        name: &str,
        spec: &BackendSpec,
        model: &str,
    ) -> anyhow::Result<Replica> {
        let port = free_port()?;
        let id = self.next_id;
        self.next_id += 1;
        let mut cmd = Command::new(&self.opts.sidecar_bin);
        cmd.args(sidecar_args(name, spec, model, "127.0.0.1", port));
        let child = spawn(cmd, format!("{name}#{id}"))?;
        Ok(Replica {
            backend: name.to_owned(),
            id,
            port,
            spec: spec.clone(),
            child,
            ready: false,
            retire_at: None,
            term_sent: false,
        })
    }

    fn all_ready(&self) -> bool {
        self.manifests.backends.iter().all(|(name, (b, _))| {
            let ready = self
                .replicas
                .iter()
                .filter(|r| &r.backend == name && r.ready && r.retire_at.is_none())
                .count();
            ready >= usize::try_from(b.spec.replicas).unwrap_or(0)
        })
    }

    /// Every Endpoint answers ready through the router, i.e. the router has loaded a table
    /// with ready backends. Until then the demo would race the router's table reload.
    async fn router_serves(&self) -> bool {
        for name in self.manifests.endpoints.keys() {
            let url = format!("http://{}/v2/models/{name}/ready", self.opts.listen);
            let ok = crate::demo::http_client()
                .get(&url)
                .timeout(Duration::from_millis(500))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if !ok {
                return false;
            }
        }
        true
    }

    fn progress(&self) -> String {
        self.manifests
            .backends
            .iter()
            .map(|(name, (b, _))| {
                let ready = self
                    .replicas
                    .iter()
                    .filter(|r| &r.backend == name && r.ready)
                    .count();
                format!("{name} {ready}/{} ready", b.spec.replicas)
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn announce(&self) {
        let base = format!("http://{}", self.opts.listen);
        println!("\nServal is serving (local mode). Router: {base}");
        for (name, (ep, _)) in &self.manifests.endpoints {
            let prefix = &ep.spec.route.path_prefix;
            println!("\n  Endpoint {name:?} at {base}{prefix}");
            println!(
                "    curl -s {base}/v2/models/{name}            # model metadata (Open Inference Protocol)"
            );
            println!(
                "    curl -s -X POST {base}/v2/models/{name}/infer -H 'content-type: application/json' -d @request.json"
            );
            println!(
                "    curl -s -X POST {base}{prefix}/v1/models/{name}:predict -H 'content-type: image/png' --data-binary @models/digits/seven.png"
            );
        }
        println!(
            "\n  Edit a manifest under {} and save: changes apply live.",
            self.opts.files.display()
        );
        println!("  Press Ctrl-C to stop.\n");
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts a child with its output streamed to ours, each line prefixed with `[label]`.
fn spawn(mut cmd: Command, label: String) -> anyhow::Result<Child> {
    // The child drains and exits once its stdin closes: this process holds the pipe's other
    // end, and the kernel closes it however we end, SIGKILL included, so no child is orphaned.
    cmd.arg("--exit-with-stdin")
        // Children's logs are re-printed with a prefix, so colour codes would only clutter.
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    let mut child = cmd.spawn().with_context(|| format!("starting {program}"))?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(prefix_lines(out, label.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(prefix_lines(err, label));
    }
    Ok(child)
}

async fn prefix_lines(stream: impl tokio::io::AsyncRead + Unpin, label: String) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("[{label}] {line}");
    }
}

fn signal_term(child: &Child) {
    if let Some(pid) = child.id() {
        // `kill` from procps: the workspace forbids unsafe code, so no libc::kill here.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
}

/// SIGTERM, then SIGKILL if the process has not exited within [`DEFAULT_STOP_TIMEOUT`].
async fn stop(child: &mut Child) {
    signal_term(child);
    if tokio::time::timeout(DEFAULT_STOP_TIMEOUT, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// Next to the running `serval` binary, where `cargo build` puts its siblings.
pub fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .map(|d| d.join(name))
        .unwrap_or_else(|| PathBuf::from(name))
}
