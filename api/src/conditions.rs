//! Condition types and reasons shared by the operator, local mode and tests.

/// The object serves traffic as declared.
pub const READY: &str = "Ready";
/// The object is moving towards its desired state.
pub const PROGRESSING: &str = "Progressing";
/// The object serves, but less than declared (or not at all).
pub const DEGRADED: &str = "Degraded";

/// Reasons, in `UpperCamelCase` as Kubernetes expects.
pub mod reason {
    /// All replicas are ready.
    pub const REPLICAS_READY: &str = "ReplicasReady";
    /// Waiting for replicas to become ready.
    pub const REPLICAS_NOT_READY: &str = "ReplicasNotReady";
    /// A rollout is in progress.
    pub const ROLLING_OUT: &str = "RollingOut";
    /// An Endpoint's progressive rollout (`spec.rollout`) is under way.
    pub const ROLLOUT: &str = "Rollout";
    /// The Deployment exceeded its progress deadline.
    pub const PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";
    /// Scaled to zero replicas on purpose.
    pub const SCALED_TO_ZERO: &str = "ScaledToZero";
    /// Nothing to do.
    pub const UP_TO_DATE: &str = "UpToDate";
    /// Every backend named in traffic exists and is ready.
    pub const BACKENDS_READY: &str = "BackendsReady";
    /// A backend named in the Endpoint does not exist.
    pub const BACKEND_NOT_FOUND: &str = "BackendNotFound";
    /// A backend named in the Endpoint is not ready; it receives no traffic.
    pub const BACKEND_NOT_READY: &str = "BackendNotReady";
    /// No backend with positive weight is ready: requests are answered 503.
    pub const NO_READY_BACKEND: &str = "NoReadyBackend";
    /// Another Endpoint created earlier already claims this route.
    pub const ROUTE_CONFLICT: &str = "RouteConflict";
    /// The Endpoint calls itself through other Endpoints (cascade stages, sequence steps).
    pub const CYCLE: &str = "Cycle";
    /// An Endpoint named as a cascade stage or sequence step is not routed (absent, in a
    /// cycle, or conflicting).
    pub const ENDPOINT_NOT_FOUND: &str = "EndpointNotFound";
    /// The router serving this Endpoint is not ready yet.
    pub const ROUTER_NOT_READY: &str = "RouterNotReady";
}
