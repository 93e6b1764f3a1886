//! Whether a shadow backend's answer agrees with the primary's.
//!
//! Models are compared by decision, not by bytes: the argmax of the first output (OIP), the
//! `label` (post-processed answers) or the first prediction (V1); anything else must be
//! identical JSON. Fields that name the answering model differ by design and are ignored.

use serde_json::Value;

/// Outcome of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agreement {
    /// Same decision.
    Agree,
    /// Different decision.
    Disagree,
}

impl Agreement {
    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Agreement::Agree => "agree",
            Agreement::Disagree => "disagree",
        }
    }
}

/// What a response decided.
#[derive(Debug, PartialEq)]
enum Decision {
    Argmax(usize),
    Label(Value),
    Json(Value),
    Bytes(Vec<u8>),
}

/// Compares two response bodies.
pub fn compare(primary: &[u8], shadow: &[u8]) -> Agreement {
    if decision(primary) == decision(shadow) {
        Agreement::Agree
    } else {
        Agreement::Disagree
    }
}

fn decision(body: &[u8]) -> Decision {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => decide(v),
        Err(_) => Decision::Bytes(body.to_vec()),
    }
}

fn decide(mut v: Value) -> Decision {
    if let Some(label) = v.get("label") {
        return Decision::Label(label.clone());
    }
    if let Some(data) = v.pointer("/outputs/0/data") {
        if let Some(i) = argmax(data) {
            return Decision::Argmax(i);
        }
        if let Some(label) = data.get(0).and_then(label_of) {
            return Decision::Label(label);
        }
        return Decision::Json(data.clone());
    }
    if let Some(first) = v.pointer("/predictions/0") {
        if let Some(label) = first.get("label") {
            return Decision::Label(label.clone());
        }
        if let Some(i) = argmax(first) {
            return Decision::Argmax(i);
        }
        return Decision::Json(first.clone());
    }
    if let Some(obj) = v.as_object_mut() {
        for k in ["model_name", "model_version", "id"] {
            obj.remove(k);
        }
    }
    Decision::Json(v)
}

/// A label inside a string element that itself holds JSON (BYTES outputs of post-processing).
fn label_of(v: &Value) -> Option<Value> {
    let s = v.as_str()?;
    serde_json::from_str::<Value>(s).ok()?.get("label").cloned()
}

/// Index of the largest number in a (possibly nested) numeric array.
fn argmax(v: &Value) -> Option<usize> {
    fn flatten(v: &Value, out: &mut Vec<f64>) -> bool {
        match v {
            Value::Array(items) => items.iter().all(|i| flatten(i, out)),
            Value::Number(n) => n.as_f64().map(|f| out.push(f)).is_some(),
            _ => false,
        }
    }
    let mut nums = Vec::new();
    if !flatten(v, &mut nums) || nums.is_empty() {
        return None;
    }
    nums.iter()
        .enumerate()
        .fold(None, |best: Option<(usize, f64)>, (i, &x)| match best {
            Some((_, b)) if b >= x => best,
            _ => Some((i, x)),
        })
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmp(a: &str, b: &str) -> Agreement {
        compare(a.as_bytes(), b.as_bytes())
    }

    #[test]
    fn compares_decisions_not_bytes() {
        let oip = |model: &str, data: &str| {
            format!(
                r#"{{"model_name":"{model}","outputs":[{{"name":"y","datatype":"FP32","shape":[1,3],"data":{data}}}]}}"#
            )
        };
        assert_eq!(
            cmp(&oip("v1", "[0.1,0.7,0.2]"), &oip("v2", "[0.2,0.5,0.3]")),
            Agreement::Agree
        );
        assert_eq!(
            cmp(&oip("v1", "[0.1,0.7,0.2]"), &oip("v2", "[0.9,0.05,0.05]")),
            Agreement::Disagree
        );
        assert_eq!(
            cmp(
                r#"{"label":"seven","score":0.9}"#,
                r#"{"label":"seven","score":0.6}"#
            ),
            Agreement::Agree
        );
        assert_eq!(
            cmp(r#"{"label":"seven"}"#, r#"{"label":"one"}"#),
            Agreement::Disagree
        );
        assert_eq!(
            cmp(
                r#"{"predictions":[[1,5,2]]}"#,
                r#"{"predictions":[[0,9,1]]}"#
            ),
            Agreement::Agree
        );
        assert_eq!(
            cmp(
                r#"{"predictions":[{"label":"a"}]}"#,
                r#"{"predictions":[{"label":"b"}]}"#
            ),
            Agreement::Disagree
        );
        assert_eq!(
            cmp(r#"{"x":1,"model_name":"a"}"#, r#"{"model_name":"b","x":1}"#),
            Agreement::Agree
        );
        assert_eq!(cmp(r#"{"x":1}"#, r#"{"x":2}"#), Agreement::Disagree);
        assert_eq!(cmp("plain", "plain"), Agreement::Agree);
        assert_eq!(cmp("plain", r#"{"x":1}"#), Agreement::Disagree);
        let bytes_out = |l: &str| {
            format!(
                r#"{{"outputs":[{{"name":"y","datatype":"BYTES","shape":[1],"data":["{{\"label\":\"{l}\",\"score\":0.5}}"]}}]}}"#
            )
        };
        assert_eq!(cmp(&bytes_out("a"), &bytes_out("a")), Agreement::Agree);
        assert_eq!(cmp(&bytes_out("a"), &bytes_out("b")), Agreement::Disagree);
    }
}
