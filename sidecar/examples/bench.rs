//! Sidecar benchmark (`make bench-sidecar`; not a test): req/s, p50 and p99 at several
//! concurrencies, for the raw in-process engine, the sidecar with calibrated batching, and the
//! sidecar with `maxBatchSize: 1`, all in the same run. Prints the ratios the issue asks for.
//!
//! `cargo run --release -p serval-sidecar --example bench -- [--seconds 3] [--concurrency 1,8,32,64]
//!  [--model path[:max_batch]]...` (defaults: models/digits.onnx and, if generated,
//!  ~/.cache/serval/models/mobilenetv2.onnx).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serval_sidecar::{Config, Engine, Sidecar};
use tract_onnx::prelude::Tensor;

struct Stats {
    rps: f64,
    p50: Duration,
    p99: Duration,
}

fn stats(mut lat: Vec<Duration>, elapsed: Duration) -> Stats {
    lat.sort();
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Stats {
        rps: lat.len() as f64 / elapsed.as_secs_f64(),
        p50: pick(0.5),
        p99: pick(0.99),
    }
}

fn fmt(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// One row of the model's input, and the binary V2 request body carrying it.
fn request(engine: &Engine) -> anyhow::Result<(Tensor, String, Vec<u8>)> {
    let t = engine.sample_inputs(1)?.remove(0);
    let spec = &engine.inputs()[0];
    let floats: Vec<f32> = t.to_plain_array_view::<f32>()?.iter().copied().collect();
    let head = serde_json::json!({
        "inputs": [{"name": spec.name, "shape": t.shape(), "datatype": "FP32",
                    "parameters": {"binary_data_size": floats.len() * 4}}],
        "parameters": {"binary_data_output": true}
    })
    .to_string();
    let mut body = head.as_bytes().to_vec();
    floats
        .iter()
        .for_each(|v| body.extend_from_slice(&v.to_le_bytes()));
    Ok((t, head.len().to_string(), body))
}

/// Raw engine: `threads` threads calling `infer` on one row in a loop.
fn bench_engine(engine: Arc<Engine>, input: Tensor, threads: usize, seconds: Duration) -> Stats {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (engine, input, stop) = (engine.clone(), input.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if engine.infer(vec![input.clone()]).is_ok() {
                        lat.push(t.elapsed());
                    }
                }
                lat
            })
        })
        .collect();
    std::thread::sleep(seconds);
    stop.store(true, Ordering::Relaxed);
    let lat: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_default())
        .collect();
    stats(lat, started.elapsed())
}

/// HTTP load: `concurrency` keep-alive clients posting the same request in a loop.
async fn bench_http(
    url: String,
    header_len: String,
    body: Vec<u8>,
    concurrency: usize,
    seconds: Duration,
) -> Stats {
    let body = bytes::Bytes::from(body);
    let started = Instant::now();
    let until = started + seconds;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (url, header_len, body) = (url.clone(), header_len.clone(), body.clone());
            tokio::spawn(async move {
                let c = reqwest::Client::new();
                let mut lat = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    let r = c
                        .post(&url)
                        .header("Inference-Header-Content-Length", &header_len)
                        .body(body.clone())
                        .send()
                        .await;
                    if let Ok(r) = r
                        && r.status() == 200
                        && r.bytes().await.is_ok()
                    {
                        lat.push(t.elapsed());
                    }
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap_or_default());
    }
    stats(lat, started.elapsed())
}

/// `(sum, count)` of a histogram in the sidecar's own metrics.
fn histogram(s: &Sidecar, name: &str) -> (f64, f64) {
    let text = s.state().metrics.encode();
    let value = |suffix: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}_{suffix}{{")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (value("sum"), value("count"))
}

/// Mean of a histogram between two snapshots, microseconds.
fn mean_us(before: (f64, f64), after: (f64, f64)) -> f64 {
    (after.0 - before.0) / (after.1 - before.1).max(1.0) * 1e6
}

async fn sidecar(model: &str, max_batch: usize) -> anyhow::Result<Sidecar> {
    let mut cfg = Config::for_model(model);
    cfg.max_batch_size = max_batch;
    cfg.drain_delay = Duration::ZERO;
    let s = Sidecar::start(cfg).await?;
    s.ready().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(s)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let seconds = Duration::from_secs_f64(arg("--seconds").map_or(Ok(3.0), |s| s.parse())?);
    let levels: Vec<usize> = arg("--concurrency")
        .unwrap_or_else(|| "1,8,32,64".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let mut models: Vec<(String, usize)> = args
        .iter()
        .enumerate()
        .filter(|(_, a)| *a == "--model")
        .filter_map(|(i, _)| args.get(i + 1))
        .map(|m| match m.rsplit_once(':') {
            Some((p, b)) if b.parse::<usize>().is_ok() => (p.to_owned(), b.parse().unwrap_or(32)),
            _ => (m.clone(), 32),
        })
        .collect();
    if models.is_empty() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        models.push((
            root.join("models/digits.onnx")
                .to_string_lossy()
                .into_owned(),
            32,
        ));
        let cnn = PathBuf::from(std::env::var("HOME").unwrap_or_default())
            .join(".cache/serval/models/mobilenetv2.onnx");
        if cnn.exists() {
            models.push((cnn.to_string_lossy().into_owned(), 8));
        } else {
            eprintln!(
                "note: {} missing (make -C models mobilenet); CNN skipped",
                cnn.display()
            );
        }
    }
    let workers = serval_sidecar::config::default_workers();
    for (model, max_batch) in models {
        println!(
            "\n== {model} (max batch {max_batch}, {workers} workers, {}s per point)",
            seconds.as_secs_f64()
        );
        let batched = sidecar(&model, max_batch).await?;
        let engine = batched
            .model()
            .ok_or_else(|| anyhow::anyhow!("no model"))?
            .engine
            .clone();
        println!("calibration: kept batch sizes {:?}", engine.batch_sizes());
        for p in engine.curve() {
            println!(
                "  b={:<4} {:>10.0} rows/s  run {}  kept={}",
                p.batch_size,
                p.rows_per_second,
                fmt(p.run_time),
                p.kept
            );
        }
        let (input, header_len, body) = request(&engine)?;
        let lone = bench_engine(engine.clone(), input.clone(), 1, seconds);
        let raw = bench_engine(engine.clone(), input, workers, seconds);
        println!(
            "raw engine, 1 thread:  {:>9.0} req/s  p50 {}  p99 {}",
            lone.rps,
            fmt(lone.p50),
            fmt(lone.p99)
        );
        println!(
            "raw engine, {workers} threads: {:>9.0} req/s  p50 {}  p99 {}",
            raw.rps,
            fmt(raw.p50),
            fmt(raw.p99)
        );
        let name = batched.state().config.name.clone();
        let url = |s: &Sidecar| format!("http://{}/v2/models/{name}/infer", s.local_addr());
        let mut batched_rows = Vec::new();
        let names = [
            "serval_request_duration_seconds",
            "serval_queue_wait_seconds",
            "serval_inference_seconds",
        ];
        for &c in &levels {
            let before: Vec<_> = names.iter().map(|n| histogram(&batched, n)).collect();
            batched_rows.push(
                bench_http(url(&batched), header_len.clone(), body.clone(), c, seconds).await,
            );
            if c == 1 {
                let after: Vec<_> = names.iter().map(|n| histogram(&batched, n)).collect();
                println!(
                    "server side at concurrency 1: request {:.0} us, of which queue wait {:.0} us and model run {:.0} us",
                    mean_us(before[0], after[0]),
                    mean_us(before[1], after[1]),
                    mean_us(before[2], after[2])
                );
            }
        }
        batched.shutdown();
        batched.wait().await;
        let single = sidecar(&model, 1).await?;
        let mut single_rows = Vec::new();
        for &c in &levels {
            single_rows
                .push(bench_http(url(&single), header_len.clone(), body.clone(), c, seconds).await);
        }
        single.shutdown();
        single.wait().await;
        println!(
            "{:>5} | {:>26} | {:>26} | batched/unbatched",
            "conc", "batched req/s p50 p99", "maxBatch=1 req/s p50 p99"
        );
        for (i, c) in levels.iter().enumerate() {
            let (b, u) = (&batched_rows[i], &single_rows[i]);
            println!(
                "{c:>5} | {:>8.0} {:>8} {:>8} | {:>8.0} {:>8} {:>8} | {:.2}",
                b.rps,
                fmt(b.p50),
                fmt(b.p99),
                u.rps,
                fmt(u.p50),
                fmt(u.p99),
                b.rps / u.rps.max(1e-9)
            );
        }
        let best = batched_rows.iter().map(|s| s.rps).fold(0.0, f64::max);
        println!(
            "ratio sidecar(best) / raw engine ({workers} threads): {:.2}",
            best / raw.rps.max(1e-9)
        );
        if let Some(first) = batched_rows.first() {
            let added = first.p50.saturating_sub(lone.p50);
            println!(
                "lone request: sidecar p50 {} vs model {} -> added {:.0} us",
                fmt(first.p50),
                fmt(lone.p50),
                added.as_secs_f64() * 1e6
            );
        }
    }
    Ok(())
}
