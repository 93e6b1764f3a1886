//! Upstream addresses of a backend: least-request balancing by power of two choices, and
//! outlier ejection that never ejects the last healthy address. Connections are hyper-util's
//! pooled client, one per shard ([`http_client`]).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::metrics::{AddressLabels, Metrics};

/// Boxed error of streamed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of requests sent upstream: buffered bytes or the client's stream.
pub type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;
/// A shard's upstream HTTP client: hyper-util's keep-alive pool, HTTP/1.1 to the sidecars.
pub type HttpClient = Client<HttpConnector, UpstreamBody>;

/// Builds the pooled keep-alive client a shard uses for every upstream. Its connection tasks
/// run on the runtime that builds it, so each shard's upstream connections stay on its thread.
pub fn http_client(
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_host: usize,
) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    // Inference requests are small writes that must not wait for Nagle.
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(idle_timeout)
        .pool_max_idle_per_host(max_idle_per_host)
        .pool_timer(TokioTimer::new())
        // Small requests: one flattened send, as on the server side.
        .http1_writev(false)
        // The Host header is always ours (the upstream's name), never derived from the URI.
        .set_host(false)
        .build(connector)
}

/// The client of gRPC calls to model servers: HTTP/2 with prior knowledge (no TLS between
/// router and pods), one multiplexed connection per replica.
pub fn grpc_client(connect_timeout: Duration, idle_timeout: Duration) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .pool_idle_timeout(idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .set_host(false)
        .build(connector)
}

/// When an address is taken out of rotation.
#[derive(Debug, Clone, Copy)]
pub struct OutlierPolicy {
    /// Consecutive failures that eject.
    pub after_failures: u32,
    /// How long an ejection lasts.
    pub duration: Duration,
}

/// How long a replica's requests are shed after it answered 429 without saying for how long
/// (a model server says it in [`serval_api::routing::RETRY_AFTER_MS_HEADER`]): about one
/// batch of a CNN, so its queue never runs dry while the excess is refused here.
pub const DEFAULT_SHED_WINDOW: Duration = Duration::from_millis(10);
/// Longest shedding window honoured: past it a replica's own answer is asked again.
pub const MAX_SHED_WINDOW: Duration = Duration::from_secs(1);

/// The shedding window a 429 answer's headers ask for.
pub fn shed_window(headers: &http::HeaderMap) -> Duration {
    headers
        .get(serval_api::routing::RETRY_AFTER_MS_HEADER)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
        .map_or(DEFAULT_SHED_WINDOW, Duration::from_millis)
        .min(MAX_SHED_WINDOW)
}

/// Milliseconds since a process-wide origin, so ejection deadlines fit in an atomic.
fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    // Offset by one so 0 can mean "not ejected".
    origin.elapsed().as_millis() as u64 + 1
}

/// Live state of one upstream address; survives table reloads that keep the address.
#[derive(Debug)]
pub struct AddrState {
    /// `host:port`.
    pub address: String,
    /// The Host header sent to it (`host[:port]`, the port left out when it is 80), built
    /// once; `None` if `address` is not a valid `host:port`.
    pub host_header: Option<HeaderValue>,
    /// `address` as a URI authority, for the client's pool key; `None` as above.
    authority: Option<Authority>,
    inflight: AtomicUsize,
    consecutive_failures: AtomicU32,
    ejected_until_ms: AtomicU64,
    /// Until when it refuses new work (it answered 429): its requests are shed here.
    shedding_until_ms: AtomicU64,
}

impl AddrState {
    /// A fresh, healthy address.
    pub fn new(address: &str) -> Self {
        Self {
            address: address.to_owned(),
            host_header: host_header(address),
            authority: Authority::try_from(address).ok(),
            inflight: AtomicUsize::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            shedding_until_ms: AtomicU64::new(0),
        }
    }

    /// Requests currently outstanding.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// The absolute URI of `path` on this address; `None` if the address is not `host:port`.
    pub fn uri(&self, path: PathAndQuery) -> Option<Uri> {
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone()?)
            .path_and_query(path)
            .build()
            .ok()
    }

    fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now
    }

    fn is_shedding(&self, now: u64) -> bool {
        self.shedding_until_ms.load(Ordering::Relaxed) > now
    }

    /// Records that the address refuses new work (it answered 429) for `window`.
    pub fn refuses_work_for(&self, window: Duration) {
        let until = now_ms() + window.as_millis().max(1) as u64;
        self.shedding_until_ms.fetch_max(until, Ordering::Relaxed);
    }
}

fn host_header(address: &str) -> Option<HeaderValue> {
    let authority = Authority::try_from(address).ok()?;
    match authority.port_u16() {
        Some(80) | None => HeaderValue::from_str(authority.host()).ok(),
        Some(_) => HeaderValue::from_str(authority.as_str()).ok(),
    }
}

/// Counts a request against an address until dropped (after the response body ends).
#[derive(Debug)]
pub struct InflightGuard(Arc<AddrState>);

impl InflightGuard {
    fn new(addr: Arc<AddrState>) -> Self {
        addr.inflight.fetch_add(1, Ordering::Relaxed);
        Self(addr)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One backend's addresses.
#[derive(Debug)]
pub struct BackendPool {
    /// Backend name.
    pub name: String,
    /// Model name its servers serve.
    pub model: String,
    /// `name` as the value of the response header naming the backend; built once per table
    /// rather than per response. `None` if the name is not a valid header value.
    pub header_value: Option<HeaderValue>,
    /// Addresses in table order.
    pub addrs: Vec<Arc<AddrState>>,
    /// Scaled to zero on purpose: its requests are held until a table gives it an address.
    pub scaled_to_zero: bool,
    // Serialises ejection decisions so two failing addresses cannot both see the other as the
    // remaining healthy one and eject each other.
    eject_lock: Mutex<()>,
}

impl BackendPool {
    /// A pool over `addrs`.
    pub fn new(name: &str, model: &str, addrs: Vec<Arc<AddrState>>) -> Self {
        Self {
            name: name.to_owned(),
            model: model.to_owned(),
            header_value: HeaderValue::from_str(name).ok(),
            addrs,
            scaled_to_zero: false,
            eject_lock: Mutex::new(()),
        }
    }

    /// Whether the pool takes traffic: it has an address, or it is scaled to zero (its
    /// requests are held until it has one).
    pub fn is_usable(&self) -> bool {
        !self.addrs.is_empty() || self.scaled_to_zero
    }

    /// Scaled to zero and without an address yet: a request for it must be held.
    pub fn is_cold(&self) -> bool {
        self.addrs.is_empty() && self.scaled_to_zero
    }

    /// Whether every address refuses new work now (each answered 429 with a window that has
    /// not passed): the backend is overloaded and a request to it is best refused here.
    pub fn all_shedding(&self) -> bool {
        let now = now_ms();
        !self.addrs.is_empty() && self.addrs.iter().all(|a| a.is_shedding(now))
    }

    /// Picks an address by least request among two random candidates, preferring addresses
    /// neither ejected, shedding, nor already `tried`; falls back to any address rather than
    /// none.
    pub fn pick(&self, tried: &[usize]) -> Option<(usize, InflightGuard)> {
        // A lone address is the only choice whatever its state: skip building candidates.
        if let [only] = self.addrs.as_slice() {
            return Some((0, InflightGuard::new(only.clone())));
        }
        let now = now_ms();
        let fresh = |i: &usize| !tried.contains(i);
        let healthy = |i: &usize| {
            let a = &self.addrs[*i];
            !a.is_ejected(now) && !a.is_shedding(now)
        };
        let all = 0..self.addrs.len();
        let mut candidates: Vec<usize> = all.clone().filter(|i| fresh(i) && healthy(i)).collect();
        if candidates.is_empty() {
            candidates = all.clone().filter(fresh).collect();
        }
        if candidates.is_empty() {
            candidates = all.filter(healthy).collect();
        }
        if candidates.is_empty() {
            candidates = (0..self.addrs.len()).collect();
        }
        let chosen = match candidates.len() {
            0 => return None,
            1 => candidates[0],
            n => {
                let a = rand::random_range(0..n);
                let mut b = rand::random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (candidates[a], candidates[b]);
                if self.addrs[b].inflight() < self.addrs[a].inflight() {
                    b
                } else {
                    a
                }
            }
        };
        Some((chosen, InflightGuard::new(self.addrs[chosen].clone())))
    }

    /// Resets the failure streak of an address that answered.
    pub fn record_success(&self, idx: usize) {
        if let Some(a) = self.addrs.get(idx) {
            a.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failure; ejects the address after the policy's streak unless it is the last
    /// one not ejected. Returns whether it was ejected.
    pub fn record_failure(&self, idx: usize, policy: OutlierPolicy, metrics: &Metrics) -> bool {
        let Some(a) = self.addrs.get(idx) else {
            return false;
        };
        let streak = a.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if streak < policy.after_failures {
            return false;
        }
        let _guard = self.eject_lock.lock().unwrap_or_else(|p| p.into_inner());
        let now = now_ms();
        if a.is_ejected(now) {
            return false;
        }
        let others_healthy = self
            .addrs
            .iter()
            .enumerate()
            .any(|(j, o)| j != idx && !o.is_ejected(now));
        if !others_healthy {
            return false;
        }
        let until = now + policy.duration.as_millis() as u64;
        a.ejected_until_ms.store(until, Ordering::Relaxed);
        metrics
            .ejections
            .get_or_create(&AddressLabels {
                backend: self.name.clone(),
                address: a.address.clone(),
            })
            .inc();
        tracing::warn!(backend = %self.name, address = %a.address, streak, "upstream ejected");
        true
    }

    /// Number of addresses currently ejected.
    pub fn ejected(&self) -> usize {
        let now = now_ms();
        self.addrs.iter().filter(|a| a.is_ejected(now)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> BackendPool {
        let addrs = (0..n)
            .map(|i| Arc::new(AddrState::new(&format!("10.0.0.{i}:80"))))
            .collect();
        BackendPool::new("b", "b", addrs)
    }

    const POLICY: OutlierPolicy = OutlierPolicy {
        after_failures: 3,
        duration: Duration::from_secs(60),
    };

    #[test]
    fn never_ejects_the_last_healthy() {
        let p = pool(2);
        let m = Metrics::new();
        assert!(!p.record_failure(0, POLICY, &m));
        assert!(!p.record_failure(0, POLICY, &m));
        assert!(p.record_failure(0, POLICY, &m), "third failure ejects");
        for _ in 0..10 {
            assert!(
                !p.record_failure(1, POLICY, &m),
                "the last healthy one stays"
            );
        }
        assert_eq!(p.ejected(), 1);
        // The ejected address is avoided.
        for _ in 0..50 {
            assert_eq!(p.pick(&[]).unwrap().0, 1);
        }
        // A lone address is never ejected.
        let lone = pool(1);
        for _ in 0..10 {
            assert!(!lone.record_failure(0, POLICY, &m));
        }
        assert_eq!(lone.pick(&[]).unwrap().0, 0);
    }

    #[test]
    fn success_resets_the_streak() {
        let p = pool(2);
        let m = Metrics::new();
        p.record_failure(0, POLICY, &m);
        p.record_failure(0, POLICY, &m);
        p.record_success(0);
        assert!(!p.record_failure(0, POLICY, &m));
        assert_eq!(p.ejected(), 0);
    }

    #[test]
    fn least_request_and_retry_elsewhere() {
        let p = pool(2);
        let (first, _busy) = p.pick(&[]).unwrap();
        // With one request outstanding on `first`, P2C over two always picks the other.
        for _ in 0..20 {
            assert_ne!(p.pick(&[]).unwrap().0, first);
        }
        // A retry avoids the address already tried.
        assert_ne!(p.pick(&[first]).unwrap().0, first);
        assert!(pool(0).pick(&[]).is_none());
    }

    #[test]
    fn a_429_asks_for_its_window_within_bounds() {
        let mut h = http::HeaderMap::new();
        assert_eq!(shed_window(&h), DEFAULT_SHED_WINDOW);
        h.insert(serval_api::routing::RETRY_AFTER_MS_HEADER, 25.into());
        assert_eq!(shed_window(&h), Duration::from_millis(25));
        h.insert(serval_api::routing::RETRY_AFTER_MS_HEADER, 3_600_000.into());
        assert_eq!(shed_window(&h), MAX_SHED_WINDOW);
        h.insert(
            serval_api::routing::RETRY_AFTER_MS_HEADER,
            http::HeaderValue::from_static("soon"),
        );
        assert_eq!(shed_window(&h), DEFAULT_SHED_WINDOW);
    }
}
