//! Canonicalization: the same computation looks the same whatever the exporter and opset.
//!
//! Each pass is `fn(&mut Model) -> Result<bool>` ("did I change anything"); `canonicalize` runs them as a
//! plain list. After it: local functions are inlined, constants are initializers, Identity/Dropout are gone,
//! Reduce*/Split/Squeeze/Unsqueeze take their axes as inputs (the opset-18 form), Gemm is MatMul + Add, and the
//! default-domain opset is at least 18.

use std::collections::{BTreeMap, HashMap};

use anyhow::{anyhow, bail, Result};

use crate::ir::{Attr, Model, Node};
use crate::shape::known_op;
use crate::tensor::Tensor;

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
    squares_to_mul(model)?;
    remove_identities(model)?;
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
