//! What a Backend asks of the autoscaler (`spec.autoscaling`, whose defaults live with the API
//! type), and the window settings with their reasons.

use std::time::Duration;

use serval_api::Autoscaling;

/// Stable window, as Knative's KPA: long enough to average bursts out, short enough to follow a
/// load change within a minute.
pub const DEFAULT_STABLE_WINDOW: Duration = Duration::from_secs(60);

/// Panic window, as Knative's KPA (10 % of the stable window): a surge shows within a few
/// samples instead of being diluted by a minute of history.
pub const DEFAULT_PANIC_WINDOW: Duration = Duration::from_secs(6);

/// Panic threshold, as Knative's KPA (200 %): only a surge to twice the capacity in place
/// bypasses the stable window, so ordinary noise never does.
pub const DEFAULT_PANIC_THRESHOLD: f64 = 2.0;

/// How often actuators sample and decide: a surge reaches a decision within a second, for one
/// cheap snapshot read per replica per second.
pub const DEFAULT_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Smallest target used: a zero, negative or NaN target (which the API rejects) must not divide
/// by zero; the result is then held at `max_replicas`.
pub const MIN_TARGET_INFLIGHT: f64 = 0.01;

/// How a Backend wants to be scaled: `Backend.spec.autoscaling` in durations, plus the window
/// settings that actuators (not users) may tune.
///
/// Values the API would reject do not panic here: with `min_replicas > max_replicas` the maximum
/// wins, and a non-positive `target_inflight` counts as [`MIN_TARGET_INFLIGHT`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// `minReplicas`: never fewer; 0 allows scale-to-zero.
    pub min_replicas: u32,
    /// `maxReplicas`: never more.
    pub max_replicas: u32,
    /// `targetInflight`: concurrent requests one replica should carry.
    pub target_inflight: f64,
    /// `scaleDownDelaySeconds`: how long a lower desire must hold before replicas are removed.
    pub scale_down_delay: Duration,
    /// `scaleToZeroAfterSeconds`: how long without any request before the last replica goes.
    pub scale_to_zero_after: Duration,
    /// Span of the average that decides outside panic.
    pub stable_window: Duration,
    /// Span of the average that detects a surge and sizes the response to it.
    pub panic_window: Duration,
    /// Surge factor: panic when the panic window wants this many times the current replicas.
    pub panic_threshold: f64,
}

impl Default for Policy {
    /// The API's defaults (`serval_api::backend::DEFAULT_*`, each with its reason there).
    fn default() -> Self {
        Self::from(&Autoscaling::default())
    }
}

impl From<&Autoscaling> for Policy {
    /// `Backend.spec.autoscaling` as a policy, with the default windows. Negative replica
    /// bounds (which the schema refuses) count as 0.
    fn from(spec: &Autoscaling) -> Self {
        let count = |n: i32| u32::try_from(n).unwrap_or(0);
        Self {
            min_replicas: count(spec.min_replicas),
            max_replicas: count(spec.max_replicas),
            target_inflight: f64::from(spec.target_inflight),
            scale_down_delay: Duration::from_secs(u64::from(spec.scale_down_delay_seconds)),
            scale_to_zero_after: Duration::from_secs(u64::from(spec.scale_to_zero_after_seconds)),
            stable_window: DEFAULT_STABLE_WINDOW,
            panic_window: DEFAULT_PANIC_WINDOW,
            panic_threshold: DEFAULT_PANIC_THRESHOLD,
        }
    }
}

impl Policy {
    /// This policy deciding on a stable window of `stable_window` (at least one sample
    /// interval); the panic window stays the default unless that is longer than the stable
    /// window. Actuators let operators shorten it (tests, demos) without touching the API.
    #[must_use]
    pub fn with_stable_window(self, stable_window: Duration) -> Self {
        let stable_window = stable_window.max(DEFAULT_SAMPLE_INTERVAL);
        Self {
            stable_window,
            panic_window: DEFAULT_PANIC_WINDOW.min(stable_window),
            ..self
        }
    }

    /// The target actually divided by: never zero, negative or NaN.
    pub(crate) fn target(&self) -> f64 {
        // f64::max ignores NaN, so a NaN target also lands on the floor.
        self.target_inflight.max(MIN_TARGET_INFLIGHT)
    }

    /// `replicas` within [min, max]; the maximum wins when the two cross.
    pub(crate) fn clamp(&self, replicas: u32) -> u32 {
        replicas.max(self.min_replicas).min(self.max_replicas)
    }

    /// Replicas that carry `inflight` concurrent requests at the target, rounded up.
    pub(crate) fn replicas_for(&self, inflight: f64) -> u32 {
        // The slack keeps an average of exactly 8.0 over a target of 4 at 2 replicas, not 3,
        // when the sum of samples rounds a hair above it.
        let wanted = (inflight / self.target() - 1e-9).ceil();
        // A float-to-int `as` saturates (and maps NaN to 0), which is what a count wants.
        wanted.max(0.0) as u32
    }
}
