//! Load samples over the stable window, with bounded memory.

use std::collections::VecDeque;
use std::time::Duration;

use crate::Policy;

/// Most samples a [`Window`] keeps: ten a second over the default stable window with room to
/// spare; a faster producer loses its oldest samples early instead of growing memory.
pub const MAX_WINDOW_SAMPLES: usize = 1024;

/// One observation of a Backend's load, as an actuator reads it from the data plane.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// When it was observed, since the caller's origin.
    pub at: Duration,
    /// Requests in flight summed over the Backend's replicas, plus those the router holds while
    /// the Backend is at zero (so a held request is load like any other).
    pub inflight: f64,
    /// Requests arrived since the previous sample: shows traffic too short-lived to be caught
    /// in flight, so "no requests at all" is told apart from "none in flight right now".
    pub requests: u64,
}

impl Sample {
    /// Whether this sample shows any traffic (in flight, held or arrived).
    pub fn is_active(&self) -> bool {
        self.inflight > 0.0 || self.requests > 0
    }
}

/// The recent samples of one Backend, oldest first, spanning at most the stable window.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    span: Duration,
    samples: VecDeque<Sample>,
}

impl Window {
    /// An empty window keeping samples younger than `span` (relative to the newest).
    pub fn new(span: Duration) -> Self {
        Self {
            span,
            samples: VecDeque::new(),
        }
    }

    /// An empty window spanning the policy's stable window, the longest one a decision reads.
    pub fn for_policy(policy: &Policy) -> Self {
        Self::new(policy.stable_window)
    }

    /// Adds a sample and forgets those it makes too old.
    ///
    /// A sample older than the newest is ignored (a late reader must not rewrite history), and
    /// a negative or non-finite `inflight` counts as 0: a garbled snapshot must not scale a
    /// Backend to its maximum.
    pub fn push(&mut self, sample: Sample) {
        if let Some(newest) = self.samples.back()
            && sample.at < newest.at
        {
            return;
        }
        let inflight = if sample.inflight.is_finite() && sample.inflight > 0.0 {
            sample.inflight
        } else {
            0.0
        };
        self.samples.push_back(Sample { inflight, ..sample });
        while let Some(oldest) = self.samples.front()
            && (sample.at - oldest.at >= self.span || self.samples.len() > MAX_WINDOW_SAMPLES)
        {
            self.samples.pop_front();
        }
    }

    /// The newest sample, if any.
    pub fn latest(&self) -> Option<&Sample> {
        self.samples.back()
    }

    /// How many samples are kept.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether no sample is kept.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Samples taken at or before `now` and younger than `span`, newest first.
    fn recent(&self, now: Duration, span: Duration) -> impl Iterator<Item = &Sample> {
        self.samples
            .iter()
            .rev()
            .skip_while(move |s| s.at > now)
            .take_while(move |s| now - s.at < span)
    }

    /// Mean in-flight requests over the samples younger than `span` at `now`; `None` if none.
    pub(crate) fn average_inflight(&self, now: Duration, span: Duration) -> Option<f64> {
        let (sum, count) = self
            .recent(now, span)
            .fold((0.0, 0u32), |(sum, count), s| (sum + s.inflight, count + 1));
        (count > 0).then(|| sum / f64::from(count))
    }

    /// The newest sample younger than `span` at `now` that shows traffic.
    pub(crate) fn latest_active(&self, now: Duration, span: Duration) -> Option<&Sample> {
        self.recent(now, span).find(|s| s.is_active())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: u64, inflight: f64) -> Sample {
        Sample {
            at: Duration::from_secs(at),
            inflight,
            requests: 0,
        }
    }

    #[test]
    fn the_window_forgets_samples_as_old_as_its_span() {
        let mut window = Window::new(Duration::from_secs(10));
        for at in 0..=25 {
            window.push(sample(at, 1.0));
        }
        assert_eq!(window.len(), 10);
        assert_eq!(window.samples.front().map(|s| s.at.as_secs()), Some(16));
    }

    #[test]
    fn the_window_never_holds_more_than_max_window_samples() {
        let mut window = Window::new(Duration::from_secs(3600));
        for at in 0..(MAX_WINDOW_SAMPLES as u64 * 3) {
            window.push(Sample {
                at: Duration::from_millis(at),
                inflight: 1.0,
                requests: 1,
            });
        }
        assert_eq!(window.len(), MAX_WINDOW_SAMPLES);
    }

    #[test]
    fn a_sample_older_than_the_newest_is_ignored() {
        let mut window = Window::new(Duration::from_secs(60));
        window.push(sample(5, 1.0));
        window.push(sample(3, 100.0));
        assert_eq!(window.len(), 1);
        assert_eq!(window.latest().map(|s| s.inflight), Some(1.0));
    }

    #[test]
    fn a_negative_or_non_finite_in_flight_count_counts_as_zero() {
        let mut window = Window::new(Duration::from_secs(60));
        for (at, inflight) in [(0, f64::NAN), (1, f64::INFINITY), (2, -3.0)] {
            window.push(sample(at, inflight));
        }
        let now = Duration::from_secs(2);
        let average = window.average_inflight(now, Duration::from_secs(60));
        assert_eq!(average, Some(0.0));
    }

    #[test]
    fn averages_cover_only_samples_younger_than_the_span_and_not_after_now() {
        let mut window = Window::new(Duration::from_secs(60));
        for (at, inflight) in [(0, 100.0), (8, 2.0), (9, 4.0), (10, 50.0)] {
            window.push(sample(at, inflight));
        }
        let now = Duration::from_secs(9);
        let average = window.average_inflight(now, Duration::from_secs(6));
        assert_eq!(average, Some(3.0));
        assert_eq!(window.average_inflight(now, Duration::ZERO), None);
    }
}
