//! Whose failure is it: a client's mistakes never eject a healthy replica, a hung replica is
//! ejected, and retries stay inside the chosen Backend so the split stays exact.

#![allow(clippy::unwrap_used)] // test fixtures: a failed step should panic the test

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Raw requests that are the client's fault, each on a connection of its own.
async fn send_raw(addr: std::net::SocketAddr, bytes: &[u8], hang_up: bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    if hang_up {
        // Let the router start on the request, then go.
        tokio::time::sleep(Duration::from_millis(5)).await;
        return;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_and_client_hang_ups_eject_no_replica() {
    let a = upstream("b", answer("a")).await;
    let b = upstream("b", answer("b")).await;
    let doc = table(
        vec![route("e", "/e", &[("b", 100)])],
        &[("b", vec![a.address(), b.address()])],
    );
    // Bodies past 64 bytes stream, so a client's fault surfaces mid-exchange with an upstream,
    // the case that used to be counted against it.
    let r = router_with(&doc, |c| {
        c.max_buffered_body = 64;
        c.eject_after_failures = 3;
    })
    .await;
    let big = "x".repeat(100);
    let chunked_head = "POST /e/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    for i in 0..100 {
        // Half buffered, half streamed: a negative chunk size after the first chunk.
        let first = if i % 2 == 0 {
            "2\r\nab\r\n".to_owned()
        } else {
            format!("64\r\n{big}\r\n")
        };
        let req = format!("{chunked_head}{first}-5\r\nhello\r\n0\r\n\r\n");
        send_raw(r.addr, req.as_bytes(), false).await;
    }
    for i in 0..100 {
        // Gone mid-upload: half with a sized body, half streaming chunks.
        let req = if i % 2 == 0 {
            "POST /e/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\npartial".to_owned()
        } else {
            format!("{chunked_head}64\r\n{big}\r\n64\r\n{big}")
        };
        send_raw(r.addr, req.as_bytes(), true).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = r.metrics();
    assert_eq!(metric(&m, "serval_router_ejections_total"), 0.0, "{m}");
    assert_eq!(
        metric(&m, "serval_router_upstream_errors_total"),
        0.0,
        "{m}"
    );
    // Both replicas still share the traffic.
    let c = client();
    let (before_a, before_b) = (a.hits(), b.hits());
    for _ in 0..40 {
        let (status, _, _) = call(&c, c.post(r.url("/e/infer")).body(INFER_BODY)).await;
        assert_eq!(status, 200);
    }
    let (ha, hb) = (a.hits() - before_a, b.hits() - before_b);
    assert!(ha >= 5 && hb >= 5, "the next 40 requests went {ha}/{hb}");
}

/// A replica as a process of its own (`bench-router upstream`), so it can be SIGSTOPped.
struct Replica {
    child: std::process::Child,
    address: String,
}

impl Replica {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_bench-router"))
            .args(["upstream", &port.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            child,
            address: format!("127.0.0.1:{port}"),
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_replica_is_ejected_after_its_timeouts() {
    let hung = Replica::start();
    let live = Replica::start();
    for r in [&hung, &live] {
        wait_for_listen(&r.address).await;
    }
    let mut rt = route("e", "/e", &[("b", 100)]);
    rt["timeoutMs"] = json!(300);
    let r = router_with(
        &table(
            vec![rt],
            &[("b", vec![hung.address.clone(), live.address.clone()])],
        ),
        |c| c.eject_after_failures = 3,
    )
    .await;
    let c = client();
    // Warm both: they answer.
    for _ in 0..10 {
        let (status, _, _) = call(&c, c.post(r.url("/e/infer")).body(INFER_BODY)).await;
        assert_eq!(status, 200);
    }
    hung.signal("-STOP");
    let mut timeouts = 0;
    for _ in 0..40 {
        let (status, _, _) = call(&c, c.post(r.url("/e/infer")).body(INFER_BODY)).await;
        match status {
            504 => timeouts += 1,
            200 => {}
            other => panic!("status {other}"),
        }
    }
    // Three timeouts eject it; every request after that is answered by the live replica.
    assert_eq!(
        timeouts, 3,
        "requests answered 504 before the hung replica left"
    );
    let m = r.metrics();
    let ejected = format!(
        r#"serval_router_ejections_total{{backend="b",address="{}"}}"#,
        hung.address
    );
    assert_eq!(metric(&m, &ejected), 1.0, "{m}");
    assert_eq!(
        metric(
            &m,
            r#"serval_router_upstream_errors_total{endpoint="e",backend="b",kind="timeout"}"#
        ),
        3.0
    );
}

async fn wait_for_listen(address: &str) {
    for _ in 0..200 {
        if TcpStream::connect(address).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{address} never listened");
}

/// A replica whose every tenth new connection is reset at once, and which closes each
/// connection after its answer, so every request needs a new connection.
async fn flaky_upstream(accepted: Arc<AtomicUsize>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let n = accepted.fetch_add(1, Ordering::SeqCst);
            if n % 10 == 9 {
                // Closed unanswered: the router's attempt fails before any response.
                drop(s);
                continue;
            }
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(k) if k > 0 => buf.extend_from_slice(&chunk[..k]),
                        _ => return,
                    }
                }
                let body = r#"{"label":"flaky"}"#;
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_70_30_split_stays_exact_when_a_replica_fails_a_tenth_of_its_connects() {
    let accepted = Arc::new(AtomicUsize::new(0));
    let flaky = flaky_upstream(accepted.clone()).await;
    let steady = upstream("a", answer("a")).await;
    let other = upstream("b", answer("b")).await;
    let mut rt = route("e", "/e", &[("a", 70), ("b", 30)]);
    rt["retries"] = json!({"attempts": 2, "budgetPercent": 20});
    let r = router(&table(
        vec![rt],
        &[
            ("a", vec![flaky, steady.address()]),
            ("b", vec![other.address()]),
        ],
    ))
    .await;
    let n = 10_000;
    let counts = count_backends(&r, "/e/infer", n, 16).await;
    let share_a = counts.get("a").copied().unwrap_or(0) as f64 / n as f64;
    assert!(
        (share_a - 0.70).abs() <= 0.02,
        "split {counts:?}: a got {:.1} %",
        share_a * 100.0
    );
    let m = r.metrics();
    assert!(
        metric(
            &m,
            r#"serval_router_retries_total{endpoint="e",backend="a"}"#
        ) >= 10.0,
        "the flaky replica's resets were retried: {m}"
    );
    assert!(accepted.load(Ordering::SeqCst) >= 100);
}
