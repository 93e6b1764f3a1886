//! The JSON line printed at the end of a run (closed loop, open loop).

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::closed_loop::{Outcome, Plan};
use crate::open_loop::{OpenOutcome, OpenPlan};

/// One run's results; latencies in microseconds.
#[derive(Serialize, Debug)]
pub struct Report {
    pub concurrency: usize,
    pub duration_s: f64,
    /// Successful (2xx) requests completed in the window.
    pub requests: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    pub error_count: u64,
    /// Non-2xx answers by status code, and `connect`, `io`, `timeout` failures.
    pub errors: BTreeMap<String, u64>,
}

impl Report {
    /// Summarises a run's histogram and error counts.
    pub fn new(plan: &Plan, outcome: &Outcome) -> Self {
        let h = &outcome.latency;
        let secs = plan.duration.as_secs_f64();
        let us = |nanos: u64| nanos as f64 / 1000.0;
        let empty = h.is_empty();
        let q = |quantile: f64| {
            if empty {
                0.0
            } else {
                us(h.value_at_quantile(quantile))
            }
        };
        Self {
            concurrency: plan.concurrency,
            duration_s: secs,
            requests: h.len(),
            rps: h.len() as f64 / secs,
            p50_us: q(0.50),
            p90_us: q(0.90),
            p99_us: q(0.99),
            max_us: if empty { 0.0 } else { us(h.max()) },
            mean_us: if empty { 0.0 } else { h.mean() / 1000.0 },
            error_count: outcome.errors.values().sum(),
            errors: outcome.errors.clone(),
        }
    }
}

/// A latency distribution in microseconds.
#[derive(Serialize, Debug)]
pub struct Latency {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self {
                count: 0,
                p50_us: 0.0,
                p90_us: 0.0,
                p99_us: 0.0,
                max_us: 0.0,
                mean_us: 0.0,
            };
        }
        let us = |nanos: u64| nanos as f64 / 1000.0;
        Self {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

/// One open-loop run's results; latencies from each request's scheduled time.
#[derive(Serialize, Debug)]
pub struct OpenReport {
    pub mode: &'static str,
    /// The schedule's rate, requests/second.
    pub rate: f64,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub max_connections: usize,
    /// Requests scheduled in the window, and per second.
    pub offered: u64,
    pub offered_rps: f64,
    /// 2xx answers to the window's requests.
    pub admitted: Latency,
    /// 429 answers to the window's requests.
    pub rejected: Latency,
    /// The same from each request's first write (the server's share, without the generator's
    /// or the connection bound's waits).
    pub admitted_from_send: Latency,
    pub rejected_from_send: Latency,
    pub rejected_with_retry_after: u64,
    /// 2xx answers that arrived inside the window, per second.
    pub goodput_rps: f64,
    pub error_count: u64,
    /// Other statuses by code, and `connect`, `io`, `timeout` failures.
    pub errors: BTreeMap<String, u64>,
    /// Scheduled time to first write: how far the generator ran behind its schedule.
    pub send_lag: Latency,
    pub waited_for_connection: u64,
    pub connections_opened: u64,
    pub peak_in_flight: usize,
}

impl OpenReport {
    /// Summarises an open-loop run.
    pub fn new(plan: &OpenPlan, o: &OpenOutcome) -> Self {
        let secs = plan.duration.as_secs_f64();
        Self {
            mode: "open",
            rate: plan.rate,
            warmup_s: plan.warmup.as_secs_f64(),
            duration_s: secs,
            max_connections: plan.max_connections,
            offered: o.offered,
            offered_rps: o.offered as f64 / secs,
            admitted: Latency::of(&o.admitted),
            rejected: Latency::of(&o.rejected),
            admitted_from_send: Latency::of(&o.admitted_from_send),
            rejected_from_send: Latency::of(&o.rejected_from_send),
            rejected_with_retry_after: o.rejected_with_retry_after,
            goodput_rps: o.goodput as f64 / secs,
            error_count: o.errors.values().sum(),
            errors: o.errors.clone(),
            send_lag: Latency::of(&o.send_lag),
            waited_for_connection: o.waited_for_connection,
            connections_opened: o.connections_opened,
            peak_in_flight: o.peak_in_flight,
        }
    }
}
