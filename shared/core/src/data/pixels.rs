//! Pixels: image decoding, HWC to CHW, bilinear resizing. The one home of these for the
//! readers (`folder`), the input spec (`spec`) and the transforms (`transform`), which
//! import it and not each other.
use std::path::Path;

use image::DynamicImage;

use crate::{CoreError, Result};

/// Decodes an image file, guessing the format from its content; errors name the file.
pub(crate) fn decode_image(path: &Path) -> Result<DynamicImage> {
    image::ImageReader::open(path)
        .map_err(|e| CoreError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| CoreError::io(path, e))?
        .decode()
        .map_err(|e| CoreError::Dataset {
            path: path.display().to_string(),
            reason: format!("cannot decode image: {e}"),
        })
}

/// Bilinear resize of a CHW f32-valued image region with half-pixel centres (PyTorch
/// `interpolate(mode="bilinear", align_corners=False)` without antialiasing).
///
/// Reads the `rect = (top, left, height, width)` sub-rectangle of the `c x h x w` image `src`,
/// so a centre crop followed by a resize needs no intermediate copy.
///
/// Panics when `rect` is empty or outside the image, or `src` is shorter than `c * h * w`.
pub fn resize_bilinear(
    src: &[u8],
    (c, h, w): (usize, usize, usize),
    (top, left, rh, rw): (usize, usize, usize, usize),
    (oh, ow): (usize, usize),
) -> Vec<f32> {
    assert!(top + rh <= h && left + rw <= w && src.len() >= c * h * w && rh > 0 && rw > 0);
    // (index0, index1, weight of index1) along one axis.
    let taps = |n_in: usize, n_out: usize, off: usize| -> Vec<(usize, usize, f32)> {
        let scale = n_in as f64 / n_out as f64;
        (0..n_out)
            .map(|o| {
                let s = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (s.floor() as usize).min(n_in - 1);
                let i1 = (i0 + 1).min(n_in - 1);
                (off + i0, off + i1, (s - i0 as f64) as f32)
            })
            .collect()
    };
    let (ty, tx) = (taps(rh, oh, top), taps(rw, ow, left));
    let mut out = Vec::with_capacity(c * oh * ow);
    for ch in 0..c {
        let plane = &src[ch * h * w..(ch + 1) * h * w];
        for &(y0, y1, wy) in &ty {
            let (r0, r1) = (&plane[y0 * w..(y0 + 1) * w], &plane[y1 * w..(y1 + 1) * w]);
            for &(x0, x1, wx) in &tx {
                let a = r0[x0] as f32 + (r0[x1] as f32 - r0[x0] as f32) * wx;
                let b = r1[x0] as f32 + (r1[x1] as f32 - r1[x0] as f32) * wx;
                out.push(a + (b - a) * wy);
            }
        }
    }
    out
}

/// [`resize_bilinear`] of a whole image, rounded back to u8.
pub fn resize_bilinear_u8(
    src: &[u8],
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> Vec<u8> {
    resize_bilinear(src, (c, h, w), (0, 0, h, w), (oh, ow))
        .into_iter()
        .map(|v| v.round().clamp(0.0, 255.0) as u8)
        .collect()
}

/// Interleaved HWC pixels (as the `image` crate stores them) to planar CHW.
pub fn hwc_to_chw(hwc: &[u8], c: usize, h: usize, w: usize) -> Vec<u8> {
    let mut out = vec![0u8; c * h * w];
    for (p, px) in hwc.chunks_exact(c).take(h * w).enumerate() {
        for (ch, &v) in px.iter().enumerate() {
            out[ch * h * w + p] = v;
        }
    }
    out
}
