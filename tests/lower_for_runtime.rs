//! The runtime lowering (`compiler/src/compile/lower.rs`) must not change what a graph computes: each pattern it
//! rewrites is built on its own, run before and after lowering on tract and ONNX Runtime (unless
//! `PFX_SKIP_ORT=1`), and the outputs compared; the lowered graph must no longer hold the pattern.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pfx_compiler::compile::lower::{lower_for_inference, lower_for_runtime};
use pfx_compiler::ir::{Attr, Graph, Model, ValueInfo, ValueType};
use pfx_compiler::onnx_io;
use pfx_compiler::specialize::fold_and_infer;
use pfx_compiler::tensor::{DType, Tensor};
use pfx_runtime::{open, HostTensor, OrtOptions};

mod common;

fn values(shape: &[usize], seed: u64) -> HostTensor {
    HostTensor::from_f32(shape.to_vec(), common::uniform_f32(shape.iter().product(), seed)).unwrap()
}

struct Case {
    g: Graph,
    feeds: BTreeMap<String, HostTensor>,
}

impl Case {
    fn new() -> Case {
        Case { g: Graph::default(), feeds: BTreeMap::new() }
    }
    fn input(&mut self, name: &str, shape: &[usize]) -> String {
        self.g.inputs.push(ValueInfo { name: name.into(), ty: ValueType::known(DType::F32, shape) });
        self.feeds.insert(name.into(), values(shape, self.feeds.len() as u64 + 1));
        name.into()
    }
    fn t(&mut self, x: &str) -> String {
        self.g.op1("Transpose", &[x], vec![("perm", Attr::Ints(vec![1, 0]))], "t")
    }
    fn save(&self, g: &Graph, outs: &[&str], file: &str) -> PathBuf {
        let mut g = g.clone();
        g.outputs =
            outs.iter().map(|o| ValueInfo { name: o.to_string(), ty: g.type_of(o).expect("typed output") }).collect();
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pfx-lower");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(file);
        onnx_io::save(&Model { graph: g, opset: 18, ir_version: 8, ..Model::default() }, &path, None).unwrap();
        path
    }
    /// Lowers, checks the lowered graph has none of `gone`, and compares outputs on every backend; returns the
    /// lowered graph.
    fn check(self, name: &str, outs: &[&str], gone: &[&str]) -> Graph {
        self.check_with(lower_for_runtime, name, outs, gone)
    }

    fn check_with(
        mut self,
        lower: fn(&mut Graph) -> anyhow::Result<usize>,
        name: &str,
        outs: &[&str],
        gone: &[&str],
    ) -> Graph {
        fold_and_infer(&mut self.g).unwrap();
        self.g.outputs = outs
            .iter()
            .map(|o| ValueInfo { name: o.to_string(), ty: self.g.type_of(o).expect("typed output") })
            .collect();
        let before = self.save(&self.g, outs, &format!("{name}-before.onnx"));
        let mut lowered = self.g.clone();
        let n = lower(&mut lowered).unwrap();
        assert!(n > 0, "{name}: nothing was lowered");
        for op in gone {
            assert!(
                lowered.nodes.iter().all(|n| n.op != *op),
                "{name}: the lowered graph still has a {op}: {:?}",
                lowered.op_histogram()
            );
        }
        let after = self.save(&lowered, outs, &format!("{name}-after.onnx"));
        for kind in common::backends() {
            let run = |p: &PathBuf| {
                let mut b = open(p, kind, &OrtOptions::default()).unwrap_or_else(|e| panic!("{name} [{kind}]: {e:#}"));
                b.run(&self.feeds).unwrap_or_else(|e| panic!("{name} [{kind}]: {e:#}"))
            };
            let (want, got) = (run(&before), run(&after));
            for o in outs {
                let err = got[*o].scaled_max_error(&want[*o]).unwrap_or_else(|e| panic!("{name} [{kind}] {o}: {e:#}"));
                assert!(err <= 1e-6, "{name} [{kind}]: {o} differs by {err:e} (scaled max error)");
            }
        }
        lowered
    }
}

#[test]
fn matmul_with_a_transposed_weight_becomes_gemm() {
    let mut c = Case::new();
    let x = c.input("x", &[2, 3, 4]);
    let x2 = c.input("x2", &[3, 4]);
    let w = c.input("w", &[5, 4]);
    let wt = c.t(&w);
    let y = c.g.op1("MatMul", &[&x, &wt], vec![], "y");
    let y2 = c.g.op1("MatMul", &[&x2, &wt], vec![], "y2");
    c.check("matmul", &[&y, &y2], &["Transpose", "MatMul"]);
}

#[test]
fn gemm_reads_transposed_operands_as_stored() {
    let mut c = Case::new();
    let a = c.input("a", &[4, 3]);
    let b = c.input("b", &[6, 4]);
    let bias = c.input("bias", &[6]);
    let (at, bt) = (c.t(&a), c.t(&b));
    // transA on a transposed A reads A plainly; a transposed B with transB=0 becomes transB=1.
    let y = c.g.op1("Gemm", &[&at, &bt, &bias], vec![("transB", Attr::Int(0))], "y");
    let y2 = c.g.op1("Gemm", &[&at, &b], vec![("transB", Attr::Int(1)), ("alpha", Attr::Float(0.5))], "y2");
    c.check("gemm", &[&y, &y2], &["Transpose"]);
}

#[test]
fn transposed_gemm_swaps_its_operands() {
    let mut c = Case::new();
    let a = c.input("a", &[4, 3]);
    let d = c.input("d", &[4, 6]);
    // The prefix MLP's weight gradient: (aᵀ d)ᵀ.
    let g = c.g.op1("Gemm", &[&a, &d], vec![("transA", Attr::Int(1))], "g");
    let y = c.t(&g);
    c.check("transposed-gemm", &[&y], &["Transpose"]);
}

#[test]
fn cube_becomes_products() {
    let mut c = Case::new();
    let x = c.input("x", &[3, 7]);
    let three = c.g.add_const("three", Tensor::scalar_f32(3.0));
    let y = c.g.op1("Pow", &[&x, &three], vec![], "y");
    c.check("cube", &[&y], &["Pow"]);
}

#[test]
fn cubes_go_back_to_powers_for_gpus() {
    let mut c = Case::new();
    let (x, x2) = (c.input("x", &[3, 7]), c.input("x2", &[3, 7]));
    let sq = c.g.op1("Mul", &[&x, &x], vec![], "sq");
    let y = c.g.op1("Mul", &[&sq, &x], vec![], "y");
    // A square read elsewhere too stays a square (and its product a product).
    let sq2 = c.g.op1("Mul", &[&x2, &x2], vec![], "sq2");
    let z = c.g.op1("Mul", &[&x2, &sq2], vec![], "z");
    let w = c.g.op1("Add", &[&sq2, &x2], vec![], "w");
    let lowered = c.check_with(pfx_compiler::compile::lower::cubes_as_powers, "cube-pow", &[&y, &z, &w], &[]);
    let ops = lowered.op_histogram();
    assert_eq!((ops.get("Pow"), ops.get("Mul")), (Some(&1), Some(&2)), "{ops:?}");
}

#[test]
fn a_wide_concat_becomes_a_concat_of_concats() {
    let mut c = Case::new();
    // gpt2-medium's prefix gradient concatenates 48 rows; rows of unequal lengths here, on the middle axis.
    let parts: Vec<String> = (0..48).map(|k| c.input(&format!("x{k}"), &[2, k % 3 + 1, 4])).collect();
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let y = c.g.op1("Concat", &refs, vec![("axis", Attr::Int(1))], "y");
    let lowered = c.check("wide-concat", &[&y], &[]);
    let widths: Vec<usize> = lowered.nodes.iter().filter(|n| n.op == "Concat").map(|n| n.inputs.len()).collect();
    assert_eq!(widths.len(), 3, "two halves and the outer Concat: {widths:?}");
    assert!(widths.iter().all(|&w| w <= 32), "{widths:?}");
}

#[test]
fn a_transpose_with_other_readers_is_kept_for_them() {
    let mut c = Case::new();
    let a = c.input("a", &[4, 3]);
    let d = c.input("d", &[4, 6]);
    let g = c.g.op1("Gemm", &[&a, &d], vec![("transA", Attr::Int(1))], "g");
    let y = c.t(&g);
    let z = c.g.op1("Tanh", &[&g], vec![], "z");
    // The Gemm's result is read twice: the transposed copy stays (no second product).
    let mut g2 = c.g.clone();
    fold_and_infer(&mut g2).unwrap();
    g2.outputs = vec![
        ValueInfo { name: y.clone(), ty: g2.type_of(&y).unwrap() },
        ValueInfo { name: z.clone(), ty: g2.type_of(&z).unwrap() },
    ];
    assert_eq!(lower_for_runtime(&mut g2).unwrap(), 0);
    assert_eq!(g2.nodes.iter().filter(|n| n.op == "Gemm").count(), 1);
}

/// Inference graphs: torch's exported attention, keys transposed through Reshape → Transpose → Reshape, q and k each scaled by
/// √scale, and (as in a training graph) the scaled q read again elsewhere.
#[test]
fn exported_key_transpose_and_scales_become_one_transpose_and_one_scale() {
    let mut c = Case::new();
    let q = c.input("q", &[2, 3, 1, 4]);
    let k = c.input("k", &[2, 3, 5, 4]);
    let s = c.g.add_const("sqrt_scale", Tensor::scalar_f32(0.5946));
    let flat = c.g.add_const("flat", Tensor::vec_i64(&[6, 5, 4]));
    let back = c.g.add_const("back", Tensor::vec_i64(&[2, 3, 4, 5]));
    let k3 = c.g.op1("Reshape", &[&k, &flat], vec![], "k3");
    let kt3 = c.g.op1("Transpose", &[&k3], vec![("perm", Attr::Ints(vec![0, 2, 1]))], "kt3");
    let kt = c.g.op1("Reshape", &[&kt3, &back], vec![], "kt");
    let ks = c.g.op1("Mul", &[&kt, &s], vec![], "ks");
    let qs = c.g.op1("Mul", &[&q, &s], vec![], "qs");
    let scores = c.g.op1("MatMul", &[&qs, &ks], vec![], "scores");
    // Another reader of the scaled q keeps that Mul alive: the product gets q times both factors folded into one
    // constant, not a second Mul on top of the first (such chains tripped ONNX Runtime's MatMulScaleFusion in the
    // BART training graphs, `tests/compile_bart.rs`).
    let other = c.g.op1("Tanh", &[&qs], vec![], "other");
    let training = c.g.clone();
    let g = c.check_with(lower_for_inference, "exported-attention", &[&scores, &other], &["Reshape"]);
    let muls: Vec<_> = g.nodes.iter().filter(|n| n.op == "Mul").collect();
    assert_eq!(muls.len(), 2, "{muls:?}");
    assert!(muls.iter().all(|m| m.inputs[0] == "q"), "every scale applies to q itself: {muls:?}");
    let mm = g.nodes.iter().find(|n| n.op == "MatMul").unwrap();
    let kt = g.nodes.iter().find(|n| n.outputs[0] == mm.inputs[1]).unwrap();
    assert_eq!((kt.op.as_str(), kt.inputs[0].as_str()), ("Transpose", "k"), "the keys reach the product unscaled");
    // Graphs with a backward pass keep the exporter's attention as it is.
    let mut training = training;
    fold_and_infer(&mut training).unwrap();
    training.outputs = vec![ValueInfo { name: scores.clone(), ty: training.type_of(&scores).unwrap() }];
    assert_eq!(lower_for_runtime(&mut training).unwrap(), 0);
}
