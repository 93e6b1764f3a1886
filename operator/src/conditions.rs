//! Standard Kubernetes conditions: built from observations, moved only on real transitions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// What a condition should say now, before timestamps are settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Condition type, e.g. `Ready`.
    pub type_: &'static str,
    /// `True` or `False`.
    pub status: bool,
    /// UpperCamelCase reason.
    pub reason: &'static str,
    /// Human-readable detail.
    pub message: String,
}

impl Observed {
    /// A condition observation.
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// Turns observations into conditions. `lastTransitionTime` is kept from `previous` unless the
/// status flipped, so an unchanged state yields an identical list (and no status write).
pub fn settle(
    previous: &[Condition],
    observed: Vec<Observed>,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    observed
        .into_iter()
        .map(|o| {
            let status = if o.status { "True" } else { "False" }.to_owned();
            let last_transition_time = previous
                .iter()
                .find(|c| c.type_ == o.type_ && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or(Time(now));
            Condition {
                type_: o.type_.to_owned(),
                status,
                reason: o.reason.to_owned(),
                message: o.message,
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let first = settle(
            &[],
            vec![Observed::new("Ready", false, "ReplicasNotReady", "0/1")],
            Some(1),
            t0,
        );
        assert_eq!(first[0].last_transition_time, Time(t0));

        // Same status, new message: time kept.
        let again = settle(
            &first,
            vec![Observed::new("Ready", false, "ReplicasNotReady", "0/2")],
            Some(2),
            t1,
        );
        assert_eq!(again[0].last_transition_time, Time(t0));
        assert_eq!(again[0].message, "0/2");

        // Flip: time moves.
        let flipped = settle(
            &again,
            vec![Observed::new("Ready", true, "ReplicasReady", "2/2")],
            Some(2),
            t1,
        );
        assert_eq!(flipped[0].last_transition_time, Time(t1));
        assert_eq!(flipped[0].status, "True");
    }
}
