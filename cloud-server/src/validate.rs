//! Oracle validation on upload: the one place that decides whether uploaded bytes are a
//! model the cloud accepts. The model core loads the weights against the descriptor, so a
//! missing tensor, a wrong shape or an unknown family is rejected (INVALID_ARGUMENT naming
//! the tensor) before anything is stored.
use adaptivenet_core::model::{ArchDescriptor, Model};
use adaptivenet_core::weights::read_tensors_from_bytes;

use crate::error::{CloudError, Result};

/// What validation learned about an oracle.
#[derive(Debug, Clone, PartialEq)]
pub struct OracleInfo {
    pub family: String,
    pub num_tensors: u32,
    pub num_params: u64,
}

/// [`validate_oracle`] on a weights file, mapped rather than read: an upload up to the
/// size limit is validated from its scratch file without a heap copy of its bytes.
pub fn validate_oracle_file(arch_json: &[u8], weights: &std::path::Path) -> Result<OracleInfo> {
    let file = std::fs::File::open(weights).map_err(|e| CloudError::io(weights, e))?;
    // SAFETY: the file is this process's private scratch file (a fresh random name under the
    // blob store's tmp directory), not modified while mapped; it is only renamed afterwards.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| CloudError::io(weights, e))?;
    validate_oracle(arch_json, &map)
}

/// Checks an architecture descriptor and its weights (safetensors or PyTorch `.pth`).
pub fn validate_oracle(arch_json: &[u8], weights: &[u8]) -> Result<OracleInfo> {
    let arch = ArchDescriptor::from_json(arch_json)
        .map_err(|e| CloudError::invalid("header.arch_json", e.to_string()))?;
    let tensors = read_tensors_from_bytes(weights)
        .map_err(|e| CloudError::invalid("chunk", format!("weights: {e}")))?;
    if tensors.is_empty() {
        return Err(CloudError::invalid("chunk", "the weights hold no tensor"));
    }
    let num_tensors = tensors.len() as u32;
    let model = Model::load(&arch, tensors).map_err(|e| {
        CloudError::invalid("chunk", format!("weights do not fit the architecture: {e}"))
    })?;
    Ok(OracleInfo {
        family: model.spec.family.clone(),
        num_tensors,
        num_params: model.num_params(),
    })
}
