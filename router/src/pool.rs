//! Keep-alive HTTP/1 connections to upstream addresses, one pool per shard.
//!
//! A request takes an idle connection of its address (the most recently used, whose socket
//! is warmest) or opens one; the connection comes back when the response body has been read
//! to its end, so the next request reuses it. Everything happens on the shard's thread: no
//! checkout task, no per-request spawn, no lock another thread contends for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::upstream::{AddrState, UpstreamBody};

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection could be made (refused, unreachable, timed out).
    #[error("tcp connect error")]
    Connect(#[source] std::io::Error),
    /// A connection was made but the exchange failed.
    #[error("upstream exchange failed")]
    Protocol(#[source] hyper::Error),
}

impl ClientError {
    /// Whether the request never reached an upstream connection, so it is safe to retry.
    pub fn is_connect(&self) -> bool {
        matches!(self, ClientError::Connect(_))
    }
}

struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

/// A shard's upstream connections, by address.
pub struct UpstreamClient {
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_address: usize,
    idle: Mutex<HashMap<String, Vec<Idle>>>,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_idle_per_address", &self.max_idle_per_address)
            .finish_non_exhaustive()
    }
}

/// A connection in use; [`Lease::release`] hands it back once its response has ended.
pub struct Lease {
    sender: SendRequest<UpstreamBody>,
    addr: Arc<AddrState>,
    client: Arc<UpstreamClient>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("address", &self.addr.address)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Returns the connection to the pool; called when the response body has ended. (A
    /// lease dropped without release closes its connection: the response was cut short.)
    pub fn release(self) {
        self.client.put(&self.addr.address, self.sender);
    }
}

impl UpstreamClient {
    /// An empty pool.
    pub fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle_per_address: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            connect_timeout,
            idle_timeout,
            max_idle_per_address,
            idle: Mutex::new(HashMap::new()),
        })
    }

    /// Closes connections idle past the timeout and forgets closed ones; run periodically so
    /// an address that left the table does not keep its sockets open.
    pub fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        idle.retain(|_, conns| {
            conns.retain(|c| {
                !c.sender.is_closed() && now.duration_since(c.since) < self.idle_timeout
            });
            !conns.is_empty()
        });
    }

    /// How long a connection may sit idle.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    fn take(&self, address: &str) -> Option<SendRequest<UpstreamBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.get_mut(address)?;
        while let Some(c) = conns.pop() {
            if !c.sender.is_closed() && c.since.elapsed() < self.idle_timeout {
                return Some(c.sender);
            }
        }
        None
    }

    fn put(&self, address: &str, sender: SendRequest<UpstreamBody>) {
        if sender.is_closed() || self.max_idle_per_address == 0 {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if !idle.contains_key(address) {
            idle.insert(address.to_owned(), Vec::new());
        }
        let Some(conns) = idle.get_mut(address) else {
            return;
        };
        // The oldest sit at the front: drop those past the idle timeout or over the bound.
        let now = Instant::now();
        let stale = conns
            .iter()
            .take_while(|c| now.duration_since(c.since) >= self.idle_timeout)
            .count();
        let over = (conns.len() - stale + 1).saturating_sub(self.max_idle_per_address);
        conns.drain(..stale + over);
        conns.push(Idle { sender, since: now });
    }

    async fn connect(&self, addr: &AddrState) -> Result<SendRequest<UpstreamBody>, ClientError> {
        let stream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(&addr.address))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(ClientError::Connect(e)),
                Err(_) => {
                    return Err(ClientError::Connect(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no connection within {:?}", self.connect_timeout),
                    )));
                }
            };
        // Inference requests are small writes that must not wait for Nagle.
        stream.set_nodelay(true).map_err(ClientError::Connect)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ClientError::Protocol)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with error");
            }
        });
        Ok(sender)
    }

    /// Sends `req` (origin-form URI, Host set) to `addr` on an idle connection or a new one.
    pub async fn request(
        self: &Arc<Self>,
        addr: &Arc<AddrState>,
        mut req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Lease), ClientError> {
        // An idle connection the upstream closed meanwhile hands the request back unsent;
        // it then goes out on the next idle connection or a fresh one.
        while let Some(mut sender) = self.take(&addr.address) {
            if !sender.is_ready() && sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, self.lease(addr, sender))),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(ClientError::Protocol(e.into_error())),
                },
            }
        }
        let mut sender = self.connect(addr).await?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(ClientError::Protocol)?;
        Ok((resp, self.lease(addr, sender)))
    }

    fn lease(self: &Arc<Self>, addr: &Arc<AddrState>, sender: SendRequest<UpstreamBody>) -> Lease {
        Lease {
            sender,
            addr: addr.clone(),
            client: self.clone(),
        }
    }
}
