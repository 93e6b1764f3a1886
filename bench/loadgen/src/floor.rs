//! `--tcp-floor`: the machine's loopback round trip without HTTP or an async runtime. One byte
//! goes to an echo thread in this process and back over blocking TCP sockets, so each round trip
//! is two thread wake-ups and two trips through the kernel's TCP stack: what any server on this
//! machine pays per request at concurrency 1 before it does any work.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use anyhow::Context;
use hdrhistogram::Histogram;

use crate::closed_loop::{MAX_RECORDED_NANOS, Outcome, Plan};

/// Runs the ping-pong for the plan's warm-up and window (its concurrency is ignored: one).
pub fn run(plan: &Plan) -> anyhow::Result<Outcome> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the echo socket")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut conn, _) = listener.accept()?;
        conn.set_nodelay(true)?;
        let mut byte = [0u8; 1];
        // Ends when the client closes (read of 0 bytes).
        while conn.read(&mut byte)? == 1 {
            conn.write_all(&byte)?;
        }
        Ok(())
    });
    let mut conn = TcpStream::connect(addr).context("connecting to the echo thread")?;
    conn.set_nodelay(true)?;
    let mut latency = Histogram::new_with_bounds(1, MAX_RECORDED_NANOS, 3)?;
    let start = Instant::now();
    let (from, end) = (start + plan.warmup, start + plan.warmup + plan.duration);
    let mut byte = [0u8; 1];
    loop {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        conn.write_all(b"x")?;
        conn.read_exact(&mut byte)?;
        if sent >= from {
            latency.saturating_record(u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
    }
    drop(conn);
    echo.join()
        .map_err(|_| anyhow::anyhow!("the echo thread panicked"))?
        .context("echo thread")?;
    Ok(Outcome {
        latency,
        errors: BTreeMap::new(),
    })
}
