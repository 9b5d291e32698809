//! Ops that canonicalization rewrites into ones with gradient rules: ONNX `Gelu` (opset 20, both
//! approximations), and `Gather` or `GatherND` of one constant index from an activation. The rewritten graph must
//! compute what the original computes: checked against a float64 evaluation of the definition written here (exact
//! indexing for the gathers) on tract and ONNX Runtime, and against ONNX Runtime running the original graph (unless
//! `PFX_SKIP_ORT=1`). The gradients of the rewritten forms are checked in `gradient_rules.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pfx_compiler::canonicalize::canonicalize;
use pfx_compiler::ir::{Attr, Dim, Model, ValueInfo, ValueType};
use pfx_compiler::onnx_io;
use pfx_compiler::tensor::{DType, Tensor};
use pfx_runtime::{open, BackendKind, HostTensor, OrtOptions};

fn skip_ort() -> bool {
    std::env::var("PFX_SKIP_ORT").map(|v| v == "1").unwrap_or(false)
}

fn backends() -> Vec<BackendKind> {
    if skip_ort() {
        vec![BackendKind::Tract]
    } else {
        vec![BackendKind::Tract, BackendKind::Ort]
    }
}

fn save(m: &Model, name: &str) -> PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pfx-canonicalize-ops");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.onnx"));
    onnx_io::save(m, &path, None).unwrap();
    path
}

fn run(m: &Model, name: &str, kind: BackendKind, x: &HostTensor) -> Vec<f64> {
    let path = save(m, name);
    let mut b = open(&path, kind, &OrtOptions::default()).unwrap_or_else(|e| panic!("{name} [{kind}]: {e:#}"));
    let out =
        b.run(&BTreeMap::from([("x".to_string(), x.clone())])).unwrap_or_else(|e| panic!("{name} [{kind}]: {e:#}"));
    out["y"].to_f64_vec()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max)
}

/// erf by its Maclaurin series: for |x| ≤ 3 the terms fall below 1e-17 well before 100 of them, and the largest
/// term (~40) costs under 1e-14 to cancellation.
fn erf(x: f64) -> f64 {
    assert!(x.abs() <= 3.0);
    let (mut term, mut sum) = (x, x);
    for n in 1..100 {
        // term_n = (-1)^n x^(2n+1) / n!; summand term_n / (2n+1)
        term *= -x * x / n as f64;
        sum += term / (2 * n + 1) as f64;
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

fn gelu(x: f64, approximate: &str) -> f64 {
    match approximate {
        "none" => 0.5 * x * (1.0 + erf(x / 2f64.sqrt())),
        _ => 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh()),
    }
}

fn sym_input(m: &mut Model, dt: DType, dims: &[&str]) {
    let shape = dims.iter().map(|d| d.parse().map(Dim::Known).unwrap_or_else(|_| Dim::Sym(d.to_string()))).collect();
    m.graph.inputs.push(ValueInfo { name: "x".into(), ty: ValueType { dtype: dt, shape: Some(shape) } });
}

#[test]
fn gelu_rewrite_matches_the_definition_and_onnx_runtime() {
    // 48 points over [-3, 3], both ends included.
    let xs: Vec<f32> = (0..48).map(|i| -3.0 + 6.0 * i as f32 / 47.0).collect();
    let x = HostTensor::from_f32(vec![2, 4, 6], xs.clone()).unwrap();
    for approximate in ["none", "tanh"] {
        let mut m = Model { opset: 20, ir_version: 9, ..Model::default() };
        sym_input(&mut m, DType::F32, &["batch", "seq", "6"]);
        let attrs = vec![("approximate", Attr::Str(approximate.into()))];
        let y = m.graph.op1("Gelu", &["x"], attrs, "y");
        m.graph.outputs.push(ValueInfo { name: y, ty: ValueType { dtype: DType::F32, shape: None } });
        let original = m.clone();
        canonicalize(&mut m).unwrap();
        assert!(m.graph.nodes.iter().all(|n| n.op != "Gelu"), "{approximate}: a Gelu is left");
        let want: Vec<f64> = xs.iter().map(|&v| gelu(v as f64, approximate)).collect();
        let ort_original =
            (!skip_ort()).then(|| run(&original, &format!("gelu-{approximate}-original"), BackendKind::Ort, &x));
        if let Some(o) = &ort_original {
            // ORT's own Gelu against the definition: the reference itself is right.
            let e = max_abs_diff(o, &want);
            assert!(e < 2e-6, "{approximate}: ORT's Gelu differs from the definition by {e:e}");
        }
        for kind in backends() {
            let got = run(&m, &format!("gelu-{approximate}-canonical-{kind}"), kind, &x);
            let e = max_abs_diff(&got, &want);
            println!("Gelu {approximate} [{kind}]: max |rewritten - definition| = {e:.2e}");
            // f32 rounding of values up to 3 (ulp 2.4e-7) through a few ops.
            assert!(e < 2e-6, "{approximate} [{kind}]: the rewritten Gelu differs from the definition by {e:e}");
            if let Some(o) = &ort_original {
                let e = max_abs_diff(&got, o);
                println!("Gelu {approximate} [{kind}]: max |rewritten - ORT's Gelu| = {e:.2e}");
                assert!(e < 2e-6, "{approximate} [{kind}]: the rewritten Gelu differs from ORT's by {e:e}");
            }
        }
    }
}

#[test]
fn gelu_rewrite_keeps_float64() {
    // tanh only: tract has no f64 Erf.
    let xs: Vec<f64> = (0..24).map(|i| -2.5 + 5.0 * i as f64 / 23.0).collect();
    let x = HostTensor::from_f64(vec![4, 6], xs.clone()).unwrap();
    let mut m = Model { opset: 20, ir_version: 9, ..Model::default() };
    sym_input(&mut m, DType::F64, &["rows", "6"]);
    let y = m.graph.op1("Gelu", &["x"], vec![("approximate", Attr::Str("tanh".into()))], "y");
    m.graph.outputs.push(ValueInfo { name: y, ty: ValueType { dtype: DType::F64, shape: None } });
    canonicalize(&mut m).unwrap();
    let want: Vec<f64> = xs.iter().map(|&v| gelu(v, "tanh")).collect();
    for kind in backends() {
        let got = run(&m, &format!("gelu-f64-{kind}"), kind, &x);
        let e = max_abs_diff(&got, &want);
        assert!(e < 1e-13, "[{kind}]: the rewritten f64 Gelu differs from the definition by {e:e}");
    }
}

/// Element `[i, j, k]` of a row-major [a, b, c] tensor.
fn at(v: &[f32], s: [usize; 3], i: usize, j: usize, k: usize) -> f64 {
    v[(i * s[1] + j) * s[2] + k] as f64
}

/// The rewritten gather `m` gives output `y` of `want_shape` holding exactly `want` (plain indexing), and what ONNX
/// Runtime gives running the `original` graph, on every backend.
fn picks_exactly(m: &Model, original: &Model, name: &str, x: &HostTensor, want_shape: &[usize], want: Vec<f64>) {
    let mut refs = vec![("indexing", want)];
    if !skip_ort() {
        refs.push(("ORT on the original", run(original, &format!("{name}-original"), BackendKind::Ort, x)));
    }
    for kind in backends() {
        let path = save(m, &format!("{name}-{kind}"));
        let mut b = open(&path, kind, &OrtOptions::default()).unwrap_or_else(|e| panic!("{name} [{kind}]: {e:#}"));
        let out = b.run(&BTreeMap::from([("x".to_string(), x.clone())])).unwrap();
        assert_eq!(out["y"].shape(), want_shape, "{name} [{kind}]: shape");
        let got = out["y"].to_f64_vec();
        for (what, r) in &refs {
            assert_eq!(&got, r, "{name} [{kind}]: differs from {what}");
        }
    }
}

#[test]
fn scalar_gather_rewrite_selects_the_same_elements() {
    let s = [2usize, 3, 4];
    let xs: Vec<f32> = (0..24).map(|i| i as f32 * 0.25 - 3.0).collect();
    let x = HostTensor::from_f32(s.to_vec(), xs.clone()).unwrap();
    // (axis, index, whether the index is a one-element vector rather than a scalar)
    let cases = [(0i64, 1i64, false), (1, -1, false), (2, -2, false), (-1, 0, false), (-2, 2, false), (1, -3, false)];
    let cases = cases.iter().copied().chain([(2, -1, true), (0, 0, true)]);
    for (axis, idx, vector) in cases {
        let name = format!("gather-axis{axis}-index{idx}{}", if vector { "-vec" } else { "" });
        let mut m = Model { opset: 18, ir_version: 9, ..Model::default() };
        // Symbolic sizes: the rewrite may not rely on knowing the axis' length (index -1).
        sym_input(&mut m, DType::F32, &["a", "b", "c"]);
        let a = m.graph.op1("Identity", &["x"], vec![], "activation");
        let i = if vector { Tensor::vec_i64(&[idx]) } else { Tensor::scalar_i64(idx) };
        let i = m.graph.add_const("index", i);
        let y = m.graph.op1("Gather", &[&a, &i], vec![("axis", Attr::Int(axis))], "y");
        m.graph.outputs.push(ValueInfo { name: y, ty: ValueType { dtype: DType::F32, shape: None } });
        let original = m.clone();
        canonicalize(&mut m).unwrap();
        assert!(m.graph.nodes.iter().all(|n| n.op != "Gather"), "{name}: a Gather is left");

        // The elements Gather picks, by plain indexing.
        let ax = axis.rem_euclid(3) as usize;
        let pick = idx.rem_euclid(s[ax] as i64) as usize;
        let mut want = Vec::new();
        for i in 0..s[0] {
            for j in 0..s[1] {
                for k in 0..s[2] {
                    if [i, j, k][ax] == pick {
                        want.push(at(&xs, s, i, j, k));
                    }
                }
            }
        }
        let mut want_shape = s.to_vec();
        if vector {
            want_shape[ax] = 1;
        } else {
            want_shape.remove(ax);
        }
        picks_exactly(&m, &original, &name, &x, &want_shape, want);
    }
}

/// `GatherND` of one constant row of axis 0 (batch_dims 0), kept (`[[i]]`) or dropped (`[i]`), as torch.onnx
/// dynamo's multi-query Falcon picks its key and value: the slices it becomes pick the same elements.
#[test]
fn gather_nd_rewrite_selects_the_same_rows() {
    let s = [3usize, 2, 4];
    let xs: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 5.0).collect();
    let x = HostTensor::from_f32(s.to_vec(), xs.clone()).unwrap();
    for (idx, kept) in [(-2i64, true), (-1, true), (0, true), (1, false), (-1, false)] {
        let name = format!("gathernd-row{idx}{}", if kept { "-kept" } else { "" });
        let mut m = Model { opset: 18, ir_version: 9, ..Model::default() };
        sym_input(&mut m, DType::F32, &["a", "b", "c"]);
        let a = m.graph.op1("Identity", &["x"], vec![], "activation");
        let i = if kept { Tensor::i64(vec![1, 1], vec![idx]) } else { Tensor::vec_i64(&[idx]) };
        let i = m.graph.add_const("index", i);
        let y = m.graph.op1("GatherND", &[&a, &i], vec![], "y");
        m.graph.outputs.push(ValueInfo { name: y, ty: ValueType { dtype: DType::F32, shape: None } });
        let original = m.clone();
        canonicalize(&mut m).unwrap();
        assert!(m.graph.nodes.iter().all(|n| n.op != "GatherND"), "{name}: a GatherND is left");
        let row = idx.rem_euclid(s[0] as i64) as usize;
        let want: Vec<f64> = (0..s[1] * s[2]).map(|j| xs[row * s[1] * s[2] + j] as f64).collect();
        let want_shape = if kept { vec![1, s[1], s[2]] } else { vec![s[1], s[2]] };
        picks_exactly(&m, &original, &name, &x, &want_shape, want);
    }
}
