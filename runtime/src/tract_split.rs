//! Products contracted over a very long axis (the LM head's gradient, over the vocabulary) as a sum of products
//! over pieces of it.
//!
//! tract's matrix kernels run each output tile over the whole contracted axis. With k = 50257 a tile's packed
//! operands (16 × k and k × 6 floats: 3.2 and 1.2 MB) come from the last-level cache or memory for every tile,
//! and the product ran at half the speed of the same work contracted over 768 (an AVX2 EPYC, 2 cores: 0.35 s for
//! the training step's hidden-state gradient through the LM head against 0.17 s for the LM head itself). Over
//! pieces of at most [`PIECE`], each tile's operands stay in the core's cache; adding the pieces' results back
//! costs one pass over the output per piece.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::Slice;

/// Contracted lengths above this are split.
pub const SPLIT_ABOVE: usize = 8192;
/// The longest piece.
pub const PIECE: usize = 4096;

/// The split of `node`: its contracted axis in each input and its length, where `node` is an f32 product of two
/// inputs contracted over one axis longer than [`SPLIT_ABOVE`].
fn long_contraction(model: &TypedModel, node: &TypedNode) -> Option<([usize; 2], usize)> {
    let einsum = crate::tract_gemv::f32_product(node)?;
    let mut contracted = einsum.axes.iter_all_axes().filter(|a| a.outputs[0].is_empty());
    let axis = contracted.next()?;
    if contracted.next().is_some() || axis.inputs[0].len() != 1 || axis.inputs[1].len() != 1 {
        return None;
    }
    let at = [axis.inputs[0][0], axis.inputs[1][0]];
    let len = |slot: usize| model.outlet_fact(node.inputs[slot]).ok()?.shape[at[slot]].to_usize().ok();
    let k = len(0)?;
    (len(1)? == k && k > SPLIT_ABOVE).then_some((at, k))
}

/// An operand of a product being split: a constant is cut into constants here (each piece is then packed once,
/// at plan time); another is tapped once and sliced.
enum Operand {
    Const(Arc<Tensor>),
    Wire(OutletId),
}

/// Rewrites every product contracted over more than [`SPLIT_ABOVE`] into products over pieces of at most
/// [`PIECE`], added in order. Returns how many products were split.
pub fn split_long_contractions(model: &mut TypedModel) -> TractResult<usize> {
    let found: Vec<(usize, [usize; 2], usize)> =
        model.nodes.iter().filter_map(|n| long_contraction(model, n).map(|(at, k)| (n.id, at, k))).collect();
    for &(id, at, k) in &found {
        let node = model.node(id);
        let name = node.name.clone();
        let op = node.op.clone();
        let pieces = k.div_ceil(PIECE);
        let mut patch = TypedModelPatch::new(format!("split {name} over {pieces} pieces"));
        let mut operands = Vec::with_capacity(2);
        for &outlet in &node.inputs {
            operands.push(match model.outlet_fact(outlet)?.konst.clone() {
                Some(c) => Operand::Const(c),
                None => Operand::Wire(patch.tap_model(model, outlet)?),
            });
        }
        let mut sum: Option<OutletId> = None;
        for piece in 0..pieces {
            let (start, end) = (piece * k / pieces, (piece + 1) * k / pieces);
            let mut parts = TVec::new();
            for (slot, operand) in operands.iter().enumerate() {
                let part = format!("{name}.k{piece}.{slot}");
                parts.push(match operand {
                    Operand::Const(c) => patch.add_const(part, c.slice(at[slot], start, end)?)?,
                    Operand::Wire(x) => patch.wire_node(part, Slice::new(at[slot], start, end), &[*x])?[0],
                });
            }
            let product = patch.wire_node(format!("{name}.k{piece}"), op.clone(), &parts)?[0];
            sum = Some(match sum {
                None => product,
                Some(s) => {
                    let add = tract_onnx::tract_core::ops::math::add();
                    patch.wire_node(format!("{name}.k{piece}.sum"), add, &[s, product])?[0]
                }
            });
        }
        let sum = sum.expect("a long contraction has pieces");
        patch.shunt_outside(model, OutletId::new(id, 0), sum)?;
        patch.apply(model)?;
    }
    Ok(found.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::einsum::EinSum;

    /// `expr` over x (input) and w (constant, or a second input), with and without the split: the products
    /// split and the two results' largest difference relative to the largest result.
    fn both(expr: &str, x: &[usize], w: &[usize], w_const: bool) -> (usize, f32) {
        let values =
            |n: usize, s: f32| -> Vec<f32> { (0..n).map(|i| ((i as f32 * s).sin() * 2.0).round() / 8.0).collect() };
        let (xv, wv) = (values(x.iter().product(), 0.37), values(w.iter().product(), 0.71));
        let model = || {
            let mut m = TypedModel::default();
            let a = m.add_source("x", f32::fact(x)).unwrap();
            let b = if w_const {
                m.add_const("w", Tensor::from_shape(w, &wv).unwrap()).unwrap()
            } else {
                m.add_source("w", f32::fact(w)).unwrap()
            };
            let out = m.wire_node("product", EinSum::new(expr.parse().unwrap(), f32::datum_type()), &[a, b]).unwrap();
            m.select_output_outlets(&out).unwrap();
            m.into_decluttered().unwrap()
        };
        let mut inputs: TVec<TValue> = tvec![Tensor::from_shape(x, &xv).unwrap().into()];
        if !w_const {
            inputs.push(Tensor::from_shape(w, &wv).unwrap().into());
        }
        let run = |split: bool| {
            let mut m = model();
            let n = if split { split_long_contractions(&mut m).unwrap() } else { 0 };
            m.optimize().unwrap();
            let out = m.into_runnable().unwrap().run(inputs.clone()).unwrap();
            (n, out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec())
        };
        let ((_, want), (n, got)) = (run(false), run(true));
        assert_eq!(want.len(), got.len());
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = want.iter().zip(&got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        (n, worst / scale)
    }

    /// The training step's product through the LM head ([rows, V] · [V, d], the weight constant), the same with
    /// the weight read as [d, V] and both operands computed, a length that does not divide evenly, and products
    /// left alone: a short contraction, and two contracted axes.
    #[test]
    fn long_contractions_split_into_pieces_that_add_up_to_the_product() {
        for (expr, x, w, w_const) in [
            ("rk,kn->rn", &[6, 50257][..], &[50257, 12][..], true),
            ("rk,nk->rn", &[5, 20000][..], &[7, 20000][..], false),
            ("kr,kn->rn", &[8193, 3][..], &[8193, 4][..], true),
        ] {
            let (n, err) = both(expr, x, w, w_const);
            assert_eq!(n, 1, "{expr} {x:?} {w:?}: one product split");
            // Each piece's sum is exact in f32 here (multiples of 1/64, partial sums far below 2^24 / 64), so the
            // order of the additions changes nothing.
            assert_eq!(err, 0.0, "{expr} {x:?} {w:?}");
        }
        assert_eq!(both("rk,kn->rn", &[6, 8192], &[8192, 5], true).0, 0, "8192 is not split");
        assert_eq!(both("rkj,kjn->rn", &[2, 9000, 2], &[9000, 2, 3], true).0, 0, "two contracted axes");
    }
}
