//! Shared helpers for the root tests: the fixture graphs in `graphs/` and their PyTorch references.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pfx_compiler::specialize::Dims;
use pfx_runtime::{read_safetensors, HostTensor};

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
