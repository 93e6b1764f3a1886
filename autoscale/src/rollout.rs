//! Progressive rollout: a canary is judged interval by interval against gates, and moves
//! through its steps (`Shadow`, then canary weights) to promotion, or back to the stable
//! Backends after too many failed intervals.
//!
//! The rules that keep it from the usual faults of metric-gated rollouts:
//! - a verdict needs `min_requests` canary requests (or compared rows, in `Shadow`): fewer is
//!   [`Verdict::Waiting`], never a pass or a failure, so a quiet canary is neither promoted on
//!   no evidence nor rolled back for want of traffic;
//! - latency is judged relative to the stable Backends in the same interval, so a loaded
//!   machine fails neither;
//! - counters that went down (a router restarted) count from zero, never negative.

use std::time::Duration;

/// One step of a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The canary gets a mirror of the traffic and is judged on agreement.
    Shadow,
    /// The canary gets this percentage of the traffic, 1–100.
    Weight(u32),
}

/// Limits an interval must stay within.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gates {
    /// Largest share of canary requests answered with an error (5xx), 0–1.
    pub max_error_rate: f64,
    /// Largest canary p99 latency over the stable Backends' p99 in the same interval.
    pub max_latency_ratio: f64,
    /// Least share of compared rows on which the shadow agreed, 0–1 (`Shadow` steps).
    pub min_agreement: f64,
}

/// A rollout as the Endpoint declares it.
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutPolicy {
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// Length of one judged interval.
    pub interval: Duration,
    /// Canary requests (or compared rows) an interval needs for a verdict.
    pub min_requests: u64,
    /// Failed intervals, over the whole rollout, that roll it back.
    pub failure_limit: u32,
    /// The gates.
    pub gates: Gates,
}

/// Requests of one side over an interval.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Traffic {
    /// Requests answered.
    pub requests: u64,
    /// Of those, errors (5xx).
    pub errors: u64,
    /// p99 latency, seconds; `None` without requests.
    pub p99_seconds: Option<f64>,
}

/// What the router saw over one interval.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Observed {
    /// The canary's own traffic (weight steps).
    pub canary: Traffic,
    /// The stable Backends' traffic.
    pub stable: Traffic,
    /// Mirrored rows on which the canary agreed with the primary.
    pub agree: u64,
    /// Mirrored rows on which it disagreed.
    pub disagree: u64,
    /// Mirrored requests the canary failed (an error status, no answer in time, unreachable).
    pub shadow_errors: u64,
}

/// The values an interval was judged on, for status and Events.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Measured {
    /// Canary requests, or compared rows plus failed shadow requests in `Shadow`.
    pub canary_requests: u64,
    /// Canary error rate, 0–1.
    pub error_rate: Option<f64>,
    /// Canary p99 ÷ stable p99.
    pub latency_ratio: Option<f64>,
    /// Agreeing rows ÷ compared rows.
    pub agreement: Option<f64>,
}

/// An interval's verdict.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Every gate held.
    Pass,
    /// A gate failed: which, in a sentence.
    Fail(String),
    /// Too few requests to judge: why.
    Waiting(String),
}

/// Where a rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// At a `Shadow` step.
    Shadowing,
    /// At a weight step.
    Progressing,
    /// The last interval had too few requests for a verdict; the step's traffic stays.
    Waiting,
    /// Every step passed: the canary takes all the traffic.
    Promoted,
    /// Too many failed intervals: the stable Backends take the traffic back.
    RolledBack,
}

impl Phase {
    /// The name status and Events show.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Shadowing => "Shadowing",
            Phase::Progressing => "Progressing",
            Phase::Waiting => "Waiting",
            Phase::Promoted => "Promoted",
            Phase::RolledBack => "RolledBack",
        }
    }

    /// Whether the rollout is over.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Promoted | Phase::RolledBack)
    }
}

/// A rollout's progress: what an actuator keeps (in status) between intervals.
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutState {
    /// Index of the current step.
    pub step: usize,
    /// Failed intervals so far.
    pub failures: u32,
    /// The phase.
    pub phase: Phase,
}

impl RolloutState {
    /// A rollout at its first step.
    pub fn start(policy: &RolloutPolicy) -> Self {
        Self {
            step: 0,
            failures: 0,
            phase: phase_of(policy.steps.first().copied()),
        }
    }
}

fn phase_of(step: Option<Step>) -> Phase {
    match step {
        Some(Step::Shadow) => Phase::Shadowing,
        Some(Step::Weight(_)) => Phase::Progressing,
        None => Phase::Promoted,
    }
}

/// What the canary gets now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CanaryTraffic {
    /// Share of the traffic, 0–100; the stable Backends share the rest by their weights.
    pub percent: u32,
    /// Whether it also gets a mirror of the traffic.
    pub shadow: bool,
}

/// The canary's traffic in `state`.
pub fn canary_traffic(policy: &RolloutPolicy, state: &RolloutState) -> CanaryTraffic {
    match state.phase {
        Phase::Promoted => CanaryTraffic {
            percent: 100,
            shadow: false,
        },
        Phase::RolledBack => CanaryTraffic {
            percent: 0,
            shadow: false,
        },
        _ => match policy.steps.get(state.step) {
            Some(Step::Shadow) => CanaryTraffic {
                percent: 0,
                shadow: true,
            },
            Some(Step::Weight(w)) => CanaryTraffic {
                percent: (*w).min(100),
                shadow: false,
            },
            None => CanaryTraffic {
                percent: 100,
                shadow: false,
            },
        },
    }
}

/// Judges one interval at `step`.
pub fn judge(policy: &RolloutPolicy, step: Step, obs: &Observed) -> (Verdict, Measured) {
    let gates = &policy.gates;
    match step {
        Step::Shadow => {
            let rows = obs.agree + obs.disagree;
            let attempts = rows + obs.shadow_errors;
            let measured = Measured {
                canary_requests: attempts,
                error_rate: ratio(obs.shadow_errors, attempts),
                latency_ratio: None,
                agreement: ratio(obs.agree, rows),
            };
            if attempts < policy.min_requests {
                let why = format!(
                    "{attempts} mirrored requests to the canary, {} needed for a verdict",
                    policy.min_requests
                );
                return (Verdict::Waiting(why), measured);
            }
            if let Some(rate) = measured.error_rate
                && rate > gates.max_error_rate
            {
                let why = format!(
                    "the canary failed {} of {attempts} mirrored requests ({}), above maxErrorRate {}",
                    obs.shadow_errors,
                    percent(rate),
                    percent(gates.max_error_rate)
                );
                return (Verdict::Fail(why), measured);
            }
            match measured.agreement {
                Some(a) if a < gates.min_agreement => {
                    let why = format!(
                        "the canary agreed on {} of {rows} rows ({}), below minAgreement {}",
                        obs.agree,
                        percent(a),
                        percent(gates.min_agreement)
                    );
                    (Verdict::Fail(why), measured)
                }
                Some(_) => (Verdict::Pass, measured),
                // Only errors, and fewer than the gate allows: nothing compared yet.
                None => (
                    Verdict::Waiting("no mirrored row could be compared".to_owned()),
                    measured,
                ),
            }
        }
        Step::Weight(_) => {
            let c = &obs.canary;
            let measured = Measured {
                canary_requests: c.requests,
                error_rate: ratio(c.errors, c.requests),
                // A p99 of a handful of requests is noise: the ratio needs `min_requests` on
                // the stable side too (at a 100 % step it has none, and latency is not judged).
                latency_ratio: match (c.p99_seconds, obs.stable.p99_seconds) {
                    (Some(canary), Some(stable))
                        if stable > 0.0 && obs.stable.requests >= policy.min_requests =>
                    {
                        Some(canary / stable)
                    }
                    _ => None,
                },
                agreement: None,
            };
            if c.requests < policy.min_requests {
                let why = format!(
                    "{} canary requests, {} needed for a verdict",
                    c.requests, policy.min_requests
                );
                return (Verdict::Waiting(why), measured);
            }
            // Below 100 % the stable Backends must carry enough requests to compare latency
            // with: a step is never passed on a gate that could not be judged.
            if let Step::Weight(w) = step
                && w < 100
                && obs.stable.requests < policy.min_requests
            {
                let why = format!(
                    "{} stable requests, {} needed to compare latency",
                    obs.stable.requests, policy.min_requests
                );
                return (Verdict::Waiting(why), measured);
            }
            if let Some(rate) = measured.error_rate
                && rate > gates.max_error_rate
            {
                let why = format!(
                    "the canary answered {} of {} requests with an error ({}), above maxErrorRate {}",
                    c.errors,
                    c.requests,
                    percent(rate),
                    percent(gates.max_error_rate)
                );
                return (Verdict::Fail(why), measured);
            }
            if let Some(r) = measured.latency_ratio
                && r > gates.max_latency_ratio
            {
                let why = format!(
                    "the canary's p99 latency is {r:.2}x the stable Backends', above maxLatencyRatio {}",
                    gates.max_latency_ratio
                );
                return (Verdict::Fail(why), measured);
            }
            (Verdict::Pass, measured)
        }
    }
}

/// The state after an interval judged `verdict`: a pass moves to the next step (past the last
/// one: promoted), a failure counts towards `failure_limit` (reached: rolled back), waiting
/// keeps the step. A finished rollout stays finished.
pub fn advance(policy: &RolloutPolicy, state: &RolloutState, verdict: &Verdict) -> RolloutState {
    if state.phase.is_final() {
        return state.clone();
    }
    let mut next = state.clone();
    match verdict {
        Verdict::Pass => {
            next.step += 1;
            next.phase = phase_of(policy.steps.get(next.step).copied());
        }
        Verdict::Fail(_) => {
            next.failures += 1;
            next.phase = if next.failures >= policy.failure_limit.max(1) {
                Phase::RolledBack
            } else {
                phase_of(policy.steps.get(next.step).copied())
            };
        }
        Verdict::Waiting(_) => next.phase = Phase::Waiting,
    }
    next
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

fn percent(fraction: f64) -> String {
    format!("{:.1} %", fraction * 100.0)
}

/// The routers' latency bucket bounds (`serval_api::signals::latency_bucket_bounds`).
pub fn latency_bounds() -> &'static [f64] {
    serval_api::signals::latency_bucket_bounds()
}

/// The `q` quantile (0–1) of requests counted per bucket of `bounds` (one more count than
/// bounds: the overflow), interpolated within its bucket; `None` without requests.
pub fn quantile(bounds: &[f64], counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (i, &n) in counts.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
            let Some(&upper) = bounds.get(i) else {
                // The overflow bucket: its lower bound is all that is known.
                return Some(lower);
            };
            let within = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
            return Some(lower + (upper - lower) * within);
        }
        below += n;
    }
    bounds.last().copied()
}

/// Per-bucket counts between two readings of cumulative per-bucket counters; a counter that
/// went down (the router restarted in between) counts from zero.
pub fn bucket_deltas(earlier: &[u64], now: &[u64]) -> Vec<u64> {
    now.iter()
        .enumerate()
        .map(|(i, &n)| since(earlier.get(i).copied().unwrap_or(0), n))
        .collect()
}

/// A counter's increase between two readings; after a restart (it went down), its value.
pub fn since(earlier: u64, now: u64) -> u64 {
    now.checked_sub(earlier).unwrap_or(now)
}
