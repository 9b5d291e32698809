//! A weight over tract's 4 MiB folding budget read by several ops (a tied embedding: lookup, LM head, the LM
//! head's backward) is split per reader before optimization (`tract_backend::split_shared_weights`). The
//! fixtures' weights are all far smaller, so this builds one: W [1024, 1280] f32 (5 MiB) read by a Gather, a
//! MatMul and a Gemm with transB, with a symbolic batch so that a second input signature replans from the file.
//! Results are checked against plain loops.

use std::collections::BTreeMap;

use pfx_compiler::ir::{Attr, Dim, Graph, Model, ValueInfo, ValueType};
use pfx_compiler::onnx_io;
use pfx_compiler::tensor::{DType, Tensor};
use pfx_runtime::{Backend, HostTensor, TractBackend};

/// W is [K, N]: 5 MiB, over the budget (tract folds anything up to 4 MiB whatever its readers).
const K: usize = 1024;
const N: usize = 1280;

fn weight() -> Vec<f32> {
    (0..K * N).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 1009.0).collect()
}

fn model_path() -> std::path::PathBuf {
    let mut g = Graph::default();
    let batch = || Dim::Sym("batch".into());
    let ty = |dt: DType, last: usize| ValueType { dtype: dt, shape: Some(vec![batch(), Dim::Known(last)]) };
    g.inputs.push(ValueInfo { name: "x".into(), ty: ty(DType::F32, K) });
    g.inputs.push(ValueInfo { name: "x2".into(), ty: ty(DType::F32, N) });
    g.inputs.push(ValueInfo { name: "ids".into(), ty: ValueType { dtype: DType::I64, shape: Some(vec![batch()]) } });
    g.initializers.insert("w".into(), Tensor::f32(vec![K, N], weight()));
    let rows = g.op1("Gather", &["w", "ids"], vec![("axis", Attr::Int(0))], "gather");
    let xw = g.op1("MatMul", &["x", "w"], vec![], "matmul");
    let xwt = g.op1("Gemm", &["x2", "w"], vec![("transB", Attr::Int(1))], "gemm");
    for (name, src, width) in [("rows", rows, N), ("xw", xw, N), ("xwt", xwt, K)] {
        g.nodes.push(pfx_compiler::ir::Node::new(format!("{name}.out"), "Identity", vec![src], vec![name.into()]));
        g.outputs.push(ValueInfo { name: name.into(), ty: ty(DType::F32, width) });
    }
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pfx-tract-shared");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("shared.onnx");
    onnx_io::save(&Model { graph: g, opset: 18, ir_version: 8, ..Model::default() }, &path, None).unwrap();
    path
}

fn check(b: &mut TractBackend, batch: usize) {
    let w = weight();
    let x: Vec<f32> = (0..batch * K).map(|i| ((i % 13) as f32 - 6.0) / 7.0).collect();
    let x2: Vec<f32> = (0..batch * N).map(|i| ((i % 11) as f32 - 5.0) / 9.0).collect();
    let ids: Vec<i64> = (0..batch as i64).map(|r| (r * 389 + 5) % K as i64).collect();
    let mut inputs = BTreeMap::new();
    inputs.insert("x".to_string(), HostTensor::from_f32([batch, K], x.clone()).unwrap());
    inputs.insert("x2".to_string(), HostTensor::from_f32([batch, N], x2.clone()).unwrap());
    inputs.insert("ids".to_string(), HostTensor::from_i64([batch], ids.clone()).unwrap());
    let out = b.run(&inputs).unwrap();
    // xw = x·W [batch, N]; xwt = x2·Wᵀ [batch, K]; rows = W[ids].
    let (mut xw, mut xwt) = (vec![0f64; batch * N], vec![0f64; batch * K]);
    for r in 0..batch {
        for k in 0..K {
            for j in 0..N {
                let wv = w[k * N + j] as f64;
                xw[r * N + j] += x[r * K + k] as f64 * wv;
                xwt[r * K + k] += x2[r * N + j] as f64 * wv;
            }
        }
    }
    let rows: Vec<f64> =
        ids.iter().flat_map(|&i| w[i as usize * N..(i as usize + 1) * N].iter().map(|&v| v as f64)).collect();
    for (name, want) in [("rows", rows), ("xw", xw), ("xwt", xwt)] {
        let got = out[name].to_f64_vec();
        assert_eq!(got.len(), want.len(), "{name} at batch {batch}");
        let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-3, "{name} at batch {batch}: max error {err:e}");
    }
}

#[test]
fn a_large_weight_read_three_ways_gives_the_right_results_under_two_signatures() {
    let mut b = TractBackend::open(model_path()).unwrap();
    check(&mut b, 2);
    // A second signature: the parsed model was dropped after the first plan, so this one reparses the file.
    check(&mut b, 3);
    assert_eq!(b.cached_plans(), 2);
    check(&mut b, 2);
    assert_eq!(b.cached_plans(), 2);
}
