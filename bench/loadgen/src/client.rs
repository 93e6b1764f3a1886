//! One keep-alive connection and the request it repeats: HTTP/1.1, or for `--grpc` HTTP/2
//! with prior knowledge, its answer's status read from `grpc-status`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderName, HeaderValue, RETRY_AFTER, TE};
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a request did not produce a status.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid target: {0}")]
    Target(String),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("request: {0}")]
    Request(#[from] http::Error),
}

/// Where and what to send: resolved once, cloned cheaply per request.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    path: String,
    headers: HeaderMap,
    /// The bodies sent in turn, one per request, shared by every connection.
    bodies: Arc<[Bytes]>,
    next: Arc<AtomicUsize>,
    /// A unary gRPC call: the body is its framed message.
    grpc: bool,
    /// HTTP/2 with prior knowledge (always for gRPC).
    http2: bool,
}

impl Target {
    /// Parses `http://host:port/path`, `name: value` headers, and takes the bodies, sent in
    /// turn (round robin over every connection's requests).
    pub fn new(
        url: &str,
        headers: &[String],
        bodies: Vec<Vec<u8>>,
        grpc: bool,
        http2: bool,
    ) -> Result<Self, ClientError> {
        let http2 = http2 || grpc;
        if bodies.is_empty() {
            return Err(ClientError::Target("no request body".into()));
        }
        let uri: Uri = url
            .parse()
            .map_err(|e| ClientError::Target(format!("{url}: {e}")))?;
        if uri.scheme_str() != Some("http") {
            return Err(ClientError::Target(format!(
                "{url}: only http:// is supported"
            )));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| ClientError::Target(format!("{url}: no host")))?
            .clone();
        let port = authority.port_u16().unwrap_or(80);
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&(authority.host(), port))
            .map_err(|e| ClientError::Target(format!("{url}: {e}")))?
            .next()
            .ok_or_else(|| ClientError::Target(format!("{url}: host has no address")))?;
        let path = uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string());
        let mut map = HeaderMap::new();
        let path = if http2 {
            // HTTP/2 takes the authority from the URI.
            if grpc {
                map.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                map.insert(TE, HeaderValue::from_static("trailers"));
            } else {
                map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            format!("http://{authority}{path}")
        } else {
            let host = HeaderValue::from_str(authority.as_str())
                .map_err(|e| ClientError::Target(e.to_string()))?;
            map.insert(HOST, host);
            map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            path
        };
        for h in headers {
            let (name, value) = h
                .split_once(':')
                .ok_or_else(|| ClientError::Target(format!("header {h:?} is not `name: value`")))?;
            let name = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|e| ClientError::Target(format!("header {h:?}: {e}")))?;
            let value = HeaderValue::from_str(value.trim())
                .map_err(|e| ClientError::Target(format!("header {h:?}: {e}")))?;
            map.insert(name, value);
        }
        Ok(Self {
            addr,
            path,
            headers: map,
            bodies: bodies.into_iter().map(Bytes::from).collect(),
            next: Arc::new(AtomicUsize::new(0)),
            grpc,
            http2,
        })
    }

    fn request(&self) -> Result<Request<Full<Bytes>>, http::Error> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.bodies.len();
        let body = self.bodies[i].clone();
        let len = body.len();
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(self.path.as_str())
            .body(Full::new(body))?;
        *req.headers_mut() = self.headers.clone();
        if !self.grpc {
            req.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(len));
        }
        Ok(req)
    }
}

/// A connection with one request in flight at a time.
pub enum Connection {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Connection {
    /// Opens a TCP connection without Nagle's delay and runs its HTTP/1.1 driver, or for a
    /// gRPC or `--http2` target its HTTP/2 one.
    pub async fn open(target: &Target) -> Result<Self, ClientError> {
        let stream = TcpStream::connect(target.addr)
            .await
            .map_err(ClientError::Connect)?;
        stream.set_nodelay(true).map_err(ClientError::Connect)?;
        if target.http2 {
            let (sender, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                TokioIo::new(stream),
            )
            .await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            return Ok(Self::Http2(sender));
        }
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // The driver ends when the connection closes; the next send reports that.
            let _ = conn.await;
        });
        Ok(Self::Http1(sender))
    }

    /// Whether the server closed the connection (e.g. after `Connection: close`).
    pub fn is_closed(&self) -> bool {
        match self {
            Self::Http1(s) => s.is_closed(),
            Self::Http2(s) => s.is_closed(),
        }
    }

    /// Waits until the connection can take a request; fails if the server closed it.
    pub async fn ready(&mut self) -> Result<(), ClientError> {
        match self {
            Self::Http1(s) => Ok(s.ready().await?),
            Self::Http2(s) => Ok(s.ready().await?),
        }
    }

    /// Sends the target's request and reads the whole answer; returns its status.
    pub async fn send(&mut self, target: &Target) -> Result<StatusCode, ClientError> {
        Ok(self.exchange(target).await?.status)
    }

    /// Sends the target's request and reads the whole answer; returns what the open loop
    /// records of it.
    pub async fn exchange(&mut self, target: &Target) -> Result<Answer, ClientError> {
        self.ready().await?;
        let resp = match self {
            Self::Http1(s) => s.send_request(target.request()?).await?,
            Self::Http2(s) => s.send_request(target.request()?).await?,
        };
        let mut answer = Answer {
            status: resp.status(),
            retry_after: resp.headers().contains_key(RETRY_AFTER),
        };
        let (head, body) = resp.into_parts();
        let collected = body.collect().await?;
        if target.grpc {
            // A gRPC call's outcome is its grpc-status: in the trailers, or the head of a
            // trailers-only answer. Recorded as the HTTP status it corresponds to.
            let code = collected
                .trailers()
                .and_then(|t| t.get("grpc-status"))
                .or_else(|| head.headers.get("grpc-status"))
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u16>().ok());
            answer.status = match code {
                Some(0) => StatusCode::OK,
                Some(8) => StatusCode::TOO_MANY_REQUESTS,
                Some(14) => StatusCode::SERVICE_UNAVAILABLE,
                Some(4) => StatusCode::GATEWAY_TIMEOUT,
                Some(3) => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
        }
        Ok(answer)
    }
}

/// The parts of an answer a benchmark looks at.
#[derive(Clone, Copy, Debug)]
pub struct Answer {
    pub status: StatusCode,
    /// Whether it carried `Retry-After` (RFC 9110 §10.2.3), which a 429 should.
    pub retry_after: bool,
}
