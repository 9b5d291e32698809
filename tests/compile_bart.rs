//! Issue 6: BART prefix-tuning graphs (encoder and decoder exports linked into one training graph) equal the
//! references of `graphs/bart-ref/make_bart_references.py`: PEFT 0.21 itself for `--bart-prefix peft`, the
//! reference code's attention written out in PyTorch for `--bart-prefix paper`. Both fixtures (deeper encoder,
//! deeper decoder), both modes, with and without reparametrization, on tract and ONNX Runtime: loss, gradients,
//! label smoothing, three AdamW steps (also with clipping that fires). Then the merged decoder, snapshots of the
//! compiled graphs, and the error messages.

mod common;

use common::{backends, check_bundle};

use common::{check_norm, rel, run, scalar, three_steps};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pfx_compiler::compile::bart::{
    build_bart_loss_graph, compile_bart, compile_bart_models, read_bart_spec, BartOptions, BartPrefix,
};
use pfx_compiler::compile::bart_generate::BartGenShape;
use pfx_compiler::compile::optimizer::AdamW;
use pfx_compiler::compile::storage::WeightStorage;
use pfx_compiler::compile::Manifest;
use pfx_runtime::{open, HostTensor, OrtOptions};

use common::BART_FIXTURES as FIXTURES;
use common::T5_FIXTURES;
const MODES: &[BartPrefix] = &[BartPrefix::Peft, BartPrefix::Paper];
const PARAMS: &[&str] = &["reparam", "noreparam"];
// The reference script's setup.
const M: usize = 16;
const B: usize = 3;
const S: usize = 7;
const T: usize = 6;
const LR: f32 = 0.01;
const WD: f32 = 0.01;
const LABEL_SMOOTHING: f32 = 0.1;

fn reference(fixture: &str, mode: BartPrefix, param: &str) -> BTreeMap<String, HostTensor> {
    let p = common::graphs_dir().join(format!("bart-ref/{fixture}-{mode}-{param}.safetensors"));
    pfx_runtime::read_safetensors(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()))
}

fn options(mode: BartPrefix, param: &str, max_norm: f32, label_smoothing: f32) -> BartOptions {
    // Small generation graphs ride along: every bundle test checks them too (onnx.checker, snapshots).
    let generation = Some(BartGenShape { rows: 2, src_len: S, max_new: 4 });
    BartOptions {
        label_smoothing,
        optimizer: AdamW { weight_decay: WD, max_grad_norm: Some(max_norm), ..AdamW::default() },
        ..common::bart_options(mode, (param == "reparam").then_some(M), generation)
    }
}

fn out_dir(tag: &str) -> PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pfx-bart-{tag}"))
}

/// The BART-path fixtures with training references: BART's and T5's.
fn trained_fixtures() -> impl Iterator<Item = &'static str> {
    FIXTURES.into_iter().chain(T5_FIXTURES)
}

fn compile_case(dir: &Path, fixture: &str, opts: &BartOptions, tag: &str) -> (PathBuf, Manifest) {
    let out = out_dir(&format!("{fixture}-{}-{tag}", opts.mode));
    let m = compile_bart(dir, opts, &out).unwrap_or_else(|e| panic!("compiling {fixture} ({tag}): {e:#}"));
    (out, m)
}

/// Loss within 1e-5 and every gradient within 1e-4 of the reference (`prefix` selects `ls.` keys).
fn check_grads(dir: &Path, m: &Manifest, r: &BTreeMap<String, HostTensor>, prefix: &str, what: &str) {
    for kind in backends() {
        let what = format!("{what} {kind}");
        let mut b = open(dir.join("grads.onnx"), kind, &OrtOptions::default()).unwrap();
        let out = run(&mut b, r, &what);
        let want = scalar(&r[&format!("{prefix}loss")]);
        let e = rel(scalar(&out["loss"]), want);
        assert!(e <= 1e-5, "{what}: loss {} vs reference {want} (rel {e:e})", scalar(&out["loss"]));
        let mut worst = 0.0f64;
        for t in &m.trainable {
            let g = format!("grad.{}", t.name);
            worst = worst.max(check_norm(&format!("{what} {g}"), &out[&g], &r[&format!("{prefix}{g}")], 1e-4));
        }
        let mut ev = open(dir.join("eval_step.onnx"), kind, &OrtOptions::default()).unwrap();
        let el = scalar(&run(&mut ev, r, &what)["loss"]);
        assert!(rel(el, want) <= 1e-5, "{what}: eval loss {el} vs {want}");
        println!("{what:<44} loss rel err {e:.1e}, worst gradient rel err {worst:.1e}");
    }
}

/// `--weights f16`: loss and gradients equal the references on the model with its rank ≥ 2 tensors rounded to
/// f16 (`make_bart_references.py --weights f16`), in both layouts, and are farther from the f32 model's.
#[test]
fn f16_weights_give_the_references_of_the_rounded_model() {
    for fixture in trained_fixtures() {
        let export = common::graphs_dir().join(fixture);
        for &mode in MODES {
            let what = format!("{fixture} {mode} f16");
            let r16 = reference(fixture, mode, "reparam-f16");
            let r32 = reference(fixture, mode, "reparam");
            let opts = BartOptions { weights: WeightStorage::F16, ..options(mode, "reparam", 1.0, 0.0) };
            let (dir, m) = compile_case(&export, fixture, &opts, "f16");
            assert_eq!(m.weights_dtype, WeightStorage::F16);
            check_bundle(&dir);
            for kind in backends() {
                let what = format!("{what} {kind}");
                let mut b = open(dir.join("grads.onnx"), kind, &OrtOptions::default()).unwrap();
                let out = run(&mut b, &r16, &what);
                let e = rel(scalar(&out["loss"]), scalar(&r16["loss"]));
                assert!(e <= 1e-6, "{what}: loss {} vs {} (rel {e:e})", scalar(&out["loss"]), scalar(&r16["loss"]));
                let mut worst = 0.0f64;
                for t in &m.trainable {
                    let g = format!("grad.{}", t.name);
                    worst = worst.max(check_norm(&format!("{what} {g}"), &out[&g], &r16[&g], 2e-5));
                }
                // Across all gradients (some are tiny and barely moved), the f32 model's are farther off.
                let off = m
                    .trainable
                    .iter()
                    .map(|t| format!("grad.{}", t.name))
                    .map(|g| out[&g].norm_rel_error(&r32[&g]).unwrap())
                    .fold(0.0f64, f64::max);
                assert!(off > 10.0 * worst, "{what}: f32 model's gradients {off:e} away, the f16 one's {worst:e}");
                println!("{what:<40} loss rel err {e:.1e}, worst gradient rel err {worst:.1e} (f32 model: {off:.1e})");
            }
        }
    }
}

#[test]
fn loss_and_gradients_equal_references() {
    for fixture in trained_fixtures() {
        let export = common::graphs_dir().join(fixture);
        for &mode in MODES {
            for param in PARAMS {
                let r = reference(fixture, mode, param);
                let (dir, m) = compile_case(&export, fixture, &options(mode, param, 1.0, 0.0), param);
                assert_eq!(m.family, "bart");
                let names: Vec<&str> = m.trainable.iter().map(|t| t.name.as_str()).collect();
                let want: Vec<String> = r.keys().filter_map(|k| k.strip_prefix("grad.")).map(String::from).collect();
                let mut sorted = names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
                sorted.sort();
                assert_eq!(sorted, want, "{fixture} {mode} {param}: trainable names");
                for t in &m.trainable {
                    assert_eq!(t.shape, r[&t.name].shape(), "{fixture} {mode} {param}: shape of {}", t.name);
                }
                check_bundle(&dir);
                check_grads(&dir, &m, &r, "", &format!("{fixture} {mode} {param}"));
            }
        }
    }
}

#[test]
fn label_smoothing_equals_torch() {
    for fixture in trained_fixtures() {
        let export = common::graphs_dir().join(fixture);
        for &mode in MODES {
            for param in PARAMS {
                let r = reference(fixture, mode, param);
                let opts = options(mode, param, 1.0, LABEL_SMOOTHING);
                let (dir, m) = compile_case(&export, fixture, &opts, &format!("{param}-ls"));
                check_grads(&dir, &m, &r, "ls.", &format!("{fixture} {mode} {param} ε=0.1"));
            }
        }
    }
}

#[test]
fn three_adamw_steps_follow_torch() {
    for fixture in trained_fixtures() {
        let export = common::graphs_dir().join(fixture);
        for &mode in MODES {
            for param in PARAMS {
                let r = reference(fixture, mode, param);
                for (max_norm, prefix) in [(1.0, "train."), (1e-3, "clip.")] {
                    let opts = options(mode, param, max_norm, 0.0);
                    let tag = format!("{param}-{}", prefix.trim_end_matches('.'));
                    let (dir, m) = compile_case(&export, fixture, &opts, &tag);
                    for kind in backends() {
                        three_steps(
                            &dir,
                            &m,
                            &r,
                            prefix,
                            kind,
                            LR,
                            &format!("{fixture} {mode} {param} {prefix} {kind}"),
                        );
                    }
                }
            }
        }
    }
}

/// optimum's merged decoder (an If on use_cache_branch) gives the same graphs' results as decoder_model.onnx.
#[test]
fn merged_decoder_is_accepted() {
    let fixture = "bart-dec-deep";
    let src = common::graphs_dir().join(fixture);
    let dir = out_dir("merged-export");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["encoder_model.onnx", "decoder_model_merged.onnx", "config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    for &mode in MODES {
        let r = reference(fixture, mode, "reparam");
        let (out, m) = compile_case(&dir, fixture, &options(mode, "reparam", 1.0, 0.0), "merged");
        let spec = read_bart_spec(&out).unwrap().expect("a BART bundle has a bart section");
        assert_eq!(spec.decoder_graph, "decoder_model_merged.onnx");
        assert_eq!(spec.mode, mode);
        check_grads(&out, &m, &r, "", &format!("{fixture} (merged decoder) {mode}"));
    }
}

/// The manifest's BART section and the initial prefix file.
#[test]
fn bundle_manifest() {
    let export = common::graphs_dir().join("bart-dec-deep");
    let (dir, m) = compile_case(&export, "bart-dec-deep", &options(BartPrefix::Paper, "reparam", 1.0, 0.0), "manifest");
    let spec = read_bart_spec(&dir).unwrap().unwrap();
    assert_eq!((spec.encoder_layers, spec.decoder_layers, spec.src_len, spec.tgt_len), (1, 2, S, T));
    assert_eq!((spec.pad_token_id, spec.decoder_start_token_id), (1, 2));
    assert_eq!(spec.generators, vec![("enc.".to_string(), 1), ("dec.".to_string(), 2), ("cross.".to_string(), 2)]);
    assert_eq!(m.trainable.len(), 15);
    let init = pfx_runtime::read_safetensors(dir.join("prefix.init.safetensors")).unwrap();
    for t in &m.trainable {
        assert_eq!(init[&t.name].shape(), &t.shape[..], "{}", t.name);
    }
    let read = pfx_compiler::compile::read_manifest(&dir).unwrap();
    assert_eq!(read.family, "bart");
    let io = &read.io["grads"];
    let ins: Vec<&str> = io.inputs.iter().take(3).map(|i| i.name.as_str()).collect();
    assert_eq!(ins, ["input_ids", "attention_mask", "labels"]);
    assert_eq!(io.inputs[0].shape, vec![B, S]);
    assert_eq!(io.inputs[2].shape, vec![B, T]);
}

/// Readable snapshots of the compiled graphs (linked forward = eval_step, grads, train_step), reparam.
#[test]
fn compiled_graph_snapshots() {
    for fixture in FIXTURES.into_iter().chain(["t5-tiny"]) {
        let export = common::graphs_dir().join(fixture);
        for &mode in MODES {
            let c = compile_bart_models(&export, &options(mode, "reparam", 1.0, 0.0)).unwrap();
            for (role, _) in &c.graphs {
                insta::assert_snapshot!(
                    format!("compiled__{fixture}__{mode}__{role}"),
                    common::graph_snapshot(&c.graphs, role)
                );
            }
        }
    }
}

fn compile_err(dir: &Path, opts: &BartOptions) -> String {
    match compile_bart_models(dir, opts) {
        Ok(_) => panic!("compiling {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn errors_are_clear() {
    let g = common::graphs_dir();
    let opts = options(BartPrefix::Paper, "reparam", 1.0, 0.0);
    // A GPT-2 graph given with --bart-prefix.
    let e = compile_err(&g.join("gpt2-optimum/model.onnx"), &opts);
    assert!(e.contains("GPT-2") && e.contains("encoder_model.onnx"), "{e}");
    // A GPT-2 folder.
    let e = compile_err(&g.join("gpt2-optimum"), &opts);
    assert!(e.contains("no encoder_model.onnx"), "{e}");
    // An export folder missing the decoder (with and without the with-past decoder).
    let dir = out_dir("no-decoder");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["encoder_model.onnx", "config.json"] {
        std::fs::copy(g.join("bart-enc-deep").join(f), dir.join(f)).unwrap();
    }
    let e = compile_err(&dir, &opts);
    assert!(e.contains("has no decoder") && e.contains("decoder_model.onnx"), "{e}");
    std::fs::copy(g.join("bart-enc-deep/decoder_with_past_model.onnx"), dir.join("decoder_with_past_model.onnx"))
        .unwrap();
    let e = compile_err(&dir, &opts);
    assert!(e.contains("decoder_with_past_model.onnx alone cannot train"), "{e}");
    // No config.json.
    let dir = out_dir("no-config");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["encoder_model.onnx", "decoder_model.onnx"] {
        std::fs::copy(g.join("bart-enc-deep").join(f), dir.join(f)).unwrap();
    }
    let e = compile_err(&dir, &opts);
    assert!(e.contains("config.json") && e.contains("decoder_start_token_id"), "{e}");
    // Mismatched encoder/decoder hidden sizes: a decoder whose encoder_hidden_states is declared 16 wide.
    let dir = out_dir("mismatch");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["encoder_model.onnx", "config.json"] {
        std::fs::copy(g.join("bart-enc-deep").join(f), dir.join(f)).unwrap();
    }
    let mut dec = pfx_compiler::onnx_io::load(&g.join("bart-dec-deep/decoder_model.onnx")).unwrap();
    let v = dec.graph.inputs.iter_mut().find(|v| v.name == "encoder_hidden_states").unwrap();
    if let Some(s) = v.ty.shape.as_mut() {
        *s.last_mut().unwrap() = pfx_compiler::ir::Dim::Known(16);
    }
    pfx_compiler::onnx_io::save(&dec, &dir.join("decoder_model.onnx"), None).unwrap();
    let e = compile_err(&dir, &opts);
    assert!(e.contains("mismatched hidden sizes") && e.contains("width 32") && e.contains("width 16"), "{e}");
    // S or T beyond the model's 64 positions.
    let export = g.join("bart-enc-deep");
    let e = compile_err(&export, &BartOptions { src_len: 65, ..opts.clone() });
    assert!(e.contains("--src-len 65 exceeds the encoder's 64 positions"), "{e}");
    let e = compile_err(&export, &BartOptions { tgt_len: 65, ..opts.clone() });
    assert!(e.contains("--tgt-len 65") && e.contains("64"), "{e}");
    // PEFT numbers the decoder's tokens after the prefix: T = 61 fits alone but not with P = 4.
    let peft = BartOptions { mode: BartPrefix::Peft, tgt_len: 61, ..opts.clone() };
    let e = compile_err(&export, &peft);
    assert!(e.contains("needs 65 decoder positions") && e.contains("PEFT"), "{e}");
    build_bart_loss_graph(&export, &BartOptions { tgt_len: 61, ..opts.clone() }).expect("T = 61 fits in paper mode");
    // Bad options.
    // Generation beyond the decoder's positions (peft numbers the target after the prefix).
    let long = Some(BartGenShape { rows: 2, src_len: S, max_new: 62 });
    let e = compile_err(&export, &BartOptions { mode: BartPrefix::Peft, generation: long, ..opts.clone() });
    assert!(
        e.contains("--max-new 62 needs 66 decoder positions (the first token's position 4, after the prefix"),
        "{e}"
    );
    let e = compile_err(
        &export,
        &BartOptions { generation: Some(BartGenShape { rows: 0, src_len: S, max_new: 4 }), ..opts.clone() },
    );
    assert!(e.contains("--gen-rows"), "{e}");
    let e = compile_err(&export, &BartOptions { label_smoothing: 1.0, ..opts.clone() });
    assert!(e.contains("--label-smoothing"), "{e}");
    let e = compile_err(&export, &BartOptions { prefix_len: 0, ..opts.clone() });
    assert!(e.contains("--prefix-len"), "{e}");
}

/// M2M100 numbers positions from the token ids in its graphs (real tokens from row pad + 1 of a 66-row sinusoidal
/// table, pads at row pad): pfx reads that off the graphs, so its 64 positions are M2M100's (HF's own table would
/// grow past them; the export's cannot), and PEFT's numbering after the prefix counts against them.
#[test]
fn m2m100_positions_are_read_off_its_graphs() {
    use pfx_compiler::inspect::{numbered_from_ids, position_lookup_sites};
    let export = common::graphs_dir().join("m2m100-tiny");
    for (file, past) in
        [("encoder_model.onnx", false), ("decoder_model.onnx", false), ("decoder_with_past_model.onnx", true)]
    {
        let mut m = pfx_compiler::onnx_io::load(&export.join(file)).unwrap();
        pfx_compiler::canonicalize::canonicalize(&mut m).unwrap();
        let sites = position_lookup_sites(&m.graph);
        assert_eq!(sites.len(), 1, "{file}");
        let n = numbered_from_ids(&m.graph, sites[0]).unwrap_or_else(|| panic!("{file}: not numbered from the ids"));
        assert_eq!((n.pad, n.first_row(), n.past.is_some()), (1, 2, past), "{file}");
        let info = pfx_compiler::inspect::inspect(&m).unwrap();
        assert_eq!((info.position_rows, info.positions), (Some(66), Some(64)), "{file}");
    }
    // BART's lookups are not numbered from the ids.
    let mut bart = pfx_compiler::onnx_io::load(&common::graphs_dir().join("bart-enc-deep/decoder_model.onnx")).unwrap();
    pfx_compiler::canonicalize::canonicalize(&mut bart).unwrap();
    assert!(position_lookup_sites(&bart.graph).iter().all(|&i| numbered_from_ids(&bart.graph, i).is_none()));
    let opts = options(BartPrefix::Paper, "reparam", 1.0, 0.0);
    let e = compile_err(&export, &BartOptions { src_len: 65, ..opts.clone() });
    assert!(e.contains("--src-len 65 exceeds the encoder's 64 positions"), "{e}");
    let peft = BartOptions { mode: BartPrefix::Peft, tgt_len: 61, ..opts.clone() };
    let e = compile_err(&export, &peft);
    assert!(e.contains("needs 65 decoder positions") && e.contains("PEFT"), "{e}");
    build_bart_loss_graph(&export, &BartOptions { tgt_len: 60, ..peft }).expect("P + T = 64 fits");
}

/// The end-of-sequence ids Hugging Face's generate stops at (generation_config.json's, one or a list) are recorded
/// for the decoder's generation too, as for decoder-only models.
#[test]
fn generation_stop_ids_are_recorded() {
    let g = common::graphs_dir();
    let opts = options(BartPrefix::Paper, "reparam", 1.0, 0.0);
    let dir = out_dir("stop-ids");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx", "config.json"] {
        std::fs::copy(g.join("bart-enc-deep").join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("generation_config.json"), r#"{"decoder_start_token_id": 2, "eos_token_id": [2, 7]}"#)
        .unwrap();
    let m = compile_bart(&dir, &opts, &dir.join("bundle")).unwrap();
    assert_eq!(m.eos_token_ids, [2, 7]);
}

/// T5: a config.json that does not describe the export, or heads pfx cannot prefix, is refused naming the file.
#[test]
fn t5_configs_that_do_not_fit_are_refused() {
    let src = common::graphs_dir().join("t5-tiny");
    let opts = options(BartPrefix::Peft, "reparam", 1.0, 0.0);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let with_config = |tag: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let dir = out_dir(&format!("t5-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["encoder_model.onnx", "decoder_model.onnx"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        let mut c = config.clone();
        edit(&mut c);
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        dir
    };
    // Another max distance: the graph's buckets are not the config's (the prefix columns would be wrong).
    let far = with_config("distance", &|c| c["relative_attention_max_distance"] = 128.into());
    let e = compile_err(&far, &opts);
    assert!(e.contains("config.json does not") && e.contains("max_distance 128 gives"), "{e}");
    // None at all: HF's default, said.
    let unset = with_config("no-distance", &|c| {
        c.as_object_mut().unwrap().remove("relative_attention_max_distance");
    });
    let e = compile_err(&unset, &opts);
    assert!(e.contains("max_distance 128 (HF's default: the config sets none)"), "{e}");
    // Heads narrower than d_model / num_heads (t5-3b's layout).
    let wide = with_config("d-kv", &|c| c["d_kv"] = 16.into());
    let e = compile_err(&wide, &opts);
    assert!(e.contains("config.json") && e.contains("d_kv 16 × num_heads 4 = 64 ≠ d_model 32"), "{e}");
    // The same graphs named as another model: refused for the relative bias table, naming T5's way in.
    let other = with_config("bart", &|c| c["model_type"] = "bart".into());
    let e = compile_err(&other, &opts);
    assert!(e.contains("relative position buckets, as T5 has") && e.contains("model_type t5"), "{e}");
}
