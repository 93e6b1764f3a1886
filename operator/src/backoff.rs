//! Capped exponential backoff for failed reconciles.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// First retry delay: short, since most failures are transient conflicts.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest retry delay: five minutes keeps a broken object from hammering the API server.
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(300);

/// The delay before retry number `failures` (1-based): base, 2×base, 4×base, …, at most cap.
pub fn delay(failures: u32, base: Duration, cap: Duration) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1));
    base.saturating_mul(factor).min(cap)
}

/// Consecutive failures per object, reset on success.
#[derive(Default)]
pub struct FailureCounts(Mutex<HashMap<String, u32>>);

impl FailureCounts {
    /// Counts one more failure of `key` and returns the new count.
    pub fn fail(&self, key: &str) -> u32 {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// Forgets `key` after a success.
    pub fn reset(&self, key: &str) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps() {
        let (b, c) = (Duration::from_secs(1), Duration::from_secs(300));
        let got: Vec<u64> = (1..=12).map(|n| delay(n, b, c).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(delay(u32::MAX, b, c), c, "no overflow");
    }

    #[test]
    fn counts_reset_on_success() {
        let f = FailureCounts::default();
        assert_eq!(f.fail("a"), 1);
        assert_eq!(f.fail("a"), 2);
        f.reset("a");
        assert_eq!(f.fail("a"), 1);
    }
}
