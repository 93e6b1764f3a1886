//! Autoscaling in local mode: the operator's decision (`serval-autoscale`), fed once a
//! [`DEFAULT_SAMPLE_INTERVAL`] from the model servers' and the router's load snapshots, and
//! acted on by starting and stopping `serval-sidecar` processes.
//!
//! At zero replicas the routing table keeps the Backend's routes and marks it scaled to zero
//! (`BackendView::scaled_to_zero`),
//! so the router holds its requests; the held count is read every supervisor tick (not once a
//! second) and makes the decision go 0 → 1 at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serval_api::Autoscaling;
use serval_api::signals::{RouterSignals, SIGNALS_PATH, SidecarSignals};
use serval_autoscale::{
    DEFAULT_SAMPLE_INTERVAL, DEFAULT_STABLE_WINDOW, Decision, Policy, Scaler, Snapshot, sample,
};

/// Bound on reading one load snapshot: a replica that does not answer within it contributes
/// nothing to that sample, and the sample is still taken within its interval.
pub const DEFAULT_SIGNALS_TIMEOUT: Duration = Duration::from_millis(300);

/// The stable window `serval local` decides on unless told otherwise: the operator's.
pub const DEFAULT_LOCAL_STABLE_WINDOW: Duration = DEFAULT_STABLE_WINDOW;

/// The policy of `spec` with a stable window of `stable_window` (see
/// [`Policy::with_stable_window`]).
pub fn policy(spec: &Autoscaling, stable_window: Duration) -> Policy {
    Policy::from(spec).with_stable_window(stable_window)
}

/// One autoscaled Backend in local mode: the shared [`Scaler`], plus what only processes need.
#[derive(Clone, Debug)]
pub struct Autoscaler {
    scaler: Scaler,
    /// The replica count local mode last set.
    pub replicas: u32,
    /// Went to zero and no replica has been ready since: the routing table marks it scaled to
    /// zero, so the router holds its requests.
    pub cold: bool,
    snapshots: BTreeMap<u32, Snapshot>,
    next_sample: Instant,
}

impl Autoscaler {
    /// Starts as [`Scaler::new`] from the `running` replicas.
    pub fn new(policy: Policy, running: u32, now: Instant) -> Self {
        let scaler = Scaler::new(policy, running);
        Self {
            replicas: scaler.replicas(),
            scaler,
            cold: false,
            snapshots: BTreeMap::new(),
            next_sample: now + DEFAULT_SAMPLE_INTERVAL,
        }
    }

    /// Whether the Backend may scale to zero (`minReplicas: 0`): with no replica serving, its
    /// requests are then held rather than refused, as the operator does.
    pub fn may_scale_to_zero(&self) -> bool {
        self.scaler.policy().min_replicas == 0
    }

    /// Takes an edited policy; the samples and the decision's memory stay.
    pub fn set_policy(&mut self, policy: Policy) {
        self.scaler.set_policy(policy);
        self.replicas = self.scaler.replicas();
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
        let sample = sample(&self.snapshots, &snapshots, held, at);
        self.snapshots = snapshots;
        self.next_sample = now + DEFAULT_SAMPLE_INTERVAL;
        let decision = self.scaler.observe(sample);
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
