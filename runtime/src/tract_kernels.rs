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

/// Whether the measured rule is in effect on this machine (an AMD x86_64 part with AVX-512, no
/// `PFX_TRACT_KERNEL`). Called when tract is first set up, which also keeps this module linked in: its rung is
/// registered by a static nothing else refers to. A `PFX_TRACT_KERNEL` that names no kernel this machine runs is
/// reported here, once, with the names it could be.
pub fn measured_rule_active() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        x86::check_request();
        x86::measured_rule_active()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

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

    fn machine_has_rule() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| tract_linalg::isa::native().has(Isa::X86_64Avx512f) && is_amd())
    }

    pub(super) fn measured_rule_active() -> bool {
        requested().is_none() && machine_has_rule()
    }

    pub(super) fn check_request() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let Some(name) = requested().filter(|n| *n != "tract") else { return };
            let runnable = tract_linalg::MmmDispatch::native().runnable();
            let f32_kernels: Vec<&str> = runnable
                .iter()
                .filter(|k| k.internal_type() == DatumType::F32 && k.nr() > 1)
                .map(|k| k.name())
                .collect();
            if !f32_kernels.contains(&name) {
                eprintln!(
                    "warning: PFX_TRACT_KERNEL={name} is no f32 matrix kernel this machine runs; tract picks its own. \
                     Kernels here: {} (or `tract`)",
                    f32_kernels.join(", ")
                );
            }
        });
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
            None if machine_has_rule() && isa.has(Isa::X86_64Avx512f) => amd_avx512_f32(query.m, query.k, query.n),
            None => None,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::amd_avx512_f32;

        #[test]
        fn the_layer_products_take_32x6_and_long_reductions_and_narrow_products_stay_with_tract() {
            // A train step's layer products (k 768 or 3072, 320 token columns) and its LM head forward.
            for (m, k) in [(3072, 768), (768, 3072), (768, 768), (50257, 768), (74, 64)] {
                assert_eq!(amd_avx512_f32(Some(m), Some(k), Some(320)), Some("avx512_mmm_f32_32x6"), "{m}x{k}");
            }
            // The LM head's input gradient reduces over the vocabulary: 16x12 measured faster there.
            assert_eq!(amd_avx512_f32(Some(768), Some(50257), Some(320)), None);
            // Decode steps (8 rows) and unknown shapes.
            assert_eq!(amd_avx512_f32(Some(768), Some(768), Some(8)), None);
            assert_eq!(amd_avx512_f32(Some(768), Some(768), None), None);
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
