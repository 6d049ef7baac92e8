//! Client side of an upload: a directory becomes sorted entries packed into content-addressed
//! shards and a [`Manifest`]. Deterministic (sorted paths, fixed shard size), so the same
//! content always yields the same digest and a re-upload is recognised.
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{DatasetFormat, Entry, Manifest, ShardRef};
use crate::error::{CloudError, Result};

/// Default shard size: large enough that a 60,000-image dataset is a handful of blobs, small
/// enough that materialising one shard at a time stays cheap.
pub const DEFAULT_SHARD_BYTES: u64 = 32 << 20;

/// Files as (relative `/`-separated name, local path).
pub type Files = Vec<(String, PathBuf)>;

/// Files (relative `/`-separated name, local path) and directories under `dir`, sorted.
/// Hidden names (starting with `.`) are skipped. A symlink is followed only to a file; with
/// `root`, only when its target stays under `root`.
pub fn scan_dir(dir: &Path, root: Option<&Path>) -> Result<(Files, Vec<String>)> {
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, prefix)) = stack.pop() {
        for ent in std::fs::read_dir(&d).map_err(|e| CloudError::io(&d, e))? {
            let ent = ent.map_err(|e| CloudError::io(&d, e))?;
            let p = ent.path();
            let name = ent.file_name().into_string().map_err(|n| {
                CloudError::invalid(format!("entry {prefix}{n:?}"), "file name is not UTF-8")
            })?;
            if name.starts_with('.') {
                continue;
            }
            let rel = format!("{prefix}{name}");
            let meta = std::fs::symlink_metadata(&p).map_err(|e| CloudError::io(&p, e))?;
            if meta.file_type().is_symlink() {
                let target = p.canonicalize().map_err(|e| CloudError::io(&p, e))?;
                if let Some(root) = root {
                    if !target.starts_with(root) {
                        return Err(CloudError::invalid(
                            format!("entry {rel:?}"),
                            "symlink leads outside the dataset root",
                        ));
                    }
                }
                if !target.is_file() {
                    return Err(CloudError::invalid(
                        format!("entry {rel:?}"),
                        "symlink to a folder (not supported)",
                    ));
                }
                files.push((rel, target));
            } else if meta.is_dir() {
                dirs.push(rel.clone());
                stack.push((p, format!("{rel}/")));
            } else if meta.is_file() {
                files.push((rel, p));
            }
        }
    }
    files.sort();
    dirs.sort();
    Ok((files, dirs))
}

/// One shard to send: the files concatenated, in manifest order.
#[derive(Clone, Debug)]
pub struct ShardPlan {
    pub sha256: String,
    pub size: u64,
    pub files: Vec<PathBuf>,
}

/// A packed dataset, ready to stream.
#[derive(Clone, Debug)]
pub struct Packed {
    pub manifest: Manifest,
    pub shards: Vec<ShardPlan>,
    /// Sum of shard sizes.
    pub total_bytes: u64,
}

/// Packs `files` (name, local path), sorted by name, into shards of about `shard_bytes`
/// (a larger file gets a shard of its own). Names are sent as given: the server validates
/// them.
pub fn pack(
    format: DatasetFormat,
    mut files: Vec<(String, PathBuf)>,
    dirs: Vec<String>,
    shard_bytes: u64,
) -> Result<Packed> {
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let mut entries = Vec::with_capacity(files.len());
    let mut shards: Vec<ShardPlan> = Vec::new();
    let mut hasher = Sha256::new();
    let mut cur = ShardPlan {
        sha256: String::new(),
        size: 0,
        files: Vec::new(),
    };
    let finish = |cur: &mut ShardPlan, hasher: &mut Sha256, shards: &mut Vec<ShardPlan>| {
        if !cur.files.is_empty() {
            cur.sha256 = hex::encode(std::mem::take(hasher).finalize());
            shards.push(std::mem::replace(
                cur,
                ShardPlan {
                    sha256: String::new(),
                    size: 0,
                    files: Vec::new(),
                },
            ));
        }
    };
    for (name, path) in files {
        let bytes = std::fs::read(&path).map_err(|e| CloudError::io(&path, e))?;
        let len = bytes.len() as u64;
        if cur.size > 0 && cur.size + len > shard_bytes {
            finish(&mut cur, &mut hasher, &mut shards);
        }
        entries.push(Entry {
            path: name,
            size: len,
            sha256: hex::encode(Sha256::digest(&bytes)),
            shard: shards.len() as u32,
            offset: cur.size,
        });
        hasher.update(&bytes);
        cur.size += len;
        cur.files.push(path);
    }
    finish(&mut cur, &mut hasher, &mut shards);
    let manifest = Manifest {
        version: 1,
        format,
        dirs,
        entries,
        shards: shards
            .iter()
            .map(|s| ShardRef {
                sha256: s.sha256.clone(),
                size: s.size,
            })
            .collect(),
    };
    let total_bytes = shards.iter().map(|s| s.size).sum();
    Ok(Packed {
        manifest,
        shards,
        total_bytes,
    })
}
