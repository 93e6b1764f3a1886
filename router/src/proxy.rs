//! Forwarding one request: route, choose a backend, mirror, send with retries under the route's
//! deadline, and answer with the upstream's response tagged with the backend's name.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use serval_idle_poll::IdlePoller;
use tokio::sync::Semaphore;

use crate::body::{ProxyBody, Tee};
use crate::config::Config;
use crate::errors::{Error, Result, json_error};
use crate::express::RawPool;
use crate::matching::{Target, host_of};
use crate::metrics::{CodeLabels, EndpointLabels, ErrorLabels, Metrics, RouteLabels};
use crate::mirror::{Mirror, ShadowCopy};
use crate::pool::Lease;
use crate::table::{CompiledRoute, TableStore};
use crate::upstream::{
    AddrState, BackendPool, HttpClient, OutlierPolicy, UpstreamBody, http_client,
};

/// Names the backend that answered, on every routed response.
pub const BACKEND_HEADER: &str = "serval-backend";
const BACKEND_HEADER_NAME: HeaderName = HeaderName::from_static(BACKEND_HEADER);

/// The proxy: shared by every connection.
#[derive(Debug)]
pub struct Proxy {
    store: Arc<TableStore>,
    metrics: Arc<Metrics>,
    client: HttpClient,
    outlier: OutlierPolicy,
    max_buffered_body: usize,
    mirror: Mirror,
    raw_pool: RawPool,
    idle_poll: Option<Arc<IdlePoller>>,
}

impl Proxy {
    /// A proxy serving whatever table `store` holds, with its own upstream connections;
    /// `mirror_permits` bounds shadow requests in flight across every proxy sharing it.
    pub fn new(
        config: &Config,
        store: Arc<TableStore>,
        metrics: Arc<Metrics>,
        mirror_permits: Arc<Semaphore>,
        idle_poll: Option<Arc<IdlePoller>>,
    ) -> Self {
        let client = http_client(
            config.connect_timeout,
            config.pool_idle_timeout,
            config.pool_max_idle_per_host,
        );
        let outlier = OutlierPolicy {
            after_failures: config.eject_after_failures.max(1),
            duration: config.ejection_duration,
        };
        let mirror = Mirror::new(
            client.clone(),
            metrics.clone(),
            outlier,
            mirror_permits,
            config.mirror_compare_limit,
        );
        let raw_pool = RawPool::new(
            config.connect_timeout,
            config.pool_idle_timeout,
            config.pool_max_idle_per_host,
        );
        Self {
            store,
            metrics,
            client,
            outlier,
            max_buffered_body: config.max_buffered_body,
            mirror,
            raw_pool,
            idle_poll,
        }
    }

    /// Marks an answered request: idle polling keeps a CPU awake for the next one.
    pub(crate) fn answered(&self) {
        if let Some(p) = &self.idle_poll {
            p.touch();
        }
    }

    /// This proxy's upstream connections.
    pub fn client(&self) -> &HttpClient {
        &self.client
    }

    /// This proxy's upstream connections for the express lane.
    pub fn raw_pool(&self) -> &RawPool {
        &self.raw_pool
    }

    pub(crate) fn store(&self) -> &TableStore {
        &self.store
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn outlier(&self) -> OutlierPolicy {
        self.outlier
    }

    pub(crate) fn max_buffered_body(&self) -> usize {
        self.max_buffered_body
    }

    /// Routes and forwards one request; never fails, errors become JSON responses.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let start = Instant::now();
        // One snapshot for the whole request: a concurrent reload cannot mix two tables.
        let Some(table) = self.store.load() else {
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no routing table loaded yet",
            );
        };
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .map(host_of);
        let found = table.matcher.find(host.as_deref(), req.uri().path());
        let Some((target, route)) = found.and_then(|t| {
            let route = table.routes.get(t.route)?;
            Some((t, route))
        }) else {
            self.metrics.unmatched.inc();
            return Error::NoRoute(req.uri().path().to_owned()).into_response();
        };
        let Some(pool) = route.choose(req.headers()).cloned() else {
            self.count(route, None, StatusCode::SERVICE_UNAVAILABLE, start);
            return Error::NoReadyBackend(route.endpoint.clone()).into_response();
        };
        let forwarded =
            tokio::time::timeout(route.timeout, self.forward(route, &target, &pool, req));
        let mut resp = match forwarded.await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => e.into_response(),
            Err(_) => {
                self.upstream_error(route, &pool, "timeout");
                let timeout_ms = route.timeout.as_millis() as u64;
                Error::Timeout {
                    endpoint: route.endpoint.clone(),
                    timeout_ms,
                }
                .into_response()
            }
        };
        if let Some(v) = &pool.header_value {
            resp.headers_mut().insert(BACKEND_HEADER_NAME, v.clone());
        }
        self.count(route, Some(&pool), resp.status(), start);
        resp
    }

    pub(crate) fn count(
        &self,
        route: &CompiledRoute,
        pool: Option<&BackendPool>,
        code: StatusCode,
        start: Instant,
    ) {
        let elapsed = start.elapsed().as_secs_f64();
        // The series resolved at table load, when the backend is one of the route's.
        if let Some(stats) = pool.and_then(|p| route.stats_for(p)) {
            stats.duration.observe(elapsed);
            if code == StatusCode::OK {
                stats.ok.inc();
                return;
            }
        } else {
            self.metrics
                .request_duration
                .get_or_create(&RouteLabels {
                    endpoint: route.endpoint.clone(),
                    backend: pool.map(|p| p.name.clone()).unwrap_or_default(),
                })
                .observe(elapsed);
        }
        let endpoint = route.endpoint.clone();
        let backend = pool.map(|p| p.name.clone()).unwrap_or_default();
        self.metrics
            .requests
            .get_or_create(&CodeLabels {
                endpoint,
                backend,
                code: code.as_u16(),
            })
            .inc();
    }

    pub(crate) fn upstream_error(
        &self,
        route: &CompiledRoute,
        pool: &BackendPool,
        kind: &'static str,
    ) {
        let labels = ErrorLabels {
            endpoint: route.endpoint.clone(),
            backend: pool.name.clone(),
            kind,
        };
        self.metrics.upstream_errors.get_or_create(&labels).inc();
    }

    /// Accounts an upstream's answer: a 5xx counts towards ejection and as an upstream
    /// error (`status_503` or `status_5xx`), anything else resets the address's streak.
    pub(crate) fn record_answer(
        &self,
        route: &CompiledRoute,
        pool: &BackendPool,
        idx: usize,
        status: u16,
    ) {
        if status >= 500 {
            pool.record_failure(idx, self.outlier, &self.metrics);
            let kind = if status == 503 {
                "status_503"
            } else {
                "status_5xx"
            };
            self.upstream_error(route, pool, kind);
        } else {
            pool.record_success(idx);
        }
    }

    /// Whether another attempt may be sent: bounded body, attempts left, budget left.
    pub(crate) fn may_retry(
        &self,
        route: &CompiledRoute,
        pool: &BackendPool,
        bounded: bool,
        sent: u32,
    ) -> bool {
        if !bounded || sent > route.retry_attempts {
            return false;
        }
        if !route.budget.withdraw() {
            let labels = EndpointLabels {
                endpoint: route.endpoint.clone(),
            };
            self.metrics
                .retry_budget_exhausted
                .get_or_create(&labels)
                .inc();
            return false;
        }
        let labels = RouteLabels {
            endpoint: route.endpoint.clone(),
            backend: pool.name.clone(),
        };
        self.metrics.retries.get_or_create(&labels).inc();
        true
    }

    async fn forward(
        &self,
        route: &CompiledRoute,
        target: &Target,
        pool: &Arc<BackendPool>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>> {
        let (parts, body) = req.into_parts();
        let query = parts.uri.query();
        let rendered = target.path.render(&pool.model, query);
        let path = PathAndQuery::try_from(rendered)
            .map_err(|e| Error::BadRequest(format!("rewritten path: {e}")))?;
        // Sized bodies under the cap are buffered so they can be retried and mirrored; the
        // rest stream through once.
        let bounded = body
            .size_hint()
            .upper()
            .is_some_and(|n| n <= self.max_buffered_body as u64);
        let (buffered, mut stream) = if bounded {
            let bytes = body
                .collect()
                .await
                .map_err(|e| Error::RequestBody(e.to_string()))?;
            (Some(bytes.to_bytes()), None)
        } else {
            (None, Some(body))
        };
        let mut tee = self.launch_mirror(
            route,
            target,
            &parts.method,
            &parts.headers,
            query,
            &buffered,
        );
        route.budget.deposit();
        let mut tried = Vec::new();
        loop {
            let Some((idx, inflight)) = pool.pick(&tried) else {
                return Err(Error::NoReadyBackend(route.endpoint.clone()));
            };
            tried.push(idx);
            let sent = tried.len() as u32;
            let body = match (&buffered, stream.take()) {
                (Some(b), _) => full_body(b.clone()),
                (None, Some(s)) => s.map_err(Into::into).boxed_unsync(),
                // Unreachable: a streamed body is never retried.
                (None, None) => return Err(Error::RequestBody("body already sent".to_owned())),
            };
            let addr = &pool.addrs[idx];
            let address = &addr.address;
            let upstream = upstream_request(&parts.method, addr, &path, &parts.headers, body)?;
            match self.client.request(addr, upstream).await {
                Ok((resp, lease)) => {
                    let status = resp.status();
                    self.record_answer(route, pool, idx, status.as_u16());
                    if status == StatusCode::SERVICE_UNAVAILABLE
                        && self.may_retry(route, pool, buffered.is_some(), sent)
                    {
                        continue;
                    }
                    // Only successful answers are compared; dropping the tee reports `error`.
                    let tee = if status.is_success() {
                        tee.take()
                    } else {
                        None
                    };
                    return Ok(into_proxy_response(resp, inflight, lease, tee));
                }
                Err(e) => {
                    pool.record_failure(idx, self.outlier, &self.metrics);
                    let connect = e.is_connect();
                    self.upstream_error(route, pool, if connect { "connect" } else { "protocol" });
                    tracing::debug!(backend = %pool.name, %address, error = %e, "upstream failed");
                    if connect && self.may_retry(route, pool, buffered.is_some(), sent) {
                        continue;
                    }
                    let (backend, reason) = (pool.name.clone(), source_chain(&e));
                    return Err(if connect {
                        Error::UpstreamUnreachable { backend, reason }
                    } else {
                        Error::UpstreamProtocol { backend, reason }
                    });
                }
            }
        }
    }

    fn launch_mirror(
        &self,
        route: &CompiledRoute,
        target: &Target,
        method: &Method,
        headers: &HeaderMap,
        query: Option<&str>,
        body: &Option<Bytes>,
    ) -> Option<Tee> {
        let (pool, percent) = route.mirror.as_ref()?;
        if rand::random_range(0..100u32) >= *percent {
            return None;
        }
        let Some(body) = body else {
            // A streamed body can be read once only.
            self.mirror.count(&route.endpoint, &pool.name, "dropped");
            return None;
        };
        self.mirror.launch(ShadowCopy {
            endpoint: route.endpoint.clone(),
            pool: pool.clone(),
            method: method.clone(),
            path: target.path.render(&pool.model, query),
            headers: headers.clone(),
            body: body.clone(),
            timeout: route.timeout,
        })
    }
}

/// A buffered upstream body.
pub fn full_body(bytes: Bytes) -> UpstreamBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Headers that describe one connection, not the message; never forwarded, on the hyper path
/// and the express lane alike (see [`is_hop_by_hop`]).
pub(crate) const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Whether a raw header name is one of [`HOP_BY_HOP`], for the express lane's parsed heads.
pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_str().as_bytes()))
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names is cheaper than a hashed
    // removal per name. Any listed header needs a Connection header, which this pass sees.
    if !headers
        .keys()
        .any(|n| n == header::TRANSFER_ENCODING || HOP_BY_HOP.contains(n))
    {
        return;
    }
    // Headers the Connection header lists are hop-by-hop too.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for h in HOP_BY_HOP.iter().chain(&listed) {
        headers.remove(h);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

/// The request sent to `addr`: same method and headers (minus hop-by-hop), Host naming the
/// upstream, the rewritten path in origin form (the pool connects to `addr` itself).
pub fn upstream_request(
    method: &Method,
    addr: &AddrState,
    path_and_query: &PathAndQuery,
    headers: &HeaderMap,
    body: UpstreamBody,
) -> Result<Request<UpstreamBody>> {
    let host = addr.host_header.clone().ok_or_else(|| {
        Error::BadRequest(format!("upstream {:?} is not a host:port", addr.address))
    })?;
    let uri = Uri::from(path_and_query.clone());
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    let mut h = headers.clone();
    strip_hop_by_hop(&mut h);
    h.insert(header::HOST, host);
    *req.headers_mut() = h;
    Ok(req)
}

fn into_proxy_response(
    resp: Response<Incoming>,
    inflight: crate::upstream::InflightGuard,
    lease: Lease,
    tee: Option<Tee>,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, ProxyBody::upstream(body, inflight, lease, tee))
}

/// An error with its causes, e.g. "client error (Connect): tcp connect error: refused".
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
