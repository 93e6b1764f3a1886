//! Shared server state: the configuration, the loaded model (once ready), readiness, draining
//! and the in-flight count that graceful shutdown waits on.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::HeaderValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::batcher::{Batcher, BatcherLimits};
use crate::config::Config;
use crate::engine::Engine;
use crate::errors::{RequestError, RequestResult, StartupError, StartupResult};
use crate::idle_poll::IdlePoller;
use crate::metrics::Metrics;
use crate::model_source;
use crate::postprocess::Postprocessor;
use crate::preprocess;

/// How often a draining server checks whether in-flight requests are done: short against a
/// request's latency, long enough to cost nothing.
pub const DEFAULT_DRAIN_POLL: Duration = Duration::from_millis(10);

/// A model ready to serve.
pub struct LoadedModel {
    /// The compiled model.
    pub engine: Arc<Engine>,
    /// Its queue and workers.
    pub batcher: Batcher,
    /// Built-in post-processing, if configured.
    pub postprocess: Option<Postprocessor>,
}

/// State shared by every connection.
pub struct AppState {
    /// Settings.
    pub config: Config,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The model name as a response header value, built once; `None` if the name is not a
    /// valid header value (the header is then left out).
    pub model_header: Option<HeaderValue>,
    /// Bytes of request bodies held now, bounded by `--memory-budget-bytes`.
    pub memory: MemoryBudget,
    /// Image decodes running at once, off the I/O threads: one per worker, so decoding can
    /// take no more CPU than inference and a burst of images queues instead of piling threads.
    pub decode_slots: Arc<Semaphore>,
    model: OnceLock<Arc<LoadedModel>>,
    /// Shutting down: not ready, answers close their connections.
    draining: AtomicBool,
    /// Past the drain delay: new requests are refused.
    refusing: AtomicBool,
    inflight: AtomicUsize,
    load: Load,
    /// Inference requests answered (admitted, then done), for the signals.
    requests: AtomicU64,
    idle_poll: Option<IdlePoller>,
}

/// Marks one inference request in flight until dropped (also when the caller goes away).
pub struct InflightGuard<'a> {
    state: &'a AppState,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.state.inflight.fetch_sub(1, Ordering::SeqCst);
        self.state.metrics.add_inflight(-1);
        self.state.load.change(-1);
        self.state.requests.fetch_add(1, Ordering::Relaxed);
    }
}

/// In-flight requests integrated over time (the autoscaler's concurrency signal): updated at
/// each admission and answer, so a mean over any interval counts requests shorter than the
/// interval between two reads.
#[derive(Debug)]
struct LoadIntegral {
    level: i64,
    seconds: f64,
    since: Instant,
}

#[derive(Debug)]
struct Load(std::sync::Mutex<LoadIntegral>);

impl Load {
    fn new() -> Self {
        Self(std::sync::Mutex::new(LoadIntegral {
            level: 0,
            seconds: 0.0,
            since: Instant::now(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LoadIntegral> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn change(&self, delta: i64) {
        let now = Instant::now();
        let mut l = self.lock();
        l.seconds += l.level as f64 * now.saturating_duration_since(l.since).as_secs_f64();
        l.since = now;
        l.level += delta;
    }

    /// Request-seconds up to now.
    fn seconds(&self) -> f64 {
        let l = self.lock();
        l.seconds + l.level as f64 * l.since.elapsed().as_secs_f64()
    }
}

/// The memory budget of request bodies: bytes are taken as a body arrives and given back when
/// its request is answered (the permit is dropped).
pub struct MemoryBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl MemoryBudget {
    fn new(total: usize) -> Self {
        Self {
            bytes: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
            total,
        }
    }

    /// The whole budget.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Takes `n` more bytes into `held`, or fails at once: 413 if the budget could never hold
    /// them, 429 if it cannot now.
    pub fn take(&self, n: usize, held: &mut Option<OwnedSemaphorePermit>) -> RequestResult<()> {
        if n == 0 {
            return Ok(());
        }
        let have = held.as_ref().map_or(0, |p| p.num_permits());
        if have + n > self.total {
            return Err(RequestError::TooLarge(format!(
                "request body of at least {} bytes is over the memory budget of {} bytes",
                have + n,
                self.total
            )));
        }
        let full = || RequestError::MemoryFull {
            held: self.total.saturating_sub(self.bytes.available_permits()),
            budget: self.total,
            needed: have + n,
        };
        let more = u32::try_from(n)
            .ok()
            .and_then(|n| self.bytes.clone().try_acquire_many_owned(n).ok())
            .ok_or_else(full)?;
        match held {
            Some(p) => p.merge(more),
            None => *held = Some(more),
        }
        Ok(())
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.total.saturating_sub(self.bytes.available_permits())
    }
}

impl AppState {
    /// Fresh state for `config`, not ready yet.
    pub fn new(config: Config) -> Self {
        let metrics = Arc::new(Metrics::new(&config.name));
        let model_header = HeaderValue::from_str(&config.name).ok();
        let idle_poll = IdlePoller::start(config.idle_poll, metrics.idle_poll_counter());
        Self {
            memory: MemoryBudget::new(config.memory_budget),
            decode_slots: Arc::new(Semaphore::new(config.workers)),
            config,
            metrics,
            model_header,
            model: OnceLock::new(),
            draining: AtomicBool::new(false),
            refusing: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            load: Load::new(),
            requests: AtomicU64::new(0),
            idle_poll,
        }
    }

    /// The model, if loaded.
    pub fn model(&self) -> Option<&Arc<LoadedModel>> {
        self.model.get()
    }

    /// Marks an answered request for idle polling.
    pub fn answered(&self) {
        if let Some(p) = &self.idle_poll {
            p.touch();
        }
    }

    /// Whether other inference requests are being handled besides the caller's: the batcher
    /// then lets a small request wait one yield for company.
    pub fn others_in_flight(&self) -> bool {
        self.inflight() > 1
    }

    /// The load snapshot the autoscaler reads (see [`serval_api::signals`]).
    pub fn signals(&self) -> serval_api::signals::SidecarSignals {
        let model = self.model();
        serval_api::signals::SidecarSignals {
            model: self.config.name.clone(),
            ready: self.is_ready(),
            inflight: self.inflight() as u64,
            inflight_seconds: self.load.seconds(),
            queued_rows: model.map_or(0, |m| m.batcher.queued_rows() as u64),
            requests: self.requests.load(Ordering::Relaxed),
            rows: model.map_or(0, |m| m.batcher.rows_run()),
        }
    }

    /// Inference requests being handled now.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }

    /// Ready: loaded, warmed up, batcher running, not draining.
    pub fn is_ready(&self) -> bool {
        self.model.get().is_some() && !self.draining.load(Ordering::SeqCst)
    }

    /// Admits one inference request: counts it in flight first, then checks readiness, so a
    /// drain that saw zero in flight can never miss a request admitted after it.
    pub fn admit(&self) -> RequestResult<(InflightGuard<'_>, Arc<LoadedModel>)> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        self.metrics.add_inflight(1);
        self.load.change(1);
        let guard = InflightGuard { state: self };
        if self.refusing.load(Ordering::SeqCst) {
            return Err(RequestError::Draining);
        }
        let model = self.model.get().cloned().ok_or(RequestError::NotReady)?;
        Ok((guard, model))
    }

    /// Loads, verifies, compiles, calibrates and warms up the model, then starts the batcher.
    pub async fn load(&self) -> StartupResult<()> {
        let started = Instant::now();
        let cfg = self.config.clone();
        let bytes = model_source::fetch(&cfg.model, cfg.sha256.as_deref()).await?;
        let engine = tokio::task::spawn_blocking(move || {
            let mut engine = Engine::load(&bytes)?;
            engine.prepare(
                cfg.max_batch_size,
                cfg.calibrate,
                cfg.max_delay,
                cfg.calibration_time,
            )?;
            Ok::<_, StartupError>(engine)
        })
        .await
        .map_err(|e| StartupError::Engine(format!("model compilation panicked: {e}")))??;
        for p in engine.curve() {
            self.metrics
                .calibration_point(p.batch_size, p.rows_per_second, p.kept);
        }
        if let Some(img) = self
            .config
            .preprocess
            .as_ref()
            .and_then(|p| p.image.as_ref())
        {
            let [input] = engine.inputs() else {
                return Err(StartupError::Config(format!(
                    "image pre-processing needs a model with one input, this one has {}",
                    engine.inputs().len()
                )));
            };
            // Refuse at start-up a config every image request would fail with.
            let shape = preprocess::tensor_shape(img);
            let fits = input.shape.len() == shape.len()
                && input
                    .shape
                    .iter()
                    .zip(&shape)
                    .skip(1)
                    .all(|(s, d)| s.is_none_or(|s| s == *d));
            if !fits {
                return Err(StartupError::Config(format!(
                    "image pre-processing makes tensors of shape {shape:?}, the model input {:?} is {}",
                    input.name,
                    crate::engine::shape_string(&input.shape)
                )));
            }
        }
        let postprocess = self
            .config
            .postprocess
            .clone()
            .map(|p| Postprocessor::new(p, engine.outputs()))
            .transpose()?;
        let engine = Arc::new(engine);
        let limits = BatcherLimits {
            max_batch: self
                .config
                .max_batch_size
                .min(engine.max_plan_size())
                .max(1),
            max_queue: self.config.max_queue,
            max_queue_delay: self.config.max_queue_delay,
            workers: self.config.workers,
            inline_max_run: self.config.inline_max_run,
        };
        let batcher = Batcher::start(engine.clone(), self.metrics.clone(), limits)
            .map_err(|e| StartupError::Engine(format!("cannot start workers: {e}")))?;
        let elapsed = started.elapsed();
        self.metrics.set_model_load(elapsed);
        tracing::info!(
            model = %self.config.name,
            inputs = ?engine.inputs(),
            outputs = ?engine.outputs(),
            batch_sizes = ?engine.batch_sizes(),
            workers = limits.workers,
            load_ms = elapsed.as_millis() as u64,
            "model ready"
        );
        let _ = self.model.set(Arc::new(LoadedModel {
            engine,
            batcher,
            postprocess,
        }));
        self.metrics.set_ready(self.is_ready());
        Ok(())
    }

    /// Whether a shutdown has begun: answers then close their connections, so clients and
    /// load balancers reconnect to other replicas.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Graceful shutdown. Stops reporting ready at once but keeps serving for `min`: until
    /// load balancers see the replica gone (kube-proxy, a router's pool), requests still
    /// arrive, including on connections opened before, and refusing them would fail them.
    /// Then refuses new requests (503) and waits, up to `timeout` in all, for those in flight.
    /// Returns whether everything finished in time.
    pub async fn drain(&self, min: Duration, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        self.draining.store(true, Ordering::SeqCst);
        self.metrics.set_ready(false);
        tokio::time::sleep(min.min(timeout)).await;
        self.refusing.store(true, Ordering::SeqCst);
        while self.inflight.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= until {
                tracing::warn!(
                    inflight = self.inflight.load(Ordering::SeqCst),
                    "shutdown timeout with requests in flight"
                );
                return false;
            }
            tokio::time::sleep(DEFAULT_DRAIN_POLL).await;
        }
        true
    }
}
