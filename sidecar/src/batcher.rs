//! The batcher: a bounded row queue in front of a pool of inference worker threads.
//!
//! Workers pull. An idle worker takes whatever is queued at once, so a lone request never waits
//! for a timer; while every worker is busy, rows accumulate and the next free worker takes a
//! full batch. At most `workers` batches run at once. When a slot is free and the model's run is
//! shorter than `inline_max_run`, the request runs on its caller's thread instead: for a
//! microsecond-scale model the two thread hand-offs (wake a worker, wake the caller back) would
//! cost more than the run. A lone request runs at once; when other requests are in flight, it
//! is queued and its task yields to the runtime once, so requests already read on that I/O
//! thread join the queue, and then it runs what gathered as one batch on its own thread (a
//! gathered batch), which is how a small model batches at all: with a slot free for each I/O
//! thread, nothing would otherwise ever wait. A gathered batch takes only requests submitted on
//! its own thread, and workers are not woken for rows a caller will lead: handing results to
//! another thread costs a wake-up, more than the run. A batch is sized to a planned batch size (see
//! [`Engine::dispatch_size`]), taking rows across requests and splitting large requests; each
//! caller collects exactly its rows.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tract_onnx::prelude::{IntoTValue, TValue, Tensor};

use crate::admission::{self, DrainRate, QueueView, Slowdown};
use crate::engine::{Engine, EngineError};
use crate::errors::{RequestError, RequestResult};
use crate::metrics::Metrics;

/// The rows of one request that one batch computed: its first row and the outputs.
type Piece = RequestResult<(usize, Vec<Tensor>)>;

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct BatcherLimits {
    /// Most rows per batch (further bounded by the largest plan).
    pub max_batch: usize,
    /// Most rows queued.
    pub max_queue: usize,
    /// Longest expected queue wait a request is admitted with (see [`crate::admission`]).
    pub max_queue_delay: Duration,
    /// Worker threads, and the bound on batches running at once.
    pub workers: usize,
    /// Longest measured run executed on the caller's thread when a slot is free.
    pub inline_max_run: Duration,
}

/// One request in the queue.
struct Job {
    inputs: Vec<Arc<Tensor>>,
    rows: usize,
    /// Shapes past the batch axis: only jobs with equal keys share a batch.
    key: Vec<Vec<usize>>,
    deadline: Instant,
    enqueued: Instant,
    /// The thread that submitted it: a gathered batch takes only its own thread's requests, so
    /// handing out results never wakes another thread.
    origin: ThreadId,
    tx: mpsc::UnboundedSender<Piece>,
}

struct Pending {
    job: Arc<Job>,
    next_row: usize,
    /// Its caller will lead a gathered batch for it: workers are not woken for its rows.
    led: bool,
}

impl Pending {
    fn remaining(&self) -> usize {
        self.job.rows - self.next_row
    }
}

struct Slice {
    job: Arc<Job>,
    start: usize,
    len: usize,
}

struct State {
    queue: VecDeque<Pending>,
    queued_rows: usize,
    /// Queued rows no caller will lead: the ones a worker must be woken for.
    unled_rows: usize,
    paused: bool,
    closed: bool,
    /// Batches running now, on workers or inline.
    running: usize,
}

struct Shared {
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    limits: BatcherLimits,
    /// Largest request (rows) whose run is short enough to run inline; 0: never.
    inline_rows: usize,
    /// Rows of a full batch: what the queue drains by.
    full_batch: usize,
    /// Calibrated run time of a full batch, fixed at start: only the slowdown moves.
    full_batch_time: Duration,
    /// How much slower runs are now than at calibration.
    slowdown: Slowdown,
    /// Rows run successfully, for the load signals.
    rows_run: std::sync::atomic::AtomicU64,
    state: Mutex<State>,
    work: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker never panics while holding the lock (inference runs outside it); if one
        // did, the queue is still consistent, so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits `rows` more rows behind the queue `st` holds now, or refuses them with the
    /// expected wait (see [`crate::admission`]).
    fn admit(&self, st: &State, rows: usize, deadline: Instant) -> RequestResult<()> {
        let rate = DrainRate {
            batch_rows: self.full_batch,
            batch_time: self.slowdown.scale(self.full_batch_time),
            workers: self.limits.workers,
        };
        let wait = rate.expected_wait(QueueView {
            queued_rows: st.queued_rows,
            running: st.running,
        });
        let own = self.slowdown.scale(self.engine.predict(rows));
        let left = deadline.saturating_duration_since(Instant::now());
        admission::admit(wait, own, self.limits.max_queue_delay, left).map_err(|budget| {
            RequestError::Overloaded {
                expected: wait,
                budget,
            }
        })
    }

    /// Records a successful run of `rows` rows that took `took`.
    fn ran(&self, rows: usize, took: Duration) {
        self.metrics.batch(rows, took);
        self.rows_run
            .fetch_add(rows as u64, std::sync::atomic::Ordering::Relaxed);
        self.slowdown.observe(self.engine.predict(rows), took);
    }
}

/// The request error for an engine error: the input's fault is a 4xx, the server's a 500.
fn request_error(e: &EngineError) -> RequestError {
    match e {
        EngineError::Invalid(m) => RequestError::Unprocessable(m.clone()),
        EngineError::Rejected(m) => RequestError::ModelRejected(m.clone()),
        EngineError::Panic(_) => RequestError::ModelRejected(e.to_string()),
        EngineError::Run(_) => RequestError::Inference(e.to_string()),
    }
}

/// Handle to the queue and its workers.
pub struct Batcher {
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

/// A submitted request's claim on its results.
pub struct Ticket {
    outcome: Outcome,
    rows: usize,
    deadline: Instant,
    budget: Duration,
}

/// Where a ticket's result comes from.
enum Outcome {
    /// Ran inline at submission.
    Done(RequestResult<Vec<Tensor>>),
    /// Queued: pieces arrive from the workers.
    Queued(mpsc::UnboundedReceiver<Piece>),
    /// Queued for a gathered batch that the caller runs after one yield, unless a worker or
    /// another caller's batch took its rows first.
    Gather {
        rx: mpsc::UnboundedReceiver<Piece>,
        leader: Leader,
    },
}

/// A caller's promise to lead a gathered batch for its job. Dropped (led or not, or with the
/// caller gone), it hands any of the job's rows still queued to the workers.
struct Leader {
    shared: Arc<Shared>,
    job: Arc<Job>,
}

impl Drop for Leader {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        let mut released = 0;
        if let Some(p) = st
            .queue
            .iter_mut()
            .find(|p| p.led && Arc::ptr_eq(&p.job, &self.job))
        {
            p.led = false;
            released = p.remaining();
        }
        st.unled_rows += released;
        let wake = released > 0 && !st.paused;
        drop(st);
        if wake {
            self.shared.work.notify_one();
        }
    }
}

/// A claimed run slot; released on drop (also if the run unwinds).
struct Slot<'a> {
    shared: &'a Shared,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.running -= 1;
        let wake = st.unled_rows > 0 && !st.paused;
        drop(st);
        if wake {
            // Requests queued while this slot was taken inline: a waiting worker takes them
            // (rows a caller will lead are left to it: waking a thread costs more than the run).
            self.shared.work.notify_one();
        }
    }
}

/// Largest row count whose dispatch runs no plan slower than `limit`.
fn inline_rows(engine: &Engine, limits: &BatcherLimits) -> usize {
    if limits.inline_max_run.is_zero() {
        return 0;
    }
    engine
        .batch_sizes()
        .into_iter()
        .take_while(|&size| {
            size <= limits.max_batch
                && engine
                    .run_time(size)
                    .is_some_and(|t| t <= limits.inline_max_run)
        })
        .last()
        .unwrap_or(0)
}

impl Batcher {
    /// Starts `limits.workers` worker threads over `engine`.
    pub fn start(
        engine: Arc<Engine>,
        metrics: Arc<Metrics>,
        limits: BatcherLimits,
    ) -> std::io::Result<Self> {
        let inline_rows = inline_rows(&engine, &limits);
        tracing::debug!(inline_rows, "requests up to this many rows may run inline");
        let full_batch = engine.dispatch_size(limits.max_batch).min(limits.max_batch);
        let full_batch_time = engine.predict(full_batch);
        let shared = Arc::new(Shared {
            engine,
            metrics,
            limits,
            inline_rows,
            full_batch,
            full_batch_time,
            slowdown: Slowdown::default(),
            rows_run: std::sync::atomic::AtomicU64::new(0),
            state: Mutex::new(State {
                queue: VecDeque::new(),
                queued_rows: 0,
                unled_rows: 0,
                paused: false,
                closed: false,
                running: 0,
            }),
            work: Condvar::new(),
        });
        let mut workers = Vec::with_capacity(limits.workers);
        for i in 0..limits.workers {
            let shared = shared.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("serval-worker-{i}"))
                    .spawn(move || worker_loop(&shared))?,
            );
        }
        Ok(Self {
            shared,
            workers: Mutex::new(workers),
        })
    }

    /// Queues a request, or rejects it at once: 422 if it does not fit the model, 413 if it
    /// can never fit the queue, 429 if the queue is full now, 503 when draining.
    /// `others_in_flight`: other requests are being handled now, so a small request waits one
    /// yield for company (a gathered batch) instead of running alone at once.
    pub fn submit(
        &self,
        inputs: Vec<Tensor>,
        deadline: Instant,
        others_in_flight: bool,
    ) -> RequestResult<Ticket> {
        let rows = self
            .shared
            .engine
            .check_inputs(&inputs)
            .map_err(|e| RequestError::Unprocessable(e.to_string()))?;
        let bound = self.shared.limits.max_queue;
        if rows > bound {
            return Err(RequestError::TooLarge(format!(
                "request has {rows} rows, more than the queue bound of {bound}"
            )));
        }
        let now = Instant::now();
        let budget = deadline.saturating_duration_since(now);
        // Gathering pays only when a batch can hold more than one row.
        let gather = others_in_flight && self.shared.inline_rows > 1;
        if rows <= self.shared.inline_rows && !gather {
            let mut st = self.shared.lock();
            if st.closed {
                return Err(RequestError::Draining);
            }
            if !st.paused && st.queue.is_empty() && st.running < self.shared.limits.workers {
                st.running += 1;
                drop(st);
                let slot = Slot {
                    shared: &self.shared,
                };
                let result = if deadline <= now {
                    Err(RequestError::DeadlineExceeded(budget))
                } else {
                    run_inline(&self.shared, inputs, rows)
                };
                drop(slot);
                return Ok(Ticket {
                    outcome: Outcome::Done(result),
                    rows,
                    deadline,
                    budget,
                });
            }
        }
        let key = inputs.iter().map(|t| t.shape()[1..].to_vec()).collect();
        let inputs = inputs.into_iter().map(Arc::new).collect();
        let (tx, rx) = mpsc::unbounded_channel();
        let job = Arc::new(Job {
            inputs,
            rows,
            key,
            deadline,
            enqueued: now,
            origin: std::thread::current().id(),
            tx,
        });
        let gathering = {
            let mut st = self.shared.lock();
            if st.closed {
                return Err(RequestError::Draining);
            }
            if st.queued_rows + rows > bound {
                return Err(RequestError::QueueFull {
                    queued: st.queued_rows,
                    bound,
                });
            }
            self.shared.admit(&st, rows, deadline)?;
            // The caller leads its own batch if a slot is free for it now; otherwise the next
            // free slot's worker takes the rows.
            let led = gather
                && rows <= self.shared.inline_rows
                && !st.paused
                && st.running < self.shared.limits.workers;
            st.queue.push_back(Pending {
                job: job.clone(),
                next_row: 0,
                led,
            });
            st.queued_rows += rows;
            if !led {
                st.unled_rows += rows;
            }
            self.shared.metrics.set_queue_depth(st.queued_rows);
            led
        };
        let outcome = if gathering {
            Outcome::Gather {
                rx,
                leader: Leader {
                    shared: self.shared.clone(),
                    job,
                },
            }
        } else {
            self.shared.work.notify_one();
            Outcome::Queued(rx)
        };
        Ok(Ticket {
            outcome,
            rows,
            deadline,
            budget,
        })
    }

    /// Refuses at once (before its body is read) a request of `rows` rows that the queue as it
    /// stands now could not admit: 429 if the expected wait passes its budget, 503 draining.
    pub fn check_admission(&self, rows: usize, deadline: Instant) -> RequestResult<()> {
        let st = self.shared.lock();
        if st.closed {
            return Err(RequestError::Draining);
        }
        self.shared.admit(&st, rows, deadline)
    }

    /// Rows run successfully since start.
    pub fn rows_run(&self) -> u64 {
        self.shared
            .rows_run
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Rows waiting now.
    pub fn queued_rows(&self) -> usize {
        self.shared.lock().queued_rows
    }

    /// Holds (true) or resumes (false) dispatch; queued requests keep their place. For
    /// maintenance and for tests that need a full queue without racing the workers.
    pub fn set_paused(&self, paused: bool) {
        self.shared.lock().paused = paused;
        self.shared.work.notify_all();
    }

    /// Stops taking requests; workers finish the queue, then exit.
    pub fn close(&self) {
        let mut st = self.shared.lock();
        st.closed = true;
        st.paused = false;
        drop(st);
        self.shared.work.notify_all();
    }

    /// Waits for the workers to exit (after [`Batcher::close`]). Blocking.
    pub fn join(&self) {
        let handles: Vec<_> =
            std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            if h.join().is_err() {
                tracing::error!("an inference worker panicked outside the engine");
            }
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.close();
    }
}

impl Ticket {
    /// Waits for every row, or until the deadline (504).
    pub async fn wait(self) -> RequestResult<Vec<Tensor>> {
        let mut rx = match self.outcome {
            Outcome::Done(result) => {
                // Same rule as a queued request: an answer after the deadline is a 504.
                if Instant::now() > self.deadline {
                    return Err(RequestError::DeadlineExceeded(self.budget));
                }
                return result;
            }
            Outcome::Queued(rx) => rx,
            Outcome::Gather { rx, leader } => {
                // Let the other requests this I/O thread has already read (and any that
                // arrived since) queue up first; the runtime polls the socket meanwhile.
                tokio::task::yield_now().await;
                lead(&leader.shared, &leader.job);
                drop(leader);
                rx
            }
        };
        let mut pieces: Vec<(usize, Vec<Tensor>)> = Vec::new();
        let mut got = 0;
        let deadline = tokio::time::Instant::from_std(self.deadline);
        while got < self.rows {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => return Err(RequestError::DeadlineExceeded(self.budget)),
                Ok(None) => {
                    return Err(RequestError::Inference(
                        "request dropped by the batcher".into(),
                    ));
                }
                Ok(Some(Err(e))) => return Err(e),
                Ok(Some(Ok((start, outputs)))) => {
                    got += outputs
                        .first()
                        .map_or(0, |t| t.shape().first().copied().unwrap_or(0));
                    pieces.push((start, outputs));
                }
            }
        }
        if pieces.len() == 1 {
            return Ok(pieces.pop().map(|(_, o)| o).unwrap_or_default());
        }
        pieces.sort_by_key(|(start, _)| *start);
        let outputs = pieces.first().map_or(0, |(_, o)| o.len());
        (0..outputs)
            .map(|i| {
                let parts: Vec<&Tensor> = pieces.iter().map(|(_, o)| &o[i]).collect();
                Tensor::stack_tensors(0, &parts).map_err(|e| RequestError::Inference(e.to_string()))
            })
            .collect()
    }
}

/// Runs one request on the caller's thread (its slot is already claimed).
fn run_inline(shared: &Shared, inputs: Vec<Tensor>, rows: usize) -> RequestResult<Vec<Tensor>> {
    shared.metrics.queue_wait(Duration::ZERO);
    let started = Instant::now();
    let result = shared
        .engine
        .infer_values(inputs.into_iter().map(IntoTValue::into_tvalue).collect());
    match result {
        Ok(outputs) => {
            shared.ran(rows, started.elapsed());
            Ok(outputs)
        }
        Err(e) => {
            failed(&e, rows);
            Err(request_error(&e))
        }
    }
}

/// Runs one gathered batch of this thread's requests if `job` still has rows queued and a slot
/// is free; otherwise (or if rows are left after it) a worker or a later leader takes over.
fn lead(shared: &Shared, job: &Arc<Job>) {
    let batch = {
        let mut st = shared.lock();
        if !st.queue.iter().any(|p| Arc::ptr_eq(&p.job, job)) {
            // Another caller's batch or a worker took the rows: the answer is on its way.
            return;
        }
        if st.paused || st.running >= shared.limits.workers {
            // The slot that frees next wakes a worker for the queue.
            return;
        }
        prune(shared, &mut st);
        let batch = take_batch_of(shared, &mut st, shared.inline_rows, Some(job.origin));
        st.running += 1;
        shared.metrics.set_queue_depth(st.queued_rows);
        batch
    };
    let slot = Slot { shared };
    if !batch.is_empty() {
        run_batch(shared, batch);
    }
    // Releasing the slot wakes a worker if rows are still queued (this caller's included).
    drop(slot);
}

fn worker_loop(shared: &Shared) {
    let mut ran = false;
    loop {
        let batch = {
            let mut st = shared.lock();
            if ran {
                st.running -= 1;
            }
            loop {
                prune(shared, &mut st);
                if !st.paused && st.queued_rows > 0 && st.running < shared.limits.workers {
                    break;
                }
                if st.closed && st.queued_rows == 0 {
                    return;
                }
                st = shared.work.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            let batch = take_batch(shared, &mut st, shared.limits.max_batch);
            st.running += 1;
            ran = true;
            shared.metrics.set_queue_depth(st.queued_rows);
            if st.unled_rows > 0 {
                // More work than this batch: let another idle worker start on it now.
                shared.work.notify_one();
            }
            batch
        };
        if !batch.is_empty() {
            run_batch(shared, batch);
        }
    }
}

/// Drops requests whose caller went away or whose deadline passed, before any inference.
fn prune(shared: &Shared, st: &mut State) {
    let now = Instant::now();
    let (mut dropped, mut unled) = (0, 0);
    st.queue.retain(|p| {
        let gone = p.job.tx.is_closed();
        let late = p.job.deadline <= now;
        if gone || late {
            dropped += p.remaining();
            if !p.led {
                unled += p.remaining();
            }
            if gone {
                shared.metrics.reject("cancelled");
            } else {
                let budget = p.job.deadline.saturating_duration_since(p.job.enqueued);
                let _ = p.job.tx.send(Err(RequestError::DeadlineExceeded(budget)));
            }
            false
        } else {
            true
        }
    });
    st.queued_rows -= dropped;
    st.unled_rows -= unled;
}

/// Takes the rows of the next batch (at most `max_rows`) from the queue front, across requests
/// with the head's row shape, splitting the last request taken if needed.
fn take_batch(shared: &Shared, st: &mut State, max_rows: usize) -> Vec<Slice> {
    take_batch_of(shared, st, max_rows, None)
}

/// [`take_batch`] over the requests submitted on thread `origin` only (all if `None`).
fn take_batch_of(
    shared: &Shared,
    st: &mut State,
    max_rows: usize,
    origin: Option<ThreadId>,
) -> Vec<Slice> {
    let mine = |p: &Pending| origin.is_none_or(|o| p.job.origin == o);
    let Some(head) = st.queue.iter().find(|p| mine(p)) else {
        return Vec::new();
    };
    let key = head.job.key.clone();
    let compatible: usize = st
        .queue
        .iter()
        .filter(|p| mine(p) && p.job.key == key)
        .map(Pending::remaining)
        .sum();
    let limit = compatible.min(max_rows);
    let take = shared.engine.dispatch_size(limit).min(limit);
    let mut slices = Vec::new();
    let (mut taken, mut unled) = (0, 0);
    let now = Instant::now();
    for p in st
        .queue
        .iter_mut()
        .filter(|p| origin.is_none_or(|o| p.job.origin == o) && p.job.key == key)
    {
        if taken == take {
            break;
        }
        let len = p.remaining().min(take - taken);
        if p.next_row == 0 {
            shared
                .metrics
                .queue_wait(now.saturating_duration_since(p.job.enqueued));
        }
        slices.push(Slice {
            job: p.job.clone(),
            start: p.next_row,
            len,
        });
        p.next_row += len;
        taken += len;
        if !p.led {
            unled += len;
        }
    }
    st.queue.retain(|p| p.remaining() > 0);
    st.queued_rows -= taken;
    st.unled_rows -= unled;
    slices
}

fn run_batch(shared: &Shared, slices: Vec<Slice>) {
    let rows: usize = slices.iter().map(|s| s.len).sum();
    let started = Instant::now();
    let result = assemble(&slices).and_then(|inputs| shared.engine.infer_values(inputs));
    match result {
        Ok(outputs) => {
            shared.ran(rows, started.elapsed());
            if let [only] = slices.as_slice() {
                // A closed channel means the caller left; nothing to do.
                let _ = only.job.tx.send(Ok((only.start, outputs)));
                return;
            }
            let mut offset = 0;
            for s in &slices {
                let piece = outputs
                    .iter()
                    .map(|t| t.slice(0, offset, offset + s.len))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| RequestError::Inference(e.to_string()));
                let _ = s.job.tx.send(piece.map(|p| (s.start, p)));
                offset += s.len;
            }
        }
        Err(e) if slices.len() > 1 => {
            // One request's bad input (e.g. an out-of-range index) must not fail its batch
            // neighbours: rerun each request's rows alone so only the culprit gets the error.
            tracing::warn!(error = %e, rows, requests = slices.len(), "batch failed; retrying its requests one by one");
            for s in slices {
                run_batch(shared, vec![s]);
            }
        }
        Err(e) => {
            failed(&e, rows);
            let error = request_error(&e);
            for s in &slices {
                let _ = s.job.tx.send(Err(error.clone()));
            }
        }
    }
}

/// Logs a failed run: a warning when the input was at fault (the caller gets a 4xx), an error
/// when the server was.
/// (Each caller's answer is counted under `serval_rejections_total` by the handler.)
fn failed(e: &EngineError, rows: usize) {
    if e.caused_by_input() {
        tracing::warn!(error = %e, rows, "the model refused a request's input");
    } else {
        tracing::error!(error = %e, rows, "batch failed");
    }
}

/// Concatenates the slices' rows into one tensor per input.
fn assemble(slices: &[Slice]) -> Result<Vec<TValue>, EngineError> {
    if let [only] = slices
        && only.start == 0
        && only.len == only.job.rows
    {
        return Ok(only
            .job
            .inputs
            .iter()
            .map(|t| TValue::from_const(t.clone()))
            .collect());
    }
    let inputs = slices.first().map_or(0, |s| s.job.inputs.len());
    (0..inputs)
        .map(|i| {
            // Whole requests are borrowed; only split ones are copied before stacking.
            let parts = slices
                .iter()
                .map(|s| {
                    let t: &Tensor = &s.job.inputs[i];
                    if s.start == 0 && s.len == s.job.rows {
                        Ok(Cow::Borrowed(t))
                    } else {
                        t.slice(0, s.start, s.start + s.len).map(Cow::Owned)
                    }
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| EngineError::Run(e.to_string()))?;
            Tensor::stack_tensors(0, &parts)
                .map(IntoTValue::into_tvalue)
                .map_err(|e| EngineError::Run(e.to_string()))
        })
        .collect()
}
