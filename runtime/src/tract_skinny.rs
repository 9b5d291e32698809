//! Weight products of a few rows (one-token decoding) as one tract op over weights packed for streaming.
//!
//! Decoding one token per row multiplies R ≤ 8 activation rows by every weight matrix: each weight is read
//! once per step, so the step runs at the speed weights stream from memory. tract plans these as general
//! products on its 16x8 kernel, which on this machine's Zen 4 streams GPT-2's weights at 12–17 GB/s; ONNX
//! Runtime streams them at ~24 GB/s. Here each such product becomes a [`SkinnyProduct`] whose weight is packed
//! once, at plan time, into panels of output columns laid out k after k, and a kernel keeps the running sums
//! of every row in registers while it reads a panel front to back (measured 28–30 GB/s on a 3072 × 768 weight).
//!
//! Two kernels ([`Kernel`]): AVX-512F, 32-column panels with all 8 rows in registers; AVX2 + FMA + F16C
//! (x86-64 CPUs without AVX-512), 16-column panels, whose 16 registers hold the sums of at most 6 rows, so 7
//! or 8 rows take two passes over each panel, the second from cache.
//!
//! A weight whose every value is an f16 (a bundle compiled with `pfxc compile --weights f16`, where tract
//! folds the graph's `Cast` into an f32 constant) is packed in f16 and widened in registers: half the bytes
//! to stream for the same products. Only where one of them runs (checked at run
//! time) and only for f32 products of a constant 2-D weight with at most 8 rows whose contracted axis is
//! innermost in the activations and whose output axis is innermost in the result; everything else keeps
//! tract's kernels (prefill and training products have hundreds of rows and reuse each weight panel, where
//! tract's kernels are the right ones).

use std::hash::{Hash, Hasher};

use half::slice::HalfFloatSliceExt;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

/// Most activation rows a product may have to be rewritten.
pub const MAX_ROWS: usize = 8;

/// Which kernel a [`SkinnyProduct`] runs; the weight's panels are packed for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// x86-64 AVX-512F: 32-column panels, 8 rows × 2 registers of sums.
    Avx512,
    /// x86-64 AVX2 + FMA + F16C: 16-column panels, ≤ 6 rows × 2 registers of sums per pass.
    Avx2,
}

impl Kernel {
    /// Output columns per packed panel (two vector registers).
    pub fn panel(self) -> usize {
        match self {
            Kernel::Avx512 => 32,
            Kernel::Avx2 => 16,
        }
    }

    /// Whether this CPU runs the kernel.
    pub fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Kernel::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
                // Every CPU with AVX2 has F16C (it came a generation earlier); it widens f16 panels.
                Kernel::Avx2 => {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                        && std::arch::is_x86_feature_detected!("f16c")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// The fastest kernel this CPU runs, or the one `PFX_TRACT_SKINNY=avx512|avx2` names (for measuring);
    /// None where none runs.
    pub fn chosen() -> Option<Kernel> {
        let forced = match std::env::var("PFX_TRACT_SKINNY").as_deref() {
            Ok("avx512") => Some(Kernel::Avx512),
            Ok("avx2") => Some(Kernel::Avx2),
            Ok("" | "tract") | Err(_) => None,
            Ok(other) => {
                eprintln!("warning: PFX_TRACT_SKINNY={other} is none of tract, avx512, avx2; ignored");
                None
            }
        };
        match forced {
            Some(k) if k.runs_here() => Some(k),
            Some(k) => {
                eprintln!("warning: PFX_TRACT_SKINNY asks for the {k:?} kernel, which this CPU does not run; ignored");
                Kernel::best()
            }
            None => Kernel::best(),
        }
    }

    fn best() -> Option<Kernel> {
        [Kernel::Avx512, Kernel::Avx2].into_iter().find(|k| k.runs_here())
    }
}

/// `y[r, n] = Σ_k x[r, k] · W[k, n]` for R ≤ 8 rows, W packed into the kernel's panels.
#[derive(Debug, Clone)]
pub struct SkinnyProduct {
    kernel: Kernel,
    rows: usize,
    k: usize,
    n: usize,
    /// With P the kernel's panel width, panel p holds W[k, Pp..Pp+P] for k = 0..K, one after the other (the
    /// last panel zero-padded).
    packed: Arc<Panels>,
    input_shape: TVec<usize>,
    output_shape: TVec<usize>,
}

/// A weight's packed panels: f32, or f16 where every value of the weight is an f16.
#[derive(Debug)]
enum Panels {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
}

/// An element of packed panels; the kernels widen f16 to f32 as they load.
trait PanelElement: Copy + Default {
    // Read by the x86-64 kernels only (elsewhere no kernel runs and nothing is packed).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const HALF: bool;
}

impl PanelElement for f32 {
    const HALF: bool = false;
}

impl PanelElement for half::f16 {
    const HALF: bool = true;
}

impl PartialEq for SkinnyProduct {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.packed, &other.packed) && self.input_shape == other.input_shape
    }
}

impl Eq for SkinnyProduct {}

impl Hash for SkinnyProduct {
    // The weight by identity: hashing 150 MB of floats would cost more than the product.
    fn hash<H: Hasher>(&self, state: &mut H) {
        (Arc::as_ptr(&self.packed) as usize, &self.input_shape, &self.output_shape).hash(state)
    }
}

impl Op for SkinnyProduct {
    fn name(&self) -> StaticName {
        "PfxSkinnyProduct".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let dtype = match &*self.packed {
            Panels::F32(_) => "f32",
            Panels::F16(_) => "f16",
        };
        Ok(vec![format!(
            "rows:{} k:{} n:{} ({:?} kernel, weight packed in {}-column {dtype} panels)",
            self.rows,
            self.k,
            self.n,
            self.kernel,
            self.kernel.panel()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for SkinnyProduct {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "PfxSkinnyProduct takes 1 input, got {}", inputs.len());
        ensure!(
            inputs[0].shape() == &self.input_shape[..],
            "PfxSkinnyProduct input is {:?}, planned for {:?}",
            inputs[0].shape(),
            self.input_shape
        );
        let view = inputs[0].try_as_plain_ram()?;
        let y = self.compute(view.as_slice::<f32>()?);
        Ok(tvec!(Tensor::from_shape(&self.output_shape, &y)?.into_tvalue()))
    }
}

impl TypedOp for SkinnyProduct {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&self.output_shape)))
    }

    as_op!();
}

impl SkinnyProduct {
    fn compute(&self, x: &[f32]) -> Vec<f32> {
        let (rows, n, panel) = (self.rows, self.n, self.kernel.panel());
        let panels = n.div_ceil(panel);
        let threads = crate::tract_backend::product_threads().min(panels).max(1);
        // Each thread's panels, as [rows, its columns] blocks, then laid out as [rows, n].
        let per = panels.div_ceil(threads);
        let mut blocks: Vec<Vec<f32>> = (0..panels.div_ceil(per)).map(|_| Vec::new()).collect();
        let run = |first: usize, block: &mut Vec<f32>| {
            let count = per.min(panels - first);
            block.resize(rows * count * panel, 0.0);
            let range = first * self.k * panel..(first + count) * self.k * panel;
            // SAFETY: the op is only planned with a kernel this CPU runs (`plan`), and every slice length holds.
            unsafe {
                match (self.kernel, &*self.packed) {
                    (Kernel::Avx512, Panels::F32(p)) => panels_avx512(x, &p[range], self.k, rows, count, block),
                    (Kernel::Avx512, Panels::F16(p)) => panels_avx512(x, &p[range], self.k, rows, count, block),
                    (Kernel::Avx2, Panels::F32(p)) => panels_avx2(x, &p[range], self.k, rows, count, block),
                    (Kernel::Avx2, Panels::F16(p)) => panels_avx2(x, &p[range], self.k, rows, count, block),
                }
            }
        };
        let run = &run;
        let jobs: Vec<Box<dyn FnOnce() + Send + '_>> = blocks
            .iter_mut()
            .enumerate()
            .map(|(i, block)| Box::new(move || run(i * per, block)) as Box<dyn FnOnce() + Send>)
            .collect();
        crate::tract_backend::run_on_product_pool(jobs);
        let mut y = vec![0f32; rows * n];
        for (i, block) in blocks.iter().enumerate() {
            let c0 = i * per * panel;
            let width = block.len() / rows;
            let take = width.min(n - c0);
            for r in 0..rows {
                y[r * n + c0..r * n + c0 + take].copy_from_slice(&block[r * width..r * width + take]);
            }
        }
        y
    }
}

/// The `count` 32-column panels in `packed` times x ([rows, k]): `out` is [rows, count · 32].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn panels_avx512<E: PanelElement>(
    x: &[f32],
    packed: &[E],
    k: usize,
    rows: usize,
    count: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    const PANEL: usize = 32;
    // 16 values at `p`, widened from f16 where the panels hold f16 (a macro: it inlines with this function's
    // target features).
    macro_rules! load16 {
        ($p:expr) => {
            if E::HALF {
                _mm512_cvtph_ps(_mm256_loadu_si256($p as *const __m256i))
            } else {
                _mm512_loadu_ps($p as *const f32)
            }
        };
    }
    assert!(rows <= MAX_ROWS && x.len() >= rows * k && packed.len() >= count * k * PANEL);
    assert!(out.len() >= rows * count * PANEL);
    let width = count * PANEL;
    for p in 0..count {
        let panel = packed.as_ptr().add(p * k * PANEL);
        let mut lo = [_mm512_setzero_ps(); MAX_ROWS];
        let mut hi = [_mm512_setzero_ps(); MAX_ROWS];
        for kk in 0..k {
            let w0 = load16!(panel.add(kk * PANEL));
            let w1 = load16!(panel.add(kk * PANEL + 16));
            for r in 0..rows {
                let a = _mm512_set1_ps(*x.get_unchecked(r * k + kk));
                lo[r] = _mm512_fmadd_ps(a, w0, lo[r]);
                hi[r] = _mm512_fmadd_ps(a, w1, hi[r]);
            }
        }
        for r in 0..rows {
            let o = out.as_mut_ptr().add(r * width + p * PANEL);
            _mm512_storeu_ps(o, lo[r]);
            _mm512_storeu_ps(o.add(16), hi[r]);
        }
    }
}

/// The `count` 16-column panels in `packed` times x ([rows, k]): `out` is [rows, count · 16]. AVX2 has 16
/// registers: the sums of up to 6 rows (12) and the two weight vectors fit, so 7 or 8 rows take two passes
/// over each panel, the second from cache.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panels_avx2<E: PanelElement>(x: &[f32], packed: &[E], k: usize, rows: usize, count: usize, out: &mut [f32]) {
    const PANEL: usize = 16;
    assert!(rows <= MAX_ROWS && x.len() >= rows * k && packed.len() >= count * k * PANEL);
    assert!(out.len() >= rows * count * PANEL);
    let width = count * PANEL;
    let groups: &[(usize, usize)] = match rows {
        0..=6 => &[(0, rows)],
        7 => &[(0, 4), (4, 3)],
        _ => &[(0, 4), (4, 4)],
    };
    for p in 0..count {
        let panel = packed.as_ptr().add(p * k * PANEL);
        for &(r0, n) in groups {
            let (x, o) = (x.as_ptr().add(r0 * k), out.as_mut_ptr().add(r0 * width + p * PANEL));
            match n {
                1 => avx2_rows::<1, E>(x, k, panel, o, width),
                2 => avx2_rows::<2, E>(x, k, panel, o, width),
                3 => avx2_rows::<3, E>(x, k, panel, o, width),
                4 => avx2_rows::<4, E>(x, k, panel, o, width),
                5 => avx2_rows::<5, E>(x, k, panel, o, width),
                _ => avx2_rows::<6, E>(x, k, panel, o, width),
            }
        }
    }
}

/// R rows of x (row r at `x + r·k`) times one 16-column panel, stored at `out` (row r at `out + r·width`). R
/// is a constant so the sums stay in registers. The panel is prefetched 32 k ahead: without it the sums of
/// 4–6 rows ran at ~20 GB/s against ~29 with it (1 row: no difference), as the out-of-order window covers
/// fewer cache lines ahead than the AVX-512 kernel's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn avx2_rows<const R: usize, E: PanelElement>(
    x: *const f32,
    k: usize,
    panel: *const E,
    out: *mut f32,
    width: usize,
) {
    use std::arch::x86_64::*;
    // 2 KB of panel ahead, whatever the element.
    let ahead = 2048 / size_of::<E>();
    macro_rules! load8 {
        ($p:expr) => {
            if E::HALF {
                _mm256_cvtph_ps(_mm_loadu_si128($p as *const __m128i))
            } else {
                _mm256_loadu_ps($p as *const f32)
            }
        };
    }
    let mut lo = [_mm256_setzero_ps(); R];
    let mut hi = [_mm256_setzero_ps(); R];
    for kk in 0..k {
        // A prefetch past the panel's end is harmless (it never faults).
        _mm_prefetch::<_MM_HINT_T0>(panel.wrapping_add(kk * 16 + ahead) as *const i8);
        let w0 = load8!(panel.add(kk * 16));
        let w1 = load8!(panel.add(kk * 16 + 8));
        for r in 0..R {
            let a = _mm256_broadcast_ss(&*x.add(r * k + kk));
            lo[r] = _mm256_fmadd_ps(a, w0, lo[r]);
            hi[r] = _mm256_fmadd_ps(a, w1, hi[r]);
        }
    }
    for r in 0..R {
        let o = out.add(r * width);
        _mm256_storeu_ps(o, lo[r]);
        _mm256_storeu_ps(o.add(8), hi[r]);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn panels_avx512<E: PanelElement>(_: &[f32], _: &[E], _: usize, _: usize, _: usize, _: &mut [f32]) {
    unreachable!("SkinnyProduct is only planned with a kernel this CPU runs")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn panels_avx2<E: PanelElement>(_: &[f32], _: &[E], _: usize, _: usize, _: usize, _: &mut [f32]) {
    unreachable!("SkinnyProduct is only planned with a kernel this CPU runs")
}

/// Packs W (given by its tensor and which of its two axes is contracted) into panels of `panel` columns, in f16
/// where every value of W is an f16 (then exactly: the products are the same), else in f32.
fn pack(w: &[f32], shape: &[usize], k_axis: usize, panel: usize) -> Panels {
    if all_f16(w) && !matches!(std::env::var("PFX_TRACT_F16_PANELS").as_deref(), Ok("0")) {
        Panels::F16(pack_as(w, shape, k_axis, panel, |src: &[f32], dst: &mut [half::f16]| {
            dst.convert_from_f32_slice(src)
        }))
    } else {
        Panels::F32(pack_as(w, shape, k_axis, panel, |src: &[f32], dst: &mut [f32]| dst.copy_from_slice(src)))
    }
}

/// Whether every value is an f16 (converted in blocks, on F16C where the CPU has it: per value, the check and
/// the packing took ~10% of loading and decoding 8 × 64 tokens of GPT-2 small).
fn all_f16(w: &[f32]) -> bool {
    const BLOCK: usize = 1024;
    let (mut halves, mut back) = ([half::f16::ZERO; BLOCK], [0f32; BLOCK]);
    w.chunks(BLOCK).all(|block| {
        let n = block.len();
        halves[..n].convert_from_f32_slice(block);
        halves[..n].convert_to_f32_slice(&mut back[..n]);
        block.iter().zip(&back[..n]).all(|(a, b)| a.to_bits() == b.to_bits())
    })
}

/// Packs W into panels, each run of up to `panel` columns of one k converted by `fill`.
fn pack_as<E: PanelElement>(
    w: &[f32],
    shape: &[usize],
    k_axis: usize,
    panel: usize,
    fill: impl Fn(&[f32], &mut [E]),
) -> Vec<E> {
    let (k, n) = if k_axis == 0 { (shape[0], shape[1]) } else { (shape[1], shape[0]) };
    let panels = n.div_ceil(panel);
    // Decode streams every packed weight once per step: on 2 MB pages a B=8 step's products took ~10% less time.
    let mut packed = crate::alloc::zeroed_on_huge_pages(panels * k * panel);
    let mut run = vec![0f32; panel];
    for p in 0..panels {
        let (first, width) = (p * panel, n.saturating_sub(p * panel).min(panel));
        for kk in 0..k {
            // W[kk, first..first + width]: contiguous in a [k, n] weight, gathered from a [n, k] one.
            let src: &[f32] = if k_axis == 0 {
                &w[kk * n + first..kk * n + first + width]
            } else {
                for (c, v) in run[..width].iter_mut().enumerate() {
                    *v = w[(first + c) * k + kk];
                }
                &run[..width]
            };
            fill(src, &mut packed[(p * k + kk) * panel..(p * k + kk) * panel + width]);
        }
    }
    packed
}

/// The [`SkinnyProduct`] computing `node` (and its activation input), or None where it is not such a product.
fn plan(model: &TypedModel, node: &TypedNode, kernel: Kernel) -> Option<(OutletId, SkinnyProduct)> {
    let einsum = crate::tract_gemv::f32_product(node)?;
    let facts: Vec<&TypedFact> = node.inputs.iter().map(|i| model.outlet_fact(*i).ok()).collect::<Option<_>>()?;
    let weight_slot = facts.iter().position(|f| f.konst.is_some())?;
    let x_slot = 1 - weight_slot;
    let weight = facts[weight_slot].konst.clone()?;
    if facts.iter().any(|f| f.datum_type != f32::datum_type()) || facts[x_slot].konst.is_some() {
        return None;
    }
    let x_shape: TVec<usize> = facts[x_slot].shape.as_concrete()?.into();
    let out_shape: TVec<usize> = model.outlet_fact(OutletId::new(node.id, 0)).ok()?.shape.as_concrete()?.into();
    // Walk the axes: contracted ones (in x and W), one output column (W and out); every other non-unit axis is
    // a row axis of x and out, in the same order in both.
    let (mut k_axes, mut n_axis, mut row_axes) = (Vec::new(), None, Vec::new());
    for axis in einsum.axes.iter_all_axes() {
        let (xi, wi, oi) = (&axis.inputs[x_slot], &axis.inputs[weight_slot], &axis.outputs[0]);
        if xi.len() > 1 || wi.len() > 1 || oi.len() > 1 {
            return None;
        }
        match (xi.first(), wi.first(), oi.first()) {
            (Some(&x), Some(&w), None) => k_axes.push((x, w)),
            (None, Some(&w), Some(&o)) if n_axis.is_none() => n_axis = Some((w, o)),
            (Some(&x), None, Some(&o)) => row_axes.push((x, o)),
            (Some(&x), None, None) if x_shape[x] == 1 => {}
            (None, None, Some(&o)) if out_shape[o] == 1 => {}
            _ => return None,
        }
    }
    let (nw, no) = n_axis?;
    // The contracted axes are x's innermost, in the same order in W, and W is [k…, n] or [n, k…]: then x is a
    // [rows, K] matrix and W a [K, N] or [N, K] one, whatever the einsum's axis names.
    k_axes.sort();
    let kx: Vec<usize> = k_axes.iter().map(|a| a.0).collect();
    let kw: Vec<usize> = k_axes.iter().map(|a| a.1).collect();
    let x_inner = kx.iter().copied().eq(x_shape.len() - kx.len()..x_shape.len());
    let w_rank = weight.rank();
    let w_layout = if kw.iter().copied().eq(0..kw.len()) && nw == w_rank - 1 {
        Some(0) // [k…, n]
    } else if nw == 0 && kw.iter().copied().eq(1..w_rank) {
        Some(1) // [n, k…]
    } else {
        None
    };
    let k: usize = kw.iter().map(|&a| weight.shape()[a]).product();
    let n = weight.shape()[nw];
    let rows = out_shape.iter().product::<usize>() / n.max(1);
    let real_rows: Vec<(usize, usize)> = row_axes.into_iter().filter(|&(x, _)| x_shape[x] > 1).collect();
    let in_order = real_rows.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1);
    let shapes_hold = kx.iter().zip(&kw).all(|(&x, &w)| x_shape[x] == weight.shape()[w])
        && out_shape[no] == n
        && x_shape.iter().product::<usize>() == rows * k;
    let k_axis = w_layout?;
    if kx.is_empty()
        || !x_inner
        || no != out_shape.len() - 1
        || !in_order
        || !shapes_hold
        || rows == 0
        || k == 0
        || n == 0
        || rows > MAX_ROWS
    {
        return None;
    }
    let view = weight.try_as_plain_ram().ok()?;
    let flat = if k_axis == 0 { [k, n] } else { [n, k] };
    let packed = Arc::new(pack(view.as_slice::<f32>().ok()?, &flat, k_axis, kernel.panel()));
    let op = SkinnyProduct { kernel, rows, k, n, packed, input_shape: x_shape, output_shape: out_shape };
    Some((node.inputs[x_slot], op))
}

/// Replaces every weight product of at most [`MAX_ROWS`] rows of a decluttered model by a [`SkinnyProduct`]
/// on [`Kernel::chosen`] (where this CPU runs none: nothing); returns how many.
pub fn use_skinny_products(model: &mut TypedModel) -> TractResult<usize> {
    match Kernel::chosen() {
        Some(kernel) => use_skinny_products_on(model, kernel),
        None => Ok(0),
    }
}

/// [`use_skinny_products`] on the given kernel, which must run on this CPU.
pub fn use_skinny_products_on(model: &mut TypedModel, kernel: Kernel) -> TractResult<usize> {
    ensure!(kernel.runs_here(), "the {kernel:?} few-row kernel does not run on this CPU");
    let found: Vec<(usize, OutletId, SkinnyProduct)> =
        model.nodes.iter().filter_map(|n| plan(model, n, kernel).map(|(x, op)| (n.id, x, op))).collect();
    for (id, x, op) in &found {
        let node = model.node(*id);
        let patch = TypedModelPatch::replace_single_op(model, node, &[*x], op.clone())?;
        patch.apply(model)?;
    }
    Ok(found.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::einsum::EinSum;

    fn values(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 * k).sin() * 1.7).round() / 4.0 + (i % 3) as f32 / 8.0).collect()
    }

    /// Every kernel this CPU runs (the AVX-512 machines that build pfx test both).
    fn kernels() -> Vec<Kernel> {
        let found: Vec<Kernel> = [Kernel::Avx512, Kernel::Avx2].into_iter().filter(|k| k.runs_here()).collect();
        if found.is_empty() {
            eprintln!("no few-row kernel runs here: the rewrite is off, nothing to compare");
        }
        found
    }

    /// Weight values: multiples of 1/8 below 1 in magnitude (every one an f16), or those plus a third of 2^-12
    /// (none an f16), which the rewrite packs in f32.
    fn weight_values(n: usize, f16_exact: bool) -> Vec<f32> {
        let v = values(n, 0.71);
        if f16_exact {
            v
        } else {
            v.into_iter().map(|x| x + 2f32.powi(-12) / 3.0).collect()
        }
    }

    /// `expr` over activations of shape `x` and a constant weight of shape `w` (every value an f16, or none),
    /// planned by tract alone and with the rewrite on `kernel`; returns (the rewritten nodes' infos, tract's
    /// result, ours).
    fn both(
        expr: &str,
        x: &[usize],
        w: &[usize],
        kernel: Kernel,
        f16_exact: bool,
    ) -> (Vec<String>, Vec<f32>, Vec<f32>) {
        crate::tract_backend::init_process();
        let weight = weight_values(w.iter().product(), f16_exact);
        let model = || {
            let mut m = TypedModel::default();
            let a = m.add_source("x", f32::fact(x)).unwrap();
            let b = m.add_const("w", Tensor::from_shape(w, &weight).unwrap()).unwrap();
            let out = m.wire_node("product", EinSum::new(expr.parse().unwrap(), f32::datum_type()), &[a, b]).unwrap();
            m.select_output_outlets(&out).unwrap();
            m.into_decluttered().unwrap()
        };
        let input: TValue = Tensor::from_shape(x, &values(x.iter().product(), 0.37)).unwrap().into();
        let run = |rewrite: bool| {
            let mut m = model();
            if rewrite {
                use_skinny_products_on(&mut m, kernel).unwrap();
            }
            let infos: Vec<String> =
                m.nodes.iter().filter_map(|n| n.op_as::<SkinnyProduct>()).flat_map(|op| op.info().unwrap()).collect();
            m.optimize().unwrap();
            let out = m.into_runnable().unwrap().run(tvec![input.clone()]).unwrap();
            (infos, out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec())
        };
        let ((_, want), (infos, got)) = (run(false), run(true));
        (infos, want, got)
    }

    /// The decode graph's weight products as tract declutters them (q/k/v, c_fc, c_proj with the heads folded
    /// in, the tied LM head read as [n, k]), with column counts that leave a partial panel and split over threads;
    /// every row count (the AVX2 kernel's groups of rows) and a k over several of its 256-k blocks.
    #[test]
    fn rewritten_products_equal_tracts() {
        let cases = [
            ("mak,kn->mbn", vec![8, 1, 48], vec![48, 96]),
            ("mak,kn->mn", vec![8, 1, 48], vec![48, 1000]),
            ("mk,kn->man", vec![5, 64], vec![64, 40]),
            ("mak,akn->mbn", vec![8, 3, 16], vec![3, 16, 40]),
            ("mak,nk->mbn", vec![1, 1, 24], vec![517, 24]),
            ("mk,kn->mn", vec![7, 33], vec![33, 31]),
            ("mk,kn->mn", vec![8, 600], vec![600, 40]),
            ("mk,nk->mn", vec![7, 520], vec![17, 520]),
            ("mk,kn->mn", vec![6, 300], vec![300, 16]),
            ("mk,kn->mn", vec![4, 257], vec![257, 8]),
            ("mk,kn->mn", vec![3, 20], vec![20, 50]),
            ("mk,kn->mn", vec![2, 20], vec![20, 50]),
        ];
        for kernel in kernels() {
            for f16_exact in [true, false] {
                let dtype = if f16_exact { "f16" } else { "f32" };
                for (expr, x, w) in &cases {
                    let (infos, want, got) = both(expr, x, w, kernel, f16_exact);
                    let what = format!("{kernel:?}, {dtype} weights: {expr} {x:?} {w:?}");
                    assert_eq!(infos.len(), 1, "{what} is a weight product of few rows");
                    assert!(infos[0].contains(&format!("{dtype} panels")), "{what} packed as {}", infos[0]);
                    assert_eq!(got.len(), want.len());
                    for (i, (g, t)) in got.iter().zip(&want).enumerate() {
                        let close = (g - t).abs() <= 1e-5 * (1.0 + t.abs());
                        assert!(close, "{what} at {i}: {g} vs tract's {t}");
                    }
                }
            }
        }
    }

    /// Products of more rows, or with the contracted axis not innermost, keep tract's kernels.
    #[test]
    fn other_products_are_left_to_tract() {
        for kernel in kernels() {
            assert!(both("mk,kn->mn", &[9, 16], &[16, 32], kernel, true).0.is_empty(), "9 rows");
            let outer = both("km,kn->mn", &[16, 4], &[16, 32], kernel, true).0;
            assert!(outer.is_empty(), "contracted axis outermost in x");
            let columns = both("mk,kn->nm", &[4, 16], &[16, 32], kernel, true).0;
            assert!(columns.is_empty(), "columns not innermost in the output");
        }
    }
}
