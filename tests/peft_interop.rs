//! PEFT interoperability and the trainer against PyTorch + PEFT:
//! - a prefix exported by pfx as a PEFT adapter holds what PEFT saves for the same prefix (the adapter
//!   `graphs/peft-adapter/peft-saved/` written by PEFT's save_pretrained), with the config keys PEFT needs;
//! - adapters saved by PEFT (one trained by PEFT) import into pfx and give PEFT's loss;
//! - the first 20 steps of `Trainer` (fixed order, linear warm-up schedule, clipping) follow HF + PEFT.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use pfx_compiler::compile::optimizer::AdamW;
use pfx_compiler::compile::{compile, CompileOptions};
use pfx_runtime::bundle::Bundle;
use pfx_runtime::data::Encoded;
use pfx_runtime::train::{TrainConfig, Trainer};
use pfx_runtime::{read_safetensors, BackendKind, HostTensor, OrtOptions};

fn bundle(mode: &str, tag: &str, opt: AdamW) -> PathBuf {
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pfx-interop-{mode}-{tag}"));
    let opts = CompileOptions { optimizer: opt, ..common::gpt2_options((mode == "reparam").then_some(16), None) };
    compile(&common::graphs_dir().join("gpt2-optimum/model.onnx"), &opts, &out).unwrap();
    out
}

fn eval_loss(dir: &PathBuf, prefix: &BTreeMap<String, HostTensor>, batch: &BTreeMap<String, HostTensor>) -> f64 {
    let b = Bundle::open(dir).unwrap();
    let mut g = b.open_graph("eval_step", BackendKind::Tract, &OrtOptions::default()).unwrap();
    let mut inputs = batch.clone();
    inputs.extend(prefix.clone());
    g.run(&inputs).unwrap()["loss"].to_f64_vec()[0]
}

#[test]
fn exported_adapter_matches_what_peft_saves() {
    let dir = bundle("reparam", "export", AdamW::default());
    let b = Bundle::open(&dir).unwrap();
    let prefix = b.read_prefix(&common::graphs_dir().join("peft/gpt2-reparam.safetensors")).unwrap();
    let out = dir.join("adapter");
    pfx_runtime::peft::export_adapter(&b.manifest, &prefix, &out, "graphs/gpt2-tiny/hf").unwrap();
    let ours = read_safetensors(out.join("adapter_model.safetensors")).unwrap();
    let peft =
        read_safetensors(common::graphs_dir().join("peft-adapter/peft-saved/adapter_model.safetensors")).unwrap();
    let e = ours["prompt_embeddings"].norm_rel_error(&peft["prompt_embeddings"]).unwrap();
    assert!(e < 1e-6, "prompt_embeddings differ from PEFT's by {e:e}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "PREFIX_TUNING");
    assert_eq!(cfg["task_type"], "CAUSAL_LM", "without task_type PEFT silently ignores the prefix");
    assert_eq!(cfg["num_virtual_tokens"], 4);
    // Our own export imports back into a --no-reparam bundle and gives PEFT's loss.
    let nr = bundle("noreparam", "export", AdamW::default());
    let back = pfx_runtime::peft::import_adapter(&Bundle::open(&nr).unwrap().manifest, &out).unwrap();
    let r = read_safetensors(common::graphs_dir().join("peft-adapter/reference.safetensors")).unwrap();
    let l = eval_loss(&nr, &back, &r);
    assert!((l - r["loss"].to_f64_vec()[0]).abs() < 1e-5, "loss {l} vs PEFT {}", r["loss"].to_f64_vec()[0]);
}

#[test]
fn peft_adapters_import_with_peft_loss() {
    let nr = bundle("noreparam", "import", AdamW::default());
    let m = Bundle::open(&nr).unwrap().manifest;
    for (folder, reference) in [("peft-saved", "reference"), ("peft-trained", "peft-trained.reference")] {
        let p = pfx_runtime::peft::import_adapter(&m, &common::graphs_dir().join("peft-adapter").join(folder)).unwrap();
        let r = read_safetensors(common::graphs_dir().join(format!("peft-adapter/{reference}.safetensors"))).unwrap();
        let l = eval_loss(&nr, &p, &r);
        let want = r["loss"].to_f64_vec()[0];
        assert!((l - want).abs() / want < 1e-5, "{folder}: loss {l} vs PEFT {want}");
    }
    // A reparam bundle refuses an MLP-applied adapter with a clear message.
    let rp = bundle("reparam", "import", AdamW::default());
    let err = pfx_runtime::peft::import_adapter(
        &Bundle::open(&rp).unwrap().manifest,
        &common::graphs_dir().join("peft-adapter/peft-saved"),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("--no-reparam"), "{err:#}");
}

/// BART: PEFT's SEQ_2_SEQ_LM adapters (graphs/bart-ref/make_bart_adapter.py) import into a `--bart-prefix peft
/// --no-reparam` bundle and give PEFT's loss, and PEFT's logits through the generation graphs (teacher-forced on
/// the decoder inputs PEFT derived from the labels); pfx exports them back as PEFT saves them; paper-layout
/// bundles refuse adapters.
#[test]
fn bart_peft_adapters_give_peft_loss_and_logits() {
    use pfx_compiler::compile::bart::{compile_bart, read_bart_spec, BartPrefix};
    use pfx_compiler::compile::bart_generate::BartGenShape;
    use pfx_runtime::generate::GenConfig;
    use pfx_runtime::seq2seq::Seq2SeqGenerator;
    for fixture in ["bart-enc-deep", "bart-dec-deep"] {
        let compile_mode = |mode: BartPrefix| {
            let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pfx-interop-{fixture}-{mode}"));
            let opts = common::bart_options(mode, None, Some(BartGenShape { rows: 3, src_len: 7, max_new: 6 }));
            compile_bart(&common::graphs_dir().join(fixture), &opts, &out).unwrap();
            out
        };
        let dir = compile_mode(BartPrefix::Peft);
        let b = Bundle::open(&dir).unwrap();
        let adapter = common::graphs_dir().join(format!("bart-ref/adapter-{fixture}"));
        let prefix = pfx_runtime::peft::import_adapter(&b.manifest, &adapter).unwrap();
        let r =
            read_safetensors(common::graphs_dir().join(format!("bart-ref/adapter-{fixture}.reference.safetensors")))
                .unwrap();
        let l = eval_loss(&dir, &prefix, &r);
        let want = r["loss"].to_f64_vec()[0];
        assert!((l - want).abs() / want < 1e-5, "{fixture}: loss {l} vs PEFT {want}");
        // Logits: decoder inputs = start token, then the labels with -100 as pad (HF's shift_tokens_right).
        let spec = read_bart_spec(&dir).unwrap().unwrap();
        let ort = OrtOptions::default();
        let mut g = Seq2SeqGenerator::new(
            b.open_graph("encode", BackendKind::Tract, &ort).unwrap(),
            None,
            b.open_graph("decode", BackendKind::Tract, &ort).unwrap(),
            spec.generation.clone().unwrap(),
            prefix.clone(),
            spec.decoder_start_token_id,
        );
        let (ids, mask, labels) =
            (r["input_ids"].as_i64().unwrap(), r["attention_mask"].as_i64().unwrap(), r["labels"].as_i64().unwrap());
        let sources: Vec<Vec<i64>> =
            (0..3).map(|i| (0..7).filter(|&j| mask[i * 7 + j] == 1).map(|j| ids[i * 7 + j]).collect()).collect();
        let fed: Vec<Vec<i64>> = (0..3)
            .map(|i| (0..6).map(|j| labels[i * 6 + j]).map(|t| if t == -100 { spec.pad_token_id } else { t }).collect())
            .collect();
        let cfg = GenConfig { pad: spec.pad_token_id, ..GenConfig::default() };
        let got: Vec<f32> = g.forced_logits(&sources, &fed, &cfg).unwrap().into_iter().flatten().flatten().collect();
        let want_logits = r["logits"].as_f32().unwrap();
        assert_eq!(got.len(), want_logits.len());
        let worst = got.iter().zip(want_logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "{fixture}: logits off PEFT's by {worst}");
        // Exported back: the same table, PEFT's seq2seq config.
        let out = dir.join("adapter");
        pfx_runtime::peft::export_adapter(&b.manifest, &prefix, &out, &format!("graphs/{fixture}/hf")).unwrap();
        let ours = read_safetensors(out.join("adapter_model.safetensors")).unwrap();
        assert_eq!(ours["prompt_embeddings"], r["prompt_embeddings"], "{fixture}: exported table");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(
            (cfg["task_type"].as_str(), cfg["num_transformer_submodules"].as_i64()),
            (Some("SEQ_2_SEQ_LM"), Some(2))
        );
        // The paper layout has no PEFT form.
        let paper = Bundle::open(compile_mode(BartPrefix::Paper)).unwrap();
        let err = pfx_runtime::peft::import_adapter(&paper.manifest, &adapter).unwrap_err();
        assert!(format!("{err:#}").contains("--bart-prefix peft"), "{err:#}");
        println!("{fixture}: PEFT adapter loss {l:.6} (PEFT {want:.6}), logits max |Δ| {worst:.1e}");
    }
}

#[test]
fn first_twenty_training_steps_follow_hf_and_peft() {
    let r = read_safetensors(common::graphs_dir().join("peft-train/reference.safetensors")).unwrap();
    let dir = bundle("reparam", "train20", AdamW { weight_decay: 0.0, max_grad_norm: Some(1.0), ..AdamW::default() });
    let b = Bundle::open(&dir).unwrap();
    let prefix = b.read_prefix(&common::graphs_dir().join("peft/gpt2-reparam.safetensors")).unwrap();
    let get = |k: &str| r[k].as_i64().unwrap().to_vec();
    let (ids, mask, labels) = (get("rows.input_ids"), get("rows.attention_mask"), get("rows.labels"));
    let rows: Vec<Encoded> = (0..12)
        .map(|i| Encoded {
            input_ids: ids[i * 7..(i + 1) * 7].to_vec(),
            attention_mask: mask[i * 7..(i + 1) * 7].to_vec(),
            labels: labels[i * 7..(i + 1) * 7].to_vec(),
        })
        .collect();
    let out = dir.join("train");
    let cfg = TrainConfig {
        epochs: 5,
        lr: 0.01,
        warmup_steps: 3,
        seed: 0,
        checkpoint_every: 0,
        out_dir: out.clone(),
        max_steps: None,
        progress: false,
        shuffle: false,
    };
    let mut t =
        Trainer::new(b, BackendKind::Tract, &OrtOptions::default(), prefix, false, Arc::new(AtomicBool::new(false)))
            .unwrap();
    let losses = t.train(&cfg, &rows, None).unwrap();
    let want = r["losses"].to_f64_vec();
    assert_eq!(losses.len(), 20);
    for (k, (a, b)) in losses.iter().zip(&want).enumerate() {
        assert!((a - b).abs() / b.abs() <= 1e-4, "step {}: loss {a} vs HF+PEFT {b}", k + 1);
    }
    for (name, v) in t.prefix().unwrap() {
        let e = v.norm_rel_error(&r[&format!("final.{name}")]).unwrap();
        assert!(e <= 1e-4, "final {name}: rel err {e:e}");
    }
    assert!(
        out.join("metrics.jsonl").exists()
            && out.join("loss.svg").exists()
            && out.join("checkpoint.safetensors").exists()
    );
}
