//! Does a dataset fit an oracle? Checked when a job is requested, before anything is queued,
//! so that a mismatch is a refusal naming both sides rather than a job failing in a worker.
//!
//! All refusals are FAILED_PRECONDITION: each request field is well-formed on its own; it is
//! the stored oracle and the stored dataset that do not go together (the fix is another
//! dataset, another oracle, or new dataset options).
use adaptivenet_core::data::Dataset as Images;
use adaptivenet_core::model::ModelSpec;

use crate::domain::Dataset;
use crate::error::{CloudError, Result};
use adaptivenet_train::pipeline::TrainingData;

/// Whether the oracle's head must already match the dataset's classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadFit {
    /// The head is kept (elastification, fine-tuning with the same classes): its class count
    /// must equal the dataset's.
    Keep,
    /// The head is replaced by a fresh one for the dataset's classes (fine-tuning an oracle
    /// on a new task): any class count fits.
    Replace,
}

/// What [`check_fit`] needs to know about a dataset; `None` fields were not recorded (rows
/// from before input specs and summaries) and are left to the worker, which checks the data
/// it reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataShape {
    /// How messages name the dataset.
    pub name: String,
    /// Channels and (height, width) of the model input (the dataset's input spec).
    pub channels: Option<usize>,
    pub size: Option<(usize, usize)>,
    pub classes: Option<usize>,
    /// Images of the training split (what `val_size` is held out of).
    pub train_images: Option<u64>,
}

impl DataShape {
    /// A registered dataset's recorded input spec and summary.
    pub fn of_record(d: &Dataset) -> Self {
        DataShape {
            name: d.name.clone(),
            channels: d.input_spec.as_ref().map(|s| s.channels),
            size: d.input_spec.as_ref().map(|s| (s.height, s.width)),
            classes: d.summary.as_ref().map(|s| s.classes.len()),
            train_images: d.summary.as_ref().map(|s| s.counts.iter().sum()),
        }
    }

    /// Data read for training (the local CLI's).
    pub fn of_training(name: impl Into<String>, d: &TrainingData) -> Self {
        DataShape {
            name: name.into(),
            channels: Some(d.spec.channels),
            size: Some((d.spec.height, d.spec.width)),
            classes: Some(d.train.num_classes()),
            train_images: Some(d.train.len() as u64),
        }
    }

    /// Images in memory (their own shape and classes).
    pub fn of_images(name: impl Into<String>, d: &Images) -> Self {
        DataShape {
            name: name.into(),
            channels: Some(d.channels),
            size: Some((d.height, d.width)),
            classes: Some(d.num_classes()),
            train_images: Some(d.len() as u64),
        }
    }
}

/// Refuses `data` for `oracle` (named `oracle_name`) when its channels differ from the stem's
/// input channels, when `head` is [`HeadFit::Keep`] and its class count differs from the
/// head's, or when its input is too small for the network's strides (see [`too_small`]).
pub fn check_fit(
    oracle_name: &str,
    oracle: &ModelSpec,
    data: &DataShape,
    head: HeadFit,
) -> Result<()> {
    let (d, o) = (&data.name, oracle_name);
    if let Some(c) = data.channels {
        if c != oracle.stem.cin {
            return Err(CloudError::FailedPrecondition(format!(
                "dataset '{d}' has {c} channel(s), oracle '{o}' expects {}",
                oracle.stem.cin
            )));
        }
    }
    if let (Some(n), HeadFit::Keep) = (data.classes, head) {
        if n != oracle.head.classes {
            return Err(CloudError::FailedPrecondition(format!(
                "dataset '{d}' has {n} class(es), oracle '{o}' has a head for {}",
                oracle.head.classes
            )));
        }
    }
    if let Some((h, w)) = data.size {
        if let Some(why) = too_small(oracle, h, w) {
            let (mh, mw) = min_input(oracle);
            return Err(CloudError::FailedPrecondition(format!(
                "dataset '{d}' has {h}x{w} inputs, oracle '{o}' needs at least {mh}x{mw}: its \
                 strides reduce the input {}-fold ({why}); register the dataset with a larger \
                 input size",
                total_stride(oracle)
            )));
        }
    }
    Ok(())
}

/// The strides of `spec` in order, each with the layer it belongs to.
fn strides(spec: &ModelSpec) -> Vec<(String, usize)> {
    let mut v = vec![("the stem".to_string(), spec.stem.stride)];
    if spec.stem.maxpool {
        v.push(("the stem's max-pool".to_string(), 2));
    }
    for (i, b) in spec.blocks.iter().enumerate() {
        v.push((format!("block {i}"), b.stride()));
    }
    v
}

/// The factor by which `spec` reduces each side of its input before the head's pooling.
pub fn total_stride(spec: &ModelSpec) -> usize {
    strides(spec)
        .iter()
        .fold(1usize, |acc, (_, s)| acc.saturating_mul(*s))
}

/// Why an `h`x`w` input is too small for `spec`, if it is: after some layer, the input divided
/// by the strides so far drops below one pixel, so the map before the head's pooling would be
/// made of padding rather than image (the model's integer arithmetic never reaches 0, which
/// is why the exact ratio is used). The answer names that layer.
pub fn too_small(spec: &ModelSpec, h: usize, w: usize) -> Option<String> {
    if h == 0 || w == 0 {
        return Some(format!("a {h}x{w} input is empty"));
    }
    let mut cum = 1usize;
    for (what, s) in strides(spec) {
        cum = cum.saturating_mul(s);
        if h < cum || w < cum {
            return Some(format!(
                "{what} (stride {s}) would get below one pixel: {h}x{w} over {cum}"
            ));
        }
    }
    None
}

/// The smallest `(height, width)` that [`too_small`] accepts.
pub fn min_input(spec: &ModelSpec) -> (usize, usize) {
    let t = total_stride(spec);
    (t, t)
}

#[cfg(test)]
mod tests {
    use adaptivenet_core::model::ArchDescriptor;

    use super::*;

    fn spec(json: &str) -> ModelSpec {
        ArchDescriptor::from_json(json.as_bytes()).unwrap().spec
    }

    fn small(layers: &str, cin: usize, classes: usize) -> ModelSpec {
        spec(&format!(
            r#"{{"family":"adaptivenet.resnet_small","block":"basic","layers":{layers},"widths":{widths},"in_channels":{cin},"num_classes":{classes}}}"#,
            widths = layers.replace(|c: char| c.is_ascii_digit(), "8"),
        ))
    }

    fn shape(c: usize, h: usize, w: usize, k: usize) -> DataShape {
        DataShape {
            name: "foo".into(),
            channels: Some(c),
            size: Some((h, w)),
            classes: Some(k),
            train_images: Some(100),
        }
    }

    fn refusal(r: Result<()>) -> String {
        match r {
            Err(CloudError::FailedPrecondition(m)) => m,
            other => panic!("expected FAILED_PRECONDITION, got {other:?}"),
        }
    }

    #[test]
    fn channels_and_classes_name_both_sides() {
        let o = small("[1]", 3, 10);
        let m = refusal(check_fit("bar", &o, &shape(1, 28, 28, 10), HeadFit::Keep));
        assert_eq!(m, "dataset 'foo' has 1 channel(s), oracle 'bar' expects 3");
        let m = refusal(check_fit("bar", &o, &shape(3, 28, 28, 7), HeadFit::Keep));
        assert_eq!(
            m,
            "dataset 'foo' has 7 class(es), oracle 'bar' has a head for 10"
        );
        check_fit("bar", &o, &shape(3, 28, 28, 7), HeadFit::Replace).unwrap();
        check_fit("bar", &o, &shape(3, 28, 28, 10), HeadFit::Keep).unwrap();
        // Channels are checked whatever happens to the head.
        refusal(check_fit("bar", &o, &shape(1, 28, 28, 7), HeadFit::Replace));
        // Unrecorded facts are left to the worker.
        let unknown = DataShape {
            name: "old".into(),
            channels: None,
            size: None,
            classes: None,
            train_images: None,
        };
        check_fit("bar", &o, &unknown, HeadFit::Keep).unwrap();
    }

    #[test]
    fn inputs_too_small_for_the_strides_are_refused() {
        // Strides 1 (stem), 1, 2, 2, 2: the input is reduced 8-fold.
        let o = small("[1,1,1,1]", 1, 10);
        assert_eq!(total_stride(&o), 8);
        assert_eq!(min_input(&o), (8, 8));
        check_fit("bar", &o, &shape(1, 8, 8, 10), HeadFit::Keep).unwrap();
        let m = refusal(check_fit("bar", &o, &shape(1, 4, 8, 10), HeadFit::Keep));
        assert!(m.contains("dataset 'foo' has 4x8 inputs"), "{m}");
        assert!(m.contains("oracle 'bar' needs at least 8x8"), "{m}");
        assert!(m.contains("reduce the input 8-fold"), "{m}");
        assert!(
            m.contains("block 3 (stride 2) would get below one pixel: 4x8 over 8"),
            "{m}"
        );
        refusal(check_fit("bar", &o, &shape(1, 8, 7, 10), HeadFit::Keep));
        // Stride 1 only: anything from 1x1 on.
        let flat = small("[2]", 1, 10);
        assert_eq!(min_input(&flat), (1, 1));
        check_fit("bar", &flat, &shape(1, 1, 1, 10), HeadFit::Keep).unwrap();
        assert!(too_small(&flat, 0, 5).is_some());
    }

    #[test]
    fn imagenet_resnet_needs_its_total_stride() {
        let r18 = spec(r#"{"family":"torchvision.resnet","block":"basic","layers":[2,2,2,2]}"#);
        // conv 7x7/2, max-pool /2, three stride-2 stages: 32 in total.
        assert!(too_small(&r18, 224, 224).is_none());
        assert!(too_small(&r18, 32, 32).is_none());
        assert_eq!(min_input(&r18), (32, 32));
        let why = too_small(&r18, 16, 16).unwrap();
        assert_eq!(
            why,
            "block 6 (stride 2) would get below one pixel: 16x16 over 32"
        );
        let why = too_small(&r18, 224, 1).unwrap();
        assert!(why.starts_with("the stem (stride 2)"), "{why}");
    }
}
