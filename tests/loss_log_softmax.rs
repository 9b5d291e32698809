//! The loss read off a LogSoftmax (`loss::loss_via_log_softmax`, the graphs ONNX Runtime runs on GPUs) against
//! the loss as `add_loss` builds it (two ReduceMax over the vocabulary) and against cross-entropy computed here
//! in f64 from the graph's own logits: causal shift and ignored labels, label smoothing, and logits spread so
//! far that the label's probability underflows f32. `add_loss`'s form on tract and ONNX Runtime; the LogSoftmax
//! form on ONNX Runtime only, the backend it is for (tract computes LogSoftmax as Ln(Softmax), -inf there).

use std::collections::BTreeMap;

use pfx_compiler::compile::loss::{add_loss, loss_via_log_softmax, LossSpec};
use pfx_compiler::ir::{Graph, Model, ValueInfo, ValueType};
use pfx_compiler::onnx_io;
use pfx_compiler::specialize::fold_and_infer;
use pfx_compiler::tensor::{DType, Tensor};
use pfx_runtime::{open, BackendKind, HostTensor, OrtOptions};

mod common;

const B: usize = 2;
const T: usize = 5;
const H: usize = 8;
const V: usize = 11;

/// logits = h · W · scale, then the loss; outputs the loss and the logits.
fn loss_graph(spec: &LossSpec, scale: f32) -> Graph {
    let mut g = Graph::default();
    g.inputs.push(ValueInfo { name: "h".into(), ty: ValueType::known(DType::F32, &[B, T, H]) });
    let w: Vec<f32> = common::uniform_f32(H * V, 7).iter().map(|x| x * scale).collect();
    let w = g.add_const("head", Tensor::f32(vec![H, V], w));
    assert_eq!(g.op1("MatMul", &["h", &w], vec![], "logits"), "logits");
    fold_and_infer(&mut g).unwrap();
    let loss = add_loss(&mut g, spec).unwrap();
    g.outputs = vec![
        ValueInfo { name: loss, ty: ValueType::known(DType::F32, &[]) },
        ValueInfo { name: "logits".into(), ty: ValueType::known(DType::F32, &[B, T, V]) },
    ];
    g
}

/// (loss, logits) on each of `kinds`.
fn run(g: &Graph, name: &str, feeds: &BTreeMap<String, HostTensor>, kinds: &[BackendKind]) -> Vec<(f64, Vec<f64>)> {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pfx-loss-log-softmax");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.onnx"));
    onnx_io::save(&Model { graph: g.clone(), opset: 18, ir_version: 8, ..Model::default() }, &path, None).unwrap();
    kinds
        .iter()
        .map(|&kind| {
            let mut b = open(&path, kind, &OrtOptions::default()).unwrap_or_else(|e| panic!("{name} [{kind}]: {e:#}"));
            let out = b.run(feeds).unwrap_or_else(|e| panic!("{name} [{kind}]: {e:#}"));
            (out["loss"].to_f64_vec()[0], out["logits"].to_f64_vec())
        })
        .collect()
}

/// Mean over counted positions of -((1-ε) log p[label] + ε mean_v log p[v]), in f64.
fn reference(logits: &[f64], labels: &[i64], spec: &LossSpec) -> f64 {
    let (mut total, mut count) = (0.0, 0.0);
    for b in 0..B {
        for t in 0..T {
            let label = if spec.shift {
                if t + 1 < T {
                    labels[b * T + t + 1]
                } else {
                    -100
                }
            } else {
                labels[b * T + t]
            };
            if label == -100 {
                continue;
            }
            let row = &logits[(b * T + t) * V..(b * T + t + 1) * V];
            let max = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            let nll = lse - row[label as usize];
            let uniform = lse - row.iter().sum::<f64>() / V as f64;
            total += (1.0 - spec.smoothing as f64) * nll + spec.smoothing as f64 * uniform;
            count += 1.0;
        }
    }
    total / count
}

#[test]
fn the_loss_off_a_log_softmax_equals_the_loss() {
    let mut labels: Vec<i64> = (0..(B * T) as i64).map(|k| (k * 7 + 3) % V as i64).collect();
    labels[2] = -100;
    labels[B * T - 1] = -100;
    let mut feeds = BTreeMap::new();
    feeds.insert("h".to_string(), HostTensor::from_f32([B, T, H], common::uniform_f32(B * T * H, 11)).unwrap());
    feeds.insert("labels".to_string(), HostTensor::from_i64([B, T], labels.clone()).unwrap());
    // scale 2000: logits hundreds apart, so that p[label] = exp(x[label] - max - ln Σ) is below f32's range for
    // some positions: log p must not go through p.
    for scale in [1.0, 2000.0] {
        for (shift, smoothing) in [(true, 0.0), (false, 0.1)] {
            let name = format!("x{scale}-s{}-e{smoothing}", shift as u8);
            let spec = LossSpec { logits: "logits".into(), shift, smoothing };
            let plain = loss_graph(&spec, scale);
            let mut via = plain.clone();
            assert!(loss_via_log_softmax(&mut via).unwrap(), "{name}: no loss found");
            let ops = via.op_histogram();
            assert!(!ops.contains_key("ReduceMax") && ops.contains_key("LogSoftmax"), "{name}: {ops:?}");
            let kinds = common::backends();
            let ort: Vec<BackendKind> = kinds.iter().copied().filter(|k| *k == BackendKind::Ort).collect();
            let plain_runs = run(&plain, &format!("{name}-plain"), &feeds, &kinds);
            for (kind, (loss, logits)) in kinds.iter().zip(&plain_runs) {
                let r = reference(logits, &labels, &spec);
                assert!(r.is_finite() && r > 0.0, "{name}: reference {r}");
                assert!((loss - r).abs() <= 1e-6 * r.max(1.0), "{name} [{kind}]: add_loss's {loss} vs f64 {r}");
            }
            for (loss, logits) in run(&via, &format!("{name}-via"), &feeds, &ort) {
                let r = reference(&logits, &labels, &spec);
                assert!((loss - r).abs() <= 1e-6 * r.max(1.0), "{name} [ort]: off a LogSoftmax {loss} vs f64 {r}");
            }
        }
    }
}

#[test]
fn a_graph_without_the_loss_is_left_alone() {
    let mut g = Graph::default();
    g.inputs.push(ValueInfo { name: "x".into(), ty: ValueType::known(DType::F32, &[2, 3]) });
    let y = g.op1("Softmax", &["x"], vec![], "y");
    g.outputs = vec![ValueInfo { name: y, ty: ValueType::known(DType::F32, &[2, 3]) }];
    let before = g.nodes.len();
    assert!(!loss_via_log_softmax(&mut g).unwrap());
    assert_eq!(g.nodes.len(), before);
}
