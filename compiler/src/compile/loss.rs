//! Token cross-entropy from plain ops (tract has no SoftmaxCrossEntropyLoss): mean over labels != -100.

use anyhow::{bail, Result};

use crate::ir::{Attr, Graph, ValueInfo, ValueType};
use crate::tensor::{DType, Tensor};

/// Adds `labels` i64[B, T] and `loss` f32[] reading `logits` [B, T, V]. With `shift`, position t predicts label
/// t+1 (GPT-2, as HF shifts inside the loss); without, labels are already the next tokens (BART).
pub fn add_causal_lm_loss(g: &mut Graph, logits: &str, shift: bool) -> Result<String> {
    let s = g.shape_of(logits).ok_or_else(|| anyhow::anyhow!("the shape of '{logits}' is unknown"))?;
    if s.len() != 3 {
        bail!("logits '{logits}' have shape {s:?}, expected [batch, seq, vocab]");
    }
    let (b, t, v) = (s[0], s[1], s[2]);
    if shift && t < 2 {
        bail!("a causal LM loss needs a sequence of at least 2 tokens (got {t})");
    }
    g.inputs.push(ValueInfo { name: "labels".into(), ty: ValueType::known(DType::I64, &[b, t]) });
    let i = |g: &mut Graph, v: &[i64]| g.add_const("loss/i", Tensor::vec_i64(v));
    let (lg, lab) = if shift {
        let (s0, s1, e1, e2, a1) = (i(g, &[0]), i(g, &[1]), i(g, &[t as i64 - 1]), i(g, &[t as i64]), i(g, &[1]));
        let lg = g.op1("Slice", &[logits, &s0, &e1, &a1], vec![], "loss/logits");
        let lab = g.op1("Slice", &["labels", &s1, &e2, &a1], vec![], "loss/labels");
        (lg, lab)
    } else {
        (logits.to_string(), "labels".to_string())
    };
    let lp = g.op1("LogSoftmax", &[&lg], vec![("axis", Attr::Int(-1))], "loss/logp");
    let ignore = g.add_const("loss/ignore_index", Tensor::scalar_i64(-100));
    let is_ignored = g.op1("Equal", &[&lab, &ignore], vec![], "loss/ignored");
    let valid = g.op1("Not", &[&is_ignored], vec![], "loss/valid");
    let zero = g.add_const("loss/zero_label", Tensor::scalar_i64(0));
    let safe = g.op1("Where", &[&valid, &lab, &zero], vec![], "loss/safe_labels");
    let last = i(g, &[-1]);
    let safe_u = g.op1("Unsqueeze", &[&safe, &last], vec![], "loss/safe_labels_u");
    let vocab = g.add_const("loss/vocab", Tensor::i64(vec![v], (0..v as i64).collect()));
    let hit = g.op1("Equal", &[&safe_u, &vocab], vec![], "loss/one_hot_b");
    let onehot = g.op1("Cast", &[&hit], vec![("to", Attr::Int(DType::F32.onnx_code() as i64))], "loss/one_hot");
    let picked = g.op1("Mul", &[&lp, &onehot], vec![], "loss/picked_all");
    let picked = g.op1("ReduceSum", &[&picked, &last], vec![("keepdims", Attr::Int(0))], "loss/picked");
    let validf = g.op1("Cast", &[&valid], vec![("to", Attr::Int(DType::F32.onnx_code() as i64))], "loss/valid_f");
    let masked = g.op1("Mul", &[&picked, &validf], vec![], "loss/masked");
    let total = g.op1("ReduceSum", &[&masked], vec![("keepdims", Attr::Int(0))], "loss/total");
    let count = g.op1("ReduceSum", &[&validf], vec![("keepdims", Attr::Int(0))], "loss/count");
    let mean = g.op1("Div", &[&total, &count], vec![], "loss/mean");
    let loss = g.op1("Neg", &[&mean], vec![], "loss");
    Ok(loss)
}
