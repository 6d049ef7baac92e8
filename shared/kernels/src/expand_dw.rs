//! MBConv inference: the expand 1×1 conv and the depthwise conv after it, fused.
//!
//! On the large maps of an MBConv network's first stages (96 hidden channels at 112×112 is
//! 4.8 MB) the expanded map does not fit in L2: the expand GEMM wrote it out to memory and
//! the depthwise read it back. Here the hidden map is made one panel of 16 channels at a
//! time ([`pointwise::panel_into`], bias and activation fused) into a per-thread scratch,
//! and the depthwise ([`dw_direct`]) runs on those 16 planes while they are in cache; the
//! full hidden map never exists. Parallel over panels.

use std::mem::MaybeUninit;

use crate::dw_direct;
use crate::gemm_path::with_col;
use crate::geom::Geom;
use crate::pointwise::{self, Pointwise, MR};
use crate::{threads, Activation};

/// The operands of one fused call.
pub(crate) struct ExpandDw<'a> {
    /// The expand conv: input `[N, C, H, W]`, packed weight, bias, activation.
    pub expand: Pointwise<'a>,
    /// Depthwise weight `[hidden, K * K]` and bias.
    pub dw_w: &'a [f32],
    pub dw_b: Option<&'a [f32]>,
    pub dw_act: Activation,
}

/// Whether the fused kernel runs the depthwise of geometry `gd` (the register-blocked
/// kernel's shapes, on a CPU it runs on).
pub(crate) fn supported(gd: &Geom) -> bool {
    dw_direct::supported(gd)
}

/// Runs the expand conv of geometry `ge` (1×1: `C -> hidden`) and the depthwise of geometry
/// `gd` (on `[N, hidden, H, W]`) into `out [N, hidden, OH, OW]`, writing every element.
pub(crate) fn forward(op: &ExpandDw<'_>, ge: &Geom, gd: &Geom, out: &mut [MaybeUninit<f32>]) {
    let (hidden, p, kk) = (ge.o, ge.p(), gd.kh * gd.kw);
    assert!(supported(gd) && ge.identity_1x1 && op.expand.residual.is_none());
    assert!((gd.n, gd.c, gd.h, gd.w) == (ge.n, hidden, ge.oh, ge.ow) && gd.is_depthwise());
    assert!(op.dw_w.len() >= hidden * kk && op.dw_b.is_none_or(|b| b.len() >= hidden));
    assert!(out.len() >= gd.n * hidden * gd.p());
    let np = hidden.div_ceil(MR);
    let t = threads::for_flops(ge.flops() + gd.flops());
    let outp = SendPtr(out.as_mut_ptr());
    let plan = dw_direct::Plan::new(gd);
    let panel = |i: usize, pi: usize| {
        let rows = MR.min(hidden - pi * MR);
        with_col(MR * p, |hid| {
            // SAFETY: an initialised f32 slice viewed as possibly-uninitialised.
            let hid_u = unsafe { &mut *(hid as *mut [f32] as *mut [MaybeUninit<f32>]) };
            pointwise::panel_into(&op.expand, ge, i, pi, hid_u);
            let first = i * hidden + pi * MR;
            // SAFETY: planes `first..first + rows` of `out` (length asserted above), written
            // by this panel's worker only.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(outp.get().add(first * gd.p()), rows * gd.p())
            };
            let (w, b, act) = (op.dw_w, op.dw_b, op.dw_act);
            dw_direct::fwd_planes(hid, w, b, act, gd, &plan, first..first + rows, dst);
        });
    };
    for i in 0..gd.n {
        if t <= 1 || np == 1 {
            (0..np).for_each(|pi| panel(i, pi));
        } else {
            threads::map_ranges(np, t, |r| r.for_each(|pi| panel(i, pi)));
        }
    }
}

/// A raw output pointer handed to workers that write disjoint planes.
#[derive(Clone, Copy)]
struct SendPtr(*mut MaybeUninit<f32>);
// SAFETY: only used for disjoint writes inside one scoped parallel call.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut MaybeUninit<f32> {
        self.0
    }
}
