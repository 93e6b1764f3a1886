//! The operator's rollouts: for every Endpoint with `spec.rollout`, each `intervalSeconds` the
//! namespace's routers' counters are judged (`desired::rollout`, the code `serval local` runs)
//! and the next `status.rollout` is written under its own field manager; the Endpoint
//! controller takes the canary's traffic from there into the routing table. The spec is never
//! written, so GitOps tools see no drift; an Event marks every transition.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::Api;
use serval_api::{Endpoint, RolloutStatus};

use crate::context::{Context, apply_status_as, now};
use crate::desired::rollout::{Counts, initial_status, policy, started_for, state_of, step};
use crate::events::{self, Occurrence};
use crate::signals::SignalSource;

/// Field manager of `status.rollout`.
pub const ROLLOUT_FIELD_MANAGER: &str = "serval-operator-rollout";
/// How often due intervals are looked for.
pub const DEFAULT_ROLLOUT_POLL: Duration = Duration::from_millis(250);

/// One Endpoint's rollout as the operator tracks it between intervals.
struct Tracked {
    status: RolloutStatus,
    /// Each router's counters at the start of the interval, by router name.
    counts: Option<BTreeMap<String, Counts>>,
    next_at: Instant,
    /// Whether `status` still has to be written.
    unwritten: bool,
}

/// The rollouts of every Endpoint the operator watches.
pub struct Rollouts {
    source: Arc<dyn SignalSource>,
    instance: String,
    tracked: HashMap<(String, String), Tracked>,
}

impl Rollouts {
    /// Rollouts judged on `source`'s router snapshots; `instance` names this replica in Events.
    pub fn new(source: Arc<dyn SignalSource>, instance: &str) -> Self {
        Self {
            source,
            instance: instance.to_owned(),
            tracked: HashMap::new(),
        }
    }

    /// Judges due intervals until `shutdown` resolves.
    pub async fn run(mut self, ctx: Arc<Context>, shutdown: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(DEFAULT_ROLLOUT_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                _ = tick.tick() => self.step(&ctx, Instant::now()).await,
                () = &mut shutdown => break,
            }
        }
    }

    /// Starts, restarts and forgets rollouts as the Endpoints say, and judges those due.
    pub async fn step(&mut self, ctx: &Context, now_at: Instant) {
        let backends = ctx.backends.state();
        let mut live = Vec::new();
        for ep in ctx.endpoints.state() {
            let Some(spec) = &ep.spec.rollout else {
                continue;
            };
            let Some(ns) = ep.namespace() else { continue };
            let key = (ns.clone(), ep.name_any());
            live.push(key.clone());
            let canary = backends
                .iter()
                .find(|b| b.namespace().as_deref() == Some(&ns) && b.name_any() == spec.canary)
                .map(|b| &b.spec);
            let runs_for = started_for(spec, canary);
            let stored = ep.status.as_ref().and_then(|s| s.rollout.as_ref());
            let current = self
                .tracked
                .get(&key)
                .is_some_and(|t| t.status.started_for == runs_for);
            if !current {
                // Resumed from status after a restart or a new leader; else (re)started.
                let (status, unwritten, started) = match stored {
                    Some(s) if s.started_for == runs_for => (s.clone(), false, false),
                    _ => {
                        let mut s = initial_status(&policy(spec), runs_for);
                        s.last_transition_time = Some(Time(now()));
                        (s, true, true)
                    }
                };
                if started {
                    let note = format!("canary {}: {}", spec.canary, status.message);
                    self.event(ctx, &ep, "RolloutStarted", note).await;
                }
                self.tracked.insert(
                    key.clone(),
                    Tracked {
                        status,
                        counts: None,
                        next_at: now_at,
                        unwritten,
                    },
                );
            }
            let Some(t) = self.tracked.get_mut(&key) else {
                continue;
            };
            if !state_of(&t.status).phase.is_final() && now_at >= t.next_at {
                let routers = self.source.routers(&ns).await;
                let readings: BTreeMap<String, Counts> = routers
                    .iter()
                    .map(|(pod, s)| (pod.clone(), Counts::of(s, &key.1, &spec.canary)))
                    .collect();
                let p = policy(spec);
                t.next_at = now_at + p.interval;
                match t.counts.replace(readings.clone()) {
                    // The first reading starts the first interval.
                    None => {}
                    Some(earlier) => {
                        let mut increase = Counts::default();
                        for (pod, now_counts) in &readings {
                            // A router new since the last reading counts from zero.
                            let before = earlier.get(pod).cloned().unwrap_or_default();
                            increase.add(&now_counts.since(&before));
                        }
                        let (mut next, changed) = step(&p, &t.status, &increase);
                        if changed {
                            next.last_transition_time = Some(Time(now()));
                        }
                        t.status = next;
                        t.unwritten = true;
                        if changed {
                            let reason = format!("Rollout{}", t.status.phase);
                            let note = t.status.message.clone();
                            let ep = ep.clone();
                            self.event(ctx, &ep, &reason, note).await;
                        }
                    }
                }
            }
            let Some(t) = self.tracked.get_mut(&key) else {
                continue;
            };
            if t.unwritten {
                let api = Api::<Endpoint>::namespaced(ctx.client.clone(), &key.0);
                let body = serde_json::json!({ "rollout": t.status });
                match apply_status_as(&api, &key.1, &body, ROLLOUT_FIELD_MANAGER).await {
                    Ok(()) => t.unwritten = false,
                    Err(error) => {
                        tracing::warn!(endpoint = %key.1, namespace = %key.0, %error, "writing status.rollout");
                    }
                }
            }
        }
        self.tracked.retain(|k, _| live.contains(k));
    }

    /// Publishes an Event on the Endpoint (one per transition).
    async fn event(&self, ctx: &Context, ep: &Endpoint, reason: &str, note: String) {
        let ns = ep.namespace().unwrap_or_default();
        tracing::info!(endpoint = %ep.name_any(), namespace = %ns, reason, "{note}");
        let occurrence = Occurrence {
            reason,
            action: "Rollout",
            note,
            warning: reason == "RolloutRolledBack",
        };
        events::publish(&ctx.client, ep, &self.instance, occurrence).await;
    }
}
