//! A cascade's per-row work, pure: which rows a stage leaves to the next, the request of only
//! those rows, and the answer with the next stage's rows put back in the request's order.
//!
//! Rows are split only where both sides are plain JSON (Open Inference Protocol `inputs` and
//! `outputs`, V1 `instances` and `predictions`). Anything else (an image, the binary tensor
//! extension) goes on whole: it is one row, or its rows are answered again by the next stage,
//! which is slower but never wrong.

use serde_json::{Map, Value};

/// Rows below `min_confidence`, in order.
pub fn escalated(confidences: &[f64], min_confidence: f64) -> Vec<usize> {
    confidences
        .iter()
        .enumerate()
        .filter(|(_, c)| c.is_nan() || **c < min_confidence)
        .map(|(i, _)| i)
        .collect()
}

/// The rows of a request body, when it is JSON that can be split by row.
pub fn splittable_rows(request: &Value) -> Option<usize> {
    if let Some(inputs) = request.get("inputs").and_then(Value::as_array) {
        let rows: Vec<usize> = inputs
            .iter()
            .map(|i| i.pointer("/shape/0").and_then(Value::as_u64))
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .map(|r| usize::try_from(r).ok())
            .collect::<Option<Vec<_>>>()?;
        // Every input batched along the same first dimension, none sent as binary.
        let first = *rows.first()?;
        let plain = inputs.iter().all(|i| {
            i.get("data").is_some() && i.pointer("/parameters/binary_data_size").is_none()
        });
        return (plain && rows.iter().all(|r| *r == first)).then_some(first);
    }
    request
        .get("instances")
        .and_then(Value::as_array)
        .map(Vec::len)
}

/// The request with only `rows` (indices into the original's rows, in order).
pub fn select_rows(request: &Value, rows: &[usize]) -> Result<Value, String> {
    let mut out = request.clone();
    if let Some(inputs) = out.get_mut("inputs").and_then(Value::as_array_mut) {
        for input in inputs {
            let shape = shape_of(&input["shape"]);
            let size: usize = shape.iter().skip(1).product();
            let flat = flatten(&input["data"]);
            if flat.len() != shape.iter().product::<usize>() {
                return Err(format!(
                    "input {} has {} values for shape {shape:?}",
                    input["name"],
                    flat.len()
                ));
            }
            let data: Vec<Value> = rows
                .iter()
                .flat_map(|r| flat[r * size..(r + 1) * size].iter().cloned())
                .collect();
            input["data"] = Value::Array(data);
            input["shape"][0] = Value::from(rows.len());
        }
        return Ok(out);
    }
    if let Some(instances) = out.get_mut("instances").and_then(Value::as_array_mut) {
        let picked: Vec<Value> = rows
            .iter()
            .filter_map(|r| instances.get(*r).cloned())
            .collect();
        *instances = picked;
        return Ok(out);
    }
    Err("neither inputs nor instances".to_owned())
}

/// `first`'s answer with the rows `rows` replaced by `next`'s answer to them (its rows in the
/// same order).
pub fn merge(first: &mut Value, rows: &[usize], next: &Value) -> Result<(), String> {
    if let Some(outputs) = first.get_mut("outputs").and_then(Value::as_array_mut) {
        let theirs = next["outputs"]
            .as_array()
            .ok_or("the next stage has no outputs")?;
        for output in outputs {
            let name = output["name"].clone();
            let other = theirs
                .iter()
                .find(|o| o["name"] == name)
                .ok_or_else(|| format!("the next stage has no output {name}"))?;
            let shape = shape_of(&output["shape"]);
            let size: usize = shape.iter().skip(1).product();
            let mut mine = flatten(&output["data"]);
            let replacement = flatten(&other["data"]);
            if mine.len() != shape.iter().product::<usize>()
                || replacement.len() != rows.len() * size
            {
                return Err(format!("output {name} does not have the rows expected"));
            }
            for (k, r) in rows.iter().enumerate() {
                mine[r * size..(r + 1) * size]
                    .clone_from_slice(&replacement[k * size..(k + 1) * size]);
            }
            output["data"] = Value::Array(mine);
        }
    } else if let Some(predictions) = first.get_mut("predictions").and_then(Value::as_array_mut) {
        let theirs = next["predictions"]
            .as_array()
            .filter(|p| p.len() == rows.len())
            .ok_or("the next stage does not have the rows expected")?;
        for (k, r) in rows.iter().enumerate() {
            let slot = predictions.get_mut(*r).ok_or("a row out of range")?;
            *slot = theirs[k].clone();
        }
    } else {
        return Err("neither outputs nor predictions".to_owned());
    }
    Ok(())
}

/// Names the stage that answered each row in the answer's `parameters.serval_stages`.
pub fn name_stages(answer: &mut Value, stages: &[&str]) {
    if let Some(obj) = answer.as_object_mut() {
        let params = obj
            .entry("parameters")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(p) = params.as_object_mut() {
            p.insert(
                "serval_stages".to_owned(),
                Value::Array(stages.iter().map(|s| Value::from(*s)).collect()),
            );
        }
    }
}

fn shape_of(v: &Value) -> Vec<usize> {
    v.as_array()
        .map(|s| {
            s.iter()
                .filter_map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect()
        })
        .unwrap_or_default()
}

fn flatten(v: &Value) -> Vec<Value> {
    fn walk(v: &Value, out: &mut Vec<Value>) {
        match v {
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            other => out.push(other.clone()),
        }
    }
    let mut out = Vec::new();
    walk(v, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn rows_below_the_threshold_escalate_in_order() {
        assert_eq!(
            escalated(&[0.95, 0.5, 0.91, f64::NAN, 0.2], 0.9),
            vec![1, 3, 4]
        );
        assert!(escalated(&[0.99, 0.9], 0.9).is_empty());
    }

    #[test]
    fn an_oip_request_is_cut_to_the_escalated_rows_and_merged_back_in_order() {
        let request = json!({"id": "r", "inputs": [
            {"name": "X", "datatype": "FP32", "shape": [3, 2], "data": [[1, 2], [3, 4], [5, 6]]},
            {"name": "k", "datatype": "INT64", "shape": [3], "data": [7, 8, 9]}
        ]});
        assert_eq!(splittable_rows(&request), Some(3));
        let sub = select_rows(&request, &[0, 2]).unwrap();
        assert_eq!(sub["inputs"][0]["shape"], json!([2, 2]));
        assert_eq!(sub["inputs"][0]["data"], json!([1, 2, 5, 6]));
        assert_eq!(sub["inputs"][1]["data"], json!([7, 9]));
        assert_eq!(sub["id"], "r");

        let mut first = json!({"model_name": "m", "outputs": [
            {"name": "p", "datatype": "FP32", "shape": [3, 2], "data": [0.6, 0.4, 0.99, 0.01, 0.5, 0.5]},
            {"name": "label", "datatype": "INT64", "shape": [3], "data": [0, 0, 0]}
        ]});
        let next = json!({"outputs": [
            {"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 1]},
            {"name": "p", "datatype": "FP32", "shape": [2, 2], "data": [[0.1, 0.9], [0.2, 0.8]]}
        ]});
        merge(&mut first, &[0, 2], &next).unwrap();
        name_stages(&mut first, &["large", "small", "large"]);
        assert_eq!(
            first["outputs"][0]["data"],
            json!([0.1, 0.9, 0.99, 0.01, 0.2, 0.8])
        );
        assert_eq!(first["outputs"][1]["data"], json!([1, 0, 1]));
        assert_eq!(
            first["parameters"]["serval_stages"],
            json!(["large", "small", "large"])
        );
    }

    #[test]
    fn v1_instances_and_predictions_split_and_merge_by_row() {
        let request = json!({"instances": [[1], [2], [3]]});
        assert_eq!(splittable_rows(&request), Some(3));
        assert_eq!(
            select_rows(&request, &[1]).unwrap(),
            json!({"instances": [[2]]})
        );
        let mut first = json!({"predictions": [{"label": "a", "score": 0.9}, {"label": "b", "score": 0.3}, {"label": "c", "score": 0.8}]});
        merge(
            &mut first,
            &[1],
            &json!({"predictions": [{"label": "B", "score": 0.97}]}),
        )
        .unwrap();
        assert_eq!(first["predictions"][1]["label"], "B");
        assert_eq!(first["predictions"][0]["label"], "a");
    }

    #[test]
    fn binary_inputs_and_mismatched_answers_are_not_split() {
        let binary = json!({"inputs": [{"name": "X", "shape": [2, 2], "datatype": "FP32",
            "parameters": {"binary_data_size": 16}}]});
        assert_eq!(splittable_rows(&binary), None);
        let ragged = json!({"inputs": [
            {"name": "a", "shape": [2], "data": [1, 2]},
            {"name": "b", "shape": [3], "data": [1, 2, 3]}
        ]});
        assert_eq!(splittable_rows(&ragged), None);
        let mut first = json!({"outputs": [{"name": "p", "shape": [2, 1], "data": [1, 2]}]});
        let short = json!({"outputs": [{"name": "p", "shape": [2, 1], "data": [5, 6]}]});
        assert!(merge(&mut first, &[1], &short).is_err());
    }
}
