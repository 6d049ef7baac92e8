//! Per-batch preprocessing from u8 NCHW pixels to f32 tensors.
//!
//! A [`Transform`] runs resize -> centre crop -> (training only) pad-k random crop and
//! horizontal flip -> grey-to-RGB -> normalisation, in that order. Everything after the resize
//! is one pass per output pixel through a 256-entry lookup table per channel, so a training
//! step costs little more than a copy: Fashion-MNIST's 60,000 images are touched every epoch.
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::RngCore;

use super::pixels::{decode_image, hwc_to_chw, resize_bilinear, resize_bilinear_u8};
use crate::{CoreError, Result};

/// How u8 pixel values become floats.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Normalize {
    /// `x` unchanged, as f32 in `0..=255`.
    Raw,
    /// `x / 255`, in `0..=1`.
    #[default]
    UnitRange,
    /// `(x / 255 - mean[c]) / std[c]`; one value broadcasts to every channel.
    MeanStd { mean: Vec<f32>, std: Vec<f32> },
    /// `(x - 127) / 128`: the input scaling of the EfficientNet-Lite checkpoints.
    Lite,
}

impl Normalize {
    /// The torchvision ImageNet statistics (RGB).
    pub fn imagenet() -> Self {
        Normalize::MeanStd {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        }
    }

    /// The float value of pixel `v` in channel `c` (of `channels`).
    pub fn apply(&self, v: u8, c: usize, channels: usize) -> Result<f32> {
        Ok(self.luts(channels)?[c][v as usize])
    }

    /// One 256-entry table per output channel.
    fn luts(&self, channels: usize) -> Result<Vec<[f32; 256]>> {
        let mut out = vec![[0f32; 256]; channels];
        for (c, lut) in out.iter_mut().enumerate() {
            let f: Box<dyn Fn(f32) -> f32> = match self {
                Normalize::Raw => Box::new(|x| x),
                Normalize::UnitRange => Box::new(|x| x / 255.0),
                Normalize::Lite => Box::new(|x| (x - 127.0) / 128.0),
                Normalize::MeanStd { mean, std } => {
                    let pick = |v: &[f32], field: &str| -> Result<f32> {
                        match v.len() {
                            1 => Ok(v[0]),
                            n if n == channels => Ok(v[c]),
                            n => Err(invalid(
                                field,
                                format!("{n} values for {channels} output channels"),
                            )),
                        }
                    };
                    let (m, s) = (pick(mean, "normalize.mean")?, pick(std, "normalize.std")?);
                    if !(s.is_finite() && s > 0.0 && m.is_finite()) {
                        return Err(invalid(
                            "normalize.std",
                            format!("channel {c}: mean {m}, std {s} (std must be > 0)"),
                        ));
                    }
                    Box::new(move |x| (x / 255.0 - m) / s)
                }
            };
            for (v, slot) in lut.iter_mut().enumerate() {
                *slot = f(v as f32);
            }
        }
        Ok(out)
    }
}

/// Training augmentation: a random crop of the (zero-)padded image and a random horizontal
/// flip, as torchvision's `RandomCrop(size, padding=pad)` + `RandomHorizontalFlip()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Augment {
    /// Zero padding on every side before the random crop back to the input size; 0 disables.
    pub pad: usize,
    /// Flip left-right with probability 1/2.
    pub hflip: bool,
}

/// Preprocessing of a batch; build with the chained setters from [`Transform::new`].
///
/// The augmentation is used only by the training entry points (those taking an RNG), so one
/// `Transform` serves both the training and the evaluation loader.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Transform {
    /// Bilinear resize (half-pixel centres, no antialiasing) to `(height, width)`.
    pub resize: Option<(usize, usize)>,
    /// Centre crop to `(height, width)` after the resize.
    pub center_crop: Option<(usize, usize)>,
    /// Replicate a single grey channel to three (for ImageNet-pretrained models).
    pub grey_to_rgb: bool,
    pub normalize: Normalize,
    pub augment: Option<Augment>,
}

impl Transform {
    /// No resize or crop, `x / 255`.
    pub fn new() -> Self {
        Self::default()
    }
    pub fn resize(mut self, height: usize, width: usize) -> Self {
        self.resize = Some((height, width));
        self
    }
    pub fn center_crop(mut self, height: usize, width: usize) -> Self {
        self.center_crop = Some((height, width));
        self
    }
    pub fn grey_to_rgb(mut self) -> Self {
        self.grey_to_rgb = true;
        self
    }
    pub fn normalize(mut self, normalize: Normalize) -> Self {
        self.normalize = normalize;
        self
    }
    pub fn augment(mut self, pad: usize, hflip: bool) -> Self {
        self.augment = Some(Augment { pad, hflip });
        self
    }

    /// Output `(channels, height, width)` for inputs of `(channels, height, width)`.
    pub fn output_shape(&self, c: usize, h: usize, w: usize) -> Result<(usize, usize, usize)> {
        if c == 0 || h == 0 || w == 0 {
            return Err(invalid("input", format!("empty image shape {c}x{h}x{w}")));
        }
        let (h, w) = self.resize.unwrap_or((h, w));
        if h == 0 || w == 0 {
            return Err(invalid("resize", format!("zero size {h}x{w}")));
        }
        let (oh, ow) = self.center_crop.unwrap_or((h, w));
        if oh == 0 || ow == 0 || oh > h || ow > w {
            return Err(invalid(
                "center_crop",
                format!("crop {oh}x{ow} does not fit in a {h}x{w} image"),
            ));
        }
        let oc = if self.grey_to_rgb && c == 1 { 3 } else { c };
        Ok((oc, oh, ow))
    }

    /// Transforms the images `indices` of `pixels` (u8, NCHW with images of `c x h x w`) into
    /// a flat f32 NCHW buffer. `rng` enables the augmentation; `None` is the evaluation path.
    pub fn apply(
        &self,
        pixels: &[u8],
        (c, h, w): (usize, usize, usize),
        indices: &[usize],
        rng: Option<&mut dyn RngCore>,
    ) -> Result<Vec<f32>> {
        let (oc, oh, ow) = self.output_shape(c, h, w)?;
        let img_len = c * h * w;
        let n = pixels.len() / img_len;
        if let Some(&bad) = indices.iter().find(|&&i| i >= n) {
            return Err(invalid(
                "indices",
                format!("index {bad} out of range for {n} images"),
            ));
        }
        let luts = self.normalize.luts(oc)?;
        let (rh, rw) = self.resize.unwrap_or((h, w));
        let (top, left) = ((rh - oh) / 2, (rw - ow) / 2);
        let mut aug = match (self.augment, rng) {
            (Some(a), Some(r)) => Some((a, r)),
            _ => None,
        };
        let mut out = vec![0f32; indices.len() * oc * oh * ow];
        for (b, &i) in indices.iter().enumerate() {
            let src = &pixels[i * img_len..(i + 1) * img_len];
            let resized;
            let src: &[u8] = if self.resize.is_some() && (rh, rw) != (h, w) {
                resized = resize_bilinear_u8(src, c, h, w, rh, rw);
                &resized
            } else {
                src
            };
            // Shift of the crop window in -pad..=pad (pad 0 draws nothing), then the flip coin.
            let (mut dy, mut dx, mut flip) = (0isize, 0isize, false);
            if let Some((a, r)) = aug.as_mut() {
                if a.pad > 0 {
                    dy = uniform_below(*r, 2 * a.pad + 1) as isize - a.pad as isize;
                    dx = uniform_below(*r, 2 * a.pad + 1) as isize - a.pad as isize;
                }
                flip = a.hflip && r.next_u32() & 1 == 1;
            }
            let dst = &mut out[b * oc * oh * ow..(b + 1) * oc * oh * ow];
            for (co, (plane, lut)) in dst.chunks_exact_mut(oh * ow).zip(&luts).enumerate() {
                let ci = if c == 1 { 0 } else { co };
                let zero = lut[0];
                let src_plane = &src[ci * rh * rw..(ci + 1) * rh * rw];
                for (y, row) in plane.chunks_exact_mut(ow).enumerate() {
                    // Row of the crop (before padding) that output row y reads.
                    let sy = y as isize + dy;
                    if sy < 0 || sy >= oh as isize {
                        row.fill(zero);
                        continue;
                    }
                    let src_row = &src_plane[(top + sy as usize) * rw + left..][..ow];
                    for (x, v) in row.iter_mut().enumerate() {
                        let xf = if flip { ow - 1 - x } else { x };
                        let sx = xf as isize + dx;
                        *v = if sx < 0 || sx >= ow as isize {
                            zero
                        } else {
                            lut[src_row[sx as usize] as usize]
                        };
                    }
                }
            }
        }
        Ok(out)
    }

    /// [`Transform::apply`] wrapped as a `[B, C', H', W']` f32 tensor on `device`.
    pub fn apply_tensor(
        &self,
        pixels: &[u8],
        shape: (usize, usize, usize),
        indices: &[usize],
        rng: Option<&mut dyn RngCore>,
        device: &Device,
    ) -> Result<Tensor> {
        let (oc, oh, ow) = self.output_shape(shape.0, shape.1, shape.2)?;
        let data = self.apply(pixels, shape, indices, rng)?;
        Ok(Tensor::from_vec(data, (indices.len(), oc, oh, ow), device)?)
    }
}

/// Side of the EfficientNet-Lite input.
pub const LITE_INPUT_SIZE: usize = 224;

/// ImageNet preprocessing of the EfficientNet-Lite0 checkpoint for an image file: RGB, centre
/// crop of side `floor(224 / 256 * min(h, w))`, bilinear resize to 224x224, `(x - 127) / 128`.
/// Returns a CPU tensor `[1, 3, 224, 224]`.
pub fn imagenet_preprocess_lite(path: impl AsRef<Path>) -> Result<Tensor> {
    let path = path.as_ref();
    let img = decode_image(path)?.to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let chw = hwc_to_chw(img.as_raw(), 3, h, w);
    imagenet_preprocess_lite_chw(&chw, h, w).map_err(|e| match e {
        CoreError::InvalidConfig { reason, .. } => CoreError::Dataset {
            path: path.display().to_string(),
            reason,
        },
        e => e,
    })
}

/// [`imagenet_preprocess_lite`] of RGB pixels already in memory as CHW u8 (`3 x h x w`).
pub fn imagenet_preprocess_lite_chw(rgb_chw: &[u8], h: usize, w: usize) -> Result<Tensor> {
    if rgb_chw.len() != 3 * h * w {
        return Err(invalid(
            "image",
            format!("{} bytes for a 3x{h}x{w} image", rgb_chw.len()),
        ));
    }
    // Integer form of floor(224 / 256 * min(h, w)), as the TF reference's int() cast.
    let side = LITE_INPUT_SIZE * h.min(w) / 256;
    if side == 0 {
        return Err(invalid(
            "image",
            format!("{h}x{w} is too small for a 224/256 centre crop"),
        ));
    }
    // The TF reference rounds the offset up: ((h - side) + 1) // 2.
    let (top, left) = ((h - side).div_ceil(2), (w - side).div_ceil(2));
    let data: Vec<f32> = resize_bilinear(
        rgb_chw,
        (3, h, w),
        (top, left, side, side),
        (LITE_INPUT_SIZE, LITE_INPUT_SIZE),
    )
    .into_iter()
    .map(|x| (x - 127.0) / 128.0)
    .collect();
    Ok(Tensor::from_vec(
        data,
        (1, 3, LITE_INPUT_SIZE, LITE_INPUT_SIZE),
        &Device::Cpu,
    )?)
}

/// Uniform in `0..n` from the raw stream (multiply-shift; bias below `n / 2^64`). Drawn here
/// rather than through `Rng::random_range` so augmented batches stay reproducible across
/// `rand` versions.
fn uniform_below(rng: &mut dyn RngCore, n: usize) -> usize {
    ((rng.next_u64() as u128 * n as u128) >> 64) as usize
}

fn invalid(field: &str, reason: String) -> CoreError {
    CoreError::InvalidConfig {
        field: field.to_string(),
        reason,
    }
}
