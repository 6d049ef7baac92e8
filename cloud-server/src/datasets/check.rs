//! The one validation every dataset passes before anything about it is recorded, whether
//! uploaded or registered in place: entry names, image headers (dimensions before any
//! decoding), full decodes, IDX consistency, classes and counts, and the statistics the input
//! spec defaults to.
//!
//! Everything here treats its input as hostile and runs on a blocking thread; errors are
//! INVALID_ARGUMENT naming the entry (or class) at fault.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Cursor, Read};

use adaptivenet_core::data::{parse_idx_images, parse_idx_labels, DatasetSummary};
use sha2::{Digest, Sha256};

use super::{DatasetFormat, Entry, Manifest};
use crate::error::{CloudError, Result};

/// Longest accepted entry path (bytes).
pub const MAX_PATH_LEN: usize = 512;
/// Most entries in one dataset.
pub const MAX_ENTRIES: usize = 4_000_000;
/// Largest image side a header may claim.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// Most pixels per image (checked on the header, before decoding: a 100-byte PNG may claim
/// gigapixels).
pub const MAX_IMAGE_PIXELS: u64 = 1 << 24;
/// Largest decompressed IDX file (a gzip bomb stops here, not at memory exhaustion).
pub const MAX_IDX_BYTES: u64 = 1 << 30;
/// Most classes.
pub const MAX_CLASSES: usize = 100_000;

/// Image file extensions an ImageFolder may hold (case-insensitive).
const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Reads an entry's bytes (from upload shards or a registered directory); implementations
/// check the entry's sha256.
pub trait EntrySource {
    fn read(&self, e: &Entry) -> Result<Vec<u8>>;
}

/// What validation recorded about a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub summary: DatasetSummary,
    /// Training images.
    pub num_samples: u64,
    /// Per-channel mean and std of `x / 255` over the training split.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// The most common `(height, width)` (ties: the larger).
    pub common_size: (usize, usize),
}

fn bad_entry(path: &str, reason: impl Into<String>) -> CloudError {
    CloudError::invalid(format!("entry {path:?}"), reason)
}

/// Checks one relative, `/`-separated path: no traversal, no absolute path, no backslash, no
/// empty or dot components, no control characters.
pub fn check_path(path: &str) -> Result<()> {
    if path.is_empty() || path.len() > MAX_PATH_LEN {
        return Err(bad_entry(
            path,
            format!("path must be 1-{MAX_PATH_LEN} bytes"),
        ));
    }
    if path.contains('\\') {
        return Err(bad_entry(path, "backslash in path (use '/')"));
    }
    if path.starts_with('/') || path.as_bytes().get(1) == Some(&b':') {
        return Err(bad_entry(
            path,
            "absolute path (entries are relative to the dataset root)",
        ));
    }
    if path.chars().any(char::is_control) {
        return Err(bad_entry(path, "control character in path"));
    }
    for c in path.split('/') {
        match c {
            "" => return Err(bad_entry(path, "empty path component")),
            "." | ".." => return Err(bad_entry(path, "path traversal ('.' or '..' component)")),
            _ if c.starts_with('.') => {
                return Err(bad_entry(
                    path,
                    "hidden file or folder (name starts with '.')",
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks the manifest's shape (paths, order, uniqueness, shard ranges) without reading data.
pub fn check_manifest(m: &Manifest) -> Result<()> {
    if m.version != 1 {
        return Err(CloudError::invalid(
            "manifest.version",
            format!("{} (1 supported)", m.version),
        ));
    }
    if m.entries.is_empty() {
        return Err(CloudError::invalid("manifest.entries", "no entries"));
    }
    if m.entries.len() > MAX_ENTRIES {
        return Err(CloudError::invalid(
            "manifest.entries",
            format!("{} entries (at most {MAX_ENTRIES})", m.entries.len()),
        ));
    }
    for d in &m.dirs {
        check_path(d)?;
    }
    let mut seen = BTreeSet::new();
    for e in &m.entries {
        check_path(&e.path)?;
        if !seen.insert(e.path.as_str()) {
            return Err(bad_entry(&e.path, "listed twice"));
        }
        if e.sha256.len() != 64 || !e.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad_entry(&e.path, "sha256 must be 64 hex digits"));
        }
        if !m.shards.is_empty() {
            let s = m
                .shards
                .get(e.shard as usize)
                .ok_or_else(|| bad_entry(&e.path, format!("no shard {}", e.shard)))?;
            if e.offset.checked_add(e.size).is_none_or(|end| end > s.size) {
                return Err(bad_entry(&e.path, "byte range outside its shard"));
            }
        }
    }
    Ok(())
}

/// Validates every entry of `m` through `src` and records the summary and statistics.
pub fn validate(m: &Manifest, src: &dyn EntrySource) -> Result<Recorded> {
    check_manifest(m)?;
    match m.format {
        DatasetFormat::ImageFolder => image_folder(m, src),
        DatasetFormat::Idx => idx_folder(m, src),
    }
}

/// Per-channel sums of `x / 255` and its square, for the mean/std of the training split.
#[derive(Default)]
struct Stats {
    /// Sums over grey images (one channel).
    grey: [f64; 2],
    grey_n: f64,
    /// Sums over colour images, per channel.
    rgb: [[f64; 2]; 3],
    rgb_n: f64,
}

impl Stats {
    fn add(&mut self, px: &[u8], channels: usize) {
        let (mut s, mut q) = ([0u64; 3], [0u64; 3]);
        for p in px.chunks_exact(channels) {
            for (c, &v) in p.iter().enumerate() {
                s[c] += v as u64;
                q[c] += v as u64 * v as u64;
            }
        }
        for c in 0..channels {
            let acc = if channels == 1 {
                &mut self.grey
            } else {
                &mut self.rgb[c]
            };
            acc[0] += s[c] as f64 / 255.0;
            acc[1] += q[c] as f64 / (255.0 * 255.0);
        }
        let n = (px.len() / channels) as f64;
        if channels == 1 {
            self.grey_n += n;
        } else {
            self.rgb_n += n;
        }
    }

    /// Mean and std per channel of the dataset's channel count; grey images count towards
    /// every channel of a colour dataset (they are replicated when read).
    fn finish(&self, channels: usize) -> (Vec<f32>, Vec<f32>) {
        let (mut mean, mut std) = (Vec::new(), Vec::new());
        for c in 0..channels {
            let (s, q, n) = if channels == 1 {
                (self.grey[0], self.grey[1], self.grey_n)
            } else {
                (
                    self.rgb[c][0] + self.grey[0],
                    self.rgb[c][1] + self.grey[1],
                    self.rgb_n + self.grey_n,
                )
            };
            let m = s / n.max(1.0);
            let sd = (q / n.max(1.0) - m * m).max(0.0).sqrt();
            mean.push(m as f32);
            std.push(if sd > 1e-6 { sd as f32 } else { 1.0 });
        }
        (mean, std)
    }
}

/// `root/<class>/<image>`: every entry a PNG or JPEG inside a class folder, every class
/// non-empty.
fn image_folder(m: &Manifest, src: &dyn EntrySource) -> Result<Recorded> {
    let mut classes: BTreeMap<String, u64> = BTreeMap::new();
    for d in &m.dirs {
        if d.contains('/') {
            return Err(CloudError::invalid(
                format!("entry {d:?}"),
                "nested folder (expected <class>/<image>)",
            ));
        }
        classes.entry(d.clone()).or_default();
    }
    for e in &m.entries {
        let parts: Vec<&str> = e.path.split('/').collect();
        if parts.len() != 2 {
            return Err(bad_entry(
                &e.path,
                "not a <class>/<image> path (images must sit directly in one class folder)",
            ));
        }
        let ext_ok = parts[1]
            .rsplit_once('.')
            .is_some_and(|(_, x)| IMAGE_EXTENSIONS.iter().any(|k| x.eq_ignore_ascii_case(k)));
        if !ext_ok {
            return Err(bad_entry(
                &e.path,
                "not an image (expected .png, .jpg or .jpeg)",
            ));
        }
        classes.entry(parts[0].to_string()).or_default();
    }
    if classes.len() < 2 {
        return Err(CloudError::invalid(
            "classes",
            format!(
                "{} class folder(s); classification needs at least 2",
                classes.len()
            ),
        ));
    }
    if classes.len() > MAX_CLASSES {
        return Err(CloudError::invalid(
            "classes",
            format!("{} classes (at most {MAX_CLASSES})", classes.len()),
        ));
    }
    let mut stats = Stats::default();
    let mut sizes: HashMap<(usize, usize), u64> = HashMap::new();
    let mut any_colour = false;
    for e in &m.entries {
        let bytes = src.read(e)?;
        let (img, colour) = decode_image(&e.path, &bytes)?;
        let (h, w) = (img.height() as usize, img.width() as usize);
        if colour {
            any_colour = true;
            stats.add(img.to_rgb8().as_raw(), 3);
        } else {
            stats.add(img.to_luma8().as_raw(), 1);
        }
        *sizes.entry((h, w)).or_default() += 1;
        let class = e.path.split('/').next().expect("checked above");
        *classes.get_mut(class).expect("class collected above") += 1;
    }
    if let Some((c, _)) = classes.iter().find(|(_, &n)| n == 0) {
        return Err(CloudError::invalid(
            format!("class {c:?}"),
            "empty class (folder holds no image)",
        ));
    }
    let channels = if any_colour { 3 } else { 1 };
    let (mean, std) = stats.finish(channels);
    let min_size = (
        sizes.keys().map(|s| s.0).min().unwrap_or(0),
        sizes.keys().map(|s| s.1).min().unwrap_or(0),
    );
    let max_size = (
        sizes.keys().map(|s| s.0).max().unwrap_or(0),
        sizes.keys().map(|s| s.1).max().unwrap_or(0),
    );
    let common_size = sizes
        .iter()
        .max_by_key(|((h, w), n)| (**n, h * w, *h, *w))
        .map(|(s, _)| *s)
        .unwrap_or((0, 0));
    let num_samples = classes.values().sum();
    let (names, counts) = classes.into_iter().unzip();
    Ok(Recorded {
        summary: DatasetSummary {
            classes: names,
            counts,
            channels,
            min_size,
            max_size,
        },
        num_samples,
        mean,
        std,
        common_size,
    })
}

/// Decodes a PNG or JPEG after checking the dimensions its header claims; returns the image
/// and whether it has colour.
pub fn decode_image(path: &str, bytes: &[u8]) -> Result<(image::DynamicImage, bool)> {
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad_entry(path, format!("cannot read: {e}")))?;
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg) => {}
        _ => return Err(bad_entry(path, "not a PNG or JPEG image")),
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| bad_entry(path, format!("undecodable image header: {e}")))?;
    if w == 0 || h == 0 {
        return Err(bad_entry(path, format!("empty image {w}x{h}")));
    }
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE || w as u64 * h as u64 > MAX_IMAGE_PIXELS {
        return Err(bad_entry(
            path,
            format!(
                "header claims {w}x{h} pixels (at most {MAX_IMAGE_SIDE} per side and \
                 {MAX_IMAGE_PIXELS} in all): refused as a decompression bomb"
            ),
        ));
    }
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad_entry(path, format!("cannot read: {e}")))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 8);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| bad_entry(path, format!("undecodable image: {e}")))?;
    let colour = img.color().has_color();
    Ok((img, colour))
}

/// What an IDX entry name says: split and kind.
enum IdxName {
    Images(String),
    Labels(String),
    Classes,
}

fn idx_name(path: &str) -> Option<IdxName> {
    if path == "classes.txt" {
        return Some(IdxName::Classes);
    }
    let stem = path.strip_suffix(".gz").unwrap_or(path);
    let ok_split = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    if let Some(s) = stem.strip_suffix("-images-idx3-ubyte") {
        return ok_split(s).then(|| IdxName::Images(s.to_string()));
    }
    if let Some(s) = stem.strip_suffix("-labels-idx1-ubyte") {
        return ok_split(s).then(|| IdxName::Labels(s.to_string()));
    }
    None
}

/// Undoes gzip (detected by magic) with a hard cap on the output.
fn gunzip_capped(path: &str, bytes: Vec<u8>) -> Result<Vec<u8>> {
    if bytes.len() < 2 || bytes[..2] != [0x1f, 0x8b] {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes.as_slice())
        .take(MAX_IDX_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| bad_entry(path, format!("corrupt gzip stream: {e}")))?;
    if out.len() as u64 > MAX_IDX_BYTES {
        return Err(bad_entry(
            path,
            format!(
                "decompresses to more than {MAX_IDX_BYTES} bytes: refused as a decompression bomb"
            ),
        ));
    }
    Ok(out)
}

/// An IDX folder: `<split>-images-idx3-ubyte[.gz]` with its `<split>-labels-idx1-ubyte[.gz]`
/// for each split (`train` required), optionally `classes.txt` (one class name per line).
fn idx_folder(m: &Manifest, src: &dyn EntrySource) -> Result<Recorded> {
    if let Some(d) = m.dirs.first() {
        return Err(CloudError::invalid(
            format!("entry {d:?}"),
            "an IDX folder holds no sub-folders",
        ));
    }
    let mut images: BTreeMap<String, &Entry> = BTreeMap::new();
    let mut labels: BTreeMap<String, &Entry> = BTreeMap::new();
    let mut classes_entry = None;
    for e in &m.entries {
        let dup = match idx_name(&e.path) {
            Some(IdxName::Images(s)) => images.insert(s, e).is_some(),
            Some(IdxName::Labels(s)) => labels.insert(s, e).is_some(),
            Some(IdxName::Classes) => classes_entry.replace(e).is_some(),
            None => {
                return Err(bad_entry(
                    &e.path,
                    "not an IDX file (expected <split>-images-idx3-ubyte[.gz], \
                     <split>-labels-idx1-ubyte[.gz] or classes.txt)",
                ))
            }
        };
        if dup {
            return Err(bad_entry(
                &e.path,
                "the same split appears twice (raw and .gz?)",
            ));
        }
    }
    for (s, e) in &images {
        if !labels.contains_key(s) {
            return Err(bad_entry(&e.path, format!("no {s}-labels-idx1-ubyte[.gz]")));
        }
    }
    for (s, e) in &labels {
        if !images.contains_key(s) {
            return Err(bad_entry(&e.path, format!("no {s}-images-idx3-ubyte[.gz]")));
        }
    }
    if !images.contains_key("train") {
        return Err(CloudError::invalid(
            "entries",
            "no train split (train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz])",
        ));
    }
    let names: Option<Vec<String>> = match classes_entry {
        None => None,
        Some(e) => {
            let text = String::from_utf8(src.read(e)?)
                .map_err(|_| bad_entry(&e.path, "not UTF-8 text"))?;
            let names: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            if names.len() < 2 || names.len() > 256 {
                return Err(bad_entry(
                    &e.path,
                    format!("{} class names (2-256 for u8 labels)", names.len()),
                ));
            }
            if let Some(n) = names
                .iter()
                .find(|n| n.len() > 128 || n.chars().any(char::is_control))
            {
                return Err(bad_entry(&e.path, format!("bad class name {n:?}")));
            }
            Some(names)
        }
    };
    let mut shape = None;
    let mut recorded = None;
    for (split, ie) in &images {
        let le = labels[split];
        let img = parse_idx_images(&gunzip_capped(&ie.path, src.read(ie)?)?)
            .map_err(|e| bad_entry(&ie.path, e.to_string()))?;
        let lab = parse_idx_labels(&gunzip_capped(&le.path, src.read(le)?)?)
            .map_err(|e| bad_entry(&le.path, e.to_string()))?;
        if img.count != lab.len() {
            return Err(bad_entry(
                &le.path,
                format!("{} labels for {} images", lab.len(), img.count),
            ));
        }
        if img.count == 0 || img.rows == 0 || img.cols == 0 {
            return Err(bad_entry(&ie.path, "no images"));
        }
        if *shape.get_or_insert((img.rows, img.cols)) != (img.rows, img.cols) {
            return Err(bad_entry(
                &ie.path,
                format!("{}x{} images, other splits differ", img.rows, img.cols),
            ));
        }
        if let Some(n) = &names {
            if let Some(l) = lab.iter().find(|&&l| l as usize >= n.len()) {
                return Err(bad_entry(
                    &le.path,
                    format!("label {l} but classes.txt names {} classes", n.len()),
                ));
            }
        }
        if split != "train" {
            continue;
        }
        let k = names
            .as_ref()
            .map_or(*lab.iter().max().unwrap_or(&0) as usize + 1, Vec::len);
        let mut counts = vec![0u64; k];
        for &l in &lab {
            counts[l as usize] += 1;
        }
        let class_names: Vec<String> = names
            .clone()
            .unwrap_or_else(|| (0..k).map(|i| i.to_string()).collect());
        if k < 2 {
            return Err(bad_entry(
                &le.path,
                "a single class; classification needs 2+",
            ));
        }
        if let Some(i) = counts.iter().position(|&c| c == 0) {
            return Err(CloudError::invalid(
                format!("class {:?}", class_names[i]),
                "empty class (no training image has this label)",
            ));
        }
        let mut stats = Stats::default();
        stats.add(&img.pixels, 1);
        let (mean, std) = stats.finish(1);
        recorded = Some(Recorded {
            summary: DatasetSummary {
                classes: class_names,
                counts,
                channels: 1,
                min_size: (img.rows, img.cols),
                max_size: (img.rows, img.cols),
            },
            num_samples: img.count as u64,
            mean,
            std,
            common_size: (img.rows, img.cols),
        });
    }
    recorded.ok_or_else(|| CloudError::Internal("train split vanished".into()))
}

/// sha256 of `bytes` compared with the entry's; names the entry on mismatch.
pub fn verify_entry(e: &Entry, bytes: &[u8]) -> Result<()> {
    if bytes.len() as u64 != e.size {
        return Err(bad_entry(
            &e.path,
            format!("{} bytes, manifest says {}", bytes.len(), e.size),
        ));
    }
    let got = hex::encode(Sha256::digest(bytes));
    if got != e.sha256 {
        return Err(bad_entry(
            &e.path,
            format!("content hashes to {got}, manifest says {}", e.sha256),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        for ok in ["a/b.png", "class_1/x.jpeg", "train-images-idx3-ubyte.gz"] {
            check_path(ok).unwrap();
        }
        for bad in [
            "",
            "../x",
            "a/../b",
            "/etc/passwd",
            "a\\b",
            "a//b",
            "./a",
            "a/.hidden",
            "C:x",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn stats_mix_grey_into_colour() {
        let mut s = Stats::default();
        s.add(&[0, 255, 0, 255, 0, 255], 3); // two pixels: (0,255,0), (255,0,255)
        s.add(&[255, 255], 1);
        let (m, _) = s.finish(3);
        assert_eq!(m, vec![0.75, 0.75, 0.75]);
    }
}
