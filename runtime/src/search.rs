//! Greedy and beam search over any model that decodes R rows one token at a time (GPT-2's prefill/decode
//! graphs, BART's encode/decode graphs): the search only sees logits, and asks for cache rows to be reordered.

use anyhow::Result;

#[derive(Clone, Debug)]
pub struct GenConfig {
    pub max_new: usize,
    /// No end-of-sequence before this many new tokens (its logit is masked, as HF's min_new_tokens does).
    pub min_new: usize,
    pub beams: usize,
    /// Beam scores are sum(log p) / len^length_penalty.
    pub length_penalty: f32,
    pub eos: Option<i64>,
    /// Token used for padding and for idle rows.
    pub pad: i64,
    /// Mask the prefix out and number positions from 0: the bare model, for comparison.
    pub no_prefix: bool,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig { max_new: 32, min_new: 0, beams: 1, length_penalty: 1.0, eos: None, pad: 0, no_prefix: false }
    }
}

/// The bundle's generation shapes against a request: inputs of 1..=`max_len` tokens (`what`: "prompt",
/// "source"), `max_new` and `beams` within what the graphs were compiled for.
pub fn check_request(
    inputs: &[Vec<i64>],
    what: &str,
    max_len: usize,
    max_new: usize,
    rows: usize,
    cfg: &GenConfig,
) -> Result<()> {
    for (i, p) in inputs.iter().enumerate() {
        if p.is_empty() {
            anyhow::bail!("{what} {i} is empty");
        }
        if p.len() > max_len {
            anyhow::bail!(
                "{what} {i} has {} tokens; the bundle's generation graphs take at most {max_len} (recompile with a \
                 larger --prompt-len)",
                p.len()
            );
        }
    }
    if cfg.max_new == 0 || cfg.max_new > max_new {
        anyhow::bail!("--max-new must be between 1 and {max_new} (the bundle's --max-new)");
    }
    if cfg.beams == 0 || cfg.beams > rows {
        anyhow::bail!("--beams must be between 1 and {rows} (the bundle's --gen-rows)");
    }
    Ok(())
}

/// R rows being decoded, their caches filled up to the tokens fed so far.
pub trait Decoding {
    /// Feeds one token per row (`n_generated` tokens were generated before it); returns each row's logits.
    fn step(&mut self, tokens: &[i64], n_generated: usize) -> Result<Vec<Vec<f32>>>;
    /// Row i of the new state is row `parents[i]` of the old one (rows beyond `parents` copy `parents[0]`).
    fn reorder(&mut self, parents: &[usize]) -> Result<()>;
}

/// A model the searches drive R rows at a time, each row started from one input (a prompt, a source).
pub trait Start {
    type Running<'a>: Decoding
    where
        Self: 'a;
    /// Rows decoded together (the generation graphs' batch).
    fn rows(&self) -> usize;
    /// Refuses a request the generation graphs cannot serve (`check_request`).
    fn check(&self, inputs: &[Vec<i64>], cfg: &GenConfig) -> Result<()>;
    /// Starts `rows()` rows from as many inputs; returns the running state and each row's first logits.
    fn start<'a>(&'a mut self, inputs: &[Vec<i64>], cfg: &GenConfig) -> Result<(Self::Running<'a>, Vec<Vec<f32>>)>;
}

/// Greedy decoding of any number of inputs, R at a time (idle rows hold a pad token). Returns each input's new
/// tokens, stopping after eos (not included).
pub fn greedy_all<M: Start>(model: &mut M, inputs: &[Vec<i64>], cfg: &GenConfig) -> Result<Vec<Vec<i64>>> {
    model.check(inputs, cfg)?;
    let r = model.rows();
    let mut out = Vec::with_capacity(inputs.len());
    for chunk in inputs.chunks(r) {
        let mut rows = chunk.to_vec();
        rows.resize(r, vec![cfg.pad]);
        let (mut state, logits) = model.start(&rows, cfg)?;
        out.extend(greedy(&mut state, logits, chunk.len(), cfg)?);
    }
    Ok(out)
}

/// Beam search over any number of inputs, as many at a time as the rows hold (R / beams). Returns each input's
/// best hypothesis's new tokens.
pub fn beam_all<M: Start>(model: &mut M, inputs: &[Vec<i64>], cfg: &GenConfig) -> Result<Vec<Vec<i64>>> {
    model.check(inputs, cfg)?;
    let (r, k) = (model.rows(), cfg.beams);
    let mut out = Vec::with_capacity(inputs.len());
    for chunk in inputs.chunks(r / k) {
        let mut rows: Vec<Vec<i64>> = chunk.iter().flat_map(|p| std::iter::repeat_n(p.clone(), k)).collect();
        rows.resize(r, chunk[0].clone());
        let (mut state, logits) = model.start(&rows, cfg)?;
        out.extend(beam_groups(&mut state, logits, chunk.len(), cfg)?);
    }
    Ok(out)
}

/// Beam search when `cfg.beams` > 1, else greedy decoding, over any number of inputs.
pub fn search_all<M: Start>(model: &mut M, inputs: &[Vec<i64>], cfg: &GenConfig) -> Result<Vec<Vec<i64>>> {
    if cfg.beams > 1 {
        beam_all(model, inputs, cfg)
    } else {
        greedy_all(model, inputs, cfg)
    }
}

/// Greedy decoding of the first `live` rows, starting from the logits after the prompt. Returns each row's
/// new tokens, stopping after eos (not included).
pub fn greedy(
    state: &mut dyn Decoding,
    mut logits: Vec<Vec<f32>>,
    live: usize,
    cfg: &GenConfig,
) -> Result<Vec<Vec<i64>>> {
    let r = logits.len();
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
        if n + 1 == cfg.max_new || done.iter().take(live).all(|&d| d) {
            break;
        }
        logits = state.step(&next, n)?;
    }
    gen.truncate(live);
    Ok(gen)
}

/// Beam search over rows that all hold the same prompt; `cfg.beams` of them are live. Returns the best
/// hypothesis's new tokens (eos not included).
pub fn beam(state: &mut dyn Decoding, logits: Vec<Vec<f32>>, cfg: &GenConfig) -> Result<Vec<i64>> {
    Ok(beam_groups(state, logits, 1, cfg)?.pop().unwrap_or_default())
}

/// One prompt's search: its live beams and finished hypotheses.
struct Group {
    /// (tokens, sum of log-probabilities); only beam 0 is live at the start (its K rows are identical).
    beams: Vec<(Vec<i64>, f64)>,
    finished: Vec<(Vec<i64>, f64)>,
    done: bool,
}

/// Beam search for `groups` prompts at once: rows [g·K, (g+1)·K) hold prompt g (K = `cfg.beams`), rows past
/// groups·K are idle. Returns each prompt's best hypothesis (eos not included). Follows Hugging Face's beam search
/// with `early_stopping=False`: at step t (t tokens generated) the top-2K candidates are ranked; those among the
/// top K that end in eos (all of the top K at the last step) finish with score sum(log p) / t^length_penalty (the
/// eos counted); the best K candidates that do not end in eos live on; a prompt is done when K hypotheses are
/// finished and its best live beam's score / t^length_penalty cannot beat the worst of them.
pub fn beam_groups(
    state: &mut dyn Decoding,
    mut logits: Vec<Vec<f32>>,
    groups: usize,
    cfg: &GenConfig,
) -> Result<Vec<Vec<i64>>> {
    let (r, k) = (logits.len(), cfg.beams);
    if groups * k > r {
        anyhow::bail!("{groups} prompts × {k} beams need {} rows; the graphs decode {r}", groups * k);
    }
    let norm = |s: f64, t: usize| s / (t as f64).powf(cfg.length_penalty as f64);
    let mut gs: Vec<Group> =
        (0..groups).map(|_| Group { beams: vec![(Vec::new(), 0.0)], finished: Vec::new(), done: false }).collect();
    for n in 0..cfg.max_new {
        let t = n + 1;
        let last = t == cfg.max_new;
        // Rows keep their place unless a group's beams move; idle and finished rows are fed padding.
        let mut parents: Vec<usize> = (0..r).collect();
        let mut tokens = vec![cfg.pad; r];
        for (gi, g) in gs.iter_mut().enumerate().filter(|(_, g)| !g.done) {
            let base = gi * k;
            // Candidates over every live beam and token.
            let mut cands: Vec<(f64, usize, i64)> = Vec::new();
            for (b, (_, s)) in g.beams.iter().enumerate() {
                // As HF: log-softmax over the whole vocabulary first, then forbid an early eos.
                let mut lp = log_softmax(&logits[base + b]);
                mask_eos(&mut lp, cfg, n);
                for (tok, &x) in lp.iter().enumerate() {
                    if x.is_finite() {
                        cands.push((s + x as f64, b, tok as i64));
                    }
                }
            }
            // Only the best 2K matter: select them, then order those (the same order a full sort gives).
            let order = |a: &(f64, usize, i64), b: &(f64, usize, i64)| {
                b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
            };
            if cands.len() > 2 * k {
                cands.select_nth_unstable_by(2 * k - 1, order);
                cands.truncate(2 * k);
            }
            cands.sort_by(order);
            let mut next: Vec<(Vec<i64>, f64, usize)> = Vec::new();
            for (rank, &(s, b, tok)) in cands.iter().enumerate() {
                let is_eos = Some(tok) == cfg.eos;
                if rank < k && (is_eos || last) {
                    let mut toks = g.beams[b].0.clone();
                    if !is_eos {
                        toks.push(tok);
                    }
                    g.finished.push((toks, norm(s, t)));
                } else if !is_eos && next.len() < k && !last {
                    let mut toks = g.beams[b].0.clone();
                    toks.push(tok);
                    next.push((toks, s, b));
                }
            }
            g.finished.sort_by(|a, b| b.1.total_cmp(&a.1));
            g.finished.truncate(k);
            let stop = last || next.is_empty() || (g.finished.len() == k && norm(next[0].1, t) <= g.finished[k - 1].1);
            if stop {
                g.done = true;
                continue;
            }
            for (i, (toks, _, b)) in next.iter().enumerate() {
                parents[base + i] = base + b;
                tokens[base + i] = *toks.last().unwrap();
            }
            g.beams = next.into_iter().map(|(t, s, _)| (t, s)).collect();
        }
        if gs.iter().all(|g| g.done) {
            break;
        }
        // Reorder the cache rows to follow the surviving beams.
        state.reorder(&parents)?;
        logits = state.step(&tokens, n)?;
    }
    Ok(gs.into_iter().map(|g| g.finished.into_iter().next().map(|f| f.0).unwrap_or_default()).collect())
}

/// Copies row blocks of `per_row` elements: row i takes row `parents[i]` (or `parents[0]` past the end).
///
/// The caches are tens of MB per step, so a row that keeps its own block is not touched, and only the blocks
/// that are read by another row and overwritten themselves are saved before the copies.
pub fn reorder_rows<T: Copy>(data: &mut [T], parents: &[usize], rows: usize, per_row: usize) {
    let src = |i: usize| parents.get(i).copied().unwrap_or(parents[0]);
    let block = |r: usize| r * per_row..(r + 1) * per_row;
    let mut saved: Vec<(usize, Vec<T>)> = Vec::new();
    for i in 0..rows {
        let s = src(i);
        if s != i && src(s) != s && !saved.iter().any(|(r, _)| *r == s) {
            saved.push((s, data[block(s)].to_vec()));
        }
    }
    for i in 0..rows {
        let s = src(i);
        if s == i {
            continue;
        }
        match saved.iter().find(|(r, _)| *r == s) {
            Some((_, copy)) => data[block(i)].copy_from_slice(copy),
            None => data.copy_within(block(s), i * per_row),
        }
    }
}

fn mask_eos(logits: &mut [f32], cfg: &GenConfig, n_generated: usize) {
    if let Some(e) = cfg.eos {
        if n_generated < cfg.min_new && (e as usize) < logits.len() {
            logits[e as usize] = f32::NEG_INFINITY;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every parent assignment of 4 rows (and lists shorter than the rows) gives what a copy of the old rows,
    /// gathered, gives.
    #[test]
    fn reorder_rows_equals_a_gather_of_the_old_rows() {
        let (rows, per_row) = (4, 3);
        let old: Vec<u32> = (0..(rows * per_row) as u32).collect();
        for code in 0..4usize.pow(4) {
            for len in 1..=rows {
                let parents: Vec<usize> = (0..len).map(|i| code / 4usize.pow(i as u32) % 4).collect();
                let mut data = old.clone();
                reorder_rows(&mut data, &parents, rows, per_row);
                for i in 0..rows {
                    let s = parents.get(i).copied().unwrap_or(parents[0]);
                    assert_eq!(
                        &data[i * per_row..(i + 1) * per_row],
                        &old[s * per_row..(s + 1) * per_row],
                        "{parents:?}"
                    );
                }
            }
        }
    }
}
