//! A small reference evaluator for canonical ONNX ops on host tensors.
//!
//! The specializer uses it to fold everything that depends only on shapes and constants (shape arithmetic,
//! position ids, causal masks). It favours clarity over speed: folded tensors are small.

use anyhow::{anyhow, bail, Context, Result};

use crate::ir::Node;
use crate::tensor::{strides, DType, Data, Tensor};

/// Evaluates `node` on constant inputs (None = omitted optional input). Returns None when the op is not
/// one the evaluator knows; errors are real inconsistencies (bad shapes, bad indices).
pub fn eval_node(node: &Node, inputs: &[Option<&Tensor>]) -> Result<Option<Vec<Tensor>>> {
    if !node.domain.is_empty() {
        return Ok(None);
    }
    let inp = |i: usize| -> Result<&Tensor> {
        inputs.get(i).copied().flatten().ok_or_else(|| anyhow!("{}: input {i} is missing", node.label()))
    };
    let out = match node.op.as_str() {
        "Identity" => inp(0)?.clone(),
        "Cast" => {
            let to = node.int("to").ok_or_else(|| anyhow!("{}: no 'to'", node.label()))?;
            let to = DType::from_onnx(to as i32).ok_or_else(|| anyhow!("{}: bad 'to' {to}", node.label()))?;
            match inp(0)?.cast(to) {
                Ok(t) => t,
                Err(_) => return Ok(None),
            }
        }
        "CastLike" => match inp(0)?.cast(inp(1)?.dtype()) {
            Ok(t) => t,
            Err(_) => return Ok(None),
        },
        "Shape" => {
            let shape: Vec<i64> = inp(0)?.shape.iter().map(|&d| d as i64).collect();
            let (s, e) = shape_range(node, shape.len());
            Tensor::vec_i64(&shape[s..e])
        }
        "Size" => Tensor::scalar_i64(inp(0)?.len() as i64),
        "Reshape" => {
            let t = inp(0)?;
            let target = ints(inp(1)?)?;
            let shape = reshape_target(&t.shape, &target, node.int("allowzero").unwrap_or(0) != 0)
                .with_context(|| node.label())?;
            t.reshape(shape)
        }
        "Flatten" => {
            let t = inp(0)?;
            let axis = norm_axis(node.int("axis").unwrap_or(1), t.shape.len() + 1)?;
            let a: usize = t.shape[..axis].iter().product();
            t.reshape(vec![a, t.len() / a.max(1)])
        }
        "Unsqueeze" => {
            let t = inp(0)?;
            let axes = ints(inp(1)?)?;
            t.reshape(unsqueeze_shape(&t.shape, &axes)?)
        }
        "Squeeze" => {
            let t = inp(0)?;
            let axes = match inputs.get(1).copied().flatten() {
                Some(a) => Some(ints(a)?),
                None => None,
            };
            t.reshape(squeeze_shape(&t.shape, axes.as_deref())?)
        }
        "Concat" => {
            let ts: Vec<&Tensor> =
                inputs.iter().map(|t| t.ok_or_else(|| anyhow!("missing input"))).collect::<Result<_>>()?;
            let axis = norm_axis(node.int("axis").unwrap_or(0), ts[0].shape.len())?;
            concat(&ts, axis)?
        }
        "Gather" => {
            let (data, idx) = (inp(0)?, inp(1)?);
            let axis = norm_axis(node.int("axis").unwrap_or(0), data.shape.len())?;
            gather(data, &ints(idx)?, &idx.shape, axis)?
        }
        "GatherND" => {
            if node.int("batch_dims").unwrap_or(0) != 0 {
                return Ok(None);
            }
            let (data, ix) = (inp(0)?, inp(1)?);
            let k = *ix.shape.last().ok_or_else(|| anyhow!("{}: scalar indices", node.label()))?;
            let iv = ints(ix)?;
            let st = strides(&data.shape);
            let inner: usize = data.shape[k..].iter().product();
            let mut shape = ix.shape[..ix.shape.len() - 1].to_vec();
            shape.extend_from_slice(&data.shape[k..]);
            let mut offsets = Vec::new();
            for tuple in iv.chunks(k.max(1)) {
                let mut base = 0;
                for (a, &i) in tuple.iter().enumerate().take(k) {
                    let d = data.shape[a] as i64;
                    let i = if i < 0 { i + d } else { i };
                    if i < 0 || i >= d {
                        bail!("{}: index {i} out of range for size {d}", node.label());
                    }
                    base += i as usize * st[a];
                }
                offsets.extend(base..base + inner);
            }
            take(data, shape, &offsets)
        }
        "NonZero" => {
            // [rank, count]: the indices of the nonzero elements, in row-major order (folded only where its input
            // is a constant, as torch.repeat_interleave's export of a constant repeat count gives).
            let t = inp(0)?;
            let v = f64s(t)?;
            let st = strides(&t.shape);
            let hits: Vec<usize> = (0..v.len()).filter(|&i| v[i] != 0.0).collect();
            let mut idx = vec![0i64; t.shape.len() * hits.len()];
            for (j, &flat) in hits.iter().enumerate() {
                for (a, &s) in st.iter().enumerate() {
                    idx[a * hits.len() + j] = ((flat / s.max(1)) % t.shape[a].max(1)) as i64;
                }
            }
            Tensor::i64(vec![t.shape.len(), hits.len()], idx)
        }
        "IsNaN" => {
            let v = f64s(inp(0)?)?;
            Tensor::bool(inp(0)?.shape.clone(), v.iter().map(|x| x.is_nan()).collect())
        }
        "Slice" => {
            let t = inp(0)?;
            let starts = ints(inp(1)?)?;
            let ends = ints(inp(2)?)?;
            let axes = match inputs.get(3).copied().flatten() {
                Some(a) => ints(a)?,
                None => (0..starts.len() as i64).collect(),
            };
            let steps = match inputs.get(4).copied().flatten() {
                Some(a) => ints(a)?,
                None => vec![1; starts.len()],
            };
            slice(t, &starts, &ends, &axes, &steps)?
        }
        "Transpose" => {
            let t = inp(0)?;
            let perm: Vec<usize> = match node.ints("perm") {
                Some(p) => p.iter().map(|&x| x as usize).collect(),
                None => (0..t.shape.len()).rev().collect(),
            };
            transpose(t, &perm)
        }
        "Expand" => {
            let t = inp(0)?;
            let shape: Vec<usize> = ints(inp(1)?)?.iter().map(|&d| d as usize).collect();
            let out = broadcast_shapes(&t.shape, &shape)?;
            broadcast_to(t, &out)
        }
        "Tile" => {
            let t = inp(0)?;
            let reps = ints(inp(1)?)?;
            let shape: Vec<usize> = t.shape.iter().zip(&reps).map(|(&d, &r)| d * r as usize).collect();
            let src_st = strides(&t.shape);
            let idx = map_indices(&shape, |ix| ix.iter().enumerate().map(|(a, &i)| (i % t.shape[a]) * src_st[a]).sum());
            take(t, shape, &idx)
        }
        "ConstantOfShape" => {
            let shape: Vec<usize> = ints(inp(0)?)?.iter().map(|&d| d as usize).collect();
            let value = match node.attrs.get("value") {
                Some(crate::ir::Attr::Tensor(t)) => t.clone(),
                _ => Tensor::f32(vec![1], vec![0.0]),
            };
            let n: usize = shape.iter().product();
            take(&value, shape, &vec![0; n])
        }
        "Range" => {
            let (s, l, d) = (inp(0)?, inp(1)?, inp(2)?);
            let dt = s.dtype();
            if dt.is_float() {
                let (s, l, d) = (f64s(s)?[0], f64s(l)?[0], f64s(d)?[0]);
                let n = (((l - s) / d).ceil()).max(0.0) as usize;
                Tensor::from_f64s(dt, vec![n], (0..n).map(|i| s + i as f64 * d).collect())?
            } else {
                let (s, l, d) = (ints(s)?[0], ints(l)?[0], ints(d)?[0]);
                if d == 0 {
                    bail!("{}: Range with delta 0", node.label());
                }
                let n = ((l - s) as f64 / d as f64).ceil().max(0.0) as usize;
                Tensor::from_i64s(dt, vec![n], (0..n as i64).map(|i| s + i * d).collect())?
            }
        }
        "Where" => {
            let (c, a, b) = (inp(0)?, inp(1)?, inp(2)?);
            let shape = broadcast_shapes(&broadcast_shapes(&c.shape, &a.shape)?, &b.shape)?;
            let (c, a, b) = (broadcast_to(c, &shape), broadcast_to(a, &shape), broadcast_to(b, &shape));
            let cv = ints(&c)?;
            let idx: Vec<usize> = (0..cv.len()).collect();
            let av = take(&a, shape.clone(), &idx);
            // Pick element-wise through the f64/i64 view of the common type.
            if a.dtype().is_float() {
                let (x, y) = (f64s(&av)?, f64s(&b)?);
                Tensor::from_f64s(
                    a.dtype(),
                    shape,
                    cv.iter().enumerate().map(|(i, &k)| if k != 0 { x[i] } else { y[i] }).collect(),
                )?
            } else {
                let (x, y) = (ints(&av)?, ints(&b)?);
                Tensor::from_i64s(
                    a.dtype(),
                    shape,
                    cv.iter().enumerate().map(|(i, &k)| if k != 0 { x[i] } else { y[i] }).collect(),
                )?
            }
        }
        "Trilu" => {
            let t = inp(0)?;
            let k = match inputs.get(1).copied().flatten() {
                Some(k) => ints(k)?[0],
                None => 0,
            };
            let upper = node.int("upper").unwrap_or(1) != 0;
            let r = t.shape.len();
            let (rows, cols) = (t.shape[r - 2], t.shape[r - 1]);
            let v = f64s(t)?;
            let out: Vec<f64> = v
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    let (row, col) = (((i / cols) % rows) as i64, (i % cols) as i64);
                    let keep = if upper { col - row >= k } else { col - row <= k };
                    if keep {
                        x
                    } else {
                        0.0
                    }
                })
                .collect();
            Tensor::from_f64s(t.dtype(), t.shape.clone(), out)?
        }
        "CumSum" => {
            let t = inp(0)?;
            let axis = norm_axis(ints(inp(1)?)?[0], t.shape.len())?;
            if node.int("exclusive").unwrap_or(0) != 0 || node.int("reverse").unwrap_or(0) != 0 {
                return Ok(None);
            }
            let st = strides(&t.shape);
            let mut v = f64s(t)?;
            for i in 0..v.len() {
                if !(i / st[axis]).is_multiple_of(t.shape[axis]) {
                    v[i] += v[i - st[axis]];
                }
            }
            Tensor::from_f64s(t.dtype(), t.shape.clone(), v)?
        }
        "ReduceSum" | "ReduceProd" | "ReduceMax" | "ReduceMin" | "ReduceMean" => {
            let t = inp(0)?;
            let axes = match inputs.get(1).copied().flatten() {
                Some(a) if !a.is_empty() => ints(a)?,
                _ if node.int("noop_with_empty_axes").unwrap_or(0) != 0 => return Ok(Some(vec![t.clone()])),
                _ => (0..t.shape.len() as i64).collect(),
            };
            reduce(&node.op, t, &axes, node.int("keepdims").unwrap_or(1) != 0)?
        }
        "Not" => {
            let v = ints(inp(0)?)?;
            Tensor::bool(inp(0)?.shape.clone(), v.iter().map(|&x| x == 0).collect())
        }
        "Neg" | "Abs" | "Sqrt" | "Exp" | "Log" | "Reciprocal" | "Floor" | "Ceil" | "Tanh" | "Sigmoid" | "Relu"
        | "Sign" | "Erf" | "Sin" | "Cos" => {
            let t = inp(0)?;
            if !t.dtype().is_float() && !matches!(node.op.as_str(), "Neg" | "Abs" | "Sign" | "Relu") {
                return Ok(None);
            }
            let v = f64s(t)?;
            let f: fn(f64) -> f64 = match node.op.as_str() {
                "Neg" => |x| -x,
                "Abs" => f64::abs,
                "Sqrt" => f64::sqrt,
                "Exp" => f64::exp,
                "Log" => f64::ln,
                "Reciprocal" => |x| 1.0 / x,
                "Floor" => f64::floor,
                "Ceil" => f64::ceil,
                "Tanh" => f64::tanh,
                "Sigmoid" => |x| 1.0 / (1.0 + (-x).exp()),
                "Relu" => |x| x.max(0.0),
                "Sign" => |x| {
                    if x > 0.0 {
                        1.0
                    } else if x < 0.0 {
                        -1.0
                    } else {
                        0.0
                    }
                },
                "Sin" => f64::sin,
                "Cos" => f64::cos,
                _ => erf,
            };
            Tensor::from_f64s(t.dtype(), t.shape.clone(), v.into_iter().map(f).collect())?
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Mod" | "Max" | "Min" | "Equal" | "Less" | "Greater"
        | "LessOrEqual" | "GreaterOrEqual" | "And" | "Or" | "Xor" | "BitwiseAnd" => {
            let mut acc = inp(0)?.clone();
            let n = inputs.len();
            if n < 2 && !matches!(node.op.as_str(), "Max" | "Min") {
                bail!("{}: needs two inputs", node.label());
            }
            for i in 1..n {
                acc = binary(&node.op, &acc, inp(i)?, node.int("fmod").unwrap_or(0) != 0)?;
            }
            acc
        }
        "MatMul" => {
            let (a, b) = (inp(0)?, inp(1)?);
            if a.shape.len() != 2 || b.shape.len() != 2 || !a.dtype().is_float() {
                return Ok(None);
            }
            matmul_2d(a, b)?
        }
        // The lowering pass writes the prefix MLP as Gemms; bake folds them with the baked prefix.
        "Gemm" => {
            let (a, b) = (inp(0)?, inp(1)?);
            if a.shape.len() != 2 || b.shape.len() != 2 || !a.dtype().is_float() {
                return Ok(None);
            }
            let t =
                |x: &Tensor, key: &str| if node.int(key).unwrap_or(0) != 0 { transpose(x, &[1, 0]) } else { x.clone() };
            let mut y = matmul_2d(&t(a, "transA"), &t(b, "transB"))?;
            let alpha = node.float("alpha").unwrap_or(1.0) as f64;
            if alpha != 1.0 {
                y = binary("Mul", &y, &Tensor::from_f64s(y.dtype(), vec![], vec![alpha])?, false)?;
            }
            if let Some(c) = inputs.get(2).copied().flatten() {
                let beta = node.float("beta").unwrap_or(1.0) as f64;
                let c = binary("Mul", c, &Tensor::from_f64s(c.dtype(), vec![], vec![beta])?, false)?;
                y = binary("Add", &y, &c, false)?;
            }
            y
        }
        _ => return Ok(None),
    };
    Ok(Some(vec![out]))
}

/// [m, k] x [k, n], accumulated in f64.
fn matmul_2d(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, k, n) = (a.shape[0], a.shape[1], b.shape[1]);
    if b.shape[0] != k {
        bail!("matrix product of {:?} and {:?}", a.shape, b.shape);
    }
    let (x, y) = (f64s(a)?, f64s(b)?);
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for p in 0..k {
            for j in 0..n {
                out[i * n + j] += x[i * k + p] * y[p * n + j];
            }
        }
    }
    Tensor::from_f64s(a.dtype(), vec![m, n], out)
}

fn shape_range(node: &Node, rank: usize) -> (usize, usize) {
    let clamp = |v: i64| -> usize {
        let v = if v < 0 { v + rank as i64 } else { v };
        v.clamp(0, rank as i64) as usize
    };
    let s = clamp(node.int("start").unwrap_or(0));
    let e = clamp(node.int("end").unwrap_or(rank as i64));
    (s, e.max(s))
}

pub fn ints(t: &Tensor) -> Result<Vec<i64>> {
    t.as_i64s().ok_or_else(|| anyhow!("expected an integer tensor, found {}", t.dtype().short()))
}

fn f64s(t: &Tensor) -> Result<Vec<f64>> {
    t.as_f64s().ok_or_else(|| anyhow!("cannot compute on {} tensors", t.dtype().short()))
}

pub fn norm_axis(axis: i64, rank: usize) -> Result<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a >= rank.max(1) as i64 && !(rank == 0 && a == 0) {
        bail!("axis {axis} is out of range for rank {rank}");
    }
    Ok(a as usize)
}

/// Resolves a Reshape target (0 copies the input dimension unless allowzero, -1 is inferred).
pub fn reshape_target(input: &[usize], target: &[i64], allowzero: bool) -> Result<Vec<usize>> {
    let total: usize = input.iter().product();
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &d) in target.iter().enumerate() {
        match d {
            -1 => {
                if infer.is_some() {
                    bail!("Reshape target {target:?} has two -1");
                }
                infer = Some(i);
                out.push(1);
            }
            0 if !allowzero => out.push(*input.get(i).ok_or_else(|| anyhow!("Reshape 0 beyond the input rank"))?),
            d if d >= 0 => out.push(d as usize),
            d => bail!("Reshape target has a negative dimension {d}"),
        }
    }
    let known: usize = out.iter().product();
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            bail!("cannot reshape {input:?} to {target:?}");
        }
        out[i] = total / known;
    } else if known != total {
        bail!("cannot reshape {input:?} ({total} elements) to {target:?}");
    }
    Ok(out)
}

pub fn unsqueeze_shape(shape: &[usize], axes: &[i64]) -> Result<Vec<usize>> {
    let r = shape.len() + axes.len();
    let mut ax: Vec<usize> = axes.iter().map(|&a| norm_axis(a, r)).collect::<Result<_>>()?;
    ax.sort();
    let mut out = Vec::with_capacity(r);
    let mut src = shape.iter();
    for i in 0..r {
        if ax.contains(&i) {
            out.push(1);
        } else {
            out.push(*src.next().ok_or_else(|| anyhow!("bad Unsqueeze axes {axes:?}"))?);
        }
    }
    Ok(out)
}

pub fn squeeze_shape(shape: &[usize], axes: Option<&[i64]>) -> Result<Vec<usize>> {
    match axes {
        None => Ok(shape.iter().copied().filter(|&d| d != 1).collect()),
        Some(axes) => {
            let ax: Vec<usize> = axes.iter().map(|&a| norm_axis(a, shape.len())).collect::<Result<_>>()?;
            for &a in &ax {
                if shape[a] != 1 {
                    bail!("Squeeze of axis {a} whose size is {} in {shape:?}", shape[a]);
                }
            }
            Ok(shape.iter().enumerate().filter(|(i, _)| !ax.contains(i)).map(|(_, &d)| d).collect())
        }
    }
}

pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
        let db = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            bail!("shapes {a:?} and {b:?} do not broadcast");
        };
    }
    Ok(out)
}

/// Calls `f` with every multi-index of `shape` in row-major order and collects the source offsets.
fn map_indices(shape: &[usize], mut f: impl FnMut(&[usize]) -> usize) -> Vec<usize> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut ix = vec![0usize; shape.len()];
    for _ in 0..n {
        out.push(f(&ix));
        for a in (0..shape.len()).rev() {
            ix[a] += 1;
            if ix[a] < shape[a] {
                break;
            }
            ix[a] = 0;
        }
    }
    out
}

/// Gathers elements of `t` at flat offsets `idx` into a tensor of `shape` (any element type).
fn take(t: &Tensor, shape: Vec<usize>, idx: &[usize]) -> Tensor {
    fn pick<T: Clone>(v: &[T], idx: &[usize]) -> Vec<T> {
        idx.iter().map(|&i| v[i].clone()).collect()
    }
    let data = match &*t.data {
        Data::F32(v) => Data::F32(pick(v, idx)),
        Data::F64(v) => Data::F64(pick(v, idx)),
        Data::I64(v) => Data::I64(pick(v, idx)),
        Data::I32(v) => Data::I32(pick(v, idx)),
        Data::Bool(v) => Data::Bool(pick(v, idx)),
        Data::Raw(dt, b) => {
            let s = dt.size_of();
            Data::Raw(*dt, idx.iter().flat_map(|&i| b[i * s..(i + 1) * s].iter().copied()).collect())
        }
    };
    Tensor::new(shape, data)
}

pub fn broadcast_to(t: &Tensor, shape: &[usize]) -> Tensor {
    if t.shape == shape {
        return t.clone();
    }
    let r = shape.len();
    let off = r - t.shape.len();
    let st = strides(&t.shape);
    let idx = map_indices(shape, |ix| {
        (0..t.shape.len()).map(|a| if t.shape[a] == 1 { 0 } else { ix[a + off] * st[a] }).sum()
    });
    take(t, shape.to_vec(), &idx)
}

pub fn transpose(t: &Tensor, perm: &[usize]) -> Tensor {
    let shape: Vec<usize> = perm.iter().map(|&p| t.shape[p]).collect();
    let st = strides(&t.shape);
    let idx = map_indices(&shape, |ix| ix.iter().enumerate().map(|(a, &i)| i * st[perm[a]]).sum());
    take(t, shape, &idx)
}

fn concat(ts: &[&Tensor], axis: usize) -> Result<Tensor> {
    let mut shape = ts[0].shape.clone();
    shape[axis] = ts.iter().map(|t| t.shape[axis]).sum();
    // Concatenate by stacking flat copies: convert each piece to the index space of a virtual tensor.
    let outer: usize = shape[..axis].iter().product();
    let mut pieces: Vec<Tensor> = Vec::new();
    let mut order = Vec::new();
    for o in 0..outer {
        for (k, t) in ts.iter().enumerate() {
            let inner: usize = t.shape[axis..].iter().product();
            order.push((k, o * inner, inner));
        }
    }
    let dt = ts[0].dtype();
    for t in ts {
        if t.dtype() != dt {
            bail!("Concat of {} and {}", dt.short(), t.dtype().short());
        }
        pieces.push((*t).clone());
    }
    // Each piece's bytes once (taking them per slice made this quadratic in the piece size).
    let piece_bytes: Vec<Vec<u8>> = pieces.iter().map(|t| t.to_le_bytes()).collect();
    let s = dt.size_of();
    let mut bytes: Vec<u8> = Vec::with_capacity(shape.iter().product::<usize>() * s);
    for &(k, start, len) in &order {
        bytes.extend_from_slice(&piece_bytes[k][start * s..(start + len) * s]);
    }
    Tensor::from_le_bytes(dt, shape, &bytes)
}

fn gather(data: &Tensor, idx: &[i64], idx_shape: &[usize], axis: usize) -> Result<Tensor> {
    let d = data.shape[axis] as i64;
    let mut shape = data.shape[..axis].to_vec();
    shape.extend_from_slice(idx_shape);
    shape.extend_from_slice(&data.shape[axis + 1..]);
    let st = strides(&data.shape);
    let ir = idx_shape.len();
    for &i in idx {
        if i < -d || i >= d {
            bail!("Gather index {i} out of range for size {d}");
        }
    }
    let offsets = map_indices(&shape, |ix| {
        let mut off = 0;
        for a in 0..axis {
            off += ix[a] * st[a];
        }
        let flat_i = {
            let ist = strides(idx_shape);
            (0..ir).map(|k| ix[axis + k] * ist[k]).sum::<usize>()
        };
        let mut i = idx[flat_i];
        if i < 0 {
            i += d;
        }
        off += i as usize * st[axis];
        for a in axis + 1..data.shape.len() {
            off += ix[a - 1 + ir] * st[a];
        }
        off
    });
    Ok(take(data, shape, &offsets))
}

/// Normalised (start, step, count) of one Slice axis, as ONNX clamps them.
pub fn slice_axis(dim: usize, start: i64, end: i64, step: i64) -> (i64, i64, usize) {
    let d = dim as i64;
    let norm = |v: i64| if v < 0 { v + d } else { v };
    let (s, e) = (norm(start), norm(end));
    let (s, e) = if step > 0 { (s.clamp(0, d), e.clamp(0, d)) } else { (s.clamp(-1, d - 1), e.clamp(-1, d - 1)) };
    let n = if step > 0 { ((e - s) + step - 1).div_euclid(step) } else { ((s - e) + (-step) - 1).div_euclid(-step) };
    (s, step, n.max(0) as usize)
}

fn slice(t: &Tensor, starts: &[i64], ends: &[i64], axes: &[i64], steps: &[i64]) -> Result<Tensor> {
    let r = t.shape.len();
    let mut begin = vec![0i64; r];
    let mut step = vec![1i64; r];
    let mut shape = t.shape.clone();
    for k in 0..starts.len() {
        let a = norm_axis(axes[k], r)?;
        if steps[k] == 0 {
            bail!("Slice step 0");
        }
        let (s, st, n) = slice_axis(t.shape[a], starts[k], ends[k], steps[k]);
        begin[a] = s;
        step[a] = st;
        shape[a] = n;
    }
    let src = strides(&t.shape);
    let idx = map_indices(&shape, |ix| (0..r).map(|a| (begin[a] + ix[a] as i64 * step[a]) as usize * src[a]).sum());
    Ok(take(t, shape, &idx))
}

fn reduce(op: &str, t: &Tensor, axes: &[i64], keepdims: bool) -> Result<Tensor> {
    let r = t.shape.len();
    let ax: Vec<usize> = axes.iter().map(|&a| norm_axis(a, r)).collect::<Result<_>>()?;
    let out_keep: Vec<usize> = t.shape.iter().enumerate().map(|(i, &d)| if ax.contains(&i) { 1 } else { d }).collect();
    let n_out: usize = out_keep.iter().product();
    let init = match op {
        "ReduceProd" => 1.0,
        "ReduceMax" => f64::NEG_INFINITY,
        "ReduceMin" => f64::INFINITY,
        _ => 0.0,
    };
    let mut acc = vec![init; n_out];
    let v = f64s(t)?;
    let ost = strides(&out_keep);
    let ist = strides(&t.shape);
    for (i, &x) in v.iter().enumerate() {
        let mut o = 0;
        for a in 0..r {
            let c = (i / ist[a]) % t.shape[a];
            if !ax.contains(&a) {
                o += c * ost[a];
            }
        }
        acc[o] = match op {
            "ReduceProd" => acc[o] * x,
            "ReduceMax" => acc[o].max(x),
            "ReduceMin" => acc[o].min(x),
            _ => acc[o] + x,
        };
    }
    if op == "ReduceMean" {
        let cnt: usize = ax.iter().map(|&a| t.shape[a]).product();
        acc.iter_mut().for_each(|x| *x /= cnt as f64);
    }
    let shape = if keepdims {
        out_keep
    } else {
        t.shape.iter().enumerate().filter(|(i, _)| !ax.contains(i)).map(|(_, &d)| d).collect()
    };
    Tensor::from_f64s(t.dtype(), shape, acc)
}

fn binary(op: &str, a: &Tensor, b: &Tensor, fmod: bool) -> Result<Tensor> {
    let shape = broadcast_shapes(&a.shape, &b.shape)?;
    let (a, b) = (broadcast_to(a, &shape), broadcast_to(b, &shape));
    let compare = matches!(op, "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual");
    let logical = matches!(op, "And" | "Or" | "Xor");
    let dt = a.dtype();
    if !dt.is_float() {
        let (x, y) = (ints(&a)?, ints(&b)?);
        let v: Vec<i64> = x
            .iter()
            .zip(&y)
            .map(|(&p, &q)| -> Result<i64> {
                Ok(match op {
                    "Add" => p.wrapping_add(q),
                    "Sub" => p.wrapping_sub(q),
                    "Mul" => p.wrapping_mul(q),
                    "Div" => {
                        if q == 0 {
                            bail!("integer division by zero");
                        }
                        p / q
                    }
                    "Mod" => {
                        if q == 0 {
                            bail!("integer modulo by zero");
                        }
                        let r = p % q;
                        // fmod=0 takes the sign of the divisor, as Python's % does.
                        if fmod || r == 0 || (r < 0) == (q < 0) {
                            r
                        } else {
                            r + q
                        }
                    }
                    "Pow" => p.pow(q as u32),
                    "Max" => p.max(q),
                    "Min" => p.min(q),
                    "Equal" => (p == q) as i64,
                    "Less" => (p < q) as i64,
                    "Greater" => (p > q) as i64,
                    "LessOrEqual" => (p <= q) as i64,
                    "GreaterOrEqual" => (p >= q) as i64,
                    "And" | "BitwiseAnd" => ((p != 0) && (q != 0)) as i64,
                    "Or" => ((p != 0) || (q != 0)) as i64,
                    "Xor" => ((p != 0) ^ (q != 0)) as i64,
                    _ => bail!("op {op}"),
                })
            })
            .collect::<Result<_>>()?;
        let out_dt = if compare || logical { DType::Bool } else { dt };
        return Tensor::from_i64s(out_dt, shape, v);
    }
    let (x, y) = (f64s(&a)?, f64s(&b)?);
    let v: Vec<f64> = x
        .iter()
        .zip(&y)
        .map(|(&p, &q)| match op {
            "Add" => p + q,
            "Sub" => p - q,
            "Mul" => p * q,
            "Div" => p / q,
            "Pow" => p.powf(q),
            "Mod" => p % q,
            "Max" => p.max(q),
            "Min" => p.min(q),
            "Equal" => (p == q) as i64 as f64,
            "Less" => (p < q) as i64 as f64,
            "Greater" => (p > q) as i64 as f64,
            "LessOrEqual" => (p <= q) as i64 as f64,
            "GreaterOrEqual" => (p >= q) as i64 as f64,
            _ => f64::NAN,
        })
        .collect();
    if compare {
        return Tensor::from_f64s(DType::Bool, shape, v);
    }
    // Compute in f64 and round once: exact for + - * / on f32, as the runtimes compute them.
    Tensor::from_f64s(dt, shape, v)
}

/// erf to double precision (Abramowitz-Stegun 7.1.26 is too coarse; use a series / continued fraction).
fn erf(x: f64) -> f64 {
    if x.abs() < 2.5 {
        // Maclaurin series, converges fast for |x| < 2.5.
        let mut sum = x;
        let mut term = x;
        let x2 = x * x;
        for n in 1..100 {
            term *= -x2 / n as f64;
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // Continued fraction for erfc.
        let ax = x.abs();
        let mut f = 0.0;
        for k in (1..60).rev() {
            f = (k as f64 / 2.0) / (ax + f);
        }
        let erfc = (-ax * ax).exp() / std::f64::consts::PI.sqrt() / (ax + f);
        (1.0 - erfc) * x.signum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::ValueType;

    /// NonZero folds a constant (torch.repeat_interleave's export of a constant count: `Less(Range(0, max),
    /// repeats[:, None])`), and its shape is refused for a value that is not one (its count would hang on the data).
    #[test]
    fn nonzero_folds_a_constant_and_refuses_data() {
        let node = Node::new("nz", "NonZero", vec!["x".into()], vec!["y".into()]);
        // repeats [2, 1, 3] against Range(0, 3): rows of true, true / true / true, true, true.
        let x = Tensor::bool(vec![3, 3], vec![true, true, false, true, false, false, true, true, true]);
        let y = eval_node(&node, &[Some(&x)]).unwrap().unwrap().remove(0);
        assert_eq!(y.shape, vec![2, 6]);
        assert_eq!(ints(&y).unwrap(), vec![0, 0, 1, 2, 2, 2, 0, 1, 0, 0, 1, 2]);
        let f = Tensor::f32(vec![4], vec![0.0, -1.5, 0.0, 2.0]);
        let y = eval_node(&node, &[Some(&f)]).unwrap().unwrap().remove(0);
        assert_eq!((y.shape.clone(), ints(&y).unwrap()), (vec![1, 2], vec![1, 3]));
        let t = ValueType::known(DType::Bool, &[3, 3]);
        let shape = crate::shape::infer(&node, &[Some(t.clone())], &[Some(&x)]).unwrap();
        assert_eq!(shape[0].concrete(), Some(vec![2, 6]));
        let err = crate::shape::infer(&node, &[Some(t)], &[None]).unwrap_err().to_string();
        assert!(err.contains("must be a constant"), "{err}");
    }
}
