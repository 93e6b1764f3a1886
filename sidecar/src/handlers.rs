//! HTTP routes: Open Inference Protocol v2, KServe V1, built-in image pre/post-processing,
//! health and metrics. Every failure goes through [`RequestError::into_response`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::config::DEADLINE_HEADER;
use crate::errors::{RequestError, RequestResult};
use crate::preprocess;
use crate::protocol::{v1, v2};
use crate::state::{AppState, LoadedModel};

/// Response header naming the model that answered.
pub const MODEL_HEADER: &str = "serval-model";

type Resp = Response<Full<Bytes>>;

/// A parsed request target.
#[derive(Debug, PartialEq)]
enum Route {
    Live,
    Ready,
    ServerMetadata,
    Metrics,
    /// The autoscaler's load snapshot ([`serval_api::signals::SIGNALS_PATH`]).
    Signals,
    ModelMetadata,
    ModelReady,
    Infer,
    V1Status,
    Predict,
    UnknownModel(String),
    NotFound,
}

impl Route {
    fn parse(path: &str, model: &str) -> Self {
        let path = path.trim_end_matches('/');
        match path {
            "/v2/health/live" => return Self::Live,
            "/v2/health/ready" => return Self::Ready,
            "/v2" => return Self::ServerMetadata,
            "/metrics" => return Self::Metrics,
            serval_api::signals::SIGNALS_PATH => return Self::Signals,
            _ => {}
        }
        if let Some(rest) = path.strip_prefix("/v2/models/") {
            let mut parts = rest.split('/');
            let name = parts.next().unwrap_or_default();
            // No valid route has more than three segments after the name.
            let mut segments = [""; 4];
            let mut count = 0;
            for part in parts {
                let Some(slot) = segments.get_mut(count) else {
                    return Self::NotFound;
                };
                *slot = part;
                count += 1;
            }
            let mut tail = &segments[..count];
            // Only one version exists; any version names it.
            if tail.len() >= 2 && tail[0] == "versions" {
                tail = &tail[2..];
            }
            let route = match tail {
                [] => Self::ModelMetadata,
                ["ready"] => Self::ModelReady,
                ["infer"] => Self::Infer,
                _ => return Self::NotFound,
            };
            return if name == model {
                route
            } else {
                Self::UnknownModel(name.to_owned())
            };
        }
        if let Some(rest) = path.strip_prefix("/v1/models/") {
            let (name, route) = match rest.strip_suffix(":predict") {
                Some(name) => (name, Self::Predict),
                None => (rest, Self::V1Status),
            };
            if name.contains('/') {
                return Self::NotFound;
            }
            return if name == model {
                route
            } else {
                Self::UnknownModel(name.to_owned())
            };
        }
        Self::NotFound
    }

    fn method(&self) -> Option<Method> {
        match self {
            Self::Infer | Self::Predict => Some(Method::POST),
            Self::UnknownModel(_) | Self::NotFound => None,
            _ => Some(Method::GET),
        }
    }

    fn is_inference(&self) -> bool {
        matches!(self, Self::Infer | Self::Predict)
    }

    fn is_probe(&self) -> bool {
        matches!(
            self,
            Self::Live
                | Self::Ready
                | Self::ModelReady
                | Self::V1Status
                | Self::Metrics
                | Self::Signals
        )
    }
}

/// Serves one request on the traffic port. Never fails: errors become JSON answers.
pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    respond(state, req, false).await
}

async fn respond(
    state: Arc<AppState>,
    req: Request<Incoming>,
    on_admin: bool,
) -> Result<Resp, Infallible> {
    let started = Instant::now();
    // HTTP/2 has no `Connection` header; its connections get GOAWAY at the end of the drain.
    let http1 = req.version() < http::Version::HTTP_2;
    let route = Route::parse(req.uri().path(), &state.config.name);
    // With an admin port, metrics are served there only: the traffic port can be reached
    // through the router (an Endpoint's `pathPrefix`), so it would hand them to any client.
    let hidden = matches!(route, Route::Metrics | Route::Signals)
        && !on_admin
        && state.config.admin_listen.is_some();
    let result = match route.method() {
        _ if hidden => Err(RequestError::NotFound(format!(
            "{} is served on the admin port",
            req.uri().path()
        ))),
        Some(m) if m != req.method() && !(m == Method::GET && req.method() == Method::HEAD) => {
            Err(RequestError::MethodNotAllowed)
        }
        _ => dispatch(&state, &route, req).await,
    };
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            if !route.is_probe() {
                state.metrics.reject(e.rejection_reason());
            }
            if e.status().is_server_error()
                && !matches!(e, RequestError::NotReady | RequestError::Draining)
            {
                tracing::warn!(error = %e, "request failed");
            }
            e.into_response()
        }
    };
    if let Some(v) = &state.model_header {
        resp.headers_mut().insert(MODEL_HEADER, v.clone());
    }
    if http1 && state.is_draining() {
        // The client's next request opens a new connection, which a load balancer sends to
        // a replica that is not shutting down.
        resp.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    if route.is_inference() {
        state
            .metrics
            .request(resp.status().as_u16(), started.elapsed());
    }
    state.answered();
    Ok(resp)
}

/// Serves the admin port (`--admin-port`): health, readiness and metrics as on the traffic
/// port; everything else 404, so inference never bypasses the traffic port's bounds.
pub async fn admin(state: Arc<AppState>, req: Request<Incoming>) -> Resp {
    if Route::parse(req.uri().path(), &state.config.name).is_probe() {
        match respond(state, req, true).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        }
    } else {
        RequestError::NotFound(format!(
            "{} is not served on the admin port: it serves health, readiness, /metrics and /-/signals",
            req.uri().path()
        ))
        .into_response()
    }
}

async fn dispatch(state: &AppState, route: &Route, req: Request<Incoming>) -> RequestResult<Resp> {
    match route {
        Route::Live => Ok(json_response(StatusCode::OK, &json!({ "live": true }))),
        Route::Ready | Route::ModelReady => {
            if state.is_ready() {
                Ok(json_response(StatusCode::OK, &json!({ "ready": true })))
            } else {
                Err(RequestError::NotReady)
            }
        }
        Route::V1Status => Ok(json_response(
            StatusCode::OK,
            &json!({ "name": answer_name(state, req.headers()), "ready": state.is_ready() }),
        )),
        Route::ServerMetadata => Ok(json_response(
            StatusCode::OK,
            &json!({
                "name": "serval-sidecar",
                "version": env!("CARGO_PKG_VERSION"),
                "extensions": ["binary_tensor_data"],
            }),
        )),
        Route::Signals => {
            let v = serde_json::to_value(state.signals())
                .map_err(|e| RequestError::Inference(e.to_string()))?;
            Ok(json_response(StatusCode::OK, &v))
        }
        Route::Metrics => {
            let mut r = Response::new(Full::new(Bytes::from(state.metrics.encode())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(r)
        }
        Route::ModelMetadata => {
            let model = state.model().ok_or(RequestError::NotReady)?;
            let meta = v2::ModelMetadata {
                name: answer_name(state, req.headers()).to_owned(),
                versions: vec![v2::MODEL_VERSION.to_owned()],
                platform: "onnx_tract".to_owned(),
                inputs: model
                    .engine
                    .inputs()
                    .iter()
                    .map(v2::TensorMetadata::of)
                    .collect(),
                outputs: model
                    .engine
                    .outputs()
                    .iter()
                    .map(v2::TensorMetadata::of)
                    .collect(),
            };
            let v =
                serde_json::to_value(meta).map_err(|e| RequestError::Inference(e.to_string()))?;
            Ok(json_response(StatusCode::OK, &v))
        }
        Route::Infer => infer(state, req, Protocol::V2).await,
        Route::Predict => infer(state, req, Protocol::V1).await,
        Route::UnknownModel(name) => Err(RequestError::NotFound(format!(
            "model {name:?} not found; this server serves {:?}",
            state.config.name
        ))),
        Route::NotFound => Err(RequestError::NotFound(format!(
            "no route for {}",
            req.uri().path()
        ))),
    }
}

/// The model name an answer carries: the Endpoint the client called, when the router says so
/// ([`serval_api::routing::ENDPOINT_HEADER`]), else this server's own model name.
fn answer_name<'a>(state: &'a AppState, headers: &'a HeaderMap) -> &'a str {
    headers
        .get(serval_api::routing::ENDPOINT_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|n| !n.is_empty() && n.len() <= MAX_ANSWER_NAME)
        .unwrap_or(&state.config.name)
}

/// Longest Endpoint name echoed back: a Kubernetes object name's bound.
const MAX_ANSWER_NAME: usize = 253;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    V1,
    V2,
}

async fn infer(
    state: &AppState,
    req: Request<Incoming>,
    protocol: Protocol,
) -> RequestResult<Resp> {
    let (_inflight, model) = state.admit()?;
    let (parts, mut body) = req.into_parts();
    let headers = &parts.headers;
    let deadline = deadline(headers, state.config.default_deadline)?;
    // Refuse before reading or parsing anything when the queue is already too long for even
    // one row: under overload, most requests are turned away for the cost of their head.
    if let Err(e) = model.batcher.check_admission(1, deadline) {
        drain(&mut body, 0, state.config.max_body_bytes).await;
        return Err(e);
    }
    let is_image = header_str(headers, &header::CONTENT_TYPE)?
        .is_some_and(|c| c.trim().to_ascii_lowercase().starts_with("image/"));
    let header_length = header_str(headers, &HEADER_LENGTH)?;
    // Held until the answer is built: the body's bytes count against the memory budget while
    // they are read, parsed and queued.
    let mut _held = None;
    let body = read_body(state, headers, body, deadline, &mut _held).await?;
    inject_faults(&state.config).await?;
    if is_image {
        return image(state, &model, body, deadline, protocol, headers).await;
    }
    let engine = &model.engine;
    match protocol {
        Protocol::V2 => {
            let (json, binary) = v2::split_body(&body, header_length)?;
            let name = answer_name(state, headers);
            let enc = infer_v2(state, &model, &json, binary, name, deadline).await?;
            let mut r = Response::new(Full::new(Bytes::from(enc.body)));
            let headers = r.headers_mut();
            match enc.header_length {
                Some(n) => {
                    headers.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    );
                    headers.insert(v2::HEADER_LENGTH, HeaderValue::from(n));
                }
                None => {
                    headers.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                }
            }
            Ok(r)
        }
        Protocol::V1 => {
            let inputs = v1::decode(&body, engine.inputs())?;
            let outputs = model
                .batcher
                .submit(inputs, deadline, state.others_in_flight())?
                .wait()
                .await?;
            match &model.postprocess {
                Some(post) => Ok(json_response(
                    StatusCode::OK,
                    &json!({ "predictions": post.apply(&outputs)? }),
                )),
                None => Ok(json_body_response(v1::encode(engine.outputs(), &outputs)?)),
            }
        }
    }
}

/// An Open Inference Protocol request (its JSON part and the binary tensors after it) run
/// through the batcher and encoded as it asks, answering as `name`: REST's V2 path and gRPC's
/// ModelInfer share it.
pub(crate) async fn infer_v2(
    state: &AppState,
    model: &LoadedModel,
    json: &[u8],
    binary: Bytes,
    name: &str,
    deadline: Instant,
) -> RequestResult<v2::Encoded> {
    let engine = &model.engine;
    let decoded = v2::decode(json, binary, engine.inputs(), engine.outputs())?;
    // The request's own `timeout` parameter shortens its deadline (never lengthens it).
    let deadline = decoded
        .timeout
        .map_or(deadline, |t| deadline.min(Instant::now() + t));
    let outputs = model
        .batcher
        .submit(decoded.inputs, deadline, state.others_in_flight())?
        .wait()
        .await?;
    v2::encode(
        name,
        decoded.id.as_deref(),
        engine.outputs(),
        &outputs,
        &decoded.outputs,
    )
}

/// An image body: pre-process into one row, infer, answer the post-processed result; without
/// post-processing, the outputs in the protocol of the path (an Open Inference Protocol
/// answer on the V2 path, so a sequence's next step can take them as inputs).
///
/// The image's size is checked from its header on the I/O thread (a decompression bomb is
/// refused unread); decoding runs on the blocking pool, at most one per worker at once, so a
/// large image never stalls the other connections of its I/O thread.
async fn image(
    state: &AppState,
    model: &LoadedModel,
    body: Bytes,
    deadline: Instant,
    protocol: Protocol,
    headers: &HeaderMap,
) -> RequestResult<Resp> {
    let cfg = state
        .config
        .preprocess
        .as_ref()
        .and_then(|p| p.image.clone())
        .ok_or_else(|| {
            RequestError::UnsupportedMediaType(
                "this model has no image pre-processing configured".into(),
            )
        })?;
    let dt = model
        .engine
        .inputs()
        .first()
        .map(|s| s.datum_type)
        .ok_or_else(|| RequestError::Inference("model has no input".into()))?;
    let max_pixels = state
        .config
        .max_image_pixels()
        .unwrap_or(crate::config::MIN_IMAGE_PIXEL_LIMIT);
    let size = preprocess::check_image_size(&body, &cfg, max_pixels)?;
    let late =
        || RequestError::DeadlineExceeded(deadline.saturating_duration_since(Instant::now()));
    let slot = tokio::time::timeout_at(deadline.into(), state.decode_slots.clone().acquire_owned())
        .await
        .map_err(|_| late())?
        .map_err(|_| RequestError::Draining)?;
    let tensor = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        preprocess::image_to_tensor(&cfg, &body, dt, size)
    })
    .await
    .map_err(|e| RequestError::Inference(format!("image decoding failed: {e}")))??;
    let outputs = model
        .batcher
        .submit(vec![tensor], deadline, state.others_in_flight())?
        .wait()
        .await?;
    match &model.postprocess {
        Some(post) => {
            let value = post
                .apply(&outputs)?
                .into_iter()
                .next()
                .unwrap_or(Value::Null);
            Ok(json_response(StatusCode::OK, &value))
        }
        None if protocol == Protocol::V2 => {
            let every: Vec<(usize, bool)> = (0..model.engine.outputs().len())
                .map(|i| (i, false))
                .collect();
            let enc = v2::encode(
                answer_name(state, headers),
                None,
                model.engine.outputs(),
                &outputs,
                &every,
            )?;
            Ok(json_body_response(enc.body))
        }
        None => Ok(json_body_response(v1::encode(
            model.engine.outputs(),
            &outputs,
        )?)),
    }
}

/// The configured fault injection (`--fault-delay-millis`, `--fault-error-percent`): off,
/// and free, unless a Backend's annotations ask for it.
async fn inject_faults(config: &crate::config::Config) -> RequestResult<()> {
    if !config.fault_delay.is_zero() {
        tokio::time::sleep(config.fault_delay).await;
    }
    if config.fault_error_rate > 0.0 && rand::random::<f64>() < config.fault_error_rate {
        return Err(RequestError::Injected);
    }
    Ok(())
}

/// Header names parsed once rather than on every lookup.
static HEADER_LENGTH: HeaderName = HeaderName::from_static(v2::HEADER_LENGTH);
static DEADLINE: HeaderName = HeaderName::from_static(DEADLINE_HEADER);

fn header_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> RequestResult<Option<&'a str>> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map_err(|_| RequestError::Malformed(format!("header {name} is not text")))
        })
        .transpose()
}

/// The request's deadline: `serval-deadline-ms` if present, else the default.
fn deadline(headers: &HeaderMap, default: Duration) -> RequestResult<Instant> {
    let budget = match header_str(headers, &DEADLINE)? {
        None => default,
        Some(v) => Duration::from_millis(v.trim().parse().map_err(|_| {
            RequestError::Malformed(format!("{DEADLINE_HEADER} must be milliseconds, got {v:?}"))
        })?),
    };
    Ok(Instant::now() + budget)
}

/// A body over `--max-body-bytes` is still read and discarded up to this many bytes (and for at
/// most [`DRAIN_FOR`]), so a client that is still sending receives the 413 rather than a
/// connection reset, and the connection stays usable. Beyond that the connection is closed.
/// A body refused for load (429) is within the size bound and is discarded whole: the client
/// must read the 429 to retry, and discarding holds no memory.
const DRAIN_MAX: usize = 8 << 20;
const DRAIN_FOR: Duration = Duration::from_secs(2);

/// Reads the body within `--max-body-bytes`, the memory budget (its bytes are added to `held`)
/// and the request's deadline: 413 from `Content-Length` before reading, or as soon as a
/// chunked body passes the limit; 429 when the budget cannot hold it now; 408 when it has not
/// arrived by the deadline.
async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    mut body: Incoming,
    deadline: Instant,
    held: &mut Option<tokio::sync::OwnedSemaphorePermit>,
) -> RequestResult<Bytes> {
    let limit = state.config.max_body_bytes;
    let too_large = || RequestError::TooLarge(format!("request body exceeds {limit} bytes"));
    let declared = match header_str(headers, &header::CONTENT_LENGTH)? {
        Some(len) => Some(
            len.parse::<u64>()
                .map_err(|_| RequestError::Malformed("bad Content-Length".into()))?,
        ),
        None => None,
    };
    if declared.is_some_and(|len| len > limit as u64) {
        drain(&mut body, 0, DRAIN_MAX).await;
        return Err(too_large());
    }
    if let Some(len) = declared
        && let Err(e) = state.memory.take(len as usize, held)
    {
        drain(&mut body, 0, limit).await;
        return Err(e);
    }
    let budget = deadline.saturating_duration_since(Instant::now());
    let read = async {
        // Usually one frame, returned without a copy.
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut len = 0;
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| RequestError::Malformed(format!("cannot read body: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            len += data.len();
            if len > limit {
                drain(&mut body, len, DRAIN_MAX).await;
                return Err(too_large());
            }
            if declared.is_none()
                && let Err(e) = state.memory.take(data.len(), held)
            {
                drain(&mut body, len, limit).await;
                return Err(e);
            }
            chunks.push(data);
        }
        Ok(match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.pop().unwrap_or_default(),
            _ => Bytes::from(chunks.concat()),
        })
    };
    tokio::time::timeout_at(deadline.into(), read)
        .await
        .map_err(|_| RequestError::BodyTimeout(budget))?
}

/// Reads and discards the rest of a rejected body, within `max` bytes and [`DRAIN_FOR`].
async fn drain(body: &mut Incoming, mut read: usize, max: usize) {
    let _ = tokio::time::timeout(DRAIN_FOR, async {
        while read <= max {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
                _ => break,
            }
        }
    })
    .await;
}

fn json_response(status: StatusCode, value: &Value) -> Resp {
    let mut r = json_body_response(value.to_string().into_bytes());
    *r.status_mut() = status;
    r
}

/// A 200 answer carrying already encoded JSON.
fn json_body_response(body: Vec<u8>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let p = |s| Route::parse(s, "digits");
        assert_eq!(p("/v2/models/digits/infer"), Route::Infer);
        assert_eq!(p("/v2/models/digits/versions/1/infer"), Route::Infer);
        assert_eq!(p("/v2/models/digits/versions/1"), Route::ModelMetadata);
        assert_eq!(p("/v2/models/digits/ready"), Route::ModelReady);
        assert_eq!(
            p("/v2/models/other/infer"),
            Route::UnknownModel("other".into())
        );
        assert_eq!(p("/v1/models/digits:predict"), Route::Predict);
        assert_eq!(p("/v1/models/digits"), Route::V1Status);
        assert_eq!(p("/v2/"), Route::ServerMetadata);
        assert_eq!(p("/v2/models/digits/explain"), Route::NotFound);
        assert_eq!(p("/nope"), Route::NotFound);
    }
}
