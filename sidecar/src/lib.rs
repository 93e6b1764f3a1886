//! Serval model server: one ONNX model on tract, adaptive dynamic batching, the Open Inference
//! Protocol (KServe V2, with tritonclient's binary tensors), KServe V1, built-in image
//! pre-processing and classifier post-processing, Prometheus metrics, graceful shutdown.
#![forbid(unsafe_code)]

pub mod admission;
pub mod batcher;
pub mod config;
pub mod engine;
pub mod errors;
pub mod grpc;
pub mod handlers;
/// Idle polling, shared with the router.
pub use serval_idle_poll as idle_poll;
pub mod metrics;
pub mod model_source;
pub mod postprocess;
pub mod preprocess;
pub mod protocol;
pub mod server;
pub mod state;

pub use config::{Args, Config};
pub use engine::Engine;
pub use errors::{RequestError, StartupError};
pub use server::Sidecar;
