//! BART generation equals the references of `graphs/bart-ref/make_bart_generation_references.py` (PEFT's
//! forward for `peft`, the script's prefixed attention for `paper`, both recomputing the whole target at every
//! step, without a cache): greedy and beam tokens with the prefix, the bare model's with `no_prefix`, on both
//! fixtures (deeper encoder, deeper decoder), with and without the MLP, on tract and ONNX Runtime; baked graphs
//! too.

mod common;

use common::backends;

use std::collections::BTreeMap;
use std::path::PathBuf;

use pfx_compiler::compile::bart::{compile_bart, read_bart_spec, BartPrefix};
use pfx_compiler::compile::bart_generate::BartGenShape;
use pfx_runtime::bundle::Bundle;
use pfx_runtime::generate::GenConfig;
use pfx_runtime::seq2seq::Seq2SeqGenerator;
use pfx_runtime::{BackendKind, HostTensor, OrtOptions};

use common::BART_FIXTURES as FIXTURES;
use common::T5_FIXTURES;
const MODES: [BartPrefix; 2] = [BartPrefix::Paper, BartPrefix::Peft];
const N: usize = 8;

/// With the MLP (M = 16) or without (`noreparam`), as the references were made.
const PARAMS: [&str; 2] = ["reparam", "noreparam"];

fn bundle(fixture: &str, mode: BartPrefix, test: &str) -> PathBuf {
    bundle_rows(fixture, mode, test, 4, "reparam")
}

fn bundle_rows(fixture: &str, mode: BartPrefix, test: &str, rows: usize, param: &str) -> PathBuf {
    let out =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pfx-bartgen-{test}-{fixture}-{mode}-{param}"));
    let opts = common::bart_options(
        mode,
        (param == "reparam").then_some(16),
        Some(BartGenShape { rows, src_len: 7, max_new: N }),
    );
    compile_bart(&common::graphs_dir().join(fixture), &opts, &out).unwrap();
    out
}

fn reference_param(fixture: &str, mode: BartPrefix, param: &str) -> BTreeMap<String, HostTensor> {
    let suffix = if param == "reparam" { String::new() } else { format!("-{param}") };
    pfx_runtime::read_safetensors(
        common::graphs_dir().join(format!("bart-ref/gen-{fixture}-{mode}{suffix}.safetensors")),
    )
    .unwrap()
}

use common::id_rows as rows;

fn generator(b: &Bundle, kind: BackendKind, prefix: BTreeMap<String, HostTensor>) -> Seq2SeqGenerator {
    let spec = read_bart_spec(&b.dir).unwrap().unwrap();
    generator_from(b, kind, prefix, spec.generation_start_token_id.expect("recorded by pfxc compile"))
}

/// A generator whose decoder starts with `start` (mBART: the target language).
fn generator_from(b: &Bundle, kind: BackendKind, prefix: BTreeMap<String, HostTensor>, start: i64) -> Seq2SeqGenerator {
    let spec = read_bart_spec(&b.dir).unwrap().unwrap();
    let ort = OrtOptions::default();
    let bare = b.manifest.graphs.contains_key("encode_bare").then(|| b.open_graph("encode_bare", kind, &ort).unwrap());
    Seq2SeqGenerator::new(
        b.open_graph("encode", kind, &ort).unwrap(),
        bare,
        b.open_graph("decode", kind, &ort).unwrap(),
        spec.generation.unwrap(),
        prefix,
        start,
    )
}

/// A fixture's references, their sources, and the reference prefix under the bundle's trainable names.
struct Case {
    r: BTreeMap<String, HostTensor>,
    sources: Vec<Vec<i64>>,
}

impl Case {
    fn new(fixture: &str, mode: BartPrefix, param: &str) -> Case {
        let r = reference_param(fixture, mode, param);
        let sources = rows(&r["gen.input_ids"], Some(&r["gen.attention_mask"]));
        Case { r, sources }
    }

    fn prefix_of(b: &Bundle, r: &BTreeMap<String, HostTensor>) -> BTreeMap<String, HostTensor> {
        b.trainable_names().into_iter().map(|n| (n.clone(), r[&n].clone())).collect()
    }
}

/// The fixtures with generation references: BART's and T5's.
fn generating_fixtures() -> impl Iterator<Item = &'static str> {
    FIXTURES.into_iter().chain(T5_FIXTURES)
}

/// A fixture's pad and end-of-sequence ids (BART's 1 and 2, T5's 0 and 1).
fn pad_eos(b: &Bundle) -> (i64, i64) {
    let spec = read_bart_spec(&b.dir).unwrap().unwrap();
    (spec.pad_token_id, b.manifest.eos_token_ids[0] as i64)
}

/// Generates exactly N tokens (no end-of-sequence stop), as the references do.
fn greedy_cfg(pad: i64) -> GenConfig {
    GenConfig { max_new: N, beams: 1, eos: None, pad, ..GenConfig::default() }
}

#[test]
fn greedy_equals_the_references() {
    for fixture in generating_fixtures() {
        for (mode, param) in MODES.into_iter().flat_map(|m| PARAMS.map(|p| (m, p))) {
            let Case { r, sources } = Case::new(fixture, mode, param);
            let dir = bundle_rows(fixture, mode, "greedy", 4, param);
            let b = Bundle::open(&dir).unwrap();
            let prefix = Case::prefix_of(&b, &r);
            for kind in backends() {
                let what = format!("{fixture} {mode} {param} {kind}");
                let mut g = generator(&b, kind, prefix.clone());
                let cfg = greedy_cfg(pad_eos(&b).0);
                let greedy = g.greedy(&sources, &cfg).unwrap();
                // The logits along the reference path, with and without the prefix (an ignored source mask
                // moves them by 1e-2, positions from the wrong start by 0.7).
                for (key, tokens, no_prefix) in
                    [("gen.greedy_logits", "gen.greedy", false), ("gen.bare_greedy_logits", "gen.bare_greedy", true)]
                {
                    let c = GenConfig { no_prefix, ..cfg.clone() };
                    let got = g.forced_logits(&sources, &rows(&r[tokens], None), &c).unwrap();
                    let want = r[key].as_f32().unwrap();
                    let flat: Vec<f32> = got.into_iter().flatten().flatten().collect();
                    let worst = flat.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    // Relative to the logits' size (T5 v1.1's reach 25, BART's 1).
                    let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
                    assert!(worst < 1e-4 * scale, "{what}: {key} off by {worst} (logits up to {scale})");
                    println!("{what}: {key} max |Δ| {worst:.1e}");
                }
                assert_eq!(greedy, rows(&r["gen.greedy"], None), "{what}: greedy tokens differ from the reference");
                assert_ne!(greedy, rows(&r["gen.bare_greedy"], None), "{what}: the prefix must change the output");
                let bare = GenConfig { no_prefix: true, ..cfg.clone() };
                assert_eq!(g.greedy(&sources, &bare).unwrap(), rows(&r["gen.bare_greedy"], None), "{what}: bare model");
                // Each source alone gives what it gives in the padded batch.
                for (i, s) in sources.iter().enumerate() {
                    assert_eq!(
                        g.greedy(std::slice::from_ref(s), &cfg).unwrap()[0],
                        greedy[i],
                        "{what}: source {i} alone"
                    );
                }
                println!("{what}: greedy {greedy:?}");
            }
        }
    }
}

/// Strips the end-of-sequence token the references keep (the runtime returns tokens before it).
fn without_eos(mut v: Vec<Vec<i64>>, eos: i64) -> Vec<Vec<i64>> {
    for row in &mut v {
        if row.last() == Some(&eos) {
            row.pop();
        }
    }
    v
}

#[test]
fn beam_search_equals_hf() {
    for fixture in generating_fixtures() {
        for (mode, param) in MODES.into_iter().flat_map(|m| PARAMS.map(|p| (m, p))) {
            let Case { r, sources } = Case::new(fixture, mode, param);
            let dir = bundle_rows(fixture, mode, "beam", 4, param);
            let b = Bundle::open(&dir).unwrap();
            let prefix = Case::prefix_of(&b, &r);
            for kind in backends() {
                let what = format!("{fixture} {mode} {param} {kind}");
                let mut g = generator(&b, kind, prefix.clone());
                // The references use 4 beams (the bundles decode 4 rows).
                let (pad, eos) = pad_eos(&b);
                let cfg = GenConfig { max_new: N, beams: 4, eos: Some(eos), pad, ..GenConfig::default() };
                let beam = g.beam_search(&sources, &cfg).unwrap();
                assert_eq!(beam, without_eos(rows(&r["gen.beam"], None), eos), "{what}: beam tokens");
                let noeos = GenConfig { eos: None, ..cfg.clone() };
                assert_eq!(
                    g.beam_search(&sources, &noeos).unwrap(),
                    rows(&r["gen.beam_noeos"], None),
                    "{what}: no eos"
                );
                let bare = GenConfig { no_prefix: true, ..cfg.clone() };
                assert_eq!(
                    g.beam_search(&sources, &bare).unwrap(),
                    without_eos(rows(&r["gen.bare_beam"], None), eos),
                    "{what}: bare beam"
                );
                println!("{what}: beam {beam:?}");
                // Forced tokens, as HF's generate applies the generation config's forced_eos_token_id (and
                // forced_bos_token_id): the bundle records the fixture's, the references use the same.
                // (T5's config forces none: its references force the end id too.)
                let t5 = T5_FIXTURES.contains(&fixture);
                let recorded = b.manifest.forced_eos_token_id.map(i64::from);
                assert_eq!(recorded, (!t5).then_some(eos), "{what}: the fixture's forced_eos_token_id");
                let forced_bos = r["gen.forced_bos"].as_i64().unwrap()[0];
                for (key, forced_bos) in [("forced_eos", None), ("forced_bos_eos", Some(forced_bos))] {
                    let forced = GenConfig { forced_eos: Some(eos), forced_bos, ..cfg.clone() };
                    let want = |k: &str| without_eos(rows(&r[k], None), eos);
                    let greedy = GenConfig { beams: 1, ..forced.clone() };
                    assert_eq!(
                        g.greedy(&sources, &greedy).unwrap(),
                        want(&format!("gen.greedy_{key}")),
                        "{what}: {key}"
                    );
                    let beam = g.beam_search(&sources, &forced).unwrap();
                    assert_eq!(beam, want(&format!("gen.beam_{key}")), "{what}: beam, {key}");
                }
                // Search settings of generation configs (bart-large's no_repeat_ngram_size and early_stopping,
                // bart-large-cnn's length penalty 2): repeated 2-grams banned, greedy (no eos: N tokens) and beam.
                let norepeat = GenConfig { no_repeat_ngram: 2, ..cfg.clone() };
                let greedy = GenConfig { beams: 1, eos: None, ..norepeat.clone() };
                assert_eq!(g.greedy(&sources, &greedy).unwrap(), rows(&r["gen.greedy_norepeat2"], None), "{what}");
                let beam = g.beam_search(&sources, &norepeat).unwrap();
                assert_eq!(beam, without_eos(rows(&r["gen.beam_norepeat2"], None), eos), "{what}: beam, no repeat");
                // The source's n-grams banned (BlenderBot's encoder_no_repeat_ngram_size), each source alone in the
                // references: sizes 1 (no source token at all; it changes the output in many files) and 2.
                for n in [1, 2] {
                    let enc = GenConfig { encoder_no_repeat_ngram: n, ..cfg.clone() };
                    let greedy = GenConfig { beams: 1, eos: None, ..enc.clone() };
                    let key = format!("gen.greedy_encnorepeat{n}");
                    assert_eq!(g.greedy(&sources, &greedy).unwrap(), rows(&r[&key], None), "{what}: {key}");
                    let key = format!("gen.beam_encnorepeat{n}");
                    let beam = g.beam_search(&sources, &enc).unwrap();
                    assert_eq!(beam, without_eos(rows(&r[&key], None), eos), "{what}: {key}");
                }
                // Repetition penalties (HF's repetition_penalty over the decoder's tokens, its start included;
                // encoder_repetition_penalty over the source, each source alone in the references), greedy (no
                // eos) and beam (on the log-probabilities, as HF's beam search applies them).
                for (key, rep, enc) in [("reppen13", 1.3, 1.0), ("encreppen05", 1.0, 0.5)] {
                    let pen = GenConfig { repetition_penalty: rep, encoder_repetition_penalty: enc, ..cfg.clone() };
                    let greedy = GenConfig { beams: 1, eos: None, ..pen.clone() };
                    let want = format!("gen.greedy_{key}");
                    assert_eq!(g.greedy(&sources, &greedy).unwrap(), rows(&r[&want], None), "{what}: {want}");
                    let want = format!("gen.beam_{key}");
                    let beam = g.beam_search(&sources, &pen).unwrap();
                    assert_eq!(beam, without_eos(rows(&r[&want], None), eos), "{what}: {want}");
                }
                use pfx_runtime::search::EarlyStopping::{Early, Heuristic, Never};
                for (key, early, no_prefix) in [
                    ("gen.beam_lp2", Heuristic, false),
                    ("gen.beam_lp2_early", Early, false),
                    ("gen.beam_lp2_never", Never, false),
                    ("gen.bare_beam_lp2", Heuristic, true),
                    ("gen.bare_beam_lp2_early", Early, true),
                    ("gen.bare_beam_lp2_never", Never, true),
                ] {
                    let c = GenConfig { length_penalty: 2.0, early_stopping: early, no_prefix, ..cfg.clone() };
                    let beam = g.beam_search(&sources, &c).unwrap();
                    assert_eq!(beam, without_eos(rows(&r[key], None), eos), "{what}: {key}");
                }
                // Beam sampling, pinned (HF's tokens whatever the seed): top-k 1 keeps 2 tokens per beam, the 8
                // candidates each step draws; and with the forced first and last tokens.
                let s = pfx_runtime::search::Sampling { temperature: 0.7, top_k: 1, seed: 7, ..Default::default() };
                let sampled = GenConfig { sampling: Some(s), ..cfg.clone() };
                let forced = GenConfig { forced_eos: Some(eos), forced_bos: Some(forced_bos), ..sampled.clone() };
                for (key, c) in [("gen.beam_sample_pinned", sampled), ("gen.beam_sample_pinned_forced", forced)] {
                    let beam = g.beam_search(&sources, &c).unwrap();
                    assert_eq!(beam, without_eos(rows(&r[key], None), eos), "{what}: {key}");
                }
            }
        }
    }
}

/// mBART's decoder starts with the target language. Asked for another one than its config starts with (the text
/// commands take it from `pfxc compile --tgt-lang`), greedy and beam search give what HF's
/// `generate(decoder_start_token_id=...)` gives.
#[test]
fn mbart_starts_with_the_asked_language() {
    let fixture = "mbart-tiny";
    for (mode, param) in MODES.into_iter().flat_map(|m| PARAMS.map(|p| (m, p))) {
        let Case { r, sources } = Case::new(fixture, mode, param);
        let dir = bundle_rows(fixture, mode, "lang", 4, param);
        let b = Bundle::open(&dir).unwrap();
        let start = r["gen.lang_start"].as_i64().unwrap()[0];
        let config_start = read_bart_spec(&dir).unwrap().unwrap().decoder_start_token_id;
        assert_eq!(config_start, r["gen.decoder_start"].as_i64().unwrap()[0]);
        assert_ne!(start, config_start);
        let prefix = Case::prefix_of(&b, &r);
        for kind in backends() {
            let what = format!("{fixture} {mode} {param} {kind}");
            let mut g = generator_from(&b, kind, prefix.clone(), start);
            assert_eq!(
                g.greedy(&sources, &greedy_cfg(1)).unwrap(),
                rows(&r["gen.greedy_lang"], None),
                "{what}: greedy"
            );
            let cfg = GenConfig { max_new: N, beams: 4, eos: Some(2), pad: 1, ..GenConfig::default() };
            let beam = g.beam_search(&sources, &cfg).unwrap();
            assert_eq!(beam, without_eos(rows(&r["gen.beam_lang"], None), 2), "{what}: beam");
            println!("{what}: from {start}: greedy and beam as HF's");
        }
    }
}

/// Baked graphs (every prefix a constant, no trainable inputs) give the reference tokens.
#[test]
fn baked_graphs_generate_the_same_tokens() {
    for (fixture, mode) in ["bart-dec-deep", "t5-tiny"].into_iter().flat_map(|f| MODES.map(|m| (f, m))) {
        let Case { r, sources } = Case::new(fixture, mode, "reparam");
        let dir = bundle(fixture, mode, "baked");
        let b = Bundle::open(&dir).unwrap();
        let prefix_file = dir.join("reference-prefix.safetensors");
        let prefix = Case::prefix_of(&b, &r);
        pfx_runtime::write_safetensors(&prefix_file, &prefix).unwrap();
        let baked = dir.with_extension("baked");
        pfx_compiler::compile::bake::bake(&dir, &prefix_file, &baked).unwrap();
        let bb = Bundle::open(&baked).unwrap();
        assert!(bb.manifest.baked && bb.manifest.trainable.is_empty());
        let enc = pfx_compiler::onnx_io::load(&baked.join("encode.onnx")).unwrap();
        let names: Vec<&str> = enc.graph.inputs.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["input_ids", "attention_mask"], "baked encode inputs ({mode})");
        assert!(!enc.graph.nodes.iter().any(|n| n.op == "Tanh"), "the MLPs must be folded away ({mode})");
        for kind in backends() {
            let mut g = generator(&bb, kind, BTreeMap::new());
            let cfg = greedy_cfg(pad_eos(&bb).0);
            assert_eq!(
                g.greedy(&sources, &cfg).unwrap(),
                rows(&r["gen.greedy"], None),
                "baked {fixture} {mode} {kind}"
            );
        }
        // The baked graphs alone, through ONNX Runtime's Python API and the protocol `examples/run_baked.py`
        // writes out (no pfx code). PFX_SKIP_PYTHON=1 skips it.
        if std::env::var("PFX_SKIP_PYTHON").is_ok_and(|v| v == "1") {
            continue;
        }
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/run_baked.py");
        let mut cmd = std::process::Command::new("python3");
        cmd.arg(&script).arg(&baked).args(["--max-new", &N.to_string(), "--no-eos", "--no-forced-eos"]);
        for s in &sources {
            cmd.arg("--ids").arg(s.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" "));
        }
        let out = cmd.output().expect("python3 runs");
        assert!(out.status.success(), "{}: {}", script.display(), String::from_utf8_lossy(&out.stderr));
        let tokens: Vec<Vec<i64>> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
            .collect();
        assert_eq!(tokens, rows(&r["gen.greedy"], None), "examples/run_baked.py on the baked {fixture} {mode} graphs");
    }
}

/// An export folder with only optimum's merged decoder (an If on `use_cache_branch`): training takes its no-cache
/// branch, generation its cache branch; the tokens are the same.
#[test]
fn merged_decoder_generates_the_same_tokens() {
    let fixture = "bart-enc-deep";
    let src = common::graphs_dir().join(fixture);
    let export = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pfx-bartgen-merged-export");
    std::fs::create_dir_all(&export).unwrap();
    for f in ["encoder_model.onnx", "decoder_model_merged.onnx", "config.json"] {
        std::fs::copy(src.join(f), export.join(f)).unwrap();
    }
    for mode in MODES {
        let Case { r, sources } = Case::new(fixture, mode, "reparam");
        let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pfx-bartgen-merged-{mode}"));
        let opts = common::bart_options(mode, Some(16), Some(BartGenShape { rows: 4, src_len: 7, max_new: N }));
        compile_bart(&export, &opts, &out).unwrap();
        let b = Bundle::open(&out).unwrap();
        let prefix = Case::prefix_of(&b, &r);
        let mut g = generator(&b, BackendKind::Tract, prefix);
        assert_eq!(g.greedy(&sources, &greedy_cfg(1)).unwrap(), rows(&r["gen.greedy"], None), "merged {mode}");
    }
}

/// With 8 rows and 4 beams two sources are searched together (rows 0-3 and 4-7): the same hypotheses as alone.
#[test]
fn beam_search_of_two_sources_at_once() {
    for mode in MODES {
        let fixture = "bart-dec-deep";
        let Case { r, sources } = Case::new(fixture, mode, "reparam");
        let b = Bundle::open(bundle_rows(fixture, mode, "beam2", 8, "reparam")).unwrap();
        let prefix = Case::prefix_of(&b, &r);
        let mut g = generator(&b, BackendKind::Tract, prefix);
        let cfg = GenConfig { max_new: N, beams: 4, eos: Some(2), pad: 1, ..GenConfig::default() };
        assert_eq!(g.beam_search(&sources, &cfg).unwrap(), without_eos(rows(&r["gen.beam"], None), 2), "{mode}");
        let bare = GenConfig { no_prefix: true, ..cfg };
        assert_eq!(
            g.beam_search(&sources, &bare).unwrap(),
            without_eos(rows(&r["gen.bare_beam"], None), 2),
            "{mode} bare"
        );
    }
}
