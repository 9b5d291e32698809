//! Greedy and beam-search decoding over a bundle's prefill/decode graphs, with a fixed-capacity KV cache
//! updated in place on the host.

use std::collections::BTreeMap;

use anyhow::{bail, Result};

use crate::backend::Backend;
use crate::bundle::GenerationSpec;
use crate::tensor::HostTensor;

#[derive(Clone, Debug)]
pub struct GenConfig {
    pub max_new: usize,
    /// No end-of-sequence before this many new tokens (its logit is masked, as HF's min_new_tokens does).
    pub min_new: usize,
    pub beams: usize,
    /// Beam scores are sum(log p) / len^length_penalty.
    pub length_penalty: f32,
    pub eos: Option<i64>,
    /// Token used for left padding and for idle rows.
    pub pad: i64,
    /// Mask the prefix out and number positions from 0: the bare model, for comparison.
    pub no_prefix: bool,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig { max_new: 32, min_new: 0, beams: 1, length_penalty: 1.0, eos: None, pad: 0, no_prefix: false }
    }
}

pub struct Generator {
    prefill: Box<dyn Backend>,
    decode: Box<dyn Backend>,
    spec: GenerationSpec,
    prefix_len: usize,
    layers: usize,
    heads: usize,
    head_dim: usize,
    /// Trainable tensors fed to prefill (empty for baked graphs, whose prefix is constant).
    prefix: BTreeMap<String, HostTensor>,
}

/// The running state of R rows: the cache and its mask.
struct Rows {
    /// Per layer: keys and values [R, H, C, D].
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
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
    pub fn new(
        prefill: Box<dyn Backend>,
        decode: Box<dyn Backend>,
        spec: GenerationSpec,
        prefix_len: usize,
        layers: usize,
        heads: usize,
        head_dim: usize,
        prefix: BTreeMap<String, HostTensor>,
    ) -> Generator {
        Generator { prefill, decode, spec, prefix_len, layers, heads, head_dim, prefix }
    }

    pub fn rows(&self) -> usize {
        self.spec.rows
    }

    fn check(&self, prompts: &[Vec<i64>], cfg: &GenConfig) -> Result<()> {
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                bail!("prompt {i} is empty");
            }
            if p.len() > self.spec.prompt_len {
                bail!(
                    "prompt {i} has {} tokens; the bundle's generation graphs take at most {} (recompile with a \
                     larger --prompt-len)",
                    p.len(),
                    self.spec.prompt_len
                );
            }
        }
        if cfg.max_new == 0 || cfg.max_new > self.spec.max_new {
            bail!("--max-new must be between 1 and {} (the bundle's --max-new)", self.spec.max_new);
        }
        if cfg.beams == 0 || cfg.beams > self.spec.rows {
            bail!("--beams must be between 1 and {} (the bundle's --gen-rows)", self.spec.rows);
        }
        Ok(())
    }

    /// Prefills R rows (left-padded prompts); returns the state and the last position's logits [R, V].
    fn prefill(&mut self, prompts: &[Vec<i64>], pad: i64, no_prefix: bool) -> Result<(Rows, Vec<Vec<f32>>)> {
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
        let mut inputs = self.prefix.clone();
        inputs.insert("input_ids".into(), HostTensor::from_i64(vec![r, tp], ids)?);
        let prefix_flag = if no_prefix { 0 } else { 1 };
        let mut full_mask = Vec::with_capacity(r * (p + tp));
        for row in 0..r {
            full_mask.extend(std::iter::repeat_n(prefix_flag, p));
            full_mask.extend_from_slice(&mask[row * tp..(row + 1) * tp]);
        }
        inputs.insert("attention_mask".into(), HostTensor::from_i64(vec![r, p + tp], full_mask)?);
        inputs.insert("position_ids".into(), HostTensor::from_i64(vec![r, tp], pos)?);
        let out = self.prefill.run(&inputs)?;
        let (h, d) = (self.heads, self.head_dim);
        let filled = p + tp;
        let mut rows = Rows { k: vec![], v: vec![], mask: vec![0; r * c], slot: filled, real, offset };
        for l in 0..self.layers {
            for (kind, dst) in [("key", 0), ("value", 1)] {
                let t = out
                    .get(&format!("present.{l}.{kind}"))
                    .ok_or_else(|| anyhow::anyhow!("the prefill graph has no output present.{l}.{kind}"))?;
                let src = t.as_f32()?;
                let mut cache = vec![0f32; r * h * c * d];
                for rh in 0..r * h {
                    cache[rh * c * d..rh * c * d + filled * d]
                        .copy_from_slice(&src[rh * filled * d..(rh + 1) * filled * d]);
                }
                if dst == 0 {
                    rows.k.push(cache);
                } else {
                    rows.v.push(cache);
                }
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
        let mut inputs = BTreeMap::new();
        inputs.insert("input_ids".into(), HostTensor::from_i64(vec![r, 1], tokens.to_vec())?);
        let pos: Vec<i64> = rows.real.iter().map(|&n| (rows.offset + n + n_generated) as i64).collect();
        inputs.insert("position_ids".into(), HostTensor::from_i64(vec![r, 1], pos)?);
        let mut m = Vec::with_capacity(r * (c + 1));
        for row in 0..r {
            m.extend_from_slice(&rows.mask[row * c..(row + 1) * c]);
            m.push(1);
        }
        inputs.insert("attention_mask".into(), HostTensor::from_i64(vec![r, c + 1], m)?);
        let (h, d) = (self.heads, self.head_dim);
        for l in 0..self.layers {
            inputs
                .insert(format!("past_key_values.{l}.key"), HostTensor::from_f32(vec![r, h, c, d], rows.k[l].clone())?);
            inputs.insert(
                format!("past_key_values.{l}.value"),
                HostTensor::from_f32(vec![r, h, c, d], rows.v[l].clone())?,
            );
        }
        let out = self.decode.run(&inputs)?;
        let s = rows.slot;
        for l in 0..self.layers {
            for (kind, cache) in [("key", &mut rows.k[l]), ("value", &mut rows.v[l])] {
                let t = out[&format!("present.{l}.{kind}")].as_f32()?;
                for rh in 0..r * h {
                    cache[(rh * c + s) * d..(rh * c + s + 1) * d].copy_from_slice(&t[rh * d..(rh + 1) * d]);
                }
            }
        }
        for row in 0..r {
            rows.mask[row * c + s] = 1;
        }
        rows.slot += 1;
        split_rows(&out["logits"])
    }

    /// Greedy decoding of any number of prompts (processed R at a time). Returns the new tokens of each
    /// prompt, stopping after eos (not included).
    pub fn greedy(&mut self, prompts: &[Vec<i64>], cfg: &GenConfig) -> Result<Vec<Vec<i64>>> {
        self.check(prompts, cfg)?;
        let r = self.spec.rows;
        let mut out = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(r) {
            let mut rows_prompts: Vec<Vec<i64>> = chunk.to_vec();
            while rows_prompts.len() < r {
                rows_prompts.push(vec![cfg.pad]);
            }
            let (mut state, mut logits) = self.prefill(&rows_prompts, cfg.pad, cfg.no_prefix)?;
            let mut gen: Vec<Vec<i64>> = vec![Vec::new(); r];
            let mut done = vec![false; r];
            for n in 0..cfg.max_new {
                let mut next = vec![cfg.pad; r];
                for row in 0..r {
                    let mut l = logits[row].clone();
                    mask_eos(&mut l, cfg, n);
                    let t = argmax(&l) as i64;
                    if !done[row] {
                        if Some(t) == cfg.eos {
                            done[row] = true;
                        } else {
                            gen[row].push(t);
                        }
                    }
                    next[row] = t;
                }
                if n + 1 == cfg.max_new || done.iter().take(chunk.len()).all(|&d| d) {
                    break;
                }
                logits = self.step(&mut state, &next, n)?;
            }
            out.extend(gen.into_iter().take(chunk.len()));
        }
        Ok(out)
    }

    /// Beam search for one prompt at a time (beams rows each). Returns the best hypothesis's new tokens.
    pub fn beam_search(&mut self, prompts: &[Vec<i64>], cfg: &GenConfig) -> Result<Vec<Vec<i64>>> {
        self.check(prompts, cfg)?;
        let mut out = Vec::new();
        for prompt in prompts {
            out.push(self.beam_one(prompt, cfg)?);
        }
        Ok(out)
    }

    fn beam_one(&mut self, prompt: &[i64], cfg: &GenConfig) -> Result<Vec<i64>> {
        let (r, k) = (self.spec.rows, cfg.beams);
        let rows_prompts: Vec<Vec<i64>> = (0..r).map(|_| prompt.to_vec()).collect();
        let (mut state, mut logits) = self.prefill(&rows_prompts, cfg.pad, cfg.no_prefix)?;
        // Live beams: (tokens, sum of log-probabilities); only beam 0 is live at the start.
        let mut beams: Vec<(Vec<i64>, f64)> = vec![(Vec::new(), 0.0)];
        let mut finished: Vec<(Vec<i64>, f64)> = Vec::new();
        let score =
            |toks: &[i64], s: f64, extra: usize| s / ((toks.len() + extra) as f64).powf(cfg.length_penalty as f64);
        for n in 0..cfg.max_new {
            // Candidates over every live beam and token.
            let mut cands: Vec<(f64, usize, i64)> = Vec::new();
            for (b, (_, s)) in beams.iter().enumerate() {
                // As HF: log-softmax over the whole vocabulary first, then forbid an early eos.
                let mut lp = log_softmax(&logits[b]);
                mask_eos(&mut lp, cfg, n);
                for (t, &x) in lp.iter().enumerate() {
                    if x.is_finite() {
                        cands.push((s + x as f64, b, t as i64));
                    }
                }
            }
            cands.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
            let mut next: Vec<(Vec<i64>, f64, usize)> = Vec::new();
            for (rank, (s, b, t)) in cands.into_iter().take(2 * k).enumerate() {
                if Some(t) == cfg.eos {
                    // An ended hypothesis, kept only when it ranks among the best k (as HF does).
                    if rank < k {
                        finished.push((beams[b].0.clone(), score(&beams[b].0, s, 0)));
                    }
                    continue;
                }
                if next.len() < k {
                    let mut toks = beams[b].0.clone();
                    toks.push(t);
                    next.push((toks, s, b));
                }
            }
            if next.is_empty() || n + 1 == cfg.max_new {
                for (toks, s, _) in next {
                    let sc = score(&toks, s, 0);
                    finished.push((toks, sc));
                }
                break;
            }
            // Reorder the cache rows to follow the surviving beams.
            let parents: Vec<usize> = next.iter().map(|x| x.2).collect();
            reorder(&mut state, &parents, r, self.spec.capacity, self.heads, self.head_dim);
            let mut tokens = vec![cfg.pad; r];
            for (i, (toks, _, _)) in next.iter().enumerate() {
                tokens[i] = *toks.last().unwrap();
            }
            beams = next.into_iter().map(|(t, s, _)| (t, s)).collect();
            logits = self.step(&mut state, &tokens, n)?;
        }
        finished.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
        Ok(finished.into_iter().next().map(|f| f.0).unwrap_or_default())
    }
}

/// Row i of the new state is row parents[i] of the old one (rows past the parents keep row 0).
fn reorder(state: &mut Rows, parents: &[usize], r: usize, c: usize, h: usize, d: usize) {
    let per_row = h * c * d;
    let src_of = |i: usize| parents.get(i).copied().unwrap_or(parents[0]);
    for cache in state.k.iter_mut().chain(state.v.iter_mut()) {
        let old = cache.clone();
        for i in 0..r {
            let s = src_of(i);
            cache[i * per_row..(i + 1) * per_row].copy_from_slice(&old[s * per_row..(s + 1) * per_row]);
        }
    }
    let old = state.mask.clone();
    let old_real = state.real.clone();
    for i in 0..r {
        let s = src_of(i);
        state.mask[i * c..(i + 1) * c].copy_from_slice(&old[s * c..(s + 1) * c]);
        state.real[i] = old_real[s];
    }
}

fn mask_eos(logits: &mut [f32], cfg: &GenConfig, n_generated: usize) {
    if let Some(e) = cfg.eos {
        if n_generated < cfg.min_new && (e as usize) < logits.len() {
            logits[e as usize] = f32::NEG_INFINITY;
        }
    }
}

/// [R, 1, V] or [R, V] logits -> one vector per row.
fn split_rows(t: &HostTensor) -> Result<Vec<Vec<f32>>> {
    let s = t.shape();
    let v = *s.last().unwrap();
    Ok(t.as_f32()?.chunks(v).map(|c| c.to_vec()).collect())
}

pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

fn log_softmax(v: &[f32]) -> Vec<f32> {
    let m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = v.iter().map(|&x| ((x - m) as f64).exp()).sum();
    let ls = s.ln() as f32;
    v.iter().map(|&x| x - m - ls).collect()
}
