//! Token cross-entropy from plain ops (tract has no SoftmaxCrossEntropyLoss), and its gradient with respect to
//! the logits written out in closed form.
//!
//! The loss is the mean over labels != -100 of logsumexp(logits) - logits[label], optionally label-smoothed as
//! torch's `cross_entropy(label_smoothing=ε)`. Differentiating that op by op would materialize about ten
//! [B, T, V] tensors (V = 50k for GPT-2: 64 MB each at B·T = 320); the closed form
//! (softmax - (1-ε)·onehot - ε/V) · valid / count needs a softmax, one scaling pass and B·T scattered updates,
//! so `training_graphs` seeds the backward pass at the logits with it.

use anyhow::{bail, Result};

use crate::ir::{Attr, Graph, ValueInfo, ValueType};
use crate::tensor::{DType, Tensor};

/// What the loss reads and how: enough to build both the loss and its gradient.
#[derive(Clone, Debug)]
pub struct LossSpec {
    /// The logits value [B, T, V].
    pub logits: String,
    /// Position t predicts label t+1 (GPT-2, as HF shifts inside the loss); without, labels are already the
    /// next tokens (BART).
    pub shift: bool,
    /// Label smoothing ε (0 = plain cross-entropy).
    pub smoothing: f32,
}

/// The per-position targets: (safe labels [B, T, 1] with ignored ones set to 0, valid mask as f32 [B, T, 1]).
/// With `shift`, position t reads label t+1 and the last position is ignored (no slice of the logits needed).
fn targets(g: &mut Graph, spec: &LossSpec, b: usize, t: usize) -> (String, String) {
    let i = |g: &mut Graph, v: &[i64]| g.add_const("loss/i", Tensor::vec_i64(v));
    let lab = if spec.shift {
        let (s1, e, a1) = (i(g, &[1]), i(g, &[t as i64]), i(g, &[1]));
        let next = g.op1("Slice", &["labels", &s1, &e, &a1], vec![], "loss/next_labels");
        let tail = g.add_const("loss/last_ignored", Tensor::i64(vec![b, 1], vec![-100; b]));
        g.op1("Concat", &[&next, &tail], vec![("axis", Attr::Int(1))], "loss/shifted_labels")
    } else {
        "labels".to_string()
    };
    let ignore = g.add_const("loss/ignore_index", Tensor::scalar_i64(-100));
    let is_ignored = g.op1("Equal", &[&lab, &ignore], vec![], "loss/ignored");
    let valid = g.op1("Not", &[&is_ignored], vec![], "loss/valid");
    let zero = g.add_const("loss/zero_label", Tensor::scalar_i64(0));
    let safe = g.op1("Where", &[&valid, &lab, &zero], vec![], "loss/safe_labels");
    let last = i(g, &[-1]);
    let safe_u = g.op1("Unsqueeze", &[&safe, &last], vec![], "loss/safe_labels_u");
    let validf = g.op1("Cast", &[&valid], vec![("to", Attr::Int(DType::F32.onnx_code() as i64))], "loss/valid_f");
    let validf = g.op1("Unsqueeze", &[&validf, &last], vec![], "loss/valid_u");
    (safe_u, validf)
}

fn logits_shape(g: &Graph, logits: &str) -> Result<(usize, usize, usize)> {
    let s = g.shape_of(logits).ok_or_else(|| anyhow::anyhow!("the shape of '{logits}' is unknown"))?;
    if s.len() != 3 {
        bail!("logits '{logits}' have shape {s:?}, expected [batch, seq, vocab]");
    }
    Ok((s[0], s[1], s[2]))
}

/// Adds `labels` i64[B, T] and the scalar loss; returns the loss value's name.
pub fn add_loss(g: &mut Graph, spec: &LossSpec) -> Result<String> {
    let (b, t, _) = logits_shape(g, &spec.logits)?;
    if spec.shift && t < 2 {
        bail!("a causal LM loss needs a sequence of at least 2 tokens (got {t})");
    }
    g.inputs.push(ValueInfo { name: "labels".into(), ty: ValueType::known(DType::I64, &[b, t]) });
    let (safe_u, validf) = targets(g, spec, b, t);
    let lg = spec.logits.as_str();
    // nll = -log_softmax(logits)[label], per position [B, T, 1]. One LogSoftmax pass over the vocabulary
    // (ONNX Runtime's ReduceLogSumExp is a scalar loop, ~10x slower than its Softmax kernels).
    let logp = g.op1("LogSoftmax", &[lg], vec![("axis", Attr::Int(-1))], "loss/log_probs");
    let picked = g.op1("GatherElements", &[&logp, &safe_u], vec![("axis", Attr::Int(-1))], "loss/picked");
    let mut nll = g.op1("Neg", &[&picked], vec![], "loss/nll");
    if spec.smoothing > 0.0 {
        // The uniform part: -mean over the vocabulary of log p.
        let last = g.add_const("loss/axis", Tensor::vec_i64(&[-1]));
        let mean = g.op1("ReduceMean", &[&logp, &last], vec![("keepdims", Attr::Int(1))], "loss/mean_log_prob");
        let uniform = g.op1("Neg", &[&mean], vec![], "loss/uniform");
        let (a, e) = (
            g.add_const("loss/one_minus_eps", Tensor::scalar_f32(1.0 - spec.smoothing)),
            g.add_const("loss/eps", Tensor::scalar_f32(spec.smoothing)),
        );
        let x = g.op1("Mul", &[&nll, &a], vec![], "loss/nll_part");
        let y = g.op1("Mul", &[&uniform, &e], vec![], "loss/uniform_part");
        nll = g.op1("Add", &[&x, &y], vec![], "loss/smoothed");
    }
    let masked = g.op1("Mul", &[&nll, &validf], vec![], "loss/masked");
    let total = g.op1("ReduceSum", &[&masked], vec![("keepdims", Attr::Int(0))], "loss/total");
    let count = g.op1("ReduceSum", &[&validf], vec![("keepdims", Attr::Int(0))], "loss/count");
    Ok(g.op1("Div", &[&total, &count], vec![], "loss"))
}

/// Ends a forward graph in the loss: adds it (and `labels`), makes it the only output, and puts the batch inputs
/// first in a fixed order (input_ids, attention_mask, labels), the trainable tensors after.
pub fn finish_with_loss(g: &mut Graph, spec: &LossSpec) -> Result<String> {
    let loss = add_loss(g, spec)?;
    g.outputs = vec![ValueInfo { name: loss.clone(), ty: ValueType::known(DType::F32, &[]) }];
    let order = |n: &str| match n {
        "input_ids" => 0,
        "attention_mask" => 1,
        "labels" => 2,
        _ => 3,
    };
    g.inputs.sort_by_key(|v| order(&v.name));
    Ok(loss)
}

/// d loss / d logits [B, T, V] in closed form: (softmax - (1-ε)·onehot - ε/V) · valid / count.
pub fn add_logits_gradient(g: &mut Graph, spec: &LossSpec) -> Result<String> {
    let (b, t, v) = logits_shape(g, &spec.logits)?;
    let (safe_u, validf) = targets(g, spec, b, t);
    let lg = spec.logits.as_str();
    let count = g.op1("ReduceSum", &[&validf], vec![("keepdims", Attr::Int(0))], "loss/count");
    let w = g.op1("Div", &[&validf, &count], vec![], "grad/loss/weight");
    let sm = g.op1("Softmax", &[lg], vec![("axis", Attr::Int(-1))], "grad/loss/softmax");
    let mut grad = g.op1("Mul", &[&sm, &w], vec![], "grad/loss/weighted");
    if spec.smoothing > 0.0 {
        let c = g.add_const("grad/loss/eps_over_v", Tensor::scalar_f32(spec.smoothing / v as f32));
        let u = g.op1("Mul", &[&w, &c], vec![], "grad/loss/uniform_weight");
        grad = g.op1("Sub", &[&grad, &u], vec![], "grad/loss/logits_smoothed");
    }
    // The label's column gets -(1-ε)·w added in place: B·T updates, no pass over the vocabulary.
    let hit_w = if spec.smoothing > 0.0 {
        let a = g.add_const("loss/one_minus_eps", Tensor::scalar_f32(1.0 - spec.smoothing));
        g.op1("Mul", &[&w, &a], vec![], "grad/loss/label_weight")
    } else {
        w.clone()
    };
    let update = g.op1("Neg", &[&hit_w], vec![], "grad/loss/label_update");
    grad = g.op1(
        "ScatterElements",
        &[&grad, &safe_u, &update],
        vec![("axis", Attr::Int(-1)), ("reduction", Attr::Str("add".into()))],
        "grad/loss/logits",
    );
    Ok(grad)
}
