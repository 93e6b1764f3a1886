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
