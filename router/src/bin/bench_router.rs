//! `bench-router`: added latency and throughput of the router versus calling the upstream
//! directly and versus nginx with the same 2-way 90/10 weighted split, in one run on loopback.
//!
//! Every server is its own process (two fake model servers, `serval-router`, nginx) so the
//! proxies compete for the CPU the same way; the load generator runs here. Not a test: it
//! prints numbers and ratios.
//!
//! Usage: `bench-router [--seconds N] [--concurrency N] [--latency-requests N]`
//! (`bench-router upstream PORT` is the fake model server it starts for itself).

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
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("upstream") {
        let port: u16 = args.get(2).context("upstream PORT")?.parse()?;
        return run_upstream(port);
    }
    let mut o = Options {
        seconds: 5,
        concurrency: 32,
        latency_requests: 3000,
    };
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let v = it.next().context("flag needs a value")?;
        match a.as_str() {
            "--seconds" => o.seconds = v.parse()?,
            "--concurrency" => o.concurrency = v.parse()?,
            "--latency-requests" => o.latency_requests = v.parse()?,
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

struct Result1 {
    name: &'static str,
    p50_us: f64,
    p99_us: f64,
    rps: f64,
    errors: u64,
}

async fn bench(o: Options) -> Result<()> {
    let exe = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    let (pa, pb) = (free_port()?, free_port()?);
    let _ua = Proc(
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

    let router_port = free_port()?;
    let table = dir.path().join("routing.json");
    std::fs::write(&table, routing_table(pa, pb))?;
    let router_bin = exe.with_file_name("serval-router");
    let _router = Proc(
        Command::new(&router_bin)
            .args([
                "--table",
                &table.display().to_string(),
                "--host",
                "127.0.0.1",
            ])
            .args(["--port", &router_port.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", router_bin.display()))?,
    );
    wait_listening(router_port).await?;

    let nginx_port = free_port()?;
    let nginx = start_nginx(dir.path(), nginx_port, pa, pb);
    if let Err(e) = &nginx {
        eprintln!("nginx unavailable ({e:#}); install the Debian package `nginx` to compare");
    }
    if nginx.is_ok() {
        wait_listening(nginx_port).await?;
    }

    let path = "/v2/models/digits/infer";
    let mut results = vec![
        measure("direct", pa, path, &o).await?,
        measure("serval-router", router_port, path, &o).await?,
    ];
    if nginx.is_ok() {
        results.push(measure("nginx", nginx_port, path, &o).await?);
    }
    println!(
        "\n{:<14} {:>10} {:>10} {:>12} {:>8}",
        "target", "p50 µs", "p99 µs", "req/s", "errors"
    );
    for r in &results {
        println!(
            "{:<14} {:>10.1} {:>10.1} {:>12.0} {:>8}",
            r.name, r.p50_us, r.p99_us, r.rps, r.errors
        );
    }
    let direct = &results[0];
    let router = &results[1];
    println!(
        "\nserval-router added p50: {:.1} µs (goal ≤ 100 µs)",
        router.p50_us - direct.p50_us
    );
    println!(
        "serval-router req/s / direct: {:.2}",
        router.rps / direct.rps
    );
    if let Some(ng) = results.get(2) {
        println!("nginx added p50: {:.1} µs", ng.p50_us - direct.p50_us);
        println!(
            "serval-router req/s / nginx req/s: {:.2} (goal ≥ 1.0)",
            router.rps / ng.rps
        );
        println!(
            "serval-router added p50 / nginx added p50: {:.2}",
            (router.p50_us - direct.p50_us) / (ng.p50_us - direct.p50_us)
        );
    }
    drop(nginx);
    Ok(())
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
fn start_nginx(dir: &Path, port: u16, pa: u16, pb: u16) -> Result<Proc> {
    let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("nginx not installed")?;
    let d = dir.display();
    let conf = format!(
        "worker_processes auto;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
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
async fn measure(name: &'static str, port: u16, path: &str, o: &Options) -> Result<Result1> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let host = addr.to_string();
    let mut s = connect(addr).await?;
    let mut errors = 0;
    for _ in 0..200 {
        once(&mut s, &host, path).await?;
    }
    let mut lat = Vec::with_capacity(o.latency_requests);
    for _ in 0..o.latency_requests {
        let t = Instant::now();
        if !once(&mut s, &host, path).await? {
            errors += 1;
        }
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..o.concurrency {
        let mut s = connect(addr).await?;
        let (stop, done, failed, host, path) = (
            stop.clone(),
            done.clone(),
            failed.clone(),
            host.clone(),
            path.to_owned(),
        );
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match once(&mut s, &host, &path).await {
                    Ok(true) => done.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(o.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    for w in workers {
        let _ = w.await;
    }
    let rps = done.load(Ordering::Relaxed) as f64 / elapsed;
    eprintln!("{name}: done");
    Ok(Result1 {
        name,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        rps,
        errors: errors + failed.load(Ordering::Relaxed),
    })
}
