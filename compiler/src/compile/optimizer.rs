//! AdamW with global-norm gradient clipping, as graph ops computing what `torch.nn.utils.clip_grad_norm_`
//! followed by `torch.optim.AdamW.step()` compute.

use std::collections::BTreeMap;

use crate::ir::{Graph, ValueInfo, ValueType};
use crate::tensor::{DType, Tensor};

#[derive(Clone, Debug)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// None turns clipping off.
    pub max_grad_norm: Option<f32>,
}

impl AdamW {
    /// Refuses hyperparameters that would write a manifest no one can read back (JSON has no NaN) or train
    /// nonsense.
    pub fn check(&self) -> anyhow::Result<()> {
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            anyhow::bail!("--weight-decay must be a finite number ≥ 0 (got {})", self.weight_decay);
        }
        if let Some(c) = self.max_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                anyhow::bail!("--max-grad-norm must be a finite number > 0, or 0 for no clipping (got {c})");
            }
        }
        for (what, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                anyhow::bail!("AdamW's {what} must be in [0, 1) (got {v})");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            anyhow::bail!("AdamW's eps must be a finite number > 0 (got {})", self.eps);
        }
        Ok(())
    }
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, max_grad_norm: Some(1.0) }
    }
}

/// Block length of [`blocked_sum`].
const SUM_BLOCK: usize = 256;

/// The sum of a flat f32 vector of `n` elements (`n` = 0 when unknown: one plain sum), as sums of sums of at
/// most ~[`SUM_BLOCK`] terms. One running f32 sum over millions of positive squares loses the small terms: for
/// a 4 M-element gradient tract's sum came out 0.4% low (ONNX Runtime's, vectorized, 0.05%), and the clipping
/// coefficient with it, where PyTorch's blocked reduction is within ~1e-6.
/// `last` is the constant [-1] (the last axis).
fn blocked_sum(g: &mut Graph, flat: &str, n: usize, last: &str) -> String {
    let keep0 = || vec![("keepdims", crate::ir::Attr::Int(0))];
    let (mut x, mut len) = (flat.to_string(), n);
    while len > 4 * SUM_BLOCK {
        // A block length dividing the length (prefix sizes are products of model sizes), else zeros appended.
        let divisor = (SUM_BLOCK / 2..=SUM_BLOCK * 2).filter(|b| len % b == 0).min_by_key(|b| b.abs_diff(SUM_BLOCK));
        let b = divisor.unwrap_or_else(|| {
            let pad = SUM_BLOCK - len % SUM_BLOCK;
            let zeros = g.add_const("adam/sum_pad", Tensor::f32(vec![pad], vec![0.0; pad]));
            x = g.op1("Concat", &[&x, &zeros], vec![("axis", crate::ir::Attr::Int(0))], "adam/grad_sq_padded");
            len += pad;
            SUM_BLOCK
        });
        let rows = g.add_const("adam/sum_blocks", Tensor::vec_i64(&[(len / b) as i64, b as i64]));
        let blocks = g.op1("Reshape", &[&x, &rows], vec![], "adam/grad_sq_blocks");
        x = g.op1("ReduceSum", &[&blocks, last], keep0(), "adam/grad_sq_block_sums");
        len /= b;
    }
    g.op1("ReduceSum", &[&x], keep0(), "adam/grad_sq_sum")
}

/// Adds inputs `lr` f32[], `step` i64[] (1-based), `adam.m.<name>`, `adam.v.<name>` and outputs `grad_norm`,
/// `new.<name>`, `new.adam.m.<name>`, `new.adam.v.<name>`. `grads` maps each parameter to its gradient value.
/// The per-parameter update below is matched op by op by the tract backend, which runs it as one fused op
/// (`runtime/src/tract_adamw.rs`): change both together (`tests/tract_adamw.rs` fails when the fusion stops
/// applying).
pub fn add_adamw(g: &mut Graph, grads: &BTreeMap<String, String>, opt: &AdamW) {
    let f = |g: &mut Graph, x: f32| g.add_const("adam/c", Tensor::scalar_f32(x));
    g.inputs.push(ValueInfo { name: "lr".into(), ty: ValueType::known(DType::F32, &[]) });
    g.inputs.push(ValueInfo { name: "step".into(), ty: ValueType::known(DType::I64, &[]) });
    // Global norm over all gradients (before clipping). The squares are kept: v's update reuses them.
    let mut total: Option<String> = None;
    let mut squares = BTreeMap::new();
    let flat_shape = g.add_const("shape/flat", Tensor::vec_i64(&[-1]));
    for (name, gr) in grads {
        let sq = g.op1("Mul", &[gr, gr], vec![], "adam/grad_sq");
        // Summed as a flat vector, in blocks (tract reduces a 2-D tensor over all axes one axis at a time, the
        // first strided: 18 ms for the 9.4 M-element MLP weight of GPT-2's prefix, against a few for a flat sum).
        let flat = g.op1("Reshape", &[&sq, &flat_shape], vec![], "adam/grad_sq_flat");
        let n = g.shape_of(name).unwrap_or_default().iter().product::<usize>();
        let s = blocked_sum(g, &flat, n, &flat_shape);
        squares.insert(name.clone(), sq);
        total = Some(match total {
            None => s,
            Some(t) => g.op1("Add", &[&t, &s], vec![], "adam/grad_sq_total"),
        });
    }
    let norm = g.op1("Sqrt", &[&total.unwrap()], vec![], "grad_norm.value");
    let clip = match opt.max_grad_norm {
        Some(c) => {
            // clip_coef = min(max_norm / (norm + 1e-6), 1)
            let (cn, tiny, one) = (f(g, c), f(g, 1e-6), f(g, 1.0));
            let den = g.op1("Add", &[&norm, &tiny], vec![], "adam/norm_eps");
            let coef = g.op1("Div", &[&cn, &den], vec![], "adam/clip_coef");
            Some(g.op1("Min", &[&coef, &one], vec![], "adam/clip_coef_clamped"))
        }
        None => None,
    };
    let stepf =
        g.op1("Cast", &["step"], vec![("to", crate::ir::Attr::Int(DType::F32.onnx_code() as i64))], "adam/step_f");
    let (b1, b2) = (f(g, opt.beta1), f(g, opt.beta2));
    let (omb1, omb2) = (f(g, 1.0 - opt.beta1), f(g, 1.0 - opt.beta2));
    // The clip coefficient goes into the scalars: (c·g)·(1-β1) = g·(c·(1-β1)) and (c·g)² (1-β2) = g²·(c²·(1-β2)),
    // so no clipped copy of a gradient is ever made.
    let (m_scale, v_scale) = match &clip {
        Some(c) => {
            let c2 = g.op1("Mul", &[c, c], vec![], "adam/clip_coef_sq");
            (g.op1("Mul", &[c, &omb1], vec![], "adam/m_scale"), g.op1("Mul", &[&c2, &omb2], vec![], "adam/v_scale"))
        }
        None => (omb1, omb2),
    };
    let one = f(g, 1.0);
    let b1t = g.op1("Pow", &[&b1, &stepf], vec![], "adam/beta1_pow");
    let b2t = g.op1("Pow", &[&b2, &stepf], vec![], "adam/beta2_pow");
    let bc1 = g.op1("Sub", &[&one, &b1t], vec![], "adam/bias_correction1");
    let bc2 = g.op1("Sub", &[&one, &b2t], vec![], "adam/bias_correction2");
    let step_size = g.op1("Div", &["lr", &bc1], vec![], "adam/step_size");
    let bc2s = g.op1("Sqrt", &[&bc2], vec![], "adam/bias_correction2_sqrt");
    let eps = f(g, opt.eps);
    // Decoupled weight decay p·(1 - lr·wd); with wd = 0 (the default) the parameter is used as it is.
    let decay = (opt.weight_decay != 0.0).then(|| {
        let wd = f(g, opt.weight_decay);
        let lrwd = g.op1("Mul", &["lr", &wd], vec![], "adam/lr_wd");
        g.op1("Sub", &[&one, &lrwd], vec![], "adam/decay")
    });
    for (name, gr) in grads {
        let shape = g.shape_of(name).unwrap_or_default();
        let (m, v) = (format!("adam.m.{name}"), format!("adam.v.{name}"));
        for s in [&m, &v] {
            g.inputs.push(ValueInfo { name: s.clone(), ty: ValueType::known(DType::F32, &shape) });
        }
        let p1 = match &decay {
            Some(d) => g.op1("Mul", &[name, d], vec![], &format!("adam/{name}/decayed")),
            None => name.clone(),
        };
        let m1 = g.op1("Mul", &[&m, &b1], vec![], &format!("adam/{name}/m_b1"));
        let m2 = g.op1("Mul", &[gr, &m_scale], vec![], &format!("adam/{name}/m_g"));
        let new_m = g.op1("Add", &[&m1, &m2], vec![], &format!("new.adam.m.{name}"));
        let v1 = g.op1("Mul", &[&v, &b2], vec![], &format!("adam/{name}/v_b2"));
        let v2 = g.op1("Mul", &[&squares[name], &v_scale], vec![], &format!("adam/{name}/v_g"));
        let new_v = g.op1("Add", &[&v1, &v2], vec![], &format!("new.adam.v.{name}"));
        let vs = g.op1("Sqrt", &[&new_v], vec![], &format!("adam/{name}/v_sqrt"));
        let vh = g.op1("Div", &[&vs, &bc2s], vec![], &format!("adam/{name}/v_hat"));
        let den = g.op1("Add", &[&vh, &eps], vec![], &format!("adam/{name}/denom"));
        let upd = g.op1("Div", &[&new_m, &den], vec![], &format!("adam/{name}/ratio"));
        let upd = g.op1("Mul", &[&upd, &step_size], vec![], &format!("adam/{name}/update"));
        let new_p = g.op1("Sub", &[&p1, &upd], vec![], &format!("new.{name}"));
        for (out, shape) in [(new_p, &shape), (new_m, &shape), (new_v, &shape)] {
            g.outputs.push(ValueInfo { name: out, ty: ValueType::known(DType::F32, shape) });
        }
    }
    g.outputs.insert(1, ValueInfo { name: "grad_norm".into(), ty: ValueType::known(DType::F32, &[]) });
    let id = g.fresh("grad_norm.node");
    g.nodes.push(crate::ir::Node::new(id, "Identity", vec![norm], vec!["grad_norm".into()]));
}
