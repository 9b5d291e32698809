//! Issue 2's acceptance: for every exported graph in `graphs/` and each of its PyTorch references,
//! the canonicalized + specialized graph reproduces PyTorch on tract and on ONNX Runtime, so does the original
//! graph on tract where tract runs it, and every written graph passes `onnx.checker` (full check).
//! Error metric: max|a-b| / max|b| per output (elementwise relative error is meaningless near zero).

mod common;

use std::process::Command;

use common::*;
use pfx_compiler::specialize::specialize;
use pfx_compiler::{load_canonical, onnx_io, text};
use pfx_runtime::{open, BackendKind, OrtOptions};

const TOL: f64 = 1e-5;

fn slug(name: &str) -> String {
    name.replace('/', "__")
}

fn skip_ort() -> bool {
    std::env::var("PFX_SKIP_ORT").map(|v| v == "1").unwrap_or(false)
}

#[test]
fn specialized_graphs_match_pytorch_on_tract_and_ort() {
    let cases = cases();
    assert!(cases.len() >= 10, "expected the fixture graphs in graphs/, found {} cases", cases.len());
    let tmp = tempdir("specialize");
    let mut table = vec![format!(
        "{:<58} {:>6} {:>6} {:>6} {:>10} {:>10} {:>10}",
        "case", "nodes", "canon", "spec", "tract", "ort", "tract-orig"
    )];
    let mut written = Vec::new();
    for case in &cases {
        let reference = load_reference(case);
        let dims = dims_of(&reference);
        let raw = onnx_io::load(&case.model).unwrap();
        let mut model = load_canonical(&case.model).unwrap();
        let canon_nodes = model.graph.nodes.len();
        specialize(&mut model, &dims).unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
        let out_path = tmp.join(format!("{}.onnx", slug(&case.name)));
        onnx_io::save(&model, &out_path, None).unwrap();
        written.push(out_path.clone());
        let outputs: Vec<String> = model.graph.outputs.iter().map(|v| v.name.clone()).collect();

        let mut tract = open(&out_path, BackendKind::Tract, &OrtOptions::default()).unwrap();
        let got = tract.run(&reference).unwrap_or_else(|e| panic!("{} on tract: {e:#}", case.name));
        let e_tract = compare(&case.name, "specialized, tract", &got, &reference, &outputs, TOL);

        let e_ort = if skip_ort() {
            "skipped".to_string()
        } else {
            let mut ort = open(&out_path, BackendKind::Ort, &OrtOptions::default())
                .unwrap_or_else(|e| panic!("ONNX Runtime: {e:#} (set PFX_SKIP_ORT=1 to skip)"));
            let got = ort.run(&reference).unwrap_or_else(|e| panic!("{} on ort: {e:#}", case.name));
            format!("{:.1e}", compare(&case.name, "specialized, ort", &got, &reference, &outputs, TOL))
        };

        // The original export, where tract can run it (it may not: symbolic If branches, zero-size past).
        let e_orig =
            match open(&case.model, BackendKind::Tract, &OrtOptions::default()).and_then(|mut b| b.run(&reference)) {
                Ok(got) => format!("{:.1e}", compare(&case.name, "original, tract", &got, &reference, &outputs, TOL)),
                Err(e) => {
                    eprintln!(
                        "{}: tract does not run the original export: {}",
                        case.name,
                        format!("{e:#}").lines().next().unwrap_or("")
                    );
                    "n/a".into()
                }
            };
        table.push(format!(
            "{:<58} {:>6} {:>6} {:>6} {:>10.1e} {:>10} {:>10}",
            case.name,
            raw.graph.node_count_deep(),
            canon_nodes,
            model.graph.nodes.len(),
            e_tract,
            e_ort,
            e_orig
        ));
        // Specialization must remove the shape arithmetic.
        let shape_ops = ["Shape", "Range", "ConstantOfShape", "Size"];
        let left: Vec<&str> =
            model.graph.nodes.iter().filter(|n| shape_ops.contains(&n.op.as_str())).map(|n| n.name.as_str()).collect();
        assert!(left.is_empty(), "{}: shape arithmetic left after specialization: {left:?}", case.name);
        assert!(model.graph.nodes.len() < raw.graph.node_count_deep(), "{}: specialization removed nothing", case.name);
    }
    println!("{}", table.join("\n"));
    check_models(&written);
}

/// Runs `onnx.checker.check_model(full_check=True)` through `graphs/check_model.py`.
fn check_models(files: &[std::path::PathBuf]) {
    if std::env::var("PFX_SKIP_PYTHON").map(|v| v == "1").unwrap_or(false) {
        eprintln!("PFX_SKIP_PYTHON=1: onnx.checker not run");
        return;
    }
    let script = graphs_dir().join("check_model.py");
    let out = Command::new("python3").arg(&script).args(files).output().expect("python3 must be installed");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "onnx.checker rejected a written graph (pip install onnx; PFX_SKIP_PYTHON=1 skips):\n{text}"
    );
}

/// Snapshots of the canonical and specialized text forms, one file per case.
#[test]
fn canonical_and_specialized_snapshots() {
    for case in cases() {
        // One snapshot per graph (not per reference): the first reference's sizes.
        let reference = load_reference(&case);
        let dims = dims_of(&reference);
        let mut model = load_canonical(&case.model).unwrap();
        let graph_name = case.name.rsplit_once('/').unwrap().0.to_string();
        let ref_name = case.name.rsplit_once('/').unwrap().1.to_string();
        if ref_name.contains("bs1") {
            continue;
        }
        if !ref_name.contains("nopast") && !ref_name.contains("nocache") {
            insta::assert_snapshot!(format!("canonical__{}", slug(&graph_name)), text::model_text(&model));
        }
        specialize(&mut model, &dims).unwrap();
        insta::assert_snapshot!(format!("specialized__{}", slug(&case.name)), text::model_text(&model));
    }
}

pub fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pfx-test-{tag}"));
    std::fs::create_dir_all(&d).unwrap();
    d
}
