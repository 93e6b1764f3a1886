//! Prometheus metrics, names prefixed `serval_router_`, labelled by `endpoint` and `backend`,
//! sharing the sidecar's schema (`requests_total{code}`, `request_duration_seconds` with the
//! same buckets).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serval_shards::OpenConnections;

/// Counters of one (endpoint, backend) pair for the load signals; clones share them.
#[derive(Clone, Debug)]
pub struct RouteCounters {
    requests: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    overloaded: Arc<AtomicU64>,
    latency_micros: Arc<AtomicU64>,
    /// Per bucket of `serval_api::signals::latency_bucket_bounds`, plus the overflow.
    latency_buckets: Arc<[AtomicU64]>,
}

impl Default for RouteCounters {
    fn default() -> Self {
        let buckets = serval_api::signals::latency_bucket_bounds().len() + 1;
        Self {
            requests: Arc::default(),
            errors: Arc::default(),
            overloaded: Arc::default(),
            latency_micros: Arc::default(),
            latency_buckets: (0..buckets).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl RouteCounters {
    /// Counts one answer with `code`, `elapsed` after the request arrived.
    pub fn record(&self, code: u16, elapsed: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if code >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        } else if code == 429 {
            self.overloaded.fetch_add(1, Ordering::Relaxed);
        }
        self.latency_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        let bucket = serval_api::signals::latency_bucket(elapsed.as_secs_f64());
        if let Some(b) = self.latency_buckets.get(bucket) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counters as the signals format has them.
    pub fn snapshot(&self, endpoint: &str, backend: &str) -> serval_api::signals::RouteSignals {
        serval_api::signals::RouteSignals {
            endpoint: endpoint.to_owned(),
            backend: backend.to_owned(),
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            overloaded: self.overloaded.load(Ordering::Relaxed),
            latency_seconds: self.latency_micros.load(Ordering::Relaxed) as f64 / 1e6,
            latency_buckets: self
                .latency_buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// `{endpoint, backend, code}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    /// Endpoint name (empty when no route matched).
    pub endpoint: String,
    /// Backend that answered (empty when none was chosen).
    pub backend: String,
    /// HTTP status code.
    pub code: u16,
}

/// `{endpoint, backend}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Endpoint name.
    pub endpoint: String,
    /// Backend name.
    pub backend: String,
}

/// `{endpoint, backend, kind}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Endpoint name.
    pub endpoint: String,
    /// Backend name.
    pub backend: String,
    /// `connect`, `protocol`, `status_503`, `status_5xx` or `timeout`.
    pub kind: &'static str,
}

/// `{backend, address}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AddressLabels {
    /// Backend name.
    pub backend: String,
    /// Upstream `host:port`.
    pub address: String,
}

/// `{endpoint, backend, result}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    /// Endpoint name.
    pub endpoint: String,
    /// Shadow backend name.
    pub backend: String,
    /// `agree` or `disagree` (rows).
    pub result: &'static str,
}

/// `{endpoint, backend, outcome}` of a cascade stage's rows.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CascadeLabels {
    /// Endpoint name.
    pub endpoint: String,
    /// The stage's backend.
    pub backend: String,
    /// `answered` (confident enough, or the last stage) or `escalated` (sent on).
    pub outcome: &'static str,
}

/// `{endpoint, stage}` of a composition's call: the Backend or Endpoint called.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    /// Endpoint name (the composition's).
    pub endpoint: String,
    /// The Backend or Endpoint called.
    pub stage: String,
}

/// `{endpoint, backend, reason}` of a mirrored request that could not be compared.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorErrorLabels {
    /// Endpoint name.
    pub endpoint: String,
    /// Shadow backend name.
    pub backend: String,
    /// `shadow_status`, `shadow_unreachable`, `shadow_timeout`, `shadow_too_large`,
    /// `primary_status`, `primary_failed`, `primary_timeout`, `primary_too_large`,
    /// `primary_unreadable`, `shadow_unreadable`, `mismatch`, `dropped` (no capacity) or
    /// `streamed` (a body too large to copy).
    pub reason: &'static str,
}

/// `{revision}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevisionLabels {
    /// Routing-table revision.
    pub revision: String,
}

/// `{backend}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// Backend name.
    pub backend: String,
}

/// `{endpoint}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// Endpoint name.
    pub endpoint: String,
}

fn latency_histogram() -> Histogram {
    // Same buckets as the sidecar (50 µs .. ~52 s) so the two can be subtracted.
    Histogram::new(exponential_buckets(50e-6, 2.0, 21))
}

/// All router metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Proxied requests by endpoint, backend and status.
    pub requests: Family<CodeLabels, Counter>,
    /// Time to the upstream's response head (or to the error).
    pub request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Upstream failures by kind.
    pub upstream_errors: Family<ErrorLabels, Counter>,
    /// Retries sent.
    pub retries: Family<RouteLabels, Counter>,
    /// Retries refused because the budget was spent.
    pub retry_budget_exhausted: Family<EndpointLabels, Counter>,
    /// Address ejections.
    pub ejections: Family<AddressLabels, Counter>,
    /// Mirror outcomes.
    pub mirror: Family<MirrorLabels, Counter>,
    /// Mirrored requests that could not be compared, by reason.
    pub mirror_errors: Family<MirrorErrorLabels, Counter>,
    /// Rows each cascade stage answered or escalated.
    pub cascade_rows: Family<CascadeLabels, Counter>,
    /// Calls a composition (cascade, ensemble, sequence) made to each stage, and their latency.
    pub stage_duration: Family<StageLabels, Histogram, fn() -> Histogram>,
    /// Calls of a composition that failed: an error, no answer in time, an unreadable answer.
    pub stage_failures: Family<StageLabels, Counter>,
    /// Requests no route claimed.
    pub unmatched: Counter,
    /// Requests refused before routing for breaking an HTTP rule (e.g. no Host).
    pub refused: Counter,
    /// 1 for the revision being served.
    pub table_info: Family<RevisionLabels, Gauge>,
    /// Tables applied.
    pub table_reloads: Counter,
    /// Tables refused.
    pub table_rejections: Counter,
    /// Time the idle-polling thread spun.
    pub idle_poll: serval_idle_poll::SecondsCounter,
    /// Requests held now for a Backend scaled to zero.
    pub held: Family<BackendLabels, Gauge>,
    /// The autoscaler's counters per endpoint and backend (served as JSON at
    /// [`serval_api::signals::SIGNALS_PATH`], not as metrics), kept across table reloads.
    pub signals: Family<RouteLabels, RouteCounters>,
    /// Client connections open, read from `open` at each scrape.
    connections: Gauge,
    max_connections: Gauge,
    open: OnceLock<OpenConnections>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("serval_router");
        let m = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            upstream_errors: Family::default(),
            retries: Family::default(),
            retry_budget_exhausted: Family::default(),
            ejections: Family::default(),
            mirror: Family::default(),
            mirror_errors: Family::default(),
            cascade_rows: Family::default(),
            stage_duration: Family::new_with_constructor(latency_histogram),
            stage_failures: Family::default(),
            unmatched: Counter::default(),
            refused: Counter::default(),
            table_info: Family::default(),
            table_reloads: Counter::default(),
            table_rejections: Counter::default(),
            idle_poll: serval_idle_poll::SecondsCounter::default(),
            signals: Family::default(),
            held: Family::default(),
            connections: Gauge::default(),
            max_connections: Gauge::default(),
            open: OnceLock::new(),
            registry: Registry::default(),
        };
        registry.register("requests", "Proxied requests", m.requests.clone());
        registry.register(
            "request_duration_seconds",
            "Time to the upstream's response head",
            m.request_duration.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures",
            m.upstream_errors.clone(),
        );
        registry.register("retries", "Retries sent", m.retries.clone());
        registry.register(
            "held_requests",
            "Requests held for a Backend scaled to zero until its first replica is ready",
            m.held.clone(),
        );
        registry.register(
            "retry_budget_exhausted",
            "Retries refused by the retry budget",
            m.retry_budget_exhausted.clone(),
        );
        registry.register(
            "ejections",
            "Upstream address ejections",
            m.ejections.clone(),
        );
        registry.register(
            "mirror_agreement",
            "Rows of mirrored requests whose shadow answer agreed or disagreed with the primary's",
            m.mirror.clone(),
        );
        registry.register(
            "mirror_errors",
            "Mirrored requests that could not be compared, by reason",
            m.mirror_errors.clone(),
        );
        registry.register(
            "cascade_rows",
            "Rows each cascade stage answered or escalated to the next",
            m.cascade_rows.clone(),
        );
        registry.register(
            "composition_stage_duration_seconds",
            "Calls a cascade, ensemble or sequence made to each stage, and their latency",
            m.stage_duration.clone(),
        );
        registry.register(
            "composition_stage_failures",
            "Calls of a cascade, ensemble or sequence that failed (error, deadline, unreadable answer)",
            m.stage_failures.clone(),
        );
        registry.register(
            "unmatched_requests",
            "Requests no route claimed",
            m.unmatched.clone(),
        );
        registry.register(
            "refused_requests",
            "Requests refused with 400 before routing for breaking an HTTP rule",
            m.refused.clone(),
        );
        registry.register(
            "table_info",
            "Routing table being served",
            m.table_info.clone(),
        );
        registry.register(
            "table_reloads",
            "Routing tables applied",
            m.table_reloads.clone(),
        );
        registry.register(
            "table_rejections",
            "Routing tables refused",
            m.table_rejections.clone(),
        );
        serval_idle_poll::register_metric(&mut registry, m.idle_poll.clone());
        serval_shards::register_metrics(
            &mut registry,
            m.connections.clone(),
            m.max_connections.clone(),
        );
        Self { registry, ..m }
    }

    /// Reports `open` as the connection count from now on.
    pub fn count_connections(&self, open: OpenConnections) {
        self.max_connections
            .set(i64::try_from(open.max()).unwrap_or(i64::MAX));
        let _ = self.open.set(open);
    }

    /// Text exposition format.
    pub fn encode(&self) -> String {
        if let Some(open) = self.open.get() {
            self.connections
                .set(i64::try_from(open.count()).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Marks `revision` as the one served, dropping the previous one's series.
    pub fn set_revision(&self, previous: Option<&str>, revision: &str) {
        if let Some(p) = previous {
            self.table_info.remove(&RevisionLabels {
                revision: p.to_owned(),
            });
        }
        self.table_info
            .get_or_create(&RevisionLabels {
                revision: revision.to_owned(),
            })
            .set(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&CodeLabels {
                endpoint: "e".into(),
                backend: "b".into(),
                code: 200,
            })
            .inc();
        m.set_revision(None, "r1");
        m.set_revision(Some("r1"), "r2");
        m.table_rejections.inc();
        let text = m.encode();
        assert!(
            text.contains(
                "serval_router_requests_total{endpoint=\"e\",backend=\"b\",code=\"200\"} 1"
            )
        );
        assert!(text.contains("serval_router_table_info{revision=\"r2\"} 1"));
        assert!(!text.contains("revision=\"r1\""));
        assert!(text.contains("serval_router_table_rejections_total 1"));
    }
}
