//! Serval's resource types: [`Backend`], [`Endpoint`], their status, and the [`RoutingTable`]
//! the router reads.
//!
//! This crate has no kube-runtime or client dependency, so the router and local mode can use it.
#![forbid(unsafe_code)]

pub mod backend;
pub mod conditions;
pub mod crd;
pub mod endpoint;
pub mod routing;
pub mod sidecar;
pub mod signals;

pub use backend::{
    Autoscaling, AutoscalingStatus, Backend, BackendSpec, BackendStatus, Batching, ColorMode,
    ImagePreprocess, ModelSource, Postprocess, Preprocess, SidecarOverride, TensorLayout,
    UserContainer,
};
pub use endpoint::{
    Cascade, CascadeStage, EffectiveTraffic, Endpoint, EndpointSpec, EndpointStatus, Ensemble, Hop,
    MatchRule, Mirror, MirrorCompare, MirrorCompareMode, Reduce, Retries, Rollout, RolloutGates,
    RolloutInterval, RolloutStatus, Sequence, SequenceStep, Sticky, TrafficTarget,
};
pub use routing::RoutingTable;

/// API group of Serval's resources.
pub const GROUP: &str = "serval.dev";
/// API version of Serval's resources.
pub const VERSION: &str = "v1alpha1";
