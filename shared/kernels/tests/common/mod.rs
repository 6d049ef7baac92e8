//! Shared test helpers: deterministic data, reference ops, comparisons, finite differences.
#![allow(dead_code)]

use adaptivenet_kernels::Conv2dParams;
use candle_core::{DType, Device, Result, Tensor};

/// Deterministic xorshift generator (uniform values in `[-1, 1)`).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32() * scale).collect()
    }
    pub fn tensor(&mut self, dims: &[usize], scale: f32) -> Tensor {
        let n = dims.iter().product();
        Tensor::from_vec(self.vec(n, scale), dims, &Device::Cpu).unwrap()
    }
    /// Values that are pairwise at least `gap` apart (a shuffled ramp): no ties in max-pool.
    pub fn distinct(&mut self, dims: &[usize], gap: f32) -> Tensor {
        let n: usize = dims.iter().product();
        let mut v: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0) * gap).collect();
        for i in (1..n).rev() {
            let j = ((self.next_f32() + 1.0) * 0.5 * (i + 1) as f32) as usize;
            v.swap(i, j.min(i));
        }
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap() as f32
}

/// Naive f64 conv2d (any stride/padding/dilation/groups).
pub fn naive_conv(x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: &Conv2dParams) -> Tensor {
    let (n, c, h, wd) = x.dims4().unwrap();
    let (o, cg, kh, kw) = w.dims4().unwrap();
    let xv: Vec<f64> = x
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let wv: Vec<f64> = w
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let bv: Option<Vec<f64>> = b.map(|b| b.to_dtype(DType::F64).unwrap().to_vec1().unwrap());
    let (pt, pb, pl, pr) = p.padding;
    let oh = (h + pt + pb - p.dilation.0 * (kh - 1) - 1) / p.stride.0 + 1;
    let ow = (wd + pl + pr - p.dilation.1 * (kw - 1) - 1) / p.stride.1 + 1;
    let og = o / p.groups;
    let mut out = vec![0f64; n * o * oh * ow];
    for ni in 0..n {
        for oc in 0..o {
            let gi = oc / og;
            for y in 0..oh {
                for xx in 0..ow {
                    let mut s = bv.as_ref().map_or(0.0, |b| b[oc]);
                    for ci in 0..cg {
                        let cin = gi * cg + ci;
                        for i in 0..kh {
                            let ih = (y * p.stride.0 + i * p.dilation.0) as isize - pt as isize;
                            if ih < 0 || ih >= h as isize {
                                continue;
                            }
                            for j in 0..kw {
                                let iw =
                                    (xx * p.stride.1 + j * p.dilation.1) as isize - pl as isize;
                                if iw < 0 || iw >= wd as isize {
                                    continue;
                                }
                                s += xv[((ni * c + cin) * h + ih as usize) * wd + iw as usize]
                                    * wv[((oc * cg + ci) * kh + i) * kw + j];
                            }
                        }
                    }
                    out[((ni * o + oc) * oh + y) * ow + xx] = s;
                }
            }
        }
    }
    Tensor::from_vec(out, (n, o, oh, ow), &Device::Cpu).unwrap()
}

/// Reference conv through candle's own ops (square stride/dilation), asymmetric padding by
/// explicit zero padding. Differentiable through candle's autograd.
pub fn candle_conv(x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: &Conv2dParams) -> Result<Tensor> {
    assert_eq!(p.stride.0, p.stride.1);
    assert_eq!(p.dilation.0, p.dilation.1);
    let (pt, pb, pl, pr) = p.padding;
    let xp = x.pad_with_zeros(2, pt, pb)?.pad_with_zeros(3, pl, pr)?;
    let y = xp.conv2d(w, 0, p.stride.0, p.dilation.0, p.groups)?;
    match b {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
        None => Ok(y),
    }
}

/// Reference max-pool: explicit `-inf` padding, then candle's `max_pool2d_with_stride`.
pub fn candle_max_pool(
    x: &Tensor,
    k: (usize, usize),
    s: (usize, usize),
    pad: (usize, usize),
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let mut x = x.clone();
    if pad.0 > 0 {
        let f = Tensor::full(f32::NEG_INFINITY, (n, c, pad.0, w), x.device())?;
        x = Tensor::cat(&[&f, &x, &f], 2)?;
    }
    if pad.1 > 0 {
        let f = Tensor::full(f32::NEG_INFINITY, (n, c, h + 2 * pad.0, pad.1), x.device())?;
        x = Tensor::cat(&[&f, &x, &f], 3)?;
    }
    x.max_pool2d_with_stride(k, s)
}

/// Central finite differences of `loss(t) = sum(f(t) * r)` (accumulated in f64) w.r.t. the
/// entries of `param` listed in `idx`, compared with `analytic`. Returns the worst
/// `|fd - an| / max(1, |an|)`.
pub fn fd_check(
    f: &dyn Fn(&Tensor) -> Result<Tensor>,
    param: &Tensor,
    analytic: &Tensor,
    r: &Tensor,
    h: f32,
    idx: &[usize],
) -> f32 {
    let r64 = r.to_dtype(DType::F64).unwrap();
    let loss = |t: &Tensor| -> f64 {
        (f(t).unwrap().to_dtype(DType::F64).unwrap() * &r64)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let base: Vec<f32> = param.flatten_all().unwrap().to_vec1().unwrap();
    let an: Vec<f32> = analytic.flatten_all().unwrap().to_vec1().unwrap();
    let mut worst = 0f32;
    for &i in idx {
        let mut v = base.clone();
        v[i] = base[i] + h;
        let lp = loss(&Tensor::from_vec(v.clone(), param.dims(), &Device::Cpu).unwrap());
        v[i] = base[i] - h;
        let lm = loss(&Tensor::from_vec(v, param.dims(), &Device::Cpu).unwrap());
        let fd = ((lp - lm) / (2.0 * h as f64)) as f32;
        let err = (fd - an[i]).abs() / an[i].abs().max(1.0);
        worst = worst.max(err);
    }
    worst
}

/// All indices if `n <= max`, else `max` indices spread over `0..n` (including both ends).
pub fn sample_idx(n: usize, max: usize) -> Vec<usize> {
    if n <= max {
        (0..n).collect()
    } else {
        (0..max).map(|i| i * (n - 1) / (max - 1)).collect()
    }
}

/// The inference kernels' activations, for tests that rotate through them.
pub const ACTS: [adaptivenet_kernels::Activation; 3] = [
    adaptivenet_kernels::Activation::None,
    adaptivenet_kernels::Activation::Relu,
    adaptivenet_kernels::Activation::Relu6,
];

/// `act` applied with candle's ops: the reference for fused epilogues.
pub fn reference_act(y: Tensor, act: adaptivenet_kernels::Activation) -> Tensor {
    match act {
        adaptivenet_kernels::Activation::None => y,
        adaptivenet_kernels::Activation::Relu => y.relu().unwrap(),
        adaptivenet_kernels::Activation::Relu6 => y.clamp(0f32, 6f32).unwrap(),
    }
}

/// Largest absolute difference relative to the largest magnitude of `want` (at least 1).
pub fn rel_diff(got: &Tensor, want: &Tensor) -> f32 {
    let scale = want
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1.0);
    max_abs_diff(got, want) / scale
}
