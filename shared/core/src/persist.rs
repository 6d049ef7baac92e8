//! Bytes to disk, safely: atomic file writes, the sha256 every blob is named by, and the
//! safetensors serialisation of named tensors. A leaf module: it imports nothing of the
//! crate's higher modules, so both `model` (saving an oracle) and `artifact` (blobs and
//! manifests) build on it without importing each other.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Tensor};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::{CoreError, Result};

/// sha256 of bytes as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes a file atomically: temp file in the same directory, fsync, rename, fsync the dir.
/// A crash at any point leaves either the old or the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        Uuid::new_v4().simple()
    ));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    res.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        CoreError::io(path, e)
    })
}

/// Serialises named tensors as safetensors bytes (deterministic for the same input).
pub fn params_to_safetensors<I, S>(tensors: I) -> Result<Vec<u8>>
where
    I: IntoIterator<Item = (S, Tensor)>,
    S: AsRef<str>,
{
    let map: BTreeMap<String, Tensor> = tensors
        .into_iter()
        .map(|(n, t)| {
            Ok((
                n.as_ref().to_string(),
                t.to_dtype(DType::F32)?.contiguous()?,
            ))
        })
        .collect::<Result<_>>()?;
    safetensors::tensor::serialize(map.iter().map(|(k, v)| (k.as_str(), v)), None)
        .map_err(|e| CoreError::Manifest(format!("safetensors serialisation: {e}")))
}
