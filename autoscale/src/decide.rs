//! The decision: replicas and a reason from a policy, a window of samples and a little memory.

use std::collections::VecDeque;
use std::time::Duration;

use crate::{Policy, Reason, Window};

/// A decision: the replica count to set, why, and the load it was based on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    /// Replicas to set, always within the policy's bounds.
    pub replicas: u32,
    /// Why this count.
    pub reason: Reason,
    /// Average in-flight requests over the stable window, for status; `None` without samples.
    pub observed_inflight: Option<f64>,
}

/// What a decision remembers between calls, one per Backend. Starts empty; losing it (an
/// actuator restart) only makes the next decisions more cautious, never hastier.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct State {
    /// First decision seen: an idle period is never counted from before it.
    first_decision: Option<Duration>,
    /// Newest sample that showed traffic: the scale-to-zero period runs from it.
    last_active: Option<Duration>,
    /// Panic mode: when the surge condition last held (it ends a stable window later).
    panic_last_trigger: Option<Duration>,
    /// Desires within the scale-down delay as a monotonic queue: decreasing values, so its
    /// front is the highest and its length is at most `max_replicas + 1`.
    recent_desires: VecDeque<(Duration, u32)>,
}

impl State {
    /// Whether panic mode is on (scale-ups use the panic window; nothing scales down).
    pub fn panicking(&self) -> bool {
        self.panic_last_trigger.is_some()
    }

    /// When traffic was last seen, since the caller's origin.
    pub fn last_active(&self) -> Option<Duration> {
        self.last_active
    }

    /// Records a desire and returns the highest one within the scale-down delay.
    fn highest_desire(&mut self, policy: &Policy, now: Duration, wanted: u32) -> u32 {
        // Above the maximum all values act alike; capping them bounds the queue's length.
        let wanted = wanted.min(policy.max_replicas);
        while let Some(&(at, _)) = self.recent_desires.front()
            && now.saturating_sub(at) >= policy.scale_down_delay
        {
            self.recent_desires.pop_front();
        }
        while let Some(&(_, value)) = self.recent_desires.back()
            && value <= wanted
        {
            self.recent_desires.pop_back();
        }
        self.recent_desires.push_back((now, wanted));
        self.recent_desires
            .front()
            .map_or(wanted, |&(_, value)| value)
    }
}

/// Decides how many replicas a Backend should have at `now`.
///
/// `current_replicas` is the count the actuator last set (not the Ready count), so a replica
/// still loading its model is not asked for twice. `window` holds the samples pushed up to
/// `now`; `state` is this Backend's memory, updated in place. Call it once per sample.
pub fn decide(
    policy: &Policy,
    current_replicas: u32,
    window: &Window,
    state: &mut State,
    now: Duration,
) -> Decision {
    let current = current_replicas;
    let first_decision = *state.first_decision.get_or_insert(now);
    if let Some(sample) = window.latest_active(now, policy.stable_window) {
        state.last_active = state.last_active.max(Some(sample.at));
    }

    let Some(stable) = window.average_inflight(now, policy.stable_window) else {
        return bounded(policy, current, Reason::NoData, None);
    };
    let observed = Some(stable);

    if current == 0 {
        // A request at zero is held by the router until a replica is Ready: start at once,
        // sized on what is held right now rather than on an average diluted by the idle past.
        return match window.latest_active(now, policy.panic_window) {
            Some(sample) => {
                let wanted = policy.replicas_for(sample.inflight).max(1);
                state.highest_desire(policy, now, wanted);
                bounded(policy, wanted, Reason::ColdStart, observed)
            }
            None => bounded(policy, 0, Reason::IdleAtZero, observed),
        };
    }

    let stable_wanted = policy.replicas_for(stable);
    // The surge is judged on the panic window and on the newest sample alone (each sample is
    // already a second's average where the signal source averages): a step shows in the first
    // second after it instead of after a few samples of a 6 s mean.
    let newest = window
        .latest()
        .filter(|s| s.at <= now && now.saturating_sub(s.at) < policy.panic_window)
        .map_or(0.0, |s| s.inflight);
    let panic_average = window
        .average_inflight(now, policy.panic_window)
        .unwrap_or(stable)
        .max(newest);
    let surge = panic_average / policy.target() >= policy.panic_threshold * f64::from(current);
    if surge {
        state.panic_last_trigger = Some(now);
    } else if let Some(trigger) = state.panic_last_trigger
        && now.saturating_sub(trigger) >= policy.stable_window
    {
        state.panic_last_trigger = None;
    }

    if state.panicking() {
        let wanted = policy.replicas_for(panic_average).max(stable_wanted);
        let (replicas, reason) = if wanted > current {
            (wanted, Reason::PanicSurge)
        } else {
            (current, Reason::HoldingPanic)
        };
        state.highest_desire(policy, now, replicas);
        return bounded(policy, replicas, reason, observed);
    }

    let idle_since = state
        .last_active
        .map_or(first_decision, |at| at.max(first_decision));
    if policy.min_replicas == 0 && now.saturating_sub(idle_since) >= policy.scale_to_zero_after {
        state.highest_desire(policy, now, 0);
        return bounded(policy, 0, Reason::ScaleToZero, observed);
    }

    let (wanted, mut reason) = if stable_wanted == 0 && policy.min_replicas == 0 {
        (1, Reason::ScaleToZeroDelayed)
    } else {
        (stable_wanted, Reason::StableAverage)
    };
    let highest = state.highest_desire(policy, now, wanted);
    let replicas = if wanted >= current {
        wanted
    } else if highest >= current {
        reason = Reason::ScaleDownDelayed;
        current
    } else {
        // The lower desire has held for the whole delay: go down to the highest within it.
        highest
    };
    bounded(policy, replicas, reason, observed)
}

/// The decision with `replicas` clamped to the policy's bounds; a clamp becomes the reason.
fn bounded(policy: &Policy, replicas: u32, reason: Reason, observed: Option<f64>) -> Decision {
    let clamped = policy.clamp(replicas);
    let reason = match clamped.cmp(&replicas) {
        std::cmp::Ordering::Greater => Reason::ClampedToMin,
        std::cmp::Ordering::Less => Reason::ClampedToMax,
        std::cmp::Ordering::Equal => reason,
    };
    Decision {
        replicas: clamped,
        reason,
        observed_inflight: observed,
    }
}
