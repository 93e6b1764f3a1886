//! Serval routing proxy: serves the routing table the operator (or local mode) generates.
//!
//! A request is matched to an Endpoint's route ([`matching`]), a backend is chosen by header
//! rule, sticky hash or weighted split ([`split`], [`table`]), optionally copied to a shadow
//! ([`mirror`], [`agreement`]), and forwarded to one of the backend's addresses ([`upstream`])
//! under the route's deadline and retry budget ([`retry`], [`proxy`]) over the shard's
//! keep-alive connections ([`pool`]).

pub mod agreement;
pub mod body;
pub mod config;
pub mod errors;
pub mod express;
pub mod matching;
pub mod metrics;
pub mod mirror;
pub mod pool;
pub mod proxy;
pub mod retry;
pub mod server;
pub mod split;
pub mod table;
pub mod table_source;
pub mod upstream;

pub use config::Config;
pub use errors::{Error, Result};
pub use server::Router;
