//! KServe V1 REST: `{"instances": [...]}` in, `{"predictions": [...]}` out. Each instance is one
//! row; for a model with several inputs, an object of rows by input name.

use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use tract_onnx::prelude::Tensor;

use super::tensor::{self, JsonRow};
use crate::engine::TensorSpec;
use crate::errors::{RequestError, RequestResult};

/// Shape of a nested JSON array (its first element at each level).
/// The shape of one instance, which must be a regular (non-ragged) nesting of arrays.
fn shape_of(v: &Value) -> RequestResult<Vec<usize>> {
    tensor::Nesting::of(v).shape().ok_or_else(|| {
        RequestError::Malformed(
            "an instance is ragged: its arrays differ in length at one depth or hold values at \
             different depths"
                .into(),
        )
    })
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
            let row_shape = shape_of(rows[0])?;
            if rows
                .iter()
                .map(|r| shape_of(r))
                .collect::<RequestResult<Vec<_>>>()?
                .iter()
                .any(|s| *s != row_shape)
            {
                return Err(RequestError::Malformed(
                    "instances have different shapes".into(),
                ));
            }
            let mut shape = vec![rows.len()];
            shape.extend(row_shape);
            // The rows' leaves in order: what flattening an array of the rows would give.
            let mut leaves = Vec::new();
            for row in &rows {
                tensor::flatten(row, &mut leaves);
            }
            tensor::from_leaves(spec.datum_type, &shape, &leaves)
        })
        .collect()
}

/// `{"predictions": [...]}` with one entry per row: the row of the only output, or an object
/// of rows by output name (keys sorted, as a `serde_json::Map` orders them). Serialized
/// straight from the tensors.
pub fn encode(outputs: &[TensorSpec], tensors: &[Tensor]) -> RequestResult<Vec<u8>> {
    let mut elements = 0;
    for t in tensors {
        tensor::check_encodable(t)?;
        elements += t.len();
    }
    let mut body = Vec::with_capacity(64 + elements * 24);
    let written = match tensors {
        [only] => serde_json::to_writer(
            &mut body,
            &Predictions {
                predictions: Rows(only),
            },
        ),
        _ => {
            // Sorted by name; for equal names the last output wins, as a map insert would.
            let mut by_name: Vec<(&str, &Tensor)> = outputs
                .iter()
                .zip(tensors)
                .map(|(s, t)| (s.name.as_str(), t))
                .collect();
            by_name.sort_by(|a, b| a.0.cmp(b.0));
            let mut keep = Vec::with_capacity(by_name.len());
            for (i, entry) in by_name.iter().enumerate() {
                if by_name.get(i + 1).is_none_or(|next| next.0 != entry.0) {
                    keep.push(*entry);
                }
            }
            let rows = tensors.first().map_or(0, tensor::row_count);
            serde_json::to_writer(
                &mut body,
                &Predictions {
                    predictions: Objects {
                        outputs: &keep,
                        rows,
                    },
                },
            )
        }
    };
    written.map_err(|e| RequestError::Inference(format!("cannot encode output: {e}")))?;
    Ok(body)
}

#[derive(Serialize)]
struct Predictions<P> {
    predictions: P,
}

/// Every row of one output.
struct Rows<'a>(&'a Tensor);

impl Serialize for Rows<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq((0..tensor::row_count(self.0)).map(|r| JsonRow(self.0, r)))
    }
}

/// One object per row, of each output's row by name.
struct Objects<'a> {
    outputs: &'a [(&'a str, &'a Tensor)],
    rows: usize,
}

impl Serialize for Objects<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq((0..self.rows).map(|r| Row {
            outputs: self.outputs,
            row: r,
        }))
    }
}

struct Row<'a> {
    outputs: &'a [(&'a str, &'a Tensor)],
    row: usize,
}

impl Serialize for Row<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(
            self.outputs
                .iter()
                .map(|(name, t)| (name, JsonRow(t, self.row))),
        )
    }
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
        let out: Value =
            serde_json::from_slice(&encode(std::slice::from_ref(&spec), &t).expect("encode"))
                .expect("json");
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
