//! Load signals: the cheap JSON snapshots the model server and the router serve at
//! [`SIGNALS_PATH`] on their admin ports, read about once a second by the autoscaler (the operator, or `serval local`)
//! without Prometheus. Counters only grow while the process lives (a decrease means it
//! restarted); gauges are values now.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Path of the snapshot on the admin port (on the traffic port when there is no admin port).
pub const SIGNALS_PATH: &str = "/-/signals";

/// A model server's load now.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSignals {
    /// The model served.
    pub model: String,
    /// Loaded, warmed up and not draining.
    pub ready: bool,
    /// Inference requests being handled now (gauge).
    pub inflight: u64,
    /// In-flight requests integrated over time, in request-seconds (counter). Its increase
    /// over an interval, divided by the interval, is the mean concurrency over it: unlike a
    /// point sample of `inflight`, it sees requests that came and went between two reads.
    pub inflight_seconds: f64,
    /// Rows waiting in the batch queue now (gauge).
    pub queued_rows: u64,
    /// Inference requests answered, whatever the status (counter).
    pub requests: u64,
    /// Rows the model has run (counter).
    pub rows: u64,
}

impl SidecarSignals {
    /// Mean concurrency between `earlier` and this snapshot, taken `elapsed` apart; `None` if
    /// the server restarted in between or no time passed.
    pub fn mean_inflight_since(&self, earlier: &Self, elapsed: Duration) -> Option<f64> {
        let grew = self.inflight_seconds - earlier.inflight_seconds;
        (grew >= 0.0 && !elapsed.is_zero() && self.requests >= earlier.requests)
            .then(|| grew / elapsed.as_secs_f64())
    }

    /// Requests answered between `earlier` and this snapshot; `None` after a restart.
    pub fn requests_since(&self, earlier: &Self) -> Option<u64> {
        self.requests.checked_sub(earlier.requests)
    }
}

/// The router's view now: per Endpoint × Backend, what it sent and how it went, and per
/// Backend, what is outstanding.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RouterSignals {
    /// The routing table's revision these describe.
    pub revision: String,
    /// One entry per Endpoint and Backend it can send to.
    pub routes: Vec<RouteSignals>,
    /// One entry per Backend of the table.
    pub backends: Vec<BackendSignals>,
    /// One entry per Endpoint with a mirror.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<MirrorSignals>,
}

/// Requests of one Endpoint answered from one Backend (counters, kept across table reloads).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RouteSignals {
    /// Endpoint name.
    pub endpoint: String,
    /// Backend name.
    pub backend: String,
    /// Requests answered, whatever the status (counter).
    pub requests: u64,
    /// Of those, answered with a 5xx: the Backend's or the router's failure (counter).
    pub errors: u64,
    /// Of those, refused for load with 429 (counter).
    pub overloaded: u64,
    /// Time to the response head summed over the requests, seconds (counter): with
    /// `requests`, the mean latency over any interval.
    pub latency_seconds: f64,
    /// Requests per latency bucket of [`latency_bucket_bounds`] (counters; one more than the
    /// bounds: the last counts the slower ones): quantiles over any interval from their
    /// increase.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency_buckets: Vec<u64>,
}

/// Mirrored requests of one Endpoint to its shadow Backend (counters, kept across reloads).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MirrorSignals {
    /// Endpoint name.
    pub endpoint: String,
    /// Shadow Backend name.
    pub backend: String,
    /// Rows on which the shadow agreed with the primary.
    pub agree: u64,
    /// Rows on which it disagreed.
    pub disagree: u64,
    /// Mirrored requests the shadow failed: an error status, no answer in time, unreachable,
    /// an answer that does not decode.
    pub shadow_errors: u64,
    /// Mirrored requests not compared for another reason (the primary failed, no capacity).
    pub other_errors: u64,
}

/// Upper bounds, in seconds, of the latency buckets routers count requests in: 25 % apart
/// from 0.5 ms to about 80 s, so a quantile read from them is within a few percent and a
/// latency ratio of 1.5 is told from 1.0.
pub fn latency_bucket_bounds() -> &'static [f64] {
    static BOUNDS: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    BOUNDS.get_or_init(|| (0..54).map(|i| 0.0005 * 1.25_f64.powi(i)).collect())
}

/// Index of the bucket of [`latency_bucket_bounds`] counting a request of `seconds`.
pub fn latency_bucket(seconds: f64) -> usize {
    let bounds = latency_bucket_bounds();
    bounds.partition_point(|b| *b < seconds)
}

/// One Backend as the router sees it now.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BackendSignals {
    /// Backend name.
    pub backend: String,
    /// Addresses (replicas) in the table.
    pub replicas: u64,
    /// Requests sent to its replicas and not yet answered (gauge).
    pub inflight: u64,
    /// Replicas ejected for failing now (gauge).
    pub ejected: u64,
    /// Requests held now while the Backend starts from zero (gauge): the cold-start signal.
    pub held: u64,
    /// The table marks it scaled to zero.
    pub scaled_to_zero: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mean_concurrency_is_the_integral_over_the_interval() {
        let a = SidecarSignals {
            inflight_seconds: 10.0,
            requests: 100,
            ..Default::default()
        };
        let b = SidecarSignals {
            inflight_seconds: 14.0,
            requests: 180,
            ..Default::default()
        };
        assert_eq!(b.mean_inflight_since(&a, Duration::from_secs(2)), Some(2.0));
        assert_eq!(b.requests_since(&a), Some(80));
        // A restart in between: no rate from the two.
        assert_eq!(a.mean_inflight_since(&b, Duration::from_secs(2)), None);
        assert_eq!(a.requests_since(&b), None);
        assert_eq!(b.mean_inflight_since(&a, Duration::ZERO), None);
    }

    #[test]
    fn the_snapshot_is_camel_case_json() {
        let s = SidecarSignals {
            model: "m".into(),
            ready: true,
            inflight: 3,
            inflight_seconds: 1.5,
            queued_rows: 2,
            requests: 7,
            rows: 9,
        };
        let v = serde_json::to_value(&s).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"model": "m", "ready": true, "inflight": 3, "inflightSeconds": 1.5,
                "queuedRows": 2, "requests": 7, "rows": 9})
        );
    }
}
