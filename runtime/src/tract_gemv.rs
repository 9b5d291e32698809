//! Batched matrix-vector products as one tract op: attention over the KV cache when decoding one token.
//!
//! In a `decode` graph each layer multiplies the new token's query by every cached key (q·Kᵀ, [R, H, 1, C]) and
//! the attention weights by every cached value (p·V). Both are R × H independent matrix-vector products whose
//! matrix (the cache) is an input, read once. tract plans them as general products: it packs each (row, head)
//! matrix into its kernel's panel layout, then runs a one-column kernel over it, so the cache is copied and read
//! twice per step. At R = 8 that packing alone was 16 of the 63 ms of a GPT-2 decode step.
//!
//! Here every such `EinSum` becomes one [`BatchedGemv`] node that reads the matrix in place: f32, no constant
//! operand, at most one non-contracted axis besides the batch axes and at most one contracted axis (the new
//! token's score against itself is a batched dot product). Each output is a dot product where the contracted
//! axis is contiguous in both operands (q·Kᵀ), else a running sum of scaled matrix rows (p·V); large products are
//! split over the threads tract's products use. Weight products (a constant operand) and anything with more free
//! axes keep tract's kernels, which reuse their packed weights.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

/// out[batch…, n] = Σ_k vector[batch…, k] · matrix[batch…, k, n], in whatever axis order the three tensors keep
/// them (unit axes anywhere). Strides are in elements, of the contiguous tensors.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct BatchedGemv {
    /// Which of the two inputs is the vector (the other is the matrix).
    vector_input: usize,
    /// Per batch axis: its length and its strides in the vector, the matrix and the output.
    batch: TVec<(usize, [usize; 3])>,
    /// The contracted axis: length, stride in the vector, stride in the matrix (length 1 when there is none).
    k: (usize, [usize; 2]),
    /// The free axis: length, stride in the matrix, stride in the output.
    n: (usize, [usize; 2]),
    /// Input shapes (as the einsum's inputs) and the output shape, all static.
    input_shapes: [TVec<usize>; 2],
    output_shape: TVec<usize>,
}

impl Op for BatchedGemv {
    fn name(&self) -> StaticName {
        "PfxBatchedGemv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let items: usize = self.batch.iter().map(|b| b.0).product();
        Ok(vec![format!("{items} products, k:{} n:{}", self.k.0, self.n.0)])
    }

    op_as_typed_op!();
}

impl EvalOp for BatchedGemv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 2, "PfxBatchedGemv takes 2 inputs, got {}", inputs.len());
        for (i, (t, want)) in inputs.iter().zip(&self.input_shapes).enumerate() {
            ensure!(t.shape() == &want[..], "PfxBatchedGemv input {i} is {:?}, planned for {:?}", t.shape(), want);
        }
        let (vv, mv) =
            (inputs[self.vector_input].try_as_plain_ram()?, inputs[1 - self.vector_input].try_as_plain_ram()?);
        let (vector, matrix) = (vv.as_slice::<f32>()?, mv.as_slice::<f32>()?);
        let out = self.compute(vector, matrix);
        Ok(tvec!(Tensor::from_shape(&self.output_shape, &out)?.into_tvalue()))
    }
}

/// Below this many multiply-adds per thread a product runs on the calling thread: a GPT-2 decode step's products
/// at R = 8 (0.65 M each) took 3.0 ms on one thread and 3.5–3.8 ms split over two (the hand-off costs more than
/// the work; the cache reads are bound by memory, not by cores).
const MIN_SPLIT: usize = 1 << 20;

impl BatchedGemv {
    /// Offsets of every batch item in the vector, the matrix and the output (row-major over the batch axes).
    fn item_offsets(&self) -> Vec<[usize; 3]> {
        let mut offsets = vec![[0usize; 3]];
        for &(len, strides) in &self.batch {
            offsets = offsets
                .iter()
                .flat_map(|o| {
                    (0..len).map(move |i| [o[0] + i * strides[0], o[1] + i * strides[1], o[2] + i * strides[2]])
                })
                .collect();
        }
        offsets
    }

    fn compute(&self, vector: &[f32], matrix: &[f32]) -> Vec<f32> {
        let offsets = self.item_offsets();
        let n = self.n.0;
        // Each item's n results, item after item; the output itself when it is laid out that way.
        let mut items = vec![0f32; offsets.len() * n];
        let run = |first: usize, chunk: &mut [f32]| {
            for (j, out) in chunk.chunks_mut(n).enumerate() {
                let [vo, mo, _] = offsets[first + j];
                self.item(&vector[vo..], &matrix[mo..], out);
            }
        };
        let work = offsets.len() * n * self.k.0;
        let threads = crate::tract_backend::product_threads().min(work / MIN_SPLIT).min(offsets.len()).max(1);
        let per = offsets.len().div_ceil(threads).max(1);
        let run = &run;
        let jobs: Vec<Box<dyn FnOnce() + Send + '_>> = items
            .chunks_mut(per * n)
            .enumerate()
            .map(|(c, chunk)| Box::new(move || run(c * per, chunk)) as Box<dyn FnOnce() + Send>)
            .collect();
        crate::tract_backend::run_on_product_pool(jobs);
        let in_order = self.n.1[1] == 1 && offsets.iter().enumerate().all(|(i, o)| o[2] == i * n);
        if in_order {
            return items;
        }
        let mut out = vec![0f32; self.output_shape.iter().product()];
        for (o, values) in offsets.iter().zip(items.chunks(n)) {
            for (j, x) in values.iter().enumerate() {
                out[o[2] + j * self.n.1[1]] = *x;
            }
        }
        out
    }

    /// One product, on the widest vector instructions the CPU has.
    fn item(&self, v: &[f32], m: &[f32], out: &mut [f32]) {
        let (kl, [sv, smk]) = self.k;
        let smn = self.n.1[0];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { product_avx2(v, m, out, kl, sv, smk, smn) };
        }
        product(v, m, out, kl, sv, smk, smn)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn product_avx2(v: &[f32], m: &[f32], out: &mut [f32], kl: usize, sv: usize, smk: usize, smn: usize) {
    product(v, m, out, kl, sv, smk, smn)
}

/// `out[j] = Σ_k v[k·sv] · m[k·smk + j·smn]`, with v and m starting at the item.
#[inline(always)]
fn product(v: &[f32], m: &[f32], out: &mut [f32], kl: usize, sv: usize, smk: usize, smn: usize) {
    if sv == 1 && smk == 1 {
        // q·Kᵀ: each result is a dot product of contiguous rows.
        for (j, o) in out.iter_mut().enumerate() {
            *o = dot(&v[..kl], &m[j * smn..j * smn + kl]);
        }
    } else if smn == 1 {
        // p·V: a running sum of scaled contiguous rows.
        out.fill(0.0);
        let len = out.len();
        for k in 0..kl {
            let a = v[k * sv];
            for (o, x) in out.iter_mut().zip(&m[k * smk..k * smk + len]) {
                *o += a * x;
            }
        }
    } else {
        for (j, o) in out.iter_mut().enumerate() {
            *o = (0..kl).map(|k| v[k * sv] * m[k * smk + j * smn]).sum();
        }
    }
}

/// A dot product over 16 running sums, so that it vectorizes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl TypedOp for BatchedGemv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 2, "PfxBatchedGemv takes 2 inputs, got {}", inputs.len());
        Ok(tvec!(f32::fact(&self.output_shape)))
    }

    as_op!();
}

fn strides(shape: &[usize]) -> TVec<usize> {
    let mut s: TVec<usize> = tvec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The node's op, where it is a plain f32 `EinSum` of two inputs and one output (what pfx's product ops replace).
pub(crate) fn f32_product(node: &TypedNode) -> Option<&EinSum> {
    let einsum = node.op_as::<EinSum>()?;
    let plain = einsum.q_params.is_none() && einsum.operating_dt == f32::datum_type();
    (plain && node.inputs.len() == 2 && node.outputs.len() == 1).then_some(einsum)
}

/// The [`BatchedGemv`] computing `node`, or None where it is not an f32 einsum of that shape over two
/// non-constant operands.
fn plan(model: &TypedModel, node: &TypedNode) -> Option<BatchedGemv> {
    let einsum = f32_product(node)?;
    let mut shapes: Vec<TVec<usize>> = Vec::with_capacity(3);
    for outlet in node.inputs.iter().copied().chain([OutletId::new(node.id, 0)]) {
        let fact = model.outlet_fact(outlet).ok()?;
        if fact.datum_type != f32::datum_type() || fact.konst.is_some() {
            return None;
        }
        shapes.push(fact.shape.as_concrete()?.into());
    }
    let st: Vec<TVec<usize>> = shapes.iter().map(|s| strides(s)).collect();
    let (mut batch, mut k, mut free) = (tvec![], None, None);
    for axis in einsum.axes.iter_all_axes() {
        let places = [&axis.inputs[0], &axis.inputs[1], &axis.outputs[0]];
        if places.iter().any(|p| p.len() > 1) {
            return None; // an axis repeated within one tensor (a diagonal)
        }
        let at: [Option<usize>; 3] =
            [places[0].first().copied(), places[1].first().copied(), places[2].first().copied()];
        let lens: Vec<usize> = (0..3).filter_map(|t| at[t].map(|p| shapes[t][p])).collect();
        let len = *lens.first()?;
        if lens.iter().any(|&l| l != len) {
            return None; // broadcasting
        }
        if len == 0 {
            return None; // an empty tensor: nothing to gain
        }
        if len == 1 {
            continue;
        }
        match at {
            [Some(a), Some(b), Some(o)] => batch.push((len, [a, b, o])),
            [Some(a), Some(b), None] if k.is_none() => k = Some((len, [a, b])),
            [Some(a), None, Some(o)] if free.is_none() => free = Some((0, len, a, o)),
            [None, Some(b), Some(o)] if free.is_none() => free = Some((1, len, b, o)),
            _ => return None, // a second contracted or free axis, or a sum over one operand's axis
        }
    }
    let (v, m) = match free {
        Some((matrix_input, ..)) => (1 - matrix_input, matrix_input),
        None => (0, 1), // batched dot products: one output per item
    };
    let batch =
        batch.into_iter().map(|(len, p): (usize, [usize; 3])| (len, [st[v][p[v]], st[m][p[m]], st[2][p[2]]])).collect();
    let k = match k {
        Some((len, p)) => (len, [st[v][p[v]], st[m][p[m]]]),
        None => (1, [1, 1]), // one term: any stride reads it
    };
    let n = match free {
        Some((_, len, at_m, at_out)) => (len, [st[m][at_m], st[2][at_out]]),
        None => (1, [1, 1]),
    };
    Some(BatchedGemv {
        vector_input: v,
        batch,
        k,
        n,
        input_shapes: [shapes[0].clone(), shapes[1].clone()],
        output_shape: shapes[2].clone(),
    })
}

/// Replaces every batched matrix-vector `EinSum` of a decluttered model by a [`BatchedGemv`]; returns how many.
pub fn use_batched_gemv(model: &mut TypedModel) -> TractResult<usize> {
    let found: Vec<(usize, BatchedGemv)> =
        model.nodes.iter().filter_map(|n| plan(model, n).map(|op| (n.id, op))).collect();
    for (id, op) in &found {
        let node = model.node(*id);
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, op.clone())?;
        patch.apply(model)?;
    }
    Ok(found.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model of one einsum over two inputs of the given shapes (the second a constant with `const_b`).
    fn einsum_model(expr: &str, a: &[usize], b: &[usize], const_b: bool) -> TypedModel {
        let mut model = TypedModel::default();
        let x = model.add_source("a", f32::fact(a)).unwrap();
        let y = if const_b {
            model.add_const("b", Tensor::from_shape(b, &values(b.iter().product(), 0.7)).unwrap()).unwrap()
        } else {
            model.add_source("b", f32::fact(b)).unwrap()
        };
        let op = EinSum::new(expr.parse().unwrap(), f32::datum_type());
        let out = model.wire_node("product", op, &[x, y]).unwrap();
        model.select_output_outlets(&out).unwrap();
        model
    }

    fn values(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 * k).sin() * 1.7).round() / 4.0 + (i % 3) as f32 / 8.0).collect()
    }

    /// Runs the einsum as tract plans it and with the rewrite; returns (rewritten nodes, tract's, ours).
    fn both(expr: &str, a: &[usize], b: &[usize], const_b: bool) -> (usize, Vec<f32>, Vec<f32>) {
        crate::tract_backend::init_process();
        let mut inputs: TVec<TValue> = tvec![Tensor::from_shape(a, &values(a.iter().product(), 0.37)).unwrap().into()];
        if !const_b {
            inputs.push(Tensor::from_shape(b, &values(b.iter().product(), 1.13)).unwrap().into());
        }
        let run = |rewrite: bool| {
            let mut m = einsum_model(expr, a, b, const_b).into_decluttered().unwrap();
            let n = if rewrite { use_batched_gemv(&mut m).unwrap() } else { 0 };
            m.optimize().unwrap();
            let out = m.into_runnable().unwrap().run(inputs.clone()).unwrap();
            (n, out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec())
        };
        let ((_, want), (n, got)) = (run(false), run(true));
        (n, want, got)
    }

    fn assert_close(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: sizes");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what} at {i}: {g} vs tract's {w}");
        }
    }

    /// Decode attention's two products (as tract declutters them), plus layouts that take the other paths: a
    /// contracted axis not innermost, a free axis not innermost in the output (results scattered), no
    /// contracted axis at all, a batch split over threads.
    #[test]
    fn rewritten_products_equal_tracts() {
        for (expr, a, b) in [
            ("abk,abnk->abmn", vec![8, 12, 64], vec![8, 12, 106, 64]),
            ("abmk,abkn->abn", vec![8, 12, 1, 105], vec![8, 12, 105, 64]),
            ("abmk,abkn->abn", vec![3, 2, 1, 1], vec![3, 2, 1, 5]),
            ("bk,bnk->bn", vec![4, 37], vec![4, 9, 37]),
            ("bk,bkn->nb", vec![4, 37], vec![4, 37, 9]),
            ("kb,bnk->bn", vec![37, 4], vec![4, 9, 37]),
            ("bnk,bk->bn", vec![64, 520, 64], vec![64, 64]), // 2.1 M multiply-adds: split over two threads
            ("abmk,abnk->abmn", vec![8, 12, 1, 64], vec![8, 12, 1, 64]),
            ("bk,bk->b", vec![4, 16], vec![4, 16]),
        ] {
            let (n, want, got) = both(expr, &a, &b, false);
            assert_eq!(n, 1, "{expr} {a:?} {b:?} is a batched matrix-vector product");
            assert_close(expr, &got, &want);
        }
    }

    /// Weight products (a constant operand) and true matrix products keep tract's kernels.
    #[test]
    fn other_products_are_left_to_tract() {
        assert_eq!(both("mk,kn->mn", &[1, 64], &[64, 32], true).0, 0, "constant operand");
        assert_eq!(both("bmk,bkn->bmn", &[4, 3, 16], &[4, 16, 5], false).0, 0, "two free axes");
    }

    #[test]
    fn dot_covers_the_tail() {
        let a: Vec<f32> = (0..37).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..37).map(|i| (i % 5) as f32 - 2.0).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert_eq!(dot(&a, &b), want);
    }
}
