//! The inference engine: an ONNX model compiled by tract into one fixed-size plan per batch size
//! in use, calibrated at start-up so that only batch sizes that raise throughput are kept.
//!
//! An open batch symbol makes tract several times slower on CNNs, so every batch runs on a plan
//! compiled for exactly its size. Plans are `Send + Sync` and shared by all workers.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;
use tract_onnx::tract_hir::internal::DimLike;

use crate::errors::{StartupError, StartupResult};

/// A batch size must raise rows/second by this factor over the best smaller size to be kept:
/// smaller gains are within timing noise and not worth the larger batch's latency.
pub const DEFAULT_MIN_BATCH_GAIN: f64 = 1.05;
/// Minimum timed runs per candidate batch size, so one slow run cannot decide alone.
pub const DEFAULT_MIN_CALIBRATION_RUNS: usize = 3;

/// A compiled, runnable plan for one batch size.
pub type Plan = Arc<TypedRunnableModel>;

/// Errors while running the model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The inputs do not fit the model.
    #[error("{0}")]
    Invalid(String),
    /// The server could not run the model (no plan, an output without its batch axis): a
    /// fault of this server, not of the request.
    #[error("model run failed: {0}")]
    Run(String),
    /// The graph itself refused the values of well-typed inputs (an out-of-range index, a
    /// shape an operator rejects): the plan ran at warm-up, so the input is the cause.
    #[error("{0}")]
    Rejected(String),
    /// tract panicked on the values (e.g. a gather index); the batch fails, the worker lives
    /// on. Attributed to the input for the same reason as [`EngineError::Rejected`].
    #[error("model run panicked: {0}")]
    Panic(String),
}

impl EngineError {
    /// Whether the request's values caused the failure (answered 422, not 500).
    pub fn caused_by_input(&self) -> bool {
        matches!(self, Self::Invalid(_) | Self::Rejected(_) | Self::Panic(_))
    }
}

/// Name, element type and shape of a model input or output. `None` dims vary per request
/// (the batch axis, or symbolic axes).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Tensor name as in the ONNX graph.
    pub name: String,
    /// Element type (TDim outputs are reported and returned as I64).
    pub datum_type: DatumType,
    /// Dimensions; axis 0 is the batch axis.
    pub shape: Vec<Option<usize>>,
}

/// How the model's batch axis behaves.
#[derive(Debug, Clone)]
enum BatchAxis {
    /// Axis 0 is the symbol, bound per plan.
    Symbolic(Symbol),
    /// The graph only accepts this many rows per run; smaller batches are zero-padded.
    Fixed(usize),
}

/// One measured point of the batch-size curve.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationPoint {
    /// Rows per run.
    pub batch_size: usize,
    /// Median time of one run.
    pub run_time: Duration,
    /// Rows per second at this size.
    pub rows_per_second: f64,
    /// Whether the size is kept for dispatch.
    pub kept: bool,
}

/// A loaded model with its plans.
pub struct Engine {
    model: TypedModel,
    batch: BatchAxis,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    plans: BTreeMap<usize, Plan>,
    /// Idle run states of each plan, reused from run to run (see [`StatePool`]).
    states: BTreeMap<usize, StatePool>,
    /// Measured time of one run of each kept plan (median when calibrated).
    run_times: BTreeMap<usize, Duration>,
    curve: Vec<CalibrationPoint>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("batch_sizes", &self.batch_sizes())
            .finish()
    }
}

fn compile_error(e: impl std::fmt::Display) -> StartupError {
    StartupError::Engine(format!("{e:#}"))
}

impl Engine {
    /// Parses and types the ONNX model. No plan is built yet: see [`Engine::prepare`].
    ///
    /// A graph that cannot be typed with a symbolic batch falls back to a fixed batch of 1.
    pub fn load(bytes: &[u8]) -> StartupResult<Self> {
        match Self::load_with(bytes, false) {
            Ok(engine) => Ok(engine),
            Err(symbolic) => {
                tracing::warn!(error = %symbolic, "model does not type with a symbolic batch; falling back to batch 1");
                Self::load_with(bytes, true).map_err(|fixed| {
                    StartupError::Engine(format!("{symbolic}; with a fixed batch of 1: {fixed}"))
                })
            }
        }
    }

    fn load_with(bytes: &[u8], force_batch_one: bool) -> StartupResult<Self> {
        let mut model = tract_onnx::onnx()
            .with_ignore_output_shapes(true)
            .with_ignore_value_info(true)
            .model_for_read(&mut &bytes[..])
            .map_err(compile_error)?;
        let n = model.sym("N");
        let mut fixed: Option<usize> = None;
        let mut symbolic = false;
        for i in 0..model.inputs.len() {
            let fact = model.input_fact(i).map_err(compile_error)?.clone();
            let name = model.node(model.inputs[i].node).name.clone();
            let dt = fact.datum_type.concretize().ok_or_else(|| {
                StartupError::Engine(format!("input {name:?} has no declared element type"))
            })?;
            if fact.shape.is_open() {
                return Err(StartupError::Engine(format!(
                    "input {name:?} has no declared rank"
                )));
            }
            let declared: Vec<Option<TDim>> = fact
                .shape
                .dims()
                .map(|d| d.concretize())
                .collect::<Vec<_>>();
            if declared.is_empty() {
                return Err(StartupError::Engine(format!(
                    "input {name:?} is a scalar: no batch axis"
                )));
            }
            let mut dims: TVec<TDim> = TVec::new();
            for (axis, d) in declared.iter().enumerate() {
                let concrete = d.as_ref().and_then(|d| d.to_i64().ok());
                let dim = if axis == 0 {
                    match concrete {
                        Some(b) if !force_batch_one => {
                            let b = usize::try_from(b).unwrap_or(1).max(1);
                            if fixed.is_some_and(|f| f != b) {
                                return Err(StartupError::Engine(
                                    "inputs declare different fixed batch sizes".into(),
                                ));
                            }
                            fixed = Some(b);
                            TDim::from(b as i64)
                        }
                        _ if force_batch_one => {
                            fixed = Some(1);
                            TDim::from(1)
                        }
                        _ => {
                            symbolic = true;
                            TDim::from(n.clone())
                        }
                    }
                } else {
                    match concrete {
                        Some(v) => TDim::from(v),
                        None => TDim::from(model.sym(&format!("{name}_{axis}"))),
                    }
                };
                dims.push(dim);
            }
            model
                .set_input_fact(i, InferenceFact::dt_shape(dt, dims))
                .map_err(compile_error)?;
        }
        if symbolic && fixed.is_some() {
            return Err(StartupError::Engine(
                "some inputs have a fixed batch axis and others a variable one".into(),
            ));
        }
        let batch = match fixed {
            Some(b) => BatchAxis::Fixed(b),
            None => BatchAxis::Symbolic(n),
        };
        // Names come from the ONNX graph: decluttering may merge an output into its input.
        let label = |o: &OutletId| {
            model
                .outlet_label(*o)
                .map(str::to_owned)
                .unwrap_or_else(|| model.node(o.node).name.clone())
        };
        let input_names: Vec<String> = model.inputs.iter().map(label).collect();
        let output_names: Vec<String> = model.outputs.iter().map(label).collect();
        let typed = model
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .map_err(compile_error)?;
        let inputs = typed
            .inputs
            .iter()
            .zip(input_names)
            .map(|(o, name)| spec_of(&typed, *o, name))
            .collect::<StartupResult<Vec<_>>>()?;
        let outputs = typed
            .outputs
            .iter()
            .zip(output_names)
            .map(|(o, name)| spec_of(&typed, *o, name))
            .collect::<StartupResult<Vec<_>>>()?;
        Ok(Self {
            model: typed,
            batch,
            inputs,
            outputs,
            plans: BTreeMap::new(),
            states: BTreeMap::new(),
            run_times: BTreeMap::new(),
            curve: Vec::new(),
        })
    }

    /// The model's inputs.
    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    /// The model's outputs.
    pub fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    /// Batch sizes with a plan, ascending.
    pub fn batch_sizes(&self) -> Vec<usize> {
        self.plans.keys().copied().collect()
    }

    /// The measured batch-size curve (empty without calibration).
    pub fn curve(&self) -> &[CalibrationPoint] {
        &self.curve
    }

    /// Whether the graph only runs a fixed number of rows.
    pub fn fixed_batch(&self) -> Option<usize> {
        match self.batch {
            BatchAxis::Fixed(b) => Some(b),
            BatchAxis::Symbolic(_) => None,
        }
    }

    /// Builds the plans to dispatch with and warms them up.
    ///
    /// Candidates are the powers of two up to `max_batch` (and `max_batch` itself). With
    /// `calibrate`, each is timed for `time_per_size`, in alternation with the best size kept
    /// so far, and kept only if it raises rows/second by [`DEFAULT_MIN_BATCH_GAIN`] over that
    /// size in the same window and one run takes at most `max_delay` longer than a run of one
    /// row; otherwise every candidate is kept (each timed once, see [`Engine::run_time`]). A
    /// fixed-batch graph has one plan.
    pub fn prepare(
        &mut self,
        max_batch: usize,
        calibrate: bool,
        max_delay: Duration,
        time_per_size: Duration,
    ) -> StartupResult<()> {
        let candidates = match self.batch {
            BatchAxis::Fixed(b) => vec![b],
            BatchAxis::Symbolic(_) => candidate_sizes(max_batch),
        };
        self.plans.clear();
        self.states.clear();
        self.run_times.clear();
        self.curve.clear();
        let mut best: Option<(f64, Duration)> = None; // (rows/s, run time of the smallest size)
        // The best size kept so far, re-timed next to each candidate (see below).
        let mut best_plan: Option<(usize, Plan, Vec<TValue>)> = None;
        let mut misses = 0;
        for size in candidates {
            let started = Instant::now();
            let plan = self.build_plan(size)?;
            let build_time = started.elapsed();
            let sample: Vec<TValue> = self
                .sample_inputs(size)?
                .into_iter()
                .map(IntoTValue::into_tvalue)
                .collect();
            // The first run also warms caches and the allocator: never timed.
            self.run_plan(&plan, sample.clone())
                .map_err(|e| StartupError::Engine(format!("warm-up at batch {size}: {e}")))?;
            if !calibrate {
                // One timed run, so the batcher knows which sizes are cheap enough to run on
                // the caller's thread.
                let t = Instant::now();
                self.run_plan(&plan, sample.clone())
                    .map_err(|e| StartupError::Engine(format!("warm-up at batch {size}: {e}")))?;
                let run_time = t.elapsed();
                tracing::info!(
                    batch_size = size,
                    run_us = run_time.as_micros() as u64,
                    build_ms = build_time.as_millis() as u64,
                    "plan ready"
                );
                self.states.insert(size, StatePool::new(&plan));
                self.plans.insert(size, plan);
                self.run_times.insert(size, run_time);
                continue;
            }
            // A candidate is timed in alternation with the best size so far, and compared with
            // that size's rate in the same window: on a shared machine the load changes between
            // windows by more than the gains being measured, enough to keep a CNN batch size
            // that is slower per row.
            let (run_time, best_rps) = match &best_plan {
                None => (self.time_plan(&plan, &sample, time_per_size)?, None),
                Some((best_size, bplan, bsample)) => {
                    let (t, tb) = self.time_pair(&plan, &sample, bplan, bsample, time_per_size)?;
                    (t, Some(*best_size as f64 / tb.as_secs_f64().max(1e-9)))
                }
            };
            let rows_per_second = size as f64 / run_time.as_secs_f64().max(1e-9);
            let kept = match (best, best_rps) {
                (Some((_, one_row)), Some(best_rps)) => {
                    rows_per_second >= best_rps * DEFAULT_MIN_BATCH_GAIN
                        && run_time <= one_row + max_delay
                }
                _ => true,
            };
            tracing::info!(
                batch_size = size,
                run_us = run_time.as_micros() as u64,
                rows_per_second = rows_per_second.round(),
                build_ms = build_time.as_millis() as u64,
                kept,
                "calibrated batch size"
            );
            self.curve.push(CalibrationPoint {
                batch_size: size,
                run_time,
                rows_per_second,
                kept,
            });
            if kept {
                let one_row = best.map_or(run_time, |(_, t)| t);
                best = Some((rows_per_second, one_row));
                best_plan = Some((size, plan.clone(), sample));
                self.states.insert(size, StatePool::new(&plan));
                self.plans.insert(size, plan);
                self.run_times.insert(size, run_time);
                misses = 0;
            } else {
                misses += 1;
                let too_slow = best.is_some_and(|(_, one_row)| run_time > one_row + max_delay);
                // Larger sizes only take longer; two misses in a row means the curve has turned.
                if too_slow || misses >= 2 {
                    break;
                }
            }
        }
        tracing::info!(batch_sizes = ?self.batch_sizes(), "engine ready");
        Ok(())
    }

    fn build_plan(&self, size: usize) -> StartupResult<Plan> {
        let model = match &self.batch {
            BatchAxis::Symbolic(n) => self
                .model
                .set_symbols(&SymbolValues::default().with(n, size as i64).to_dim_map())
                .map_err(compile_error)?,
            BatchAxis::Fixed(_) => self.model.clone(),
        };
        model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(compile_error)
    }

    fn time_plan(
        &self,
        plan: &Plan,
        sample: &[TValue],
        budget: Duration,
    ) -> StartupResult<Duration> {
        let mut times = Vec::new();
        let started = Instant::now();
        while times.len() < DEFAULT_MIN_CALIBRATION_RUNS || started.elapsed() < budget {
            let t = Instant::now();
            self.run_plan(plan, sample.to_vec())
                .map_err(|e| StartupError::Engine(format!("calibration: {e}")))?;
            times.push(t.elapsed());
        }
        times.sort();
        Ok(times[times.len() / 2])
    }

    /// Median run times of `a` and `b`, timed in alternation for `budget` in all (at least
    /// [`DEFAULT_MIN_CALIBRATION_RUNS`] each), so both see the same machine load.
    fn time_pair(
        &self,
        a: &Plan,
        sample_a: &[TValue],
        b: &Plan,
        sample_b: &[TValue],
        budget: Duration,
    ) -> StartupResult<(Duration, Duration)> {
        let (mut ta, mut tb) = (Vec::new(), Vec::new());
        let started = Instant::now();
        let run = |plan: &Plan, sample: &[TValue], times: &mut Vec<Duration>| {
            let t = Instant::now();
            self.run_plan(plan, sample.to_vec())
                .map_err(|e| StartupError::Engine(format!("calibration: {e}")))?;
            times.push(t.elapsed());
            Ok::<_, StartupError>(())
        };
        while ta.len() < DEFAULT_MIN_CALIBRATION_RUNS || started.elapsed() < budget {
            run(a, sample_a, &mut ta)?;
            run(b, sample_b, &mut tb)?;
        }
        ta.sort();
        tb.sort();
        Ok((ta[ta.len() / 2], tb[tb.len() / 2]))
    }

    /// Deterministic inputs of `rows` rows: values in [0, 1) for floats, zeros otherwise (zero
    /// is a valid index for gathers). Symbolic non-batch axes get length 1.
    pub fn sample_inputs(&self, rows: usize) -> StartupResult<Vec<Tensor>> {
        self.inputs
            .iter()
            .map(|spec| {
                let mut shape: Vec<usize> = spec.shape.iter().map(|d| d.unwrap_or(1)).collect();
                shape[0] = rows;
                let len: usize = shape.iter().product();
                let mut seed = 0x2545_f491_u32;
                let mut next = move || {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    (seed % 1000) as f32 / 1000.0
                };
                let t = match spec.datum_type {
                    DatumType::F32 => {
                        Tensor::from_shape(&shape, &(0..len).map(|_| next()).collect::<Vec<f32>>())
                    }
                    DatumType::F64 => Tensor::from_shape(
                        &shape,
                        &(0..len).map(|_| f64::from(next())).collect::<Vec<f64>>(),
                    ),
                    dt => Tensor::zero_dt(dt, &shape),
                };
                t.map_err(compile_error)
            })
            .collect()
    }

    /// Rows per plan run chosen for `rows` waiting rows: the largest planned size that fits,
    /// or the smallest size (padded) if none fits.
    pub fn dispatch_size(&self, rows: usize) -> usize {
        self.plans
            .range(..=rows)
            .next_back()
            .or_else(|| self.plans.iter().next())
            .map_or(1, |(size, _)| *size)
    }

    /// Measured time of one run of the plan for `size` rows, if there is one.
    pub fn run_time(&self, size: usize) -> Option<Duration> {
        self.run_times.get(&size).copied()
    }

    /// Expected time to run `rows` rows as [`Engine::infer`] would (split over the planned
    /// sizes), from the measured run times; zero before [`Engine::prepare`].
    pub fn predict(&self, rows: usize) -> Duration {
        let mut total = Duration::ZERO;
        let mut left = rows;
        while left > 0 {
            let size = self.dispatch_size(left);
            total += self.run_time(size).unwrap_or_default();
            left -= size.min(left);
        }
        total
    }

    /// Largest planned batch size.
    pub fn max_plan_size(&self) -> usize {
        self.plans.keys().next_back().copied().unwrap_or(1)
    }

    /// Checks request tensors against the model; returns the row count.
    pub fn check_inputs<T: std::borrow::Borrow<Tensor>>(
        &self,
        tensors: &[T],
    ) -> Result<usize, EngineError> {
        if tensors.len() != self.inputs.len() {
            return Err(EngineError::Invalid(format!(
                "model takes {} inputs, got {}",
                self.inputs.len(),
                tensors.len()
            )));
        }
        let mut rows = None;
        for (t, spec) in tensors.iter().zip(&self.inputs) {
            let t: &Tensor = t.borrow();
            if t.datum_type() != spec.datum_type {
                return Err(EngineError::Invalid(format!(
                    "input {:?} has element type {:?}, the model expects {:?}",
                    spec.name,
                    t.datum_type(),
                    spec.datum_type
                )));
            }
            let shape_ok = t.rank() == spec.shape.len()
                && t.shape()
                    .iter()
                    .zip(&spec.shape)
                    .skip(1)
                    .all(|(d, s)| s.is_none_or(|s| s == *d));
            if !shape_ok || t.rank() == 0 {
                return Err(EngineError::Invalid(format!(
                    "input {:?} has shape {:?}, the model expects {}",
                    spec.name,
                    t.shape(),
                    shape_string(&spec.shape)
                )));
            }
            match rows {
                None => rows = Some(t.shape()[0]),
                Some(r) if r != t.shape()[0] => {
                    return Err(EngineError::Invalid(
                        "inputs have different batch sizes".into(),
                    ));
                }
                Some(_) => {}
            }
        }
        match rows {
            Some(0) | None => Err(EngineError::Invalid(
                "a request needs at least one row".into(),
            )),
            Some(r) => Ok(r),
        }
    }

    /// Runs any number of rows (axis 0 of every input), split over the planned sizes and padded
    /// where needed. This is also the reference the server's answers are tested against.
    pub fn infer(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        self.infer_values(inputs.into_iter().map(IntoTValue::into_tvalue).collect())
    }

    /// [`Engine::infer`] on shared tensors: a batch that is exactly one plan size runs without
    /// copying its inputs.
    pub fn infer_values(&self, inputs: Vec<TValue>) -> Result<Vec<Tensor>, EngineError> {
        let rows = self.check_inputs(&inputs)?;
        if self.dispatch_size(rows) == rows {
            return self.run_size(rows, inputs);
        }
        let mut start = 0;
        let mut parts: Vec<Vec<Tensor>> = Vec::new();
        while start < rows {
            let size = self.dispatch_size(rows - start);
            let take = size.min(rows - start);
            let chunk: Vec<TValue> = inputs
                .iter()
                .map(|t| {
                    let rows = t.slice(0, start, start + take).map_err(run_error)?;
                    pad_rows(&rows, size).map(IntoTValue::into_tvalue)
                })
                .collect::<Result<_, _>>()?;
            let out = self.run_size(size, chunk)?;
            let out = out
                .into_iter()
                .map(|t| {
                    if take == size {
                        Ok(t)
                    } else {
                        t.slice(0, 0, take).map_err(run_error)
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            parts.push(out);
            start += take;
        }
        if parts.len() == 1 {
            return Ok(parts.pop().unwrap_or_default());
        }
        (0..self.outputs.len())
            .map(|o| {
                let pieces: Vec<&Tensor> = parts.iter().map(|p| &p[o]).collect();
                Tensor::stack_tensors(0, &pieces).map_err(run_error)
            })
            .collect()
    }

    /// Runs exactly `size` rows on that size's plan.
    fn run_size(&self, size: usize, inputs: Vec<TValue>) -> Result<Vec<Tensor>, EngineError> {
        let plan = self
            .plans
            .get(&size)
            .ok_or_else(|| EngineError::Run(format!("no plan for batch size {size}")))?;
        let outputs = match self.states.get(&size) {
            Some(pool) => pool.run(plan, inputs)?,
            None => self.run_plan(plan, inputs)?,
        };
        for (t, spec) in outputs.iter().zip(&self.outputs) {
            if t.rank() == 0 || t.shape()[0] != size {
                return Err(EngineError::Run(format!(
                    "output {:?} has shape {:?}: no batch axis of {size} rows",
                    spec.name,
                    t.shape()
                )));
            }
        }
        Ok(outputs)
    }

    /// One plan run in a fresh state.
    fn run_plan(&self, plan: &Plan, inputs: Vec<TValue>) -> Result<Vec<Tensor>, EngineError> {
        let mut state = plan.spawn().map_err(run_error)?;
        run_state(&mut state, inputs)
    }
}

/// One run under `catch_unwind`: tract panics on some bad inputs (e.g. gather indices).
fn run_state(
    state: &mut TypedSimpleState,
    inputs: Vec<TValue>,
) -> Result<Vec<Tensor>, EngineError> {
    let values: TVec<TValue> = inputs.into_iter().collect();
    let result = catch_unwind(AssertUnwindSafe(|| state.run(values)));
    let outputs = match result {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(EngineError::Rejected(format!("{e:#}"))),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            return Err(EngineError::Panic(msg));
        }
    };
    outputs
        .into_iter()
        .map(|v| {
            let t = v.into_tensor();
            if t.datum_type() == DatumType::TDim {
                t.cast_to_dt(DatumType::I64)
                    .map(|c| c.into_owned())
                    .map_err(run_error)
            } else {
                Ok(t)
            }
        })
        .collect()
}

/// Run states of one plan kept between runs. Spawning a state per run (what `plan.run` does)
/// allocates per-node tables and starts a new session, whose matmul scratch space and
/// output-store memos tract then rebuilds: about 6 % of a small MLP request's instructions.
/// Only plans whose shapes are all concrete (nothing to resolve per run) and none of whose ops
/// keeps state between runs are pooled, so a kept state computes exactly what a fresh one
/// would. A state whose run failed or panicked is dropped, not kept.
struct StatePool {
    /// `None`: the plan does not qualify; every run gets a fresh state.
    idle: Option<Mutex<Vec<TypedSimpleState>>>,
}

impl StatePool {
    fn new(plan: &Plan) -> Self {
        let concrete = plan.model().nodes.iter().all(|n| {
            n.outputs
                .iter()
                .all(|o| o.fact.shape.as_concrete().is_some())
        });
        let idle = plan
            .spawn()
            .ok()
            .filter(|s| concrete && s.op_states.iter().all(Option::is_none))
            .map(|s| Mutex::new(vec![s]));
        Self { idle }
    }

    fn run(&self, plan: &Plan, inputs: Vec<TValue>) -> Result<Vec<Tensor>, EngineError> {
        let Some(idle) = &self.idle else {
            let mut state = plan.spawn().map_err(run_error)?;
            return run_state(&mut state, inputs);
        };
        let kept = idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut state = match kept {
            Some(s) => s,
            None => plan.spawn().map_err(run_error)?,
        };
        let outputs = run_state(&mut state, inputs)?;
        idle.lock().unwrap_or_else(|e| e.into_inner()).push(state);
        Ok(outputs)
    }
}

fn run_error(e: impl std::fmt::Display) -> EngineError {
    EngineError::Run(format!("{e:#}"))
}

/// Zero-pads axis 0 of `t` up to `rows`.
fn pad_rows(t: &Tensor, rows: usize) -> Result<Tensor, EngineError> {
    let have = t.shape().first().copied().unwrap_or(0);
    if have >= rows {
        return Ok(t.clone());
    }
    let mut shape = t.shape().to_vec();
    shape[0] = rows - have;
    let zeros = Tensor::zero_dt(t.datum_type(), &shape).map_err(run_error)?;
    Tensor::stack_tensors(0, &[t, &zeros]).map_err(run_error)
}

fn candidate_sizes(max_batch: usize) -> Vec<usize> {
    let max_batch = max_batch.max(1);
    let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |s| s.checked_mul(2))
        .take_while(|s| *s <= max_batch)
        .collect();
    if sizes.last() != Some(&max_batch) {
        sizes.push(max_batch);
    }
    sizes
}

fn spec_of(model: &TypedModel, outlet: OutletId, name: String) -> StartupResult<TensorSpec> {
    let fact = model.outlet_fact(outlet).map_err(compile_error)?;
    let datum_type = if fact.datum_type == DatumType::TDim {
        DatumType::I64
    } else {
        fact.datum_type
    };
    let shape = fact
        .shape
        .iter()
        .enumerate()
        .map(|(axis, d)| if axis == 0 { None } else { d.to_usize().ok() })
        .collect();
    Ok(TensorSpec {
        name,
        datum_type,
        shape,
    })
}

/// `[-1, 4]`-style rendering of a spec shape, as the V2 protocol writes variable axes.
pub fn shape_string(shape: &[Option<usize>]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|d| d.map_or_else(|| "-1".to_owned(), |d| d.to_string()))
        .collect();
    format!("[{}]", dims.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_powers_of_two_and_the_max() {
        assert_eq!(candidate_sizes(1), vec![1]);
        assert_eq!(candidate_sizes(8), vec![1, 2, 4, 8]);
        assert_eq!(candidate_sizes(24), vec![1, 2, 4, 8, 16, 24]);
    }

    /// Kept run states answer exactly as fresh ones, run after run. (A failed run drops its
    /// state: `an_engine_failure_answers_500_and_the_server_keeps_serving` covers a panic.)
    #[test]
    fn kept_states_answer_like_fresh_ones() {
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let bytes = std::fs::read(models.join("digits.onnx")).expect("digits.onnx");
        let mut engine = Engine::load(&bytes).expect("load");
        engine
            .prepare(4, false, Duration::ZERO, Duration::ZERO)
            .expect("prepare");
        assert!(
            engine.states.values().all(|p| p.idle.is_some()),
            "the MLP's plans should keep their states"
        );
        // Planned sizes only, so a fresh state of the same plan is the reference.
        for rows in [1, 4, 2, 1, 4, 2] {
            let inputs: Vec<Tensor> = engine
                .sample_inputs(rows)
                .expect("inputs")
                .iter()
                .map(|t| {
                    let v: Vec<f32> = t
                        .to_plain_array_view::<f32>()
                        .expect("f32")
                        .iter()
                        .map(|x| x * rows as f32)
                        .collect();
                    Tensor::from_shape(t.shape(), &v).expect("tensor")
                })
                .collect();
            let kept = engine.infer(inputs.clone()).expect("kept");
            let fresh = engine
                .run_plan(
                    &engine.plans[&rows],
                    inputs.into_iter().map(IntoTValue::into_tvalue).collect(),
                )
                .expect("fresh");
            assert_eq!(kept, fresh, "{rows} rows");
        }
    }
}
