//! Serval's closed-loop decisions, in pure code: autoscaling (load samples in, a replica count
//! and its reason out) and progressive rollout ([`rollout`]: an interval's counters in, a
//! verdict and the next step out).
//!
//! Why a crate of its own: the operator (Deployment replicas) and `serval local` (processes) must
//! make the same decision from the same samples, and a decision with no clock, no I/O and no
//! runtime can be replayed second by second against scripted load traces in tests.
//!
//! The rule is Knative's KPA, on in-flight requests: desired = ceil(average concurrency over a
//! stable window ÷ target); a short panic window scales up at once on a 2× surge and never scales
//! down while panicking; scale-down waits for the lower desire to hold for a delay; 1 → 0 only
//! after a period with no requests at all; 0 → 1 at once when a request arrives or is held.
//!
//! The caller owns time: every instant is a [`Duration`](std::time::Duration) since an origin it
//! picks (its start, say), so tests need no sleeping and no mocked clock.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod decide;
mod policy;
mod reason;
pub mod rollout;
mod scaler;
mod window;

pub use decide::{Decision, State, decide};
pub use policy::{
    DEFAULT_PANIC_THRESHOLD, DEFAULT_PANIC_WINDOW, DEFAULT_SAMPLE_INTERVAL, DEFAULT_STABLE_WINDOW,
    MIN_TARGET_INFLIGHT, Policy,
};
pub use reason::Reason;
pub use scaler::{Scaler, Snapshot, sample};
pub use window::{MAX_WINDOW_SAMPLES, Sample, Window};
