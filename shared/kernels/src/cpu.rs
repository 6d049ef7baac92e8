//! Run-time CPU feature detection shared by every SIMD kernel of this crate.

/// Whether the AVX2 + FMA kernels run (x86-64 with both, and not capped below AVX2 by
/// [`isa`]'s env; elsewhere every kernel takes its portable path). Cached: cheap enough to
/// call per op.
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    isa() >= Isa::Avx2
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

/// [`Isa`] of this CPU (AVX-512F on top of AVX2 + FMA for the widest), capped by env
/// `ADAPTIVENET_MAX_ISA` (`portable`, `avx2`; read once): to run and compare the narrower
/// kernels on a wider CPU (the AVX2 routes on an AVX-512 host), or to sidestep a kernel; it
/// caps the training kernels too ([`has_avx2_fma`]).
#[inline]
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = match std::env::var("ADAPTIVENET_MAX_ISA").as_deref() {
            Ok("portable") => Isa::Portable,
            Ok("avx2") => Isa::Avx2,
            _ => Isa::Avx512,
        };
        detected().min(cap)
    })
}

/// The widest [`Isa`] this CPU has.
fn detected() -> Isa {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        return if std::arch::is_x86_feature_detected!("avx512f") {
            Isa::Avx512
        } else {
            Isa::Avx2
        };
    }
    Isa::Portable
}
