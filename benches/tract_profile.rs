//! Where tract spends a train step: wall time per op type (and the slowest nodes) of `train_step.onnx`, run
//! with the same inputs as `train_step_cpu` (B=5, T=64, prefix 10, MLP 512 on the GPT-2-small export).
//!
//!     PFX_BENCH_BUNDLE=/tmp/pfx-bench-bundle2 cargo bench --bench tract_profile
//!
//! The bundle is one `train_step_cpu` compiled (`PFX_BENCH_BUNDLE` keeps it). Steps: `PFX_BENCH_STEPS` (3).
//! `PFX_BENCH_GRAPH=decode` (or any other graph of the bundle) profiles that graph instead, on inputs made from
//! its declared shapes (ids and positions 1, masks all ones, floats 0.01).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use pfx_runtime::bundle::Bundle;
use pfx_runtime::HostTensor;
use tract_onnx::prelude::*;

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return Ok(()); // `cargo test --benches` probes bench binaries this way
    }
    let Ok(dir) = std::env::var("PFX_BENCH_BUNDLE") else {
        eprintln!("tract_profile: set PFX_BENCH_BUNDLE to a bundle compiled by train_step_cpu; skipping");
        return Ok(());
    };
    // As TractBackend::open does, before anything large is allocated.
    pfx_runtime::tract_backend::init_process();
    let steps: usize = std::env::var("PFX_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let bundle = Bundle::open(&dir)?;
    let m = &bundle.manifest;
    let role = std::env::var("PFX_BENCH_GRAPH").unwrap_or_else(|_| "train_step".into());
    let path = bundle.graph_path(&role)?;
    let mut given: BTreeMap<String, HostTensor> = BTreeMap::new();
    if role == "train_step" {
        // Inputs as the trainer feeds them: random ids, labels = ids, the initial prefix, zero moments.
        let (b, t) = (m.batch, m.seq_len);
        let ids: Vec<i64> = (0..b * t).map(|i| ((i * 7919) % m.vocab) as i64).collect();
        given.insert("input_ids".into(), HostTensor::from_i64(vec![b, t], ids.clone())?);
        given.insert("attention_mask".into(), HostTensor::from_i64(vec![b, t], vec![1; b * t])?);
        given.insert("labels".into(), HostTensor::from_i64(vec![b, t], ids)?);
        given.insert("lr".into(), HostTensor::scalar_f32(1e-3));
        given.insert("step".into(), HostTensor::scalar_i64(1));
        for (k, v) in bundle.init_prefix()? {
            let zeros = vec![0f32; v.len()];
            given.insert(format!("adam.m.{k}"), HostTensor::from_f32(v.shape().to_vec(), zeros.clone())?);
            given.insert(format!("adam.v.{k}"), HostTensor::from_f32(v.shape().to_vec(), zeros)?);
            given.insert(k, v);
        }
    } else {
        let io = m.io.get(&role).ok_or_else(|| anyhow::anyhow!("the manifest has no graph '{role}'"))?;
        for spec in &io.inputs {
            let n: usize = spec.shape.iter().product();
            let t = match spec.dtype.as_str() {
                "i64" => HostTensor::from_i64(spec.shape.clone(), vec![1; n])?,
                _ => HostTensor::from_f32(spec.shape.clone(), vec![0.01; n])?,
            };
            given.insert(spec.name.clone(), t);
        }
        for (k, v) in bundle.init_prefix()? {
            given.entry(k).or_insert(v);
        }
    }
    let rewrites = pfx_runtime::tract_backend::Rewrites::from_env();
    let (model, values, _) = pfx_runtime::tract_backend::optimized_for_inputs(&path, &given, rewrites)?;
    let plan = model.into_runnable()?;
    let mut by_op: HashMap<String, (f64, usize)> = HashMap::new();
    let mut by_node: HashMap<String, f64> = HashMap::new();
    // What each matrix product multiplies and with which kernel (tract's own `info()`), to print beside the times.
    let mut products: HashMap<String, String> = HashMap::new();
    let mut total = 0.0;
    let mut faults = 0u64;
    // PFX_BENCH_FAULTS=1: page faults per node too (reads /proc per node: slower steps).
    let node_faults = std::env::var("PFX_BENCH_FAULTS").is_ok_and(|v| v == "1");
    let mut faults_by_node: HashMap<String, u64> = HashMap::new();
    for step in 0..=steps {
        // Fresh copies each step, as pfxrun hands tract its inputs: values the plan holds alone can be updated in
        // place (the fused AdamW does), which shared ones cannot.
        let step_values: TVec<TValue> = values.iter().map(|v| (**v).clone().into_tvalue()).collect();
        let faults_before = minor_faults();
        let mut state = tract_onnx::tract_core::plan::SimpleState::new(&plan)?;
        let t0 = Instant::now();
        state.run_plan_with_eval(step_values, |ctx, st, node, input| {
            let f0 = if node_faults { minor_faults() } else { 0 };
            let t = Instant::now();
            let out = tract_onnx::tract_core::plan::eval(ctx, st, node, input);
            if node_faults && step > 0 {
                *faults_by_node.entry(node.name.clone()).or_default() += minor_faults() - f0;
            }
            if step > 0 {
                let dt = t.elapsed().as_secs_f64();
                let e = by_op.entry(node.op().name().to_string()).or_default();
                e.0 += dt;
                e.1 += 1;
                let key = format!("{} ({})", node.name, node.op().name());
                if !products.contains_key(&key) {
                    let info = node.op().info().unwrap_or_default();
                    if let Some(mult) = info.iter().find(|l| l.starts_with("Mult:")) {
                        products.insert(key.clone(), mult.clone());
                    }
                }
                *by_node.entry(key).or_default() += dt;
            }
            out
        })?;
        if step > 0 {
            total += t0.elapsed().as_secs_f64();
            faults += minor_faults() - faults_before;
        }
    }
    let n = steps as f64;
    println!(
        "tract {role}: {:.3} s/step over {steps} steps (after one warm-up), {} minor page faults/step",
        total / n,
        faults / steps as u64
    );
    let mut ops: Vec<_> = by_op.into_iter().collect();
    ops.sort_by(|a, b| b.1 .0.partial_cmp(&a.1 .0).unwrap());
    println!("{:<28} {:>9} {:>7} {:>7}", "op", "s/step", "share", "nodes");
    for (op, (s, c)) in ops.iter().take(20) {
        println!("{op:<28} {:>9.4} {:>6.1}% {:>7}", s / n, 100.0 * s / total, c / steps);
    }
    // Matrix products grouped by shape: where a kernel choice (PFX_TRACT_KERNEL) pays or costs.
    let mut by_shape: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (node, s) in &by_node {
        if let Some(mult) = products.get(node) {
            let e = by_shape.entry(mult.trim_start_matches("Mult: ").to_string()).or_default();
            e.0 += s;
            e.1 += 1;
        }
    }
    let mut shapes: Vec<_> = by_shape.into_iter().collect();
    shapes.sort_by(|a, b| b.1 .0.partial_cmp(&a.1 .0).unwrap());
    println!("matrix products by shape:");
    for (shape, (s, c)) in shapes.iter().take(12) {
        println!("  {:>8.4} s  {c:>4}x  {shape}", s / n);
    }
    if node_faults {
        let mut f: Vec<_> = faults_by_node.into_iter().filter(|(_, c)| *c > 0).collect();
        f.sort_by_key(|e| std::cmp::Reverse(e.1));
        println!("page faults by node (per step):");
        for (name, c) in f.iter().take(15) {
            println!("  {:>8}  {name}", c / steps as u64);
        }
    }
    let mut nodes: Vec<_> = by_node.into_iter().collect();
    nodes.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
    println!("slowest nodes:");
    let top: usize = std::env::var("PFX_BENCH_TOP").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    for (name, s) in nodes.iter().take(top) {
        println!("  {:>8.4} s  {name}", s / n);
        if let Some(mult) = products.get(name) {
            println!("              {mult}");
        }
    }
    Ok(())
}

/// Minor page faults of this process so far (field 10 of /proc/self/stat; 0 where there is none): memory the
/// step touches for the first time, which the kernel zeroes.
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name (field 2) may hold spaces; count fields after its closing parenthesis.
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(7)?.parse().ok()).unwrap_or(0)
}
