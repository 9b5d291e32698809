//! `pfxrun score`: the E2E NLG challenge's automatic metrics (BLEU, NIST, METEOR, ROUGE-L, CIDEr) for
//! generated text against multiple references, in pure Rust.
//!
//! ```no_run
//! let report = pfx_runtime::score::score_files("out/test.hyp".as_ref(), "data/test.refs".as_ref())?;
//! println!("{report}");
//! # anyhow::Ok(())
//! ```
//!
//! # Files (the E2E challenge's `measure_scores.py` plain-text formats)
//! - hypotheses: one a line (an empty line is an empty hypothesis); lines are trimmed; a leading BOM is
//!   dropped.
//! - references: groups of lines separated by blank lines, group `i` being the references of hypothesis
//!   `i`; several blank lines in a row count as one separator. A file with no blank line at all is
//!   single-reference: each line is the one reference of its hypothesis.
//!
//! # Metrics and scales
//! | field | definition | scale | agrees with |
//! |---|---|---|---|
//! | `bleu` | corpus BLEU-4, clipped by the max count in any reference, brevity penalty on the closest reference length, `exp` smoothing ([`bleu`]) | x100, as sacrebleu prints | `sacrebleu.corpus_bleu(tokenize='none')` (default options; `Tokenize::Tok13a` = `tokenize='13a'`) |
//! | `nist` | NIST-5 of mteval-v13a-sig.pl, the E2E official scorer ([`nist`]) | raw | mteval-v13a (NLTK's `corpus_nist` is a different definition: [`nist::corpus_nist_nltk`]) |
//! | `rouge_l` | sentence ROUGE-L F1 (LCS), best reference, corpus mean; rouge-score's tokenizer ([`rouge`]) | x100 | `rouge_score.RougeScorer(['rougeL']).score_multi` |
//! | `cider` | CIDEr-D: TF-IDF of 1..4-grams with document frequencies over the reference groups, gaussian length penalty sigma 6, clipping, x10 ([`cider`]) | raw | `pycocoevalcap.cider.Cider` |
//! | `meteor` | METEOR 1.0-style, exact + Porter-stem matching, no WordNet synonyms ([`meteor`], [`meteor::VARIANT`]) | x100 | NLTK `meteor_score` with WordNet switched off |
//!
//! BLEU, NIST, CIDEr and METEOR read the segments as tokens: by default split on whitespace, as E2E
//! text is already tokenized ([`ScoreOptions`] can apply sacrebleu's `13a` tokenizer and lowercasing
//! first; [`ScoreOptions::MTEVAL`] is the normalisation of the E2E scripts' mteval-v13a BLEU/NIST).
//! ROUGE-L always uses rouge-score's own tokenizer (lowercase, alphanumeric runs).
//!
//! Differences from the official E2E numbers: the E2E script runs METEOR 1.5 (with paraphrases; ours is
//! lower) and tokenizes CIDEr/ROUGE-L input with the PTB tokenizer (ours: whitespace / rouge-score);
//! with [`ScoreOptions::MTEVAL`] BLEU and NIST match its mteval-v13a numbers (checked in
//! `runtime/tests/score.rs` against `graphs/score/expected.json`).

pub mod bleu;
pub mod cider;
pub mod meteor;
pub mod nist;
pub mod porter;
pub mod rouge;
pub mod tokenize;

use std::fmt;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

/// How BLEU, NIST, CIDEr and METEOR turn a segment into tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Tokenize {
    /// Split on whitespace only (sacrebleu `tokenize='none'`): for pre-tokenized text such as E2E's.
    #[default]
    None,
    /// sacrebleu's default `13a` tokenizer (mteval-v13a's punctuation rules).
    Tok13a,
}

impl Tokenize {
    pub fn name(self) -> &'static str {
        match self {
            Tokenize::None => "none",
            Tokenize::Tok13a => "13a",
        }
    }
}

/// Options of [`score_with`]; the default is whitespace tokens, case-sensitive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScoreOptions {
    pub tokenize: Tokenize,
    /// Lowercase (Unicode) before tokenizing (sacrebleu `lowercase=True`).
    pub lowercase: bool,
}

impl ScoreOptions {
    /// mteval-v13a's normalisation (`13a` tokens, lowercased), i.e. the E2E scripts' BLEU and NIST.
    pub const MTEVAL: ScoreOptions = ScoreOptions { tokenize: Tokenize::Tok13a, lowercase: true };

    /// The tokens of one segment under these options.
    pub fn tokens(&self, segment: &str) -> Vec<String> {
        let lowered;
        let s = if self.lowercase {
            lowered = segment.to_lowercase();
            &lowered
        } else {
            segment
        };
        match self.tokenize {
            Tokenize::None => tokenize::split_py(s),
            Tokenize::Tok13a => tokenize::tokenize_13a(s.trim_end_matches(tokenize::is_py_space)),
        }
    }
}

/// Corpus scores of hypotheses against reference groups.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoreReport {
    /// Corpus BLEU-4, 0-100.
    pub bleu: f64,
    /// NIST-5 (mteval-v13a), raw.
    pub nist: f64,
    /// Mean best-reference ROUGE-L F1, 0-100.
    pub rouge_l: f64,
    /// CIDEr-D, raw (10 = every hypothesis equals all its references).
    pub cider: f64,
    /// Mean best-reference METEOR, 0-100 (see `meteor_variant`).
    pub meteor: f64,
    /// Number of hypotheses scored.
    pub n_hyp: usize,
    /// Exactly which METEOR this is.
    pub meteor_variant: &'static str,
    /// Tokenization used by BLEU, NIST, CIDEr and METEOR.
    pub options: ScoreOptions,
}

impl fmt::Display for ScoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tok =
            format!("tokenize={}{}", self.options.tokenize.name(), if self.options.lowercase { ", lc" } else { "" });
        writeln!(f, "{:<8} {:>8}  scale", "metric", "score")?;
        writeln!(f, "{:<8} {:>8.4}  0-100, corpus BLEU-4 as sacrebleu ({tok})", "BLEU", self.bleu)?;
        writeln!(f, "{:<8} {:>8.4}  raw, NIST-5 as mteval-v13a ({tok})", "NIST", self.nist)?;
        writeln!(f, "{:<8} {:>8.4}  0-100, exact+stem, no synonyms", "METEOR", self.meteor)?;
        writeln!(f, "{:<8} {:>8.4}  0-100, F1 as rouge-score", "ROUGE-L", self.rouge_l)?;
        writeln!(f, "{:<8} {:>8.4}  raw, CIDEr-D as coco-caption", "CIDEr", self.cider)?;
        // ends with a newline: the CLI prints the table with `print!`
        writeln!(f, "{} hypotheses; METEOR: {}", self.n_hyp, self.meteor_variant)
    }
}

/// Scores `hyps[i]` against the references `refs[i]`, with the default [`ScoreOptions`].
pub fn score(hyps: &[String], refs: &[Vec<String>]) -> Result<ScoreReport> {
    score_with(hyps, refs, ScoreOptions::default())
}

/// [`score`] with explicit tokenization options.
pub fn score_with(hyps: &[String], refs: &[Vec<String>], options: ScoreOptions) -> Result<ScoreReport> {
    ensure!(!hyps.is_empty(), "no hypotheses to score");
    ensure!(
        hyps.len() == refs.len(),
        "{} hypotheses but {} reference groups: each hypothesis needs one group",
        hyps.len(),
        refs.len()
    );
    if let Some(i) = refs.iter().position(Vec::is_empty) {
        bail!("reference group {} (of hypothesis {}) is empty", i + 1, i + 1);
    }
    let hyp_tokens: Vec<Vec<String>> = hyps.iter().map(|h| options.tokens(h)).collect();
    let ref_tokens: Vec<Vec<Vec<String>>> =
        refs.iter().map(|g| g.iter().map(|r| options.tokens(r)).collect()).collect();
    Ok(ScoreReport {
        bleu: bleu::corpus_bleu(&hyp_tokens, &ref_tokens).score,
        nist: nist::corpus_nist(&hyp_tokens, &ref_tokens),
        rouge_l: 100.0 * rouge::corpus_rouge_l(hyps, refs),
        cider: cider::corpus_cider(&hyp_tokens, &ref_tokens),
        meteor: 100.0 * meteor::corpus_meteor(&hyp_tokens, &ref_tokens),
        n_hyp: hyps.len(),
        meteor_variant: meteor::VARIANT,
        options,
    })
}

/// Scores the hypothesis file against the reference file (formats in the module docs).
pub fn score_files(hyp: &Path, refs: &Path) -> Result<ScoreReport> {
    score_files_with(hyp, refs, ScoreOptions::default())
}

/// [`score_files`] with explicit tokenization options.
pub fn score_files_with(hyp: &Path, refs: &Path, options: ScoreOptions) -> Result<ScoreReport> {
    let hyps = read_hyp_file(hyp)?;
    let mut groups = read_refs_file(refs)?;
    let one_per_line = groups.iter().all(|g| g.len() == 1);
    if hyps.len() == 1 && groups.len() > 1 && one_per_line {
        // One hypothesis: every line is one of its references (`generate --refs-out` of one source).
        groups = vec![groups.into_iter().flatten().collect()];
    }
    ensure!(
        hyps.len() == groups.len(),
        "{} has {} hypotheses but {} has {} reference groups ({}; group i belongs to hypothesis i)",
        hyp.display(),
        hyps.len(),
        refs.display(),
        groups.len(),
        if one_per_line {
            "it has no blank line, so each line was read as the one reference of a hypothesis"
        } else {
            "groups are separated by blank lines"
        }
    );
    score_with(&hyps, &groups, options).with_context(|| format!("scoring {} against {}", hyp.display(), refs.display()))
}

fn read_text(path: &Path, what: &str) -> Result<String> {
    crate::data::read_text(path, &format!("{what} file"))
}

/// The hypotheses of a file: one a line, trimmed (a final newline does not start another hypothesis).
pub fn read_hyp_file(path: &Path) -> Result<Vec<String>> {
    let text = read_text(path, "hypothesis")?;
    ensure!(!text.is_empty(), "hypothesis file {} is empty", path.display());
    Ok(text.lines().map(|l| l.trim().to_owned()).collect())
}

/// The reference groups of a file: blank-line separated groups, or one reference a line if the file has
/// no blank line at all.
pub fn read_refs_file(path: &Path) -> Result<Vec<Vec<String>>> {
    let text = read_text(path, "reference")?;
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    ensure!(lines.iter().any(|l| !l.is_empty()), "reference file {} has no references", path.display());
    let body = &lines[..lines.iter().rposition(|l| !l.is_empty()).map_or(0, |i| i + 1)];
    if !body.iter().any(|l| l.is_empty()) {
        return Ok(body.iter().map(|l| vec![l.to_string()]).collect());
    }
    let mut groups: Vec<Vec<String>> = vec![];
    let mut open = false;
    for l in body {
        if l.is_empty() {
            open = false;
        } else if open {
            groups.last_mut().expect("an open group").push(l.to_string());
        } else {
            groups.push(vec![l.to_string()]);
            open = true;
        }
    }
    Ok(groups)
}
