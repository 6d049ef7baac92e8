//! What a dataset says about its own preprocessing: the [`InputSpec`] every consumer applies
//! (oracle training, elastification, priors, the artifact, the edge agent) and the
//! [`AugmentPolicy`] that training alone applies.
//!
//! These travel with the dataset (recorded at registration, JSON in the cloud's database) and
//! with the artifact, so no consumer hard-wires one dataset's numbers: a digit or a road sign
//! must never be flipped because the demo's clothes could be.
use serde::{Deserialize, Serialize};

use super::pixels::resize_bilinear_u8;
use super::transform::{Normalize, Transform};
use super::Dataset;
use crate::{CoreError, Result};

/// How an image of another size reaches the input size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizePolicy {
    /// Bilinear resize straight to the input size (aspect ratio not kept).
    #[default]
    Stretch,
    /// Bilinear resize of the shorter side to the input size, then a centre crop.
    ShorterSideCrop,
}

/// The model's input: shape, resize policy and per-channel normalisation on `x / 255`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    #[serde(default)]
    pub resize: ResizePolicy,
    /// One value per channel (or one for all).
    pub mean: Vec<f32>,
    /// One value per channel (or one for all); each > 0.
    pub std: Vec<f32>,
}

/// Training-only augmentation. Everything is off unless the developer asks for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AugmentPolicy {
    /// Zero padding before a random crop back to the input size; 0 disables the crop.
    #[serde(default)]
    pub crop_padding: usize,
    /// Random left-right flip. Off by default: wrong for digits, text and signs.
    #[serde(default)]
    pub hflip: bool,
}

/// What registration recorded about a dataset's content (training split).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetSummary {
    /// Class names in label order.
    pub classes: Vec<String>,
    /// Images per class, in label order.
    pub counts: Vec<u64>,
    /// Channels of the stored images (1 grey, 3 colour).
    pub channels: usize,
    /// Smallest and largest stored `(height, width)`.
    pub min_size: (usize, usize),
    pub max_size: (usize, usize),
}

/// Largest crop padding accepted; more would crop mostly zeros.
pub const MAX_CROP_PADDING: usize = 64;

impl InputSpec {
    /// Checks shape and statistics, naming the offending field.
    pub fn validate(&self) -> Result<()> {
        if !(self.channels == 1 || self.channels == 3) {
            return Err(invalid(
                "input_spec.channels",
                format!("{} (1 or 3 supported)", self.channels),
            ));
        }
        for (field, v) in [
            ("input_spec.height", self.height),
            ("input_spec.width", self.width),
        ] {
            if !(1..=4096).contains(&v) {
                return Err(invalid(field, format!("{v} (1..=4096)")));
            }
        }
        for (field, v) in [
            ("input_spec.mean", &self.mean),
            ("input_spec.std", &self.std),
        ] {
            if !(v.len() == 1 || v.len() == self.channels) {
                return Err(invalid(
                    field,
                    format!("{} values for {} channels", v.len(), self.channels),
                ));
            }
            if v.iter().any(|x| !x.is_finite()) {
                return Err(invalid(field, "values must be finite".into()));
            }
        }
        if self.std.iter().any(|s| *s <= 0.0) {
            return Err(invalid("input_spec.std", "values must be > 0".into()));
        }
        Ok(())
    }

    /// The normalisation of this spec.
    pub fn normalize(&self) -> Normalize {
        Normalize::MeanStd {
            mean: self.mean.clone(),
            std: self.std.clone(),
        }
    }

    /// The evaluation transform for images of `(height, width)`: resize per the policy and
    /// normalise. Channel conversion happens when images are decoded (grey <-> RGB).
    pub fn eval_transform(&self, height: usize, width: usize) -> Transform {
        let mut t = Transform::new().normalize(self.normalize());
        if (height, width) != (self.height, self.width) {
            t = match self.resize {
                ResizePolicy::Stretch => t.resize(self.height, self.width),
                ResizePolicy::ShorterSideCrop => {
                    let (rh, rw) = self.resized_size(height, width);
                    t.resize(rh, rw).center_crop(self.height, self.width)
                }
            };
        }
        t
    }

    /// The training transform: [`Self::eval_transform`] plus `policy`'s augmentation.
    pub fn train_transform(
        &self,
        height: usize,
        width: usize,
        policy: &AugmentPolicy,
    ) -> Transform {
        let t = self.eval_transform(height, width);
        if policy.crop_padding > 0 || policy.hflip {
            t.augment(policy.crop_padding, policy.hflip)
        } else {
            t
        }
    }
}

impl InputSpec {
    /// The `(height, width)` an image of `(height, width)` is resized to before the centre
    /// crop of [`ResizePolicy::ShorterSideCrop`] (the input size itself for `Stretch`).
    fn resized_size(&self, height: usize, width: usize) -> (usize, usize) {
        match self.resize {
            ResizePolicy::Stretch => (self.height, self.width),
            ResizePolicy::ShorterSideCrop => {
                let s = self.height.max(self.width) as f64 / height.min(width).max(1) as f64;
                (
                    ((height as f64 * s).round() as usize).max(self.height),
                    ((width as f64 * s).round() as usize).max(self.width),
                )
            }
        }
    }

    /// One CHW u8 image of `channels x height x width` brought to this spec's size by its
    /// resize policy, staying u8 (so a dataset is conformed once, not every epoch). Channels
    /// are left alone; see [`Self::conform`].
    pub fn conform_image(
        &self,
        chw: &[u8],
        (channels, height, width): (usize, usize, usize),
    ) -> Vec<u8> {
        if (height, width) == (self.height, self.width) {
            return chw.to_vec();
        }
        let (rh, rw) = self.resized_size(height, width);
        let resized = resize_bilinear_u8(chw, channels, height, width, rh, rw);
        if (rh, rw) == (self.height, self.width) {
            return resized;
        }
        let (top, left) = ((rh - self.height) / 2, (rw - self.width) / 2);
        let mut out = Vec::with_capacity(channels * self.height * self.width);
        for c in 0..channels {
            for y in 0..self.height {
                let row = &resized[c * rh * rw + (top + y) * rw + left..][..self.width];
                out.extend_from_slice(row);
            }
        }
        out
    }

    /// `ds` with this spec's channels and size: grey images are replicated to three channels,
    /// sizes follow the resize policy. Colour data for a one-channel spec is refused (the
    /// ImageFolder reader converts to grey when it decodes, see
    /// [`super::folder::read_image_folder_for`]).
    pub fn conform(&self, ds: Dataset) -> Result<Dataset> {
        self.validate()?;
        let same_size = (ds.height, ds.width) == (self.height, self.width);
        if ds.channels == self.channels && same_size {
            return Ok(ds);
        }
        let grey_to_rgb = match (ds.channels, self.channels) {
            (a, b) if a == b => false,
            (1, 3) => true,
            (a, b) => {
                return Err(invalid(
                    "input_spec.channels",
                    format!("the data has {a} channels, the spec {b}"),
                ))
            }
        };
        let shape = (ds.channels, ds.height, ds.width);
        let mut images = Vec::with_capacity(ds.len() * self.channels * self.height * self.width);
        for i in 0..ds.len() {
            let img = self.conform_image(ds.image(i), shape);
            if grey_to_rgb {
                for _ in 0..3 {
                    images.extend_from_slice(&img);
                }
            } else {
                images.extend_from_slice(&img);
            }
        }
        Dataset::new(
            images,
            ds.labels,
            (self.channels, self.height, self.width),
            ds.class_names,
        )
    }
}

impl AugmentPolicy {
    pub fn validate(&self) -> Result<()> {
        if self.crop_padding > MAX_CROP_PADDING {
            return Err(invalid(
                "augment.crop_padding",
                format!("{} (at most {MAX_CROP_PADDING})", self.crop_padding),
            ));
        }
        Ok(())
    }
}

/// Per-channel mean and std of `x / 255` over `ds` (population statistics, f64 accumulation).
///
/// Errors on an empty dataset; a constant channel gets std 1 so normalisation stays defined.
pub fn channel_stats(ds: &Dataset) -> Result<(Vec<f32>, Vec<f32>)> {
    if ds.is_empty() {
        return Err(invalid(
            "dataset",
            "no images to compute statistics on".into(),
        ));
    }
    let plane = ds.height * ds.width;
    let mut sum = vec![0f64; ds.channels];
    let mut sq = vec![0f64; ds.channels];
    for i in 0..ds.len() {
        let img = ds.image(i);
        for c in 0..ds.channels {
            let (mut s, mut q) = (0u64, 0u64);
            for &v in &img[c * plane..(c + 1) * plane] {
                s += v as u64;
                q += (v as u64) * (v as u64);
            }
            sum[c] += s as f64;
            sq[c] += q as f64;
        }
    }
    let n = (ds.len() * plane) as f64;
    let mut mean = Vec::with_capacity(ds.channels);
    let mut std = Vec::with_capacity(ds.channels);
    for c in 0..ds.channels {
        let m = sum[c] / n / 255.0;
        let var = (sq[c] / n / (255.0 * 255.0) - m * m).max(0.0);
        let s = var.sqrt();
        mean.push(m as f32);
        std.push(if s > 1e-6 { s as f32 } else { 1.0 });
    }
    Ok((mean, std))
}

fn invalid(field: &str, reason: String) -> CoreError {
    CoreError::InvalidConfig {
        field: field.into(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_images() -> Dataset {
        // 2 images, 1 channel, 1x2: pixels 0,255 and 255,255.
        Dataset::new(
            vec![0, 255, 255, 255],
            vec![0, 1],
            (1, 1, 2),
            vec!["a".into(), "b".into()],
        )
        .unwrap()
    }

    #[test]
    fn stats_match_closed_form() {
        let (m, s) = channel_stats(&two_images()).unwrap();
        // values 0,1,1,1: mean 0.75, var 0.1875.
        assert!((m[0] - 0.75).abs() < 1e-6, "{m:?}");
        assert!((s[0] - 0.1875f32.sqrt()).abs() < 1e-6, "{s:?}");
    }

    #[test]
    fn constant_channel_gets_unit_std() {
        let ds = Dataset::new(vec![7; 4], vec![0, 0], (1, 1, 2), vec!["a".into()]).unwrap();
        let (_, s) = channel_stats(&ds).unwrap();
        assert_eq!(s, vec![1.0]);
    }

    #[test]
    fn validation_names_fields() {
        let mut spec = InputSpec {
            channels: 3,
            height: 32,
            width: 32,
            resize: ResizePolicy::Stretch,
            mean: vec![0.5; 3],
            std: vec![0.25; 3],
        };
        spec.validate().unwrap();
        spec.std = vec![0.25, 0.0, 0.25];
        assert!(spec
            .validate()
            .unwrap_err()
            .to_string()
            .contains("input_spec.std"));
        spec.std = vec![0.25; 2];
        assert!(spec
            .validate()
            .unwrap_err()
            .to_string()
            .contains("input_spec.std"));
        spec.std = vec![0.25];
        spec.channels = 2;
        assert!(spec
            .validate()
            .unwrap_err()
            .to_string()
            .contains("input_spec.channels"));
        let p = AugmentPolicy {
            crop_padding: 65,
            hflip: false,
        };
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("crop_padding"));
        assert!(!AugmentPolicy::default().hflip);
    }

    #[test]
    fn json_round_trip_and_defaults() {
        let spec: InputSpec = serde_json::from_str(
            r#"{"channels":1,"height":28,"width":28,"mean":[0.5],"std":[0.5]}"#,
        )
        .unwrap();
        assert_eq!(spec.resize, ResizePolicy::Stretch);
        let back: InputSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(spec, back);
        let p: AugmentPolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(p, AugmentPolicy::default());
    }

    #[test]
    fn no_augmentation_unless_asked() {
        let spec = InputSpec {
            channels: 1,
            height: 4,
            width: 4,
            resize: ResizePolicy::Stretch,
            mean: vec![0.5],
            std: vec![0.5],
        };
        assert!(spec
            .train_transform(4, 4, &AugmentPolicy::default())
            .augment
            .is_none());
        let t = spec.train_transform(
            8,
            8,
            &AugmentPolicy {
                crop_padding: 2,
                hflip: false,
            },
        );
        assert_eq!(t.resize, Some((4, 4)));
        assert_eq!(t.augment.map(|a| (a.pad, a.hflip)), Some((2, false)));
    }
}
