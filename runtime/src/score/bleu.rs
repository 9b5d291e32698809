//! Corpus BLEU-4 with multiple references, as sacrebleu 2.x's `corpus_bleu` computes it (defaults:
//! `smooth_method='exp'`, no effective order), on already tokenized segments.
//!
//! Per segment: hypothesis n-gram counts (n = 1..4) are clipped by the maximum count of that n-gram in
//! any one reference; the reference length is the one closest to the hypothesis length (ties: the
//! shorter). Corpus: sums of matches `m_n`, hypothesis n-grams `t_n`, lengths `c` (hypotheses) and `r`
//! (closest references). Then
//!
//! ```text
//! BP   = 1 if c >= r, else exp(1 - r/c)   (0 if c = 0)
//! p_n  = 100 m_n / t_n;  where m_n = 0: 100 / (2^k t_n), k counting the zero orders so far ('exp')
//! BLEU = BP * exp(mean_n log p_n)         (0-100; 0 if no n-gram matches at all;
//!                                          an order with t_n = 0 contributes log 0 -> -1e10, so 0)
//! ```

use super::tokenize::{ngram_counts, FastMap};

pub const MAX_ORDER: usize = 4;

/// BLEU and its sufficient statistics (sacrebleu's `BLEUScore`).
#[derive(Clone, Debug, PartialEq)]
pub struct Bleu {
    /// 0-100.
    pub score: f64,
    pub counts: [usize; MAX_ORDER],
    pub totals: [usize; MAX_ORDER],
    /// Precisions in percent, after smoothing.
    pub precisions: [f64; MAX_ORDER],
    pub bp: f64,
    pub sys_len: usize,
    pub ref_len: usize,
}

/// The reference length closest to `hyp_len`; on a tie the shorter one.
pub fn closest_ref_len(hyp_len: usize, ref_lens: impl IntoIterator<Item = usize>) -> usize {
    let mut best: Option<(usize, usize)> = None; // (diff, len)
    for len in ref_lens {
        let diff = hyp_len.abs_diff(len);
        best = match best {
            Some((d, l)) if d < diff || (d == diff && l <= len) => Some((d, l)),
            _ => Some((diff, len)),
        };
    }
    best.map_or(0, |(_, l)| l)
}

/// sacrebleu's `my_log`: log, with log 0 floored to -9999999999.
fn floored_log(x: f64) -> f64 {
    if x == 0.0 {
        -9_999_999_999.0
    } else {
        x.ln()
    }
}

/// Corpus BLEU of tokenized hypotheses against tokenized reference groups (`refs[i]` are the
/// references of `hyps[i]`; groups may differ in size).
pub fn corpus_bleu(hyps: &[Vec<String>], refs: &[Vec<Vec<String>>]) -> Bleu {
    assert_eq!(hyps.len(), refs.len(), "one reference group per hypothesis");
    let mut counts = [0usize; MAX_ORDER];
    let mut totals = [0usize; MAX_ORDER];
    let (mut sys_len, mut ref_len) = (0usize, 0usize);
    for (hyp, group) in hyps.iter().zip(refs) {
        let mut ref_max: FastMap<&[String], usize> = FastMap::default();
        for r in group {
            for (g, c) in ngram_counts(r, 1, MAX_ORDER) {
                let e = ref_max.entry(g).or_insert(0);
                *e = (*e).max(c);
            }
        }
        sys_len += hyp.len();
        ref_len += closest_ref_len(hyp.len(), group.iter().map(Vec::len));
        for (g, c) in ngram_counts(hyp, 1, MAX_ORDER) {
            totals[g.len() - 1] += c;
            if let Some(&m) = ref_max.get(g) {
                counts[g.len() - 1] += c.min(m);
            }
        }
    }
    compute(counts, totals, sys_len, ref_len)
}

/// BLEU from corpus statistics (sacrebleu's `compute_bleu` with `smooth_method='exp'`).
pub fn compute(counts: [usize; MAX_ORDER], totals: [usize; MAX_ORDER], sys_len: usize, ref_len: usize) -> Bleu {
    let bp = if sys_len >= ref_len {
        1.0
    } else if sys_len > 0 {
        (1.0 - ref_len as f64 / sys_len as f64).exp()
    } else {
        0.0
    };
    let mut precisions = [0.0; MAX_ORDER];
    let mut out = Bleu { score: 0.0, counts, totals, precisions, bp, sys_len, ref_len };
    if counts.iter().all(|&c| c == 0) {
        return out;
    }
    let mut smooth = 1.0;
    for n in 0..MAX_ORDER {
        if totals[n] == 0 {
            break;
        }
        precisions[n] = if counts[n] == 0 {
            smooth *= 2.0;
            100.0 / (smooth * totals[n] as f64)
        } else {
            100.0 * counts[n] as f64 / totals[n] as f64
        };
    }
    let mean_log = precisions.iter().map(|&p| floored_log(p)).sum::<f64>() / MAX_ORDER as f64;
    out.score = bp * mean_log.exp();
    out.precisions = precisions;
    out
}
