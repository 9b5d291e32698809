//! The backward pass's closed-form seed at the LM head's input (`loss::add_hidden_gradient`, used when the logits
//! come from a frozen linear head) against the seed at the logits (`add_logits_gradient`, checked against PEFT
//! by the bundle tests) carried through the head by autodiff: both heads as graphs store them (a transposed
//! tied embedding; a stored [H, V] matrix), with and without a bias, label smoothing and the causal shift, with
//! ignored labels; on tract and ONNX Runtime.

use std::collections::BTreeMap;

use pfx_compiler::autodiff::build_gradients_from;
use pfx_compiler::compile::loss::{add_hidden_gradient, add_logits_gradient, LossSpec};
use pfx_compiler::ir::{Attr, Graph, Model, ValueInfo, ValueType};
use pfx_compiler::onnx_io;
use pfx_compiler::simplify::simplify;
use pfx_compiler::specialize::fold_and_infer;
use pfx_compiler::tensor::{DType, Tensor};
use pfx_runtime::{open, HostTensor, OrtOptions};

mod common;

const B: usize = 2;
const T: usize = 5;
const H: usize = 8;
const V: usize = 11;

use common::uniform_f32 as values;

/// h [B, T, H] -> logits [B, T, V] through the head; returns the graph.
fn head_graph(stored_transposed: bool, bias: bool) -> Graph {
    let mut g = Graph::default();
    g.inputs.push(ValueInfo { name: "h".into(), ty: ValueType::known(DType::F32, &[B, T, H]) });
    g.inputs.push(ValueInfo { name: "labels".into(), ty: ValueType::known(DType::I64, &[B, T]) });
    let w = values(V * H, 7);
    let wt = if stored_transposed {
        let t: Vec<f32> = (0..H * V).map(|k| w[(k % V) * H + k / V]).collect();
        g.add_const("head_t", Tensor::f32(vec![H, V], t))
    } else {
        let w = g.add_const("wte", Tensor::f32(vec![V, H], w));
        g.op1("Transpose", &[&w], vec![("perm", Attr::Ints(vec![1, 0]))], "wte_t")
    };
    if bias {
        let b = g.add_const("bias", Tensor::f32(vec![V], values(V, 3)));
        let mm = g.op1("MatMul", &["h", &wt], vec![], "head");
        assert_eq!(g.op1("Add", &[&mm, &b], vec![], "logits"), "logits");
    } else {
        assert_eq!(g.op1("MatMul", &["h", &wt], vec![], "logits"), "logits");
    }
    fold_and_infer(&mut g).unwrap();
    g
}

fn run(g: Graph, out: &str, name: &str, feeds: &BTreeMap<String, HostTensor>) -> Vec<HostTensor> {
    let mut g = g;
    g.outputs = vec![ValueInfo { name: out.into(), ty: ValueType::known(DType::F32, &[B, T, H]) }];
    simplify(&mut g).unwrap();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pfx-loss-seed");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.onnx"));
    onnx_io::save(&Model { graph: g, opset: 18, ir_version: 8, ..Model::default() }, &path, None).unwrap();
    common::backends()
        .into_iter()
        .map(|kind| {
            let mut b = open(&path, kind, &OrtOptions::default()).unwrap_or_else(|e| panic!("{name} [{kind}]: {e:#}"));
            b.run(feeds).unwrap_or_else(|e| panic!("{name} [{kind}]: {e:#}")).remove(out).unwrap()
        })
        .collect()
}

#[test]
fn the_seed_at_the_head_input_equals_the_seed_at_the_logits_carried_through_the_head() {
    let mut feeds = BTreeMap::new();
    feeds.insert("h".to_string(), HostTensor::from_f32([B, T, H], values(B * T * H, 11)).unwrap());
    // Two ignored labels (-100), the rest anywhere in the vocabulary.
    let mut labels: Vec<i64> = (0..(B * T) as i64).map(|k| (k * 7 + 3) % V as i64).collect();
    labels[2] = -100;
    labels[B * T - 1] = -100;
    feeds.insert("labels".to_string(), HostTensor::from_i64([B, T], labels).unwrap());
    for stored_transposed in [false, true] {
        for bias in [false, true] {
            for (shift, smoothing) in [(true, 0.0), (false, 0.1)] {
                let name = format!("t{}-b{}-s{}-e{smoothing}", stored_transposed as u8, bias as u8, shift as u8);
                let spec = LossSpec { logits: "logits".into(), shift, smoothing };
                let mut closed = head_graph(stored_transposed, bias);
                let (h, dh) = add_hidden_gradient(&mut closed, &spec)
                    .unwrap()
                    .unwrap_or_else(|| panic!("{name}: the head was not recognized"));
                assert_eq!(h, "h", "{name}");
                let mut through = head_graph(stored_transposed, bias);
                let dlogits = add_logits_gradient(&mut through, &spec).unwrap();
                let grads = build_gradients_from(&mut through, "logits", &dlogits, &["h".to_string()]).unwrap();
                let want = run(through, &grads["h"], &format!("{name}-through"), &feeds);
                let got = run(closed, &dh, &format!("{name}-closed"), &feeds);
                for (k, (w, g)) in want.iter().zip(&got).enumerate() {
                    let scale = w.to_f64_vec().iter().map(|a| a.abs()).fold(0.0, f64::max);
                    assert!(scale > 1e-3, "{name}: the gradient is ~0 ({scale})");
                    let err = g.scaled_max_error(w).unwrap();
                    assert!(err <= 1e-6, "{name} (backend {k}): scaled max difference {err:e}");
                }
            }
        }
    }
}

#[test]
fn a_head_read_elsewhere_is_not_taken() {
    // h also feeds another output: seeding at h would miss that path's gradient.
    let mut g = head_graph(false, false);
    let extra = g.op1("Tanh", &["h"], vec![], "other_use");
    g.outputs.push(ValueInfo { name: extra, ty: ValueType::known(DType::F32, &[B, T, H]) });
    let spec = LossSpec { logits: "logits".into(), shift: true, smoothing: 0.0 };
    assert!(add_hidden_gradient(&mut g, &spec).unwrap().is_none());
}
