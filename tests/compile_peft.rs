//! Issue 3's acceptance: compiled prefix-tuning graphs equal PyTorch + PEFT (references made by
//! `graphs/peft/make_peft_references.py` on the same tiny GPT-2), on every GPT-2 export, with and without
//! reparametrization, on tract and on ONNX Runtime: loss, gradients, and three AdamW steps (also with clipping
//! that fires). With `--weights f16`, the loss and gradients equal PEFT's on the same model with its weight
//! matrices rounded to f16.

mod common;

use common::{backends, check_bundle};

use common::{check_norm, rel, run, scalar, three_steps};

use std::collections::BTreeMap;
use std::path::PathBuf;

use pfx_compiler::compile::optimizer::AdamW;
use pfx_compiler::compile::storage::WeightStorage;
use pfx_compiler::compile::{compile, CompileOptions, Manifest};
use pfx_runtime::{open, HostTensor, OrtOptions};

const FIXTURES: &[&str] = &["gpt2-dynamo", "gpt2-dynamo-past", "gpt2-legacy", "gpt2-optimum", "gpt2-optimum-nopast"];
const LR: f32 = 0.01;
const WD: f32 = 0.01;

fn reference(mode: &str) -> BTreeMap<String, HostTensor> {
    pfx_runtime::read_safetensors(common::graphs_dir().join(format!("peft/gpt2-{mode}.safetensors"))).unwrap()
}

/// PEFT's values on the tiny GPT-2 with every weight matrix rounded to f16 (`--weights f16` in the script).
fn reference_f16(mode: &str) -> BTreeMap<String, HostTensor> {
    pfx_runtime::read_safetensors(common::graphs_dir().join(format!("peft/gpt2-{mode}-f16.safetensors"))).unwrap()
}

fn compile_fixture(fixture: &str, mode: &str, max_norm: f32, tag: &str) -> (PathBuf, Manifest) {
    compile_fixture_with(fixture, mode, max_norm, tag, WeightStorage::F32)
}

fn compile_fixture_with(
    fixture: &str,
    mode: &str,
    max_norm: f32,
    tag: &str,
    weights: WeightStorage,
) -> (PathBuf, Manifest) {
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pfx-peft-{fixture}-{mode}-{tag}"));
    let opts = CompileOptions {
        optimizer: AdamW { weight_decay: WD, max_grad_norm: Some(max_norm), ..AdamW::default() },
        weights,
        ..common::gpt2_options((mode == "reparam").then_some(16), None)
    };
    let model = common::graphs_dir().join(fixture).join("model.onnx");
    let m = compile(&model, &opts, &out).unwrap_or_else(|e| panic!("compiling {fixture}: {e:#}"));
    (out, m)
}

#[test]
fn loss_and_gradients_equal_peft() {
    for mode in ["reparam", "noreparam"] {
        let r = reference(mode);
        for fixture in FIXTURES {
            let (dir, m) = compile_fixture(fixture, mode, 1.0, "grads");
            let names: Vec<String> = m.trainable.iter().map(|t| t.name.clone()).collect();
            check_bundle(&dir);
            for kind in backends() {
                let what = format!("{fixture} {mode} {kind}");
                let mut b = open(dir.join("grads.onnx"), kind, &OrtOptions::default()).unwrap();
                let out = run(&mut b, &r, &what);
                let e = rel(scalar(&out["loss"]), scalar(&r["loss"]));
                assert!(e <= 1e-5, "{what}: loss {} vs PEFT {} (rel {e:e})", scalar(&out["loss"]), scalar(&r["loss"]));
                let mut worst = 0.0f64;
                for n in &names {
                    let g = format!("grad.{n}");
                    worst = worst.max(check_norm(&format!("{what} {g}"), &out[&g], &r[&g], 1e-4));
                }
                // The eval graph gives the same loss.
                let mut ev = open(dir.join("eval_step.onnx"), kind, &OrtOptions::default()).unwrap();
                let el = scalar(&run(&mut ev, &r, &what)["loss"]);
                assert!(rel(el, scalar(&r["loss"])) <= 1e-5, "{what}: eval loss {el}");
                println!("{what:<36} loss rel err {e:.1e}, worst gradient rel err {worst:.1e}");
            }
        }
    }
}

#[test]
fn f16_weights_give_peft_loss_and_gradients_on_the_rounded_model() {
    for mode in ["reparam", "noreparam"] {
        let (r16, r32) = (reference_f16(mode), reference(mode));
        for fixture in FIXTURES {
            let (dir, m) = compile_fixture_with(fixture, mode, 1.0, "f16", WeightStorage::F16);
            assert_eq!(m.weights_dtype, WeightStorage::F16);
            check_bundle(&dir);
            let names: Vec<String> = m.trainable.iter().map(|t| t.name.clone()).collect();
            for kind in backends() {
                let what = format!("{fixture} {mode} f16 {kind}");
                let mut b = open(dir.join("grads.onnx"), kind, &OrtOptions::default()).unwrap();
                let out = run(&mut b, &r16, &what);
                let e = rel(scalar(&out["loss"]), scalar(&r16["loss"]));
                assert!(
                    e <= 1e-6,
                    "{what}: loss {} vs PEFT {} (rel {e:e})",
                    scalar(&out["loss"]),
                    scalar(&r16["loss"])
                );
                let mut worst = 0.0f64;
                for n in &names {
                    let g = format!("grad.{n}");
                    worst = worst.max(check_norm(&format!("{what} {g}"), &out[&g], &r16[&g], 2e-5));
                    // The rounding is visible: the f32 model's gradients are farther off than the tolerance.
                    let off = out[&g].norm_rel_error(&r32[&g]).unwrap();
                    assert!(
                        off > 1e-4,
                        "{what} {g}: as close to the f32 model's gradient ({off:e}) as to the f16 one's"
                    );
                }
                println!("{what:<40} loss rel err {e:.1e}, worst gradient rel err {worst:.1e}");
            }
        }
    }
}

#[test]
fn three_adamw_steps_follow_torch() {
    for mode in ["reparam", "noreparam"] {
        let r = reference(mode);
        for fixture in FIXTURES {
            for (max_norm, prefix) in [(1.0, "train."), (1e-3, "clip.")] {
                let (dir, m) = compile_fixture(fixture, mode, max_norm, prefix.trim_end_matches('.'));
                for kind in backends() {
                    three_steps(&dir, &m, &r, prefix, kind, LR, &format!("{fixture} {mode} {prefix} {kind}"));
                }
            }
        }
    }
}

/// Readable snapshots of every compiled graph (reparam, P=4, M=16, B=3, T=7; generation graphs where the
/// export has past inputs).
/// `--weights f16` on a decode graph: the matrices of 4096 values or more stored in f16 behind a Cast, the
/// smaller ones rounded in f32, vectors untouched.
#[test]
fn f16_storage_snapshot() {
    let generation = Some(pfx_compiler::compile::generate::GenShape { rows: 2, prompt_len: 6, max_new: 4 });
    let opts = CompileOptions { weights: WeightStorage::F16, ..common::gpt2_options(Some(16), generation) };
    let model = common::graphs_dir().join("gpt2-dynamo-past").join("model.onnx");
    let mut c = pfx_compiler::compile::compile_models(&model, &opts).unwrap();
    let (_, decode) = c.graphs.iter_mut().find(|(role, _)| role == "decode").unwrap();
    let stored = pfx_compiler::compile::storage::store_weights(&mut decode.graph, WeightStorage::F16);
    assert_eq!(stored, 4, "the MLP matrices of both layers (32 x 128 and 128 x 32) reach 4096 values");
    insta::assert_snapshot!("f16_storage__gpt2-dynamo-past__decode", pfx_compiler::text::model_text(decode));
}

#[test]
fn compiled_graph_snapshots() {
    for fixture in FIXTURES {
        let generation = Some(pfx_compiler::compile::generate::GenShape { rows: 2, prompt_len: 6, max_new: 4 });
        let opts = CompileOptions {
            optimizer: AdamW { weight_decay: WD, ..AdamW::default() },
            ..common::gpt2_options(Some(16), generation)
        };
        let model = common::graphs_dir().join(fixture).join("model.onnx");
        let c = pfx_compiler::compile::compile_models(&model, &opts).unwrap();
        for (role, _) in &c.graphs {
            insta::assert_snapshot!(format!("compiled__{fixture}__{role}"), common::graph_snapshot(&c.graphs, role));
        }
    }
}
