//! `serval local`: the operator's desired state, actuated as processes on this machine.
//!
//! One `serval-sidecar` per Backend replica, one `serval-router` reading a routing table file
//! that is planned by the same code as in the operator. A loop every [`TICK`] restarts crashed
//! sidecars, probes readiness, reloads edited manifests, and rewrites the table when it changes.
//!
//! A replica that exits before it was ever ready (wrong sha256, a model that does not compile)
//! is restarted with a capped back-off, and its Backend is reported failing, with the reason
//! from the sidecar's log, after [`crate::restarts::DEFAULT_FAILED_STARTS`] such starts in a
//! row: never shown as still loading. The healthy Backends keep serving and a failing one keeps
//! being retried, as in a cluster's crash loop, and at once when its manifest changes. Only
//! when every Backend is failing and no replica serves does `serval local` stop and exit
//! non-zero: there is nothing left to serve, and a script running it should see the failure.

use std::collections::{BTreeMap, VecDeque};
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
use tokio::task::JoinHandle;

use crate::autoscaler::{self, Autoscaler};
use crate::manifests::{self, Manifests, resolve_model};
use crate::restarts::{
    DEFAULT_MAX_RESTART_BACKOFF, ERROR_LINES_KEPT, Restarts, failure_reason, is_error_line,
};
use crate::rollouts;
use serval_autoscale::Snapshot;

/// How often the supervisor looks at processes and files.
pub const TICK: Duration = Duration::from_millis(250);
/// Time the router gets to pick up a table without a retiring replica before it is stopped:
/// above the router's file poll interval, so no request is sent to a stopping sidecar.
pub const DEFAULT_RETIRE_GRACE: Duration = Duration::from_millis(1500);
/// Bound on a graceful stop before SIGKILL: the sidecar's own drain bound plus margin.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on reading the last lines of an exited sidecar's log: its pipes close when it exits,
/// so this only guards the loop against a descendant that kept them open.
pub const DEFAULT_LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

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
    /// Stable window of the autoscaling decision (Backends with `spec.autoscaling`).
    pub stable_window: Duration,
}

struct Replica {
    backend: String,
    id: u32,
    port: u16,
    spec: BackendSpec,
    child: Child,
    /// Error lines of its output, to explain an exit.
    logs: Logs,
    ready: bool,
    /// Set when the replica leaves the table; it is stopped once the router has moved on.
    retire_at: Option<Instant>,
    term_sent: bool,
}

struct Supervisor {
    opts: Options,
    manifests: Manifests,
    mtimes: Vec<(PathBuf, Option<SystemTime>)>,
    replicas: Vec<Replica>,
    /// Crash record per Backend name, cleared when one of its replicas becomes ready.
    restarts: BTreeMap<String, Restarts>,
    next_id: u32,
    table_path: PathBuf,
    revision: String,
    announced: bool,
    /// Backends with `spec.autoscaling`, by name.
    autoscalers: BTreeMap<String, Autoscaler>,
    /// Origin of the autoscaling samples' times.
    origin: Instant,
    /// Endpoints with `spec.rollout`, by name.
    rollouts: BTreeMap<String, rollouts::LocalRollout>,
}

/// Runs until Ctrl-C or SIGTERM, then stops every process it started. Fails if every Backend
/// is failing and nothing is served.
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
        restarts: BTreeMap::new(),
        next_id: 0,
        table_path,
        revision: String::new(),
        announced: false,
        autoscalers: BTreeMap::new(),
        origin: Instant::now(),
        rollouts: BTreeMap::new(),
    };
    sup.sync_autoscalers();
    sup.sync_rollouts();
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
        if let Some(failures) = sup.all_failing() {
            break Err(anyhow::anyhow!(
                "every Backend is failing; nothing to serve:\n  {}",
                failures.join("\n  ")
            ));
        }
        let settled = sup.settled();
        if !sup.announced && !settled && last_progress.elapsed() > Duration::from_secs(2) {
            eprintln!(
                "serval: waiting for models to load and warm up: {}",
                sup.progress()
            );
            last_progress = Instant::now();
        }
        if !sup.announced && settled && sup.router_serves().await {
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
        self.reap_exited().await;
        self.probe_readiness().await;
        self.autoscale().await;
        self.roll_out().await;
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
                    // A changed spec is a new attempt: it starts at once, with a clean record.
                    let old = &self.manifests.backends;
                    self.restarts.retain(|name, _| {
                        matches!((old.get(name), m.backends.get(name)),
                            (Some((a, _)), Some((b, _))) if a.spec == b.spec)
                    });
                    self.manifests = m;
                    self.sync_autoscalers();
                    self.sync_rollouts();
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

    /// Removes exited replicas. An exit nobody asked for is explained from the replica's log,
    /// and its Backend restarts after a back-off; once its starts keep exiting before they are
    /// ready, the Backend is reported failing.
    async fn reap_exited(&mut self) {
        let mut i = 0;
        while i < self.replicas.len() {
            let Ok(Some(status)) = self.replicas[i].child.try_wait() else {
                i += 1;
                continue;
            };
            let r = self.replicas.remove(i);
            if r.retire_at.is_some() {
                continue;
            }
            let lines = r.logs.error_lines().await;
            let reason =
                failure_reason(&lines).unwrap_or_else(|| format!("no error in its log ({status})"));
            let record = self.restarts.entry(r.backend.clone()).or_default();
            let was_failing = record.is_failing();
            let wait = record.exited(r.ready, reason.clone(), Instant::now());
            let when = if r.ready {
                ""
            } else {
                " before becoming ready"
            };
            eprintln!(
                "serval: model server {}#{} exited{when} ({status}): {reason}; restarting in {wait:?}",
                r.backend, r.id
            );
            if record.is_failing() && !was_failing {
                let summary = record.summary().unwrap_or_default();
                eprintln!(
                    "serval: backend {}: failing: {summary}\n\
                     serval: fix its manifest or model and save; until then it is retried at \
                     most every {:?}, and other Backends keep serving",
                    r.backend, DEFAULT_MAX_RESTART_BACKOFF
                );
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
                self.restarts.remove(&r.backend);
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
        let backends: Vec<(String, BackendSpec, PathBuf, usize)> = self
            .manifests
            .backends
            .iter()
            .map(|(n, (b, f))| (n.clone(), b.spec.clone(), f.clone(), self.desired(n)))
            .collect();
        for r in self.replicas.iter_mut().filter(|r| r.retire_at.is_none()) {
            if !self.manifests.backends.contains_key(&r.backend) {
                r.retire_at = Some(Instant::now() + DEFAULT_RETIRE_GRACE);
            }
        }
        for (name, spec, file, desired) in backends {
            let live = |r: &&Replica| r.backend == name && r.retire_at.is_none();
            let current: Vec<usize> = (0..self.replicas.len())
                .filter(|&i| {
                    live(&&self.replicas[i]) && same_process(&self.replicas[i].spec, &spec)
                })
                .collect();
            let outdated: Vec<usize> = (0..self.replicas.len())
                .filter(|&i| {
                    live(&&self.replicas[i]) && !same_process(&self.replicas[i].spec, &spec)
                })
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
                .restarts
                .get(&name)
                .is_some_and(|c| !c.may_start(Instant::now()));
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
                // At zero (or before a Backend that may scale to zero first serves) the routes
                // keep their weight: the router holds the requests, as in a cluster.
                let cold = self
                    .autoscalers
                    .get(name)
                    .is_some_and(|a| a.cold || a.may_scale_to_zero());
                (
                    name.clone(),
                    BackendView {
                        ready: !addresses.is_empty(),
                        scaled_to_zero: cold && addresses.is_empty(),
                        addresses,
                    },
                )
            })
            .collect()
    }

    /// (Re)starts the rollouts whose spec or canary changed, and forgets removed ones.
    fn sync_rollouts(&mut self) {
        for line in rollouts::sync(&mut self.rollouts, &self.manifests, Instant::now()) {
            eprintln!("{line}");
        }
    }

    /// Judges the rollouts whose interval ended on the router's counters.
    async fn roll_out(&mut self) {
        if self.rollouts.is_empty() {
            return;
        }
        let now = Instant::now();
        if rollouts::until_next(&self.rollouts, now).is_some_and(|d| !d.is_zero()) {
            return;
        }
        let signals = autoscaler::read_router(self.opts.listen).await;
        let lines = rollouts::judge_due(&mut self.rollouts, &self.manifests, signals.as_ref(), now);
        for line in lines {
            eprintln!("{line}");
        }
    }

    /// Plans the table exactly as the operator does and writes it when it changed.
    fn write_table(&mut self) -> anyhow::Result<()> {
        // The rollouts' progress is status, which the plan reads as the operator's does.
        let endpoints: Vec<serval_api::Endpoint> = self
            .manifests
            .endpoints
            .values()
            .map(|(e, _)| rollouts::with_status(e, &self.rollouts))
            .collect();
        let plan = plan(&endpoints, &self.views());
        let table = plan.table;
        if table.revision == self.revision {
            return Ok(());
        }
        let tmp = self.table_path.with_extension("tmp");
        std::fs::write(&tmp, table.to_json())?;
        std::fs::rename(&tmp, &self.table_path)?; // atomic: the router never reads half a table
        self.revision = table.revision.clone();
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
        // The router's exit ends the run; its log above says why.
        spawn(cmd, "router".to_owned()).map(|(child, _)| child)
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
        let annotations = self
            .manifests
            .backends
            .get(name)
            .and_then(|(b, _)| b.metadata.annotations.as_ref());
        cmd.args(serval_api::sidecar::fault_args(annotations));
        let (child, logs) = spawn(cmd, format!("{name}#{id}"))?;
        Ok(Replica {
            backend: name.to_owned(),
            id,
            port,
            spec: spec.clone(),
            child,
            logs,
            ready: false,
            retire_at: None,
            term_sent: false,
        })
    }

    /// Live replicas of `name` that are ready.
    fn ready_count(&self, name: &str) -> usize {
        self.replicas
            .iter()
            .filter(|r| r.backend == name && r.ready && r.retire_at.is_none())
            .count()
    }

    /// Replicas `name` should run: its autoscaler's decision, else `spec.replicas`.
    fn desired(&self, name: &str) -> usize {
        let replicas = match self.autoscalers.get(name) {
            Some(a) => i64::from(a.replicas),
            None => self
                .manifests
                .backends
                .get(name)
                .map_or(0, |(b, _)| i64::from(b.spec.replicas)),
        };
        usize::try_from(replicas).unwrap_or(0)
    }

    /// One autoscaler per Backend with `spec.autoscaling`; an edited policy keeps its samples.
    fn sync_autoscalers(&mut self) {
        let now = Instant::now();
        let wanted: BTreeMap<&String, _> = self
            .manifests
            .backends
            .iter()
            .filter_map(|(name, (b, _))| {
                let spec = b.spec.autoscaling.as_ref()?;
                Some((name, autoscaler::policy(spec, self.opts.stable_window)))
            })
            .collect();
        self.autoscalers.retain(|name, _| wanted.contains_key(name));
        for (name, policy) in wanted {
            match self.autoscalers.get_mut(name) {
                Some(a) => a.set_policy(policy),
                None => {
                    let running = self
                        .replicas
                        .iter()
                        .filter(|r| &r.backend == name && r.retire_at.is_none())
                        .count();
                    let running = u32::try_from(running).unwrap_or(u32::MAX);
                    self.autoscalers
                        .insert(name.clone(), Autoscaler::new(policy, running, now));
                }
            }
        }
    }

    /// Samples and decides for each autoscaled Backend whose sample is due (at once when the
    /// router holds requests for one at zero), and records the replicas to run.
    async fn autoscale(&mut self) {
        if self.autoscalers.is_empty() {
            return;
        }
        // A replica that serves again ends the cold start: the table gives it an address.
        let names: Vec<String> = self.autoscalers.keys().cloned().collect();
        for name in &names {
            if self.ready_count(name) > 0
                && let Some(a) = self.autoscalers.get_mut(name)
            {
                a.cold = false;
            }
        }
        let now = Instant::now();
        let at_zero = self.autoscalers.values().any(|a| a.replicas == 0);
        if !at_zero && !self.autoscalers.values().any(|a| a.wants_sample(now, 0)) {
            return;
        }
        let router = autoscaler::read_router(self.opts.listen).await;
        for name in names {
            let held = router
                .as_ref()
                .and_then(|r| r.backends.iter().find(|b| b.backend == name))
                .map_or(0, |b| b.held);
            if !self
                .autoscalers
                .get(&name)
                .is_some_and(|a| a.wants_sample(Instant::now(), held))
            {
                continue;
            }
            let ports: Vec<(u32, u16)> = self
                .replicas
                .iter()
                .filter(|r| r.backend == name && r.ready && r.retire_at.is_none())
                .map(|r| (r.id, r.port))
                .collect();
            let mut snapshots = BTreeMap::new();
            for (id, port) in ports {
                if let Some(signals) = autoscaler::read_sidecar(port).await {
                    let at = Instant::now();
                    snapshots.insert(id, Snapshot { at, signals });
                }
            }
            let Some(a) = self.autoscalers.get_mut(&name) else {
                continue;
            };
            let before = a.replicas;
            let decision = a.observe(snapshots, held, Instant::now(), self.origin);
            if decision.replicas != before {
                eprintln!(
                    "serval: backend {name}: {before} -> {} replicas ({})",
                    decision.replicas, decision.reason
                );
            }
        }
    }

    fn is_failing(&self, name: &str) -> bool {
        self.restarts.get(name).is_some_and(Restarts::is_failing)
    }

    /// `backend <name>: failing: <why>` for each failing Backend.
    fn failures(&self) -> Vec<String> {
        self.restarts
            .iter()
            .filter(|(name, r)| r.is_failing() && self.manifests.backends.contains_key(*name))
            .map(|(name, r)| {
                let why = r.summary().unwrap_or_default();
                format!("backend {name}: failing: {why}")
            })
            .collect()
    }

    /// Nothing is still loading: each Backend is ready on all its replicas, or failing.
    fn settled(&self) -> bool {
        self.manifests
            .backends
            .keys()
            .all(|name| self.ready_count(name) >= self.desired(name) || self.is_failing(name))
    }

    /// The failures, when every Backend that should run is failing and no replica serves.
    fn all_failing(&self) -> Option<Vec<String>> {
        let mut wanted = self
            .manifests
            .backends
            .iter()
            // An autoscaled Backend at zero still serves: the router holds its requests.
            .filter(|(_, (b, _))| b.spec.autoscaling.is_some() || b.spec.replicas > 0)
            .map(|(name, _)| name)
            .peekable();
        wanted.peek()?;
        let serving = self
            .replicas
            .iter()
            .any(|r| r.ready && r.retire_at.is_none());
        (!serving && wanted.all(|name| self.is_failing(name))).then(|| self.failures())
    }

    /// Endpoints the router sends nowhere, with the reason: a route claimed by another, or no
    /// ready Backend with traffic. Planned as the table is, so the two always agree.
    fn unserved(&self) -> BTreeMap<String, String> {
        plan(
            self.manifests.endpoints.values().map(|(e, _)| e),
            &self.views(),
        )
        .outcomes
        .into_iter()
        .filter_map(|(name, o)| match o.conflict_with {
            Some(owner) => Some((name, format!("route already claimed by {owner}"))),
            None if o.traffic.iter().any(|t| t.ready && t.percent > 0) => None,
            None => Some((name, "no Backend with traffic is ready".to_owned())),
        })
        .collect()
    }

    /// Every served Endpoint answers ready through the router, i.e. the router has loaded a
    /// table with ready backends. Until then the demo would race the router's table reload.
    async fn router_serves(&self) -> bool {
        let unserved = self.unserved();
        for name in self
            .manifests
            .endpoints
            .keys()
            .filter(|n| !unserved.contains_key(*n))
        {
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

    /// One entry per Backend: ready replicas, and why it is restarting or failing.
    fn progress(&self) -> String {
        self.manifests
            .backends
            .keys()
            .map(|name| {
                let ready = self.ready_count(name);
                let replicas = self.desired(name);
                match self.restarts.get(name) {
                    Some(r) if r.is_failing() => {
                        format!("{name} failing: {}", r.summary().unwrap_or_default())
                    }
                    Some(r) => match r.summary() {
                        Some(why) => format!("{name} {ready}/{replicas} ready, restarting: {why}"),
                        None => format!("{name} {ready}/{replicas} ready"),
                    },
                    None => format!("{name} {ready}/{replicas} ready"),
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn announce(&self) {
        let base = format!("http://{}", self.opts.listen);
        println!("\nServal is serving (local mode). Router: {base}");
        let unserved = self.unserved();
        for (name, (ep, _)) in &self.manifests.endpoints {
            let prefix = &ep.spec.route.path_prefix;
            if let Some(why) = unserved.get(name) {
                println!("\n  Endpoint {name:?} at {base}{prefix}: not served: {why}");
                continue;
            }
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
        let failures = self.failures();
        if !failures.is_empty() {
            println!("\n  FAILING (the rest serves; fix the manifest or model and save):");
            for f in &failures {
                println!("    {f}");
            }
        }
        println!(
            "\n  Edit a manifest under {} and save: changes apply live.",
            self.opts.files.display()
        );
        println!("  Press Ctrl-C to stop.\n");
    }
}

/// Whether a replica started for spec `a` runs as one for spec `b` would: the replica count
/// and the autoscaling policy change how many run, not how each runs, so no restart.
fn same_process(a: &BackendSpec, b: &BackendSpec) -> bool {
    let strip = |s: &BackendSpec| BackendSpec {
        replicas: 0,
        autoscaling: None,
        ..s.clone()
    };
    strip(a) == strip(b)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The error lines of one process's stdout and stderr, kept while they are re-printed.
struct Logs(Vec<JoinHandle<Vec<String>>>);

impl Logs {
    /// The kept error lines, once the process has exited and its pipes have closed.
    async fn error_lines(self) -> Vec<String> {
        let mut out = Vec::new();
        for reader in self.0 {
            if let Ok(Ok(lines)) = tokio::time::timeout(DEFAULT_LOG_DRAIN_TIMEOUT, reader).await {
                out.extend(lines);
            }
        }
        out
    }
}

/// Starts a child with its output streamed to ours, each line prefixed with `[label]`.
fn spawn(mut cmd: Command, label: String) -> anyhow::Result<(Child, Logs)> {
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
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(prefix_lines(out, label.clone())));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(prefix_lines(err, label)));
    }
    Ok((child, Logs(readers)))
}

/// Re-prints every line until the stream ends and returns its last error lines. Reads bytes,
/// not UTF-8 lines, so one odd byte cannot stop the draining and block the child on a full pipe.
async fn prefix_lines(stream: impl tokio::io::AsyncRead + Unpin, label: String) -> Vec<String> {
    let mut errors = VecDeque::with_capacity(ERROR_LINES_KEPT);
    let mut lines = BufReader::new(stream).split(b'\n');
    while let Ok(Some(bytes)) = lines.next_segment().await {
        let text = String::from_utf8_lossy(&bytes);
        let line = text.trim_end_matches('\r');
        eprintln!("[{label}] {line}");
        if is_error_line(line) {
            if errors.len() == ERROR_LINES_KEPT {
                errors.pop_front();
            }
            errors.push_back(line.to_owned());
        }
    }
    errors.into()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changing_only_the_replicas_or_the_autoscaling_restarts_no_replica() {
        let spec: BackendSpec =
            serde_json::from_value(serde_json::json!({"model": {"uri": "file://m.onnx"}}))
                .unwrap_or_else(|e| panic!("{e}"));
        let scaled = BackendSpec {
            replicas: 5,
            autoscaling: Some(serval_api::Autoscaling::default()),
            ..spec.clone()
        };
        assert!(same_process(&spec, &scaled));
        let mut rebatched = spec.clone();
        rebatched.batching.max_batch_size = 1;
        assert!(!same_process(&spec, &rebatched));
    }
}
