//! Differential fuzzing of the router's request path against a strict reference.
//!
//! The input is the byte stream a client sends on one connection. It goes through hyper's
//! HTTP/1.1 server, exactly as configured in the router, and each request hyper delivers goes
//! through the router's own code for untrusted input: `headers::check_request` (Host, transfer
//! codings, `_` names, hop-by-hop stripping) and `matching::Matcher::find` (routes, protocol
//! paths). The same bytes go through a reference written here from the RFCs: httparse for heads,
//! RFC 9112 §6.3 framing and a strict §7.1 chunked decoder, the header rules restated naively,
//! and a naive longest-prefix matcher. Any disagreement is a finding:
//! - a message boundary hyper saw that the reference did not (request smuggling's class),
//! - a body hyper delivered that differs from the reference's,
//! - a request the rules accepted that the reference refuses, or the reverse,
//! - a forwarded header the reference would have dropped, or a kept one missing,
//! - a different route.
//!
//! The router's modules are compiled in directly (`#[path]`), so the target needs neither the
//! Kubernetes client nor the rest of the router.

#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use http::{HeaderMap, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[allow(dead_code)]
#[path = "../../src/headers.rs"]
mod headers;
#[allow(dead_code)]
#[path = "../../src/matching.rs"]
mod matching;

/// The router's head bound (`DEFAULT_MAX_HEAD_BYTES`).
const MAX_HEAD: usize = 32 << 10;

/// What hyper delivered for one request.
struct Delivered {
    method: String,
    target: String,
    version: Version,
    headers: HeaderMap,
    body: Result<Vec<u8>, ()>,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// Serves `input` with hyper's HTTP/1.1 server (the router's settings) and returns what it
/// delivered to the service, in order.
fn through_hyper(input: &[u8]) -> Vec<Delivered> {
    let input = input.to_vec();
    runtime().block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let svc = service_fn(move |req: hyper::Request<Incoming>| {
            let log = log.clone();
            async move {
                let (parts, body) = req.into_parts();
                // As the router's dispatch does: a `close` hyper cannot read as text still closes.
                let close = headers::asks_close(&parts.headers);
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes().to_vec())
                    .map_err(|_| ());
                log.lock().expect("log").push(Delivered {
                    method: parts.method.to_string(),
                    target: parts.uri.to_string(),
                    version: parts.version,
                    headers: parts.headers,
                    body,
                });
                let mut resp = hyper::Response::new(Full::new(Bytes::new()));
                if close {
                    resp.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .max_buf_size(MAX_HEAD)
            .serve_connection(TokioIo::new(server), svc);
        let feed = async move {
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        };
        let _ = tokio::join!(conn, feed);
        std::mem::take(&mut *seen.lock().expect("log"))
    })
}

/// One message as the reference frames it.
struct RefMessage {
    method: String,
    target: String,
    version: u8,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

fn line_end(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// RFC 9112 §7.1: chunk-size [chunk-ext] CRLF data CRLF … last-chunk trailer-section CRLF.
/// Returns the body and the bytes consumed; `None` when incomplete or invalid.
fn dechunk(b: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut at = 0;
    let mut body = Vec::new();
    loop {
        let end = line_end(&b[at..])?;
        let line = &b[at..at + end];
        let size_end = line
            .iter()
            .position(|c| !c.is_ascii_hexdigit())
            .unwrap_or(line.len());
        if size_end == 0 {
            return None;
        }
        let rest = &line[size_end..];
        // BWS, then chunk-ext: ";" and anything up to the line's end but CR or LF. The RFC
        // wants tokens there; hyper skips the extension unread (the router never forwards it),
        // and so does the reference.
        let ext = rest.trim_ascii_start();
        let rest_ok = (ext.is_empty() || ext[0] == b';')
            && !rest.iter().any(|c| matches!(c, b'\r' | b'\n'));
        if !rest_ok {
            return None;
        }
        let digits = std::str::from_utf8(&line[..size_end]).ok()?;
        let size = u64::from_str_radix(digits, 16).ok()?;
        at += end + 2;
        if size == 0 {
            // trailer-section CRLF
            loop {
                let end = line_end(&b[at..])?;
                at += end + 2;
                if end == 0 {
                    return Some((body, at));
                }
            }
        }
        let size = usize::try_from(size).ok()?;
        if b.len() - at < size.saturating_add(2) {
            return None;
        }
        body.extend_from_slice(&b[at..at + size]);
        at += size;
        if &b[at..at + 2] != b"\r\n" {
            return None;
        }
        at += 2;
    }
}

/// The messages a strict parser frames in `input`, up to the first invalid or incomplete one
/// (or the one after which the connection closes).
fn reference(mut input: &[u8]) -> Vec<RefMessage> {
    let mut out = Vec::new();
    loop {
        if input.is_empty() {
            return out;
        }
        let mut hs = [httparse::EMPTY_HEADER; 100];
        let mut req = httparse::Request::new(&mut hs);
        let len = match req.parse(input) {
            Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
            _ => return out,
        };
        let version = req.version.unwrap_or(1);
        let headers: Vec<(String, Vec<u8>)> = req
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
            .collect();
        let all = |n: &'static str| {
            headers
                .iter()
                .filter(move |(k, _)| k == n)
                .map(|(_, v)| v.as_slice())
        };
        let te: Vec<&[u8]> = all("transfer-encoding").collect();
        let cl: Vec<&[u8]> = all("content-length").collect();
        let mut close = version == 0 || all("connection").any(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("close"))
        });
        if version == 0 {
            // HTTP/1.0 keeps the connection only when asked.
            close = !all("connection").any(|v| {
                String::from_utf8_lossy(v)
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("keep-alive"))
            });
        }
        let rest = &input[len..];
        let (body, used) = if !te.is_empty() {
            if version == 0 {
                return out;
            }
            // §6.3 ¶4: chunked must be the final coding of a request, else 400.
            let last_chunked = te.last().is_some_and(|v| {
                String::from_utf8_lossy(v)
                    .rsplit(',')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
            });
            if !last_chunked {
                return out;
            }
            // §6.1: with Content-Length too, the connection closes after this message.
            close |= !cl.is_empty();
            match dechunk(rest) {
                Some(x) => x,
                None => return out,
            }
        } else if !cl.is_empty() {
            let parsed: Vec<Option<u64>> = cl
                .iter()
                .map(|v| {
                    (!v.is_empty() && v.iter().all(u8::is_ascii_digit))
                        .then(|| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
                        .flatten()
                })
                .collect();
            let Some(Some(n)) = parsed.first().copied() else {
                return out;
            };
            if parsed.iter().any(|p| *p != Some(n)) {
                return out;
            }
            let Ok(n) = usize::try_from(n) else {
                return out;
            };
            if rest.len() < n {
                return out;
            }
            (rest[..n].to_vec(), n)
        } else {
            (Vec::new(), 0)
        };
        out.push(RefMessage {
            method: req.method.unwrap_or_default().to_owned(),
            target: req.path.unwrap_or_default().to_owned(),
            version,
            headers,
            body,
        });
        input = &rest[used..];
        if close {
            return out;
        }
    }
}

/// The header rules restated from their RFC sections, on the reference's header lines.
fn reference_rules(m: &RefMessage) -> Result<Vec<(String, Vec<u8>)>, headers::Refused> {
    let hosts: Vec<&Vec<u8>> = m.headers.iter().filter(|(k, _)| k == "host").map(|(_, v)| v).collect();
    if hosts.is_empty() && m.version == 1 {
        return Err(headers::Refused::NoHost);
    }
    if hosts.len() > 1 {
        return Err(headers::Refused::ManyHosts);
    }
    if let Some(h) = hosts.first()
        && http::uri::Authority::try_from(h.as_slice()).is_err()
    {
        return Err(headers::Refused::BadHost);
    }
    let te: Vec<&Vec<u8>> = m
        .headers
        .iter()
        .filter(|(k, _)| k == "transfer-encoding")
        .map(|(_, v)| v)
        .collect();
    if te.len() > 1 || te.iter().any(|v| !String::from_utf8_lossy(v).trim().eq_ignore_ascii_case("chunked")) {
        return Err(headers::Refused::TransferCoding);
    }
    let connection_listed: Vec<String> = m
        .headers
        .iter()
        .filter(|(k, _)| k == "connection")
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    let hop = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
        "transfer-encoding",
        "content-length",
        "expect",
    ];
    Ok(m.headers
        .iter()
        .filter(|(k, _)| !k.contains('_') && !hop.contains(&k.as_str()) && !connection_listed.contains(k))
        .cloned()
        .collect())
}

/// The routes every input is matched against.
const ROUTES: [(&str, &str, Option<&str>); 5] = [
    ("digits", "/digits", None),
    ("internal", "/digits", Some("internal.example")),
    ("root", "/", None),
    ("deep", "/digits/deep/", None),
    ("v2x", "/v2", None),
];

/// Naive matching: a protocol path naming an Endpoint, else the longest prefix ending at a
/// segment boundary, a host-limited route before a host-less one of the same prefix.
fn reference_route(host: Option<&str>, path: &str) -> Option<usize> {
    let host_ok = |i: usize| match ROUTES[i].2 {
        Some(want) => host.is_some_and(|h| h.eq_ignore_ascii_case(want)),
        None => true,
    };
    for (prefix, stops) in [("/v2/models/", &['/'][..]), ("/v1/models/", &['/', ':'][..])] {
        if let Some(rest) = path.strip_prefix(prefix) {
            let name = rest.split(stops).next().unwrap_or("");
            // The last route of a name wins, as the matcher's map insert does.
            if let Some(i) = (0..ROUTES.len()).rev().find(|i| !name.is_empty() && ROUTES[*i].0 == name)
                && host_ok(i)
            {
                return Some(i);
            }
        }
    }
    let mut order: Vec<usize> = (0..ROUTES.len()).collect();
    order.sort_by(|a, b| {
        let (pa, pb) = (ROUTES[*a].1.trim_end_matches('/'), ROUTES[*b].1.trim_end_matches('/'));
        pb.len().cmp(&pa.len()).then(ROUTES[*b].2.is_some().cmp(&ROUTES[*a].2.is_some()))
    });
    order.into_iter().find(|&i| {
        let prefix = ROUTES[i].1.trim_end_matches('/');
        (ROUTES[i].2.is_none() || host_ok(i))
            && path
                .strip_prefix(prefix)
                .is_some_and(|r| r.is_empty() || r.starts_with('/'))
    })
}

fn matcher() -> &'static matching::Matcher {
    static M: OnceLock<matching::Matcher> = OnceLock::new();
    M.get_or_init(|| matching::Matcher::new(ROUTES))
}

fuzz_target!(|data: &[u8]| {
    let delivered = through_hyper(data);
    let expected = reference(data);
    // hyper hands a request to the service once its head is parsed, so it may deliver the
    // message the reference stopped in (with a failed body). A message beyond that one is a
    // boundary the reference never saw: the framings disagree.
    if delivered.len() > expected.len() + 1 {
        panic!(
            "hyper delivered {} requests, the reference framed {}",
            delivered.len(),
            expected.len()
        );
    }
    for (i, got) in delivered.iter().enumerate() {
        let Some(want) = expected.get(i) else {
            // The message the reference refused: hyper must not have delivered a body for it
            // that a strict parser would frame differently; nothing after it is compared.
            break;
        };
        assert_eq!(got.method, want.method, "request {i}: method");
        // http's URI type drops a fragment, which never travels anyway (RFC 9110 §4.2.5).
        let want_target = want.target.split('#').next().unwrap_or_default();
        if want_target.starts_with('/') {
            assert_eq!(got.target, want_target, "request {i}: target");
        }
        if let Ok(body) = &got.body {
            assert_eq!(body, &want.body, "request {i}: body");
        }
        // The router's rules on what hyper delivered, against the reference's on the raw lines.
        let mut forwarded = got.headers.clone();
        let ours = headers::check_request(got.version, &mut forwarded);
        match (ours, reference_rules(want)) {
            (Ok(()), Ok(mut kept)) => {
                let mut fwd: Vec<(String, Vec<u8>)> = forwarded
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
                    .collect();
                fwd.sort();
                kept.sort();
                assert_eq!(fwd, kept, "request {i}: forwarded headers");
            }
            (Err(a), Err(b)) => assert_eq!(a, b, "request {i}: refusal"),
            // hyper drops a Content-Length that came with Transfer-Encoding before the rules
            // see it; that difference aside, both must agree.
            (a, b) => panic!("request {i}: router {a:?}, reference {:?}", b.map(|_| ())),
        }
        // Routing of what would be forwarded.
        let uri: http::Uri = match got.target.parse() {
            Ok(u) => u,
            Err(_) => continue,
        };
        let host = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                got.headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .map(|h| matching::host_of(&h));
        let ours = matcher().find(host.as_deref(), uri.path()).map(|t| t.route);
        assert_eq!(
            ours,
            reference_route(host.as_deref(), uri.path()),
            "request {i}: route for host {host:?} path {:?}",
            uri.path()
        );
    }
});
