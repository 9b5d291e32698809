//! `pfxc compile` on bad input: clear errors, a non-zero exit, no panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pfx_compiler::onnx_io;

fn graphs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs")
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pfxc-compile-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn compile(model: &Path, extra: &[&str], out: &Path) -> Output {
    let mut args = vec!["compile", model.to_str().unwrap(), "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_pfxc")).args(&args).output().unwrap()
}

fn fails_with(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "expected exit 1: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

const SMALL: &[&str] = &["--batch", "2", "--seq", "5", "--mid-dim", "8"];

#[test]
fn prefix_len_zero() {
    let d = tmp("p0");
    let mut a = vec!["--prefix-len", "0"];
    a.extend_from_slice(SMALL);
    fails_with(
        &compile(&graphs().join("gpt2-legacy/model.onnx"), &a, &d.join("b")),
        &["--prefix-len must be at least 1"],
    );
}

#[test]
fn bart_graph_on_the_gpt2_path() {
    let d = tmp("bart");
    let mut a = vec!["--prefix-len", "2"];
    a.extend_from_slice(SMALL);
    fails_with(
        &compile(&graphs().join("bart-enc-deep/encoder_model.onnx"), &a, &d.join("b")),
        &["BART encoder", "not a GPT-2 decoder"],
    );
    fails_with(
        &compile(&graphs().join("bart-enc-deep/decoder_model.onnx"), &a, &d.join("b")),
        &["BART decoder", "not a GPT-2 decoder"],
    );
}

#[test]
fn sequence_beyond_the_positions() {
    let d = tmp("long");
    // 64 positions: prefix 4 + 61 tokens do not fit.
    let out = compile(
        &graphs().join("gpt2-dynamo/model.onnx"),
        &["--prefix-len", "4", "--batch", "1", "--seq", "61"],
        &d.join("b"),
    );
    fails_with(&out, &["exceeds the model's 64 positions", "--seq"]);
}

#[test]
fn op_without_gradient_rule_on_the_path() {
    let d = tmp("norule");
    let mut m = onnx_io::load(&graphs().join("gpt2-legacy/model.onnx")).unwrap();
    // The GELU's Tanh becomes Sin: shapes and folding know it, autodiff has no rule for it.
    let n = m.graph.nodes.iter_mut().find(|n| n.op == "Tanh").unwrap();
    n.op = "Sin".into();
    let name = n.name.clone();
    let f = d.join("model.onnx");
    onnx_io::save(&m, &f, None).unwrap();
    let mut a = vec!["--prefix-len", "2"];
    a.extend_from_slice(SMALL);
    fails_with(&compile(&f, &a, &d.join("b")), &["no gradient rule", "Sin", &name]);
}
