//! Why a decision chose its replica count: shown in Backend status, Events and metrics.

use std::fmt;

/// Why [`decide`](crate::decide) chose its replica count. `Display` gives a CamelCase token
/// (a condition reason, a metric label); [`Reason::message`] a sentence for an Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No sample in the stable window: a signal outage must not move replicas.
    NoData,
    /// At zero with requests arriving or held: start replicas at once, without a window.
    ColdStart,
    /// At zero with no request: stay there.
    IdleAtZero,
    /// The stable-window average decided (up at once, down after the delay).
    StableAverage,
    /// Panic: the panic window wants at least the threshold times the current replicas.
    PanicSurge,
    /// Panic continues (until a stable window without a surge): never scale down meanwhile.
    HoldingPanic,
    /// The desire is lower, but has not stayed lower for the scale-down delay.
    ScaleDownDelayed,
    /// Nothing in flight, but requests arrived within the scale-to-zero period: keep one.
    ScaleToZeroDelayed,
    /// No request for the scale-to-zero period: remove the last replicas.
    ScaleToZero,
    /// The desire was below `minReplicas`.
    ClampedToMin,
    /// The desire was above `maxReplicas`.
    ClampedToMax,
}

impl Reason {
    /// Every reason, so metrics can publish each label from the start.
    pub const ALL: [Reason; 11] = [
        Reason::NoData,
        Reason::ColdStart,
        Reason::IdleAtZero,
        Reason::StableAverage,
        Reason::PanicSurge,
        Reason::HoldingPanic,
        Reason::ScaleDownDelayed,
        Reason::ScaleToZeroDelayed,
        Reason::ScaleToZero,
        Reason::ClampedToMin,
        Reason::ClampedToMax,
    ];

    /// The CamelCase token, as Kubernetes condition reasons are spelled.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoData => "NoData",
            Reason::ColdStart => "ColdStart",
            Reason::IdleAtZero => "IdleAtZero",
            Reason::StableAverage => "StableAverage",
            Reason::PanicSurge => "PanicSurge",
            Reason::HoldingPanic => "HoldingPanic",
            Reason::ScaleDownDelayed => "ScaleDownDelayed",
            Reason::ScaleToZeroDelayed => "ScaleToZeroDelayed",
            Reason::ScaleToZero => "ScaleToZero",
            Reason::ClampedToMin => "ClampedToMin",
            Reason::ClampedToMax => "ClampedToMax",
        }
    }

    /// One sentence for a user reading an Event or `serval local`'s log.
    pub fn message(self) -> &'static str {
        match self {
            Reason::NoData => "no load sample in the stable window; replicas unchanged",
            Reason::ColdStart => "requests arrived at zero replicas; starting replicas at once",
            Reason::IdleAtZero => "no requests at zero replicas",
            Reason::StableAverage => "average in-flight requests over the stable window",
            Reason::PanicSurge => "in-flight requests surged past the panic threshold",
            Reason::HoldingPanic => "panic mode: not scaling down until the surge has passed",
            Reason::ScaleDownDelayed => "lower load has not yet lasted the scale-down delay",
            Reason::ScaleToZeroDelayed => {
                "nothing in flight; keeping one replica until no request for the scale-to-zero period"
            }
            Reason::ScaleToZero => "no requests for the scale-to-zero period",
            Reason::ClampedToMin => "held at minReplicas",
            Reason::ClampedToMax => "held at maxReplicas",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
