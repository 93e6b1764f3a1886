//! The listener, connections, and the lifecycle of one sidecar: bind at once (liveness works
//! during a long download), load in the background (readiness follows), drain on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use serval_shards::{Acceptor, Dealer, Slot};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::errors::{StartupError, StartupResult};
use crate::state::{AppState, LoadedModel};
use crate::{grpc, handlers};
use http_body_util::Either;

/// Least time given to open connections to close after the drain, even when the drain used
/// the whole shutdown budget: enough to flush the last responses.
pub const DEFAULT_CONNECTION_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Outcome of the model load.
#[derive(Debug, Clone)]
pub enum LoadStatus {
    /// Still fetching or compiling.
    Loading,
    /// Serving.
    Ready,
    /// Failed; the model is never served.
    Failed(Arc<StartupError>),
}

/// A running sidecar.
pub struct Sidecar {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    state: Arc<AppState>,
    shutdown: watch::Sender<bool>,
    status: watch::Receiver<LoadStatus>,
    task: JoinHandle<()>,
}

impl Sidecar {
    /// Binds `config.listen`, starts serving, and starts loading the model.
    pub async fn start(config: Config) -> StartupResult<Self> {
        config.validate()?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartupError::Bind {
                    addr: config.listen.to_string(),
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartupError::Bind {
            addr: config.listen.to_string(),
            source,
        })?;
        let admin = match config.admin_listen {
            Some(at) => {
                let bind_error = |source| StartupError::Bind {
                    addr: at.to_string(),
                    source,
                };
                let l = TcpListener::bind(at).await.map_err(bind_error)?;
                let admin_addr = l.local_addr().map_err(bind_error)?;
                Some((l, admin_addr))
            }
            None => None,
        };
        let admin_addr = admin.as_ref().map(|(_, a)| *a);
        tracing::info!(%addr, admin = ?admin_addr, model = %config.name, "listening");
        let state = Arc::new(AppState::new(config));
        let (status_tx, status) = watch::channel(LoadStatus::Loading);
        let loader = state.clone();
        tokio::spawn(async move {
            let outcome = match loader.load().await {
                Ok(()) => LoadStatus::Ready,
                Err(e) => {
                    tracing::error!(error = %e, "model load failed; it will not be served");
                    LoadStatus::Failed(Arc::new(e))
                }
            };
            let _ = status_tx.send(outcome);
        });
        let io = IoThreads::start(&state)?;
        // Health and metrics outside `--max-connections`; stopped when the server stops.
        let admin = admin.map(|(l, _)| {
            let state = state.clone();
            serval_shards::serve_admin(l, move |req| handlers::admin(state.clone(), req))
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let state_for_serve = state.clone();
        let task = tokio::spawn(async move {
            serve(listener, state_for_serve, io, shutdown_rx).await;
            if let Some(admin) = admin {
                admin.abort();
            }
        });
        Ok(Self {
            addr,
            admin_addr,
            state,
            shutdown,
            status,
            task,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound admin address, when `--admin-port` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Waits until the model is ready, or returns why it never will be.
    pub async fn ready(&self) -> Result<(), Arc<StartupError>> {
        let mut status = self.status.clone();
        loop {
            match &*status.borrow_and_update() {
                LoadStatus::Ready => return Ok(()),
                LoadStatus::Failed(e) => return Err(e.clone()),
                LoadStatus::Loading => {}
            }
            if status.changed().await.is_err() {
                return Err(Arc::new(StartupError::Engine(
                    "model loader stopped".into(),
                )));
            }
        }
    }

    /// The loaded model, for in-process callers (benchmarks, tests).
    pub fn model(&self) -> Option<Arc<LoadedModel>> {
        self.state.model().cloned()
    }

    /// The shared state.
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Starts a graceful shutdown: readiness drops, new requests get 503, in-flight ones finish.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits for the server to stop (after [`Sidecar::shutdown`]).
    pub async fn wait(self) {
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "server task failed");
        }
    }
}

/// A connection handed to an I/O thread, with its place in the graceful shutdown and its slot
/// under `--max-connections` (freed when it closes).
type Dealt = (std::net::TcpStream, Watcher, Slot);

/// The I/O threads (see [`serval_shards`]): each serves the connections it is dealt on its own
/// single-threaded runtime, so a request is read, run (inline, for a small model) and answered
/// on one thread.
struct IoThreads {
    dealer: Dealer<Dealt>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl IoThreads {
    fn start(state: &Arc<AppState>) -> StartupResult<Self> {
        let count = state.config.io_threads;
        let mut senders = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for i in 0..count {
            let (tx, rx) = mpsc::channel::<Dealt>(serval_shards::SHARD_QUEUE);
            let state = state.clone();
            let thread =
                serval_shards::spawn(format!("serval-io-{i}"), move || serve_dealt(state, rx))
                    .map_err(StartupError::Threads)?;
            senders.push(tx);
            threads.push(thread);
        }
        Ok(Self {
            dealer: Dealer::new(senders),
            threads,
        })
    }

    fn deal(&mut self, dealt: Dealt) {
        if self.dealer.deal(dealt).is_err() {
            tracing::warn!("every I/O thread is backed up or gone; connection dropped");
        }
    }

    /// Stops the threads; connections still open are closed.
    async fn stop(self) {
        drop(self.dealer);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                if t.join().is_err() {
                    tracing::error!("an I/O thread panicked");
                }
            }
        })
        .await;
    }
}

/// One I/O thread's loop: serves each dealt connection until the dealer closes, then returns
/// (its runtime then drops the connections left, after the graceful shutdown's bound).
async fn serve_dealt(state: Arc<AppState>, mut dealt: mpsc::Receiver<Dealt>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's header-read timeout also runs while a keep-alive connection waits for its next
    // request, so it is the idle bound as well (`--idle-timeout-secs`).
    let idle = Some(state.config.idle_timeout).filter(|d| !d.is_zero());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle);
    while let Some((stream, watcher, slot)) = dealt.recv().await {
        let Some(stream) = serval_shards::register(stream) else {
            continue;
        };
        let state = state.clone();
        // One port for both protocols: gRPC calls (HTTP/2, `application/grpc`) go to the
        // gRPC service, everything else to the REST handlers.
        let grpc = grpc::service(state.clone());
        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let state = state.clone();
            let mut grpc = grpc.clone();
            async move {
                if grpc::is_grpc(&req) {
                    let resp = tower::Service::call(&mut grpc, req).await?;
                    Ok::<_, std::convert::Infallible>(grpc::size_refusals(resp).map(Either::Right))
                } else {
                    let resp = handlers::handle(state, req).await?;
                    Ok(resp.map(Either::Left))
                }
            }
        });
        let conn = watcher.watch(
            builder
                .serve_connection(TokioIo::new(stream), svc)
                .into_owned(),
        );
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
}

async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    mut io: IoThreads,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let timeout = state.config.shutdown_timeout;
    let min_drain = state.config.drain_delay;
    let drain_state = state.clone();
    // Keep accepting while draining: load balancers send new connections until they see the
    // replica gone. They are served through the drain delay, then answered a clean 503
    // instead of a refused connection, until everything admitted has been answered.
    let drained = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
        tracing::info!("shutdown requested: draining");
        let started = Instant::now();
        let complete = drain_state.drain(min_drain, timeout).await;
        (started, complete)
    };
    tokio::pin!(drained);
    let listener = Acceptor::new(listener, state.config.max_connections);
    state.metrics.count_connections(listener.open_connections());
    let (drain_started, _) = loop {
        tokio::select! {
            done = &mut drained => break done,
            (stream, slot) = listener.accept() => io.deal((stream, graceful.watcher(), slot)),
        }
    };
    drop(listener);
    if let Some(model) = state.model().cloned() {
        model.batcher.close();
        let _ = tokio::task::spawn_blocking(move || model.batcher.join()).await;
    }
    let left = timeout
        .saturating_sub(drain_started.elapsed())
        .max(DEFAULT_CONNECTION_CLOSE_GRACE);
    if tokio::time::timeout(left, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open at the shutdown bound; closing them");
    }
    io.stop().await;
    tracing::info!("stopped");
}
