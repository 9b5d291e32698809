//! Token cross-entropy from plain ops (tract has no SoftmaxCrossEntropyLoss), and its gradient written out in
//! closed form.
//!
//! The loss is the mean over labels != -100 of logsumexp(logits) - logits[label], optionally label-smoothed as
//! torch's `cross_entropy(label_smoothing=ε)`, read off the softmax the gradient needs anyway. Differentiating it
//! op by op would materialize about ten [B, T, V] tensors (V = 50k for GPT-2: 64 MB each at B·T = 320), so
//! `training_graphs` seeds the backward pass in closed form: at the LM head's input when the logits come from a
//! frozen linear head (`add_hidden_gradient`: no [B, T, V] gradient at all), else at the logits
//! (`add_logits_gradient`: (softmax - (1-ε)·onehot - ε/V) · valid / count, one scaling pass and B·T scattered
//! updates).

use anyhow::{bail, Result};

use crate::ir::{Attr, Graph, ValueInfo, ValueType};
use crate::tensor::{DType, Data, Tensor};

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

/// The per-position targets.
struct Targets {
    /// Labels [B, T] with ignored ones set to 0 (any valid index: their weight is 0).
    safe: String,
    /// The same, [B, T, 1].
    safe_u: String,
    /// 1.0 where the label counts, else 0.0, [B, T, 1].
    valid: String,
}

/// With `spec.shift`, position t reads label t+1 and the last position is ignored (no slice of the logits needed).
fn targets(g: &mut Graph, spec: &LossSpec, b: usize, t: usize) -> Targets {
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
    let valid = g.op1("Unsqueeze", &[&validf, &last], vec![], "loss/valid_u");
    Targets { safe, safe_u, valid }
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
    let Targets { safe_u, valid: validf, .. } = targets(g, spec, b, t);
    let lg = spec.logits.as_str();
    // nll = -log p[label] per position [B, T, 1], with log p = x - max x - ln Σ exp(x - max x). The softmax p is
    // the one the backward seed needs (the same node: CSE merges them), and its largest value is exp(0) / Σ, so
    // ln Σ = -ln max p: one Ln of B·T values instead of a log over the whole [B, T, V] (a LogSoftmax: tract's
    // `Ln` over 16 M values was 30 ms of a GPT-2 step), and max p >= 1/V never underflows.
    let last = g.add_const("loss/axis", Tensor::vec_i64(&[-1]));
    let keep = || vec![("keepdims", Attr::Int(1))];
    let p = g.op1("Softmax", &[lg], vec![("axis", Attr::Int(-1))], "loss/probs");
    let top = g.op1("ReduceMax", &[lg, &last], keep(), "loss/max_logit");
    let p_top = g.op1("ReduceMax", &[&p, &last], keep(), "loss/max_prob");
    let ln_p_top = g.op1("Log", &[&p_top], vec![], "loss/log_max_prob");
    // -log p[label] = (max x - x[label]) - ln max p
    let picked = g.op1("GatherElements", &[lg, &safe_u], vec![("axis", Attr::Int(-1))], "loss/picked_logit");
    let below = g.op1("Sub", &[&top, &picked], vec![], "loss/below_max");
    let mut nll = g.op1("Sub", &[&below, &ln_p_top], vec![], "loss/nll");
    if spec.smoothing > 0.0 {
        // The uniform part: -mean over the vocabulary of log p = (max x - mean x) - ln max p.
        let mean = g.op1("ReduceMean", &[lg, &last], keep(), "loss/mean_logit");
        let spread = g.op1("Sub", &[&top, &mean], vec![], "loss/mean_below_max");
        let uniform = g.op1("Sub", &[&spread, &ln_p_top], vec![], "loss/uniform");
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

/// Rewrites the loss of a graph made by [`add_loss`] to read the label's log-probability off a `LogSoftmax`:
/// -log p[label] = -LogSoftmax(x)[label] (and the label-smoothing term -mean log p), in place of the two
/// `ReduceMax` over the vocabulary. The same values, for ONNX Runtime on a GPU: its CUDA `ReduceMax` runs
/// cuDNN's generic reduction, ~5 ms for each over [640, 50257] on an H200 (half of a GPT-2 step), while its
/// `LogSoftmax` is one pass like its `Softmax`. tract keeps `add_loss`'s form: its `LogSoftmax` is `Ln(Softmax)`,
/// a scalar `ln` over every logit. Finds the loss by the value names `add_loss` gives; returns whether it did.
pub fn loss_via_log_softmax(g: &mut Graph) -> Result<bool> {
    let producers = g.producers();
    let node_of = |v: &str| producers.get(v).copied();
    let (Some(nll), Some(picked)) = (node_of("loss/nll"), node_of("loss/picked_logit")) else { return Ok(false) };
    let (lg, label) = (g.nodes[picked].inputs[0].clone(), g.nodes[picked].inputs[1].clone());
    let uniform = node_of("loss/uniform");
    let axis = vec![("axis", Attr::Int(-1))];
    let logp = g.op1("LogSoftmax", &[&lg], axis.clone(), "loss/log_probs");
    let at_label = g.op1("GatherElements", &[&logp, &label], axis, "loss/label_log_prob");
    let mut replaced = vec![(
        nll,
        crate::ir::Node::new(g.nodes[nll].name.clone(), "Neg", vec![at_label], g.nodes[nll].outputs.clone()),
    )];
    if let Some(u) = uniform {
        let last = g.add_const("loss/axis", Tensor::vec_i64(&[-1]));
        let mean = g.op1("ReduceMean", &[&logp, &last], vec![("keepdims", Attr::Int(1))], "loss/mean_log_prob");
        replaced
            .push((u, crate::ir::Node::new(g.nodes[u].name.clone(), "Neg", vec![mean], g.nodes[u].outputs.clone())));
    }
    for (i, n) in replaced {
        g.nodes[i] = n;
    }
    g.toposort()?;
    crate::simplify::simplify(g)?;
    Ok(true)
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
    let Targets { safe_u, valid, .. } = targets(g, spec, b, t);
    let lg = spec.logits.as_str();
    let w = position_weights(g, &valid);
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

/// valid / count [B, T, 1]: each position's share of the mean.
fn position_weights(g: &mut Graph, valid: &str) -> String {
    let count = g.op1("ReduceSum", &[valid], vec![("keepdims", Attr::Int(0))], "loss/count");
    g.op1("Div", &[valid, &count], vec![], "grad/loss/weight")
}

/// The frozen LM head weight under the logits, as the graph stores it.
enum HeadWeight {
    /// W [V, H]: the logits read `Transpose(W)` (a tied embedding).
    Rows(String),
    /// Wᵀ [H, V], an initializer.
    Cols(String),
}

/// `logits = h · Wᵀ`, optionally plus a constant bias, with a frozen 2-D W and `h` [B, T, H] read by nothing else.
fn find_lm_head(g: &Graph, logits: &str) -> Option<(String, HeadWeight)> {
    let producers = g.producers();
    let node = |v: &str| producers.get(v).map(|&i| &g.nodes[i]).filter(|n| n.domain.is_empty());
    let mut top = node(logits)?;
    if top.op == "Add" {
        let (a, b) = (&top.inputs[0], &top.inputs[1]);
        let mm = if g.initializers.contains_key(b) {
            a
        } else if g.initializers.contains_key(a) {
            b
        } else {
            return None;
        };
        top = node(mm)?;
    }
    if top.op != "MatMul" {
        return None;
    }
    let (h, wt) = (&top.inputs[0], &top.inputs[1]);
    let weight = if g.initializers.contains_key(wt) {
        HeadWeight::Cols(wt.clone())
    } else {
        let t = node(wt)?;
        let plain = t.op == "Transpose" && t.ints("perm") == Some(&[1, 0]) && g.initializers.contains_key(&t.inputs[0]);
        if !plain {
            return None;
        }
        HeadWeight::Rows(t.inputs[0].clone())
    };
    let alone = g.consumers().get(h).map(Vec::len) == Some(1) && !g.is_output(h);
    let rank3 = g.shape_of(h).is_some_and(|s| s.len() == 3);
    (alone && rank3).then(|| (h.clone(), weight))
}

/// d loss / d h for the input h of the LM head, when `find_lm_head` recognizes it: with p = softmax(logits),
/// dh = w ⊙ (p·W − (1−ε)·W[label] − (ε/V)·Σ_v W[v]), w = valid / count per position. The [B, T, V] gradient of
/// the logits is never formed: the label's term is a row lookup of W instead of a scattered one-hot, and the
/// per-position weight scales H values instead of V. Returns (h, dh), or None (then seed at the logits with
/// `add_logits_gradient`).
pub fn add_hidden_gradient(g: &mut Graph, spec: &LossSpec) -> Result<Option<(String, String)>> {
    let (b, t, v) = logits_shape(g, &spec.logits)?;
    let Some((h, weight)) = find_lm_head(g, &spec.logits) else { return Ok(None) };
    let hd = g.shape_of(&h).map(|s| s[2]).unwrap_or(0);
    let Targets { safe, valid, .. } = targets(g, spec, b, t);
    let w = position_weights(g, &valid);
    let i = |g: &mut Graph, v: &[i64]| g.add_const("grad/loss/shape", Tensor::vec_i64(v));
    let p = g.op1("Softmax", &[&spec.logits], vec![("axis", Attr::Int(-1))], "grad/loss/softmax");
    let flat = i(g, &[(b * t) as i64, v as i64]);
    let p2 = g.op1("Reshape", &[&p, &flat], vec![], "grad/loss/softmax_rows");
    let (pw, rows) = match &weight {
        HeadWeight::Rows(wr) => (
            g.op1("Gemm", &[&p2, wr], vec![], "grad/loss/expected_row"),
            g.op1("Gather", &[wr, &safe], vec![("axis", Attr::Int(0))], "grad/loss/label_row"),
        ),
        HeadWeight::Cols(wc) => {
            let pw = g.op1("Gemm", &[&p2, wc], vec![("transB", Attr::Int(1))], "grad/loss/expected_row");
            let cols = g.op1("Gather", &[wc, &safe], vec![("axis", Attr::Int(1))], "grad/loss/label_cols");
            let rows = g.op1("Transpose", &[&cols], vec![("perm", Attr::Ints(vec![1, 2, 0]))], "grad/loss/label_row");
            (pw, rows)
        }
    };
    let back = i(g, &[b as i64, t as i64, hd as i64]);
    let pw = g.op1("Reshape", &[&pw, &back], vec![], "grad/loss/expected_row_3d");
    let rows = if spec.smoothing > 0.0 {
        let a = g.add_const("loss/one_minus_eps", Tensor::scalar_f32(1.0 - spec.smoothing));
        g.op1("Mul", &[&rows, &a], vec![], "grad/loss/label_row_weighted")
    } else {
        rows
    };
    let mut d = g.op1("Sub", &[&pw, &rows], vec![], "grad/loss/hidden_unweighted");
    if spec.smoothing > 0.0 {
        // The uniform part: (ε/V)·Σ_v W[v], a constant [H] computed here once.
        let (name, by_rows) = match &weight {
            HeadWeight::Rows(wr) => (wr, true),
            HeadWeight::Cols(wc) => (wc, false),
        };
        let sums = vocab_sums(&g.initializers[name], by_rows)
            .ok_or_else(|| anyhow::anyhow!("the LM head weight '{name}' is not f32"))?;
        let scale = spec.smoothing as f64 / v as f64;
        let u = g.add_const(
            "grad/loss/uniform_row",
            Tensor::f32(vec![hd], sums.iter().map(|&x| (x * scale) as f32).collect()),
        );
        d = g.op1("Sub", &[&d, &u], vec![], "grad/loss/hidden_smoothed");
    }
    let dh = g.op1("Mul", &[&d, &w], vec![], "grad/loss/hidden");
    Ok(Some((h, dh)))
}

/// Σ over the vocabulary of the LM head weight, per hidden unit (f64 sums): W [V, H] summed over rows
/// (`by_rows`), or Wᵀ [H, V] over columns.
fn vocab_sums(t: &Tensor, by_rows: bool) -> Option<Vec<f64>> {
    let Data::F32(x) = &*t.data else { return None };
    let (r, c) = (t.shape[0], t.shape[1]);
    Some(if by_rows {
        let mut s = vec![0f64; c];
        for row in x.chunks(c) {
            for (acc, &e) in s.iter_mut().zip(row) {
                *acc += e as f64;
            }
        }
        s
    } else {
        (0..r).map(|i| x[i * c..(i + 1) * c].iter().map(|&e| e as f64).sum()).collect()
    })
}
