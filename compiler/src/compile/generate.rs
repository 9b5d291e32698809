//! Generation graphs with a fixed-capacity KV cache (static shapes throughout).
//!
//! - `prefill`: the prompt (left-padded to Tp) with the prefix bound as past; returns the last position's
//!   logits and every layer's keys/values [R, H, P+Tp, D], prefix included.
//! - `decode`: one token against a cache of capacity C = P + Tp + max_new - 1; returns the logits and the new
//!   token's keys/values [R, H, 1, D] only. The runtime writes them into the cache in place: no
//!   concatenation, no O(n²) copying. The prefix lives in the cache, so decode needs no trainable input.
//!
//! Position ids are inputs of both graphs: the runtime numbers real tokens P, P+1, ... from the mask, so a
//! left-padded prompt generates what it generates alone. Exports whose ALiBi biases are numbered from the
//! attention mask (Bloom's) take no position ids: the mask over the cache's slots numbers them the same way; those
//! that read them by slot from a table (MPT's) get them numbered from the mask.

use std::collections::BTreeMap;

use anyhow::{bail, Result};

use super::prefix::{self, Positions, PrefixShape};
use crate::ir::{Graph, Model, Node};
use crate::simplify::simplify;
use crate::specialize::{specialize, Dims};
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenShape {
    /// Rows decoded together (batch × beams).
    pub rows: usize,
    /// Prompt length Tp (prompts are left-padded to it).
    pub prompt_len: usize,
    pub max_new: usize,
}

impl GenShape {
    pub fn capacity(&self, p: usize) -> usize {
        p + self.prompt_len + self.max_new.max(1) - 1
    }
}

/// A canonical copy of the export, which must have past inputs.
fn with_past(export: &super::Export) -> Result<Model> {
    let mut model = export.model.clone();
    let source = &export.path;
    crate::canonicalize::canonicalize(&mut model)
        .map_err(|e| e.context(format!("canonicalizing {}", source.display())))?;
    if !model.graph.inputs.iter().any(|v| v.name.starts_with("past_key_values")) {
        bail!(
            "{}: generation needs an export with past (KV-cache) inputs, e.g. optimum's \
             --task text-generation-with-past or torch.onnx.export with past_key_values",
            source.display()
        );
    }
    Ok(model)
}

/// A `position_ids` input feeds the position lookup (the runtime numbers the tokens), or the rotary angles.
/// ALiBi biases numbered from the attention mask (Bloom's, [`crate::inspect::alibi_from_mask`]) need none: the
/// cache's mask numbers its keys as PEFT's prefix and prompt are numbered. ALiBi biases read by slot from a table
/// (MPT's) are numbered from the mask instead ([`alibi_by_real_tokens`]); `keys` is the graph's key length.
fn expose_positions(g: &mut Graph, keys: usize) -> Result<()> {
    if !g.is_input("position_ids") && crate::inspect::embeddings(g).position_rows.is_none() {
        if expose_rotary_positions(g)? || crate::inspect::alibi_from_mask(g) || alibi_by_real_tokens(g, keys)? {
            return Ok(());
        }
        bail!(
            "the export has no position_ids input, no position table, no rotary angles pfx can feed and no ALiBi \
             biases pfx can number (Bloom's, from the attention mask, or MPT's, from a table by key slot), so the \
             generation graphs cannot number the tokens of a fixed-size cache (a rotary table read at the cache \
             position, as torch.onnx dynamo exports GPT-J and CodeGen, is such a case: optimum's exports of those \
             take position_ids). The training and eval graphs are right (the export numbers their positions \
             itself): compile with --max-new 0 for them alone; generating from such a model is not supported"
        );
    }
    prefix::expose_positions(g)
}

/// MPT's ALiBi biases ([`crate::inspect::alibi_slot_tables`]) number the keys by slot: key k of K gets
/// `slope * (k - (K - 1))`. HF and PEFT run an unpadded prompt, whose slots are its tokens; in the generation
/// cache the pads of a left-padded prompt and the empty slots before the new token would change the distances.
/// Each table's slice is replaced by `slope * (c_k - n)`, c_k = cumsum(attention_mask)_k and n the row's count of
/// unmasked keys: HF's values for the same tokens unpadded (masked keys get any value; the mask drops them).
/// Refuses a cache with more keys than the table has positions, as HF cannot run those. Returns whether any was
/// found.
fn alibi_by_real_tokens(g: &mut Graph, keys: usize) -> Result<bool> {
    use crate::ir::Attr;
    use crate::tensor::DType;
    let tables = crate::inspect::alibi_slot_tables(g);
    let Some(positions) = tables.iter().map(|t| t.positions).min() else { return Ok(false) };
    if !g.is_input("attention_mask") {
        bail!("the export adds ALiBi biases by key slot but has no attention_mask input to number its tokens");
    }
    if keys > positions {
        bail!(
            "the export's ALiBi table serves {positions} positions (MPT's max_seq_len), and a generation graph \
             attends to {keys} keys (prefix + --prompt-len + --max-new): lower --prompt-len or --max-new"
        );
    }
    let to_i64 = vec![("to", Attr::Int(DType::I64.onnx_code() as i64))];
    let mask = g.op1("Cast", &["attention_mask"], to_i64, "alibi/mask");
    let axis = g.add_const("alibi/axis", Tensor::scalar_i64(1));
    let count = g.op1("CumSum", &[&mask, &axis], vec![], "alibi/count");
    let (starts, ends) =
        (g.add_const("alibi/last", Tensor::vec_i64(&[-1])), g.add_const("alibi/end", Tensor::vec_i64(&[i64::MAX])));
    let axes = g.add_const("alibi/axes", Tensor::vec_i64(&[1]));
    let total = g.op1("Slice", &[&count, &starts, &ends, &axes], vec![], "alibi/total");
    let back = g.op1("Sub", &[&count, &total], vec![], "alibi/back");
    // [R, K] -> [R, 1, 1, K], against the scores [R, H, queries, K].
    let spread = g.add_const("alibi/spread_axes", Tensor::vec_i64(&[1, 2]));
    let back = g.op1("Unsqueeze", &[&back, &spread], vec![], "alibi/back4");
    for t in &tables {
        let out = g.nodes[t.slice].outputs[0].clone();
        let table = g.nodes[t.slice].inputs[0].clone();
        let slopes = g.add_const("alibi/slopes", Tensor::f32(vec![1, t.slopes.len(), 1, 1], t.slopes.clone()));
        let slopes = g.op1("CastLike", &[&slopes, &table], vec![], "alibi/slopes_cast");
        let distance = g.op1("CastLike", &[&back, &table], vec![], "alibi/distance");
        let bias = g.op1("Mul", &[&distance, &slopes], vec![], "alibi/bias");
        g.rename_uses(&out, &bias);
    }
    g.toposort()?;
    g.dce();
    Ok(true)
}

/// Rotary exports without a `position_ids` input (torch.onnx dynamo's Llama, optimum's Gemma) turn
/// `cache_position` (past length + 0..T, one vector for every row: a `Range`, plus the past length) into HF's
/// `position_ids` by an `Unsqueeze` that puts a batch axis of 1 in front, then into the rotation angles (a product
/// with the inverse frequencies that `Cos` and `Sin` read). With a fixed-size cache that would number a token by
/// its slot. On the way to `Cos` and `Sin` those `Unsqueeze`s are replaced by a `position_ids` input [B, T], whose
/// batch axis takes the place of the 1. Their other readers keep the slots: the causal mask compares
/// `cache_position` with the key slots (optimum's Gemma export reads the same `Unsqueeze` for both).
/// Returns whether any was found.
pub(super) fn expose_rotary_positions(g: &mut Graph) -> Result<bool> {
    use crate::ir::{Dim, ValueInfo, ValueType};
    use crate::tensor::DType;
    let prod = g.producers();
    let from_range = |v: &str| {
        prod.get(v).map(|&i| &g.nodes[i]).is_some_and(|n| {
            n.op == "Range"
                || (n.op == "Add" && n.inputs.iter().any(|x| prod.get(x).is_some_and(|&j| g.nodes[j].op == "Range")))
        })
    };
    let axes_of = |n: &Node| g.initializers.get(n.inputs.get(1)?).and_then(|t| t.as_i64s());
    let mut sites = BTreeMap::new(); // Unsqueeze node -> its axes
                                     // Values on the way to Cos/Sin: the readers of a site that are rewired.
    let mut seen = std::collections::HashSet::new();
    let mut todo: Vec<String> =
        g.nodes.iter().filter(|n| n.op == "Cos" || n.op == "Sin").map(|n| n.inputs[0].clone()).collect();
    while let Some(v) = todo.pop() {
        let Some(&i) = prod.get(&v).filter(|_| seen.insert(v.clone())) else { continue };
        let n = &g.nodes[i];
        if let Some(axes) = axes_of(n).filter(|a| n.op == "Unsqueeze" && a.contains(&0) && from_range(&n.inputs[0])) {
            sites.insert(i, axes);
        } else if matches!(n.op.as_str(), "Concat" | "Mul" | "MatMul" | "Cast" | "Transpose" | "Reshape" | "Unsqueeze")
        {
            todo.extend(n.inputs.iter().filter(|x| !x.is_empty() && !g.initializers.contains_key(*x)).cloned());
        }
    }
    if sites.is_empty() {
        return Ok(false);
    }
    let dims = vec![Dim::Sym("batch".into()), Dim::Sym("sequence".into())];
    g.inputs.push(ValueInfo { name: "position_ids".into(), ty: ValueType { dtype: DType::I64, shape: Some(dims) } });
    for (i, axes) in sites {
        let (site_in, site_out, site_name) =
            (g.nodes[i].inputs[0].clone(), g.nodes[i].outputs[0].clone(), g.nodes[i].name.clone());
        // cache_position [T] with axes A (0 among them) -> position_ids [B, T] with A \ {0}: the same shape, B for 1.
        let axes: Vec<i64> = axes.into_iter().filter(|&a| a != 0).collect();
        let ids = g.op1("CastLike", &["position_ids", &site_in], vec![], "position_ids.cast");
        let positions = if axes.is_empty() {
            ids
        } else {
            let c = g.add_const(&format!("{site_name}.axes_with_batch"), Tensor::vec_i64(&axes));
            g.op1("Unsqueeze", &[&ids, &c], vec![], &format!("{site_name}.by_position"))
        };
        for n in g.nodes.iter_mut().filter(|n| n.outputs.iter().any(|o| seen.contains(o))) {
            for input in n.inputs.iter_mut().filter(|x| **x == site_out) {
                input.clone_from(&positions);
            }
        }
    }
    g.toposort()?;
    g.dce();
    Ok(true)
}

/// Refuses generation graphs whose cache reaches a sliding window pfx does not find in the graph: the
/// `sliding_window` of the export's config.json when the graph has neither a computed window
/// (`inspect::computed_windows`, rewritten by `computed_windows_by_real_tokens`) nor GPT-Neo's tables
/// (`inspect::local_windows`). The generation graphs would count such a window in cache slots, so a cache longer
/// than it could attend outside it.
pub(super) fn refuse_unread_window(g: &Graph, window: Option<usize>, gs: &GenShape, p: usize) -> Result<()> {
    let read = !crate::inspect::computed_windows(g).is_empty()
        || crate::inspect::local_windows(g).is_ok_and(|w| !w.is_empty());
    let Some(w) = window.filter(|_| !read) else { return Ok(()) };
    let capacity = gs.capacity(p);
    if capacity >= w {
        bail!(
            "its config.json sets sliding_window {w}, and the generation cache (prefix {p} + --prompt-len {} + \
             --max-new {} - 1 = {capacity}) is not shorter, but pfx finds no window in the graph to count in real \
             tokens, so tokens could attend outside it. Lower --prompt-len/--max-new so that the cache is under \
             {w}, or pass --max-new 0 for the training graphs alone (they are right with any window)",
            gs.prompt_len,
            gs.max_new
        );
    }
    Ok(())
}

/// Keeps only the last position of `name` along `axis` (an output keeps its name).
pub(super) fn keep_last(model: &mut Model, name: &str, axis: usize) -> Result<()> {
    let g = &mut model.graph;
    let s = g.shape_of(name).ok_or_else(|| anyhow::anyhow!("unknown shape of '{name}'"))?;
    let n = s[axis] as i64;
    let inner = g.fresh(&format!("{name}.all"));
    for node in &mut g.nodes {
        for o in &mut node.outputs {
            if o == name {
                *o = inner.clone();
            }
        }
    }
    g.rename_uses(name, &inner);
    let (st, en, ax) = (
        g.add_const(&format!("{name}.last_start"), Tensor::vec_i64(&[n - 1])),
        g.add_const(&format!("{name}.last_end"), Tensor::vec_i64(&[n])),
        g.add_const(&format!("{name}.last_axis"), Tensor::vec_i64(&[axis as i64])),
    );
    let node = g.fresh(&format!("{name}.last"));
    g.nodes.push(Node::new(node, "Slice", vec![inner, st, en, ax], vec![name.to_string()]));
    g.types.remove(name);
    Ok(())
}

/// The prefill graph. With `baked`, the trainable tensors are constants (the generator folds away).
pub fn build_prefill(
    export: &super::Export,
    shape: &PrefixShape,
    gs: &GenShape,
    baked: Option<&BTreeMap<String, Tensor>>,
) -> Result<Model> {
    let mut model = with_past(export)?;
    expose_positions(&mut model.graph, shape.len + gs.prompt_len)?;
    let windows = crate::inspect::local_windows(&model.graph)?;
    computed_windows_by_real_tokens(&mut model.graph, shape.len, gs.prompt_len, gs.rows)?;
    let dims = Dims { batch: gs.rows, seq: gs.prompt_len, past: Some(shape.len), src_len: None };
    specialize(&mut model, &dims)?;
    windows_by_real_tokens(&mut model.graph, &windows, shape.len, gs.prompt_len)?;
    let g = &mut model.graph;
    let kv = prefix::build_generator(g, shape, "", gs.rows)?;
    prefix::bind_past(g, &kv, shape.len, gs.rows, gs.prompt_len, Positions::Input)?;
    if let Some(values) = baked {
        let names: Vec<String> = shape.trainables("").into_iter().map(|t| t.0).collect();
        super::bake::inputs_to_constants(g, &names, values)?;
    }
    // Presents carry prefix + prompt keys/values: the runtime seeds its cache with them.
    g.outputs.retain(|o| o.name == "logits" || o.name.starts_with("present"));
    model.graph.types.clear();
    simplify(&mut model.graph)?;
    keep_last(&mut model, "logits", 1)?;
    simplify(&mut model.graph)?;
    slice_before_position_wise(&mut model.graph)?;
    simplify(&mut model.graph)?;
    super::lower::lower_for_inference(&mut model.graph)?;
    Ok(model)
}

/// Moves each Slice along a leading axis above the position-wise ops that feed it, one op at a time: a product
/// with a constant 2-D weight (`MatMul`, or `Gemm` between the two `Reshape`s that flatten the leading axes
/// into rows and back) and `LayerNormalization` over the last axis compute each position on its own, so
/// slicing their input gives the same values. The prefill keeps only the last position's logits: its LM head
/// (hidden × vocabulary, about a third of GPT-2 small's prefill work for a 32-token prompt) and final layer
/// norm then run on that position alone. ONNX Runtime had run them on every position (B=8 prefill: 351 → 262 ms
/// of kernel time); tract's optimizer moved the slice itself. Returns how many ops the slices moved above. Runs
/// on a specialized graph (static shapes).
pub(super) fn slice_before_position_wise(g: &mut Graph) -> Result<usize> {
    let mut moved = 0;
    loop {
        let (producers, consumers) = (g.producers(), g.consumers());
        let only_reader = |v: &str| !g.is_output(v) && consumers.get(v).map_or(0, Vec::len) == 1;
        let found = g.nodes.iter().enumerate().find_map(|(i, slice)| {
            let axis = leading_axis_slice(g, slice)?;
            let &p = producers.get(&slice.inputs[0])?;
            if !only_reader(&slice.inputs[0]) {
                return None;
            }
            let op = &g.nodes[p];
            let rank = g.shape_of(&slice.inputs[0])?.len();
            let same_rank = || op.inputs.first().and_then(|x| g.shape_of(x)).is_some_and(|s| s.len() == rank);
            let position_wise = op.outputs.len() == 1
                && match op.op.as_str() {
                    "MatMul" => {
                        constant(g, &producers, &op.inputs[1])
                            && g.shape_of(&op.inputs[1]).is_some_and(|w| w.len() == 2)
                    }
                    "LayerNormalization" => op.int("axis").unwrap_or(-1).rem_euclid(rank as i64) == rank as i64 - 1,
                    _ => false,
                };
            if position_wise && same_rank() {
                return Some(Lift::Op { slice: i, op: p });
            }
            rows_product(g, &producers, &only_reader, p, axis).map(|(gemm, flatten)| Lift::RowsProduct {
                slice: i,
                gemm,
                flatten,
            })
        });
        match found {
            None => break,
            Some(Lift::Op { slice, op }) => {
                // x → op → y → slice → out   becomes   x → slice → kept → op → out
                let x = g.nodes[op].inputs[0].clone();
                let (y, out) = (g.nodes[op].outputs[0].clone(), g.nodes[slice].outputs[0].clone());
                let kept = g.fresh(&format!("{x}.kept"));
                g.nodes[slice].inputs[0] = x;
                g.nodes[slice].outputs[0] = kept.clone();
                g.nodes[op].inputs[0] = kept;
                g.nodes[op].outputs[0] = out.clone();
                g.types.remove(&y);
                g.types.remove(&out);
                moved += 1;
            }
            Some(Lift::RowsProduct { slice, gemm, flatten }) => {
                // x [d.., K] → Reshape [M, K] → Gemm → [M, N] → Reshape [d.., N] → slice → out   becomes
                // x → slice → kept [d'.., K] → Reshape [M', K] → Gemm → [M', N] → Reshape [d'.., N] → out
                let x = g.nodes[flatten].inputs[0].clone();
                let out = g.nodes[slice].outputs[0].clone();
                let (x_shape, out_shape) = (g.shape_of(&x).expect("checked"), g.shape_of(&out).expect("checked"));
                let rows: usize = out_shape[..out_shape.len() - 1].iter().product();
                let k = *x_shape.last().expect("checked");
                let kept = g.fresh(&format!("{x}.kept"));
                let mut cut = g.nodes[slice].clone();
                cut.inputs[0] = x;
                cut.outputs[0] = kept.clone();
                let flat_shape = g.add_const(&format!("{kept}.rows"), Tensor::vec_i64(&[rows as i64, k as i64]));
                let flat = g.op1("Reshape", &[&kept, &flat_shape], vec![], &format!("{kept}.flat"));
                let mut product = g.nodes[gemm].clone();
                product.name = g.fresh(&format!("{}.kept", product.name));
                product.inputs[0] = flat;
                product.outputs[0] = g.fresh(&format!("{}.kept", product.outputs[0]));
                let dims: Vec<i64> = out_shape.iter().map(|&d| d as i64).collect();
                let back_shape = g.add_const(&format!("{out}.shape"), Tensor::vec_i64(&dims));
                let back = Node::new(
                    g.fresh(&format!("{out}.unflatten")),
                    "Reshape",
                    vec![product.outputs[0].clone(), back_shape],
                    vec![out.clone()],
                );
                g.nodes[slice] = cut;
                g.nodes.push(product);
                g.nodes.push(back);
                g.types.remove(&out);
                moved += 1;
            }
        }
        g.toposort()?;
        g.dce();
    }
    Ok(moved)
}

/// Whether `v` is a weight: a constant, or computed from constants only (e.g. a tied embedding transposed).
fn constant(g: &Graph, producers: &std::collections::HashMap<String, usize>, v: &str) -> bool {
    if g.initializers.contains_key(v) {
        return true;
    }
    let Some(&p) = producers.get(v) else { return false };
    let node = &g.nodes[p];
    // Shallow on purpose: weight preparation is one or two ops deep.
    node.inputs.iter().all(|i| i.is_empty() || g.initializers.contains_key(i))
        && node.op != "RandomNormal"
        && node.op != "RandomUniform"
}

/// A slice [`slice_before_position_wise`] can lift, and what it lifts it above.
enum Lift {
    /// One position-wise op.
    Op { slice: usize, op: usize },
    /// `Reshape` to rows, `Gemm`, `Reshape` back.
    RowsProduct { slice: usize, gemm: usize, flatten: usize },
}

/// The axis of a Slice that cuts one axis other than the last, with steps of 1.
fn leading_axis_slice(g: &Graph, slice: &Node) -> Option<usize> {
    if slice.op != "Slice" || !(4..=5).contains(&slice.inputs.len()) {
        return None;
    }
    let rank = g.shape_of(&slice.inputs[0])?.len() as i64;
    let axes = g.initializers.get(&slice.inputs[3])?.as_i64s()?;
    let steps_one = slice
        .inputs
        .get(4)
        .is_none_or(|s| g.initializers.get(s).and_then(|t| t.as_i64s()).is_some_and(|v| v.iter().all(|&x| x == 1)));
    match axes[..] {
        [a] if steps_one && (-rank..rank - 1).contains(&a) && a != -1 => Some(a.rem_euclid(rank) as usize),
        _ => None,
    }
}

/// Where node `unflatten` is `Reshape(Gemm(Reshape(x [d.., K], [M, K]), W, C), [d.., N])` with W (and C) constant,
/// no transposed x, and every intermediate read once: (the Gemm, the first Reshape).
fn rows_product(
    g: &Graph,
    producers: &std::collections::HashMap<String, usize>,
    only_reader: &dyn Fn(&str) -> bool,
    unflatten: usize,
    axis: usize,
) -> Option<(usize, usize)> {
    let back = &g.nodes[unflatten];
    if back.op != "Reshape" || !only_reader(&back.inputs[0]) {
        return None;
    }
    let &gemm = producers.get(&back.inputs[0])?;
    let product = &g.nodes[gemm];
    let weight = |i: usize| product.inputs.get(i).is_none_or(|v| v.is_empty() || constant(g, producers, v));
    let has_weight = product.inputs.len() >= 2 && !product.inputs[1].is_empty();
    if product.op != "Gemm" || product.int("transA").unwrap_or(0) != 0 || !has_weight || !weight(1) || !weight(2) {
        return None;
    }
    if !only_reader(&product.inputs[0]) {
        return None;
    }
    let &flatten = producers.get(&product.inputs[0])?;
    if g.nodes[flatten].op != "Reshape" {
        return None;
    }
    let (x, y) = (g.shape_of(&g.nodes[flatten].inputs[0])?, g.shape_of(&back.outputs[0])?);
    let leading_equal = x.len() == y.len() && x[..x.len() - 1] == y[..y.len() - 1] && axis < x.len() - 1;
    let rows: usize = x[..x.len() - 1].iter().product();
    let flat_ok = g.shape_of(&product.inputs[0])? == [rows, *x.last()?];
    (leading_equal && flat_ok).then_some((gemm, flatten))
}

/// The one-token decode graph over a cache of capacity C.
pub fn build_decode(export: &super::Export, p: usize, gs: &GenShape) -> Result<Model> {
    let mut model = with_past(export)?;
    let c = gs.capacity(p);
    expose_positions(&mut model.graph, c + 1)?;
    let windows = crate::inspect::local_windows(&model.graph)?;
    computed_windows_by_real_tokens(&mut model.graph, c, 1, gs.rows)?;
    let dims = Dims { batch: gs.rows, seq: 1, past: Some(c), src_len: None };
    specialize(&mut model, &dims)?;
    windows_by_real_tokens(&mut model.graph, &windows, c, 1)?;
    let presents: Vec<String> =
        model.graph.outputs.iter().filter(|o| o.name.starts_with("present")).map(|o| o.name.clone()).collect();
    for name in &presents {
        keep_last(&mut model, name, 2)?;
    }
    simplify(&mut model.graph)?;
    super::lower::lower_for_inference(&mut model.graph)?;
    read_cache_in_parts(&mut model.graph)?;
    simplify(&mut model.graph)?;
    Ok(model)
}

/// Local attentions (`windows`: `Where` node -> window w, `inspect::local_windows`) in a generation graph count
/// their window in real tokens, so that a left-padded prompt generates what it generates alone (as the other
/// attentions do).
///
/// The export measures the window in key slots: the left padding of a prompt would push the prefix out of its
/// window, and the decode graph places the new token at slot C, the cache's capacity, whatever slot it fills.
/// Here key k is numbered r_k = cumsum(attention_mask)_k - 1 (prefix and real tokens; padding and empty slots are
/// masked anyway) and the query at key slot `first + t` keeps k when k <= first + t and r_query - r_k < w. The
/// graph's queries sit at key slots `first..first + queries` of `attention_mask` [R, keys]: P..P+Tp in the prefill,
/// C (the new token) in the decode.
fn windows_by_real_tokens(
    g: &mut Graph,
    windows: &BTreeMap<String, usize>,
    first: usize,
    queries: usize,
) -> Result<()> {
    let targets: Vec<usize> =
        g.nodes.iter().enumerate().filter(|(_, n)| windows.contains_key(&n.name)).map(|(i, _)| i).collect();
    if targets.is_empty() {
        return Ok(());
    }
    if !g.is_input("attention_mask") {
        bail!("the export has local attentions (windows {windows:?}) but no attention_mask input to count tokens");
    }
    let mask_shape = g.shape_of("attention_mask");
    let Some([rows, keys]) = mask_shape.as_deref().and_then(|s| <[usize; 2]>::try_from(s).ok()) else {
        bail!("the attention_mask of an export with local attentions is not [batch, keys]: {mask_shape:?}");
    };
    let back = tokens_back(g, first, queries);
    let causal: Vec<bool> = (0..queries).flat_map(|t| (0..keys).map(move |k| k <= first + t)).collect();
    let causal = g.add_const("window/causal", Tensor::bool(vec![queries, keys], causal));
    let shape = g.add_const("window/shape", Tensor::vec_i64(&[rows as i64, 1, queries as i64, keys as i64]));
    for i in targets {
        let w = windows[&g.nodes[i].name];
        let limit = g.add_const("window/size", Tensor::scalar_i64(w as i64));
        let near = g.op1("Less", &[&back, &limit], vec![], "window/near");
        let keep = g.op1("And", &[&near, &causal], vec![], "window/keep");
        let keep = g.op1("Reshape", &[&keep, &shape], vec![], "window/keep4");
        g.nodes[i].inputs[0] = keep;
    }
    g.toposort()?;
    Ok(())
}

/// How many real tokens each key is before each query, [R, queries, keys]: keys numbered by
/// cumsum(attention_mask) - 1 (prefix and real tokens; padding and empty slots repeat a number and are masked
/// anyway), the queries being the keys at slots `first..first + queries` (see `windows_by_real_tokens`).
fn tokens_back(g: &mut Graph, first: usize, queries: usize) -> String {
    use crate::ir::Attr;
    use crate::tensor::DType;
    let to_i64 = vec![("to", Attr::Int(DType::I64.onnx_code() as i64))];
    let mask = g.op1("Cast", &["attention_mask"], to_i64, "window/mask");
    let axis = g.add_const("window/axis", Tensor::scalar_i64(1));
    let count = g.op1("CumSum", &[&mask, &axis], vec![], "window/count");
    // Queries' numbers [R, queries, 1] against keys' [R, 1, keys] (the -1 of both cancels).
    let starts = g.add_const("window/starts", Tensor::vec_i64(&[first as i64]));
    let ends = g.add_const("window/ends", Tensor::vec_i64(&[(first + queries) as i64]));
    let axes = g.add_const("window/axes", Tensor::vec_i64(&[1]));
    let of_queries = g.op1("Slice", &[&count, &starts, &ends, &axes], vec![], "window/query_count");
    let last = g.add_const("window/last_axis", Tensor::vec_i64(&[2]));
    let of_queries = g.op1("Unsqueeze", &[&of_queries, &last], vec![], "window/query_count3");
    let middle = g.add_const("window/middle_axis", Tensor::vec_i64(&[1]));
    let of_keys = g.op1("Unsqueeze", &[&count, &middle], vec![], "window/key_count3");
    g.op1("Sub", &[&of_queries, &of_keys], vec![], "window/back")
}

/// Sliding windows the export computes from slot indices (`key > query - w`, Mistral's and Gemma's:
/// `inspect::computed_window_sites`) count real tokens in a generation graph, as `windows_by_real_tokens` does for
/// GPT-Neo's: the export's comparison of slots would push the prefix out of a left-padded prompt's window, and in
/// the decode graph the new token sits at slot C whatever its place. Each comparison's readers get
/// `tokens back < w` instead, [R, 1, queries, keys] ([`tokens_back`]); the export's causal and padding masks
/// still apply. Runs before specialization, which would fold the comparison of two `Range`s into a constant.
/// Returns how many comparisons were replaced.
fn computed_windows_by_real_tokens(g: &mut Graph, first: usize, queries: usize, rows: usize) -> Result<usize> {
    let sites = crate::inspect::computed_window_sites(g);
    if sites.is_empty() {
        return Ok(0);
    }
    if !g.is_input("attention_mask") {
        bail!("the export computes sliding windows but has no attention_mask input to count tokens");
    }
    let back = tokens_back(g, first, queries);
    let shape = g.add_const("window/shape", Tensor::vec_i64(&[rows as i64, 1, queries as i64, -1]));
    for &(i, w) in &sites {
        let inside_out = g.nodes[i].outputs[0].clone();
        let limit = g.add_const("window/size", Tensor::scalar_i64(w as i64));
        let near = g.op1("Less", &[&back, &limit], vec![], "window/near");
        let near = g.op1("Reshape", &[&near, &shape], vec![], "window/near4");
        for n in g.nodes.iter_mut() {
            for input in n.inputs.iter_mut().filter(|x| **x == inside_out) {
                input.clone_from(&near);
            }
        }
    }
    g.toposort()?;
    g.dce();
    Ok(sites.len())
}

/// Decode attention reads the cache and the new token's key/value without concatenating them.
///
/// The export attends over `Concat(past, new)` along the sequence axis: every step copies the whole cache
/// ([R, H, C, D] per layer, twice) to append one row, 62 MB a step for GPT-2 small at R = 8. The products
/// distribute over the concatenation instead:
///
/// ```text
/// q · Transpose(Concat(K, k))  →  Concat((K · qᵀ)ᵀ, (k · qᵀ)ᵀ)          (scores: the columns concatenate)
/// p · Concat(V, v)              →  p[.., :C] · V + p[.., C:] · v         (the contracted axis splits)
/// Slice(Concat(K, k), C..C+1)   →  k                                     (the `present` output)
/// ```
///
/// Only concatenations of a `past_key_values*` graph input along the second-to-last axis are touched, and only
/// their product and `present` readers; the Concat goes once nothing else reads it. Returns how many products
/// were rewritten. Runs on a specialized graph (static shapes).
pub(super) fn read_cache_in_parts(g: &mut Graph) -> Result<usize> {
    use crate::ir::Attr;
    let producers = g.producers();
    // (past, new, rank) where `value` is a cache concatenation.
    let cache_concat = |g: &Graph, value: &str| -> Option<(String, String, usize)> {
        let n = &g.nodes[*producers.get(value)?];
        let rank = g.shape_of(value)?.len();
        let axis = n.int("axis")?;
        let axis = if axis < 0 { axis + rank as i64 } else { axis };
        let past = n.inputs.first()?;
        (n.op == "Concat"
            && n.inputs.len() == 2
            && rank >= 2
            && axis == rank as i64 - 2
            && g.is_input(past)
            && past.starts_with("past_key_values"))
        .then(|| (past.clone(), n.inputs[1].clone(), rank))
    };
    let mut replaced: Vec<usize> = Vec::new();
    let mut rewritten = 0;
    for i in 0..g.nodes.len() {
        let node = g.nodes[i].clone();
        let out = node.outputs[0].clone();
        match node.op.as_str() {
            "MatMul" if node.inputs.len() == 2 => {
                let (a, b) = (&node.inputs[0], &node.inputs[1]);
                let Some(&pb) = producers.get(b) else { continue };
                let by = &g.nodes[pb];
                // q · Kᵀ, Kᵀ = Transpose(Concat(K, k)) swapping the last two axes.
                if by.op == "Transpose" {
                    let Some((past, new, rank)) = cache_concat(g, &by.inputs[0]) else { continue };
                    let perm: Vec<i64> = (0..rank as i64 - 2).chain([rank as i64 - 1, rank as i64 - 2]).collect();
                    if by.ints("perm") != Some(&perm[..]) {
                        continue;
                    }
                    // Each part as (K · qᵀ)ᵀ: a product of the cache as it lies in memory (one dot product per
                    // row) rather than of its transpose.
                    let hint = format!("{out}.parts");
                    let swap = || vec![("perm", Attr::Ints(perm.clone()))];
                    let qt = g.op1("Transpose", &[a], swap(), &hint);
                    let parts: Vec<String> = [past, new]
                        .iter()
                        .map(|x| {
                            let s = g.op1("MatMul", &[x, &qt], vec![], &hint);
                            g.op1("Transpose", &[&s], swap(), &hint)
                        })
                        .collect();
                    let name = g.fresh(&format!("{hint}.concat"));
                    g.nodes.push(Node::new(name, "Concat", parts, vec![out.clone()]).with_attr("axis", Attr::Int(-1)));
                } else {
                    // p · Concat(V, v): the contracted axis is V's second-to-last.
                    let Some((past, new, rank)) = cache_concat(g, b) else { continue };
                    let (Some(ps), Some(ns)) = (g.shape_of(&past), g.shape_of(&new)) else { continue };
                    let (c, n) = (ps[rank - 2] as i64, ns[rank - 2] as i64);
                    let hint = format!("{out}.parts");
                    let axes = g.add_const(&format!("{hint}.axes"), Tensor::vec_i64(&[-1]));
                    let mut terms = Vec::new();
                    for (x, start, end) in [(&past, 0, c), (&new, c, c + n)] {
                        let s = g.add_const(&format!("{hint}.start"), Tensor::vec_i64(&[start]));
                        let e = g.add_const(&format!("{hint}.end"), Tensor::vec_i64(&[end]));
                        let p = g.op1("Slice", &[a, &s, &e, &axes], vec![], &hint);
                        terms.push(g.op1("MatMul", &[&p, x], vec![], &hint));
                    }
                    let name = g.fresh(&format!("{hint}.sum"));
                    g.nodes.push(Node::new(name, "Add", terms, vec![out.clone()]));
                }
                replaced.push(i);
                rewritten += 1;
            }
            // The `present` output: the new rows of the concatenation are the new token's.
            "Slice" if node.inputs.len() >= 4 => {
                let Some((past, new, rank)) = cache_concat(g, &node.inputs[0]) else { continue };
                let (Some(ps), Some(ns)) = (g.shape_of(&past), g.shape_of(&new)) else { continue };
                let konst = |k: usize| g.initializers.get(&node.inputs[k]).and_then(|t| t.as_i64s());
                let (c, n) = (ps[rank - 2] as i64, ns[rank - 2] as i64);
                let axis_ok = konst(3).is_some_and(|a| a == [rank as i64 - 2] || a == [-2]);
                let steps_ok = node.inputs.len() == 4 || konst(4).is_some_and(|s| s == [1]);
                if axis_ok
                    && steps_ok
                    && konst(1) == Some(vec![c])
                    && konst(2).is_some_and(|e| e.len() == 1 && e[0] >= c + n)
                {
                    let name = g.fresh(&format!("{out}.new"));
                    g.nodes.push(Node::new(name, "Identity", vec![new], vec![out.clone()]));
                    replaced.push(i);
                }
            }
            _ => {}
        }
    }
    for i in replaced.into_iter().rev() {
        g.nodes.remove(i);
    }
    g.toposort()?;
    g.dce();
    Ok(rewritten)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Attr, ValueInfo, ValueType};
    use crate::tensor::DType;

    /// x [2, 3, 4] → LayerNormalization → MatMul(w) [2, 3, 5] → Slice(axis, 2..3): the slice's input after the
    /// pass, and how many ops it moved above.
    fn moved(axis: i64, weight_is_input: bool) -> (usize, String) {
        let mut g = Graph::default();
        g.inputs.push(ValueInfo { name: "x".into(), ty: ValueType::known(DType::F32, &[2, 3, 4]) });
        let (scale, bias) = (
            g.add_const("scale", Tensor::f32(vec![4], vec![1.0; 4])),
            g.add_const("bias", Tensor::f32(vec![4], vec![0.0; 4])),
        );
        let w = if weight_is_input {
            g.inputs.push(ValueInfo { name: "w".into(), ty: ValueType::known(DType::F32, &[4, 5]) });
            "w".to_string()
        } else {
            g.add_const("w", Tensor::f32(vec![4, 5], vec![0.5; 20]))
        };
        let ln = g.op1("LayerNormalization", &["x", &scale, &bias], vec![("axis", Attr::Int(-1))], "ln");
        let y = g.op1("MatMul", &[&ln, &w], vec![], "y");
        let (start, end, axes) = (
            g.add_const("s", Tensor::vec_i64(&[2])),
            g.add_const("e", Tensor::vec_i64(&[3])),
            g.add_const("a", Tensor::vec_i64(&[axis])),
        );
        let out = g.op1("Slice", &[&y, &start, &end, &axes], vec![], "out");
        g.outputs.push(ValueInfo { name: out.clone(), ty: ValueType::known(DType::F32, &[]) });
        simplify(&mut g).unwrap();
        let n = slice_before_position_wise(&mut g).unwrap();
        simplify(&mut g).unwrap();
        let slice = g.nodes.iter().find(|n| n.op == "Slice").unwrap();
        (n, slice.inputs[0].clone())
    }

    /// The value `name` of `g` with input x.
    fn evaluate(g: &Graph, x: &Tensor, name: &str) -> Tensor {
        let mut values: BTreeMap<String, Tensor> = g.initializers.clone();
        values.insert("x".into(), x.clone());
        for node in &g.nodes {
            let inputs: Vec<Option<&Tensor>> = node.inputs.iter().map(|i| values.get(i)).collect();
            let outs = crate::eval::eval_node(node, &inputs).unwrap().unwrap();
            for (o, t) in node.outputs.iter().zip(outs) {
                values.insert(o.clone(), t);
            }
        }
        values.remove(name).unwrap()
    }

    /// x [2, 3, 4] → Reshape [6, 4] → Gemm(w, c) [6, 5] → Reshape [2, 3, 5] → Slice(axis 1, 2..3).
    #[test]
    fn slices_move_above_a_product_of_flattened_rows() {
        let mut g = Graph::default();
        g.inputs.push(ValueInfo { name: "x".into(), ty: ValueType::known(DType::F32, &[2, 3, 4]) });
        let rows = g.add_const("rows", Tensor::vec_i64(&[6, 4]));
        let back = g.add_const("back", Tensor::vec_i64(&[2, 3, 5]));
        let (w, c) = (
            g.add_const("w", Tensor::f32(vec![4, 5], (0..20).map(|i| i as f32 * 0.1 - 1.0).collect())),
            g.add_const("c", Tensor::f32(vec![5], vec![1.0; 5])),
        );
        let x2 = g.op1("Reshape", &["x", &rows], vec![], "x2");
        let y2 = g.op1("Gemm", &[&x2, &w, &c], vec![], "y2");
        let y = g.op1("Reshape", &[&y2, &back], vec![], "y");
        let (start, end, axes) = (
            g.add_const("s", Tensor::vec_i64(&[2])),
            g.add_const("e", Tensor::vec_i64(&[3])),
            g.add_const("a", Tensor::vec_i64(&[1])),
        );
        let out = g.op1("Slice", &[&y, &start, &end, &axes], vec![], "out");
        g.outputs.push(ValueInfo { name: out.clone(), ty: ValueType::known(DType::F32, &[]) });
        simplify(&mut g).unwrap();
        let before = g.clone();
        assert_eq!(slice_before_position_wise(&mut g).unwrap(), 1);
        simplify(&mut g).unwrap();
        let x = Tensor::f32(vec![2, 3, 4], (0..24).map(|i| (i as f32 * 0.37).sin()).collect());
        assert_eq!(evaluate(&g, &x, &out), evaluate(&before, &x, &out), "same values");
        let ops: Vec<(&str, Vec<usize>)> =
            g.nodes.iter().map(|n| (n.op.as_str(), g.shape_of(&n.outputs[0]).unwrap())).collect();
        assert_eq!(
            ops,
            [("Slice", vec![2, 1, 4]), ("Reshape", vec![2, 4]), ("Gemm", vec![2, 5]), ("Reshape", vec![2, 1, 5])]
        );
        assert_eq!(g.nodes[0].inputs[0], "x");
        assert_eq!(g.nodes[3].outputs[0], out);
    }

    #[test]
    fn slices_of_positions_move_above_position_wise_ops() {
        assert_eq!(moved(1, false), (2, "x".to_string()), "a position axis: above the product and the norm");
        assert_eq!(moved(-2, false).0, 2, "the same axis counted from the end");
        assert_eq!(moved(2, false).0, 0, "the last axis is what the product and the norm mix");
        assert_eq!(moved(1, true).0, 0, "a product with a weight that is not constant stays");
    }
}
