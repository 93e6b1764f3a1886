//! Prometheus metrics, names prefixed `serval_`, labelled by `model`. The router shares this
//! schema: `requests_total{code}`, `request_duration_seconds`, `queue_wait_seconds`,
//! `inference_seconds`, `batch_size`, `queue_depth`, `inflight`, `rejections_total{reason}`,
//! `model_load_seconds`, `connections`, plus the sidecar's calibration curve and idle-polling
//! time.

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serval_shards::OpenConnections;

use crate::idle_poll::SecondsCounter;

/// `{model}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// Served model name.
    pub model: String,
}

/// `{model, code}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    /// Served model name.
    pub model: String,
    /// HTTP status code.
    pub code: u16,
}

/// `{model, reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Served model name.
    pub model: String,
    /// Why the request was rejected.
    pub reason: &'static str,
}

/// `{model, batch_size, kept}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CurveLabels {
    /// Served model name.
    pub model: String,
    /// Calibrated batch size.
    pub batch_size: u32,
    /// Whether the size is used for dispatch.
    pub kept: bool,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn latency_histogram() -> Histogram {
    // 50 µs .. ~52 s: from a tiny MLP's run to a long-queued CNN request.
    Histogram::new(exponential_buckets(50e-6, 2.0, 21))
}

fn batch_histogram() -> Histogram {
    // 1, 2, 4, .. 1024 rows: the batch-size bound's range.
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

/// All sidecar metrics, for one model.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    model: ModelLabels,
    requests: Family<CodeLabels, Counter>,
    request_duration: Family<ModelLabels, Histogram, fn() -> Histogram>,
    queue_wait: Family<ModelLabels, Histogram, fn() -> Histogram>,
    inference: Family<ModelLabels, Histogram, fn() -> Histogram>,
    batch_size: Family<ModelLabels, Histogram, fn() -> Histogram>,
    queue_depth: Family<ModelLabels, Gauge>,
    inflight: Family<ModelLabels, Gauge>,
    rejections: Family<ReasonLabels, Counter>,
    model_load: Family<ModelLabels, FloatGauge>,
    calibration: Family<CurveLabels, FloatGauge>,
    ready: Family<ModelLabels, Gauge>,
    idle_poll: Family<ModelLabels, SecondsCounter>,
    connections: Family<ModelLabels, Gauge>,
    max_connections: Family<ModelLabels, Gauge>,
    /// Read into `connections` at each scrape, once the server is accepting.
    open: OnceLock<OpenConnections>,
    hot: Hot,
}

/// Handles to the series every request touches. The model label never changes, so they are
/// looked up once instead of hashing labels under the family's lock on every request.
#[derive(Debug)]
struct Hot {
    ok: Counter,
    request_duration: Histogram,
    queue_wait: Histogram,
    inference: Histogram,
    batch_size: Histogram,
    queue_depth: Gauge,
    inflight: Gauge,
}

impl Hot {
    /// Handles not attached to any family: placeholders until [`Metrics::new`] attaches them.
    fn detached() -> Self {
        Self {
            ok: Counter::default(),
            request_duration: latency_histogram(),
            queue_wait: latency_histogram(),
            inference: latency_histogram(),
            batch_size: batch_histogram(),
            queue_depth: Gauge::default(),
            inflight: Gauge::default(),
        }
    }
}

impl Metrics {
    /// Registers every metric for `model`.
    pub fn new(model: &str) -> Self {
        let mut registry = Registry::with_prefix("serval");
        let m = Self {
            registry: Registry::default(),
            model: ModelLabels {
                model: model.to_owned(),
            },
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            queue_wait: Family::new_with_constructor(latency_histogram),
            inference: Family::new_with_constructor(latency_histogram),
            batch_size: Family::new_with_constructor(batch_histogram),
            queue_depth: Family::default(),
            inflight: Family::default(),
            rejections: Family::default(),
            model_load: Family::default(),
            calibration: Family::default(),
            ready: Family::default(),
            idle_poll: Family::default(),
            connections: Family::default(),
            max_connections: Family::default(),
            open: OnceLock::new(),
            hot: Hot::detached(),
        };
        registry.register(
            "requests",
            "Requests answered, by HTTP status code",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request received to response ready",
            m.request_duration.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time a request's rows waited in the batch queue",
            m.queue_wait.clone(),
        );
        registry.register(
            "inference_seconds",
            "Time of one batch's model run",
            m.inference.clone(),
        );
        registry.register("batch_size", "Rows per model run", m.batch_size.clone());
        registry.register(
            "queue_depth",
            "Rows waiting in the batch queue",
            m.queue_depth.clone(),
        );
        registry.register(
            "inflight",
            "Inference requests being handled",
            m.inflight.clone(),
        );
        registry.register(
            "rejections",
            "Requests rejected, by reason",
            m.rejections.clone(),
        );
        registry.register(
            "model_load_seconds",
            "Time to fetch, compile, calibrate and warm up the model",
            m.model_load.clone(),
        );
        registry.register(
            "calibration_rows_per_second",
            "Measured throughput per batch size at start-up",
            m.calibration.clone(),
        );
        registry.register(
            "ready",
            "1 when the model serves, 0 otherwise",
            m.ready.clone(),
        );
        serval_idle_poll::register_metric(&mut registry, m.idle_poll.clone());
        serval_shards::register_metrics(
            &mut registry,
            m.connections.clone(),
            m.max_connections.clone(),
        );
        // Create the model's series up front so dashboards see zeros, not gaps; the handles
        // share their values with the families.
        let _ = m.ready.get_or_create(&m.model).get();
        let hot = Hot {
            ok: m
                .requests
                .get_or_create(&CodeLabels {
                    model: model.to_owned(),
                    code: 200,
                })
                .clone(),
            request_duration: m.request_duration.get_or_create(&m.model).clone(),
            queue_wait: m.queue_wait.get_or_create(&m.model).clone(),
            inference: m.inference.get_or_create(&m.model).clone(),
            batch_size: m.batch_size.get_or_create(&m.model).clone(),
            queue_depth: m.queue_depth.get_or_create(&m.model).clone(),
            inflight: m.inflight.get_or_create(&m.model).clone(),
        };
        Self { registry, hot, ..m }
    }

    /// Reports `open` as the connection count from now on.
    pub fn count_connections(&self, open: OpenConnections) {
        let max = i64::try_from(open.max()).unwrap_or(i64::MAX);
        self.max_connections.get_or_create(&self.model).set(max);
        let _ = self.open.set(open);
    }

    /// Text exposition format.
    pub fn encode(&self) -> String {
        if let Some(open) = self.open.get() {
            let n = i64::try_from(open.count()).unwrap_or(i64::MAX);
            self.connections.get_or_create(&self.model).set(n);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts one answered request.
    pub fn request(&self, code: u16, elapsed: Duration) {
        if code == 200 {
            self.hot.ok.inc();
        } else {
            self.requests
                .get_or_create(&CodeLabels {
                    model: self.model.model.clone(),
                    code,
                })
                .inc();
        }
        self.hot.request_duration.observe(elapsed.as_secs_f64());
    }

    /// Counts one rejection.
    pub fn reject(&self, reason: &'static str) {
        self.rejections
            .get_or_create(&ReasonLabels {
                model: self.model.model.clone(),
                reason,
            })
            .inc();
    }

    /// Records one model run.
    pub fn batch(&self, rows: usize, elapsed: Duration) {
        self.hot.batch_size.observe(rows as f64);
        self.hot.inference.observe(elapsed.as_secs_f64());
    }

    /// Records how long rows waited before their batch started.
    pub fn queue_wait(&self, waited: Duration) {
        self.hot.queue_wait.observe(waited.as_secs_f64());
    }

    /// Sets the queued row count.
    pub fn set_queue_depth(&self, rows: usize) {
        self.hot.queue_depth.set(rows as i64);
    }

    /// Changes the in-flight count by `delta`.
    pub fn add_inflight(&self, delta: i64) {
        self.hot.inflight.inc_by(delta);
    }

    /// Records the start-up time.
    pub fn set_model_load(&self, elapsed: Duration) {
        self.model_load
            .get_or_create(&self.model)
            .set(elapsed.as_secs_f64());
    }

    /// Records one point of the calibration curve.
    pub fn calibration_point(&self, batch_size: usize, rows_per_second: f64, kept: bool) {
        let labels = CurveLabels {
            model: self.model.model.clone(),
            batch_size: u32::try_from(batch_size).unwrap_or(u32::MAX),
            kept,
        };
        self.calibration.get_or_create(&labels).set(rows_per_second);
    }

    /// The counter the idle-polling thread adds its spin time to.
    pub fn idle_poll_counter(&self) -> SecondsCounter {
        self.idle_poll.get_or_create(&self.model).clone()
    }

    /// Sets the readiness gauge.
    pub fn set_ready(&self, ready: bool) {
        self.ready.get_or_create(&self.model).set(i64::from(ready));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_shared_schema() {
        let m = Metrics::new("digits");
        m.request(200, Duration::from_millis(1));
        m.reject("queue_full");
        m.batch(4, Duration::from_micros(30));
        m.calibration_point(4, 1e6, true);
        let _ = m.idle_poll_counter();
        let text = m.encode();
        for name in [
            "serval_requests_total{model=\"digits\",code=\"200\"} 1",
            "serval_rejections_total{model=\"digits\",reason=\"queue_full\"} 1",
            "serval_request_duration_seconds_bucket",
            "serval_batch_size_bucket",
            "serval_inference_seconds_bucket",
            "serval_queue_depth{model=\"digits\"} 0",
            "serval_inflight{model=\"digits\"} 0",
            "serval_idle_poll_seconds_total{model=\"digits\"} 0",
            "serval_calibration_rows_per_second{model=\"digits\",batch_size=\"4\",kept=\"true\"}",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
