//! NIST-5, two definitions.
//!
//! [`corpus_nist`] is what the E2E challenge reports: mteval-v13a-sig.pl (the official scorer that
//! tuetschek/e2e-metrics runs), on the segments' tokens.
//!
//! ```text
//! info(w1..wn) = log2( count(w1..wn-1) / count(w1..wn) )    counts over every reference of the corpus;
//!                                                          for n = 1 the numerator is the number of
//!                                                          reference words
//! per segment, n = 1..5: info_n  += sum over hyp n-grams g of info(g) * min(count_hyp(g), max_ref count_ref(g))
//!                        hyp_n   += max(|hyp| - n + 1, 0)
//! NIST = sum_n info_n / max(hyp_n, 1) * LP(hyp_1 / Lref)
//! Lref = (words in all references) / (non-empty references per segment, averaged over segments)
//! LP(x) = 1 if x >= 1, 0 if x <= 0, else exp(-beta ln(x)^2), beta = -ln(0.5) / ln(1.5)^2
//! ```
//!
//! mteval's own quirk is kept: an n-gram whose (n-1)-gram prefix is the single token `0` takes the
//! number of reference words as numerator (Perl reads the string "0" as false).
//!
//! [`corpus_nist_nltk`] is NLTK 3.x's `nltk.translate.nist_score.corpus_nist(n=5)`, which differs: no
//! clipping against the maximum over references but a best single reference per hypothesis and order
//! (largest `(precision, numerator, denominator, ref_len)`), and a length penalty on the lengths of
//! those chosen references. NLTK divides by zero when no hypothesis has n words for some n; here that
//! order contributes 0.

use super::tokenize::{ngram_counts, FastMap};
use std::cmp::Ordering;

pub const MAX_ORDER: usize = 5;

fn beta() -> f64 {
    -(0.5f64.ln()) / 1.5f64.ln().powi(2)
}

/// mteval-v13a's NIST length penalty of `ratio` = system words / average reference words.
pub fn length_penalty(ratio: f64) -> f64 {
    if ratio >= 1.0 {
        1.0
    } else if ratio <= 0.0 {
        0.0
    } else {
        (-beta() * ratio.ln().powi(2)).exp()
    }
}

/// Information weights of every reference n-gram (n <= 5), mteval-v13a's `compute_ngram_info`.
fn information(refs: &[Vec<Vec<String>>]) -> FastMap<&[String], f64> {
    let mut counts: FastMap<&[String], usize> = FastMap::default();
    let mut words = 0usize;
    for r in refs.iter().flatten() {
        words += r.len();
        for (g, c) in ngram_counts(r, 1, MAX_ORDER) {
            *counts.entry(g).or_insert(0) += c;
        }
    }
    counts
        .iter()
        .map(|(&g, &c)| {
            let prefix = &g[..g.len() - 1];
            let num = if prefix.is_empty() || (prefix.len() == 1 && prefix[0] == "0") { words } else { counts[prefix] };
            (g, (num as f64 / c as f64).log2())
        })
        .collect()
}

/// Corpus NIST-5 as mteval-v13a-sig.pl computes it (the E2E challenge's NIST).
pub fn corpus_nist(hyps: &[Vec<String>], refs: &[Vec<Vec<String>>]) -> f64 {
    assert_eq!(hyps.len(), refs.len(), "one reference group per hypothesis");
    if hyps.is_empty() {
        return 0.0;
    }
    let info = information(refs);
    let mut info_sum = [0.0f64; MAX_ORDER];
    let mut hyp_count = [0usize; MAX_ORDER];
    let (mut ref_words, mut nonempty_refs) = (0usize, 0usize);
    for (hyp, group) in hyps.iter().zip(refs) {
        let mut ref_max: FastMap<&[String], usize> = FastMap::default();
        for r in group {
            ref_words += r.len();
            nonempty_refs += usize::from(!r.is_empty());
            for (g, c) in ngram_counts(r, 1, MAX_ORDER) {
                let e = ref_max.entry(g).or_insert(0);
                *e = (*e).max(c);
            }
        }
        for (n, cnt) in hyp_count.iter_mut().enumerate() {
            *cnt += (hyp.len() + 1).saturating_sub(n + 1);
        }
        for (g, c) in ngram_counts(hyp, 1, MAX_ORDER) {
            if let Some(&m) = ref_max.get(g) {
                info_sum[g.len() - 1] += info[g] * c.min(m) as f64;
            }
        }
    }
    let score: f64 = (0..MAX_ORDER).map(|n| info_sum[n] / hyp_count[n].max(1) as f64).sum();
    let refs_per_segment = nonempty_refs as f64 / hyps.len() as f64;
    let avg_ref_words = ref_words as f64 / refs_per_segment;
    score * length_penalty(hyp_count[0] as f64 / avg_ref_words)
}

/// Corpus NIST-5 as NLTK's `corpus_nist(list_of_references, hypotheses, n=5)` computes it.
pub fn corpus_nist_nltk(hyps: &[Vec<String>], refs: &[Vec<Vec<String>>]) -> f64 {
    assert_eq!(hyps.len(), refs.len(), "one reference group per hypothesis");
    let mut freq: FastMap<&[String], usize> = FastMap::default();
    let mut words = 0usize;
    for r in refs.iter().flatten() {
        words += r.len();
        for (g, c) in ngram_counts(r, 1, MAX_ORDER) {
            *freq.entry(g).or_insert(0) += c;
        }
    }
    let weight = |g: &[String]| -> f64 {
        let prefix = &g[..g.len() - 1];
        let num = match freq.get(prefix) {
            Some(&c) if !prefix.is_empty() => c,
            _ => words,
        };
        (num as f64 / freq[g] as f64).log2()
    };
    let mut precision_sum = 0.0;
    let (mut l_ref, mut l_sys) = (0usize, 0usize);
    for n in 1..=MAX_ORDER {
        let (mut num_n, mut den_n) = (0.0f64, 0usize);
        for (hyp, group) in hyps.iter().zip(refs) {
            let hyp_ngrams = ngram_counts(hyp, n, n);
            let den: usize = hyp_ngrams.values().sum();
            // (precision, numerator, denominator, ref_len) of the best reference, compared as a tuple
            let mut best: Option<(f64, f64, usize, usize)> = None;
            for r in group {
                let ref_ngrams = ngram_counts(r, n, n);
                let num: f64 = hyp_ngrams
                    .iter()
                    .filter_map(|(g, &c)| ref_ngrams.get(g).map(|&rc| weight(g) * c.min(rc) as f64))
                    .sum();
                let precision = if den == 0 { 0.0 } else { num / den as f64 };
                let cand = (precision, num, den, r.len());
                let better = best.is_none_or(|b| match (cand.0, cand.1).partial_cmp(&(b.0, b.1)) {
                    Some(Ordering::Greater) => true,
                    Some(Ordering::Equal) => (cand.2, cand.3) > (b.2, b.3),
                    _ => false,
                });
                if better {
                    best = Some(cand);
                }
            }
            if let Some((_, num, den, rl)) = best {
                num_n += num;
                den_n += den;
                l_ref += rl;
            }
            l_sys += hyp.len();
        }
        if den_n > 0 {
            precision_sum += num_n / den_n as f64;
        }
    }
    if l_ref == 0 {
        return 0.0;
    }
    let ratio = l_sys as f64 / l_ref as f64;
    let lp = if 0.0 < ratio && ratio < 1.0 {
        // NLTK: beta = ln(0.5) / ln(1.5)^2 and exp(beta * ln(ratio)^2): the same curve as mteval's
        (-beta() * ratio.ln().powi(2)).exp()
    } else {
        ratio.clamp(0.0, 1.0)
    };
    precision_sum * lp
}
