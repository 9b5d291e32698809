//! Host tensors: the one tensor type that crosses the runtime API, plus safetensors I/O and the error
//! measures the equivalence tests use.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};

/// Element type of a [`HostTensor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F64,
    /// IEEE half precision, kept as raw bits (no arithmetic on the host).
    F16,
    I64,
    I32,
    I8,
    U8,
    Bool,
}

impl DType {
    pub const ALL: [DType; 8] =
        [DType::F32, DType::F64, DType::F16, DType::I64, DType::I32, DType::I8, DType::U8, DType::Bool];

    /// Lower-case name as numpy spells it (`float32`, `int64`, `bool`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }

    pub fn size_of(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "float32" | "f32" | "float" => DType::F32,
            "float64" | "f64" | "double" => DType::F64,
            "float16" | "f16" | "half" => DType::F16,
            "int64" | "i64" => DType::I64,
            "int32" | "i32" => DType::I32,
            "int8" | "i8" => DType::I8,
            "uint8" | "u8" => DType::U8,
            "bool" => DType::Bool,
            _ => bail!(
                "unknown dtype `{s}` (expected one of float32, float64, float16, int64, int32, int8, uint8, bool)"
            ),
        })
    }
}

/// The elements of a [`HostTensor`], row-major (C order).
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    /// Raw IEEE binary16 bits.
    F16(Vec<u16>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    Bool(Vec<bool>),
}

impl TensorData {
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F64(_) => DType::F64,
            TensorData::F16(_) => DType::F16,
            TensorData::I64(_) => DType::I64,
            TensorData::I32(_) => DType::I32,
            TensorData::I8(_) => DType::I8,
            TensorData::U8(_) => DType::U8,
            TensorData::Bool(_) => DType::Bool,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F64(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::I8(v) => v.len(),
            TensorData::U8(v) => v.len(),
            TensorData::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn zeros(dtype: DType, n: usize) -> TensorData {
        match dtype {
            DType::F32 => TensorData::F32(vec![0.0; n]),
            DType::F64 => TensorData::F64(vec![0.0; n]),
            DType::F16 => TensorData::F16(vec![0; n]),
            DType::I64 => TensorData::I64(vec![0; n]),
            DType::I32 => TensorData::I32(vec![0; n]),
            DType::I8 => TensorData::I8(vec![0; n]),
            DType::U8 => TensorData::U8(vec![0; n]),
            DType::Bool => TensorData::Bool(vec![false; n]),
        }
    }
}

macro_rules! from_vec {
    ($($t:ty => $variant:ident),*) => {$(
        impl From<Vec<$t>> for TensorData {
            fn from(v: Vec<$t>) -> Self { TensorData::$variant(v) }
        }
    )*};
}
from_vec!(f32 => F32, f64 => F64, i64 => I64, i32 => I32, i8 => I8, u8 => U8, bool => Bool);

/// A dense host tensor: a shape and row-major data. It carries no name; collections of tensors are
/// `BTreeMap<String, HostTensor>`.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    shape: Vec<usize>,
    data: TensorData,
}

macro_rules! accessors {
    ($($as:ident, $as_mut:ident, $from:ident, $scalar:ident: $t:ty => $variant:ident),*) => {$(
        /// The elements, or an error naming the actual dtype.
        pub fn $as(&self) -> Result<&[$t]> {
            match &self.data {
                TensorData::$variant(v) => Ok(v),
                other => bail!("expected a {} tensor, found {} with shape {:?}",
                    DType::$variant, other.dtype(), self.shape),
            }
        }
        pub fn $as_mut(&mut self) -> Result<&mut [$t]> {
            let shape = self.shape.clone();
            match &mut self.data {
                TensorData::$variant(v) => Ok(v),
                other => bail!("expected a {} tensor, found {} with shape {:?}",
                    DType::$variant, other.dtype(), shape),
            }
        }
        /// Builds a tensor; fails when `data.len()` is not the product of `shape`.
        pub fn $from(shape: impl Into<Vec<usize>>, data: Vec<$t>) -> Result<Self> {
            Self::new(shape, TensorData::$variant(data))
        }
        /// A rank-0 tensor.
        pub fn $scalar(v: $t) -> Self {
            HostTensor { shape: vec![], data: TensorData::$variant(vec![v]) }
        }
    )*};
}

impl HostTensor {
    /// Builds a tensor; fails when the element count does not match the shape.
    pub fn new(shape: impl Into<Vec<usize>>, data: TensorData) -> Result<Self> {
        let shape = shape.into();
        let n: usize = shape.iter().product();
        ensure!(
            n == data.len(),
            "shape {:?} needs {} elements but {} {} values were given",
            shape,
            n,
            data.len(),
            data.dtype()
        );
        Ok(HostTensor { shape, data })
    }

    pub fn zeros(dtype: DType, shape: impl Into<Vec<usize>>) -> Self {
        let shape = shape.into();
        let n = shape.iter().product();
        HostTensor { shape, data: TensorData::zeros(dtype, n) }
    }

    accessors!(
        as_f32, as_f32_mut, from_f32, scalar_f32: f32 => F32,
        as_f64, as_f64_mut, from_f64, scalar_f64: f64 => F64,
        as_f16_bits, as_f16_bits_mut, from_f16_bits, scalar_f16_bits: u16 => F16,
        as_i64, as_i64_mut, from_i64, scalar_i64: i64 => I64,
        as_i32, as_i32_mut, from_i32, scalar_i32: i32 => I32,
        as_i8, as_i8_mut, from_i8, scalar_i8: i8 => I8,
        as_u8, as_u8_mut, from_u8, scalar_u8: u8 => U8,
        as_bool, as_bool_mut, from_bool, scalar_bool: bool => Bool
    );

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn data(&self) -> &TensorData {
        &self.data
    }

    pub fn into_data(self) -> TensorData {
        self.data
    }

    pub fn into_parts(self) -> (Vec<usize>, TensorData) {
        (self.shape, self.data)
    }

    /// Same data, new shape (same element count).
    pub fn reshape(self, shape: impl Into<Vec<usize>>) -> Result<Self> {
        Self::new(shape, self.data)
    }

    /// Every element widened to f64 (bool as 0/1, f16 decoded). For comparisons and printing.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match &self.data {
            TensorData::F32(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::F64(v) => v.clone(),
            TensorData::F16(v) => v.iter().map(|&b| f16_bits_to_f64(b)).collect(),
            TensorData::I64(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::I32(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::I8(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::U8(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::Bool(v) => v.iter().map(|&x| if x { 1.0 } else { 0.0 }).collect(),
        }
    }

    /// The first `n` elements as text, e.g. `[0.1, 0.2, ...]`.
    pub fn preview(&self, n: usize) -> String {
        fn list<T: fmt::Debug>(v: &[T], n: usize) -> String {
            let mut s = v.iter().take(n).map(|x| format!("{x:?}")).collect::<Vec<_>>().join(", ");
            if v.len() > n {
                s.push_str(if n == 0 { "..." } else { ", ..." });
            }
            format!("[{s}]")
        }
        match &self.data {
            TensorData::F32(v) => list(v, n),
            TensorData::F64(v) => list(v, n),
            TensorData::F16(_) => list(&self.to_f64_vec(), n),
            TensorData::I64(v) => list(v, n),
            TensorData::I32(v) => list(v, n),
            TensorData::I8(v) => list(v, n),
            TensorData::U8(v) => list(v, n),
            TensorData::Bool(v) => list(v, n),
        }
    }

    fn comparable(&self, reference: &HostTensor) -> Result<(Vec<f64>, Vec<f64>)> {
        ensure!(self.shape == reference.shape, "shape mismatch: {:?} vs reference {:?}", self.shape, reference.shape);
        Ok((self.to_f64_vec(), reference.to_f64_vec()))
    }

    /// Largest elementwise absolute difference `max |a - b|`. Errors on a shape mismatch; a NaN on one
    /// side only gives infinity (NaN on both sides counts as equal).
    pub fn max_abs_error(&self, reference: &HostTensor) -> Result<f64> {
        let (a, b) = self.comparable(reference)?;
        Ok(a.iter().zip(&b).map(|(&x, &y)| abs_diff(x, y)).fold(0.0, f64::max))
    }

    /// Largest elementwise relative error `max_i |a_i - b_i| / max(|b_i|, TINY)` against `reference`.
    /// Strict: an element whose reference is near zero counts with its own tiny scale.
    pub fn max_rel_error(&self, reference: &HostTensor) -> Result<f64> {
        let (a, b) = self.comparable(reference)?;
        Ok(a.iter()
            .zip(&b)
            .map(|(&x, &y)| {
                let d = abs_diff(x, y);
                if d == 0.0 {
                    0.0
                } else {
                    d / y.abs().max(TINY)
                }
            })
            .fold(0.0, f64::max))
    }

    /// Largest absolute difference scaled by the reference's largest magnitude:
    /// `max_i |a_i - b_i| / max(max_j |b_j|, TINY)`. Robust where some reference elements are ~0.
    pub fn scaled_max_error(&self, reference: &HostTensor) -> Result<f64> {
        let (a, b) = self.comparable(reference)?;
        let scale = b.iter().map(|y| y.abs()).filter(|y| y.is_finite()).fold(0.0, f64::max).max(TINY);
        Ok(a.iter().zip(&b).map(|(&x, &y)| abs_diff(x, y)).fold(0.0, f64::max) / scale)
    }

    /// Norm-relative error `‖a − b‖₂ / max(‖b‖₂, TINY)`.
    pub fn norm_rel_error(&self, reference: &HostTensor) -> Result<f64> {
        let (a, b) = self.comparable(reference)?;
        let mut num = 0.0f64;
        let mut den = 0.0f64;
        for (&x, &y) in a.iter().zip(&b) {
            let d = abs_diff(x, y);
            num += d * d;
            if y.is_finite() {
                den += y * y;
            }
        }
        Ok(num.sqrt() / den.sqrt().max(TINY))
    }
}

/// Floor for denominators in the relative error measures.
pub const TINY: f64 = 1e-30;

fn abs_diff(x: f64, y: f64) -> f64 {
    if x == y || (x.is_nan() && y.is_nan()) {
        0.0
    } else {
        let d = (x - y).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            d
        }
    }
}

/// Decodes IEEE binary16 bits.
pub fn f16_bits_to_f64(b: u16) -> f64 {
    let sign = if b & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((b >> 10) & 0x1f) as i32;
    let frac = (b & 0x3ff) as f64;
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        0x1f if frac == 0.0 => f64::INFINITY,
        0x1f => f64::NAN,
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

/// Largest norm-relative error (see [`HostTensor::norm_rel_error`]) over the tensors present in
/// `reference`; fails when one of them is missing from `actual`. Returns the worst name and value.
pub fn worst_norm_rel_error(
    actual: &BTreeMap<String, HostTensor>,
    reference: &BTreeMap<String, HostTensor>,
) -> Result<(String, f64)> {
    let mut worst = (String::new(), 0.0f64);
    for (name, r) in reference {
        let a = actual.get(name).with_context(|| {
            format!("tensor `{name}` is missing (have: {})", actual.keys().cloned().collect::<Vec<_>>().join(", "))
        })?;
        let e = a.norm_rel_error(r).with_context(|| format!("comparing `{name}`"))?;
        if e > worst.1 || worst.0.is_empty() {
            worst = (name.clone(), e);
        }
    }
    Ok(worst)
}

// ---------------------------------------------------------------------------------------------
// safetensors

fn st_dtype(d: DType) -> safetensors::Dtype {
    use safetensors::Dtype as S;
    match d {
        DType::F32 => S::F32,
        DType::F64 => S::F64,
        DType::F16 => S::F16,
        DType::I64 => S::I64,
        DType::I32 => S::I32,
        DType::I8 => S::I8,
        DType::U8 => S::U8,
        DType::Bool => S::BOOL,
    }
}

fn le_chunks<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes.chunks_exact(N).map(|c| f(c.try_into().expect("chunk size"))).collect()
}

fn decode(dtype: safetensors::Dtype, shape: &[usize], bytes: &[u8]) -> Result<HostTensor> {
    use safetensors::Dtype as S;
    let data = match dtype {
        S::F32 => TensorData::F32(le_chunks(bytes, f32::from_le_bytes)),
        S::F64 => TensorData::F64(le_chunks(bytes, f64::from_le_bytes)),
        S::F16 => TensorData::F16(le_chunks(bytes, u16::from_le_bytes)),
        S::I64 => TensorData::I64(le_chunks(bytes, i64::from_le_bytes)),
        S::I32 => TensorData::I32(le_chunks(bytes, i32::from_le_bytes)),
        S::I8 => TensorData::I8(bytes.iter().map(|&b| b as i8).collect()),
        S::U8 => TensorData::U8(bytes.to_vec()),
        S::BOOL => TensorData::Bool(
            bytes
                .iter()
                .map(|&b| match b {
                    0 => Ok(false),
                    1 => Ok(true),
                    _ => bail!("bool element with byte value {b}"),
                })
                .collect::<Result<_>>()?,
        ),
        other => bail!("unsupported safetensors dtype {other:?} (supported: F32, F64, F16, I64, I32, I8, U8, BOOL)"),
    };
    HostTensor::new(shape.to_vec(), data)
}

fn encode(t: &HostTensor) -> Vec<u8> {
    match &t.data {
        TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::I8(v) => v.iter().map(|&x| x as u8).collect(),
        TensorData::U8(v) => v.clone(),
        TensorData::Bool(v) => v.iter().map(|&x| x as u8).collect(),
    }
}

/// Parses safetensors bytes. `origin` names the source in errors.
pub fn safetensors_from_bytes(bytes: &[u8], origin: &str) -> Result<BTreeMap<String, HostTensor>> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("{origin}: not a valid safetensors file: {e}"))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let t = decode(view.dtype(), view.shape(), view.data())
            .with_context(|| format!("{origin}: tensor `{name}` ({:?}, shape {:?})", view.dtype(), view.shape()))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Reads every tensor of a safetensors file. Errors name the file and, where it applies, the tensor.
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<BTreeMap<String, HostTensor>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).with_context(|| format!("reading safetensors file {}", path.display()))?;
    safetensors_from_bytes(&bytes, &path.display().to_string())
}

/// Serializes tensors to safetensors bytes (optional string metadata).
pub fn safetensors_to_bytes(
    tensors: &BTreeMap<String, HostTensor>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let owned: Vec<(&str, OwnedView)> = tensors
        .iter()
        .map(|(name, t)| {
            (name.as_str(), OwnedView { dtype: st_dtype(t.dtype()), shape: t.shape.clone(), data: encode(t) })
        })
        .collect();
    safetensors::serialize(owned.iter().map(|(n, v)| (*n, v)), metadata)
        .map_err(|e| anyhow::anyhow!("serializing safetensors: {e}"))
}

/// Writes tensors to a safetensors file. Errors name the file.
pub fn write_safetensors(path: impl AsRef<Path>, tensors: &BTreeMap<String, HostTensor>) -> Result<()> {
    let path = path.as_ref();
    let bytes = safetensors_to_bytes(tensors, None).with_context(|| format!("writing {}", path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the folder {}", dir.display()))?;
    }
    // Through a temporary file: an interrupted write never leaves half a file under the name.
    pfx_compiler::onnx_io::write_atomically(path, &bytes)
        .with_context(|| format!("writing safetensors file {}", path.display()))
}

struct OwnedView {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &OwnedView {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_all_dtypes() {
        let mut m = BTreeMap::new();
        m.insert("a".to_string(), HostTensor::from_f32([2, 2], vec![1.0, -2.0, 3.5, 0.0]).unwrap());
        m.insert("b".to_string(), HostTensor::from_i64([3], vec![1, -2, i64::MAX]).unwrap());
        m.insert("c".to_string(), HostTensor::from_bool([2], vec![true, false]).unwrap());
        m.insert("d".to_string(), HostTensor::scalar_f64(0.25));
        m.insert("e".to_string(), HostTensor::from_u8([1, 2], vec![7, 255]).unwrap());
        m.insert("f".to_string(), HostTensor::from_i32([0, 3], vec![]).unwrap());
        m.insert("g".to_string(), HostTensor::from_f16_bits([2], vec![0x3c00, 0xc000]).unwrap());
        m.insert("h".to_string(), HostTensor::from_i8([2], vec![-5, 5]).unwrap());
        let bytes = safetensors_to_bytes(&m, None).unwrap();
        let back = safetensors_from_bytes(&bytes, "mem").unwrap();
        assert_eq!(m, back);
        assert_eq!(back["g"].to_f64_vec(), vec![1.0, -2.0]);
    }

    #[test]
    fn shape_checked() {
        let e = HostTensor::from_f32([2, 3], vec![1.0]).unwrap_err().to_string();
        assert!(e.contains("[2, 3]") && e.contains("6"), "{e}");
        let t = HostTensor::scalar_i64(3);
        assert!(t.as_f32().unwrap_err().to_string().contains("int64"));
    }

    #[test]
    fn error_measures() {
        let r = HostTensor::from_f32([3], vec![1.0, 2.0, 0.0]).unwrap();
        let a = HostTensor::from_f32([3], vec![1.0, 2.5, 1e-6]).unwrap();
        assert_eq!(a.max_abs_error(&r).unwrap(), 0.5);
        assert!(a.max_rel_error(&r).unwrap() > 1e20); // 1e-6 / TINY
        assert_eq!(a.scaled_max_error(&r).unwrap(), 0.25);
        let n = a.norm_rel_error(&r).unwrap();
        assert!((n - (0.25f64 + 1e-12).sqrt() / 5f64.sqrt()).abs() < 1e-9);
        assert_eq!(r.norm_rel_error(&r).unwrap(), 0.0);
        let nan = HostTensor::from_f32([3], vec![f32::NAN, 2.0, 0.0]).unwrap();
        assert!(nan.max_abs_error(&r).unwrap().is_infinite());
        assert_eq!(nan.max_abs_error(&nan).unwrap(), 0.0);
        let other = HostTensor::from_f32([1, 3], vec![1.0, 2.0, 0.0]).unwrap();
        assert!(other.norm_rel_error(&r).is_err());
    }

    #[test]
    fn bad_bytes_name_origin() {
        let e = safetensors_from_bytes(b"garbage", "x.safetensors").unwrap_err();
        assert!(format!("{e:#}").contains("x.safetensors"));
    }
}
