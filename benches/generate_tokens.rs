//! Milliseconds per generated token: pfx's prefill + one-token decode over its fixed KV cache, GPT-2 export,
//! prompt 32, 64 new tokens (no early stop), greedy B=1, greedy B=8 and beam 5, as the GPU table asks
//! (the peer there is `../shared/tools/gpu/peft_generate.py`, CUDA only: run it in the same call).
//!
//!     PFX_BENCH_MODEL=/tmp/pfx-bench/gpt2/model.onnx cargo bench --bench generate_tokens
//!
//! Environment: PFX_BENCH_MODEL (a GPT-2 export with past inputs; default /tmp/pfx-bench/gpt2/model.onnx),
//! PFX_BENCH_ENGINE (`ort`, default, `tract`, or a list such as `tract,ort`: the engines take turns run by run
//! on the same bundle, and each row after the first gives its ratio to the first engine), PFX_BENCH_DEVICE
//! (cpu | cuda[:N]), PFX_BENCH_CUDA_GRAPH=1, PFX_BENCH_RUNS (5: the median is reported), PFX_BENCH_CASES
//! (default `1x1,8x1,1x5`: batch x beams), PFX_BENCH_WEIGHTS (`f32`, default, `f16`, or `f32,f16`: a bundle
//! per weight storage, every engine on each, all taking turns).

use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use pfx_compiler::compile::generate::GenShape;
use pfx_compiler::compile::optimizer::AdamW;
use pfx_compiler::compile::storage::WeightStorage;
use pfx_compiler::compile::{compile, CompileOptions};
use pfx_runtime::bundle::Bundle;
use pfx_runtime::generate::{GenConfig, Generator};
use pfx_runtime::{BackendKind, OrtDevice, OrtOptions};

const PROMPT: usize = 32;
const NEW: usize = 64;

fn env(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return Ok(());
    }
    let model = std::path::PathBuf::from(env("PFX_BENCH_MODEL", "/tmp/pfx-bench/gpt2/model.onnx"));
    if !model.exists() {
        println!("generate_tokens: {} not found (benches/make_gpt2_export.py makes it); skipping", model.display());
        return Ok(());
    }
    let kinds: Vec<BackendKind> =
        env("PFX_BENCH_ENGINE", "ort").split(',').map(|k| k.trim().parse()).collect::<Result<_>>()?;
    let storages: Vec<WeightStorage> =
        env("PFX_BENCH_WEIGHTS", "f32").split(',').map(|w| w.trim().parse()).collect::<Result<_>>()?;
    // Every (weights, engine) pair, named "engine" or, with several storages, "engine/f16".
    let variants: Vec<(WeightStorage, BackendKind)> =
        storages.iter().flat_map(|&w| kinds.iter().map(move |&k| (w, k))).collect();
    let names: Vec<String> = variants
        .iter()
        .map(|(w, k)| if storages.len() > 1 { format!("{k}/{}", w.name()) } else { k.to_string() })
        .collect();
    let device: OrtDevice = env("PFX_BENCH_DEVICE", "cpu").parse()?;
    let ort = OrtOptions { device, cuda_graph: env("PFX_BENCH_CUDA_GRAPH", "0") == "1", ..OrtOptions::default() };
    let runs: usize = env("PFX_BENCH_RUNS", "5").parse()?;
    println!(
        "generate_tokens: {} on {} {device}, prompt {PROMPT}, {NEW} new tokens, median of {runs}",
        model.display(),
        names.join(" / ")
    );
    println!("| batch | beams | engine | s per call | ms per token | time vs {} |", names[0]);
    println!("|---|---|---|---|---|---|");
    for case in env("PFX_BENCH_CASES", "1x1,8x1,1x5").split(',') {
        let (b, k) = case.split_once('x').ok_or_else(|| anyhow!("PFX_BENCH_CASES: '{case}' is not BxK"))?;
        let (b, k): (usize, usize) = (b.parse()?, k.parse()?);
        let rows = b * k;
        let mut bundles = Vec::new();
        for &storage in &storages {
            let dir =
                std::env::temp_dir().join(format!("pfx-bench-gen-{}-r{rows}-{}", std::process::id(), storage.name()));
            let opts = CompileOptions {
                prefix_len: 10,
                mid_dim: Some(512),
                batch: 1,
                seq: PROMPT,
                optimizer: AdamW::default(),
                seed: 0,
                generation: Some(GenShape { rows, prompt_len: PROMPT, max_new: NEW }),
                weights: storage,
            };
            compile(&model, &opts, &dir).context("compiling the bench bundle")?;
            bundles.push((storage, dir.clone(), Bundle::open(&dir)?));
        }
        let m = bundles[0].2.manifest.clone();
        let mut gens = Vec::new();
        for &(storage, kind) in &variants {
            let bundle = &bundles.iter().find(|b| b.0 == storage).expect("a bundle per storage").2;
            gens.push(Generator::open(bundle, kind, &ort, bundle.init_prefix()?)?);
        }
        let prompts: Vec<Vec<i64>> =
            (0..b).map(|i| (0..PROMPT).map(|j| ((i * 131 + j * 7919) % m.vocab) as i64).collect()).collect();
        let cfg = GenConfig { max_new: NEW, min_new: NEW, beams: k, eos: None, pad: 0, ..GenConfig::default() };
        let call = |g: &mut Generator| if k > 1 { g.beam_search(&prompts, &cfg) } else { g.greedy(&prompts, &cfg) };
        let mut outputs = Vec::new();
        for g in gens.iter_mut() {
            outputs.push(call(g)?); // warm-up (plans, allocations)
        }
        if outputs.iter().any(|o| o != &outputs[0]) {
            // Expected between weight storages (rounded weights), not between engines on one bundle.
            println!("(batch {b}, beams {k}: the variants generated different tokens)");
        }
        // Engines take turns, so that a slow spell of the machine falls on all of them.
        let mut times = vec![Vec::new(); gens.len()];
        for _ in 0..runs {
            for (g, t) in gens.iter_mut().zip(times.iter_mut()) {
                let start = Instant::now();
                call(g)?;
                t.push(start.elapsed().as_secs_f64());
            }
        }
        let medians: Vec<f64> = times
            .iter_mut()
            .map(|t| {
                t.sort_by(|a, b| a.partial_cmp(b).unwrap());
                t[t.len() / 2]
            })
            .collect();
        for (name, med) in names.iter().zip(&medians) {
            let ratio = med / medians[0];
            println!("| {b} | {k} | {name} | {med:.3} | {:.2} | {ratio:.2}× |", med / NEW as f64 * 1e3);
        }
        drop(gens);
        for (_, dir, _) in &bundles {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    Ok(())
}
