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
    let mut packer = ShardPacker::new(shard_bytes);
    let mut plans: Vec<Vec<PathBuf>> = Vec::new();
    for (name, path) in files {
        let bytes = std::fs::read(&path).map_err(|e| CloudError::io(&path, e))?;
        let shard = packer.add(name, &bytes) as usize;
        if shard == plans.len() {
            plans.push(Vec::new());
        }
        plans[shard].push(path);
    }
    let manifest = packer.finish(format, dirs);
    let shards: Vec<ShardPlan> = manifest
        .shards
        .iter()
        .zip(plans)
        .map(|(r, files)| ShardPlan {
            sha256: r.sha256.clone(),
            size: r.size,
            files,
        })
        .collect();
    let total_bytes = shards.iter().map(|s| s.size).sum();
    Ok(Packed {
        manifest,
        shards,
        total_bytes,
    })
}

/// The one shard layout: entries, added in name order, fill a shard until the next one would
/// take it past `shard_bytes` (a larger entry gets a shard of its own). The client's upload and
/// the server's `s3://` ingestion both use it, so the same content yields the same manifest
/// and digest whichever way it arrives.
#[derive(Debug)]
pub struct ShardPacker {
    shard_bytes: u64,
    entries: Vec<Entry>,
    /// Completed shards.
    shards: Vec<ShardRef>,
    /// Bytes and entries of the shard being filled.
    cur_size: u64,
    cur_entries: usize,
    hasher: Sha256,
}

impl ShardPacker {
    pub fn new(shard_bytes: u64) -> Self {
        ShardPacker {
            shard_bytes,
            entries: Vec::new(),
            shards: Vec::new(),
            cur_size: 0,
            cur_entries: 0,
            hasher: Sha256::new(),
        }
    }

    /// Places the next entry and returns the index of the shard its bytes go to, right after
    /// the previous entry's; an index not seen before means the previous shard is complete.
    pub fn add(&mut self, path: String, bytes: &[u8]) -> u32 {
        let len = bytes.len() as u64;
        if self.cur_size > 0 && self.cur_size + len > self.shard_bytes {
            self.close_shard();
        }
        self.entries.push(Entry {
            path,
            size: len,
            sha256: hex::encode(Sha256::digest(bytes)),
            shard: self.shards.len() as u32,
            offset: self.cur_size,
        });
        self.hasher.update(bytes);
        self.cur_size += len;
        self.cur_entries += 1;
        self.shards.len() as u32
    }

    fn close_shard(&mut self) {
        if self.cur_entries > 0 {
            self.shards.push(ShardRef {
                sha256: hex::encode(std::mem::take(&mut self.hasher).finalize()),
                size: self.cur_size,
            });
            self.cur_size = 0;
            self.cur_entries = 0;
        }
    }

    /// The manifest of everything added.
    pub fn finish(mut self, format: DatasetFormat, dirs: Vec<String>) -> Manifest {
        self.close_shard();
        Manifest {
            version: 1,
            format,
            dirs,
            entries: self.entries,
            shards: self.shards,
        }
    }
}
