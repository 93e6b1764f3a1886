//! Tensors on the wire: Open Inference Protocol datatype names, JSON data and the binary tensor
//! extension's little-endian layout (BYTES elements carry a 4-byte length prefix).

use serde_json::Value;
use tract_onnx::prelude::tract_ndarray::{ArrayD, IxDyn};
use tract_onnx::prelude::{DatumType, Tensor, f16};

use crate::errors::{RequestError, RequestResult};

/// The protocol name of a tract element type.
pub fn datatype_name(dt: DatumType) -> &'static str {
    match dt {
        DatumType::Bool => "BOOL",
        DatumType::U8 => "UINT8",
        DatumType::U16 => "UINT16",
        DatumType::U32 => "UINT32",
        DatumType::U64 => "UINT64",
        DatumType::I8 => "INT8",
        DatumType::I16 => "INT16",
        DatumType::I32 => "INT32",
        DatumType::I64 | DatumType::TDim => "INT64",
        DatumType::F16 => "FP16",
        DatumType::F32 => "FP32",
        DatumType::F64 => "FP64",
        DatumType::String => "BYTES",
        _ => "UNSUPPORTED",
    }
}

/// The tract element type of a protocol datatype name.
pub fn parse_datatype(name: &str) -> RequestResult<DatumType> {
    Ok(match name {
        "BOOL" => DatumType::Bool,
        "UINT8" => DatumType::U8,
        "UINT16" => DatumType::U16,
        "UINT32" => DatumType::U32,
        "UINT64" => DatumType::U64,
        "INT8" => DatumType::I8,
        "INT16" => DatumType::I16,
        "INT32" => DatumType::I32,
        "INT64" => DatumType::I64,
        "FP16" => DatumType::F16,
        "FP32" => DatumType::F32,
        "FP64" => DatumType::F64,
        "BYTES" => DatumType::String,
        other => {
            return Err(RequestError::Malformed(format!(
                "unknown datatype {other:?}"
            )));
        }
    })
}

/// Element count of `shape`, refusing overflow.
pub fn element_count(shape: &[usize]) -> RequestResult<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| RequestError::Malformed(format!("shape {shape:?} has too many elements")))
}

fn malformed(what: &str, v: impl std::fmt::Display) -> RequestError {
    RequestError::Malformed(format!("{what}: {v}"))
}

/// Flattens nested JSON arrays (row-major) into their leaves.
pub fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|x| flatten(x, out)),
        leaf => out.push(leaf),
    }
}

macro_rules! from_json_ints {
    ($t:ty, $shape:expr, $leaves:expr) => {{
        let vals = $leaves
            .iter()
            .map(|v| {
                v.as_i64()
                    .and_then(|i| <$t>::try_from(i).ok())
                    .or_else(|| v.as_u64().and_then(|u| <$t>::try_from(u).ok()))
                    .ok_or_else(|| malformed(concat!("not a valid ", stringify!($t)), v))
            })
            .collect::<RequestResult<Vec<$t>>>()?;
        Tensor::from_shape($shape, &vals)
    }};
}

/// Builds a tensor from JSON `data` (flat or nested) of the given type and shape.
pub fn from_json(dt: DatumType, shape: &[usize], data: &Value) -> RequestResult<Tensor> {
    let mut leaves = Vec::new();
    flatten(data, &mut leaves);
    let expected = element_count(shape)?;
    if leaves.len() != expected {
        return Err(RequestError::Malformed(format!(
            "shape {shape:?} needs {expected} elements, data has {}",
            leaves.len()
        )));
    }
    let float = |v: &&Value| v.as_f64().ok_or_else(|| malformed("not a number", v));
    let t = match dt {
        DatumType::F32 => {
            let vals = leaves
                .iter()
                .map(|v| float(v).map(|f| f as f32))
                .collect::<RequestResult<Vec<_>>>()?;
            Tensor::from_shape(shape, &vals)
        }
        DatumType::F64 => {
            let vals = leaves
                .iter()
                .map(float)
                .collect::<RequestResult<Vec<_>>>()?;
            Tensor::from_shape(shape, &vals)
        }
        DatumType::F16 => {
            let vals = leaves
                .iter()
                .map(|v| float(v).map(f16::from_f64))
                .collect::<RequestResult<Vec<_>>>()?;
            Tensor::from_shape(shape, &vals)
        }
        DatumType::Bool => {
            let vals = leaves
                .iter()
                .map(|v| v.as_bool().ok_or_else(|| malformed("not a boolean", v)))
                .collect::<RequestResult<Vec<_>>>()?;
            Tensor::from_shape(shape, &vals)
        }
        DatumType::U8 => from_json_ints!(u8, shape, leaves),
        DatumType::U16 => from_json_ints!(u16, shape, leaves),
        DatumType::U32 => from_json_ints!(u32, shape, leaves),
        DatumType::U64 => from_json_ints!(u64, shape, leaves),
        DatumType::I8 => from_json_ints!(i8, shape, leaves),
        DatumType::I16 => from_json_ints!(i16, shape, leaves),
        DatumType::I32 => from_json_ints!(i32, shape, leaves),
        DatumType::I64 => from_json_ints!(i64, shape, leaves),
        DatumType::String => {
            let vals = leaves
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| malformed("not a string", v))
                })
                .collect::<RequestResult<Vec<_>>>()?;
            return strings(shape, vals);
        }
        other => {
            return Err(RequestError::Unprocessable(format!(
                "unsupported datatype {other:?}"
            )));
        }
    };
    t.map_err(|e| RequestError::Malformed(e.to_string()))
}

fn strings(shape: &[usize], vals: Vec<String>) -> RequestResult<Tensor> {
    ArrayD::from_shape_vec(IxDyn(shape), vals)
        .map(Tensor::from)
        .map_err(|e| RequestError::Malformed(e.to_string()))
}

macro_rules! from_le {
    ($t:ty, $shape:expr, $bytes:expr) => {{
        const SIZE: usize = std::mem::size_of::<$t>();
        let vals: Vec<$t> = $bytes
            .chunks_exact(SIZE)
            .map(|c| {
                let mut a = [0u8; SIZE];
                a.copy_from_slice(c);
                <$t>::from_le_bytes(a)
            })
            .collect();
        Tensor::from_shape($shape, &vals)
    }};
}

/// Builds a tensor from the binary tensor extension's raw bytes.
pub fn from_binary(dt: DatumType, shape: &[usize], bytes: &[u8]) -> RequestResult<Tensor> {
    let count = element_count(shape)?;
    if dt == DatumType::String {
        let mut vals = Vec::with_capacity(count);
        let mut rest = bytes;
        while !rest.is_empty() {
            let (len, tail) = rest
                .split_first_chunk::<4>()
                .ok_or_else(|| RequestError::Malformed("truncated BYTES element length".into()))?;
            let len = u32::from_le_bytes(*len) as usize;
            if tail.len() < len {
                return Err(RequestError::Malformed("truncated BYTES element".into()));
            }
            let s = std::str::from_utf8(&tail[..len])
                .map_err(|_| RequestError::Unprocessable("BYTES element is not UTF-8".into()))?;
            vals.push(s.to_owned());
            rest = &tail[len..];
        }
        if vals.len() != count {
            return Err(RequestError::Malformed(format!(
                "shape {shape:?} needs {count} BYTES elements, data has {}",
                vals.len()
            )));
        }
        return strings(shape, vals);
    }
    let size = match dt {
        DatumType::Bool | DatumType::U8 | DatumType::I8 => 1,
        DatumType::U16 | DatumType::I16 | DatumType::F16 => 2,
        DatumType::U32 | DatumType::I32 | DatumType::F32 => 4,
        DatumType::U64 | DatumType::I64 | DatumType::F64 => 8,
        other => {
            return Err(RequestError::Unprocessable(format!(
                "unsupported datatype {other:?}"
            )));
        }
    };
    let needed = count
        .checked_mul(size)
        .ok_or_else(|| RequestError::Malformed("shape too large".into()))?;
    if bytes.len() != needed {
        return Err(RequestError::Malformed(format!(
            "shape {shape:?} of {} needs {needed} bytes, got {}",
            datatype_name(dt),
            bytes.len()
        )));
    }
    let t = match dt {
        DatumType::Bool => {
            Tensor::from_shape(shape, &bytes.iter().map(|b| *b != 0).collect::<Vec<_>>())
        }
        DatumType::U8 => Tensor::from_shape(shape, bytes),
        DatumType::I8 => {
            Tensor::from_shape(shape, &bytes.iter().map(|b| *b as i8).collect::<Vec<_>>())
        }
        DatumType::U16 => from_le!(u16, shape, bytes),
        DatumType::I16 => from_le!(i16, shape, bytes),
        DatumType::F16 => {
            let vals: Vec<f16> = bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect();
            Tensor::from_shape(shape, &vals)
        }
        DatumType::U32 => from_le!(u32, shape, bytes),
        DatumType::I32 => from_le!(i32, shape, bytes),
        DatumType::F32 => from_le!(f32, shape, bytes),
        DatumType::U64 => from_le!(u64, shape, bytes),
        DatumType::I64 => from_le!(i64, shape, bytes),
        _ => from_le!(f64, shape, bytes),
    };
    t.map_err(|e| RequestError::Malformed(e.to_string()))
}

fn internal(e: impl std::fmt::Display) -> RequestError {
    RequestError::Inference(format!("cannot encode output: {e}"))
}

fn number(f: f64) -> Value {
    // JSON has no NaN or infinity; null is what other servers send for them.
    serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// The tensor's elements, flat and row-major, as JSON values.
pub fn to_json_values(t: &Tensor) -> RequestResult<Vec<Value>> {
    macro_rules! each {
        ($t:ty, $f:expr) => {
            t.to_plain_array_view::<$t>()
                .map_err(internal)?
                .iter()
                .map($f)
                .collect()
        };
    }
    Ok(match t.datum_type() {
        DatumType::F32 => each!(f32, |v| number(f64::from(*v))),
        DatumType::F64 => each!(f64, |v| number(*v)),
        DatumType::F16 => each!(f16, |v| number(v.to_f64())),
        DatumType::Bool => each!(bool, |v| Value::Bool(*v)),
        DatumType::U8 => each!(u8, |v| Value::from(*v)),
        DatumType::U16 => each!(u16, |v| Value::from(*v)),
        DatumType::U32 => each!(u32, |v| Value::from(*v)),
        DatumType::U64 => each!(u64, |v| Value::from(*v)),
        DatumType::I8 => each!(i8, |v| Value::from(*v)),
        DatumType::I16 => each!(i16, |v| Value::from(*v)),
        DatumType::I32 => each!(i32, |v| Value::from(*v)),
        DatumType::I64 => each!(i64, |v| Value::from(*v)),
        DatumType::String => each!(String, |v| Value::from(v.as_str())),
        other => return Err(internal(format!("unsupported output type {other:?}"))),
    })
}

/// The rows of `t` (axis 0) as nested JSON arrays following its shape.
pub fn to_json_rows(t: &Tensor) -> RequestResult<Vec<Value>> {
    let flat = to_json_values(t)?;
    let shape = t.shape();
    let rows = shape.first().copied().unwrap_or(1);
    let row_shape = if shape.is_empty() {
        &[][..]
    } else {
        &shape[1..]
    };
    let per_row = element_count(row_shape)?;
    let mut it = flat.into_iter();
    Ok((0..rows)
        .map(|_| nest(&mut it, row_shape, per_row))
        .collect())
}

fn nest(it: &mut impl Iterator<Item = Value>, shape: &[usize], _count: usize) -> Value {
    match shape.split_first() {
        None => it.next().unwrap_or(Value::Null),
        Some((d, rest)) => Value::Array((0..*d).map(|_| nest(it, rest, 0)).collect()),
    }
}

macro_rules! le_bytes {
    ($t:ty, $tensor:expr, $out:expr) => {{
        for v in $tensor
            .to_plain_array_view::<$t>()
            .map_err(internal)?
            .iter()
        {
            $out.extend_from_slice(&v.to_le_bytes());
        }
    }};
}

/// The tensor in the binary tensor extension's layout.
pub fn to_binary(t: &Tensor) -> RequestResult<Vec<u8>> {
    let mut out = Vec::with_capacity(t.len() * t.datum_type().size_of());
    match t.datum_type() {
        DatumType::Bool => out.extend(
            t.to_plain_array_view::<bool>()
                .map_err(internal)?
                .iter()
                .map(|b| u8::from(*b)),
        ),
        DatumType::U8 => le_bytes!(u8, t, out),
        DatumType::I8 => le_bytes!(i8, t, out),
        DatumType::U16 => le_bytes!(u16, t, out),
        DatumType::I16 => le_bytes!(i16, t, out),
        DatumType::F16 => le_bytes!(f16, t, out),
        DatumType::U32 => le_bytes!(u32, t, out),
        DatumType::I32 => le_bytes!(i32, t, out),
        DatumType::F32 => le_bytes!(f32, t, out),
        DatumType::U64 => le_bytes!(u64, t, out),
        DatumType::I64 => le_bytes!(i64, t, out),
        DatumType::F64 => le_bytes!(f64, t, out),
        DatumType::String => {
            for s in t.to_plain_array_view::<String>().map_err(internal)?.iter() {
                let len = u32::try_from(s.len()).map_err(internal)?;
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
        }
        other => return Err(internal(format!("unsupported output type {other:?}"))),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_and_binary_round_trip_every_datatype() {
        let cases = [
            ("BOOL", json!([true, false, true, true])),
            ("UINT8", json!([0, 1, 2, 255])),
            ("UINT16", json!([0, 1, 2, 65535])),
            ("UINT32", json!([0, 1, 2, 4_000_000_000u64])),
            ("UINT64", json!([0, 1, 2, u64::MAX])),
            ("INT8", json!([-128, 1, 2, 127])),
            ("INT16", json!([-3, 1, 2, 3])),
            ("INT32", json!([-3, 1, 2, 3])),
            ("INT64", json!([i64::MIN, 1, 2, i64::MAX])),
            ("FP16", json!([0.5, 1.0, -2.0, 3.0])),
            ("FP32", json!([0.5, 1.25, -2.0, 3.0])),
            ("FP64", json!([0.1, 1.25, -2.0, 3.0])),
            ("BYTES", json!(["a", "", "ccc", "dd"])),
        ];
        for (name, data) in cases {
            let dt = parse_datatype(name).expect("datatype");
            assert_eq!(datatype_name(dt), name);
            let nested = json!([[data[0], data[1]], [data[2], data[3]]]);
            let t = from_json(dt, &[2, 2], &nested).expect(name);
            assert_eq!(
                Value::Array(to_json_values(&t).expect("values")),
                data,
                "{name}"
            );
            let bin = from_binary(dt, &[2, 2], &to_binary(&t).expect("bytes")).expect("binary");
            assert_eq!(bin, t, "{name}");
            assert_eq!(
                to_json_rows(&t).expect("rows"),
                vec![nested[0].clone(), nested[1].clone()]
            );
        }
    }

    #[test]
    fn rejects_inconsistent_data() {
        assert!(from_json(DatumType::F32, &[3], &json!([1, 2])).is_err());
        assert!(from_json(DatumType::I8, &[1], &json!([300])).is_err());
        assert!(from_json(DatumType::F32, &[1], &json!(["x"])).is_err());
        assert!(from_binary(DatumType::F32, &[2], &[0; 7]).is_err());
        assert!(from_binary(DatumType::String, &[1], &[5, 0, 0, 0, b'a']).is_err());
        assert!(parse_datatype("FP8").is_err());
        assert!(element_count(&[usize::MAX, 2]).is_err());
    }
}
