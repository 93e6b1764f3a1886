//! Operator metrics, in the `serval_` schema shared with the router and sidecar.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of per-controller metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// `backend` or `endpoint`.
    pub controller: &'static str,
}

/// Labels of failure metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// `backend` or `endpoint`.
    pub controller: &'static str,
    /// From [`crate::Error::metric_label`].
    pub reason: &'static str,
}

/// Labels of per-Backend autoscaler metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// Namespace of the Backend (not `namespace`, which Prometheus sets to the operator pod's).
    pub backend_namespace: String,
    /// Backend name.
    pub backend: String,
}

/// Labels of autoscaler decisions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// Why (`serval_autoscale::Reason`).
    pub reason: &'static str,
}

/// Labels of scale changes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScaleLabels {
    /// `up` or `down`.
    pub direction: &'static str,
}

/// All operator metrics.
#[derive(Clone)]
pub struct Metrics {
    /// Reconciles started.
    pub reconciles: Family<ControllerLabels, Counter>,
    /// Reconciles that failed, by reason.
    pub failures: Family<FailureLabels, Counter>,
    /// Reconcile duration.
    pub duration: Family<ControllerLabels, Histogram>,
    /// 1 while this replica holds the leader Lease.
    pub leader: Gauge,
    /// Replicas the autoscaler set, per Backend.
    pub autoscaler_desired: Family<BackendLabels, Gauge>,
    /// Average in flight over the stable window at the last decision, per Backend.
    pub autoscaler_observed: Family<BackendLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Decisions taken (one per Backend per sample), by reason.
    pub autoscaler_decisions: Family<DecisionLabels, Counter>,
    /// Replica count changes, by direction.
    pub autoscaler_scales: Family<ScaleLabels, Counter>,
    /// Load snapshots that could not be read (a replica or router that did not answer).
    pub autoscaler_signal_failures: Counter,
    /// Time to read one round of load snapshots.
    pub autoscaler_sample_duration: Histogram,
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            reconciles: Family::default(),
            failures: Family::default(),
            // 1 ms .. ~16 s: an SSA round trip is milliseconds; a slow API server is seconds.
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 15))
            }),
            leader: Gauge::default(),
            autoscaler_desired: Family::default(),
            autoscaler_observed: Family::default(),
            autoscaler_decisions: Family::default(),
            autoscaler_scales: Family::default(),
            autoscaler_signal_failures: Counter::default(),
            // 1 ms .. ~1 s: reads are concurrent and bounded by a timeout.
            autoscaler_sample_duration: Histogram::new(exponential_buckets(0.001, 2.0, 11)),
        };
        let sub = registry.sub_registry_with_prefix("serval_operator");
        sub.register("reconciles", "Reconciles started", m.reconciles.clone());
        sub.register(
            "reconcile_failures",
            "Reconciles that failed, by reason",
            m.failures.clone(),
        );
        sub.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            m.duration.clone(),
        );
        sub.register(
            "leader",
            "1 while this replica holds the leader Lease",
            m.leader.clone(),
        );
        sub.register(
            "autoscaler_desired_replicas",
            "Replicas the autoscaler set, per Backend",
            m.autoscaler_desired.clone(),
        );
        sub.register(
            "autoscaler_observed_inflight",
            "Average requests in flight over the stable window at the last decision, per Backend",
            m.autoscaler_observed.clone(),
        );
        sub.register(
            "autoscaler_decisions",
            "Autoscaling decisions taken (one per Backend per sample), by reason",
            m.autoscaler_decisions.clone(),
        );
        sub.register(
            "autoscaler_scales",
            "Replica count changes made by the autoscaler, by direction",
            m.autoscaler_scales.clone(),
        );
        sub.register(
            "autoscaler_signal_failures",
            "Load snapshots of model servers or routers that could not be read",
            m.autoscaler_signal_failures.clone(),
        );
        sub.register(
            "autoscaler_sample_duration_seconds",
            "Time to read one round of load snapshots",
            m.autoscaler_sample_duration.clone(),
        );
        for reason in serval_autoscale::Reason::ALL {
            let _ = m.autoscaler_decisions.get_or_create(&DecisionLabels {
                reason: reason.as_str(),
            });
        }
        m
    }

    /// Records one finished reconcile.
    pub fn observe(&self, controller: &'static str, took: Duration, error: Option<&crate::Error>) {
        let labels = ControllerLabels { controller };
        self.reconciles.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if let Some(e) = error {
            self.failures
                .get_or_create(&FailureLabels {
                    controller,
                    reason: e.metric_label(),
                })
                .inc();
        }
    }
}
