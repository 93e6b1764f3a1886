//! Command line and environment of `serval-sidecar`.
//!
//! The flag names are the contract in [`serval_api::sidecar::flags`]: the operator and local mode
//! render a Backend into exactly these. Every flag also reads a `SERVAL_*` variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use serval_api::{Postprocess, Preprocess};

use crate::errors::{StartupError, StartupResult};

/// Default listen address: all interfaces, as a pod's container port needs.
pub const DEFAULT_HOST: &str = "0.0.0.0";
/// Default port: the one the operator's Service targets.
pub const DEFAULT_PORT: u16 = serval_api::backend::SIDECAR_PORT;
/// Default rows per batch; calibration drops sizes that do not pay.
pub const DEFAULT_MAX_BATCH_SIZE: u32 = serval_api::backend::DEFAULT_MAX_BATCH_SIZE;
/// Default batch fill wait while workers are busy, microseconds.
pub const DEFAULT_MAX_DELAY_MICROS: u32 = serval_api::backend::DEFAULT_MAX_DELAY_MICROS;
/// Default queue bound in rows.
pub const DEFAULT_MAX_QUEUE: u32 = serval_api::backend::DEFAULT_MAX_QUEUE;
/// Default deadline of a request without a `serval-deadline-ms` header: 30 s matches common
/// client and proxy timeouts, so work nobody waits for anymore is dropped.
pub const DEFAULT_DEADLINE_MS: u64 = 30_000;
/// Largest accepted request body: 64 MiB holds a batch of full-size images, and bounds memory.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Longest a graceful shutdown waits for in-flight requests: below Kubernetes' default 30 s
/// termination grace period, so the process exits on its own before SIGKILL.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u64 = 25;
/// Least time the listener keeps answering 503 after a shutdown signal: clients and routers
/// that have not yet seen readiness drop get a clean, retryable answer instead of a refused
/// or reset connection.
pub const DEFAULT_DRAIN_DELAY_MILLIS: u64 = 1_000;
/// Time spent timing each candidate batch size at start-up: long enough for a stable median
/// on small models, short enough that start-up stays within seconds.
pub const DEFAULT_CALIBRATION_MILLIS: u64 = 200;
/// Longest model run (as measured at start-up) that may execute on the request's own thread
/// when a worker slot is free and nothing is queued: below this, the two thread hand-offs to
/// an inference worker and back cost about as much as the run itself, and blocking an I/O
/// thread this long delays other connections no more than a burst of syscalls. 0 disables.
pub const DEFAULT_INLINE_MAX_MICROS: u64 = 200;
/// Window after each answered request during which one `SCHED_IDLE` thread spins so a CPU
/// stays awake for the next request (see [`crate::idle_poll`]); 0 disables.
/// Off by default, measured on this 2-vCPU VM: it halves a lone request's latency (digits,
/// 109–130 µs → ~60 µs), but with three spinning processes (router and two sidecars) at c=8–32
/// both proxies lost ~30 % req/s, since a spinning vCPU takes host CPU from the busy one and
/// many pods on a node would each spin. 200 (KVM guest halt-polling's default) suits a
/// latency-critical server with CPU to spare.
pub const DEFAULT_IDLE_POLL_MICROS: u64 = 0;
/// How long a connection may sit between requests, or take to send a request's head, before
/// it is closed (hyper applies one bound to both). Above the router's 50 s upstream pool idle
/// timeout and the 60 s of common load balancers, so a client's pool always retires an idle
/// connection first and no request races the close; nginx's `keepalive_timeout` default.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 75;
/// Most connections served at once; past it new ones wait in the kernel's listen backlog until
/// one closes, so a flood of connections cannot exhaust memory or file descriptors. Far above
/// what a router or a few client pools open to one model server.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Budget of request bodies held at once when the container's memory limit is unknown: four
/// bodies of the largest accepted size.
pub const DEFAULT_MEMORY_BUDGET_BYTES: usize = 4 * DEFAULT_MAX_BODY_BYTES;
/// Under a memory limit, bodies may hold this fraction of it: while held bodies are parsed and
/// queued the server peaks at about 3.3 times their bytes (measured: two 43 MB JSON bodies, 285
/// MB above idle), which leaves over half the limit to the model, its plans and the runtime.
pub const MEMORY_BUDGET_SHARE_OF_LIMIT: usize = 8;
/// An image may have at most this many times the pixels the model takes (checked from its
/// header, before decoding): room for a photo a few times larger on each side, while a
/// decompression bomb (a small file of millions of pixels) is refused unread.
pub const IMAGE_AREA_FACTOR: u64 = 64;
/// Images up to this many pixels are always accepted, even for a tiny model input (a 1024 ×
/// 1024 thumbnail decodes into at most 8 MiB), so a small model still takes camera thumbnails.
pub const MIN_IMAGE_PIXEL_LIMIT: u64 = 1 << 20;
/// Header a caller sets to bound its own wait, in milliseconds.
pub const DEADLINE_HEADER: &str = "serval-deadline-ms";

/// `serval-sidecar`: serve one ONNX model over the Open Inference Protocol and KServe V1.
#[derive(Debug, Clone, Parser)]
#[command(name = "serval-sidecar", version, about)]
pub struct Args {
    /// Model location: a path, `file://`, `http://` or `https://` URI.
    #[arg(long, env = "SERVAL_MODEL")]
    pub model: String,
    /// Expected SHA-256 of the model file (64 hex characters); a mismatch is never served.
    #[arg(long, env = "SERVAL_SHA256")]
    pub sha256: Option<String>,
    /// Model name in the protocol paths. Defaults to the model file's stem.
    #[arg(long, env = "SERVAL_NAME")]
    pub name: Option<String>,
    /// Listen address.
    #[arg(long, env = "SERVAL_HOST", default_value = DEFAULT_HOST)]
    pub host: String,
    /// Listen port (0 picks a free one).
    #[arg(long, env = "SERVAL_PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Also serve health (`/v2/health/live`, `/v2/health/ready`) and `/metrics` on this port,
    /// outside `--max-connections`, so probes pass while traffic connections are at the bound
    /// (what the operator's probes use). Off when not given.
    #[arg(long, env = "SERVAL_ADMIN_PORT")]
    pub admin_port: Option<u16>,
    /// Most rows per inference call; larger requests are split. 1 disables batching.
    #[arg(long, env = "SERVAL_MAX_BATCH_SIZE", default_value_t = DEFAULT_MAX_BATCH_SIZE)]
    pub max_batch_size: u32,
    /// Most extra latency batching may add to a request, microseconds: a batch size is kept
    /// only if one run of it takes at most this much longer than a run of one row.
    #[arg(long, env = "SERVAL_MAX_DELAY_MICROS", default_value_t = DEFAULT_MAX_DELAY_MICROS)]
    pub max_delay_micros: u32,
    /// Most rows waiting; beyond it requests get 429 at once.
    #[arg(long, env = "SERVAL_MAX_QUEUE", default_value_t = DEFAULT_MAX_QUEUE)]
    pub max_queue: u32,
    /// Longest expected queue wait a request is admitted with, milliseconds; a request that
    /// would wait longer (or miss its deadline) gets 429 with Retry-After at once.
    #[arg(long, env = "SERVAL_MAX_QUEUE_DELAY_MILLIS", default_value_t = crate::admission::DEFAULT_MAX_QUEUE_DELAY_MILLIS)]
    pub max_queue_delay_millis: u64,
    /// Most bytes of request bodies held at once (being read, parsed or queued); past it
    /// requests get 429 (413 if one body alone is larger). Defaults to an eighth of the
    /// container's memory limit, or 256 MiB when there is none.
    #[arg(long, env = "SERVAL_MEMORY_BUDGET_BYTES")]
    pub memory_budget_bytes: Option<usize>,
    /// Inference worker threads. Defaults to one per CPU core.
    #[arg(long, env = "SERVAL_WORKERS")]
    pub workers: Option<u32>,
    /// I/O threads, each with its own single-threaded runtime serving the connections it is
    /// dealt (a small model runs on them). Defaults to the number of workers.
    #[arg(long, env = "SERVAL_IO_THREADS")]
    pub io_threads: Option<u32>,
    /// Built-in pre-processing, JSON of `serval_api::Preprocess`.
    #[arg(long, env = "SERVAL_PREPROCESS")]
    pub preprocess: Option<String>,
    /// Built-in post-processing, JSON of `serval_api::Postprocess`.
    #[arg(long, env = "SERVAL_POSTPROCESS")]
    pub postprocess: Option<String>,
    /// Deadline of requests without a `serval-deadline-ms` header, milliseconds.
    #[arg(long, env = "SERVAL_DEFAULT_DEADLINE_MS", default_value_t = DEFAULT_DEADLINE_MS)]
    pub default_deadline_ms: u64,
    /// Largest accepted request body, bytes.
    #[arg(long, env = "SERVAL_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Seconds a connection may stay idle between requests, or take to send a request's
    /// head, before it is closed; 0: never.
    #[arg(long, env = "SERVAL_IDLE_TIMEOUT_SECS", default_value_t = DEFAULT_IDLE_TIMEOUT_SECS)]
    pub idle_timeout_secs: u64,
    /// Most connections served at once; further ones wait until one closes.
    #[arg(long, env = "SERVAL_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Longest graceful shutdown, seconds.
    #[arg(long, env = "SERVAL_SHUTDOWN_TIMEOUT_SECS", default_value_t = DEFAULT_SHUTDOWN_TIMEOUT_SECS)]
    pub shutdown_timeout_secs: u64,
    /// Time to keep serving after a shutdown signal, milliseconds: not ready, every answer
    /// closing its connection, so load balancers and clients move to other replicas before
    /// requests are refused (503).
    #[arg(long, env = "SERVAL_DRAIN_DELAY_MILLIS", default_value_t = DEFAULT_DRAIN_DELAY_MILLIS)]
    pub drain_delay_millis: u64,
    /// Time batch sizes at start-up and keep only those that pay (false: keep every
    /// power of two up to the max).
    #[arg(long, env = "SERVAL_CALIBRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub calibrate: bool,
    /// Time spent on each candidate batch size during calibration, milliseconds.
    #[arg(long, env = "SERVAL_CALIBRATION_MILLIS", default_value_t = DEFAULT_CALIBRATION_MILLIS)]
    pub calibration_millis: u64,
    /// Longest model run, microseconds, executed on the request's thread when a worker slot
    /// is idle (skips the hand-off to a worker thread); 0 always hands off.
    #[arg(long, env = "SERVAL_INLINE_MAX_MICROS", default_value_t = DEFAULT_INLINE_MAX_MICROS)]
    pub inline_max_micros: u64,
    /// Microseconds one SCHED_IDLE thread spins after each answered request, so the
    /// next request's wake-up finds a CPU awake (only time nothing else wants, but it counts as
    /// CPU use; the operator sets 0 under a CPU limit); 0 disables.
    #[arg(long, env = "SERVAL_IDLE_POLL_MICROS", default_value_t = DEFAULT_IDLE_POLL_MICROS)]
    pub idle_poll_micros: u64,
    /// Also drain and exit when stdin is closed: for a supervisor that holds the other end
    /// (`serval local`), so the server stops with it even if it is killed.
    #[arg(long, env = "SERVAL_EXIT_WITH_STDIN")]
    pub exit_with_stdin: bool,
    /// Fault injection: answer this percentage of inference requests with a 500 (the
    /// Backend annotation `serval.dev/fault-error-percent`), to rehearse a rollback.
    #[arg(long, default_value_t = 0.0)]
    pub fault_error_percent: f64,
    /// Fault injection: delay every inference request by this many milliseconds (the Backend
    /// annotation `serval.dev/fault-delay-millis`).
    #[arg(long, default_value_t = 0)]
    pub fault_delay_millis: u64,
}

/// Validated settings of one sidecar.
#[derive(Debug, Clone)]
pub struct Config {
    /// Model location as given.
    pub model: String,
    /// Expected SHA-256, lowercase hex.
    pub sha256: Option<String>,
    /// Served model name.
    pub name: String,
    /// Listen address.
    pub listen: SocketAddr,
    /// Admin listen address (health and metrics only), if any.
    pub admin_listen: Option<SocketAddr>,
    /// Most rows per batch.
    pub max_batch_size: usize,
    /// Extra latency batching may add.
    pub max_delay: Duration,
    /// Queue bound in rows.
    pub max_queue: usize,
    /// Longest expected queue wait a request is admitted with.
    pub max_queue_delay: Duration,
    /// Most bytes of request bodies held at once.
    pub memory_budget: usize,
    /// Worker threads.
    pub workers: usize,
    /// I/O threads (connection shards).
    pub io_threads: usize,
    /// Built-in pre-processing.
    pub preprocess: Option<Preprocess>,
    /// Built-in post-processing.
    pub postprocess: Option<Postprocess>,
    /// Deadline when the request has none.
    pub default_deadline: Duration,
    /// Body size bound.
    pub max_body_bytes: usize,
    /// Idle and request-head bound of a connection; zero: none.
    pub idle_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Graceful shutdown bound.
    pub shutdown_timeout: Duration,
    /// Least time answering 503 after a shutdown signal.
    pub drain_delay: Duration,
    /// Whether to time batch sizes at start-up.
    pub calibrate: bool,
    /// Time per calibrated batch size.
    pub calibration_time: Duration,
    /// Longest measured run executed on the request's thread when a worker slot is idle.
    pub inline_max_run: Duration,
    /// Spin window after each answered request; zero disables.
    pub idle_poll: Duration,
    /// Share of inference requests failed on purpose, 0-1 (fault injection; 0 in production).
    pub fault_error_rate: f64,
    /// Delay added to every inference request on purpose (fault injection).
    pub fault_delay: Duration,
}

impl Config {
    /// Settings with defaults for `model`, listening on 127.0.0.1 with an OS-chosen port.
    pub fn for_model(model: impl Into<String>) -> Self {
        let model = model.into();
        Self {
            name: default_name(&model),
            model,
            sha256: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: None,
            max_batch_size: DEFAULT_MAX_BATCH_SIZE as usize,
            max_delay: Duration::from_micros(DEFAULT_MAX_DELAY_MICROS.into()),
            max_queue: DEFAULT_MAX_QUEUE as usize,
            max_queue_delay: Duration::from_millis(
                crate::admission::DEFAULT_MAX_QUEUE_DELAY_MILLIS,
            ),
            memory_budget: default_memory_budget(),
            workers: default_workers(),
            io_threads: default_workers(),
            preprocess: None,
            postprocess: None,
            default_deadline: Duration::from_millis(DEFAULT_DEADLINE_MS),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            idle_timeout: Duration::from_secs(DEFAULT_IDLE_TIMEOUT_SECS),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            shutdown_timeout: Duration::from_secs(DEFAULT_SHUTDOWN_TIMEOUT_SECS),
            drain_delay: Duration::from_millis(DEFAULT_DRAIN_DELAY_MILLIS),
            calibrate: true,
            calibration_time: Duration::from_millis(DEFAULT_CALIBRATION_MILLIS),
            inline_max_run: Duration::from_micros(DEFAULT_INLINE_MAX_MICROS),
            idle_poll: Duration::from_micros(DEFAULT_IDLE_POLL_MICROS),
            fault_error_rate: 0.0,
            fault_delay: Duration::ZERO,
        }
    }

    /// Checks and converts parsed arguments.
    pub fn from_args(args: Args) -> StartupResult<Self> {
        let bad = |m: String| StartupError::Config(m);
        let listen: SocketAddr = format!("{}:{}", bracket_v6(&args.host), args.port)
            .parse()
            .map_err(|e| bad(format!("--host {:?}: {e}", args.host)))?;
        let sha256 = match args.sha256 {
            Some(s) if s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()) => {
                Some(s.to_ascii_lowercase())
            }
            Some(s) => {
                return Err(bad(format!(
                    "--sha256 must be 64 hex characters, got {s:?}"
                )));
            }
            None => None,
        };
        let preprocess = match args.preprocess.as_deref().filter(|s| !s.trim().is_empty()) {
            Some(json) => Some(
                serde_json::from_str::<Preprocess>(json)
                    .map_err(|e| bad(format!("--preprocess: {e}")))?,
            ),
            None => None,
        };
        let postprocess = match args.postprocess.as_deref().filter(|s| !s.trim().is_empty()) {
            Some(json) => Some(
                serde_json::from_str::<Postprocess>(json)
                    .map_err(|e| bad(format!("--postprocess: {e}")))?,
            ),
            None => None,
        };
        let cfg = Self {
            name: args.name.unwrap_or_else(|| default_name(&args.model)),
            model: args.model,
            sha256,
            listen,
            admin_listen: args
                .admin_port
                .map(|port| SocketAddr::new(listen.ip(), port)),
            max_batch_size: args.max_batch_size as usize,
            max_delay: Duration::from_micros(args.max_delay_micros.into()),
            max_queue: args.max_queue as usize,
            max_queue_delay: Duration::from_millis(args.max_queue_delay_millis),
            memory_budget: args
                .memory_budget_bytes
                .unwrap_or_else(default_memory_budget),
            workers: args.workers.map_or_else(default_workers, |w| w as usize),
            io_threads: args
                .io_threads
                .or(args.workers)
                .map_or_else(default_workers, |w| w as usize),
            preprocess,
            postprocess,
            default_deadline: Duration::from_millis(args.default_deadline_ms),
            max_body_bytes: args.max_body_bytes,
            idle_timeout: Duration::from_secs(args.idle_timeout_secs),
            max_connections: args.max_connections,
            shutdown_timeout: Duration::from_secs(args.shutdown_timeout_secs),
            drain_delay: Duration::from_millis(args.drain_delay_millis),
            calibrate: args.calibrate,
            calibration_time: Duration::from_millis(args.calibration_millis),
            inline_max_run: Duration::from_micros(args.inline_max_micros),
            idle_poll: Duration::from_micros(args.idle_poll_micros),
            fault_error_rate: (args.fault_error_percent / 100.0).clamp(0.0, 1.0),
            fault_delay: Duration::from_millis(args.fault_delay_millis),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Cross-field checks, shared by the CLI and library callers.
    pub fn validate(&self) -> StartupResult<()> {
        let bad = |m: &str| Err(StartupError::Config(m.to_owned()));
        if self.name.is_empty() || self.name.contains('/') {
            return bad("--name must be non-empty and contain no '/'");
        }
        if self.max_batch_size == 0 {
            return bad("--max-batch-size must be at least 1");
        }
        if self.max_queue < self.max_batch_size {
            return bad("--max-queue must be at least --max-batch-size");
        }
        if self.max_queue_delay.is_zero() {
            return bad("--max-queue-delay-millis must be at least 1");
        }
        if self.memory_budget == 0 {
            return bad("--memory-budget-bytes must be at least 1");
        }
        if self.workers == 0 {
            return bad("--workers must be at least 1");
        }
        if self.io_threads == 0 {
            return bad("--io-threads must be at least 1");
        }
        if self.max_connections == 0 {
            return bad("--max-connections must be at least 1");
        }
        if self
            .admin_listen
            .is_some_and(|a| a.port() != 0 && a.port() == self.listen.port())
        {
            return bad("--admin-port must differ from --port");
        }
        if let Some(img) = self.preprocess.as_ref().and_then(|p| p.image.as_ref()) {
            let channels = match img.color {
                serval_api::ColorMode::Grayscale => 1,
                serval_api::ColorMode::Rgb => 3,
            };
            if img.width == 0 || img.height == 0 {
                return bad("--preprocess: width and height must be positive");
            }
            if !(img.mean.is_empty() || img.mean.len() == channels)
                || !(img.std.is_empty() || img.std.len() == channels)
            {
                return bad("--preprocess: mean and std need one value per channel");
            }
            if img.std.iter().any(|s| *s <= 0.0) {
                return bad("--preprocess: std values must be positive");
            }
        }
        Ok(())
    }
}

impl Config {
    /// Most pixels an image request may have: [`IMAGE_AREA_FACTOR`] times the model's input
    /// area, and at least [`MIN_IMAGE_PIXEL_LIMIT`]. `None` without image pre-processing.
    pub fn max_image_pixels(&self) -> Option<u64> {
        let img = self.preprocess.as_ref()?.image.as_ref()?;
        let area = u64::from(img.width) * u64::from(img.height);
        Some(
            area.saturating_mul(IMAGE_AREA_FACTOR)
                .max(MIN_IMAGE_PIXEL_LIMIT),
        )
    }
}

/// The memory budget of request bodies: a share of the container's memory limit (cgroup v2 or
/// v1) when there is one, else [`DEFAULT_MEMORY_BUDGET_BYTES`].
pub fn default_memory_budget() -> usize {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        .and_then(|s| parse_memory_limit(&s))
        .map_or(DEFAULT_MEMORY_BUDGET_BYTES, |limit| {
            (limit / MEMORY_BUDGET_SHARE_OF_LIMIT).max(1)
        })
}

/// A cgroup memory limit file's content: bytes, or `None` for no limit (`max` in v2, a value
/// near `i64::MAX` in v1).
fn parse_memory_limit(content: &str) -> Option<usize> {
    let bytes: u64 = content.trim().parse().ok()?;
    // cgroup v1 writes "no limit" as the largest page-aligned i64.
    (bytes < 1 << 60)
        .then(|| usize::try_from(bytes).ok())
        .flatten()
}

/// One worker per core (within the process's CPU quota): one tract run uses one thread.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The file stem of the model location, e.g. `digits` for `https://host/m/digits.onnx`.
fn default_name(model: &str) -> String {
    let last = model.rsplit('/').next().unwrap_or(model);
    let last = last.split(['?', '#']).next().unwrap_or(last);
    let stem = last.strip_suffix(".onnx").unwrap_or(last);
    if stem.is_empty() {
        "model".to_owned()
    } else {
        stem.to_owned()
    }
}

fn bracket_v6(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> StartupResult<Config> {
        let mut argv = vec!["serval-sidecar", "--model", "file:///m/digits.onnx"];
        argv.extend_from_slice(extra);
        Config::from_args(
            Args::try_parse_from(argv).map_err(|e| StartupError::Config(e.to_string()))?,
        )
    }

    #[test]
    fn accepts_the_operator_rendered_flags() {
        let spec: serval_api::BackendSpec = serde_json::from_value(serde_json::json!({
            "model": {"uri": "file:///m/digits.onnx", "sha256": "AB".repeat(32)},
            "batching": {"maxBatchSize": 8, "maxDelayMicros": 500, "maxQueue": 64, "workers": 3},
            "preprocess": {"image": {"width": 8, "height": 8, "layout": "Flat", "scale": 0.0666}},
            "postprocess": {"output": "probabilities", "topK": 3, "labels": ["a", "b", "c"]},
            "resources": {"limits": {"cpu": "2"}}
        }))
        .expect("spec");
        let mut argv = vec!["serval-sidecar".to_owned()];
        argv.extend(serval_api::sidecar::sidecar_args(
            "digits",
            &spec,
            "/m/d.onnx",
            "::1",
            9000,
        ));
        // What the operator appends for its probes.
        argv.extend([
            serval_api::sidecar::flags::ADMIN_PORT.to_owned(),
            serval_api::backend::SIDECAR_ADMIN_PORT.to_string(),
        ]);
        let cfg = Config::from_args(Args::try_parse_from(argv).expect("parse")).expect("valid");
        assert_eq!(
            cfg.admin_listen.map(|a| a.port()),
            Some(serval_api::backend::SIDECAR_ADMIN_PORT)
        );
        assert_eq!(cfg.name, "digits");
        assert_eq!(cfg.max_batch_size, 8);
        assert_eq!(cfg.max_queue, 64);
        assert_eq!(cfg.workers, 3);
        assert_eq!(cfg.io_threads, 3, "one I/O thread per worker");
        assert_eq!(cfg.max_delay, Duration::from_micros(500));
        assert_eq!(cfg.listen.port(), 9000);
        assert_eq!(cfg.sha256.as_deref(), Some("ab".repeat(32).as_str()));
        assert_eq!(cfg.postprocess.and_then(|p| p.top_k), Some(3));
        assert!(cfg.preprocess.and_then(|p| p.image).is_some());
        assert_eq!(cfg.idle_poll, Duration::ZERO, "no spinning on a CPU quota");

        let spec: serval_api::BackendSpec = serde_json::from_value(serde_json::json!({
            "model": {"uri": "file:///m/digits.onnx"},
            "resources": {"requests": {"cpu": "2"}}
        }))
        .expect("spec");
        let mut argv = vec!["serval-sidecar".to_owned()];
        argv.extend(serval_api::sidecar::sidecar_args(
            "d", &spec, "/m", "::1", 9000,
        ));
        let cfg = Config::from_args(Args::try_parse_from(argv).expect("parse")).expect("valid");
        assert_eq!(
            cfg.idle_poll,
            Duration::from_micros(DEFAULT_IDLE_POLL_MICROS),
            "without a limit the default stays"
        );
    }

    #[test]
    fn memory_limits_are_read_from_cgroup_files() {
        assert_eq!(parse_memory_limit("max\n"), None);
        assert_eq!(parse_memory_limit("9223372036854771712\n"), None);
        assert_eq!(parse_memory_limit("536870912\n"), Some(512 << 20));
        assert_eq!(parse_memory_limit("garbage"), None);
        assert!(parse(&["--memory-budget-bytes", "1000"]).is_ok_and(|c| c.memory_budget == 1000));
        assert!(parse(&["--memory-budget-bytes", "0"]).is_err());
    }

    #[test]
    fn the_image_pixel_limit_follows_the_model_input_with_a_floor() {
        let mut cfg = parse(&[]).expect("defaults");
        assert_eq!(cfg.max_image_pixels(), None);
        let pre = |w: u32, h: u32| {
            serde_json::from_value(serde_json::json!({"image": {"width": w, "height": h}}))
                .expect("preprocess")
        };
        cfg.preprocess = Some(pre(8, 8));
        assert_eq!(cfg.max_image_pixels(), Some(MIN_IMAGE_PIXEL_LIMIT));
        cfg.preprocess = Some(pre(224, 224));
        assert_eq!(cfg.max_image_pixels(), Some(64 * 224 * 224));
    }

    #[test]
    fn defaults_and_rejections() {
        let cfg = parse(&[]).expect("defaults");
        assert_eq!(cfg.name, "digits");
        assert_eq!(cfg.listen.port(), DEFAULT_PORT);
        assert!(parse(&["--sha256", "xyz"]).is_err());
        assert!(parse(&["--max-batch-size", "0"]).is_err());
        assert!(parse(&["--io-threads", "0"]).is_err());
        assert!(parse(&["--max-connections", "0"]).is_err());
        assert_eq!(
            cfg.idle_timeout,
            Duration::from_secs(DEFAULT_IDLE_TIMEOUT_SECS)
        );
        assert!(parse(&["--idle-timeout-secs", "0"]).is_ok_and(|c| c.idle_timeout.is_zero()));
        assert!(parse(&["--workers", "1", "--io-threads", "3"]).is_ok_and(|c| c.io_threads == 3));
        assert!(parse(&["--max-batch-size", "64", "--max-queue", "8"]).is_err());
        assert!(parse(&["--preprocess", "{not json"]).is_err());
        assert!(parse(&["--calibrate", "false"]).is_ok_and(|c| !c.calibrate));
    }
}
