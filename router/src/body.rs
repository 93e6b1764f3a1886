//! The response body the router sends: a fixed body (errors, health) or the upstream's stream,
//! which holds the address's in-flight count until it ends and, for mirrored requests, copies
//! what it forwards so the shadow's answer can be compared without delaying the client.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::oneshot;

use crate::pool::Lease;
use crate::upstream::{BoxError, InflightGuard};

/// Router response body.
#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
    guard: Option<InflightGuard>,
    lease: Option<Lease>,
    tee: Option<Tee>,
}

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    Upstream(Incoming),
}

/// Copies up to `limit` bytes of a body and hands them over when it ends: `None` when the
/// body failed, was cut short or was larger than the limit.
#[derive(Debug)]
pub struct Tee {
    buf: BytesMut,
    limit: usize,
    overflow: bool,
    tx: Option<oneshot::Sender<Option<Bytes>>>,
}

impl Tee {
    /// A tee sending its copy to `tx`.
    pub fn new(limit: usize, tx: oneshot::Sender<Option<Bytes>>) -> Self {
        Self {
            buf: BytesMut::new(),
            limit,
            overflow: false,
            tx: Some(tx),
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
        if let Some(tx) = self.tx.take() {
            let copy = (ok && !self.overflow).then(|| std::mem::take(&mut self.buf).freeze());
            // The mirror task may have given up already; nothing to do then.
            let _ = tx.send(copy);
        }
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
            lease: None,
            tee: None,
        }
    }

    /// The upstream's streamed body; its connection goes back to the pool when it ends.
    pub fn upstream(body: Incoming, guard: InflightGuard, lease: Lease, tee: Option<Tee>) -> Self {
        let mut this = Self {
            kind: Kind::Upstream(body),
            guard: Some(guard),
            lease: Some(lease),
            tee,
        };
        if this.is_end_stream() {
            this.guard = None;
            if let Some(l) = this.lease.take() {
                l.release();
            }
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
            Kind::Upstream(inner) => {
                let res = ready!(Pin::new(&mut *inner).poll_frame(cx));
                // hyper stops polling a sized body once its last byte is out, so the end is
                // detected from `is_end_stream` as well as from the final `None`.
                let ended = match &res {
                    Some(Ok(frame)) => {
                        if let (Some(tee), Some(data)) = (this.tee.as_mut(), frame.data_ref()) {
                            tee.push(data);
                        }
                        inner.is_end_stream().then_some(true)
                    }
                    Some(Err(_)) => Some(false),
                    None => Some(true),
                };
                if let Some(ok) = ended {
                    this.guard = None;
                    // Only a body read to its end leaves the connection reusable.
                    if let Some(l) = this.lease.take().filter(|_| ok) {
                        l.release();
                    }
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
            Kind::Upstream(inner) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
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
