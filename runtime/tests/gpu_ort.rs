//! ONNX Runtime on a GPU: the device-state training step on CUDA (plain, TF32 off; with a CUDA graph) and on
//! TensorRT against the host path on ORT CPU; generation with the KV caches kept in CUDA memory against PEFT. Needs a GPU and `onnxruntime-gpu` (its library found as pfxrun
//! finds it, e.g. ORT_DYLIB_PATH); opt in with PFX_GPU_TESTS=1, elsewhere it passes after saying it skipped:
//!
//!     PFX_GPU_TESTS=1 cargo test -p pfx-runtime --test gpu_ort -- --nocapture --test-threads 1

mod common;

use std::collections::BTreeMap;

use common::state::*;
use pfx_runtime::generate::{GenConfig, Generator};
use pfx_runtime::{
    ort_runtime, state_pairs, BackendKind, HostStateStep, HostTensor, OrtBackend, OrtDevice, OrtOptions, StatefulStep,
};

fn wanted(device: OrtDevice) -> bool {
    if std::env::var("PFX_GPU_TESTS").as_deref() != Ok("1") {
        eprintln!("PFX_GPU_TESTS is not 1: skipping the GPU checks");
        return false;
    }
    let rt = ort_runtime(None).expect("PFX_GPU_TESTS=1 needs onnxruntime-gpu");
    let missing: Vec<_> = device.provider_names().iter().filter(|p| !rt.has_provider(p)).collect();
    if !missing.is_empty() {
        eprintln!("ONNX Runtime {} at {} lacks {missing:?}: skipping {device}", rt.version, rt.lib_path.display());
        return false;
    }
    true
}

/// Four steps on `options` (device state) and on ORT CPU (host state): losses, grad norms and the final state
/// within `tol` (norm-relative).
fn compare_with_cpu(tag: &str, options: OrtOptions, tol: f64) {
    let dir = fresh_dir(&format!("gpu-{tag}"));
    let b = bundle(&dir.join("bundle"));
    let pairs = state_pairs(&b.manifest.io["train_step"]).unwrap();
    let mut gpu = b.open_train_step(BackendKind::Ort, &options).unwrap();
    let cpu_graph = OrtBackend::open(b.graph_path("train_step").unwrap(), &OrtOptions::default()).unwrap();
    let mut cpu = HostStateStep::new(Box::new(cpu_graph), pairs).unwrap();
    let init = initial_state(&b);
    gpu.set_state(&init).unwrap();
    cpu.set_state(&init).unwrap();
    let data = rows(4 * BATCH, b.manifest.vocab);
    for (k, chunk) in data.chunks(BATCH).enumerate() {
        let inputs = step_inputs(chunk, 2e-2, k as i64 + 1);
        let (g, c) = (gpu.step(&inputs).unwrap(), cpu.step(&inputs).unwrap());
        for name in ["loss", "grad_norm"] {
            let (x, y) = (g[name].to_f64_vec()[0], c[name].to_f64_vec()[0]);
            eprintln!("{tag} step {}: {name} {x} ({}) vs {y} (cpu)", k + 1, options.device);
            assert!((x - y).abs() <= tol * y.abs(), "{tag} step {}: {name} {x} vs {y} on the CPU", k + 1);
        }
    }
    let (g, c): (BTreeMap<String, HostTensor>, _) = (gpu.state().unwrap(), cpu.state().unwrap());
    for (name, t) in &c {
        let e = g[name].norm_rel_error(t).unwrap();
        assert!(e <= tol, "{tag}: final `{name}` differs by {e:e}");
    }
}

#[test]
fn cuda_device_state_matches_the_cpu() {
    if wanted(OrtDevice::Cuda(0)) {
        compare_with_cpu(
            "cuda",
            OrtOptions { device: OrtDevice::Cuda(0), tf32: Some(false), ..Default::default() },
            1e-4,
        );
    }
}

#[test]
fn cuda_graph_replay_matches_the_cpu() {
    if wanted(OrtDevice::Cuda(0)) {
        let options =
            OrtOptions { device: OrtDevice::Cuda(0), tf32: Some(false), cuda_graph: true, ..Default::default() };
        compare_with_cpu("cuda-graph", options, 1e-4);
    }
}

#[test]
fn tensorrt_matches_the_cpu() {
    if wanted(OrtDevice::TensorRt(0)) {
        let cache = fresh_dir("trt-cache");
        let options = OrtOptions {
            device: OrtDevice::TensorRt(0),
            trt_cache: Some(cache.clone()),
            allow_cpu_fallback: true,
            ..Default::default()
        };
        compare_with_cpu("tensorrt", options, 1e-3);
        assert!(std::fs::read_dir(&cache).unwrap().next().is_some(), "no engine cached in {}", cache.display());
    }
}

/// Greedy (new rows written into the caches on the device each step) and beam search (rows reordered on the
/// device too) on `options` give PEFT's tokens (the references `tests/generate_peft.rs` checks tract and ORT CPU
/// against).
fn generation_equals_peft(tag: &str, options: OrtOptions) {
    let root = std::env::var_os("PFX_REPO_ROOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    let read = |p: &str| pfx_runtime::read_safetensors(root.join("graphs").join(p)).unwrap();
    let (refs, start) = (read("peft-generate/gpt2-reparam.safetensors"), read("peft/gpt2-reparam.safetensors"));
    // [n, len] ids (-1 past the end) and an optional mask -> one token list per row.
    let ids = |t: &HostTensor, mask: Option<&HostTensor>| -> Vec<Vec<i64>> {
        let (n, len, v) = (t.shape()[0], t.shape()[1], t.as_i64().unwrap());
        let keep = |i: usize| mask.is_none_or(|m| m.as_i64().unwrap()[i] != 0) && v[i] != -1;
        (0..n).map(|r| (r * len..(r + 1) * len).filter(|&i| keep(i)).map(|i| v[i]).collect()).collect()
    };
    let prompts = ids(&refs["prompts"], Some(&refs["prompt_mask"]));
    let dir = fresh_dir(&format!("gpu-generate-{tag}"));
    let b = generation_bundle(&dir.join("bundle"));
    let prefix: BTreeMap<String, HostTensor> =
        b.trainable_names().into_iter().map(|n| (n.clone(), start[&n].clone())).collect();
    let mut g = Generator::open(&b, BackendKind::Ort, &options, prefix).unwrap();
    let greedy = GenConfig { max_new: 8, min_new: 8, beams: 1, eos: Some(95), pad: 95, ..GenConfig::default() };
    let beam = GenConfig { beams: 3, ..greedy.clone() };
    for round in 0..2 {
        // The second round starts from the first one's caches: each prefill must replace them.
        let (g_tokens, b_tokens) = (g.greedy(&prompts, &greedy).unwrap(), g.beam_search(&prompts, &beam).unwrap());
        eprintln!("{tag} generation, round {round}: greedy {g_tokens:?}, beam {b_tokens:?}");
        assert_eq!(g_tokens, ids(&refs["greedy"], None), "{tag}: greedy tokens differ from PEFT's");
        assert_eq!(b_tokens, ids(&refs["beam"], None), "{tag}: beam tokens differ from PEFT's");
    }
}

#[test]
fn cuda_generation_equals_peft() {
    if wanted(OrtDevice::Cuda(0)) {
        generation_equals_peft(
            "cuda",
            OrtOptions { device: OrtDevice::Cuda(0), tf32: Some(false), ..Default::default() },
        );
    }
}

/// The same with the decode graph captured once and replayed: the kept caches are the replay's fixed buffers.
#[test]
fn cuda_graph_generation_equals_peft() {
    if wanted(OrtDevice::Cuda(0)) {
        let options =
            OrtOptions { device: OrtDevice::Cuda(0), tf32: Some(false), cuda_graph: true, ..Default::default() };
        generation_equals_peft("cuda-graph", options);
    }
}
