//! The JSON line printed at the end of a run.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::closed_loop::{Outcome, Plan};

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
