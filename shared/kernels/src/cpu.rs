//! Run-time CPU feature detection shared by every SIMD kernel of this crate.

/// Whether this CPU runs the AVX2 + FMA kernels (x86-64 only; elsewhere every kernel takes
/// its portable path). `is_x86_feature_detected!` caches its answer, so this is cheap enough
/// to call per op.
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
