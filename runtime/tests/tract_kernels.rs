//! pfx's kernel-choice rung (`tract_kernels`): products planned under it compute the right values, and on the
//! machines the rule was measured for (AMD, AVX-512) a train step's layer product runs on the kernel the rule
//! names while a long reduction keeps tract's pick. Checked against plain f64 loops.

use pfx_compiler::ir::{Dim, Graph, Model, ValueInfo, ValueType};
use pfx_compiler::onnx_io;
use pfx_compiler::tensor::{DType, Tensor};
use pfx_runtime::tract_backend::Rewrites;
use tract_onnx::prelude::*;

/// `x [rows, k] · W [k, m]` with W a constant, saved as ONNX; returns (path, W).
fn product_model(rows: usize, k: usize, m: usize) -> (std::path::PathBuf, Vec<f32>) {
    let w: Vec<f32> = (0..k * m).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 1013.0).collect();
    let mut g = Graph::default();
    g.inputs.push(ValueInfo {
        name: "x".into(),
        ty: ValueType { dtype: DType::F32, shape: Some(vec![Dim::Known(rows), Dim::Known(k)]) },
    });
    g.initializers.insert("w".into(), Tensor::f32(vec![k, m], w.clone()));
    let y = g.op1("MatMul", &["x", "w"], vec![], "product");
    g.nodes.push(pfx_compiler::ir::Node::new("y.out", "Identity", vec![y], vec!["y".into()]));
    g.outputs.push(ValueInfo {
        name: "y".into(),
        ty: ValueType { dtype: DType::F32, shape: Some(vec![Dim::Known(rows), Dim::Known(m)]) },
    });
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pfx-tract-kernels");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("product-{rows}-{k}-{m}.onnx"));
    onnx_io::save(&Model { graph: g, opset: 18, ir_version: 8, ..Model::default() }, &path, None).unwrap();
    (path, w)
}

/// Plans the product as pfxrun does, checks it against a loop and returns the kernel tract runs it on.
fn planned_kernel(rows: usize, k: usize, m: usize) -> String {
    pfx_runtime::tract_backend::init_process();
    let (path, w) = product_model(rows, k, m);
    let x: Vec<f32> = (0..rows * k).map(|i| ((i % 17) as f32 - 8.0) / 9.0).collect();
    let model = tract_onnx::onnx().model_for_path(&path).unwrap();
    // tract's own products: the few-row rewrite (`tract_skinny`) would take the 8-row case away from them.
    let rewrites = pfx_runtime::tract_backend::Rewrites { skinny_products: false, ..Rewrites::ALL };
    let plan = pfx_runtime::tract_backend::optimize_with(model, rewrites).unwrap();
    let kernel = plan
        .nodes()
        .iter()
        .filter_map(|n| n.op().info().ok()?.into_iter().find(|l| l.starts_with("Mult:")))
        .next()
        .expect("the product is planned as one of tract's matrix products");
    let plan = plan.into_runnable().unwrap();
    let input = tract_ndarray::Array2::from_shape_vec((rows, k), x.clone()).unwrap().into_tensor();
    let out = plan.run(tvec!(input.into())).unwrap();
    let got = pfx_runtime::tract_backend::from_tract(out[0].clone().into_tensor()).unwrap().to_f64_vec();
    for r in 0..rows {
        for j in 0..m {
            let want: f64 = (0..k).map(|i| x[r * k + i] as f64 * w[i * m + j] as f64).sum();
            let err = (got[r * m + j] - want).abs();
            assert!(
                err < 1e-3 * (1.0 + want.abs()),
                "[{rows}, {k}]·[{k}, {m}] at ({r}, {j}): {} vs {want}",
                got[r * m + j]
            );
        }
    }
    kernel
}

#[test]
fn products_are_right_and_take_the_measured_kernel_where_the_rule_applies() {
    // A layer product of a train step (many token rows, k = hidden size).
    let layer = planned_kernel(64, 768, 96);
    // A long reduction (the LM head's input gradient reduces over the vocabulary) and a decode-sized product.
    let long = planned_kernel(32, 9000, 48);
    let narrow = planned_kernel(8, 768, 64);
    if pfx_runtime::tract_kernels::measured_rule_active() {
        assert!(layer.contains("avx512_mmm_f32_32x6"), "{layer}");
        assert!(!long.contains("32x6"), "a long reduction stays with tract's pick: {long}");
        assert!(!narrow.contains("32x6"), "8 rows stay with tract's small-n kernels: {narrow}");
    }
}
