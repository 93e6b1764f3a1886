//! The decision replayed against scripted load traces, one sample and one decision a second,
//! with the actuator applying each decision at once.

use std::time::Duration;

use serval_autoscale::{Decision, Policy, Reason, Sample, State, Window, decide};

/// Load at one second of a trace.
#[derive(Clone, Copy)]
struct Load {
    inflight: f64,
    arrivals: u64,
}

/// `clients` concurrent requests, each taking about a second.
fn busy(clients: f64) -> Load {
    Load {
        inflight: clients,
        arrivals: clients.ceil() as u64,
    }
}

const IDLE: Load = Load {
    inflight: 0.0,
    arrivals: 0,
};

/// Replays `seconds` of `load` from `start` replicas; element `t` is the decision at second `t`.
fn replay(policy: &Policy, start: u32, seconds: u64, load: impl Fn(u64) -> Load) -> Vec<Decision> {
    let mut window = Window::for_policy(policy);
    let mut state = State::default();
    let mut replicas = start;
    (0..seconds)
        .map(|t| {
            let now = Duration::from_secs(t);
            let Load { inflight, arrivals } = load(t);
            window.push(Sample {
                at: now,
                inflight,
                requests: arrivals,
            });
            let decision = decide(policy, replicas, &window, &mut state, now);
            replicas = decision.replicas;
            decision
        })
        .collect()
}

fn replicas(decisions: &[Decision]) -> Vec<u32> {
    decisions.iter().map(|d| d.replicas).collect()
}

/// Seconds at which the replica count changed.
fn changes(decisions: &[Decision]) -> Vec<usize> {
    (1..decisions.len())
        .filter(|&t| decisions[t].replicas != decisions[t - 1].replicas)
        .collect()
}

/// The default policy with these bounds and a target of 4 in flight per replica (the traces
/// below are written for it, whatever the default target becomes).
fn policy(min: u32, max: u32) -> Policy {
    Policy {
        min_replicas: min,
        max_replicas: max,
        target_inflight: 4.0,
        ..Policy::default()
    }
}

const STEP: u64 = 120;

#[test]
fn a_step_from_one_to_sixteen_clients_reaches_four_replicas_at_the_first_sample_after_it() {
    let policy = policy(1, 8);
    let trace = replay(&policy, 1, 200, |t| busy(if t < STEP { 1.0 } else { 16.0 }));
    let step = STEP as usize;
    assert!(replicas(&trace[..step]).iter().all(|&r| r == 1));
    let first_added = (step..trace.len())
        .find(|&t| trace[t].replicas > 1)
        .unwrap_or(usize::MAX);
    let reached = (step..trace.len())
        .find(|&t| trace[t].replicas == 4)
        .unwrap_or(usize::MAX);
    assert_eq!(trace[first_added].reason, Reason::PanicSurge);
    assert!(
        first_added - step <= 1,
        "first replica added {}s after the step",
        first_added - step
    );
    // The sample taken in the first second after the step decides it.
    assert!(
        reached - step <= 1,
        "4 replicas {}s after the step",
        reached - step
    );
    assert!(
        replicas(&trace[reached..]).iter().all(|&r| r == 4),
        "{:?}",
        replicas(&trace)
    );
}

#[test]
fn a_ramp_adds_replicas_without_ever_removing_one_and_settles_at_the_ramp_top() {
    let policy = policy(1, 16);
    // 0 to 32 clients over two minutes, then steady.
    let trace = replay(&policy, 1, 300, |t| {
        busy((t as f64 * 32.0 / 120.0).min(32.0))
    });
    let counts = replicas(&trace);
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
    let settled = 120 + policy.stable_window.as_secs() as usize;
    assert!(counts[settled..].iter().all(|&r| r == 8), "{counts:?}");
}

#[test]
fn a_short_spike_panics_up_holds_through_panic_and_the_delay_then_only_steps_down() {
    let policy = policy(1, 16);
    // Four clients, then forty for five seconds, then four again.
    let trace = replay(&policy, 1, 400, |t| {
        busy(if (60..65).contains(&t) { 40.0 } else { 4.0 })
    });
    let counts = replicas(&trace);
    assert!(trace[60..65].iter().any(|d| d.reason == Reason::PanicSurge));
    let peak = counts.iter().copied().max().unwrap_or(0);
    assert!(peak >= 8, "{counts:?}");
    let top = counts.iter().position(|&r| r == peak).unwrap_or(0);
    assert!(
        counts[top..].windows(2).all(|w| w[0] >= w[1]),
        "went up again: {counts:?}"
    );
    // Panic (first seen at 60 s) holds the peak for a stable window; the delay then runs
    // from the last panic decision, so nothing is removed within the delay after the spike.
    let panic_end = 60 + policy.stable_window.as_secs() as usize;
    assert!(
        counts[top..panic_end].iter().all(|&r| r == peak),
        "{counts:?}"
    );
    let first_down = (top..counts.len()).find(|&t| counts[t] < peak);
    let after_delay = panic_end - 1 + policy.scale_down_delay.as_secs() as usize;
    assert_eq!(first_down, Some(after_delay), "{counts:?}");
    assert_eq!(counts.last(), Some(&1));
}

#[test]
fn an_idle_backend_scales_to_zero_only_after_the_scale_to_zero_period_without_requests() {
    let policy = policy(0, 8);
    let last_request = 30;
    let trace = replay(&policy, 1, 600, |t| {
        if t <= last_request { busy(1.0) } else { IDLE }
    });
    let zero_at = last_request as usize + policy.scale_to_zero_after.as_secs() as usize;
    let counts = replicas(&trace);
    assert!(counts[..zero_at].iter().all(|&r| r == 1), "{counts:?}");
    assert!(counts[zero_at..].iter().all(|&r| r == 0), "{counts:?}");
    assert_eq!(trace[zero_at].reason, Reason::ScaleToZero);
    assert_eq!(trace[zero_at - 1].reason, Reason::ScaleToZeroDelayed);
    assert_eq!(trace[zero_at + 1].reason, Reason::IdleAtZero);
}

#[test]
fn an_idle_backend_never_scales_below_a_nonzero_min() {
    let policy = policy(2, 8);
    let trace = replay(&policy, 2, 900, |t| if t < 10 { busy(1.0) } else { IDLE });
    assert!(replicas(&trace).iter().all(|&r| r == 2));
    assert_eq!(trace.last().map(|d| d.reason), Some(Reason::ClampedToMin));
}

#[test]
fn requests_too_short_to_be_seen_in_flight_still_keep_a_replica() {
    let policy = policy(0, 8);
    // One quick request every ten seconds: never in flight when sampled.
    let trace = replay(&policy, 1, 900, |t| Load {
        inflight: 0.0,
        arrivals: u64::from(t % 10 == 0),
    });
    assert!(replicas(&trace).iter().all(|&r| r == 1));
}

#[test]
fn load_flapping_around_a_threshold_changes_replicas_a_bounded_number_of_times() {
    let policy = policy(1, 8);
    // 3 and 5 clients in turn every twenty seconds at a target of 4: the stable average
    // crosses one replica's target up and down all along.
    let trace = replay(&policy, 1, 900, |t| {
        busy(if (t / 20) % 2 == 0 { 3.0 } else { 5.0 })
    });
    let settled = &trace[policy.stable_window.as_secs() as usize..];
    let above: Vec<bool> = settled
        .iter()
        .map(|d| d.observed_inflight.unwrap_or(0.0) > policy.target_inflight)
        .collect();
    let crossings = above.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(
        crossings >= 20,
        "the trace crosses the target only {crossings} times"
    );
    assert!(changes(settled).len() <= 2, "{:?}", replicas(settled));
}

#[test]
fn bursts_that_come_and_go_every_few_seconds_do_not_make_replicas_oscillate() {
    let policy = policy(1, 8);
    // Twelve clients for five seconds, then none for five, over and over.
    let trace = replay(&policy, 1, 900, |t| {
        if (t / 5) % 2 == 0 { busy(12.0) } else { IDLE }
    });
    let counts = replicas(&trace);
    let downs = changes(&trace)
        .into_iter()
        .filter(|&t| counts[t] < counts[t - 1])
        .count();
    assert!(downs <= 1, "{counts:?}");
}

#[test]
fn the_first_held_request_at_zero_scales_to_one_at_the_next_decision() {
    let policy = policy(0, 8);
    let trace = replay(&policy, 0, 60, |t| if t < 20 { IDLE } else { busy(1.0) });
    assert!(replicas(&trace[..20]).iter().all(|&r| r == 0));
    assert_eq!(trace[19].reason, Reason::IdleAtZero);
    assert_eq!(trace[20].replicas, 1);
    assert_eq!(trace[20].reason, Reason::ColdStart);
    assert!(replicas(&trace[20..]).iter().all(|&r| r == 1));
}

#[test]
fn many_requests_held_at_zero_start_enough_replicas_for_them_at_once() {
    let policy = policy(0, 8);
    let trace = replay(&policy, 0, 10, |t| if t < 5 { IDLE } else { busy(12.0) });
    assert_eq!(trace[5].replicas, 3);
    assert_eq!(trace[5].reason, Reason::ColdStart);
}

#[test]
fn a_backend_at_zero_stays_at_zero_without_requests_even_with_fresh_state() {
    let policy = policy(0, 8);
    let trace = replay(&policy, 0, 600, |_| IDLE);
    assert!(replicas(&trace).iter().all(|&r| r == 0));
}

#[test]
fn a_fresh_state_waits_a_whole_scale_to_zero_period_before_removing_the_last_replica() {
    // As after an actuator restart: no memory of when the last request came.
    let policy = policy(0, 8);
    let trace = replay(&policy, 1, 600, |_| IDLE);
    let zero_at = policy.scale_to_zero_after.as_secs() as usize;
    assert!(replicas(&trace[..zero_at]).iter().all(|&r| r == 1));
    assert_eq!(trace[zero_at].replicas, 0);
}

#[test]
fn a_signal_outage_keeps_the_current_replicas() {
    let policy = policy(0, 8);
    let mut window = Window::for_policy(&policy);
    let mut state = State::default();
    window.push(Sample {
        at: Duration::ZERO,
        inflight: 20.0,
        requests: 20,
    });
    let late = Duration::from_secs(3600);
    let decision = decide(&policy, 5, &window, &mut state, late);
    assert_eq!(decision.replicas, 5);
    assert_eq!(decision.reason, Reason::NoData);
    assert_eq!(decision.observed_inflight, None);
}

#[test]
fn replicas_never_leave_the_min_max_bounds_under_any_trace() {
    let policy = policy(2, 5);
    // A deterministic pseudo-random load between 0 and 64 clients (an LCG: no dependency).
    let mut seed = 0x2545_f491_u64;
    let loads: Vec<Load> = (0..2000)
        .map(|_| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let clients = (seed >> 58) as f64;
            if clients < 8.0 { IDLE } else { busy(clients) }
        })
        .collect();
    for start in [0, 3, 9] {
        let trace = replay(&policy, start, 2000, |t| loads[t as usize]);
        assert!(replicas(&trace).iter().all(|&r| (2..=5).contains(&r)));
    }
    let high = replay(&policy, 3, 20, |_| busy(64.0));
    assert_eq!(high.last().map(|d| d.reason), Some(Reason::ClampedToMax));
}

#[test]
fn a_policy_whose_min_exceeds_its_max_holds_the_max_without_panicking() {
    let crossed = policy(6, 3);
    let trace = replay(&crossed, 0, 30, |_| busy(1.0));
    assert!(replicas(&trace).iter().all(|&r| r == 3));
}

#[test]
fn a_zero_or_nan_target_holds_the_max_instead_of_dividing_by_zero() {
    for target_inflight in [0.0, -1.0, f64::NAN] {
        let broken = Policy {
            target_inflight,
            ..policy(1, 4)
        };
        let trace = replay(&broken, 1, 10, |_| busy(1.0));
        assert_eq!(trace.last().map(|d| d.replicas), Some(4));
    }
}

#[test]
fn every_reason_has_a_camel_case_token_and_a_message() {
    for reason in Reason::ALL {
        let token = reason.to_string();
        assert!(token.chars().next().is_some_and(|c| c.is_ascii_uppercase()));
        assert!(token.chars().all(|c| c.is_ascii_alphanumeric()), "{token}");
        assert!(!reason.message().is_empty());
    }
}
