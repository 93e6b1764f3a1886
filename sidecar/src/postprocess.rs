//! Built-in post-processing of a classifier output: optional softmax, then the top-k classes
//! with their labels, e.g. `{"label": "seven", "index": 7, "score": 0.98, "topK": [...]}`.

use serde_json::{Value, json};
use serval_api::Postprocess;
use tract_onnx::prelude::{DatumType, Tensor};

use crate::engine::TensorSpec;
use crate::errors::{RequestError, RequestResult, StartupError, StartupResult};

/// A post-processor bound to one model output.
#[derive(Debug, Clone)]
pub struct Postprocessor {
    cfg: Postprocess,
    output: usize,
}

fn is_float(dt: DatumType) -> bool {
    matches!(dt, DatumType::F16 | DatumType::F32 | DatumType::F64)
}

impl Postprocessor {
    /// Resolves the configured output. Without a name, the first output, or, when that is not
    /// floating point (as scikit-learn's `label`), the first floating-point output.
    pub fn new(cfg: Postprocess, outputs: &[TensorSpec]) -> StartupResult<Self> {
        let output = match &cfg.output {
            Some(name) => outputs
                .iter()
                .position(|s| &s.name == name)
                .ok_or_else(|| {
                    StartupError::Config(format!(
                        "postprocess.output {name:?} is not a model output ({:?})",
                        outputs.iter().map(|s| &s.name).collect::<Vec<_>>()
                    ))
                })?,
            None => match outputs.first() {
                Some(first) if is_float(first.datum_type) => 0,
                _ => outputs
                    .iter()
                    .position(|s| is_float(s.datum_type))
                    .unwrap_or(0),
            },
        };
        Ok(Self { cfg, output })
    }

    /// One result object per row of the chosen output.
    pub fn apply(&self, outputs: &[Tensor]) -> RequestResult<Vec<Value>> {
        let t = outputs
            .get(self.output)
            .ok_or_else(|| RequestError::Inference("post-processed output missing".into()))?;
        let scores = t
            .cast_to_dt(DatumType::F64)
            .map_err(|e| RequestError::Inference(format!("post-processing: {e}")))?;
        let flat: Vec<f64> = scores
            .to_plain_array_view::<f64>()
            .map_err(|e| RequestError::Inference(e.to_string()))?
            .iter()
            .copied()
            .collect();
        let rows = t.shape().first().copied().unwrap_or(1).max(1);
        let per_row = flat.len() / rows;
        if per_row == 0 {
            return Err(RequestError::Inference(
                "post-processed output is empty".into(),
            ));
        }
        Ok(flat.chunks(per_row).map(|row| self.row(row)).collect())
    }

    fn row(&self, row: &[f64]) -> Value {
        let scores = if self.cfg.softmax {
            softmax(row)
        } else {
            row.to_vec()
        };
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b)));
        let k = self
            .cfg
            .top_k
            .map_or(1, |k| k as usize)
            .clamp(1, scores.len());
        let label = |i: usize| {
            self.cfg
                .labels
                .get(i)
                .cloned()
                .unwrap_or_else(|| i.to_string())
        };
        let top: Vec<Value> = order[..k]
            .iter()
            .map(|i| json!({ "label": label(*i), "index": i, "score": scores[*i] }))
            .collect();
        let best = order[0];
        json!({ "label": label(best), "index": best, "score": scores[best], "topK": top })
    }
}

/// Numerically stable softmax.
fn softmax(row: &[f64]) -> Vec<f64> {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = row.iter().map(|v| (v - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_top_k_and_labels() {
        let specs = [
            TensorSpec {
                name: "label".into(),
                datum_type: DatumType::I64,
                shape: vec![None],
            },
            TensorSpec {
                name: "probabilities".into(),
                datum_type: DatumType::F32,
                shape: vec![None, Some(3)],
            },
        ];
        let cfg = Postprocess {
            output: None,
            softmax: true,
            top_k: Some(2),
            labels: vec!["a".into(), "b".into(), "c".into()],
        };
        let p = Postprocessor::new(cfg, &specs).expect("post");
        let out = Tensor::from_shape(&[2, 3], &[0.0f32, 2.0, 1.0, 5.0, 0.0, 0.0]).expect("t");
        let label = Tensor::from_shape(&[2], &[1i64, 0]).expect("t");
        let rows = p.apply(&[label, out]).expect("apply");
        assert_eq!(rows[0]["label"], "b");
        assert_eq!(rows[0]["topK"][1]["label"], "c");
        assert_eq!(rows[1]["label"], "a");
        let s = rows[1]["score"].as_f64().expect("score");
        assert!(s > 0.98 && s < 1.0);
        let missing = Postprocess {
            output: Some("nope".into()),
            ..Postprocess::default()
        };
        assert!(Postprocessor::new(missing, &specs).is_err());
    }
}
