//! Convolution geometry shared by the GEMM and depthwise paths.

use crate::{Conv2dParams, KernelError};

/// Fully resolved geometry of one conv2d call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub pt: usize,
    pub pl: usize,
    pub dh: usize,
    pub dw: usize,
    pub groups: usize,
    pub oh: usize,
    pub ow: usize,
    pub identity_1x1: bool,
}

impl Geom {
    pub fn new(
        x: (usize, usize, usize, usize),
        wt: (usize, usize, usize, usize),
        p: &Conv2dParams,
    ) -> Result<Self, KernelError> {
        let (n, c, h, w) = x;
        let (o, cg, kh, kw) = wt;
        let bad = |msg: String| Err(KernelError::Shape(msg));
        if p.groups == 0 || c % p.groups != 0 || o % p.groups != 0 {
            return bad(format!(
                "groups={} must divide in_channels={c} and out_channels={o}",
                p.groups
            ));
        }
        if cg != c / p.groups {
            return bad(format!(
                "weight has {cg} input channels per group, expected {} (C={c}, groups={})",
                c / p.groups,
                p.groups
            ));
        }
        if p.stride.0 == 0 || p.stride.1 == 0 || p.dilation.0 == 0 || p.dilation.1 == 0 {
            return bad("stride and dilation must be >= 1".into());
        }
        if kh == 0 || kw == 0 {
            return bad("empty kernel".into());
        }
        let (pt, pb, pl, pr) = p.padding;
        let eh = p.dilation.0 * (kh - 1) + 1;
        let ew = p.dilation.1 * (kw - 1) + 1;
        if h + pt + pb < eh || w + pl + pr < ew {
            return bad(format!(
                "kernel {kh}x{kw} (dilation {:?}) larger than padded input {}x{}",
                p.dilation,
                h + pt + pb,
                w + pl + pr
            ));
        }
        let oh = (h + pt + pb - eh) / p.stride.0 + 1;
        let ow = (w + pl + pr - ew) / p.stride.1 + 1;
        let identity_1x1 = kh == 1 && kw == 1 && p.stride == (1, 1) && p.padding == (0, 0, 0, 0);
        Ok(Self {
            n,
            c,
            h,
            w,
            o,
            kh,
            kw,
            sh: p.stride.0,
            sw: p.stride.1,
            pt,
            pl,
            dh: p.dilation.0,
            dw: p.dilation.1,
            groups: p.groups,
            oh,
            ow,
            identity_1x1,
        })
    }

    pub fn cg(&self) -> usize {
        self.c / self.groups
    }
    pub fn og(&self) -> usize {
        self.o / self.groups
    }
    /// GEMM reduction length per group: Cg*KH*KW.
    pub fn k(&self) -> usize {
        self.cg() * self.kh * self.kw
    }
    /// Output pixels per image.
    pub fn p(&self) -> usize {
        self.oh * self.ow
    }
    pub fn in_img(&self) -> usize {
        self.c * self.h * self.w
    }
    pub fn out_img(&self) -> usize {
        self.o * self.p()
    }
    pub fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.c && self.o == self.c
    }
    /// Multiply-adds counted as 2 FLOPs.
    pub fn flops(&self) -> u64 {
        2 * (self.n * self.o * self.p() * self.k()) as u64
    }
    pub fn out_dims(&self) -> (usize, usize, usize, usize) {
        (self.n, self.o, self.oh, self.ow)
    }
}

/// Range `lo..hi` of output positions `o` with `0 <= o*stride + off < in_len`.
#[inline]
pub(crate) fn valid_range(
    out_len: usize,
    in_len: usize,
    stride: usize,
    off: isize,
) -> (usize, usize) {
    let lo = if off >= 0 {
        0
    } else {
        ((-off) as usize).div_ceil(stride)
    };
    let last = in_len as isize - 1 - off;
    let hi = if last < 0 {
        0
    } else {
        (last as usize / stride + 1).min(out_len)
    };
    let lo = lo.min(out_len);
    (lo, hi.max(lo))
}

#[cfg(test)]
mod tests {
    use super::valid_range;

    #[test]
    fn valid_range_brute_force() {
        for out_len in 0..7 {
            for in_len in 1..9 {
                for stride in 1..4 {
                    for off in -5isize..6 {
                        let (lo, hi) = valid_range(out_len, in_len, stride, off);
                        for o in 0..out_len {
                            let i = (o * stride) as isize + off;
                            let ok = i >= 0 && i < in_len as isize;
                            assert_eq!(
                                ok,
                                o >= lo && o < hi,
                                "{out_len} {in_len} {stride} {off} {o}"
                            );
                        }
                    }
                }
            }
        }
    }
}
