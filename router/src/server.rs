//! The listener: health, metrics and load signals under the reserved `/-/` prefix
//! (`/-/healthz`, `/-/readyz`, `/-/metrics`, `/-/signals`; no Endpoint can be called under `/-/`), the Open Inference
//! Protocol's server-wide paths ([`crate::oip`]), everything else proxied; every connection is
//! hyper's (HTTP/1.1 and HTTP/2); and graceful drain: readiness drops, the listener closes
//! after a delay, in-flight requests finish within a bound.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serval_idle_poll::IdlePoller;
use serval_shards::{Acceptor, Dealer, Slot};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::body::ProxyBody;
use crate::config::Config;
use crate::errors::{Error, Result, json_error};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::table::{TableSettings, TableStore};
use crate::table_source;
use crate::{headers, matching, oip};

/// Liveness: the process serves HTTP.
pub const HEALTHZ_PATH: &str = "/-/healthz";
/// Readiness: a valid table is loaded and the router is not draining.
pub const READYZ_PATH: &str = "/-/readyz";
/// Prometheus metrics.
pub const METRICS_PATH: &str = "/-/metrics";
/// The router's own paths; never routed to an Endpoint.
pub const RESERVED_PREFIX: &str = "/-/";

/// A connection dealt to a shard, with its slot under `--max-connections`.
type Dealt = (std::net::TcpStream, Slot);

/// Floor on how often a shard's timer driver is woken by its tick, whatever the idle timeout.
const TICK_MIN: std::time::Duration = std::time::Duration::from_millis(100);
/// Ceiling on the same period. The tick keeps each shard's timer driver waking at least this
/// often: tokio wakes the driver (an eventfd write, then an extra `epoll_wait`) whenever a timer
/// is armed earlier than the deadline it last parked on, even from the driver's own thread. With
/// only the pool's 50 s idle timer, a request's 30 s timers were that earlier timer whenever
/// the next expiry was over 30 s away: two wasted syscalls per request, 40 % of the time. For the
/// same reason the period is also kept within the table's shortest route timeout: with a 1 s
/// period, a route timing out after 50 ms cost 0.70 extra writes per request (100 ms: 0.49,
/// 200 ms: 0.09); within it, none.
const TICK_MAX: std::time::Duration = std::time::Duration::from_secs(1);
/// Floor of the period when a route's timeout is shorter than [`TICK_MIN`]: routes with
/// a timeout under this still pay the wake-up, which beats sweeping more often.
const TICK_FLOOR: std::time::Duration = std::time::Duration::from_millis(10);

/// How long a shard waits between ticks: about the pool's idle timeout,
/// within [`TICK_MIN`, `TICK_MAX`], and no longer than the shortest route timeout
/// (not below [`TICK_FLOOR`]), so no request's timeout timer is ever earlier than the
/// deadline the shard's timer driver parked on.
fn tick_period(idle_timeout: Duration, shortest_route_timeout: Option<Duration>) -> Duration {
    let period = idle_timeout.clamp(TICK_MIN, TICK_MAX);
    shortest_route_timeout.map_or(period, |t| period.min(t.max(TICK_FLOOR)))
}

/// What every connection shares.
#[derive(Debug)]
pub struct State {
    /// The table being served.
    pub store: Arc<TableStore>,
    /// Router metrics.
    pub metrics: Arc<Metrics>,
    /// Shadow requests in flight, bounded across every shard.
    mirror_permits: Arc<Semaphore>,
    draining: AtomicBool,
    /// Metrics are served on the admin port only (`--admin-port` given).
    metrics_on_admin: bool,
    /// Keeps a CPU awake briefly after each answer; shared by every shard.
    idle_poll: Option<Arc<IdlePoller>>,
}

impl State {
    /// Ready once a valid table is loaded, until draining starts.
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && self.store.load().is_some()
    }
}

/// What one shard's connections share: the common state and the shard's own proxy, whose
/// upstream connection pool lives (and is driven) on the shard's thread only.
#[derive(Debug)]
struct ShardState {
    state: Arc<State>,
    proxy: Proxy,
}

/// A bound router, not yet serving.
#[derive(Debug)]
pub struct Router {
    /// Address actually bound (useful with port 0).
    pub addr: SocketAddr,
    /// Admin address actually bound, with `--admin-port`.
    pub admin_addr: Option<SocketAddr>,
    /// Shared state, for embedders and tests.
    pub state: Arc<State>,
    listener: TcpListener,
    admin: Option<TcpListener>,
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
        if config
            .admin_port
            .is_some_and(|p| p != 0 && p == config.port)
        {
            return Err(Error::Listen(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "--admin-port must differ from --port",
            )));
        }
        let admin = match config.admin_port {
            Some(port) => Some(
                TcpListener::bind((config.host, port))
                    .await
                    .map_err(Error::Listen)?,
            ),
            None => None,
        };
        let admin_addr = match &admin {
            Some(l) => Some(l.local_addr().map_err(Error::Listen)?),
            None => None,
        };
        let idle_poll = IdlePoller::start(
            Duration::from_micros(config.idle_poll_micros),
            metrics.idle_poll.clone(),
        )
        .map(Arc::new);
        let state = Arc::new(State {
            store,
            metrics,
            mirror_permits: Arc::new(Semaphore::new(config.mirror_concurrency)),
            draining: AtomicBool::new(false),
            metrics_on_admin: admin.is_some(),
            idle_poll,
        });
        Ok(Self {
            addr,
            admin_addr,
            state,
            listener,
            admin,
            source,
            config,
        })
    }

    /// Serves until `shutdown` resolves, then drains.
    ///
    /// Connections are dealt round-robin to `worker_threads` shards (0: one per core). Shard 0
    /// runs on the caller's runtime; each other shard is a thread with its own single-threaded
    /// runtime and upstream pool, so a request is read, forwarded and answered on one thread
    /// without cross-thread wake-ups or work stealing (the layout nginx uses: one event loop
    /// per core).
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Router {
            addr,
            admin_addr,
            state,
            listener,
            admin,
            source,
            config,
        } = self;
        // Health and metrics outside `--max-connections`, answered until the router stops.
        let admin = admin.map(|l| {
            let state = state.clone();
            serval_shards::serve_admin(l, move |req| admin_answer(state.clone(), req))
        });
        let shards = match config.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        tracing::info!(%addr, admin = ?admin_addr, shards, "serval-router listening");
        let mut senders = Vec::with_capacity(shards);
        let mut finished = Vec::with_capacity(shards);
        for i in 0..shards {
            let (tx, rx) = mpsc::channel::<Dealt>(serval_shards::SHARD_QUEUE);
            let (done_tx, done_rx) = oneshot::channel::<()>();
            senders.push(tx);
            finished.push(done_rx);
            let (state, config) = (state.clone(), config.clone());
            let shard = move || run_shard(state, config, rx, done_tx);
            if i == 0 {
                tokio::spawn(shard());
                continue;
            }
            if let Err(e) = serval_shards::spawn(format!("serval-shard-{i}"), shard) {
                tracing::error!(error = %e, "shard thread failed to start");
            }
        }
        let mut dealer = Dealer::new(senders);
        let listener = Acceptor::new(listener, config.max_connections);
        state.metrics.count_connections(listener.open_connections());
        // A shard that failed to start has dropped its receiver: the next is tried.
        let mut accept = |dealt: (std::net::TcpStream, Slot)| {
            if dealer.deal(dealt).is_err() {
                tracing::warn!("every shard is busy or gone; connection dropped");
            }
        };
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                dealt = listener.accept() => accept(dealt),
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
                dealt = listener.accept() => accept(dealt),
                () = &mut delay => break,
            }
        }
        drop(listener);
        // Closing the queues tells every shard to drain its connections and stop.
        drop(dealer);
        tracing::info!("listener closed; draining");
        for done in finished {
            let _ = done.await;
        }
        source.abort();
        if let Some(admin) = admin {
            admin.abort();
        }
    }
}

/// One shard: serves the connections it is dealt until the queue closes, then drains them
/// within the drain timeout.
async fn run_shard(
    state: Arc<State>,
    config: Config,
    mut connections: mpsc::Receiver<Dealt>,
    done: oneshot::Sender<()>,
) {
    let proxy = Proxy::new(
        &config,
        state.store.clone(),
        state.metrics.clone(),
        state.mirror_permits.clone(),
        state.idle_poll.clone(),
    );
    let shard = Arc::new(ShardState { state, proxy });
    let ticked = shard.clone();
    let pool_idle = config.pool_idle_timeout;
    let ticker = tokio::spawn(async move {
        loop {
            // Re-read each time: a reload may bring a shorter route timeout.
            let shortest = ticked
                .state
                .store
                .load()
                .and_then(|t| t.routes.iter().map(|r| r.timeout).min());
            tokio::time::sleep(tick_period(pool_idle, shortest)).await;
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper 1.12 starts this timer as soon as a connection waits for a head, idle or not:
        // the idle bound, so a client's pool is never closed under (see `--idle-timeout`).
        .header_read_timeout(config.idle_timeout)
        // Bounds the request head (431 past it) and each connection's read buffer.
        .max_buf_size(config.max_head_bytes)
        // Inference answers are small: one copy into one buffer and one send() beat a
        // writev() of head and body (see the allocator note in `main.rs`).
        .writev(false);
    let graceful = GracefulShutdown::new();
    while let Some((stream, slot)) = connections.recv().await {
        let Some(stream) = serval_shards::register(stream) else {
            continue;
        };
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let shard = shard.clone();
        tokio::spawn(async move {
            // Held until the connection closes.
            let _slot = slot;
            let svc = service_fn(move |req| {
                let shard = shard.clone();
                async move { Ok::<_, Infallible>(dispatch(&shard, req).await) }
            });
            let io = TokioIo::new(stream);
            let conn = watcher.watch(builder.serve_connection(io, svc).into_owned());
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with error");
            }
        });
    }
    tracing::debug!(inflight_connections = graceful.count(), "shard draining");
    if tokio::time::timeout(config.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?config.drain_timeout, "drain timed out; closing");
    }
    ticker.abort();
    let _ = done.send(());
}

async fn dispatch(shard: &ShardState, req: Request<Incoming>) -> Response<ProxyBody> {
    let state = &shard.state;
    let close = headers::asks_close(req.headers());
    let own = own_path(state, req.uri().path(), false).or_else(|| {
        let kind = matching::server_path(req.uri().path())
            .filter(|_| matches!(*req.method(), Method::GET | Method::HEAD))?;
        let draining = state.draining.load(Ordering::Relaxed);
        Some(oip::server_answer(
            kind,
            state.store.load().as_deref(),
            draining,
        ))
    });
    let mut resp = match own {
        Some(resp) => resp,
        None => shard.proxy.handle(req).await,
    };
    if close {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    shard.proxy.answered();
    resp
}

/// The router's own answer for `path` on the traffic port or (`on_admin`) the admin port, or
/// `None` for a path to route.
fn own_path(state: &State, path: &str, on_admin: bool) -> Option<Response<ProxyBody>> {
    Some(match path {
        HEALTHZ_PATH => text(StatusCode::OK, "ok", "text/plain"),
        READYZ_PATH if state.is_ready() => text(StatusCode::OK, "ready", "text/plain"),
        READYZ_PATH => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no routing table loaded, or draining",
        ),
        // With an admin port, any client of the router could read them here; that port is
        // the pod's own.
        METRICS_PATH if state.metrics_on_admin && !on_admin => json_error(
            StatusCode::NOT_FOUND,
            "/-/metrics is served on the admin port",
        ),
        serval_api::signals::SIGNALS_PATH if state.metrics_on_admin && !on_admin => json_error(
            StatusCode::NOT_FOUND,
            "/-/signals is served on the admin port",
        ),
        serval_api::signals::SIGNALS_PATH => {
            let snapshot = state
                .store
                .load()
                .map(|t| t.signals(&state.metrics))
                .unwrap_or_default();
            text(
                StatusCode::OK,
                serde_json::to_string(&snapshot).unwrap_or_default(),
                "application/json",
            )
        }
        METRICS_PATH => text(
            StatusCode::OK,
            state.metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        _ => return None,
    })
}

/// The admin port (`--admin-port`): the router's own paths only, never a route.
async fn admin_answer(state: Arc<State>, req: Request<Incoming>) -> Response<ProxyBody> {
    own_path(&state, req.uri().path(), true).unwrap_or_else(|| {
        json_error(
            StatusCode::NOT_FOUND,
            "the admin port serves /-/healthz, /-/readyz, /-/metrics and /-/signals only",
        )
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_period_stays_within_the_shortest_route_timeout() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // The pool's 50 s idle timeout alone: the 1 s ceiling.
        assert_eq!(tick_period(s(50), None), s(1));
        assert_eq!(tick_period(s(50), Some(s(30))), s(1));
        // A 250 ms route timeout: every 250 ms, so its timers never precede the parked deadline.
        assert_eq!(tick_period(s(50), Some(ms(250))), ms(250));
        // Not below the floor, however short the route's timeout.
        assert_eq!(tick_period(s(50), Some(ms(1))), TICK_FLOOR);
        // A short idle timeout still sweeps at least every 100 ms...
        assert_eq!(tick_period(ms(20), None), TICK_MIN);
        // ...and more often for a shorter route timeout.
        assert_eq!(tick_period(ms(20), Some(ms(50))), ms(50));
    }
}
