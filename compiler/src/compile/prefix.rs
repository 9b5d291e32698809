//! The prefix: trainable tensors, the generator that turns them into per-layer keys and values, and the two
//! ways of reaching the attention layers (binding an export's past inputs, or rewriting attention sites).

use std::collections::{BTreeMap, HashMap};

use anyhow::{anyhow, bail, Result};

use crate::ir::{Attr, Graph, Node, ValueInfo, ValueType};
use crate::tensor::{DType, Tensor};

/// Sizes of one prefix generator.
#[derive(Clone, Debug)]
pub struct PrefixShape {
    /// Prefix length P.
    pub len: usize,
    pub layers: usize,
    /// Key/value heads: the query heads, or fewer under grouped-query attention.
    pub heads: usize,
    pub head_dim: usize,
    /// heads · head_dim: the model width d, or less under grouped-query attention (PEFT's `token_dim`).
    pub hidden: usize,
    /// MLP width M, or None for `--no-reparam`.
    pub mid: Option<usize>,
}

impl PrefixShape {
    /// 2·L·d: the width of the generator's output.
    pub fn kv_width(&self) -> usize {
        2 * self.layers * self.hidden
    }

    /// Refuses a prefix too large to build (its parameters are made at compile time): an overflow, or more
    /// than 2^31 parameters (8 GiB of f32; PEFT's largest recipes have under 10^8).
    pub fn check_size(&self) -> Result<()> {
        let count = self.trainables("").iter().try_fold(0usize, |acc, (_, dims)| {
            dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).and_then(|n| acc.checked_add(n))
        });
        match count {
            Some(n) if n <= 1 << 31 => Ok(()),
            _ => bail!(
                "the prefix would have {} parameters ({} layers, hidden {}, --prefix-len {}, --mid-dim {}): far \
                 more than a prefix needs; check --prefix-len and --mid-dim",
                count.map_or("more than 2^64".to_string(), |n| n.to_string()),
                self.layers,
                self.hidden,
                self.len,
                self.mid.map_or("none".to_string(), |m| m.to_string())
            ),
        }
    }

    /// The trainable tensors with PEFT's PrefixEncoder names and layouts, each name prefixed by `site`.
    pub fn trainables(&self, site: &str) -> Vec<(String, Vec<usize>)> {
        let n = |s: &str| format!("{site}{s}");
        match self.mid {
            Some(m) => vec![
                (n("embedding.weight"), vec![self.len, self.hidden]),
                (n("transform.0.weight"), vec![m, self.hidden]),
                (n("transform.0.bias"), vec![m]),
                (n("transform.2.weight"), vec![self.kv_width(), m]),
                (n("transform.2.bias"), vec![self.kv_width()]),
            ],
            None => vec![(n("embedding.weight"), vec![self.len, self.kv_width()])],
        }
    }
}

/// Adds the trainable inputs and the generator. Returns, per layer, the (key, value) values of shape
/// [B, H, P, D]: layer l's key is row 2l and its value row 2l+1 of the [2L, H, P, D] view, as PEFT lays them out.
pub fn build_generator(g: &mut Graph, shape: &PrefixShape, site: &str, batch: usize) -> Result<Vec<(String, String)>> {
    for (name, dims) in shape.trainables(site) {
        if g.is_input(&name) || g.initializers.contains_key(&name) {
            bail!("the model already has a value named '{name}'");
        }
        g.inputs.push(ValueInfo { name, ty: ValueType::known(DType::F32, &dims) });
    }
    let n = |s: &str| format!("{site}{s}");
    let hint = format!("{site}prefix");
    let emb = n("embedding.weight");
    let kv = match shape.mid {
        Some(_) => {
            // Linear(d, M) -> Tanh -> Linear(M, 2Ld), with nn.Linear's x Wᵀ + b.
            let w0 = n("transform.0.weight");
            let w0t = g.op1("Transpose", &[&w0], vec![("perm", Attr::Ints(vec![1, 0]))], &format!("{hint}/w0t"));
            let h = g.op1("MatMul", &[&emb, &w0t], vec![], &format!("{hint}/h"));
            let b0 = n("transform.0.bias");
            let h = g.op1("Add", &[&h, &b0], vec![], &format!("{hint}/h_bias"));
            let h = g.op1("Tanh", &[&h], vec![], &format!("{hint}/h_tanh"));
            let w2 = n("transform.2.weight");
            let w2t = g.op1("Transpose", &[&w2], vec![("perm", Attr::Ints(vec![1, 0]))], &format!("{hint}/w2t"));
            let kv = g.op1("MatMul", &[&h, &w2t], vec![], &format!("{hint}/kv"));
            let b2 = n("transform.2.bias");
            g.op1("Add", &[&kv, &b2], vec![], &format!("{hint}/kv_bias"))
        }
        None => emb.clone(),
    };
    let (p, l2, h, d) = (shape.len as i64, 2 * shape.layers as i64, shape.heads as i64, shape.head_dim as i64);
    let target = g.add_const(&format!("{hint}/view"), Tensor::vec_i64(&[p, l2, h, d]));
    let v = g.op1("Reshape", &[&kv, &target], vec![], &format!("{hint}/view"));
    let v = g.op1("Transpose", &[&v], vec![("perm", Attr::Ints(vec![1, 2, 0, 3]))], &format!("{hint}/rows"));
    let sizes = g.add_const(&format!("{hint}/split"), Tensor::vec_i64(&vec![1; l2 as usize]));
    let rows = g.add_node("Split", vec![v, sizes], l2 as usize, vec![("axis", Attr::Int(0))], &format!("{hint}/row"));
    let full = g.add_const(&format!("{hint}/batch"), Tensor::vec_i64(&[batch as i64, h, p, d]));
    let mut out = Vec::new();
    for l in 0..shape.layers {
        let k = g.op1("Expand", &[&rows[2 * l], &full], vec![], &format!("{hint}/layer{l}/key"));
        let v = g.op1("Expand", &[&rows[2 * l + 1], &full], vec![], &format!("{hint}/layer{l}/value"));
        out.push((k, v));
    }
    Ok(out)
}

/// Where position ids come from once the prefix is bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Positions {
    /// P + arange(T) in every row, as PEFT's forward numbers them (training and evaluation); OPT-style exports
    /// number them from the mask ([`crate::inspect::positions_from_mask`]), as transformers' OPT does under PEFT.
    Training,
    /// A `position_ids` input the caller fills (generation: from the mask, so left padding is harmless).
    Input,
}

/// Layer index of a `past_key_values.{i}.key` style name.
fn layer_of(name: &str) -> Option<usize> {
    name.split('.').nth(1)?.parse().ok()
}

/// Past binding, for exports with past inputs specialized with past length P: the prefix feeds every layer's
/// past, the mask gets P leading ones, position ids (when an input, for training) become P + arange(T).
pub fn bind_past(
    g: &mut Graph,
    kv: &[(String, String)],
    p: usize,
    batch: usize,
    seq: usize,
    positions: Positions,
) -> Result<()> {
    let past: Vec<String> =
        g.inputs.iter().filter(|v| v.name.starts_with("past_key_values")).map(|v| v.name.clone()).collect();
    if past.len() != 2 * kv.len() {
        bail!("the export has {} past inputs, expected 2 per layer for {} layers", past.len(), kv.len());
    }
    for name in &past {
        let l = layer_of(name).ok_or_else(|| anyhow!("cannot read the layer of past input '{name}'"))?;
        let (k, v) =
            kv.get(l).ok_or_else(|| anyhow!("past input '{name}' names layer {l}, beyond the model's layers"))?;
        let src = if name.ends_with(".key") {
            k
        } else if name.ends_with(".value") {
            v
        } else {
            bail!("past input '{name}' is neither a key nor a value");
        };
        g.rename_uses(name, src);
    }
    g.inputs.retain(|v| !v.name.starts_with("past_key_values"));
    // attention_mask: for training callers give [B, T] and the graph reads cat(ones(P), mask); generation
    // graphs take the whole [B, P+T] mask (a caller may mask the prefix out to run the bare model).
    let mut full_mask = None;
    if positions == Positions::Input {
        if !g.is_input("attention_mask") {
            bail!("the export with past has no attention_mask input; pfx needs it to mask the prefix correctly");
        }
    } else if let Some(pos) = g.inputs.iter().position(|v| v.name == "attention_mask") {
        let dt = g.inputs[pos].ty.dtype;
        let full = g.fresh("attention_mask.with_prefix");
        g.rename_uses("attention_mask", &full);
        g.inputs[pos].ty = ValueType::known(dt, &[batch, seq]);
        let ones = g.add_const("attention_mask.prefix_ones", Tensor::i64(vec![batch, p], vec![1; batch * p]).cast(dt)?);
        let node = g.fresh("attention_mask.with_prefix.node");
        g.nodes.insert(
            0,
            Node::new(node, "Concat", vec![ones, "attention_mask".into()], vec![full.clone()])
                .with_attr("axis", Attr::Int(1)),
        );
        full_mask = Some(full);
    } else {
        bail!("the export with past has no attention_mask input; pfx needs it to mask the prefix correctly");
    }
    let pos = g.inputs.iter().position(|v| v.name == "position_ids").filter(|_| positions == Positions::Training);
    if let Some(pos) = pos {
        let from_mask = crate::inspect::positions_from_mask(g);
        let dt = g.inputs.remove(pos).ty.dtype;
        if let Some(mask) = full_mask.filter(|_| from_mask) {
            number_real_tokens(g, &mask, p, seq, dt)?;
        } else {
            let ids: Vec<i64> = (0..batch).flat_map(|_| (0..seq as i64).map(|t| t + p as i64)).collect();
            g.initializers.insert("position_ids".into(), Tensor::i64(vec![batch, seq], ids).cast(dt)?);
        }
    }
    g.toposort()?;
    Ok(())
}

/// Exports without past that number positions from the mask ([`crate::inspect::positions_from_mask`]): the `position_ids`
/// input becomes [`number_real_tokens`] of the `attention_mask` input with P leading ones, as with past (the
/// lookup keeps its + 2, and no P shift: the numbering counts the prefix). Runs on the canonical graph.
pub fn number_from_mask(g: &mut Graph, p: usize, batch: usize, seq: usize) -> Result<()> {
    let Some(mask) = g.inputs.iter().find(|v| v.name == "attention_mask") else {
        bail!("the export numbers its positions from the attention mask, but has no attention_mask input");
    };
    let mask_dt = mask.ty.dtype;
    let pos = g.inputs.iter().position(|v| v.name == "position_ids").ok_or_else(|| anyhow!("no position_ids input"))?;
    let dt = g.inputs.remove(pos).ty.dtype;
    let ones =
        g.add_const("attention_mask.prefix_ones", Tensor::i64(vec![batch, p], vec![1; batch * p]).cast(mask_dt)?);
    let full = g.op1("Concat", &[&ones, "attention_mask"], vec![("axis", Attr::Int(1))], "attention_mask.with_prefix");
    number_real_tokens(g, &full, p, seq, dt)?;
    g.toposort()
}

/// `position_ids` = (cumsum(mask) · mask − 1)[:, P:] of the mask with the prefix's ones: what transformers'
/// OPT computes from PEFT's mask (padding gets −1, as there).
fn number_real_tokens(g: &mut Graph, mask: &str, p: usize, seq: usize, dt: DType) -> Result<()> {
    let to_i64 = vec![("to", Attr::Int(DType::I64.onnx_code() as i64))];
    let m = g.op1("Cast", &[mask], to_i64, "position_ids.mask");
    let axis = g.add_const("position_ids.axis", Tensor::scalar_i64(1));
    let count = g.op1("CumSum", &[&m, &axis], vec![], "position_ids.count");
    let kept = g.op1("Mul", &[&count, &m], vec![], "position_ids.count_real");
    let one = g.add_const("position_ids.one", Tensor::scalar_i64(1));
    let all = g.op1("Sub", &[&kept, &one], vec![], "position_ids.with_prefix");
    let starts = g.add_const("position_ids.starts", Tensor::vec_i64(&[p as i64]));
    let ends = g.add_const("position_ids.ends", Tensor::vec_i64(&[(p + seq) as i64]));
    let axes = g.add_const("position_ids.axes", Tensor::vec_i64(&[1]));
    let ids = g.op1("Slice", &[&all, &starts, &ends, &axes], vec![], "position_ids.real");
    let node = g.fresh("position_ids.node");
    let to = Attr::Int(dt.onnx_code() as i64);
    g.nodes.push(Node::new(node, "Cast", vec![ids], vec!["position_ids".into()]).with_attr("to", to));
    Ok(())
}

/// Makes the position-embedding lookup read a `position_ids` input ([batch, seq], int64) instead of the
/// positions the export computes from the past length. Runs on the canonical graph. No-op when the export
/// already takes `position_ids`. The ids read the table from the row position 0 reads (`inspect::table_offset`:
/// 2 for BART's and OPT's tables, 0 for GPT-2's).
pub fn expose_positions(g: &mut Graph) -> Result<()> {
    if g.is_input("position_ids") {
        return Ok(());
    }
    let offset = crate::inspect::table_offset(g, crate::inspect::detect_family(g)) as i64;
    let sites = crate::inspect::position_lookup_sites(g);
    if sites.len() != 1 {
        bail!("expected one position-embedding lookup in the export, found {}", sites.len());
    }
    let i = sites[0];
    let idx = g.nodes[i].inputs[1].clone();
    let dims = vec![crate::ir::Dim::Sym("batch".into()), crate::ir::Dim::Sym("sequence".into())];
    g.inputs.push(ValueInfo { name: "position_ids".into(), ty: ValueType { dtype: DType::I64, shape: Some(dims) } });
    if let Some(num) = crate::inspect::numbered_from_ids(g, i) {
        // M2M100: the ids number the positions and the past's length offsets them; that length is what the caller
        // feeds (a fixed-capacity cache's shape is not it). Pad tokens keep their zero row, as in the export.
        let Some((add, k)) = num.past else {
            bail!(
                "the position lookup '{}' numbers positions from the token ids but adds no past length: pfx cannot \
                 number the tokens of a cache from it",
                g.nodes[i].name
            );
        };
        let past = g.nodes[add].inputs[k].clone();
        let fed = g.op1("CastLike", &["position_ids", &past], vec![], "position_ids.past_length");
        g.nodes[add].inputs[k] = fed;
        g.toposort()?;
        return Ok(());
    }
    let mut cast = g.op1("CastLike", &["position_ids", &idx], vec![], "position_ids.cast");
    if offset != 0 {
        let c = g.add_const("position_ids.offset", Tensor::scalar_i64(offset));
        let c = g.op1("CastLike", &[&c, &idx], vec![], "position_ids.offset_cast");
        cast = g.op1("Add", &[&cast, &c], vec![], "position_ids.table_rows");
    }
    g.nodes[i].inputs[1] = cast;
    g.toposort()?;
    Ok(())
}

/// For exports without past: PEFT numbers the real tokens from P, so the position-embedding lookup reads
/// indices + P. Runs on the canonical graph, before specialization folds the positions. A lookup numbered from the
/// ids (M2M100's, [`crate::inspect::IdNumbering`]) gets P added to its count, as a past of length P does in HF:
/// real tokens move by P, pad tokens keep the pad row.
pub fn shift_positions(g: &mut Graph, p: usize) -> Result<usize> {
    let mut shifted = 0;
    for i in crate::inspect::position_lookup_sites(g) {
        if let Some(num) = crate::inspect::numbered_from_ids(g, i) {
            if num.past.is_some() {
                bail!(
                    "the position lookup '{}' already adds a past length; pfx shifts exports without past",
                    g.nodes[i].name
                );
            }
            let name = g.nodes[i].name.clone();
            let count = g.nodes[num.mul].inputs[num.count_input].clone();
            let pc = g.add_const(&format!("{name}.prefix_offset"), Tensor::scalar_i64(p as i64));
            let pcl = g.op1("CastLike", &[&pc, &count], vec![], &format!("{name}.prefix_offset_cast"));
            let after = g.op1("Add", &[&count, &pcl], vec![], &format!("{name}.count_after_prefix"));
            g.nodes[num.mul].inputs[num.count_input] = after;
            shifted += 1;
            continue;
        }
        let n = &g.nodes[i];
        let idx = n.inputs[1].clone();
        let name = n.name.clone();
        let pc = g.add_const(&format!("{name}.prefix_offset"), Tensor::scalar_i64(p as i64));
        let pcl = g.op1("CastLike", &[&pc, &idx], vec![], &format!("{name}.prefix_offset_cast"));
        let shifted_idx = g.op1("Add", &[&idx, &pcl], vec![], &format!("{name}.shifted_positions"));
        g.nodes[i].inputs[1] = shifted_idx;
        shifted += 1;
    }
    g.toposort()?;
    Ok(shifted)
}

/// Attention-site injection, for graphs without past inputs (after specialization). Finds each attention as
/// Softmax(chain(MatMul(Q, Kᵀ))) followed by MatMul(·, V), puts the prefix keys in front of Kᵀ (through the
/// same scalar scaling), widens every mask on the chain with neutral prefix columns, and puts the prefix values
/// in front of V. `kv[l]` feeds the l-th attention in graph order. `windows` are the export's local attentions
/// (`inspect::local_windows`, read before specialization folded their tables).
pub fn inject_at_sites(
    g: &mut Graph,
    kv: &[(String, String)],
    kv_heads: usize,
    p: usize,
    windows: &BTreeMap<String, usize>,
    site_windows: &BTreeMap<String, usize>,
) -> Result<usize> {
    g.toposort()?;
    let softmaxes: Vec<String> = g
        .nodes
        .iter()
        .filter(|n| n.op == "Softmax" && g.shape_of(&n.inputs[0]).map(|s| s.len() == 4).unwrap_or(false))
        .map(|n| n.name.clone())
        .collect();
    if softmaxes.len() != kv.len() {
        bail!(
            "found {} attention softmaxes, but the model has {} layers; pfx cannot place the prefix",
            softmaxes.len(),
            kv.len()
        );
    }
    for (l, sm_name) in softmaxes.iter().enumerate() {
        inject_one(g, sm_name, &kv[l], Some(kv_heads), p, windows, site_windows.get(sm_name).copied())
            .map_err(|e| e.context(format!("attention site of layer {l} (Softmax '{sm_name}')")))?;
    }
    g.toposort()?;
    Ok(softmaxes.len())
}

/// Under grouped-query attention the prefix holds the key/value heads (as PEFT's does), but the attention site
/// may see them repeated: each of `kv_heads` serves `heads / kv_heads` query heads, in order, as transformers'
/// `repeat_kv` lays them out ([B, H_kv, P, D] → [B, H_kv, r, P, D] → [B, H, P, D]). The prefix's keys or values
/// `x` are repeated the same way to the `heads` of the site's own keys or values (a multi-query attention that
/// broadcasts its one key/value head keeps it: then `heads` is `kv_heads`).
fn repeat_heads(
    g: &mut Graph,
    tag: &str,
    x: &str,
    what: &str,
    kv_heads: usize,
    heads: usize,
    p: usize,
) -> Result<String> {
    if heads == kv_heads {
        return Ok(x.to_string());
    }
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        bail!("the attention has {heads} key/value heads, which the prefix's {kv_heads} do not divide");
    }
    let group_axis = g.add_const(&format!("{tag}/group_axis"), Tensor::vec_i64(&[2]));
    let repeat = g.add_const(&format!("{tag}/repeat"), Tensor::vec_i64(&[1, 1, (heads / kv_heads) as i64, 1, 1]));
    let u = g.op1("Unsqueeze", &[x, &group_axis], vec![], &format!("{tag}/{what}_grouped"));
    let e = g.op1("Expand", &[&u, &repeat], vec![], &format!("{tag}/{what}_repeated"));
    // [B, H_kv, r, P, D] → [B, H, P, D] (0 keeps B, -1 gives D).
    let merged = g.add_const(&format!("{tag}/{what}_heads"), Tensor::vec_i64(&[0, heads as i64, p as i64, -1]));
    Ok(g.op1("Reshape", &[&e, &merged], vec![], &format!("{tag}/{what}_all_heads")))
}

fn node_index(g: &Graph, name: &str) -> usize {
    g.nodes.iter().position(|n| n.name == name).unwrap()
}

/// Whether `v` is computed (within a few elementwise steps) from a rank-4 MatMul.
fn leads_to_matmul(g: &Graph, prod: &HashMap<String, usize>, v: &str, depth: usize) -> bool {
    let Some(&i) = prod.get(v) else { return false };
    let n = &g.nodes[i];
    if n.op == "MatMul" {
        return true;
    }
    depth > 0
        && matches!(n.op.as_str(), "Add" | "Sub" | "Mul" | "Div" | "Where" | "Cast" | "Max" | "Min")
        && n.inputs.iter().any(|x| leads_to_matmul(g, prod, x, depth - 1))
}

/// Binds one attention site: `softmax` names the Softmax node, `kv` the prefix keys and values [B, H, P, D].
/// (`inject_at_sites` calls it for every site in order; the BART path picks the sites itself.) With `kv_heads`,
/// the prefix holds that many heads and is repeated to the heads of the site's keys and values (`repeat_heads`);
/// without, it has theirs. A mask chosen by a `Where` in `windows` gets the prefix columns its window leaves
/// visible, not all of them; so do the masks of a site under a window `site_window` computed by the export
/// (`inspect::computed_window_softmaxes`).
pub fn inject_one(
    g: &mut Graph,
    softmax: &str,
    kv: &(String, String),
    kv_heads: Option<usize>,
    p: usize,
    windows: &BTreeMap<String, usize>,
    site_window: Option<usize>,
) -> Result<()> {
    let prod = g.producers();
    let sm = &g.nodes[node_index(g, softmax)];
    let scores_shape = g.shape_of(&sm.inputs[0]).unwrap();
    let t_keys = scores_shape[3];
    // Walk back from the softmax to the QK MatMul, remembering the chain.
    let mut chain: Vec<(usize, usize)> = Vec::new(); // (node index, operand index carrying the scores)
    let mut v = sm.inputs[0].clone();
    let qk = loop {
        let &i = prod.get(&v).ok_or_else(|| anyhow!("the scores '{v}' come from no node"))?;
        let n = &g.nodes[i];
        if n.op == "MatMul" {
            break i;
        }
        let k = n
            .inputs
            .iter()
            .position(|x| g.shape_of(x).as_deref() == Some(&scores_shape[..]) && leads_to_matmul(g, &prod, x, 6))
            .or_else(|| n.inputs.iter().position(|x| leads_to_matmul(g, &prod, x, 6)))
            .ok_or_else(|| anyhow!("cannot follow the attention scores through {}", n.label()))?;
        chain.push((i, k));
        v = n.inputs[k].clone();
        if chain.len() > 16 {
            bail!("the path from the QK MatMul to the Softmax is too long to be an attention");
        }
    };
    // Keys: peel scalar scalings off Kᵀ, prepend the prefix keys, re-apply the scalings.
    let kop = g.nodes[qk].inputs[1].clone();
    let mut core = kop.clone();
    let mut scalings: Vec<(String, String)> = Vec::new(); // (op, constant)
    while let Some(&i) = prod.get(&core) {
        let n = &g.nodes[i];
        if !matches!(n.op.as_str(), "Mul" | "Div") {
            break;
        }
        let scalar = |x: &str| g.initializers.get(x).map(|t| t.len() == 1).unwrap_or(false);
        if scalar(&n.inputs[1]) {
            scalings.push((n.op.clone(), n.inputs[1].clone()));
            core = n.inputs[0].clone();
        } else if n.op == "Mul" && scalar(&n.inputs[0]) {
            scalings.push((n.op.clone(), n.inputs[0].clone()));
            core = n.inputs[1].clone();
        } else {
            break;
        }
    }
    let core_shape = g.shape_of(&core).ok_or_else(|| anyhow!("unknown shape of the keys '{core}'"))?;
    if *core_shape.last().unwrap() != t_keys {
        bail!("the key operand '{core}' has shape {core_shape:?}, not [.., D, {t_keys}]");
    }
    let tag = format!("{softmax}.prefix");
    // The heads of the site's keys and values: [B, H, ..] (a merged [B·H, ..] layout has the prefix's own).
    let site_heads = |shape: &[usize], have: usize| if shape.len() == 4 { shape[1] } else { have };
    let keys = match kv_heads {
        Some(h) => repeat_heads(g, &tag, &kv.0, "keys", h, site_heads(&core_shape, h), p)?,
        None => kv.0.clone(),
    };
    let pkt = g.op1("Transpose", &[&keys], vec![("perm", Attr::Ints(vec![0, 1, 3, 2]))], &format!("{tag}/keys_t"));
    let mut want = core_shape.clone();
    *want.last_mut().unwrap() = p;
    let pkt = reshape_to(g, &pkt, &want, &format!("{tag}/keys_view"))?;
    let axis = core_shape.len() as i64 - 1;
    let mut newk = g.op1("Concat", &[&pkt, &core], vec![("axis", Attr::Int(axis))], &format!("{tag}/keys"));
    for (op, c) in scalings.iter().rev() {
        newk = g.op1(op, &[&newk, c], vec![], &format!("{tag}/keys_scaled"));
    }
    g.nodes[qk].inputs[1] = newk;
    // Masks on the chain: neutral columns for the prefix (0 to add, 1 to multiply, keep in Where).
    for &(i, k) in chain.iter().rev() {
        let n = g.nodes[i].clone();
        for (j, x) in n.inputs.iter().enumerate() {
            if j == k || x.is_empty() {
                continue;
            }
            let Some(xs) = g.shape_of(x) else { continue };
            if xs.len() != scores_shape.len() || *xs.last().unwrap() != t_keys || t_keys == 1 {
                continue;
            }
            let mut block = xs.clone();
            *block.last_mut().unwrap() = p;
            let nb: usize = block.iter().product();
            let dt = g.type_of(x).unwrap().dtype;
            let fill = match (n.op.as_str(), j) {
                ("Where", 0) if k == 1 => 1.0,
                ("Mul" | "Div", _) => 1.0,
                _ => 0.0,
            };
            let mut cols = vec![fill; nb];
            let window = match (windows.get(&n.name), (n.op.as_str(), j, k)) {
                (Some(&w), ("Where", 0, 1)) => Some((w, 0.0)),
                // A window the export computes: hidden columns take the value that hides (Add's most negative).
                _ => match (site_window, n.op.as_str()) {
                    (None, _) => None,
                    (Some(w), "Where") if (j, k) == (0, 1) => Some((w, 0.0)),
                    (Some(w), "Add") => Some((w, f32::MIN as f64)),
                    (Some(w), "Mul") => Some((w, 0.0)),
                    (Some(w), op) => {
                        bail!("the mask '{x}' of a sliding-window attention (window {w}) is applied by {op}, which pfx cannot give the prefix's columns")
                    }
                },
            };
            if let Some((w, hidden)) = window {
                // Query t sits at key index p + t: prefix key c is in its window when p + t - c < w.
                let queries = block[block.len() - 2];
                if queries != scores_shape[scores_shape.len() - 2] {
                    bail!("the local-attention mask '{x}' has shape {xs:?}, not one row per query");
                }
                for (i, col) in cols.iter_mut().enumerate() {
                    let (t, c) = ((i / p) % queries, i % p);
                    if p + t - c >= w {
                        *col = hidden;
                    }
                }
            }
            let t = Tensor::from_f64s(dt, block, cols)?;
            let c = g.add_const(&format!("{tag}/mask_cols"), t);
            let wide =
                g.op1("Concat", &[&c, x], vec![("axis", Attr::Int(xs.len() as i64 - 1))], &format!("{tag}/mask"));
            g.nodes[i].inputs[j] = wide;
        }
    }
    // Values: the MatMul that reads the probabilities (through elementwise ops with scalars).
    let cons = g.consumers();
    let mut probs = g.nodes[node_index(g, softmax)].outputs[0].clone();
    let pv = loop {
        let users = cons.get(&probs).cloned().unwrap_or_default();
        if let Some(&u) = users.iter().find(|&&u| g.nodes[u].op == "MatMul" && g.nodes[u].inputs[0] == probs) {
            break u;
        }
        let next = users.iter().find(|&&u| {
            let n = &g.nodes[u];
            matches!(n.op.as_str(), "Where" | "Mul" | "Div" | "Cast" | "Identity")
                && g.shape_of(&n.outputs[0]).map(|s| s.len() == 4 && s[3] == t_keys).unwrap_or(false)
        });
        match next {
            Some(&u) => probs = g.nodes[u].outputs[0].clone(),
            None => bail!("no MatMul reads the attention probabilities of '{softmax}'"),
        }
    };
    let vop = g.nodes[pv].inputs[1].clone();
    let vs = g.shape_of(&vop).ok_or_else(|| anyhow!("unknown shape of the values '{vop}'"))?;
    let r = vs.len();
    if vs[r - 2] != t_keys {
        bail!("the value operand '{vop}' has shape {vs:?}, not [.., {t_keys}, D]");
    }
    let mut want = vs.clone();
    want[r - 2] = p;
    let values = match kv_heads {
        Some(h) => repeat_heads(g, &tag, &kv.1, "values", h, site_heads(&vs, h), p)?,
        None => kv.1.clone(),
    };
    let pv_view = reshape_to(g, &values, &want, &format!("{tag}/values_view"))?;
    let newv = g.op1("Concat", &[&pv_view, &vop], vec![("axis", Attr::Int(r as i64 - 2))], &format!("{tag}/values"));
    g.nodes[pv].inputs[1] = newv;
    Ok(())
}

/// Reshapes `v` ([B, H, ...]) to `want` when the layouts differ only by merged leading axes.
fn reshape_to(g: &mut Graph, v: &str, want: &[usize], hint: &str) -> Result<String> {
    if want.len() == 4 {
        return Ok(v.to_string());
    }
    let c = g.add_const(&format!("{hint}/shape"), Tensor::vec_i64(&want.iter().map(|&d| d as i64).collect::<Vec<_>>()));
    Ok(g.op1("Reshape", &[v, &c], vec![], hint))
}
