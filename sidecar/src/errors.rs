//! The sidecar's error types and the one table that maps a request error to an HTTP answer.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

/// Errors while starting up: loading, verifying or compiling the model, binding the port.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The command line or environment is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The model could not be fetched or read.
    #[error("cannot load model from {uri}: {reason}")]
    ModelSource {
        /// Where the model was supposed to come from.
        uri: String,
        /// What went wrong.
        reason: String,
    },
    /// The model's bytes do not have the expected SHA-256; it is never served.
    #[error("model {uri} has sha256 {actual}, expected {expected}: refusing to serve it")]
    Sha256Mismatch {
        /// Where the model came from.
        uri: String,
        /// The configured digest.
        expected: String,
        /// The digest of the bytes received.
        actual: String,
    },
    /// tract could not load, type or optimize the model.
    #[error("cannot compile model: {0}")]
    Engine(String),
    /// The listen socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The I/O threads or their runtimes could not be started.
    #[error("cannot start the I/O threads: {0}")]
    Threads(std::io::Error),
}

/// Result alias for start-up.
pub type StartupResult<T> = Result<T, StartupError>;

/// Everything a request can fail with. [`RequestError::status`] is the single status table.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    /// The request is not well formed (bad JSON, bad header, inconsistent sizes).
    #[error("{0}")]
    Malformed(String),
    /// No such model or route.
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The body or the row count is over the configured bound.
    #[error("{0}")]
    TooLarge(String),
    /// The body's content type is not understood here.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Well formed, but the tensors do not fit the model (shape, datatype, missing input).
    #[error("{0}")]
    Unprocessable(String),
    /// The graph refused the request's values at run time (an out-of-range index, a shape an
    /// operator rejects): the input's fault, with the engine's message.
    #[error("the model cannot run on this input: {0}")]
    ModelRejected(String),
    /// The queue's expected wait does not fit the request's deadline or the queue-delay budget;
    /// answered at once so the caller can retry elsewhere or later.
    #[error(
        "overloaded: expected queue wait {}ms, budget {}ms",
        expected.as_millis(),
        budget.as_millis()
    )]
    Overloaded {
        /// The queue's expected wait for this request.
        expected: Duration,
        /// The smaller of the queue-delay budget and what the deadline leaves.
        budget: Duration,
    },
    /// Request bodies being read or queued would pass the memory budget.
    #[error(
        "memory budget full: {held} of {budget} bytes of request bodies held, this one needs {needed}"
    )]
    MemoryFull {
        /// Bytes held by other requests now.
        held: usize,
        /// The budget, `--memory-budget-bytes`.
        budget: usize,
        /// Bytes this request needs.
        needed: usize,
    },
    /// The body did not arrive within the request's deadline.
    #[error("request body not received within the deadline of {0:?}")]
    BodyTimeout(Duration),
    /// The queue is full; retry after the given time.
    #[error("queue full: {queued} rows waiting, bound is {bound}")]
    QueueFull {
        /// Rows waiting when the request arrived.
        queued: usize,
        /// The configured bound.
        bound: usize,
    },
    /// The model is not loaded or warmed up yet.
    #[error("model is not ready")]
    NotReady,
    /// The server is shutting down and takes no new work.
    #[error("server is shutting down")]
    Draining,
    /// The request's deadline passed before an answer was ready.
    #[error("deadline of {0:?} exceeded")]
    DeadlineExceeded(Duration),
    /// Inference failed (including a panic inside the engine); the server keeps serving.
    #[error("inference failed: {0}")]
    Inference(String),
    /// Failed on purpose (`--fault-error-percent`, the Backend's fault-injection annotation).
    #[error("injected fault (--fault-error-percent)")]
    Injected,
}

/// Result alias for request handling.
pub type RequestResult<T> = Result<T, RequestError>;

/// Seconds a client should wait before retrying after a 429 or 503: one second is long enough
/// for a full queue to drain a few batches and short enough not to idle a client.
pub const DEFAULT_RETRY_AFTER_SECS: u64 = 1;

impl RequestError {
    /// The one status table of the sidecar.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Malformed(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unprocessable(_) | Self::ModelRejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::QueueFull { .. } | Self::Overloaded { .. } | Self::MemoryFull { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::NotReady | Self::Draining => StatusCode::SERVICE_UNAVAILABLE,
            Self::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Inference(_) | Self::Injected => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `reason` label of `serval_rejections_total`, for errors that reject work.
    pub fn rejection_reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed => "method",
            Self::TooLarge(_) => "too_large",
            Self::UnsupportedMediaType(_) => "media_type",
            Self::Unprocessable(_) => "unprocessable",
            Self::ModelRejected(_) => "model_rejected",
            Self::BodyTimeout(_) => "body_timeout",
            Self::Overloaded { .. } => "overloaded",
            Self::MemoryFull { .. } => "memory",
            Self::QueueFull { .. } => "queue_full",
            Self::NotReady => "not_ready",
            Self::Draining => "draining",
            Self::DeadlineExceeded(_) => "deadline",
            Self::Inference(_) => "inference",
            Self::Injected => "injected",
        }
    }

    /// The JSON error response `{"error": "..."}`, with `Retry-After` when retrying helps.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let status = self.status();
        let body = serde_json::json!({ "error": self.to_string() }).to_string();
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(DEFAULT_RETRY_AFTER_SECS),
            );
        }
        if let Self::Overloaded { expected, budget } = &self {
            // When the queue is expected to have room again: the excess wait, at least 1 ms.
            let ms = expected.saturating_sub(*budget).as_millis().max(1);
            headers.insert(
                serval_api::routing::RETRY_AFTER_MS_HEADER,
                HeaderValue::from(ms as u64),
            );
        }
        if status == StatusCode::REQUEST_TIMEOUT {
            // The rest of a late body may still arrive: the connection cannot carry another
            // request (RFC 9110 §15.5.9).
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_answers_carry_retry_after() {
        let r = RequestError::QueueFull {
            queued: 4,
            bound: 4,
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(r.headers().contains_key(header::RETRY_AFTER));
        let r = RequestError::Draining.into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key(header::RETRY_AFTER));
        let r = RequestError::Malformed("x".into()).into_response();
        assert!(!r.headers().contains_key(header::RETRY_AFTER));
    }
}
