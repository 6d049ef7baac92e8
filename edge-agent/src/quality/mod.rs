//! Local quality of subnets on the device's own data, without the data leaving the device.
//!
//! Two modes: labelled top-1 accuracy, and **label-free** agreement with the oracle (the
//! all-original subnet, which the supernet contains bit for bit): its top-1 predictions are the
//! pseudo-labels. An [`EvalSet`] runs the stem once per image (speed-up 1, stem caching) and
//! keeps both the raw batches (for the plain baseline) and the stem outputs.
use adaptivenet_core::artifact::InputSpec;
use adaptivenet_core::data::{shuffled_indices, Dataset, Normalize, Transform};
use adaptivenet_core::supernet::{Subnet, Supernet};
use candle_core::{Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::{EdgeError, Result};

/// What "quality" means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QualityMode {
    /// Top-1 accuracy against the data set's labels.
    Labelled,
    /// Top-1 agreement with the oracle's own predictions (no labels needed).
    OracleAgreement,
}

/// The local evaluation data, prepared once per search.
#[derive(Debug)]
pub struct EvalSet {
    pub mode: QualityMode,
    /// Raw input batches `[B, C, H, W]`.
    pub inputs: Vec<Tensor>,
    /// Stem outputs of `inputs`, batch by batch (speed-up 1).
    pub stem_out: Vec<Tensor>,
    /// Targets per batch (labels or oracle predictions).
    pub targets: Vec<Vec<u32>>,
    pub len: usize,
}

/// The preprocessing that matches the artifact's input spec for a data set: normalisation
/// from the manifest, resize when the data set's image size differs, grey→RGB if needed.
pub fn transform_for(input: &InputSpec, ds: &Dataset) -> Result<Transform> {
    let [c, h, w] = input.shape;
    let mut t = Transform::new().normalize(Normalize::MeanStd {
        mean: input.mean.clone(),
        std: input.std.clone(),
    });
    if (ds.height, ds.width) != (h, w) {
        t = t.resize(h, w);
    }
    match (ds.channels, c) {
        (a, b) if a == b => {}
        (1, 3) => t = t.grey_to_rgb(),
        (a, b) => {
            return Err(EdgeError::NoData(format!(
                "data set has {a} channels, the model expects {b}"
            )))
        }
    }
    Ok(t)
}

/// Top-1 predictions of a logits batch.
pub fn top1(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

/// Number of predictions equal to the targets.
pub fn count_correct(logits: &Tensor, targets: &[u32]) -> Result<usize> {
    Ok(top1(logits)?
        .iter()
        .zip(targets)
        .filter(|(p, t)| p == t)
        .count())
}

impl EvalSet {
    /// Builds the set from input batches; `labels` are required in labelled mode and ignored
    /// in label-free mode (the oracle path of `supernet` must then be loaded).
    pub fn from_batches(
        supernet: &Supernet,
        inputs: Vec<Tensor>,
        labels: Option<Vec<Vec<u32>>>,
        mode: QualityMode,
    ) -> Result<EvalSet> {
        let len: usize = inputs.iter().map(|x| x.dim(0).unwrap_or(0)).sum();
        if len == 0 {
            return Err(EdgeError::NoData("no images to evaluate on".into()));
        }
        let stem_out = inputs
            .iter()
            .map(|x| Ok(supernet.forward_stem(x)?))
            .collect::<Result<Vec<_>>>()?;
        let targets = match mode {
            QualityMode::Labelled => {
                labels.ok_or_else(|| EdgeError::NoData("labelled mode needs labels".into()))?
            }
            QualityMode::OracleAgreement => {
                let oracle = Subnet::original(supernet.spec.num_positions());
                stem_out
                    .iter()
                    .map(|h| {
                        let h = supernet.forward_blocks_from(&oracle, 0, h)?;
                        top1(&supernet.forward_head(&h)?)
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        };
        Ok(EvalSet {
            mode,
            inputs,
            stem_out,
            targets,
            len,
        })
    }

    /// Takes `n` images (a seeded random subset, or all when `n` is 0 or exceeds the set) of a
    /// data set in batches of `batch`.
    pub fn from_dataset(
        supernet: &Supernet,
        input: &InputSpec,
        ds: &Dataset,
        n: usize,
        batch: usize,
        mode: QualityMode,
        seed: u64,
    ) -> Result<EvalSet> {
        let (inputs, labels) = search_batches(input, ds, n, batch, seed)?;
        EvalSet::from_batches(supernet, inputs, Some(labels), mode)
    }

    /// Images per batch (the first batch's size).
    pub fn batch_size(&self) -> usize {
        self.inputs.first().and_then(|x| x.dim(0).ok()).unwrap_or(0)
    }

    /// Converts a per-subnet count of correct predictions into percent.
    pub fn percent(&self, correct: usize) -> f64 {
        100.0 * correct as f64 / self.len as f64
    }

    /// Quality of one subnet, evaluated independently. `from_stem` uses the cached stem
    /// outputs; otherwise every image goes through the whole network (the plain baseline).
    pub fn evaluate(&self, supernet: &Supernet, s: &Subnet, from_stem: bool) -> Result<f64> {
        let mut correct = 0;
        for (b, y) in self.targets.iter().enumerate() {
            let logits = if from_stem {
                let h = supernet.forward_blocks_from(s, 0, &self.stem_out[b])?;
                supernet.forward_head(&h)?
            } else {
                supernet.forward(s, &self.inputs[b])?
            };
            correct += count_correct(&logits, y)?;
        }
        Ok(self.percent(correct))
    }
}

/// The images the search evaluates: `n` of `ds` (all with 0) in a seeded shuffled order,
/// preprocessed for the artifact's `input`, in batches of `batch`, with their labels.
/// BN recalibration (`edge-agent run --bn-recal`) uses the same images.
pub fn search_batches(
    input: &InputSpec,
    ds: &Dataset,
    n: usize,
    batch: usize,
    seed: u64,
) -> Result<(Vec<Tensor>, Vec<Vec<u32>>)> {
    if ds.is_empty() {
        return Err(EdgeError::NoData("the data set is empty".into()));
    }
    let t = transform_for(input, ds)?;
    let mut idx = shuffled_indices(ds.len(), seed);
    if n > 0 && n < idx.len() {
        idx.truncate(n);
    }
    let (mut inputs, mut labels) = (Vec::new(), Vec::new());
    for chunk in idx.chunks(batch.max(1)) {
        let (x, y) = ds.batch_tensor(chunk, &t, &Device::Cpu)?;
        inputs.push(x);
        labels.push(y.to_vec1::<u32>()?);
    }
    Ok((inputs, labels))
}

/// Reads the device's local data: an IDX directory (`t10k-*` files preferred, else `train-*`;
/// labels named by the artifact's class names) or an ImageFolder tree of any image sizes,
/// converted to the artifact's input channels and size.
pub fn load_local_data(dir: &std::path::Path, input: &InputSpec) -> Result<Dataset> {
    use adaptivenet_core::data::{read_idx_pair, read_image_folder, ColorMode, ImageFolderOptions};
    if !dir.is_dir() {
        return Err(EdgeError::NoData(format!(
            "{} is not a readable directory",
            dir.display()
        )));
    }
    let file = |stem: String| {
        [dir.join(format!("{stem}.gz")), dir.join(&stem)]
            .into_iter()
            .find(|p| p.is_file())
    };
    let idx = ["t10k", "train"].into_iter().find_map(|split| {
        Some((
            file(format!("{split}-images-idx3-ubyte"))?,
            file(format!("{split}-labels-idx1-ubyte"))?,
        ))
    });
    let ds = if let Some((images, labels)) = idx {
        let names: Vec<&str> = input.class_names.iter().map(String::as_str).collect();
        read_idx_pair(images, labels, &names)?
    } else {
        let [c, h, w] = input.shape;
        let opts = ImageFolderOptions {
            color: if c == 1 {
                ColorMode::Grey
            } else {
                ColorMode::Rgb
            },
            size: Some((h, w)),
        };
        read_image_folder(dir, &opts)?
    };
    if ds.is_empty() {
        return Err(EdgeError::NoData(format!(
            "{} holds no images",
            dir.display()
        )));
    }
    Ok(ds)
}
