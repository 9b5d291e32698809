//! BART generation over a bundle's encode/decode graphs: the source is encoded once (cross-attention keys and
//! values with their prefix, the self-attention prefix), then one token per step through `decode`, its keys and
//! values written into a fixed-capacity self cache in place. The search is `crate::search`.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
pub use pfx_compiler::compile::bart_generate::BartGeneration;

use crate::backend::{Backend, KeptEdit, SlotWrites};
use crate::generate::{cache_pairs, keep_cache, run_with_row_prefixes, run_writing_caches, split_rows, update_cache};
use crate::search::{self, GenConfig};
use crate::tensor::HostTensor;

pub struct Seq2SeqGenerator {
    encode: Box<dyn Backend>,
    /// The encoder without any prefix (paper mode), for `--no-prefix`; peft mode's `encode` has none there.
    encode_bare: Option<Box<dyn Backend>>,
    decode: Box<dyn Backend>,
    spec: BartGeneration,
    /// Prefixes (their trainable tensors) fed to `encode`, the one `new` was given first (empty for baked
    /// graphs); rows choose theirs ([`GenConfig::prefix_of`]).
    prefixes: Vec<BTreeMap<String, HostTensor>>,
    decoder_start: i64,
    /// (decode output, self-cache input) for every layer's new keys and values: what each step writes.
    cache_writes: Vec<(String, String)>,
}

/// R rows being decoded: the decode graph's inputs, kept between steps and updated in place (the caches in the
/// decode backend where it keeps inputs: `generate::keep_cache`).
struct Rows {
    inputs: BTreeMap<String, HostTensor>,
    /// [R, C]: which self-cache slots hold the prefix or a fed token.
    mask: Vec<i64>,
    /// Next free self-cache slot.
    slot: usize,
    /// Position of the decoder start token.
    first_position: usize,
}

impl Seq2SeqGenerator {
    pub fn new(
        encode: Box<dyn Backend>,
        encode_bare: Option<Box<dyn Backend>>,
        decode: Box<dyn Backend>,
        spec: BartGeneration,
        prefix: BTreeMap<String, HostTensor>,
        decoder_start: i64,
    ) -> Seq2SeqGenerator {
        let cache_writes = cache_pairs(spec.layers, |l, kind| {
            (format!("present.{l}.decoder.{kind}"), format!("past_key_values.{l}.decoder.{kind}"))
        });
        Seq2SeqGenerator { encode, encode_bare, decode, spec, prefixes: vec![prefix], decoder_start, cache_writes }
    }

    /// Adds a prefix rows can generate with (`GenConfig::prefix_of`); returns its index.
    pub fn add_prefix(&mut self, prefix: BTreeMap<String, HostTensor>) -> Result<usize> {
        crate::generate::add_prefix(&mut self.prefixes, prefix)
    }

    /// Encodes R right-padded sources, row i with prefix `of_row[i]`, seeds the caches and feeds the decoder start
    /// token; returns the state and the first logits.
    fn encode_and_start(
        &mut self,
        sources: &[Vec<i64>],
        of_row: &[usize],
        pad: i64,
        no_prefix: bool,
    ) -> Result<(Rows, Vec<Vec<f32>>)> {
        let sp = &self.spec;
        let (r, s, c, p, pc) = (sp.rows, sp.src_len, sp.capacity, sp.self_prefix, sp.cross_prefix);
        let (h, d) = (sp.heads, sp.head_dim);
        let mut ids = vec![pad; r * s];
        let mut src_mask = vec![0i64; r * s];
        for (row, src) in sources.iter().enumerate() {
            ids[row * s..row * s + src.len()].copy_from_slice(src);
            src_mask[row * s..row * s + src.len()].fill(1);
        }
        let mut enc_in = BTreeMap::new();
        enc_in.insert("input_ids".to_string(), HostTensor::from_i64(vec![r, s], ids)?);
        enc_in.insert("attention_mask".to_string(), HostTensor::from_i64(vec![r, s], src_mask.clone())?);
        let bare = no_prefix && self.encode_bare.is_some();
        let out = match (&mut self.encode_bare, bare) {
            (Some(e), true) => e.run(&enc_in)?,
            // The bare model's prefix is masked out: any one serves.
            _ => run_with_row_prefixes(
                self.encode.as_mut(),
                enc_in,
                &self.prefixes,
                if no_prefix { &[] } else { of_row },
            )?,
        };
        let flag = if no_prefix { 0 } else { 1 };
        let get = |name: &str| out.get(name).ok_or_else(|| anyhow!("the encode graph has no output {name}"));
        let mut inputs = BTreeMap::new();
        // Cross cache [R, H, P'+S, D]: the prefix slots stay zero (and masked) when the encoder ran bare.
        let cross_len = pc + s;
        for l in 0..sp.layers {
            for kind in ["key", "value"] {
                let t = get(&format!("cross.{l}.{kind}"))?;
                let have = t.shape()[2];
                let cross = if have == cross_len {
                    t.clone()
                } else if have == s {
                    let src = t.as_f32()?;
                    let mut buf = vec![0f32; r * h * cross_len * d];
                    for rh in 0..r * h {
                        buf[(rh * cross_len + pc) * d..(rh + 1) * cross_len * d]
                            .copy_from_slice(&src[rh * s * d..(rh + 1) * s * d]);
                    }
                    HostTensor::from_f32(vec![r, h, cross_len, d], buf)?
                } else {
                    bail!("cross.{l}.{kind} has {have} slots; expected {cross_len} or {s}");
                };
                keep_cache(self.decode.as_mut(), &mut inputs, format!("past_key_values.{l}.encoder.{kind}"), cross)?;
            }
        }
        let mut cross_mask = Vec::with_capacity(r * cross_len);
        for row in 0..r {
            cross_mask.extend(std::iter::repeat_n(if bare { 0 } else { flag }, pc));
            cross_mask.extend_from_slice(&src_mask[row * s..(row + 1) * s]);
        }
        inputs.insert("encoder_attention_mask".into(), HostTensor::from_i64(vec![r, cross_len], cross_mask)?);
        // Self cache [R, H, C, D], the prefix in its first P slots.
        for l in 0..sp.layers {
            for kind in ["key", "value"] {
                let mut buf = vec![0f32; r * h * c * d];
                if let Some(t) = out.get(&format!("self_prefix.{l}.{kind}")) {
                    let src = t.as_f32()?;
                    for rh in 0..r * h {
                        buf[rh * c * d..(rh * c + p) * d].copy_from_slice(&src[rh * p * d..(rh + 1) * p * d]);
                    }
                }
                let cache = HostTensor::from_f32(vec![r, h, c, d], buf)?;
                keep_cache(self.decode.as_mut(), &mut inputs, format!("past_key_values.{l}.decoder.{kind}"), cache)?;
            }
        }
        let mut mask = vec![0i64; r * c];
        for row in 0..r {
            mask[row * c..row * c + p].fill(flag);
        }
        let first_position = if no_prefix { 0 } else { sp.first_position };
        let mut rows = Rows { inputs, mask, slot: p, first_position };
        let start = vec![self.decoder_start; r];
        let logits = self.step(&mut rows, &start, 0)?;
        Ok((rows, logits))
    }

    /// Feeds one token per row (`fed` tokens were fed before it, the start token included).
    fn step(&mut self, rows: &mut Rows, tokens: &[i64], fed: usize) -> Result<Vec<Vec<f32>>> {
        let sp = &self.spec;
        let (r, c, d) = (sp.rows, sp.capacity, sp.head_dim);
        if rows.slot > c {
            bail!("the KV cache is full ({c} slots)");
        }
        rows.inputs.insert("input_ids".into(), HostTensor::from_i64(vec![r, 1], tokens.to_vec())?);
        let pos = vec![(rows.first_position + fed) as i64; r];
        rows.inputs.insert("position_ids".into(), HostTensor::from_i64(vec![r, 1], pos)?);
        let mut m = Vec::with_capacity(r * (c + 1));
        for row in 0..r {
            m.extend_from_slice(&rows.mask[row * c..(row + 1) * c]);
            m.push(1);
        }
        rows.inputs.insert("attention_mask".into(), HostTensor::from_i64(vec![r, c + 1], m)?);
        let s = rows.slot;
        let out = if s < c {
            // The new token's keys/values go into the next slot (the last step's are never read again).
            let writes = SlotWrites { pairs: &self.cache_writes, capacity: c, slot: s, width: d };
            let out = run_writing_caches(self.decode.as_mut(), &mut rows.inputs, &writes)?;
            for row in 0..r {
                rows.mask[row * c + s] = 1;
            }
            out
        } else {
            self.decode.run(&rows.inputs)?
        };
        rows.slot += 1;
        split_rows(out.get("logits").ok_or_else(|| anyhow!("the decode graph has no logits output"))?)
    }

    /// The logits of every step when the decoder is fed the start token and then `tokens` (teacher forcing),
    /// for up to R sources: [source][step][vocab], one step per token of `tokens` (whose rows have equal length).
    pub fn forced_logits(
        &mut self,
        sources: &[Vec<i64>],
        tokens: &[Vec<i64>],
        cfg: &GenConfig,
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let r = self.spec.rows;
        if sources.len() > r || sources.len() != tokens.len() {
            bail!("forced_logits takes up to {r} sources, one token row each");
        }
        let n = tokens.first().map(|t| t.len()).unwrap_or(0);
        if n == 0 || n > self.spec.max_new || tokens.iter().any(|t| t.len() != n) {
            bail!("token rows must have the same length, between 1 and {}", self.spec.max_new);
        }
        search::Start::check(self, sources, &GenConfig { max_new: n, beams: 1, ..cfg.clone() })?;
        let mut rows_src = sources.to_vec();
        rows_src.resize(r, vec![cfg.pad]);
        let (mut rows, logits) = self.encode_and_start(&rows_src, &[], cfg.pad, cfg.no_prefix)?;
        let mut out: Vec<Vec<Vec<f32>>> = logits.into_iter().take(sources.len()).map(|l| vec![l]).collect();
        for step in 0..n - 1 {
            let mut feed = vec![cfg.pad; r];
            for (i, t) in tokens.iter().enumerate() {
                feed[i] = t[step];
            }
            let l = self.step(&mut rows, &feed, step + 1)?;
            for (i, row) in out.iter_mut().enumerate() {
                row.push(l[i].clone());
            }
        }
        Ok(out)
    }

    /// Greedy decoding of any number of sources (R at a time). Returns each source's new tokens, stopping after
    /// eos (not included).
    pub fn greedy(&mut self, sources: &[Vec<i64>], cfg: &GenConfig) -> Result<Vec<Vec<i64>>> {
        search::greedy_all(self, sources, cfg)
    }

    /// Beam search, as many sources at a time as the rows hold (`rows / beams`).
    pub fn beam_search(&mut self, sources: &[Vec<i64>], cfg: &GenConfig) -> Result<Vec<Vec<i64>>> {
        search::beam_all(self, sources, cfg)
    }
}

impl search::Start for Seq2SeqGenerator {
    type Running<'a> = Running<'a>;

    fn rows(&self) -> usize {
        self.spec.rows
    }

    fn check(&self, sources: &[Vec<i64>], cfg: &GenConfig) -> Result<()> {
        let sp = &self.spec;
        search::check_request(sources, "source", sp.src_len, sp.max_new, sp.rows, cfg)
    }

    fn start<'a>(
        &'a mut self,
        sources: &[Vec<i64>],
        prefixes: &[usize],
        cfg: &GenConfig,
    ) -> Result<(Running<'a>, Vec<Vec<f32>>)> {
        let (rows, logits) = self.encode_and_start(sources, prefixes, cfg.pad, cfg.no_prefix)?;
        Ok((Running { gen: self, rows }, logits))
    }

    /// The decoder's start token (what HF's decoder input_ids hold before the first new token), and the source
    /// (unpadded: HF's batch also holds the padding of shorter sources).
    fn context(&self, source: &[i64]) -> search::RowContext {
        search::RowContext { history: vec![self.decoder_start], source: source.to_vec(), input: 0 }
    }
}

pub struct Running<'a> {
    gen: &'a mut Seq2SeqGenerator,
    rows: Rows,
}

impl search::Decoding for Running<'_> {
    fn step(&mut self, tokens: &[i64], n_generated: usize) -> Result<Vec<Vec<f32>>> {
        // The start token was fed first, so generated token n is the (n+1)-th fed.
        self.gen.step(&mut self.rows, tokens, n_generated + 1)
    }

    fn reorder(&mut self, parents: &[usize]) -> Result<()> {
        // Beams only move within a source's rows, whose cross caches are equal: only the self cache and its
        // mask follow them.
        let sp = &self.gen.spec;
        let (r, c, layers) = (sp.rows, sp.capacity, sp.layers);
        let edit = KeptEdit::Reorder { parents, rows: r, per_row: sp.heads * c * sp.head_dim };
        for l in 0..layers {
            for kind in ["key", "value"] {
                let name = format!("past_key_values.{l}.decoder.{kind}");
                update_cache(self.gen.decode.as_mut(), &mut self.rows.inputs, &name, &edit)?;
            }
        }
        search::reorder_rows(&mut self.rows.mask, parents, r, c);
        Ok(())
    }
}
