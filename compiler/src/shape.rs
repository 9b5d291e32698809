//! Shape and type inference for the canonical op vocabulary, on concrete shapes.
//!
//! Specialization gives every graph input a concrete shape first, so inference here only deals with known
//! dimensions; constant inputs (Reshape targets, Slice bounds, ...) are read from the initializers.

use anyhow::{anyhow, bail, Result};

use crate::eval::{broadcast_shapes, ints, norm_axis, reshape_target, slice_axis, squeeze_shape, unsqueeze_shape};
use crate::ir::{Attr, Node, ValueType};
use crate::tensor::{DType, Tensor};

/// Ops whose single output has the type and shape of input 0.
const SAME_AS_INPUT: &[&str] = &[
    "Identity",
    "Neg",
    "Abs",
    "Sqrt",
    "Exp",
    "Log",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Tanh",
    "Sigmoid",
    "Relu",
    "Erf",
    "Sign",
    "Sin",
    "Cos",
    "Softmax",
    "LogSoftmax",
    "Gelu",
    "FastGelu",
    "Trilu",
    "CumSum",
    "Dropout",
    "Not",
    "Elu",
    "LeakyRelu",
    "HardSigmoid",
    "Softplus",
    "Clip",
];
const BROADCAST: &[&str] =
    &["Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "PRelu", "BitwiseAnd"];
const COMPARE: &[&str] = &["Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor"];

/// Every op the compiler understands (default domain). An op outside this list is refused at load time.
pub fn known_op(op: &str) -> bool {
    SAME_AS_INPUT.contains(&op)
        || BROADCAST.contains(&op)
        || COMPARE.contains(&op)
        || matches!(
            op,
            "Cast"
                | "CastLike"
                | "Shape"
                | "Size"
                | "Reshape"
                | "Flatten"
                | "Unsqueeze"
                | "Squeeze"
                | "Concat"
                | "Gather"
                | "GatherElements"
                | "Slice"
                | "Transpose"
                | "Expand"
                | "Tile"
                | "ConstantOfShape"
                | "Range"
                | "Where"
                | "MatMul"
                | "Gemm"
                | "Split"
                | "LayerNormalization"
                | "ReduceSum"
                | "ReduceProd"
                | "ReduceMax"
                | "ReduceMin"
                | "ReduceMean"
                | "ReduceLogSumExp"
                | "Constant"
                | "If"
                | "Einsum"
                | "ScatterND"
                | "ScatterElements"
                | "OneHot"
                | "GatherND"
                | "IsNaN"
                | "IsInf"
                | "NonZero"
        )
}

fn known(dtype: DType, shape: Vec<usize>) -> ValueType {
    ValueType::known(dtype, &shape)
}

/// Infers the output types of `node` from its input types and constant inputs.
pub fn infer(node: &Node, types: &[Option<ValueType>], consts: &[Option<&Tensor>]) -> Result<Vec<ValueType>> {
    let label = node.label();
    let ty = |i: usize| -> Result<&ValueType> {
        types.get(i).and_then(|t| t.as_ref()).ok_or_else(|| anyhow!("{label}: the type of input {i} is unknown"))
    };
    let shape = |i: usize| -> Result<Vec<usize>> {
        let t = ty(i)?;
        t.concrete().ok_or_else(|| anyhow!("{label}: input {i} has no concrete shape ({})", t.describe()))
    };
    let konst = |i: usize| -> Result<&Tensor> {
        consts.get(i).copied().flatten().ok_or_else(|| {
            anyhow!(
                "{label}: input {i} ('{}') must be a constant after specialization (it sets a shape, axis or bound)",
                node.inputs.get(i).map(String::as_str).unwrap_or("")
            )
        })
    };
    let op = node.op.as_str();
    if !node.domain.is_empty() {
        bail!("{label}: ops of domain '{}' are not supported", node.domain);
    }
    let one = |t: ValueType| Ok(vec![t]);
    if SAME_AS_INPUT.contains(&op) {
        let t = ty(0)?.clone();
        let mut out = vec![t.clone()];
        if op == "Dropout" && node.outputs.len() > 1 {
            out.push(ValueType { dtype: DType::Bool, shape: t.shape });
        }
        return Ok(out);
    }
    if BROADCAST.contains(&op) || COMPARE.contains(&op) {
        let mut s = shape(0)?;
        for i in 1..node.inputs.len() {
            s = broadcast_shapes(&s, &shape(i)?).map_err(|e| anyhow!("{label}: {e}"))?;
        }
        let dt = if COMPARE.contains(&op) { DType::Bool } else { ty(0)?.dtype };
        return one(known(dt, s));
    }
    match op {
        "Cast" => {
            let to = node.int("to").ok_or_else(|| anyhow!("{label}: no 'to'"))? as i32;
            let dt = DType::from_onnx(to).ok_or_else(|| anyhow!("{label}: unsupported 'to' {to}"))?;
            one(ValueType { dtype: dt, shape: ty(0)?.shape.clone() })
        }
        "CastLike" => one(ValueType { dtype: ty(1)?.dtype, shape: ty(0)?.shape.clone() }),
        "Shape" => {
            let r = shape(0)?.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r);
            let (s, e) = (clamp(node.int("start").unwrap_or(0)), clamp(node.int("end").unwrap_or(r)));
            one(known(DType::I64, vec![(e - s).max(0) as usize]))
        }
        "Size" => one(known(DType::I64, vec![])),
        "Reshape" => {
            let s = reshape_target(&shape(0)?, &ints(konst(1)?)?, node.int("allowzero").unwrap_or(0) != 0)
                .map_err(|e| anyhow!("{label}: {e}"))?;
            one(known(ty(0)?.dtype, s))
        }
        "Flatten" => {
            let s = shape(0)?;
            let axis = norm_axis(node.int("axis").unwrap_or(1), s.len() + 1)?;
            let a: usize = s[..axis].iter().product();
            let b: usize = s[axis..].iter().product();
            one(known(ty(0)?.dtype, vec![a, b]))
        }
        "Unsqueeze" => one(known(ty(0)?.dtype, unsqueeze_shape(&shape(0)?, &ints(konst(1)?)?)?)),
        "Squeeze" => {
            let axes = if node.input(1).is_some() { Some(ints(konst(1)?)?) } else { None };
            one(known(ty(0)?.dtype, squeeze_shape(&shape(0)?, axes.as_deref()).map_err(|e| anyhow!("{label}: {e}"))?))
        }
        "Concat" => {
            let s0 = shape(0)?;
            let axis = norm_axis(node.int("axis").unwrap_or(0), s0.len())?;
            let mut s = s0.clone();
            s[axis] = 0;
            for i in 0..node.inputs.len() {
                let si = shape(i)?;
                if si.len() != s0.len() {
                    bail!("{label}: Concat of ranks {} and {}", s0.len(), si.len());
                }
                s[axis] += si[axis];
            }
            one(known(ty(0)?.dtype, s))
        }
        "Gather" => {
            let d = shape(0)?;
            let axis = norm_axis(node.int("axis").unwrap_or(0), d.len())?;
            let mut s = d[..axis].to_vec();
            s.extend(shape(1)?);
            s.extend_from_slice(&d[axis + 1..]);
            one(known(ty(0)?.dtype, s))
        }
        "GatherElements" => one(known(ty(0)?.dtype, shape(1)?)),
        "GatherND" => {
            let (d, ix) = (shape(0)?, shape(1)?);
            let b = node.int("batch_dims").unwrap_or(0) as usize;
            let k = *ix.last().ok_or_else(|| anyhow!("{label}: scalar indices"))?;
            let mut s = ix[..ix.len() - 1].to_vec();
            s.extend_from_slice(&d[(b + k).min(d.len())..]);
            one(known(ty(0)?.dtype, s))
        }
        "IsNaN" | "IsInf" => one(ValueType { dtype: DType::Bool, shape: ty(0)?.shape.clone() }),
        "NonZero" => {
            // Its count depends on the values: known only for a constant input (then the node is folded).
            let t = konst(0)?;
            let count =
                t.as_f64s().ok_or_else(|| anyhow!("{label}: cannot count nonzeros of {}", t.dtype().short()))?;
            one(known(DType::I64, vec![t.shape.len(), count.iter().filter(|&&x| x != 0.0).count()]))
        }
        "Slice" => {
            let mut s = shape(0)?;
            let starts = ints(konst(1)?)?;
            let ends = ints(konst(2)?)?;
            let axes = if node.input(3).is_some() { ints(konst(3)?)? } else { (0..starts.len() as i64).collect() };
            let steps = if node.input(4).is_some() { ints(konst(4)?)? } else { vec![1; starts.len()] };
            let r = s.len();
            for k in 0..starts.len() {
                let a = norm_axis(axes[k], r)?;
                s[a] = slice_axis(s[a], starts[k], ends[k], steps[k]).2;
            }
            one(known(ty(0)?.dtype, s))
        }
        "Transpose" => {
            let s = shape(0)?;
            let perm: Vec<usize> = match node.ints("perm") {
                Some(p) => p.iter().map(|&x| x as usize).collect(),
                None => (0..s.len()).rev().collect(),
            };
            one(known(ty(0)?.dtype, perm.iter().map(|&p| s[p]).collect()))
        }
        "Expand" => {
            let target: Vec<usize> = ints(konst(1)?)?.iter().map(|&d| d as usize).collect();
            one(known(ty(0)?.dtype, broadcast_shapes(&shape(0)?, &target).map_err(|e| anyhow!("{label}: {e}"))?))
        }
        "Tile" => {
            let reps = ints(konst(1)?)?;
            one(known(ty(0)?.dtype, shape(0)?.iter().zip(&reps).map(|(&d, &r)| d * r as usize).collect()))
        }
        "ConstantOfShape" => {
            let s: Vec<usize> = ints(konst(0)?)?.iter().map(|&d| d as usize).collect();
            let dt = match node.attrs.get("value") {
                Some(Attr::Tensor(t)) => t.dtype(),
                _ => DType::F32,
            };
            one(known(dt, s))
        }
        "Range" => {
            // The length depends on the bounds: they must be constants.
            let (st, li, de) = (konst(0)?, konst(1)?, konst(2)?);
            let (a, b, d) = match (st.as_f64s(), li.as_f64s(), de.as_f64s()) {
                (Some(a), Some(b), Some(d)) => (a[0], b[0], d[0]),
                _ => bail!("{label}: non-numeric Range bounds"),
            };
            if d == 0.0 {
                bail!("{label}: Range with delta 0");
            }
            let n = ((b - a) / d).ceil().max(0.0) as usize;
            one(known(st.dtype(), vec![n]))
        }
        "Where" => {
            let s = broadcast_shapes(&broadcast_shapes(&shape(0)?, &shape(1)?)?, &shape(2)?)
                .map_err(|e| anyhow!("{label}: {e}"))?;
            one(known(ty(1)?.dtype, s))
        }
        "MatMul" => {
            let (a, b) = (shape(0)?, shape(1)?);
            one(known(ty(0)?.dtype, matmul_shape(&a, &b).map_err(|e| anyhow!("{label}: {e}"))?))
        }
        "Gemm" => {
            let (a, b) = (shape(0)?, shape(1)?);
            let m = if node.int("transA").unwrap_or(0) != 0 { a[1] } else { a[0] };
            let n = if node.int("transB").unwrap_or(0) != 0 { b[0] } else { b[1] };
            one(known(ty(0)?.dtype, vec![m, n]))
        }
        "Split" => {
            let s = shape(0)?;
            let axis = norm_axis(node.int("axis").unwrap_or(0), s.len())?;
            let sizes = split_sizes(node, s[axis], consts.get(1).copied().flatten())?;
            Ok(sizes
                .into_iter()
                .map(|n| {
                    let mut o = s.clone();
                    o[axis] = n;
                    known(ty(0).unwrap().dtype, o)
                })
                .collect())
        }
        "LayerNormalization" => {
            let s = shape(0)?;
            let axis = norm_axis(node.int("axis").unwrap_or(-1), s.len())?;
            let mut stat = s.clone();
            for d in stat.iter_mut().skip(axis) {
                *d = 1;
            }
            let dt = ty(0)?.dtype;
            Ok(vec![known(dt, s), known(DType::F32, stat.clone()), known(DType::F32, stat)]
                .into_iter()
                .take(node.outputs.len())
                .collect())
        }
        "ReduceSum" | "ReduceProd" | "ReduceMax" | "ReduceMin" | "ReduceMean" | "ReduceLogSumExp" => {
            let s = shape(0)?;
            let axes: Vec<usize> = match node.input(1) {
                Some(_) => ints(konst(1)?)?.iter().map(|&a| norm_axis(a, s.len())).collect::<Result<_>>()?,
                None => (0..s.len()).collect(),
            };
            let keep = node.int("keepdims").unwrap_or(1) != 0;
            let out = if keep {
                s.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect()
            } else {
                s.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect()
            };
            one(known(ty(0)?.dtype, out))
        }
        "OneHot" => {
            let s = shape(0)?;
            let depth = ints(konst(1)?)?[0] as usize;
            let axis = norm_axis(node.int("axis").unwrap_or(-1), s.len() + 1)?;
            let mut o = s.clone();
            o.insert(axis, depth);
            one(known(ty(2)?.dtype, o))
        }
        "ScatterND" | "ScatterElements" => one(ty(0)?.clone()),
        _ => bail!("{label}: no shape inference for this op"),
    }
}

pub fn matmul_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    if a.is_empty() || b.is_empty() {
        bail!("MatMul of a scalar");
    }
    let (a2, pa) = if a.len() == 1 { (vec![1, a[0]], true) } else { (a.to_vec(), false) };
    let (b2, pb) = if b.len() == 1 { (vec![b[0], 1], true) } else { (b.to_vec(), false) };
    let (m, k1) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k1 != k2 {
        bail!("MatMul inner dimensions differ: {a:?} x {b:?}");
    }
    let mut out = broadcast_shapes(&a2[..a2.len() - 2], &b2[..b2.len() - 2])?;
    if !pa {
        out.push(m);
    }
    if !pb {
        out.push(n);
    }
    Ok(out)
}

/// Output sizes of a (canonical, split-as-input) Split.
pub fn split_sizes(node: &Node, dim: usize, split: Option<&Tensor>) -> Result<Vec<usize>> {
    if let Some(t) = split {
        let v: Vec<usize> = ints(t)?.iter().map(|&x| x as usize).collect();
        if v.iter().sum::<usize>() != dim {
            bail!("{}: split sizes {v:?} do not add up to {dim}", node.label());
        }
        return Ok(v);
    }
    if node.input(1).is_some() {
        bail!("{}: the split sizes must be constant", node.label());
    }
    let n = node.outputs.len();
    let chunk = dim.div_ceil(n);
    Ok((0..n).map(|i| chunk.min(dim.saturating_sub(i * chunk))).collect())
}
