//! A small training bundle and deterministic batches for the train-step tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pfx_compiler::compile::generate::GenShape;
use pfx_compiler::compile::optimizer::AdamW;
use pfx_compiler::compile::{compile, CompileOptions};
use pfx_runtime::bundle::Bundle;
use pfx_runtime::data::Encoded;
use pfx_runtime::HostTensor;

pub const BATCH: usize = 3;
pub const SEQ: usize = 7;

pub fn fresh_dir(name: &str) -> PathBuf {
    let d = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pfx-ort-state-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small bundle of the random GPT-2 fixture (with clipping, so grad_norm matters).
pub fn bundle(dir: &Path) -> Bundle {
    bundle_with(dir, None)
}

/// [`bundle`] with generation graphs for 3 rows, prompts of up to 6 tokens and 8 new ones.
pub fn generation_bundle(dir: &Path) -> Bundle {
    bundle_with(dir, Some(GenShape { rows: 3, prompt_len: 6, max_new: 8 }))
}

fn bundle_with(dir: &Path, generation: Option<GenShape>) -> Bundle {
    let opts = CompileOptions {
        prefix_len: 4,
        mid_dim: Some(16),
        batch: BATCH,
        seq: SEQ,
        optimizer: AdamW { weight_decay: 0.01, max_grad_norm: Some(0.5), ..AdamW::default() },
        seed: 5,
        generation,
        weights: Default::default(),
    };
    // PFX_REPO_ROOT: where the fixtures are when the test binary runs away from its build tree (the GPU machine).
    let root = std::env::var_os("PFX_REPO_ROOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    compile(&root.join("graphs/gpt2-optimum/model.onnx"), &opts, dir).unwrap();
    Bundle::open(dir).unwrap()
}

/// Deterministic rows: ids spread over the vocabulary, the last two tokens of some rows padding.
pub fn rows(n: usize, vocab: usize) -> Vec<Encoded> {
    (0..n)
        .map(|r| {
            let real = if r % 2 == 0 { SEQ } else { SEQ - 2 };
            let ids: Vec<i64> = (0..SEQ).map(|t| ((r * 31 + t * 17 + 5) % vocab) as i64).collect();
            Encoded {
                input_ids: ids.clone(),
                attention_mask: (0..SEQ).map(|t| (t < real) as i64).collect(),
                labels: (0..SEQ).map(|t| if t >= 2 && t < real { ids[t] } else { -100 }).collect(),
            }
        })
        .collect()
}

pub fn step_inputs(rows: &[Encoded], lr: f32, step: i64) -> BTreeMap<String, HostTensor> {
    let cat = |f: &dyn Fn(&Encoded) -> &Vec<i64>| rows.iter().flat_map(|r| f(r).iter().copied()).collect::<Vec<_>>();
    let mut m = BTreeMap::new();
    m.insert("input_ids".to_string(), HostTensor::from_i64(vec![BATCH, SEQ], cat(&|r| &r.input_ids)).unwrap());
    m.insert(
        "attention_mask".to_string(),
        HostTensor::from_i64(vec![BATCH, SEQ], cat(&|r| &r.attention_mask)).unwrap(),
    );
    m.insert("labels".to_string(), HostTensor::from_i64(vec![BATCH, SEQ], cat(&|r| &r.labels)).unwrap());
    m.insert("lr".to_string(), HostTensor::scalar_f32(lr));
    m.insert("step".to_string(), HostTensor::scalar_i64(step));
    m
}

pub fn initial_state(b: &Bundle) -> BTreeMap<String, HostTensor> {
    let mut state = b.init_prefix().unwrap();
    for t in &b.manifest.trainable {
        let zeros = HostTensor::from_f32(t.shape.clone(), vec![0.0; t.shape.iter().product()]).unwrap();
        state.insert(format!("adam.m.{}", t.name), zeros.clone());
        state.insert(format!("adam.v.{}", t.name), zeros);
    }
    state
}

pub fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

pub fn assert_states_close(what: &str, a: &BTreeMap<String, HostTensor>, b: &BTreeMap<String, HostTensor>, tol: f64) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}: state names");
    for (name, x) in a {
        let e = x.norm_rel_error(&b[name]).unwrap();
        assert!(e <= tol, "{what}: `{name}` differs by {e:e} (norm-relative)");
    }
}
