//! Which matrix-product kernel tract runs for an f32 product, where we measured a better one than tract's pick.
//!
//! tract asks a ladder of "tiers" (highest precedence first) which kernel to use for a product of a given
//! shape; this module registers one rung above tract's own. On AMD parts with AVX-512 (measured on Zen 4, 2
//! cores) tract's cost model picks `avx512_mmm_f32_16x12` for every product of a train step, and the taller
//! `avx512_mmm_f32_32x6` runs the transformer's products ([3072|768, 768|3072] × [·, 320] and the attention's)
//! 20–30% faster; only the LM head's input gradient (k = vocabulary, 50257) is faster on 16x12, so a long
//! reduction keeps tract's pick. Per-shape times for every kernel: `PFX_TRACT_KERNEL=<name> cargo bench --bench
//! tract_profile` (benches/README.md has the table).
//!
//! `PFX_TRACT_KERNEL=<kernel name>` forces one kernel for every f32 product it can run (for measuring);
//! `PFX_TRACT_KERNEL=tract` leaves every choice to tract.

#[cfg(target_arch = "x86_64")]
mod x86 {
    use tract_linalg::isa::{Arch, Isa, IsaSet};
    use tract_linalg::mmm::{Query, Suitable};
    use tract_linalg::mmm_tiers::MmmTier;
    use tract_onnx::prelude::DatumType;

    /// `PFX_TRACT_KERNEL`, read once: `None` when unset.
    fn requested() -> Option<&'static str> {
        static REQUESTED: std::sync::OnceLock<Option<&'static str>> = std::sync::OnceLock::new();
        *REQUESTED.get_or_init(|| {
            std::env::var("PFX_TRACT_KERNEL").ok().filter(|s| !s.is_empty()).map(|s| &*Box::leak(s.into_boxed_str()))
        })
    }

    fn is_amd() -> bool {
        // SAFETY: CPUID leaf 0 exists on every x86_64 processor.
        #[allow(unused_unsafe)]
        let id = unsafe { std::arch::x86_64::__cpuid(0) };
        let mut vendor = [0u8; 12];
        vendor[0..4].copy_from_slice(&id.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&id.edx.to_le_bytes());
        vendor[8..12].copy_from_slice(&id.ecx.to_le_bytes());
        &vendor == b"AuthenticAMD"
    }

    /// Products with a reduction this long stay on tract's pick (the LM head's input gradient, k = vocabulary).
    const LONG_REDUCTION: usize = 8192;
    /// Below this many columns (decode steps, the prefix MLP's rows) tract's small-n kernels stay.
    const MIN_COLUMNS: usize = 16;

    /// Our answer for an f32 product on an AMD AVX-512 part, `None` to let tract decide.
    pub(super) fn amd_avx512_f32(m: Option<usize>, k: Option<usize>, n: Option<usize>) -> Option<&'static str> {
        let (Some(_m), Some(k), Some(n)) = (m, k, n) else { return None };
        (k < LONG_REDUCTION && n >= MIN_COLUMNS).then_some("avx512_mmm_f32_32x6")
    }

    fn preferred(isa: &IsaSet, acc: DatumType, query: &Query, _suitable: &[Suitable]) -> Option<&'static str> {
        if acc != DatumType::F32 || query.n == Some(1) {
            return None;
        }
        match requested() {
            Some("tract") => None,
            Some(name) => Some(name),
            None if isa.has(Isa::X86_64Avx512f) && is_amd() => amd_avx512_f32(query.m, query.k, query.n),
            None => None,
        }
    }

    inventory::submit! {
        MmmTier {
            arch: Some(Arch::X86_64),
            // Above every tier tract declares (its highest is 8); a `None` answer falls through to them.
            precedence: 100,
            name: "pfx-measured",
            applies: |isa| isa.has(Isa::X86_64Fma),
            preferred,
        }
    }
}
