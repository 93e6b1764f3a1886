//! Shadow traffic: a copy of a sampled request goes to the mirror backend in its own task,
//! bounded by a semaphore (over the bound a copy is dropped, never queued), and the shadow's
//! answer is compared with the primary's, row by row, once both are in. Rows that agree and
//! disagree are counted in `mirror_agreement`; a pair that could not be compared is counted in
//! `mirror_errors` with its reason (never as a disagreement) and logged, at most once a second.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method};
use serval_api::MirrorCompare;
use tokio::sync::{Semaphore, oneshot};

use crate::agreement::{self, Answer};
use crate::body::{PrimaryAnswer, Tee, collect_limited};
use crate::grpc;
use crate::metrics::{Metrics, MirrorErrorLabels, MirrorLabels};
use http_body_util::BodyExt;

/// Least time between two log lines about mirror errors: a shadow failing every request must
/// not flood the log; the metric counts them all.
pub const MIRROR_LOG_INTERVAL: Duration = Duration::from_secs(1);
use crate::proxy::{full_body, upstream_request};
use crate::upstream::{BackendPool, HttpClient, OutlierPolicy};

/// A request copy for the shadow backend.
#[derive(Debug)]
pub struct ShadowCopy {
    /// Endpoint being mirrored.
    pub endpoint: String,
    /// Shadow backend.
    pub pool: Arc<BackendPool>,
    /// How answers are compared.
    pub compare: Arc<MirrorCompare>,
    /// Request method.
    pub method: Method,
    /// Path and query, naming the shadow's model.
    pub path: String,
    /// Request headers.
    pub headers: HeaderMap,
    /// The buffered request body.
    pub body: Bytes,
    /// How long to wait for the shadow, and then for the primary's answer.
    pub timeout: Duration,
    /// A gRPC call: sent over HTTP/2, its outcome read from `grpc-status`.
    pub grpc: bool,
}

/// Launches shadow requests.
#[derive(Debug, Clone)]
pub struct Mirror {
    client: HttpClient,
    grpc_client: HttpClient,
    metrics: Arc<Metrics>,
    outlier: OutlierPolicy,
    permits: Arc<Semaphore>,
    compare_limit: usize,
    /// When an error was last logged, in ms since `epoch`.
    last_log: Arc<AtomicU64>,
    epoch: Instant,
}

/// A shadow's answer, whole.
struct Captured {
    content_type: Option<String>,
    header_length: Option<usize>,
    body: Bytes,
}

/// How one mirrored request ended.
enum Outcome {
    Rows(agreement::Rows),
    Error(&'static str, String),
}

/// Marks shadow requests so model servers and logs can tell them apart.
pub const SHADOW_HEADER: &str = "serval-shadow";

impl Mirror {
    /// A mirror with at most as many shadows in flight as `permits` holds; the permits are
    /// shared by every shard, so the bound is the process's. `grpc_client` sends gRPC calls.
    pub fn new(
        client: HttpClient,
        grpc_client: HttpClient,
        metrics: Arc<Metrics>,
        outlier: OutlierPolicy,
        permits: Arc<Semaphore>,
        compare_limit: usize,
    ) -> Self {
        Self {
            client,
            grpc_client,
            metrics,
            outlier,
            permits,
            compare_limit,
            last_log: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
        }
    }

    /// Counts a mirrored request that could not be compared, for `reason`.
    pub fn error(&self, endpoint: &str, backend: &str, reason: &'static str) {
        self.metrics
            .mirror_errors
            .get_or_create(&MirrorErrorLabels {
                endpoint: endpoint.to_owned(),
                backend: backend.to_owned(),
                reason,
            })
            .inc();
    }

    fn rows(&self, endpoint: &str, backend: &str, rows: agreement::Rows) {
        for (result, n) in [("agree", rows.agree), ("disagree", rows.disagree)] {
            if n > 0 {
                self.metrics
                    .mirror
                    .get_or_create(&MirrorLabels {
                        endpoint: endpoint.to_owned(),
                        backend: backend.to_owned(),
                        result,
                    })
                    .inc_by(n);
            }
        }
    }

    /// Whether an error may be logged now (at most one per [`MIRROR_LOG_INTERVAL`]).
    fn may_log(&self) -> bool {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let interval = u64::try_from(MIRROR_LOG_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        let last = self.last_log.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= interval)
            && self
                .last_log
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Starts the shadow request; returns the tee that must capture the primary's answer, or
    /// `None` when the copy was dropped for lack of capacity.
    pub fn launch(&self, copy: ShadowCopy) -> Option<Tee> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.error(&copy.endpoint, &copy.pool.name, "dropped");
            return None;
        };
        let (tx, rx) = oneshot::channel();
        let this = self.clone();
        tokio::spawn(async move {
            let outcome = this.run(&copy, rx).await;
            drop(permit);
            let (endpoint, shadow) = (&copy.endpoint, &copy.pool.name);
            match outcome {
                Outcome::Rows(rows) => {
                    tracing::debug!(%endpoint, %shadow, ?rows, "mirror compared");
                    this.rows(endpoint, shadow, rows);
                }
                Outcome::Error(reason, message) => {
                    if this.may_log() {
                        tracing::warn!(%endpoint, %shadow, reason, %message, "mirrored request not compared");
                    }
                    this.error(endpoint, shadow, reason);
                }
            }
        });
        Some(Tee::new(self.compare_limit, tx))
    }

    async fn run(&self, copy: &ShadowCopy, primary: oneshot::Receiver<PrimaryAnswer>) -> Outcome {
        let shadow = match tokio::time::timeout(copy.timeout, self.send(copy)).await {
            Ok(Ok(b)) => b,
            Ok(Err((reason, message))) => return Outcome::Error(reason, message),
            Err(_) => {
                let message = format!("no answer within {:?}", copy.timeout);
                return Outcome::Error("shadow_timeout", message);
            }
        };
        let (content_type, header_length, body) = match tokio::time::timeout(copy.timeout, primary)
            .await
        {
            Ok(Ok(PrimaryAnswer::Body {
                content_type,
                header_length,
                body,
            })) => (content_type, header_length, body),
            Ok(Ok(PrimaryAnswer::Failed(reason))) => {
                return Outcome::Error(reason, "the primary's answer".to_owned());
            }
            Ok(Err(_)) => {
                return Outcome::Error("primary_failed", "the primary's answer".to_owned());
            }
            Err(_) => {
                let message = format!("the primary's body did not end within {:?}", copy.timeout);
                return Outcome::Error("primary_timeout", message);
            }
        };
        let primary = Answer {
            content_type: content_type.as_deref(),
            header_length,
            body: &body,
        };
        let shadow = Answer {
            content_type: shadow.content_type.as_deref(),
            header_length: shadow.header_length,
            body: &shadow.body,
        };
        match agreement::compare(&copy.compare, &primary, &shadow) {
            Ok(rows) => Outcome::Rows(rows),
            Err(u) => Outcome::Error(u.reason, u.message),
        }
    }

    async fn send(&self, copy: &ShadowCopy) -> Result<Captured, (&'static str, String)> {
        let unreachable = |m: String| ("shadow_unreachable", m);
        let (idx, _inflight) = copy
            .pool
            .pick(&[])
            .ok_or_else(|| unreachable("the shadow backend has no address".to_owned()))?;
        let path = http::uri::PathAndQuery::try_from(copy.path.as_str())
            .map_err(|e| unreachable(e.to_string()))?;
        let mut req = upstream_request(
            &copy.method,
            &copy.pool.addrs[idx],
            &path,
            &copy.headers,
            full_body(copy.body.clone()),
        )
        .map_err(|e| unreachable(e.to_string()))?;
        req.headers_mut()
            .insert(SHADOW_HEADER, http::HeaderValue::from_static("1"));
        let client = if copy.grpc {
            &self.grpc_client
        } else {
            &self.client
        };
        let resp = match client.request(req).await {
            Ok(resp) => resp,
            Err(e) => {
                copy.pool.record_failure(idx, self.outlier, &self.metrics);
                return Err(unreachable(e.to_string()));
            }
        };
        let status = resp.status();
        if !status.is_success() {
            if status.is_server_error() {
                copy.pool.record_failure(idx, self.outlier, &self.metrics);
            }
            // The shadow's own words: a preprocess mismatch says what it refused.
            let body = collect_limited(resp.into_body(), 1024)
                .await
                .unwrap_or_default();
            return Err((
                "shadow_status",
                format!("{status}: {}", String::from_utf8_lossy(&body)),
            ));
        }
        let text = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok());
        let content_type = text("content-type").map(str::to_owned);
        let header_length = text(agreement::HEADER_LENGTH).and_then(|v| v.parse().ok());
        let head = resp.headers().clone();
        let Ok(collected) = http_body_util::Limited::new(resp.into_body(), self.compare_limit)
            .collect()
            .await
        else {
            return Err((
                "shadow_too_large",
                format!("cut short or larger than {} bytes", self.compare_limit),
            ));
        };
        if copy.grpc {
            // The outcome is in the trailers, or in the head of a trailers-only answer.
            let outcome = collected.trailers().unwrap_or(&head);
            let counted = grpc::outcome(outcome);
            if counted != http::StatusCode::OK {
                if counted.is_server_error() {
                    copy.pool.record_failure(idx, self.outlier, &self.metrics);
                }
                let words = |name| outcome.get(name).and_then(|v| v.to_str().ok());
                return Err((
                    "shadow_status",
                    format!(
                        "grpc-status {}: {}",
                        words("grpc-status").unwrap_or("missing"),
                        words("grpc-message").unwrap_or_default()
                    ),
                ));
            }
        }
        copy.pool.record_success(idx);
        Ok(Captured {
            content_type,
            header_length,
            body: collected.to_bytes(),
        })
    }
}

/// Reasons of `mirror_errors` that are the shadow's failure (they count against a canary in
/// its `Shadow` step); the others are the primary's or the router's.
pub const SHADOW_FAILURES: [&str; 5] = [
    "shadow_status",
    "shadow_unreachable",
    "shadow_timeout",
    "shadow_too_large",
    "shadow_unreadable",
];

/// Every reason of `mirror_errors`.
pub const ERROR_REASONS: [&str; 13] = [
    "shadow_status",
    "shadow_unreachable",
    "shadow_timeout",
    "shadow_too_large",
    "shadow_unreadable",
    "primary_status",
    "primary_failed",
    "primary_timeout",
    "primary_too_large",
    "primary_unreadable",
    "mismatch",
    "dropped",
    "streamed",
];

/// The mirror counters of `endpoint` to `shadow`, as the load signals have them.
pub fn signals(
    metrics: &Metrics,
    endpoint: &str,
    shadow: &str,
) -> serval_api::signals::MirrorSignals {
    let rows = |result| {
        metrics
            .mirror
            .get_or_create(&MirrorLabels {
                endpoint: endpoint.to_owned(),
                backend: shadow.to_owned(),
                result,
            })
            .get()
    };
    let mut out = serval_api::signals::MirrorSignals {
        endpoint: endpoint.to_owned(),
        backend: shadow.to_owned(),
        agree: rows("agree"),
        disagree: rows("disagree"),
        ..Default::default()
    };
    for reason in ERROR_REASONS {
        let n = metrics
            .mirror_errors
            .get_or_create(&MirrorErrorLabels {
                endpoint: endpoint.to_owned(),
                backend: shadow.to_owned(),
                reason,
            })
            .get();
        if SHADOW_FAILURES.contains(&reason) {
            out.shadow_errors += n;
        } else {
            out.other_errors += n;
        }
    }
    out
}
