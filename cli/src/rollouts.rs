//! Progressive rollouts in local mode: every `intervalSeconds` the router's counters of each
//! Endpoint with `spec.rollout` are judged by the operator's code
//! (`serval_operator::desired::rollout`), the canary's traffic follows the verdict through
//! the routing table, and each transition is printed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serval_api::signals::RouterSignals;
use serval_api::{Endpoint, RolloutStatus};
use serval_operator::desired::rollout::{Counts, initial_status, policy, started_for, step};

use crate::manifests::Manifests;

/// One Endpoint's rollout as local mode runs it.
#[derive(Clone, Debug)]
pub struct LocalRollout {
    /// Where it stands (what the operator keeps in `status.rollout`).
    pub status: RolloutStatus,
    /// The router's counters at the start of the current interval.
    counts: Option<Counts>,
    /// When the current interval ends.
    next_at: Instant,
}

/// The rollouts of `manifests`: kept when their spec and canary are unchanged, (re)started
/// otherwise, dropped with their `spec.rollout`. Returns a line to print per start.
pub fn sync(
    rollouts: &mut BTreeMap<String, LocalRollout>,
    manifests: &Manifests,
    now: Instant,
) -> Vec<String> {
    let mut lines = Vec::new();
    rollouts.retain(|name, _| {
        manifests
            .endpoints
            .get(name)
            .is_some_and(|(e, _)| e.spec.rollout.is_some())
    });
    for (name, (ep, _)) in &manifests.endpoints {
        let Some(spec) = &ep.spec.rollout else {
            continue;
        };
        let canary = manifests.backends.get(&spec.canary).map(|(b, _)| &b.spec);
        let key = started_for(spec, canary);
        if rollouts
            .get(name)
            .is_some_and(|r| r.status.started_for == key)
        {
            continue;
        }
        let p = policy(spec);
        let status = initial_status(&p, key);
        lines.push(format!(
            "serval: rollout {name}: canary {}: {} ({})",
            spec.canary, status.phase, status.message
        ));
        // The first reading, at once, starts the first interval.
        rollouts.insert(
            name.clone(),
            LocalRollout {
                status,
                counts: None,
                next_at: now,
            },
        );
    }
    lines
}

/// Judges each rollout whose interval ended by `now` on the router's `signals`; returns a line
/// to print per transition. An interval whose signals could not be read is judged at the
/// next tick.
pub fn judge_due(
    rollouts: &mut BTreeMap<String, LocalRollout>,
    manifests: &Manifests,
    signals: Option<&RouterSignals>,
    now: Instant,
) -> Vec<String> {
    let mut lines = Vec::new();
    for (name, r) in rollouts.iter_mut() {
        let Some(spec) = manifests
            .endpoints
            .get(name)
            .and_then(|(e, _)| e.spec.rollout.as_ref())
        else {
            continue;
        };
        // A promoted or rolled-back rollout is over until its spec or canary changes.
        if serval_operator::desired::rollout::state_of(&r.status)
            .phase
            .is_final()
        {
            continue;
        }
        let Some(signals) = signals else { continue };
        let counts = Counts::of(signals, name, &spec.canary);
        let p = policy(spec);
        let Some(earlier) = &r.counts else {
            // The first reading starts the first interval.
            r.counts = Some(counts);
            r.next_at = now + p.interval;
            continue;
        };
        if now < r.next_at {
            continue;
        }
        let (next, changed) = step(&p, &r.status, &counts.since(earlier));
        r.counts = Some(counts);
        r.next_at = now + p.interval;
        let failed = next
            .last_interval
            .as_ref()
            .is_some_and(|l| l.verdict == "Fail");
        if changed || failed {
            let measured = next
                .last_interval
                .as_ref()
                .map(describe)
                .unwrap_or_default();
            lines.push(format!(
                "serval: rollout {name}: {} step {}/{}, canary {} % {}({}; {measured})",
                next.phase,
                next.step
                    .min(u32::try_from(p.steps.len()).unwrap_or(u32::MAX)),
                p.steps.len(),
                next.canary_percent,
                if next.shadow { "+ shadow " } else { "" },
                next.message
            ));
        }
        r.status = next;
    }
    lines
}

fn describe(i: &serval_api::RolloutInterval) -> String {
    let mut parts = vec![format!("{} canary requests", i.canary_requests)];
    if let Some(e) = i.error_rate {
        parts.push(format!("errors {:.1} %", e * 100.0));
    }
    if let Some(l) = i.latency_ratio {
        parts.push(format!("p99 {l:.2}x stable"));
    }
    if let Some(a) = i.agreement {
        parts.push(format!("agreement {:.1} %", a * 100.0));
    }
    parts.join(", ")
}

/// `endpoint` with its rollout's progress in its status, as the routing table reads it.
pub fn with_status(endpoint: &Endpoint, rollouts: &BTreeMap<String, LocalRollout>) -> Endpoint {
    let mut e = endpoint.clone();
    if let Some(r) = rollouts.get(&kube::ResourceExt::name_any(endpoint)) {
        e.status.get_or_insert_with(Default::default).rollout = Some(r.status.clone());
    }
    e
}

/// Time until the next interval ends, for the supervisor's tick.
pub fn until_next(rollouts: &BTreeMap<String, LocalRollout>, now: Instant) -> Option<Duration> {
    rollouts
        .values()
        .map(|r| r.next_at.saturating_duration_since(now))
        .min()
}
