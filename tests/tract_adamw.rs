//! tract runs each parameter's AdamW update as one fused op (`pfx_runtime::tract_adamw`). On a compiled GPT-2
//! fixture (reparametrized prefix, weight decay, clipping that fires, step 3 with non-zero moments) the fused
//! plan must replace every trainable's update and give what tract's plan of the plain ONNX ops gives. (That both
//! follow torch's AdamW is `compile_peft`'s and `compile_bart`'s `three_steps`, which run the fused plan.)

mod common;

use std::collections::BTreeMap;

use pfx_compiler::compile::optimizer::AdamW;
use pfx_compiler::compile::{compile, CompileOptions};
use pfx_runtime::tract_backend::Rewrites;
use pfx_runtime::HostTensor;

/// Runs `path` planned with or without the fusion; returns the outputs by name and the number of fused nodes.
fn run(
    path: &std::path::Path,
    given: &BTreeMap<String, HostTensor>,
    fuse: bool,
) -> (BTreeMap<String, HostTensor>, usize) {
    let (outs, ops, _) = common::run_tract_plan(path, given, Rewrites { fuse_adamw: fuse, ..Rewrites::ALL });
    (outs, ops.iter().filter(|op| *op == "PfxFusedAdamW").count())
}

#[test]
fn the_fused_update_replaces_every_parameters_plain_ops_and_agrees_with_them() {
    let out = std::env::temp_dir().join(format!("pfx-tract-adamw-{}", std::process::id()));
    let opts = CompileOptions {
        optimizer: AdamW { weight_decay: 0.01, max_grad_norm: Some(1e-3), ..AdamW::default() },
        ..common::gpt2_options(Some(16), None)
    };
    let m = compile(&common::graphs_dir().join("gpt2-dynamo/model.onnx"), &opts, &out).unwrap();
    let r = pfx_runtime::read_safetensors(common::graphs_dir().join("peft/gpt2-reparam.safetensors")).unwrap();
    let mut given: BTreeMap<String, HostTensor> = BTreeMap::new();
    for k in ["input_ids", "attention_mask", "labels"] {
        given.insert(k.into(), r[k].clone());
    }
    given.insert("lr".into(), HostTensor::scalar_f32(0.01));
    given.insert("step".into(), HostTensor::scalar_i64(3));
    for (i, t) in m.trainable.iter().enumerate() {
        let n: usize = t.shape.iter().product();
        given.insert(t.name.clone(), r[&t.name].clone());
        let moment = common::uniform_f32(n, 11 + i as u64).iter().map(|x| x * 1e-3).collect();
        let second = common::uniform_f32(n, 101 + i as u64).iter().map(|x| x.abs() * 1e-6).collect();
        given.insert(format!("adam.m.{}", t.name), HostTensor::from_f32(t.shape.clone(), moment).unwrap());
        given.insert(format!("adam.v.{}", t.name), HostTensor::from_f32(t.shape.clone(), second).unwrap());
    }
    let path = out.join("train_step.onnx");
    let (plain, none) = run(&path, &given, false);
    let (fused, count) = run(&path, &given, true);
    assert_eq!(none, 0);
    assert_eq!(count, m.trainable.len(), "every trainable's update is fused");
    for t in &m.trainable {
        for name in [format!("new.{}", t.name), format!("new.adam.m.{}", t.name), format!("new.adam.v.{}", t.name)] {
            let e = fused[&name].scaled_max_error(&plain[&name]).unwrap();
            assert!(e <= 1e-6, "{name}: fused vs plain, scaled max error {e:e}");
            // The step moved the parameter (a fused op returning its input would pass the comparison above only
            // if the plain plan did the same).
            if name.starts_with("new.adam.m.") {
                assert!(fused[&name].scaled_max_error(&given[&name.replacen("new.", "", 1)]).unwrap() > 1e-3);
            }
        }
    }
    assert_eq!(fused["loss"].to_f64_vec(), plain["loss"].to_f64_vec());
    assert_eq!(fused["grad_norm"].to_f64_vec(), plain["grad_norm"].to_f64_vec());
}
