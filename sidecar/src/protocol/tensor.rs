//! Tensors on the wire: Open Inference Protocol datatype names, JSON data and the binary tensor
//! extension's little-endian layout (BYTES elements carry a 4-byte length prefix).

use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use tract_onnx::prelude::tract_ndarray::{ArrayD, IxDyn};
use tract_onnx::prelude::{Datum, DatumType, Tensor, f16};

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

/// One leaf of a request's JSON `data`, answering what `serde_json::Value`'s accessors would.
/// Lets `data` be parsed straight into a flat list instead of a tree of values.
#[derive(Debug, Clone, PartialEq)]
pub enum Leaf {
    /// A non-negative integer.
    PosInt(u64),
    /// A negative integer.
    NegInt(i64),
    /// A number with a fraction or exponent.
    Float(f64),
    /// `true` or `false`.
    Bool(bool),
    /// `null`.
    Null,
    /// A string or an object: rare in tensors, kept whole for conversion and error messages.
    Other(Box<Value>),
}

impl Leaf {
    fn to_value(&self) -> Value {
        match self {
            Self::PosInt(u) => Value::from(*u),
            Self::NegInt(i) => Value::from(*i),
            Self::Float(f) => number(*f),
            Self::Bool(b) => Value::Bool(*b),
            Self::Null => Value::Null,
            Self::Other(v) => (**v).clone(),
        }
    }
}

/// Read access to a JSON leaf with `serde_json::Value`'s semantics, so request `data` (flat
/// [`Leaf`]s) and V1 `instances` (values) share one conversion and the same error messages.
pub trait JsonLeaf {
    /// As [`Value::as_f64`].
    fn as_f64(&self) -> Option<f64>;
    /// As [`Value::as_i64`].
    fn as_i64(&self) -> Option<i64>;
    /// As [`Value::as_u64`].
    fn as_u64(&self) -> Option<u64>;
    /// As [`Value::as_bool`].
    fn as_bool(&self) -> Option<bool>;
    /// As [`Value::as_str`].
    fn as_str(&self) -> Option<&str>;
    /// The leaf as JSON text, for error messages.
    fn describe(&self) -> String;
}

impl JsonLeaf for &Value {
    fn as_f64(&self) -> Option<f64> {
        Value::as_f64(self)
    }
    fn as_i64(&self) -> Option<i64> {
        Value::as_i64(self)
    }
    fn as_u64(&self) -> Option<u64> {
        Value::as_u64(self)
    }
    fn as_bool(&self) -> Option<bool> {
        Value::as_bool(self)
    }
    fn as_str(&self) -> Option<&str> {
        Value::as_str(self)
    }
    fn describe(&self) -> String {
        self.to_string()
    }
}

impl JsonLeaf for Leaf {
    fn as_f64(&self) -> Option<f64> {
        match self {
            Self::PosInt(u) => Some(*u as f64),
            Self::NegInt(i) => Some(*i as f64),
            Self::Float(f) => Some(*f),
            _ => None,
        }
    }
    fn as_i64(&self) -> Option<i64> {
        match self {
            Self::PosInt(u) => i64::try_from(*u).ok(),
            Self::NegInt(i) => Some(*i),
            _ => None,
        }
    }
    fn as_u64(&self) -> Option<u64> {
        match self {
            Self::PosInt(u) => Some(*u),
            _ => None,
        }
    }
    fn as_bool(&self) -> Option<bool> {
        match self {
            Self::Bool(b) => Some(*b),
            _ => None,
        }
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            Self::Other(v) => v.as_str(),
            _ => None,
        }
    }
    fn describe(&self) -> String {
        self.to_value().to_string()
    }
}

/// How JSON data is nested: the length of its arrays at each depth and the depth of its
/// leaves, recorded while parsing. Ragged data (arrays of one depth differing in length, or
/// leaves at different depths) cannot be the row-major layout of any shape.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Nesting {
    /// Array length at each depth (`None` until an array at that depth has been seen).
    dims: Vec<Option<usize>>,
    /// Depth of the leaves (0: the data is one scalar).
    leaf_depth: Option<usize>,
    ragged: bool,
}

impl Nesting {
    /// The nesting of a parsed value.
    pub fn of(v: &Value) -> Self {
        fn walk(v: &Value, depth: usize, n: &mut Nesting) {
            match v {
                Value::Array(items) => {
                    items.iter().for_each(|x| walk(x, depth + 1, n));
                    n.array(depth, items.len());
                }
                _ => n.leaf(depth),
            }
        }
        let mut n = Self::default();
        walk(v, 0, &mut n);
        n
    }

    fn array(&mut self, depth: usize, len: usize) {
        if self.dims.len() <= depth {
            self.dims.resize(depth + 1, None);
        }
        match self.dims[depth] {
            Some(seen) if seen != len => self.ragged = true,
            _ => self.dims[depth] = Some(len),
        }
        // An array where another branch had a leaf.
        if self.leaf_depth.is_some_and(|d| d <= depth) {
            self.ragged = true;
        }
    }

    fn leaf(&mut self, depth: usize) {
        match self.leaf_depth {
            Some(d) if d != depth => self.ragged = true,
            _ => self.leaf_depth = Some(depth),
        }
        if self.dims.len() > depth {
            self.ragged = true;
        }
    }

    /// The array lengths by depth, if the data is regular: its shape as nested.
    pub fn shape(&self) -> Option<Vec<usize>> {
        if self.ragged {
            return None;
        }
        // A depth never reached as an array lies under empty arrays only: length 0.
        Some(self.dims.iter().map(|d| d.unwrap_or(0)).collect())
    }

    /// Checks data nested like this against the declared `shape`: flat (one array) or a
    /// single scalar is always fine (the element count is checked by the conversion);
    /// otherwise the nesting must be the shape exactly.
    pub fn check(&self, shape: &[usize]) -> RequestResult<()> {
        let Some(nested) = self.shape() else {
            return Err(RequestError::Malformed(
                "data is ragged: its arrays differ in length at one depth or hold values at \
                 different depths; send it flat, or nested exactly as the shape"
                    .into(),
            ));
        };
        if nested.len() <= 1 || nested == shape {
            return Ok(());
        }
        Err(RequestError::Malformed(format!(
            "data is nested as {nested:?}, the shape is {shape:?}; send it flat, or nested \
             exactly as the shape"
        )))
    }
}

/// A request's JSON `data`, flat and row-major: nested arrays are flattened while parsing, as
/// [`flatten`] does for a [`Value`], and their [`Nesting`] recorded; any other JSON is one leaf.
#[derive(Debug, Default, PartialEq)]
pub struct JsonData(pub Vec<Leaf>, pub Nesting);

/// First allocation for `data`: a small request's leaves fit without regrowing.
const DATA_CAPACITY: usize = 64;

impl<'de> Deserialize<'de> for JsonData {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut leaves = Vec::with_capacity(DATA_CAPACITY);
        let mut nesting = Nesting::default();
        deserializer.deserialize_any(LeafVisitor {
            leaves: &mut leaves,
            nesting: &mut nesting,
            depth: 0,
        })?;
        Ok(Self(leaves, nesting))
    }
}

/// Appends the leaves of one JSON value at `depth` and records its nesting; mirrors `Value`'s
/// own visitor (integers by sign, non-finite floats as null).
struct LeafVisitor<'a> {
    leaves: &'a mut Vec<Leaf>,
    nesting: &'a mut Nesting,
    depth: usize,
}

impl LeafVisitor<'_> {
    fn push(self, leaf: Leaf) {
        self.nesting.leaf(self.depth);
        self.leaves.push(leaf);
    }
}

impl<'de> DeserializeSeed<'de> for LeafVisitor<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for LeafVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.push(Leaf::Bool(v));
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.push(match u64::try_from(v) {
            Ok(u) => Leaf::PosInt(u),
            Err(_) => Leaf::NegInt(v),
        });
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.push(Leaf::PosInt(v));
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.push(if v.is_finite() {
            Leaf::Float(v)
        } else {
            Leaf::Null
        });
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.push(Leaf::Other(Box::new(Value::from(v))));
        Ok(())
    }

    fn visit_string<E>(self, v: String) -> Result<(), E> {
        self.push(Leaf::Other(Box::new(Value::String(v))));
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.push(Leaf::Null);
        Ok(())
    }

    fn visit_none<E>(self) -> Result<(), E> {
        self.push(Leaf::Null);
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut len = 0;
        while seq
            .next_element_seed(LeafVisitor {
                leaves: &mut *self.leaves,
                nesting: &mut *self.nesting,
                depth: self.depth + 1,
            })?
            .is_some()
        {
            len += 1;
        }
        self.nesting.array(self.depth, len);
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        let v = Value::deserialize(MapAccessDeserializer::new(map))?;
        self.push(Leaf::Other(Box::new(v)));
        Ok(())
    }
}

/// A zeroed tensor of `T` filled from `leaves` by `f`: one allocation, no intermediate vector.
fn fill<T: Datum, L>(
    shape: &[usize],
    leaves: &[L],
    f: impl Fn(&L) -> RequestResult<T>,
) -> RequestResult<Tensor> {
    zeroed_then(shape, |slots: &mut [T]| {
        for (slot, leaf) in slots.iter_mut().zip(leaves) {
            *slot = f(leaf)?;
        }
        Ok(())
    })
}

/// A zeroed tensor of `T`, then written in place by `write`.
fn zeroed_then<T: Datum>(
    shape: &[usize],
    write: impl FnOnce(&mut [T]) -> RequestResult<()>,
) -> RequestResult<Tensor> {
    let mut t = Tensor::zero_dt(T::datum_type(), shape)
        .map_err(|e| RequestError::Malformed(e.to_string()))?;
    let mut view = t
        .try_as_plain_ram_mut()
        .map_err(|e| RequestError::Malformed(e.to_string()))?;
    write(
        view.as_slice_mut::<T>()
            .map_err(|e| RequestError::Malformed(e.to_string()))?,
    )?;
    Ok(t)
}

macro_rules! from_json_ints {
    ($t:ty, $shape:expr, $leaves:expr) => {
        fill::<$t, _>($shape, $leaves, |v| {
            v.as_i64()
                .and_then(|i| <$t>::try_from(i).ok())
                .or_else(|| v.as_u64().and_then(|u| <$t>::try_from(u).ok()))
                .ok_or_else(|| malformed(concat!("not a valid ", stringify!($t)), v.describe()))
        })
    };
}

/// Builds a tensor from JSON `data` (flat, or nested exactly as the shape) of the given type
/// and shape.
pub fn from_json(dt: DatumType, shape: &[usize], data: &Value) -> RequestResult<Tensor> {
    Nesting::of(data).check(shape)?;
    let mut leaves = Vec::new();
    flatten(data, &mut leaves);
    from_leaves(dt, shape, &leaves)
}

/// Builds a tensor of the given type and shape from flat, row-major JSON leaves.
pub fn from_leaves<L: JsonLeaf>(
    dt: DatumType,
    shape: &[usize],
    leaves: &[L],
) -> RequestResult<Tensor> {
    let expected = element_count(shape)?;
    if leaves.len() != expected {
        return Err(RequestError::Malformed(format!(
            "shape {shape:?} needs {expected} elements, data has {}",
            leaves.len()
        )));
    }
    let float = |v: &L| {
        v.as_f64()
            .ok_or_else(|| malformed("not a number", v.describe()))
    };
    match dt {
        DatumType::F32 => fill::<f32, _>(shape, leaves, |v| float(v).map(|f| f as f32)),
        DatumType::F64 => fill::<f64, _>(shape, leaves, float),
        DatumType::F16 => fill::<f16, _>(shape, leaves, |v| float(v).map(f16::from_f64)),
        DatumType::Bool => fill::<bool, _>(shape, leaves, |v| {
            v.as_bool()
                .ok_or_else(|| malformed("not a boolean", v.describe()))
        }),
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
                        .ok_or_else(|| malformed("not a string", v.describe()))
                })
                .collect::<RequestResult<Vec<_>>>()?;
            strings(shape, vals)
        }
        other => Err(RequestError::Unprocessable(format!(
            "unsupported datatype {other:?}"
        ))),
    }
}

fn strings(shape: &[usize], vals: Vec<String>) -> RequestResult<Tensor> {
    ArrayD::from_shape_vec(IxDyn(shape), vals)
        .map(Tensor::from)
        .map_err(|e| RequestError::Malformed(e.to_string()))
}

/// A tensor of `T` decoded from little-endian `bytes` (exactly its size) by `f`: written in
/// place, without an intermediate vector.
fn fill_le<T: Datum, const N: usize>(
    shape: &[usize],
    bytes: &[u8],
    f: impl Fn([u8; N]) -> T,
) -> RequestResult<Tensor> {
    let (chunks, _) = bytes.as_chunks::<N>();
    // Infallible per element, unlike `fill`: the loop compiles to vector moves (a CNN image is
    // 150,528 floats; the fallible loop was 0.5 % of a whole CNN benchmark's CPU).
    zeroed_then(shape, |slots: &mut [T]| {
        for (slot, c) in slots.iter_mut().zip(chunks) {
            *slot = f(*c);
        }
        Ok(())
    })
}

/// Builds a tensor from the binary tensor extension's raw bytes.
pub fn from_binary(dt: DatumType, shape: &[usize], bytes: &[u8]) -> RequestResult<Tensor> {
    let count = element_count(shape)?;
    if dt == DatumType::String {
        // Each element takes at least its 4-byte length: a huge declared shape cannot reserve
        // more than the body could hold.
        let mut vals = Vec::with_capacity(count.min(bytes.len() / 4));
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
    match dt {
        DatumType::Bool => fill_le::<bool, 1>(shape, bytes, |[b]| b != 0),
        DatumType::U8 => {
            Tensor::from_shape(shape, bytes).map_err(|e| RequestError::Malformed(e.to_string()))
        }
        DatumType::I8 => fill_le(shape, bytes, i8::from_le_bytes),
        DatumType::U16 => fill_le(shape, bytes, u16::from_le_bytes),
        DatumType::I16 => fill_le(shape, bytes, i16::from_le_bytes),
        DatumType::F16 => fill_le(shape, bytes, f16::from_le_bytes),
        DatumType::U32 => fill_le(shape, bytes, u32::from_le_bytes),
        DatumType::I32 => fill_le(shape, bytes, i32::from_le_bytes),
        DatumType::F32 => fill_le(shape, bytes, f32::from_le_bytes),
        DatumType::U64 => fill_le(shape, bytes, u64::from_le_bytes),
        DatumType::I64 => fill_le(shape, bytes, i64::from_le_bytes),
        _ => fill_le(shape, bytes, f64::from_le_bytes),
    }
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

/// Fails as encoding would if `t`'s element type has no protocol encoding.
pub fn check_encodable(t: &Tensor) -> RequestResult<()> {
    match t.datum_type() {
        DatumType::F32
        | DatumType::F64
        | DatumType::F16
        | DatumType::Bool
        | DatumType::U8
        | DatumType::U16
        | DatumType::U32
        | DatumType::U64
        | DatumType::I8
        | DatumType::I16
        | DatumType::I32
        | DatumType::I64
        | DatumType::String => Ok(()),
        other => Err(internal(format!("unsupported output type {other:?}"))),
    }
}

/// An element written as JSON exactly as [`to_json_values`] writes it: floats through `f64`
/// (NaN and infinities as null), everything else as itself.
trait JsonScalar {
    fn serialize_json<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error>;
}

macro_rules! json_scalar_as_is {
    ($($t:ty),*) => {$(
        impl JsonScalar for $t {
            fn serialize_json<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                self.serialize(serializer)
            }
        }
    )*};
}

json_scalar_as_is!(bool, u8, u16, u32, u64, i8, i16, i32, i64, f64, String);

impl JsonScalar for f32 {
    fn serialize_json<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(f64::from(*self))
    }
}

impl JsonScalar for f16 {
    fn serialize_json<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.to_f64())
    }
}

/// Row-major elements nested as JSON arrays following `shape`, as [`to_json_rows`] nests
/// them; with an empty shape, the first element (null if none).
struct Nested<'a, T> {
    data: &'a [T],
    shape: &'a [usize],
}

impl<T: JsonScalar> Serialize for Nested<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Some((&len, inner)) = self.shape.split_first() else {
            return match self.data.first() {
                Some(v) => v.serialize_json(serializer),
                None => serializer.serialize_unit(),
            };
        };
        if inner.is_empty() {
            return serializer.collect_seq(self.data.iter().take(len).map(Flat));
        }
        let stride: usize = inner.iter().product();
        serializer.collect_seq((0..len).map(|i| Nested {
            data: self.data.get(i * stride..).unwrap_or_default(),
            shape: inner,
        }))
    }
}

/// One element, for `collect_seq`.
struct Flat<'a, T>(&'a T);

impl<T: JsonScalar> Serialize for Flat<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize_json(serializer)
    }
}

/// Runs `$body` with `$data` bound to the tensor's elements as a typed slice.
macro_rules! with_elements {
    ($t:expr, $err:expr, |$data:ident| $body:expr) => {{
        let view = $t.try_as_plain_ram().map_err($err)?;
        macro_rules! typed {
            ($ty:ty) => {{
                let $data = view.as_slice::<$ty>().map_err($err)?;
                $body
            }};
        }
        match $t.datum_type() {
            DatumType::F32 => typed!(f32),
            DatumType::F64 => typed!(f64),
            DatumType::F16 => typed!(f16),
            DatumType::Bool => typed!(bool),
            DatumType::U8 => typed!(u8),
            DatumType::U16 => typed!(u16),
            DatumType::U32 => typed!(u32),
            DatumType::U64 => typed!(u64),
            DatumType::I8 => typed!(i8),
            DatumType::I16 => typed!(i16),
            DatumType::I32 => typed!(i32),
            DatumType::I64 => typed!(i64),
            DatumType::String => typed!(String),
            other => Err($err(format!("unsupported output type {other:?}"))),
        }
    }};
}

/// A tensor's elements as a flat, row-major JSON array, serialized straight from its buffer
/// with the same text as [`to_json_values`].
pub struct JsonElements<'a>(pub &'a Tensor);

impl Serialize for JsonElements<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        with_elements!(self.0, S::Error::custom, |data| serializer
            .collect_seq(data.iter().map(Flat)))
    }
}

/// Row `.1` (axis 0) of a tensor as nested JSON arrays, as [`to_json_rows`] writes it; null
/// past the last row.
pub struct JsonRow<'a>(pub &'a Tensor, pub usize);

/// Rows of `t` as [`to_json_rows`] counts them: a scalar is one row.
pub fn row_count(t: &Tensor) -> usize {
    t.shape().first().copied().unwrap_or(1)
}

impl Serialize for JsonRow<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (t, row) = (self.0, self.1);
        if row >= row_count(t) {
            return serializer.serialize_unit();
        }
        let shape = t.shape().get(1..).unwrap_or_default();
        let per_row: usize = shape.iter().product();
        with_elements!(t, S::Error::custom, |data| Nested {
            data: data.get(row * per_row..).unwrap_or_default(),
            shape,
        }
        .serialize(serializer))
    }
}

/// Bytes [`write_binary`] appends for `t`.
pub fn binary_size(t: &Tensor) -> RequestResult<usize> {
    check_encodable(t)?;
    if t.datum_type() == DatumType::String {
        let view = t.try_as_plain_ram().map_err(internal)?;
        let strings = view.as_slice::<String>().map_err(internal)?;
        return Ok(strings.iter().map(|s| 4 + s.len()).sum());
    }
    Ok(t.len() * t.datum_type().size_of())
}

fn append_le<T: Datum, const N: usize>(
    t: &Tensor,
    out: &mut Vec<u8>,
    f: fn(&T) -> [u8; N],
) -> RequestResult<()> {
    let view = t.try_as_plain_ram().map_err(internal)?;
    for v in view.as_slice::<T>().map_err(internal)? {
        out.extend_from_slice(&f(v));
    }
    Ok(())
}

/// Appends the tensor in the binary tensor extension's layout.
pub fn write_binary(t: &Tensor, out: &mut Vec<u8>) -> RequestResult<()> {
    match t.datum_type() {
        DatumType::Bool => append_le::<bool, 1>(t, out, |b| [u8::from(*b)]),
        DatumType::U8 => append_le(t, out, |v: &u8| v.to_le_bytes()),
        DatumType::I8 => append_le(t, out, |v: &i8| v.to_le_bytes()),
        DatumType::U16 => append_le(t, out, |v: &u16| v.to_le_bytes()),
        DatumType::I16 => append_le(t, out, |v: &i16| v.to_le_bytes()),
        DatumType::F16 => append_le(t, out, |v: &f16| v.to_le_bytes()),
        DatumType::U32 => append_le(t, out, |v: &u32| v.to_le_bytes()),
        DatumType::I32 => append_le(t, out, |v: &i32| v.to_le_bytes()),
        DatumType::F32 => append_le(t, out, |v: &f32| v.to_le_bytes()),
        DatumType::U64 => append_le(t, out, |v: &u64| v.to_le_bytes()),
        DatumType::I64 => append_le(t, out, |v: &i64| v.to_le_bytes()),
        DatumType::F64 => append_le(t, out, |v: &f64| v.to_le_bytes()),
        DatumType::String => {
            let view = t.try_as_plain_ram().map_err(internal)?;
            for s in view.as_slice::<String>().map_err(internal)? {
                let len = u32::try_from(s.len()).map_err(internal)?;
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Ok(())
        }
        other => Err(internal(format!("unsupported output type {other:?}"))),
    }
}

/// The tensor in the binary tensor extension's layout.
pub fn to_binary(t: &Tensor) -> RequestResult<Vec<u8>> {
    let mut out = Vec::with_capacity(binary_size(t)?);
    write_binary(t, &mut out)?;
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

    /// Every datatype, each leaf kind and nesting: parsing `data` into leaves gives the tensor,
    /// or the error, that flattening a parsed `Value` gives.
    #[test]
    fn leaves_parsed_from_text_convert_like_values() {
        let texts = [
            "[1, -1, 0, 300]",
            "[[1.5, -0.0], [1e308, 1e-320]]",
            "[18446744073709551615, 9223372036854775808, -9223372036854775808, 7]",
            "[true, false, null, 1]",
            r#"["a", "\u00e9\"", "", "d"]"#,
            r#"[{"k": [1, 2]}, [], [[3]], 4]"#,
            "[[], [1, 2], [], [[3, 4]]]",
            "[1, 2, 3]",
            "5",
            r#""s""#,
            "null",
            r#"{"a": 1}"#,
        ];
        let dts = [
            "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
            "FP16", "FP32", "FP64", "BYTES",
        ];
        for text in texts {
            let value: Value = serde_json::from_str(text).expect("value");
            let leaves: JsonData = serde_json::from_str(text).expect("leaves");
            for name in dts {
                let dt = parse_datatype(name).expect("datatype");
                assert_eq!(leaves.1, Nesting::of(&value), "{text}");
                for shape in [&[4][..], &[2, 2], &[1], &[3]] {
                    let want = from_json(dt, shape, &value).map_err(|e| e.to_string());
                    let got = leaves
                        .1
                        .check(shape)
                        .and_then(|()| from_leaves(dt, shape, &leaves.0))
                        .map_err(|e| e.to_string());
                    assert_eq!(got, want, "{name} {shape:?} {text}");
                }
            }
        }
    }

    /// Outputs streamed from the tensor are the same text as their `Value` rendering.
    #[test]
    fn streamed_json_is_the_value_rendering() {
        let tensors = [
            Tensor::from_shape(
                &[2, 3],
                &[0.1f32, -2.5, f32::NAN, f32::INFINITY, 1e-40, 3.0],
            )
            .expect("f32"),
            Tensor::from_shape(&[2, 2, 1], &[0.1f64, -0.0, 1e300, f64::NEG_INFINITY]).expect("f64"),
            Tensor::from_shape(&[3], &[f16::from_f32(0.5), f16::NAN, f16::MAX]).expect("f16"),
            Tensor::from_shape(&[2], &[true, false]).expect("bool"),
            Tensor::from_shape(&[1, 2], &[u8::MAX, 0]).expect("u8"),
            Tensor::from_shape(&[2, 1], &[u64::MAX, 1]).expect("u64"),
            Tensor::from_shape(&[2], &[i64::MIN, i64::MAX]).expect("i64"),
            Tensor::from_shape(&[2, 0], &[0i32; 0]).expect("empty"),
            Tensor::from(7i16),
            strings(&[2, 1], vec!["a\"b".into(), "\u{2028}".into()]).expect("strings"),
        ];
        for t in &tensors {
            let values = Value::Array(to_json_values(t).expect("values"));
            let streamed = serde_json::to_string(&JsonElements(t)).expect("streamed");
            assert_eq!(streamed, values.to_string(), "{t:?}");
            let rows = to_json_rows(t).expect("rows");
            for (r, row) in rows.iter().enumerate() {
                let streamed = serde_json::to_string(&JsonRow(t, r)).expect("row");
                assert_eq!(streamed, row.to_string(), "{t:?} row {r}");
            }
            let past = serde_json::to_string(&JsonRow(t, rows.len())).expect("past");
            assert_eq!(past, "null");
            let bin = to_binary(t).expect("binary");
            assert_eq!(bin.len(), binary_size(t).expect("size"));
        }
    }

    #[test]
    fn nested_data_must_be_flat_or_nested_exactly_as_the_shape() {
        let f32s = |shape: &[usize], v: Value| from_json(DatumType::F32, shape, &v);
        assert!(f32s(&[2, 2], json!([1, 2, 3, 4])).is_ok(), "flat");
        assert!(
            f32s(&[2, 2], json!([[1, 2], [3, 4]])).is_ok(),
            "as the shape"
        );
        assert!(f32s(&[1], json!(5)).is_ok(), "one scalar");
        assert!(f32s(&[2, 0], json!([[], []])).is_ok(), "empty rows");
        for (shape, v) in [
            (vec![2, 2], json!([[1, 2, 3], [4]])),
            (vec![2, 2], json!([[1, 2], 3, 4])),
            (vec![2, 2], json!([[1], [2, [3, 4]]])),
            (vec![4], json!([[1], [2], [3], [4]])),
            (vec![2, 2], json!([[[1, 2], [3, 4]]])),
            (vec![2, 2], json!([[1, 2, 3, 4]])),
            (vec![1, 2, 2], json!([[1, 2], [3, 4]])),
        ] {
            let e = f32s(&shape, v.clone()).expect_err("refused");
            assert!(
                matches!(e, RequestError::Malformed(_)) && e.to_string().contains("send it flat"),
                "{shape:?} {v}: {e}"
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
        // A huge declared BYTES shape is refused, not reserved.
        assert!(from_binary(DatumType::String, &[1 << 40], &[1, 0, 0, 0, b'a']).is_err());
        assert!(parse_datatype("FP8").is_err());
        assert!(element_count(&[usize::MAX, 2]).is_err());
    }
}
