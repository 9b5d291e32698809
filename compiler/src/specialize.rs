//! Shape specialization: concrete batch, sequence and past lengths make every shape known, so that shape
//! arithmetic, position ids and causal-mask construction fold to constants and the graph keeps only the
//! computation that depends on the data.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};

use crate::canonicalize::LEGACY_SOFTMAX_DOMAIN;
use crate::eval::eval_node;
use crate::ir::{Attr, Dim, Graph, Model, Node, ValueType};
use crate::shape::infer;
use crate::tensor::{DType, Tensor};

/// Concrete sizes for a specialization.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    pub seq: usize,
    /// Past (KV-cache) length, for graphs with past inputs (default 0).
    pub past: Option<usize>,
    /// Encoder (source) length, for BART decoders (default: `seq`).
    pub src_len: Option<usize>,
}

impl Dims {
    pub fn new(batch: usize, seq: usize) -> Dims {
        Dims { batch, seq, past: None, src_len: None }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecializeReport {
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub folded: usize,
    pub forwarded: usize,
}

/// Folding stops at constants larger than this many elements (a folded mask of B*T*T is small; a transposed
/// vocabulary matrix may not be).
pub const FOLD_LIMIT: usize = 1 << 22;

pub fn specialize(model: &mut Model, dims: &Dims) -> Result<SpecializeReport> {
    if dims.batch == 0 {
        bail!("--batch must be at least 1 (got 0)");
    }
    if dims.seq == 0 {
        bail!("--seq must be at least 1 (got 0)");
    }
    if dims.src_len == Some(0) {
        bail!("--src-len must be at least 1 (got 0)");
    }
    let nodes_before = model.graph.nodes.len();
    bind_cache_branch(&mut model.graph, dims);
    assign_input_shapes(&mut model.graph, dims)?;
    let mut report = SpecializeReport { nodes_before, ..Default::default() };
    // Fold and infer until nothing changes: forwarding can expose more folding.
    for _ in 0..8 {
        let folded = fold_and_infer(&mut model.graph)?;
        let forwarded = forward_noops(&mut model.graph)?;
        model.graph.dce();
        report.folded += folded;
        report.forwarded += forwarded;
        if folded == 0 && forwarded == 0 {
            break;
        }
    }
    fold_and_infer(&mut model.graph)?;
    prune_unused_inputs(&mut model.graph);
    materialize_constant_outputs(&mut model.graph);
    for o in model.graph.outputs.clone() {
        if let Some(t) = model.graph.type_of(&o.name) {
            if let Some(out) = model.graph.outputs.iter_mut().find(|v| v.name == o.name) {
                out.ty = t;
            }
        }
    }
    report.nodes_after = model.graph.nodes.len();
    Ok(report)
}

/// An output that folded to a constant is produced by an Identity from a renamed initializer: runtimes
/// differ on whether they return initializers as outputs.
fn materialize_constant_outputs(g: &mut Graph) {
    for o in g.outputs.clone() {
        if let Some(t) = g.initializers.remove(&o.name) {
            let c = g.add_const(&format!("{}.const", o.name), t);
            let node = g.fresh(&format!("{}.identity", o.name));
            g.nodes.push(Node::new(node, "Identity", vec![c], vec![o.name.clone()]));
        }
    }
}

/// Inputs nothing reads any more (the past of an untaken cache branch, a mask folded away) leave the
/// signature, so callers are not asked for data the graph ignores.
fn prune_unused_inputs(g: &mut Graph) {
    let used: std::collections::HashSet<String> = g.nodes.iter().flat_map(|n| n.inputs.iter().cloned()).collect();
    let outputs: std::collections::HashSet<String> = g.outputs.iter().map(|v| v.name.clone()).collect();
    g.inputs.retain(|v| used.contains(&v.name) || outputs.contains(&v.name));
}

/// optimum's merged decoder picks its branch with a `use_cache_branch` input: with a past length given the
/// cached branch is taken, else the first-step branch. Binding it lets the If fold away.
fn bind_cache_branch(g: &mut Graph, dims: &Dims) {
    if let Some(pos) = g.inputs.iter().position(|v| v.name == "use_cache_branch") {
        let v = g.inputs.remove(pos);
        let take = dims.past.map(|p| p > 0).unwrap_or(false);
        g.initializers.insert(v.name, Tensor::bool(vec![1], vec![take]));
    }
}

/// The role of a graph input, by the names exporters use.
fn dim_for(graph: &Graph, input: &str, axis: usize, dims: &Dims) -> Option<usize> {
    let has_past = graph.inputs.iter().any(|v| v.name.starts_with("past_key_values"));
    let past = dims.past.unwrap_or(0);
    let src = dims.src_len.unwrap_or(dims.seq);
    let b = dims.batch;
    match input {
        "input_ids" | "decoder_input_ids" | "position_ids" | "token_type_ids" | "labels" | "cache_position" => {
            Some(if axis == 0 && input != "cache_position" { b } else { dims.seq })
        }
        "attention_mask" => Some(if axis == 0 {
            b
        } else if has_past {
            past + dims.seq
        } else {
            dims.seq
        }),
        "encoder_attention_mask" => Some(if axis == 0 { b } else { src }),
        "encoder_hidden_states" => match axis {
            0 => Some(b),
            1 => Some(src),
            _ => None,
        },
        n if n.starts_with("past_key_values") => match axis {
            0 => Some(b),
            2 => Some(if n.contains(".encoder.") { src } else { past }),
            _ => None,
        },
        _ => None,
    }
}

fn assign_input_shapes(g: &mut Graph, dims: &Dims) -> Result<()> {
    let has_past = g.inputs.iter().any(|v| v.name.starts_with("past_key_values"));
    if dims.past.is_some() && !has_past {
        bail!("--past was given, but the graph has no past_key_values inputs (it was exported without past)");
    }
    let mut symbols: HashMap<String, usize> = HashMap::new();
    let mut unresolved = Vec::new();
    let inputs = g.inputs.clone();
    let mut shapes: Vec<Option<Vec<usize>>> = Vec::new();
    for v in &inputs {
        let Some(ds) = &v.ty.shape else {
            bail!("graph input '{}' has no declared rank; pfx cannot specialize it", v.name);
        };
        let mut out = Vec::new();
        let mut ok = true;
        for (axis, d) in ds.iter().enumerate() {
            match (d, dim_for(g, &v.name, axis, dims)) {
                (Dim::Known(n), Some(want)) if *n != want => bail!(
                    "graph input '{}' has a fixed size {n} on axis {axis}, but the requested sizes need {want}",
                    v.name
                ),
                (Dim::Known(n), _) => out.push(*n),
                (Dim::Sym(s), Some(want)) => {
                    symbols.insert(s.clone(), want);
                    out.push(want);
                }
                (Dim::Sym(_), None) => {
                    ok = false;
                    out.push(0);
                }
            }
        }
        shapes.push(if ok { Some(out) } else { None });
    }
    for (v, s) in inputs.iter().zip(shapes.iter_mut()) {
        if s.is_some() {
            continue;
        }
        let ds = v.ty.shape.as_ref().unwrap();
        let mut out = Vec::new();
        for (axis, d) in ds.iter().enumerate() {
            match d {
                Dim::Known(n) => out.push(*n),
                Dim::Sym(sym) => match symbols.get(sym) {
                    Some(&n) => out.push(n),
                    None => {
                        unresolved.push(format!("'{}' axis {axis} ('{sym}')", v.name));
                        out.push(0);
                    }
                },
            }
        }
        *s = Some(out);
    }
    if !unresolved.is_empty() {
        bail!(
            "cannot give a concrete size to {}: pfx sizes inputs named input_ids, attention_mask, position_ids, \
             past_key_values.*, encoder_hidden_states and encoder_attention_mask, and dimensions sharing their names",
            unresolved.join(", ")
        );
    }
    for (v, s) in g.inputs.iter_mut().zip(shapes) {
        v.ty = ValueType::known(v.ty.dtype, &s.unwrap());
    }
    Ok(())
}

/// One pass in topological order: evaluate what is constant, infer the types of the rest.
pub fn fold_and_infer(g: &mut Graph) -> Result<usize> {
    g.toposort()?;
    let mut folded = 0;
    let mut i = 0;
    while i < g.nodes.len() {
        if g.nodes[i].domain == LEGACY_SOFTMAX_DOMAIN {
            rewrite_legacy_softmax(g, i)?;
        }
        if g.nodes[i].op == "If" {
            if let Some(cond) = g.initializers.get(&g.nodes[i].inputs[0]) {
                let take_then = cond.as_i64s().map(|v| v.first().copied().unwrap_or(0) != 0).unwrap_or(false);
                inline_if(g, i, take_then)?;
                continue;
            }
        }
        let node = g.nodes[i].clone();
        let types: Vec<Option<ValueType>> =
            node.inputs.iter().map(|n| if n.is_empty() { None } else { g.type_of(n) }).collect();
        let consts: Vec<Option<&Tensor>> =
            node.inputs.iter().map(|n| if n.is_empty() { None } else { g.initializers.get(n) }).collect();
        // Shape and Size need only the input's shape.
        if matches!(node.op.as_str(), "Shape" | "Size") {
            if let Some(s) = types[0].as_ref().and_then(|t| t.concrete()) {
                let dummy = Tensor::new(s, crate::tensor::Data::Raw(DType::U8, vec![]));
                let v = shape_only(&node, &dummy);
                g.initializers.insert(node.outputs[0].clone(), v);
                g.nodes.remove(i);
                folded += 1;
                continue;
            }
        }
        let out_types = infer(&node, &types, &consts).with_context(|| format!("specializing {}", node.label()))?;
        let all_const = node.inputs.iter().zip(&consts).all(|(n, c)| n.is_empty() || c.is_some());
        let small =
            out_types.iter().all(|t| t.concrete().map(|s| s.iter().product::<usize>() <= FOLD_LIMIT).unwrap_or(false));
        // A Cast from a half-precision constant is how a weight is stored small (`--weights f16`): folding it
        // would store it in f32 again.
        let stored_half = node.op == "Cast"
            && consts.first().copied().flatten().is_some_and(|t| matches!(t.dtype(), DType::F16 | DType::BF16));
        if all_const && small && !node.inputs.is_empty() && !stored_half {
            if let Some(vals) = eval_node(&node, &consts).with_context(|| format!("folding {}", node.label()))? {
                for (name, v) in node.outputs.iter().zip(vals) {
                    if !name.is_empty() {
                        g.initializers.insert(name.clone(), v);
                        g.types.remove(name);
                    }
                }
                g.nodes.remove(i);
                folded += 1;
                continue;
            }
        }
        for (name, t) in node.outputs.iter().zip(out_types) {
            if !name.is_empty() {
                g.types.insert(name.clone(), t);
            }
        }
        i += 1;
    }
    Ok(folded)
}

fn shape_only(node: &Node, t: &Tensor) -> Tensor {
    if node.op == "Size" {
        return Tensor::scalar_i64(t.shape.iter().product::<usize>() as i64);
    }
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    let r = shape.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let s = clamp(node.int("start").unwrap_or(0));
    let e = clamp(node.int("end").unwrap_or(r)).max(s);
    Tensor::vec_i64(&shape[s..e])
}

/// Pre-13 Softmax coerces its input to 2-D at `axis`: on the last axis that is today's Softmax; elsewhere it is
/// Flatten -> Softmax(-1) -> Reshape.
fn rewrite_legacy_softmax(g: &mut Graph, i: usize) -> Result<()> {
    let n = g.nodes[i].clone();
    let shape = g
        .shape_of(&n.inputs[0])
        .ok_or_else(|| anyhow!("{}: the input shape must be known to translate a pre-13 Softmax", n.label()))?;
    let r = shape.len() as i64;
    let axis = n.int("axis").unwrap_or(1);
    let axis = if axis < 0 { axis + r } else { axis };
    if axis == r - 1 {
        let node = &mut g.nodes[i];
        node.domain.clear();
        node.attrs.insert("axis".into(), Attr::Int(-1));
        return Ok(());
    }
    g.nodes.remove(i);
    let flat = g.fresh(&format!("{}.flat", n.name));
    let soft = g.fresh(&format!("{}.soft", n.name));
    let shape_c = g
        .add_const(&format!("{}.shape", n.name), Tensor::vec_i64(&shape.iter().map(|&d| d as i64).collect::<Vec<_>>()));
    let nodes = vec![
        Node::new(format!("{}.flatten", n.name), "Flatten", vec![n.inputs[0].clone()], vec![flat.clone()])
            .with_attr("axis", Attr::Int(axis)),
        Node::new(format!("{}.softmax", n.name), n.op.clone(), vec![flat], vec![soft.clone()])
            .with_attr("axis", Attr::Int(-1)),
        Node::new(format!("{}.reshape", n.name), "Reshape", vec![soft, shape_c], vec![n.outputs[0].clone()]),
    ];
    for (k, node) in nodes.into_iter().enumerate() {
        g.nodes.insert(i + k, node);
    }
    Ok(())
}

/// An If whose condition folded to a constant becomes the taken branch.
fn inline_if(g: &mut Graph, i: usize, take_then: bool) -> Result<()> {
    let n = g.nodes.remove(i);
    let key = if take_then { "then_branch" } else { "else_branch" };
    let Some(Attr::Graph(branch)) = n.attrs.get(key) else {
        bail!("{}: no {key}", n.label());
    };
    let branch = (**branch).clone();
    for (k, t) in branch.initializers {
        g.initializers.insert(k, t);
    }
    let mut k = 0;
    for node in branch.nodes {
        // Branch bodies are not canonicalized with the main graph: their constants become initializers here.
        if node.op == "Constant" && node.domain.is_empty() {
            g.initializers.insert(node.outputs[0].clone(), crate::canonicalize::constant_value(&node)?);
            continue;
        }
        g.nodes.insert(i + k, node);
        k += 1;
    }
    g.forget_names();
    for (out, bout) in n.outputs.iter().zip(&branch.outputs) {
        g.replace_value(out, &bout.name);
    }
    g.toposort()?;
    Ok(())
}

/// Removes nodes that do nothing once shapes are known (Reshape/Expand to the same shape, Cast to the same
/// type, Where on a constant condition, one-input Concat). Returns how many went.
pub fn forward_noops(g: &mut Graph) -> Result<usize> {
    let mut count = 0;
    let mut i = 0;
    while i < g.nodes.len() {
        let n = &g.nodes[i];
        let in_ty = n.input(0).and_then(|x| g.type_of(x));
        let out_ty = g.type_of(&n.outputs[0]);
        let same = matches!((&in_ty, &out_ty), (Some(a), Some(b)) if a == b && a.concrete().is_some());
        let src: Option<String> = match n.op.as_str() {
            "Reshape" | "Expand" | "Cast" | "CastLike" | "Identity" | "Squeeze" | "Unsqueeze" if same => {
                Some(n.inputs[0].clone())
            }
            "Concat" if n.inputs.len() == 1 && same => Some(n.inputs[0].clone()),
            "Slice" if same => Some(n.inputs[0].clone()),
            "Where" => match g.initializers.get(&n.inputs[0]).and_then(|c| c.as_i64s()) {
                Some(c) if c.iter().all(|&x| x != 0) && g.type_of(&n.inputs[1]) == out_ty => Some(n.inputs[1].clone()),
                Some(c) if c.iter().all(|&x| x == 0) && g.type_of(&n.inputs[2]) == out_ty => Some(n.inputs[2].clone()),
                _ => None,
            },
            "Add" | "Sub" => {
                let zero = g.initializers.get(&n.inputs[1]).map(|c| c.all_equal(0.0)).unwrap_or(false);
                if zero && same {
                    Some(n.inputs[0].clone())
                } else {
                    None
                }
            }
            "Mul" | "Div" => {
                let one = g.initializers.get(&n.inputs[1]).map(|c| c.all_equal(1.0)).unwrap_or(false);
                if one && same {
                    Some(n.inputs[0].clone())
                } else {
                    None
                }
            }
            _ => None,
        };
        let Some(src) = src else {
            i += 1;
            continue;
        };
        let dst = n.outputs[0].clone();
        let src_public = g.is_input(&src) || g.is_output(&src) || g.initializers.contains_key(&src);
        if g.is_output(&dst) && src_public {
            i += 1;
            continue;
        }
        g.nodes.remove(i);
        g.replace_value(&dst, &src);
        count += 1;
    }
    Ok(count)
}
