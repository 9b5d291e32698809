//! Last rewrites of a finished graph, after autodiff: forms that run faster on ONNX Runtime and tract but that
//! autodiff must not see.
//!
//! - A 2-D transpose feeding a matrix product becomes a `transA`/`transB` flag of a Gemm (the export's LM head
//!   is `MatMul(h, Transpose(wte))`: without this, every step copies the 154 MB embedding into a transposed
//!   tensor, or the runtime keeps a second, folded copy), and a transposed Gemm result is the Gemm of the
//!   swapped operands (the prefix MLP's weight gradient comes out in its stored layout).
//! - `Pow(x, 3)` (GPT-2's tanh GELU) becomes `x·x·x`: tract evaluates Pow with `powf`, element by element.
//!   Rewritten before autodiff, the product would make the backward keep x² alive for every layer; here the
//!   backward is already built from x alone.
//! - Inference graphs only (`lower_for_inference`): the attention of torch's exporter transposes the keys as
//!   Reshape → Transpose([0, 2, 1]) → Reshape and scales them (q and k each by √scale) before `q·kᵀ`. In a decode
//!   graph the keys are the whole cache, so every step copied and scaled it: the chain becomes one 4-D Transpose
//!   that the runtimes fold into the product, and a scalar factor on a product's operand moves to the smaller
//!   operand (the query).
//! - Graphs for ONNX Runtime on GPUs (the bundle's `.gpu` variants, `cubes_as_powers`): the cube goes back to
//!   `Pow(x, 3)`, the form ONNX Runtime's GELU fusion recognizes (a tanh GELU then runs as one `FastGelu`, its
//!   bias added inside: 8 fewer nodes per layer in GPT-2's decode graph on ORT 1.32).
//! - A `Concat` of more than 32 inputs (the prefix gradient's rows: 2 per layer, 48 on gpt2-medium) becomes a
//!   `Concat` of `Concat`s of at most 32: ONNX Runtime's CUDA Concat refuses more while a CUDA graph is captured.

use std::collections::HashMap;

use anyhow::Result;

use crate::ir::{Attr, Graph, Node};
use crate::simplify::simplify;
use crate::tensor::Tensor;

/// The rewrites for every graph, applied until none applies; returns how many were made.
pub fn lower_for_runtime(g: &mut Graph) -> Result<usize> {
    lower(g, false)
}

/// `lower_for_runtime` plus the attention rewrites, for graphs without a backward pass (prefill, decode, encode).
/// In a training graph they gain nothing measurable and cost tract ~60 MB of peak memory (A/B on GPT-2 small).
pub fn lower_for_inference(g: &mut Graph) -> Result<usize> {
    lower(g, true)
}

fn lower(g: &mut Graph, attention: bool) -> Result<usize> {
    let mut total = 0;
    loop {
        g.toposort()?;
        let mut n = transposes_into_gemm(g)? + cubes_as_products(g) + wide_concats_as_trees(g);
        if attention {
            n += plain_key_transposes(g) + scales_onto_smaller(g);
        }
        if n == 0 {
            break;
        }
        total += n;
        g.toposort()?;
        simplify(g)?;
    }
    Ok(total)
}

/// The source of `v` when `v` is a 2-D `Transpose(src, perm=[1, 0])`.
fn transposed_2d(g: &Graph, producers: &HashMap<String, usize>, v: &str) -> Option<String> {
    let n = &g.nodes[*producers.get(v)?];
    let two_d = g.shape_of(&n.inputs[0]).is_some_and(|s| s.len() == 2);
    (n.op == "Transpose" && n.domain.is_empty() && n.ints("perm") == Some(&[1, 0]) && two_d)
        .then(|| n.inputs[0].clone())
}

fn flag(n: &Node, key: &str) -> bool {
    n.int(key).unwrap_or(0) != 0
}

fn transposes_into_gemm(g: &mut Graph) -> Result<usize> {
    let producers = g.producers();
    let consumers = g.consumers();
    let mut changed = 0;
    let mut extra: Vec<(usize, Vec<Node>)> = Vec::new();
    for i in 0..g.nodes.len() {
        let n = g.nodes[i].clone();
        if !n.domain.is_empty() {
            continue;
        }
        match n.op.as_str() {
            // MatMul(X, Wᵀ) -> Gemm(X, W, transB) over X's rows (reshaped to 2-D and back when X has batch axes).
            "MatMul" => {
                let Some(w) = transposed_2d(g, &producers, &n.inputs[1]) else { continue };
                let (Some(xs), Some(ys)) = (g.shape_of(&n.inputs[0]), g.shape_of(&n.outputs[0])) else { continue };
                if xs.len() < 2 {
                    continue;
                }
                let k = xs[xs.len() - 1] as i64;
                if xs.len() == 2 {
                    let mut gemm = Node::new(n.name.clone(), "Gemm", vec![n.inputs[0].clone(), w], n.outputs.clone());
                    gemm.attrs.insert("transB".into(), Attr::Int(1));
                    g.nodes[i] = gemm;
                } else {
                    let flat = g.add_const(&format!("{}/rows", n.name), Tensor::vec_i64(&[-1, k]));
                    let back = g.add_const(
                        &format!("{}/shape", n.name),
                        Tensor::vec_i64(&ys.iter().map(|&d| d as i64).collect::<Vec<_>>()),
                    );
                    let x2 = g.fresh(&format!("{}/x2d", n.name));
                    let y2 = g.fresh(&format!("{}/y2d", n.name));
                    let reshape_in = Node::new(
                        g.fresh(&format!("{}/x2d.node", n.name)),
                        "Reshape",
                        vec![n.inputs[0].clone(), flat],
                        vec![x2.clone()],
                    );
                    let mut gemm =
                        Node::new(g.fresh(&format!("{}/gemm.node", n.name)), "Gemm", vec![x2, w], vec![y2.clone()]);
                    gemm.attrs.insert("transB".into(), Attr::Int(1));
                    let reshape_out = Node::new(n.name.clone(), "Reshape", vec![y2, back], n.outputs.clone());
                    g.nodes[i] = reshape_out;
                    extra.push((i, vec![reshape_in, gemm]));
                }
                changed += 1;
            }
            // Gemm(Aᵀ?, Bᵀ?) with a transposed operand reads the operand as stored and flips its flag.
            "Gemm" => {
                let mut node = n.clone();
                for (pos, key) in [(0, "transA"), (1, "transB")] {
                    if let Some(src) = transposed_2d(g, &producers, &n.inputs[pos]) {
                        node.inputs[pos] = src;
                        node.attrs.insert(key.into(), Attr::Int(i64::from(!flag(&n, key))));
                        changed += 1;
                    }
                }
                g.nodes[i] = node;
            }
            // Transpose(Gemm(A, B)) = Gemm(B, A) with the flags swapped and flipped, when the Gemm has no bias
            // and nothing else reads its result.
            "Transpose" if n.ints("perm") == Some(&[1, 0]) => {
                let Some(&p) = producers.get(&n.inputs[0]) else { continue };
                let m = &g.nodes[p];
                let plain = m.op == "Gemm"
                    && m.domain.is_empty()
                    && m.inputs.len() == 2
                    && m.float("alpha").unwrap_or(1.0) == 1.0
                    && consumers.get(&n.inputs[0]).map(Vec::len) == Some(1)
                    && !g.is_output(&n.inputs[0]);
                if !plain {
                    continue;
                }
                let mut gemm = Node::new(
                    n.name.clone(),
                    "Gemm",
                    vec![m.inputs[1].clone(), m.inputs[0].clone()],
                    n.outputs.clone(),
                );
                gemm.attrs.insert("transA".into(), Attr::Int(i64::from(!flag(m, "transB"))));
                gemm.attrs.insert("transB".into(), Attr::Int(i64::from(!flag(m, "transA"))));
                g.nodes[i] = gemm;
                changed += 1;
            }
            _ => {}
        }
    }
    // Insert the reshapes in front of the node they feed (from the back, so indices stay valid).
    for (i, nodes) in extra.into_iter().rev() {
        for (k, node) in nodes.into_iter().enumerate() {
            g.nodes.insert(i + k, node);
        }
    }
    Ok(changed)
}

fn cubes_as_products(g: &mut Graph) -> usize {
    let mut changed = 0;
    let mut i = 0;
    while i < g.nodes.len() {
        let n = &g.nodes[i];
        let cube = n.op == "Pow"
            && n.domain.is_empty()
            && g.initializers
                .get(&n.inputs[1])
                .is_some_and(|t| t.len() == 1 && t.as_f64s().is_some_and(|v| v[0] == 3.0));
        if !cube {
            i += 1;
            continue;
        }
        let (name, x, y) = (n.name.clone(), n.inputs[0].clone(), n.outputs[0].clone());
        let sq = g.fresh(&format!("{name}/square"));
        let first =
            Node::new(g.fresh(&format!("{name}/square.node")), "Mul", vec![x.clone(), x.clone()], vec![sq.clone()]);
        g.nodes[i] = Node::new(name, "Mul", vec![sq, x], vec![y]);
        g.nodes.insert(i, first);
        changed += 1;
        i += 2;
    }
    changed
}

/// `x·x·x` (as `cubes_as_products` writes it: a square read only by the product) back to `Pow(x, 3)`; returns how
/// many. For the graphs ONNX Runtime runs on a GPU, where one `Pow` is one kernel and its GELU fusion wants it.
pub fn cubes_as_powers(g: &mut Graph) -> Result<usize> {
    let producers = g.producers();
    let consumers = g.consumers();
    let mut cubes = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if n.op != "Mul" || !n.domain.is_empty() {
            continue;
        }
        let (a, b) = (&n.inputs[0], &n.inputs[1]);
        let square = |v: &str, x: &str| {
            producers.get(v).map(|&j| &g.nodes[j]).is_some_and(|s| {
                s.op == "Mul"
                    && s.domain.is_empty()
                    && s.inputs[0] == x
                    && s.inputs[1] == x
                    && single_use(g, &consumers, v)
            })
        };
        if square(a, b) {
            cubes.push((i, b.clone()));
        } else if square(b, a) {
            cubes.push((i, a.clone()));
        }
    }
    if cubes.is_empty() {
        return Ok(0);
    }
    let three = g.add_const("cube/exponent", Tensor::scalar_f32(3.0));
    for (i, x) in &cubes {
        let n = &g.nodes[*i];
        g.nodes[*i] = Node::new(n.name.clone(), "Pow", vec![x.clone(), three.clone()], n.outputs.clone());
    }
    g.toposort()?;
    simplify(g)?; // the squares, now unread
    Ok(cubes.len())
}

/// In a training graph, the backward of each `LayerNormalization` recomputes its input's mean and 1/σ
/// (`autodiff::rules::layer_norm`: ReduceMean, Sub, Mul, ReduceMean, Add, Sqrt, Div); here the forward node
/// outputs them instead (its optional `Mean` and `InvStdDev`), and the six nodes that only served them go: for
/// ONNX Runtime on a GPU, where every node is a kernel (6 of ~60 per GPT-2 layer). Returns how many.
pub fn layer_norm_stats_from_forward(g: &mut Graph) -> Result<usize> {
    let producers = g.producers();
    let node_of = |v: &str| producers.get(v).map(|&i| &g.nodes[i]).filter(|n| n.domain.is_empty());
    let const_of = |v: &str| g.initializers.get(v).and_then(|t| t.as_f64s()).filter(|x| x.len() == 1).map(|x| x[0]);
    let mut found = Vec::new(); // (forward LN index, mean value, rstd value)
    for n in &g.nodes {
        // rstd = 1 / Sqrt(ReduceMean((x - mean)²) + eps), mean = ReduceMean(x): the rule's chain.
        if n.op != "Div" || !n.domain.is_empty() || const_of(&n.inputs[0]) != Some(1.0) {
            continue;
        }
        let Some(sd) = node_of(&n.inputs[1]).filter(|s| s.op == "Sqrt") else { continue };
        let Some(ve) = node_of(&sd.inputs[0]).filter(|s| s.op == "Add") else { continue };
        let Some(eps) = const_of(&ve.inputs[1]) else { continue };
        let Some(var) = node_of(&ve.inputs[0]).filter(|s| s.op == "ReduceMean") else { continue };
        let Some(sq) = node_of(&var.inputs[0]).filter(|s| s.op == "Mul" && s.inputs[0] == s.inputs[1]) else {
            continue;
        };
        let Some(xc) = node_of(&sq.inputs[0]).filter(|s| s.op == "Sub") else { continue };
        let Some(mean) = node_of(&xc.inputs[1]).filter(|s| s.op == "ReduceMean" && s.inputs[0] == xc.inputs[0]) else {
            continue;
        };
        let x = &xc.inputs[0];
        let same_axes = var.inputs.get(1) == mean.inputs.get(1);
        // The forward LayerNormalization of x over the last axis with the same epsilon and only its Y output.
        let last = g.shape_of(x).map(|s| s.len() as i64 - 1);
        let axes_last = mean.inputs.get(1).and_then(|a| g.initializers.get(a)).and_then(|t| t.as_i64s());
        let axes_ok = matches!((&axes_last, last), (Some(a), Some(l)) if a.len() == 1 && (a[0] == -1 || a[0] == l));
        let forward = g.nodes.iter().position(|f| {
            f.op == "LayerNormalization"
                && f.domain.is_empty()
                && f.inputs[0] == *x
                && f.outputs.len() == 1
                && matches!(f.int("axis").unwrap_or(-1), a if a == -1 || Some(a) == last)
                && (f64::from(f.float("epsilon").unwrap_or(1e-5)) - eps).abs() <= 1e-12_f64.max(eps * 1e-6)
        });
        if let (Some(f), true, true) = (forward, same_axes, axes_ok) {
            found.push((f, mean.outputs[0].clone(), n.outputs[0].clone()));
        }
    }
    for (f, mean, rstd) in &found {
        let name = g.nodes[*f].name.clone();
        let (m, r) = (g.fresh(&format!("{name}/mean")), g.fresh(&format!("{name}/inv_std_dev")));
        for (new, old) in [(&m, mean), (&r, rstd)] {
            if let Some(t) = g.types.get(old).cloned() {
                g.types.insert(new.clone(), t);
            }
        }
        g.nodes[*f].outputs.extend([m.clone(), r.clone()]);
        g.rename_uses(mean, &m);
        g.rename_uses(rstd, &r);
    }
    if !found.is_empty() {
        g.toposort()?;
        simplify(g)?; // the recomputations, now unread
    }
    Ok(found.len())
}

/// The most inputs a `Concat` keeps: ONNX Runtime's CUDA kernel takes no more during CUDA graph capture.
const MAX_CONCAT_INPUTS: usize = 32;

fn wide_concats_as_trees(g: &mut Graph) -> usize {
    let mut changed = 0;
    let mut i = 0;
    while i < g.nodes.len() {
        let n = &g.nodes[i];
        if n.op != "Concat" || !n.domain.is_empty() || n.inputs.len() <= MAX_CONCAT_INPUTS {
            i += 1;
            continue;
        }
        let n = n.clone();
        // Groups of equal size (⌈inputs / 32⌉ of them), each concatenated along the same axis, in order.
        let groups = n.inputs.len().div_ceil(MAX_CONCAT_INPUTS);
        let per = n.inputs.len().div_ceil(groups);
        let mut parts = Vec::new();
        for (k, chunk) in n.inputs.chunks(per).enumerate() {
            let out = g.fresh(&format!("{}/part{k}", n.name));
            let mut part =
                Node::new(g.fresh(&format!("{}/part{k}.node", n.name)), "Concat", chunk.to_vec(), vec![out.clone()]);
            part.attrs = n.attrs.clone();
            parts.push(part);
        }
        let mut outer = n.clone();
        outer.inputs = parts.iter().map(|p| p.outputs[0].clone()).collect();
        let added = parts.len();
        g.nodes[i] = outer;
        for (k, part) in parts.into_iter().enumerate() {
            g.nodes.insert(i + k, part);
        }
        changed += 1;
        i += added + 1;
    }
    changed
}

fn single_use(g: &Graph, consumers: &HashMap<String, Vec<usize>>, v: &str) -> bool {
    consumers.get(v).map(Vec::len) == Some(1) && !g.is_output(v)
}

/// Reshape([a·b, c, d]) → Transpose([0, 2, 1]) → Reshape([a, b, d, c]) of x [a, b, c, d] is Transpose(x, [0, 1, 3, 2]).
fn plain_key_transposes(g: &mut Graph) -> usize {
    let producers = g.producers();
    let consumers = g.consumers();
    let mut changed = 0;
    for i in 0..g.nodes.len() {
        let outer = &g.nodes[i];
        if outer.op != "Reshape" || !outer.domain.is_empty() {
            continue;
        }
        let Some(t) = producers.get(&outer.inputs[0]).map(|&j| &g.nodes[j]) else { continue };
        if t.op != "Transpose" || t.ints("perm") != Some(&[0, 2, 1]) || !single_use(g, &consumers, &outer.inputs[0]) {
            continue;
        }
        let Some(inner) = producers.get(&t.inputs[0]).map(|&j| &g.nodes[j]) else { continue };
        if inner.op != "Reshape" || !single_use(g, &consumers, &t.inputs[0]) {
            continue;
        }
        let x = inner.inputs[0].clone();
        let (Some(xs), Some(mid), Some(out)) =
            (g.shape_of(&x), g.shape_of(&inner.outputs[0]), g.shape_of(&outer.outputs[0]))
        else {
            continue;
        };
        let fits = xs.len() == 4 && mid == [xs[0] * xs[1], xs[2], xs[3]] && out == [xs[0], xs[1], xs[3], xs[2]];
        if !fits {
            continue;
        }
        let (name, y) = (outer.name.clone(), outer.outputs[0].clone());
        g.nodes[i] = Node::new(name, "Transpose", vec![x], vec![y]).with_attr("perm", Attr::Ints(vec![0, 1, 3, 2]));
        changed += 1;
    }
    changed
}

/// A Mul's (other operand, scalar constant factor), where one of its operands is a one-element initializer.
fn scalar_factor(g: &Graph, mul: &Node) -> Option<(String, String)> {
    let is_scalar = |v: &str| g.initializers.get(v).is_some_and(|t| t.len() == 1);
    if is_scalar(&mul.inputs[1]) {
        Some((mul.inputs[0].clone(), mul.inputs[1].clone()))
    } else if is_scalar(&mul.inputs[0]) {
        Some((mul.inputs[1].clone(), mul.inputs[0].clone()))
    } else {
        None
    }
}

/// MatMul(A, X·s) with a scalar constant s = MatMul(A·s, X) when A is the smaller operand (and the other way
/// round): the scaling pass then runs over fewer elements, and X reaches the product as it is.
fn scales_onto_smaller(g: &mut Graph) -> usize {
    let producers = g.producers();
    let consumers = g.consumers();
    let mut changed = 0;
    let mut extra: Vec<(usize, Node)> = Vec::new();
    for i in 0..g.nodes.len() {
        let n = &g.nodes[i];
        if n.op != "MatMul" || !n.domain.is_empty() {
            continue;
        }
        for (pos, other) in [(1usize, 0usize), (0, 1)] {
            let scaled = &n.inputs[pos];
            let Some(m) = producers.get(scaled).map(|&j| &g.nodes[j]) else { continue };
            if m.op != "Mul" || !m.domain.is_empty() || !single_use(g, &consumers, scaled) {
                continue;
            }
            let Some((x, s)) = scalar_factor(g, m) else { continue };
            let size = |v: &str| g.shape_of(v).map(|s| s.iter().product::<usize>());
            let (Some(nx), Some(na)) = (size(&x), size(&n.inputs[other])) else { continue };
            // The scaled value must keep its shape (a scalar factor cannot broadcast it).
            if na >= nx || g.shape_of(scaled) != g.shape_of(&x) {
                continue;
            }
            // When A is itself a scalar product (the exporter scales q too), fold the two factors into one
            // constant: a chain of scalar Muls in front of a MatMul trips ONNX Runtime's MatMulScaleFusion (it
            // removes the inner Mul although other nodes read it).
            let (mut a, mut factor) = (n.inputs[other].clone(), s);
            if let Some(q) = producers.get(&a).map(|&j| &g.nodes[j]).filter(|q| q.op == "Mul" && q.domain.is_empty()) {
                if let Some((base, c)) = scalar_factor(g, q) {
                    let (t1, t2) = (&g.initializers[&c], &g.initializers[&factor]);
                    let both = t1.as_f64s().zip(t2.as_f64s()).filter(|_| t1.dtype() == t2.dtype());
                    if let Some((x1, x2)) = both {
                        let shape = if t1.shape.len() >= t2.shape.len() { t1.shape.clone() } else { t2.shape.clone() };
                        let Ok(t) = Tensor::from_f64s(t1.dtype(), shape, vec![x1[0] * x2[0]]) else { continue };
                        factor = g.add_const("lower/scale", t);
                        a = base;
                    }
                }
            }
            let name = g.nodes[i].name.clone();
            let a_scaled = g.fresh(&format!("{name}/scaled_operand"));
            let node_name = g.fresh(&format!("{name}/scaled_operand.node"));
            extra.push((i, Node::new(node_name, "Mul", vec![a, factor], vec![a_scaled.clone()])));
            let n = &mut g.nodes[i];
            n.inputs[other] = a_scaled;
            n.inputs[pos] = x;
            changed += 1;
            break;
        }
    }
    for (i, node) in extra.into_iter().rev() {
        g.nodes.insert(i, node);
    }
    changed
}
