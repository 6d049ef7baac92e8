//! Data-set readers, deterministic splits and batch preprocessing.
//!
//! - [`idx`]: IDX files (Fashion-MNIST), raw or gzipped, parsed defensively.
//! - [`folder`]: torchvision-style ImageFolder trees of PNG/JPEG images.
//! - [`pixels`]: image decoding, HWC to CHW and bilinear resizing, shared by the above.
//! - [`spec`]: the input spec and augmentation policy a dataset carries to every consumer.
//! - [`split`]: seeded splits, stratified hold-outs, Dirichlet and class-filter partitions.
//! - [`transform`]: u8 -> f32 batch preprocessing and training augmentation, and the
//!   EfficientNet-Lite ImageNet preprocessing.
//!
//! A [`Dataset`] keeps pixels as u8 in memory (Fashion-MNIST's 60,000 training images are
//! 47 MB that way, four times less than as f32) and converts one batch at a time.
use candle_core::{Device, Tensor};
use rand::RngCore;

use crate::{CoreError, Result};

pub mod folder;
pub mod idx;
pub mod pixels;
pub mod spec;
pub mod split;
pub mod transform;

pub use folder::{read_image_folder, read_image_folder_for, ColorMode, ImageFolderOptions};
pub use idx::{
    fashion_mnist, parse_idx_images, parse_idx_labels, read_idx_images, read_idx_labels,
    read_idx_pair, IdxImages, FASHION_MNIST_CLASSES,
};
pub use spec::{channel_stats, AugmentPolicy, DatasetSummary, InputSpec, ResizePolicy};
pub use split::{
    class_filter, class_indices, dirichlet_partition, holdout, shuffled_indices, split_indices,
    Holdout, Split,
};
pub use transform::{
    imagenet_preprocess_lite, imagenet_preprocess_lite_chw, Augment, Normalize, Transform,
};

/// An in-memory labelled image set: u8 pixels, row-major NCHW.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    /// `len() * channels * height * width` pixels, image after image.
    pub images: Vec<u8>,
    /// One label per image, each below `class_names.len()`.
    pub labels: Vec<u32>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// `class_names[label]` names the class.
    pub class_names: Vec<String>,
}

impl Dataset {
    /// Builds a dataset, checking that pixels, labels and classes agree.
    pub fn new(
        images: Vec<u8>,
        labels: Vec<u32>,
        (channels, height, width): (usize, usize, usize),
        class_names: Vec<String>,
    ) -> Result<Self> {
        let ds = Dataset {
            images,
            labels,
            channels,
            height,
            width,
            class_names,
        };
        ds.validate()?;
        Ok(ds)
    }

    /// Checks the invariants of the public fields.
    pub fn validate(&self) -> Result<()> {
        let per = self.image_len();
        if per == 0 {
            return Err(invalid(
                "shape",
                format!(
                    "empty image shape {}x{}x{}",
                    self.channels, self.height, self.width
                ),
            ));
        }
        if Some(self.images.len()) != self.labels.len().checked_mul(per) {
            return Err(invalid(
                "images",
                format!(
                    "{} pixels for {} labels of {} pixels each",
                    self.images.len(),
                    self.labels.len(),
                    per
                ),
            ));
        }
        if let Some((i, l)) = self
            .labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= self.class_names.len())
        {
            return Err(invalid(
                "labels",
                format!(
                    "label {l} at index {i} with {} classes",
                    self.class_names.len()
                ),
            ));
        }
        Ok(())
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Pixels per image (`channels * height * width`).
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The pixels of image `i`, CHW. Panics when `i >= len()`, like slice indexing.
    pub fn image(&self, i: usize) -> &[u8] {
        let per = self.image_len();
        &self.images[i * per..(i + 1) * per]
    }

    /// Images per class, indexed by label.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes()];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }

    /// A new dataset of the images at `indices` (in that order), with the same classes.
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset> {
        self.check_indices(indices)?;
        let per = self.image_len();
        let mut images = Vec::with_capacity(indices.len() * per);
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        Ok(Dataset {
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            channels: self.channels,
            height: self.height,
            width: self.width,
            class_names: self.class_names.clone(),
        })
    }

    /// An evaluation batch: images `[B, C', H', W']` f32 through `transform` (never augmented)
    /// and labels `[B]` u32.
    pub fn batch_tensor(
        &self,
        indices: &[usize],
        transform: &Transform,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        self.batch(indices, transform, None, device)
    }

    /// A training batch: like [`Dataset::batch_tensor`] plus `transform.augment` drawn from
    /// `rng` (one crop offset and flip per image, in batch order), so a seeded RNG reproduces
    /// the same augmented batches.
    pub fn batch_tensor_augmented(
        &self,
        indices: &[usize],
        transform: &Transform,
        rng: &mut impl RngCore,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        self.batch(indices, transform, Some(rng as &mut dyn RngCore), device)
    }

    fn batch(
        &self,
        indices: &[usize],
        transform: &Transform,
        rng: Option<&mut dyn RngCore>,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        self.check_indices(indices)?;
        let shape = (self.channels, self.height, self.width);
        let x = transform.apply_tensor(&self.images, shape, indices, rng, device)?;
        let y: Vec<u32> = indices.iter().map(|&i| self.labels[i]).collect();
        let y = Tensor::from_vec(y, indices.len(), device)?;
        Ok((x, y))
    }

    fn check_indices(&self, indices: &[usize]) -> Result<()> {
        match indices.iter().find(|&&i| i >= self.len()) {
            Some(bad) => Err(invalid(
                "indices",
                format!("index {bad} out of range for {} images", self.len()),
            )),
            None => Ok(()),
        }
    }
}

fn invalid(field: &str, reason: String) -> CoreError {
    CoreError::InvalidConfig {
        field: field.to_string(),
        reason,
    }
}
