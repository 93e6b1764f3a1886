//! The open loop: requests leave on a fixed schedule, `1 / rate` apart, whatever the server
//! answers, as users arriving independently would. Each request's latency runs from the time it
//! was scheduled, not from when it was written, so a server (or a generator) that falls behind
//! shows as latency instead of as fewer requests (coordinated omission).
//!
//! Every request in flight holds one keep-alive connection; idle ones are reused and new ones
//! opened up to `max_connections`. Past that bound a request waits for a connection, and the
//! wait counts in its latency.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use http::StatusCode;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use crate::client::{Answer, ClientError, Connection, Target};
use crate::closed_loop::MAX_RECORDED_NANOS;

/// How much load, for how long.
#[derive(Clone, Copy, Debug)]
pub struct OpenPlan {
    /// Requests per second, evenly spaced.
    pub rate: f64,
    /// Unrecorded lead-in at the same rate, so queues reach their steady state first.
    pub warmup: Duration,
    /// Requests scheduled in this window are recorded.
    pub duration: Duration,
    /// A request gives up this long after its scheduled time (`timeout`).
    pub timeout: Duration,
    pub max_connections: usize,
}

/// What the measured window saw.
pub struct OpenOutcome {
    /// Requests scheduled inside the window.
    pub offered: u64,
    /// Latency of those answered 2xx (admitted), from their scheduled time.
    pub admitted: Histogram<u64>,
    /// Latency of those answered 429 (rejected by admission), from their scheduled time.
    pub rejected: Histogram<u64>,
    /// The same two from the request's first write instead: the server's (and the network's)
    /// share alone, without any wait for the generator or for a connection.
    pub admitted_from_send: Histogram<u64>,
    pub rejected_from_send: Histogram<u64>,
    /// How many of the 429s carried `Retry-After`.
    pub rejected_with_retry_after: u64,
    /// The others: non-2xx, non-429 statuses by code, and `connect`, `io`, `timeout`.
    pub errors: BTreeMap<String, u64>,
    /// 2xx answers that arrived inside the window, whenever they were scheduled: the useful
    /// work the server delivered per window.
    pub goodput: u64,
    /// From scheduled time to the request's first write (waiting for the generator's thread,
    /// for a free connection, and for connecting): how far behind its schedule the generator
    /// ran. Small next to the latencies, or the generator was the bottleneck.
    pub send_lag: Histogram<u64>,
    /// Requests of the window that found every connection busy at the bound and waited.
    pub waited_for_connection: u64,
    pub connections_opened: u64,
    /// Most requests in flight at once (each holds a connection).
    pub peak_in_flight: usize,
}

/// Where one request's time went and how it ended.
struct Done {
    scheduled: Instant,
    started: Option<Instant>,
    completed: Instant,
    waited: bool,
    result: Result<Answer, &'static str>,
}

struct Shared {
    target: Target,
    permits: Semaphore,
    idle: Mutex<Vec<Connection>>,
    max_connections: usize,
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, MAX_RECORDED_NANOS, 3)?)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

/// Runs the warm-up and the measured window, then waits for the window's requests to end
/// (each within its timeout).
pub async fn run(target: Target, plan: OpenPlan) -> anyhow::Result<OpenOutcome> {
    anyhow::ensure!(
        plan.rate.is_finite() && plan.rate > 0.0,
        "rate must be positive"
    );
    let max_connections = plan.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let shared = Arc::new(Shared {
        target,
        permits: Semaphore::new(max_connections),
        idle: Mutex::new(Vec::new()),
        max_connections,
    });
    let start = Instant::now();
    let from = start + plan.warmup;
    let end = from + plan.duration;
    let mut out = OpenOutcome {
        offered: 0,
        admitted: histogram()?,
        rejected: histogram()?,
        admitted_from_send: histogram()?,
        rejected_from_send: histogram()?,
        rejected_with_retry_after: 0,
        errors: BTreeMap::new(),
        goodput: 0,
        send_lag: histogram()?,
        waited_for_connection: 0,
        connections_opened: 0,
        peak_in_flight: 0,
    };
    let record = |done: Done, out: &mut OpenOutcome| {
        let answered_2xx = matches!(&done.result, Ok(a) if a.status.is_success());
        if answered_2xx && done.completed >= from && done.completed < end {
            out.goodput += 1;
        }
        if done.scheduled < from {
            return;
        }
        out.offered += 1;
        out.waited_for_connection += u64::from(done.waited);
        let from_send = done.started.map(|started| {
            out.send_lag
                .saturating_record(nanos(started.saturating_duration_since(done.scheduled)));
            nanos(done.completed.saturating_duration_since(started))
        });
        let latency = nanos(done.completed - done.scheduled);
        match done.result {
            Ok(a) if a.status.is_success() => {
                out.admitted.saturating_record(latency);
                if let Some(n) = from_send {
                    out.admitted_from_send.saturating_record(n);
                }
            }
            Ok(a) if a.status == StatusCode::TOO_MANY_REQUESTS => {
                out.rejected.saturating_record(latency);
                if let Some(n) = from_send {
                    out.rejected_from_send.saturating_record(n);
                }
                out.rejected_with_retry_after += u64::from(a.retry_after);
            }
            Ok(a) => *out.errors.entry(a.status.as_u16().to_string()).or_default() += 1,
            Err(kind) => *out.errors.entry(kind.to_string()).or_default() += 1,
        }
    };
    // The schedule runs on its own thread with the OS's sleep (tens of µs late at most), since
    // tokio's timer wheel ticks in whole milliseconds and would add up to 2 ms of send lag to
    // every request; that matters next to a 5 ms rejection goal. Tasks report over a channel
    // that closes when the schedule and every request are done.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let runtime = tokio::runtime::Handle::current();
    let (rate, timeout) = (plan.rate, plan.timeout);
    let scheduler_shared = Arc::clone(&shared);
    let schedule = tokio::task::spawn_blocking(move || {
        let mut peak_in_flight = 0;
        for i in 0u64.. {
            // From the start each time, so rounding never accumulates into drift.
            let at = start + Duration::from_secs_f64(i as f64 / rate);
            if at >= end {
                break;
            }
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            let (shared, tx) = (Arc::clone(&scheduler_shared), tx.clone());
            runtime.spawn(async move {
                // The receiver outlives every sender; a failed send has nobody to tell.
                let _ = tx.send(request(shared, at, timeout).await);
            });
            let in_flight = max_connections - scheduler_shared.permits.available_permits();
            peak_in_flight = peak_in_flight.max(in_flight);
        }
        peak_in_flight
    });
    while let Some((done, opened)) = rx.recv().await {
        out.connections_opened += opened;
        record(done, &mut out);
    }
    out.peak_in_flight = schedule.await?;
    Ok(out)
}

/// One request: a connection (idle, new, or waited for), one exchange, the connection back.
/// Returns how it went and whether it opened a connection.
async fn request(shared: Arc<Shared>, scheduled: Instant, timeout: Duration) -> (Done, u64) {
    let mut started = None;
    let mut waited = false;
    let mut opened = 0;
    let attempt = tokio::time::timeout_at(scheduled + timeout, async {
        let permit = match shared.permits.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                waited = true;
                // The semaphore is never closed.
                shared.permits.acquire().await.map_err(|_| "io")?
            }
        };
        let idle = shared
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        // A connection the server closed after its last answer is replaced, not an error
        // (`ready` also catches a close the connection's driver has not yet reported).
        let reusable = match idle {
            Some(mut c) if !c.is_closed() => c.ready().await.ok().map(|()| c),
            _ => None,
        };
        let mut conn = match reusable {
            Some(c) => c,
            None => {
                opened = 1;
                Connection::open(&shared.target)
                    .await
                    .map_err(|e| match e {
                        ClientError::Connect(_) => "connect",
                        _ => "io",
                    })?
            }
        };
        started = Some(Instant::now());
        let answer = conn.exchange(&shared.target).await.map_err(|_| "io")?;
        if !conn.is_closed() {
            let mut idle = shared.idle.lock().unwrap_or_else(PoisonError::into_inner);
            // Never more idle connections than the bound (they only come from permit holders).
            if idle.len() < shared.max_connections {
                idle.push(conn);
            }
        }
        drop(permit);
        Ok(answer)
    })
    .await;
    let result = attempt.unwrap_or(Err("timeout"));
    let done = Done {
        scheduled,
        started,
        completed: Instant::now(),
        waited,
        result,
    };
    (done, opened)
}
