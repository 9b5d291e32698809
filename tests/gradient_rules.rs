//! Every gradient rule of `compiler/src/autodiff/rules.rs`, on its own, against central finite differences.
//!
//! Each case is a tiny graph: inputs -> the op under test -> loss = Σ ReduceSum(y · R), with R a fixed random
//! constant of y's shape (so every output element counts). `build_gradients` adds the backward pass, the graph is
//! simplified and saved, and it runs on tract and on ONNX Runtime (unless `PFX_SKIP_ORT=1`); each gradient is
//! compared with finite differences of the loss, one element at a time, by the norm-relative error
//! ‖rule − fd‖ / ‖fd‖.
//!
//! Precision (see `Fd`): the graphs are float64 wherever the runtimes compute the op in float64: ε = 1e-6,
//! tolerance 1e-6. Erf and Sigmoid run in f32 (tract has no f64 kernels for them; their output is cast to f64
//! for the loss), and tract computes LayerNormalization to f32 precision even on f64 tensors: these use
//! Richardson-extrapolated central differences (h = 1e-2, truncation O(h⁴)) and a tolerance of 1e-4, which still
//! catches any wrong term (those give errors of 1e-2 and more). ORT checks LayerNormalization in full f64.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use pfx_compiler::autodiff::build_gradients;
use pfx_compiler::canonicalize::canonicalize;
use pfx_compiler::ir::{Attr, Graph, Model, ValueInfo, ValueType};
use pfx_compiler::onnx_io;
use pfx_compiler::simplify::simplify;
use pfx_compiler::specialize::fold_and_infer;
use pfx_compiler::tensor::{DType, Tensor};
use pfx_runtime::{open, BackendKind, HostTensor, OrtOptions};

const F64: DType = DType::F64;

/// How the finite differences are taken, and the tolerance on ‖rule − fd‖ / ‖fd‖.
#[derive(Clone, Copy, Debug)]
enum Fd {
    /// Float64 forward: central differences, ε = 1e-6, tolerance 1e-6.
    F64,
    /// An f32 input feeding a float64 forward: central differences over the step actually taken after
    /// rounding to f32, ε = 1e-3 (truncation ~ε² ≈ 1e-6); tolerance 1e-5.
    F32Input,
    /// A forward computed to f32 precision: Richardson extrapolation of central differences,
    /// (4·D(h/2) − D(h)) / 3 with h = 1e-2 (truncation O(h⁴) ≈ 1e-8, rounding noise ~1e-7/h); tolerance 1e-4.
    F32Forward,
    /// F64 tensors that tract computes to f32 precision only (LayerNormalization): `F32Forward` on tract,
    /// `F64` on ORT.
    F32OnTract,
}

impl Fd {
    fn on(self, kind: BackendKind) -> Fd {
        match (self, kind) {
            (Fd::F32OnTract, BackendKind::Tract) => Fd::F32Forward,
            (Fd::F32OnTract, _) => Fd::F64,
            (fd, _) => fd,
        }
    }
    fn tol(self) -> f64 {
        match self {
            Fd::F64 => 1e-6,
            Fd::F32Input => 1e-5,
            Fd::F32Forward | Fd::F32OnTract => 1e-4,
        }
    }
}

/// Deterministic xorshift generator: the same numbers on every run.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [-1, 1).
    fn signed(&mut self) -> f64 {
        2.0 * self.uniform() - 1.0
    }
}

/// How the values of an input are drawn.
#[derive(Clone, Copy)]
enum Dist {
    /// Uniform in [-1, 1).
    Any,
    /// Uniform in [0.5, 2): for Log, Sqrt, divisors.
    Positive,
    /// ±[0.2, 1): away from Relu's kink.
    AwayFromZero,
}

/// A case under construction: a graph, the trainable inputs with their values.
struct Case {
    name: String,
    g: Graph,
    values: BTreeMap<String, HostTensor>,
    wrt: Vec<String>,
    rng: Rng,
    fd: Fd,
}

impl Case {
    fn with_fd(mut self, fd: Fd) -> Case {
        self.fd = fd;
        self
    }

    fn new(name: &str) -> Case {
        let seed = name.bytes().fold(0x9e37_79b9_7f4a_7c15u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        Case {
            name: name.into(),
            g: Graph::default(),
            values: BTreeMap::new(),
            wrt: vec![],
            rng: Rng(seed | 1),
            fd: Fd::F64,
        }
    }

    fn draw(&mut self, n: usize, dist: Dist) -> Vec<f64> {
        (0..n)
            .map(|_| {
                let u = self.rng.signed();
                match dist {
                    Dist::Any => u,
                    Dist::Positive => 1.25 + 0.75 * u,
                    Dist::AwayFromZero => u.signum() * (0.2 + 0.8 * u.abs()),
                }
            })
            .collect()
    }

    /// A trainable f64 graph input with random values.
    fn input(&mut self, name: &str, shape: &[usize]) -> String {
        self.input_of(name, shape, Dist::Any, F64)
    }

    fn input_of(&mut self, name: &str, shape: &[usize], dist: Dist, dt: DType) -> String {
        let v = self.draw(shape.iter().product(), dist);
        let t = match dt {
            DType::F64 => HostTensor::from_f64(shape.to_vec(), v).unwrap(),
            DType::F32 => HostTensor::from_f32(shape.to_vec(), v.iter().map(|&x| x as f32).collect()).unwrap(),
            other => panic!("no inputs of {other:?}"),
        };
        self.g.inputs.push(ValueInfo { name: name.into(), ty: ValueType::known(dt, shape) });
        self.values.insert(name.into(), t);
        self.wrt.push(name.into());
        name.into()
    }

    /// A random f64 constant (a frozen weight).
    fn konst(&mut self, name: &str, shape: &[usize]) -> String {
        let v = self.draw(shape.iter().product(), Dist::Any);
        self.g.add_const(name, Tensor::from_f64s(F64, shape.to_vec(), v).unwrap())
    }

    fn scalar(&mut self, name: &str, x: f64) -> String {
        self.g.add_const(name, Tensor::from_f64s(F64, vec![], vec![x]).unwrap())
    }

    fn ints(&mut self, name: &str, v: &[i64]) -> String {
        self.g.add_const(name, Tensor::vec_i64(v))
    }

    fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        self.g.op1(op, inputs, attrs, &op.to_lowercase())
    }

    fn op_n(&mut self, op: &str, inputs: &[&str], n: usize, attrs: Vec<(&str, Attr)>) -> Vec<String> {
        let ins = inputs.iter().map(|s| s.to_string()).collect();
        self.g.add_node(op, ins, n, attrs, &op.to_lowercase())
    }

    /// Adds loss = Σ_k ReduceSum(ys[k] · R_k), builds the gradients and writes the model; returns its path.
    fn build(mut self, ys: &[&str]) -> Built {
        fold_and_infer(&mut self.g).unwrap_or_else(|e| panic!("{}: typing the forward graph: {e:#}", self.name));
        let mut terms = Vec::new();
        for (k, y) in ys.iter().enumerate() {
            let ty = self.g.type_of(y).unwrap_or_else(|| panic!("{}: '{y}' has no type", self.name));
            let shape = ty.concrete().unwrap();
            // The loss is float64 whatever y is.
            let y = if ty.dtype == F64 {
                y.to_string()
            } else {
                self.g.op1("Cast", &[y], vec![("to", Attr::Int(11))], "loss.cast")
            };
            let v = self.draw(shape.iter().product(), Dist::Any);
            let r = self.g.add_const(&format!("r{k}"), Tensor::from_f64s(F64, shape, v).unwrap());
            let m = self.g.op1("Mul", &[&y, &r], vec![], "loss.mul");
            terms.push(self.g.op1("ReduceSum", &[&m], vec![("keepdims", Attr::Int(0))], "loss.sum"));
        }
        let mut loss = terms[0].clone();
        for t in &terms[1..] {
            loss = self.g.op1("Add", &[&loss, t], vec![], "loss.add");
        }
        fold_and_infer(&mut self.g).unwrap();
        let loss_ty = self.g.type_of(&loss).unwrap();
        self.g.outputs = vec![ValueInfo { name: loss.clone(), ty: loss_ty }];
        let grads = build_gradients(&mut self.g, &loss, &self.wrt)
            .unwrap_or_else(|e| panic!("{}: build_gradients: {e:#}", self.name));
        for (x, d) in &grads {
            let out = format!("grad.{x}");
            assert_eq!(self.g.op1("Identity", &[d], vec![], &out), out);
            let ty = self.g.type_of(x).unwrap();
            self.g.outputs.push(ValueInfo { name: out, ty });
        }
        self.g.forget_names();
        simplify(&mut self.g).unwrap_or_else(|e| panic!("{}: simplify: {e:#}", self.name));
        // A gradient that does not depend on the inputs (linear ops) folds to a constant output.
        let folded = self
            .wrt
            .iter()
            .filter_map(|x| {
                let t = self.g.initializers.get(&format!("grad.{x}"))?;
                assert_eq!(Some(t.dtype()), self.g.type_of(x).map(|t| t.dtype), "{}: grad.{x}'s dtype", self.name);
                let v = HostTensor::from_f64(t.shape.clone(), t.as_f64s().unwrap()).unwrap();
                Some((format!("grad.{x}"), v))
            })
            .collect();
        let model = Model { graph: self.g, opset: 18, ir_version: 8, ..Model::default() };
        let path = temp_path(&self.name);
        onnx_io::save(&model, &path, None).unwrap();
        Built { name: self.name, path, loss, values: self.values, wrt: self.wrt, fd: self.fd, folded }
    }

    /// Builds, runs and checks against finite differences on every backend.
    fn check(self, ys: &[&str]) {
        self.build(ys).check();
    }
}

fn temp_path(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pfx-gradient-rules");
    std::fs::create_dir_all(&dir).unwrap();
    let safe: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    dir.join(format!("{}-{safe}.onnx", N.fetch_add(1, Ordering::SeqCst)))
}

fn backends() -> Vec<BackendKind> {
    if std::env::var("PFX_SKIP_ORT").map(|v| v == "1").unwrap_or(false) {
        vec![BackendKind::Tract]
    } else {
        vec![BackendKind::Tract, BackendKind::Ort]
    }
}

struct Built {
    name: String,
    path: PathBuf,
    loss: String,
    values: BTreeMap<String, HostTensor>,
    wrt: Vec<String>,
    fd: Fd,
    /// Gradient outputs that simplification folded to constants, as the compiler computed them.
    folded: BTreeMap<String, HostTensor>,
}

/// `t` with element `i` moved by `d`; returns the tensor and the step actually taken (f32 rounds it).
fn nudge(t: &HostTensor, i: usize, d: f64) -> (HostTensor, f64) {
    let mut t = t.clone();
    let step = match t.as_f64_mut() {
        Ok(v) => {
            let x = v[i];
            v[i] = x + d;
            v[i] - x
        }
        Err(_) => {
            let v = t.as_f32_mut().unwrap();
            let x = v[i];
            v[i] = (x as f64 + d) as f32;
            v[i] as f64 - x as f64
        }
    };
    (t, step)
}

impl Built {
    fn check(&self) {
        for kind in backends() {
            let what = format!("{} [{kind}]", self.name);
            let mut b = open(&self.path, kind, &OrtOptions::default()).unwrap_or_else(|e| panic!("{what}: {e:#}"));
            let mut run =
                |inputs: &BTreeMap<String, HostTensor>| b.run(inputs).unwrap_or_else(|e| panic!("{what}: {e:#}"));
            let out = run(&self.values);
            let mut worst = 0.0f64;
            for x in &self.wrt {
                let key = format!("grad.{x}");
                let got = out.get(&key).unwrap_or_else(|| {
                    panic!("{what}: no output {key} (outputs: {:?})", out.keys().collect::<Vec<_>>())
                });
                let base = &self.values[x];
                assert_eq!(got.shape(), base.shape(), "{what}: {key} has the wrong shape");
                if !self.folded.contains_key(&key) {
                    assert_eq!(got.dtype(), base.dtype(), "{what}: {key} has the wrong dtype");
                }
                let mut fd = Vec::with_capacity(base.len());
                for i in 0..base.len() {
                    let mut loss_at = |d: f64| {
                        let (t, step) = nudge(base, i, d);
                        let mut inputs = self.values.clone();
                        inputs.insert(x.clone(), t);
                        (run(&inputs)[&self.loss].to_f64_vec()[0], step)
                    };
                    let mut central = |h: f64| {
                        let ((lp, sp), (lm, sm)) = (loss_at(h), loss_at(-h));
                        (lp - lm) / (sp - sm)
                    };
                    fd.push(match self.fd.on(kind) {
                        Fd::F64 => central(1e-6),
                        Fd::F32Input => central(1e-3),
                        Fd::F32Forward | Fd::F32OnTract => (4.0 * central(0.5e-2) - central(1e-2)) / 3.0,
                    });
                }
                let want = HostTensor::from_f64(base.shape().to_vec(), fd).unwrap();
                let got = HostTensor::from_f64(got.shape().to_vec(), got.to_f64_vec()).unwrap();
                let e = got.norm_rel_error(&want).unwrap();
                let tol = self.fd.on(kind).tol();
                assert!(
                    e <= tol,
                    "{what}: {key} is wrong: ‖rule − fd‖/‖fd‖ = {e:.3e} > {tol:e} ({:?})\n rule {}\n   fd {}",
                    self.fd.on(kind),
                    got.preview(12),
                    want.preview(12)
                );
                worst = worst.max(e);
            }
            println!("{what:<48} worst gradient error {worst:.2e} (tolerance {:.0e})", self.fd.on(kind).tol());
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Elementwise binary ops, with broadcasting of both operands

fn binary(op: &str, a: &[usize], b: &[usize], b_dist: Dist) {
    let mut c = Case::new(&format!("{op} {a:?} {b:?}"));
    let x = c.input("a", a);
    let y = c.input_of("b", b, b_dist, F64);
    let z = c.op(op, &[&x, &y], vec![]);
    c.check(&[&z]);
}

fn binary_all_shapes(op: &str, b_dist: Dist) {
    binary(op, &[2, 3, 4], &[2, 3, 4], b_dist);
    binary(op, &[2, 3, 4], &[3, 1], b_dist);
    binary(op, &[3, 1], &[2, 3, 4], b_dist);
    // Both operands broadcast: [1,4] and [2,3,1] -> [2,3,4].
    binary(op, &[1, 4], &[2, 3, 1], b_dist);
    binary(op, &[2, 3, 4], &[], b_dist);
}

#[test]
fn add() {
    binary_all_shapes("Add", Dist::Any);
}

#[test]
fn sub() {
    binary_all_shapes("Sub", Dist::Any);
}

#[test]
fn mul() {
    binary_all_shapes("Mul", Dist::Any);
}

#[test]
fn div() {
    binary_all_shapes("Div", Dist::Positive);
}

#[test]
fn same_input_twice_accumulates() {
    let mut c = Case::new("Mul x x");
    let x = c.input("x", &[2, 3]);
    let y = c.op("Mul", &[&x, &x], vec![]);
    c.check(&[&y]);
}

// ---------------------------------------------------------------------------------------------------------
// Elementwise unary ops

fn unary(op: &str, dist: Dist) {
    unary_of(op, dist, F64, Fd::F64);
}

fn unary_of(op: &str, dist: Dist, dt: DType, fd: Fd) {
    let mut c = Case::new(op).with_fd(fd);
    let x = c.input_of("x", &[2, 3, 4], dist, dt);
    let y = c.op(op, &[&x], vec![]);
    c.check(&[&y]);
}

#[test]
fn neg() {
    unary("Neg", Dist::Any);
}

#[test]
fn pow() {
    for (p, dist) in [(2.0, Dist::Any), (3.0, Dist::Any), (0.5, Dist::Positive), (-1.5, Dist::Positive)] {
        let mut c = Case::new(&format!("Pow {p}"));
        let x = c.input_of("x", &[2, 3, 4], dist, F64);
        let e = c.scalar("p", p);
        let y = c.op("Pow", &[&x, &e], vec![]);
        c.check(&[&y]);
    }
}

#[test]
fn sqrt() {
    unary("Sqrt", Dist::Positive);
}

#[test]
fn reciprocal() {
    unary("Reciprocal", Dist::Positive);
}

#[test]
fn tanh() {
    unary("Tanh", Dist::Any);
}

#[test]
fn sigmoid() {
    // f32: tract has no f64 Sigmoid.
    unary_of("Sigmoid", Dist::Any, DType::F32, Fd::F32Forward);
}

#[test]
fn erf() {
    // f32: tract has no f64 Erf.
    unary_of("Erf", Dist::Any, DType::F32, Fd::F32Forward);
}

#[test]
fn relu() {
    unary("Relu", Dist::AwayFromZero);
}

#[test]
fn exp() {
    unary("Exp", Dist::Any);
}

#[test]
fn log() {
    unary("Log", Dist::Positive);
}

#[test]
fn identity() {
    unary("Identity", Dist::Any);
}

#[test]
fn cast() {
    // f64 -> f64: the identity path.
    let mut c = Case::new("Cast f64->f64");
    let x = c.input("x", &[2, 3]);
    let y = c.op("Cast", &[&x], vec![("to", Attr::Int(11))]);
    let t = c.op("Tanh", &[&y], vec![]);
    c.check(&[&t]);
    // f32 -> f64: the gradient must come back as f32. The input is f32, so the finite differences use the
    // steps actually taken after rounding to f32 (ε = 1e-3) and the tolerance is 1e-5 (the curvature term
    // is ~ε², the f32 rounding of the gradient ~1e-7).
    let mut c = Case::new("Cast f32->f64").with_fd(Fd::F32Input);
    let x = c.input_of("x", &[2, 3], Dist::Any, DType::F32);
    let y = c.op("Cast", &[&x], vec![("to", Attr::Int(11))]);
    let t = c.op("Tanh", &[&y], vec![]);
    c.check(&[&t]);
}

// ---------------------------------------------------------------------------------------------------------
// MatMul

fn matmul(a: &[usize], b: &[usize]) {
    let mut c = Case::new(&format!("MatMul {a:?} {b:?}"));
    let x = c.input("a", a);
    let w = c.input("b", b);
    let y = c.op("MatMul", &[&x, &w], vec![]);
    c.check(&[&y]);
}

#[test]
fn matmul_2d() {
    matmul(&[3, 4], &[4, 5]);
}

#[test]
fn matmul_batched() {
    matmul(&[2, 3, 4, 5], &[2, 3, 5, 6]);
}

#[test]
fn matmul_broadcast_batch() {
    matmul(&[2, 3, 4, 5], &[5, 6]);
    matmul(&[4, 5], &[2, 3, 5, 6]);
    matmul(&[1, 3, 4, 5], &[2, 1, 5, 6]);
    matmul(&[3, 4, 5], &[2, 1, 5, 6]);
}

// ---------------------------------------------------------------------------------------------------------
// Layout ops

#[test]
fn transpose() {
    for perm in [Some(vec![2, 0, 1]), Some(vec![1, 2, 0]), None] {
        let mut c = Case::new(&format!("Transpose {perm:?}"));
        let x = c.input("x", &[2, 3, 4]);
        let attrs = perm.map(|p| vec![("perm", Attr::Ints(p))]).unwrap_or_default();
        let y = c.op("Transpose", &[&x], attrs);
        c.check(&[&y]);
    }
}

#[test]
fn reshape_flatten_squeeze_unsqueeze() {
    let mut c = Case::new("Reshape");
    let x = c.input("x", &[2, 3, 4]);
    let s = c.ints("shape", &[4, -1]);
    let y = c.op("Reshape", &[&x, &s], vec![]);
    c.check(&[&y]);

    let mut c = Case::new("Flatten");
    let x = c.input("x", &[2, 3, 4]);
    let y = c.op("Flatten", &[&x], vec![("axis", Attr::Int(2))]);
    c.check(&[&y]);

    let mut c = Case::new("Squeeze");
    let x = c.input("x", &[2, 1, 3, 1]);
    let a = c.ints("axes", &[1, -1]);
    let y = c.op("Squeeze", &[&x, &a], vec![]);
    c.check(&[&y]);

    let mut c = Case::new("Unsqueeze");
    let x = c.input("x", &[2, 3]);
    let a = c.ints("axes", &[0, 3]);
    let y = c.op("Unsqueeze", &[&x, &a], vec![]);
    c.check(&[&y]);
}

#[test]
fn expand() {
    for (from, to) in [(vec![3, 1], vec![2, 3, 4]), (vec![4], vec![2, 3, 4]), (vec![2, 1, 4], vec![2, 3, 4])] {
        let mut c = Case::new(&format!("Expand {from:?} -> {to:?}"));
        let x = c.input("x", &from);
        let s = c.ints("shape", &to.iter().map(|&d| d as i64).collect::<Vec<_>>());
        let y = c.op("Expand", &[&x, &s], vec![]);
        c.check(&[&y]);
    }
}

#[test]
fn concat() {
    let mut c = Case::new("Concat axis 1");
    let a = c.input("a", &[2, 3, 4]);
    let b = c.input("b", &[2, 1, 4]);
    let k = c.konst("frozen", &[2, 2, 4]);
    let d = c.input("d", &[2, 2, 4]);
    let y = c.op("Concat", &[&a, &b, &k, &d], vec![("axis", Attr::Int(1))]);
    c.check(&[&y]);

    let mut c = Case::new("Concat axis -1");
    let a = c.input("a", &[2, 3]);
    let b = c.input("b", &[2, 5]);
    let y = c.op("Concat", &[&a, &b, &a], vec![("axis", Attr::Int(-1))]);
    c.check(&[&y]);
}

#[test]
fn split() {
    // Outputs 0 and 2 feed the loss, output 1 does not.
    let mut c = Case::new("Split sizes, one output unused");
    let x = c.input("x", &[2, 6, 3]);
    let sizes = c.ints("split", &[1, 2, 3]);
    let ys = c.op_n("Split", &[&x, &sizes], 3, vec![("axis", Attr::Int(1))]);
    c.check(&[&ys[0], &ys[2]]);

    let mut c = Case::new("Split num_outputs, last axis");
    let x = c.input("x", &[2, 3, 4]);
    let ys = c.op_n("Split", &[&x], 2, vec![("axis", Attr::Int(-1)), ("num_outputs", Attr::Int(2))]);
    c.check(&[&ys[1], &ys[0]]);
}

#[test]
fn slice() {
    // Several axes, negative bounds and axes, an end past the dimension.
    let mut c = Case::new("Slice multi-axis");
    let x = c.input("x", &[4, 5, 6]);
    let (s, e, a) = (c.ints("starts", &[1, -4]), c.ints("ends", &[-1, 100]), c.ints("axes", &[0, -1]));
    let y = c.op("Slice", &[&x, &s, &e, &a], vec![]);
    c.check(&[&y]);

    // Default axes, explicit unit steps, a bound clamped at the start.
    let mut c = Case::new("Slice default axes");
    let x = c.input("x", &[4, 5, 6]);
    let (s, e) = (c.ints("starts", &[-100, 2, 0]), c.ints("ends", &[2, -1, 6]));
    let st = c.ints("steps", &[1, 1, 1]);
    let y = c.op("Slice", &[&x, &s, &e, "", &st], vec![]);
    c.check(&[&y]);

    // Every other element of the last axis, from 0 and from 1 (GPT-J's and CodeGen's rotary: `x[..., ::2]`,
    // `x[..., 1::2]`), both read by the loss.
    let mut c = Case::new("Slice step 2, even and odd");
    let x = c.input("x", &[2, 3, 8]);
    let (e, a, st) = (c.ints("ends", &[i64::MAX]), c.ints("axes", &[-1]), c.ints("steps", &[2]));
    let (s0, s1) = (c.ints("starts0", &[0]), c.ints("starts1", &[1]));
    let even = c.op("Slice", &[&x, &s0, &e, &a, &st], vec![]);
    let odd = c.op("Slice", &[&x, &s1, &e, &a, &st], vec![]);
    c.check(&[&even, &odd]);

    // Steps that do not divide the run, on a middle axis, with a step-1 axis beside it: x[1:, 1:6:3, :3].
    let mut c = Case::new("Slice step 3 within bounds, two axes");
    let x = c.input("x", &[3, 7, 5]);
    let (s, e) = (c.ints("starts", &[1, 1, 0]), c.ints("ends", &[3, 6, 3]));
    let st = c.ints("steps", &[1, 3, 1]);
    let y = c.op("Slice", &[&x, &s, &e, "", &st], vec![]);
    c.check(&[&y]);
}

// ---------------------------------------------------------------------------------------------------------
// Normalizations and reductions

#[test]
fn softmax() {
    for (op, axis) in [("Softmax", -1), ("Softmax", 1), ("LogSoftmax", -1), ("LogSoftmax", 1)] {
        let mut c = Case::new(&format!("{op} axis {axis}"));
        let x = c.input("x", &[2, 3, 4]);
        let y = c.op(op, &[&x], vec![("axis", Attr::Int(axis))]);
        c.check(&[&y]);
    }
}

#[test]
fn layer_normalization() {
    for (axis, ps) in [(-1i64, vec![4]), (1, vec![3, 4])] {
        // tract computes LayerNormalization to f32 precision, even on f64 tensors.
        let mut c = Case::new(&format!("LayerNormalization axis {axis}")).with_fd(Fd::F32OnTract);
        let x = c.input("x", &[2, 3, 4]);
        let (s, b) = (c.konst("scale", &ps), c.konst("bias", &ps));
        let y =
            c.op("LayerNormalization", &[&x, &s, &b], vec![("axis", Attr::Int(axis)), ("epsilon", Attr::Float(1e-5))]);
        c.check(&[&y]);
    }
    let mut c = Case::new("LayerNormalization no bias").with_fd(Fd::F32OnTract);
    let x = c.input("x", &[3, 5]);
    let s = c.konst("scale", &[5]);
    let y = c.op("LayerNormalization", &[&x, &s], vec![]);
    c.check(&[&y]);
}

#[test]
fn reductions() {
    for op in ["ReduceSum", "ReduceMean"] {
        for (axes, keep) in [
            (Some(vec![0, 2]), 0),
            (Some(vec![0, 2]), 1),
            (Some(vec![-1]), 0),
            (Some(vec![1, 2]), 1),
            (None, 0),
            (None, 1),
        ] {
            let mut c = Case::new(&format!("{op} {axes:?} keepdims {keep}"));
            let x = c.input("x", &[2, 3, 4]);
            let keepdims = vec![("keepdims", Attr::Int(keep))];
            let y = match axes {
                Some(a) => {
                    let a = c.ints("axes", &a);
                    c.op(op, &[&x, &a], keepdims)
                }
                None => c.op(op, &[&x], keepdims),
            };
            c.check(&[&y]);
        }
    }
}

#[test]
fn where_() {
    let mut c = Case::new("Where cond [3,1]");
    let cond = c.g.add_const("cond", Tensor::bool(vec![3, 1], vec![true, false, true]));
    let a = c.input("a", &[2, 3, 4]);
    let b = c.input("b", &[4]);
    let y = c.op("Where", &[&cond, &a, &b], vec![]);
    c.check(&[&y]);

    let mut c = Case::new("Where cond [2,3,4]");
    let bits: Vec<bool> = (0..24).map(|i| (i * 7) % 3 == 0).collect();
    let cond = c.g.add_const("cond", Tensor::bool(vec![2, 3, 4], bits));
    let a = c.input("a", &[3, 1]);
    let b = c.input("b", &[2, 1, 4]);
    let y = c.op("Where", &[&cond, &a, &b], vec![]);
    c.check(&[&y]);
}

// ---------------------------------------------------------------------------------------------------------
// Ops without a rule of their own, which canonicalization rewrites into ops that have one

impl Case {
    /// Runs the compiler's canonicalization on the case's graph (outputs `ys`, opset `opset`), as a loaded export
    /// would be; the op under test must be gone.
    fn canonicalized(mut self, ys: &[&str], opset: i64, gone: &str) -> Case {
        self.g.outputs =
            ys.iter().map(|y| ValueInfo { name: y.to_string(), ty: ValueType { dtype: F64, shape: None } }).collect();
        let mut m = Model { graph: std::mem::take(&mut self.g), opset, ir_version: 9, ..Model::default() };
        canonicalize(&mut m).unwrap_or_else(|e| panic!("{}: canonicalize: {e:#}", self.name));
        assert!(m.graph.nodes.iter().all(|n| n.op != gone), "{}: a {gone} is left", self.name);
        self.g = m.graph;
        self
    }
}

#[test]
fn gelu() {
    // tanh: float64 end to end. The input goes through a MatMul first, so Gelu reads an untyped value.
    let mut c = Case::new("Gelu tanh (canonicalized)");
    let x = c.input("x", &[2, 3, 4]);
    let w = c.konst("w", &[4, 4]);
    let h = c.op("MatMul", &[&x, &w], vec![]);
    let y = c.op("Gelu", &[&h], vec![("approximate", Attr::Str("tanh".into()))]);
    c.canonicalized(&[&y], 20, "Gelu").check(&[&y]);
    // none (erf): f32, tract has no f64 Erf.
    let mut c = Case::new("Gelu none (canonicalized)").with_fd(Fd::F32Forward);
    let x = c.input_of("x", &[2, 3, 4], Dist::Any, DType::F32);
    let y = c.op("Gelu", &[&x], vec![]);
    c.canonicalized(&[&y], 20, "Gelu").check(&[&y]);
}

#[test]
fn gather_of_a_constant_index() {
    // Falcon's fused qkv, [batch, seq, heads, 3, head_dim], split by constant indices on axis 3.
    let mut c = Case::new("Gather scalar indices (canonicalized)");
    let x = c.input("x", &[2, 2, 2, 3, 4]);
    let t = c.op("Tanh", &[&x], vec![]);
    let mut ys = Vec::new();
    for (k, idx) in [0i64, 1, -1].into_iter().enumerate() {
        let i = c.g.add_const(&format!("index{k}"), Tensor::scalar_i64(idx));
        ys.push(c.op("Gather", &[&t, &i], vec![("axis", Attr::Int(3))]));
    }
    // A negative axis, a one-element index vector.
    let i = c.ints("index_vec", &[-2]);
    ys.push(c.op("Gather", &[&t, &i], vec![("axis", Attr::Int(-1))]));
    let ys: Vec<&str> = ys.iter().map(String::as_str).collect();
    c.canonicalized(&ys, 18, "Gather").check(&ys);
}

#[test]
fn gather_nd_of_a_constant_index() {
    // torch.onnx dynamo's multi-query Falcon: key and value are rows -2 and -1 of axis 0, kept ([[i]]); also a
    // row dropped ([i]).
    let mut c = Case::new("GatherND constant index (canonicalized)");
    let x = c.input("x", &[3, 2, 4]);
    let t = c.op("Tanh", &[&x], vec![]);
    let mut ys = Vec::new();
    for (k, idx) in [-2i64, -1, 0].into_iter().enumerate() {
        let i = c.g.add_const(&format!("row{k}"), Tensor::i64(vec![1, 1], vec![idx]));
        ys.push(c.op("GatherND", &[&t, &i], vec![]));
    }
    let i = c.ints("row_dropped", &[1]);
    ys.push(c.op("GatherND", &[&t, &i], vec![]));
    let ys: Vec<&str> = ys.iter().map(String::as_str).collect();
    c.canonicalized(&ys, 18, "GatherND").check(&ys);
}

// ---------------------------------------------------------------------------------------------------------
// The engine: missing rules, frozen branches

#[test]
fn op_without_rule_on_the_path_is_an_error() {
    let mut c = Case::new("Sin");
    let x = c.input("x", &[3]);
    let t = c.g.op1("Tanh", &[&x], vec![], "t");
    let y = c.g.op1("Sin", &[&t], vec![], "the_sine");
    let r = c.konst("r", &[3]);
    let m = c.g.op1("Mul", &[&y, &r], vec![], "m");
    let loss = c.g.op1("ReduceSum", &[&m], vec![("keepdims", Attr::Int(0))], "loss");
    fold_and_infer(&mut c.g).unwrap();
    let e = build_gradients(&mut c.g, &loss, &c.wrt).expect_err("Sin has no rule").to_string();
    assert!(e.contains("Sin") && e.contains("the_sine.node"), "the error should name the op and node: {e}");
}

#[test]
fn frozen_branches_get_no_gradient_nodes() {
    // loss = Σ R · (Tanh(x) · Exp(z) + Sin(z)), trainable x only: Exp and Sin (no rule) are off the path.
    let mut c = Case::new("frozen");
    let x = c.input("x", &[2, 3]);
    let z = "z".to_string();
    c.g.inputs.push(ValueInfo { name: z.clone(), ty: ValueType::known(F64, &[2, 3]) });
    let t = c.g.op1("Tanh", &[&x], vec![], "on_tanh");
    let e = c.g.op1("Exp", &[&z], vec![], "frozen_exp");
    let m = c.g.op1("Mul", &[&t, &e], vec![], "on_mul");
    let s = c.g.op1("Sin", &[&z], vec![], "frozen_sin");
    let y = c.g.op1("Add", &[&m, &s], vec![], "on_add");
    let r = c.konst("r", &[2, 3]);
    let p = c.g.op1("Mul", &[&y, &r], vec![], "on_loss_mul");
    let loss = c.g.op1("ReduceSum", &[&p], vec![("keepdims", Attr::Int(0))], "on_loss");
    fold_and_infer(&mut c.g).unwrap();
    let before = c.g.nodes.len();
    let grads = build_gradients(&mut c.g, &loss, &c.wrt).unwrap();
    assert_eq!(grads.len(), 1);
    let new: Vec<&str> = c.g.nodes[before..].iter().map(|n| n.name.as_str()).collect();
    assert!(!new.is_empty());
    for n in &new {
        assert!(n.starts_with("grad/"), "unexpected node {n}");
        assert!(!n.contains("frozen"), "a frozen op got gradient nodes: {n} (all new nodes: {new:?})");
    }
    // Mul(Tanh(x), Exp(z)) differentiates only towards Tanh(x): one Mul, no gradient towards Exp(z).
    let mul_nodes: Vec<&&str> = new.iter().filter(|n| n.starts_with("grad/on_mul.node/")).collect();
    assert_eq!(mul_nodes.len(), 1, "Mul with a frozen operand: {mul_nodes:?}");
    // Add(m, Sin(z)): nothing flows to Sin(z).
    let add_nodes: Vec<&&str> = new.iter().filter(|n| n.starts_with("grad/on_add.node/")).collect();
    assert!(add_nodes.is_empty(), "Add of same-shape operands needs no node: {add_nodes:?}");
}
