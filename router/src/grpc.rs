//! The Open Inference Protocol over gRPC through the router: a call is routed by the model it
//! names in its message (`ModelInferRequest.model_name`, `ModelReadyRequest.name`, …) to that
//! Endpoint, whose policy (split, header match on metadata, sticky key, holding at zero)
//! chooses the Backend, and goes on over HTTP/2 with its body and metadata as they came. The
//! answer (message and trailers) streams back. Server-wide calls (live, ready, metadata) the
//! router answers itself, as it does over REST.

use bytes::{BufMut, BytesMut};
use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use prost::Message;

use crate::body::ProxyBody;
use crate::errors::Error;

/// The header (or trailer) holding a call's outcome, parsed once.
pub const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// Whether an answer's head already holds its outcome: a trailers-only answer, as gRPC errors
/// are (never the case for REST).
pub fn trailers_only(head: &HeaderMap) -> bool {
    head.contains_key(GRPC_STATUS)
}

/// The path prefix of the protocol's service.
pub const SERVICE: &str = "/inference.GRPCInferenceService/";

/// gRPC status codes the router answers with.
pub mod code {
    /// The call succeeded.
    pub const OK: i32 = 0;
    /// The message or its metadata is malformed.
    pub const INVALID_ARGUMENT: i32 = 3;
    /// The deadline passed.
    pub const DEADLINE_EXCEEDED: i32 = 4;
    /// No such model (Endpoint).
    pub const NOT_FOUND: i32 = 5;
    /// Too large, or too many requests.
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    /// Not a call the router serves.
    pub const UNIMPLEMENTED: i32 = 12;
    /// The router failed.
    pub const INTERNAL: i32 = 13;
    /// No Backend can answer now.
    pub const UNAVAILABLE: i32 = 14;
}

/// Whether a request is a gRPC call (`application/grpc`, `application/grpc+proto`, …).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/grpc"))
}

/// The first field of a unary call's message, when it is a string: the model a
/// `ModelInferRequest` (`model_name`), `ModelReadyRequest` or `ModelMetadataRequest` (`name`)
/// names. `body` is the whole request: one length-prefixed, uncompressed message.
pub fn model_name(body: &[u8]) -> Result<String, String> {
    let mut msg = unframe(body, "request")?;
    // Fields in any order (serializers write them in field order; the model is field 1).
    while !msg.is_empty() {
        let key = prost::encoding::decode_varint(&mut msg).map_err(|e| e.to_string())?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                prost::encoding::decode_varint(&mut msg).map_err(|e| e.to_string())?;
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                msg = msg.get(n..).ok_or("a field cut short")?;
            }
            2 => {
                let n = prost::encoding::decode_varint(&mut msg).map_err(|e| e.to_string())?;
                let n = usize::try_from(n).map_err(|e| e.to_string())?;
                let (value, after) = msg.split_at_checked(n).ok_or("a field cut short")?;
                if field == 1 {
                    return String::from_utf8(value.to_vec())
                        .map_err(|_| "the model name is not UTF-8".to_owned());
                }
                msg = after;
            }
            other => return Err(format!("a field of wire type {other}")),
        }
    }
    Ok(String::new())
}

/// The message of a unary call's body (`what`: request or answer): one length-prefixed,
/// uncompressed message, as gRPC frames it.
pub fn unframe<'a>(body: &'a [u8], what: &str) -> Result<&'a [u8], String> {
    let (&compressed, rest) = body
        .split_first()
        .ok_or_else(|| format!("an empty gRPC {what}"))?;
    if compressed != 0 {
        return Err(format!(
            "a compressed gRPC {what}: compression is not supported by the router"
        ));
    }
    let (len, msg) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| format!("a gRPC {what} shorter than its frame header"))?;
    let len = u32::from_be_bytes(*len) as usize;
    if len != msg.len() {
        return Err(format!(
            "a gRPC {what} of one message of {len} bytes has {} bytes",
            msg.len()
        ));
    }
    Ok(msg)
}

/// A router-made answer: one message, then `grpc-status: 0`.
pub fn answer(message: &impl Message) -> Response<ProxyBody> {
    let mut frame = BytesMut::with_capacity(5 + message.encoded_len());
    frame.put_u8(0);
    frame.put_u32(u32::try_from(message.encoded_len()).unwrap_or(u32::MAX));
    // Encoding into a buffer with room for the message cannot fail.
    let _ = message.encode(&mut frame);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(code::OK));
    let mut resp = Response::new(ProxyBody::grpc(frame.freeze(), trailers));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    resp
}

/// A router-made error: a trailers-only answer (`grpc-status`, `grpc-message` in the head).
pub fn error(code: i32, message: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code));
    // grpc-message is percent-encoded: anything but printable ASCII and '%' itself.
    let encoded: String = message
        .bytes()
        .map(|b| match b {
            b' '..=b'~' if b != b'%' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect();
    if let Ok(v) = HeaderValue::from_str(&encoded) {
        h.insert("grpc-message", v);
    }
    resp
}

/// The HTTP status a gRPC outcome (`grpc-status` in `headers`: trailers, or the head of a
/// trailers-only answer) is counted as in the router's metrics, load signals, retries and
/// ejection, so a rollout's error-rate gate, the autoscaler and the retry policy see gRPC as
/// they see REST: a client's mistake is a 4xx, overload a 429, the server's failure a 5xx.
pub fn outcome(headers: &HeaderMap) -> StatusCode {
    let code = headers
        .get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i32>().ok());
    match code {
        Some(code::OK) => StatusCode::OK,
        // Overload says when to come back (`retry-after`); without it, RESOURCE_EXHAUSTED is
        // a message over a size limit: the caller's.
        Some(code::RESOURCE_EXHAUSTED) if headers.contains_key(RETRY_AFTER) => {
            StatusCode::TOO_MANY_REQUESTS
        }
        Some(code::RESOURCE_EXHAUSTED) => StatusCode::PAYLOAD_TOO_LARGE,
        // INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED,
        // FAILED_PRECONDITION, OUT_OF_RANGE, UNAUTHENTICATED: the caller's.
        Some(3 | 5 | 6 | 7 | 9 | 11 | 16) => StatusCode::BAD_REQUEST,
        // CANCELLED: the client went away.
        Some(1) => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Some(code::DEADLINE_EXCEEDED) => StatusCode::GATEWAY_TIMEOUT,
        Some(code::UNAVAILABLE) => StatusCode::SERVICE_UNAVAILABLE,
        // UNKNOWN, ABORTED, UNIMPLEMENTED, INTERNAL, DATA_LOSS, or no status at all.
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The gRPC code of a router error, as its HTTP status would say it.
pub fn code_of(e: &Error) -> i32 {
    match e.status().as_u16() {
        400 | 422 => code::INVALID_ARGUMENT,
        404 => code::NOT_FOUND,
        408 | 504 => code::DEADLINE_EXCEEDED,
        413 | 429 => code::RESOURCE_EXHAUSTED,
        502 | 503 => code::UNAVAILABLE,
        _ => code::INTERNAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(m: &impl Message) -> Vec<u8> {
        let mut out = vec![0];
        out.extend((m.encoded_len() as u32).to_be_bytes());
        out.extend(m.encode_to_vec());
        out
    }

    #[test]
    fn the_model_is_read_from_the_message_whatever_follows_it() {
        let infer = serval_proto::ModelInferRequest {
            model_name: "digits".to_owned(),
            id: "7".to_owned(),
            raw_input_contents: vec![vec![0; 1000]],
            ..Default::default()
        };
        assert_eq!(model_name(&framed(&infer)).unwrap(), "digits");
        let ready = serval_proto::ModelReadyRequest {
            name: "d".to_owned(),
            version: "1".to_owned(),
        };
        assert_eq!(model_name(&framed(&ready)).unwrap(), "d");
        // Field 1 after others (any order is valid protobuf).
        let mut reordered = vec![0, 0, 0, 0, 0];
        let msg = [0x1a, 1, b'x', 0x0a, 2, b'm', b'n'];
        reordered[4] = msg.len() as u8;
        reordered.extend(msg);
        assert_eq!(model_name(&reordered).unwrap(), "mn");
        assert!(
            model_name(&[1, 0, 0, 0, 0])
                .unwrap_err()
                .contains("compressed")
        );
        assert!(model_name(&[0, 0, 0, 0, 9, 1]).is_err(), "length mismatch");
        assert!(model_name(&[]).is_err());
    }

    #[test]
    fn grpc_outcomes_are_counted_as_their_http_statuses() {
        let h = |pairs: &[(&'static str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_str(v).unwrap());
            }
            outcome(&m)
        };
        assert_eq!(h(&[("grpc-status", "0")]), StatusCode::OK);
        assert_eq!(h(&[("grpc-status", "3")]), StatusCode::BAD_REQUEST);
        assert_eq!(
            h(&[("grpc-status", "8"), ("retry-after", "1")]),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(h(&[("grpc-status", "8")]), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            h(&[("grpc-status", "13")]),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(h(&[("grpc-status", "14")]), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(h(&[]), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn errors_are_trailers_only_with_a_percent_encoded_message() {
        let r = error(code::NOT_FOUND, "model \"x\" not found: 100%");
        assert_eq!(r.headers()["grpc-status"], "5");
        assert_eq!(r.headers()["grpc-message"], "model \"x\" not found: 100%25");
        assert_eq!(r.headers()["content-type"], "application/grpc");
    }
}
