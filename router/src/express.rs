//! The express lane: the common request, forwarded without building HTTP objects.
//!
//! Most traffic through the router is the same shape: an HTTP/1.1 request with a small
//! `Content-Length` body (or none) to a route without a mirror. For those the connection is
//! served here: the head is parsed in place with `httparse`, the backend chosen from the parsed
//! headers, and the request written to a pooled upstream socket as one buffer with the path and
//! Host rewritten; the response head is parsed the same way and relayed with its body bytes as
//! they arrive. No header map, URI, body channel or connection task per request: profiling the
//! hyper path showed those costing most of the router's user-space time (see `router/README.md`).
//!
//! Anything else — chunked or large request bodies, `Expect`, upgrades, HTTP/1.0, hop-by-hop
//! extensions, the health and metrics paths, mirrored routes, unknown routes, malformed heads —
//! hands the connection, with every byte already read, to the hyper path, which serves the rest
//! of that connection. Behaviour seen by clients is the same on both paths: routing, retries,
//! retry budget, outlier ejection, timeouts, error JSON, metrics and the `serval-backend` header.

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;
use http::header::HeaderName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::errors::{Error, error_body};
use crate::matching::host_of;
use crate::proxy::{Proxy, is_hop_by_hop};
use crate::table::CompiledRoute;
use crate::upstream::{AddrState, BackendPool, InflightGuard};

/// Heads larger than this go to the hyper path (which applies its own limits and errors).
const MAX_HEAD: usize = 64 * 1024;
/// Headers parsed in place; a request with more goes to the hyper path.
const MAX_HEADERS: usize = 64;
/// Read size for response bodies relayed in pieces.
const READ_CHUNK: usize = 16 * 1024;
/// Request bodies up to this size are copied behind the head into one write.
const COALESCE_BODY: usize = 16 * 1024;

/// How a client connection left the express lane.
pub enum Outcome {
    /// Closed (by either side, a timeout, or drain).
    Closed,
    /// The rest of the connection is for the hyper path; `buffered` are bytes already read.
    Handover {
        /// The client socket.
        stream: TcpStream,
        /// Bytes read but not yet served, starting at a request head.
        buffered: Bytes,
    },
}

/// A request head parsed in place: ranges into the bytes it was parsed from.
struct Head {
    len: usize,
    method: Range<usize>,
    path: Range<usize>,
    headers: Vec<(Range<usize>, Range<usize>)>,
    host: Option<Range<usize>>,
    content_length: usize,
    close: bool,
}

/// Parses a request head at the start of `buf`: `Ok(None)` needs more bytes, `Err(())` means
/// the hyper path should serve it (something the express lane does not handle, or an error
/// hyper answers with its own status).
fn parse_request(buf: &[u8]) -> Result<Option<Head>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    if req.version != Some(1) {
        return Err(());
    }
    let base = buf.as_ptr() as usize;
    let range = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Err(());
    };
    // Origin-form only, and never the router's own `/-/` paths.
    if !path.starts_with('/') || path.starts_with(crate::server::RESERVED_PREFIX) {
        return Err(());
    }
    let mut head = Head {
        len,
        method: range(method.as_bytes()),
        path: range(path.as_bytes()),
        headers: Vec::with_capacity(req.headers.len()),
        host: None,
        content_length: 0,
        close: false,
    };
    let mut seen_length = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok());
            match n {
                Some(n) if !seen_length => head.content_length = n,
                _ => return Err(()),
            }
            seen_length = true;
        } else if name.eq_ignore_ascii_case(b"host") {
            if head.host.is_some() {
                return Err(());
            }
            head.host = Some(range(h.value));
            // Host is rewritten for the upstream: not forwarded as is.
            continue;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    head.close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                    // Names another hop-by-hop header: the hyper path strips it.
                    return Err(());
                }
            }
            continue;
        } else if is_unhandled(name) {
            return Err(());
        }
        head.headers.push((range(name), range(h.value)));
    }
    Ok(Some(head))
}

/// Request headers that need the hyper path: body framing other than a length, `Expect`, and
/// the hop-by-hop headers it strips (`Connection` is read before this check).
fn is_unhandled(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"transfer-encoding")
        || name.eq_ignore_ascii_case(b"expect")
        || is_hop_by_hop(name)
}

/// Serves `stream` on the express lane until it closes or needs the hyper path.
/// `header_timeout` bounds reading the first head from the connection's start and each later
/// head from its first byte; `idle_timeout` bounds the wait for a later head's first byte.
/// `drain` turns true when the shard drains.
pub async fn serve(
    proxy: &Proxy,
    mut stream: TcpStream,
    header_timeout: Duration,
    idle_timeout: Duration,
    mut drain: watch::Receiver<bool>,
) -> Outcome {
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut deadline = Some(tokio::time::Instant::now() + header_timeout);
    // Set while idle between requests (`deadline` is then `None`).
    let mut idle_until = tokio::time::Instant::now() + idle_timeout;
    loop {
        // Read until a whole head is buffered.
        let head = loop {
            if !buf.is_empty() {
                match parse_request(&buf) {
                    Ok(Some(head)) => break head,
                    Ok(None) if buf.len() < MAX_HEAD => {}
                    _ => return handover(stream, buf),
                }
            }
            if buf.is_empty() && *drain.borrow() {
                return Outcome::Closed;
            }
            buf.reserve(4096);
            let read = match deadline {
                Some(at) => match tokio::time::timeout_at(at, read_some(&stream, &mut buf)).await {
                    Ok(r) => r,
                    Err(_) => return Outcome::Closed,
                },
                // Idle between requests: wait for a byte, for drain, or for the idle bound.
                None => tokio::select! {
                    r = read_some(&stream, &mut buf) => r,
                    changed = drain.changed() => {
                        if changed.is_err() {
                            return Outcome::Closed;
                        }
                        continue;
                    }
                    () = tokio::time::sleep_until(idle_until) => return Outcome::Closed,
                },
            };
            match read {
                Ok(0) | Err(_) => return Outcome::Closed,
                Ok(_) => {
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + header_timeout);
                }
            }
        };
        let Some(plan) = plan(proxy, &buf, &head) else {
            return handover(stream, buf);
        };
        let head_bytes = buf.split_to(head.len).freeze();
        deadline = None;
        // `Err`: the client connection broke.
        let keep_open = exchange(proxy, &mut stream, &mut buf, &head_bytes, &head, plan)
            .await
            .unwrap_or(false);
        proxy.answered();
        if !keep_open || head.close || *drain.borrow() {
            let _ = stream.shutdown().await;
            return Outcome::Closed;
        }
        idle_until = tokio::time::Instant::now() + idle_timeout;
    }
}

/// Reads what the socket holds into `buf`. A read shorter than the room offered drained the
/// socket, so its readiness is cleared on the spot: tokio would otherwise learn it only from
/// one more `recv` returning EAGAIN — a system call per read saved. (Data arriving meanwhile
/// raises a new edge-triggered event, so nothing is missed.)
async fn read_some(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        let room = buf.capacity() - buf.len();
        match stream.try_read_buf(buf) {
            Ok(n) => {
                if n > 0 && n < room {
                    let drained = || Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock));
                    let _ = stream.try_io(Interest::READABLE, drained);
                }
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

fn handover(stream: TcpStream, buf: BytesMut) -> Outcome {
    Outcome::Handover {
        stream,
        buffered: buf.freeze(),
    }
}

/// What the express lane will do with a request: its route, backend and upstream path.
struct Plan {
    table: Arc<crate::table::CompiledTable>,
    route: usize,
    pool: Arc<BackendPool>,
    path: String,
}

/// Routes a parsed request, or `None` when the hyper path should serve it: no table, no
/// route, a mirrored route, no ready backend, or a body too large to buffer.
fn plan(proxy: &Proxy, buf: &[u8], head: &Head) -> Option<Plan> {
    if head.content_length > proxy.max_buffered_body() {
        return None;
    }
    let table = proxy.store().load()?;
    let target = &buf[head.path.clone()];
    // httparse accepted the path, so it is visible ASCII.
    let target = std::str::from_utf8(target).ok()?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let host = head
        .host
        .clone()
        .and_then(|r| std::str::from_utf8(&buf[r]).ok())
        .map(host_of);
    let found = table.matcher.find(host.as_deref(), path)?;
    let route = table.routes.get(found.route)?;
    if route.mirror.is_some() {
        return None;
    }
    let header = |name: &HeaderName| {
        head.headers
            .iter()
            .find(|(n, _)| buf[n.clone()].eq_ignore_ascii_case(name.as_str().as_bytes()))
            .map(|(_, v)| &buf[v.clone()])
    };
    let pool = route.choose_by(header)?.clone();
    let path = found.path.render(&pool.model, query);
    Some(Plan {
        route: found.route,
        table,
        pool,
        path,
    })
}

/// A parsed upstream response head.
struct RespHead {
    status: u16,
    len: usize,
    framing: Framing,
    /// The upstream will close the connection after this response.
    close: bool,
    /// The head as relayed to the client, without its end (see [`end_head`]): the status line
    /// and the headers minus the hop-by-hop ones, built in the same pass as the parse.
    relayed: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Why an attempt failed before a response head arrived.
enum AttemptError {
    Connect(String),
    Protocol(String),
}

/// Forwards one request and relays the answer. `Ok(true)`: the client connection can serve
/// another request; `Err(())`: the client connection broke.
async fn exchange(
    proxy: &Proxy,
    client: &mut TcpStream,
    buf: &mut BytesMut,
    head_bytes: &Bytes,
    head: &Head,
    plan: Plan,
) -> Result<bool, ()> {
    let start = Instant::now();
    let Plan {
        table,
        route,
        pool,
        path,
    } = plan;
    let Some(route) = table.routes.get(route) else {
        return Err(());
    };
    let answered = tokio::time::timeout(
        route.timeout,
        attempts(proxy, client, buf, head_bytes, head, route, &pool, &path),
    )
    .await;
    let (mut upstream, mut resp, inflight) = match answered {
        Ok(Ok(answer)) => answer,
        Ok(Err(AttemptsError::Client)) => return Err(()),
        Ok(Err(AttemptsError::Answer(e))) => {
            return reply_error(proxy, client, route, &pool, e, start, head.close).await;
        }
        Err(_) => {
            proxy.upstream_error(route, &pool, "timeout");
            let e = Error::Timeout {
                endpoint: route.endpoint.clone(),
                timeout_ms: route.timeout.as_millis() as u64,
            };
            return reply_error(proxy, client, route, &pool, e, start, head.close).await;
        }
    };
    let close = head.close || resp.framing == Framing::UntilClose;
    let mut out = std::mem::take(&mut resp.relayed);
    end_head(&mut out, &pool, close);
    upstream.buf.advance(resp.len);
    let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::BAD_GATEWAY);
    proxy.count(route, Some(&pool), status, start);
    let relayed = relay_body(client, &mut upstream, resp.framing, out).await;
    drop(inflight);
    match relayed {
        Ok(()) => {
            // Reusable only when the response ended cleanly and nothing trails it.
            if !resp.close && resp.framing != Framing::UntilClose && upstream.buf.is_empty() {
                proxy.raw_pool().put(upstream);
            }
            Ok(!close)
        }
        Err(RelayError::Upstream) => {
            // The head is out: the only way to tell the client is to close.
            proxy.upstream_error(route, &pool, "protocol");
            Err(())
        }
        Err(RelayError::Client) => Err(()),
    }
}

enum AttemptsError {
    /// The client connection broke while its body was read.
    Client,
    /// Answer the client with this error.
    Answer(Error),
}

/// Reads the body and sends attempts until one yields a response head (retrying on connect
/// failure and 503 within the route's budget, like the hyper path).
#[allow(clippy::too_many_arguments)]
async fn attempts(
    proxy: &Proxy,
    client: &mut TcpStream,
    buf: &mut BytesMut,
    head_bytes: &Bytes,
    head: &Head,
    route: &CompiledRoute,
    pool: &Arc<BackendPool>,
    path: &str,
) -> Result<(Upstream, RespHead, InflightGuard), AttemptsError> {
    while buf.len() < head.content_length {
        buf.reserve(head.content_length - buf.len());
        match read_some(client, buf).await {
            Ok(0) | Err(_) => return Err(AttemptsError::Client),
            Ok(_) => {}
        }
    }
    let body = buf.split_to(head.content_length).freeze();
    route.budget.deposit();
    let mut tried = Vec::new();
    loop {
        let Some((idx, inflight)) = pool.pick(&tried) else {
            return Err(AttemptsError::Answer(Error::NoReadyBackend(
                route.endpoint.clone(),
            )));
        };
        tried.push(idx);
        let sent = tried.len() as u32;
        let addr = &pool.addrs[idx];
        let Some(request) = upstream_request(head_bytes, head, addr, path, &body) else {
            return Err(AttemptsError::Answer(Error::BadRequest(format!(
                "upstream {:?} is not a host:port",
                addr.address
            ))));
        };
        let is_head = &head_bytes[head.method.clone()] == b"HEAD";
        match send(proxy.raw_pool(), addr, &request, &body, is_head).await {
            Ok((upstream, resp)) => {
                let code = resp.status;
                proxy.record_answer(route, pool, idx, code);
                if code == 503 && proxy.may_retry(route, pool, true, sent) {
                    // The 503's connection is dropped rather than drained: retries are rare.
                    continue;
                }
                return Ok((upstream, resp, inflight));
            }
            Err(e) => {
                pool.record_failure(idx, proxy.outlier(), proxy.metrics());
                let connect = matches!(e, AttemptError::Connect(_));
                proxy.upstream_error(route, pool, if connect { "connect" } else { "protocol" });
                if connect && proxy.may_retry(route, pool, true, sent) {
                    continue;
                }
                let backend = pool.name.clone();
                return Err(AttemptsError::Answer(match e {
                    AttemptError::Connect(reason) => Error::UpstreamUnreachable { backend, reason },
                    AttemptError::Protocol(reason) => Error::UpstreamProtocol { backend, reason },
                }));
            }
        }
    }
}

/// The request head for `addr`: the client's method and headers (Host rewritten, hop-by-hop
/// gone), the rewritten path; the body follows in the same buffer when small.
fn upstream_request(
    src: &[u8],
    head: &Head,
    addr: &AddrState,
    path: &str,
    body: &Bytes,
) -> Option<Vec<u8>> {
    let host = addr.host_header.as_ref()?;
    let inline_body = body.len() <= COALESCE_BODY;
    let mut out = Vec::with_capacity(head.len + 64 + if inline_body { body.len() } else { 0 });
    out.extend_from_slice(&src[head.method.clone()]);
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (n, v) in &head.headers {
        header_line(&mut out, &src[n.clone()], &src[v.clone()]);
    }
    out.extend_from_slice(b"\r\n");
    if inline_body {
        out.extend_from_slice(body);
    }
    Some(out)
}

/// Sends a request on a pooled (or new) connection and reads the response head.
async fn send(
    pool: &RawPool,
    addr: &Arc<AddrState>,
    request: &[u8],
    body: &Bytes,
    is_head: bool,
) -> Result<(Upstream, RespHead), AttemptError> {
    let head_only = body.len() > COALESCE_BODY;
    // A pooled connection that fails while the request is written never delivered it: the
    // request goes out again on the next one or a fresh one.
    let mut conn = loop {
        match pool.take(&addr.address) {
            Some(mut c) => {
                if write_request(&mut c.stream, request, body, head_only)
                    .await
                    .is_ok()
                {
                    break c;
                }
            }
            None => {
                let mut c = pool.connect(addr).await?;
                write_request(&mut c.stream, request, body, head_only)
                    .await
                    .map_err(|e| AttemptError::Protocol(format!("writing the request: {e}")))?;
                break c;
            }
        }
    };
    loop {
        let parsed = parse_response(&conn.buf, is_head)
            .map_err(|e| AttemptError::Protocol(format!("bad response from upstream: {e}")))?;
        match parsed {
            Some(resp) if (100..200).contains(&resp.status) && resp.status != 101 => {
                // Interim responses are not relayed: the request had no Expect.
                conn.buf.advance(resp.len);
                continue;
            }
            Some(resp) if resp.status == 101 => {
                return Err(AttemptError::Protocol(
                    "upstream switched protocols unasked".to_owned(),
                ));
            }
            Some(resp) => return Ok((conn, resp)),
            None if conn.buf.len() >= MAX_HEAD => {
                return Err(AttemptError::Protocol("response head too large".to_owned()));
            }
            None => {}
        }
        conn.buf.reserve(4096);
        match read_some(&conn.stream, &mut conn.buf).await {
            Ok(0) => {
                return Err(AttemptError::Protocol(
                    "connection closed before message completed".to_owned(),
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(AttemptError::Protocol(e.to_string())),
        }
    }
}

async fn write_request(
    stream: &mut TcpStream,
    request: &[u8],
    body: &Bytes,
    head_only: bool,
) -> io::Result<()> {
    stream.write_all(request).await?;
    if head_only {
        stream.write_all(body).await?;
    }
    Ok(())
}

fn parse_response(buf: &[u8], is_head: bool) -> Result<Option<RespHead>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let status = resp.code.unwrap_or(0);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = resp.version == Some(0);
    let mut relayed = Vec::with_capacity(len + 64);
    relayed.extend_from_slice(b"HTTP/1.1 ");
    relayed.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    relayed.push(b' ');
    relayed.extend_from_slice(resp.reason.unwrap_or_default().as_bytes());
    relayed.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        // `Transfer-Encoding` is relayed with the body it frames, which passes unchanged.
        if !is_hop_by_hop(name)
            && !name.eq_ignore_ascii_case(crate::proxy::BACKEND_HEADER.as_bytes())
        {
            header_line(&mut relayed, name, h.value);
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or("invalid content-length")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting content-length".to_owned());
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            if !last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err("unsupported transfer-encoding".to_owned());
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in h.value.split(|&b| b == b',') {
                if token.trim_ascii().eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.trim_ascii().eq_ignore_ascii_case(b"keep-alive") {
                    close = false;
                }
            }
        }
    }
    let framing = if is_head || status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        if n == 0 {
            Framing::Empty
        } else {
            Framing::Length(n)
        }
    } else {
        Framing::UntilClose
    };
    Ok(Some(RespHead {
        status,
        len,
        framing,
        close,
        relayed,
    }))
}

fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Ends a response head: the backend's name, `connection: close` if asked, the blank line.
fn end_head(out: &mut Vec<u8>, pool: &BackendPool, close: bool) {
    if let Some(v) = &pool.header_value {
        header_line(out, crate::proxy::BACKEND_HEADER.as_bytes(), v.as_bytes());
    }
    if close {
        header_line(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
}

enum RelayError {
    Upstream,
    Client,
}

/// Relays the response body as its bytes arrive; `out` holds the head, sent with the first
/// body bytes in one write.
async fn relay_body(
    client: &mut TcpStream,
    upstream: &mut Upstream,
    framing: Framing,
    mut out: Vec<u8>,
) -> Result<(), RelayError> {
    let mut remaining = match framing {
        Framing::Empty => 0,
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    let mut chunks = Chunked::default();
    loop {
        let done = match framing {
            Framing::Empty => true,
            Framing::Length(_) => {
                let take = (upstream.buf.len() as u64).min(remaining) as usize;
                out.extend_from_slice(&upstream.buf[..take]);
                upstream.buf.advance(take);
                remaining -= take as u64;
                remaining == 0
            }
            Framing::Chunked => {
                let (used, done) = chunks
                    .advance(&upstream.buf)
                    .map_err(|()| RelayError::Upstream)?;
                out.extend_from_slice(&upstream.buf[..used]);
                upstream.buf.advance(used);
                done
            }
            Framing::UntilClose => {
                out.extend_from_slice(&upstream.buf);
                upstream.buf.clear();
                false
            }
        };
        if !out.is_empty() {
            client
                .write_all(&out)
                .await
                .map_err(|_| RelayError::Client)?;
            out.clear();
        }
        if done {
            return Ok(());
        }
        upstream.buf.reserve(READ_CHUNK);
        match read_some(&upstream.stream, &mut upstream.buf).await {
            Ok(0) if framing == Framing::UntilClose => return Ok(()),
            Ok(0) | Err(_) => return Err(RelayError::Upstream),
            Ok(_) => {}
        }
    }
}

/// Where a chunked body is: its bytes pass through unchanged, this only finds the end.
#[derive(Default)]
enum Chunked {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

impl Chunked {
    /// Consumes what it can of `buf`: bytes used, and whether the body ended.
    fn advance(&mut self, buf: &[u8]) -> Result<(usize, bool), ()> {
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            match self {
                Chunked::Size => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((used, 0))) => {
                        at += used;
                        *self = Chunked::Trailers;
                    }
                    Ok(httparse::Status::Complete((used, n))) => {
                        at += used;
                        *self = Chunked::Data(n);
                    }
                    Ok(httparse::Status::Partial) => return Ok((at, false)),
                    Err(_) => return Err(()),
                },
                Chunked::Data(n) => {
                    let take = (rest.len() as u64).min(*n);
                    at += take as usize;
                    *n -= take;
                    if *n > 0 {
                        return Ok((at, false));
                    }
                    *self = Chunked::DataEnd;
                }
                Chunked::DataEnd => {
                    if rest.len() < 2 {
                        return Ok((at, false));
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(());
                    }
                    at += 2;
                    *self = Chunked::Size;
                }
                Chunked::Trailers => {
                    let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                        return if rest.len() > MAX_HEAD {
                            Err(())
                        } else {
                            Ok((at, false))
                        };
                    };
                    at += eol + 2;
                    if eol == 0 {
                        return Ok((at, true));
                    }
                }
            }
        }
    }
}

/// Answers with the JSON error the hyper path would give, tagged with the backend.
async fn reply_error(
    proxy: &Proxy,
    client: &mut TcpStream,
    route: &CompiledRoute,
    pool: &BackendPool,
    e: Error,
    start: Instant,
    close: bool,
) -> Result<bool, ()> {
    let status = e.status();
    let body = error_body(&e.to_string());
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    end_head(&mut out, pool, close);
    out.extend_from_slice(body.as_bytes());
    proxy.count(route, Some(pool), status, start);
    client.write_all(&out).await.map_err(|_| ())?;
    Ok(!close)
}

/// An upstream connection with the bytes read from it but not yet relayed.
pub struct Upstream {
    stream: TcpStream,
    buf: BytesMut,
    address: String,
    since: Instant,
}

/// A shard's keep-alive connections for the express lane, by address (most recently used
/// first out, whose socket is warmest).
pub struct RawPool {
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_address: usize,
    idle: Mutex<HashMap<String, Vec<Upstream>>>,
}

impl std::fmt::Debug for RawPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawPool").finish_non_exhaustive()
    }
}

impl RawPool {
    /// An empty pool.
    pub fn new(connect_timeout: Duration, idle_timeout: Duration, max_idle: usize) -> Self {
        Self {
            connect_timeout,
            idle_timeout,
            max_idle_per_address: max_idle,
            idle: Mutex::new(HashMap::new()),
        }
    }

    /// An idle connection to `address` the upstream has not closed meanwhile.
    fn take(&self, address: &str) -> Option<Upstream> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.get_mut(address)?;
        while let Some(c) = conns.pop() {
            if c.since.elapsed() >= self.idle_timeout {
                continue;
            }
            // Nothing may be readable on an idle connection: EOF or stray bytes retire it.
            let mut probe = [0u8; 1];
            match c.stream.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(c),
                _ => continue,
            }
        }
        None
    }

    fn put(&self, mut conn: Upstream) {
        if self.max_idle_per_address == 0 {
            return;
        }
        conn.since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = match idle.get_mut(&conn.address) {
            Some(c) => c,
            None => idle.entry(conn.address.clone()).or_default(),
        };
        if conns.len() >= self.max_idle_per_address {
            conns.remove(0);
        }
        conns.push(conn);
    }

    /// Closes connections idle past the timeout.
    pub fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|_, conns| {
            conns.retain(|c| c.since.elapsed() < self.idle_timeout);
            !conns.is_empty()
        });
    }

    async fn connect(&self, addr: &AddrState) -> Result<Upstream, AttemptError> {
        let connect = TcpStream::connect(&addr.address);
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(AttemptError::Connect(format!("tcp connect error: {e}"))),
            Err(_) => {
                return Err(AttemptError::Connect(format!(
                    "tcp connect error: no connection within {:?}",
                    self.connect_timeout
                )));
            }
        };
        // Inference requests are small writes that must not wait for Nagle.
        stream
            .set_nodelay(true)
            .map_err(|e| AttemptError::Connect(format!("tcp connect error: {e}")))?;
        Ok(Upstream {
            stream,
            buf: BytesMut::with_capacity(8 * 1024),
            address: addr.address.clone(),
            since: Instant::now(),
        })
    }
}

/// A client socket whose first bytes were already read: they are served first.
pub struct Prefixed {
    prefix: Bytes,
    inner: TcpStream,
}

impl Prefixed {
    /// `inner`, reading `prefix` first.
    pub fn new(prefix: Bytes, inner: TcpStream) -> Self {
        Self { prefix, inner }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_take_the_express_lane_only_when_simple() {
        let simple = b"POST /v2/models/e/infer?x=1 HTTP/1.1\r\nHost: a.b:80\r\n\
            Content-Length: 3\r\nConnection: keep-alive\r\nX-Id: 7\r\n\r\nabc";
        let h = parse_request(simple).unwrap().unwrap();
        assert_eq!(&simple[h.path.clone()], b"/v2/models/e/infer?x=1");
        assert_eq!(&simple[h.method.clone()], b"POST");
        assert_eq!(&simple[h.host.clone().unwrap()], b"a.b:80");
        assert_eq!(h.content_length, 3);
        assert!(!h.close);
        // Host and Connection are rewritten, not forwarded.
        let names: Vec<&[u8]> = h.headers.iter().map(|(n, _)| &simple[n.clone()]).collect();
        assert_eq!(names, [&b"Content-Length"[..], b"X-Id"]);
        assert!(
            parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n")
                .unwrap()
                .is_none()
        );
        let close = parse_request(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").unwrap();
        assert!(close.unwrap().close);
        for hyper_path in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"GET /-/metrics HTTP/1.1\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            b"GET / HTTP/1.1\r\nConnection: x-private\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"GARBAGE\r\n\r\n",
        ] {
            assert!(
                parse_request(hyper_path).is_err(),
                "{}",
                String::from_utf8_lossy(hyper_path)
            );
        }
    }

    #[test]
    fn response_framing() {
        let f = |raw: &[u8], head: bool| parse_response(raw, head).unwrap().unwrap().framing;
        assert!(f(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false) == Framing::Length(5));
        assert!(f(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true) == Framing::Empty);
        assert!(f(b"HTTP/1.1 204 No Content\r\n\r\n", false) == Framing::Empty);
        assert!(
            f(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            ) == Framing::Chunked
        );
        assert!(f(b"HTTP/1.1 200 OK\r\n\r\n", false) == Framing::UntilClose);
        // The relayed head keeps end-to-end headers only; the router adds its own backend name.
        let raw = b"HTTP/1.1 200 Fine\r\nConnection: keep-alive\r\nX-A: 1\r\n\
            serval-backend: spoof\r\nkeep-alive: timeout=5\r\ncontent-length: 5\r\n\r\nhello";
        let relayed = parse_response(raw, false).unwrap().unwrap().relayed;
        assert_eq!(
            String::from_utf8(relayed).unwrap(),
            "HTTP/1.1 200 Fine\r\nX-A: 1\r\ncontent-length: 5\r\n"
        );
        let close = parse_response(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", false);
        assert!(close.unwrap().unwrap().close);
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n", false).is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false).is_err()
        );
    }

    #[test]
    fn chunked_bodies_end_where_they_end_however_they_are_cut() {
        let body =
            b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        // Every split point, fed as two reads.
        for cut in 0..=body.len() {
            let mut c = Chunked::default();
            let mut buf = body[..cut].to_vec();
            let (used, done) = c.advance(&buf).unwrap();
            let mut total = used;
            if !done {
                buf.drain(..used);
                buf.extend_from_slice(&body[cut..]);
                let (used, done) = c.advance(&buf).unwrap();
                assert!(done, "cut at {cut}");
                total += used;
            }
            assert_eq!(total, end, "cut at {cut}");
        }
        assert!(Chunked::default().advance(b"zz\r\n").is_err());
        assert!(Chunked::Data(0).advance(b"xx").is_err());
    }
}
