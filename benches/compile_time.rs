//! Compile time of a GPT-2-small-sized export against the time to read and write its weights once.
//!
//! Goal (issue): `pfxc compile` takes at most 2x the I/O time. See benches/README.md.
//!
//!     /root/.cache/pfx/ref/bin/python benches/make_gpt2_export.py          # once: /tmp/pfx-bench/gpt2
//!     cargo bench --bench compile_time
//!
//! Environment: PFX_BENCH_MODEL (default /tmp/pfx-bench/gpt2/model.onnx), PFX_BENCH_RUNS (default 3),
//! PFX_BENCH_PHASES=0 to skip the one-off phase breakdown.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use pfx_compiler::autodiff::build_gradients_from;
use pfx_compiler::compile::loss::{add_hidden_gradient, LossSpec};
use pfx_compiler::compile::optimizer::AdamW;
use pfx_compiler::compile::{build_loss_graph, compile, compile_models, CompileOptions};
use pfx_compiler::onnx_io::{self, WeightsFile};
use pfx_compiler::simplify::simplify;
use pfx_compiler::specialize::{specialize, Dims};

const DEFAULT_MODEL: &str = "/tmp/pfx-bench/gpt2/model.onnx";
const PREFIX: usize = 10;
const MID: usize = 512;
const BATCH: usize = 5;
const SEQ: usize = 64;

fn options() -> CompileOptions {
    CompileOptions {
        prefix_len: PREFIX,
        mid_dim: Some(MID),
        batch: BATCH,
        seq: SEQ,
        optimizer: AdamW::default(),
        seed: 0,
        generation: None,
        weights: Default::default(),
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// Peak resident set size of this process so far (VmHWM), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map(|rd| rd.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
}

/// The I/O floor: the export read once (weights included) and written once with its weights in a shared
/// external-data file, exactly as the compiler reads and writes.
fn io_once(model: &Path, out: &Path) -> Result<f64> {
    let t = Instant::now();
    let m = onnx_io::load(model)?;
    let mut w = WeightsFile::create(&out.join("weights.bin"))?;
    onnx_io::save(&m, &out.join("model.onnx"), Some(&mut w))?;
    drop(w);
    Ok(secs(t))
}

fn compile_once(model: &Path, out: &Path) -> Result<f64> {
    let t = Instant::now();
    compile(model, &options(), out)?;
    Ok(secs(t))
}

/// One compile, split into the phases the public API exposes (each phase timed on its own; load, canonicalize,
/// specialize and inspect run again inside build_loss_graph, so its own share is the difference; likewise
/// compile_models contains build_loss_graph).
fn phases(model: &Path, out: &Path) -> Result<Vec<(&'static str, f64)>> {
    let opts = options();
    let mut p = Vec::new();
    let t = Instant::now();
    let mut m = onnx_io::load(model)?;
    let load = secs(t);
    p.push(("load (onnx_io::load)", load));
    let t = Instant::now();
    pfx_compiler::canonicalize::canonicalize(&mut m)?;
    let canon = secs(t);
    p.push(("canonicalize", canon));
    let t = Instant::now();
    specialize(&mut m, &Dims { batch: BATCH, seq: SEQ, past: Some(PREFIX), src_len: None })?;
    let spec = secs(t);
    p.push(("specialize", spec));
    drop(m);
    let raw = onnx_io::load(model)?;
    let t = Instant::now();
    pfx_compiler::inspect::inspect(&raw)?;
    let insp = secs(t);
    p.push(("inspect (dimensions, tied LM head)", insp));
    drop(raw);
    let t = Instant::now();
    let (eval, shape, _, _) = build_loss_graph(model, &opts)?;
    let loss_graph = secs(t);
    p.push(("prefix + simplify + loss (build_loss_graph - the 4 above)", loss_graph - load - canon - spec - insp));
    let names: Vec<String> = shape.trainables("").into_iter().map(|t| t.0).collect();
    let mut g = eval.clone();
    let t = Instant::now();
    // As the compiler does: the backward pass starts at the LM head's input in closed form.
    let spec = LossSpec { logits: "logits".into(), shift: true, smoothing: 0.0 };
    let (root, droot) = add_hidden_gradient(&mut g.graph, &spec)?.ok_or_else(|| anyhow!("no closed-form start"))?;
    build_gradients_from(&mut g.graph, &root, &droot, &names)?;
    p.push(("autodiff (closed-form start + build_gradients_from)", secs(t)));
    let t = Instant::now();
    simplify(&mut g.graph)?;
    p.push(("simplify the gradient graph (once)", secs(t)));
    drop((g, eval));
    let t = Instant::now();
    let c = compile_models(model, &opts)?;
    let all = secs(t);
    p.push(("compile_models - build_loss_graph (grads + AdamW + 2 simplify)", all - loss_graph));
    let t = Instant::now();
    let mut w = WeightsFile::create(&out.join("weights.bin"))?;
    for (role, m) in &c.graphs {
        onnx_io::save(m, &out.join(format!("{role}.onnx")), Some(&mut w))?;
    }
    drop(w);
    p.push(("save the 3 graphs + weights.bin", secs(t)));
    Ok(p)
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; nothing to parse.
    let model = PathBuf::from(std::env::var("PFX_BENCH_MODEL").unwrap_or_else(|_| DEFAULT_MODEL.into()));
    if !model.exists() {
        println!(
            "compile_time: {} not found; make it with\n    /root/.cache/pfx/ref/bin/python benches/make_gpt2_export.py \
             --size gpt2 {}\n(or point PFX_BENCH_MODEL at a GPT-2 export with past inputs). Skipping.",
            model.display(),
            model.parent().map(|p| p.display().to_string()).unwrap_or_default()
        );
        return Ok(());
    }
    let runs: usize = std::env::var("PFX_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    let work = std::env::temp_dir().join(format!("pfx-bench-compile-{}", std::process::id()));
    let (io_dir, out_dir) = (work.join("io"), work.join("bundle"));
    std::fs::create_dir_all(&io_dir)?;
    std::fs::create_dir_all(&out_dir)?;
    let data_bytes: u64 = dir_size(model.parent().unwrap_or(Path::new(".")));
    println!(
        "compile_time: {} ({:.0} MB on disk), prefix {PREFIX}, mid {MID}, batch {BATCH}, seq {SEQ}, {runs} runs",
        model.display(),
        data_bytes as f64 / 1e6
    );

    // Interleaved, so that noise on this shared machine hits both alike.
    let (mut io, mut comp) = (Vec::new(), Vec::new());
    for r in 0..runs {
        let a = io_once(&model, &io_dir).context("I/O baseline")?;
        let b = compile_once(&model, &out_dir).context("compile")?;
        println!("  run {}: I/O {a:.2} s, compile {b:.2} s", r + 1);
        io.push(a);
        comp.push(b);
    }
    let bundle_bytes = dir_size(&out_dir);
    let (io_m, comp_m) = (median(&io), median(&comp));

    // Node counts.
    let raw = onnx_io::load(&model)?;
    let raw_nodes = raw.graph.nodes.len();
    drop(raw);
    let mut fwd = pfx_compiler::load_canonical(&model)?;
    let canon_nodes = fwd.graph.nodes.len();
    specialize(&mut fwd, &Dims { batch: BATCH, seq: SEQ, past: Some(PREFIX), src_len: None })?;
    let spec_nodes = fwd.graph.node_count_deep();
    drop(fwd);
    let c = compile_models(&model, &options())?;
    let counts: BTreeMap<String, usize> =
        c.graphs.iter().map(|(r, m)| (r.clone(), m.graph.node_count_deep())).collect();
    drop(c);

    let row = |k: &str, v: String| println!("| {k:<45} | {v:>10} |");
    println!();
    println!("| {:<45} | {:>10} |", format!("measure (median of {runs})"), "value");
    println!("|{}|{}|", "-".repeat(47), "-".repeat(12));
    row("I/O: load + save with WeightsFile", format!("{io_m:.2} s"));
    row(&format!("compile (prefix {PREFIX}, mid {MID}, B {BATCH}, T {SEQ})"), format!("{comp_m:.2} s"));
    row("compile / I/O (goal <= 2.0)", format!("{:.2} x", comp_m / io_m));
    row("export on disk (graph + weights)", format!("{:.0} MB", data_bytes as f64 / 1e6));
    row("bundle on disk (3 graphs + weights.bin)", format!("{:.0} MB", bundle_bytes as f64 / 1e6));
    println!();
    println!("| {:<45} | {:>10} |", "graph", "nodes");
    println!("|{}|{}|", "-".repeat(47), "-".repeat(12));
    row("export as read", raw_nodes.to_string());
    row("canonical", canon_nodes.to_string());
    row(&format!("specialized forward (B {BATCH}, T {SEQ}, past {PREFIX})"), spec_nodes.to_string());
    for role in ["eval_step", "grads", "train_step"] {
        if let Some(n) = counts.get(role) {
            row(role, n.to_string());
        }
    }
    let verdict = if comp_m <= 2.0 * io_m { "met" } else { "MISSED" };
    println!("\ngoal compile <= 2 x I/O: {verdict} ({:.2} s vs {:.2} s)", comp_m, 2.0 * io_m);

    if std::env::var("PFX_BENCH_PHASES").map(|v| v != "0").unwrap_or(true) {
        let p = phases(&model, &out_dir)?;
        println!("\nphases of one compile (single run, timed separately; compare with the median above):");
        println!("| phase                                                            | seconds |");
        println!("|------------------------------------------------------------------|---------|");
        for (name, s) in &p {
            println!("| {name:<64} | {s:>7.2} |");
        }
    }
    if let Some(mb) = peak_rss_mib() {
        println!("\npeak RSS of this process: {mb:.0} MiB");
    }
    std::fs::remove_dir_all(&work).ok();
    Ok(())
}
