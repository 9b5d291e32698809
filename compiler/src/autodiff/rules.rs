//! One gradient rule per op type. Each reads like the math: `x(i)` is input i, `y(i)` output i, `dy(i)` the
//! gradient flowing into output i; a rule returns the gradient of each input (None where none is needed).

use anyhow::{bail, Result};

use super::{Rule, RuleCtx};
use crate::eval::norm_axis;
use crate::ir::Attr;

pub fn rule(op: &str) -> Option<Rule> {
    Some(match op {
        "Add" => add,
        "Sub" => sub,
        "Mul" => mul,
        "Div" => div,
        "Neg" => neg,
        "Pow" => pow,
        "Sqrt" => sqrt,
        "Reciprocal" => reciprocal,
        "Tanh" => tanh,
        "Sigmoid" => sigmoid,
        "Erf" => erf,
        "Relu" => relu,
        "Exp" => exp,
        "Log" => log,
        "MatMul" => matmul,
        "Transpose" => transpose,
        "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => reshape_like,
        "Expand" => expand,
        "Concat" => concat,
        "Split" => split,
        "Slice" => slice,
        "Softmax" => softmax,
        "LogSoftmax" => log_softmax,
        "LayerNormalization" => layer_norm,
        "ReduceSum" => reduce_sum,
        "ReduceMean" => reduce_mean,
        "Where" => where_,
        "Cast" => cast,
        "Identity" => identity,
        _ => return None,
    })
}

pub fn has_rule(op: &str) -> bool {
    rule(op).is_some()
}

/// Sums `grad` (shaped like the broadcast output) down to `target`'s shape.
fn unbroadcast(c: &mut RuleCtx, grad: &str, target: &str) -> Result<String> {
    let gs = c.shape(grad).or_else(|_| c.shape(&c.y(0)))?;
    let ts = c.shape(target)?;
    if gs == ts {
        return Ok(grad.to_string());
    }
    let off = gs.len() - ts.len();
    let axes: Vec<i64> =
        (0..gs.len()).filter(|&a| a < off || (ts[a - off] == 1 && gs[a] != 1)).map(|a| a as i64).collect();
    let mut g = grad.to_string();
    if !axes.is_empty() {
        let ax = c.const_i(&axes);
        g = c.op("ReduceSum", &[&g, &ax], vec![("keepdims", Attr::Int(1))]);
    }
    let shape = c.const_i(&ts.iter().map(|&d| d as i64).collect::<Vec<_>>());
    Ok(c.op("Reshape", &[&g, &shape], vec![]))
}

fn both(
    c: &mut RuleCtx,
    d0: impl FnOnce(&mut RuleCtx) -> Result<String>,
    d1: impl FnOnce(&mut RuleCtx) -> Result<String>,
) -> Result<Vec<Option<String>>> {
    let a = if c.need[0] { Some(d0(c)?) } else { None };
    let b = if c.need.get(1).copied().unwrap_or(false) { Some(d1(c)?) } else { None };
    Ok(vec![a, b])
}

fn add(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let dy = c.dy(0)?;
    let (x0, x1) = (c.x(0), c.x(1));
    let dy2 = dy.clone();
    both(c, |c| unbroadcast(c, &dy, &x0), |c| unbroadcast(c, &dy2, &x1))
}

fn sub(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let dy = c.dy(0)?;
    let (x0, x1) = (c.x(0), c.x(1));
    let dy2 = dy.clone();
    both(
        c,
        |c| unbroadcast(c, &dy, &x0),
        |c| {
            let n = c.op("Neg", &[&dy2], vec![]);
            unbroadcast_as(c, &n, &dy2, &x1)
        },
    )
}

/// `unbroadcast` for a fresh value whose shape equals `like`'s.
fn unbroadcast_as(c: &mut RuleCtx, grad: &str, like: &str, target: &str) -> Result<String> {
    let s = c.shape(like).or_else(|_| c.shape(&c.y(0)))?;
    let dt = c.dtype(like);
    c.g.types.insert(grad.to_string(), crate::ir::ValueType::known(dt, &s));
    unbroadcast(c, grad, target)
}

fn mul(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let dy = c.dy(0)?;
    let (x0, x1, y) = (c.x(0), c.x(1), c.y(0));
    both(
        c,
        |c| {
            let m = c.op("Mul", &[&dy, &x1], vec![]);
            unbroadcast_as(c, &m, &y, &x0)
        },
        |c| {
            let m = c.op("Mul", &[&dy, &x0], vec![]);
            unbroadcast_as(c, &m, &y, &x1)
        },
    )
}

fn div(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let dy = c.dy(0)?;
    let (x0, x1, y) = (c.x(0), c.x(1), c.y(0));
    both(
        c,
        |c| {
            let m = c.op("Div", &[&dy, &x1], vec![]);
            unbroadcast_as(c, &m, &y, &x0)
        },
        |c| {
            // d(a/b)/db = -y/b
            let q = c.op("Div", &[&y, &x1], vec![]);
            let m = c.op("Mul", &[&dy, &q], vec![]);
            let n = c.op("Neg", &[&m], vec![]);
            unbroadcast_as(c, &n, &y, &x1)
        },
    )
}

fn neg(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let dy = c.dy(0)?;
    Ok(vec![Some(c.op("Neg", &[&dy], vec![]))])
}

fn pow(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    if c.need.get(1).copied().unwrap_or(false) {
        bail!("the exponent of Pow must be a constant (no gradient through an exponent)");
    }
    let Some(p) = c.g.initializers.get(&c.x(1)).and_then(|t| t.as_f64s()).filter(|v| v.len() == 1).map(|v| v[0]) else {
        bail!("the exponent of Pow must be a scalar constant");
    };
    let dy = c.dy(0)?;
    let x = c.x(0);
    // d x^p = p x^(p-1)
    let pm1 = c.const_f(p - 1.0);
    let pc = c.const_f(p);
    let xp = if p == 2.0 { x.clone() } else { c.op("Pow", &[&x, &pm1], vec![]) };
    let t = c.op("Mul", &[&xp, &pc], vec![]);
    Ok(vec![Some(c.op("Mul", &[&dy, &t], vec![])), None])
}

fn sqrt(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let (dy, y) = (c.dy(0)?, c.y(0));
    let two = c.const_f(2.0);
    let d = c.op("Mul", &[&y, &two], vec![]);
    Ok(vec![Some(c.op("Div", &[&dy, &d], vec![]))])
}

/// d(1/x)/dx = -1/x² = -y² (torch.onnx dynamo writes RMSNorm's rsqrt as Reciprocal(Sqrt)).
fn reciprocal(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let (dy, y) = (c.dy(0)?, c.y(0));
    let y2 = c.op("Mul", &[&y, &y], vec![]);
    let d = c.op("Mul", &[&dy, &y2], vec![]);
    Ok(vec![Some(c.op("Neg", &[&d], vec![]))])
}

fn tanh(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let (dy, y) = (c.dy(0)?, c.y(0));
    let one = c.const_f(1.0);
    let y2 = c.op("Mul", &[&y, &y], vec![]);
    let d = c.op("Sub", &[&one, &y2], vec![]);
    Ok(vec![Some(c.op("Mul", &[&dy, &d], vec![]))])
}

fn sigmoid(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let (dy, y) = (c.dy(0)?, c.y(0));
    let one = c.const_f(1.0);
    let om = c.op("Sub", &[&one, &y], vec![]);
    let d = c.op("Mul", &[&y, &om], vec![]);
    Ok(vec![Some(c.op("Mul", &[&dy, &d], vec![]))])
}

fn erf(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let (dy, x) = (c.dy(0)?, c.x(0));
    let k = c.const_f(2.0 / std::f64::consts::PI.sqrt());
    let x2 = c.op("Mul", &[&x, &x], vec![]);
    let nx2 = c.op("Neg", &[&x2], vec![]);
    let e = c.op("Exp", &[&nx2], vec![]);
    let d = c.op("Mul", &[&e, &k], vec![]);
    Ok(vec![Some(c.op("Mul", &[&dy, &d], vec![]))])
}

fn relu(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let (dy, x) = (c.dy(0)?, c.x(0));
    let zero = c.const_f(0.0);
    let pos = c.op("Greater", &[&x, &zero], vec![]);
    Ok(vec![Some(c.op("Where", &[&pos, &dy, &zero], vec![]))])
}

fn exp(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let (dy, y) = (c.dy(0)?, c.y(0));
    Ok(vec![Some(c.op("Mul", &[&dy, &y], vec![]))])
}

fn log(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let (dy, x) = (c.dy(0)?, c.x(0));
    Ok(vec![Some(c.op("Div", &[&dy, &x], vec![]))])
}

/// Swaps the last two axes.
fn t_last2(c: &mut RuleCtx, v: &str) -> Result<String> {
    let r = c.shape(v)?.len();
    let mut perm: Vec<i64> = (0..r as i64).collect();
    perm.swap(r - 1, r - 2);
    Ok(c.op("Transpose", &[v], vec![("perm", Attr::Ints(perm))]))
}

fn matmul(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let (a, b, y) = (c.x(0), c.x(1), c.y(0));
    if c.shape(&a)?.len() < 2 || c.shape(&b)?.len() < 2 {
        bail!("MatMul with a rank-1 operand has no gradient rule yet");
    }
    let dy = c.dy(0)?;
    both(
        c,
        |c| {
            // dA = dY Bᵀ. With a 2-D B (a weight), a Gemm with transB reads B as it is: no transposed copy
            // of a frozen weight is ever materialized.
            let (bs, as_) = (c.shape(&b)?, c.shape(&a)?);
            if bs.len() == 2 {
                let dy2 = if as_.len() == 2 {
                    dy.clone()
                } else {
                    let flat = c.const_i(&[-1, bs[1] as i64]);
                    c.op("Reshape", &[&dy, &flat], vec![])
                };
                let g = c.op("Gemm", &[&dy2, &b], vec![("transB", Attr::Int(1))]);
                if as_.len() == 2 {
                    return Ok(g);
                }
                let back = c.const_i(&as_.iter().map(|&d| d as i64).collect::<Vec<_>>());
                return Ok(c.op("Reshape", &[&g, &back], vec![]));
            }
            let bt = t_last2(c, &b)?;
            let m = c.op("MatMul", &[&dy, &bt], vec![]);
            let mut s = c.shape(&y)?;
            let n = s.len();
            s[n - 1] = c.shape(&b)?[c.shape(&b)?.len() - 2];
            c.g.types.insert(m.clone(), crate::ir::ValueType::known(c.dtype(&y), &s));
            unbroadcast(c, &m, &a)
        },
        |c| {
            // dB = Aᵀ dY (a Gemm with transA when both are 2-D).
            if c.shape(&a)?.len() == 2 && c.shape(&dy).map(|s| s.len()).unwrap_or(c.shape(&y)?.len()) == 2 {
                return Ok(c.op("Gemm", &[&a, &dy], vec![("transA", Attr::Int(1))]));
            }
            let at = t_last2(c, &a)?;
            let m = c.op("MatMul", &[&at, &dy], vec![]);
            let mut s = c.shape(&y)?;
            let n = s.len();
            s[n - 2] = c.shape(&a)?[c.shape(&a)?.len() - 1];
            c.g.types.insert(m.clone(), crate::ir::ValueType::known(c.dtype(&y), &s));
            unbroadcast(c, &m, &b)
        },
    )
}

fn transpose(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let dy = c.dy(0)?;
    let r = c.shape(&c.x(0))?.len();
    let perm: Vec<i64> = match c.node.ints("perm") {
        Some(p) => p.to_vec(),
        None => (0..r as i64).rev().collect(),
    };
    let mut inv = vec![0i64; r];
    for (i, &p) in perm.iter().enumerate() {
        inv[p as usize] = i as i64;
    }
    Ok(vec![Some(c.op("Transpose", &[&dy], vec![("perm", Attr::Ints(inv))]))])
}

fn reshape_like(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let dy = c.dy(0)?;
    let s = c.shape(&c.x(0))?;
    let shape = c.const_i(&s.iter().map(|&d| d as i64).collect::<Vec<_>>());
    let mut out = vec![Some(c.op("Reshape", &[&dy, &shape], vec![]))];
    out.resize(c.node.inputs.len(), None);
    Ok(out)
}

fn expand(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let dy = c.dy(0)?;
    let x = c.x(0);
    Ok(vec![Some(unbroadcast(c, &dy, &x)?), None])
}

fn concat(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let dy = c.dy(0)?;
    let r = c.shape(&c.y(0))?.len();
    let axis = norm_axis(c.node.int("axis").unwrap_or(0), r)?;
    let sizes: Vec<i64> = c.node.inputs.iter().map(|x| c.shape(x).map(|s| s[axis] as i64)).collect::<Result<_>>()?;
    let mut out = Vec::new();
    let mut start = 0i64;
    for (i, &n) in sizes.iter().enumerate() {
        if c.need[i] {
            let (s, e, a) = (c.const_i(&[start]), c.const_i(&[start + n]), c.const_i(&[axis as i64]));
            out.push(Some(c.op("Slice", &[&dy, &s, &e, &a], vec![])));
        } else {
            out.push(None);
        }
        start += n;
    }
    Ok(out)
}

fn split(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let r = c.shape(&c.x(0))?.len();
    let axis = norm_axis(c.node.int("axis").unwrap_or(0), r)?;
    let mut parts = Vec::new();
    for i in 0..c.node.outputs.len() {
        parts.push(c.dy(i)?);
    }
    let refs: Vec<&str> = parts.iter().map(|s| s.as_str()).collect();
    let mut out = vec![Some(c.op("Concat", &refs, vec![("axis", Attr::Int(axis as i64))]))];
    out.resize(c.node.inputs.len(), None);
    Ok(out)
}

fn slice(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let x = c.x(0);
    let xs = c.shape(&x)?;
    let get = |c: &RuleCtx, i: usize| -> Result<Option<Vec<i64>>> {
        match c.node.input(i) {
            None => Ok(None),
            Some(n) => match c.g.initializers.get(n).and_then(|t| t.as_i64s()) {
                Some(v) => Ok(Some(v)),
                None => bail!("Slice bounds must be constants"),
            },
        }
    };
    let starts = get(c, 1)?.unwrap_or_default();
    let ends = get(c, 2)?.unwrap_or_default();
    let axes = get(c, 3)?.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = get(c, 4)?.unwrap_or_else(|| vec![1; starts.len()]);
    let mut g = c.dy(0)?;
    let mut cur = c.shape(&c.y(0))?;
    // Pad back one axis at a time with zero blocks.
    for k in 0..starts.len() {
        if steps[k] < 1 {
            bail!("Slice with step {} has no gradient rule yet", steps[k]);
        }
        let a = norm_axis(axes[k], xs.len())?;
        let (s, step, n) = crate::eval::slice_axis(xs[a], starts[k], ends[k], steps[k]);
        if step > 1 && n > 0 {
            // Every step-th element (GPT-J's and CodeGen's rotary, `x[..., ::2]`): each gradient element gets
            // step - 1 zeros behind it (a new axis, then flattened back), which leaves a run from the first
            // element picked to the last, padded below like a step-1 slice.
            let step = step as usize;
            let mut spread = cur.clone();
            spread.insert(a + 1, 1);
            let shape = c.const_i(&spread.iter().map(|&d| d as i64).collect::<Vec<_>>());
            let one = c.op("Reshape", &[&g, &shape], vec![]);
            spread[a + 1] = step - 1;
            let gaps = c.zeros(&spread);
            let interleaved = c.op("Concat", &[&one, &gaps], vec![("axis", Attr::Int(a as i64 + 1))]);
            let mut flat: Vec<i64> = cur.iter().map(|&d| d as i64).collect();
            flat[a] = (n * step) as i64;
            let flat_shape = c.const_i(&flat);
            let flat = c.op("Reshape", &[&interleaved, &flat_shape], vec![]);
            let run = (n - 1) * step + 1;
            let (from, to, axis) = (c.const_i(&[0]), c.const_i(&[run as i64]), c.const_i(&[a as i64]));
            g = c.op("Slice", &[&flat, &from, &to, &axis], vec![]);
            cur[a] = run;
        }
        let n = cur[a];
        let (before, after) = (s as usize, xs[a] - s as usize - n);
        let mut pieces = Vec::new();
        if before > 0 {
            let mut z = cur.clone();
            z[a] = before;
            pieces.push(c.zeros(&z));
        }
        pieces.push(g.clone());
        if after > 0 {
            let mut z = cur.clone();
            z[a] = after;
            pieces.push(c.zeros(&z));
        }
        if pieces.len() > 1 {
            let refs: Vec<&str> = pieces.iter().map(|s| s.as_str()).collect();
            g = c.op("Concat", &refs, vec![("axis", Attr::Int(a as i64))]);
        }
        cur[a] = xs[a];
    }
    let mut out = vec![Some(g)];
    out.resize(c.node.inputs.len(), None);
    Ok(out)
}

fn softmax_axis(c: &RuleCtx) -> Result<i64> {
    let r = c.shape(&c.x(0))?.len();
    Ok(norm_axis(c.node.int("axis").unwrap_or(-1), r)? as i64)
}

fn softmax(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    // dx = y * (dy - sum(dy * y))
    let (dy, y) = (c.dy(0)?, c.y(0));
    let ax = softmax_axis(c)?;
    let axes = c.const_i(&[ax]);
    let p = c.op("Mul", &[&dy, &y], vec![]);
    let s = c.op("ReduceSum", &[&p, &axes], vec![("keepdims", Attr::Int(1))]);
    let d = c.op("Sub", &[&dy, &s], vec![]);
    Ok(vec![Some(c.op("Mul", &[&y, &d], vec![]))])
}

fn log_softmax(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    // dx = dy - exp(y) * sum(dy)
    let (dy, y) = (c.dy(0)?, c.y(0));
    let ax = softmax_axis(c)?;
    let axes = c.const_i(&[ax]);
    let s = c.op("ReduceSum", &[&dy, &axes], vec![("keepdims", Attr::Int(1))]);
    let e = c.op("Exp", &[&y], vec![]);
    let m = c.op("Mul", &[&e, &s], vec![]);
    Ok(vec![Some(c.op("Sub", &[&dy, &m], vec![]))])
}

fn layer_norm(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    if c.need.get(1).copied().unwrap_or(false) || c.need.get(2).copied().unwrap_or(false) {
        bail!("gradients of LayerNormalization's scale and bias are not supported (they are frozen weights)");
    }
    let x = c.x(0);
    let r = c.shape(&x)?.len();
    let axis = norm_axis(c.node.int("axis").unwrap_or(-1), r)?;
    let eps = c.node.float("epsilon").unwrap_or(1e-5);
    let axes_v: Vec<i64> = (axis as i64..r as i64).collect();
    let axes = c.const_i(&axes_v);
    let keep = || vec![("keepdims", Attr::Int(1))];
    // Recompute the statistics: xhat = (x - mean) * rstd.
    let mean = c.op("ReduceMean", &[&x, &axes], keep());
    let xc = c.op("Sub", &[&x, &mean], vec![]);
    let sq = c.op("Mul", &[&xc, &xc], vec![]);
    let var = c.op("ReduceMean", &[&sq, &axes], keep());
    let e = c.const_f(eps as f64);
    let ve = c.op("Add", &[&var, &e], vec![]);
    let sd = c.op("Sqrt", &[&ve], vec![]);
    let one = c.const_f(1.0);
    let rstd = c.op("Div", &[&one, &sd], vec![]);
    let xhat = c.op("Mul", &[&xc, &rstd], vec![]);
    // g = dy * scale; dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    let dy = c.dy(0)?;
    let scale = c.x(1);
    let g = c.op("Mul", &[&dy, &scale], vec![]);
    let mg = c.op("ReduceMean", &[&g, &axes], keep());
    let gx = c.op("Mul", &[&g, &xhat], vec![]);
    let mgx = c.op("ReduceMean", &[&gx, &axes], keep());
    let t = c.op("Mul", &[&xhat, &mgx], vec![]);
    let a = c.op("Sub", &[&g, &mg], vec![]);
    let b = c.op("Sub", &[&a, &t], vec![]);
    let mut out = vec![Some(c.op("Mul", &[&b, &rstd], vec![]))];
    out.resize(c.node.inputs.len(), None);
    Ok(out)
}

fn reduce_axes(c: &RuleCtx) -> Result<Vec<usize>> {
    let r = c.shape(&c.x(0))?.len();
    match c.node.input(1) {
        None => Ok((0..r).collect()),
        Some(n) => match c.g.initializers.get(n).and_then(|t| t.as_i64s()) {
            Some(v) if v.is_empty() => Ok((0..r).collect()),
            Some(v) => v.iter().map(|&a| norm_axis(a, r)).collect(),
            None => bail!("reduction axes must be constants"),
        },
    }
}

/// Broadcasts a reduced gradient back over the reduced axes.
fn spread(c: &mut RuleCtx, dy: &str) -> Result<String> {
    let xs = c.shape(&c.x(0))?;
    let axes = reduce_axes(c)?;
    let kept: Vec<i64> = xs.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d as i64 }).collect();
    let ks = c.const_i(&kept);
    let r = c.op("Reshape", &[dy, &ks], vec![]);
    let full = c.const_i(&xs.iter().map(|&d| d as i64).collect::<Vec<_>>());
    Ok(c.op("Expand", &[&r, &full], vec![]))
}

fn reduce_sum(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let dy = c.dy(0)?;
    let mut out = vec![Some(spread(c, &dy)?)];
    out.resize(c.node.inputs.len(), None);
    Ok(out)
}

fn reduce_mean(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let dy = c.dy(0)?;
    let xs = c.shape(&c.x(0))?;
    let n: usize = reduce_axes(c)?.iter().map(|&a| xs[a]).product();
    let k = c.const_f(1.0 / n as f64);
    let scaled = c.op("Mul", &[&dy, &k], vec![]);
    let mut out = vec![Some(spread(c, &scaled)?)];
    out.resize(c.node.inputs.len(), None);
    Ok(out)
}

fn where_(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let (cond, a, b, y) = (c.x(0), c.x(1), c.x(2), c.y(0));
    let dy = c.dy(0)?;
    let zero = c.const_f(0.0);
    let da = if c.need[1] {
        let w = c.op("Where", &[&cond, &dy, &zero], vec![]);
        Some(unbroadcast_as(c, &w, &y, &a)?)
    } else {
        None
    };
    let db = if c.need[2] {
        let w = c.op("Where", &[&cond, &zero, &dy], vec![]);
        Some(unbroadcast_as(c, &w, &y, &b)?)
    } else {
        None
    };
    Ok(vec![None, da, db])
}

fn cast(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    let dt = c.dtype(&c.x(0));
    if !dt.is_float() {
        return Ok(vec![None]);
    }
    let dy = c.dy(0)?;
    Ok(vec![Some(c.op("Cast", &[&dy], vec![("to", Attr::Int(dt.onnx_code() as i64))]))])
}

fn identity(c: &mut RuleCtx) -> Result<Vec<Option<String>>> {
    Ok(vec![Some(c.dy(0)?)])
}
