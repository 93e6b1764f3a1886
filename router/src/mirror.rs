//! Shadow traffic: a copy of a sampled request goes to the mirror backend in its own task,
//! bounded by a semaphore (over the bound a copy is dropped, never queued), and the shadow's
//! answer is compared with the primary's once both are in.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method};
use tokio::sync::{Semaphore, oneshot};

use crate::agreement;
use crate::body::{Tee, collect_limited};
use crate::metrics::{Metrics, MirrorLabels};
use crate::proxy::{full_body, upstream_request};
use crate::upstream::{BackendPool, HttpClient, OutlierPolicy};

/// A request copy for the shadow backend.
#[derive(Debug)]
pub struct ShadowCopy {
    /// Endpoint being mirrored.
    pub endpoint: String,
    /// Shadow backend.
    pub pool: Arc<BackendPool>,
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
}

/// Launches shadow requests.
#[derive(Debug, Clone)]
pub struct Mirror {
    client: HttpClient,
    metrics: Arc<Metrics>,
    outlier: OutlierPolicy,
    permits: Arc<Semaphore>,
    compare_limit: usize,
}

/// Marks shadow requests so model servers and logs can tell them apart.
pub const SHADOW_HEADER: &str = "serval-shadow";

impl Mirror {
    /// A mirror with at most as many shadows in flight as `permits` holds; the permits are
    /// shared by every shard, so the bound is the process's.
    pub fn new(
        client: HttpClient,
        metrics: Arc<Metrics>,
        outlier: OutlierPolicy,
        permits: Arc<Semaphore>,
        compare_limit: usize,
    ) -> Self {
        Self {
            client,
            metrics,
            outlier,
            permits,
            compare_limit,
        }
    }

    /// Counts one mirror outcome.
    pub fn count(&self, endpoint: &str, backend: &str, result: &'static str) {
        self.metrics
            .mirror
            .get_or_create(&MirrorLabels {
                endpoint: endpoint.to_owned(),
                backend: backend.to_owned(),
                result,
            })
            .inc();
    }

    /// Starts the shadow request; returns the tee that must capture the primary's answer, or
    /// `None` when the copy was dropped for lack of capacity.
    pub fn launch(&self, copy: ShadowCopy) -> Option<Tee> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.count(&copy.endpoint, &copy.pool.name, "dropped");
            return None;
        };
        let (tx, rx) = oneshot::channel();
        let this = self.clone();
        tokio::spawn(async move {
            let result = this.run(&copy, rx).await;
            drop(permit);
            tracing::debug!(endpoint = %copy.endpoint, shadow = %copy.pool.name, result, "mirror");
            this.count(&copy.endpoint, &copy.pool.name, result);
        });
        Some(Tee::new(self.compare_limit, tx))
    }

    async fn run(
        &self,
        copy: &ShadowCopy,
        primary: oneshot::Receiver<Option<Bytes>>,
    ) -> &'static str {
        let shadow = match tokio::time::timeout(copy.timeout, self.send(copy)).await {
            Ok(Some(b)) => b,
            _ => return "error",
        };
        match tokio::time::timeout(copy.timeout, primary).await {
            Ok(Ok(Some(p))) => agreement::compare(&p, &shadow).as_str(),
            _ => "error",
        }
    }

    async fn send(&self, copy: &ShadowCopy) -> Option<Bytes> {
        let (idx, _inflight) = copy.pool.pick(&[])?;
        let path = http::uri::PathAndQuery::try_from(copy.path.as_str()).ok()?;
        let mut req = upstream_request(
            &copy.method,
            &copy.pool.addrs[idx],
            &path,
            &copy.headers,
            full_body(copy.body.clone()),
        )
        .ok()?;
        req.headers_mut()
            .insert(SHADOW_HEADER, http::HeaderValue::from_static("1"));
        match self.client.request(req).await {
            Ok(resp) if resp.status().is_success() => {
                copy.pool.record_success(idx);
                collect_limited(resp.into_body(), self.compare_limit).await
            }
            Ok(resp) => {
                if resp.status().is_server_error() {
                    copy.pool.record_failure(idx, self.outlier, &self.metrics);
                }
                None
            }
            Err(_) => {
                copy.pool.record_failure(idx, self.outlier, &self.metrics);
                None
            }
        }
    }
}
