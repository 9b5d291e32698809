#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use pfx_runtime::{read_safetensors, HostTensor};

pub mod state;

/// The tiny test graphs made by graphs/unit/make_unit_graphs.py.
pub fn unit_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("graphs").join("unit")
}

pub fn model(graph: &str) -> PathBuf {
    unit_dir().join(format!("{graph}.onnx"))
}

/// Graphs and their cases (several input shapes each: the graphs have symbolic dims).
pub const CASES: &[(&str, &[&str])] = &[("matmul_softmax", &["b2", "b5"]), ("embed_external", &["b2s3", "b1s4"])];

pub fn case(graph: &str, case: &str) -> (BTreeMap<String, HostTensor>, BTreeMap<String, HostTensor>) {
    let dir = unit_dir();
    let inputs = read_safetensors(dir.join(format!("{graph}.{case}.inputs.safetensors"))).unwrap();
    let expected = read_safetensors(dir.join(format!("{graph}.{case}.expected.safetensors"))).unwrap();
    (inputs, expected)
}

pub const TOL: f64 = 1e-5;

/// Float outputs within TOL (norm-relative and max-abs scaled by the reference's largest magnitude),
/// everything else exactly equal; the same set of names on both sides.
pub fn assert_close(what: &str, actual: &BTreeMap<String, HostTensor>, expected: &BTreeMap<String, HostTensor>) {
    let a: Vec<_> = actual.keys().collect();
    let e: Vec<_> = expected.keys().collect();
    assert_eq!(a, e, "{what}: output names differ");
    for (name, exp) in expected {
        let act = &actual[name];
        assert_eq!(act.dtype(), exp.dtype(), "{what}: `{name}` dtype");
        assert_eq!(act.shape(), exp.shape(), "{what}: `{name}` shape");
        if exp.dtype().is_float() {
            let n = act.norm_rel_error(exp).unwrap();
            let m = act.scaled_max_error(exp).unwrap();
            assert!(n <= TOL && m <= TOL, "{what}: `{name}` norm-rel {n:e}, scaled-max {m:e} > {TOL:e}");
        } else {
            assert_eq!(act, exp, "{what}: `{name}` differs");
        }
    }
}

/// True when the ONNX Runtime checks should run. They run unless PFX_SKIP_ORT=1; when ONNX Runtime
/// cannot be found they FAIL with the install hint (they never skip silently).
pub fn ort_wanted() -> bool {
    if std::env::var("PFX_SKIP_ORT").as_deref() == Ok("1") {
        eprintln!("PFX_SKIP_ORT=1: skipping the ONNX Runtime checks");
        return false;
    }
    if let Err(e) = pfx_runtime::ort_runtime(None) {
        panic!("ONNX Runtime is needed by this test (set PFX_SKIP_ORT=1 to skip it): {e:#}");
    }
    true
}

/// A fresh scratch folder for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pfx-runtime").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
