//! Oracle validation on upload: the one place that decides whether uploaded bytes are a
//! model the cloud accepts.
use crate::error::{CloudError, Result};

/// What validation learned about an oracle.
#[derive(Debug, Clone, PartialEq)]
pub struct OracleInfo {
    pub family: String,
    pub num_tensors: u32,
    pub num_params: u64,
}

/// Checks an architecture descriptor and its weights.
///
/// Today: the descriptor is a JSON object with a non-empty string `family`; the weights
/// parse as safetensors with at least one tensor.
// TODO(core): once `adaptivenet_core::model::{ArchDescriptor, Model}` and
// `adaptivenet_core::weights::read_tensors_from_bytes` land, call
// `Model::load(&ArchDescriptor::from_json(arch_json)?, read_tensors_from_bytes(weights)?)`
// here and take `num_params` from the model (shape mismatches then become INVALID_ARGUMENT
// naming the tensor).
pub fn validate_oracle(arch_json: &[u8], weights: &[u8]) -> Result<OracleInfo> {
    let arch: serde_json::Value = serde_json::from_slice(arch_json)
        .map_err(|e| CloudError::invalid("header.arch_json", format!("not JSON: {e}")))?;
    let obj = arch
        .as_object()
        .ok_or_else(|| CloudError::invalid("header.arch_json", "must be a JSON object"))?;
    let family = obj
        .get("family")
        .and_then(|f| f.as_str())
        .filter(|f| !f.is_empty() && f.len() <= 64)
        .ok_or_else(|| CloudError::invalid("header.arch_json.family", "required non-empty string"))?
        .to_string();
    let st = safetensors::SafeTensors::deserialize(weights)
        .map_err(|e| CloudError::invalid("chunk", format!("weights are not safetensors: {e}")))?;
    let mut num_params: u64 = 0;
    let mut num_tensors: u32 = 0;
    for (_, view) in st.tensors() {
        num_tensors += 1;
        num_params += view.shape().iter().product::<usize>() as u64;
    }
    if num_tensors == 0 {
        return Err(CloudError::invalid("chunk", "the weights hold no tensor"));
    }
    Ok(OracleInfo {
        family,
        num_tensors,
        num_params,
    })
}
