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
//! (default `1x1,8x1,1x5`: batch x beams; `8x1p`: each of the 8 prompts with a prefix of its own, one batch for
//! pfx, where the peer, which cannot batch different prefixes, generates them one by one), PFX_BENCH_WEIGHTS (`f32`, default, `f16`, or `f32,f16`: a bundle
//! per weight storage, every engine on each, all taking turns).
//!
//! On the CPU, `peft` in PFX_BENCH_ENGINE adds the peer: HF `generate` with a PEFT prefix
//! (`benches/hf_generate_peer.py`, a GPT-2 of the export's sizes, torch on PFX_THREADS threads, default 2), run in
//! its own process after pfx's runs of each case, with PFX_PEFT_PYTHON (default the reference venv's python):
//!
//!     PFX_BENCH_ENGINE=ort,tract,peft PFX_BENCH_RUNS=3 cargo bench --bench generate_tokens

#[path = "common/peer.rs"]
mod peer;

use std::time::Instant;

use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
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
    let engines = env("PFX_BENCH_ENGINE", "ort");
    let with_peer = engines.split(',').any(|k| k.trim() == "peft");
    let kinds: Vec<BackendKind> =
        engines.split(',').map(str::trim).filter(|k| *k != "peft").map(|k| k.parse()).collect::<Result<_>>()?;
    if kinds.is_empty() {
        bail!("PFX_BENCH_ENGINE names no pfx engine (tract, ort): the peer is timed next to one");
    }
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
    if with_peer && device != OrtDevice::Cpu {
        bail!("the `peft` engine is the CPU peer; on a GPU, run ../shared/tools/gpu/peft_generate.py in the same call");
    }
    println!(
        "generate_tokens: {} on {} {device}, prompt {PROMPT}, {NEW} new tokens, median of {runs}",
        model.display(),
        names.join(" / ")
    );
    println!("| batch | beams | engine | s per call | ms per token | time vs {} |", names[0]);
    println!("|---|---|---|---|---|---|");
    for case in env("PFX_BENCH_CASES", "1x1,8x1,1x5").split(',') {
        let (b, k) = case.split_once('x').ok_or_else(|| anyhow!("PFX_BENCH_CASES: '{case}' is not BxK or BxKp"))?;
        let (k, own_prefixes) = k.strip_suffix('p').map_or((k, false), |k| (k, true));
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
        let threads = pfx_runtime::backend::threads_from_env().unwrap_or(2);
        let mut gens = Vec::new();
        for &(storage, kind) in &variants {
            let bundle = &bundles.iter().find(|b| b.0 == storage).expect("a bundle per storage").2;
            let init = bundle.init_prefix()?;
            let mut g = Generator::open(bundle, kind, &ort, init.clone())?;
            if own_prefixes {
                // Prompt i's prefix: the initial one shifted by i / 100 (any values time the same).
                for i in 1..b {
                    let shifted = init
                        .iter()
                        .map(|(n, t)| {
                            let v = t.as_f32()?.iter().map(|x| x + i as f32 / 100.0).collect();
                            Ok((n.clone(), pfx_runtime::HostTensor::from_f32(t.shape().to_vec(), v)?))
                        })
                        .collect::<Result<_>>()?;
                    g.add_prefix(shifted)?;
                }
            }
            gens.push(g);
        }
        let prompts: Vec<Vec<i64>> =
            (0..b).map(|i| (0..PROMPT).map(|j| ((i * 131 + j * 7919) % m.vocab) as i64).collect()).collect();
        let prefix_of = if own_prefixes { (0..b).collect() } else { Vec::new() };
        let cfg =
            GenConfig { max_new: NEW, min_new: NEW, beams: k, eos: None, pad: 0, prefix_of, ..GenConfig::default() };
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
        let mut rows: Vec<(String, f64)> = names.iter().cloned().zip(medians.iter().copied()).collect();
        if with_peer {
            // Its own process, after pfx's runs: the bundles' memory is still held, as it would be in a service.
            let peer = hf_generate_peer(&m, case, runs, threads)?;
            rows.push((format!("hf-peft ({threads} threads)"), peer));
        }
        for (name, med) in &rows {
            let ratio = med / medians[0];
            let batch = if own_prefixes { format!("{b} ({b} prefixes)") } else { b.to_string() };
            println!("| {batch} | {k} | {name} | {med:.3} | {:.2} | {ratio:.2}× |", med / NEW as f64 * 1e3);
        }
        drop(gens);
        for (_, dir, _) in &bundles {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    Ok(())
}

/// The peer's median seconds per call for one case: HF `generate` with a PEFT prefix, a random GPT-2 of the
/// bundle's sizes (`benches/hf_generate_peer.py`).
fn hf_generate_peer(m: &pfx_compiler::compile::Manifest, case: &str, runs: usize, threads: usize) -> Result<f64> {
    let python = peer::python();
    let script = peer::script("hf_generate_peer.py")?;
    let n = |x: usize| x.to_string();
    let out = Command::new(&python)
        .arg(&script)
        .args(["--threads", &n(threads), "--layers", &n(m.layers), "--hidden", &n(m.hidden), "--heads", &n(m.heads)])
        .args(["--vocab", &n(m.vocab), "--prefix", &n(m.prefix_len)])
        .args(["--mid", &n(m.mid_dim.unwrap_or(512)), "--prompt", &n(PROMPT), "--new", &n(NEW)])
        .args(["--cases", case, "--runs", &n(runs)])
        .output()
        .with_context(|| {
            format!("starting {python} (set PFX_PEFT_PYTHON to a python with torch, transformers and peft)")
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("the HF peer failed ({}):\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("median_s")?.as_f64())
        .ok_or_else(|| anyhow!("the HF peer printed no result:\n{stdout}"))
}
