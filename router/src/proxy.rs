//! Forwarding one request: check its head, route, choose a backend, mirror, send with retries
//! under the route's deadline, and answer with the upstream's response tagged with the
//! backend's name. Only what an upstream did wrong (no connection, a broken exchange, a 5xx,
//! no answer in time) counts towards its ejection; a client's mistake never does.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use prometheus_client::metrics::gauge::Gauge;
use serval_idle_poll::IdlePoller;
use tokio::sync::Semaphore;

use crate::body::{ClientBody, FaultCell, OnEnd, ProxyBody, ReadAhead, Tee, discard, read_ahead};
use crate::compose::{Body as ComposedBody, Call};
use crate::config::Config;
use crate::errors::{Error, Result, json_error};
use crate::grpc;
use crate::headers;
use crate::matching::{PathKind, Target, host_of};
use crate::metrics::{
    BackendLabels, CodeLabels, EndpointLabels, ErrorLabels, Metrics, RouteLabels,
};
use crate::mirror::{Mirror, ShadowCopy};
use crate::oip;
use crate::table::{CompiledRoute, CompiledTable, Composition, TableStore};
use crate::upstream::{
    AddrState, BackendPool, HttpClient, InflightGuard, OutlierPolicy, UpstreamBody, grpc_client,
    http_client, shed_window,
};

/// One request counted in `held_requests{backend}` until dropped.
struct Held(Gauge);

impl Held {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Names the backend that answered, on every routed response.
pub const BACKEND_HEADER: &str = "serval-backend";
const BACKEND_HEADER_NAME: HeaderName = HeaderName::from_static(BACKEND_HEADER);
const ENDPOINT_HEADER_NAME: HeaderName =
    HeaderName::from_static(serval_api::routing::ENDPOINT_HEADER);
/// How long a model server has for a request, in milliseconds (the model server's
/// `serval-deadline-ms`).
pub const DEADLINE_HEADER: &str = "serval-deadline-ms";
const DEADLINE_HEADER_NAME: HeaderName = HeaderName::from_static(DEADLINE_HEADER);

/// The proxy of one shard: its own upstream connections, the shared table and metrics.
#[derive(Debug)]
pub struct Proxy {
    store: Arc<TableStore>,
    metrics: Arc<Metrics>,
    client: HttpClient,
    grpc_client: HttpClient,
    outlier: OutlierPolicy,
    max_buffered_body: usize,
    max_body: u64,
    max_held: usize,
    mirror: Mirror,
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
        let grpc_client = grpc_client(config.connect_timeout, config.pool_idle_timeout);
        let outlier = OutlierPolicy {
            after_failures: config.eject_after_failures.max(1),
            duration: config.ejection_duration,
        };
        let mirror = Mirror::new(
            client.clone(),
            grpc_client.clone(),
            metrics.clone(),
            outlier,
            mirror_permits,
            config.mirror_compare_limit,
        );
        Self {
            store,
            metrics,
            client,
            grpc_client,
            outlier,
            max_buffered_body: config.max_buffered_body,
            max_body: config.max_body,
            max_held: config.max_held_requests,
            mirror,
            idle_poll,
        }
    }

    /// Marks an answered request: idle polling keeps a CPU awake for the next one.
    pub(crate) fn answered(&self) {
        if let Some(p) = &self.idle_poll {
            p.touch();
        }
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
        let (mut parts, body) = req.into_parts();
        if let Err(refused) = headers::check_request(parts.version, &mut parts.headers) {
            self.metrics.refused.inc();
            return Error::Refused(refused).into_response();
        }
        if grpc::is_grpc(&parts.headers) {
            return self.grpc(&table, parts, body, start).await;
        }
        let host = parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .map(host_of);
        let found = table.matcher.find(host.as_deref(), parts.uri.path());
        let Some((target, route)) = found.and_then(|t| {
            let route = table.routes.get(t.route)?;
            Some((t, route))
        }) else {
            self.metrics.unmatched.inc();
            return Error::NoRoute(parts.uri.path().to_owned()).into_response();
        };
        if let Some(composition) = &route.composition
            && target.kind == PathKind::Forward
        {
            let (resp, by) = match self
                .composed(&table, route, composition, &target, parts, body, start)
                .await
            {
                Ok((resp, by)) => (resp, by),
                Err(e) => (e.into_response(), None),
            };
            self.count(route, by.as_deref(), resp.status(), start);
            return resp;
        }
        let chosen = match target.kind {
            PathKind::Forward => route.choose(&parts.headers),
            PathKind::ModelMetadata => route.choose_primary(&parts.headers),
            PathKind::ModelReady | PathKind::ServerMetadata | PathKind::Live | PathKind::Ready => {
                return oip::endpoint_answer(&table, route, target.kind);
            }
        };
        let Some(pool) = chosen.cloned() else {
            self.count(route, None, StatusCode::SERVICE_UNAVAILABLE, start);
            return Error::NoReadyBackend(route.endpoint.clone()).into_response();
        };
        let deadline = tokio::time::Instant::from_std(start) + route.timeout;
        let pool = if pool.is_cold() {
            match self.hold(&pool.name, route.timeout, deadline).await {
                Ok(p) => p,
                Err(e) => {
                    let resp = e.into_response();
                    self.count(route, Some(&pool), resp.status(), start);
                    return resp;
                }
            }
        } else {
            pool
        };
        let mut resp = match self
            .forward(route, &target, &pool, parts, body, deadline)
            .await
        {
            Ok(resp) => resp,
            Err(e) => e.into_response(),
        };
        if let Some(v) = &pool.header_value {
            resp.headers_mut().insert(BACKEND_HEADER_NAME, v.clone());
        }
        self.count(route, Some(&pool), resp.status(), start);
        resp
    }

    /// A composed route (cascade, ensemble, sequence): the body read whole (each call may need
    /// it again), then the composition's answer, naming the Backend that gave it when one did.
    #[allow(clippy::too_many_arguments)]
    async fn composed(
        &self,
        table: &CompiledTable,
        route: &CompiledRoute,
        composition: &Composition,
        target: &Target,
        mut parts: Parts,
        body: Incoming,
        start: Instant,
    ) -> Result<(Response<ProxyBody>, Option<Arc<BackendPool>>)> {
        let deadline = tokio::time::Instant::from_std(start) + route.timeout;
        let ReadAhead::Whole(bytes) = self.read_client(route, body, deadline).await? else {
            // Each call may need the body again: it must fit the buffer.
            return Err(Error::Client(crate::body::ClientFault::TooLarge));
        };
        name_endpoint(route, &mut parts.headers);
        let call = Call {
            table,
            route,
            method: &parts.method,
            headers: &parts.headers,
            query: parts.uri.query(),
            deadline,
        };
        let body = ComposedBody {
            bytes,
            path: target.path.clone(),
            made: None,
        };
        let reply = self.compose(call, composition, body).await?;
        let by = reply.by.clone();
        let mut resp = buffered_response(reply.head, reply.bytes, by.as_deref());
        if by.is_none() {
            resp.headers_mut().remove(BACKEND_HEADER_NAME);
        }
        Ok((resp, by))
    }

    /// A gRPC call: the server-wide ones answered here; the model's (infer, metadata,
    /// readiness) routed by the model its message names, through that Endpoint's policy, and
    /// sent on over HTTP/2 with retries under the route's deadline.
    async fn grpc(
        &self,
        table: &CompiledTable,
        mut parts: Parts,
        body: Incoming,
        start: Instant,
    ) -> Response<ProxyBody> {
        use serval_proto as pb;
        let path = parts.uri.path().to_owned();
        let Some(method) = path.strip_prefix(grpc::SERVICE) else {
            return grpc::error(grpc::code::UNIMPLEMENTED, &format!("no service for {path}"));
        };
        match method {
            "ServerLive" => return grpc::answer(&pb::ServerLiveResponse { live: true }),
            "ServerReady" => {
                let ready = table.routes.iter().all(|r| table.ready(r));
                return grpc::answer(&pb::ServerReadyResponse { ready });
            }
            "ServerMetadata" => {
                return grpc::answer(&pb::ServerMetadataResponse {
                    name: oip::SERVER_NAME.to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    extensions: vec!["binary_tensor_data".to_owned()],
                });
            }
            "ModelInfer" | "ModelReady" | "ModelMetadata" => {}
            other => {
                return grpc::error(
                    grpc::code::UNIMPLEMENTED,
                    &format!("{other} is not served: the router serves inference and metadata"),
                );
            }
        }
        // The model is in the message: read it whole (it is retried from the buffer too).
        let read_for = std::time::Duration::from_millis(u64::from(
            serval_api::endpoint::DEFAULT_TIMEOUT_MILLIS,
        ));
        let read = tokio::time::timeout(
            read_for,
            read_ahead(body, self.max_body as usize, self.max_body),
        )
        .await;
        let bytes = match read {
            Ok(Ok(ReadAhead::Whole(b))) => b,
            Ok(Ok(ReadAhead::Partial(..))) | Ok(Err(crate::body::ClientFault::TooLarge)) => {
                return grpc::error(
                    grpc::code::RESOURCE_EXHAUSTED,
                    &format!(
                        "the request is larger than the router's limit of {} bytes",
                        self.max_body
                    ),
                );
            }
            Ok(Err(fault)) => {
                return grpc::error(
                    grpc::code::INVALID_ARGUMENT,
                    &Error::Client(fault).to_string(),
                );
            }
            Err(_) => {
                return grpc::error(
                    grpc::code::DEADLINE_EXCEEDED,
                    "the request was not received in time",
                );
            }
        };
        let name = match grpc::model_name(&bytes) {
            Ok(n) => n,
            Err(why) => return grpc::error(grpc::code::INVALID_ARGUMENT, &why),
        };
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.authority().map(|a| a.as_str()))
            .map(host_of);
        let route = table
            .matcher
            .endpoint(host.as_deref(), &name)
            .and_then(|i| table.routes.get(i));
        if method == "ModelReady" {
            // A model the router does not serve is not ready: a question with an answer.
            let ready = route.is_some_and(|r| table.ready(r));
            return grpc::answer(&pb::ModelReadyResponse { ready });
        }
        let Some(route) = route else {
            self.metrics.unmatched.inc();
            return grpc::error(grpc::code::NOT_FOUND, &format!("model {name:?} not found"));
        };
        if route.composition.is_some() {
            return grpc::error(
                grpc::code::UNIMPLEMENTED,
                &format!(
                    "{name:?} composes models: a cascade, ensemble or sequence answers REST only"
                ),
            );
        }
        let chosen = if method == "ModelMetadata" {
            route.choose_primary(&parts.headers)
        } else {
            route.choose(&parts.headers)
        };
        let Some(pool) = chosen.cloned() else {
            self.count(route, None, StatusCode::SERVICE_UNAVAILABLE, start);
            let e = Error::NoReadyBackend(route.endpoint.clone());
            return grpc::error(grpc::code_of(&e), &e.to_string());
        };
        let deadline = tokio::time::Instant::from_std(start) + route.timeout;
        let pool = if pool.is_cold() {
            match self.hold(&pool.name, route.timeout, deadline).await {
                Ok(p) => p,
                Err(e) => {
                    self.count(route, Some(&pool), e.status(), start);
                    return grpc::error(grpc::code_of(&e), &e.to_string());
                }
            }
        } else {
            pool
        };
        name_endpoint(route, &mut parts.headers);
        // gRPC needs `te: trailers` (a hop-by-hop header the check took out).
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
        // The shadow gets the same call: the model is named in the message, and the endpoint
        // header lets the shadow answer for it.
        let tee = (method == "ModelInfer")
            .then(|| {
                self.launch_mirror(
                    route,
                    &parts.method,
                    &parts.headers,
                    |_| path.clone(),
                    Some(&bytes),
                    true,
                )
            })
            .flatten();
        let sent = match PathAndQuery::try_from(path.as_str()) {
            Ok(p) => {
                self.send(
                    &self.grpc_client,
                    route,
                    &pool,
                    &parts.method,
                    &parts.headers,
                    &p,
                    Outgoing::Buffered(&bytes),
                    deadline,
                )
                .await
            }
            Err(e) => Err(Error::BadRequest(e.to_string())),
        };
        let (resp, inflight) = match sent {
            Ok(answer) => answer,
            Err(e) => {
                self.count(route, Some(&pool), e.status(), start);
                return grpc::error(grpc::code_of(&e), &e.to_string());
            }
        };
        // The call's outcome is its grpc-status: in the head of a trailers-only answer, else
        // in the trailers, counted when they pass.
        let trailers_only = grpc::trailers_only(resp.headers());
        let http_ok = resp.status() == StatusCode::OK;
        // Only answers with a message are compared; a trailers-only one is an error.
        let tee = Tee::for_answer(tee, http_ok && !trailers_only, resp.headers());
        let mut resp = into_proxy_response(resp, inflight, tee);
        if let Some(v) = &pool.header_value {
            resp.headers_mut().insert(BACKEND_HEADER_NAME, v.clone());
        }
        match (http_ok, trailers_only) {
            (false, _) => self.count(route, Some(&pool), resp.status(), start),
            (true, true) => self.count(route, Some(&pool), grpc::outcome(resp.headers()), start),
            (true, false) => {
                let metrics = self.metrics.clone();
                let stats = route.stats_for(&pool).cloned();
                let (endpoint, backend) = (route.endpoint.clone(), pool.name.clone());
                let on_end = OnEnd::new(move |trailers| {
                    let code = grpc::outcome(trailers.unwrap_or(&HeaderMap::new()));
                    record(
                        &metrics,
                        &endpoint,
                        stats.as_ref(),
                        Some(&backend),
                        code,
                        start.elapsed(),
                    );
                });
                resp = resp.map(|b| b.with_on_end(on_end));
            }
        }
        resp
    }

    /// Reads the client's body ahead up to the buffering bound, by the route's deadline.
    /// Reading is the client's part: too slow is a 408, never an upstream's failure.
    async fn read_client(
        &self,
        route: &CompiledRoute,
        body: Incoming,
        deadline: tokio::time::Instant,
    ) -> Result<ReadAhead> {
        let timeout_ms = route.timeout.as_millis() as u64;
        tokio::time::timeout_at(
            deadline,
            read_ahead(body, self.max_buffered_body, self.max_body),
        )
        .await
        .map_err(|_| Error::ClientTimeout { timeout_ms })?
        .map_err(Error::Client)
    }

    /// The HTTP/1 client of REST calls.
    pub(crate) fn http_client(&self) -> &HttpClient {
        &self.client
    }

    /// The largest body read whole from an upstream.
    pub(crate) fn max_body(&self) -> u64 {
        self.max_body
    }

    /// Holds a request for `backend`, scaled to zero, until a table gives it an address (its
    /// first replica is ready), within the bound on held requests and the request's deadline.
    pub(crate) async fn hold(
        &self,
        backend: &str,
        timeout: std::time::Duration,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<BackendPool>> {
        let labels = BackendLabels {
            backend: backend.to_owned(),
        };
        let held = self.metrics.held.get_or_create(&labels).clone();
        if usize::try_from(held.get()).unwrap_or(0) >= self.max_held {
            return Err(Error::HoldFull(backend.to_owned()));
        }
        // Counted from here until this request leaves the hold, whichever way it does.
        let _held = Held::new(held);
        let mut swaps = self.store.subscribe();
        loop {
            if let Some(pool) = self.store.load().and_then(|t| t.pool(backend).cloned())
                && !pool.is_cold()
            {
                if pool.addrs.is_empty() {
                    // No longer scaled to zero, and still no address: not coming.
                    return Err(Error::NoReadyBackend(backend.to_owned()));
                }
                return Ok(pool);
            }
            match tokio::time::timeout_at(deadline, swaps.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    return Err(Error::ColdStart {
                        backend: backend.to_owned(),
                        timeout_ms: timeout.as_millis() as u64,
                    });
                }
            }
        }
    }

    pub(crate) fn count(
        &self,
        route: &CompiledRoute,
        pool: Option<&BackendPool>,
        code: StatusCode,
        start: Instant,
    ) {
        // The series resolved at table load, when the backend is one of the route's.
        let stats = pool.and_then(|p| route.stats_for(p));
        record(
            &self.metrics,
            &route.endpoint,
            stats,
            pool.map(|p| p.name.as_str()),
            code,
            start.elapsed(),
        );
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
        mut parts: Parts,
        body: Incoming,
        deadline: tokio::time::Instant,
    ) -> Result<Response<ProxyBody>> {
        let query = parts.uri.query();
        let rendered = target.path.render(&pool.model, query);
        let path = PathAndQuery::try_from(rendered)
            .map_err(|e| Error::BadRequest(format!("rewritten path: {e}")))?;
        if pool.all_shedding() {
            // Every replica refused work moments ago: refuse here, before the body travels
            // to one that would refuse it too. Read it first so the client reads the answer.
            let _ = tokio::time::timeout_at(deadline, discard(body, self.max_body)).await;
            return Err(Error::Overloaded(pool.name.clone()));
        }
        // Bodies up to the bound are read whole so they can be retried and mirrored; longer
        // ones stream through once.
        let read = self.read_client(route, body, deadline).await?;
        let fault = FaultCell::default();
        let (buffered, stream) = match read {
            ReadAhead::Whole(b) => (Some(b), None),
            ReadAhead::Partial(prefix, rest) => (
                None,
                Some(ClientBody::new(prefix, rest, self.max_body, fault.clone())),
            ),
        };
        name_endpoint(route, &mut parts.headers);
        let tee = self.launch_mirror(
            route,
            &parts.method,
            &parts.headers,
            |model| target.path.render(model, query),
            buffered.as_ref(),
            false,
        );
        let (resp, inflight) = self
            .send(
                &self.client,
                route,
                pool,
                &parts.method,
                &parts.headers,
                &path,
                match (&buffered, stream) {
                    (Some(b), _) => Outgoing::Buffered(b),
                    (None, s) => Outgoing::Streamed(s.map(|s| s.boxed_unsync()), &fault),
                },
                deadline,
            )
            .await?;
        // Only successful answers are compared.
        let tee = Tee::for_answer(tee, resp.status().is_success(), resp.headers());
        Ok(into_proxy_response(resp, inflight, tee))
    }

    /// Sends a request to one of `pool`'s replicas under the route's deadline and retry
    /// policy: a 503 or no answer is sent again (to another replica when there is one) if the
    /// body is buffered and the budget allows; a 429 sheds that replica for its window. The
    /// body is sent as [`Outgoing`] says.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send(
        &self,
        client: &HttpClient,
        route: &CompiledRoute,
        pool: &Arc<BackendPool>,
        method: &Method,
        headers: &HeaderMap,
        path: &PathAndQuery,
        mut body: Outgoing<'_>,
        deadline: tokio::time::Instant,
    ) -> Result<(Response<Incoming>, InflightGuard)> {
        let (buffered, fault) = match &body {
            Outgoing::Buffered(_) => (true, None),
            Outgoing::Streamed(_, fault) => (false, Some(*fault)),
        };
        let timeout_ms = route.timeout.as_millis() as u64;
        route.budget.deposit();
        let mut tried = Vec::new();
        // Retries stay within the backend the policy chose (another replica when it has one),
        // so the split is exactly the configured one whatever fails.
        loop {
            let Some((idx, inflight)) = pool.pick(&tried) else {
                return Err(Error::NoReadyBackend(route.endpoint.clone()));
            };
            tried.push(idx);
            let sent = tried.len() as u32;
            let this = match &mut body {
                Outgoing::Buffered(b) => full_body((*b).clone()),
                Outgoing::Streamed(s, _) => match s.take() {
                    Some(s) => s,
                    // Unreachable: `may_retry` refuses a second attempt of a streamed body.
                    None => return Err(Error::BadRequest("body already sent".to_owned())),
                },
            };
            let addr = &pool.addrs[idx];
            let mut upstream = upstream_request(method, addr, path, headers, this)?;
            propagate_deadline(upstream.headers_mut(), deadline);
            let answer = tokio::time::timeout_at(deadline, client.request(upstream)).await;
            match answer {
                Ok(Ok(resp)) => {
                    // A gRPC error is a trailers-only answer: its outcome is in the head.
                    let status = if grpc::trailers_only(resp.headers()) {
                        grpc::outcome(resp.headers())
                    } else {
                        resp.status()
                    };
                    self.record_answer(route, pool, idx, status.as_u16());
                    if status == StatusCode::TOO_MANY_REQUESTS {
                        addr.refuses_work_for(shed_window(resp.headers()));
                    }
                    if status == StatusCode::SERVICE_UNAVAILABLE
                        && self.may_retry(route, pool, buffered, sent)
                    {
                        continue;
                    }
                    return Ok((resp, inflight));
                }
                Ok(Err(e)) => {
                    // The client's body failed the exchange: its fault, not the replica's.
                    if let Some(f) = fault.and_then(FaultCell::get) {
                        return Err(Error::Client(f));
                    }
                    pool.record_failure(idx, self.outlier, &self.metrics);
                    let connect = e.is_connect();
                    self.upstream_error(route, pool, if connect { "connect" } else { "protocol" });
                    let address = &addr.address;
                    tracing::debug!(backend = %pool.name, %address, error = %e, "upstream failed");
                    // No answer came: a buffered request is sent again (inference has no side
                    // effects; a connect failure never reached the model at all).
                    if self.may_retry(route, pool, buffered, sent) {
                        continue;
                    }
                    let (backend, reason) = (pool.name.clone(), source_chain(&e));
                    return Err(if connect {
                        Error::UpstreamUnreachable { backend, reason }
                    } else {
                        Error::UpstreamProtocol { backend, reason }
                    });
                }
                Err(_) => {
                    // A replica that does not answer in time counts towards its ejection, so
                    // a hung one stops receiving traffic.
                    pool.record_failure(idx, self.outlier, &self.metrics);
                    self.upstream_error(route, pool, "timeout");
                    return Err(Error::Timeout {
                        endpoint: route.endpoint.clone(),
                        timeout_ms,
                    });
                }
            }
        }
    }

    /// Sends a sampled copy of the request to the route's shadow, at the path `path` gives for
    /// the shadow's model; returns the tee the primary's answer must go through.
    fn launch_mirror(
        &self,
        route: &CompiledRoute,
        method: &Method,
        headers: &HeaderMap,
        path: impl FnOnce(&str) -> String,
        body: Option<&Bytes>,
        grpc: bool,
    ) -> Option<Tee> {
        let mirror = route.mirror.as_ref()?;
        let pool = &mirror.pool;
        if rand::random_range(0..100u32) >= mirror.percent {
            return None;
        }
        let Some(body) = body else {
            // A streamed body can be read once only.
            self.mirror.error(&route.endpoint, &pool.name, "streamed");
            return None;
        };
        self.mirror.launch(ShadowCopy {
            endpoint: route.endpoint.clone(),
            pool: pool.clone(),
            compare: mirror.compare.clone(),
            method: method.clone(),
            path: path(&pool.model),
            headers: headers.clone(),
            body: body.clone(),
            timeout: route.timeout,
            grpc,
        })
    }
}

/// Tells the model server which Endpoint the client called, so its answers carry that name.
fn name_endpoint(route: &CompiledRoute, headers: &mut HeaderMap) {
    if let Some(v) = &route.endpoint_header {
        headers.insert(ENDPOINT_HEADER_NAME, v.clone());
    }
}

/// Counts one answer: its route's series (`stats`, when resolved at table load) or the
/// families, and the load signals.
fn record(
    metrics: &Metrics,
    endpoint: &str,
    stats: Option<&crate::table::RouteStats>,
    backend: Option<&str>,
    code: StatusCode,
    took: std::time::Duration,
) {
    let elapsed = took.as_secs_f64();
    if let Some(stats) = stats {
        stats.signals.record(code.as_u16(), took);
        stats.duration.observe(elapsed);
        if code == StatusCode::OK {
            stats.ok.inc();
            return;
        }
    } else {
        metrics
            .request_duration
            .get_or_create(&RouteLabels {
                endpoint: endpoint.to_owned(),
                backend: backend.unwrap_or_default().to_owned(),
            })
            .observe(elapsed);
    }
    metrics
        .requests
        .get_or_create(&CodeLabels {
            endpoint: endpoint.to_owned(),
            backend: backend.unwrap_or_default().to_owned(),
            code: code.as_u16(),
        })
        .inc();
}

/// A buffered upstream body.
pub fn full_body(bytes: Bytes) -> UpstreamBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The request sent to `addr`: same method and headers (already checked and stripped of
/// hop-by-hop ones by [`headers::check_request`]), Host naming the upstream, the rewritten
/// path.
pub fn upstream_request(
    method: &Method,
    addr: &AddrState,
    path_and_query: &PathAndQuery,
    headers: &HeaderMap,
    body: UpstreamBody,
) -> Result<Request<UpstreamBody>> {
    let not_host_port =
        || Error::BadRequest(format!("upstream {:?} is not a host:port", addr.address));
    let host = addr.host_header.clone().ok_or_else(not_host_port)?;
    let uri = addr.uri(path_and_query.clone()).ok_or_else(not_host_port)?;
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    let mut h = headers.clone();
    h.insert(header::HOST, host);
    *req.headers_mut() = h;
    Ok(req)
}

/// Tells the model server how long it has: the time left to the route's deadline, or the
/// client's own `serval-deadline-ms` when shorter. A stage of a composition late in the
/// request gets only what is left, so no model works on an answer nobody waits for.
fn propagate_deadline(headers: &mut HeaderMap, deadline: tokio::time::Instant) {
    let left = deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .as_millis()
        .max(1) as u64;
    let asked = headers
        .get(&DEADLINE_HEADER_NAME)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if asked.is_none_or(|a| a > left) {
        headers.insert(DEADLINE_HEADER_NAME, HeaderValue::from(left));
    }
}

/// How a request's body goes upstream.
pub(crate) enum Outgoing<'a> {
    /// Read whole: sent again on a retry.
    Buffered(&'a Bytes),
    /// Too long to buffer: streamed once (taken by the first attempt), and a failure of the
    /// client's side of it recorded in the cell.
    Streamed(Option<UpstreamBody>, &'a FaultCell),
}

/// A whole answer read for a composition, relayed with the Backend that gave it.
fn buffered_response(
    mut head: http::response::Parts,
    bytes: Bytes,
    pool: Option<&BackendPool>,
) -> Response<ProxyBody> {
    headers::relay_response(&mut head.headers);
    if let Some(v) = pool.and_then(|p| p.header_value.as_ref()) {
        head.headers.insert(BACKEND_HEADER_NAME, v.clone());
    }
    Response::from_parts(head, ProxyBody::full(bytes))
}

fn into_proxy_response(
    resp: Response<Incoming>,
    inflight: InflightGuard,
    tee: Option<Tee>,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    headers::relay_response(&mut parts.headers);
    Response::from_parts(parts, ProxyBody::upstream(body, inflight, tee))
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
