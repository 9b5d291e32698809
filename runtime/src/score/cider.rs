//! CIDEr-D as coco-caption's `pycocoevalcap.cider` (the E2E scripts' copy) computes it: n = 1..4,
//! sigma = 6, clipped TF-IDF, x10, on the segments' tokens.
//!
//! ```text
//! df(g)   = number of segments whose references (any of them) contain n-gram g
//! w(g)    = tf(g) * (ln N - ln max(1, df(g)))          N = number of segments; tf = raw count
//! sim_n   = sum_{g in hyp, |g|=n} min(w_h(g), w_r(g)) * w_r(g) / (|w_h|_n |w_r|_n)   (no division if a norm is 0)
//!           * exp(-(l_h - l_r)^2 / (2 sigma^2))
//! segment = 10 * mean_n ( sum over references of sim_n / number of references )
//! CIDEr-D = mean over segments (raw, not x100; 10 for a corpus of exact copies)
//! ```
//!
//! coco-caption's length `l` is, by an off-by-one in its code, the number of *bigrams* of the sentence
//! (max(len - 1, 0)), not of words; it is kept here so the numbers agree.

use super::tokenize::{ngram_counts, FastMap, FastSet};

pub const MAX_ORDER: usize = 4;
pub const SIGMA: f64 = 6.0;

struct Vector<'a> {
    w: FastMap<&'a [String], f64>,
    norm: [f64; MAX_ORDER],
    len: usize,
}

fn vector<'a>(tokens: &'a [String], df: &FastMap<&[String], usize>, log_n: f64) -> Vector<'a> {
    let mut w = FastMap::default();
    let mut sq = [0.0f64; MAX_ORDER];
    for (g, tf) in ngram_counts(tokens, 1, MAX_ORDER) {
        let d = (df.get(g).copied().unwrap_or(0).max(1) as f64).ln();
        let v = tf as f64 * (log_n - d);
        sq[g.len() - 1] += v * v;
        w.insert(g, v);
    }
    Vector { w, norm: sq.map(f64::sqrt), len: tokens.len().saturating_sub(1) }
}

/// Per-order similarities of a hypothesis vector to one reference vector, with the length penalty.
fn sim(h: &Vector, r: &Vector) -> [f64; MAX_ORDER] {
    let delta = h.len as f64 - r.len as f64;
    let penalty = (-(delta * delta) / (2.0 * SIGMA * SIGMA)).exp();
    let mut val = [0.0f64; MAX_ORDER];
    for (g, &vh) in &h.w {
        if let Some(&vr) = r.w.get(g) {
            val[g.len() - 1] += vh.min(vr) * vr;
        }
    }
    for ((v, nh), nr) in val.iter_mut().zip(h.norm).zip(r.norm) {
        if nh != 0.0 && nr != 0.0 {
            *v /= nh * nr;
        }
        *v *= penalty;
    }
    val
}

/// CIDEr-D of each segment (raw; the corpus score is their mean).
pub fn segment_cider(hyps: &[Vec<String>], refs: &[Vec<Vec<String>>]) -> Vec<f64> {
    assert_eq!(hyps.len(), refs.len(), "one reference group per hypothesis");
    let mut df: FastMap<&[String], usize> = FastMap::default();
    for group in refs {
        let seen: FastSet<&[String]> = group.iter().flat_map(|r| ngram_counts(r, 1, MAX_ORDER).into_keys()).collect();
        for g in seen {
            *df.entry(g).or_insert(0) += 1;
        }
    }
    let log_n = (refs.len() as f64).ln();
    hyps.iter()
        .zip(refs)
        .map(|(hyp, group)| {
            let h = vector(hyp, &df, log_n);
            let mut acc = [0.0f64; MAX_ORDER];
            for r in group {
                let s = sim(&h, &vector(r, &df, log_n));
                for n in 0..MAX_ORDER {
                    acc[n] += s[n];
                }
            }
            let mean = acc.iter().sum::<f64>() / MAX_ORDER as f64;
            10.0 * mean / group.len() as f64
        })
        .collect()
}

/// Corpus CIDEr-D: the mean of [`segment_cider`].
pub fn corpus_cider(hyps: &[Vec<String>], refs: &[Vec<Vec<String>>]) -> f64 {
    let s = segment_cider(hyps, refs);
    if s.is_empty() {
        0.0
    } else {
        s.iter().sum::<f64>() / s.len() as f64
    }
}
