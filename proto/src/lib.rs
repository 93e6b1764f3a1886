//! The Open Inference Protocol over gRPC: the messages and `inference.GRPCInferenceService`
//! of KServe's `grpc_predict_v2.proto` (kept beside this crate, with its source and licence),
//! generated at build time.
#![allow(missing_docs, clippy::all, clippy::pedantic)] // generated code

/// The `inference` package.
pub mod inference {
    include!(concat!(env!("OUT_DIR"), "/inference.rs"));
}

pub use inference::*;
