//! Command line and environment configuration, with every timeout and capacity named.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Parser};

/// Port the router listens on; the operator's router Service targets it.
pub const DEFAULT_PORT: u16 = 8080;
/// Listen on every interface: the router is the namespace's entry point.
pub const DEFAULT_HOST: &str = "0.0.0.0";
/// How often a table file is re-read; two stable reads are needed, so a change applies in
/// at most 2 × this, well inside the 2 s promise.
pub const DEFAULT_TABLE_POLL: Duration = Duration::from_millis(250);
/// Connecting to a live pod on the cluster network takes well under this; a dead one must
/// fail fast so the request can be retried elsewhere or answered 502.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Idle keep-alive connections are closed after this, shorter than typical server-side idle
/// timeouts so the router never reuses a connection the sidecar is closing.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// Idle connections kept per upstream address: enough for a burst on 2-8 cores without
/// reconnecting, bounded so thousands of idle sockets cannot pile up.
pub const DEFAULT_POOL_MAX_IDLE_PER_HOST: usize = 256;
/// Request bodies up to this size are buffered, which makes them retryable and mirrorable;
/// larger or unsized ones stream through with neither. 4 MiB fits a batch of images.
pub const DEFAULT_MAX_BUFFERED_BODY: usize = 4 << 20;
/// Shadow requests in flight at once; past it a mirror copy is dropped (and counted), so a
/// slow shadow cannot hold unbounded memory or sockets.
pub const DEFAULT_MIRROR_CONCURRENCY: usize = 64;
/// Responses larger than this are not compared (counted as `error`): comparison buffers them.
pub const DEFAULT_MIRROR_COMPARE_LIMIT: usize = 1 << 20;
/// Consecutive failures (connection errors or 5xx) after which an address is ejected.
pub const DEFAULT_EJECT_AFTER_FAILURES: u32 = 5;
/// How long an ejected address sits out before it is tried again.
pub const DEFAULT_EJECTION_DURATION: Duration = Duration::from_secs(10);
/// Window over which the retry budget counts requests and retries.
pub const DEFAULT_RETRY_BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Retries always allowed per window, so a quiet endpoint can still retry one failure.
pub const DEFAULT_RETRY_MIN_PER_WINDOW: u32 = 10;
/// After SIGTERM, readiness is down for this long before the listener closes, so Service
/// endpoints stop sending new connections first.
pub const DEFAULT_SHUTDOWN_DELAY: Duration = Duration::from_secs(5);
/// In-flight requests get this long to finish after the listener closes; below the default
/// 30 s termination grace period together with the delay above.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Most requests held at once for one Backend scaled to zero, while its first replica starts:
/// a burst at a cold Backend is kept whole, and each held request is only an open connection
/// whose body waits unread in the kernel.
pub const DEFAULT_MAX_HELD_REQUESTS: usize = 1024;
/// Largest request body forwarded: the model server's own limit, so a body it would refuse
/// is answered 413 here without occupying an upstream connection.
pub const DEFAULT_MAX_BODY: u64 = 64 << 20;
/// Largest request head (request line and headers): nginx's default bound is about 32 KiB
/// (four 8 KiB buffers); past it hyper answers 431. It also bounds a connection's read buffer.
pub const DEFAULT_MAX_HEAD_BYTES: usize = 32 << 10;
/// Most client connections served at once; past it new ones wait in the kernel's listen
/// backlog until one closes. With an upstream connection each, twice this stays below the
/// common 65536 file-descriptor limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16384;
/// A client connection idle between requests is closed after this: above the 60 s idle
/// timeout of common load balancers and proxies, so their pools retire an idle connection
/// before the router closes it and no request races the close (nginx's `keepalive_timeout`
/// default).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// Window after each answered request during which one `SCHED_IDLE` thread keeps a CPU awake
/// for the next (see `serval_idle_poll`); 0 disables.
/// Off by default, measured on this 2-vCPU VM: it halves a lone request's latency (digits,
/// 109–130 µs → ~60 µs), but with three spinning processes (router and two sidecars) at c=8–32
/// both proxies lost ~30 % req/s, since a spinning vCPU takes host CPU from the busy one and
/// many pods on a node would each spin. 200 (KVM guest halt-polling's default) suits a
/// latency-critical server with CPU to spare.
pub const DEFAULT_IDLE_POLL_MICROS: u64 = 0;

/// `serval-router` flags; each can also be set from the environment.
#[derive(Parser, Debug, Clone)]
#[command(name = "serval-router", version, about = "Serval routing proxy")]
#[command(group(ArgGroup::new("source").required(true).args(["table", "configmap_namespace"])))]
pub struct Config {
    /// Routing-table JSON file, re-read on change (local mode). Write it by atomic rename.
    #[arg(long, env = "SERVAL_ROUTER_TABLE")]
    pub table: Option<PathBuf>,
    /// Namespace whose `serval-routing` ConfigMap is watched through the Kubernetes API.
    #[arg(long, env = "SERVAL_ROUTER_CONFIGMAP_NAMESPACE")]
    pub configmap_namespace: Option<String>,
    /// Address to listen on.
    #[arg(long, env = "SERVAL_ROUTER_HOST", default_value = DEFAULT_HOST)]
    pub host: IpAddr,
    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "SERVAL_ROUTER_PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Also serve `/-/healthz`, `/-/readyz` and `/-/metrics` on this port (and nothing else),
    /// outside `--max-connections`, so probes pass while traffic connections are at the bound
    /// (what the operator's probes use). Off when not given.
    #[arg(long, env = "SERVAL_ROUTER_ADMIN_PORT")]
    pub admin_port: Option<u16>,
    /// Table file poll interval.
    #[arg(long, env = "SERVAL_ROUTER_TABLE_POLL", value_parser = parse_duration,
          default_value = "250ms")]
    pub table_poll: Duration,
    /// Upstream connect timeout.
    #[arg(long, env = "SERVAL_ROUTER_CONNECT_TIMEOUT", value_parser = parse_duration,
          default_value = "1s")]
    pub connect_timeout: Duration,
    /// Idle keep-alive timeout of upstream connections.
    #[arg(long, env = "SERVAL_ROUTER_POOL_IDLE_TIMEOUT", value_parser = parse_duration,
          default_value = "50s")]
    pub pool_idle_timeout: Duration,
    /// Idle upstream connections kept per address, by each shard.
    #[arg(long, env = "SERVAL_ROUTER_POOL_MAX_IDLE", default_value_t = DEFAULT_POOL_MAX_IDLE_PER_HOST)]
    pub pool_max_idle_per_host: usize,
    /// Largest request body buffered (and so retried and mirrored).
    #[arg(long, env = "SERVAL_ROUTER_MAX_BUFFERED_BODY", default_value_t = DEFAULT_MAX_BUFFERED_BODY)]
    pub max_buffered_body: usize,
    /// Shadow requests in flight at once.
    #[arg(long, env = "SERVAL_ROUTER_MIRROR_CONCURRENCY", default_value_t = DEFAULT_MIRROR_CONCURRENCY)]
    pub mirror_concurrency: usize,
    /// Largest response compared for mirror agreement.
    #[arg(long, env = "SERVAL_ROUTER_MIRROR_COMPARE_LIMIT", default_value_t = DEFAULT_MIRROR_COMPARE_LIMIT)]
    pub mirror_compare_limit: usize,
    /// Consecutive failures that eject an upstream address.
    #[arg(long, env = "SERVAL_ROUTER_EJECT_AFTER", default_value_t = DEFAULT_EJECT_AFTER_FAILURES)]
    pub eject_after_failures: u32,
    /// How long an ejected address sits out.
    #[arg(long, env = "SERVAL_ROUTER_EJECTION_DURATION", value_parser = parse_duration,
          default_value = "10s")]
    pub ejection_duration: Duration,
    /// Retry budget window.
    #[arg(long, env = "SERVAL_ROUTER_RETRY_WINDOW", value_parser = parse_duration,
          default_value = "10s")]
    pub retry_budget_window: Duration,
    /// Retries always allowed per window.
    #[arg(long, env = "SERVAL_ROUTER_RETRY_MIN", default_value_t = DEFAULT_RETRY_MIN_PER_WINDOW)]
    pub retry_min_per_window: u32,
    /// Readiness-down delay before the listener closes on SIGTERM.
    #[arg(long, env = "SERVAL_ROUTER_SHUTDOWN_DELAY", value_parser = parse_duration,
          default_value = "5s")]
    pub shutdown_delay: Duration,
    /// Bound on draining in-flight requests on SIGTERM.
    #[arg(long, env = "SERVAL_ROUTER_DRAIN_TIMEOUT", value_parser = parse_duration,
          default_value = "20s")]
    pub drain_timeout: Duration,
    /// Shards: threads with their own single-threaded runtime and upstream pool, each serving
    /// the connections dealt to it (0 = one per core).
    #[arg(long, env = "SERVAL_ROUTER_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    /// Largest request body forwarded; larger ones are answered 413.
    #[arg(long, env = "SERVAL_ROUTER_MAX_BODY", default_value_t = DEFAULT_MAX_BODY)]
    pub max_body: u64,
    /// Most requests held at once for a Backend scaled to zero until its first replica is
    /// ready; past it, 503 with Retry-After.
    #[arg(long, env = "SERVAL_ROUTER_MAX_HELD_REQUESTS", default_value_t = DEFAULT_MAX_HELD_REQUESTS)]
    pub max_held_requests: usize,
    /// Largest request head (request line and headers), 8192 at least; past it, 431.
    #[arg(long, env = "SERVAL_ROUTER_MAX_HEAD_BYTES", default_value_t = DEFAULT_MAX_HEAD_BYTES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(8192..))]
    pub max_head_bytes: usize,
    /// Time a client connection may stay idle between requests before it is closed. It also
    /// bounds the reading of a request head (slow-loris), since hyper times both with one
    /// timer.
    #[arg(long, env = "SERVAL_ROUTER_IDLE_TIMEOUT", value_parser = parse_duration,
          default_value = "75s")]
    pub idle_timeout: Duration,
    /// Most client connections served at once; further ones wait until one closes.
    #[arg(long, env = "SERVAL_ROUTER_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections: usize,
    /// Microseconds one SCHED_IDLE thread spins after each answered request so the next finds
    /// a CPU awake (time nothing else wants, but CPU time); 0 disables.
    #[arg(long, env = "SERVAL_ROUTER_IDLE_POLL_MICROS", default_value_t = DEFAULT_IDLE_POLL_MICROS)]
    pub idle_poll_micros: u64,
    /// Also drain and exit when stdin is closed: for a supervisor that holds the other end
    /// (`serval local`), so the router stops with it even if it is killed.
    #[arg(long, env = "SERVAL_ROUTER_EXIT_WITH_STDIN")]
    pub exit_with_stdin: bool,
}

impl Config {
    /// Defaults for everything, reading the table from `path`; used by tests and embedders.
    pub fn for_table_file(path: impl Into<PathBuf>) -> Self {
        Self {
            table: Some(path.into()),
            configmap_namespace: None,
            host: IpAddr::from([127, 0, 0, 1]),
            port: 0,
            admin_port: None,
            table_poll: DEFAULT_TABLE_POLL,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            pool_max_idle_per_host: DEFAULT_POOL_MAX_IDLE_PER_HOST,
            max_buffered_body: DEFAULT_MAX_BUFFERED_BODY,
            mirror_concurrency: DEFAULT_MIRROR_CONCURRENCY,
            mirror_compare_limit: DEFAULT_MIRROR_COMPARE_LIMIT,
            eject_after_failures: DEFAULT_EJECT_AFTER_FAILURES,
            ejection_duration: DEFAULT_EJECTION_DURATION,
            retry_budget_window: DEFAULT_RETRY_BUDGET_WINDOW,
            retry_min_per_window: DEFAULT_RETRY_MIN_PER_WINDOW,
            shutdown_delay: DEFAULT_SHUTDOWN_DELAY,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_body: DEFAULT_MAX_BODY,
            max_held_requests: DEFAULT_MAX_HELD_REQUESTS,
            max_head_bytes: DEFAULT_MAX_HEAD_BYTES,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            worker_threads: 0,
            idle_poll_micros: DEFAULT_IDLE_POLL_MICROS,
            exit_with_stdin: false,
        }
    }
}

/// Parses `250ms`, `2s`, `1m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 250ms or 2s"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_defaults_agree() {
        assert_eq!(parse_duration("250ms"), Ok(DEFAULT_TABLE_POLL));
        assert_eq!(parse_duration("1s"), Ok(DEFAULT_CONNECT_TIMEOUT));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("2h").is_err());
        let c = Config::try_parse_from(["serval-router", "--table", "/t.json"]).unwrap();
        assert_eq!(c.table_poll, DEFAULT_TABLE_POLL);
        assert_eq!(c.pool_idle_timeout, DEFAULT_POOL_IDLE_TIMEOUT);
        assert_eq!(c.ejection_duration, DEFAULT_EJECTION_DURATION);
        assert_eq!(c.retry_budget_window, DEFAULT_RETRY_BUDGET_WINDOW);
        assert_eq!(c.shutdown_delay, DEFAULT_SHUTDOWN_DELAY);
        assert_eq!(c.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
        assert_eq!(c.max_body, DEFAULT_MAX_BODY);
        assert_eq!(c.max_head_bytes, DEFAULT_MAX_HEAD_BYTES);
        assert_eq!(c.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(c.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert!(
            Config::try_parse_from(["serval-router", "--table", "/t", "--max-connections", "0"])
                .is_err()
        );
        assert_eq!(c.port, DEFAULT_PORT);
        assert!(
            Config::try_parse_from(["serval-router"]).is_err(),
            "a source is required"
        );
    }
}
