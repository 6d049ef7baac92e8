//! Checking an imported oracle against reference outputs (`oracle verify`): how a developer
//! convinces themself that their export matches PyTorch.
use std::path::Path;

use candle_core::{DType, Device, D};

use super::{ArchDescriptor, Model};
use crate::{CoreError, Result};

/// Reads a descriptor file; with `entry`, the file is an index (`{"name": descriptor, ...}`,
/// like the parity fixtures' `index.json`) and the named entry is used.
pub fn read_descriptor(path: &Path, entry: Option<&str>) -> Result<ArchDescriptor> {
    let bytes = std::fs::read(path).map_err(|e| CoreError::io(path, e))?;
    match entry {
        None => ArchDescriptor::from_json(&bytes),
        Some(name) => {
            let v: serde_json::Value = serde_json::from_slice(&bytes)?;
            let e = v.get(name).ok_or_else(|| CoreError::InvalidArch {
                field: "--entry".into(),
                reason: format!("{name:?} is not an entry of {}", path.display()),
            })?;
            ArchDescriptor::from_value(e.clone())
        }
    }
}

/// How far a model's outputs are from reference logits.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifyReport {
    pub max_abs_diff: f32,
    pub mean_abs_diff: f32,
    /// Fraction of samples whose arg-max class agrees with the reference.
    pub top1_agreement: f32,
    pub logits_shape: Vec<usize>,
}

/// Runs `input` from a safetensors file through the model and compares with its `logits`.
pub fn verify_io(model: &Model, io_path: &Path) -> Result<VerifyReport> {
    let io = candle_core::safetensors::load(io_path, &Device::Cpu).map_err(|e| {
        CoreError::WeightFormat {
            path: io_path.display().to_string(),
            reason: e.to_string(),
        }
    })?;
    let take = |name: &str| {
        io.get(name)
            .ok_or_else(|| CoreError::WeightFormat {
                path: io_path.display().to_string(),
                reason: format!("no tensor named {name:?} (expected `input` and `logits`)"),
            })
            .and_then(|t| Ok(t.to_dtype(DType::F32)?))
    };
    let (input, want) = (take("input")?, take("logits")?);
    let got = model.forward(&input)?;
    if got.dims() != want.dims() {
        return Err(CoreError::ShapeMismatch {
            name: "logits".into(),
            expected: want.dims().to_vec(),
            found: got.dims().to_vec(),
        });
    }
    let diff = (&got - &want)?.abs()?.flatten_all()?;
    let agree = got
        .argmax(D::Minus1)?
        .eq(&want.argmax(D::Minus1)?)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?;
    Ok(VerifyReport {
        max_abs_diff: diff.max(0)?.to_scalar()?,
        mean_abs_diff: diff.mean(0)?.to_scalar()?,
        top1_agreement: agree,
        logits_shape: got.dims().to_vec(),
    })
}
