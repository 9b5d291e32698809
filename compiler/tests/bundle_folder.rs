//! What `pfxc compile` and `pfxc bake` do to the folder they write: never replace a file they read, replace an
//! earlier bundle only once the new one is complete, and leave none of the old bundle's files behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn graphs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs")
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pfxc-bundle-folder-{tag}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn pfxc(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pfxc")).args(args).current_dir(cwd).output().expect("pfxc runs")
}

fn succeeds(out: &Output) {
    assert!(out.status.success(), "pfxc failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "expected exit 1: {err}");
    assert!(err.contains(needle) && !err.contains("panicked"), "stderr lacks {needle:?}: {err}");
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

const SMALL: [&str; 8] = ["--prefix-len", "4", "--mid-dim", "16", "--batch", "2", "--seq", "16"];

#[test]
fn the_exports_own_folder_is_refused_and_its_files_kept() {
    let d = tmp("same");
    for f in ["model.onnx", "tokenizer.json"] {
        std::fs::copy(graphs().join("e2e-small").join(f), d.join(f)).unwrap();
    }
    let before = files(&d);
    let tokenizer = std::fs::read(d.join("tokenizer.json")).unwrap();
    fails_with(&pfxc(&[&["compile", "model.onnx", "-o", "."][..], &SMALL].concat(), &d), "is the export's own folder");
    assert_eq!(files(&d), before);
    assert_eq!(std::fs::read(d.join("tokenizer.json")).unwrap(), tokenizer, "the export's tokenizer is untouched");
}

#[test]
fn baking_into_the_bundle_itself_is_refused_and_the_bundle_stays_whole() {
    let d = tmp("bake-self");
    let model = graphs().join("e2e-small/model.onnx");
    succeeds(&pfxc(&[&["compile", model.to_str().unwrap(), "-o", "b"][..], &SMALL].concat(), &d));
    let weights = std::fs::read(d.join("b/weights.bin")).unwrap();
    for out in ["b", "b/.", "./b/"] {
        fails_with(
            &pfxc(&["bake", "b", "--prefix", "b/prefix.init.safetensors", "-o", out], &d),
            "is the bundle's own folder",
        );
    }
    assert_eq!(std::fs::read(d.join("b/weights.bin")).unwrap(), weights);
    std::fs::write(d.join("afile"), "x").unwrap();
    fails_with(
        &pfxc(&["bake", "b", "--prefix", "b/prefix.init.safetensors", "-o", "afile"], &d),
        "is a file, not a folder",
    );
}

#[test]
fn a_new_bundle_replaces_the_old_one_without_its_leftovers() {
    let d = tmp("replace");
    let e2e = graphs().join("e2e-small/model.onnx");
    // First a bundle with generation graphs and a tokenizer; then, in the same folder, one of an export without a
    // tokenizer, with no generation graphs: the old tokenizer and graphs must not stay to be picked up.
    succeeds(&pfxc(&[&["compile", e2e.to_str().unwrap(), "-o", "b"][..], &SMALL].concat(), &d));
    std::fs::write(d.join("b/notes.txt"), "the user's").unwrap();
    assert!(files(&d.join("b")).contains(&"tokenizer.json".to_string()));
    let optimum = graphs().join("gpt2-optimum/model.onnx");
    let again = [&["compile", optimum.to_str().unwrap(), "-o", "b", "--max-new", "0"][..], &SMALL].concat();
    succeeds(&pfxc(&again, &d));
    assert_eq!(
        files(&d.join("b")),
        [
            "eval_step.gpu.onnx",
            "eval_step.onnx",
            "grads.gpu.onnx",
            "grads.onnx",
            "manifest.json",
            "notes.txt",
            "prefix.init.safetensors",
            "train_step.gpu.onnx",
            "train_step.onnx",
            "weights.bin"
        ]
    );
    let manifest = std::fs::read_to_string(d.join("b/manifest.json")).unwrap();
    assert!(!manifest.contains("tokenizer"), "{manifest}");
}
