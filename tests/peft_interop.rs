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
    let out = std::env::temp_dir().join(format!("pfx-interop-{}-{mode}-{tag}", std::process::id()));
    let opts = CompileOptions {
        prefix_len: 4,
        mid_dim: if mode == "reparam" { Some(16) } else { None },
        batch: 3,
        seq: 7,
        optimizer: opt,
        seed: 0,
        generation: None,
    };
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
