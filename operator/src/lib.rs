//! The Serval operator: reconciles Backends into Deployments, Services and
//! PodDisruptionBudgets, and Endpoints into per-namespace routing tables and routers; scales
//! Backends with `spec.autoscaling` on the load their model servers and routers report.
#![forbid(unsafe_code)]

pub mod autoscaler;
pub mod backend_controller;
pub mod backoff;
pub mod conditions;
pub mod context;
pub mod desired;
pub mod endpoint_controller;
pub mod error;
pub mod events;
pub mod http;
pub mod metrics;
pub mod rollouts;
pub mod run;
pub mod signals;
pub mod streams;

pub use error::{Error, Result};
