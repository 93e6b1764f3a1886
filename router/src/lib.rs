//! Serval routing proxy: serves the routing table the operator (or local mode) generates.
//!
//! A request is matched to an Endpoint's route ([`matching`]), a backend is chosen by header
//! rule, sticky hash or weighted split ([`split`], [`table`]), optionally copied to a shadow
//! ([`mirror`], [`agreement`]), and forwarded to one of the backend's addresses ([`upstream`])
//! under the route's deadline and retry budget ([`proxy`], [`table`]) over the shard's
//! keep-alive connections (hyper-util's pooled client). Every message is parsed and framed by
//! hyper; [`headers`] holds the rules it leaves to us, each with its RFC section. A cascade
//! route sends each request through its stages, escalating rows it is unsure of
//! ([`cascade`]).

pub mod agreement;
pub mod body;
pub mod cascade;
pub mod compose;
pub mod config;
pub mod ensemble;
pub mod errors;
pub mod grpc;
pub mod headers;
pub mod matching;
pub mod metrics;
pub mod mirror;
pub mod oip;
pub mod proxy;
pub mod sequence;
pub mod server;
pub mod split;
pub mod table;
pub mod table_source;
pub mod upstream;

pub use config::Config;
pub use errors::{Error, Result};
pub use server::Router;
