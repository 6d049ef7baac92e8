//! IDX reader (the MNIST / Fashion-MNIST container format).
//!
//! Layout: a big-endian header `00 00 <type> <rank>` then `rank` big-endian `u32` dimensions,
//! then the raw data. Only unsigned bytes (type `0x08`) are accepted: images are rank 3
//! (magic 2051 = `0x00000803`), labels rank 1 (magic 2049 = `0x00000801`). Files may be gzipped;
//! compression is detected by the gzip magic bytes `1f 8b`, not by the file name.
//!
//! The parser treats its input as hostile: every read is bounds-checked, sizes use checked
//! arithmetic, and memory is reserved only up to what the input can actually hold (so a header
//! declaring four billion images does not allocate before the length check fails).
use std::io::Read;
use std::path::Path;

use flate2::read::MultiGzDecoder;

use super::Dataset;
use crate::{CoreError, Result};

/// Magic number of an IDX file of u8 images (`[count, rows, cols]`).
pub const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of u8 labels (`[count]`).
pub const IDX_LABELS_MAGIC: u32 = 0x0000_0801;

/// Fashion-MNIST class names, in label order (label `i` is `FASHION_MNIST_CLASSES[i]`).
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Path label used in errors from the bytes-level parsers.
const MEMORY: &str = "<memory>";

/// Deflate cannot expand by more than ~1032:1, which bounds what a gzip stream can hold.
const MAX_DEFLATE_RATIO: usize = 1032;

/// A decoded IDX image file: `count` grey images of `rows x cols`, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    /// `count * rows * cols` pixels, image after image.
    pub pixels: Vec<u8>,
}

/// Parses an IDX image file (raw or gzipped) held in memory. Errors name the path `<memory>`.
pub fn parse_idx_images(bytes: &[u8]) -> Result<IdxImages> {
    images_from_bytes(bytes).map_err(|reason| dataset_err(MEMORY, reason))
}

/// Parses an IDX label file (raw or gzipped) held in memory. Errors name the path `<memory>`.
pub fn parse_idx_labels(bytes: &[u8]) -> Result<Vec<u8>> {
    labels_from_bytes(bytes).map_err(|reason| dataset_err(MEMORY, reason))
}

/// Reads an IDX image file (raw or gzipped).
pub fn read_idx_images(path: impl AsRef<Path>) -> Result<IdxImages> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| CoreError::io(path, e))?;
    images_from_bytes(&bytes).map_err(|reason| dataset_err(path, reason))
}

/// Reads an IDX label file (raw or gzipped).
pub fn read_idx_labels(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| CoreError::io(path, e))?;
    labels_from_bytes(&bytes).map_err(|reason| dataset_err(path, reason))
}

/// Reads an image file and its label file into a 1-channel [`Dataset`].
///
/// `class_names[i]` names label `i`; every label must be below `class_names.len()`. With no
/// names, classes are named `"0"..="max label"`.
pub fn read_idx_pair(
    images: impl AsRef<Path>,
    labels: impl AsRef<Path>,
    class_names: &[&str],
) -> Result<Dataset> {
    let (images_path, labels_path) = (images.as_ref(), labels.as_ref());
    let imgs = read_idx_images(images_path)?;
    let labs = read_idx_labels(labels_path)?;
    if imgs.count != labs.len() {
        return Err(dataset_err(
            labels_path,
            format!(
                "count mismatch: {} labels but {} images in {}",
                labs.len(),
                imgs.count,
                images_path.display()
            ),
        ));
    }
    let class_names: Vec<String> = if class_names.is_empty() {
        let max = labs.iter().copied().max().map_or(0, |m| m as usize + 1);
        (0..max).map(|i| i.to_string()).collect()
    } else {
        class_names.iter().map(|s| s.to_string()).collect()
    };
    if let Some((i, &l)) = labs
        .iter()
        .enumerate()
        .find(|&(_, &l)| l as usize >= class_names.len())
    {
        return Err(dataset_err(
            labels_path,
            format!(
                "label {l} at index {i} is out of range for {} classes",
                class_names.len()
            ),
        ));
    }
    Ok(Dataset {
        images: imgs.pixels,
        labels: labs.into_iter().map(u32::from).collect(),
        channels: 1,
        height: imgs.rows,
        width: imgs.cols,
        class_names,
    })
}

/// Loads Fashion-MNIST's train (60,000) or test (10,000) split from `dir`, which holds the
/// four files `{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz` (the `.gz` suffix may be absent
/// when the files were unpacked).
pub fn fashion_mnist(dir: impl AsRef<Path>, train: bool) -> Result<Dataset> {
    let dir = dir.as_ref();
    let prefix = if train { "train" } else { "t10k" };
    let find = |stem: String| {
        let gz = dir.join(format!("{stem}.gz"));
        let raw = dir.join(&stem);
        if !gz.exists() && raw.exists() {
            raw
        } else {
            gz
        }
    };
    read_idx_pair(
        find(format!("{prefix}-images-idx3-ubyte")),
        find(format!("{prefix}-labels-idx1-ubyte")),
        &FASHION_MNIST_CLASSES,
    )
}

fn dataset_err(path: impl AsRef<Path>, reason: String) -> CoreError {
    CoreError::Dataset {
        path: path.as_ref().display().to_string(),
        reason,
    }
}

fn images_from_bytes(bytes: &[u8]) -> std::result::Result<IdxImages, String> {
    let (dims, pixels) = parse(bytes, IDX_IMAGES_MAGIC)?;
    let (count, rows, cols) = (dims[0], dims[1], dims[2]);
    if rows == 0 || cols == 0 {
        return Err(format!("images have zero size {rows}x{cols}"));
    }
    Ok(IdxImages {
        count,
        rows,
        cols,
        pixels,
    })
}

fn labels_from_bytes(bytes: &[u8]) -> std::result::Result<Vec<u8>, String> {
    Ok(parse(bytes, IDX_LABELS_MAGIC)?.1)
}

/// Decodes the header and data of an IDX file whose magic must be `want`.
fn parse(bytes: &[u8], want: u32) -> std::result::Result<(Vec<usize>, Vec<u8>), String> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let cap = bytes.len().saturating_mul(MAX_DEFLATE_RATIO);
        parse_stream(&mut MultiGzDecoder::new(bytes), want, cap)
            .map_err(|e| format!("{e} (gzip-compressed file)"))
    } else {
        parse_stream(&mut &bytes[..], want, bytes.len())
    }
}

/// `capacity_bound` is the most data bytes the stream can possibly yield; it caps the up-front
/// reservation so hostile headers cannot force a large allocation.
fn parse_stream(
    r: &mut impl Read,
    want: u32,
    capacity_bound: usize,
) -> std::result::Result<(Vec<usize>, Vec<u8>), String> {
    let magic = read_u32(r).map_err(|e| format!("reading magic number: {e}"))?;
    if magic != want {
        let what = match magic {
            IDX_IMAGES_MAGIC => " (an IDX image file)".to_string(),
            IDX_LABELS_MAGIC => " (an IDX label file)".to_string(),
            m if m >> 16 == 0 && (m >> 8) & 0xff != 0x08 => {
                format!(
                    " (IDX element type 0x{:02x}; only u8 is supported)",
                    (m >> 8) & 0xff
                )
            }
            _ => String::new(),
        };
        return Err(format!(
            "bad magic number {magic} (0x{magic:08x}){what}, expected {want} (0x{want:08x})"
        ));
    }
    let rank = (want & 0xff) as usize;
    let mut dims = Vec::with_capacity(rank);
    for d in 0..rank {
        let v = read_u32(r).map_err(|e| format!("truncated header reading dimension {d}: {e}"))?;
        dims.push(v as usize);
    }
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("declared dimensions {dims:?} overflow"))?;
    let mut data = Vec::with_capacity(expected.min(capacity_bound));
    // One extra byte detects trailing garbage without reading an unbounded tail.
    r.take(expected as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("reading data: {e}"))?;
    if data.len() < expected {
        return Err(format!(
            "truncated: header declares dimensions {dims:?} ({expected} data bytes) but only {} \
             follow",
            data.len()
        ));
    }
    if data.len() > expected {
        return Err(format!(
            "trailing bytes after the {expected} data bytes declared by dimensions {dims:?}"
        ));
    }
    Ok((dims, data))
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
