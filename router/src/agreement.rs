//! Whether a shadow backend's answer agrees with the primary's, row by row.
//!
//! Both answers are decoded as what they are, not compared as bytes:
//! - Open Inference Protocol answers, JSON or with the binary tensor extension
//!   (`Inference-Header-Content-Length`), are compared on one output: the one named in
//!   `mirror.compare.output`, else the first floating-point output with two or more values per
//!   row (by argmax), else the first output (by exact equality);
//! - post-processed answers (an image's `{"label", ...}`, V1 `predictions` with labels) by
//!   label;
//! - V1 `predictions` of plain values as a tensor per output, as above;
//! - gRPC `ModelInferResponse`s (`application/grpc`) as the Open Inference Protocol answers they
//!   are, from `raw_output_contents` or typed contents.
//!
//! A pair that cannot be compared (an answer that does not decode, different outputs or row
//! counts) is an [`Unreadable`] with a reason, never a disagreement.

use serde_json::{Map, Value};
use serval_api::{MirrorCompare, MirrorCompareMode};

/// Header giving the length of the JSON part of an answer with binary outputs.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// One side's answer as captured: its content type, its JSON part's length when binary
/// outputs follow, and the body.
#[derive(Clone, Copy, Debug)]
pub struct Answer<'a> {
    /// `Content-Type`.
    pub content_type: Option<&'a str>,
    /// `Inference-Header-Content-Length`.
    pub header_length: Option<usize>,
    /// The whole body.
    pub body: &'a [u8],
}

/// Rows compared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rows {
    /// Rows with the same decision.
    pub agree: u64,
    /// Rows with different decisions.
    pub disagree: u64,
}

/// Why two answers could not be compared: the metric's reason and a message for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable {
    /// `primary_unreadable`, `shadow_unreadable` or `mismatch`.
    pub reason: &'static str,
    /// What was wrong.
    pub message: String,
}

impl Unreadable {
    fn side(primary: bool, message: String) -> Self {
        Self {
            reason: if primary {
                "primary_unreadable"
            } else {
                "shadow_unreadable"
            },
            message,
        }
    }

    fn mismatch(message: String) -> Self {
        Self {
            reason: "mismatch",
            message,
        }
    }
}

/// Compares two answers row by row.
pub fn compare(
    spec: &MirrorCompare,
    primary: &Answer<'_>,
    shadow: &Answer<'_>,
) -> Result<Rows, Unreadable> {
    let p = decode(primary).map_err(|m| Unreadable::side(true, m))?;
    let s = decode(shadow).map_err(|m| Unreadable::side(false, m))?;
    match (p, s) {
        (Decoded::Labels(a), Decoded::Labels(b)) => {
            same_rows(a.len(), b.len())?;
            Ok(count(a.iter().zip(&b).map(|(x, y)| x == y)))
        }
        (Decoded::Tensors(a), Decoded::Tensors(b)) => compare_tensors(spec, &a, &b),
        _ => Err(Unreadable::mismatch(
            "one answer is labelled and the other is a tensor".to_owned(),
        )),
    }
}

fn count(rows: impl Iterator<Item = bool>) -> Rows {
    let mut out = Rows::default();
    for same in rows {
        if same {
            out.agree += 1;
        } else {
            out.disagree += 1;
        }
    }
    out
}

fn same_rows(a: usize, b: usize) -> Result<(), Unreadable> {
    if a == b {
        Ok(())
    } else {
        Err(Unreadable::mismatch(format!(
            "the primary answered {a} rows and the shadow {b}"
        )))
    }
}

/// What an answer decided, decoded.
#[derive(Debug)]
enum Decoded {
    /// One label per row.
    Labels(Vec<Value>),
    /// Output tensors.
    Tensors(Vec<Tensor>),
}

#[derive(Debug)]
struct Tensor {
    name: String,
    float: bool,
    shape: Vec<usize>,
    data: Data,
}

#[derive(Debug)]
enum Data {
    Numbers(Vec<f64>),
    Values(Vec<Value>),
}

impl Tensor {
    fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    fn row_size(&self) -> usize {
        if self.shape.is_empty() {
            1
        } else {
            self.shape[1..].iter().product()
        }
    }

    fn len(&self) -> usize {
        match &self.data {
            Data::Numbers(v) => v.len(),
            Data::Values(v) => v.len(),
        }
    }
}

fn decode(answer: &Answer<'_>) -> Result<Decoded, String> {
    if answer
        .content_type
        .is_some_and(|c| c.starts_with("application/grpc"))
    {
        return grpc(answer.body).map(Decoded::Tensors);
    }
    let (json, binary) = match answer.header_length {
        Some(n) if n <= answer.body.len() => answer.body.split_at(n),
        Some(n) => {
            return Err(format!(
                "{HEADER_LENGTH} {n} is past the body's {} bytes",
                answer.body.len()
            ));
        }
        None => (answer.body, &[][..]),
    };
    let value: Value = serde_json::from_slice(json).map_err(|e| {
        let kind = answer.content_type.unwrap_or("no content type");
        format!("not JSON ({kind}): {e}")
    })?;
    decode_value(&value, binary)
}

/// [`decode`] of an answer's JSON part, already parsed, and the binary outputs after it.
fn decode_value(value: &Value, binary: &[u8]) -> Result<Decoded, String> {
    if let Some(outputs) = value.get("outputs") {
        return oip(outputs, binary).map(Decoded::Tensors);
    }
    if let Some(predictions) = value.get("predictions") {
        return v1(predictions);
    }
    match value.get("label") {
        Some(label) => Ok(Decoded::Labels(vec![label.clone()])),
        None => Err("neither outputs, predictions nor a label".to_owned()),
    }
}

/// Each output's bytes of the binary tensor extension, in order after the JSON part: `None`
/// for an output given as JSON `data`.
pub fn binary_slices<'a>(
    outputs: &[Value],
    binary: &'a [u8],
) -> Result<Vec<Option<&'a [u8]>>, String> {
    let mut rest = binary;
    let mut slices = Vec::with_capacity(outputs.len());
    for o in outputs {
        let slice = match o.pointer("/parameters/binary_data_size") {
            Some(size) => {
                let name = o["name"].as_str().unwrap_or_default();
                let size = size
                    .as_u64()
                    .and_then(|s| usize::try_from(s).ok())
                    .filter(|s| *s <= rest.len())
                    .ok_or_else(|| format!("output {name:?}: binary_data_size past the body"))?;
                let (bytes, after) = rest.split_at(size);
                rest = after;
                Some(bytes)
            }
            None => None,
        };
        slices.push(slice);
    }
    Ok(slices)
}

fn oip(outputs: &Value, binary: &[u8]) -> Result<Vec<Tensor>, String> {
    let outputs = outputs.as_array().ok_or("outputs is not a list")?;
    let slices = binary_slices(outputs, binary)?;
    let mut tensors = Vec::with_capacity(outputs.len());
    for (o, slice) in outputs.iter().zip(slices) {
        let name = o["name"].as_str().unwrap_or_default().to_owned();
        let datatype = o["datatype"].as_str().unwrap_or_default();
        let shape: Vec<usize> = o["shape"]
            .as_array()
            .ok_or_else(|| format!("output {name:?} has no shape"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| format!("output {name:?} has a bad shape"))?;
        let data = match slice {
            Some(bytes) => {
                decode_binary(datatype, bytes).map_err(|e| format!("output {name:?}: {e}"))?
            }
            None => json_data(&o["data"]).ok_or_else(|| format!("output {name:?} has no data"))?,
        };
        let t = Tensor {
            float: matches!(datatype, "FP16" | "BF16" | "FP32" | "FP64"),
            name,
            shape,
            data,
        };
        check_len(&t)?;
        tensors.push(t);
    }
    Ok(tensors)
}

/// The outputs of a unary gRPC answer: one length-prefixed, uncompressed `ModelInferResponse`.
fn grpc(body: &[u8]) -> Result<Vec<Tensor>, String> {
    use prost::Message;
    let msg = crate::grpc::unframe(body, "answer")?;
    let answer = serval_proto::ModelInferResponse::decode(msg).map_err(|e| e.to_string())?;
    let raw = &answer.raw_output_contents;
    if !raw.is_empty() && raw.len() != answer.outputs.len() {
        return Err(format!(
            "{} outputs with {} raw contents",
            answer.outputs.len(),
            raw.len()
        ));
    }
    let mut tensors = Vec::with_capacity(answer.outputs.len());
    for (i, o) in answer.outputs.into_iter().enumerate() {
        let name = o.name;
        let shape = o
            .shape
            .iter()
            .map(|&d| usize::try_from(d).ok())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| format!("output {name:?} has a bad shape"))?;
        let data = match raw.get(i) {
            Some(bytes) => {
                decode_binary(&o.datatype, bytes).map_err(|e| format!("output {name:?}: {e}"))?
            }
            None => typed(o.contents.unwrap_or_default()),
        };
        let t = Tensor {
            float: matches!(o.datatype.as_str(), "FP16" | "BF16" | "FP32" | "FP64"),
            name,
            shape,
            data,
        };
        check_len(&t)?;
        tensors.push(t);
    }
    Ok(tensors)
}

/// Typed gRPC contents: whichever list is filled (a tensor fills one).
fn typed(c: serval_proto::InferTensorContents) -> Data {
    fn numbers<T: Copy>(v: &[T], f: impl Fn(T) -> f64) -> Option<Data> {
        (!v.is_empty()).then(|| Data::Numbers(v.iter().map(|&x| f(x)).collect()))
    }
    if !c.bytes_contents.is_empty() {
        return Data::Values(
            c.bytes_contents
                .iter()
                .map(|b| Value::String(String::from_utf8_lossy(b).into_owned()))
                .collect(),
        );
    }
    numbers(&c.fp32_contents, f64::from)
        .or_else(|| numbers(&c.fp64_contents, |x| x))
        .or_else(|| numbers(&c.int_contents, f64::from))
        .or_else(|| numbers(&c.int64_contents, |x| x as f64))
        .or_else(|| numbers(&c.uint_contents, f64::from))
        .or_else(|| numbers(&c.uint64_contents, |x| x as f64))
        .or_else(|| numbers(&c.bool_contents, |x| f64::from(u8::from(x))))
        .unwrap_or(Data::Numbers(Vec::new()))
}

fn check_len(t: &Tensor) -> Result<(), String> {
    if t.len() == t.shape.iter().product::<usize>() {
        Ok(())
    } else {
        Err(format!(
            "output {:?} has {} values for shape {:?}",
            t.name,
            t.len(),
            t.shape
        ))
    }
}

/// A JSON `data` list, flattened (tritonclient and some servers nest it by shape).
fn json_data(v: &Value) -> Option<Data> {
    fn flatten(v: &Value, out: &mut Vec<Value>) {
        match v {
            Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
            other => out.push(other.clone()),
        }
    }
    if !v.is_array() {
        return None;
    }
    let mut values = Vec::new();
    flatten(v, &mut values);
    let numbers: Option<Vec<f64>> = values.iter().map(Value::as_f64).collect();
    Some(match numbers {
        Some(n) => Data::Numbers(n),
        None => Data::Values(values),
    })
}

/// Little-endian tensor bytes as the binary extension lays them out.
fn decode_binary(datatype: &str, bytes: &[u8]) -> Result<Data, String> {
    fn fixed<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> f64) -> Result<Data, String> {
        if !bytes.len().is_multiple_of(N) {
            return Err(format!("{} bytes is not a multiple of {N}", bytes.len()));
        }
        Ok(Data::Numbers(
            bytes
                .chunks_exact(N)
                .map(|c| f(c.try_into().unwrap_or([0; N])))
                .collect(),
        ))
    }
    match datatype {
        "BOOL" | "UINT8" => fixed::<1>(bytes, |b| f64::from(b[0])),
        "INT8" => fixed::<1>(bytes, |b| f64::from(i8::from_le_bytes(b))),
        "UINT16" => fixed::<2>(bytes, |b| f64::from(u16::from_le_bytes(b))),
        "INT16" => fixed::<2>(bytes, |b| f64::from(i16::from_le_bytes(b))),
        "FP16" => fixed::<2>(bytes, |b| f64::from(half::f16::from_le_bytes(b))),
        "BF16" => fixed::<2>(bytes, |b| f64::from(half::bf16::from_le_bytes(b))),
        "UINT32" => fixed::<4>(bytes, |b| f64::from(u32::from_le_bytes(b))),
        "INT32" => fixed::<4>(bytes, |b| f64::from(i32::from_le_bytes(b))),
        "FP32" => fixed::<4>(bytes, |b| f64::from(f32::from_le_bytes(b))),
        // Compared by value; 64-bit integers past 2^53 lose their low bits, which no class index
        // or count reaches.
        "UINT64" => fixed::<8>(bytes, |b| u64::from_le_bytes(b) as f64),
        "INT64" => fixed::<8>(bytes, |b| i64::from_le_bytes(b) as f64),
        "FP64" => fixed::<8>(bytes, f64::from_le_bytes),
        "BYTES" => {
            let mut values = Vec::new();
            let mut rest = bytes;
            while !rest.is_empty() {
                let (len, after) = rest
                    .split_first_chunk::<4>()
                    .ok_or("a BYTES element is cut short")?;
                let len = usize::try_from(u32::from_le_bytes(*len)).unwrap_or(usize::MAX);
                if len > after.len() {
                    return Err("a BYTES element is cut short".to_owned());
                }
                let (element, after) = after.split_at(len);
                values.push(Value::String(String::from_utf8_lossy(element).into_owned()));
                rest = after;
            }
            Ok(Data::Values(values))
        }
        other => Err(format!("unknown datatype {other:?}")),
    }
}

/// V1 `predictions`: labels when every row has one, else one tensor per output.
fn v1(predictions: &Value) -> Result<Decoded, String> {
    let rows = predictions.as_array().ok_or("predictions is not a list")?;
    // A post-processed row is `{"label", "index", "score", ...}`; a model output that happens to
    // be named `label` (digits.onnx's class ids) sits beside its other outputs instead.
    let labels: Option<Vec<Value>> = rows
        .iter()
        .map(|r| r.get("score").and(r.get("label")).cloned())
        .collect();
    if let Some(labels) = labels.filter(|l| !l.is_empty()) {
        return Ok(Decoded::Labels(labels));
    }
    // Several outputs answer an object per row, keyed by output name.
    let mut columns: Vec<(String, Vec<&Value>)> = Vec::new();
    match rows.first() {
        Some(Value::Object(first)) => {
            for name in first.keys() {
                let column = rows
                    .iter()
                    .map(|r| r.as_object().and_then(|o: &Map<String, Value>| o.get(name)))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| format!("a row lacks output {name:?}"))?;
                columns.push((name.clone(), column));
            }
        }
        _ => columns.push((String::new(), rows.iter().collect())),
    }
    let mut tensors = Vec::with_capacity(columns.len());
    for (name, column) in columns {
        let mut row_size = None;
        let mut data = Vec::new();
        for row in column {
            // A row is one value or a (nested) list of them.
            let flat =
                json_data(&Value::Array(vec![row.clone()])).unwrap_or(Data::Values(Vec::new()));
            let n = match &flat {
                Data::Numbers(v) => v.len(),
                Data::Values(v) => v.len(),
            };
            if *row_size.get_or_insert(n) != n {
                return Err(format!("ragged rows in output {name:?}"));
            }
            data.push(flat);
        }
        let rows = data.len();
        let size = row_size.unwrap_or(0);
        let numbers: Option<Vec<f64>> = data
            .iter()
            .map(|d| match d {
                Data::Numbers(v) => Some(v.clone()),
                Data::Values(_) => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat());
        let (float, data) = match numbers {
            Some(n) => (true, Data::Numbers(n)),
            None => (
                false,
                Data::Values(
                    data.into_iter()
                        .flat_map(|d| match d {
                            Data::Values(v) => v,
                            Data::Numbers(v) => v.into_iter().map(Value::from).collect(),
                        })
                        .collect(),
                ),
            ),
        };
        tensors.push(Tensor {
            name,
            float,
            shape: vec![rows, size],
            data,
        });
    }
    Ok(Decoded::Tensors(tensors))
}

/// Each row's confidence in an answer, for a cascade: the largest value of `output` in the row
/// (an Open Inference Protocol answer, JSON or binary, or V1 predictions), or the `score` of a
/// post-processed answer (an image's `{"label", "score"}`, V1 rows with labels). `value` is the
/// answer's JSON part, `binary` the binary outputs after it (empty without them).
pub fn confidences(value: &Value, binary: &[u8], output: &str) -> Result<Vec<f64>, String> {
    if let Some(score) = value.get("score").and_then(Value::as_f64) {
        return Ok(vec![score]);
    }
    if let Some(rows) = value.get("predictions").and_then(Value::as_array) {
        let scores: Option<Vec<f64>> = rows
            .iter()
            .map(|r| r.get("score").and_then(Value::as_f64))
            .collect();
        if let Some(scores) = scores.filter(|s| !s.is_empty()) {
            return Ok(scores);
        }
    }
    let Decoded::Tensors(tensors) = decode_value(value, binary)? else {
        return Err("the answer has labels but no score".to_owned());
    };
    let t = tensors
        .iter()
        .find(|t| t.name == output || (tensors.len() == 1 && t.name.is_empty()))
        .ok_or_else(|| format!("the answer has no output {output:?}"))?;
    let Data::Numbers(values) = &t.data else {
        return Err(format!("output {output:?} is not numeric"));
    };
    let size = t.row_size().max(1);
    Ok(values
        .chunks(size)
        .take(t.rows())
        .map(|row| row.iter().copied().fold(f64::NEG_INFINITY, f64::max))
        .collect())
}

/// What an answer says per row, for an ensemble to reduce.
#[derive(Debug, Clone, PartialEq)]
pub enum RowValues {
    /// The output's values, `rows` × `size`, row-major.
    Tensor {
        /// Rows.
        rows: usize,
        /// Values per row.
        size: usize,
        /// The values.
        values: Vec<f64>,
    },
    /// A post-processed answer: each row's label and score.
    Labels(Vec<(Value, f64)>),
}

/// The rows of `output` in an answer (JSON or binary Open Inference Protocol, V1 predictions),
/// or the label and score of each row of a post-processed one (an image's
/// `{"label", "score"}`, V1 rows with labels).
pub fn row_values(value: &Value, binary: &[u8], output: &str) -> Result<RowValues, String> {
    let scored = |r: &Value| Some((r.get("label")?.clone(), r.get("score")?.as_f64()?));
    if value.get("label").is_some() {
        return scored(value)
            .map(|l| RowValues::Labels(vec![l]))
            .ok_or_else(|| "a label without a score".to_owned());
    }
    if let Some(rows) = value.get("predictions").and_then(Value::as_array)
        && let Some(labels) = rows.iter().map(scored).collect::<Option<Vec<_>>>()
        && !labels.is_empty()
    {
        return Ok(RowValues::Labels(labels));
    }
    let Decoded::Tensors(tensors) = decode_value(value, binary)? else {
        return Err("the answer has labels but no score".to_owned());
    };
    let t = tensors
        .into_iter()
        .find(|t| t.name == output || t.name.is_empty())
        .ok_or_else(|| format!("the answer has no output {output:?}"))?;
    let (rows, size) = (t.rows(), t.row_size());
    match t.data {
        Data::Numbers(values) => Ok(RowValues::Tensor { rows, size, values }),
        Data::Values(_) => Err(format!("output {output:?} is not numeric")),
    }
}

fn compare_tensors(spec: &MirrorCompare, a: &[Tensor], b: &[Tensor]) -> Result<Rows, Unreadable> {
    let chosen = match &spec.output {
        Some(name) => a
            .iter()
            .find(|t| &t.name == name)
            .ok_or_else(|| Unreadable::side(true, format!("no output {name:?}")))?,
        None => a
            .iter()
            .find(|t| t.float && t.row_size() >= 2)
            .or_else(|| a.first())
            .ok_or_else(|| Unreadable::side(true, "no outputs".to_owned()))?,
    };
    let other = b
        .iter()
        .find(|t| t.name == chosen.name)
        .ok_or_else(|| Unreadable::side(false, format!("no output {:?}", chosen.name)))?;
    same_rows(chosen.rows(), other.rows())?;
    let size = chosen.row_size();
    if other.row_size() != size {
        return Err(Unreadable::mismatch(format!(
            "output {:?}: {size} values per row from the primary, {} from the shadow",
            chosen.name,
            other.row_size()
        )));
    }
    let mode = spec.mode.unwrap_or(if chosen.float && size >= 2 {
        MirrorCompareMode::Argmax
    } else {
        MirrorCompareMode::Exact
    });
    let tolerance = spec.tolerance.unwrap_or(0.0);
    let rows = chosen.rows();
    let same = |i: usize| -> bool {
        let range = i * size..(i + 1) * size;
        match (&chosen.data, &other.data) {
            (Data::Numbers(x), Data::Numbers(y)) => {
                let (x, y) = (&x[range.clone()], &y[range]);
                match mode {
                    MirrorCompareMode::Argmax => argmax(x) == argmax(y),
                    MirrorCompareMode::Close => {
                        x.iter().zip(y).all(|(p, s)| (p - s).abs() <= tolerance)
                    }
                    MirrorCompareMode::Exact => x == y,
                }
            }
            (Data::Values(x), Data::Values(y)) => {
                let (x, y) = (&x[range.clone()], &y[range]);
                x.iter()
                    .zip(y)
                    .all(|(p, s)| decision_of(p) == decision_of(s))
            }
            _ => false,
        }
    };
    Ok(count((0..rows).map(same)))
}

/// A BYTES element holding a post-processed JSON answer decides by its label.
fn decision_of(v: &Value) -> Value {
    v.as_str()
        .and_then(|s| serde_json::from_str::<Value>(s).ok())
        .and_then(|j| j.get("label").cloned())
        .unwrap_or_else(|| v.clone())
}

/// Index of the largest value; the first on ties; `None` for an empty row.
fn argmax(row: &[f64]) -> Option<usize> {
    row.iter()
        .enumerate()
        .fold(None, |best: Option<(usize, f64)>, (i, &x)| match best {
            Some((_, b)) if b >= x || x.is_nan() => best,
            _ => Some((i, x)),
        })
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn json_answer(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap_or_default()
    }

    fn cmp(spec: &MirrorCompare, p: &[u8], s: &[u8]) -> Result<Rows, Unreadable> {
        let a = |body| Answer {
            content_type: Some("application/json"),
            header_length: None,
            body,
        };
        compare(spec, &a(p), &a(s))
    }

    fn rows(agree: u64, disagree: u64) -> Result<Rows, Unreadable> {
        Ok(Rows { agree, disagree })
    }

    /// The digits model's answer: `label` (INT64, [N]) first, then `probabilities` ([N,10]).
    fn digits(model: &str, labels: &[usize]) -> Value {
        let probs: Vec<f32> = labels
            .iter()
            .flat_map(|&l| (0..10).map(move |i| if i == l { 0.9 } else { 0.01 }))
            .collect();
        json!({
            "model_name": model,
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [labels.len()], "data": vec![0_i64; labels.len()]},
                {"name": "probabilities", "datatype": "FP32", "shape": [labels.len(), 10], "data": probs},
            ]
        })
    }

    #[test]
    fn oip_json_is_compared_on_the_first_float_output_with_classes_per_row() {
        // The `label` output is constant here (a model that only sets it to 0, as the bug
        // report's comparison read it): the probabilities decide.
        let d = MirrorCompare::default();
        let p = json_answer(&digits("v1", &[3, 7, 9]));
        let s = json_answer(&digits("v2", &[3, 1, 9]));
        assert_eq!(cmp(&d, &p, &s), rows(2, 1));
        assert_eq!(cmp(&d, &p, &p), rows(3, 0));
        // Declared: the label output, compared exactly (all zeros here: all agree).
        let on_label = MirrorCompare {
            output: Some("label".to_owned()),
            ..MirrorCompare::default()
        };
        assert_eq!(cmp(&on_label, &p, &s), rows(3, 0));
        let missing = MirrorCompare {
            output: Some("logits".to_owned()),
            ..MirrorCompare::default()
        };
        assert_eq!(
            cmp(&missing, &p, &s).map_err(|u| u.reason),
            Err("primary_unreadable")
        );
    }

    #[test]
    fn close_mode_compares_values_within_the_tolerance() {
        let out = |v: [f64; 2]| {
            json_answer(
                &json!({"outputs": [{"name": "y", "datatype": "FP64", "shape": [1, 2], "data": v}]}),
            )
        };
        let close = |tolerance| MirrorCompare {
            mode: Some(MirrorCompareMode::Close),
            tolerance: Some(tolerance),
            ..MirrorCompare::default()
        };
        let (p, s) = (out([1.0, 2.0]), out([1.05, 2.0]));
        assert_eq!(cmp(&close(0.1), &p, &s), rows(1, 0));
        assert_eq!(cmp(&close(0.01), &p, &s), rows(0, 1));
        // Argmax would call these the same.
        assert_eq!(cmp(&MirrorCompare::default(), &p, &s), rows(1, 0));
    }

    /// tritonclient's binary outputs: the JSON part, then raw little-endian tensors.
    fn binary(labels: &[usize]) -> (Vec<u8>, usize) {
        let probs: Vec<f32> = labels
            .iter()
            .flat_map(|&l| (0..10).map(move |i| if i == l { 0.5 } else { 0.05 }))
            .collect();
        let ids: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
        let head = json_answer(&json!({
            "model_name": "m",
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [labels.len()], "parameters": {"binary_data_size": ids.len() * 8}},
                {"name": "probabilities", "datatype": "FP32", "shape": [labels.len(), 10], "parameters": {"binary_data_size": probs.len() * 4}},
            ]
        }));
        let mut body = head.clone();
        body.extend(ids.iter().flat_map(|v| v.to_le_bytes()));
        body.extend(probs.iter().flat_map(|v| v.to_le_bytes()));
        (body, head.len())
    }

    #[test]
    fn oip_binary_answers_are_decoded_not_compared_as_bytes() {
        let (p, p_len) = binary(&[9, 4]);
        let (s, s_len) = binary(&[9, 5]);
        fn bin(body: &[u8], n: usize) -> Answer<'_> {
            Answer {
                content_type: Some("application/octet-stream"),
                header_length: Some(n),
                body,
            }
        }
        let d = MirrorCompare::default();
        assert_eq!(compare(&d, &bin(&p, p_len), &bin(&s, s_len)), rows(1, 1));
        // Against the same model answering in JSON with other probabilities: same classes.
        let json = json_answer(&digits("v2", &[9, 4]));
        let j = Answer {
            content_type: Some("application/json"),
            header_length: None,
            body: &json,
        };
        assert_eq!(compare(&d, &bin(&p, p_len), &j), rows(2, 0));
        // The class ids compared exactly, from INT64 bytes.
        let ids = MirrorCompare {
            output: Some("label".to_owned()),
            ..MirrorCompare::default()
        };
        assert_eq!(compare(&ids, &bin(&p, p_len), &bin(&s, s_len)), rows(1, 1));
        // A header length past the body is unreadable, not a disagreement.
        assert_eq!(
            compare(&d, &bin(&p, p.len() + 1), &bin(&s, s_len)).map_err(|u| u.reason),
            Err("primary_unreadable")
        );
    }

    /// A framed `ModelInferResponse` of the digits model: raw contents (as the sidecar and
    /// Triton answer) or typed ones.
    fn grpc_answer(labels: &[usize], raw: bool) -> Vec<u8> {
        use prost::Message;
        use serval_proto::model_infer_response::InferOutputTensor;
        let probs: Vec<f32> = labels
            .iter()
            .flat_map(|&l| (0..10).map(move |i| if i == l { 0.7 } else { 0.02 }))
            .collect();
        let ids: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
        let n = labels.len() as i64;
        let mut label = InferOutputTensor {
            name: "label".into(),
            datatype: "INT64".into(),
            shape: vec![n],
            ..Default::default()
        };
        let mut p = InferOutputTensor {
            name: "probabilities".into(),
            datatype: "FP32".into(),
            shape: vec![n, 10],
            ..Default::default()
        };
        let mut msg = serval_proto::ModelInferResponse::default();
        if raw {
            msg.raw_output_contents = vec![
                ids.iter().flat_map(|v| v.to_le_bytes()).collect(),
                probs.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ];
        } else {
            label.contents = Some(serval_proto::InferTensorContents {
                int64_contents: ids,
                ..Default::default()
            });
            p.contents = Some(serval_proto::InferTensorContents {
                fp32_contents: probs,
                ..Default::default()
            });
        }
        msg.outputs = vec![label, p];
        let body = msg.encode_to_vec();
        let mut out = vec![0];
        out.extend((body.len() as u32).to_be_bytes());
        out.extend(body);
        out
    }

    #[test]
    fn grpc_answers_are_decoded_from_raw_or_typed_contents() {
        let g = |body| Answer {
            content_type: Some("application/grpc"),
            header_length: None,
            body,
        };
        let d = MirrorCompare::default();
        let (p, s) = (grpc_answer(&[3, 7, 9], true), grpc_answer(&[3, 1, 9], true));
        assert_eq!(compare(&d, &g(&p), &g(&s)), rows(2, 1));
        let typed = grpc_answer(&[3, 1, 8], false);
        assert_eq!(compare(&d, &g(&p), &g(&typed)), rows(1, 2));
        // The class ids, exactly, from INT64 contents.
        let ids = MirrorCompare {
            output: Some("label".to_owned()),
            ..MirrorCompare::default()
        };
        assert_eq!(compare(&ids, &g(&p), &g(&typed)), rows(1, 2));
        // Against the same classes answered in REST JSON.
        let json = json_answer(&digits("v2", &[3, 7, 9]));
        let j = Answer {
            content_type: Some("application/json"),
            header_length: None,
            body: &json,
        };
        assert_eq!(compare(&d, &g(&p), &j), rows(3, 0));
        // A cut frame, a compressed one and an empty one are unreadable, never a disagreement.
        for bad in [&p[..p.len() - 1], &[1, 0, 0, 0, 0][..], &[][..]] {
            assert_eq!(
                compare(&d, &g(&p), &g(bad)).map_err(|u| u.reason),
                Err("shadow_unreadable")
            );
        }
    }

    #[test]
    fn labelled_answers_are_compared_by_label_per_row() {
        let d = MirrorCompare::default();
        let image =
            |l: &str, score: f64| json_answer(&json!({"label": l, "index": 7, "score": score}));
        assert_eq!(
            cmp(&d, &image("seven", 0.9), &image("seven", 0.6)),
            rows(1, 0)
        );
        assert_eq!(
            cmp(&d, &image("seven", 0.9), &image("one", 0.9)),
            rows(0, 1)
        );
        let v1 = |ls: &[&str]| {
            json_answer(
                &json!({"predictions": ls.iter().map(|l| json!({"label": l, "score": 0.5})).collect::<Vec<_>>()}),
            )
        };
        assert_eq!(
            cmp(&d, &v1(&["a", "b", "c"]), &v1(&["a", "x", "c"])),
            rows(2, 1)
        );
        assert_eq!(
            cmp(&d, &v1(&["a", "b"]), &v1(&["a"])).map_err(|u| u.reason),
            Err("mismatch")
        );
    }

    #[test]
    fn v1_values_are_compared_per_row_on_the_chosen_output() {
        let d = MirrorCompare::default();
        let p = json_answer(&json!({"predictions": [[0.1, 0.7, 0.2], [0.9, 0.05, 0.05]]}));
        let s = json_answer(&json!({"predictions": [[0.2, 0.5, 0.3], [0.1, 0.05, 0.85]]}));
        assert_eq!(cmp(&d, &p, &s), rows(1, 1));
        // Several outputs: an object per row; the float output with classes decides.
        let multi = |cls: [usize; 2]| {
            json_answer(&json!({"predictions": cls.iter().map(|&c| json!({
                "label": 0,
                "probabilities": (0..3).map(|i| if i == c { 0.8 } else { 0.1 }).collect::<Vec<_>>(),
            })).collect::<Vec<_>>()}))
        };
        // `label` is a number here, so these rows are not "labelled answers" but outputs.
        let on_probs = MirrorCompare {
            output: Some("probabilities".to_owned()),
            ..MirrorCompare::default()
        };
        assert_eq!(cmp(&on_probs, &multi([1, 2]), &multi([1, 0])), rows(1, 1));
    }

    #[test]
    fn integer_outputs_are_compared_exactly_and_bytes_by_label() {
        let d = MirrorCompare::default();
        let ints = |v: [i64; 3]| {
            json_answer(
                &json!({"outputs": [{"name": "class", "datatype": "INT64", "shape": [3], "data": v}]}),
            )
        };
        assert_eq!(cmp(&d, &ints([1, 2, 3]), &ints([1, 2, 4])), rows(2, 1));
        let bytes = |l: &str| {
            json_answer(
                &json!({"outputs": [{"name": "y", "datatype": "BYTES", "shape": [1],
                "data": [format!(r#"{{"label":"{l}","score":0.5}}"#)]}]}),
            )
        };
        assert_eq!(cmp(&d, &bytes("a"), &bytes("a")), rows(1, 0));
        assert_eq!(cmp(&d, &bytes("a"), &bytes("b")), rows(0, 1));
    }

    #[test]
    fn answers_that_cannot_be_compared_are_not_disagreements() {
        let d = MirrorCompare::default();
        let ok = json_answer(&digits("v1", &[1]));
        let reason = |p: &[u8], s: &[u8]| cmp(&d, p, s).map_err(|u| u.reason);
        assert_eq!(reason(b"plain text", &ok), Err("primary_unreadable"));
        assert_eq!(reason(&ok, b"{\"error\":\"x\"}"), Err("shadow_unreadable"));
        assert_eq!(
            reason(&ok, &json_answer(&json!({"label": "one"}))),
            Err("mismatch")
        );
        assert_eq!(
            reason(&ok, &json_answer(&digits("v2", &[1, 2]))),
            Err("mismatch")
        );
    }
}
