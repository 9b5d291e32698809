//! AdamW's per-parameter update as one tract op, swapped in for the plain ops the compiler emits.
//!
//! The bundle's `train_step` spells AdamW in standard ONNX (`compiler/src/compile/optimizer.rs`), which every
//! engine runs; ONNX Runtime runs it as it is. On tract those are ~9 full passes per parameter, each writing a
//! new tensor: ~50 ms of a GPT-2 step for the 9.4 M-element MLP weight of the prefix. Here the update of each
//! parameter becomes one node that reads p, g, m, v once and writes the new p, m, v in one pass (into their own
//! buffers where the plan no longer needs them), split over the threads tract's products use.
//!
//! The pattern is found from the graph outputs `new.<p>`, `new.adam.m.<p>`, `new.adam.v.<p>` and checked op by op
//! against what `add_adamw` emits; anything else (a graph written by another version of the compiler, weight
//! decay's extra product, a missing piece) is left to the plain ops. The arithmetic is the graph's, in the same
//! order and in f32:
//!
//! ```text
//! m' = m·β1 + g·s_m        v' = v·β2 + (g·g)·s_v        p' = p − (m' / (√v' / c2 + ε))·step
//! ```
//!
//! with s_m, s_v (the clip coefficient folded in), c2 = √(1 − β2^t) and step = lr / (1 − β1^t) computed by the
//! graph as scalars.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

/// The fused update: inputs p, g, m, v and the scalars β1, s_m, β2, s_v, c2, ε, step; outputs p', m', v'.
#[derive(Debug, Clone, Default, Hash, PartialEq, Eq)]
pub struct FusedAdamW;

/// Inputs of [`FusedAdamW`] in order (for messages).
const INPUTS: [&str; 11] =
    ["p", "g", "m", "v", "beta1", "m_scale", "beta2", "v_scale", "bias_correction2_sqrt", "eps", "step_size"];

impl Op for FusedAdamW {
    fn name(&self) -> StaticName {
        "PfxFusedAdamW".into()
    }

    op_as_typed_op!();
}

fn scalar(t: &TValue, what: &str) -> TractResult<f32> {
    let view = t.try_as_plain_ram()?;
    let values = view.as_slice::<f32>()?;
    ensure!(values.len() == 1, "AdamW's {what} has {} values, expected one", values.len());
    Ok(values[0])
}

impl EvalOp for FusedAdamW {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == INPUTS.len(), "PfxFusedAdamW takes {} inputs, got {}", INPUTS.len(), inputs.len());
        let mut k = [0f32; 7];
        for (i, slot) in k.iter_mut().enumerate() {
            *slot = scalar(&inputs[4 + i], INPUTS[4 + i])?;
        }
        let [b1, sm, b2, sv, c2, eps, step] = k;
        inputs.truncate(4);
        // p, m and v are updated in their own buffers when nothing else holds them (the plan hands over a value
        // at its last use), else in a copy: no new 3 × |p| allocation per step.
        let mut v = inputs.pop().unwrap().into_tensor();
        let mut m = inputs.pop().unwrap().into_tensor();
        let g = inputs.pop().unwrap();
        let mut p = inputs.pop().unwrap().into_tensor();
        {
            let gv = g.try_as_plain_ram()?;
            let g = gv.as_slice::<f32>()?;
            let (mut pv, mut mv, mut vv) =
                (p.try_as_plain_ram_mut()?, m.try_as_plain_ram_mut()?, v.try_as_plain_ram_mut()?);
            let (p, m, v) = (pv.as_slice_mut::<f32>()?, mv.as_slice_mut::<f32>()?, vv.as_slice_mut::<f32>()?);
            ensure!(
                g.len() == p.len() && m.len() == p.len() && v.len() == p.len(),
                "AdamW's p, g, m, v differ in size: {}, {}, {}, {}",
                p.len(),
                g.len(),
                m.len(),
                v.len()
            );
            let update = |i0: usize, p: &mut [f32], m: &mut [f32], v: &mut [f32]| {
                for j in 0..p.len() {
                    let gi = g[i0 + j];
                    let mi = m[j] * b1 + gi * sm;
                    let vi = v[j] * b2 + (gi * gi) * sv;
                    let den = vi.sqrt() / c2 + eps;
                    p[j] -= (mi / den) * step;
                    m[j] = mi;
                    v[j] = vi;
                }
            };
            // On the thread pool tract's products run on (`PFX_THREADS` threads), when there is enough to split.
            let threads = crate::tract_backend::product_threads().min(p.len() / MIN_PER_THREAD).max(1);
            let chunk = p.len().div_ceil(threads).max(1);
            let update = &update;
            let jobs: Vec<Box<dyn FnOnce() + Send + '_>> = p
                .chunks_mut(chunk)
                .zip(m.chunks_mut(chunk))
                .zip(v.chunks_mut(chunk))
                .enumerate()
                .map(|(n, ((p, m), v))| Box::new(move || update(n * chunk, p, m, v)) as Box<dyn FnOnce() + Send>)
                .collect();
            crate::tract_backend::run_on_product_pool(jobs);
        }
        Ok(tvec!(p.into_tvalue(), m.into_tvalue(), v.into_tvalue()))
    }
}

/// Below this many elements per thread a parameter is updated on the calling thread.
const MIN_PER_THREAD: usize = 1 << 16;

impl TypedOp for FusedAdamW {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == INPUTS.len(), "PfxFusedAdamW takes {} inputs, got {}", INPUTS.len(), inputs.len());
        let fact = f32::fact(inputs[0].shape.clone());
        Ok(tvec!(fact.clone(), fact.clone(), fact))
    }

    as_op!();
}

/// The node producing `outlet`, if its op is `op` with `arity` inputs: its inputs.
fn inputs_of(model: &TypedModel, outlet: OutletId, op: &str, arity: usize) -> Option<Vec<OutletId>> {
    let node = model.node(outlet.node);
    (node.op().name() == op && node.inputs.len() == arity && outlet.slot == 0).then(|| node.inputs.clone())
}

/// The fused node's inputs for the parameter whose updated tensors are the outlets `new_p`, `new_m`, `new_v`,
/// or None where the graph is not exactly what `add_adamw` emits.
fn match_update(model: &TypedModel, new_p: OutletId, new_m: OutletId, new_v: OutletId) -> Option<Vec<OutletId>> {
    // m' = Add(Mul(m, β1), Mul(g, s_m))
    let add_m = inputs_of(model, new_m, "Add", 2)?;
    let (m, b1) = two(inputs_of(model, add_m[0], "Mul", 2)?);
    let (g, sm) = two(inputs_of(model, add_m[1], "Mul", 2)?);
    // v' = Add(Mul(v, β2), Mul(Mul(g, g), s_v))
    let add_v = inputs_of(model, new_v, "Add", 2)?;
    let (v, b2) = two(inputs_of(model, add_v[0], "Mul", 2)?);
    let (sq, sv) = two(inputs_of(model, add_v[1], "Mul", 2)?);
    let (ga, gb) = two(inputs_of(model, sq, "Mul", 2)?);
    // p' = Sub(p, Mul(Div(m', Add(Div(Sqrt(v'), c2), ε)), step))
    let (p, upd) = two(inputs_of(model, new_p, "Sub", 2)?);
    let (ratio, step) = two(inputs_of(model, upd, "Mul", 2)?);
    let (m_again, den) = two(inputs_of(model, ratio, "Div", 2)?);
    let (v_hat, eps) = two(inputs_of(model, den, "Add", 2)?);
    let (root, c2) = two(inputs_of(model, v_hat, "Div", 2)?);
    let v_again = inputs_of(model, root, "Sqrt", 1)?[0];
    let consistent = ga == g && gb == g && m_again == new_m && v_again == new_v;
    let scalars = [b1, sm, b2, sv, c2, eps, step];
    let f32_scalar = |o: &OutletId| {
        model.outlet_fact(*o).is_ok_and(|f| f.datum_type == f32::datum_type() && f.shape.volume().as_i64() == Some(1))
    };
    // p, g, m, v: f32 tensors of one shape (the op updates them element by element).
    let shape = model.outlet_fact(p).ok()?.shape.clone();
    let same_f32 =
        |o: &OutletId| model.outlet_fact(*o).is_ok_and(|f| f.datum_type == f32::datum_type() && f.shape == shape);
    let tensors_ok = [p, g, m, v].iter().all(same_f32);
    (consistent && tensors_ok && scalars.iter().all(f32_scalar))
        .then(|| [p, g, m, v].into_iter().chain(scalars).collect())
}

fn two(v: Vec<OutletId>) -> (OutletId, OutletId) {
    (v[0], v[1])
}

/// Replaces each parameter's AdamW update found among the graph outputs by one [`FusedAdamW`] node; returns how
/// many it replaced. The plain ops left without readers are removed when the model is optimized.
pub fn fuse_adamw(model: &mut TypedModel) -> TractResult<usize> {
    let outputs: Vec<(String, OutletId)> = model
        .output_outlets()?
        .iter()
        .map(|o| (model.outlet_label(*o).map(str::to_string).unwrap_or_else(|| model.node(o.node).name.clone()), *o))
        .collect();
    let by_name = |name: &str| outputs.iter().find(|(n, _)| n == name).map(|(_, o)| *o);
    let mut fused = 0;
    for (name, new_m) in &outputs {
        let Some(param) = name.strip_prefix("new.adam.m.") else { continue };
        let (Some(new_p), Some(new_v)) = (by_name(&format!("new.{param}")), by_name(&format!("new.adam.v.{param}")))
        else {
            continue;
        };
        let Some(ins) = match_update(model, new_p, *new_m, new_v) else { continue };
        let mut patch = TypedModelPatch::new(format!("fuse AdamW of {param}"));
        let taps = ins.iter().map(|o| patch.tap_model(model, *o)).collect::<TractResult<TVec<_>>>()?;
        let outs = patch.wire_node(format!("adam/{param}/fused"), FusedAdamW, &taps)?;
        for (old, new) in [new_p, *new_m, new_v].into_iter().zip(outs) {
            patch.shunt_outside(model, old, new)?;
        }
        patch.apply(model)?;
        fused += 1;
    }
    Ok(fused)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parameter large enough to be split over the pool gives, element for element, what one sequential pass
    /// of the same f32 arithmetic gives (a chunk read at the wrong offset would not).
    #[test]
    fn a_split_update_equals_the_sequential_one() {
        crate::tract_backend::init_process();
        let n = 5 * MIN_PER_THREAD + 77;
        let wave = |k: f32| (0..n).map(move |i| ((i as f32 * k).sin()) * 0.01).collect::<Vec<f32>>();
        let (p, g, m) = (wave(0.37), wave(1.13), wave(0.71));
        let v: Vec<f32> = wave(0.29).iter().map(|x| x * x).collect();
        let k = [0.9f32, 0.05, 0.999, 0.0007, 0.3, 1e-8, 0.002];
        let t = |x: &Vec<f32>| Tensor::from_shape(&[n], x).unwrap().into_tvalue();
        let mut inputs: TVec<TValue> = tvec![t(&p), t(&g), t(&m), t(&v)];
        inputs.extend(k.iter().map(|&x| tensor0(x).into_tvalue()));
        let out = FusedAdamW.eval_out_of_plan(inputs).unwrap().unwrap();
        let [b1, sm, b2, sv, c2, eps, step] = k;
        for i in 0..n {
            let mi = m[i] * b1 + g[i] * sm;
            let vi = v[i] * b2 + (g[i] * g[i]) * sv;
            let pi = p[i] - (mi / (vi.sqrt() / c2 + eps)) * step;
            for (o, want) in [(0, pi), (1, mi), (2, vi)] {
                let got = out[o].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap()[i];
                assert_eq!(got.to_bits(), want.to_bits(), "output {o} at {i}");
            }
        }
    }
}
