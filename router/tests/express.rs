//! The express lane on the wire: raw sockets on both sides, so framing, pipelining, connection
//! reuse and the hand-over to the hyper path are seen exactly as clients and upstreams see them.

#![allow(clippy::unwrap_used)] // test fixtures: a failed step should panic the test

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request as a raw upstream saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    host: String,
    body: Vec<u8>,
}

/// What a raw upstream writes back: the pieces (written with a pause between them, so the
/// router sees partial reads) and whether to close the connection afterwards.
type Reply = (Vec<Vec<u8>>, bool);

/// An upstream speaking HTTP/1.1 by hand. Requests must carry a Content-Length (or no body).
async fn raw_upstream(reply: fn(&Seen) -> Reply) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(seen) = read_request(&mut s, &mut buf).await else {
                        return;
                    };
                    let (pieces, close) = reply(&seen);
                    for p in pieces {
                        if s.write_all(&p).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    if close {
                        return;
                    }
                }
            });
        }
    });
    (addr, connections)
}

async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Seen> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if let httparse::Status::Complete(len) = req.parse(buf).unwrap() {
            let header = |name: &str| {
                req.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned())
            };
            let n: usize = header("content-length").map_or(0, |v| v.parse().unwrap());
            let mut seen = Seen {
                method: req.method.unwrap().to_owned(),
                path: req.path.unwrap().to_owned(),
                host: header("host").unwrap_or_default(),
                body: Vec::new(),
            };
            while buf.len() < len + n {
                let mut chunk = [0u8; 4096];
                let k = s.read(&mut chunk).await.ok().filter(|k| *k > 0)?;
                buf.extend_from_slice(&chunk[..k]);
            }
            seen.body = buf[len..len + n].to_vec();
            buf.drain(..len + n);
            return Some(seen);
        }
        let mut chunk = [0u8; 4096];
        let k = s.read(&mut chunk).await.ok().filter(|k| *k > 0)?;
        buf.extend_from_slice(&chunk[..k]);
    }
}

/// A JSON reply echoing what the upstream saw.
fn echo(seen: &Seen) -> Reply {
    let body = serde_json::json!({
        "method": seen.method, "path": seen.path, "host": seen.host,
        "body": String::from_utf8_lossy(&seen.body),
    })
    .to_string();
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    (vec![head.into_bytes(), body.into_bytes()], false)
}

fn one_route(address: String) -> serde_json::Value {
    table(
        vec![route("e", "/e", &[("b", 100)])],
        &[("b", vec![address])],
    )
}

/// Reads one response from a raw client connection: status, headers, body (sized bodies
/// only, or no body for HEAD).
async fn read_response(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    head_request: bool,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(len) = resp.parse(buf).unwrap() {
            let hs: Vec<(String, String)> = resp
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let status = resp.code.unwrap();
            let n: usize = if head_request {
                0
            } else {
                hs.iter()
                    .find(|(k, _)| k == "content-length")
                    .map_or(0, |(_, v)| v.parse().unwrap())
            };
            while buf.len() < len + n {
                let mut chunk = [0u8; 4096];
                let k = s.read(&mut chunk).await.unwrap();
                assert!(k > 0, "connection closed mid-body");
                buf.extend_from_slice(&chunk[..k]);
            }
            let body = buf[len..len + n].to_vec();
            buf.drain(..len + n);
            return (status, hs, body);
        }
        let mut chunk = [0u8; 4096];
        let k = s.read(&mut chunk).await.unwrap();
        assert!(k > 0, "connection closed before a response");
        buf.extend_from_slice(&chunk[..k]);
    }
}

fn header<'a>(hs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    hs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_each_get_their_own_answer_rewritten_for_the_backend() {
    let (up, _) = raw_upstream(echo).await;
    let r = router(&one_route(up.clone())).await;
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    // Three requests in one write, the last split mid-head from the rest.
    let reqs = [
        "POST /v2/models/e/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nfirst",
        "GET /e/v2/models/e/ready?verbose=1 HTTP/1.1\r\nHost: x\r\n\r\n",
        "POST /e/anything HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nthird!",
    ];
    let all = reqs.concat();
    let (a, b) = all.split_at(all.len() - 20);
    s.write_all(a.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.write_all(b.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let want = [
        ("POST", "/v2/models/b/infer", "first"),
        ("GET", "/v2/models/b/ready?verbose=1", ""),
        ("POST", "/anything", "third!"),
    ];
    for (method, path, body) in want {
        let (status, hs, got) = read_response(&mut s, &mut buf, false).await;
        assert_eq!(status, 200);
        assert_eq!(header(&hs, "serval-backend"), Some("b"));
        let v: serde_json::Value = serde_json::from_slice(&got).unwrap();
        assert_eq!(v["method"], method);
        assert_eq!(v["path"], path);
        assert_eq!(v["body"], body);
        // The upstream is addressed by its own name, not the client's Host.
        assert_eq!(v["host"], up.as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_responses_with_trailers_pass_through_and_the_connection_is_reused() {
    fn chunked(_: &Seen) -> Reply {
        let pieces = [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/plain\r\n\r\n"[..],
            b"5\r\nhel",
            b"lo\r\n7;ext=1\r\n, world\r\n",
            b"0\r\nx-checksum: 1\r\n",
            b"\r\n",
        ];
        (pieces.iter().map(|p| p.to_vec()).collect(), false)
    }
    let (up, connections) = raw_upstream(chunked).await;
    // One shard, one upstream pool: however the client spreads its requests over connections.
    let r = router_with(&one_route(up), |c| c.worker_threads = 1).await;
    let c = client();
    for _ in 0..5 {
        let resp = c.post(r.url("/e/x")).body("q").send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["serval-backend"], "b");
        assert_eq!(resp.text().await.unwrap(), "hello, world");
    }
    // One upstream connection carried every request: each body's end was found exactly.
    assert_eq!(connections.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_request_bodies_take_the_hyper_path_and_the_connection_keeps_serving() {
    let up = upstream("b", answer("x")).await;
    let r = router(&one_route(up.address())).await;
    let c = client();
    for i in 0..3 {
        // A streamed body is sent chunked: the express lane hands the connection to hyper.
        let chunks: Vec<Result<&'static str, std::io::Error>> = vec![Ok("{\"a\":"), Ok("1}")];
        let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
        let (status, backend, v) = call(&c, c.post(r.url("/e/infer")).body(body)).await;
        assert_eq!(
            (status, backend.as_str()),
            (200, "b"),
            "streamed request {i}"
        );
        assert_eq!(v["label"], "x");
        let (status, backend, _) = call(&c, c.post(r.url("/e/infer")).body("{}")).await;
        assert_eq!((status, backend.as_str()), (200, "b"), "sized request {i}");
    }
    assert_eq!(up.hits(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_closed_while_idle_are_never_used() {
    // Answers keep-alive, then closes the connection shortly after each answer.
    fn answer_then_close(seen: &Seen) -> Reply {
        let (pieces, _) = echo(seen);
        (pieces, true)
    }
    let (up, connections) = raw_upstream(answer_then_close).await;
    let r = router(&one_route(up)).await;
    let c = client();
    for i in 0..5 {
        let (status, backend, _) = call(&c, c.post(r.url("/e/x")).body("{}")).await;
        assert_eq!((status, backend.as_str()), (200, "b"), "request {i}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(connections.load(Ordering::SeqCst), 5);
    let errors = metric(&r.metrics(), "serval_router_upstream_errors_total");
    assert_eq!(errors, 0.0, "{}", r.metrics());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_and_head_and_close_delimited_bodies() {
    // No Content-Length: the body ends when the upstream closes.
    fn until_close(seen: &Seen) -> Reply {
        if seen.method == "HEAD" {
            let head = "HTTP/1.1 200 OK\r\ncontent-length: 42\r\n\r\n";
            return (vec![head.as_bytes().to_vec()], false);
        }
        let pieces = [
            &b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npart one, "[..],
            b"part two",
        ];
        (pieces.iter().map(|p| p.to_vec()).collect(), true)
    }
    let (up, _) = raw_upstream(until_close).await;
    let r = router(&one_route(up)).await;

    // HEAD: the head's Content-Length describes a body that is not sent.
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"HEAD /e/x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (status, hs, body) = read_response(&mut s, &mut buf, true).await;
    assert_eq!((status, header(&hs, "content-length")), (200, Some("42")));
    assert!(body.is_empty());

    // The same connection then gets a close-delimited body, relayed whole, and is closed.
    s.write_all(b"GET /e/x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the router closes the client connection")
        .unwrap();
    buf.extend_from_slice(&rest);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("connection: close\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\npart one, part two"), "{text}");

    // A client asking to close gets its answer, then the end of the connection.
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"HEAD /e/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
        .await
        .expect("closed after the answer")
        .unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_paths_and_malformed_heads_are_answered_by_the_hyper_path() {
    let (up, _) = raw_upstream(echo).await;
    let r = router(&one_route(up)).await;
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    let mut buf = Vec::new();
    // An express request, then the router's own path on the same connection, then express
    // again (now served by hyper, as the connection was handed over).
    for path in ["/e/x", "/-/healthz", "/e/y"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let (status, hs, body) = read_response(&mut s, &mut buf, false).await;
        assert_eq!(status, 200, "{path}");
        if path == "/-/healthz" {
            assert_eq!(body, b"ok");
        } else {
            assert_eq!(header(&hs, "serval-backend"), Some("b"), "{path}");
        }
    }
    // A malformed head gets hyper's 400, not a silent close.
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"GET /e/x HTTP/1.1\r\nBad Header\r\n\r\n")
        .await
        .unwrap();
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all)).await;
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
}

/// The express lane and the hyper path drop the same hop-by-hop response headers and relay
/// the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_paths_drop_the_same_hop_by_hop_response_headers() {
    fn hop_headers(_: &Seen) -> Reply {
        let head = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nkeep-alive: timeout=5\r\n\
                    proxy-connection: keep-alive\r\nupgrade: h2c\r\ntrailer: x-sum\r\n\
                    proxy-authorization: secret\r\nx-kept: yes\r\n\r\nok";
        (vec![head.as_bytes().to_vec()], false)
    }
    let (up, _) = raw_upstream(hop_headers).await;
    for fast_path in [true, false] {
        let r = router_with(&one_route(up.clone()), |c| c.fast_path = fast_path).await;
        let mut s = TcpStream::connect(r.addr).await.unwrap();
        s.write_all(b"GET /e/x HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (status, hs, body) = read_response(&mut s, &mut Vec::new(), false).await;
        assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));
        let names: Vec<&str> = hs.iter().map(|(k, _)| k.as_str()).collect();
        for dropped in [
            "keep-alive",
            "proxy-connection",
            "upgrade",
            "trailer",
            "proxy-authorization",
        ] {
            assert!(
                !names.contains(&dropped),
                "fast_path={fast_path}: {dropped} relayed in {names:?}"
            );
        }
        assert_eq!(header(&hs, "x-kept"), Some("yes"), "fast_path={fast_path}");
    }
}

/// A raw upstream's reply: `200 ok`, connection kept.
fn ok(_: &Seen) -> Reply {
    (
        vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()],
        false,
    )
}

/// On both paths a client connection idle past `--idle-timeout` is closed, one used within it
/// is kept, and a request head stalled past its bound is cut off: no connection is held forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_stalled_client_connections_are_closed() {
    let (up, _) = raw_upstream(ok).await;
    let idle = Duration::from_millis(800);
    let bound = Duration::from_secs(20);
    for fast_path in [true, false] {
        let r = router_with(&one_route(up.clone()), |c| {
            c.fast_path = fast_path;
            c.idle_timeout = idle;
            c.header_read_timeout = idle;
        })
        .await;
        let mut s = TcpStream::connect(r.addr).await.unwrap();
        let mut carry = Vec::new();
        for _ in 0..3 {
            s.write_all(b"GET /e/x HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let (status, _, body) = read_response(&mut s, &mut carry, false).await;
            assert_eq!(
                (status, body.as_slice()),
                (200, &b"ok"[..]),
                "fast_path={fast_path}"
            );
            // Well within the bound: the next request reuses the connection.
            tokio::time::sleep(idle / 4).await;
        }
        let quiet = std::time::Instant::now();
        let mut rest = Vec::new();
        tokio::time::timeout(bound, s.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("fast_path={fast_path}: idle connection kept open"))
            .unwrap();
        assert!(rest.is_empty(), "fast_path={fast_path}: {rest:?}");
        assert!(
            quiet.elapsed() >= idle / 2,
            "fast_path={fast_path}: closed after {:?}, before the idle bound",
            quiet.elapsed()
        );

        let mut stalled = TcpStream::connect(r.addr).await.unwrap();
        stalled
            .write_all(b"GET /e/x HTTP/1.1\r\nHost:")
            .await
            .unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(bound, stalled.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("fast_path={fast_path}: stalled head kept open"))
            .unwrap();
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
            "fast_path={fast_path}: {rest}"
        );
    }
}

/// Past `--max-connections` a new client connection is not served until an open one closes;
/// then it is, and its request is answered. `serval_router_connections` counts the open ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_bound_wait_for_a_free_slot() {
    let (up, _) = raw_upstream(ok).await;
    let r = router_with(&one_route(up), |c| c.max_connections = 2).await;
    let get = b"GET /e/x HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(r.addr).await.unwrap();
        s.write_all(get).await.unwrap();
        let (status, _, _) = read_response(&mut s, &mut Vec::new(), false).await;
        assert_eq!(status, 200);
        open.push(s);
    }
    let mut third = TcpStream::connect(r.addr).await.unwrap();
    third.write_all(get).await.unwrap();
    let mut byte = [0u8; 1];
    let waiting = tokio::time::timeout(Duration::from_millis(300), third.peek(&mut byte)).await;
    assert!(
        waiting.is_err(),
        "a third connection was served past the bound of 2"
    );
    drop(open.pop());
    let (status, _, body) = tokio::time::timeout(
        Duration::from_secs(20),
        read_response(&mut third, &mut Vec::new(), false),
    )
    .await
    .expect("served once a slot is free");
    assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));
    // The gauge counts the one left open and this one.
    third
        .write_all(b"GET /-/metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, _, body) = read_response(&mut third, &mut Vec::new(), false).await;
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 200);
    assert!(
        text.lines().any(|l| l == "serval_router_connections 2"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l == "serval_router_max_connections 2"),
        "{text}"
    );
}

/// With `--admin-port`, health, readiness and metrics are answered there while the traffic port
/// is at `--max-connections` (so a connection flood cannot fail the kubelet's probes), and
/// nothing is ever routed from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_answers_probes_while_traffic_connections_are_at_the_bound() {
    let (up, _) = raw_upstream(ok).await;
    let r = router_with(&one_route(up), |c| {
        c.max_connections = 1;
        c.admin_port = Some(0);
    })
    .await;
    let admin = r.admin_addr.expect("admin port bound");
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut held = TcpStream::connect(r.addr).await.unwrap();
    held.write_all(get("/e/x").as_bytes()).await.unwrap();
    let (status, _, _) = read_response(&mut held, &mut Vec::new(), false).await;
    assert_eq!(status, 200);
    let mut waiting = TcpStream::connect(r.addr).await.unwrap();
    waiting
        .write_all(get("/-/healthz").as_bytes())
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let blocked = tokio::time::timeout(Duration::from_millis(300), waiting.peek(&mut byte)).await;
    assert!(blocked.is_err(), "the traffic port served past its bound");

    let mut probe = TcpStream::connect(admin).await.unwrap();
    let mut ask = async |path: &str| {
        probe.write_all(get(path).as_bytes()).await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            read_response(&mut probe, &mut Vec::new(), false),
        )
        .await
        .expect("the admin port did not answer while the traffic port was at its bound")
    };
    assert_eq!(ask("/-/healthz").await.0, 200);
    assert_eq!(ask("/-/readyz").await.0, 200);
    let (status, _, body) = ask("/-/metrics").await;
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 200);
    assert!(
        text.lines().any(|l| l == "serval_router_connections 1"),
        "{text}"
    );
    // A route's path is not proxied from the admin port.
    let (status, _, body) = ask("/e/x").await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("admin port"));

    drop(held);
    let (status, _, body) = tokio::time::timeout(
        Duration::from_secs(20),
        read_response(&mut waiting, &mut Vec::new(), false),
    )
    .await
    .expect("served once a slot is free");
    assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));
    // With an admin port, metrics are not handed to any client of the traffic port.
    waiting
        .write_all(get("/-/metrics").as_bytes())
        .await
        .unwrap();
    let (status, _, body) = read_response(&mut waiting, &mut Vec::new(), false).await;
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("served on the admin port"));
}
