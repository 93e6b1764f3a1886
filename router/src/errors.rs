//! Every way a proxied request can fail, and the one table that maps each to an HTTP status
//! with a JSON body `{"error": "..."}`.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{ClientFault, ProxyBody};
use crate::headers::Refused;

/// Errors of the router crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No route claims the request's host and path.
    #[error("not found: no Endpoint serves {0}")]
    NoRoute(String),
    /// The request head breaks an HTTP rule the router enforces.
    #[error("bad request: {0}")]
    Refused(#[from] Refused),
    /// The client's body was malformed, too large, or abandoned; never the upstream's fault.
    #[error("{}", client_fault_message(*.0))]
    Client(ClientFault),
    /// The client did not finish sending its body within the route's deadline.
    #[error("the request body was not received within the endpoint's {timeout_ms} ms deadline")]
    ClientTimeout {
        /// The route's timeout.
        timeout_ms: u64,
    },
    /// The route exists but no backend can take traffic (all weights zero, no addresses).
    #[error("endpoint {0:?} has no ready backend")]
    NoReadyBackend(String),
    /// Every replica of the chosen backend refused new work moments ago (429): refused here,
    /// before the body travels to a replica that would refuse it too.
    #[error("backend {0:?} is overloaded: every replica refuses new work for now; retry later")]
    Overloaded(String),
    /// A Backend scaled to zero had no ready replica within the request's deadline.
    #[error(
        "backend {backend:?} is scaled to zero and no replica became ready within the endpoint's {timeout_ms} ms deadline; retry shortly"
    )]
    ColdStart {
        /// Backend name.
        backend: String,
        /// The route's timeout.
        timeout_ms: u64,
    },
    /// Too many requests are already held for a Backend scaled to zero.
    #[error(
        "backend {0:?} is starting from zero and already holds the most requests it may; retry shortly"
    )]
    HoldFull(String),
    /// The per-route deadline passed before the upstream answered.
    #[error("endpoint {endpoint:?} did not answer within {timeout_ms} ms")]
    Timeout {
        /// Endpoint name.
        endpoint: String,
        /// The route's timeout.
        timeout_ms: u64,
    },
    /// No connection could be made to any tried upstream address.
    #[error("backend {backend:?} is unreachable: {reason}")]
    UpstreamUnreachable {
        /// Backend name.
        backend: String,
        /// Last connection error.
        reason: String,
    },
    /// The upstream connection broke mid-request or spoke bad HTTP.
    #[error("backend {backend:?} failed: {reason}")]
    UpstreamProtocol {
        /// Backend name.
        backend: String,
        /// The transport error.
        reason: String,
    },
    /// Fewer members of an ensemble answered than it needs.
    #[error("ensemble {endpoint}: {answered} of {needed} required answers ({reasons})")]
    EnsembleShort {
        /// Endpoint name.
        endpoint: String,
        /// Members that answered.
        answered: usize,
        /// Answers needed (`minResponses`).
        needed: usize,
        /// Why each other member did not, `member: reason`.
        reasons: String,
    },
    /// A request the router cannot forward (e.g. a path the URI grammar rejects).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A routing table was refused.
    #[error(transparent)]
    Table(#[from] serval_api::routing::RoutingTableError),
    /// A routing table is valid JSON but the router cannot compile it.
    #[error("routing table refused: {0}")]
    TableCompile(String),
    /// Reading the table source failed.
    #[error("table source: {0}")]
    Source(String),
    /// The listener could not be bound.
    #[error("cannot listen: {0}")]
    Listen(#[source] std::io::Error),
}

fn client_fault_message(fault: ClientFault) -> &'static str {
    match fault {
        ClientFault::Malformed => "bad request: the request body is malformed",
        ClientFault::TooLarge => "the request body is larger than the router's limit",
        ClientFault::HungUp => "the client closed the connection before its body was sent",
    }
}

/// `Retry-After` of the router's own 429: a second, as the model server advises its clients.
const RETRY_AFTER_SECS: u64 = 1;

/// Result alias for the router crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The status a client sees for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::NoRoute(_) => StatusCode::NOT_FOUND,
            Error::NoReadyBackend(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::ColdStart { .. } | Error::HoldFull(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Error::UpstreamUnreachable { .. }
            | Error::UpstreamProtocol { .. }
            | Error::EnsembleShort { .. } => StatusCode::BAD_GATEWAY,
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Refused(r) => r.status(),
            Error::Client(ClientFault::TooLarge) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Client(_) => StatusCode::BAD_REQUEST,
            Error::ClientTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Error::Table(_) | Error::TableCompile(_) | Error::Source(_) | Error::Listen(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// Whether the client's connection is closed after the answer: it broke the protocol, or
    /// its body was left unread or half read, so its next bytes cannot be trusted as a request
    /// (nginx does the same).
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            Error::Refused(_) | Error::Client(_) | Error::ClientTimeout { .. }
        )
    }

    /// The JSON error response for this error.
    pub fn into_response(self) -> Response<ProxyBody> {
        let mut resp = json_error(self.status(), &self.to_string());
        if matches!(
            self,
            Error::Overloaded(_) | Error::ColdStart { .. } | Error::HoldFull(_)
        ) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if self.closes_connection() {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// The JSON body of every error answer: `{"error": message}`.
pub fn error_body(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

/// A JSON `{"error": message}` response.
pub fn json_error(status: StatusCode, message: &str) -> Response<ProxyBody> {
    json_response(status, error_body(message))
}

/// A response with a JSON body (the router's own answers: errors, protocol metadata).
pub fn json_response(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table() {
        assert_eq!(Error::NoRoute("/x".into()).status(), StatusCode::NOT_FOUND);
        assert_eq!(
            Error::NoReadyBackend("e".into()).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let t = Error::Timeout {
            endpoint: "e".into(),
            timeout_ms: 1,
        };
        assert_eq!(t.status(), StatusCode::GATEWAY_TIMEOUT);
        let u = Error::UpstreamUnreachable {
            backend: "b".into(),
            reason: "refused".into(),
        };
        assert_eq!(u.status(), StatusCode::BAD_GATEWAY);
        // A client's mistakes are 4xx.
        assert_eq!(
            Error::Client(ClientFault::TooLarge).status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            Error::Client(ClientFault::Malformed).status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            Error::Refused(Refused::NoHost).status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            Error::ClientTimeout { timeout_ms: 1 }.status(),
            StatusCode::REQUEST_TIMEOUT
        );
    }
}
