//! ROUGE-L as rouge-score 0.1.2's `RougeScorer(['rougeL']).score_multi` computes it, averaged over the
//! corpus.
//!
//! Tokens: [`rouge_tokens`](super::tokenize::rouge_tokens) (lowercase; runs of `[a-z0-9]`; no stemming).
//! Per (hypothesis, reference): `P = LCS/|hyp|`, `R = LCS/|ref|`, `F = 2PR/(P+R)` (0 if either side has
//! no token or nothing matches). Per hypothesis: the largest F over its references. Corpus: the mean,
//! reported x100 by [`score`](super::score).

/// Length of the longest common subsequence (two-row dynamic programme).
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y { prev[j] + 1 } else { cur[j].max(prev[j + 1]) };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Sentence-level ROUGE-L F-measure (0-1) of tokenized `hyp` against one tokenized reference.
pub fn rouge_l_f(hyp: &[String], reference: &[String]) -> f64 {
    if hyp.is_empty() || reference.is_empty() {
        return 0.0;
    }
    let lcs = lcs_len(reference, hyp) as f64;
    let p = lcs / hyp.len() as f64;
    let r = lcs / reference.len() as f64;
    if p + r > 0.0 {
        2.0 * p * r / (p + r)
    } else {
        0.0
    }
}

/// Mean over the corpus of the best ROUGE-L F-measure over each hypothesis' references (0-1), on raw
/// text (tokenized here with rouge-score's tokenizer).
pub fn corpus_rouge_l(hyps: &[String], refs: &[Vec<String>]) -> f64 {
    assert_eq!(hyps.len(), refs.len(), "one reference group per hypothesis");
    if hyps.is_empty() {
        return 0.0;
    }
    let total: f64 = hyps
        .iter()
        .zip(refs)
        .map(|(h, group)| {
            let h = super::tokenize::rouge_tokens(h);
            group.iter().map(|r| rouge_l_f(&h, &super::tokenize::rouge_tokens(r))).fold(0.0, f64::max)
        })
        .sum();
    total / hyps.len() as f64
}
