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

/// The widest instruction set an inference kernel may use on this CPU. The 16-lane
/// AVX-512 kernels matter where the peers use them too: on a host with AVX-512, ONNX
/// Runtime's kernels are, and an 8-lane kernel caps at half their multiply-add rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust loops (any CPU).
    Portable,
    /// AVX2 + FMA, 8-lane vectors.
    Avx2,
    /// AVX-512F (with AVX2 + FMA), 16-lane vectors.
    Avx512,
}

/// [`Isa`] of this CPU (AVX-512F on top of AVX2 + FMA for the widest).
#[inline]
pub fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        return if std::arch::is_x86_feature_detected!("avx512f") {
            Isa::Avx512
        } else {
            Isa::Avx2
        };
    }
    Isa::Portable
}
