//! `pfx_runtime::score` against the reference packages' numbers in `graphs/score/expected.json`
//! (made by `graphs/score/make_score_refs.py`: sacrebleu, rouge-score, NLTK, pycocoevalcap and the E2E
//! challenge's mteval-v13a-sig.pl), plus sanity checks worked out by hand.

use std::path::{Path, PathBuf};

use pfx_runtime::score::{
    self, bleu, cider, meteor, nist, porter, rouge, score_files, score_files_with, ScoreOptions, Tokenize,
};
use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/score")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(dir().join("expected.json")).expect("graphs/score/expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

fn close(what: &str, ours: f64, theirs: f64, tol: f64) {
    assert!((ours - theirs).abs() <= tol, "{what}: ours {ours} vs package {theirs} (tolerance {tol})");
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect()
}

fn ws(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

fn toks(hyps: &[String], refs: &[Vec<String>], o: ScoreOptions) -> (Vec<Vec<String>>, Vec<Vec<Vec<String>>>) {
    (hyps.iter().map(|h| o.tokens(h)).collect(), refs.iter().map(|g| g.iter().map(|r| o.tokens(r)).collect()).collect())
}

const BLEU_13A: ScoreOptions = ScoreOptions { tokenize: Tokenize::Tok13a, lowercase: false };

/// Every package number of one corpus (the sample or a hand case) against ours.
fn check_corpus(name: &str, hyps: &[String], refs: &[Vec<String>], exp: &Value) {
    let f = |k: &str| exp[k].as_f64().unwrap_or_else(|| panic!("{name}: no {k}"));
    let default = score::score(hyps, refs).unwrap();
    close(&format!("{name} BLEU (sacrebleu tokenize=none)"), default.bleu, f("bleu"), 0.01);
    close(&format!("{name} ROUGE-L (rouge-score)"), default.rouge_l, f("rouge_l"), 0.01);
    close(&format!("{name} CIDEr-D (pycocoevalcap)"), default.cider, f("cider"), 1e-6);
    close(&format!("{name} METEOR (NLTK, no WordNet)"), default.meteor, f("meteor_nltk_nosyn"), 1e-6);
    let b13 = score::score_with(hyps, refs, BLEU_13A).unwrap();
    close(&format!("{name} BLEU (sacrebleu 13a)"), b13.bleu, f("bleu_13a"), 0.01);
    let mt = score::score_with(hyps, refs, ScoreOptions::MTEVAL).unwrap();
    close(&format!("{name} BLEU (sacrebleu 13a lowercase)"), mt.bleu, f("bleu_13a_lc"), 0.01);
    // mteval prints 4 decimals (BLEU on 0-1, so 0.005 once x100)
    close(&format!("{name} NIST (mteval-v13a)"), mt.nist, f("mteval_nist"), 0.01);
    if let Some(theirs) = exp["nist_nltk"].as_f64() {
        let (h, r) = toks(hyps, refs, ScoreOptions::default());
        close(&format!("{name} NIST (NLTK corpus_nist)"), nist::corpus_nist_nltk(&h, &r), theirs, 1e-6);
    }
}

#[test]
fn e2e_sample_matches_packages() {
    let exp = expected();
    let sample = &exp["sample"];
    let report = score_files(&dir().join("sample.hyp"), &dir().join("sample.refs")).unwrap();
    assert_eq!(report.n_hyp as u64, sample["n_hyp"].as_u64().unwrap());
    let hyps = score::read_hyp_file(&dir().join("sample.hyp")).unwrap();
    let refs = score::read_refs_file(&dir().join("sample.refs")).unwrap();
    check_corpus("sample", &hyps, &refs, sample);
    // the official E2E BLEU (mteval-v13a) agrees with sacrebleu's 13a+lowercase on this corpus
    let mt = score_files_with(&dir().join("sample.hyp"), &dir().join("sample.refs"), ScoreOptions::MTEVAL).unwrap();
    close("sample BLEU (mteval-v13a)", mt.bleu, sample["mteval_bleu"].as_f64().unwrap(), 0.01);
    eprintln!("{report}");
}

#[test]
fn hand_cases_match_packages() {
    let exp = expected();
    for case in exp["hand_cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let hyps = strings(&case["hyps"]);
        let refs: Vec<Vec<String>> = case["refs"].as_array().unwrap().iter().map(strings).collect();
        check_corpus(name, &hyps, &refs, case);
    }
}

#[test]
fn identical_and_disjoint() {
    let hyps = vec!["the cat sat on the mat".to_owned(), "a dog ran in the park today".to_owned()];
    let refs: Vec<Vec<String>> = hyps.iter().map(|h| vec![h.clone()]).collect();
    let r = score::score(&hyps, &refs).unwrap();
    close("identical BLEU", r.bleu, 100.0, 1e-9);
    close("identical ROUGE-L", r.rouge_l, 100.0, 1e-9);
    // no shared n-gram between the two segments, every order present: every cosine is 1
    close("identical CIDEr-D", r.cider, 10.0, 1e-9);
    // 1 chunk of 6 (7) matches: 1 - 0.5 (1/6)^3 and 1 - 0.5 (1/7)^3
    close("identical METEOR", r.meteor, 100.0 * (2.0 - 0.5 / 216.0 - 0.5 / 343.0) / 2.0, 1e-9);

    let d = score::score(&["red green blue yellow".to_owned()], &[vec!["one two three four".to_owned()]]).unwrap();
    for (what, v) in
        [("BLEU", d.bleu), ("NIST", d.nist), ("ROUGE-L", d.rouge_l), ("CIDEr", d.cider), ("METEOR", d.meteor)]
    {
        assert_eq!(v, 0.0, "disjoint {what}");
    }
}

#[test]
fn porter_matches_nltk_on_e2e_vocabulary() {
    let text = std::fs::read_to_string(dir().join("porter_nltk.tsv")).unwrap();
    let mut bad = vec![];
    let mut n = 0;
    for line in text.lines() {
        let (word, want) = line.split_once('\t').unwrap();
        n += 1;
        let got = porter::stem(word);
        if got != want {
            bad.push(format!("{word}: ours {got}, NLTK {want}"));
        }
    }
    assert!(n > 1000, "{n} words");
    assert!(bad.is_empty(), "{} of {n} stems differ:\n{}", bad.len(), bad.join("\n"));
}

#[test]
fn meteor_by_hand() {
    // hyp "the cat sat on the mat", ref "on the mat sat the cat": the exact stage walks the hypothesis
    // backwards, each word taking the last free equal reference word: mat->2, the->4, on->0, sat->3,
    // cat->5, the->1. Sorted by hypothesis position: (0,1) (1,5) (2,3) (3,0) (4,4) (5,2), no two adjacent
    // in both: 6 chunks, 6 matches. P = R = 1, Fmean = 1, penalty = 0.5 (6/6)^3 = 0.5 -> 0.5.
    let m = meteor::meteor_single(&ws("the cat sat on the mat"), &ws("on the mat sat the cat"));
    close("METEOR reordered", m, 0.5, 1e-12);
    // hyp "the Cats sat", ref "the cat sat on the mat": exact: sat->2, the->4 (the last free "the");
    // stem stage: cats -> cat -> 1. Matches (0,4) (1,1) (2,2): 2 chunks. P = 1, R = 3/6,
    // Fmean = 0.5 / (0.9 + 0.05) = 10/19, penalty 0.5 (2/3)^3 = 4/27: (23/27)(10/19) = 230/513.
    let m = meteor::meteor_single(&ws("the Cats sat"), &ws("the cat sat on the mat"));
    close("METEOR stem", m, 230.0 / 513.0, 1e-12);
    // best reference wins
    let best = meteor::meteor(&ws("the Cats sat"), &[ws("dogs"), ws("the cat sat on the mat")]);
    close("METEOR best ref", best, 230.0 / 513.0, 1e-12);
    assert_eq!(meteor::meteor_single(&[], &ws("a b")), 0.0);
}

#[test]
fn cider_by_hand() {
    // Two segments, N = 2, every n-gram in one group only (df 1) or none (df 0 -> max(1, 0) = 1): every
    // weight is tf * ln 2. Segment 1, "a b" vs "a b": unigram cosine 1, bigram cosine 1, no 3/4-grams
    // (norm 0 -> 0), same length: 10 * (1 + 1 + 0 + 0) / 4 = 5. Segment 2, "c d" vs "c e": unigram
    // cosine (ln2)^2 / (sqrt2 ln2)^2 = 1/2, nothing else: 10 * 0.5 / 4 = 1.25. Corpus: 3.125.
    let hyps = vec![ws("a b"), ws("c d")];
    let refs = vec![vec![ws("a b")], vec![ws("c e")]];
    let seg = cider::segment_cider(&hyps, &refs);
    close("CIDEr seg 1", seg[0], 5.0, 1e-12);
    close("CIDEr seg 2", seg[1], 1.25, 1e-12);
    close("CIDEr corpus", cider::corpus_cider(&hyps, &refs), 3.125, 1e-12);
    // Length penalty: "a b" against "a b x y" in a corpus where "x", "y" and their n-grams make no
    // difference to "a b": coco's length is the bigram count (1 vs 3), penalty exp(-4/72).
    let refs2 = vec![vec![ws("a b x y")], vec![ws("c e")]];
    let s = cider::segment_cider(&hyps, &refs2)[0];
    let (uni, bi) = (2.0 / (2f64.sqrt() * 4f64.sqrt()), 1.0 / 3f64.sqrt());
    close("CIDEr length penalty", s, 10.0 * (uni + bi) / 4.0 * (-4.0f64 / 72.0).exp(), 1e-12);
}

#[test]
fn metrics_fall_as_the_hypothesis_gets_worse() {
    let refs = vec![
        vec![
            "Blue Spice is a coffee shop in the city centre .".to_owned(),
            "Blue Spice is a cafe in the centre .".to_owned(),
        ],
        vec!["The Vaults is a cheap pub near Café Adriatic .".to_owned()],
        vec!["Cotto serves Italian food at high prices .".to_owned()],
    ];
    let ladder = [
        [
            "Blue Spice is a coffee shop in the city centre .",
            "The Vaults is a cheap pub near Café Adriatic .",
            "Cotto serves Italian food at high prices .",
        ],
        [
            "Blue Spice is a coffee shop in the city centre .",
            "The Vaults is a cheap pub near Café Adriatic .",
            "Cotto serves Italian food at low prices .",
        ],
        [
            "Blue Spice is a coffee shop in the riverside area .",
            "The Vaults is a cheap pub near Café Adriatic .",
            "Cotto serves Italian food at low prices .",
        ],
        [
            "Blue Spice is a pub in the riverside area .",
            "The Vaults is an expensive pub near Café Sicilia .",
            "Cotto serves French food at low prices .",
        ],
        ["Blue Spice is a pub .", "The Vaults is an expensive restaurant .", "Cotto serves French food ."],
    ];
    let reports: Vec<_> = ladder
        .iter()
        .map(|h| score::score(&h.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &refs).unwrap())
        .collect();
    for w in reports.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        for (what, x, y) in [
            ("BLEU", a.bleu, b.bleu),
            ("NIST", a.nist, b.nist),
            ("ROUGE-L", a.rouge_l, b.rouge_l),
            ("CIDEr", a.cider, b.cider),
            ("METEOR", a.meteor, b.meteor),
        ] {
            assert!(x > y, "{what} should fall: {x} then {y}");
        }
    }
    close("top BLEU", reports[0].bleu, 100.0, 1e-9);
}

#[test]
fn bleu_and_rouge_pieces() {
    assert_eq!(bleu::closest_ref_len(7, [11, 8]), 8);
    assert_eq!(bleu::closest_ref_len(7, [8, 6]), 6);
    assert_eq!(bleu::closest_ref_len(7, [6, 7]), 7);
    assert_eq!(rouge::lcs_len(&ws("a b c d e"), &ws("x b d e y")), 3);
    // 13a splits the punctuation that pre-tokenized E2E text leaves attached ("£20-25")
    assert_eq!(ScoreOptions::MTEVAL.tokens("Prices £20-25, Café."), ["prices", "£20", "-", "25", ",", "café", "."]);
}

fn write_tmp(name: &str, text: &str) -> PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pfx-score-test");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn file_formats_and_errors() {
    // multi-reference groups; several blank lines are one separator; trailing blank lines ignored
    let hyp = write_tmp("a.hyp", "a b c\n\nd e f\n");
    let refs = write_tmp("a.refs", "a b c\na b d\n\n\n\n\nx y\n\nd e f\n\n");
    let groups = score::read_refs_file(&refs).unwrap();
    assert_eq!(groups, vec![vec!["a b c", "a b d"], vec!["x y"], vec!["d e f"]]);
    let hyps = score::read_hyp_file(&hyp).unwrap();
    assert_eq!(hyps, ["a b c", "", "d e f"]);
    let r = score_files(&hyp, &refs).unwrap();
    assert_eq!(r.n_hyp, 3);
    let shown = r.to_string();
    for word in ["BLEU", "NIST", "METEOR", "ROUGE-L", "CIDEr", "3 hypotheses", "no WordNet"] {
        assert!(shown.contains(word), "{word} missing from:\n{shown}");
    }
    // no blank line at all: one reference per line
    let single = write_tmp("b.refs", "a b c\nx y\nd e f\n");
    assert_eq!(score::read_refs_file(&single).unwrap().len(), 3);
    assert!(score_files(&hyp, &single).is_ok());

    // count mismatch names both files and both counts
    let short = write_tmp("c.refs", "a b c\n\nd e f\n");
    let err = format!("{:#}", score_files(&hyp, &short).unwrap_err());
    for part in ["a.hyp", "c.refs", "3 hypotheses", "2 reference groups"] {
        assert!(err.contains(part), "{part} missing from: {err}");
    }
    let empty = write_tmp("d.hyp", "");
    let err = format!("{:#}", score_files(&empty, &refs).unwrap_err());
    assert!(err.contains("d.hyp") && err.contains("empty"), "{err}");
    let blank = write_tmp("e.refs", "\n\n");
    let err = format!("{:#}", score_files(&hyp, &blank).unwrap_err());
    assert!(err.contains("e.refs") && err.contains("no references"), "{err}");
    let err = format!("{:#}", score_files(&hyp, Path::new("/nonexistent/x.refs")).unwrap_err());
    assert!(err.contains("x.refs"), "{err}");

    // the in-memory API
    assert!(score::score(&[], &[]).is_err());
    let err = score::score(&["a".into()], &[vec![]]).unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");
    let err = score::score(&["a".into(), "b".into()], &[vec!["a".into()]]).unwrap_err().to_string();
    assert!(err.contains("2 hypotheses") && err.contains("1 reference groups"), "{err}");
}
