//! A sequence's hand-over, pure: one step's answer turned into the next step's request, its
//! outputs becoming inputs. Binary outputs travel on as binary inputs, byte for byte: no
//! tensor is decoded or re-encoded between two steps that speak the binary extension.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value, json};

/// The next step's request: its body and, when tensors travel as binary, the length of its
/// JSON part (`Inference-Header-Content-Length`).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The body.
    pub body: Bytes,
    /// The JSON part's length when binary tensors follow it.
    pub header_length: Option<usize>,
}

/// The request for the next step from a step's answer (`value` its JSON part, `binary` the
/// bytes after it): each output becomes an input of the same name, or, with `inputs`
/// (`{input: output}`), only the mapped outputs under their input names. `binary_output`
/// asks the next step to answer in binary; `requested` (the client's, for the last step) names
/// the outputs it should answer.
pub fn next_request(
    value: &Value,
    binary: &[u8],
    inputs: &BTreeMap<String, String>,
    binary_output: bool,
    requested: Option<&Value>,
) -> Result<Request, String> {
    let outputs = value
        .get("outputs")
        .and_then(Value::as_array)
        .ok_or("the answer has no outputs (only the last step may post-process)")?;
    // Each output's binary bytes, in order after the JSON part.
    let slices = crate::agreement::binary_slices(outputs, binary)?;
    let mut found: Vec<(&str, &Value, Option<&[u8]>)> = Vec::with_capacity(outputs.len());
    for (o, bytes) in outputs.iter().zip(slices) {
        let name = o["name"].as_str().ok_or("an output has no name")?;
        found.push((name, o, bytes));
    }
    let chosen: Vec<(&str, &Value, Option<&[u8]>)> = if inputs.is_empty() {
        found
    } else {
        inputs
            .iter()
            .map(|(to, from)| {
                found
                    .iter()
                    .find(|(name, _, _)| name == from)
                    .map(|(_, o, b)| (to.as_str(), *o, *b))
                    .ok_or_else(|| format!("no output {from:?} for input {to:?}"))
            })
            .collect::<Result<_, _>>()?
    };
    let mut tensors = BytesMut::new();
    let mut list = Vec::with_capacity(chosen.len());
    for (name, o, bytes) in chosen {
        let mut input = Map::new();
        input.insert("name".to_owned(), Value::from(name));
        input.insert("datatype".to_owned(), o["datatype"].clone());
        input.insert("shape".to_owned(), o["shape"].clone());
        match bytes {
            Some(b) => {
                input.insert(
                    "parameters".to_owned(),
                    json!({"binary_data_size": b.len()}),
                );
                tensors.extend_from_slice(b);
            }
            None => {
                let data = o
                    .get("data")
                    .ok_or_else(|| format!("output {name:?} has no data"))?;
                input.insert("data".to_owned(), data.clone());
            }
        }
        list.push(Value::Object(input));
    }
    let mut request = json!({ "inputs": list });
    if let Some(o) = requested {
        request["outputs"] = o.clone();
    }
    if binary_output {
        request["parameters"] = json!({"binary_data_output": true});
    }
    let header = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
    if tensors.is_empty() {
        return Ok(Request {
            body: Bytes::from(header),
            header_length: None,
        });
    }
    let header_length = header.len();
    let mut body = BytesMut::with_capacity(header_length + tensors.len());
    body.extend_from_slice(&header);
    body.extend_from_slice(&tensors);
    Ok(Request {
        body: body.freeze(),
        header_length: Some(header_length),
    })
}

/// The V1 request (`{"instances": [...]}`) for the last step from a step's JSON answer, when
/// the client sent an image or a V1 request and expects the last step's post-processed answer
/// (labels): each row of the chosen outputs (named as [`next_request`] does) an instance, a
/// nested list of its values, or with several inputs an object of them by name.
pub fn v1_request(value: &Value, inputs: &BTreeMap<String, String>) -> Result<Request, String> {
    let outputs = value
        .get("outputs")
        .and_then(Value::as_array)
        .ok_or("the answer has no outputs (only the last step may post-process)")?;
    let named = |name: &str| outputs.iter().find(|o| o["name"] == name);
    let chosen: Vec<(&str, &Value)> = if inputs.is_empty() {
        outputs
            .iter()
            .filter_map(|o| Some((o["name"].as_str()?, o)))
            .collect()
    } else {
        inputs
            .iter()
            .map(|(to, from)| {
                named(from)
                    .map(|o| (to.as_str(), o))
                    .ok_or_else(|| format!("no output {from:?} for input {to:?}"))
            })
            .collect::<Result<_, _>>()?
    };
    let mut columns: Vec<(&str, Vec<Value>)> = Vec::with_capacity(chosen.len());
    let mut rows = None;
    for (name, o) in &chosen {
        let shape: Vec<usize> = o["shape"]
            .as_array()
            .map(|s| {
                s.iter()
                    .filter_map(|d| d.as_u64().map(|d| d as usize))
                    .collect()
            })
            .unwrap_or_default();
        let mut flat = Vec::new();
        flatten(
            o.get("data")
                .ok_or_else(|| format!("output {name:?} has no JSON data"))?,
            &mut flat,
        );
        let (n, dims) = shape.split_first().map_or((1, &[][..]), |(n, d)| (*n, d));
        let size: usize = dims.iter().product();
        if flat.len() != n * size {
            return Err(format!(
                "output {name:?} has {} values for shape {shape:?}",
                flat.len()
            ));
        }
        if *rows.get_or_insert(n) != n {
            return Err("the outputs have different numbers of rows".to_owned());
        }
        let per_row = flat
            .chunks(size.max(1))
            .map(|row| nest(row, dims))
            .collect();
        columns.push((name, per_row));
    }
    let instances: Vec<Value> = (0..rows.unwrap_or(0))
        .map(|r| match columns.as_slice() {
            [(_, one)] => one[r].clone(),
            many => Value::Object(
                many.iter()
                    .map(|(name, col)| ((*name).to_owned(), col[r].clone()))
                    .collect(),
            ),
        })
        .collect();
    Ok(Request {
        body: Bytes::from(json!({ "instances": instances }).to_string()),
        header_length: None,
    })
}

fn flatten(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other.clone()),
    }
}

/// Values laid out as nested lists of `dims` (one value when `dims` is empty).
fn nest(values: &[Value], dims: &[usize]) -> Value {
    match dims.split_first() {
        None => values.first().cloned().unwrap_or(Value::Null),
        Some((_, rest)) => {
            let inner: usize = rest.iter().product::<usize>().max(1);
            Value::Array(values.chunks(inner).map(|c| nest(c, rest)).collect())
        }
    }
}

/// What the router makes of the client's request before the first step of a sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct FirstStep {
    /// The request for the first step when it differs from the client's: the client's
    /// `outputs` (which name the last step's outputs) taken out, and, for a request with
    /// binary inputs, `parameters.binary_data_output` set so the first step answers in binary
    /// too.
    pub request: Option<Request>,
    /// The client's `outputs`, for the last step.
    pub outputs: Option<Value>,
    /// Whether the client asked for binary outputs: the last step answers as it asked.
    pub binary_output: bool,
}

/// The first step's request from the client's (`header_length`: its JSON part's length when
/// binary tensors follow). A JSON request that names no `outputs` is sent as it is, unparsed
/// unless it mentions `binary_data_output`.
pub fn first_step(body: &[u8], header_length: Option<usize>) -> FirstStep {
    let n = header_length.unwrap_or(body.len()).min(body.len());
    let (json, tensors) = body.split_at(n);
    let mentions = |key: &[u8]| json.windows(key.len()).any(|w| w == key);
    let as_is = FirstStep {
        request: None,
        outputs: None,
        binary_output: false,
    };
    if header_length.is_none() && !mentions(b"\"outputs\"") && !mentions(b"binary_data_output") {
        return as_is;
    }
    let Ok(mut value) = serde_json::from_slice::<Value>(json) else {
        // Not JSON (an image, say): the first step answers it, or says what is wrong.
        return as_is;
    };
    let Some(obj) = value.as_object_mut().filter(|o| o.contains_key("inputs")) else {
        return as_is;
    };
    let binary_output = obj
        .get("parameters")
        .and_then(|p| p.get("binary_data_output"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let outputs = obj.remove("outputs");
    if header_length.is_some() {
        let params = obj
            .entry("parameters")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(p) = params.as_object_mut() {
            p.insert("binary_data_output".to_owned(), Value::Bool(true));
        }
    } else if outputs.is_none() {
        return FirstStep {
            binary_output,
            ..as_is
        };
    }
    let Ok(header) = serde_json::to_vec(&value) else {
        return as_is;
    };
    let mut out = BytesMut::with_capacity(header.len() + tensors.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(tensors);
    FirstStep {
        request: Some(Request {
            header_length: header_length.map(|_| header.len()),
            body: out.freeze(),
        }),
        outputs,
        binary_output,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_outputs_become_inputs_by_name_or_by_mapping() {
        let answer = json!({"model_name": "pca", "outputs": [
            {"name": "variable", "datatype": "FP32", "shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]},
            {"name": "extra", "datatype": "INT64", "shape": [2], "data": [7, 8]}
        ]});
        let all = next_request(&answer, &[], &BTreeMap::new(), false, None).unwrap();
        assert_eq!(all.header_length, None);
        let v: Value = serde_json::from_slice(&all.body).unwrap();
        assert_eq!(v["inputs"][0]["name"], "variable");
        assert_eq!(v["inputs"][1]["data"], json!([7, 8]));
        assert!(v.get("parameters").is_none());

        let mapped = BTreeMap::from([("X".to_owned(), "variable".to_owned())]);
        let one = next_request(&answer, &[], &mapped, true, None).unwrap();
        let v: Value = serde_json::from_slice(&one.body).unwrap();
        assert_eq!(
            v,
            json!({"inputs": [{"name": "X", "datatype": "FP32", "shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]}],
                "parameters": {"binary_data_output": true}})
        );
        let missing = BTreeMap::from([("X".to_owned(), "nope".to_owned())]);
        assert_eq!(
            next_request(&answer, &[], &missing, false, None).unwrap_err(),
            "no output \"nope\" for input \"X\""
        );
        assert!(
            next_request(
                &json!({"label": "7", "score": 0.9}),
                &[],
                &BTreeMap::new(),
                false,
                None
            )
            .is_err()
        );
    }

    #[test]
    fn binary_outputs_pass_on_byte_for_byte() {
        let a: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let b: Vec<u8> = [9i64].iter().flat_map(|i| i.to_le_bytes()).collect();
        let answer = json!({"outputs": [
            {"name": "a", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}},
            {"name": "b", "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": 8}}
        ]});
        let binary = [a.clone(), b.clone()].concat();
        let mapped = BTreeMap::from([("in".to_owned(), "b".to_owned())]);
        let r = next_request(&answer, &binary, &mapped, false, None).unwrap();
        let n = r.header_length.unwrap();
        let v: Value = serde_json::from_slice(&r.body[..n]).unwrap();
        assert_eq!(v["inputs"][0]["name"], "in");
        assert_eq!(v["inputs"][0]["parameters"]["binary_data_size"], 8);
        assert!(v["inputs"][0].get("data").is_none());
        assert_eq!(&r.body[n..], &b[..]);
        let all = next_request(&answer, &binary, &BTreeMap::new(), false, None).unwrap();
        assert_eq!(&all.body[all.header_length.unwrap()..], &binary[..]);
        assert!(
            next_request(&answer, &a, &BTreeMap::new(), false, None).is_err(),
            "cut short"
        );
    }

    #[test]
    fn a_v1_last_step_gets_each_row_as_an_instance() {
        let answer = json!({"outputs": [
            {"name": "variable", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]},
            {"name": "k", "datatype": "INT64", "shape": [2], "data": [7, 8]}
        ]});
        let one = BTreeMap::from([("X".to_owned(), "variable".to_owned())]);
        let r = v1_request(&answer, &one).unwrap();
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v, json!({"instances": [[1, 2, 3], [4, 5, 6]]}));
        let r = v1_request(&answer, &BTreeMap::new()).unwrap();
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["instances"][1], json!({"variable": [4, 5, 6], "k": 8}));
        let cube =
            json!({"outputs": [{"name": "c", "shape": [1, 2, 2], "data": [[[1, 2], [3, 4]]]}]});
        let v: Value =
            serde_json::from_slice(&v1_request(&cube, &BTreeMap::new()).unwrap().body).unwrap();
        assert_eq!(v, json!({"instances": [[[1, 2], [3, 4]]]}));
    }

    #[test]
    fn the_client_asks_the_last_step_for_its_outputs_and_binary_inputs_ask_binary_back() {
        let header = br#"{"inputs":[{"name":"X","datatype":"FP32","shape":[1],"parameters":{"binary_data_size":4}}],"outputs":[{"name":"label"}]}"#;
        let body = [&header[..], &1f32.to_le_bytes()].concat();
        let first = first_step(&body, Some(header.len()));
        let r = first.request.expect("rewritten");
        let n = r.header_length.unwrap();
        let v: Value = serde_json::from_slice(&r.body[..n]).unwrap();
        assert_eq!(v["parameters"]["binary_data_output"], true);
        assert!(v.get("outputs").is_none());
        assert_eq!(&r.body[n..], &1f32.to_le_bytes());
        assert_eq!(first.outputs, Some(json!([{"name": "label"}])));
        assert!(!first.binary_output);

        // The last step is asked for them.
        let answer =
            json!({"outputs": [{"name": "v", "datatype": "FP32", "shape": [1], "data": [2.0]}]});
        let last =
            next_request(&answer, &[], &BTreeMap::new(), true, first.outputs.as_ref()).unwrap();
        let v: Value = serde_json::from_slice(&last.body).unwrap();
        assert_eq!(v["outputs"], json!([{"name": "label"}]));

        // Plain JSON naming no outputs goes as it is; asking binary back is noted.
        let plain = br#"{"inputs":[{"name":"X","datatype":"FP32","shape":[1],"data":[1]}]}"#;
        assert_eq!(first_step(plain, None).request, None);
        let asks = br#"{"inputs":[],"parameters":{"binary_data_output":true}}"#;
        let f = first_step(asks, None);
        assert!(f.binary_output && f.request.is_none());
        assert_eq!(first_step(b"\x89PNG", None).request, None);
    }
}
