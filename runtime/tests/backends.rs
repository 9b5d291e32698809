//! tract and ONNX Runtime against the numpy references of graphs/unit, and against each other.

mod common;

use std::collections::BTreeMap;

use common::*;
use pfx_runtime::{open, Backend, BackendKind, HostTensor, KeptEdit, OrtBackend, OrtOptions, TractBackend};

fn kinds() -> Vec<BackendKind> {
    let mut v = vec![BackendKind::Tract];
    if ort_wanted() {
        v.push(BackendKind::Ort);
    }
    v
}

#[test]
fn tract_matches_numpy() {
    for (graph, cases) in CASES {
        let mut b = TractBackend::open(model(graph)).unwrap();
        for c in *cases {
            let (inputs, expected) = case(graph, c);
            let out = b.run(&inputs).unwrap();
            assert_close(&format!("tract {graph}.{c}"), &out, &expected);
        }
        // One optimized plan per input signature; running a seen signature again reuses it.
        assert_eq!(b.cached_plans(), cases.len());
        let (inputs, _) = case(graph, cases[0]);
        b.run(&inputs).unwrap();
        assert_eq!(b.cached_plans(), cases.len());
    }
}

#[test]
fn ort_matches_numpy() {
    if !ort_wanted() {
        return;
    }
    for (graph, cases) in CASES {
        let mut b = OrtBackend::open(model(graph), &OrtOptions::default()).unwrap();
        for c in *cases {
            let (inputs, expected) = case(graph, c);
            let out = b.run(&inputs).unwrap();
            assert_close(&format!("ort {graph}.{c}"), &out, &expected);
        }
    }
}

#[test]
fn tract_and_ort_agree() {
    if !ort_wanted() {
        return;
    }
    for (graph, cases) in CASES {
        let mut t = open(model(graph), BackendKind::Tract, &OrtOptions::default()).unwrap();
        let mut o = open(model(graph), BackendKind::Ort, &OrtOptions::default()).unwrap();
        assert_eq!(t.input_names(), o.input_names(), "{graph}: input names");
        assert_eq!(t.output_names(), o.output_names(), "{graph}: output names");
        assert_eq!(t.inputs(), o.inputs(), "{graph}: input declarations");
        for c in *cases {
            let (inputs, _) = case(graph, c);
            let a = t.run(&inputs).unwrap();
            let b = o.run(&inputs).unwrap();
            assert_close(&format!("tract vs ort {graph}.{c}"), &a, &b);
        }
    }
}

#[test]
fn declared_io() {
    let b = TractBackend::open(model("matmul_softmax")).unwrap();
    assert_eq!(b.input_names(), vec!["x"]);
    assert_eq!(b.output_names(), vec!["logits", "probs"]);
    assert_eq!(b.inputs()[0].to_string(), "x: float32 [?, 4]");
    let b = TractBackend::open(model("embed_external")).unwrap();
    assert_eq!(b.input_names(), vec!["ids", "mask"]);
    assert_eq!(b.output_names(), vec!["hidden", "n_tokens"]);
}

#[test]
fn extra_inputs_are_ignored() {
    for kind in kinds() {
        let mut b = open(model("matmul_softmax"), kind, &OrtOptions::default()).unwrap();
        let (mut inputs, expected) = case("matmul_softmax", "b2");
        inputs.insert("not_an_input".into(), HostTensor::scalar_f32(1.0));
        let out = b.run(&inputs).unwrap();
        assert_close(&format!("{kind} with an extra input"), &out, &expected);
    }
}

/// An input kept by the backend (tract keeps it; ONNX Runtime hands it back) runs like the same input given,
/// follows in-place updates, and yields to a value the caller gives anyway.
#[test]
fn kept_inputs_run_like_given_ones() {
    for kind in kinds() {
        let mut b = open(model("matmul_softmax"), kind, &OrtOptions::default()).unwrap();
        let (inputs, expected) = case("matmul_softmax", "b2");
        let name = b.inputs().iter().find(|s| s.dtype == Some(pfx_runtime::DType::F32)).unwrap().name.clone();
        let mut rest = inputs.clone();
        let value = rest.remove(&name).unwrap();
        assert!(b.keep_input(&name, value.clone()).unwrap().is_none(), "{kind} keeps f32 inputs");
        assert_close(&format!("{kind} with `{name}` kept"), &b.run(&rest).unwrap(), &expected);
        // Each edit in place runs as if the edited value were given.
        let (rows, width) = (value.shape()[0], value.shape()[1]);
        assert_eq!((rows, width), (2, 4), "the b2 case of matmul_softmax");
        let new = [9.0f32, -7.5, 3.25, 0.5];
        let parents = [1usize, 1];
        let edits = [
            KeptEdit::WriteSlot { new: &new, capacity: 2, slot: 1, width: 2 },
            KeptEdit::Reorder { parents: &parents, rows, per_row: width },
        ];
        let mut want_x = value.as_f32().unwrap().to_vec();
        for edit in &edits {
            assert!(b.edit_kept(&name, edit).unwrap());
            edit.apply(&mut want_x).unwrap();
            let mut given = inputs.clone();
            given.insert(name.clone(), HostTensor::from_f32(value.shape().to_vec(), want_x.clone()).unwrap());
            let want = b.run(&given).unwrap();
            assert!(want.iter().any(|(k, v)| v.to_f64_vec() != expected[k].to_f64_vec()), "{edit:?} shows");
            assert_close(&format!("{kind} with `{name}` after {edit:?}"), &b.run(&rest).unwrap(), &want);
        }
        // The edits did what they say: row 0 became row 1, whose last two values are `new`'s second row.
        assert_eq!(&want_x[..4], &[value.as_f32().unwrap()[4], value.as_f32().unwrap()[5], 3.25, 0.5]);
        assert_eq!(&want_x[..4], &want_x[4..]);
        // The caller's value wins over the kept one.
        assert_close(&format!("{kind} with `{name}` given anyway"), &b.run(&inputs).unwrap(), &expected);
        let outside = KeptEdit::WriteSlot { new: &new, capacity: 2, slot: 2, width: 2 };
        let e = format!("{:#}", b.edit_kept(&name, &outside).unwrap_err());
        assert!(e.contains("slot 2"), "{kind}: {e}");
        assert!(!b.edit_kept("not_an_input", &edits[0]).unwrap());
        assert!(b.keep_input("not_an_input", value).is_err());
    }
}

#[test]
fn missing_input_is_named() {
    for kind in kinds() {
        let mut b = open(model("embed_external"), kind, &OrtOptions::default()).unwrap();
        let (mut inputs, _) = case("embed_external", "b2s3");
        inputs.remove("mask");
        let e = format!("{:#}", b.run(&inputs).unwrap_err());
        assert!(e.contains("missing model input `mask`"), "{kind}: {e}");
        let e = format!("{:#}", b.run(&BTreeMap::new()).unwrap_err());
        assert!(e.contains("`ids`, `mask`") && e.contains("given: nothing"), "{kind}: {e}");
    }
}

#[test]
fn wrong_dtype_and_shape_are_errors() {
    for kind in kinds() {
        let mut b = open(model("matmul_softmax"), kind, &OrtOptions::default()).unwrap();
        let mut inputs = BTreeMap::new();
        inputs.insert("x".to_string(), HostTensor::zeros(pfx_runtime::DType::I64, [2, 4]));
        let e = format!("{:#}", b.run(&inputs).unwrap_err());
        assert!(e.contains("input `x` must be float32 but a int64 tensor was given"), "{kind}: {e}");
        inputs.insert("x".to_string(), HostTensor::zeros(pfx_runtime::DType::F32, [2, 5]));
        let e = format!("{:#}", b.run(&inputs).unwrap_err());
        assert!(e.contains("input `x` must have shape [?, 4] but shape [2, 5]"), "{kind}: {e}");
    }
}

#[test]
fn bad_model_files_are_errors() {
    let dir = scratch("bad_model_files");
    let garbage = dir.join("garbage.onnx");
    std::fs::write(&garbage, b"this is not a protobuf").unwrap();
    for kind in kinds() {
        let e = format!("{:#}", open(dir.join("absent.onnx"), kind, &OrtOptions::default()).unwrap_err());
        assert!(e.contains("absent.onnx") && e.contains("does not exist"), "{kind}: {e}");
        let e = format!("{:#}", open(&garbage, kind, &OrtOptions::default()).unwrap_err());
        assert!(e.contains("garbage.onnx"), "{kind}: {e}");
    }
}

/// External data is found from the model's own folder, whatever the current directory, under the
/// location the model names.
#[test]
fn external_data_next_to_a_moved_model() {
    let dir = scratch("external_data_moved");
    for f in ["embed_external.onnx", "embed_external.weights.bin"] {
        std::fs::copy(unit_dir().join(f), dir.join(f)).unwrap();
    }
    let (inputs, expected) = case("embed_external", "b1s4");
    for kind in kinds() {
        let mut b = open(dir.join("embed_external.onnx"), kind, &OrtOptions::default()).unwrap();
        assert_close(&format!("{kind} moved"), &b.run(&inputs).unwrap(), &expected);
    }
    std::fs::remove_file(dir.join("embed_external.weights.bin")).unwrap();
    for kind in kinds() {
        let r = open(dir.join("embed_external.onnx"), kind, &OrtOptions::default()).and_then(|mut b| b.run(&inputs));
        assert!(r.is_err(), "{kind}: ran without its external data");
    }
}
