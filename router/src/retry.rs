//! Retry budget: retries may add at most a percentage of recent requests (plus a small floor),
//! so retrying cannot multiply load on a backend that is already failing.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A per-endpoint retry budget over a sliding pair of windows.
#[derive(Debug)]
pub struct RetryBudget {
    percent: u32,
    min_per_window: u32,
    window: Duration,
    state: Mutex<Windows>,
}

#[derive(Debug)]
struct Windows {
    start: Instant,
    requests: u64,
    retries: u64,
    prev_requests: u64,
    prev_retries: u64,
}

impl RetryBudget {
    /// A budget allowing `percent`% of requests as retries, and always `min_per_window`.
    pub fn new(percent: u32, min_per_window: u32, window: Duration) -> Self {
        Self {
            percent,
            min_per_window,
            window,
            state: Mutex::new(Windows {
                start: Instant::now(),
                requests: 0,
                retries: 0,
                prev_requests: 0,
                prev_retries: 0,
            }),
        }
    }

    /// The configured percentage.
    pub fn percent(&self) -> u32 {
        self.percent
    }

    fn with<R>(&self, f: impl FnOnce(&mut Windows) -> R) -> R {
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = w.start.elapsed();
        if elapsed >= self.window {
            let stale = elapsed >= self.window * 2;
            w.prev_requests = if stale { 0 } else { w.requests };
            w.prev_retries = if stale { 0 } else { w.retries };
            w.requests = 0;
            w.retries = 0;
            w.start = Instant::now();
        }
        f(&mut w)
    }

    /// Counts a first attempt.
    pub fn deposit(&self) {
        self.with(|w| w.requests += 1);
    }

    /// Takes one retry from the budget if there is one left.
    pub fn withdraw(&self) -> bool {
        let (percent, min) = (u64::from(self.percent), u64::from(self.min_per_window));
        self.with(|w| {
            let requests = w.requests + w.prev_requests;
            let retries = w.retries + w.prev_retries;
            if retries < min + requests * percent / 100 {
                w.retries += 1;
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_a_share_of_requests_plus_floor() {
        let b = RetryBudget::new(20, 2, Duration::from_secs(60));
        assert!(b.withdraw() && b.withdraw(), "the floor allows two");
        assert!(!b.withdraw());
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 20, "20% of 100 requests");
    }

    #[test]
    fn windows_roll_over() {
        let b = RetryBudget::new(0, 1, Duration::from_millis(1));
        assert!(b.withdraw());
        std::thread::sleep(Duration::from_millis(3));
        assert!(b.withdraw(), "a stale window is forgotten");
    }
}
