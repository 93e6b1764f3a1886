//! KServe V1 REST: `{"instances": [...]}` in, `{"predictions": [...]}` out. Each instance is one
//! row; for a model with several inputs, an object of rows by input name.

use serde_json::{Map, Value};
use tract_onnx::prelude::Tensor;

use super::tensor;
use crate::engine::TensorSpec;
use crate::errors::{RequestError, RequestResult};

/// Shape of a nested JSON array (its first element at each level).
fn shape_of(v: &Value) -> Vec<usize> {
    let mut shape = Vec::new();
    let mut cur = v;
    while let Value::Array(items) = cur {
        shape.push(items.len());
        match items.first() {
            Some(first) => cur = first,
            None => break,
        }
    }
    shape
}

/// Decodes `{"instances": [...]}` into one tensor per model input.
pub fn decode(body: &[u8], inputs: &[TensorSpec]) -> RequestResult<Vec<Tensor>> {
    let mut req: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| RequestError::Malformed(format!("invalid predict request: {e}")))?;
    let Some(Value::Array(instances)) = req.remove("instances") else {
        return Err(RequestError::Malformed(
            "a predict request needs an \"instances\" array".into(),
        ));
    };
    if instances.is_empty() {
        return Err(RequestError::Malformed("\"instances\" is empty".into()));
    }
    inputs
        .iter()
        .map(|spec| {
            let rows: Vec<&Value> = if inputs.len() == 1 {
                instances.iter().collect()
            } else {
                instances
                    .iter()
                    .map(|inst| {
                        inst.get(&spec.name).ok_or_else(|| {
                            RequestError::Unprocessable(format!(
                                "instance lacks input {:?}",
                                spec.name
                            ))
                        })
                    })
                    .collect::<RequestResult<_>>()?
            };
            let row_shape = shape_of(rows[0]);
            if rows.iter().any(|r| shape_of(r) != row_shape) {
                return Err(RequestError::Malformed(
                    "instances have different shapes".into(),
                ));
            }
            let mut shape = vec![rows.len()];
            shape.extend(row_shape);
            let all = Value::Array(rows.into_iter().cloned().collect());
            tensor::from_json(spec.datum_type, &shape, &all)
        })
        .collect()
}

/// `{"predictions": [...]}` with one entry per row: the row of the only output, or an object
/// of rows by output name.
pub fn encode(outputs: &[TensorSpec], tensors: &[Tensor]) -> RequestResult<Value> {
    let per_output = tensors
        .iter()
        .map(tensor::to_json_rows)
        .collect::<RequestResult<Vec<Vec<Value>>>>()?;
    let rows = per_output.first().map_or(0, Vec::len);
    let predictions: Vec<Value> = if per_output.len() == 1 {
        per_output.into_iter().next().unwrap_or_default()
    } else {
        (0..rows)
            .map(|r| {
                let obj: Map<String, Value> = outputs
                    .iter()
                    .zip(&per_output)
                    .map(|(s, rows)| (s.name.clone(), rows.get(r).cloned().unwrap_or(Value::Null)))
                    .collect();
                Value::Object(obj)
            })
            .collect()
    };
    Ok(serde_json::json!({ "predictions": predictions }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::DatumType;

    #[test]
    fn instances_become_rows() {
        let spec = TensorSpec {
            name: "x".into(),
            datum_type: DatumType::F32,
            shape: vec![None, Some(2)],
        };
        let t = decode(
            br#"{"instances": [[1, 2], [3, 4], [5, 6]]}"#,
            std::slice::from_ref(&spec),
        )
        .expect("decode");
        assert_eq!(t[0].shape(), &[3, 2]);
        let out = encode(std::slice::from_ref(&spec), &t).expect("encode");
        assert_eq!(
            out,
            serde_json::json!({"predictions": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]})
        );
        assert!(
            decode(
                br#"{"instances": [[1, 2], [3]]}"#,
                std::slice::from_ref(&spec)
            )
            .is_err()
        );
        assert!(decode(br#"{"rows": []}"#, std::slice::from_ref(&spec)).is_err());
    }
}
