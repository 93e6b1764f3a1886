//! HTTP/1.1 conformance on the wire: raw client bytes into the real router, in front of an
//! upstream that logs the exact bytes it receives. Each case asserts the client's answer and
//! what reached the upstream (request line, every header line, the body as framed on the wire),
//! so request smuggling, framing and hop-by-hop rules are checked as a peer would see them.
//! Where a rule comes from an RFC, the case names the section; where nginx is the reference
//! (it is what a user would otherwise put here), the case says so.

#![allow(clippy::unwrap_used)] // test fixtures: a failed step should panic the test

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the logging upstream saw and how it answers.
#[derive(Clone, Default)]
struct Log {
    /// Every request, canonical: request line, sorted header lines, blank line, raw body.
    requests: Arc<Mutex<Vec<String>>>,
    /// When a connection the router opened was closed by it, per connection in order.
    closed: Arc<Mutex<Vec<Instant>>>,
}

impl Log {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.requests.lock().unwrap())
    }

    /// The requests seen since the last call, with the upstream's address written `UP`.
    fn seen(&self, addr: &str) -> Vec<String> {
        self.take()
            .into_iter()
            .map(|r| r.replace(addr, "UP"))
            .collect()
    }
}

/// The upstream: parses each request head with httparse (independently of hyper), reads a
/// Content-Length body, records the request, and answers according to its path:
/// `/both-framings` with Content-Length and Transfer-Encoding, `/hop` with Connection-listed
/// headers, `/bad-length` with `Content-Length: +2`, `/slow` after 5 s; else `200 ok`.
async fn logging_upstream() -> (String, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let log = Log::default();
    let shared = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let log = shared.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some((canon, path)) = read_upstream_request(&mut s, &mut buf).await {
                    log.requests.lock().unwrap().push(canon);
                    let reply: &[u8] = match path.as_str() {
                        "/both-framings" => {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                        }
                        "/hop" => {
                            b"HTTP/1.1 200 OK\r\nconnection: x-hop\r\nx-hop: 1\r\nkeep-alive: timeout=5\r\nx-kept: yes\r\ncontent-length: 2\r\n\r\nok"
                        }
                        "/bad-length" => b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok",
                        "/slow" => {
                            // Answers after 5 s, unless the router closes the connection first.
                            let mut byte = [0u8; 1];
                            tokio::select! {
                                () = tokio::time::sleep(Duration::from_secs(5)) => {}
                                _ = s.read(&mut byte) => break,
                            }
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                        }
                        _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                    };
                    if s.write_all(reply).await.is_err() {
                        break;
                    }
                }
                log.closed.lock().unwrap().push(Instant::now());
            });
        }
    });
    (addr, log)
}

/// Reads one request; returns its canonical form and path, or `None` at end of connection.
async fn read_upstream_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, String)> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(len)) = req.parse(buf) {
            // The time left to the deadline varies: checked here, then left out of the record.
            let left = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("serval-deadline-ms"))
                .map(|h| String::from_utf8_lossy(h.value).parse::<u64>().unwrap());
            assert!(
                left.is_some_and(|ms| ms > 0 && ms <= 30_000),
                "every forwarded request carries the time left: {left:?}"
            );
            let mut lines: Vec<String> = req
                .headers
                .iter()
                .filter(|h| !h.name.eq_ignore_ascii_case("serval-deadline-ms"))
                .map(|h| {
                    format!(
                        "{}: {}",
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value)
                    )
                })
                .collect();
            lines.sort();
            let n: usize = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map_or(0, |h| {
                    std::str::from_utf8(h.value).unwrap().parse().unwrap()
                });
            let chunked = req
                .headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));
            let path = req.path.unwrap().to_owned();
            let line = format!("{} {}", req.method.unwrap(), path);
            buf.drain(..len);
            let body = if chunked {
                // Recorded raw, as framed on the wire, once its last chunk has arrived.
                let end = loop {
                    if let Some(i) = buf.windows(5).position(|w| w == b"0\r\n\r\n") {
                        break i + 5;
                    }
                    let mut chunk = [0u8; 4096];
                    let k = s.read(&mut chunk).await.ok().filter(|k| *k > 0)?;
                    buf.extend_from_slice(&chunk[..k]);
                };
                buf.drain(..end).collect::<Vec<u8>>()
            } else {
                while buf.len() < n {
                    let mut chunk = [0u8; 4096];
                    let k = s.read(&mut chunk).await.ok().filter(|k| *k > 0)?;
                    buf.extend_from_slice(&chunk[..k]);
                }
                buf.drain(..n).collect()
            };
            let body = String::from_utf8_lossy(&body).into_owned();
            return Some((format!("{line}\n{}\n\n{body}", lines.join("\n")), path));
        }
        let mut chunk = [0u8; 4096];
        let k = s.read(&mut chunk).await.ok().filter(|k| *k > 0)?;
        buf.extend_from_slice(&chunk[..k]);
    }
}

/// One response read off a raw client connection: status, lower-cased headers, decoded body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 8192];
    match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
        Ok(Ok(k)) if k > 0 => {
            buf.extend_from_slice(&chunk[..k]);
            true
        }
        _ => false,
    }
}

/// Reads the next final response (skipping 1xx); `None` if the connection closes first.
async fn read_answer(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Answer> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let parsed = resp
            .parse(buf)
            .expect("the router sent a malformed response");
        let httparse::Status::Complete(len) = parsed else {
            if !fill(s, buf).await {
                return None;
            }
            continue;
        };
        let status = resp.code.unwrap();
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
        buf.drain(..len);
        if status < 200 {
            continue;
        }
        let find = |n: &str| hs.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        assert!(
            !(find("content-length").is_some() && find("transfer-encoding").is_some()),
            "a response framed twice: {hs:?}"
        );
        let mut body = Vec::new();
        if find("transfer-encoding").is_some() {
            loop {
                let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
                    assert!(fill(s, buf).await, "closed inside a chunk size");
                    continue;
                };
                let size =
                    usize::from_str_radix(std::str::from_utf8(&buf[..end]).unwrap(), 16).unwrap();
                while buf.len() < end + 2 + size + 2 {
                    assert!(fill(s, buf).await, "closed inside a chunk");
                }
                body.extend_from_slice(&buf[end + 2..end + 2 + size]);
                buf.drain(..end + 2 + size + 2);
                if size == 0 {
                    break;
                }
            }
        } else {
            let n: usize = find("content-length").map_or(0, |v| v.parse().unwrap());
            while buf.len() < n {
                assert!(fill(s, buf).await, "closed inside a body");
            }
            body = buf.drain(..n).collect();
        }
        return Some(Answer {
            status,
            headers: hs,
            body,
        });
    }
}

/// Whether the router closes the connection (EOF) within a few seconds.
async fn closed_by_router(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut rest = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await {
        Ok(Ok(_)) => {
            buf.extend_from_slice(&rest);
            true
        }
        Ok(Err(_)) => true,
        Err(_) => false,
    }
}

/// One case: raw client bytes; the statuses answered on that connection, in order; the
/// requests the upstream received (canonical form, `UP` for the upstream's address).
struct Case {
    name: &'static str,
    send: String,
    answers: &'static [u16],
    upstream: Vec<String>,
    /// The router must close the connection after its answers.
    closes: bool,
}

fn up(line: &str, headers: &[&str], body: &str) -> String {
    let mut hs: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    hs.push("host: UP".to_owned());
    hs.push("serval-endpoint: e".to_owned());
    hs.sort();
    format!("{line}\n{}\n\n{body}", hs.join("\n"))
}

fn case(
    name: &'static str,
    send: &str,
    answers: &'static [u16],
    upstream: Vec<String>,
    closes: bool,
) -> Case {
    Case {
        name,
        send: send.to_owned(),
        answers,
        upstream,
        closes,
    }
}

fn cases() -> Vec<Case> {
    let ok_get = || up("GET /x", &[], "");
    let big_header = format!(
        "GET /e/x HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40 << 10)
    );
    vec![
        case(
            "a sized POST is forwarded with the path rewritten and Host naming the upstream",
            "POST /e/x HTTP/1.1\r\nHost: client.example\r\nContent-Length: 5\r\n\r\nhello",
            &[200],
            vec![up("POST /x", &["content-length: 5"], "hello")],
            false,
        ),
        case(
            "a chunked body is decoded and sent on with a Content-Length (RFC 9112 §7.1)",
            "POST /e/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;ext=1\r\nlo\r\n0\r\nX-Trailer: t\r\n\r\n",
            &[200],
            vec![up("POST /x", &["content-length: 5"], "hello")],
            false,
        ),
        case(
            "Content-Length with Transfer-Encoding: the chunked framing wins, the length is dropped, and the connection closes, so a smuggled second request is never read (RFC 9112 §6.1, §6.3)",
            "POST /e/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /e/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
            &[200],
            // An empty body needs no framing header (RFC 9112 §6.3 ¶7).
            vec![up("POST /x", &[], "")],
            true,
        ),
        case(
            "Transfer-Encoding before Content-Length is the same",
            "POST /e/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n2\r\nab\r\n0\r\n\r\nGET /e/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
            &[200],
            vec![up("POST /x", &["content-length: 2"], "ab")],
            true,
        ),
        case(
            "two different Content-Lengths are refused (RFC 9112 §6.3 ¶5)",
            "POST /e/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nhello",
            &[400],
            vec![],
            true,
        ),
        case(
            "a repeated identical Content-Length is one length (RFC 9110 §8.6)",
            "POST /e/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            &[200],
            vec![up("POST /x", &["content-length: 5"], "hello")],
            false,
        ),
        case(
            "a signed Content-Length is refused (RFC 9110 §8.6: 1*DIGIT)",
            "POST /e/x HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
            &[400],
            vec![],
            true,
        ),
        case(
            "a transfer coding other than chunked is refused with 501, as nginx does (RFC 9112 §6.1)",
            "POST /e/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",
            &[501],
            vec![],
            true,
        ),
        case(
            "chunked twice is refused with 501 (RFC 9112 §6.1: chunked at most once)",
            "POST /e/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
            &[501],
            vec![],
            true,
        ),
        case(
            "a Transfer-Encoding that does not end in chunked is refused (RFC 9112 §6.3 ¶4)",
            "POST /e/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
            &[400],
            vec![],
            true,
        ),
        case(
            "a negative chunk size is the client's error: 400 (RFC 9112 §7.1)",
            "POST /e/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
            &[400],
            vec![],
            true,
        ),
        case(
            "a chunk size past 64 bits is refused: 400",
            "POST /e/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffffff\r\nx\r\n0\r\n\r\n",
            &[400],
            vec![],
            true,
        ),
        case(
            "obs-fold in a request header is refused (RFC 9112 §5.2)",
            "GET /e/x HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
            &[400],
            vec![],
            true,
        ),
        case(
            "a bare CR inside a header is refused (RFC 9112 §2.2)",
            "GET /e/x HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
            &[400],
            vec![],
            true,
        ),
        case(
            "bare LF line ends are read as CRLF, as nginx does (RFC 9112 §2.2 allows it), and sent on as CRLF",
            "GET /e/x HTTP/1.1\nHost: x\n\n",
            &[200],
            vec![ok_get()],
            false,
        ),
        case(
            "a NUL in a header value is refused (RFC 9110 §5.5)",
            "GET /e/x HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n",
            &[400],
            vec![],
            true,
        ),
        case(
            "whitespace between a header name and the colon is refused (RFC 9112 §5.1)",
            "GET /e/x HTTP/1.1\r\nHost : x\r\n\r\n",
            &[400],
            vec![],
            true,
        ),
        case(
            "an invalid character in a header name is refused (RFC 9110 §5.1)",
            "GET /e/x HTTP/1.1\r\nHost: x\r\nX@A: 1\r\n\r\n",
            &[400],
            vec![],
            true,
        ),
        case(
            "an HTTP/1.1 request without Host is refused (RFC 9112 §3.2)",
            "GET /e/x HTTP/1.1\r\n\r\n",
            &[400],
            vec![],
            true,
        ),
        case(
            "two Host headers are refused (RFC 9112 §3.2)",
            "GET /e/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            &[400],
            vec![],
            true,
        ),
        case(
            "an HTTP/1.0 request may omit Host",
            "GET /e/x HTTP/1.0\r\n\r\n",
            &[200],
            vec![ok_get()],
            true,
        ),
        case(
            "header names with '_' are dropped, as nginx does, so a framework behind cannot read Transfer_Encoding as Transfer-Encoding",
            "POST /e/x HTTP/1.1\r\nHost: x\r\nTransfer_Encoding: chunked\r\nX_Forwarded_For: 1.2.3.4\r\nContent-Length: 2\r\n\r\nab",
            &[200],
            vec![up("POST /x", &["content-length: 2"], "ab")],
            false,
        ),
        case(
            "hop-by-hop headers and those Connection names are not forwarded (RFC 9110 §7.6.1)",
            "GET /e/x HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, x-private\r\nX-Private: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: secret\r\nX-Kept: 1\r\n\r\n",
            &[200],
            vec![up("GET /x", &["x-kept: 1"], "")],
            false,
        ),
        case(
            "a client asking to close is closed even beside a non-ASCII option (RFC 9112 §9.6)",
            "GET /e/x HTTP/1.1\r\nHost: x\r\nConnection: tran-\u{a5}, close\r\n\r\nGET /e/y HTTP/1.1\r\nHost: x\r\n\r\n",
            &[200],
            vec![ok_get()],
            true,
        ),
        case(
            "a header block past 32 KiB is refused with 431 (nginx: 400)",
            &big_header,
            &[431],
            vec![],
            true,
        ),
        case(
            "pipelined requests are answered in order, each forwarded once",
            "GET /e/a HTTP/1.1\r\nHost: x\r\n\r\nPOST /e/b HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nzGET /e/c HTTP/1.1\r\nHost: x\r\n\r\n",
            &[200, 200, 200],
            vec![
                up("GET /a", &[], ""),
                up("POST /b", &["content-length: 1"], "z"),
                up("GET /c", &[], ""),
            ],
            false,
        ),
        case(
            "an upgrade request is forwarded as a plain request: the router does not tunnel (RFC 9110 §7.8)",
            "GET /e/x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            &[200],
            vec![ok_get()],
            false,
        ),
        case(
            "an absolute-form target is routed by its authority and sent on in origin form (RFC 9112 §3.2.2)",
            "GET http://x/e/x HTTP/1.1\r\nHost: x\r\n\r\n",
            &[200],
            vec![ok_get()],
            false,
        ),
        case(
            "a body past --max-body is answered 413 before anything is sent upstream",
            "POST /e/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n",
            &[413],
            vec![],
            true,
        ),
        case(
            "a chunked body growing past --max-body is answered 413",
            &format!(
                "POST /e/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{c}{c}{c}0\r\n\r\n",
                c = format!("800\r\n{}\r\n", "a".repeat(0x800)),
            ),
            &[413],
            vec![],
            true,
        ),
        case(
            "a response framed both ways is relayed by its chunked framing, without the Content-Length (RFC 9112 §6.3 ¶3)",
            "GET /e/both-framings HTTP/1.1\r\nHost: x\r\n\r\n",
            &[200],
            vec![up("GET /both-framings", &[], "")],
            false,
        ),
        case(
            "an upstream's invalid Content-Length is its failure: 502",
            "GET /e/bad-length HTTP/1.1\r\nHost: x\r\n\r\n",
            &[502],
            // Retried once on the other attempt the route allows, then answered 502.
            vec![
                up("GET /bad-length", &[], ""),
                up("GET /bad-length", &[], ""),
            ],
            false,
        ),
    ]
}

/// Small limits so the size cases are cheap: bodies up to 1 KiB buffered, 4 KiB at most.
async fn conformance_router() -> (TestRouter, String, Log) {
    let (addr, log) = logging_upstream().await;
    let doc = table(
        vec![route("e", "/e", &[("b", 100)])],
        &[("b", vec![addr.clone()])],
    );
    let r = router_with(&doc, |c| {
        c.max_buffered_body = 1024;
        c.max_body = 4096;
    })
    .await;
    (r, addr, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_http_cases_get_the_right_answer_and_exactly_the_right_bytes_upstream() {
    let (r, addr, log) = conformance_router().await;
    let all = cases();
    let total = all.len();
    for c in all {
        let mut s = TcpStream::connect(r.addr).await.unwrap();
        s.write_all(c.send.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        for (i, want) in c.answers.iter().enumerate() {
            let a = read_answer(&mut s, &mut buf)
                .await
                .unwrap_or_else(|| panic!("{}: no answer {i}", c.name));
            assert_eq!(
                a.status,
                *want,
                "{}: answer {i}: {}",
                c.name,
                String::from_utf8_lossy(&a.body)
            );
            if a.status == 200 {
                assert_eq!(a.header("serval-backend"), Some("b"), "{}", c.name);
            }
            if c.name.starts_with("a response framed both ways") {
                assert_eq!(a.body, b"hello", "{}", c.name);
            }
        }
        if c.closes {
            assert!(
                closed_by_router(&mut s, &mut buf).await,
                "{}: the router kept the connection open",
                c.name
            );
            assert!(
                !String::from_utf8_lossy(&buf).contains("HTTP/1.1"),
                "{}: an answer to a smuggled request: {}",
                c.name,
                String::from_utf8_lossy(&buf)
            );
        }
        drop(s);
        // A refused request never reaches the upstream: give a wrongly forwarded one a moment.
        if c.upstream.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seen = log.seen(&addr);
        assert_eq!(seen, c.upstream, "{}: upstream bytes", c.name);
    }
    assert!(total >= 30, "the suite has {total} cases");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_by_the_router_and_not_forwarded() {
    let (r, addr, log) = conformance_router().await;
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(
        b"POST /e/x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    while !String::from_utf8_lossy(&buf).contains("\r\n\r\n") {
        assert!(fill(&mut s, &mut buf).await, "no 100 Continue");
    }
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 100 Continue\r\n"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    s.write_all(b"hello").await.unwrap();
    let a = read_answer(&mut s, &mut buf).await.unwrap();
    assert_eq!((a.status, a.body.as_slice()), (200, &b"ok"[..]));
    let seen = log.seen(&addr);
    assert_eq!(seen, vec![up("POST /x", &["content-length: 5"], "hello")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_hop_by_hop_headers_are_dropped_and_the_rest_relayed() {
    let (r, _, _) = conformance_router().await;
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"GET /e/hop HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let a = read_answer(&mut s, &mut Vec::new()).await.unwrap();
    assert_eq!((a.status, a.body.as_slice()), (200, &b"ok"[..]));
    for dropped in ["x-hop", "keep-alive"] {
        assert!(
            a.header(dropped).is_none(),
            "{dropped} relayed: {:?}",
            a.headers
        );
    }
    assert_eq!(a.header("x-kept"), Some("yes"));
    assert_eq!(a.header("serval-backend"), Some("b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hanging_up_cancels_the_upstream_request_at_once() {
    let (r, _, log) = conformance_router().await;
    // Mid-upload: nothing is sent upstream (the body is read first) and nothing is counted.
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"POST /e/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly ten..")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(s);
    // Waiting for a slow upstream: the router closes the upstream connection when the client
    // goes, not 5 s later when the upstream would have answered.
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"GET /e/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    wait_for("the slow request upstream", || {
        !log.requests.lock().unwrap().is_empty()
    })
    .await;
    let hung_up = Instant::now();
    drop(s);
    wait_for("the upstream connection to close", || {
        !log.closed.lock().unwrap().is_empty()
    })
    .await;
    let closed = log.closed.lock().unwrap()[0];
    assert!(
        closed.duration_since(hung_up) < Duration::from_secs(1),
        "the upstream request ran on for {:?} after the client left",
        closed.duration_since(hung_up)
    );
    assert_eq!(
        log.take().len(),
        1,
        "only the slow request reached the upstream"
    );
    let m = r.metrics();
    assert_eq!(
        metric(&m, "serval_router_upstream_errors_total"),
        0.0,
        "{m}"
    );
    assert_eq!(metric(&m, "serval_router_ejections_total"), 0.0, "{m}");
}
