//! Connection shards, the layout the router and the sidecar share (and nginx uses: one event
//! loop per core). One thread accepts; each shard is a thread with its own single-threaded
//! runtime serving the connections dealt to it, so a request is read, handled and answered on
//! one thread, with no work stealing and no wake-up of a second thread.

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

use prometheus_client::registry::{Metric, Registry};
use tokio::net::TcpListener;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Pause after a failed accept, so the loop does not spin.
pub const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);
/// Connections dealt to one shard and not yet taken up; a shard this far behind is skipped.
pub const SHARD_QUEUE: usize = 1024;

/// Deals items round-robin to shards' queues, passing over a full or closed one.
pub struct Dealer<T> {
    shards: Vec<mpsc::Sender<T>>,
    next: usize,
}

impl<T> Dealer<T> {
    /// A dealer over `shards`' queues.
    pub fn new(shards: Vec<mpsc::Sender<T>>) -> Self {
        Self { shards, next: 0 }
    }

    /// Hands `item` to the next shard with room. `Err(item)`: every queue is full or closed.
    pub fn deal(&mut self, mut item: T) -> Result<(), T> {
        for _ in 0..self.shards.len() {
            let to = &self.shards[self.next % self.shards.len()];
            self.next = self.next.wrapping_add(1);
            match to.try_send(item) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(i) | TrySendError::Closed(i)) => item = i,
            }
        }
        Err(item)
    }
}

/// A connection's place under the accept bound; the place frees when this is dropped, so it
/// travels with the connection to the task serving it.
pub type Slot = OwnedSemaphorePermit;

/// How many connections an [`Acceptor`] has open now (for a gauge read at scrape time).
#[derive(Debug, Clone)]
pub struct OpenConnections {
    slots: Arc<Semaphore>,
    max: usize,
}

impl OpenConnections {
    /// Connections accepted and not yet closed.
    pub fn count(&self) -> usize {
        self.max.saturating_sub(self.slots.available_permits())
    }

    /// The bound: at most this many are open at once.
    pub fn max(&self) -> usize {
        self.max
    }
}

/// Registers the connection gauges both servers export, under `registry`'s prefix:
/// `connections` (set from [`OpenConnections::count`] at each scrape) and `max_connections`.
pub fn register_metrics(
    registry: &mut Registry,
    connections: impl Metric,
    max_connections: impl Metric,
) {
    registry.register(
        "connections",
        "Client connections open (at most --max-connections)",
        connections,
    );
    registry.register(
        "max_connections",
        "The bound on open client connections (--max-connections): past it new ones wait in \
         the listen backlog",
        max_connections,
    );
}

/// Accepts connections with at most `max` open at once. At the bound it stops accepting, so
/// new connections wait in the kernel's listen backlog instead of exhausting memory or file
/// descriptors.
pub struct Acceptor {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    max: usize,
}

impl Acceptor {
    /// `max` open connections (at least one).
    pub fn new(listener: TcpListener, max: usize) -> Self {
        let max = max.max(1);
        Self {
            listener,
            slots: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A live count of the connections open.
    pub fn open_connections(&self) -> OpenConnections {
        OpenConnections {
            slots: self.slots.clone(),
            max: self.max,
        }
    }

    /// Waits for a free slot, then for a connection, handed out in non-blocking std form to be
    /// dealt to a shard. A failed accept (usually out of file descriptors) is logged and
    /// retried after [`ACCEPT_BACKOFF`] instead of spinning. Cancel-safe: a slot taken by a
    /// cancelled call is freed.
    pub async fn accept(&self) -> (std::net::TcpStream, Slot) {
        loop {
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                unreachable!("the acceptor never closes its semaphore")
            };
            match self.listener.accept().await.and_then(|(s, _)| s.into_std()) {
                Ok(stream) => return (stream, slot),
                Err(e) => {
                    drop(slot);
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }
}

/// Starts a thread named `name` running `make()` on its own single-threaded runtime until the
/// future completes; the runtime then drops the tasks it still has. The future is made on the
/// thread, so it need not be `Send`.
pub fn spawn<F, Fut>(name: String, make: F) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(name)
        .spawn(move || runtime.block_on(make()))
}

/// Registers a dealt connection, in non-blocking mode (as [`Acceptor::accept`] hands it out),
/// with the calling shard's runtime, with Nagle off (answers are written whole). `None`
/// (logged): the descriptor could not be registered.
pub fn register(stream: std::net::TcpStream) -> Option<tokio::net::TcpStream> {
    let stream = match tokio::net::TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot register connection");
            return None;
        }
    };
    let _ = stream.set_nodelay(true);
    Some(stream)
}

/// Most connections the admin listener serves at once; further ones are closed at once. Probes
/// and scrapes need a handful.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;
/// An admin connection idle this long, or this slow to send a request head, is closed, so
/// idle ones cannot hold every admin slot. Above the common 30 s scrape interval.
pub const ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves `handler` over HTTP/1.1 on `listener`, on the calling runtime, until the returned
/// task is aborted: the admin port for health probes and metrics. It sits outside the traffic
/// port's `--max-connections` bound, so a flood of traffic connections, which makes new ones
/// wait in the listen backlog, cannot fail the kubelet's probes and get a healthy server
/// restarted.
pub fn serve_admin<F, Fut, B>(listener: TcpListener, handler: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let slots = Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!("admin connection bound reached; connection closed");
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(ADMIN_IDLE_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                }
                drop(slot);
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deals_round_robin_and_skips_full_or_closed_shards() {
        let (a, mut ra) = mpsc::channel(1);
        let (b, rb) = mpsc::channel(8);
        let (c, mut rc) = mpsc::channel(8);
        drop(rb);
        let mut dealer = Dealer::new(vec![a, b, c]);
        // a takes 1; b is closed, so 2 goes to c; a is full, so 3 and 4 go to c too.
        for i in 1..=4 {
            assert_eq!(dealer.deal(i), Ok(()));
        }
        assert_eq!(ra.try_recv(), Ok(1));
        assert_eq!(ra.try_recv().ok(), None);
        let to_c: Vec<_> = std::iter::from_fn(|| rc.try_recv().ok()).collect();
        assert_eq!(to_c, [2, 3, 4]);
        drop((ra, rc));
        assert_eq!(
            dealer.deal(5),
            Err(5),
            "every shard gone: the item comes back"
        );
    }

    #[tokio::test]
    async fn the_acceptor_holds_connections_past_the_bound_until_one_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = Acceptor::new(listener, 1);
        let open = acceptor.open_connections();
        assert_eq!(open.count(), 0);
        let _client_a = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (_a, slot) = acceptor.accept().await;
        assert_eq!(open.count(), 1);
        let _client_b = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let waited = tokio::time::timeout(std::time::Duration::from_millis(200), acceptor.accept());
        assert!(waited.await.is_err(), "accepted past the bound of 1");
        drop(slot);
        let accepted = tokio::time::timeout(std::time::Duration::from_secs(20), acceptor.accept());
        assert!(accepted.await.is_ok(), "accepted once the slot is free");
    }

    #[test]
    fn a_shard_serves_a_dealt_connection_on_its_own_thread() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, mut rx) = mpsc::channel::<std::net::TcpStream>(SHARD_QUEUE);
        let shard = spawn("test-shard".into(), move || async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Some(stream) = rx.recv().await {
                let mut conn = register(stream).expect("register");
                let name = std::thread::current().name().unwrap_or("").to_owned();
                let mut byte = [0u8; 1];
                conn.read_exact(&mut byte).await.expect("read");
                conn.write_all(name.as_bytes()).await.expect("write");
            }
        })
        .expect("spawn");
        let mut dealer = Dealer::new(vec![tx]);
        let mut client = std::net::TcpStream::connect(addr).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        accepted.set_nonblocking(true).expect("nonblocking");
        assert!(dealer.deal(accepted).is_ok());
        use std::io::{Read, Write};
        client.write_all(b"x").expect("send");
        let mut answer = String::new();
        client.read_to_string(&mut answer).expect("answer");
        assert_eq!(answer, "test-shard");
        drop(dealer);
        shard
            .join()
            .expect("the shard ends once the dealer is gone");
    }
}
