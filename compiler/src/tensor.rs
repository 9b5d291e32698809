//! Host tensors held by the compiler: initializers, folded constants, attribute tensors.
//!
//! Data is kept typed for the element types the compiler computes on (folding shape arithmetic and masks),
//! and as raw little-endian bytes for the rest (fp16 weights, uint8, ...), which only pass through.

use std::borrow::Cow;
use std::sync::Arc;

use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    U16,
    U32,
    U64,
    Bool,
}

impl DType {
    pub fn from_onnx(code: i32) -> Option<DType> {
        Some(match code {
            1 => DType::F32,
            2 => DType::U8,
            3 => DType::I8,
            4 => DType::U16,
            5 => DType::I16,
            6 => DType::I32,
            7 => DType::I64,
            9 => DType::Bool,
            10 => DType::F16,
            11 => DType::F64,
            12 => DType::U32,
            13 => DType::U64,
            16 => DType::BF16,
            _ => return None,
        })
    }

    pub fn onnx_code(self) -> i32 {
        match self {
            DType::F32 => 1,
            DType::U8 => 2,
            DType::I8 => 3,
            DType::U16 => 4,
            DType::I16 => 5,
            DType::I32 => 6,
            DType::I64 => 7,
            DType::Bool => 9,
            DType::F16 => 10,
            DType::F64 => 11,
            DType::U32 => 12,
            DType::U64 => 13,
            DType::BF16 => 16,
        }
    }

    pub fn size_of(self) -> usize {
        match self {
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::I16 => "i16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::U16 => "u16",
            DType::U32 => "u32",
            DType::U64 => "u64",
            DType::Bool => "bool",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }
}

/// Element storage. Typed variants are the ones the constant folder computes on.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    Bool(Vec<bool>),
    /// Little-endian bytes of any other element type.
    Raw(DType, Vec<u8>),
}

impl Data {
    /// The values as little-endian bytes, borrowed on a little-endian machine: writing a bundle goes through
    /// every weight (a 150 MB embedding among them), and a byte-by-byte copy of each took ~1 s per compile.
    pub fn le_bytes(&self) -> Cow<'_, [u8]> {
        #[cfg(target_endian = "little")]
        match self {
            Data::F32(v) => return Cow::Borrowed(bytes_of(v)),
            Data::F64(v) => return Cow::Borrowed(bytes_of(v)),
            Data::I64(v) => return Cow::Borrowed(bytes_of(v)),
            Data::I32(v) => return Cow::Borrowed(bytes_of(v)),
            _ => {}
        }
        match self {
            Data::F32(v) => Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Data::F64(v) => Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Data::I64(v) => Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Data::I32(v) => Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Data::Bool(v) => Cow::Owned(v.iter().map(|&b| b as u8).collect()),
            Data::Raw(_, b) => Cow::Borrowed(b),
        }
    }
}

/// Number types whose every byte is initialized (no padding): the only ones [`bytes_of`] takes.
#[cfg(target_endian = "little")]
trait PlainNumber: Copy {}
#[cfg(target_endian = "little")]
impl PlainNumber for f32 {}
#[cfg(target_endian = "little")]
impl PlainNumber for f64 {}
#[cfg(target_endian = "little")]
impl PlainNumber for i64 {}
#[cfg(target_endian = "little")]
impl PlainNumber for i32 {}

/// The memory of a slice of plain numbers as bytes.
#[cfg(target_endian = "little")]
fn bytes_of<T: PlainNumber>(v: &[T]) -> &[u8] {
    // SAFETY: u8 has alignment 1 and any value; `PlainNumber` types have no padding, so every byte is initialized;
    // the length is exactly the slice's size in bytes, and the borrow keeps `v` alive.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Arc<Data>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Data) -> Tensor {
        Tensor { shape, data: Arc::new(data) }
    }
    pub fn f32(shape: Vec<usize>, v: Vec<f32>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), v.len());
        Tensor::new(shape, Data::F32(v))
    }
    pub fn i64(shape: Vec<usize>, v: Vec<i64>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), v.len());
        Tensor::new(shape, Data::I64(v))
    }
    pub fn bool(shape: Vec<usize>, v: Vec<bool>) -> Tensor {
        Tensor::new(shape, Data::Bool(v))
    }
    pub fn scalar_f32(x: f32) -> Tensor {
        Tensor::f32(vec![], vec![x])
    }
    pub fn scalar_i64(x: i64) -> Tensor {
        Tensor::i64(vec![], vec![x])
    }
    pub fn vec_i64(v: &[i64]) -> Tensor {
        Tensor::i64(vec![v.len()], v.to_vec())
    }

    pub fn dtype(&self) -> DType {
        match &*self.data {
            Data::F32(_) => DType::F32,
            Data::F64(_) => DType::F64,
            Data::I64(_) => DType::I64,
            Data::I32(_) => DType::I32,
            Data::Bool(_) => DType::Bool,
            Data::Raw(dt, _) => *dt,
        }
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn byte_len(&self) -> usize {
        self.len() * self.dtype().size_of()
    }

    /// Builds a tensor from little-endian bytes, checking the length.
    pub fn from_le_bytes(dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if bytes.len() != n * dtype.size_of() {
            bail!(
                "{} bytes for a {}{:?} tensor, which needs {}",
                bytes.len(),
                dtype.short(),
                shape,
                n * dtype.size_of()
            );
        }
        fn chunks<const N: usize, T>(b: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            b.chunks_exact(N).map(|c| f(c.try_into().unwrap())).collect()
        }
        let data = match dtype {
            DType::F32 => Data::F32(chunks(bytes, f32::from_le_bytes)),
            DType::F64 => Data::F64(chunks(bytes, f64::from_le_bytes)),
            DType::I64 => Data::I64(chunks(bytes, i64::from_le_bytes)),
            DType::I32 => Data::I32(chunks(bytes, i32::from_le_bytes)),
            DType::Bool => Data::Bool(bytes.iter().map(|&b| b != 0).collect()),
            other => Data::Raw(other, bytes.to_vec()),
        };
        Ok(Tensor::new(shape, data))
    }

    pub fn to_le_bytes(&self) -> Vec<u8> {
        self.data.le_bytes().into_owned()
    }

    /// Integer view (ints and bools); None for floats and raw types.
    pub fn as_i64s(&self) -> Option<Vec<i64>> {
        match &*self.data {
            Data::I64(v) => Some(v.clone()),
            Data::I32(v) => Some(v.iter().map(|&x| x as i64).collect()),
            Data::Bool(v) => Some(v.iter().map(|&x| x as i64).collect()),
            _ => None,
        }
    }

    /// Numeric view in f64 of every computable type.
    pub fn as_f64s(&self) -> Option<Vec<f64>> {
        match &*self.data {
            Data::F32(v) => Some(v.iter().map(|&x| x as f64).collect()),
            Data::F64(v) => Some(v.clone()),
            Data::I64(v) => Some(v.iter().map(|&x| x as f64).collect()),
            Data::I32(v) => Some(v.iter().map(|&x| x as f64).collect()),
            Data::Bool(v) => Some(v.iter().map(|&x| x as u8 as f64).collect()),
            Data::Raw(..) => None,
        }
    }

    /// Builds a tensor of `dtype` from f64 values (the constant folder's common currency).
    pub fn from_f64s(dtype: DType, shape: Vec<usize>, v: Vec<f64>) -> Result<Tensor> {
        let data = match dtype {
            DType::F32 => Data::F32(v.into_iter().map(|x| x as f32).collect()),
            DType::F64 => Data::F64(v),
            DType::I64 => Data::I64(v.into_iter().map(|x| x as i64).collect()),
            DType::I32 => Data::I32(v.into_iter().map(|x| x as i32).collect()),
            DType::Bool => Data::Bool(v.into_iter().map(|x| x != 0.0).collect()),
            other => bail!("cannot compute on {} tensors", other.short()),
        };
        Ok(Tensor::new(shape, data))
    }

    /// Exact integer form for integer dtypes (f64 loses precision past 2^53).
    pub fn from_i64s(dtype: DType, shape: Vec<usize>, v: Vec<i64>) -> Result<Tensor> {
        let data = match dtype {
            DType::I64 => Data::I64(v),
            DType::I32 => Data::I32(v.into_iter().map(|x| x as i32).collect()),
            DType::Bool => Data::Bool(v.into_iter().map(|x| x != 0).collect()),
            DType::F32 => Data::F32(v.into_iter().map(|x| x as f32).collect()),
            DType::F64 => Data::F64(v.into_iter().map(|x| x as f64).collect()),
            other => bail!("cannot compute on {} tensors", other.short()),
        };
        Ok(Tensor::new(shape, data))
    }

    pub fn cast(&self, to: DType) -> Result<Tensor> {
        if self.dtype() == to {
            return Ok(self.clone());
        }
        if let (Some(v), false) = (self.as_i64s(), to.is_float()) {
            return Tensor::from_i64s(to, self.shape.clone(), v);
        }
        match self.as_f64s() {
            Some(v) => {
                // ONNX Cast float -> int truncates toward zero, as `as` does.
                Tensor::from_f64s(to, self.shape.clone(), v)
            }
            None => bail!("cannot cast {} to {}", self.dtype().short(), to.short()),
        }
    }

    pub fn reshape(&self, shape: Vec<usize>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), self.len());
        Tensor { shape, data: self.data.clone() }
    }

    /// All elements equal to `x` (for recognising all-zero / all-one constants).
    pub fn all_equal(&self, x: f64) -> bool {
        self.as_f64s().map(|v| v.iter().all(|&e| e == x)).unwrap_or(false)
    }

    /// A short readable summary: `f32[2,3]` plus the values when there are few.
    pub fn describe(&self) -> String {
        let shape = self.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",");
        let mut s = format!("{}[{}]", self.dtype().short(), shape);
        if self.len() <= 8 {
            match &*self.data {
                Data::F32(v) => s += &format!(" {:?}", v),
                Data::F64(v) => s += &format!(" {:?}", v),
                Data::I64(v) => s += &format!(" {:?}", v),
                Data::I32(v) => s += &format!(" {:?}", v),
                Data::Bool(v) => s += &format!(" {:?}", v),
                Data::Raw(..) => {}
            }
        }
        s
    }
}

/// Row-major strides of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut st = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        st[i] = st[i + 1] * shape[i + 1];
    }
    st
}
