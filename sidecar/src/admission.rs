//! Admission by time: a request is queued only if the wait the queue ahead of it is expected to
//! cost fits its budget, so under overload the excess is refused at once (429) instead of every
//! admitted request waiting out a long queue. The wait is predicted from the start-up
//! calibration's run times, scaled by how much slower runs are now than then (other processes,
//! CPU quota), learnt from every batch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Default `batching.maxQueueDelayMillis`: a tenth of a second is below what a person notices
/// in an interactive call, and still holds a few batches of a CNN-sized model per worker, so
/// the workers never idle between arrivals while the excess is refused.
pub const DEFAULT_MAX_QUEUE_DELAY_MILLIS: u64 =
    serval_api::backend::DEFAULT_MAX_QUEUE_DELAY_MILLIS as u64;

/// Weight of the newest run in the slowdown average: about the last ten batches count, so the
/// estimate follows a change of load within a fraction of a second without jumping on one
/// outlier.
const SLOWDOWN_WEIGHT: f64 = 0.1;
/// Bounds of the slowdown factor: one odd run (a page fault storm, a preempted thread) must not
/// make the estimate refuse or admit everything.
const SLOWDOWN_RANGE: (f64, f64) = (0.25, 16.0);

/// The queue as a request arriving now finds it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueView {
    /// Rows waiting ahead of the request.
    pub queued_rows: usize,
    /// Batches running now.
    pub running: usize,
}

/// How fast the queue drains: `workers` batches of `batch_rows` rows run at once, each taking
/// `batch_time`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrainRate {
    /// Rows of a full batch (the largest planned size the batcher dispatches).
    pub batch_rows: usize,
    /// Expected time of one full batch, now.
    pub batch_time: Duration,
    /// Batches that run at once.
    pub workers: usize,
}

impl DrainRate {
    /// Expected wait before a request's rows start running: the rest of the batches running
    /// now (half of one, on average) if every worker is busy, then the full batches queued
    /// ahead of it, spread over the workers. Rows that do not fill a batch ride with the
    /// request's own.
    pub fn expected_wait(&self, queue: QueueView) -> Duration {
        let workers = self.workers.max(1);
        if queue.running < workers && queue.queued_rows == 0 {
            return Duration::ZERO;
        }
        let residual = if queue.running >= workers {
            self.batch_time / 2
        } else {
            Duration::ZERO
        };
        let batches_ahead = queue.queued_rows / self.batch_rows.max(1);
        residual
            + self
                .batch_time
                .mul_f64(batches_ahead as f64 / workers as f64)
    }
}

/// Whether a request whose own run is expected to take `own_run` may be queued behind a wait of
/// `wait`: it must start within `max_queue_delay` and finish within what its deadline leaves
/// (`deadline_left`). `Err` carries the budget it missed.
pub fn admit(
    wait: Duration,
    own_run: Duration,
    max_queue_delay: Duration,
    deadline_left: Duration,
) -> Result<(), Duration> {
    let budget = max_queue_delay.min(deadline_left.saturating_sub(own_run));
    if wait > budget { Err(budget) } else { Ok(()) }
}

/// How much slower model runs are now than at calibration: a moving average of observed over
/// predicted run time, shared by the workers without a lock.
#[derive(Debug)]
pub struct Slowdown(AtomicU64);

impl Default for Slowdown {
    fn default() -> Self {
        Self(AtomicU64::new(1.0f64.to_bits()))
    }
}

impl Slowdown {
    /// The current factor.
    pub fn factor(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    /// Folds in one run that was predicted to take `predicted` and took `observed`. Concurrent
    /// updates may lose one another's sample, which an average over ten runs does not miss.
    pub fn observe(&self, predicted: Duration, observed: Duration) {
        if predicted.is_zero() {
            return;
        }
        let ratio = (observed.as_secs_f64() / predicted.as_secs_f64())
            .clamp(SLOWDOWN_RANGE.0, SLOWDOWN_RANGE.1);
        let next = self.factor() * (1.0 - SLOWDOWN_WEIGHT) + ratio * SLOWDOWN_WEIGHT;
        self.0.store(next.to_bits(), Ordering::Relaxed);
    }

    /// `d` scaled by the factor.
    pub fn scale(&self, d: Duration) -> Duration {
        d.mul_f64(self.factor())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn rate(batch_rows: usize, batch_ms: u64, workers: usize) -> DrainRate {
        DrainRate {
            batch_rows,
            batch_time: MS * batch_ms as u32,
            workers,
        }
    }

    fn view(queued_rows: usize, running: usize) -> QueueView {
        QueueView {
            queued_rows,
            running,
        }
    }

    #[test]
    fn a_free_worker_and_an_empty_queue_mean_no_wait() {
        assert_eq!(rate(1, 40, 2).expected_wait(view(0, 1)), Duration::ZERO);
    }

    #[test]
    fn busy_workers_cost_half_a_batch_then_the_queue_drains_over_all_workers() {
        let r = rate(1, 40, 2);
        assert_eq!(r.expected_wait(view(0, 2)), MS * 20);
        // Four single-row batches ahead, two at a time: two more rounds of 40 ms.
        assert_eq!(r.expected_wait(view(4, 2)), MS * 100);
        // Rows that do not fill a batch of 8 join the request's own batch.
        let r = rate(8, 40, 1);
        assert_eq!(r.expected_wait(view(7, 1)), MS * 20);
        assert_eq!(r.expected_wait(view(16, 1)), MS * 100);
    }

    #[test]
    fn a_request_is_refused_when_the_wait_passes_the_budget_or_its_deadline() {
        assert_eq!(admit(MS * 99, MS * 40, MS * 100, MS * 30_000), Ok(()));
        assert_eq!(
            admit(MS * 101, MS * 40, MS * 100, MS * 30_000),
            Err(MS * 100)
        );
        // A 100 ms deadline leaves 60 ms to wait for a 40 ms run.
        assert_eq!(admit(MS * 61, MS * 40, MS * 100, MS * 100), Err(MS * 60));
        // Nothing queued: admitted even with a deadline shorter than the run (it will 504).
        assert_eq!(admit(Duration::ZERO, MS * 40, MS * 100, MS * 10), Ok(()));
    }

    #[test]
    fn the_slowdown_follows_observed_runs_within_bounds() {
        let s = Slowdown::default();
        assert_eq!(s.scale(MS * 10), MS * 10);
        for _ in 0..100 {
            s.observe(MS * 10, MS * 30);
        }
        assert!((s.factor() - 3.0).abs() < 0.01, "{}", s.factor());
        // One outlier moves it a tenth of the way, and at most to the bound.
        s.observe(MS * 10, MS * 100_000);
        assert!((s.factor() - (3.0 * 0.9 + 16.0 * 0.1)).abs() < 0.01);
        s.observe(Duration::ZERO, MS);
        assert!(s.factor() < 16.0);
    }
}
