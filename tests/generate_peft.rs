//! Generation equals PEFT's (references by `graphs/peft-generate/make_generate_references.py`, which places
//! the prefix in generate's cache and checks that the prefix changes the output): greedy and beam search on
//! the tiny GPT-2 with-past exports, left-padded batches, on tract and ONNX Runtime; baked graphs too;
//! bundles with f16 weights against HF on the rounded model; and batches whose prompts have different prefixes
//! (`make_mixed_references.py`).

mod common;

use common::backends;

use std::collections::BTreeMap;
use std::path::PathBuf;

use pfx_compiler::compile::generate::GenShape;
use pfx_compiler::compile::storage::WeightStorage;
use pfx_compiler::compile::{compile, CompileOptions};
use pfx_runtime::bundle::Bundle;
use pfx_runtime::generate::{GenConfig, Generator};
use pfx_runtime::{BackendKind, HostTensor, OrtOptions};

/// Each test compiles into its own folder (tests run in parallel threads of one process).
fn bundle(fixture: &str, mode: &str, test: &str) -> PathBuf {
    bundle_rows(fixture, mode, test, 3)
}

fn bundle_rows(fixture: &str, mode: &str, test: &str, rows: usize) -> PathBuf {
    bundle_with(fixture, mode, test, rows, WeightStorage::F32)
}

fn bundle_with(fixture: &str, mode: &str, test: &str, rows: usize, weights: WeightStorage) -> PathBuf {
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pfx-gen-{test}-{fixture}-{mode}"));
    let generation = Some(GenShape { rows, prompt_len: 6, max_new: 8 });
    let opts = CompileOptions { weights, ..common::gpt2_options((mode == "reparam").then_some(16), generation) };
    compile(&common::graphs_dir().join(fixture).join("model.onnx"), &opts, &out).unwrap();
    out
}

use common::id_rows as rows;

/// The references of `graphs/peft-generate/gpt2-<mode>.safetensors` and their prompts (padding left out).
fn references(mode: &str) -> (BTreeMap<String, HostTensor>, Vec<Vec<i64>>) {
    let r = pfx_runtime::read_safetensors(common::graphs_dir().join(format!("peft-generate/gpt2-{mode}.safetensors")))
        .unwrap();
    let prompts = rows(&r["prompts"], Some(&r["prompt_mask"]));
    (r, prompts)
}

/// The prefix the references were made with (`graphs/peft/gpt2-<mode>.safetensors`), as the bundle names it.
fn initial_prefix(b: &Bundle, mode: &str) -> BTreeMap<String, HostTensor> {
    let start =
        pfx_runtime::read_safetensors(common::graphs_dir().join(format!("peft/gpt2-{mode}.safetensors"))).unwrap();
    b.trainable_names().into_iter().map(|n| (n.clone(), start[&n].clone())).collect()
}

fn generator(b: &Bundle, kind: BackendKind, prefix: BTreeMap<String, HostTensor>) -> Generator {
    Generator::open(b, kind, &OrtOptions::default(), prefix).unwrap()
}

#[test]
fn greedy_and_beam_equal_peft() {
    for mode in ["reparam", "noreparam"] {
        let (r, prompts) = references(mode);
        for fixture in ["gpt2-dynamo-past", "gpt2-optimum"] {
            let dir = bundle(fixture, mode, "tokens");
            let b = Bundle::open(&dir).unwrap();
            let prefix = initial_prefix(&b, mode);
            for kind in backends() {
                let what = format!("{fixture} {mode} {kind}");
                let mut g = generator(&b, kind, prefix.clone());
                let cfg =
                    GenConfig { max_new: 8, min_new: 8, beams: 1, eos: Some(95), pad: 95, ..GenConfig::default() };
                let greedy = g.greedy(&prompts, &cfg).unwrap();
                assert_eq!(greedy, rows(&r["greedy"], None), "{what}: greedy tokens differ from PEFT");
                assert_ne!(greedy, rows(&r["greedy_noprefix"], None), "{what}: the prefix must change the output");
                // With the prefix masked out and positions from 0, the bare model's tokens.
                let bare = GenConfig { no_prefix: true, ..cfg.clone() };
                assert_eq!(g.greedy(&prompts, &bare).unwrap(), rows(&r["greedy_noprefix"], None), "{what}: bare model");
                // Each prompt alone gives what it gives in the left-padded batch.
                for (i, p) in prompts.iter().enumerate() {
                    assert_eq!(
                        g.greedy(std::slice::from_ref(p), &cfg).unwrap()[0],
                        greedy[i],
                        "{what}: prompt {i} alone"
                    );
                }
                let beam_cfg = GenConfig { beams: 3, ..cfg.clone() };
                let beam = g.beam_search(&prompts, &beam_cfg).unwrap();
                assert_eq!(beam, rows(&r["beam"], None), "{what}: beam tokens differ from PEFT");
                // Every hypothesis kept, best first (HF's num_return_sequences = num_beams).
                let all = g.beam_search(&prompts, &GenConfig { num_return: 3, ..beam_cfg.clone() }).unwrap();
                let t = &r["beam_return3"];
                let want = HostTensor::from_i64(vec![9, 8], t.as_i64().unwrap().to_vec()).unwrap();
                assert_eq!(all, rows(&want, None), "{what}: the 3 hypotheses of beam search");
                // Beam sampling, pinned (HF's tokens whatever the seed): top-k 1 keeps 2 tokens per beam (1 + the
                // eos id), the 6 candidates each step draws. Plain beam search differs on one prompt per mode.
                let s = pfx_runtime::search::Sampling { temperature: 0.7, top_k: 1, seed: 3, ..Default::default() };
                let pinned = GenConfig { sampling: Some(s), ..beam_cfg.clone() };
                let sampled = g.beam_search(&prompts, &pinned).unwrap();
                assert_eq!(sampled, rows(&r["beam_sample_pinned"], None), "{what}: beam sampling");
                assert_ne!(sampled, beam, "{what}: beam sampling's candidates are not beam search's");
                println!("{what}: greedy {greedy:?} beam {beam:?}");
                // Repeated 2-grams banned, over the prompt and the new tokens (HF's no_repeat_ngram_size on each
                // prompt alone; the bans see the real prompt tokens, not the padding).
                let norepeat = GenConfig { no_repeat_ngram: 2, ..cfg.clone() };
                assert_eq!(g.greedy(&prompts, &norepeat).unwrap(), rows(&r["greedy_norepeat2"], None), "{what}");
                let norepeat = GenConfig { beams: 3, ..norepeat };
                assert_eq!(g.beam_search(&prompts, &norepeat).unwrap(), rows(&r["beam_norepeat2"], None), "{what}");
                // What HF 5.24 does with a decoder's prompt as its `encoder_input_ids`, and the repetition penalty
                // over the prompt and the new tokens, each prompt alone in the references (HF's batch would also
                // penalize the padding).
                let settings = [
                    ("reppen13", GenConfig { repetition_penalty: 1.3, ..cfg.clone() }),
                    ("encreppen05", GenConfig { encoder_repetition_penalty: 0.5, ..cfg.clone() }),
                    ("encnorepeat1", GenConfig { encoder_no_repeat_ngram: 1, ..cfg.clone() }),
                    // Bans of token ids ([95] is eos alone, which HF leaves out of bad_words_ids) and biases.
                    (
                        "bans",
                        GenConfig {
                            bad_words: vec![vec![37], vec![5, 5], vec![90, 90], vec![95]],
                            suppress: vec![91],
                            begin_suppress: vec![55, 34, 0],
                            ..cfg.clone()
                        },
                    ),
                    (
                        "bias",
                        GenConfig {
                            sequence_bias: vec![
                                (vec![37], -5.0),
                                (vec![90], -3.0),
                                (vec![55, 55], 4.0),
                                (vec![0, 0], -3.0),
                            ],
                            ..cfg.clone()
                        },
                    ),
                ];
                for (key, c) in settings {
                    let want = format!("greedy_{key}");
                    assert_eq!(g.greedy(&prompts, &c).unwrap(), rows(&r[&want], None), "{what}: {want}");
                    let want = format!("beam_{key}");
                    let beam = GenConfig { beams: 3, ..c };
                    assert_eq!(g.beam_search(&prompts, &beam).unwrap(), rows(&r[&want], None), "{what}: {want}");
                }
                // The end-of-sequence length decay (2 tokens in, factor 2), eos allowed: HF pads after the end.
                let free = GenConfig { min_new: 0, length_decay: Some((2, 2.0)), ..cfg.clone() };
                let until_eos = |key: &str| -> Vec<Vec<i64>> {
                    rows(&r[key], None).into_iter().map(|t| t.into_iter().take_while(|&x| x != 95).collect()).collect()
                };
                assert_eq!(g.greedy(&prompts, &free).unwrap(), until_eos("greedy_decay"), "{what}: greedy_decay");
                let beam = GenConfig { beams: 3, ..free };
                assert_eq!(g.beam_search(&prompts, &beam).unwrap(), until_eos("beam_decay"), "{what}: beam_decay");
                // Renormalized scores after repetition penalty 1.3 (beam search adds up other scores).
                let renorm = GenConfig { repetition_penalty: 1.3, renormalize: true, ..beam_cfg.clone() };
                let want = rows(&r["beam_reppen13_renorm"], None);
                assert_eq!(g.beam_search(&prompts, &renorm).unwrap(), want, "{what}: beam_reppen13_renorm");
                sampling_scores_equal_hf(&mut g, &prompts, &r, &what);
            }
        }
    }
}

/// The scores HF samples the first new token from (its processed `scores[0]` with repetition penalty 1.3,
/// temperature 0.7, top-k 10, top-p 0.9, min-p 0.05 and the eos banned), from the model's first logits: the same
/// tokens kept, their scores within float32 rounding of the model's logits. Also with 3 beams (beam sampling:
/// on log-probabilities, each warper keeping 2).
fn sampling_scores_equal_hf(g: &mut Generator, prompts: &[Vec<i64>], r: &BTreeMap<String, HostTensor>, what: &str) {
    use pfx_runtime::search::{beam_step_scores, sampling_scores, Sampling, Start};
    let s = Sampling { temperature: 0.7, top_k: 10, top_p: 0.9, min_p: Some(0.05), ..Sampling::default() };
    let cfg =
        GenConfig { max_new: 1, min_new: 1, repetition_penalty: 1.3, eos: Some(95), pad: 95, ..GenConfig::default() };
    let vocab = r["sample_first_scores"].shape()[1];
    for (i, p) in prompts.iter().enumerate() {
        let batch = vec![p.clone(); g.rows()];
        let context = g.context(p);
        let (_, logits) = g.start(&batch, &[], &cfg).unwrap();
        let beam_cfg = GenConfig { beams: 3, sampling: Some(s.clone()), ..cfg.clone() };
        let beam_sampled = beam_step_scores(&beam_cfg, 0, &context, &[], &logits[0]);
        for (key, got) in [
            ("sample_first_scores", sampling_scores(&cfg, &s, 0, &context, &logits[0])),
            ("beam_sample_first_scores", beam_sampled),
        ] {
            let want = &r[key].as_f32().unwrap()[i * vocab..(i + 1) * vocab];
            let kept = |v: &[f32]| v.iter().map(|x| x.is_finite()).collect::<Vec<_>>();
            assert_eq!(kept(&got), kept(want), "{what}: prompt {i}: the tokens {key} keeps");
            for (t, (a, b)) in got.iter().zip(want).enumerate().filter(|(_, (a, _))| a.is_finite()) {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{what}: {key} prompt {i} token {t}: {a} vs HF's {b}"
                );
            }
        }
    }
}

/// A sampled input's tokens come from its own stream (seed, place among the run's inputs): the same whatever batch
/// it is in, and the same when a resumed run starts at it.
#[test]
fn samples_do_not_depend_on_the_batch() {
    let (r, prompts) = references("reparam");
    let b = Bundle::open(bundle_rows("gpt2-dynamo-past", "reparam", "sampling", 2)).unwrap();
    let mut g = generator(&b, BackendKind::Tract, initial_prefix(&b, "reparam"));
    // A flat distribution (temperature 3, no top-k) so that the draws matter.
    let sampling = pfx_runtime::search::Sampling { temperature: 3.0, top_k: 0, seed: 11, ..Default::default() };
    let cfg = GenConfig { max_new: 8, eos: Some(95), pad: 95, sampling: Some(sampling), ..GenConfig::default() };
    // Three prompts on two rows: batches [0, 1] and [2].
    let all = g.greedy(&prompts, &cfg).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let alone = GenConfig { input_offset: i as u64, ..cfg.clone() };
        assert_eq!(g.greedy(std::slice::from_ref(p), &alone).unwrap()[0], all[i], "prompt {i}");
    }
    // Two samples of each: 6 outputs, consecutive per prompt, the same batched or alone.
    let two = GenConfig { num_return: 2, ..cfg.clone() };
    let pairs = g.greedy(&prompts, &two).unwrap();
    assert_eq!(pairs.len(), 6);
    for (i, p) in prompts.iter().enumerate() {
        let alone = GenConfig { input_offset: i as u64, ..two.clone() };
        assert_eq!(
            g.greedy(std::slice::from_ref(p), &alone).unwrap(),
            pairs[2 * i..2 * i + 2],
            "prompt {i}, 2 samples"
        );
    }
    assert!((0..3).any(|i| pairs[2 * i] != pairs[2 * i + 1]), "two samples of a prompt differ: {pairs:?}");
    let other_seed = |seed| {
        let s = pfx_runtime::search::Sampling { seed, ..cfg.sampling.clone().unwrap() };
        g.greedy(&prompts, &GenConfig { sampling: Some(s), ..cfg.clone() }).unwrap()
    };
    let others: Vec<_> = (12..16).map(other_seed).collect();
    assert!(others.iter().any(|o| *o != all), "other seeds draw other tokens: {all:?} {others:?}");
    assert_ne!(all, rows(&r["greedy"], None), "sampling at temperature 3 is not greedy search");
}

/// Baked graphs (prefix as constants, no trainable inputs) give the same tokens as the un-baked path.
#[test]
fn baked_graphs_generate_the_same_tokens() {
    let mode = "reparam";
    let r = pfx_runtime::read_safetensors(common::graphs_dir().join(format!("peft-generate/gpt2-{mode}.safetensors")))
        .unwrap();
    let prompts = rows(&r["prompts"], Some(&r["prompt_mask"]));
    let dir = bundle("gpt2-dynamo-past", mode, "baked");
    let baked = dir.with_extension("baked");
    let prefix_file = common::graphs_dir().join(format!("peft/gpt2-{mode}.safetensors"));
    pfx_compiler::compile::bake::bake(&dir, &prefix_file, &baked).unwrap();
    let b = Bundle::open(&baked).unwrap();
    assert!(b.manifest.baked && b.manifest.trainable.is_empty());
    let pre = pfx_compiler::onnx_io::load(&baked.join("prefill.onnx")).unwrap();
    let names: Vec<&str> = pre.graph.inputs.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["input_ids", "attention_mask", "position_ids"], "baked prefill inputs");
    assert!(
        !pre.graph.nodes.iter().any(|n| n.op == "Tanh" && n.name.contains("prefix")),
        "the MLP must be folded away"
    );
    for kind in backends() {
        let mut g = generator(&b, kind, BTreeMap::new());
        let cfg = GenConfig { max_new: 8, min_new: 8, beams: 1, eos: Some(95), pad: 95, ..GenConfig::default() };
        assert_eq!(g.greedy(&prompts, &cfg).unwrap(), rows(&r["greedy"], None), "baked greedy on {kind}");
        let beam_cfg = GenConfig { beams: 3, ..cfg };
        assert_eq!(g.beam_search(&prompts, &beam_cfg).unwrap(), rows(&r["beam"], None), "baked beam on {kind}");
    }
    // The baked graphs alone, through ONNX Runtime's Python API and the protocol `examples/run_baked.py` writes out
    // (no pfx code): PEFT's greedy tokens. PFX_SKIP_PYTHON=1 skips it.
    if std::env::var("PFX_SKIP_PYTHON").is_ok_and(|v| v == "1") {
        return;
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/run_baked.py");
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(&script).arg(&baked).args(["--max-new", "8", "--min-new", "8", "--eos", "95"]);
    for p in &prompts {
        cmd.arg("--ids").arg(p.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" "));
    }
    let out = cmd.output().expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}: {}", script.display(), String::from_utf8_lossy(&out.stderr));
    let tokens: Vec<Vec<i64>> =
        text.lines().map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect()).collect();
    assert_eq!(tokens, rows(&r["greedy"], None), "examples/run_baked.py on the baked graphs");
}

/// The generation graphs ONNX Runtime runs on a GPU (`prefill.gpu`, `decode.gpu`: GELU's cube as `Pow`, which
/// ORT fuses into one `FastGelu`) generate PEFT's tokens: run here in place of the plain ones (the manifest
/// pointed at them), on every backend.
#[test]
fn the_gpu_variants_of_the_generation_graphs_generate_pefts_tokens() {
    let mode = "reparam";
    let (r, prompts) = references(mode);
    let dir = bundle("gpt2-dynamo-past", mode, "gpu-variants");
    let path = dir.join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for role in ["prefill", "decode"] {
        let variant = manifest["graphs"][format!("{role}.gpu")].clone();
        assert_eq!(variant, format!("{role}.gpu.onnx"), "the bundle has {role}'s GPU variant");
        let g = pfx_compiler::onnx_io::load(&dir.join(variant.as_str().unwrap())).unwrap();
        let pows = g.graph.nodes.iter().filter(|n| n.op == "Pow").count();
        assert_eq!(pows, 2, "{role}: one Pow per layer of the 2-layer fixture");
        manifest["graphs"][role] = variant;
    }
    std::fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let b = Bundle::open(&dir).unwrap();
    for kind in backends() {
        let mut g = generator(&b, kind, initial_prefix(&b, mode));
        let cfg = GenConfig { max_new: 8, min_new: 8, beams: 1, eos: Some(95), pad: 95, ..GenConfig::default() };
        assert_eq!(g.greedy(&prompts, &cfg).unwrap(), rows(&r["greedy"], None), "greedy on {kind}");
        let beam_cfg = GenConfig { beams: 3, ..cfg };
        assert_eq!(g.beam_search(&prompts, &beam_cfg).unwrap(), rows(&r["beam"], None), "beam on {kind}");
    }
}

/// A bundle with f16 weights, and its baked form, generate HF's tokens on the model whose weight matrices are
/// rounded to f16 (`make_generate_references.py --weights f16`): tract's decode products on f16 panels, the
/// Casts in baked graphs. (On this tiny model the rounding flips no token, so these are also the f32 model's
/// tokens: that the rounding is the reference's is what `compile_peft`'s f16 gradients show.)
#[test]
fn f16_weights_generate_hfs_tokens_baked_or_not() {
    let mode = "reparam";
    let refs = common::graphs_dir().join(format!("peft-generate/gpt2-{mode}-f16.safetensors"));
    let r = pfx_runtime::read_safetensors(refs).unwrap();
    let prefix_file = common::graphs_dir().join(format!("peft/gpt2-{mode}.safetensors"));
    let start = pfx_runtime::read_safetensors(&prefix_file).unwrap();
    let prompts = rows(&r["prompts"], Some(&r["prompt_mask"]));
    let dir = bundle_with("gpt2-dynamo-past", mode, "f16", 3, WeightStorage::F16);
    let baked = dir.with_extension("baked");
    pfx_compiler::compile::bake::bake(&dir, &prefix_file, &baked).unwrap();
    let stored_f16 = |file: &str| {
        let m = pfx_compiler::onnx_io::load(&baked.join(file)).unwrap();
        m.graph.initializers.values().filter(|t| t.dtype() == pfx_compiler::tensor::DType::F16).count()
    };
    assert!(stored_f16("decode.onnx") > 0, "the baked decode graph keeps its weights in f16");
    let cfg = GenConfig { max_new: 8, min_new: 8, beams: 1, eos: Some(95), pad: 95, ..GenConfig::default() };
    let beam_cfg = GenConfig { beams: 3, ..cfg.clone() };
    for (what, path) in [("f16", &dir), ("f16 baked", &baked)] {
        let b = Bundle::open(path).unwrap();
        let prefix: BTreeMap<String, HostTensor> =
            b.trainable_names().into_iter().map(|n| (n.clone(), start[&n].clone())).collect();
        for kind in backends() {
            let mut g = generator(&b, kind, prefix.clone());
            assert_eq!(g.greedy(&prompts, &cfg).unwrap(), rows(&r["greedy"], None), "{what} greedy on {kind}");
            assert_eq!(g.beam_search(&prompts, &beam_cfg).unwrap(), rows(&r["beam"], None), "{what} beam on {kind}");
        }
    }
}

/// `pfxc bake --weights f16` of an f32 bundle rounds the frozen weights as `compile --weights f16` does (so
/// it generates the f16 references) and leaves the prefix in f32; the other way round is refused.
#[test]
fn baking_an_f32_bundle_into_f16_weights() {
    let mode = "reparam";
    let r =
        pfx_runtime::read_safetensors(common::graphs_dir().join(format!("peft-generate/gpt2-{mode}-f16.safetensors")))
            .unwrap();
    let prefix_file = common::graphs_dir().join(format!("peft/gpt2-{mode}.safetensors"));
    let prompts = rows(&r["prompts"], Some(&r["prompt_mask"]));
    let dir = bundle("gpt2-dynamo-past", mode, "bake16");
    let (plain, half) = (dir.with_extension("baked32"), dir.with_extension("baked16"));
    use pfx_compiler::compile::bake::bake_with;
    bake_with(&dir, &prefix_file, &plain, None).unwrap();
    let m = bake_with(&dir, &prefix_file, &half, Some(WeightStorage::F16)).unwrap();
    assert_eq!(m.weights_dtype, WeightStorage::F16);
    let size = |d: &PathBuf| std::fs::metadata(d.join("weights.bin")).unwrap().len();
    assert!(size(&half) < size(&plain), "{} bytes in f16 against {} in f32", size(&half), size(&plain));
    // The prefix's constants (folded from the MLP) are the f32 bake's, not rounded.
    let prefill = |d: &PathBuf| pfx_compiler::onnx_io::load(&d.join("prefill.onnx")).unwrap().graph.initializers;
    let (in_half, in_plain) = (prefill(&half), prefill(&plain));
    let prefix_consts: Vec<_> = in_half.iter().filter(|(n, t)| n.contains("prefix") && t.shape.len() >= 2).collect();
    assert!(!prefix_consts.is_empty());
    for (name, t) in prefix_consts {
        assert!(Some(t) == in_plain.get(name), "{name}: the prefix must not be rounded");
    }
    let b = Bundle::open(&half).unwrap();
    let cfg = GenConfig { max_new: 8, min_new: 8, beams: 1, eos: Some(95), pad: 95, ..GenConfig::default() };
    for kind in backends() {
        let mut g = generator(&b, kind, BTreeMap::new());
        assert_eq!(g.greedy(&prompts, &cfg).unwrap(), rows(&r["greedy"], None), "greedy on {kind}");
        let beam_cfg = GenConfig { beams: 3, ..cfg.clone() };
        assert_eq!(g.beam_search(&prompts, &beam_cfg).unwrap(), rows(&r["beam"], None), "beam on {kind}");
    }
    let f16_bundle = bundle_with("gpt2-dynamo-past", mode, "bake16back", 3, WeightStorage::F16);
    let e = bake_with(&f16_bundle, &prefix_file, &dir.with_extension("back"), Some(WeightStorage::F32)).unwrap_err();
    assert!(e.to_string().contains("cannot give them back their f32"), "{e}");
}

/// With 6 rows and 3 beams two prompts (of different lengths, left-padded) are searched together: the same
/// hypotheses as HF gives each.
#[test]
fn beam_search_of_two_prompts_at_once() {
    let (r, prompts) = references("reparam");
    let b = Bundle::open(bundle_rows("gpt2-optimum", "reparam", "beam2", 6)).unwrap();
    let mut g = generator(&b, BackendKind::Tract, initial_prefix(&b, "reparam"));
    let cfg = GenConfig { max_new: 8, min_new: 8, beams: 3, eos: Some(95), pad: 95, ..GenConfig::default() };
    assert_eq!(g.beam_search(&prompts, &cfg).unwrap(), rows(&r["beam"], None));
}

/// Prompts of one call that each generate with their own prefix (`add_prefix`, `GenConfig::prefix_of`) get PEFT's
/// tokens for that prefix (`graphs/peft-generate/gpt2-<mode>-mixed.safetensors`, by `make_mixed_references.py`: 6
/// prompts, the second prefix drawn there), however the rows group them: 6 rows (greedy: one prefill for all; beam
/// search: 2 prompts at a time, each pair mixing the prefixes), 18 (beam search: all 6 prompts × 3 beams at once) and
/// 4 (greedy: prompts 0-3, then 4-5 with idle rows; beam search: one prompt at a time).
#[test]
fn mixed_prefix_batches_equal_peft() {
    for mode in ["reparam", "noreparam"] {
        let refs = common::graphs_dir().join(format!("peft-generate/gpt2-{mode}-mixed.safetensors"));
        let r = pfx_runtime::read_safetensors(refs).unwrap();
        let prompts = rows(&r["prompts"], Some(&r["prompt_mask"]));
        let n = prompts.len();
        let assignment: Vec<usize> = r["assignment"].as_i64().unwrap().iter().map(|&a| a as usize).collect();
        assert!(assignment.contains(&0) && assignment.contains(&1), "the references mix the prefixes: {assignment:?}");
        let want = |key: &str| rows(&r[key], None);
        for (fixture, sizes) in [("gpt2-optimum", vec![n, 3 * n, 4]), ("gpt2-dynamo-past", vec![n])] {
            for size in sizes {
                let b = Bundle::open(bundle_rows(fixture, mode, &format!("mixed{size}"), size)).unwrap();
                // The second prefix, keyed by the bundle's trainable names (PEFT's PrefixEncoder names, as the first).
                let second: BTreeMap<String, HostTensor> = b
                    .trainable_names()
                    .into_iter()
                    .map(|name| {
                        let t = r[&format!("second.{name}")].clone();
                        (name, t)
                    })
                    .collect();
                for kind in backends() {
                    let what = format!("{fixture} {mode} {size} rows {kind}");
                    let mut g = generator(&b, kind, initial_prefix(&b, mode));
                    assert_eq!(g.add_prefix(second.clone()).unwrap(), 1, "{what}: the second prefix's index");
                    let cfg =
                        GenConfig { max_new: 8, min_new: 8, beams: 1, eos: Some(95), pad: 95, ..GenConfig::default() };
                    let beam_cfg = GenConfig { beams: 3, ..cfg.clone() };
                    for (search, name) in [(&cfg, "greedy"), (&beam_cfg, "beam")] {
                        let run = |g: &mut Generator, prefix_of: Vec<usize>| {
                            let c = GenConfig { prefix_of, ..search.clone() };
                            let out = if c.beams > 1 { g.beam_search(&prompts, &c) } else { g.greedy(&prompts, &c) };
                            out.unwrap()
                        };
                        let mixed = run(&mut g, assignment.clone());
                        assert_eq!(mixed, want(name), "{what}: {name}, each prompt with its own prefix");
                        let all_first = run(&mut g, vec![0; n]);
                        assert_eq!(all_first, want(&format!("{name}_first")), "{what}: {name}, all with the first");
                        let all_second = run(&mut g, vec![1; n]);
                        assert_eq!(all_second, want(&format!("{name}_second")), "{what}: {name}, all with the second");
                        assert_ne!(mixed, all_first, "{what}: {name}: the second prefix must change the mixed batch");
                        assert_ne!(mixed, all_second, "{what}: {name}: the first prefix must change the mixed batch");
                    }
                    let e = g.greedy(&prompts, &GenConfig { prefix_of: vec![2], ..cfg.clone() }).unwrap_err();
                    assert!(e.to_string().contains("asks for prefix 2, but the generator has 2"), "{what}: {e}");
                    println!("{what}: mixed prefixes {assignment:?} as PEFT's");
                }
            }
        }
    }
}
