//! Bodies on both sides of the hop. The response body the router sends: a fixed body (errors,
//! health) or the upstream's stream, which holds the address's in-flight count until it ends
//! and, for mirrored requests, copies what it forwards so the shadow's answer can be compared
//! without delaying the client. The request body read from the client: read ahead up to the
//! buffering bound ([`read_ahead`]), and streamed past it through [`ClientBody`], which remembers
//! when the *client* was at fault, so a malformed or abandoned upload is never taken for an
//! upstream's failure.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::oneshot;

use crate::upstream::{BoxError, InflightGuard};

/// Router response body.
#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
    guard: Option<InflightGuard>,
    tee: Option<Tee>,
    on_end: Option<OnEnd>,
}

/// Called once when an upstream body ends, with its trailers if it had any (a gRPC answer's
/// outcome is in them): counts the request then.
pub struct OnEnd(Box<dyn EndHook>);

/// What [`OnEnd`] calls.
pub trait EndHook: FnOnce(Option<&http::HeaderMap>) + Send + Sync {}
impl<F: FnOnce(Option<&http::HeaderMap>) + Send + Sync> EndHook for F {}

impl OnEnd {
    /// Wraps the callback.
    pub fn new(f: impl FnOnce(Option<&http::HeaderMap>) + Send + Sync + 'static) -> Self {
        Self(Box::new(f))
    }
}

impl std::fmt::Debug for OnEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnEnd")
    }
}

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    Upstream(Incoming),
    /// A message, then trailers: the router's own gRPC answers.
    Grpc(Option<Bytes>, Option<http::HeaderMap>),
}

/// What the mirror learns of the primary's answer.
#[derive(Debug)]
pub enum PrimaryAnswer {
    /// A successful answer, whole.
    Body {
        /// `Content-Type`.
        content_type: Option<String>,
        /// `Inference-Header-Content-Length`: binary outputs follow this much JSON.
        header_length: Option<usize>,
        /// The body.
        body: Bytes,
    },
    /// No comparable answer: the mirror's error reason (`primary_status`, `primary_failed`,
    /// `primary_too_large`).
    Failed(&'static str),
}

/// Copies up to `limit` bytes of the primary's body and hands them, with the head's content
/// type, to the mirror when the body ends; a failed, cut short or oversized body, or a failed
/// answer, is handed over as its reason.
#[derive(Debug)]
pub struct Tee {
    buf: BytesMut,
    limit: usize,
    overflow: bool,
    content_type: Option<String>,
    header_length: Option<usize>,
    /// A gRPC answer succeeded only if its trailers say `grpc-status: 0`.
    grpc_ok: Option<bool>,
    tx: Option<oneshot::Sender<PrimaryAnswer>>,
}

impl Tee {
    /// A tee sending its copy to `tx`.
    pub fn new(limit: usize, tx: oneshot::Sender<PrimaryAnswer>) -> Self {
        Self {
            buf: BytesMut::new(),
            limit,
            overflow: false,
            content_type: None,
            header_length: None,
            grpc_ok: None,
            tx: Some(tx),
        }
    }

    /// Records what the answer's head says about its body.
    pub fn set_head(&mut self, headers: &http::HeaderMap) {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        self.content_type = text("content-type").map(str::to_owned);
        self.header_length = text(crate::agreement::HEADER_LENGTH).and_then(|v| v.parse().ok());
        if self
            .content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("application/grpc"))
        {
            self.grpc_ok = Some(false);
        }
    }

    /// Reads a gRPC answer's outcome from its trailers.
    fn trailers(&mut self, trailers: &http::HeaderMap) {
        if self.grpc_ok.is_some() {
            self.grpc_ok = Some(
                trailers
                    .get(crate::grpc::GRPC_STATUS)
                    .is_some_and(|v| v == "0"),
            );
        }
    }

    /// Keeps `tee` for an answer worth comparing (`comparable`), reading what its head says;
    /// otherwise tells the mirror the primary failed (`primary_status`).
    pub fn for_answer(tee: Option<Self>, comparable: bool, head: &http::HeaderMap) -> Option<Self> {
        let mut tee = tee?;
        if comparable {
            tee.set_head(head);
            Some(tee)
        } else {
            tee.fail("primary_status");
            None
        }
    }

    /// The primary answered nothing comparable, for `reason`.
    pub fn fail(mut self, reason: &'static str) {
        self.send(PrimaryAnswer::Failed(reason));
    }

    fn send(&mut self, answer: PrimaryAnswer) {
        if let Some(tx) = self.tx.take() {
            // The mirror task may have given up already; nothing to do then.
            let _ = tx.send(answer);
        }
    }

    fn push(&mut self, data: &Bytes) {
        if self.buf.len() + data.len() > self.limit {
            self.overflow = true;
        } else if !self.overflow {
            self.buf.extend_from_slice(data);
        }
    }

    fn finish(&mut self, ok: bool) {
        let answer = if !ok {
            PrimaryAnswer::Failed("primary_failed")
        } else if self.grpc_ok == Some(false) {
            // A gRPC error (or an answer cut before its trailers) is not an answer to compare.
            PrimaryAnswer::Failed("primary_status")
        } else if self.overflow {
            PrimaryAnswer::Failed("primary_too_large")
        } else {
            PrimaryAnswer::Body {
                content_type: self.content_type.take(),
                header_length: self.header_length,
                body: std::mem::take(&mut self.buf).freeze(),
            }
        };
        self.send(answer);
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl ProxyBody {
    /// A body of fixed bytes.
    pub fn full(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Full(Some(bytes)),
            guard: None,
            tee: None,
            on_end: None,
        }
    }

    /// No body at all: the head ends the stream (a gRPC trailers-only answer must be one
    /// HEADERS frame, not headers and an empty DATA frame).
    pub fn empty() -> Self {
        Self {
            kind: Kind::Full(None),
            guard: None,
            tee: None,
            on_end: None,
        }
    }

    /// Calls `on_end` when the upstream body ends (at once if it already has).
    pub fn with_on_end(mut self, on_end: OnEnd) -> Self {
        if self.is_end_stream() {
            (on_end.0)(None);
        } else {
            self.on_end = Some(on_end);
        }
        self
    }

    /// A gRPC message followed by its trailers (`grpc-status`).
    pub fn grpc(message: Bytes, trailers: http::HeaderMap) -> Self {
        Self {
            kind: Kind::Grpc(Some(message), Some(trailers)),
            guard: None,
            tee: None,
            on_end: None,
        }
    }

    /// The upstream's streamed body (hyper-util returns its connection to the pool once the
    /// body has been read to its end).
    pub fn upstream(body: Incoming, guard: InflightGuard, tee: Option<Tee>) -> Self {
        let mut this = Self {
            kind: Kind::Upstream(body),
            guard: Some(guard),
            tee,
            on_end: None,
        };
        if this.is_end_stream() {
            this.guard = None;
            if let Some(t) = this.tee.as_mut() {
                t.finish(true);
            }
        }
        this
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Grpc(message, trailers) => Poll::Ready(match message.take() {
                Some(m) => Some(Ok(Frame::data(m))),
                None => trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
            Kind::Upstream(inner) => {
                let res = ready!(Pin::new(&mut *inner).poll_frame(cx));
                // hyper stops polling a sized body once its last byte is out, so the end is
                // detected from `is_end_stream` as well as from the final `None`.
                let ended = match &res {
                    Some(Ok(frame)) => {
                        if let (Some(tee), Some(data)) = (this.tee.as_mut(), frame.data_ref()) {
                            tee.push(data);
                        }
                        if let Some(t) = frame.trailers_ref() {
                            if let Some(tee) = this.tee.as_mut() {
                                tee.trailers(t);
                            }
                            if let Some(on_end) = this.on_end.take() {
                                (on_end.0)(Some(t));
                            }
                        }
                        inner.is_end_stream().then_some(true)
                    }
                    Some(Err(_)) => Some(false),
                    None => Some(true),
                };
                if let Some(ok) = ended {
                    if let Some(on_end) = this.on_end.take() {
                        (on_end.0)(None);
                    }
                    this.guard = None;
                    if let Some(tee) = this.tee.as_mut() {
                        tee.finish(ok);
                    }
                }
                Poll::Ready(res.map(|r| r.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Grpc(m, t) => m.is_none() && t.is_none(),
            Kind::Upstream(inner) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            // Trailers follow: no length is promised.
            Kind::Grpc(..) => SizeHint::default(),
            Kind::Upstream(inner) => inner.size_hint(),
        }
    }
}

/// Reads a body up to `limit` bytes; `None` if it is larger or fails.
pub async fn collect_limited<B>(body: B, limit: usize) -> Option<Bytes>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .ok()
        .map(|c| c.to_bytes())
}

/// Reads and drops a client's body up to `limit` bytes, holding no memory, so a client still
/// sending it reads the answer rather than a reset.
pub async fn discard(mut body: Incoming, limit: u64) {
    let mut read = 0;
    while read <= limit {
        match body.frame().await {
            Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len() as u64),
            _ => break,
        }
    }
}

/// How a client's request body went wrong; recorded by [`ClientBody`] and read once the
/// upstream exchange has failed, to tell the client's fault from the upstream's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFault {
    /// Bad framing (e.g. an invalid chunk size): 400.
    Malformed,
    /// More than the body limit: 413.
    TooLarge,
    /// The client went away mid-upload: nobody to answer, nothing to count.
    HungUp,
}

impl ClientFault {
    /// Classifies an error reading the client's body.
    pub fn of(e: &hyper::Error) -> Self {
        if e.is_incomplete_message() || e.is_canceled() || e.is_closed() || is_hang_up(e) {
            ClientFault::HungUp
        } else {
            ClientFault::Malformed
        }
    }
}

/// Whether an I/O error under `e` is the peer going away.
fn is_hang_up(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                io.kind(),
                UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
            );
        }
        cur = err.source();
    }
    false
}

/// Where a [`ClientBody`] records its (first) fault; shared with the request's handler.
#[derive(Debug, Clone, Default)]
pub struct FaultCell(Arc<OnceLock<ClientFault>>);

impl FaultCell {
    fn set(&self, fault: ClientFault) {
        let _ = self.0.set(fault);
    }

    /// The client's fault, if its body failed.
    pub fn get(&self) -> Option<ClientFault> {
        self.0.get().copied()
    }
}

/// The rest of a client's request body, streamed upstream after an already-read `prefix`,
/// bounded to `limit` bytes in all. Its own failures are recorded in a [`FaultCell`].
#[derive(Debug)]
pub struct ClientBody {
    prefix: Option<Bytes>,
    rest: Incoming,
    sent: u64,
    limit: u64,
    fault: FaultCell,
}

impl ClientBody {
    /// Streams `prefix` then `rest`.
    pub fn new(prefix: Bytes, rest: Incoming, limit: u64, fault: FaultCell) -> Self {
        Self {
            sent: prefix.len() as u64,
            prefix: (!prefix.is_empty()).then_some(prefix),
            rest,
            limit,
            fault,
        }
    }
}

/// The error a [`ClientBody`] ends the upstream request with.
#[derive(Debug, thiserror::Error)]
#[error("client request body: {0:?}")]
pub struct ClientBodyError(pub ClientFault);

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(p) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        let res = ready!(Pin::new(&mut self.rest).poll_frame(cx));
        let fail = |this: &mut Self, fault: ClientFault| {
            this.fault.set(fault);
            Poll::Ready(Some(Err(Box::new(ClientBodyError(fault)) as BoxError)))
        };
        match res {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    self.sent += data.len() as u64;
                    if self.sent > self.limit {
                        return fail(&mut self, ClientFault::TooLarge);
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                // Request trailers are dropped: a recipient that removes the chunked coding
                // MAY discard the trailer fields it received (RFC 9110 §6.5.1).
                Err(_) => Poll::Ready(None),
            },
            Some(Err(e)) => {
                let fault = ClientFault::of(&e);
                fail(&mut self, fault)
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.rest.size_hint();
        let prefix = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        hint.set_lower(hint.lower() + prefix);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + prefix);
        }
        hint
    }
}

/// A client body after reading ahead: whole, or too long to buffer and so streamed on.
#[derive(Debug)]
pub enum ReadAhead {
    /// The whole body, at most the buffering bound: retryable and mirrorable.
    Whole(Bytes),
    /// What was read, and the rest still in the connection.
    Partial(Bytes, Incoming),
}

/// Reads a client's body until it ends or passes `buffer_limit` bytes; fails with the client's
/// fault, or [`ClientFault::TooLarge`] past `body_limit`. A body whose declared length is
/// already past the buffering bound is not read at all.
pub async fn read_ahead(
    mut body: Incoming,
    buffer_limit: usize,
    body_limit: u64,
) -> Result<ReadAhead, ClientFault> {
    let hint = body.size_hint();
    if hint.lower() > body_limit {
        return Err(ClientFault::TooLarge);
    }
    if hint.lower() > buffer_limit as u64 {
        return Ok(ReadAhead::Partial(Bytes::new(), body));
    }
    let mut buf = BytesMut::new();
    let mut first: Option<Bytes> = None;
    loop {
        if body.is_end_stream() {
            break;
        }
        match body.frame().await {
            None => break,
            Some(Err(e)) => return Err(ClientFault::of(&e)),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    // Trailers end the body (and are dropped, RFC 9110 §6.5.1).
                    break;
                };
                // The common case, one frame: no copy.
                match first.take() {
                    None if buf.is_empty() => first = Some(data),
                    prev => {
                        if let Some(p) = prev {
                            buf.extend_from_slice(&p);
                        }
                        buf.extend_from_slice(&data);
                    }
                }
                let len = first.as_ref().map_or(buf.len(), Bytes::len);
                if len as u64 > body_limit {
                    return Err(ClientFault::TooLarge);
                }
                if len > buffer_limit {
                    let read = first.take().unwrap_or_else(|| buf.split().freeze());
                    return Ok(ReadAhead::Partial(read, body));
                }
            }
        }
    }
    Ok(ReadAhead::Whole(first.unwrap_or_else(|| buf.freeze())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn teed(content_type: &str) -> (Tee, oneshot::Receiver<PrimaryAnswer>) {
        let (tx, rx) = oneshot::channel();
        let mut tee = Tee::new(1024, tx);
        let mut head = http::HeaderMap::new();
        head.insert("content-type", content_type.parse().unwrap());
        tee.set_head(&head);
        tee.push(&Bytes::from_static(b"\0\0\0\0\x01x"));
        (tee, rx)
    }

    fn status(code: &str) -> http::HeaderMap {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", code.parse().unwrap());
        t
    }

    #[test]
    fn a_grpc_answer_is_compared_only_when_its_trailers_say_ok() {
        let (mut tee, mut rx) = teed("application/grpc");
        tee.trailers(&status("0"));
        tee.finish(true);
        assert!(matches!(rx.try_recv(), Ok(PrimaryAnswer::Body { body, .. }) if body.len() == 6));

        let (mut tee, mut rx) = teed("application/grpc");
        tee.trailers(&status("13"));
        tee.finish(true);
        assert!(matches!(
            rx.try_recv(),
            Ok(PrimaryAnswer::Failed("primary_status"))
        ));

        // Cut before its trailers: no outcome, nothing to compare.
        let (mut tee, mut rx) = teed("application/grpc+proto");
        tee.finish(true);
        assert!(matches!(
            rx.try_recv(),
            Ok(PrimaryAnswer::Failed("primary_status"))
        ));

        // REST answers have no trailers to wait for.
        let (mut tee, mut rx) = teed("application/json");
        tee.finish(true);
        assert!(matches!(rx.try_recv(), Ok(PrimaryAnswer::Body { .. })));
    }
}
