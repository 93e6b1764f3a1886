//! Idle polling for Serval's sidecar and router: after each answered request, one thread at
//! `SCHED_IDLE` priority spins for a short window, so a CPU stays awake for the next request.
//!
//! Why: a thread blocked in `epoll_wait` lets its CPU halt, and waking a halted CPU is the
//! largest part of a small request's latency on virtual machines whose guest halt-polling is off
//! (measured here: a lone digits request 109–130 µs round trip, 64 µs with one CPU kept awake).
//! The kernel places a woken thread on a CPU that runs only `SCHED_IDLE` work as readily as on
//! an idle one, and any runnable thread preempts the spinner at once, so the spin only uses
//! time nothing else wants. It still counts as CPU time: the operator turns the sidecar's off
//! when a Backend sets a CPU limit, whose quota it would spend. The cost is bounded by the
//! window per request, and exported as `serval_idle_poll_seconds_total`.
//!
//! Off unless configured: on a VM a spinning vCPU still takes host CPU from the busy one, and
//! three spinning processes on 2 vCPUs cost ~30 % req/s at moderate load (see the sidecar
//! README). Measured on a 2-vCPU VM only: on a larger machine the kernel may wake the I/O thread on some
//! other idle CPU, and the gain then depends on placement.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::{Metric, Registry};
use thread_priority::{
    NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
    set_thread_priority_and_policy, thread_native_id,
};

/// A gap between two spin checks at least this long was time the thread did not run: one check
/// (32 pause instructions and a clock read) takes about a microsecond.
const PREEMPTED: Duration = Duration::from_micros(20);

/// A counter of seconds, as prometheus-client encodes floats.
pub type SecondsCounter = Counter<f64, AtomicU64>;

/// Registers the time spun, `idle_poll_seconds`, under `registry`'s prefix.
pub fn register_metric(registry: &mut Registry, spun: impl Metric) {
    registry.register(
        "idle_poll_seconds",
        "Time the idle-polling thread spun keeping a CPU awake (SCHED_IDLE: only time nothing \
         else wanted)",
        spun,
    );
}

/// Handle to the spinning thread; stops and joins it when dropped.
#[derive(Debug)]
pub struct IdlePoller {
    shared: Arc<Shared>,
    thread: Thread,
    join: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    epoch: Instant,
    window_nanos: u64,
    /// Nanoseconds from `epoch` to the end of the current window (last activity + window).
    until: AtomicU64,
    /// The spinner is parked (or about to park) and needs an unpark to see new activity.
    parked: AtomicBool,
    stop: AtomicBool,
}

impl Shared {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn within_window(&self) -> bool {
        self.now() < self.until.load(Ordering::SeqCst)
    }
}

impl IdlePoller {
    /// Starts the spinner with `window` after each [`IdlePoller::touch`]. Returns `None` for a
    /// zero window, or when the thread cannot get `SCHED_IDLE` priority: spinning at normal
    /// priority would take CPU from real work.
    pub fn start(window: Duration, spun: SecondsCounter) -> Option<Self> {
        if window.is_zero() {
            return None;
        }
        let shared = Arc::new(Shared {
            epoch: Instant::now(),
            window_nanos: u64::try_from(window.as_nanos()).unwrap_or(u64::MAX),
            until: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let (ok_tx, ok_rx) = std::sync::mpsc::channel();
        let inner = shared.clone();
        let join = thread::Builder::new()
            .name("serval-idle-poll".into())
            .spawn(move || {
                let lowered = set_thread_priority_and_policy(
                    thread_native_id(),
                    ThreadPriority::Min,
                    ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
                );
                let ok = lowered.is_ok();
                let _ = ok_tx.send(lowered.map_err(|e| format!("{e:?}")));
                if ok {
                    spin_loop(&inner, &spun);
                }
            })
            .map_err(|e| tracing::warn!(error = %e, "idle polling off: no thread"))
            .ok()?;
        match ok_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "idle polling off: SCHED_IDLE refused");
                let _ = join.join();
                return None;
            }
            Err(_) => {
                let _ = join.join();
                return None;
            }
        }
        tracing::debug!(window_us = window.as_micros(), "idle polling on");
        Some(Self {
            shared,
            thread: join.thread().clone(),
            join: Some(join),
        })
    }

    /// Marks activity now: the spinner keeps (or starts) spinning for one window from here.
    /// Costs a clock read and two atomics; a futex wake only when the spinner was parked.
    pub fn touch(&self) {
        let s = &self.shared;
        s.until
            .store(s.now().saturating_add(s.window_nanos), Ordering::SeqCst);
        if s.parked.load(Ordering::SeqCst) && s.parked.swap(false, Ordering::SeqCst) {
            self.thread.unpark();
        }
    }
}

impl Drop for IdlePoller {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.thread.unpark();
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
    }
}

fn spin_loop(s: &Shared, spun: &SecondsCounter) {
    while !s.stop.load(Ordering::SeqCst) {
        // Publish `parked` before the last look at `until`: a touch after this either sees
        // `parked` and unparks, or its window is seen here and the thread does not park.
        s.parked.store(true, Ordering::SeqCst);
        if !s.within_window() {
            thread::park();
            if s.stop.load(Ordering::SeqCst) {
                return;
            }
        }
        s.parked.store(false, Ordering::SeqCst);
        // Count only the time spent spinning: a gap between two checks longer than one check
        // takes means the thread was preempted (what SCHED_IDLE is for), and is not its CPU.
        let mut spent = Duration::ZERO;
        let mut at = Instant::now();
        while s.within_window() && !s.stop.load(Ordering::Relaxed) {
            for _ in 0..32 {
                std::hint::spin_loop();
            }
            let now = Instant::now();
            let step = now - at;
            if step < PREEMPTED {
                spent += step;
            }
            at = now;
        }
        spun.inc_by(spent.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (up to 10 s each) until the spun total exceeds `above`, then until it stops
    /// growing, and returns it.
    fn settled_above(spun: &SecondsCounter, above: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while spun.get() <= above && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = spun.get();
        loop {
            thread::sleep(Duration::from_millis(60));
            let now = spun.get();
            if now == last || Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    #[test]
    fn spins_only_within_a_window_of_activity() {
        let window = Duration::from_millis(20);
        let spun = SecondsCounter::default();
        let Some(poller) = IdlePoller::start(window, spun.clone()) else {
            panic!("SCHED_IDLE is always allowed for an unprivileged thread on Linux");
        };
        thread::sleep(Duration::from_millis(50));
        assert_eq!(spun.get(), 0.0, "no activity yet, so no spinning");

        // Touches 5 ms apart keep the window open; the spinner runs within it (SCHED_IDLE
        // threads still get some CPU on a busy machine).
        let started = Instant::now();
        for _ in 0..20 {
            poller.touch();
            thread::sleep(Duration::from_millis(5));
        }
        let busy = started.elapsed();
        let total = settled_above(&spun, 0.0);
        assert!(total > 0.0, "activity starts the spinner");
        assert!(
            total <= (busy + window * 2).as_secs_f64(),
            "spins no longer than the activity plus one window: {total} s for {busy:?}"
        );
        thread::sleep(Duration::from_millis(100));
        assert_eq!(spun.get(), total, "parked once the window passed");

        // A touch after parking wakes it again.
        poller.touch();
        let again = settled_above(&spun, total);
        assert!(again > total, "a later touch spins again");
        drop(poller);
    }

    #[test]
    fn zero_window_starts_nothing() {
        assert!(IdlePoller::start(Duration::ZERO, SecondsCounter::default()).is_none());
    }
}
