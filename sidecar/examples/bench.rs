//! Sidecar benchmark (`make bench-sidecar`; not a test): req/s, p50 and p99 at several
//! concurrencies, for the raw in-process engine, the sidecar with calibrated batching, and the
//! sidecar with `maxBatchSize: 1`, all in the same run. Prints the ratios the issue asks for.
//!
//! `cargo run --release -p serval-sidecar --example bench -- [--seconds 2] [--warmup 0.5]
//!  [--reps 3] [--concurrency 1,8,32,64] [--inline-max-micros N] [--idle-poll-micros N]
//!  [--model path[:max_batch]]...`
//! (defaults: models/digits.onnx and, if generated, ~/.cache/serval/models/mobilenetv2.onnx).
//!
//! Run it pinned to one CPU (`taskset -c 0 …`, as `make bench-sidecar` does for its second,
//! c = 1 pass) to read a lone request's cost without the machine's cross-CPU wake-ups: on a VM
//! each of the two a round trip takes (client → server → client) costs tens of µs that no
//! server code can remove. Pinned, the client's own CPU time is inside the figure instead.
//!
//! Shared, noisy machines: the three configurations are interleaved point by point (their order
//! rotates every repetition), every point has a warm-up whose completions are not counted, and
//! each figure is the median over the repetitions with its min–max. Ratios are taken per
//! repetition between points measured back to back, then summarised the same way. The sidecars
//! run on their own threads (as in their own process), the HTTP clients on another runtime; both share
//! the machine's cores, as a co-located client would. The raw engine runs on
//! `min(concurrency, workers)` threads: more threads than cores only add queueing.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serval_sidecar::{Config, Engine, Sidecar};
use tract_onnx::prelude::Tensor;

/// One measured point.
#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    rps: f64,
    p50: Duration,
    p99: Duration,
    /// Cores this process used on average during the point (clients included).
    cores: f64,
}

fn stats(mut lat: Vec<Duration>, window: Duration) -> Stats {
    lat.sort();
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Stats {
        rps: lat.len() as f64 / window.as_secs_f64(),
        p50: pick(0.5),
        p99: pick(0.99),
        cores: 0.0,
    }
}

/// Median and min–max of a sample.
#[derive(Clone, Copy, Debug)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(mut v: Vec<f64>) -> Spread {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Spread {
        median,
        min: v.first().copied().unwrap_or(f64::NAN),
        max: v.last().copied().unwrap_or(f64::NAN),
    }
}

fn ms(d: f64) -> String {
    if d < 1.0 {
        format!("{:.3}", d)
    } else {
        format!("{:.1}", d)
    }
}

/// One row of the model's input, and the binary V2 request body carrying it.
fn request(engine: &Engine) -> anyhow::Result<(Tensor, String, Bytes)> {
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
    Ok((t, head.len().to_string(), Bytes::from(body)))
}

/// Raw engine: `threads` threads calling `infer` on one row in a loop.
fn bench_engine(
    engine: Arc<Engine>,
    input: Tensor,
    threads: usize,
    warmup: Duration,
    window: Duration,
) -> Stats {
    let stop = Arc::new(AtomicBool::new(false));
    let from = Instant::now() + warmup;
    let until = from + window;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (engine, input, stop) = (engine.clone(), input.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if engine.infer(vec![input.clone()]).is_ok() {
                        let done = Instant::now();
                        if done >= from && done <= until {
                            lat.push(done - t);
                        }
                    }
                }
                lat
            })
        })
        .collect();
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
    stop.store(true, Ordering::Relaxed);
    let lat: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_default())
        .collect();
    stats(lat, window)
}

/// One keep-alive HTTP/1.1 client posting `body` in a loop until `until` (or, with an empty
/// `header_len`, sending `GET path`); latencies of the answers that complete within
/// `[from, until]`.
async fn client(
    addr: std::net::SocketAddr,
    path: String,
    header_len: String,
    body: Bytes,
    from: Instant,
    until: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let mut lat = Vec::new();
    let deadline = tokio::time::Instant::from_std(until);
    loop {
        let t = Instant::now();
        if t >= until {
            break;
        }
        let req = if header_len.is_empty() {
            http::Request::get(&path)
                .header(http::header::HOST, addr.to_string())
                .body(Full::new(Bytes::new()))?
        } else {
            http::Request::post(&path)
                .header(http::header::HOST, addr.to_string())
                .header("Inference-Header-Content-Length", &header_len)
                .header(http::header::CONTENT_LENGTH, body.len())
                .body(Full::new(body.clone()))?
        };
        let one = async {
            send.ready().await?;
            let resp = send.send_request(req).await?;
            let ok = resp.status() == 200;
            resp.into_body().collect().await?;
            anyhow::Ok(ok)
        };
        // Past the window the request is abandoned (the server drops it if still queued), so
        // the next point does not start with this one's backlog.
        match tokio::time::timeout_at(deadline, one).await {
            Ok(Ok(true)) => {
                let done = Instant::now();
                if done >= from {
                    lat.push(done - t);
                }
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => break,
        }
    }
    conn.abort();
    Ok(lat)
}

/// `concurrency` keep-alive clients against one sidecar.
async fn bench_http(
    addr: std::net::SocketAddr,
    path: &str,
    header_len: &str,
    body: &Bytes,
    concurrency: usize,
    warmup: Duration,
    window: Duration,
) -> Stats {
    let from = Instant::now() + warmup;
    let until = from + window;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            tokio::spawn(client(
                addr,
                path.to_owned(),
                header_len.to_owned(),
                body.clone(),
                from,
                until,
            ))
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(l)) => lat.extend(l),
            Ok(Err(e)) => eprintln!("client failed: {e:#}"),
            Err(e) => eprintln!("client panicked: {e}"),
        }
    }
    stats(lat, window)
}

/// The bare loopback TCP round trip, p50 in µs: `serval-loadgen --tcp-floor` (1 byte to an echo
/// thread and back over blocking sockets, no HTTP), the floor `bench/run.py` prints too. What
/// every request at c = 1 pays on this machine before any server code runs. The binary is
/// expected beside this example's directory (`make bench-sidecar` builds it); it inherits this
/// process's CPU affinity.
fn tcp_floor(warmup: Duration, window: Duration) -> anyhow::Result<f64> {
    use anyhow::Context;
    let loadgen = std::env::current_exe()?
        .parent()
        .and_then(std::path::Path::parent)
        .map(|release| release.join("serval-loadgen"))
        .context("no directory above this example's")?;
    let out = std::process::Command::new(&loadgen)
        .args(["--tcp-floor", "--warmup"])
        .arg(warmup.as_secs_f64().to_string())
        .arg("--duration")
        .arg(window.as_secs_f64().to_string())
        .output()
        .with_context(|| {
            format!(
                "running {} (cargo build --release -p serval-loadgen)",
                loadgen.display()
            )
        })?;
    anyhow::ensure!(
        out.status.success(),
        "serval-loadgen --tcp-floor failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    report["p50_us"]
        .as_f64()
        .context("serval-loadgen printed no p50_us")
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

async fn sidecar(
    model: &str,
    max_batch: usize,
    inline_max: Option<Duration>,
    idle_poll: Duration,
) -> anyhow::Result<Sidecar> {
    let mut cfg = Config::for_model(model);
    cfg.max_batch_size = max_batch;
    cfg.drain_delay = Duration::ZERO;
    cfg.idle_poll = idle_poll;
    if let Some(d) = inline_max {
        cfg.inline_max_run = d;
    }
    let s = Sidecar::start(cfg).await?;
    s.ready().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(s)
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Raw,
    Batched,
    Unbatched,
}

const KINDS: [Kind; 3] = [Kind::Raw, Kind::Batched, Kind::Unbatched];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let secs = |name: &str, default: f64| -> anyhow::Result<Duration> {
        Ok(Duration::from_secs_f64(
            arg(name).map_or(Ok(default), |s| s.parse())?,
        ))
    };
    let window = secs("--seconds", 2.0)?;
    let warmup = secs("--warmup", 0.5)?;
    let reps: usize = arg("--reps").map_or(Ok(3), |s| s.parse())?;
    let inline_max = arg("--inline-max-micros")
        .map(|s| s.parse().map(Duration::from_micros))
        .transpose()?;
    // The sidecar's opt-in idle polling (`--idle-poll-micros`), for both sidecars.
    let idle_poll = Duration::from_micros(arg("--idle-poll-micros").map_or(Ok(0), |s| s.parse())?);
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
    // The sidecars' accept loops and loaders; as in the binary, one thread (a multi-thread
    // runtime of one, so it runs without being blocked on). Requests are served on each
    // sidecar's own I/O threads.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sidecar-rt")
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("client-rt")
        .enable_all()
        .build()?;
    println!(
        "# sidecar benchmark: {workers} workers, {reps} repetitions x {:.1}s (+{:.1}s warm-up) per point, load at start: {}",
        window.as_secs_f64(),
        warmup.as_secs_f64(),
        load()
    );
    // `available_parallelism` follows the CPU affinity this process was started with.
    let pinned = workers == 1;
    if pinned {
        println!(
            "# pinned to one CPU: client, sidecar and raw engine share it, so no request crosses \
             CPUs (no cross-CPU wake-up); latencies include the client's own CPU time"
        );
    }
    if !idle_poll.is_zero() {
        println!(
            "# idle polling on in both sidecars: one SCHED_IDLE thread spins {} us after each answer",
            idle_poll.as_micros()
        );
    }
    for (model, max_batch) in models {
        // The file name only: the output is published, and the directory is this machine's.
        let file = std::path::Path::new(&model)
            .file_name()
            .map_or(model.clone(), |f| f.to_string_lossy().into_owned());
        println!("\n## {file} (max batch {max_batch})");
        let batched = server_rt.block_on(sidecar(&model, max_batch, inline_max, idle_poll))?;
        let single = server_rt.block_on(sidecar(&model, 1, inline_max, idle_poll))?;
        let engine = batched
            .model()
            .ok_or_else(|| anyhow::anyhow!("no model"))?
            .engine
            .clone();
        println!("calibration: kept batch sizes {:?}", engine.batch_sizes());
        for p in engine.curve() {
            println!(
                "  b={:<4} {:>10.0} rows/s  run {} ms  kept={}",
                p.batch_size,
                p.rows_per_second,
                ms(p.run_time.as_secs_f64() * 1e3),
                p.kept
            );
        }
        let (input, header_len, body) = request(&engine)?;
        let name = batched.state().config.name.clone();
        let path = format!("/v2/models/{name}/infer");
        let names = [
            "serval_request_duration_seconds",
            "serval_queue_wait_seconds",
            "serval_inference_seconds",
        ];
        // results[kind][level][rep]
        let mut results = vec![vec![Vec::<Stats>::new(); levels.len()]; KINDS.len()];
        let mut server_side: Vec<[f64; 3]> = Vec::new();
        // The transport floor: a liveness probe on one keep-alive connection to the same
        // server (loopback TCP, both threads' wake-ups, HTTP framing; no inference path).
        let mut floor: Vec<f64> = Vec::new();
        let mut tcp: Vec<f64> = Vec::new();
        // A slow model needs time to reach its steady queue at high concurrency (c requests
        // queued take c * run / workers to drain once): warm-up and window grow with that.
        let run1 = engine.run_time(1).unwrap_or_default();
        let queue_time = |c: usize| run1.mul_f64(c as f64 / workers as f64);
        for rep in 0..reps {
            for (li, &c) in levels.iter().enumerate() {
                let warmup = warmup + queue_time(c);
                let window = window.max(queue_time(c) * 3);
                for k in 0..KINDS.len() {
                    let kind = KINDS[(k + rep + li) % KINDS.len()];
                    let (cpu0, wall0) = (process_cpu(), Instant::now());
                    // Server-side histogram means over the point, for the batched sidecar at c=1.
                    let mut side = None;
                    let mut s = match kind {
                        Kind::Raw => bench_engine(
                            engine.clone(),
                            input.clone(),
                            c.min(workers),
                            warmup,
                            window,
                        ),
                        Kind::Batched | Kind::Unbatched => {
                            let sc = if kind == Kind::Batched {
                                &batched
                            } else {
                                &single
                            };
                            let before: Vec<_> = names.iter().map(|n| histogram(sc, n)).collect();
                            let s = client_rt.block_on(bench_http(
                                sc.local_addr(),
                                &path,
                                &header_len,
                                &body,
                                c,
                                warmup,
                                window,
                            ));
                            if c == 1 && kind == Kind::Batched {
                                let after: Vec<_> =
                                    names.iter().map(|n| histogram(sc, n)).collect();
                                side = Some([0, 1, 2].map(|i| mean_us(before[i], after[i])));
                            }
                            s
                        }
                    };
                    s.cores = (process_cpu() - cpu0) / wall0.elapsed().as_secs_f64();
                    // The floors, measured after the point so they count in neither its CPU
                    // nor its histograms.
                    if let Some(side) = side {
                        server_side.push(side);
                        let probe = client_rt.block_on(bench_http(
                            batched.local_addr(),
                            "/v2/health/live",
                            "",
                            &Bytes::new(),
                            1,
                            warmup.min(Duration::from_millis(200)),
                            window.min(Duration::from_secs(1)),
                        ));
                        floor.push(probe.p50.as_secs_f64() * 1e6);
                        match tcp_floor(
                            warmup.min(Duration::from_millis(200)),
                            window.min(Duration::from_secs(1)),
                        ) {
                            Ok(us) => tcp.push(us),
                            Err(e) => eprintln!("tcp floor failed: {e:#}"),
                        }
                    }
                    results[kind as usize][li].push(s);
                    // Let abandoned requests and their connections clear.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            eprintln!("repetition {} done, load {}", rep + 1, load());
        }
        batched.shutdown();
        single.shutdown();
        server_rt.block_on(async {
            batched.wait().await;
            single.wait().await;
        });

        let cell = |v: &[Stats]| {
            let r = spread(v.iter().map(|s| s.rps).collect());
            let p50 = spread(v.iter().map(|s| s.p50.as_secs_f64() * 1e3).collect());
            let p99 = spread(v.iter().map(|s| s.p99.as_secs_f64() * 1e3).collect());
            format!(
                "{:.0} ({:.0}–{:.0}) | {} | {}",
                r.median,
                r.min,
                r.max,
                ms(p50.median),
                ms(p99.median)
            )
        };
        println!(
            "\nmedian (min–max) req/s | p50 ms | p99 ms; raw engine on min(c, {workers}) threads"
        );
        println!(
            "| c | raw req/s | p50 | p99 | batched req/s | p50 | p99 | maxBatch=1 req/s | p50 | p99 |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for (li, c) in levels.iter().enumerate() {
            println!(
                "| {c} | {} | {} | {} |",
                cell(&results[Kind::Raw as usize][li]),
                cell(&results[Kind::Batched as usize][li]),
                cell(&results[Kind::Unbatched as usize][li]),
            );
        }
        let ratio = |a: Kind, b: Kind, li: usize| {
            spread(
                results[a as usize][li]
                    .iter()
                    .zip(&results[b as usize][li])
                    .map(|(x, y)| x.rps / y.rps.max(1e-9))
                    .collect(),
            )
        };
        // Requests per CPU-second of this process: other tenants change how much CPU a point
        // gets far more than they change what a request costs.
        let per_cpu = |a: Kind, b: Kind, li: usize| {
            spread(
                results[a as usize][li]
                    .iter()
                    .zip(&results[b as usize][li])
                    .map(|(x, y)| {
                        (x.rps / x.cores.max(1e-9)) / (y.rps / y.cores.max(1e-9)).max(1e-9)
                    })
                    .collect(),
            )
        };
        println!("\ncores used by this process per point, median (min–max), of {workers}:");
        for (li, c) in levels.iter().enumerate() {
            let cores = |k: Kind| spread(results[k as usize][li].iter().map(|s| s.cores).collect());
            let (r, b, u) = (
                cores(Kind::Raw),
                cores(Kind::Batched),
                cores(Kind::Unbatched),
            );
            println!(
                "  c={c:<3} raw {:.2} ({:.2}–{:.2})  batched {:.2} ({:.2}–{:.2})  maxBatch=1 {:.2} ({:.2}–{:.2})",
                r.median, r.min, r.max, b.median, b.min, b.max, u.median, u.min, u.max
            );
        }
        println!("\nratios per repetition (req/s; and req per CPU-second), median (min–max):");
        for (li, c) in levels.iter().enumerate() {
            let bu = ratio(Kind::Batched, Kind::Unbatched, li);
            let bu_cpu = per_cpu(Kind::Batched, Kind::Unbatched, li);
            let br = ratio(Kind::Batched, Kind::Raw, li);
            println!(
                "  c={c:<3} batched/unbatched {:.2} ({:.2}–{:.2}), per CPU-s {:.2} ({:.2}–{:.2})   sidecar/raw engine {:.2} ({:.2}–{:.2})",
                bu.median,
                bu.min,
                bu.max,
                bu_cpu.median,
                bu_cpu.min,
                bu_cpu.max,
                br.median,
                br.min,
                br.max
            );
        }
        // Best sidecar level against the raw engine on all workers, per repetition.
        let full = levels.iter().position(|&c| c >= workers);
        if let Some(full) = full {
            let best = spread(
                (0..reps)
                    .map(|r| {
                        let best = (0..levels.len())
                            .map(|li| results[Kind::Batched as usize][li][r].rps)
                            .fold(0.0, f64::max);
                        best / results[Kind::Raw as usize][full][r].rps.max(1e-9)
                    })
                    .collect(),
            );
            println!(
                "  sidecar (best concurrency) / raw engine ({workers} threads): {:.2} ({:.2}–{:.2})",
                best.median, best.min, best.max
            );
        }
        if let Some(l1) = levels.iter().position(|&c| c == 1) {
            for kind in [Kind::Batched, Kind::Unbatched] {
                let added = spread(
                    results[kind as usize][l1]
                        .iter()
                        .zip(&results[Kind::Raw as usize][l1])
                        .map(|(s, raw)| (s.p50.as_secs_f64() - raw.p50.as_secs_f64()) * 1e6)
                        .collect(),
                );
                println!(
                    "  lone request added latency ({kind:?} p50 - raw engine p50, one keep-alive connection): {:.0} us ({:.0}–{:.0})",
                    added.median, added.min, added.max
                );
            }
            let f = spread(floor.clone());
            println!(
                "  transport floor (GET /v2/health/live p50, same kind of connection): {:.0} us ({:.0}–{:.0})",
                f.median, f.min, f.max
            );
            let t = spread(tcp.clone());
            println!(
                "  bare loopback TCP round trip (serval-loadgen --tcp-floor: 1 byte, blocking sockets, no HTTP) p50: {:.0} us ({:.0}–{:.0}){}",
                t.median,
                t.min,
                t.max,
                if pinned {
                    ""
                } else {
                    "; pinned to one CPU (taskset -c 0) the cross-CPU wake-ups inside it vanish"
                }
            );
            let side = |i: usize| spread(server_side.iter().map(|s| s[i]).collect()).median;
            println!(
                "  server side at c=1 (batched, means): request {:.0} us, queue wait {:.0} us, model run {:.0} us",
                side(0),
                side(1),
                side(2)
            );
        }
        println!("load at end: {}", load());
    }
    Ok(())
}

/// CPU seconds (user + system) this process has used, from `/proc/self/stat` (0 elsewhere).
fn process_cpu() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name start at field 3; utime and stime are
    // fields 14 and 15, in clock ticks (100 per second on Linux).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(&stat[..0], |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The 1/5/15-minute load averages, for judging whether a run was disturbed.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
