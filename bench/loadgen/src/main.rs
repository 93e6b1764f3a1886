//! `serval-loadgen`: closed- or open-loop load over keep-alive HTTP/1.1 for Serval's benchmarks.
//!
//! Closed loop (default): `--concurrency` connections each send the same POST (body from a
//! file, headers from flags) back to back: a warm-up that is not recorded, then a measured
//! window whose latencies go into an HDR histogram. One JSON line on stdout: req/s,
//! p50/p90/p99/max and errors by kind. Every system under test faces the same generator, so its
//! own cost cancels in the ratios.
//!
//! Open loop (`--rate R`): R requests a second on a fixed schedule whatever the answers, over as
//! many connections as are in flight (up to `--max-connections`), latency from each request's
//! scheduled time; 2xx (admitted) and 429 (rejected) answers get a histogram each. One JSON
//! line with `"mode":"open"`.

#![forbid(unsafe_code)]

mod client;
mod closed_loop;
mod floor;
mod open_loop;
mod report;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;

use crate::client::Target;
use crate::closed_loop::Plan;
use crate::open_loop::OpenPlan;

/// Per-request bound: a system slower than this is counted as failing, not waited for.
const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Open loop's connection bound: the sidecar's own default bound, and well inside this
/// machine's 20,000 file descriptors a process, so a stalled server cannot exhaust them.
const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Drives closed-loop load at one concurrency, or open-loop load at one rate, and prints one
/// JSON line of results.
#[derive(Parser, Debug)]
#[command(name = "serval-loadgen", version, about)]
struct Args {
    /// Full URL to POST to, `http://host:port/path` (plain HTTP only).
    #[arg(long, required_unless_present = "tcp_floor")]
    url: Option<String>,
    /// File whose bytes are the request body; repeat it to send several bodies in turn
    /// (round robin, e.g. a set of photos).
    #[arg(long, required_unless_present = "tcp_floor")]
    body: Vec<PathBuf>,
    /// Instead of HTTP load, time a 1-byte round trip over loopback TCP to an echo thread in
    /// this process (blocking sockets, no runtime): the floor a request at concurrency 1 pays
    /// on this machine before any server does any work.
    #[arg(long, conflicts_with_all = ["url", "body"])]
    tcp_floor: bool,
    /// Extra request header `name: value`; repeatable.
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Connections, each with one request in flight (closed loop).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Open loop: requests per second on a fixed schedule, sent whatever the answers; latency
    /// counts from each request's scheduled time.
    #[arg(long, conflicts_with_all = ["concurrency", "tcp_floor"])]
    rate: Option<f64>,
    /// Open loop: most connections (so requests in flight) at once; a request finding all busy
    /// waits for one, and the wait counts in its latency.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Unrecorded warm-up, seconds (open loop: at the same rate).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Measured window, seconds (open loop: requests scheduled in it are recorded, and waited
    /// for after it up to their timeout).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Per-request timeout, milliseconds (open loop: from the scheduled time); a timed-out
    /// request counts as error `timeout`.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_MS)]
    timeout_ms: u64,
    /// The body is one framed gRPC message: send it over HTTP/2 (prior knowledge) as a unary
    /// call, and count an answer by its `grpc-status`.
    #[arg(long, conflicts_with = "tcp_floor")]
    grpc: bool,
    /// Send over HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1, one request in flight
    /// per connection as over HTTP/1.1 (implied by `--grpc`).
    #[arg(long, conflicts_with = "tcp_floor")]
    http2: bool,
    /// Runtime threads of the generator. One keeps its CPU share small and equal for every
    /// system on a small machine.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let plan = Plan {
        concurrency: args.concurrency.max(1),
        warmup: Duration::from_secs_f64(args.warmup.max(0.0)),
        duration: Duration::from_secs_f64(args.duration.max(0.001)),
        timeout: Duration::from_millis(args.timeout_ms),
    };
    let Some(url) = args.url else {
        // `--tcp-floor` (clap requires both otherwise).
        let plan = Plan {
            concurrency: 1,
            ..plan
        };
        let outcome = floor::run(&plan)?;
        println!(
            "{}",
            serde_json::to_string(&report::Report::new(&plan, &outcome))?
        );
        return Ok(());
    };
    let bodies = args
        .body
        .iter()
        .map(|b| std::fs::read(b).with_context(|| format!("reading body file {}", b.display())))
        .collect::<Result<Vec<_>>>()?;
    let target = Target::new(&url, &args.headers, bodies, args.grpc, args.http2)?;
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    let line = if let Some(rate) = args.rate {
        let plan = OpenPlan {
            rate,
            warmup: plan.warmup,
            duration: plan.duration,
            timeout: plan.timeout,
            max_connections: args.max_connections.max(1),
        };
        let outcome = runtime.block_on(open_loop::run(target, plan))?;
        serde_json::to_string(&report::OpenReport::new(&plan, &outcome))?
    } else {
        let outcome = runtime.block_on(closed_loop::run(target, plan))?;
        serde_json::to_string(&report::Report::new(&plan, &outcome))?
    };
    // The one line of output this tool exists for.
    println!("{line}");
    Ok(())
}
