//! The closed loop: each connection sends its next request as soon as the last one answered.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{ClientError, Connection, Target};

/// Latencies are recorded in nanoseconds up to this bound (3 significant digits).
pub const MAX_RECORDED_NANOS: u64 = 120_000_000_000;
/// Pause before reconnecting after a failed connection, so a dead server is not spun on.
const RECONNECT_PAUSE: Duration = Duration::from_millis(20);

/// How much load, for how long.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub timeout: Duration,
}

/// What the measured window saw, merged over connections.
pub struct Outcome {
    /// Latency of every request that completed with a 2xx inside the window.
    pub latency: Histogram<u64>,
    /// Requests that completed inside the window without a 2xx, by status or failure kind.
    pub errors: BTreeMap<String, u64>,
}

/// Runs the warm-up and the measured window with `plan.concurrency` connections.
pub async fn run(target: Target, plan: Plan) -> anyhow::Result<Outcome> {
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let end = measure_from + plan.duration;
    let mut workers = JoinSet::new();
    for _ in 0..plan.concurrency {
        let target = target.clone();
        workers.spawn(worker(target, plan.timeout, measure_from, end));
    }
    let mut outcome = Outcome {
        latency: histogram()?,
        errors: BTreeMap::new(),
    };
    while let Some(done) = workers.join_next().await {
        let part = done??;
        outcome.latency.add(&part.latency)?;
        for (kind, n) in part.errors {
            *outcome.errors.entry(kind).or_default() += n;
        }
    }
    Ok(outcome)
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, MAX_RECORDED_NANOS, 3)?)
}

/// One connection's loop. A request counts if it completes inside `[measure_from, end]`;
/// one still in flight at `end` is abandoned uncounted.
async fn worker(
    target: Target,
    timeout: Duration,
    measure_from: Instant,
    end: Instant,
) -> anyhow::Result<Outcome> {
    let mut out = Outcome {
        latency: histogram()?,
        errors: BTreeMap::new(),
    };
    let mut conn: Option<Connection> = None;
    while Instant::now() < end {
        let sent = Instant::now();
        let deadline = (sent + timeout).min(end);
        let attempt = tokio::time::timeout_at(deadline, async {
            // A connection the server closed after its last answer is replaced, not an error.
            let mut c = match conn.take() {
                Some(c) if !c.is_closed() => c,
                _ => Connection::open(&target).await?,
            };
            let status = c.send(&target).await?;
            Ok::<_, ClientError>((c, status))
        })
        .await;
        let done = Instant::now();
        let counted = done >= measure_from && done <= end;
        match attempt {
            Ok(Ok((c, status))) => {
                conn = Some(c);
                if counted {
                    if status.is_success() {
                        let nanos = u64::try_from((done - sent).as_nanos()).unwrap_or(u64::MAX);
                        out.latency.saturating_record(nanos.max(1));
                    } else {
                        *out.errors.entry(status.as_u16().to_string()).or_default() += 1;
                    }
                }
            }
            Ok(Err(e)) => {
                if counted {
                    let kind = match e {
                        ClientError::Connect(_) => "connect",
                        _ => "io",
                    };
                    *out.errors.entry(kind.to_string()).or_default() += 1;
                }
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
            // Cut off by the end of the window: neither a success nor a failure.
            Err(_) if deadline == end => break,
            Err(_) => {
                if counted {
                    *out.errors.entry("timeout".to_string()).or_default() += 1;
                }
            }
        }
    }
    Ok(out)
}
