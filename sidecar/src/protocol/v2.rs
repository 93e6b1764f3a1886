//! Open Inference Protocol (KServe V2) REST: request decoding and response encoding, including
//! the binary tensor extension as `tritonclient` speaks it (`Inference-Header-Content-Length`
//! splits the body into a JSON header and raw tensor bytes).

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tract_onnx::prelude::Tensor;

use super::tensor::{self, JsonData, JsonElements, datatype_name, parse_datatype};
use crate::engine::TensorSpec;
use crate::errors::{RequestError, RequestResult};

/// Header giving the length of the JSON part of a body with binary tensors.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// An inference request. Names borrow from the body when they have no escapes.
#[derive(Debug, Deserialize)]
pub struct InferRequest<'a> {
    /// Echoed in the response.
    #[serde(default)]
    pub id: Option<String>,
    /// Request parameters; `binary_data_output` asks for every output in binary.
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
    /// Input tensors.
    #[serde(borrow)]
    pub inputs: Vec<RequestInput<'a>>,
    /// Outputs to return; all when absent.
    #[serde(default, borrow)]
    pub outputs: Option<Vec<RequestOutput<'a>>>,
}

/// One input tensor of a request.
#[derive(Debug, Deserialize)]
pub struct RequestInput<'a> {
    /// Input name.
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    /// Dimensions.
    pub shape: Vec<i64>,
    /// Datatype name, e.g. `FP32`.
    #[serde(borrow)]
    pub datatype: Cow<'a, str>,
    /// `binary_data_size` when the data follows the JSON header.
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
    /// JSON data, flat or nested, flattened while parsing.
    #[serde(default)]
    pub data: Option<JsonData>,
}

/// One requested output.
#[derive(Debug, Deserialize)]
pub struct RequestOutput<'a> {
    /// Output name.
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    /// `binary_data: true` asks for raw bytes.
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
}

/// Model metadata as the protocol describes it.
#[derive(Debug, Serialize)]
pub struct ModelMetadata {
    /// Model name.
    pub name: String,
    /// Available versions.
    pub versions: Vec<String>,
    /// Runtime.
    pub platform: String,
    /// Inputs.
    pub inputs: Vec<TensorMetadata>,
    /// Outputs.
    pub outputs: Vec<TensorMetadata>,
}

/// Name, datatype and shape (-1 for variable axes).
#[derive(Debug, Serialize)]
pub struct TensorMetadata {
    /// Tensor name.
    pub name: String,
    /// Datatype name.
    pub datatype: String,
    /// Shape, -1 where variable.
    pub shape: Vec<i64>,
}

/// The version the sidecar reports for its single model.
pub const MODEL_VERSION: &str = "1";

impl TensorMetadata {
    /// Metadata of a model tensor.
    pub fn of(spec: &TensorSpec) -> Self {
        Self {
            name: spec.name.clone(),
            datatype: datatype_name(spec.datum_type).to_owned(),
            shape: spec
                .shape
                .iter()
                .map(|d| d.map_or(-1, |d| d as i64))
                .collect(),
        }
    }
}

/// A decoded request: tensors in the model's input order, and how to answer.
#[derive(Debug)]
pub struct Decoded {
    /// Request id to echo.
    pub id: Option<String>,
    /// One tensor per model input.
    pub inputs: Vec<Tensor>,
    /// `(output index, binary?)` in the order to return them.
    pub outputs: Vec<(usize, bool)>,
    /// The request's `timeout` parameter (microseconds, as Triton and tritonclient define it):
    /// it must be answered within this, or not run.
    pub timeout: Option<std::time::Duration>,
}

/// The `timeout` request parameter, in microseconds.
fn timeout_param(p: &Option<Map<String, Value>>) -> RequestResult<Option<std::time::Duration>> {
    p.as_ref()
        .and_then(|m| m.get("timeout"))
        .map(|v| {
            v.as_u64()
                .map(std::time::Duration::from_micros)
                .ok_or_else(|| {
                    RequestError::Malformed(format!(
                        "parameter timeout must be a non-negative integer of microseconds, got {v}"
                    ))
                })
        })
        .transpose()
}

fn param_bool(p: &Option<Map<String, Value>>, key: &str) -> bool {
    p.as_ref()
        .and_then(|m| m.get(key))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Splits a body into its JSON header and binary part using `header_length` if given.
pub fn split_body(body: &Bytes, header_length: Option<&str>) -> RequestResult<(Bytes, Bytes)> {
    match header_length {
        None => Ok((body.clone(), Bytes::new())),
        Some(raw) => {
            let n: usize = raw.trim().parse().map_err(|_| {
                RequestError::Malformed(format!("{HEADER_LENGTH} is not a length: {raw:?}"))
            })?;
            if n > body.len() {
                return Err(RequestError::Malformed(format!(
                    "{HEADER_LENGTH} is {n} but the body has {} bytes",
                    body.len()
                )));
            }
            Ok((body.slice(..n), body.slice(n..)))
        }
    }
}

/// Decodes a request against the model's inputs and outputs.
pub fn decode(
    json: &[u8],
    mut binary: Bytes,
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
) -> RequestResult<Decoded> {
    let req: InferRequest = serde_json::from_slice(json)
        .map_err(|e| RequestError::Malformed(format!("invalid inference request: {e}")))?;
    let timeout = timeout_param(&req.parameters)?;
    // One slot per model input, in the model's order.
    let mut slots: Vec<Option<Tensor>> = inputs.iter().map(|_| None).collect();
    for input in &req.inputs {
        let Some(slot) = inputs.iter().position(|s| s.name == input.name) else {
            return Err(RequestError::Unprocessable(format!(
                "unknown input {:?}; the model takes {:?}",
                input.name,
                inputs.iter().map(|s| &s.name).collect::<Vec<_>>()
            )));
        };
        let dt = parse_datatype(&input.datatype)?;
        let shape = input
            .shape
            .iter()
            .map(|d| usize::try_from(*d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                RequestError::Malformed(format!("input {:?} has a negative dimension", input.name))
            })?;
        let binary_size = input
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_size"))
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| {
                        RequestError::Malformed(
                            "binary_data_size must be a non-negative integer".into(),
                        )
                    })
            })
            .transpose()?;
        let t = match (binary_size, &input.data) {
            (Some(_), Some(_)) => {
                return Err(RequestError::Malformed(format!(
                    "input {:?} has both data and binary_data_size",
                    input.name
                )));
            }
            (Some(n), None) => {
                if n > binary.len() {
                    return Err(RequestError::Malformed(format!(
                        "input {:?} declares {n} binary bytes, {} remain",
                        input.name,
                        binary.len()
                    )));
                }
                let bytes = binary.split_to(n);
                tensor::from_binary(dt, &shape, &bytes)?
            }
            (None, Some(data)) => {
                data.1
                    .check(&shape)
                    .map_err(|e| RequestError::Malformed(format!("input {:?}: {e}", input.name)))?;
                tensor::from_leaves(dt, &shape, &data.0)?
            }
            (None, None) => {
                return Err(RequestError::Malformed(format!(
                    "input {:?} has no data",
                    input.name
                )));
            }
        };
        if slots[slot].replace(t).is_some() {
            return Err(RequestError::Malformed(format!(
                "input {:?} given twice",
                input.name
            )));
        }
    }
    if !binary.is_empty() {
        return Err(RequestError::Malformed(format!(
            "{} binary bytes belong to no input",
            binary.len()
        )));
    }
    let ordered = inputs
        .iter()
        .zip(slots)
        .map(|(s, t)| {
            t.ok_or_else(|| RequestError::Unprocessable(format!("missing input {:?}", s.name)))
        })
        .collect::<RequestResult<Vec<_>>>()?;
    let all_binary = param_bool(&req.parameters, "binary_data_output");
    let wanted = match &req.outputs {
        None => (0..outputs.len()).map(|i| (i, all_binary)).collect(),
        Some(list) => list
            .iter()
            .map(|o| {
                let i = outputs
                    .iter()
                    .position(|s| s.name == o.name)
                    .ok_or_else(|| {
                        RequestError::Unprocessable(format!("unknown output {:?}", o.name))
                    })?;
                let binary = o
                    .parameters
                    .as_ref()
                    .and_then(|p| p.get("binary_data"))
                    .and_then(Value::as_bool)
                    .unwrap_or(all_binary);
                Ok((i, binary))
            })
            .collect::<RequestResult<Vec<_>>>()?,
    };
    Ok(Decoded {
        id: req.id,
        inputs: ordered,
        outputs: wanted,
        timeout,
    })
}

/// An encoded response body and, when it carries binary tensors, its JSON header length.
#[derive(Debug)]
pub struct Encoded {
    /// The body.
    pub body: Vec<u8>,
    /// Value of `Inference-Header-Content-Length`, if binary outputs follow the JSON.
    pub header_length: Option<usize>,
}

/// The response's JSON part. Keys are in alphabetical order, as the `serde_json::Value` this
/// replaced wrote them, so answers stay byte-identical.
#[derive(Serialize)]
struct InferResponse<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    model_name: &'a str,
    model_version: &'a str,
    outputs: Vec<ResponseOutput<'a>>,
}

#[derive(Serialize)]
struct ResponseOutput<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonElements<'a>>,
    datatype: &'static str,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinaryParameters>,
    shape: &'a [usize],
}

#[derive(Serialize)]
struct BinaryParameters {
    binary_data_size: usize,
}

/// Bytes reserved per JSON element: a float through `f64` takes up to 24 with its comma.
const JSON_BYTES_PER_ELEMENT: usize = 24;
/// Bytes reserved for the JSON around the outputs' data.
const JSON_FRAME_BYTES: usize = 128;

/// Encodes the selected outputs, writing JSON then any binary tensors straight into one buffer
/// sized for them.
pub fn encode(
    model: &str,
    id: Option<&str>,
    specs: &[TensorSpec],
    outputs: &[Tensor],
    wanted: &[(usize, bool)],
) -> RequestResult<Encoded> {
    let mut json_outputs = Vec::with_capacity(wanted.len());
    let mut capacity = JSON_FRAME_BYTES + model.len() + id.map_or(0, str::len);
    let mut binary_len = 0;
    for (i, as_binary) in wanted {
        let (Some(spec), Some(t)) = (specs.get(*i), outputs.get(*i)) else {
            return Err(RequestError::Inference(format!(
                "model returned no output {i}"
            )));
        };
        let (data, parameters) = if *as_binary {
            let size = tensor::binary_size(t)?;
            binary_len += size;
            (
                None,
                Some(BinaryParameters {
                    binary_data_size: size,
                }),
            )
        } else {
            tensor::check_encodable(t)?;
            capacity += t.len() * JSON_BYTES_PER_ELEMENT;
            (Some(JsonElements(t)), None)
        };
        capacity += JSON_FRAME_BYTES + spec.name.len();
        json_outputs.push(ResponseOutput {
            data,
            datatype: datatype_name(t.datum_type()),
            name: &spec.name,
            parameters,
            shape: t.shape(),
        });
    }
    let head = InferResponse {
        id,
        model_name: model,
        model_version: MODEL_VERSION,
        outputs: json_outputs,
    };
    let mut body = Vec::with_capacity(capacity + binary_len);
    serde_json::to_writer(&mut body, &head)
        .map_err(|e| RequestError::Inference(format!("cannot encode output: {e}")))?;
    if !wanted.iter().any(|(_, b)| *b) {
        return Ok(Encoded {
            body,
            header_length: None,
        });
    }
    let header_length = body.len();
    for (i, as_binary) in wanted {
        if *as_binary && let Some(t) = outputs.get(*i) {
            tensor::write_binary(t, &mut body)?;
        }
    }
    Ok(Encoded {
        body,
        header_length: Some(header_length),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::DatumType;

    fn specs() -> (Vec<TensorSpec>, Vec<TensorSpec>) {
        let x = TensorSpec {
            name: "x".into(),
            datum_type: DatumType::F32,
            shape: vec![None, Some(2)],
        };
        let y = TensorSpec {
            name: "y".into(),
            datum_type: DatumType::F32,
            shape: vec![None, Some(2)],
        };
        (vec![x], vec![y])
    }

    #[test]
    fn decodes_binary_inputs_like_tritonclient() {
        let (inputs, outputs) = specs();
        let head = br#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8}}],"outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#;
        let mut body = head.to_vec();
        body.extend_from_slice(&1.5f32.to_le_bytes());
        body.extend_from_slice(&(-2f32).to_le_bytes());
        let body = Bytes::from(body);
        let (json, bin) = split_body(&body, Some(&head.len().to_string())).expect("split");
        let d = decode(&json, bin, &inputs, &outputs).expect("decode");
        assert_eq!(
            d.inputs[0],
            Tensor::from_shape(&[1, 2], &[1.5f32, -2.0]).expect("t")
        );
        assert_eq!(d.outputs, vec![(0, true)]);
        let enc = encode("m", Some("7"), &outputs, &d.inputs, &d.outputs).expect("encode");
        let n = enc.header_length.expect("binary");
        let head: Value = serde_json::from_slice(&enc.body[..n]).expect("json");
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(head["id"], "7");
        assert_eq!(&enc.body[n..n + 4], &1.5f32.to_le_bytes());
    }

    #[test]
    fn the_timeout_parameter_is_microseconds_or_refused() {
        let (inputs, outputs) = specs();
        let req = |params: &str| {
            format!(
                r#"{{"inputs":[{{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}}]{params}}}"#
            )
        };
        let d = |params: &str| decode(req(params).as_bytes(), Bytes::new(), &inputs, &outputs);
        assert_eq!(d("").expect("none").timeout, None);
        assert_eq!(
            d(r#","parameters":{"timeout":1500}"#).expect("µs").timeout,
            Some(std::time::Duration::from_micros(1500))
        );
        for bad in [
            r#","parameters":{"timeout":-1}"#,
            r#","parameters":{"timeout":"1s"}"#,
        ] {
            let e = d(bad).expect_err(bad);
            assert!(e.to_string().contains("microseconds"), "{e}");
        }
    }

    /// The streamed answer is the text the `serde_json::Value` rendering gave: sorted keys,
    /// floats through `f64`, binary outputs after the JSON header.
    #[test]
    fn answers_are_the_value_rendering() {
        let (_, mut outputs) = specs();
        outputs.push(TensorSpec {
            name: "label".into(),
            datum_type: DatumType::I64,
            shape: vec![None],
        });
        let y = Tensor::from_shape(&[1, 2], &[0.1f32, f32::NAN]).expect("y");
        let label = Tensor::from_shape(&[1], &[7i64]).expect("label");
        let tensors = [y.clone(), label];
        let enc = encode(
            "m",
            Some("a\"b"),
            &outputs,
            &tensors,
            &[(1, false), (0, true)],
        )
        .expect("encode");
        let want = serde_json::json!({
            "id": "a\"b",
            "model_name": "m",
            "model_version": "1",
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [1], "data": [7]},
                {"name": "y", "datatype": "FP32", "shape": [1, 2],
                 "parameters": {"binary_data_size": 8}},
            ],
        })
        .to_string();
        let n = enc.header_length.expect("binary");
        assert_eq!(std::str::from_utf8(&enc.body[..n]).expect("utf8"), want);
        assert_eq!(enc.body[n..], tensor::to_binary(&y).expect("bytes"));
        let enc = encode("m", None, &outputs, &tensors, &[(0, false)]).expect("encode");
        assert_eq!(enc.header_length, None);
        assert_eq!(
            std::str::from_utf8(&enc.body).expect("utf8"),
            r#"{"model_name":"m","model_version":"1","outputs":[{"data":[0.10000000149011612,null],"datatype":"FP32","name":"y","shape":[1,2]}]}"#
        );
    }

    #[test]
    fn rejects_bad_requests() {
        let (inputs, outputs) = specs();
        let bad = |s: &str| decode(s.as_bytes(), Bytes::new(), &inputs, &outputs).map(|_| ());
        assert!(bad("{").is_err());
        assert!(
            bad(r#"{"inputs":[{"name":"z","shape":[1,2],"datatype":"FP32","data":[1,2]}]}"#)
                .is_err()
        );
        assert!(bad(r#"{"inputs":[]}"#).is_err());
        assert!(
            bad(r#"{"inputs":[{"name":"x","shape":[-1,2],"datatype":"FP32","data":[1,2]}]}"#)
                .is_err()
        );
        assert!(bad(r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32"}]}"#).is_err());
        assert!(split_body(&Bytes::from_static(b"{}"), Some("9")).is_err());
    }
}
