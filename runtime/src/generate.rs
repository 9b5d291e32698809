//! GPT-2 generation over a bundle's prefill/decode graphs, with a fixed-capacity KV cache updated in place on
//! the host; the search itself (greedy, beam) is `crate::search`.

use std::collections::BTreeMap;

use anyhow::{bail, Result};

use crate::backend::{Backend, BackendKind, KeptEdit, SlotWrites};
use crate::bundle::{Bundle, GenerationSpec};
use crate::ort_backend::OrtOptions;
use crate::search;
use crate::tensor::HostTensor;

pub use crate::search::{argmax, GenConfig};

pub struct Generator {
    prefill: Box<dyn Backend>,
    decode: Box<dyn Backend>,
    spec: GenerationSpec,
    prefix_len: usize,
    layers: usize,
    heads: usize,
    head_dim: usize,
    /// Prefixes (their trainable tensors) fed to prefill, the one `open` was given first (empty for baked
    /// graphs, whose prefix is constant); rows choose theirs ([`GenConfig::prefix_of`]).
    prefixes: Vec<BTreeMap<String, HostTensor>>,
    /// (decode output, cache input) for every layer's new keys and values: what each step writes.
    cache_writes: Vec<(String, String)>,
}

/// The running state of R rows: the decode graph's inputs and the cache mask. The caches
/// `past_key_values.{l}.key|value` [R, H, C, D] are updated in place, never copied per step: kept by the decode
/// backend where it can keep inputs (tract), else among these inputs ([`keep_cache`]).
struct Rows {
    inputs: BTreeMap<String, HostTensor>,
    /// [R, C]: which cache slots hold a real token (or the prefix).
    mask: Vec<i64>,
    /// Next free slot (the same for every row).
    slot: usize,
    /// Real prompt tokens per row (positions continue from `offset` + this).
    real: Vec<usize>,
    /// Position of the first real token: P, or 0 for the bare model.
    offset: usize,
}

impl Generator {
    /// The generator of a GPT-2 bundle's prefill and decode graphs on `kind` (ONNX Runtime with `ort`), the
    /// prefix's trainable tensors fed to prefill (none for a baked bundle). An error where the bundle has no
    /// generation graphs.
    pub fn open(
        bundle: &Bundle,
        kind: BackendKind,
        ort: &OrtOptions,
        prefix: BTreeMap<String, HostTensor>,
    ) -> Result<Generator> {
        let m = &bundle.manifest;
        let spec = m.generation.clone().ok_or_else(|| pfx_compiler::compile::no_generation_graphs(&bundle.dir))?;
        Ok(Generator {
            prefill: bundle.open_graph("prefill", kind, ort)?,
            decode: bundle.open_graph("decode", kind, ort)?,
            spec,
            prefix_len: m.prefix_len,
            layers: m.layers,
            heads: m.heads,
            head_dim: m.head_dim,
            prefixes: vec![prefix],
            cache_writes: cache_pairs(m.layers, |l, kind| {
                (format!("present.{l}.{kind}"), format!("past_key_values.{l}.{kind}"))
            }),
        })
    }

    /// Adds a prefix rows can generate with (`GenConfig::prefix_of`); returns its index.
    pub fn add_prefix(&mut self, prefix: BTreeMap<String, HostTensor>) -> Result<usize> {
        add_prefix(&mut self.prefixes, prefix)
    }

    /// Prefills R rows (left-padded prompts), row i with prefix `of_row[i]`; returns the state and the last
    /// position's logits [R, V].
    fn prefill(
        &mut self,
        prompts: &[Vec<i64>],
        of_row: &[usize],
        pad: i64,
        no_prefix: bool,
    ) -> Result<(Rows, Vec<Vec<f32>>)> {
        let (r, tp, p) = (self.spec.rows, self.spec.prompt_len, self.prefix_len);
        // Positions of real tokens start after the prefix (or at 0 for the bare model).
        let offset = if no_prefix { 0 } else { p };
        let c = self.spec.capacity;
        let mut ids = vec![pad; r * tp];
        let mut mask = vec![0i64; r * tp];
        let mut pos = vec![offset as i64; r * tp];
        let mut real = vec![0; r];
        for (row, prompt) in prompts.iter().enumerate() {
            let off = tp - prompt.len();
            for (j, &t) in prompt.iter().enumerate() {
                ids[row * tp + off + j] = t;
                mask[row * tp + off + j] = 1;
                pos[row * tp + off + j] = (offset + j) as i64;
            }
            real[row] = prompt.len();
        }
        let mut inputs = BTreeMap::new();
        inputs.insert("input_ids".into(), HostTensor::from_i64(vec![r, tp], ids)?);
        let prefix_flag = if no_prefix { 0 } else { 1 };
        let mut full_mask = Vec::with_capacity(r * (p + tp));
        for row in 0..r {
            full_mask.extend(std::iter::repeat_n(prefix_flag, p));
            full_mask.extend_from_slice(&mask[row * tp..(row + 1) * tp]);
        }
        inputs.insert("attention_mask".into(), HostTensor::from_i64(vec![r, p + tp], full_mask)?);
        inputs.insert("position_ids".into(), HostTensor::from_i64(vec![r, tp], pos)?);
        // The bare model's prefix is masked out: any one serves.
        let of_row = if no_prefix { &[][..] } else { of_row };
        let out = run_with_row_prefixes(self.prefill.as_mut(), inputs, &self.prefixes, of_row)?;
        let (h, d) = (self.heads, self.head_dim);
        let filled = p + tp;
        let mut rows = Rows { inputs: BTreeMap::new(), mask: vec![0; r * c], slot: filled, real, offset };
        for l in 0..self.layers {
            for kind in ["key", "value"] {
                let t = out
                    .get(&format!("present.{l}.{kind}"))
                    .ok_or_else(|| anyhow::anyhow!("the prefill graph has no output present.{l}.{kind}"))?;
                let src = t.as_f32()?;
                let mut cache = vec![0f32; r * h * c * d];
                for rh in 0..r * h {
                    cache[rh * c * d..rh * c * d + filled * d]
                        .copy_from_slice(&src[rh * filled * d..(rh + 1) * filled * d]);
                }
                let cache = HostTensor::from_f32(vec![r, h, c, d], cache)?;
                keep_cache(self.decode.as_mut(), &mut rows.inputs, format!("past_key_values.{l}.{kind}"), cache)?;
            }
        }
        for row in 0..r {
            for s in 0..p {
                rows.mask[row * c + s] = prefix_flag;
            }
            for j in 0..tp {
                rows.mask[row * c + p + j] = mask[row * tp + j];
            }
        }
        Ok((rows, split_rows(&out["logits"])?))
    }

    /// Feeds one token per row; writes its keys/values into the next slot; returns logits [R, V].
    fn step(&mut self, rows: &mut Rows, tokens: &[i64], n_generated: usize) -> Result<Vec<Vec<f32>>> {
        let (r, c) = (self.spec.rows, self.spec.capacity);
        if rows.slot >= c {
            bail!("the KV cache is full ({c} slots)");
        }
        let inputs = &mut rows.inputs;
        inputs.insert("input_ids".into(), HostTensor::from_i64(vec![r, 1], tokens.to_vec())?);
        let pos: Vec<i64> = rows.real.iter().map(|&n| (rows.offset + n + n_generated) as i64).collect();
        inputs.insert("position_ids".into(), HostTensor::from_i64(vec![r, 1], pos)?);
        let mut m = Vec::with_capacity(r * (c + 1));
        for row in 0..r {
            m.extend_from_slice(&rows.mask[row * c..(row + 1) * c]);
            m.push(1);
        }
        inputs.insert("attention_mask".into(), HostTensor::from_i64(vec![r, c + 1], m)?);
        let s = rows.slot;
        let writes = SlotWrites { pairs: &self.cache_writes, capacity: c, slot: s, width: self.head_dim };
        let out = run_writing_caches(self.decode.as_mut(), &mut rows.inputs, &writes)?;
        for row in 0..r {
            rows.mask[row * c + s] = 1;
        }
        rows.slot += 1;
        split_rows(&out["logits"])
    }

    /// Greedy decoding of any number of prompts (processed R at a time). Returns the new tokens of each
    /// prompt, stopping after eos (not included).
    pub fn greedy(&mut self, prompts: &[Vec<i64>], cfg: &GenConfig) -> Result<Vec<Vec<i64>>> {
        search::greedy_all(self, prompts, cfg)
    }

    /// Beam search, as many prompts at a time as the rows hold (`rows / beams`). Returns each prompt's best
    /// hypothesis's new tokens.
    pub fn beam_search(&mut self, prompts: &[Vec<i64>], cfg: &GenConfig) -> Result<Vec<Vec<i64>>> {
        search::beam_all(self, prompts, cfg)
    }
}

impl search::Start for Generator {
    type Running<'a> = Running<'a>;

    fn rows(&self) -> usize {
        self.spec.rows
    }

    fn check(&self, prompts: &[Vec<i64>], cfg: &GenConfig) -> Result<()> {
        let sp = &self.spec;
        search::check_request(prompts, "prompt", sp.prompt_len, sp.max_new, sp.rows, cfg)
    }

    fn start<'a>(
        &'a mut self,
        prompts: &[Vec<i64>],
        prefixes: &[usize],
        cfg: &GenConfig,
    ) -> Result<(Running<'a>, Vec<Vec<f32>>)> {
        let (rows, logits) = self.prefill(prompts, prefixes, cfg.pad, cfg.no_prefix)?;
        Ok((Running { gen: self, rows }, logits))
    }

    /// The prompt, as HF's `input_ids` and `encoder_input_ids` (which also hold the left padding of a batch; pfx's
    /// bans and penalties see the real tokens).
    fn context(&self, prompt: &[i64]) -> search::RowContext {
        search::RowContext { history: prompt.to_vec(), source: prompt.to_vec(), input: 0 }
    }
}

/// A prefilled batch the search drives.
pub struct Running<'a> {
    gen: &'a mut Generator,
    rows: Rows,
}

impl search::Decoding for Running<'_> {
    fn step(&mut self, tokens: &[i64], n_generated: usize) -> Result<Vec<Vec<f32>>> {
        self.gen.step(&mut self.rows, tokens, n_generated)
    }

    fn reorder(&mut self, parents: &[usize]) -> Result<()> {
        let (r, c) = (self.gen.spec.rows, self.gen.spec.capacity);
        let edit = KeptEdit::Reorder { parents, rows: r, per_row: self.gen.heads * c * self.gen.head_dim };
        for l in 0..self.gen.layers {
            for kind in ["key", "value"] {
                let name = format!("past_key_values.{l}.{kind}");
                update_cache(self.gen.decode.as_mut(), &mut self.rows.inputs, &name, &edit)?;
            }
        }
        search::reorder_rows(&mut self.rows.mask, parents, r, c);
        search::reorder_rows(&mut self.rows.real, parents, r, 1);
        Ok(())
    }
}

/// Adds `prefix` to a generator's `prefixes` (the first is the one it was opened with; empty for a baked bundle);
/// returns its index.
pub(crate) fn add_prefix(
    prefixes: &mut Vec<BTreeMap<String, HostTensor>>,
    prefix: BTreeMap<String, HostTensor>,
) -> Result<usize> {
    if prefixes[0].is_empty() {
        bail!("this bundle is baked: its prefix is inside the graphs, so it cannot generate with other prefixes");
    }
    prefixes.push(prefix);
    Ok(prefixes.len() - 1)
}

/// Runs a graph that takes a prefix (prefill, encode) for rows that may each have their own, `of_row[i]` indexing
/// `prefixes` (0 where `of_row` is short): once per distinct prefix among the rows, each output whose first axis
/// is the rows taken row by row from its prefix's run. (The decode graphs take no prefix: it is in the caches, so
/// rows with different prefixes share every step.) One run when the rows share one prefix.
pub(crate) fn run_with_row_prefixes(
    graph: &mut dyn Backend,
    inputs: BTreeMap<String, HostTensor>,
    prefixes: &[BTreeMap<String, HostTensor>],
    of_row: &[usize],
) -> Result<BTreeMap<String, HostTensor>> {
    let rows = inputs.get("input_ids").map_or(0, |t| t.shape()[0]);
    let of = |row: usize| of_row.get(row).copied().unwrap_or(0);
    let mut used: Vec<usize> = (0..rows).map(of).collect();
    used.sort_unstable();
    used.dedup();
    if let Some(&p) = used.last().filter(|&&p| p >= prefixes.len()) {
        bail!("a row asks for prefix {p}, but the generator has {} (add_prefix adds more)", prefixes.len());
    }
    let run = |graph: &mut dyn Backend, p: usize, mut feed: BTreeMap<String, HostTensor>| {
        feed.extend(prefixes[p].iter().map(|(k, v)| (k.clone(), v.clone())));
        graph.run(&feed)
    };
    let (first, others) = match used.as_slice() {
        [] => return run(graph, 0, inputs),
        [only] => return run(graph, *only, inputs),
        [first, others @ ..] => (*first, others),
    };
    let mut merged = run(graph, first, inputs.clone())?;
    for &p in others {
        let out = run(graph, p, inputs.clone())?;
        for (name, t) in merged.iter_mut() {
            if t.shape().first() != Some(&rows) {
                continue;
            }
            let src = out.get(name).ok_or_else(|| anyhow::anyhow!("a run of the graph has no output {name}"))?;
            let width = t.len() / rows;
            let (dst, src) = (t.as_f32_mut()?, src.as_f32()?);
            for row in (0..rows).filter(|&r| of(r) == p) {
                dst[row * width..(row + 1) * width].copy_from_slice(&src[row * width..(row + 1) * width]);
            }
        }
    }
    Ok(merged)
}

/// Hands a KV cache to the decode backend to keep between steps (tract then reads it without converting it on
/// every step), or keeps it among the decode inputs where the backend keeps nothing.
pub(crate) fn keep_cache(
    decode: &mut dyn Backend,
    inputs: &mut BTreeMap<String, HostTensor>,
    name: String,
    cache: HostTensor,
) -> Result<()> {
    inputs.remove(&name);
    if let Some(cache) = decode.keep_input(&name, cache)? {
        inputs.insert(name, cache);
    }
    Ok(())
}

/// Writes the new token's keys or values `new` [R·H, D] into slot `slot` of a cache [R·H, C, D].
pub(crate) fn write_slot(cache: &mut [f32], new: &[f32], c: usize, slot: usize, d: usize) {
    for (rh, row) in new.chunks_exact(d).take(cache.len() / (c * d)).enumerate() {
        cache[(rh * c + slot) * d..(rh * c + slot + 1) * d].copy_from_slice(row);
    }
}

/// Runs a decode step whose new keys and values (`writes`) go into their caches: by the backend where it keeps
/// them (on a GPU without leaving the device), else here into the caches among `inputs`. Returns the other
/// outputs.
pub(crate) fn run_writing_caches(
    decode: &mut dyn Backend,
    inputs: &mut BTreeMap<String, HostTensor>,
    writes: &SlotWrites,
) -> Result<BTreeMap<String, HostTensor>> {
    let mut out = decode.run_writing(inputs, writes)?;
    for (output, cache) in writes.pairs {
        if let Some(t) = out.remove(output) {
            update_cache(decode, inputs, cache, &writes.edit(t.as_f32()?))?;
        }
    }
    Ok(out)
}

/// `name(layer, kind)` for every layer and kind (key, value), in the order the graphs list them.
pub(crate) fn cache_pairs<T>(layers: usize, name: impl Fn(usize, &str) -> T) -> Vec<T> {
    (0..layers).flat_map(|l| ["key", "value"].map(|kind| name(l, kind))).collect()
}

/// Applies `edit` to a KV cache, wherever [`keep_cache`] put it.
pub(crate) fn update_cache(
    decode: &mut dyn Backend,
    inputs: &mut BTreeMap<String, HostTensor>,
    name: &str,
    edit: &KeptEdit,
) -> Result<()> {
    match inputs.get_mut(name) {
        Some(t) => edit.apply(t.as_f32_mut()?)?,
        None if decode.edit_kept(name, edit)? => {}
        None => bail!("the decode state has no KV cache `{name}`"),
    }
    Ok(())
}

/// [R, 1, V] or [R, V] logits -> one vector per row.
pub(crate) fn split_rows(t: &HostTensor) -> Result<Vec<Vec<f32>>> {
    let s = t.shape();
    let v = *s.last().unwrap();
    Ok(t.as_f32()?.chunks(v).map(|c| c.to_vec()).collect())
}
