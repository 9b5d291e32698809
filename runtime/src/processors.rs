//! What Hugging Face's `generate` does to a row of scores before it picks a token, beyond bans and forcing (which
//! live in `search`): the sequence biases, repetition penalties and end-of-sequence length decay, the sampling
//! warpers (temperature, top-h, top-k, top-p, min-p, typical, epsilon, eta), non-finite scores made finite, and the
//! draw itself. Each follows its HF logits processor, in float32 as HF computes it, so that the same
//! scores give the same kept tokens.

/// Sampling settings (HF's `do_sample=True` and its warpers, applied in HF's order: temperature, top-h, top-k,
/// top-p, min-p, typical, epsilon, eta).
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// Scores are divided by it (above 0).
    pub temperature: f32,
    /// Top-H: of the 100 best tokens, the most probable ones whose entropy terms add up to at most this fraction
    /// (in (0, 1]) of their distribution's entropy (the best always kept); `None`: off.
    pub top_h: Option<f32>,
    /// Only the `top_k` best tokens (ties with the last one kept too); 0: off. HF's default is 50.
    pub top_k: usize,
    /// Only the most probable tokens whose probabilities add up to `top_p`; 1: off.
    pub top_p: f32,
    /// Only tokens at least `min_p` times as probable as the best one; `None`: off.
    pub min_p: Option<f32>,
    /// Only the tokens closest to the row's entropy whose probabilities add up to `typical_p`; 1: off.
    pub typical_p: f32,
    /// Only tokens at least this probable (HF's `epsilon_cutoff`), or at least min(eta, √eta · e^-entropy)
    /// (`eta_cutoff`); 0: off.
    pub epsilon: f32,
    pub eta: f32,
    /// The draws of the input with index i come from the stream (seed, i) ([`Draws::new`]).
    pub seed: u64,
}

impl Default for Sampling {
    /// HF's defaults when `do_sample` is on and nothing else is set.
    fn default() -> Self {
        Sampling {
            temperature: 1.0,
            top_h: None,
            top_k: 50,
            top_p: 1.0,
            min_p: None,
            typical_p: 1.0,
            epsilon: 0.0,
            eta: 0.0,
            seed: 0,
        }
    }
}

/// The tokens of a row whose scores change before bans and warpers, in HF's order: its SequenceBiasLogitsProcessor
/// (a bias added to each token ending a biased sequence), its EncoderRepetitionPenaltyLogitsProcessor over `source`
/// (a factor above 1 favours the source's tokens), then its RepetitionPenaltyLogitsProcessor over `seq` (a factor
/// above 1 disfavours tokens already there). Each token is penalized once per processor: a negative score is
/// multiplied by the factor, a positive one divided. `vocab` bounds the ids (HF drops ids past the scores).
pub struct Penalties {
    /// (token, bias, encoder factor applies, repetition factor applies), each token once.
    tokens: Vec<(usize, f32, bool, bool)>,
    /// HF keeps 1 / encoder_repetition_penalty (computed in float64) and multiplies scores by it.
    encoder: f32,
    repetition: f32,
    /// The end-of-sequence tokens' length decay, after the rest (HF's ExponentialDecayLengthPenalty): a finite
    /// score s becomes s + |s| · `boost` (boost = factor^k - 1, k new tokens past the start).
    decay: Option<(Vec<usize>, f32)>,
}

impl Penalties {
    /// `None` when no token is biased or penalized (penalties of 1 are off).
    pub fn new(
        biases: &[(i64, f32)],
        encoder_penalty: f64,
        source: &[i64],
        repetition_penalty: f64,
        seq: &[i64],
        vocab: usize,
    ) -> Option<Penalties> {
        let mut tokens: Vec<(usize, f32, bool, bool)> = Vec::new();
        // The entry of token t (made on first use), or None past the vocabulary.
        fn entry(tokens: &mut Vec<(usize, f32, bool, bool)>, t: i64, vocab: usize) -> Option<usize> {
            let t = usize::try_from(t).ok().filter(|&t| t < vocab)?;
            Some(tokens.iter().position(|e| e.0 == t).unwrap_or_else(|| {
                tokens.push((t, 0.0, false, false));
                tokens.len() - 1
            }))
        }
        for &(t, b) in biases {
            if let Some(i) = entry(&mut tokens, t, vocab) {
                tokens[i].1 += b;
            }
        }
        if encoder_penalty != 1.0 {
            for &t in source {
                if let Some(i) = entry(&mut tokens, t, vocab) {
                    tokens[i].2 = true;
                }
            }
        }
        if repetition_penalty != 1.0 {
            for &t in seq {
                if let Some(i) = entry(&mut tokens, t, vocab) {
                    tokens[i].3 = true;
                }
            }
        }
        if tokens.is_empty() {
            return None;
        }
        Some(Penalties {
            tokens,
            encoder: (1.0 / encoder_penalty) as f32,
            repetition: repetition_penalty as f32,
            decay: None,
        })
    }

    /// `penalties` (which may be none) with the end-of-sequence ids `eos` raised by `boost` after them (HF's
    /// exponential_decay_length_penalty once it applies: boost = factor^k - 1 in float64, k > 0 new tokens past
    /// its start). A boost of 0 or no eos id in the vocabulary changes nothing.
    pub fn with_eos_decay(penalties: Option<Penalties>, eos: &[i64], boost: f64, vocab: usize) -> Option<Penalties> {
        let eos: Vec<usize> = eos.iter().filter_map(|&t| usize::try_from(t).ok().filter(|&t| t < vocab)).collect();
        if boost == 0.0 || eos.is_empty() {
            return penalties;
        }
        let mut p = penalties.unwrap_or(Penalties { tokens: Vec::new(), encoder: 1.0, repetition: 1.0, decay: None });
        for &t in &eos {
            if !p.tokens.iter().any(|e| e.0 == t) {
                p.tokens.push((t, 0.0, false, false));
            }
        }
        p.decay = Some((eos, boost as f32));
        Some(p)
    }

    /// The tokens whose scores change.
    pub fn tokens(&self) -> impl Iterator<Item = usize> + '_ {
        self.tokens.iter().map(|e| e.0)
    }

    /// Score `x` of token entry `i` after the processors.
    fn apply_at(&self, i: usize, x: f32) -> f32 {
        let (_, bias, encoder, repetition) = self.tokens[i];
        let scale = |x: f32, f: f32| if x < 0.0 { x * f } else { x / f };
        let mut x = if bias != 0.0 { x + bias } else { x };
        if encoder {
            x = scale(x, self.encoder);
        }
        if repetition {
            x = scale(x, self.repetition);
        }
        match &self.decay {
            Some((eos, boost)) if x.is_finite() && eos.contains(&self.tokens[i].0) => x + x.abs() * boost,
            _ => x,
        }
    }

    /// Each changed token with its score after the processors, `score(t)` giving the score before.
    pub fn scores(&self, score: impl Fn(usize) -> f32) -> Vec<(usize, f32)> {
        self.tokens.iter().enumerate().map(|(i, e)| (e.0, self.apply_at(i, score(e.0)))).collect()
    }

    /// Changes a whole row in place.
    pub fn apply(&self, row: &mut [f32]) {
        for i in 0..self.tokens.len() {
            let t = self.tokens[i].0;
            row[t] = self.apply_at(i, row[t]);
        }
    }
}

/// HF's sampling warpers on a row of processed scores, in place: filtered tokens become -inf. Each keeps at least
/// `keep` tokens (HF's `min_tokens_to_keep`: 1 when sampling, 1 + the number of end-of-sequence ids (at least 2)
/// in beam sampling, so that a beam can go on past an end).
pub fn warp(row: &mut [f32], s: &Sampling, keep: usize) {
    let keep = keep.clamp(1, row.len().max(1));
    if s.temperature != 1.0 {
        for x in row.iter_mut() {
            *x /= s.temperature;
        }
    }
    if let Some(h) = s.top_h {
        top_h(row, h);
    }
    if s.top_k > 0 {
        top_k(row, s.top_k.max(keep));
    }
    if s.top_p < 1.0 {
        top_p(row, s.top_p, keep);
    }
    if let Some(m) = s.min_p {
        min_p(row, m, keep);
    }
    if s.typical_p < 1.0 {
        typical(row, s.typical_p, keep);
    }
    if s.epsilon > 0.0 {
        below_floor(row, keep, |_| s.epsilon);
    }
    if s.eta > 0.0 {
        // The floor shrinks as the row spreads: entropy H of softmax(row), -inf entries adding nothing.
        below_floor(row, keep, |probs| {
            let entropy: f32 = -probs.iter().filter(|&&q| q > 0.0).map(|&q| q * q.ln()).sum::<f32>();
            s.eta.min(s.eta.sqrt() * (-entropy).exp())
        });
    }
}

/// EpsilonLogitsWarper and EtaLogitsWarper: tokens less probable than `floor(probabilities)` are removed, those
/// scoring as high as the `keep`-th best kept.
fn below_floor(row: &mut [f32], keep: usize, floor: impl Fn(&[f32]) -> f32) {
    let probs = softmax(row);
    let bar = floor(&probs);
    let kth = kth_largest(row, keep);
    for (x, q) in row.iter_mut().zip(probs) {
        if q < bar && *x < kth {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// The k-th largest value (k from 1, at most the row's length): total order puts NaN above everything, as
/// torch.topk does.
fn kth_largest(row: &[f32], k: usize) -> f32 {
    let mut sorted = row.to_vec();
    *sorted.select_nth_unstable_by(k.clamp(1, row.len()) - 1, |a, b| b.total_cmp(a)).1
}

/// TopKLogitsWarper: scores below the k-th best are removed.
fn top_k(row: &mut [f32], k: usize) {
    if k >= row.len() {
        return;
    }
    // One pass that skips blocks below the best k so far (a vocabulary-sized select costs several times more).
    let kth = match crate::search::best_tokens(row, k, &[]).last() {
        Some(&(_, x)) if !row.iter().any(|x| x.is_nan()) => x,
        _ => kth_largest(row, k),
    };
    for x in row.iter_mut() {
        if *x < kth {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// TopHLogitsWarper: of the 100 best tokens (by torch.topk: ties to the lower index here), best first, those whose
/// cumulative entropy terms -p ln p (p: their softmax among the 100) stay at most `h` times the 100's entropy;
/// the best always kept, every other token removed. Not bound by a minimum count (HF gives it none).
fn top_h(row: &mut [f32], h: f32) {
    let n = row.len().min(100);
    let top: Vec<(usize, f32)> = crate::search::best_tokens(row, n, &[]);
    let logits: Vec<f32> = top.iter().map(|t| t.1).collect();
    let probs = softmax(&logits);
    // Categorical's entropy: -Σ p · (normalized logit, clamped to the lowest float), the logits normalized by
    // their log-sum-exp.
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    let entropy: f32 = -logits.iter().zip(&probs).map(|(&x, &q)| (x - lse).max(f32::MIN) * q).sum::<f32>();
    let tau = entropy * h;
    let mut keep = vec![false; row.len()];
    // torch's cumsum on the CPU adds in float64, and gives float32.
    let mut cum = 0f64;
    for (j, (&(i, _), &q)) in top.iter().zip(&probs).enumerate() {
        // -p ln p of a zero probability is NaN in torch (0 · -inf), and every later sum with it.
        cum += (-q * q.ln()) as f64;
        keep[i] = j == 0 || cum as f32 <= tau;
    }
    for (x, k) in row.iter_mut().zip(keep) {
        if !k {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// HF's InfNanRemoveLogitsProcessor (`remove_invalid_values`): NaN scores become 0, infinite ones the largest
/// finite float of their sign.
pub fn make_finite(row: &mut [f32]) {
    for x in row.iter_mut() {
        if x.is_nan() {
            *x = 0.0;
        } else if x.is_infinite() {
            *x = if *x > 0.0 { f32::MAX } else { f32::MIN };
        }
    }
}

/// Indices of the tokens `row` still keeps (not -inf) by ascending `key` (equal keys by index). Filtered tokens
/// have probability 0: HF's warpers sort them too, and they change nothing there (they are removed again), so
/// after top-k the sorts are short.
fn ascending_kept(row: &[f32], key: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..row.len()).filter(|&i| row[i] != f32::NEG_INFINITY).collect();
    order.sort_by(|&a, &b| key[a].total_cmp(&key[b]).then(a.cmp(&b)));
    order
}

/// softmax of `v` in float32 (max subtracted, as torch's).
fn softmax(v: &[f32]) -> Vec<f32> {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return vec![0.0; v.len()];
    }
    let e: Vec<f32> = v.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.into_iter().map(|x| x / sum).collect()
}

/// TopPLogitsWarper: in ascending order, the tokens whose cumulative probability is at most 1 - p are removed,
/// the best `keep` always kept.
fn top_p(row: &mut [f32], p: f32, keep: usize) {
    let order = ascending_kept(row, row);
    if order.is_empty() {
        return;
    }
    let sorted: Vec<f32> = order.iter().map(|&i| row[i]).collect();
    let probs = softmax(&sorted);
    let mut cum = 0f32;
    // The last `keep` of the ascending row stay (the filtered tokens are its start).
    let kept_from = order.len().saturating_sub(keep);
    let mut remove = Vec::new();
    for (j, (&i, q)) in order.iter().zip(probs).enumerate() {
        cum += q;
        if cum <= 1.0 - p && j < kept_from {
            remove.push(i);
        }
    }
    for i in remove {
        row[i] = f32::NEG_INFINITY;
    }
}

/// MinPLogitsWarper: tokens less probable than `m` times the best one are removed (the `keep` most probable
/// kept, ties to the lower index).
fn min_p(row: &mut [f32], m: f32, keep: usize) {
    let probs = softmax(row);
    let top = probs.iter().copied().fold(0f32, f32::max);
    let mut by_prob: Vec<usize> = (0..probs.len()).collect();
    let by = |a: &usize, b: &usize| probs[*b].total_cmp(&probs[*a]).then(a.cmp(b));
    by_prob.select_nth_unstable_by(keep - 1, by);
    by_prob.truncate(keep);
    let bar = m * top;
    for (i, (x, q)) in row.iter_mut().zip(probs).enumerate() {
        if q < bar && !by_prob.contains(&i) {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// TypicalLogitsWarper: tokens ordered by how far their surprise (-log p) is from the row's entropy; those past
/// the first whose cumulative probability reaches `mass` are removed (the closest `keep` kept).
fn typical(row: &mut [f32], mass: f32, keep: usize) {
    // log_softmax as torch computes it: x - max - ln Σ exp(x - max).
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = row.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    let log_probs: Vec<f32> = row.iter().map(|&x| x - max - log_sum).collect();
    let probs: Vec<f32> = log_probs.iter().map(|&l| l.exp()).collect();
    // nansum: -inf · 0 terms count as 0.
    let entropy: f32 = -log_probs.iter().zip(&probs).map(|(&l, &q)| l * q).filter(|x| !x.is_nan()).sum::<f32>();
    let shifted: Vec<f32> = log_probs.iter().map(|&l| (-l - entropy).abs()).collect();
    let order = ascending_kept(row, &shifted);
    if order.is_empty() {
        return;
    }
    let sorted_logits: Vec<f32> = order.iter().map(|&i| row[i]).collect();
    let probs_sorted = softmax(&sorted_logits);
    let mut cum = 0f32;
    let mut below = 0;
    for q in probs_sorted {
        cum += q;
        if cum < mass {
            below += 1;
        }
    }
    let last = below.min(order.len() - 1);
    let bar = shifted[order[last]];
    for (j, &i) in order.iter().enumerate() {
        if j >= keep && shifted[i] > bar {
            row[i] = f32::NEG_INFINITY;
        }
    }
}

/// A token drawn from softmax(`row`) with the uniform number `u` in [0, 1): the first token whose cumulative
/// probability (in vocabulary order) passes u. -inf scores are never drawn.
pub fn draw(row: &[f32], u: f64) -> usize {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weight = |x: f32| if x == f32::NEG_INFINITY { 0.0 } else { ((x - max) as f64).exp() };
    let total: f64 = row.iter().map(|&x| weight(x)).sum();
    let target = u * total;
    let mut cum = 0f64;
    let mut last_kept = crate::search::argmax(row);
    for (i, &x) in row.iter().enumerate() {
        let w = weight(x);
        if w > 0.0 {
            cum += w;
            last_kept = i;
            if cum > target {
                return i;
            }
        }
    }
    // Rounding can leave u · total just above the sum: the last token that can be drawn.
    last_kept
}

/// `count` distinct indices drawn one after another, each with probability proportional to its weight among those
/// not drawn yet (as torch.multinomial without replacement, which beam sampling uses); weights of 0 are never
/// drawn, so fewer come back when fewer are positive. In drawing order.
pub fn draw_distinct(weights: &[f64], count: usize, d: &mut Draws) -> Vec<usize> {
    let mut left: Vec<(usize, f64)> = weights.iter().copied().enumerate().filter(|&(_, w)| w > 0.0).collect();
    let mut out = Vec::with_capacity(count.min(left.len()));
    while out.len() < count && !left.is_empty() {
        let total: f64 = left.iter().map(|e| e.1).sum();
        let target = d.uniform() * total;
        let mut cum = 0f64;
        // Rounding can leave the target just above the sum: the last one then.
        let mut at = left.len() - 1;
        for (j, e) in left.iter().enumerate() {
            cum += e.1;
            if cum > target {
                at = j;
                break;
            }
        }
        out.push(left.swap_remove(at).0);
    }
    out
}

/// One input's random numbers: xoshiro256** seeded through SplitMix64 from (seed, input index), so an input's
/// samples do not depend on which other inputs share its batch, nor on where a resumed run starts.
#[derive(Clone, Debug)]
pub struct Draws([u64; 4]);

impl Draws {
    pub fn new(seed: u64, input: u64) -> Draws {
        let mut x = seed ^ input.wrapping_mul(0xD1B5_4A32_D192_ED03);
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Draws([next(), next(), next(), next()])
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in [0, 1), 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over many draws, each token comes up as often as its probability says (within 4 standard deviations), and
    /// a -inf token never.
    #[test]
    fn draws_follow_the_softmax() {
        let row = [1.0f32, f32::NEG_INFINITY, 0.0, 2.5, -1.0, 2.5];
        let probs = softmax(&row);
        let n = 200_000;
        let mut counts = [0usize; 6];
        let mut d = Draws::new(7, 3);
        for _ in 0..n {
            counts[draw(&row, d.uniform())] += 1;
        }
        assert_eq!(counts[1], 0);
        for (i, (&c, &p)) in counts.iter().zip(&probs).enumerate() {
            let (mean, sd) = (n as f64 * p as f64, (n as f64 * p as f64 * (1.0 - p as f64)).sqrt());
            assert!((c as f64 - mean).abs() <= 4.0 * sd.max(1.0), "token {i}: {c} draws, expected {mean:.0} ± {sd:.0}");
        }
    }

    /// Two of three drawn without replacement: each pair comes up with probability p_i p_j / (1 - p_i) +
    /// p_j p_i / (1 - p_j) (within 4 standard deviations), a weight of 0 never, and fewer positive weights than
    /// asked give them all.
    #[test]
    fn distinct_draws_follow_sequential_sampling() {
        let w = [0.5, 0.0, 0.3, 0.2];
        let n = 100_000;
        let mut counts = std::collections::BTreeMap::new();
        let mut d = Draws::new(3, 1);
        for _ in 0..n {
            let mut pair = draw_distinct(&w, 2, &mut d);
            assert!(!pair.contains(&1) && pair[0] != pair[1]);
            pair.sort();
            *counts.entry(pair).or_insert(0usize) += 1;
        }
        for (i, j) in [(0, 2), (0, 3), (2, 3)] {
            let p = w[i] * w[j] / (1.0 - w[i]) + w[j] * w[i] / (1.0 - w[j]);
            let c = counts.get(&vec![i, j]).copied().unwrap_or(0) as f64;
            let (mean, sd) = (n as f64 * p, (n as f64 * p * (1.0 - p)).sqrt());
            assert!((c - mean).abs() <= 4.0 * sd, "pair ({i}, {j}): {c} draws, expected {mean:.0} ± {sd:.0}");
        }
        let mut all = draw_distinct(&w, 4, &mut d);
        all.sort();
        assert_eq!(all, [0, 2, 3]);
    }

    /// Streams of other seeds or inputs differ; the same (seed, input) repeats.
    #[test]
    fn streams_are_per_seed_and_input() {
        let first = |seed, input| {
            let mut d = Draws::new(seed, input);
            (0..4).map(|_| d.uniform()).collect::<Vec<_>>()
        };
        assert_eq!(first(1, 2), first(1, 2));
        assert_ne!(first(1, 2), first(1, 3));
        assert_ne!(first(1, 2), first(2, 2));
        assert!(first(0, 0).iter().all(|u| (0.0..1.0).contains(u)));
    }
}
