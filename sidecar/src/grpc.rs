//! The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`), on the REST port:
//! an HTTP/2 request with `content-type: application/grpc` comes here. Inference goes through
//! the same admission, batcher, deadline, error table and metrics as REST: a request's tensors
//! (`raw_input_contents`, or typed `contents` laid out as the same little-endian bytes) are
//! decoded by the binary extension's decoder, and outputs are encoded by its encoder, then
//! returned as `raw_output_contents`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use prost::Message;
use serde_json::{Map, Value, json};
use serval_proto::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use serval_proto::model_infer_response::InferOutputTensor;
use serval_proto::model_metadata_response::TensorMetadata;
use serval_proto::{
    InferTensorContents, ModelInferRequest, ModelInferResponse, ModelMetadataRequest,
    ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse, ServerLiveRequest,
    ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest,
    ServerReadyResponse,
};
use tonic::{Code, Request, Response, Status};

use crate::config::DEADLINE_HEADER;
use crate::errors::{RequestError, RequestResult};
use crate::protocol::v2;
use crate::state::AppState;

/// Whether a request is a gRPC call (`application/grpc`, `application/grpc+proto`, …).
pub fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/grpc"))
}

/// The gRPC service of one sidecar, its messages bounded by the REST body limit (not gRPC's
/// 4 MB default: a tensor that REST accepts is accepted here too).
pub fn service(state: Arc<AppState>) -> GrpcInferenceServiceServer<Grpc> {
    let limit = state.config.max_body_bytes;
    GrpcInferenceServiceServer::new(Grpc { state })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX)
}

/// A message over the size limit is `RESOURCE_EXHAUSTED`, as gRPC's own servers and the REST
/// path's 413 have it; tonic ends the call with `OUT_OF_RANGE` ("decoded message length too
/// large: found N bytes, the limit is: M bytes") in the trailers, or the headers of a
/// trailers-only answer. Maps one header map; see [`size_refusals`].
fn as_resource_exhausted(headers: &mut http::HeaderMap) {
    let too_large = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        // Percent-encoded on the wire.
        .is_some_and(|m| m.replace("%20", " ").contains("message length too large"));
    if too_large && headers.get("grpc-status").is_some_and(|s| s == "11") {
        let code = http::HeaderValue::from(Code::ResourceExhausted as i32);
        headers.insert("grpc-status", code);
    }
}

/// The answer's body with its size refusal's code mapped, whether in the headers or in the
/// trailers.
pub type SizeMapped = http_body_util::combinators::MapFrame<
    tonic::body::Body,
    fn(http_body::Frame<Bytes>) -> http_body::Frame<Bytes>,
>;

/// [`as_resource_exhausted`] on a gRPC answer's headers and trailers.
pub fn size_refusals(resp: http::Response<tonic::body::Body>) -> http::Response<SizeMapped> {
    use http_body_util::BodyExt;
    fn trailers(frame: http_body::Frame<Bytes>) -> http_body::Frame<Bytes> {
        match frame.into_trailers() {
            Ok(mut t) => {
                as_resource_exhausted(&mut t);
                http_body::Frame::trailers(t)
            }
            Err(frame) => frame,
        }
    }
    let (mut parts, body) = resp.into_parts();
    as_resource_exhausted(&mut parts.headers);
    let mapped: SizeMapped = body.map_frame(trailers as fn(_) -> _);
    http::Response::from_parts(parts, mapped)
}

/// `inference.GRPCInferenceService` over the sidecar's state.
pub struct Grpc {
    state: Arc<AppState>,
}

/// The gRPC code for an error of the REST table, by its HTTP status.
fn status_of(e: &RequestError) -> Status {
    let code = match e.status().as_u16() {
        400 | 422 => Code::InvalidArgument,
        404 => Code::NotFound,
        408 | 504 => Code::DeadlineExceeded,
        413 => Code::ResourceExhausted,
        415 => Code::InvalidArgument,
        429 => Code::ResourceExhausted,
        503 => Code::Unavailable,
        405 => Code::Unimplemented,
        _ => Code::Internal,
    };
    let mut status = Status::new(code, e.to_string());
    // As the REST answers say it: when to come back. It also tells a router that this
    // RESOURCE_EXHAUSTED is overload (shed the replica a moment), not a message too large.
    if matches!(e.status().as_u16(), 429 | 503) {
        status.metadata_mut().insert(
            "retry-after",
            crate::errors::DEFAULT_RETRY_AFTER_SECS.into(),
        );
    }
    if let RequestError::Overloaded { expected, budget } = e {
        let ms = expected.saturating_sub(*budget).as_millis().max(1) as u64;
        status
            .metadata_mut()
            .insert(serval_api::routing::RETRY_AFTER_MS_HEADER, ms.into());
    }
    status
}

/// The name answers carry: the Endpoint the router says the client called, else the model's.
fn answer_name<'a, T>(state: &'a AppState, req: &'a Request<T>) -> &'a str {
    req.metadata()
        .get(serval_api::routing::ENDPOINT_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|n| !n.is_empty() && n.len() <= 253)
        .unwrap_or(&state.config.name)
}

/// The request's deadline: gRPC's own (`grpc-timeout`), the router's `serval-deadline-ms`, or
/// the default, whichever is soonest.
fn deadline<T>(state: &AppState, req: &Request<T>) -> RequestResult<Instant> {
    let mut budget = state.config.default_deadline;
    if let Some(v) = req.metadata().get("grpc-timeout") {
        let raw = v.to_str().unwrap_or_default();
        let parsed = grpc_timeout(raw).ok_or_else(|| {
            RequestError::Malformed(format!("grpc-timeout {raw:?} is not a gRPC timeout"))
        })?;
        budget = budget.min(parsed);
    }
    if let Some(v) = req.metadata().get(DEADLINE_HEADER) {
        let raw = v.to_str().unwrap_or_default();
        let ms: u64 = raw.trim().parse().map_err(|_| {
            RequestError::Malformed(format!(
                "{DEADLINE_HEADER} must be milliseconds, got {raw:?}"
            ))
        })?;
        budget = budget.min(Duration::from_millis(ms));
    }
    Ok(Instant::now() + budget)
}

/// A `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Typed contents as the binary extension's little-endian bytes.
fn contents_bytes(datatype: &str, c: &InferTensorContents) -> Result<Vec<u8>, String> {
    fn le<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        v.iter().flat_map(|x| f(*x)).collect()
    }
    Ok(match datatype {
        "BOOL" => c.bool_contents.iter().map(|b| u8::from(*b)).collect(),
        "INT8" => le(&c.int_contents, |x| (x as i8).to_le_bytes()),
        "INT16" => le(&c.int_contents, |x| (x as i16).to_le_bytes()),
        "INT32" => le(&c.int_contents, i32::to_le_bytes),
        "INT64" => le(&c.int64_contents, i64::to_le_bytes),
        "UINT8" => le(&c.uint_contents, |x| (x as u8).to_le_bytes()),
        "UINT16" => le(&c.uint_contents, |x| (x as u16).to_le_bytes()),
        "UINT32" => le(&c.uint_contents, u32::to_le_bytes),
        "UINT64" => le(&c.uint64_contents, u64::to_le_bytes),
        "FP32" => le(&c.fp32_contents, f32::to_le_bytes),
        "FP64" => le(&c.fp64_contents, f64::to_le_bytes),
        "BYTES" => c
            .bytes_contents
            .iter()
            .flat_map(|b| {
                let len = u32::try_from(b.len()).unwrap_or(u32::MAX).to_le_bytes();
                len.into_iter().chain(b.iter().copied())
            })
            .collect(),
        other => return Err(format!("typed contents cannot carry datatype {other:?}")),
    })
}

/// A parameter as JSON, for the REST decoder.
fn parameter(p: &serval_proto::InferParameter) -> Value {
    use serval_proto::infer_parameter::ParameterChoice;
    match &p.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => json!(b),
        Some(ParameterChoice::Int64Param(i)) => json!(i),
        Some(ParameterChoice::StringParam(s)) => json!(s),
        None => Value::Null,
    }
}

/// The request as the binary extension's JSON header and tensor bytes: every input binary
/// (raw contents as they are; typed contents laid out), every requested output binary.
fn as_binary_request(req: &ModelInferRequest) -> RequestResult<(Vec<u8>, Bytes)> {
    let raw = !req.raw_input_contents.is_empty();
    if raw && req.raw_input_contents.len() != req.inputs.len() {
        return Err(RequestError::Malformed(format!(
            "{} raw_input_contents for {} inputs",
            req.raw_input_contents.len(),
            req.inputs.len()
        )));
    }
    let mut tensors = BytesMut::new();
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for (i, input) in req.inputs.iter().enumerate() {
        let bytes = if raw {
            if input.contents.is_some() {
                return Err(RequestError::Malformed(format!(
                    "input {:?} has contents and raw_input_contents",
                    input.name
                )));
            }
            req.raw_input_contents[i].clone()
        } else {
            let c = input.contents.as_ref().ok_or_else(|| {
                RequestError::Malformed(format!("input {:?} has no contents", input.name))
            })?;
            contents_bytes(&input.datatype, c).map_err(RequestError::Malformed)?
        };
        let mut params: Map<String, Value> = input
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), parameter(v)))
            .collect();
        params.insert("binary_data_size".to_owned(), json!(bytes.len()));
        inputs.push(json!({"name": input.name, "datatype": input.datatype,
            "shape": input.shape, "parameters": params}));
        tensors.extend_from_slice(&bytes);
    }
    let outputs: Vec<Value> = req
        .outputs
        .iter()
        .map(|o| json!({"name": o.name, "parameters": {"binary_data": true}}))
        .collect();
    // The request's parameters (e.g. `timeout`, which tritonclient sets) carry over as they
    // are; every output is asked in binary.
    let mut params: Map<String, Value> = req
        .parameters
        .iter()
        .map(|(k, v)| (k.clone(), parameter(v)))
        .collect();
    params.insert("binary_data_output".to_owned(), json!(true));
    let mut header = json!({"inputs": inputs, "parameters": params});
    if !req.id.is_empty() {
        header["id"] = json!(req.id);
    }
    if !outputs.is_empty() {
        header["outputs"] = Value::Array(outputs);
    }
    let json = serde_json::to_vec(&header).map_err(|e| RequestError::Inference(e.to_string()))?;
    Ok((json, tensors.freeze()))
}

/// The binary extension's answer as a gRPC answer: its outputs' bytes as `raw_output_contents`.
fn as_grpc_answer(body: &[u8], header_length: usize) -> RequestResult<ModelInferResponse> {
    let broken = |why: &str| RequestError::Inference(format!("encoding the answer: {why}"));
    let (json, mut rest) = body.split_at(header_length.min(body.len()));
    let v: Value = serde_json::from_slice(json).map_err(|e| broken(&e.to_string()))?;
    let mut answer = ModelInferResponse {
        model_name: v["model_name"].as_str().unwrap_or_default().to_owned(),
        model_version: v["model_version"].as_str().unwrap_or_default().to_owned(),
        id: v["id"].as_str().unwrap_or_default().to_owned(),
        ..Default::default()
    };
    for o in v["outputs"]
        .as_array()
        .ok_or_else(|| broken("no outputs"))?
    {
        let size = o["parameters"]["binary_data_size"]
            .as_u64()
            .and_then(|s| usize::try_from(s).ok())
            .filter(|s| *s <= rest.len())
            .ok_or_else(|| broken("an output without its bytes"))?;
        let (bytes, after) = rest.split_at(size);
        rest = after;
        answer.outputs.push(InferOutputTensor {
            name: o["name"].as_str().unwrap_or_default().to_owned(),
            datatype: o["datatype"].as_str().unwrap_or_default().to_owned(),
            shape: o["shape"]
                .as_array()
                .map(|s| s.iter().filter_map(Value::as_i64).collect())
                .unwrap_or_default(),
            ..Default::default()
        });
        answer.raw_output_contents.push(bytes.to_vec());
    }
    Ok(answer)
}

impl Grpc {
    async fn infer(&self, req: Request<ModelInferRequest>) -> RequestResult<ModelInferResponse> {
        let state = &self.state;
        let deadline = deadline(state, &req)?;
        let name = answer_name(state, &req).to_owned();
        let msg = req.get_ref();
        if !msg.model_name.is_empty()
            && msg.model_name != state.config.name
            && msg.model_name != name
        {
            return Err(RequestError::NotFound(format!(
                "model {:?} not found; this server serves {:?}",
                msg.model_name, state.config.name
            )));
        }
        let (_inflight, model) = state.admit()?;
        // The message counts against the memory budget as a REST body does, held until the
        // answer is built. tonic has read it already: over budget, it is refused (and freed)
        // here rather than queued, so what waits for the batcher stays bounded.
        let mut _held = None;
        state.memory.take(msg.encoded_len(), &mut _held)?;
        let rows = msg
            .inputs
            .first()
            .and_then(|i| i.shape.first())
            .and_then(|r| usize::try_from(*r).ok())
            .unwrap_or(1);
        model.batcher.check_admission(rows.max(1), deadline)?;
        let (json, tensors) = as_binary_request(msg)?;
        let enc = crate::handlers::infer_v2(state, &model, &json, tensors, &name, deadline).await?;
        as_grpc_answer(&enc.body, enc.header_length.unwrap_or(enc.body.len()))
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Grpc {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.state.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let name = answer_name(&self.state, &req);
        let known = req.get_ref().name == self.state.config.name || req.get_ref().name == name;
        Ok(Response::new(ModelReadyResponse {
            ready: known && self.state.is_ready(),
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "serval-sidecar".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            extensions: vec!["binary_tensor_data".to_owned()],
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let model = self
            .state
            .model()
            .ok_or_else(|| status_of(&RequestError::NotReady))?;
        let meta = |specs: &[crate::engine::TensorSpec]| -> Vec<TensorMetadata> {
            specs
                .iter()
                .map(v2::TensorMetadata::of)
                .map(|t| TensorMetadata {
                    name: t.name,
                    datatype: t.datatype,
                    shape: t.shape,
                })
                .collect()
        };
        Ok(Response::new(ModelMetadataResponse {
            name: answer_name(&self.state, &req).to_owned(),
            versions: vec![v2::MODEL_VERSION.to_owned()],
            platform: "onnx_tract".to_owned(),
            inputs: meta(model.engine.inputs()),
            outputs: meta(model.engine.outputs()),
        }))
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let started = Instant::now();
        let result = self.infer(req).await;
        let code = match &result {
            Ok(_) => 200,
            Err(e) => {
                self.state.metrics.reject(e.rejection_reason());
                e.status().as_u16()
            }
        };
        self.state.metrics.request(code, started.elapsed());
        self.state.answered();
        result.map(Response::new).map_err(|e| status_of(&e))
    }

    async fn repository_model_load(
        &self,
        _: Request<serval_proto::RepositoryModelLoadRequest>,
    ) -> Result<Response<serval_proto::RepositoryModelLoadResponse>, Status> {
        Err(Status::unimplemented(
            "a Serval model server serves the one model of its Backend",
        ))
    }

    async fn repository_model_unload(
        &self,
        _: Request<serval_proto::RepositoryModelUnloadRequest>,
    ) -> Result<Response<serval_proto::RepositoryModelUnloadResponse>, Status> {
        Err(Status::unimplemented(
            "a Serval model server serves the one model of its Backend",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("100u"), Some(Duration::from_micros(100)));
        assert_eq!(grpc_timeout("123456789S"), None, "more than 8 digits");
        assert_eq!(grpc_timeout("5"), None);
        assert_eq!(grpc_timeout("S"), None);
    }

    #[test]
    fn typed_contents_are_laid_out_as_the_binary_extension_does() {
        let c = InferTensorContents {
            fp32_contents: vec![1.5, -2.0],
            int64_contents: vec![7],
            bytes_contents: vec![b"ab".to_vec()],
            ..Default::default()
        };
        assert_eq!(
            contents_bytes("FP32", &c).unwrap(),
            [1.5f32.to_le_bytes(), (-2.0f32).to_le_bytes()].concat()
        );
        assert_eq!(contents_bytes("INT64", &c).unwrap(), 7i64.to_le_bytes());
        assert_eq!(
            contents_bytes("BYTES", &c).unwrap(),
            [2, 0, 0, 0, b'a', b'b']
        );
        assert!(contents_bytes("FP8", &c).is_err());
    }

    #[test]
    fn the_rest_error_table_maps_to_grpc_codes() {
        assert_eq!(
            status_of(&RequestError::Malformed("x".into())).code(),
            Code::InvalidArgument
        );
        assert_eq!(status_of(&RequestError::NotReady).code(), Code::Unavailable);
        assert_eq!(
            status_of(&RequestError::DeadlineExceeded(Duration::ZERO)).code(),
            Code::DeadlineExceeded
        );
        let large = status_of(&RequestError::TooLarge("big".into()));
        assert_eq!(large.code(), Code::ResourceExhausted);
        assert!(large.metadata().get("retry-after").is_none());
        // Overload says when to come back, so it is told apart from a message too large.
        let busy = status_of(&RequestError::Overloaded {
            expected: Duration::from_millis(250),
            budget: Duration::from_millis(100),
        });
        assert_eq!(busy.code(), Code::ResourceExhausted);
        assert_eq!(busy.metadata().get("retry-after").unwrap(), "1");
        assert_eq!(
            busy.metadata()
                .get(serval_api::routing::RETRY_AFTER_MS_HEADER)
                .unwrap(),
            "150"
        );
    }
}
