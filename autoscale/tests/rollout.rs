//! Rollout decisions against scripted traffic traces: interval by interval, as an actuator
//! would feed them from the routers' counters.

use std::time::Duration;

use serval_autoscale::rollout::{
    Gates, Observed, Phase, RolloutPolicy, RolloutState, Step, Traffic, Verdict, advance,
    bucket_deltas, canary_traffic, judge, latency_bounds, quantile, since,
};

fn policy() -> RolloutPolicy {
    RolloutPolicy {
        steps: vec![
            Step::Shadow,
            Step::Weight(5),
            Step::Weight(25),
            Step::Weight(50),
            Step::Weight(100),
        ],
        interval: Duration::from_secs(10),
        min_requests: 20,
        failure_limit: 2,
        gates: Gates {
            max_error_rate: 0.01,
            max_latency_ratio: 1.5,
            min_agreement: 0.95,
        },
    }
}

/// Each interval is judged on its own: `minRequests` is set for the traffic an interval
/// carries at the smallest weight (here 5 % of 100 rps over 10 s: 50 requests).
///
/// One interval of `rps` requests per second for `policy`'s interval at the current step: the
/// canary's share (or a mirror of all of it in `Shadow`), with the given canary error rate,
/// p99s and agreement.
struct Trace {
    rps: f64,
    canary_error_rate: f64,
    canary_p99: f64,
    stable_p99: f64,
    agreement: f64,
}

impl Trace {
    fn healthy(rps: f64) -> Self {
        Self {
            rps,
            canary_error_rate: 0.0,
            canary_p99: 0.010,
            stable_p99: 0.010,
            agreement: 0.99,
        }
    }

    fn interval(&self, policy: &RolloutPolicy, state: &RolloutState) -> Observed {
        let total = (self.rps * policy.interval.as_secs_f64()).round() as u64;
        let share = canary_traffic(policy, state);
        let canary = total * u64::from(share.percent) / 100;
        let stable = total - canary;
        let errors = (canary as f64 * self.canary_error_rate).round() as u64;
        let mirrored = if share.shadow { total } else { 0 };
        let agree = (mirrored as f64 * self.agreement).round() as u64;
        Observed {
            canary: Traffic {
                requests: canary,
                errors,
                p99_seconds: (canary > 0).then_some(self.canary_p99),
            },
            stable: Traffic {
                requests: stable,
                errors: 0,
                p99_seconds: (stable > 0).then_some(self.stable_p99),
            },
            agree,
            disagree: mirrored - agree,
            shadow_errors: 0,
        }
    }
}

/// Runs `intervals` intervals of `trace`; returns the phases after each and the last verdict.
fn run(trace: &Trace, intervals: usize) -> (Vec<(Phase, usize)>, RolloutState, Verdict) {
    let p = policy();
    let mut state = RolloutState::start(&p);
    let mut phases = Vec::new();
    let mut last = Verdict::Waiting(String::new());
    for _ in 0..intervals {
        if state.phase.is_final() {
            // Nothing left to judge; an actuator stops here too.
            phases.push((state.phase, state.step));
            continue;
        }
        let step = p
            .steps
            .get(state.step)
            .copied()
            .unwrap_or(Step::Weight(100));
        let (verdict, _) = judge(&p, step, &trace.interval(&p, &state));
        state = advance(&p, &state, &verdict);
        phases.push((state.phase, state.step));
        last = verdict;
    }
    (phases, state, last)
}

#[test]
fn a_healthy_canary_is_promoted_through_every_step() {
    let (phases, state, _) = run(&Trace::healthy(100.0), 8);
    assert_eq!(
        phases[..5],
        [
            (Phase::Progressing, 1),
            (Phase::Progressing, 2),
            (Phase::Progressing, 3),
            (Phase::Progressing, 4),
            (Phase::Promoted, 5),
        ],
        "one interval per step"
    );
    assert_eq!(state.phase, Phase::Promoted, "and it stays promoted");
    let p = policy();
    let t = canary_traffic(&p, &state);
    assert_eq!((t.percent, t.shadow), (100, false));
    assert_eq!(state.failures, 0);
}

#[test]
fn a_canary_answering_five_percent_errors_is_rolled_back_after_failure_limit_intervals() {
    let trace = Trace {
        canary_error_rate: 0.05,
        ..Trace::healthy(100.0)
    };
    let (phases, state, verdict) = run(&trace, 6);
    // Shadow passes (mirrored answers agree); 5 % fails twice, then the rollback.
    assert_eq!(
        phases[..3],
        [
            (Phase::Progressing, 1),
            (Phase::Progressing, 1),
            (Phase::RolledBack, 1),
        ]
    );
    assert_eq!(state.phase, Phase::RolledBack);
    let Verdict::Fail(why) = verdict else {
        panic!("{verdict:?}")
    };
    assert!(why.contains("maxErrorRate"), "{why}");
    let t = canary_traffic(&policy(), &state);
    assert_eq!(
        (t.percent, t.shadow),
        (0, false),
        "the stable Backends take it all"
    );
}

#[test]
fn a_slow_canary_fails_the_latency_gate_relative_to_the_stable_backends() {
    let slow = Trace {
        canary_p99: 0.040,
        stable_p99: 0.010,
        ..Trace::healthy(100.0)
    };
    let (_, state, verdict) = run(&slow, 4);
    assert_eq!(state.phase, Phase::RolledBack);
    assert!(
        matches!(&verdict, Verdict::Fail(w) if w.contains("p99")),
        "{verdict:?}"
    );
    // The same absolute latency on a machine where the stable Backends are as slow passes.
    let loaded = Trace {
        canary_p99: 0.040,
        stable_p99: 0.035,
        ..Trace::healthy(100.0)
    };
    assert_eq!(run(&loaded, 6).1.phase, Phase::Promoted);
}

#[test]
fn a_disagreeing_shadow_never_leaves_shadowing() {
    let bad = Trace {
        agreement: 0.1,
        ..Trace::healthy(100.0)
    };
    let (phases, state, verdict) = run(&bad, 4);
    assert_eq!(phases[0], (Phase::Shadowing, 0), "one failed interval");
    assert_eq!(state.phase, Phase::RolledBack, "then rolled back");
    assert_eq!(state.step, 0, "without ever taking traffic");
    assert!(
        matches!(&verdict, Verdict::Fail(w) if w.contains("minAgreement")),
        "{verdict:?}"
    );
}

#[test]
fn a_canary_at_a_tenth_of_a_request_per_second_waits_and_is_neither_promoted_nor_rolled_back() {
    // 1 request per 10 s interval: far below minRequests at every step.
    let (phases, state, verdict) = run(&Trace::healthy(0.1), 50);
    assert!(phases.iter().all(|(p, s)| *p == Phase::Waiting && *s == 0));
    assert_eq!(state.failures, 0);
    assert!(
        matches!(&verdict, Verdict::Waiting(w) if w.contains("needed")),
        "{verdict:?}"
    );
    // Its step's traffic stays: the mirror keeps running.
    assert!(canary_traffic(&policy(), &state).shadow);
}

#[test]
fn a_router_restart_mid_rollout_counts_from_zero_and_fails_nothing() {
    // Cumulative counters of the canary's route as a router reports them; it restarts between
    // the second and third readings.
    let readings = [(1000, 0), (1400, 2), (150, 1), (600, 3)];
    let p = policy();
    let mut state = RolloutState {
        step: 1,
        failures: 0,
        phase: Phase::Progressing,
    };
    let mut previous = readings[0];
    let mut verdicts = Vec::new();
    for (requests, errors) in readings.into_iter().skip(1) {
        let obs = Observed {
            canary: Traffic {
                requests: since(previous.0, requests),
                errors: since(previous.1, errors),
                p99_seconds: Some(0.01),
            },
            stable: Traffic {
                requests: 1000,
                errors: 0,
                p99_seconds: Some(0.01),
            },
            ..Observed::default()
        };
        previous = (requests, errors);
        let (verdict, measured) = judge(&p, Step::Weight(5), &obs);
        assert!(
            measured.canary_requests < 1000,
            "never a negative (wrapped) count: {measured:?}"
        );
        state = advance(&p, &state, &verdict);
        verdicts.push(verdict);
    }
    // 400 requests with 2 errors (0.5 %); 150 since the restart with 1 (0.7 %); 450 with 2.
    assert!(verdicts.iter().all(|v| *v == Verdict::Pass), "{verdicts:?}");
    assert_eq!(state.failures, 0);
}

#[test]
fn waiting_is_judged_again_once_traffic_returns() {
    let p = policy();
    let mut state = RolloutState::start(&p);
    let quiet = Trace::healthy(0.5).interval(&p, &state);
    let (verdict, _) = judge(&p, Step::Shadow, &quiet);
    state = advance(&p, &state, &verdict);
    assert_eq!(state.phase, Phase::Waiting);
    let busy = Trace::healthy(20.0).interval(&p, &state);
    let (verdict, measured) = judge(&p, Step::Shadow, &busy);
    assert_eq!(verdict, Verdict::Pass);
    assert!(measured.agreement.is_some_and(|a| a > 0.95));
    state = advance(&p, &state, &verdict);
    assert_eq!((state.phase, state.step), (Phase::Progressing, 1));
}

#[test]
fn latency_is_not_judged_on_a_handful_of_stable_requests() {
    let p = policy();
    let obs = Observed {
        canary: Traffic {
            requests: 500,
            errors: 0,
            p99_seconds: Some(0.060),
        },
        // The few requests still in flight on the stable Backends when the canary took 100 %.
        stable: Traffic {
            requests: 3,
            errors: 0,
            p99_seconds: Some(0.010),
        },
        ..Observed::default()
    };
    let (verdict, measured) = judge(&p, Step::Weight(100), &obs);
    assert_eq!((verdict, measured.latency_ratio), (Verdict::Pass, None));
    // Below 100 %, a gate that cannot be judged is no pass: the interval waits.
    let (verdict, _) = judge(&p, Step::Weight(50), &obs);
    assert!(
        matches!(&verdict, Verdict::Waiting(w) if w.contains("stable requests")),
        "{verdict:?}"
    );
}

#[test]
fn shadow_failures_count_against_the_error_gate_not_as_disagreement() {
    let p = policy();
    let obs = Observed {
        agree: 100,
        disagree: 0,
        shadow_errors: 10,
        ..Observed::default()
    };
    let (verdict, measured) = judge(&p, Step::Shadow, &obs);
    assert_eq!(measured.agreement, Some(1.0));
    assert!(
        matches!(&verdict, Verdict::Fail(w) if w.contains("maxErrorRate")),
        "{verdict:?}"
    );
}

#[test]
fn p99_is_read_from_the_routers_buckets_within_a_few_percent() {
    let bounds = latency_bounds();
    let mut counts = vec![0u64; bounds.len() + 1];
    // 1,000 requests at 10 ms and 10 at 100 ms: p99 falls at the 10 ms bucket.
    let bucket = serval_api::signals::latency_bucket;
    counts[bucket(0.010)] += 1000;
    counts[bucket(0.100)] += 10;
    let p99 = quantile(bounds, &counts, 0.99).unwrap_or_default();
    assert!((p99 / 0.010 - 1.0).abs() < 0.25, "{p99}");
    // Half slow: p99 at 100 ms.
    counts[bucket(0.100)] += 990;
    let p99 = quantile(bounds, &counts, 0.99).unwrap_or_default();
    assert!((p99 / 0.100 - 1.0).abs() < 0.25, "{p99}");
    assert_eq!(quantile(bounds, &vec![0; bounds.len() + 1], 0.99), None);
    // Deltas between readings, across a restart.
    assert_eq!(bucket_deltas(&[5, 10, 3], &[7, 10, 1]), [2, 0, 1]);
}
