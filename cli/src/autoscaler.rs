//! Autoscaling in local mode: the operator's decision (`serval-autoscale`), fed once a
//! [`DEFAULT_SAMPLE_INTERVAL`] from the model servers' and the router's load snapshots, and
//! acted on by starting and stopping `serval-sidecar` processes.
//!
//! At zero replicas the routing table keeps the Backend's routes and marks it scaled to zero,
//! so the router holds its requests; the held count is read every supervisor tick (not once a
//! second) and makes the decision go 0 → 1 at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serval_api::Autoscaling;
use serval_api::routing::RoutingTable;
use serval_api::signals::{RouterSignals, SIGNALS_PATH, SidecarSignals};
use serval_autoscale::{
    DEFAULT_PANIC_WINDOW, DEFAULT_SAMPLE_INTERVAL, DEFAULT_STABLE_WINDOW, Decision, Policy, Sample,
    State, Window, decide,
};

/// Bound on reading one load snapshot: a replica that does not answer within it contributes
/// nothing to that sample, and the sample is still taken within its interval.
pub const DEFAULT_SIGNALS_TIMEOUT: Duration = Duration::from_millis(300);

/// The stable window `serval local` decides on unless told otherwise: the operator's.
pub const DEFAULT_LOCAL_STABLE_WINDOW: Duration = DEFAULT_STABLE_WINDOW;

/// One replica's load snapshot and when it was read.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// When it was read.
    pub at: Instant,
    /// What the model server reported.
    pub signals: SidecarSignals,
}

/// The policy of `spec` with a stable window of `stable_window`; the panic window stays the
/// operator's unless that is longer than the stable window.
pub fn policy(spec: &Autoscaling, stable_window: Duration) -> Policy {
    let stable_window = stable_window.max(DEFAULT_SAMPLE_INTERVAL);
    Policy {
        stable_window,
        panic_window: DEFAULT_PANIC_WINDOW.min(stable_window),
        ..Policy::from(spec)
    }
}

/// One Backend's load over the last interval: per replica, the mean in flight and the requests
/// answered since that replica's previous snapshot, plus the requests the router holds (load
/// like any other, and the only load at zero).
///
/// A replica read for the first time, or restarted since, contributes its in-flight gauge and
/// no requests; a replica absent from `now` (not ready, or did not answer) contributes nothing.
pub fn sample(
    previous: &BTreeMap<u32, Snapshot>,
    now: &BTreeMap<u32, Snapshot>,
    held: u64,
    at: Duration,
) -> Sample {
    let gauge = |s: &Snapshot| s.signals.inflight as f64;
    let mut inflight = held as f64;
    let mut requests = held;
    for (id, snap) in now {
        let Some(prev) = previous.get(id) else {
            inflight += gauge(snap);
            continue;
        };
        let elapsed = snap.at.saturating_duration_since(prev.at);
        inflight += snap
            .signals
            .mean_inflight_since(&prev.signals, elapsed)
            .unwrap_or_else(|| gauge(snap));
        requests += snap.signals.requests_since(&prev.signals).unwrap_or(0);
    }
    Sample {
        at,
        inflight,
        requests,
    }
}

/// `table` with each Backend of `cold` that has no address marked scaled to zero, so the router
/// holds its requests until a table gives it an address; resealed when anything changed.
pub fn with_scaled_to_zero(mut table: RoutingTable, cold: &BTreeSet<String>) -> RoutingTable {
    let mut changed = false;
    for (name, up) in &mut table.backends {
        if cold.contains(name) && up.addresses.is_empty() && !up.scaled_to_zero {
            up.scaled_to_zero = true;
            changed = true;
        }
    }
    if changed { table.seal() } else { table }
}

/// One autoscaled Backend: its policy, samples, decision memory and the replicas last set.
#[derive(Clone, Debug)]
pub struct Autoscaler {
    policy: Policy,
    window: Window,
    state: State,
    /// The replica count local mode last set.
    pub replicas: u32,
    /// Went to zero and no replica has been ready since: the table marks it scaled to zero.
    pub cold: bool,
    snapshots: BTreeMap<u32, Snapshot>,
    next_sample: Instant,
}

impl Autoscaler {
    /// Starts from the `running` replicas within the policy's bounds (autoscaling added to a
    /// running Backend), or with none running at `minReplicas` but at least one: the model is
    /// loaded and checked once, and a Backend that may scale to zero does so after its idle
    /// period like any other.
    pub fn new(policy: Policy, running: u32, now: Instant) -> Self {
        let start = if running == 0 {
            policy.min_replicas.max(1)
        } else {
            running.max(policy.min_replicas)
        };
        Self {
            window: Window::for_policy(&policy),
            state: State::default(),
            replicas: start.min(policy.max_replicas),
            cold: false,
            snapshots: BTreeMap::new(),
            next_sample: now + DEFAULT_SAMPLE_INTERVAL,
            policy,
        }
    }

    /// Takes an edited policy; the samples and the decision's memory stay.
    pub fn set_policy(&mut self, policy: Policy) {
        if policy.stable_window != self.policy.stable_window {
            self.window = Window::for_policy(&policy);
        }
        self.policy = policy;
    }

    /// Whether a regular sample is due, or requests are held at zero and must not wait for it.
    pub fn wants_sample(&self, now: Instant, held: u64) -> bool {
        now >= self.next_sample || (self.replicas == 0 && held > 0)
    }

    /// Records the sample of these snapshots and decides; the replicas to set are in the
    /// decision and already recorded as set.
    pub fn observe(
        &mut self,
        snapshots: BTreeMap<u32, Snapshot>,
        held: u64,
        now: Instant,
        origin: Instant,
    ) -> Decision {
        let at = now.saturating_duration_since(origin);
        self.window
            .push(sample(&self.snapshots, &snapshots, held, at));
        self.snapshots = snapshots;
        self.next_sample = now + DEFAULT_SAMPLE_INTERVAL;
        let decision = decide(
            &self.policy,
            self.replicas,
            &self.window,
            &mut self.state,
            at,
        );
        self.replicas = decision.replicas;
        if decision.replicas == 0 {
            self.cold = true;
        }
        decision
    }
}

/// A model server's snapshot, or `None` if it does not answer in time.
pub async fn read_sidecar(port: u16) -> Option<SidecarSignals> {
    read(&format!("http://127.0.0.1:{port}{SIGNALS_PATH}")).await
}

/// The router's snapshot (it has no admin port in local mode), or `None`.
pub async fn read_router(listen: SocketAddr) -> Option<RouterSignals> {
    read(&format!("http://{listen}{SIGNALS_PATH}")).await
}

async fn read<T: serde::de::DeserializeOwned>(url: &str) -> Option<T> {
    let resp = crate::demo::http_client()
        .get(url)
        .timeout(DEFAULT_SIGNALS_TIMEOUT)
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serval_api::routing::{ROUTING_TABLE_API_VERSION, Upstream};

    fn snap(at: Instant, inflight: u64, inflight_seconds: f64, requests: u64) -> Snapshot {
        Snapshot {
            at,
            signals: SidecarSignals {
                inflight,
                inflight_seconds,
                requests,
                ..SidecarSignals::default()
            },
        }
    }

    #[test]
    fn a_sample_sums_each_replicas_mean_since_its_last_read_plus_the_held_requests() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(2);
        let previous = BTreeMap::from([(1, snap(t0, 0, 10.0, 100)), (2, snap(t0, 0, 50.0, 500))]);
        let now = BTreeMap::from([
            // 6 request-seconds over 2 s: 3 in flight on average; 40 requests.
            (1, snap(t1, 1, 16.0, 140)),
            // Restarted in between: its gauge, no requests.
            (2, snap(t1, 2, 0.5, 3)),
            // First read: its gauge, no requests.
            (3, snap(t1, 4, 99.0, 99)),
        ]);
        let s = sample(&previous, &now, 5, Duration::from_secs(7));
        assert_eq!(s.at, Duration::from_secs(7));
        assert!((s.inflight - (3.0 + 2.0 + 4.0 + 5.0)).abs() < 1e-9, "{s:?}");
        assert_eq!(s.requests, 40 + 5);
    }

    #[test]
    fn replicas_that_did_not_answer_contribute_nothing() {
        let t0 = Instant::now();
        let previous = BTreeMap::from([(1, snap(t0, 3, 10.0, 100))]);
        let s = sample(&previous, &BTreeMap::new(), 0, Duration::ZERO);
        assert_eq!((s.inflight, s.requests), (0.0, 0));
        assert!(!s.is_active());
    }

    fn table(addresses: &[&str]) -> RoutingTable {
        let up = |addrs: &[&str]| Upstream {
            model: "m".to_owned(),
            addresses: addrs.iter().map(|a| (*a).to_owned()).collect(),
            ready: true,
            scaled_to_zero: false,
        };
        RoutingTable {
            api_version: ROUTING_TABLE_API_VERSION.to_owned(),
            revision: String::new(),
            routes: Vec::new(),
            backends: BTreeMap::from([
                ("cold".to_owned(), up(addresses)),
                ("warm".to_owned(), up(&["127.0.0.1:1"])),
            ]),
        }
        .seal()
    }

    #[test]
    fn a_backend_at_zero_is_marked_scaled_to_zero_in_a_new_revision() {
        let plain = table(&[]);
        let cold = BTreeSet::from(["cold".to_owned(), "warm".to_owned()]);
        let marked = with_scaled_to_zero(plain.clone(), &cold);
        assert!(marked.backends["cold"].scaled_to_zero);
        assert!(
            !marked.backends["warm"].scaled_to_zero,
            "a Backend with an address is served, not held"
        );
        assert_ne!(marked.revision, plain.revision, "the router must reload it");
        assert!(marked.to_json().contains("\"scaledToZero\": true"));
        assert_eq!(with_scaled_to_zero(plain.clone(), &BTreeSet::new()), plain);
    }

    #[test]
    fn a_backend_with_an_address_again_is_not_held() {
        let started = table(&["127.0.0.1:2"]);
        let cold = BTreeSet::from(["cold".to_owned()]);
        assert_eq!(with_scaled_to_zero(started.clone(), &cold), started);
    }

    #[test]
    fn held_requests_at_zero_bring_a_replica_back_without_waiting_for_the_interval() {
        let spec = Autoscaling {
            min_replicas: 0,
            max_replicas: 3,
            target_inflight: 1,
            scale_down_delay_seconds: 0,
            scale_to_zero_after_seconds: 1,
        };
        let origin = Instant::now();
        let policy = policy(&spec, Duration::from_secs(10));
        assert_eq!(
            Autoscaler::new(policy, 7, origin).replicas,
            3,
            "within maxReplicas"
        );
        let mut a = Autoscaler::new(policy, 0, origin);
        assert_eq!(a.replicas, 1, "starts with one replica to load the model");
        let mut now = origin;
        for _ in 0..5 {
            now += DEFAULT_SAMPLE_INTERVAL;
            assert!(a.wants_sample(now, 0));
            a.observe(BTreeMap::new(), 0, now, origin);
        }
        assert_eq!((a.replicas, a.cold), (0, true), "idle: scaled to zero");
        let soon = now + Duration::from_millis(100);
        assert!(!a.wants_sample(soon, 0));
        assert!(a.wants_sample(soon, 1), "a held request is sampled at once");
        let d = a.observe(BTreeMap::new(), 1, soon, origin);
        assert_eq!(d.replicas, 1, "{d:?}");
        assert_eq!(d.reason, serval_autoscale::Reason::ColdStart);
    }
}
