//! A rollout's policy, counters and status, shared by the operator and `serval local`: the
//! routers' counters in, an interval judged by `serval_autoscale::rollout`, and the next
//! `status.rollout` out (from which the routing table takes the canary's traffic).

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serval_api::signals::{RouterSignals, latency_bucket_bounds};
use serval_api::{Rollout, RolloutInterval, RolloutStatus};
use serval_autoscale::rollout::{
    Gates, Measured, Observed, Phase, RolloutPolicy, RolloutState, Step, Traffic, Verdict,
    bucket_deltas, canary_traffic, quantile, since,
};

/// The rollout's steps; an entry that is neither `Shadow` nor a weight (which the schema
/// refuses) is left out.
pub fn steps(rollout: &Rollout) -> Vec<Step> {
    rollout
        .steps
        .iter()
        .filter_map(|s| match s {
            IntOrString::Int(w) => u32::try_from(*w).ok().map(Step::Weight),
            IntOrString::String(s) if s == "Shadow" => Some(Step::Shadow),
            IntOrString::String(s) => s.parse().ok().map(Step::Weight),
        })
        .collect()
}

/// The decision's policy for `rollout`.
pub fn policy(rollout: &Rollout) -> RolloutPolicy {
    RolloutPolicy {
        steps: steps(rollout),
        interval: std::time::Duration::from_secs(u64::from(rollout.interval_seconds)),
        min_requests: u64::from(rollout.min_requests),
        failure_limit: rollout.failure_limit,
        gates: Gates {
            max_error_rate: rollout.gates.max_error_rate,
            max_latency_ratio: rollout.gates.max_latency_ratio,
            min_agreement: rollout.gates.min_agreement,
        },
    }
}

/// What a rollout runs for: its spec and the canary's spec. A change of either restarts it.
pub fn started_for(rollout: &Rollout, canary_spec: Option<&serval_api::BackendSpec>) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(rollout)
        .unwrap_or_default()
        .hash(&mut h);
    serde_json::to_string(&canary_spec)
        .unwrap_or_default()
        .hash(&mut h);
    format!("{:016x}", h.finish())
}

/// The decision's state as `status` records it.
pub fn state_of(status: &RolloutStatus) -> RolloutState {
    let phase = match status.phase.as_str() {
        "Shadowing" => Phase::Shadowing,
        "Waiting" => Phase::Waiting,
        "Promoted" => Phase::Promoted,
        "RolledBack" => Phase::RolledBack,
        _ => Phase::Progressing,
    };
    RolloutState {
        step: usize::try_from(status.step).unwrap_or(0),
        failures: status.failures,
        phase,
    }
}

/// The status of a rollout in `state`.
pub fn status_of(
    policy: &RolloutPolicy,
    state: &RolloutState,
    started_for: String,
    message: String,
    last: Option<(&Verdict, &Measured)>,
) -> RolloutStatus {
    let traffic = canary_traffic(policy, state);
    RolloutStatus {
        phase: state.phase.as_str().to_owned(),
        step: u32::try_from(state.step).unwrap_or(u32::MAX),
        canary_percent: traffic.percent,
        shadow: traffic.shadow,
        failures: state.failures,
        message,
        last_interval: last.map(|(verdict, m)| RolloutInterval {
            verdict: match verdict {
                Verdict::Pass => "Pass",
                Verdict::Fail(_) => "Fail",
                Verdict::Waiting(_) => "Waiting",
            }
            .to_owned(),
            canary_requests: m.canary_requests,
            error_rate: m.error_rate.map(round4),
            latency_ratio: m.latency_ratio.map(round4),
            agreement: m.agreement.map(round4),
        }),
        started_for,
        last_transition_time: None,
    }
}

fn round4(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
}

/// A rollout at its first step.
pub fn initial_status(policy: &RolloutPolicy, started_for: String) -> RolloutStatus {
    let state = RolloutState::start(policy);
    let message = match policy.steps.first() {
        Some(Step::Shadow) => "started: the canary gets a mirror of the traffic".to_owned(),
        Some(Step::Weight(w)) => format!("started: the canary gets {w} % of the traffic"),
        None => "no steps: promoted".to_owned(),
    };
    status_of(policy, &state, started_for, message, None)
}

/// One side's cumulative counters in one router.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SideCounts {
    /// Requests answered.
    pub requests: u64,
    /// 5xx answers.
    pub errors: u64,
    /// Per latency bucket.
    pub buckets: Vec<u64>,
}

impl SideCounts {
    fn add(&mut self, requests: u64, errors: u64, buckets: &[u64]) {
        self.requests += requests;
        self.errors += errors;
        if self.buckets.len() < buckets.len() {
            self.buckets.resize(buckets.len(), 0);
        }
        for (mine, b) in self.buckets.iter_mut().zip(buckets) {
            *mine += b;
        }
    }

    fn since(&self, earlier: &Self) -> Self {
        Self {
            requests: since(earlier.requests, self.requests),
            errors: since(earlier.errors, self.errors),
            buckets: bucket_deltas(&earlier.buckets, &self.buckets),
        }
    }

    fn traffic(&self) -> Traffic {
        Traffic {
            requests: self.requests,
            errors: self.errors,
            p99_seconds: quantile(latency_bucket_bounds(), &self.buckets, 0.99),
        }
    }
}

/// An Endpoint's rollout counters in one router (cumulative), or their increase.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    /// The canary's route.
    pub canary: SideCounts,
    /// The stable Backends' routes, summed.
    pub stable: SideCounts,
    /// Mirrored rows that agreed.
    pub agree: u64,
    /// Mirrored rows that disagreed.
    pub disagree: u64,
    /// Mirrored requests the canary failed.
    pub shadow_errors: u64,
}

impl Counts {
    /// The counters of `endpoint` in a router's `signals`.
    pub fn of(signals: &RouterSignals, endpoint: &str, canary: &str) -> Self {
        let mut c = Self::default();
        for r in signals.routes.iter().filter(|r| r.endpoint == endpoint) {
            let side = if r.backend == canary {
                &mut c.canary
            } else {
                &mut c.stable
            };
            side.add(r.requests, r.errors, &r.latency_buckets);
        }
        for m in signals
            .mirrors
            .iter()
            .filter(|m| m.endpoint == endpoint && m.backend == canary)
        {
            c.agree += m.agree;
            c.disagree += m.disagree;
            c.shadow_errors += m.shadow_errors;
        }
        c
    }

    /// The increase since `earlier` (one router's readings); a counter that went down (the
    /// router restarted) counts from zero.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            canary: self.canary.since(&earlier.canary),
            stable: self.stable.since(&earlier.stable),
            agree: since(earlier.agree, self.agree),
            disagree: since(earlier.disagree, self.disagree),
            shadow_errors: since(earlier.shadow_errors, self.shadow_errors),
        }
    }

    /// Adds another router's increase.
    pub fn add(&mut self, other: &Self) {
        self.canary.add(
            other.canary.requests,
            other.canary.errors,
            &other.canary.buckets,
        );
        self.stable.add(
            other.stable.requests,
            other.stable.errors,
            &other.stable.buckets,
        );
        self.agree += other.agree;
        self.disagree += other.disagree;
        self.shadow_errors += other.shadow_errors;
    }

    /// The interval the decision judges (these being an increase).
    pub fn observed(&self) -> Observed {
        Observed {
            canary: self.canary.traffic(),
            stable: self.stable.traffic(),
            agree: self.agree,
            disagree: self.disagree,
            shadow_errors: self.shadow_errors,
        }
    }
}

/// Judges an interval of `increase` for a rollout in `status` and returns the next status and
/// whether the phase or step changed (a transition: log it, and publish an Event).
pub fn step(
    policy: &RolloutPolicy,
    status: &RolloutStatus,
    increase: &Counts,
) -> (RolloutStatus, bool) {
    let state = state_of(status);
    if state.phase.is_final() {
        return (status.clone(), false);
    }
    let current = policy
        .steps
        .get(state.step)
        .copied()
        .unwrap_or(Step::Weight(100));
    let (verdict, measured) =
        serval_autoscale::rollout::judge(policy, current, &increase.observed());
    let next = serval_autoscale::rollout::advance(policy, &state, &verdict);
    let message = match (&verdict, next.phase) {
        (_, Phase::Promoted) => "every step passed: the canary takes all the traffic".to_owned(),
        (Verdict::Fail(why), Phase::RolledBack) => {
            format!(
                "rolled back after {} failed intervals: {why}",
                next.failures
            )
        }
        (Verdict::Fail(why), _) => format!(
            "interval failed ({} of {} allowed): {why}",
            next.failures, policy.failure_limit
        ),
        (Verdict::Waiting(why), _) => format!("waiting: {why}"),
        (Verdict::Pass, _) => format!("step {} passed", state.step + 1),
    };
    let changed = next.phase != state.phase || next.step != state.step;
    let mut out = status_of(
        policy,
        &next,
        status.started_for.clone(),
        message,
        Some((&verdict, &measured)),
    );
    out.last_transition_time = status.last_transition_time.clone();
    (out, changed)
}
