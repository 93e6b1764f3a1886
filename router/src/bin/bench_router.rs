//! `bench-router`: added latency and throughput of the router versus calling the upstream
//! directly and versus nginx with the same 2-way 90/10 weighted split, in one run on loopback.
//!
//! Every server is its own process (two fake model servers, `serval-router`, nginx) so the
//! proxies compete for the CPU the same way; the load generator runs here. Not a test: it
//! prints numbers and ratios.
//!
//! Fairness: the router gets `--worker-threads W` and nginx `worker_processes W` (W =
//! `--workers`, default one per core). Targets are measured in rounds, each round in a
//! rotated order, and medians are reported, so a neighbour's burst on a shared machine does
//! not land on one target only. Besides req/s (which on a CPU-bound machine is set by every
//! process's CPU per request), each proxy's own CPU time per request (user + system, from
//! `/proc`) is reported: it is what a proxy can change, and it is far less noisy.
//!
//! Usage: `bench-router [--seconds N] [--concurrency N] [--latency-requests N] [--workers N]
//! [--rounds N]` (`bench-router upstream PORT` is the fake model server it starts for itself).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// What the fake model server answers: the size and shape of a post-processed OIP answer.
const ANSWER: &str = r#"{"model_name":"m","outputs":[{"name":"y","datatype":"FP32","shape":[1,10],"data":[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0]}]}"#;
/// A small OIP request, like one MNIST-sized row would be after compression.
const REQUEST: &str =
    r#"{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}"#;

struct Options {
    seconds: u64,
    concurrency: usize,
    latency_requests: usize,
    workers: usize,
    rounds: usize,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("upstream") {
        let port: u16 = args.get(2).context("upstream PORT")?.parse()?;
        return run_upstream(port);
    }
    if args.get(1).map(String::as_str) == Some("load") {
        // Load only, for profiling a server started by hand:
        // `load PORT SECONDS CONNECTIONS [PID]` (PID: whose CPU per request to report).
        let num = |i: usize, d: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
        let (port, seconds, connections) = (num(2, 8080) as u16, num(3, 10), num(4, 32));
        let pid = num(5, u64::from(std::process::id())) as u32;
        return tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(load_only(port, seconds, connections as usize, pid));
    }
    let mut o = Options {
        seconds: 5,
        concurrency: 32,
        latency_requests: 3000,
        workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
        rounds: 3,
    };
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let v = it.next().context("flag needs a value")?;
        match a.as_str() {
            "--seconds" => o.seconds = v.parse()?,
            "--concurrency" => o.concurrency = v.parse()?,
            "--latency-requests" => o.latency_requests = v.parse()?,
            "--workers" => o.workers = v.parse()?,
            "--rounds" => o.rounds = v.parse::<usize>()?.max(1),
            _ => bail!("unknown flag {a}"),
        }
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench(o))
}

/// A fake model server on one thread: answers every request with [`ANSWER`].
fn run_upstream(port: u16) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                        ANSWER.as_bytes(),
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

/// Stops its child process when dropped, so a failed run leaves nothing behind. SIGTERM
/// first: nginx's master only takes its workers down when it can handle the signal.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_listening(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} after 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// One target's numbers in one round.
#[derive(Clone, Copy)]
struct Sample {
    p50_us: f64,
    p99_us: f64,
    rps: f64,
    /// CPU time (user + system) of the serving process(es) per request in the req/s phase.
    cpu_us: Option<f64>,
    errors: u64,
}

/// A server under test: its port and the processes whose CPU time it costs.
struct Target {
    name: &'static str,
    port: u16,
    /// The process; for nginx the master, whose workers are its children.
    pid: u32,
    with_children: bool,
}

async fn bench(o: Options) -> Result<()> {
    let exe = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    let (pa, pb) = (free_port()?, free_port()?);
    let ua = Proc(
        Command::new(&exe)
            .args(["upstream", &pa.to_string()])
            .spawn()?,
    );
    let _ub = Proc(
        Command::new(&exe)
            .args(["upstream", &pb.to_string()])
            .spawn()?,
    );
    wait_listening(pa).await?;
    wait_listening(pb).await?;

    let table = dir.path().join("routing.json");
    std::fs::write(&table, routing_table(pa, pb))?;
    let router_bin = exe.with_file_name("serval-router");
    let start_router = |port: u16| -> Result<Proc> {
        Ok(Proc(
            Command::new(&router_bin)
                .args([
                    "--table",
                    &table.display().to_string(),
                    "--host",
                    "127.0.0.1",
                ])
                .args(["--port", &port.to_string()])
                .args(["--worker-threads", &o.workers.to_string()])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", router_bin.display()))?,
        ))
    };
    let router_port = free_port()?;
    let router = start_router(router_port)?;
    wait_listening(router_port).await?;

    let nginx_port = free_port()?;
    let nginx = start_nginx(dir.path(), nginx_port, pa, pb, o.workers);
    if let Err(e) = &nginx {
        eprintln!("nginx unavailable ({e:#}); install the Debian package `nginx` to compare");
    }
    if nginx.is_ok() {
        wait_listening(nginx_port).await?;
    }

    let mut targets = vec![
        Target {
            name: "direct",
            port: pa,
            pid: ua.0.id(),
            with_children: false,
        },
        Target {
            name: "serval-router",
            port: router_port,
            pid: router.0.id(),
            with_children: false,
        },
    ];
    if let Ok(ng) = &nginx {
        targets.push(Target {
            name: "nginx",
            port: nginx_port,
            pid: ng.0.id(),
            with_children: true,
        });
    }
    println!(
        "fairness: serval-router --worker-threads {w}, nginx worker_processes {w}; upstreams 1 \
         thread each; load generator 2 threads; {c} connections, {s} s per target, {r} rounds \
         in rotated order",
        w = o.workers,
        c = o.concurrency,
        s = o.seconds,
        r = o.rounds
    );
    let path = "/v2/models/digits/infer";
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); targets.len()];
    for round in 0..o.rounds {
        println!("round {} (load average {})", round + 1, loadavg());
        for k in 0..targets.len() {
            let i = (round + k) % targets.len();
            let s = measure(&targets[i], path, &o).await?;
            println!(
                "  {:<14} p50 {:>7.1} µs  p99 {:>7.1} µs  {:>7.0} req/s  cpu {:>6} µs/req  errors {}",
                targets[i].name,
                s.p50_us,
                s.p99_us,
                s.rps,
                s.cpu_us.map_or("-".to_owned(), |c| format!("{c:.1}")),
                s.errors
            );
            samples[i].push(s);
        }
    }
    println!("load average at the end: {}", loadavg());
    let med: Vec<Sample> = samples.iter().map(|s| median(s)).collect();
    println!(
        "\nmedian of {} rounds\n{:<14} {:>10} {:>10} {:>12} {:>14} {:>8}",
        o.rounds, "target", "p50 µs", "p99 µs", "req/s", "cpu µs/req", "errors"
    );
    for (t, r) in targets.iter().zip(&med) {
        println!(
            "{:<14} {:>10.1} {:>10.1} {:>12.0} {:>14} {:>8}",
            t.name,
            r.p50_us,
            r.p99_us,
            r.rps,
            r.cpu_us.map_or("-".to_owned(), |c| format!("{c:.1}")),
            r.errors
        );
    }
    println!("(direct's cpu is the upstream's own; a proxy's cpu is the proxy process's)");
    let direct = &med[0];
    let router = &med[1];
    println!(
        "\nserval-router added p50: {:.1} µs (goal ≤ 100 µs)",
        router.p50_us - direct.p50_us
    );
    println!(
        "serval-router req/s / direct: {:.2}",
        router.rps / direct.rps
    );
    if nginx.is_ok()
        && let Some(ng) = med.get(2)
    {
        println!("nginx added p50: {:.1} µs", ng.p50_us - direct.p50_us);
        println!(
            "serval-router req/s / nginx req/s: {:.2} (goal ≥ 0.9 with one HTTP implementation)",
            router.rps / ng.rps
        );
        let wins = samples[1]
            .iter()
            .zip(&samples[2])
            .filter(|(r, n)| r.rps >= n.rps)
            .count();
        println!(
            "rounds where serval-router req/s ≥ nginx req/s: {wins} of {}",
            o.rounds
        );
        println!(
            "serval-router added p50 / nginx added p50: {:.2}",
            (router.p50_us - direct.p50_us) / (ng.p50_us - direct.p50_us)
        );
        if let (Some(rc), Some(nc)) = (router.cpu_us, ng.cpu_us) {
            println!(
                "serval-router cpu per request / nginx cpu per request: {:.2}",
                rc / nc
            );
        }
    }
    drop(nginx);
    Ok(())
}

async fn load_only(port: u16, seconds: u64, concurrency: usize, pid: u32) -> Result<()> {
    let o = Options {
        seconds,
        concurrency,
        latency_requests: 1000,
        workers: 0,
        rounds: 1,
    };
    let t = Target {
        name: "load",
        port,
        pid,
        with_children: true,
    };
    let s = measure(&t, "/v2/models/digits/infer", &o).await?;
    println!(
        "p50 {:.1} µs  p99 {:.1} µs  {:.0} req/s  cpu {:.1} µs/req (pid {pid})  errors {}",
        s.p50_us,
        s.p99_us,
        s.rps,
        s.cpu_us.unwrap_or(f64::NAN),
        s.errors
    );
    Ok(())
}

/// Per-field median over rounds.
fn median(samples: &[Sample]) -> Sample {
    let pick = |f: &dyn Fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Sample {
        p50_us: pick(&|s| s.p50_us),
        p99_us: pick(&|s| s.p99_us),
        rps: pick(&|s| s.rps),
        cpu_us: samples
            .iter()
            .all(|s| s.cpu_us.is_some())
            .then(|| pick(&|s| s.cpu_us.unwrap_or_default())),
        errors: samples.iter().map(|s| s.errors).sum(),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// User + system CPU seconds of `pid` (all its threads), and of its children if asked.
fn cpu_seconds(pid: u32, with_children: bool) -> Option<f64> {
    // Fields after the command's closing parenthesis: state is the first, ppid the second,
    // utime the 12th and stime the 13th (proc(5) fields 3, 4, 14 and 15).
    let fields = |p: &str| -> Option<(u32, u64)> {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        Some((f.get(1)?.parse().ok()?, ticks))
    };
    let mut ticks = fields(&pid.to_string())?.1;
    if with_children {
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let name = entry.file_name();
            let Some(name) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            if let Some((_, t)) = fields(name).filter(|(ppid, _)| *ppid == pid) {
                ticks += t;
            }
        }
    }
    Some(ticks as f64 / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn routing_table(pa: u16, pb: u16) -> String {
    serde_json::json!({
        "apiVersion": "serval.dev/routing/v1",
        "routes": [{
            "endpoint": "digits", "pathPrefix": "/digits",
            "traffic": [{"backend": "a", "weight": 90}, {"backend": "b", "weight": 10}],
            "timeoutMs": 5000, "retries": {"attempts": 1, "budgetPercent": 20}
        }],
        "backends": {
            "a": {"model": "a", "addresses": [format!("127.0.0.1:{pa}")], "ready": true},
            "b": {"model": "b", "addresses": [format!("127.0.0.1:{pb}")], "ready": true}
        }
    })
    .to_string()
}

/// nginx in the foreground with the same 90/10 split, keep-alive upstreams, no logging.
fn start_nginx(dir: &Path, port: u16, pa: u16, pb: u16, workers: usize) -> Result<Proc> {
    let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("nginx not installed")?;
    let d = dir.display();
    let conf = format!(
        "worker_processes {workers};\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n access_log off;\n keepalive_requests 10000000;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
          fastcgi_temp_path {d}/fcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
          upstream split {{ server 127.0.0.1:{pa} weight=9; server 127.0.0.1:{pb} weight=1;\n keepalive 256; keepalive_requests 10000000; }}\n\
          server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://split;\n\
           proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = Command::new(bin)
        .args([
            "-p",
            &d.to_string(),
            "-c",
            &path.display().to_string(),
            "-e",
            &format!("{d}/nginx-error.log"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    Ok(Proc(child))
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn once(sender: &mut Sender, host: &str, path: &str) -> Result<bool> {
    sender.ready().await?;
    let req = Request::post(path)
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(REQUEST.as_bytes())))?;
    let resp = sender.send_request(req).await?;
    let ok = resp.status().is_success();
    resp.into_body().collect().await?;
    Ok(ok)
}

/// Latency on one keep-alive connection (sequential), then throughput with `concurrency`
/// connections for `seconds`.
/// Latency on one keep-alive connection (sequential), then throughput with `concurrency`
/// connections for `seconds`, with the target's CPU time over the same window.
async fn measure(t: &Target, path: &str, o: &Options) -> Result<Sample> {
    let addr: SocketAddr = ([127, 0, 0, 1], t.port).into();
    let host = addr.to_string();
    let mut s = connect(addr).await?;
    let mut errors = 0;
    for _ in 0..200 {
        once(&mut s, &host, path).await?;
    }
    let mut lat = Vec::with_capacity(o.latency_requests);
    for _ in 0..o.latency_requests {
        let start = Instant::now();
        if !once(&mut s, &host, path).await? {
            errors += 1;
        }
        lat.push(start.elapsed().as_secs_f64() * 1e6);
    }
    drop(s);
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];

    let go = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..o.concurrency {
        let mut s = connect(addr).await?;
        // One request per connection first, so the proxy's upstream pool is warm.
        once(&mut s, &host, path).await?;
        let (go, stop, done, failed, host, path) = (
            go.clone(),
            stop.clone(),
            done.clone(),
            failed.clone(),
            host.clone(),
            path.to_owned(),
        );
        workers.push(tokio::spawn(async move {
            while !go.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            while !stop.load(Ordering::Relaxed) {
                match once(&mut s, &host, &path).await {
                    Ok(true) => done.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let cpu_before = cpu_seconds(t.pid, t.with_children);
    let start = Instant::now();
    go.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(o.seconds)).await;
    let elapsed = start.elapsed().as_secs_f64();
    let served = done.load(Ordering::Relaxed);
    let cpu_after = cpu_seconds(t.pid, t.with_children);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let cpu_us = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) if served > 0 => Some((a - b) * 1e6 / served as f64),
        _ => None,
    };
    Ok(Sample {
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        rps: served as f64 / elapsed,
        cpu_us,
        errors: errors + failed.load(Ordering::Relaxed),
    })
}
