//! The operator's autoscaler: once a second it reads the load of every Backend with
//! `spec.autoscaling` from a [`SignalSource`], decides with `serval-autoscale` (the same
//! decision `serval local` makes), and records a changed decision in the Backend's
//! `status.autoscaling`. The Backend controller sets the Deployment's replicas from there, so
//! one writer owns the Deployment, the decision survives an operator restart, and the user's
//! spec is never written.
//!
//! API writes follow decisions, not samples: a status write when the replica count changes
//! (then also an Event), when the reason changes (at most once per
//! [`DEFAULT_REASON_WRITE_INTERVAL`]), or to refresh the observed load (at most once per
//! [`DEFAULT_STATUS_REFRESH`]). Backends at zero have their held requests read every
//! [`DEFAULT_HELD_POLL`], so the first request reaches a decision well under a second.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::Api;
use serval_api::{AutoscalingStatus, Backend};
use serval_autoscale::{
    DEFAULT_SAMPLE_INTERVAL, DEFAULT_STABLE_WINDOW, Decision, Policy, Sample, Scaler,
};

use crate::context::{Context, apply_status_as, now};
use crate::desired::backend::{desired_replicas, initial_replicas};
use crate::events::{self, Occurrence};
use crate::metrics::{BackendLabels, DecisionLabels, ScaleLabels};
use crate::signals::{BackendKey, SignalSource};

/// Field manager of `status.autoscaling`, apart from the Backend controller's status fields.
pub const AUTOSCALER_FIELD_MANAGER: &str = "serval-operator-autoscaler";
/// How often the held requests of Backends at zero are read: a cold start waits at most this
/// long for its decision, for one small read per router pod.
pub const DEFAULT_HELD_POLL: Duration = Duration::from_millis(200);
/// Least time between two status writes for a Backend whose reason alone changed (a load
/// hovering at a boundary must not write every second).
pub const DEFAULT_REASON_WRITE_INTERVAL: Duration = Duration::from_secs(5);
/// Least time between two status writes that only refresh the observed load.
pub const DEFAULT_STATUS_REFRESH: Duration = Duration::from_secs(30);

/// How the autoscaler samples.
#[derive(Clone, Copy, Debug)]
pub struct AutoscalerSettings {
    /// Between two load samples.
    pub interval: Duration,
    /// Between two reads of held requests, for Backends at zero.
    pub held_poll: Duration,
    /// Stable window of every decision (the panic window is a tenth of the default).
    pub stable_window: Duration,
}

impl Default for AutoscalerSettings {
    fn default() -> Self {
        Self {
            interval: DEFAULT_SAMPLE_INTERVAL,
            held_poll: DEFAULT_HELD_POLL,
            stable_window: DEFAULT_STABLE_WINDOW,
        }
    }
}

/// One autoscaled Backend: its decision state and what its status last said.
struct Tracked {
    scaler: Scaler,
    /// `status.autoscaling` as last written (or found), and when this process wrote it.
    written: Option<(AutoscalingStatus, Option<Instant>)>,
}

/// The autoscaler of every Backend the operator watches.
pub struct Autoscaler {
    settings: AutoscalerSettings,
    source: Arc<dyn SignalSource>,
    /// `reportingInstance` of its Events.
    instance: String,
    tracked: BTreeMap<BackendKey, Tracked>,
    /// Backends whose `status.autoscaling` was cleared, by the resourceVersion then seen.
    cleared: HashMap<BackendKey, Option<String>>,
    origin: Instant,
    next_sample: Instant,
}

impl Autoscaler {
    /// An autoscaler reading `source`; `instance` names this operator replica in its Events.
    pub fn new(
        settings: AutoscalerSettings,
        source: Arc<dyn SignalSource>,
        instance: &str,
    ) -> Self {
        let origin = Instant::now();
        Self {
            settings,
            source,
            instance: instance.to_owned(),
            tracked: BTreeMap::new(),
            cleared: HashMap::new(),
            origin,
            next_sample: origin,
        }
    }

    /// Samples and decides until `shutdown` resolves.
    pub async fn run(mut self, ctx: Arc<Context>, shutdown: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(self.settings.held_poll.min(self.settings.interval));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                _ = tick.tick() => self.step(&ctx, Instant::now()).await,
                () = &mut shutdown => break,
            }
        }
    }

    /// One poll at `now`: a load sample of every autoscaled Backend when one is due, else the
    /// held requests of those at zero (a Backend with requests held is decided at once).
    pub async fn step(&mut self, ctx: &Context, now: Instant) {
        let backends = self.sync(ctx).await;
        if backends.is_empty() {
            return;
        }
        let at = now.saturating_duration_since(self.origin);
        if now >= self.next_sample {
            self.next_sample = now + self.settings.interval;
            let keys: Vec<BackendKey> = backends.keys().cloned().collect();
            let loads = self.source.load(&keys).await;
            for (key, backend) in &backends {
                let sample = loads.get(key).map(|l| Sample {
                    at,
                    inflight: l.inflight,
                    requests: l.requests,
                });
                self.decide(ctx, key, backend, sample, at).await;
            }
            return;
        }
        let cold: Vec<BackendKey> = self
            .tracked
            .iter()
            .filter(|(k, t)| t.scaler.replicas() == 0 && backends.contains_key(*k))
            .map(|(k, _)| k.clone())
            .collect();
        if cold.is_empty() {
            return;
        }
        let held = self.source.held(&cold).await;
        for (key, held) in held {
            if held == 0 {
                continue;
            }
            let Some(backend) = backends.get(&key) else {
                continue;
            };
            let sample = Sample {
                at,
                inflight: held as f64,
                requests: held,
            };
            self.decide(ctx, &key, backend, Some(sample), at).await;
        }
    }

    /// Tracks every Backend with `spec.autoscaling` (resuming at its status's decision, so a
    /// restart or a new leader wakes nothing up), forgets the others, and clears the
    /// `status.autoscaling` of Backends that no longer autoscale.
    async fn sync(&mut self, ctx: &Context) -> BTreeMap<BackendKey, Arc<Backend>> {
        let mut autoscaled = BTreeMap::new();
        for backend in ctx.backends.state() {
            let Some(namespace) = backend.namespace() else {
                continue;
            };
            let key = BackendKey {
                namespace,
                name: backend.name_any(),
            };
            let status = backend.status.as_ref().and_then(|s| s.autoscaling.as_ref());
            let Some(spec) = &backend.spec.autoscaling else {
                if status.is_some() {
                    self.clear(ctx, &key, &backend).await;
                }
                continue;
            };
            self.cleared.remove(&key);
            let policy = Policy::from(spec).with_stable_window(self.settings.stable_window);
            match self.tracked.get_mut(&key) {
                Some(t) => t.scaler.set_policy(policy),
                None => {
                    let start = status.map_or_else(
                        || initial_replicas(&backend),
                        |s| u32::try_from(s.desired_replicas).unwrap_or(0),
                    );
                    let tracked = Tracked {
                        scaler: Scaler::resume(policy, start),
                        written: status.map(|s| (s.clone(), None)),
                    };
                    self.tracked.insert(key.clone(), tracked);
                }
            }
            autoscaled.insert(key, backend);
        }
        // Metrics of Backends no longer autoscaled would otherwise report their last values.
        self.tracked.retain(|k, _| {
            let keep = autoscaled.contains_key(k);
            if !keep {
                ctx.metrics.autoscaler_desired.remove(&labels(k));
                ctx.metrics.autoscaler_observed.remove(&labels(k));
            }
            keep
        });
        autoscaled
    }

    /// Removes `status.autoscaling` (the fields this field manager owns) once per version of
    /// the Backend seen with it.
    async fn clear(&mut self, ctx: &Context, key: &BackendKey, backend: &Backend) {
        let version = backend.resource_version();
        if self.cleared.get(key) == Some(&version) {
            return;
        }
        let api = Api::<Backend>::namespaced(ctx.client.clone(), &key.namespace);
        let empty = serde_json::json!({});
        match apply_status_as(&api, &key.name, &empty, AUTOSCALER_FIELD_MANAGER).await {
            Ok(()) => {
                self.cleared.insert(key.clone(), version);
            }
            Err(error) => tracing::warn!(backend = %key, %error, "clearing status.autoscaling"),
        }
    }

    /// Decides for one Backend and acts on a changed decision.
    async fn decide(
        &mut self,
        ctx: &Context,
        key: &BackendKey,
        backend: &Backend,
        sample: Option<Sample>,
        at: Duration,
    ) {
        let Some(tracked) = self.tracked.get_mut(key) else {
            return;
        };
        let decision = match sample {
            Some(sample) => tracked.scaler.observe(sample),
            // No data this time: decide on the window as it is (with nothing left in it, the
            // reason says so and nothing moves).
            None => tracked.scaler.decide_at(at),
        };
        let metrics = &ctx.metrics;
        metrics
            .autoscaler_decisions
            .get_or_create(&DecisionLabels {
                reason: decision.reason.as_str(),
            })
            .inc();
        metrics
            .autoscaler_desired
            .get_or_create(&labels(key))
            .set(i64::from(decision.replicas));
        if let Some(observed) = decision.observed_inflight {
            metrics
                .autoscaler_observed
                .get_or_create(&labels(key))
                .set(observed);
        }

        let now_instant = Instant::now();
        let previous = tracked.written.as_ref();
        let before = previous.map(|(s, _)| s.desired_replicas);
        let Some(status) = status_to_write(backend, &decision, previous, now_instant) else {
            return;
        };
        let api = Api::<Backend>::namespaced(ctx.client.clone(), &key.namespace);
        let body = serde_json::json!({ "autoscaling": status });
        if let Err(error) = apply_status_as(&api, &key.name, &body, AUTOSCALER_FIELD_MANAGER).await
        {
            // Not recorded as written: the next sample tries again.
            tracing::warn!(backend = %key, %error, "writing the autoscaling decision");
            return;
        }
        tracked.written = Some((status.clone(), Some(now_instant)));
        // Before any decision: the count the Backend controller has been applying.
        let from = before.unwrap_or_else(|| desired_replicas(backend));
        if from != status.desired_replicas {
            self.scaled(ctx, key, backend, from, &decision).await;
        }
    }

    /// Reports a replica change: a log line, a metric and an Event on the Backend.
    async fn scaled(
        &self,
        ctx: &Context,
        key: &BackendKey,
        backend: &Backend,
        from: i32,
        decision: &Decision,
    ) {
        let to = i64::from(decision.replicas);
        let up = to > i64::from(from);
        ctx.metrics
            .autoscaler_scales
            .get_or_create(&ScaleLabels {
                direction: if up { "up" } else { "down" },
            })
            .inc();
        let note = event_note(backend, from, decision);
        tracing::info!(backend = %key, from, to, reason = %decision.reason, "{note}");
        let occurrence = Occurrence {
            reason: if up { "ScaledUp" } else { "ScaledDown" },
            action: "Scale",
            note,
            warning: false,
        };
        events::publish(&ctx.client, backend, &self.instance, occurrence).await;
    }
}

fn labels(key: &BackendKey) -> BackendLabels {
    BackendLabels {
        backend_namespace: key.namespace.clone(),
        backend: key.name.clone(),
    }
}

/// The `status.autoscaling` to write after `decision`, or `None` when the status already says
/// enough: written on a replica change; on a reason change at most once per
/// [`DEFAULT_REASON_WRITE_INTERVAL`]; to refresh the observed load at most once per
/// [`DEFAULT_STATUS_REFRESH`]. `previous` is what was last written, and when (`None` if this
/// process did not write it).
pub fn status_to_write(
    backend: &Backend,
    decision: &Decision,
    previous: Option<&(AutoscalingStatus, Option<Instant>)>,
    at: Instant,
) -> Option<AutoscalingStatus> {
    let desired = i32::try_from(decision.replicas).unwrap_or(i32::MAX);
    // Two decimals: what `kubectl get -o yaml` readers need, and no churn from float noise.
    let observed = decision
        .observed_inflight
        .filter(|v| v.is_finite())
        .map(|v| (v * 100.0).round() / 100.0);
    let mut status = AutoscalingStatus {
        desired_replicas: desired,
        observed_inflight: observed,
        last_decision: decision.reason.as_str().to_owned(),
        message: format!(
            "{}; spec.replicas ({}) is ignored while spec.autoscaling is set",
            decision.reason.message(),
            backend.spec.replicas
        ),
        last_scale_time: None,
    };
    let Some((old, written_at)) = previous else {
        status.last_scale_time = Some(Time(now()));
        return Some(status);
    };
    let since = written_at.map_or(Duration::MAX, |w| at.saturating_duration_since(w));
    if old.desired_replicas != desired {
        status.last_scale_time = Some(Time(now()));
        return Some(status);
    }
    status.last_scale_time = old.last_scale_time.clone();
    let reason_changed = old.last_decision != status.last_decision;
    let refresh =
        old.observed_inflight != status.observed_inflight || old.message != status.message;
    let due = (reason_changed && since >= DEFAULT_REASON_WRITE_INTERVAL)
        || (refresh && since >= DEFAULT_STATUS_REFRESH);
    due.then_some(status)
}

/// An Event's note: the change, why, and on what load.
fn event_note(backend: &Backend, from: i32, decision: &Decision) -> String {
    let target = backend
        .spec
        .autoscaling
        .as_ref()
        .map_or(0, |a| a.target_inflight);
    let load = decision.observed_inflight.map_or_else(
        || "no load data".to_owned(),
        |v| format!("{v:.1} in flight on average, target {target} per replica"),
    );
    format!(
        "{from} -> {} replicas: {} ({load})",
        decision.replicas,
        decision.reason.message()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serval_api::BackendSpec;
    use serval_autoscale::Reason;

    fn backend() -> Backend {
        let spec: BackendSpec = serde_json::from_value(serde_json::json!({
            "model": {"uri": "https://models.example/m.onnx"},
            "replicas": 1,
            "autoscaling": {"targetInflight": 4},
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        Backend::new("b", spec)
    }

    fn decision(replicas: u32, reason: Reason, observed: f64) -> Decision {
        Decision {
            replicas,
            reason,
            observed_inflight: Some(observed),
        }
    }

    #[test]
    fn status_writes_follow_decisions_not_samples() {
        let b = backend();
        let t0 = Instant::now();
        let first = status_to_write(&b, &decision(2, Reason::StableAverage, 7.0), None, t0)
            .unwrap_or_else(|| panic!("the first decision is written"));
        assert_eq!(first.desired_replicas, 2);
        assert!(first.last_scale_time.is_some());
        let written = (first.clone(), Some(t0));
        let at = |ms| t0 + Duration::from_millis(ms);

        // Same decision, slightly different load: nothing until the refresh period.
        let wobble = decision(2, Reason::StableAverage, 7.2);
        assert_eq!(
            status_to_write(&b, &wobble, Some(&written), at(1_000)),
            None
        );
        let refreshed = status_to_write(&b, &wobble, Some(&written), at(30_000));
        assert_eq!(refreshed.map(|s| s.observed_inflight), Some(Some(7.2)));
        // Float noise below a hundredth is no change.
        let noise = decision(2, Reason::StableAverage, 7.000_4);
        assert_eq!(
            status_to_write(&b, &noise, Some(&written), at(60_000)),
            None
        );

        // A reason alone: at most once per interval.
        let delayed = decision(2, Reason::ScaleDownDelayed, 7.0);
        assert_eq!(
            status_to_write(&b, &delayed, Some(&written), at(1_000)),
            None
        );
        let later = status_to_write(&b, &delayed, Some(&written), at(5_000));
        assert_eq!(
            later.as_ref().map(|s| s.last_decision.as_str()),
            Some("ScaleDownDelayed")
        );
        assert_eq!(
            later.and_then(|s| s.last_scale_time),
            first.last_scale_time,
            "no scale happened"
        );

        // A replica change: at once.
        let up = status_to_write(
            &b,
            &decision(3, Reason::PanicSurge, 13.0),
            Some(&written),
            at(1),
        );
        assert_eq!(up.map(|s| s.desired_replicas), Some(3));

        // Found in the status at start (not written by this process): a change of reason is
        // written at once.
        let found = (first, None);
        assert!(status_to_write(&b, &delayed, Some(&found), at(1)).is_some());
    }
}
