//! The listener: health and metrics under the reserved `/-/` prefix (`/-/healthz`,
//! `/-/readyz`, `/-/metrics`; no Endpoint can be called under `/-/`), everything else proxied;
//! and graceful drain: readiness drops, the listener closes after a delay, in-flight requests
//! finish within a bound.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::body::ProxyBody;
use crate::config::Config;
use crate::errors::{Error, Result, json_error};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::table::{TableSettings, TableStore};
use crate::table_source;

/// Liveness: the process serves HTTP.
pub const HEALTHZ_PATH: &str = "/-/healthz";
/// Readiness: a valid table is loaded and the router is not draining.
pub const READYZ_PATH: &str = "/-/readyz";
/// Prometheus metrics.
pub const METRICS_PATH: &str = "/-/metrics";

/// Pause after a failed accept (usually out of file descriptors) instead of spinning.
const ACCEPT_ERROR_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);

/// What every connection shares.
#[derive(Debug)]
pub struct State {
    /// The table being served.
    pub store: Arc<TableStore>,
    /// Router metrics.
    pub metrics: Arc<Metrics>,
    proxy: Proxy,
    draining: AtomicBool,
}

impl State {
    /// Ready once a valid table is loaded, until draining starts.
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && self.store.load().is_some()
    }
}

/// A bound router, not yet serving.
#[derive(Debug)]
pub struct Router {
    /// Address actually bound (useful with port 0).
    pub addr: SocketAddr,
    /// Shared state, for embedders and tests.
    pub state: Arc<State>,
    listener: TcpListener,
    source: JoinHandle<()>,
    config: Config,
}

impl Router {
    /// Binds the listener, loads the table (a valid table file applies before the first
    /// connection) and starts watching its source.
    pub async fn bind(config: Config) -> Result<Self> {
        let metrics = Arc::new(Metrics::new());
        let settings = TableSettings {
            retry_min_per_window: config.retry_min_per_window,
            retry_budget_window: config.retry_budget_window,
        };
        let store = Arc::new(TableStore::new(metrics.clone(), settings));
        let source = match (&config.table, &config.configmap_namespace) {
            (Some(path), _) => {
                let seen = table_source::load_file(&store, path).await;
                table_source::watch_file(store.clone(), path.clone(), config.table_poll, seen)
            }
            (None, Some(ns)) => table_source::watch_configmap(store.clone(), ns).await?,
            (None, None) => {
                return Err(Error::Source(
                    "give --table or --configmap-namespace".to_owned(),
                ));
            }
        };
        let listener = TcpListener::bind((config.host, config.port))
            .await
            .map_err(Error::Listen)?;
        let addr = listener.local_addr().map_err(Error::Listen)?;
        let proxy = Proxy::new(&config, store.clone(), metrics.clone());
        let state = Arc::new(State {
            store,
            metrics,
            proxy,
            draining: AtomicBool::new(false),
        });
        Ok(Self {
            addr,
            state,
            listener,
            source,
            config,
        })
    }

    /// Serves until `shutdown` resolves, then drains.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Router {
            addr,
            state,
            listener,
            source,
            config,
        } = self;
        tracing::info!(%addr, "serval-router listening");
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout);
        let graceful = GracefulShutdown::new();
        let accept = |accepted: std::io::Result<(tokio::net::TcpStream, SocketAddr)>| {
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    return false;
                }
            };
            let _ = stream.set_nodelay(true);
            let state = state.clone();
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(dispatch(&state, req).await) }
            });
            let conn = graceful.watch(
                builder
                    .serve_connection(TokioIo::new(stream), svc)
                    .into_owned(),
            );
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "connection ended with error");
                }
            });
            true
        };
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    if !accept(accepted) {
                        // Usually out of file descriptors: back off instead of spinning.
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    }
                }
                () = &mut shutdown => break,
            }
        }
        // Readiness drops first; connections are still accepted until the load balancer has
        // seen it.
        tracing::info!(delay = ?config.shutdown_delay, "shutting down: readiness off");
        state.draining.store(true, Ordering::Relaxed);
        let mut delay = std::pin::pin!(tokio::time::sleep(config.shutdown_delay));
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    if !accept(accepted) {
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    }
                }
                () = &mut delay => break,
            }
        }
        drop(listener);
        tracing::info!(
            inflight_connections = graceful.count(),
            "listener closed; draining"
        );
        if tokio::time::timeout(config.drain_timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(timeout = ?config.drain_timeout, "drain timed out; closing");
        }
        source.abort();
    }
}

async fn dispatch(state: &State, req: Request<Incoming>) -> Response<ProxyBody> {
    match req.uri().path() {
        HEALTHZ_PATH => text(StatusCode::OK, "ok", "text/plain"),
        READYZ_PATH if state.is_ready() => text(StatusCode::OK, "ready", "text/plain"),
        READYZ_PATH => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no routing table loaded, or draining",
        ),
        METRICS_PATH => text(
            StatusCode::OK,
            state.metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        _ => state.proxy.handle(req).await,
    }
}

fn text(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
