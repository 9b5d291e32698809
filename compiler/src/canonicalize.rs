//! Canonicalization: the same computation looks the same whatever the exporter and opset.
//!
//! Each pass is `fn(&mut Model) -> Result<bool>` ("did I change anything"); `canonicalize` runs them as a
//! plain list. After it: local functions are inlined, constants are initializers, Identity/Dropout are gone,
//! Reduce*/Split/Squeeze/Unsqueeze take their axes as inputs (the opset-18 form), Gemm is MatMul + Add, Gelu is
//! spelled out in elementwise ops, a Gather of one constant index from an activation is Slice (+ Squeeze), and
//! the default-domain opset is at least 18.

use std::collections::{BTreeMap, HashMap};

use anyhow::{anyhow, bail, Result};

use crate::ir::{Attr, Graph, Model, Node};
use crate::shape::known_op;
use crate::tensor::{DType, Tensor};

/// The opsets pfx reads. Below 11 ops changed meaning in ways we do not translate.
pub const MIN_OPSET: i64 = 11;
pub const MAX_OPSET: i64 = 24;
/// The opset canonical graphs are written with (at least).
pub const CANONICAL_OPSET: i64 = 18;

/// Marks a Softmax/LogSoftmax with pre-13 semantics (coerce to 2-D at `axis`) until shapes are known.
pub const LEGACY_SOFTMAX_DOMAIN: &str = "pfx.legacy_softmax";

pub fn canonicalize(model: &mut Model) -> Result<()> {
    check_opset(model)?;
    inline_functions(model)?;
    check_ops(model)?;
    constants_to_initializers(model)?;
    upgrade_opset_forms(model)?;
    gemm_to_matmul(model)?;
    gelu_to_elementwise(model)?;
    squares_to_mul(model)?;
    remove_identities(model)?;
    // After remove_identities: an index behind an Identity is then seen as the initializer it is.
    scalar_gathers_to_slices(model)?;
    model.graph.toposort()?;
    model.graph.dce();
    Ok(())
}

fn check_opset(model: &Model) -> Result<()> {
    if model.opset == 0 {
        bail!("the model imports no default-domain ('ai.onnx') opset");
    }
    if !(MIN_OPSET..=MAX_OPSET).contains(&model.opset) {
        bail!(
            "opset {} is not supported: pfx reads opsets {MIN_OPSET} to {MAX_OPSET}; re-export the model with \
             opset_version in that range",
            model.opset
        );
    }
    Ok(())
}

/// Refuses ops outside the vocabulary, naming op, domain, node and opset.
fn check_ops(model: &Model) -> Result<()> {
    let mut unknown = Vec::new();
    for n in &model.graph.nodes {
        let ok = n.domain.is_empty() && known_op(&n.op);
        if !ok {
            let dom = if n.domain.is_empty() { "ai.onnx".to_string() } else { n.domain.clone() };
            let ver = if n.domain.is_empty() {
                model.opset
            } else {
                model.other_opsets.iter().find(|(d, _)| d == &n.domain).map(|x| x.1).unwrap_or(0)
            };
            unknown.push(format!("op '{}' (domain '{dom}', opset {ver}) at node '{}'", n.op, n.name));
        }
    }
    if !unknown.is_empty() {
        let more = if unknown.len() > 5 { format!(" and {} more", unknown.len() - 5) } else { String::new() };
        bail!(
            "unsupported op: {}{more}. pfx knows the ops GPT-2 and BART exports use; re-export without custom \
             ops (e.g. no optimum ORT-optimizer fusions) or report the op",
            unknown.into_iter().take(5).collect::<Vec<_>>().join("; ")
        );
    }
    Ok(())
}

/// Inlines calls to the model's local functions (repeatedly, for nested calls).
pub fn inline_functions(model: &mut Model) -> Result<bool> {
    if model.functions.is_empty() {
        return Ok(false);
    }
    let funcs: HashMap<(String, String), crate::ir::Function> =
        model.functions.iter().map(|f| ((f.domain.clone(), f.name.clone()), f.clone())).collect();
    let mut changed = false;
    for _round in 0..64 {
        let g = &mut model.graph;
        let mut out = Vec::with_capacity(g.nodes.len());
        let mut any = false;
        for node in std::mem::take(&mut g.nodes) {
            let Some(f) = funcs.get(&(node.domain.clone(), node.op.clone())) else {
                out.push(node);
                continue;
            };
            any = true;
            let mut map: HashMap<String, String> = HashMap::new();
            for (i, formal) in f.inputs.iter().enumerate() {
                map.insert(formal.clone(), node.inputs.get(i).cloned().unwrap_or_default());
            }
            for (i, formal) in f.outputs.iter().enumerate() {
                map.insert(formal.clone(), node.outputs.get(i).cloned().unwrap_or_default());
            }
            let prefix = format!("{}/", node.name);
            for body in &f.nodes {
                let mut b = body.clone();
                b.name = format!("{prefix}{}", b.name);
                for v in b.inputs.iter_mut().chain(b.outputs.iter_mut()) {
                    if v.is_empty() {
                        continue;
                    }
                    *v = map.entry(v.clone()).or_insert_with(|| format!("{prefix}{v}")).clone();
                }
                let mut attrs = BTreeMap::new();
                for (k, a) in b.attrs {
                    match a {
                        Attr::Ref(r) => {
                            if let Some(v) = node.attrs.get(&r).or_else(|| f.attr_defaults.get(&r)) {
                                attrs.insert(k, v.clone());
                            }
                        }
                        a => {
                            attrs.insert(k, a);
                        }
                    }
                }
                b.attrs = attrs;
                out.push(b);
            }
        }
        g.nodes = out;
        g.forget_names();
        if !any {
            break;
        }
        changed = true;
    }
    let fdomains: Vec<String> = model.functions.iter().map(|f| f.domain.clone()).collect();
    model.functions.clear();
    let used: Vec<String> = model.graph.nodes.iter().map(|n| n.domain.clone()).collect();
    model.other_opsets.retain(|(d, _)| used.contains(d) || !fdomains.contains(d));
    Ok(changed)
}

/// Constant nodes become initializers named after their output.
pub fn constants_to_initializers(model: &mut Model) -> Result<bool> {
    let g = &mut model.graph;
    let mut changed = false;
    let mut keep = Vec::with_capacity(g.nodes.len());
    for n in std::mem::take(&mut g.nodes) {
        if n.op != "Constant" || !n.domain.is_empty() {
            keep.push(n);
            continue;
        }
        let t = constant_value(&n)?;
        g.initializers.insert(n.outputs[0].clone(), t);
        changed = true;
    }
    g.nodes = keep;
    Ok(changed)
}

pub fn constant_value(n: &Node) -> Result<Tensor> {
    let (k, a) = n.attrs.iter().next().ok_or_else(|| anyhow!("{} has no value", n.label()))?;
    Ok(match (k.as_str(), a) {
        ("value", Attr::Tensor(t)) => t.clone(),
        ("value_float", Attr::Float(f)) => Tensor::scalar_f32(*f),
        ("value_floats", Attr::Floats(v)) => Tensor::f32(vec![v.len()], v.clone()),
        ("value_int", Attr::Int(i)) => Tensor::scalar_i64(*i),
        ("value_ints", Attr::Ints(v)) => Tensor::vec_i64(v),
        _ => bail!("{}: unsupported Constant attribute '{k}'", n.label()),
    })
}

/// Moves attribute-form axes/splits to inputs (the opset-13/18 forms) and raises the opset.
pub fn upgrade_opset_forms(model: &mut Model) -> Result<bool> {
    let opset = model.opset;
    let g = &mut model.graph;
    let mut changed = false;
    for i in 0..g.nodes.len() {
        let op = g.nodes[i].op.clone();
        let attr_to_input = |op: &str| -> Option<(&'static str, usize)> {
            match op {
                "ReduceSum" if opset < 13 => Some(("axes", 1)),
                "ReduceMean" | "ReduceMax" | "ReduceMin" | "ReduceProd" if opset < 18 => Some(("axes", 1)),
                "Squeeze" | "Unsqueeze" if opset < 13 => Some(("axes", 1)),
                "Split" if opset < 13 => Some(("split", 1)),
                _ => None,
            }
        };
        if let Some((attr, pos)) = attr_to_input(&op) {
            if let Some(Attr::Ints(v)) = g.nodes[i].attrs.remove(attr) {
                let name = g.add_const(&format!("{}.{attr}", g.nodes[i].name), Tensor::vec_i64(&v));
                let n = &mut g.nodes[i];
                while n.inputs.len() < pos {
                    n.inputs.push(String::new());
                }
                n.inputs.insert(pos, name);
                changed = true;
            }
        }
        if (op == "Softmax" || op == "LogSoftmax") && opset < 13 {
            g.nodes[i].domain = LEGACY_SOFTMAX_DOMAIN.to_string();
            g.nodes[i].attrs.entry("axis".into()).or_insert(Attr::Int(1));
            changed = true;
        }
        if op == "Split" && g.nodes[i].attrs.contains_key("split") {
            // opset 13-17 still allowed the attribute form; 18 wants the input.
            if let Some(Attr::Ints(v)) = g.nodes[i].attrs.remove("split") {
                let name = g.add_const(&format!("{}.split", g.nodes[i].name), Tensor::vec_i64(&v));
                g.nodes[i].inputs.truncate(1);
                g.nodes[i].inputs.push(name);
                changed = true;
            }
        }
        if op == "Split" && g.nodes[i].input(1).is_none() && !g.nodes[i].attrs.contains_key("num_outputs") {
            let k = g.nodes[i].outputs.len() as i64;
            g.nodes[i].attrs.insert("num_outputs".into(), Attr::Int(k));
            changed = true;
        }
    }
    if model.opset < CANONICAL_OPSET {
        model.opset = CANONICAL_OPSET;
        changed = true;
    }
    Ok(changed)
}

/// Gemm(A, B, C) -> MatMul(A', B') * alpha + C * beta, with constant transposes folded.
pub fn gemm_to_matmul(model: &mut Model) -> Result<bool> {
    let g = &mut model.graph;
    let mut changed = false;
    g.remember_names();
    let nodes = std::mem::take(&mut g.nodes);
    for n in nodes {
        if n.op != "Gemm" || !n.domain.is_empty() {
            g.nodes.push(n);
            continue;
        }
        changed = true;
        let hint = n.name.clone();
        let mut a = n.inputs[0].clone();
        let mut b = n.inputs[1].clone();
        for (which, attr) in [(0, "transA"), (1, "transB")] {
            if n.int(attr).unwrap_or(0) == 0 {
                continue;
            }
            let src = if which == 0 { &a } else { &b };
            let t = match g.initializers.get(src) {
                Some(w) => {
                    let tt = crate::eval::transpose(w, &[1, 0]);
                    g.add_const(&format!("{src}.T"), tt)
                }
                None => g.op1("Transpose", &[src], vec![("perm", Attr::Ints(vec![1, 0]))], &format!("{hint}.T{which}")),
            };
            if which == 0 {
                a = t;
            } else {
                b = t;
            }
        }
        let alpha = n.float("alpha").unwrap_or(1.0);
        let beta = n.float("beta").unwrap_or(1.0);
        let has_c = n.input(2).is_some();
        let out = n.outputs[0].clone();
        let mm_out = if alpha == 1.0 && !has_c { out.clone() } else { g.fresh(&format!("{hint}.mm")) };
        g.nodes.push(Node::new(format!("{hint}.matmul"), "MatMul", vec![a, b], vec![mm_out.clone()]));
        let mut acc = mm_out;
        if alpha != 1.0 {
            let k = g.add_const(&format!("{hint}.alpha"), Tensor::scalar_f32(alpha));
            let o = if has_c { g.fresh(&format!("{hint}.scaled")) } else { out.clone() };
            g.nodes.push(Node::new(format!("{hint}.alpha_mul"), "Mul", vec![acc, k], vec![o.clone()]));
            acc = o;
        }
        if has_c {
            let mut c = n.inputs[2].clone();
            if beta != 1.0 {
                let k = g.add_const(&format!("{hint}.beta"), Tensor::scalar_f32(beta));
                let o = g.fresh(&format!("{hint}.c_scaled"));
                g.nodes.push(Node::new(format!("{hint}.beta_mul"), "Mul", vec![c, k], vec![o.clone()]));
                c = o;
            }
            g.nodes.push(Node::new(format!("{hint}.add"), "Add", vec![acc, c], vec![out]));
        }
    }
    Ok(changed)
}

/// `Pow(x, 2)` (layer norms of the TorchScript exports) becomes `x * x`: runtimes evaluate Pow with a general
/// `powf`. GELU's `Pow(x, 3)` stays: as `x * x * x` the backward pass would keep x² of every layer alive (+100 MiB
/// peak on the GPT-2-small ORT step, measured), against 7% of tract's step time for powf.
pub fn squares_to_mul(model: &mut Model) -> Result<bool> {
    let g = &mut model.graph;
    let mut changed = false;
    let nodes = std::mem::take(&mut g.nodes);
    for n in nodes {
        let exponent = (n.op == "Pow" && n.domain.is_empty())
            .then(|| g.initializers.get(&n.inputs[1]))
            .flatten()
            .filter(|t| t.len() == 1)
            .and_then(|t| t.as_f64s())
            .map(|v| v[0]);
        if exponent != Some(2.0) {
            g.nodes.push(n);
            continue;
        }
        changed = true;
        let x = n.inputs[0].clone();
        g.nodes.push(Node::new(format!("{}.square", n.name), "Mul", vec![x.clone(), x], vec![n.outputs[0].clone()]));
    }
    Ok(changed)
}

/// The element type of `v`: its recorded type, else followed back through its producers (most ops keep the
/// type of their first input). None when nothing says.
fn elem_type(g: &Graph, prod: &HashMap<String, usize>, v: &str) -> Option<DType> {
    let mut v = v.to_string();
    for _ in 0..g.nodes.len() + 1 {
        if let Some(t) = g.type_of(&v) {
            return Some(t.dtype);
        }
        let n = &g.nodes[*prod.get(&v)?];
        let from = match n.op.as_str() {
            "Cast" => return n.int("to").and_then(|c| DType::from_onnx(c as i32)),
            "Shape" | "Size" => return Some(DType::I64),
            "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "And" | "Or" | "Xor" | "Not"
            | "IsNaN" | "IsInf" => return Some(DType::Bool),
            "ConstantOfShape" => {
                return Some(match n.attrs.get("value") {
                    Some(Attr::Tensor(t)) => t.dtype(),
                    _ => DType::F32,
                })
            }
            "CastLike" | "Where" => n.input(1)?,
            "If" | "Loop" | "Scan" => return None,
            _ => n.input(0)?,
        };
        v = from.to_string();
    }
    None
}

/// A scalar constant of float type `dt`.
fn float_scalar(dt: DType, x: f64) -> Result<Tensor> {
    match dt {
        DType::F16 => Tensor::from_le_bytes(dt, vec![], &half::f16::from_f64(x).to_le_bytes()),
        DType::BF16 => Tensor::from_le_bytes(dt, vec![], &half::bf16::from_f64(x).to_le_bytes()),
        DType::F32 | DType::F64 => Tensor::from_f64s(dt, vec![], vec![x]),
        other => bail!("GELU of a {} tensor", other.short()),
    }
}

/// ONNX `Gelu` (opset 20; torch.onnx dynamo writes it for Gemma's and Falcon's MLPs) becomes its definition in
/// ops that have gradient rules, with constants of x's element type:
/// `approximate="none"`: 0.5·x·(1 + erf(x/√2)); `"tanh"`: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
/// The runtimes then need no opset-20 Gelu kernel either.
pub fn gelu_to_elementwise(model: &mut Model) -> Result<bool> {
    let g = &mut model.graph;
    let prod = g.producers();
    let sites: Vec<(usize, DType)> = g
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op == "Gelu" && n.domain.is_empty())
        // Without a recorded type the graph is taken to be f32, the precision pfx trains in.
        .map(|(i, n)| (i, elem_type(g, &prod, &n.inputs[0]).unwrap_or(DType::F32)))
        .collect();
    // Back to front, so that the indices of the sites not yet rewritten stay valid.
    for &(i, dt) in sites.iter().rev() {
        let n = g.nodes[i].clone();
        let hint = n.name.clone();
        let x = n.inputs[0].clone();
        let mut body: Vec<Node> = Vec::new();
        let mut push = |g: &mut Graph, op: &str, inputs: &[&str], out: Option<&str>| -> String {
            let o = out.map(str::to_string).unwrap_or_else(|| g.fresh(&format!("{hint}.{}", op.to_lowercase())));
            let name = g.fresh(&format!("{hint}.{}.node", op.to_lowercase()));
            body.push(Node::new(name, op, inputs.iter().map(|s| s.to_string()).collect(), vec![o.clone()]));
            o
        };
        let c =
            |g: &mut Graph, v: f64| -> Result<String> { Ok(g.add_const(&format!("{hint}.c"), float_scalar(dt, v)?)) };
        let inner = match n.string("approximate").unwrap_or("none") {
            "none" => {
                let k = c(g, std::f64::consts::FRAC_1_SQRT_2)?;
                let s = push(g, "Mul", &[&x, &k], None);
                push(g, "Erf", &[&s], None)
            }
            "tanh" => {
                // Pow(x, 3), not x·x·x: the form GPT-2's exports use (see `squares_to_mul`).
                let (three, a, k) = (c(g, 3.0)?, c(g, 0.044715)?, c(g, (2.0 / std::f64::consts::PI).sqrt())?);
                let x3 = push(g, "Pow", &[&x, &three], None);
                let ax3 = push(g, "Mul", &[&x3, &a], None);
                let sum = push(g, "Add", &[&x, &ax3], None);
                let s = push(g, "Mul", &[&sum, &k], None);
                push(g, "Tanh", &[&s], None)
            }
            other => bail!("{}: unknown Gelu approximation '{other}' (ONNX defines 'none' and 'tanh')", n.label()),
        };
        let (one, half) = (c(g, 1.0)?, c(g, 0.5)?);
        let u = push(g, "Add", &[&inner, &one], None);
        let h = push(g, "Mul", &[&x, &half], None);
        push(g, "Mul", &[&h, &u], Some(&n.outputs[0]));
        g.nodes.splice(i..=i, body);
    }
    Ok(!sites.is_empty())
}

/// `Gather(data, i)` with a constant scalar index `i` (Falcon's fused qkv split, TorchScript exports) becomes
/// `Squeeze(Slice(data, [i], [i+1], [axis]), [axis])`, which has a gradient rule; a one-element index vector
/// becomes the Slice alone. So does `GatherND(data, [[i]])` (batch_dims 0: row i of axis 0, kept; torch.onnx
/// dynamo's multi-query Falcon picks its key and value so), and `GatherND(data, [i])` with the Squeeze. Lookups in
/// constant tables (embeddings) stay Gathers, and so do Gathers from integer values (shape arithmetic, folded away
/// by specialization).
pub fn scalar_gathers_to_slices(model: &mut Model) -> Result<bool> {
    let g = &mut model.graph;
    let prod = g.producers();
    let mut sites = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let nd = n.op == "GatherND";
        if !(n.op == "Gather" || nd) || !n.domain.is_empty() || g.initializers.contains_key(&n.inputs[0]) {
            continue;
        }
        let Some(t) = n.input(1).and_then(|v| g.initializers.get(v)) else {
            continue;
        };
        if t.len() != 1 || !matches!(t.dtype(), DType::I64 | DType::I32) {
            continue;
        }
        // Gather: a scalar or [1]; GatherND: [1] (one index of axis 0, dropped) or [1, 1] (kept).
        let (scalar, fits) = if nd {
            (t.shape.len() == 1, t.shape.len() <= 2 && !t.shape.is_empty() && n.int("batch_dims").unwrap_or(0) == 0)
        } else {
            (t.shape.is_empty(), t.shape.len() <= 1)
        };
        if !fits {
            continue;
        }
        if elem_type(g, &prod, &n.inputs[0]).is_some_and(|d| !d.is_float()) {
            continue;
        }
        let idx = t.as_i64s().expect("an integer tensor")[0];
        sites.push((i, idx, scalar));
    }
    for &(i, idx, scalar) in sites.iter().rev() {
        let n = g.nodes[i].clone();
        let hint = n.name.clone();
        let axis = if n.op == "GatherND" { 0 } else { n.int("axis").unwrap_or(0) };
        // Slice clamps its bounds: for i = -1 the end i+1 = 0 would select nothing, "to the end" is i64::MAX.
        let end = if idx == -1 { i64::MAX } else { idx + 1 };
        let starts = g.add_const(&format!("{hint}.starts"), Tensor::vec_i64(&[idx]));
        let ends = g.add_const(&format!("{hint}.ends"), Tensor::vec_i64(&[end]));
        let axes = g.add_const(&format!("{hint}.axes"), Tensor::vec_i64(&[axis]));
        let y = n.outputs[0].clone();
        let sliced = if scalar { g.fresh(&format!("{hint}.slice")) } else { y.clone() };
        let mut body = vec![Node::new(
            g.fresh(&format!("{hint}.slice.node")),
            "Slice",
            vec![n.inputs[0].clone(), starts, ends, axes.clone()],
            vec![sliced.clone()],
        )];
        if scalar {
            body.push(Node::new(g.fresh(&format!("{hint}.squeeze.node")), "Squeeze", vec![sliced, axes], vec![y]));
        }
        g.nodes.splice(i..=i, body);
    }
    Ok(!sites.is_empty())
}

/// Identity and (eval-mode) Dropout forward their input.
pub fn remove_identities(model: &mut Model) -> Result<bool> {
    let g = &mut model.graph;
    let mut changed = false;
    let mut i = 0;
    while i < g.nodes.len() {
        let n = &g.nodes[i];
        let forwards = n.domain.is_empty()
            && (n.op == "Identity" || (n.op == "Dropout" && n.outputs.iter().skip(1).all(|o| o.is_empty())));
        if !forwards {
            i += 1;
            continue;
        }
        let (src, dst) = (n.inputs[0].clone(), n.outputs[0].clone());
        let src_public = g.is_input(&src) || g.is_output(&src) || g.initializers.contains_key(&src);
        if g.is_output(&dst) && src_public {
            // One public name forwarded to another: an Identity must stay.
            let n = &mut g.nodes[i];
            n.op = "Identity".into();
            n.attrs.clear();
            n.inputs.truncate(1);
            n.outputs.truncate(1);
            i += 1;
            continue;
        }
        g.nodes.remove(i);
        g.replace_value(&dst, &src);
        changed = true;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{ValueInfo, ValueType};

    fn model_with_input(dt: DType, shape: &[usize]) -> Model {
        let mut m = Model { opset: 20, ir_version: 9, ..Model::default() };
        m.graph.inputs.push(ValueInfo { name: "x".into(), ty: ValueType::known(dt, shape) });
        m
    }

    fn output(m: &mut Model, v: &str) {
        m.graph.outputs.push(ValueInfo { name: v.into(), ty: ValueType { dtype: DType::F32, shape: None } });
    }

    fn ops(m: &Model) -> Vec<&str> {
        m.graph.nodes.iter().map(|n| n.op.as_str()).collect()
    }

    /// The names a Gemm's rewrite makes do not collide with values further down the graph.
    #[test]
    fn gemm_rewrite_names_are_new() {
        let mut m = model_with_input(DType::F32, &[2, 3]);
        m.graph.initializers.insert("w".into(), Tensor::from_f64s(DType::F32, vec![3, 3], vec![0.5; 9]).unwrap());
        m.graph.nodes.push(
            Node::new("g", "Gemm", vec!["x".into(), "w".into()], vec!["y".into()]).with_attr("alpha", Attr::Float(2.0)),
        );
        // A later value named as the rewrite's first choice for the MatMul's output.
        m.graph.nodes.push(Node::new("r", "Relu", vec!["y".into()], vec!["g.mm".into()]));
        m.graph.nodes.push(Node::new("t", "Tanh", vec!["g.mm".into()], vec!["z".into()]));
        output(&mut m, "z");
        // The pass alone: in `canonicalize` an earlier pass may have recorded the names already.
        gemm_to_matmul(&mut m).unwrap();
        let outs: Vec<&String> = m.graph.nodes.iter().flat_map(|n| &n.outputs).collect();
        let unique: std::collections::HashSet<_> = outs.iter().collect();
        assert_eq!(outs.len(), unique.len(), "each value is made once: {outs:?}");
    }

    #[test]
    fn gelu_becomes_elementwise_ops_with_constants_of_x_type() {
        for (approx, dt) in [("none", DType::F32), ("tanh", DType::F16), ("tanh", DType::F64)] {
            let mut m = model_with_input(dt, &[2, 3]);
            let y = m.graph.op1("Gelu", &["x"], vec![("approximate", Attr::Str(approx.into()))], "y");
            output(&mut m, &y);
            canonicalize(&mut m).unwrap();
            let ops = ops(&m);
            assert!(!ops.contains(&"Gelu"), "{approx}: {ops:?}");
            let want = if approx == "none" { "Erf" } else { "Tanh" };
            assert!(ops.contains(&want), "{approx}: {ops:?}");
            assert_eq!(m.graph.nodes.last().unwrap().outputs, [y.as_str()], "the output keeps its name");
            assert!(!m.graph.initializers.is_empty());
            for (k, t) in &m.graph.initializers {
                assert_eq!(t.dtype(), dt, "{approx}: constant {k}");
            }
        }
    }

    #[test]
    fn gelu_of_an_untyped_value_takes_the_type_of_its_producers() {
        let mut m = model_with_input(DType::F32, &[2, 3]);
        let c = m.graph.op1("Cast", &["x"], vec![("to", Attr::Int(11))], "wide");
        let t = m.graph.op1("Tanh", &[&c], vec![], "t");
        let y = m.graph.op1("Gelu", &[&t], vec![], "y");
        output(&mut m, &y);
        canonicalize(&mut m).unwrap();
        assert!(m.graph.initializers.values().all(|t| t.dtype() == DType::F64));
        // The default approximation is "none".
        assert!(ops(&m).contains(&"Erf"));
    }

    #[test]
    fn gelu_with_an_unknown_approximation_is_refused() {
        let mut m = model_with_input(DType::F32, &[2]);
        let y = m.graph.op1("Gelu", &["x"], vec![("approximate", Attr::Str("fast".into()))], "y");
        output(&mut m, &y);
        let e = canonicalize(&mut m).unwrap_err().to_string();
        assert!(e.contains("fast"), "{e}");
    }

    #[test]
    fn scalar_gather_on_an_activation_becomes_slice_and_squeeze() {
        for (idx, end, axis) in [(1i64, 2i64, 1i64), (-1, i64::MAX, -1), (-2, -1, 0), (0, 1, 2)] {
            let mut m = model_with_input(DType::F32, &[3, 4, 5]);
            let a = m.graph.op1("Tanh", &["x"], vec![], "a");
            let i = m.graph.add_const("i", Tensor::scalar_i64(idx));
            let y = m.graph.op1("Gather", &[&a, &i], vec![("axis", Attr::Int(axis))], "y");
            output(&mut m, &y);
            canonicalize(&mut m).unwrap();
            assert_eq!(ops(&m), ["Tanh", "Slice", "Squeeze"], "index {idx}");
            let s = &m.graph.nodes[1];
            let get = |k: usize| m.graph.initializers[&s.inputs[k]].as_i64s().unwrap();
            assert_eq!((get(1), get(2), get(3)), (vec![idx], vec![end], vec![axis]), "index {idx}");
            let q = &m.graph.nodes[2];
            assert_eq!(q.inputs, [s.outputs[0].clone(), s.inputs[3].clone()]);
            assert_eq!(q.outputs, [y]);
        }
        // A one-element index vector keeps the axis: the Slice alone.
        let mut m = model_with_input(DType::F32, &[3, 4]);
        let i = m.graph.add_const("i", Tensor::i64(vec![1], vec![2]));
        let y = m.graph.op1("Gather", &["x", &i], vec![("axis", Attr::Int(1))], "y");
        output(&mut m, &y);
        canonicalize(&mut m).unwrap();
        assert_eq!(ops(&m), ["Slice"]);
        assert_eq!(m.graph.nodes[0].outputs, [y]);
    }

    #[test]
    fn table_lookups_shape_gathers_and_index_vectors_stay_gathers() {
        let mut m = model_with_input(DType::I64, &[2, 3]);
        let table = m.graph.add_const("wte", Tensor::f32(vec![4, 2], vec![0.5; 8]));
        let emb = m.graph.op1("Gather", &[&table, "x"], vec![], "emb");
        // A constant row of a table (a scalar index into an initializer) is folded later, not sliced here.
        let row0 = m.graph.add_const("zero", Tensor::scalar_i64(0));
        let row = m.graph.op1("Gather", &[&table, &row0], vec![], "row");
        let s = m.graph.op1("Shape", &[&emb], vec![], "s");
        let d = m.graph.op1("Gather", &[&s, &row0], vec![], "d");
        let two = m.graph.add_const("two", Tensor::vec_i64(&[0, 1]));
        let v = m.graph.op1("Gather", &[&emb, &two], vec![("axis", Attr::Int(1))], "v");
        for o in [&row, &d, &v] {
            output(&mut m, o);
        }
        canonicalize(&mut m).unwrap();
        assert_eq!(ops(&m).iter().filter(|o| **o == "Gather").count(), 4, "{:?}", ops(&m));
    }
}
