//! What both actuators keep per Backend between samples: the policy, the window, the
//! decision's memory and the replica count last set; and how a sample is made from the model
//! servers' load snapshots. Still no I/O and no clock: instants are data the caller read.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serval_api::signals::SidecarSignals;

use crate::{Decision, Policy, Sample, State, Window, decide};

/// One replica's load snapshot and when it was read.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// When it was read.
    pub at: Instant,
    /// What the model server reported.
    pub signals: SidecarSignals,
}

/// One Backend's load over the last interval: per replica, the mean in flight and the requests
/// answered since that replica's previous snapshot, plus the requests the router holds (load
/// like any other, and the only load at zero). Replicas are keyed by whatever names them to
/// the actuator (a process id, a pod name).
///
/// A replica read for the first time, or restarted since, contributes its in-flight gauge and
/// no requests; a replica absent from `now` (not ready, or did not answer) contributes nothing.
pub fn sample<K: Ord>(
    previous: &BTreeMap<K, Snapshot>,
    now: &BTreeMap<K, Snapshot>,
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

/// One autoscaled Backend as an actuator tracks it: feed it a sample a second, set what it
/// decides.
#[derive(Clone, Debug)]
pub struct Scaler {
    policy: Policy,
    window: Window,
    state: State,
    replicas: u32,
}

impl Scaler {
    /// Starts from the `running` replicas within the policy's bounds (autoscaling added to a
    /// running Backend), or with none running at `minReplicas` but at least one: the model is
    /// loaded and checked once, and a Backend that may scale to zero does so after its idle
    /// period like any other.
    pub fn new(policy: Policy, running: u32) -> Self {
        let start = if running == 0 {
            policy.min_replicas.max(1)
        } else {
            running.max(policy.min_replicas)
        };
        Self::resume(policy, start)
    }

    /// Resumes at a count an earlier decision set (an actuator restarted): within the bounds,
    /// and 0 stays 0 when the policy allows it, so a restart wakes nothing up.
    pub fn resume(policy: Policy, replicas: u32) -> Self {
        Self {
            window: Window::for_policy(&policy),
            state: State::default(),
            replicas: policy.clamp(replicas),
            policy,
        }
    }

    /// The policy decided on.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Takes an edited policy; the samples and the decision's memory stay (the window is
    /// rebuilt only when its span changed). The count set is brought within the new bounds.
    pub fn set_policy(&mut self, policy: Policy) {
        if policy.stable_window != self.policy.stable_window {
            self.window = Window::for_policy(&policy);
        }
        self.policy = policy;
        self.replicas = policy.clamp(self.replicas);
    }

    /// The replica count last decided (what the actuator should have set).
    pub fn replicas(&self) -> u32 {
        self.replicas
    }

    /// Records `sample` and decides at its time; the decision's count is recorded as set.
    pub fn observe(&mut self, sample: Sample) -> Decision {
        self.window.push(sample);
        self.decide_at(sample.at)
    }

    /// Decides at `at` on the samples already recorded: when a round of reads brought no
    /// data, an outage must neither count as idle nor move replicas by itself.
    pub fn decide_at(&mut self, at: Duration) -> Decision {
        let decision = decide(
            &self.policy,
            self.replicas,
            &self.window,
            &mut self.state,
            at,
        );
        self.replicas = decision.replicas;
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Reason;

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
        let s = sample(&previous, &BTreeMap::<u32, _>::new(), 0, Duration::ZERO);
        assert_eq!((s.inflight, s.requests), (0.0, 0));
        assert!(!s.is_active());
    }

    fn policy() -> Policy {
        Policy {
            min_replicas: 0,
            max_replicas: 3,
            target_inflight: 1.0,
            scale_down_delay: Duration::ZERO,
            scale_to_zero_after: Duration::from_secs(1),
            stable_window: Duration::from_secs(10),
            panic_window: Duration::from_secs(6),
            ..Policy::default()
        }
    }

    #[test]
    fn a_new_scaler_starts_within_the_bounds_and_with_a_replica_to_load_the_model() {
        assert_eq!(Scaler::new(policy(), 7).replicas(), 3, "within maxReplicas");
        assert_eq!(Scaler::new(policy(), 0).replicas(), 1);
        let at_least_two = Policy {
            min_replicas: 2,
            ..policy()
        };
        assert_eq!(Scaler::new(at_least_two, 1).replicas(), 2);
    }

    #[test]
    fn a_resumed_scaler_at_zero_stays_there_until_a_request_comes() {
        let mut s = Scaler::resume(policy(), 0);
        assert_eq!(s.replicas(), 0, "a restart wakes nothing up");
        let idle = |at| Sample {
            at: Duration::from_secs(at),
            inflight: 0.0,
            requests: 0,
        };
        assert_eq!(s.observe(idle(1)).reason, Reason::IdleAtZero);
        let held = Sample {
            inflight: 2.0,
            requests: 2,
            ..idle(2)
        };
        let d = s.observe(held);
        assert_eq!((d.replicas, d.reason), (2, Reason::ColdStart));
        assert_eq!(s.replicas(), 2, "recorded as set");
        // A tighter policy brings the count within its bounds at once.
        s.set_policy(Policy {
            max_replicas: 1,
            ..policy()
        });
        assert_eq!(s.replicas(), 1);
    }
}
