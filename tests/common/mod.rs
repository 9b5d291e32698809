//! Shared helpers for the root tests: the fixture graphs in `graphs/` and their PyTorch references.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pfx_compiler::compile::bart::{BartOptions, BartPrefix};
use pfx_compiler::compile::bart_generate::BartGenShape;
use pfx_compiler::compile::generate::GenShape;
use pfx_compiler::compile::optimizer::AdamW;
use pfx_compiler::compile::{CompileOptions, Manifest};
use pfx_compiler::specialize::Dims;
use pfx_runtime::{open, read_safetensors, Backend, BackendKind, HostTensor, OrtOptions};

pub fn graphs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs")
}

/// One exported graph with one reference (inputs fed to PyTorch and its outputs).
pub struct Case {
    /// `fixture/graph/reference`, e.g. `gpt2-optimum/model/reference_nopast`.
    pub name: String,
    pub model: PathBuf,
    pub reference: PathBuf,
}

/// Every `X.onnx` in `graphs/<fixture>/` with its references: `X.*reference*.safetensors`, and for
/// `model.onnx` also `reference*.safetensors`.
pub fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(graphs_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() && p.file_name().unwrap() != "unit")
        .collect();
    dirs.sort();
    for dir in dirs {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for model in files.iter().filter(|p| p.extension().map(|e| e == "onnx").unwrap_or(false)) {
            let stem = model.file_stem().unwrap().to_string_lossy().to_string();
            for r in &files {
                let rn = r.file_name().unwrap().to_string_lossy().to_string();
                if !rn.ends_with(".safetensors") || !rn.contains("reference") {
                    continue;
                }
                let mine = rn.starts_with(&format!("{stem}.")) || (stem == "model" && rn.starts_with("reference"));
                if !mine {
                    continue;
                }
                let rstem = rn.trim_end_matches(".safetensors").to_string();
                out.push(Case {
                    name: format!("{}/{stem}/{rstem}", dir.file_name().unwrap().to_string_lossy()),
                    model: model.clone(),
                    reference: r.clone(),
                });
            }
        }
    }
    out
}

/// The references hold the graph's inputs under their input names and PyTorch's outputs under the
/// output names; `split` separates them using the graph's declared input names.
pub fn load_reference(case: &Case) -> BTreeMap<String, HostTensor> {
    read_safetensors(&case.reference).unwrap_or_else(|e| panic!("{}: {e:#}", case.name))
}

/// Concrete sizes read off the reference inputs (nothing hard-coded per fixture).
pub fn dims_of(reference: &BTreeMap<String, HostTensor>) -> Dims {
    let ids = &reference["input_ids"];
    let mut dims = Dims::new(ids.shape()[0], ids.shape()[1]);
    for (k, v) in reference {
        if k.starts_with("past_key_values") && !k.contains(".encoder.") && k.ends_with("key") {
            dims.past = Some(v.shape()[2]);
        }
        if k == "encoder_hidden_states" || k == "encoder_attention_mask" {
            dims.src_len = Some(v.shape()[1]);
        }
        let encoder_given = reference.contains_key("encoder_hidden_states");
        if k.starts_with("past_key_values") && k.contains(".encoder.") && !encoder_given {
            dims.src_len = Some(v.shape()[2]);
        }
    }
    dims
}

/// Worst `max|a-b| / max|b|` over the outputs that the reference holds; panics naming the output.
pub fn compare(
    case: &str,
    what: &str,
    got: &BTreeMap<String, HostTensor>,
    reference: &BTreeMap<String, HostTensor>,
    outputs: &[String],
    tol: f64,
) -> f64 {
    let mut worst = 0.0f64;
    for name in outputs {
        let Some(want) = reference.get(name) else { continue };
        let have = got.get(name).unwrap_or_else(|| panic!("{case} ({what}): output {name} missing"));
        let err = have.scaled_max_error(want).unwrap_or_else(|e| panic!("{case} ({what}) {name}: {e:#}"));
        assert!(err <= tol, "{case} ({what}): output {name} differs from the reference by {err:e} (> {tol:e})");
        worst = worst.max(err);
    }
    worst
}

pub fn run(
    b: &mut Box<dyn Backend>,
    inputs: &BTreeMap<String, HostTensor>,
    what: &str,
) -> BTreeMap<String, HostTensor> {
    b.run(inputs).unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

pub fn scalar(t: &HostTensor) -> f64 {
    t.to_f64_vec()[0]
}

pub fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-30)
}

pub fn check_norm(what: &str, got: &HostTensor, want: &HostTensor, tol: f64) -> f64 {
    let e = got.norm_rel_error(want).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert!(e <= tol, "{what}: ‖a−b‖/‖b‖ = {e:e} > {tol:e}");
    e
}

/// Runs `train_step` three times from the reference's initial values and compares with torch's AdamW.
pub fn three_steps(
    dir: &Path,
    m: &Manifest,
    r: &BTreeMap<String, HostTensor>,
    prefix: &str,
    kind: BackendKind,
    lr: f32,
    what: &str,
) {
    let mut b = open(dir.join("train_step.onnx"), kind, &OrtOptions::default()).unwrap();
    let mut state: BTreeMap<String, HostTensor> = BTreeMap::new();
    for k in ["input_ids", "attention_mask", "labels"] {
        state.insert(k.into(), r[k].clone());
    }
    for t in &m.trainable {
        state.insert(t.name.clone(), r[&t.name].clone());
        let zeros = HostTensor::from_f32(t.shape.clone(), vec![0.0; t.shape.iter().product()]).unwrap();
        state.insert(format!("adam.m.{}", t.name), zeros.clone());
        state.insert(format!("adam.v.{}", t.name), zeros);
    }
    state.insert("lr".into(), HostTensor::scalar_f32(lr));
    for step in 1..=3 {
        state.insert("step".into(), HostTensor::scalar_i64(step));
        let out = run(&mut b, &state, what);
        let (l, wl) = (scalar(&out["loss"]), scalar(&r[&format!("{prefix}loss.{step}")]));
        assert!(rel(l, wl) <= 1e-4, "{what} step {step}: loss {l} vs {wl}");
        let (n, wn) = (scalar(&out["grad_norm"]), scalar(&r[&format!("{prefix}grad_norm.{step}")]));
        assert!(rel(n, wn) <= 1e-4, "{what} step {step}: grad norm {n} vs {wn}");
        for t in &m.trainable {
            for (from, to) in [
                (format!("new.{}", t.name), t.name.clone()),
                (format!("new.adam.m.{}", t.name), format!("adam.m.{}", t.name)),
                (format!("new.adam.v.{}", t.name), format!("adam.v.{}", t.name)),
            ] {
                state.insert(to, out[&from].clone());
            }
        }
    }
    for t in &m.trainable {
        check_norm(
            &format!("{what} final {}", t.name),
            &state[&t.name],
            &r[&format!("{prefix}final.{}", t.name)],
            1e-4,
        );
        for s in ["m", "v"] {
            let k = format!("adam.{s}.{}", t.name);
            check_norm(&format!("{what} final {k}"), &state[&k], &r[&format!("{prefix}final.{k}")], 1e-4);
        }
    }
}

/// Rows of an id matrix [N, T]: the columns where `mask` is 1 (all without a mask), -1 padding dropped.
pub fn id_rows(t: &HostTensor, mask: Option<&HostTensor>) -> Vec<Vec<i64>> {
    let s = t.shape();
    let v = t.as_i64().unwrap();
    (0..s[0])
        .map(|i| {
            (0..s[1])
                .filter(|&j| mask.map(|m| m.as_i64().unwrap()[i * s[1] + j] != 0).unwrap_or(true))
                .map(|j| v[i * s[1] + j])
                .filter(|&x| x != -1)
                .collect()
        })
        .collect()
}

/// tract, and ONNX Runtime unless PFX_SKIP_ORT=1.
pub fn backends() -> Vec<BackendKind> {
    if std::env::var("PFX_SKIP_ORT").map(|v| v == "1").unwrap_or(false) {
        vec![BackendKind::Tract]
    } else {
        vec![BackendKind::Tract, BackendKind::Ort]
    }
}

/// Every graph of a bundle passes `onnx.checker.check_model(full_check=True)` (weights in the shared file);
/// PFX_SKIP_PYTHON=1 skips it.
pub fn check_bundle(dir: &Path) {
    if std::env::var("PFX_SKIP_PYTHON").map(|v| v == "1").unwrap_or(false) {
        return;
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().map(|e| e == "onnx").unwrap_or(false))
        .collect();
    files.sort();
    let out = std::process::Command::new("python3")
        .arg(graphs_dir().join("check_model.py"))
        .args(&files)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "onnx.checker rejected a bundle graph (pip install onnx; PFX_SKIP_PYTHON=1 skips): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// GPT-2 compile options at the shapes of the tiny fixtures' references (`graphs/peft/`): prefix 4, batch 3,
/// sequence 7, AdamW's defaults, seed 0, f32 weights.
pub fn gpt2_options(mid_dim: Option<usize>, generation: Option<GenShape>) -> CompileOptions {
    CompileOptions {
        prefix_len: 4,
        mid_dim,
        batch: 3,
        seq: 7,
        optimizer: AdamW::default(),
        seed: 0,
        generation,
        weights: Default::default(),
    }
}

/// The BART-layout fixtures with references in `graphs/bart-ref/`: BART (deeper encoder, deeper decoder), and
/// Marian, Pegasus, mBART, BlenderBot and BlenderBot-small exported in BART's layout (sinusoidal or offset-free
/// positions, scaled embeddings, pre-LayerNorm but BlenderBot-small's; mBART's decoder starting with each row's last
/// label, its language code: its reference batch also holds HF's quirk of a -100 inside a row), and M2M100 (positions
/// numbered from the token ids: the -100 inside a row feeds a pad that keeps the pad row, PEFT's P shift skips it):
/// `graphs/make_seq2seq_fixtures.py`.
pub const BART_FIXTURES: [&str; 8] = [
    "bart-enc-deep",
    "bart-dec-deep",
    "marian-tiny",
    "pegasus-tiny",
    "mbart-tiny",
    "blenderbot-tiny",
    "blenderbot-small-tiny",
    "m2m100-tiny",
];

/// T5 fixtures on the BART path (`graphs/make_t5_fixtures.py`): v1.0 (tied head), v1.1 (gated, untied, a
/// deeper decoder) and mT5 (v1.1's layers as model_type mt5; a deeper encoder, max distance 20).
pub const T5_FIXTURES: [&str; 3] = ["t5-tiny", "t5v11-tiny", "mt5-tiny"];

/// BART compile options at the shapes of the fixtures' references (`graphs/bart-ref/`): prefix 4, batch 3,
/// source 7, target 6, no label smoothing, AdamW's defaults, seed 0.
pub fn bart_options(mode: BartPrefix, mid_dim: Option<usize>, generation: Option<BartGenShape>) -> BartOptions {
    BartOptions {
        mode,
        prefix_len: 4,
        mid_dim,
        batch: 3,
        src_len: 7,
        tgt_len: 6,
        label_smoothing: 0.0,
        optimizer: AdamW::default(),
        seed: 0,
        generation,
        weights: Default::default(),
        languages: None,
    }
}

/// `n` deterministic pseudo-random values in [-1, 1) (xorshift64 from `seed`): the same on every run.
pub fn uniform_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// Runs the ONNX graph at `path` on tract, planned as pfxrun plans it but with the given rewrites; returns its
/// outputs by name, the op name of every node of the plan (to count pfx's own ops) and each node's op info.
pub fn run_tract_plan(
    path: &Path,
    given: &BTreeMap<String, HostTensor>,
    rewrites: pfx_runtime::tract_backend::Rewrites,
) -> (BTreeMap<String, HostTensor>, Vec<String>, Vec<String>) {
    use tract_onnx::prelude::*;
    let (plan, values, names) = pfx_runtime::tract_backend::optimized_for_inputs(path, given, rewrites).unwrap();
    let ops = plan.nodes().iter().map(|n| n.op().name().to_string()).collect();
    let infos = plan.nodes().iter().map(|n| n.op().info().unwrap_or_default().join("; ")).collect();
    let outs = plan.into_runnable().unwrap().run(values).unwrap();
    let outs = names
        .into_iter()
        .zip(outs)
        .map(|(n, v)| (n, pfx_runtime::tract_backend::from_tract(v.into_tensor()).unwrap()))
        .collect();
    (outs, ops, infos)
}

/// What a compiled graph's snapshot holds: its text, or, for a role's GPU variant (`train_step.gpu`), only how
/// its text differs from the role's: the lines it lacks (`- `) and the lines it adds (`+ `), each in order.
pub fn graph_snapshot(graphs: &[(String, pfx_compiler::ir::Model)], role: &str) -> String {
    let text = |r: &str| {
        let m = &graphs.iter().find(|(name, _)| name == r).unwrap_or_else(|| panic!("no {r} graph")).1;
        pfx_compiler::text::model_text(m)
    };
    let Some(base) = role.strip_suffix(pfx_compiler::compile::GPU_VARIANT) else { return text(role) };
    let (base, variant) = (text(base), text(role));
    let (b, v): (std::collections::HashSet<&str>, std::collections::HashSet<&str>) =
        (base.lines().collect(), variant.lines().collect());
    let lacks = base.lines().filter(|l| !v.contains(l)).map(|l| format!("- {l}"));
    let adds = variant.lines().filter(|l| !b.contains(l)).map(|l| format!("+ {l}"));
    lacks.chain(adds).collect::<Vec<_>>().join("\n")
}
