//! The Open Inference Protocol's server-wide answers at the router, so a client such as
//! `tritonclient` sees one inference server: `GET /v2` (server metadata), `/v2/health/live`,
//! `/v2/health/ready` (every Endpoint can answer), and per Endpoint its readiness
//! (`/v2/models/<endpoint>/ready`, or the server paths under its prefix).

use http::{Response, StatusCode};
use serde_json::json;

use crate::body::ProxyBody;
use crate::errors::json_response;
use crate::matching::PathKind;
use crate::table::{CompiledRoute, CompiledTable};

/// Name the router gives itself in server metadata.
pub const SERVER_NAME: &str = "serval-router";
/// Protocol extensions every request path supports end to end (the router relays the binary
/// tensor extension untouched; the model servers implement it).
const EXTENSIONS: [&str; 1] = ["binary_tensor_data"];

/// The router's answer to a server-wide path at its root (`kind` from
/// [`crate::matching::server_path`]). Ready means the router serves a table, is not draining,
/// and every Endpoint has a ready backend: the protocol's "ready for inferencing" for every
/// model it serves.
pub fn server_answer(
    kind: PathKind,
    table: Option<&CompiledTable>,
    draining: bool,
) -> Response<ProxyBody> {
    match kind {
        PathKind::Live => json(StatusCode::OK, json!({ "live": true })),
        PathKind::Ready => {
            let unready: Vec<&str> = table
                .map(|t| {
                    t.routes
                        .iter()
                        .filter(|r| !t.ready(r))
                        .map(|r| r.endpoint.as_str())
                        .collect()
                })
                .unwrap_or_default();
            match table {
                Some(_) if !draining && unready.is_empty() => {
                    json(StatusCode::OK, json!({ "ready": true }))
                }
                None => not_ready("no routing table loaded yet"),
                Some(_) if draining => not_ready("draining"),
                Some(_) => not_ready(&format!("no ready backend for {}", unready.join(", "))),
            }
        }
        _ => server_metadata(),
    }
}

/// The router's answer for one Endpoint's readiness or server paths.
pub fn endpoint_answer(
    table: &CompiledTable,
    route: &CompiledRoute,
    kind: PathKind,
) -> Response<ProxyBody> {
    match kind {
        PathKind::Live => json(StatusCode::OK, json!({ "live": true })),
        PathKind::ServerMetadata => server_metadata(),
        _ if table.ready(route) => json(
            StatusCode::OK,
            json!({ "name": route.endpoint, "ready": true }),
        ),
        _ => not_ready(&format!(
            "endpoint {:?} has no ready backend",
            route.endpoint
        )),
    }
}

fn server_metadata() -> Response<ProxyBody> {
    json(
        StatusCode::OK,
        json!({
            "name": SERVER_NAME,
            "version": env!("CARGO_PKG_VERSION"),
            "extensions": EXTENSIONS,
        }),
    )
}

fn not_ready(why: &str) -> Response<ProxyBody> {
    json(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({ "ready": false, "error": format!("not ready: {why}") }),
    )
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<ProxyBody> {
    json_response(status, v.to_string())
}
