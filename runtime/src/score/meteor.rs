//! METEOR without WordNet: NLTK 3.x's `meteor_score` (METEOR 1.0 of Lavie & Agarwal 2007, parameters
//! alpha 0.9, beta 3, gamma 0.5) with its synonym stage switched off, i.e. exact and Porter-stem
//! matching only. Not METEOR 1.5 (the Java jar the E2E scripts run, with paraphrase tables): expect
//! lower numbers than published E2E METEOR.
//!
//! Per (hypothesis, reference), tokens lowercased:
//! 1. exact stage: walk the hypothesis from its last word to its first; each word takes the last
//!    still-free reference position holding the same word;
//! 2. stem stage: the same on the Porter stems ([`super::porter::stem`]) of the words
//!    left over;
//! 3. `m` matches, sorted by hypothesis position; `ch` chunks = runs adjacent in both sentences;
//!    `P = m/|hyp|`, `R = m/|ref|`, `Fmean = P R / (alpha P + (1 - alpha) R)`,
//!    `score = Fmean (1 - gamma (ch/m)^beta)`; 0 if nothing matches.
//!
//! Per hypothesis the best reference counts; the corpus score is the mean (x100 in the report).

use super::porter;
use super::tokenize::FastMap;

pub const ALPHA: f64 = 0.9;
pub const BETA: f64 = 3.0;
pub const GAMMA: f64 = 0.5;

/// What [`super::ScoreReport::meteor_variant`] says.
pub const VARIANT: &str = "METEOR 1.0-style as NLTK meteor_score (alpha 0.9, beta 3, gamma 0.5): lowercased, \
                           exact + Porter-stem matching, no WordNet synonyms, best reference";

/// One greedy matching stage over the still-unmatched (position, word) lists; returns the matched
/// (hyp position, ref position) pairs and removes them from both lists.
fn match_stage(hyp: &mut Vec<(usize, String)>, reference: &mut Vec<(usize, String)>) -> Vec<(usize, usize)> {
    let mut free: FastMap<&str, Vec<usize>> = FastMap::default();
    for (j, (_, w)) in reference.iter().enumerate() {
        free.entry(w.as_str()).or_default().push(j);
    }
    let mut pairs = Vec::new();
    let mut used_h = vec![false; hyp.len()];
    let mut used_r = vec![false; reference.len()];
    for i in (0..hyp.len()).rev() {
        if let Some(j) = free.get_mut(hyp[i].1.as_str()).and_then(Vec::pop) {
            used_h[i] = true;
            used_r[j] = true;
            pairs.push((hyp[i].0, reference[j].0));
        }
    }
    // `retain` visits the elements in order
    let mut used = used_h.into_iter();
    hyp.retain(|_| !used.next().unwrap_or(false));
    let mut used = used_r.into_iter();
    reference.retain(|_| !used.next().unwrap_or(false));
    pairs
}

/// Sentence METEOR (0-1) of tokenized `hyp` against one tokenized reference.
pub fn meteor_single(hyp: &[String], reference: &[String]) -> f64 {
    let lower = |s: &[String]| s.iter().map(|w| w.to_lowercase()).enumerate().collect::<Vec<_>>();
    let (mut h, mut r) = (lower(hyp), lower(reference));
    let mut matches = match_stage(&mut h, &mut r);
    let stem_all = |v: &mut Vec<(usize, String)>| v.iter_mut().for_each(|(_, w)| *w = porter::stem(w));
    stem_all(&mut h);
    stem_all(&mut r);
    matches.extend(match_stage(&mut h, &mut r));
    let m = matches.len();
    if m == 0 {
        return 0.0;
    }
    matches.sort_unstable();
    let chunks = 1 + matches.windows(2).filter(|p| !(p[1].0 == p[0].0 + 1 && p[1].1 == p[0].1 + 1)).count();
    let p = m as f64 / hyp.len() as f64;
    let rc = m as f64 / reference.len() as f64;
    let fmean = p * rc / (ALPHA * p + (1.0 - ALPHA) * rc);
    let penalty = GAMMA * (chunks as f64 / m as f64).powf(BETA);
    (1.0 - penalty) * fmean
}

/// Best sentence METEOR over the references (0-1).
pub fn meteor(hyp: &[String], refs: &[Vec<String>]) -> f64 {
    refs.iter().map(|r| meteor_single(hyp, r)).fold(0.0, f64::max)
}

/// Mean over the corpus of [`meteor`] (0-1).
pub fn corpus_meteor(hyps: &[Vec<String>], refs: &[Vec<Vec<String>>]) -> f64 {
    assert_eq!(hyps.len(), refs.len(), "one reference group per hypothesis");
    if hyps.is_empty() {
        return 0.0;
    }
    hyps.iter().zip(refs).map(|(h, g)| meteor(h, g)).sum::<f64>() / hyps.len() as f64
}
