//! T5 on the BART path. Its attentions add a relative position bias: a [buckets, heads] table read at the bucket of
//! each key's position minus the query's (HF's `T5Attention._relative_position_bucket`), computed once by the
//! graph from the sequence lengths and added to every layer's scores. A prefix's columns need a bias of their own:
//! - PEFT's prefix is a cache of P tokens in front of the decoder's: HF numbers its keys 0..P-1 and the decoder's
//!   queries P..P+T-1, so a prefix key c seen from query t reads the bucket of c - P - t (the decoder's own
//!   columns are unchanged: the bias depends on differences only). `peft_prefix_bias` is those columns.
//! - pfx's paper layout gives the prefix no position, as in BART: its columns get no bias (what
//!   `prefix::inject_one`'s neutral columns already are).
//!
//! Generation's decode graph is specialized to a fixed-capacity cache, where the export's bias is a constant for one
//! query position: `bias_from_positions` replaces it with the bias of the token being decoded.

use anyhow::{anyhow, bail, Result};
use std::path::Path;

use crate::ir::Graph;
use crate::tensor::Tensor;

/// The `model_type`s compiled as T5: T5 (v1.0, v1.1 / Flan-T5) and mT5, T5 v1.1's layers under another name.
/// (UMT5 is not: each of its layers has a bias table of its own, where `bias_table` expects block 0's shared one.)
pub const MODEL_TYPES: &[&str] = &["t5", "mt5"];

/// Whether a config's `model_type` is compiled as T5.
pub fn is_t5(model_type: &str) -> bool {
    MODEL_TYPES.contains(&model_type)
}

/// What the BART path needs of a T5 `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct T5Config {
    pub max_distance: usize,
    /// The config sets no max distance: HF's default (128) is used.
    pub default_distance: bool,
}

/// Reads `config.json` of a T5 export; refuses a model whose heads are not as wide as the hidden size divided by
/// their number (t5-3b, t5-11b: PEFT cannot prefix them either, and pfx reads the head size that way).
pub fn read_config(path: &Path) -> Result<T5Config> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow!("{} is not valid JSON: {e}", path.display()))?;
    let count = |k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
    if let (Some(d_model), Some(d_kv), Some(heads)) = (count("d_model"), count("d_kv"), count("num_heads")) {
        if d_kv * heads != d_model {
            bail!(
                "{} describes heads of width d_kv {d_kv} × num_heads {heads} = {} ≠ d_model {d_model} (as t5-3b and \
                 t5-11b): pfx's T5 prefixes need d_kv × num_heads = d_model (PEFT's do too)",
                path.display(),
                d_kv * heads
            );
        }
    }
    // HF's default when the config does not say.
    let set = count("relative_attention_max_distance");
    Ok(T5Config { max_distance: set.unwrap_or(128), default_distance: set.is_none() })
}

/// HF's `_relative_position_bucket` of `rel` = key position - query position, in float32 as the exported graph
/// computes it (each op rounded to float32): exact below `max_exact`, logarithmic up to `max_distance`, then the
/// last bucket. `bidirectional`: the encoder's (half the buckets for keys after the query).
pub fn bucket(rel: i64, bidirectional: bool, buckets: usize, max_distance: usize) -> usize {
    let (mut nb, mut base) = (buckets as i64, 0i64);
    let n = if bidirectional {
        nb /= 2;
        if rel > 0 {
            base = nb;
        }
        rel.abs()
    } else {
        (-rel).max(0)
    };
    let max_exact = nb / 2;
    if n < max_exact {
        return (base + n) as usize;
    }
    let ratio = (n as f32) / (max_exact as f32);
    let log = (ratio as f64).ln() as f32;
    let scale = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
    let large = max_exact + ((((log as f64) / (scale as f64)) as f32 as f64 * (nb - max_exact) as f64) as f32) as i64;
    (base + large.min(nb - 1)) as usize
}

/// The decoder's bias table: the one 2-D table the graph gathers [heads] wide (the token table is hidden wide).
pub fn bias_table(g: &Graph, heads: usize) -> Result<(String, Tensor)> {
    let tables: Vec<&String> = g
        .nodes
        .iter()
        .filter(|n| n.op == "Gather")
        .map(|n| &n.inputs[0])
        .filter(|t| g.initializers.get(*t).is_some_and(|w| w.shape.len() == 2 && w.shape[1] == heads))
        .collect();
    match tables.as_slice() {
        [t] => Ok(((*t).clone(), g.initializers[*t].clone())),
        _ => bail!(
            "found {} relative position bias tables ([buckets, {heads}]) where T5's decoder has one: the export's \
             config.json says T5 (model_type t5 or mt5), but its graphs are not T5's",
            tables.len()
        ),
    }
}

/// Checks that `model` (canonical, not specialized yet) reads its bias table `table` at the buckets [`bucket`]
/// gives, or pfx's prefix columns would not continue the model's: a copy with the buckets as an output is
/// specialized to `dims`, which folds them to a constant [queries, keys] (queries last among the keys).
pub fn check_buckets(
    model: &crate::ir::Model,
    table: &str,
    bidirectional: bool,
    config: &T5Config,
    dims: &crate::specialize::Dims,
) -> Result<()> {
    let max_distance = config.max_distance;
    let mut copy = model.clone();
    let g = &mut copy.graph;
    let rows = g.initializers.get(table).map_or(0, |t| t.shape[0]);
    let Some(idx) = g.nodes.iter().find(|n| n.op == "Gather" && n.inputs[0] == table).map(|n| n.inputs[1].clone())
    else {
        bail!("T5's bias table '{table}' is not looked up");
    };
    let ty =
        g.types.get(&idx).cloned().unwrap_or(crate::ir::ValueType { dtype: crate::tensor::DType::I64, shape: None });
    g.outputs.push(crate::ir::ValueInfo { name: idx.clone(), ty });
    crate::specialize::specialize(&mut copy, dims)?;
    // Folding leaves a graph output as an Identity of the constant.
    let g = &copy.graph;
    let folded = g.producers().get(&idx).map(|&i| &g.nodes[i]).filter(|n| n.op == "Identity").map(|n| &n.inputs[0]);
    let Some(t) = g.initializers.get(&idx).or_else(|| folded.and_then(|v| g.initializers.get(v))) else {
        bail!("T5's relative position buckets did not fold to a constant at fixed shapes");
    };
    let (Some(v), [q, k]) = (t.as_i64s(), t.shape.as_slice()) else {
        bail!("T5's relative position buckets are {}, not [queries, keys] integers", t.describe());
    };
    for i in 0..*q {
        for j in 0..*k {
            let rel = j as i64 - (i + k - q) as i64;
            let want = bucket(rel, bidirectional, rows, max_distance) as i64;
            if v[i * k + j] != want {
                let whose = if config.default_distance { " (HF's default: the config sets none)" } else { "" };
                bail!(
                    "T5's graph reads bucket {} of its relative bias for key {j} and query {i}, where \
                     relative_attention_max_distance {max_distance}{whose} gives {want}: its config.json does not \
                     describe the export",
                    v[i * k + j]
                );
            }
        }
    }
    Ok(())
}

/// PEFT's bias for the prefix of a decoder of `t` tokens: [1, heads, t, p + t], the prefix columns at the bucket
/// of c - p - q (prefix key c, query q), zeros over the decoder's own keys (the graph adds their bias itself).
pub fn peft_prefix_bias(table: &Tensor, t: usize, p: usize, max_distance: usize) -> Result<Tensor> {
    let (rows, heads) = (table.shape[0], table.shape[1]);
    let w = table.as_f64s().ok_or_else(|| anyhow!("T5's bias table is not numeric"))?;
    let k = p + t;
    let mut out = vec![0f32; heads * t * k];
    for h in 0..heads {
        for q in 0..t {
            for c in 0..p {
                let b = bucket(c as i64 - (p + q) as i64, false, rows, max_distance);
                out[(h * t + q) * k + c] = w[b * heads + h] as f32;
            }
        }
    }
    Ok(Tensor::f32(vec![1, heads, t, k], out))
}

/// What T5's one-token decode graph over a fixed-capacity self cache needs (`bart_generate::build_decode`).
#[derive(Clone, Debug)]
pub struct DecodeSpec {
    pub heads: usize,
    pub max_distance: usize,
    /// Prefix slots at the front of the cache (P).
    pub prefix: usize,
    pub max_new: usize,
    /// The paper layout: the prefix slots get no bias.
    pub paper: bool,
}

/// Gives the decode graph's self-attentions (Softmaxes `sites`) the bias of the token being decoded, from the
/// `position_ids` input [R, 1] (its index n among the decoder's tokens: 0 for the start token) and a table by
/// distance (it stops changing at the max distance, so its size does not grow with the cache). Specialized to a
/// cache of `capacity` slots the export's bias is a constant for a query at position `capacity` (its past length);
/// the cache holds the prefix in slots 0..P-1 and decoder token m in slot P + m, and the new token's own key comes
/// last. HF's bias depends on key - query only, so slot j < capacity is at j - P - n from the query (PEFT's prefix
/// keys too: its cache puts them before the decoder's tokens; the paper layout's get none) and the new key at 0.
/// The constant replaced is checked to be the export's bias first.
pub fn bias_from_positions(
    g: &mut Graph,
    sites: &[String],
    capacity: usize,
    rows: usize,
    table: &Tensor,
    b: &DecodeSpec,
) -> Result<()> {
    let (buckets, heads) = (table.shape[0], table.shape[1]);
    let w: Vec<f64> = table.as_f64s().ok_or_else(|| anyhow!("T5's bias table is not numeric"))?;
    let keys = capacity + 1;
    let at = |rel: i64, h: usize| w[bucket(rel, false, buckets, b.max_distance) * heads + h];
    // The bias depends on the distance d = query - key only, and stops changing at the max distance (the last
    // bucket): a table of the distances up to there (checked), plus a zero row for the paper layout's prefix.
    let reach = (b.prefix + b.max_new) as i64;
    let far = reach.min(b.max_distance as i64);
    if let Some(d) = (far..=reach)
        .find(|&d| bucket(-d, false, buckets, b.max_distance) != bucket(-far, false, buckets, b.max_distance))
    {
        bail!("T5's relative bias still changes at distance {d}, past its max distance {}", b.max_distance);
    }
    let zero_row = far + 1;
    let mut by_distance = vec![0f32; (zero_row as usize + 1) * heads];
    for d in 0..=far {
        for h in 0..heads {
            by_distance[d as usize * heads + h] = at(-d, h) as f32;
        }
    }
    let table = g.add_const("t5_self_bias/by_distance", Tensor::f32(vec![zero_row as usize + 1, heads], by_distance));
    // Slot j < capacity holds the prefix (j < P) or decoder token j - P: d = n + P - j for the token n being
    // decoded (`position_ids`), clipped at 0 (empty slots, masked) and at `far`; its own key, last, is at d = 0
    // (kept out, as the paper layout's prefix slots, which then read the zero row).
    let no_bias = |j: usize| j == capacity || (b.paper && j < b.prefix);
    let slot: Vec<i64> = (0..keys).map(|j| j as i64 - b.prefix as i64).collect();
    let keep: Vec<i64> = (0..keys).map(|j| i64::from(!no_bias(j))).collect();
    let fixed: Vec<i64> = (0..keys).map(|j| if no_bias(j) && j != capacity { zero_row } else { 0 }).collect();
    let slot = g.add_const("t5_self_bias/slot_token", Tensor::i64(vec![1, keys], slot));
    let keep = g.add_const("t5_self_bias/keep", Tensor::i64(vec![1, keys], keep));
    let fixed = g.add_const("t5_self_bias/fixed_row", Tensor::i64(vec![1, keys], fixed));
    let lo = g.add_const("t5_self_bias/near", Tensor::scalar_i64(0));
    let hi = g.add_const("t5_self_bias/far", Tensor::scalar_i64(far));
    let d = g.op1("Sub", &["position_ids", &slot], vec![], "t5_self_bias/distance");
    let d = g.op1("Max", &[&d, &lo], vec![], "t5_self_bias/distance_min");
    let d = g.op1("Min", &[&d, &hi], vec![], "t5_self_bias/distance_max");
    let d = g.op1("Mul", &[&d, &keep], vec![], "t5_self_bias/distance_kept");
    let d = g.op1("Add", &[&d, &fixed], vec![], "t5_self_bias/row");
    // [R, keys, heads] -> [R, heads, 1, keys]
    let picked = g.op1("Gather", &[&table, &d], vec![("axis", crate::ir::Attr::Int(0))], "t5_self_bias/picked");
    let heads_first =
        g.op1("Transpose", &[&picked], vec![("perm", crate::ir::Attr::Ints(vec![0, 2, 1]))], "t5_self_bias/heads");
    let shape = g.add_const("t5_self_bias/shape", Tensor::vec_i64(&[rows as i64, heads as i64, 1, keys as i64]));
    let bias = g.op1("Reshape", &[&heads_first, &shape], vec![], "t5_self_bias/bias");
    let prod = g.producers();
    let mut replaced = Vec::new();
    for sm in sites {
        // Back from the Softmax through Adds (and Casts) to the one that adds the constant bias (the causal mask
        // is added beside it).
        let start = g.nodes.iter().find(|n| &n.name == sm).map(|n| n.inputs[0].clone()).unwrap_or_default();
        let mut frontier = vec![start];
        let mut found = None;
        'search: for _ in 0..4 {
            let mut next = Vec::new();
            for v in &frontier {
                let Some(&i) = prod.get(v) else { continue };
                let n = &g.nodes[i];
                if !matches!(n.op.as_str(), "Add" | "Cast") {
                    continue;
                }
                let constant = n.inputs.iter().position(|x| {
                    g.initializers
                        .get(x)
                        .is_some_and(|t| t.shape.len() == 4 && t.shape[1] == heads && t.shape[3] == keys)
                });
                if let (true, Some(k)) = (n.op == "Add", constant) {
                    found = Some((i, k));
                    break 'search;
                }
                next.extend(n.inputs.iter().cloned());
            }
            frontier = next;
        }
        let Some((i, k)) = found else {
            bail!("cannot find the relative position bias T5's self-attention '{sm}' adds to its scores");
        };
        let name = g.nodes[i].inputs[k].clone();
        let t = &g.initializers[&name];
        let vals = t.as_f64s().ok_or_else(|| anyhow!("T5's bias '{name}' is not numeric"))?;
        let per_row = heads * keys;
        for (x, &got) in vals.iter().enumerate() {
            let (h, j) = ((x % per_row) / keys, x % keys);
            let want = at(j as i64 - capacity as i64, h);
            if (got - want).abs() > 1e-6 * want.abs().max(1.0) {
                bail!(
                    "T5's self-attention '{sm}' adds {got} for head {h} and cache slot {j}, where its relative bias \
                     for a query after {capacity} keys is {want}: pfx does not know what else the export adds there"
                );
            }
        }
        replaced.push((i, k));
    }
    for (i, k) in replaced {
        g.nodes[i].inputs[k] = bias.clone();
    }
    g.toposort()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// HF's buckets for key - query in -300..=300, both directions, T5's defaults and the fixtures' settings
    /// (`graphs/unit/make_t5_buckets.py`).
    #[test]
    fn buckets_follow_hf() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../graphs/unit/t5-buckets.json");
        let refs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let first = refs["rel"][0].as_i64().unwrap();
        let cases = refs["cases"].as_array().unwrap();
        for c in cases {
            let (both, rows, distance) = (
                c["bidirectional"].as_bool().unwrap(),
                c["buckets"].as_u64().unwrap() as usize,
                c["max_distance"].as_u64().unwrap() as usize,
            );
            for (i, want) in c["bucket"].as_array().unwrap().iter().enumerate() {
                let rel = first + i as i64;
                assert_eq!(
                    bucket(rel, both, rows, distance) as u64,
                    want.as_u64().unwrap(),
                    "{both} {rows} {distance}: rel {rel}"
                );
            }
        }
        assert_eq!(cases.len(), 4);
    }
}
