//! Seconds per prefix-tuning train step on this machine's CPU: pfx on tract, pfx on ONNX Runtime (CPU EP,
//! 2 intra-op threads) and the peer, PyTorch + PEFT (2 threads), on a GPT-2-small-sized random export,
//! B=5, T=64, prefix 10, MLP 512. Each engine runs in its own process (peak RSS = that process's VmHWM).
//!
//! Goal (issue): ORT-CPU >= 1.5x PEFT's throughput, tract >= 1.0x; peak RSS no higher than PEFT's.
//!
//!     /root/.cache/pfx/ref/bin/python benches/make_gpt2_export.py          # once: /tmp/pfx-bench/gpt2
//!     PFX_PEFT_STEP=/work/shared/tools/gpu/peft_step.py cargo bench --bench train_step_cpu
//!
//! Environment: PFX_BENCH_MODEL (default /tmp/pfx-bench/gpt2/model.onnx), PFX_PEFT_STEP (the peer script;
//! the peer is skipped without it), PFX_PEFT_PYTHON (default /root/.cache/pfx/ref/bin/python, else python3),
//! PFX_BENCH_ENGINES (default tract,ort,peft; `ort-host` is ORT with the state through host tensors each step),
//! PFX_BENCH_ROUNDS (default 2: every engine once per round, rounds interleaved), PFX_BENCH_WARMUP (2), PFX_BENCH_STEPS (5), PFX_BENCH_THREADS (2),
//! PFX_BENCH_BUNDLE (reuse this compiled bundle, or compile into it if it has no manifest).
//! The ONNX Runtime library is found as pfxrun finds it (ORT_DYLIB_PATH, else python3's onnxruntime).

#[path = "common/peer.rs"]
mod peer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use pfx_compiler::compile::optimizer::AdamW;
use pfx_compiler::compile::{compile, CompileOptions};
use pfx_runtime::bundle::Bundle;
use pfx_runtime::{state_pairs, BackendKind, HostStateStep, HostTensor, OrtDevice, OrtOptions, StatefulStep};

const DEFAULT_MODEL: &str = "/tmp/pfx-bench/gpt2/model.onnx";
const PREFIX: usize = 10;
const MID: usize = 512;
/// Batch and sequence length: B=5, T=64 (the CPU goal's shapes) unless PFX_BENCH_BATCH / PFX_BENCH_SEQ say.
fn batch() -> usize {
    env_usize("PFX_BENCH_BATCH", 5)
}
fn seq() -> usize {
    env_usize("PFX_BENCH_SEQ", 64)
}

/// Where ONNX Runtime and the peer run: PFX_BENCH_DEVICE = cpu (default) | cuda[:N]; on CUDA, PFX_BENCH_TF32=on|off
/// (ORT's TF32 and the peer's --precision), PFX_BENCH_CUDA_GRAPH=1 (ORT replays a CUDA graph) and
/// PFX_BENCH_PEER_COMPILE=1 (the peer under torch.compile).
fn device() -> Result<OrtDevice> {
    std::env::var("PFX_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into()).parse()
}
fn tf32() -> Option<bool> {
    std::env::var("PFX_BENCH_TF32").ok().map(|v| v == "on" || v == "1")
}
const RESULT_TAG: &str = "PFX_BENCH_RESULT ";

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Peak resident set size of this process (VmHWM), in MiB.
fn peak_rss_mib() -> f64 {
    rss_mib("VmHWM:")
}

/// A line of /proc/self/status (VmHWM: peak RSS, VmRSS: RSS now), in MiB.
fn rss_mib(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// CPU seconds (user + system, all threads) of this process so far.
fn cpu_seconds() -> f64 {
    // /proc/self/stat fields 14 and 15 (utime, stime) in clock ticks (100 per second on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (tick(11) + tick(12)) / 100.0
}

/// A tiny deterministic generator for the random token ids (no extra dependency).
struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

// ------------------------------------------------------------------------------------------- one engine

/// Child process: opens the bundle's train_step on one backend as training does (the step keeps the prefix
/// and moments: host tensors on tract, the session's own buffers on ORT) and runs warm-up + timed steps.
/// Prints one result line.
/// `role` is train_step; other graphs of the bundle (eval_step, grads) can be run by hand to see where memory
/// goes: `train_step_cpu --engine ort --bundle DIR --graph eval_step`.
/// `host_state` (engine `ort-host`): ONNX Runtime with the state going through host tensors every step, the
/// path ORT training took before the state stayed in the session (for an A/B in the same run).
fn run_engine(
    kind: BackendKind,
    host_state: bool,
    dir: &Path,
    role: &str,
    warmup: usize,
    steps: usize,
    threads: usize,
) -> Result<()> {
    let t_open = Instant::now();
    let b = Bundle::open(dir)?;
    // PFX_BENCH_ORT_NOOPT=1: ONNX Runtime's graph optimizations off (to see what they cost in memory).
    let noopt = std::env::var("PFX_BENCH_ORT_NOOPT").map(|v| v == "1").unwrap_or(false);
    let device = device()?;
    let ort = OrtOptions {
        device,
        // Threads matter on the CPU; on a GPU ORT's defaults stay.
        intra_threads: (device == OrtDevice::Cpu).then_some(threads),
        disable_optimizations: noopt,
        tf32: if device == OrtDevice::Cpu { None } else { tf32() },
        cuda_graph: device != OrtDevice::Cpu && std::env::var("PFX_BENCH_CUDA_GRAPH").as_deref() == Ok("1"),
        ..OrtOptions::default()
    };
    // train_step runs as `pfxrun train` runs it: state kept by the step (on ORT: in the session, IoBinding);
    // other graphs run plainly.
    let mut stateful: Option<Box<dyn StatefulStep>> = match (role, host_state) {
        ("train_step", false) => Some(b.open_train_step(kind, &ort)?),
        ("train_step", true) => {
            let pairs = state_pairs(&b.manifest.io["train_step"])?;
            Some(Box::new(HostStateStep::new(b.open_graph(role, kind, &ort)?, pairs)?))
        }
        _ => None,
    };
    let mut g = if stateful.is_none() { Some(b.open_graph(role, kind, &ort)?) } else { None };
    let open_s = t_open.elapsed().as_secs_f64();
    let rss_open = rss_mib("VmRSS:");
    let m = &b.manifest;
    let io = m.io.get(role).ok_or_else(|| anyhow!("the bundle has no {role} graph"))?;
    let vocab = m.vocab.max(2) as u64;
    let mut rng = Lcg(20261127);
    let (bsz, sl) = (batch(), seq());
    let ids: Vec<i64> = (0..bsz * sl).map(|_| rng.below(vocab) as i64).collect();
    let init = b.init_prefix()?;
    let mut state: BTreeMap<String, HostTensor> = BTreeMap::new();
    for i in &io.inputs {
        let t = match (i.role.as_str(), i.name.as_str()) {
            (_, "input_ids") | (_, "labels") => HostTensor::from_i64(vec![bsz, sl], ids.clone())?,
            (_, "attention_mask") => HostTensor::from_i64(vec![bsz, sl], vec![1; bsz * sl])?,
            (_, "lr") => HostTensor::scalar_f32(5e-5),
            (_, "step") => HostTensor::scalar_i64(1),
            ("trainable", n) => init.get(n).cloned().ok_or_else(|| anyhow!("no initial value for {n}"))?,
            ("optimizer_state", _) => HostTensor::zeros(pfx_runtime::DType::F32, i.shape.clone()),
            (role, n) => bail!("train_step input {n} (role {role}): the bench does not know how to feed it"),
        };
        state.insert(i.name.clone(), t);
    }
    if let Some(st) = stateful.as_mut() {
        let init: BTreeMap<String, HostTensor> =
            st.pairs().iter().map(|p| (p.input.clone(), state[&p.input].clone())).collect();
        st.set_state(&init)?;
        for p in st.pairs() {
            state.remove(&p.input);
        }
    }
    let (mut times, mut cpu_times) = (Vec::new(), Vec::new());
    let (mut first_s, mut losses, mut rss_steps) = (0.0, Vec::new(), Vec::new());
    for s in 0..warmup + steps {
        state.insert("step".into(), HostTensor::scalar_i64(s as i64 + 1));
        let (t, c) = (Instant::now(), cpu_seconds());
        let out = match (stateful.as_mut(), g.as_mut()) {
            (Some(st), _) => st.step(&state),
            (None, Some(g)) => g.run(&state),
            (None, None) => unreachable!("one of the two is opened"),
        }
        .with_context(|| format!("{kind} step {}", s + 1))?;
        let (dt, dc) = (t.elapsed().as_secs_f64(), cpu_seconds() - c);
        if s == 0 {
            first_s = dt;
        }
        if s >= warmup {
            times.push(dt);
            cpu_times.push(dc);
        }
        let loss = out.get("loss").map(|l| l.to_f64_vec()[0]).unwrap_or(f64::NAN);
        if !loss.is_finite() {
            bail!("{kind} step {}: loss is {loss}", s + 1);
        }
        losses.push(loss);
        rss_steps.push(rss_mib("VmRSS:").round());
        for (k, v) in out {
            if let Some(to) = k.strip_prefix("new.") {
                state.insert(to.to_string(), v);
            }
        }
    }
    let rss = peak_rss_mib();
    let r = serde_json::json!({
        "engine": if host_state { format!("pfx-{kind}-host") } else { format!("pfx-{kind}") },
        "open_s": open_s,
        "first_step_s": first_s,
        "step_s": times,
        "step_cpu_s": cpu_times,
        "loss_first": losses.first(),
        "loss_last": losses.last(),
        "rss_after_open_mib": rss_open,
        "rss_after_each_step_mib": rss_steps,
        "peak_rss_mib": rss,
    });
    println!("{RESULT_TAG}{r}");
    Ok(())
}

// ------------------------------------------------------------------------------------------ orchestrator

/// One engine's measurements over all rounds.
#[derive(Default, Clone)]
struct Engine {
    /// Wall and CPU seconds of every timed step, all rounds pooled.
    steps: Vec<f64>,
    cpu: Vec<f64>,
    rss: Vec<f64>,
}

/// What one child process reports.
struct Run {
    name: String,
    steps: Vec<f64>,
    cpu: Vec<f64>,
    rss: f64,
    note: String,
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default()
}

fn child_engine(kind: &str, dir: &Path, warmup: usize, steps: usize, threads: usize) -> Result<Run> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args(["--engine", kind, "--bundle"])
        .arg(dir)
        .args(["--warmup", &warmup.to_string(), "--steps", &steps.to_string(), "--threads", &threads.to_string()])
        .output()
        .with_context(|| format!("starting the {kind} child"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("the {kind} child failed ({}):\n{}\n{}", out.status, stdout, String::from_utf8_lossy(&out.stderr));
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(RESULT_TAG))
        .ok_or_else(|| anyhow!("the {kind} child printed no result:\n{stdout}"))?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(Run {
        name: format!("pfx-{kind}"),
        steps: floats(&v["step_s"]),
        cpu: floats(&v["step_cpu_s"]),
        rss: f("peak_rss_mib"),
        note: format!(
            "open {:.1} s, RSS after open {:.0} MiB, first step {:.1} s, loss {:.3} -> {:.3}",
            f("open_s"),
            f("rss_after_open_mib"),
            f("first_step_s"),
            f("loss_first"),
            f("loss_last")
        ),
    })
}

/// The PEFT peer in its own process, torch limited to `threads` threads by benches/peft_step_threads.py.
fn child_peft(peer: &Path, size: &str, warmup: usize, steps: usize, threads: usize) -> Result<Run> {
    let python = peer::python();
    let wrapper = peer::script("peft_step_threads.py")?;
    let (b, s, p, mid) = (batch().to_string(), seq().to_string(), PREFIX.to_string(), MID.to_string());
    let on_gpu = device()? != OrtDevice::Cpu;
    let mut extra: Vec<String> = vec!["--device".into(), if on_gpu { "cuda" } else { "cpu" }.into()];
    if on_gpu {
        extra.extend(["--precision".into(), if tf32() == Some(true) { "tf32" } else { "fp32" }.into()]);
        if std::env::var("PFX_BENCH_PEER_COMPILE").as_deref() == Ok("1") {
            extra.push("--compile".into());
        }
    }
    let (st, wu) = (steps.to_string(), warmup.to_string());
    let out = Command::new(&python)
        .arg(&wrapper)
        .args(["--threads", &threads.to_string()])
        .arg(peer)
        .args(["--size", size, "--batch", &b, "--seq", &s, "--prefix-len", &p, "--mid-dim", &mid])
        .args(&extra)
        .args(["--steps", &st, "--warmup", &wu])
        .output()
        .with_context(|| format!("starting {python}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("the PEFT peer failed ({}):\n{}\n{}", out.status, stdout, String::from_utf8_lossy(&out.stderr));
    }
    let (mut peer_median, mut wrapped) = (None, None);
    for l in stdout.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(l)?;
        if let Some(ms) = v.get("median_ms").and_then(|x| x.as_f64()) {
            peer_median = Some(ms / 1e3);
        }
        if v.get("wrapper").is_some() {
            wrapped = Some(v);
        }
    }
    let (Some(pm), Some(v)) = (peer_median, wrapped) else { bail!("the PEFT peer printed no result:\n{stdout}") };
    let mut steps = floats(&v["step_s"]);
    if steps.is_empty() {
        steps = vec![pm]; // the peer's own median when its clock calls could not be seen
    }
    Ok(Run {
        name: "pytorch-peft".into(),
        cpu: floats(&v["step_cpu_s"]),
        rss: v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
        note: format!(
            "peer's own median {pm:.3} s, torch threads {}, process {} s wall",
            v["torch_threads"], v["process_wall_s"]
        ),
        steps,
    })
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn orchestrate() -> Result<()> {
    let model = PathBuf::from(std::env::var("PFX_BENCH_MODEL").unwrap_or_else(|_| DEFAULT_MODEL.into()));
    if !model.exists() {
        println!(
            "train_step_cpu: {} not found; make it with\n    /root/.cache/pfx/ref/bin/python benches/make_gpt2_export.py \
             --size gpt2 {}\n(or point PFX_BENCH_MODEL at a GPT-2 export with past inputs). Skipping.",
            model.display(),
            model.parent().map(|p| p.display().to_string()).unwrap_or_default()
        );
        return Ok(());
    }
    let (warmup, steps) = (env_usize("PFX_BENCH_WARMUP", 2), env_usize("PFX_BENCH_STEPS", 5).max(1));
    let (rounds, threads) = (env_usize("PFX_BENCH_ROUNDS", 2).max(1), env_usize("PFX_BENCH_THREADS", 2).max(1));
    let engines: Vec<String> = std::env::var("PFX_BENCH_ENGINES")
        .unwrap_or_else(|_| "tract,ort,peft".into())
        .split(',')
        .map(|s| s.trim().to_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    let peer = std::env::var_os("PFX_PEFT_STEP").map(PathBuf::from);
    if engines.iter().any(|e| e == "peft") && peer.as_ref().map(|p| !p.exists()).unwrap_or(true) {
        println!(
            "train_step_cpu: the PEFT peer is skipped: set PFX_PEFT_STEP to peft_step.py (in this project's shared \
             tools: /work/shared/tools/gpu/peft_step.py)"
        );
    }

    let (dir, temporary) = match std::env::var_os("PFX_BENCH_BUNDLE") {
        Some(d) => (PathBuf::from(d), false),
        None => (std::env::temp_dir().join(format!("pfx-bench-train-{}", std::process::id())), true),
    };
    if !dir.join("manifest.json").exists() {
        let opts = CompileOptions {
            prefix_len: PREFIX,
            mid_dim: Some(MID),
            batch: batch(),
            seq: seq(),
            optimizer: AdamW::default(),
            seed: 0,
            generation: None,
            weights: Default::default(),
        };
        let t = Instant::now();
        compile(&model, &opts, &dir).context("compiling the bench bundle")?;
        println!("compiled {} into {} in {:.1} s", model.display(), dir.display(), t.elapsed().as_secs_f64());
    } else {
        let m = pfx_compiler::compile::read_manifest(&dir)?;
        if (m.batch, m.seq_len, m.prefix_len, m.mid_dim) != (batch(), seq(), PREFIX, Some(MID)) {
            bail!("{} was compiled for other shapes; remove it or unset PFX_BENCH_BUNDLE", dir.display());
        }
        println!("reusing the bundle {}", dir.display());
    }
    // The peer builds its own random GPT-2 of a named size: the one with the export's dimensions.
    let m = pfx_compiler::compile::read_manifest(&dir)?;
    let peer_size = match (m.layers, m.hidden, m.heads, m.vocab) {
        (12, 768, 12, 50257) => Some("gpt2"),
        (24, 1024, 16, 50257) => Some("gpt2-medium"),
        (36, 1280, 20, 50257) => Some("gpt2-large"),
        (2, 64, 2, 50257) => Some("tiny"),
        _ => None,
    };
    if peer_size.is_none() && peer.is_some() {
        println!(
            "train_step_cpu: the PEFT peer is skipped: the export ({} layers, {} wide, {} heads, vocabulary {}) is \
             none of peft_step.py's sizes",
            m.layers, m.hidden, m.heads, m.vocab
        );
    }
    println!(
        "train_step_cpu: B={} T={} prefix {PREFIX} MLP {MID} on {}; {rounds} rounds x ({warmup} warm-up + {steps} \
         timed steps) per engine; {threads} threads (ORT intra-op, torch); {} CPUs",
        batch(),
        seq(),
        device()?,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );

    println!("load average before: {}", load_average());
    let mut results: BTreeMap<String, Engine> = BTreeMap::new();
    for round in 1..=rounds {
        for e in &engines {
            let res = match e.as_str() {
                "tract" | "ort" | "ort-host" => child_engine(e, &dir, warmup, steps, threads),
                "peft" => match (&peer, peer_size) {
                    (Some(p), Some(size)) if p.exists() => child_peft(p, size, warmup, steps, threads),
                    _ => continue,
                },
                other => bail!("unknown engine {other} in PFX_BENCH_ENGINES (tract, ort, ort-host, peft)"),
            };
            match res {
                Ok(r) => {
                    println!(
                        "  round {round} {:<13} median {:>9.5} s/step ({:>6.3} CPU s), peak RSS {:>6.0} MiB  ({})",
                        r.name,
                        median(&r.steps),
                        median(&r.cpu),
                        r.rss,
                        r.note
                    );
                    let acc = results.entry(r.name).or_default();
                    acc.steps.extend(r.steps);
                    acc.cpu.extend(r.cpu);
                    acc.rss.push(r.rss);
                }
                Err(err) => println!("  round {round} {e}: FAILED: {err:#}"),
            }
        }
    }
    println!("load average after: {}", load_average());
    if temporary {
        std::fs::remove_dir_all(&dir).ok();
    }

    let stats = |r: &Engine| (median(&r.steps), median(&r.cpu), median(&r.rss));
    let peft = results.get("pytorch-peft").map(stats);
    println!();
    println!(
        "| engine        | s/step (median) | tokens/s | CPU s/step | peak RSS MiB | PEFT time / ours | RSS / PEFT's |"
    );
    println!(
        "|---------------|-----------------|----------|------------|--------------|------------------|--------------|"
    );
    for name in ["pfx-tract", "pfx-ort", "pfx-ort-host", "pytorch-peft"] {
        let Some(r) = results.get(name) else { continue };
        let (med, cpu, rss) = stats(r);
        let (ratio, rss_ratio) = match peft {
            Some((pm, _, pr)) => (format!("{:.2}x", pm / med), format!("{:.2}x", rss / pr)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {name:<13} | {med:>15.5} | {:>8.0} | {cpu:>10.2} | {rss:>12.0} | {ratio:>16} | {rss_ratio:>12} |",
            (batch() * seq()) as f64 / med,
        );
    }
    println!("(medians over all timed steps of all rounds; peak RSS: median over rounds of each process's VmHWM)");
    if let Some((pm, _, pr)) = peft {
        println!();
        for (name, goal) in [("pfx-ort", 1.5), ("pfx-tract", 1.0)] {
            if let Some(r) = results.get(name) {
                let (med, _, rss) = stats(r);
                let x = pm / med;
                let ok = |b: bool| if b { "met" } else { "MISSED" };
                println!(
                    "goal {name}: throughput >= {goal}x PEFT's: {} ({x:.2}x); peak RSS <= PEFT's: {} ({rss:.0} vs {pr:.0} MiB)",
                    ok(x >= goal),
                    ok(rss <= pr)
                );
            }
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    if let Some(kind) = get("--engine") {
        let dir = PathBuf::from(get("--bundle").ok_or_else(|| anyhow!("--engine needs --bundle DIR"))?);
        let n = |f: &str, d: usize| get(f).and_then(|v| v.parse().ok()).unwrap_or(d);
        let role = get("--graph").unwrap_or_else(|| "train_step".into());
        let (kind, host_state) = match kind.strip_suffix("-host") {
            Some(k) => (k.parse()?, true),
            None => (kind.parse()?, false),
        };
        return run_engine(kind, host_state, &dir, &role, n("--warmup", 2), n("--steps", 5), n("--threads", 2));
    }
    orchestrate()
}
