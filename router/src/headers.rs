//! The header rules of the router's one hop, each with the RFC section it comes from. hyper
//! parses and frames every message (it rejects malformed heads, bad chunk sizes, obs-fold,
//! bare CR and NUL, conflicting Content-Lengths, and non-chunked Transfer-Encodings of
//! requests); what is checked here is what it leaves to the application: Host, header names a
//! framework behind us could misread, and which headers describe the connection rather than
//! the message.

use http::header::{self, HeaderName};
use http::{HeaderMap, Version};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1, plus the
/// pre-standard Keep-Alive and Proxy-Connection it names); never forwarded either way.
/// Proxy-Authorization is consumed by the proxy it is addressed to (RFC 9110 §11.7.4), and
/// TE and Trailer negotiate this hop's transfer codings (RFC 9110 §10.1.4, §6.6.2).
pub const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Why a request is refused before it is routed (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// RFC 9112 §3.2: an HTTP/1.1 request without a Host header is answered 400.
    #[error("an HTTP/1.1 request needs a Host header (RFC 9112 §3.2)")]
    NoHost,
    /// RFC 9112 §3.2: so is a request with more than one Host header line.
    #[error("a request may carry one Host header only (RFC 9112 §3.2)")]
    ManyHosts,
    /// RFC 9112 §3.2 / RFC 9110 §7.2: a Host that is not a valid `uri-host [":" port]`.
    #[error("the Host header is not a valid host[:port] (RFC 9112 §3.2)")]
    BadHost,
    /// RFC 9112 §6.1: a transfer coding other than a single `chunked` (answered 501).
    #[error("only 'Transfer-Encoding: chunked' is supported (RFC 9112 §6.1)")]
    TransferCoding,
}

impl Refused {
    /// The status it is answered with.
    pub fn status(&self) -> http::StatusCode {
        match self {
            // "A server that receives a request message with a transfer coding it does not
            // understand SHOULD respond with 501 (Not Implemented)" (RFC 9112 §6.1); nginx does.
            Refused::TransferCoding => http::StatusCode::NOT_IMPLEMENTED,
            _ => http::StatusCode::BAD_REQUEST,
        }
    }
}

/// Checks a client's request head and removes what must not travel upstream.
pub fn check_request(version: Version, headers: &mut HeaderMap) -> Result<(), Refused> {
    // RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request) status code to any
    // HTTP/1.1 request message that lacks a Host header field and to any request message that
    // contains more than one Host header field line or a Host header field with an invalid
    // field value." HTTP/2 carries :authority instead (RFC 9113 §8.3.1); HTTP/1.0 may omit it.
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if version == Version::HTTP_11 => return Err(Refused::NoHost),
        (Some(_), Some(_)) => return Err(Refused::ManyHosts),
        (Some(h), None) if http::uri::Authority::try_from(h.as_bytes()).is_err() => {
            return Err(Refused::BadHost);
        }
        _ => {}
    }
    // hyper decodes one chunked coding and passes the rest through; any other coding (or
    // chunked twice, which §7 forbids) would reach the upstream still encoded but unlabelled.
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    match (codings.next(), codings.next()) {
        (Some(te), None) if !te.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") => {
            return Err(Refused::TransferCoding);
        }
        (Some(_), Some(_)) => return Err(Refused::TransferCoding),
        _ => {}
    }
    // Header names with `_` are valid tokens (RFC 9110 §5.1), but CGI, WSGI and Rack map `-`
    // and `_` to the same variable, so `Transfer_Encoding` or `X_Forwarded_For` could smuggle
    // or spoof behind a Python or Ruby model container. nginx drops them by default
    // (`underscores_in_headers off`); so does the router.
    if headers.keys().any(|n| n.as_str().contains('_')) {
        let drop: Vec<HeaderName> = headers
            .keys()
            .filter(|n| n.as_str().contains('_'))
            .cloned()
            .collect();
        for name in &drop {
            tracing::debug!(header = %name, "dropped a request header whose name has '_'");
            headers.remove(name);
        }
    }
    strip_hop_by_hop(headers);
    // The client's framing is hyper's to decode and the upstream request's to re-derive from
    // the body: a proxy forwards the message, not its framing (RFC 9112 §6.1, §6.3; hyper
    // already dropped a Content-Length that came with Transfer-Encoding and will close that
    // connection after answering, as §6.1 requires). Expect belongs to this hop: hyper has
    // answered 100-continue when the body was read (RFC 9110 §10.1.1).
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::EXPECT);
    Ok(())
}

/// Whether the client asked to close its connection (RFC 9112 §9.6), read as bytes: hyper
/// reads the Connection header as text and ignores a `close` beside a non-ASCII option (the
/// fuzz target found `Connection: tran-\xa5, close` kept alive), so the router answers such a
/// request with `Connection: close` itself.
pub fn asks_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|o| o.trim_ascii().eq_ignore_ascii_case(b"close"))
}

/// Removes the connection-specific headers of an upstream's response before it is relayed.
pub fn relay_response(headers: &mut HeaderMap) {
    // RFC 9112 §6.3 ¶3: a message with both Transfer-Encoding and Content-Length is framed by
    // the former, and "an intermediary that chooses to forward the message MUST first remove
    // the received Content-Length field". hyper has decoded the chunked body; it re-frames
    // what it relays.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(headers);
}

/// Removes [`HOP_BY_HOP`], the headers the Connection header names (RFC 9110 §7.6.1: "a proxy
/// or gateway MUST parse a received Connection header field before a message is forwarded
/// and, for each connection-option in this field, remove any header or trailer field(s) from
/// the message with the same name"), and Transfer-Encoding, which describes this hop's
/// framing (RFC 9112 §6.1; hyper frames the next hop itself).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names is cheaper than a hashed
    // removal per name. Any header a Connection header lists needs that header, seen here.
    if !headers
        .keys()
        .any(|n| n == header::TRANSFER_ENCODING || HOP_BY_HOP.contains(n))
    {
        return;
    }
    // Read as bytes: one non-ASCII option must not hide the valid ones beside it (the fuzz
    // target found `Connection: x-a, \xe7lose` relaying x-a when values were read as text).
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|n| HeaderName::from_bytes(n.trim_ascii()).ok())
        .collect();
    for h in HOP_BY_HOP.iter().chain(&listed) {
        headers.remove(h);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn host_is_required_once_on_http_1_1_only() {
        let check = |v, pairs: &[(&str, &str)]| check_request(v, &mut headers(pairs));
        assert_eq!(check(Version::HTTP_11, &[]), Err(Refused::NoHost));
        assert_eq!(check(Version::HTTP_10, &[]), Ok(()));
        assert_eq!(check(Version::HTTP_2, &[]), Ok(()));
        assert_eq!(
            check(Version::HTTP_11, &[("host", "a"), ("host", "b")]),
            Err(Refused::ManyHosts)
        );
        assert_eq!(
            check(Version::HTTP_11, &[("host", "a b")]),
            Err(Refused::BadHost)
        );
        assert_eq!(check(Version::HTTP_11, &[("host", "a.example:80")]), Ok(()));
        let te = |v| check(Version::HTTP_11, &[("host", "a"), ("transfer-encoding", v)]);
        assert_eq!(te("chunked"), Ok(()));
        assert_eq!(te(" Chunked "), Ok(()));
        assert_eq!(te("gzip, chunked"), Err(Refused::TransferCoding));
        assert_eq!(te("chunked, chunked"), Err(Refused::TransferCoding));
        assert_eq!(Refused::TransferCoding.status(), 501);
    }

    #[test]
    fn underscores_connection_listed_and_framing_headers_are_not_forwarded() {
        let mut h = headers(&[
            ("host", "x"),
            ("connection", "x-other"),
            ("x-other", "o"),
            ("transfer_encoding", "chunked"),
            ("x_forwarded_for", "1.2.3.4"),
            ("connection", "x-secret, keep-alive"),
            ("x-secret", "s"),
            ("content-length", "5"),
            ("expect", "100-continue"),
            ("x-kept", "1"),
        ]);
        check_request(Version::HTTP_11, &mut h).unwrap();
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["host", "x-kept"]);
    }

    #[test]
    fn a_non_ascii_connection_option_does_not_hide_the_others() {
        let mut h = headers(&[("x-a", "1"), ("x-kept", "1")]);
        h.insert(
            header::CONNECTION,
            http::HeaderValue::from_bytes(b"x-a, \xe7lose").unwrap(),
        );
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn close_is_read_beside_a_non_ascii_option() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            http::HeaderValue::from_bytes(b"tran-\xa5, , Close").unwrap(),
        );
        assert!(asks_close(&h));
        assert!(!asks_close(&headers(&[(
            "connection",
            "keep-alive, x-close"
        )])));
    }

    #[test]
    fn a_response_framed_twice_loses_its_content_length() {
        let mut h = headers(&[
            ("transfer-encoding", "chunked"),
            ("content-length", "5"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("x-kept", "1"),
        ]);
        relay_response(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        let mut sized = headers(&[("content-length", "5")]);
        relay_response(&mut sized);
        assert_eq!(sized["content-length"], "5");
    }
}
