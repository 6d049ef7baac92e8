//! ImageFolder reader: `root/<class>/<image>.{png,jpg,jpeg}`, the torchvision layout.
//!
//! Class sub-folders sorted by name give the class indices; images inside a class are read in
//! file-name order, so the resulting [`Dataset`] is the same on every machine.
use std::path::{Path, PathBuf};

use super::pixels::{decode_image, hwc_to_chw, resize_bilinear_u8};
use super::spec::InputSpec;
use super::Dataset;
use crate::{CoreError, Result};

/// Colour handling of [`read_image_folder`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ColorMode {
    /// Three channels; grey images are replicated.
    #[default]
    Rgb,
    /// One luma channel; colour images are converted.
    Grey,
}

/// Options of [`read_image_folder`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImageFolderOptions {
    pub color: ColorMode,
    /// Bilinear resize of every image to `(height, width)`. Without it all images must already
    /// share one size (a [`Dataset`] holds one image shape).
    pub size: Option<(usize, usize)>,
}

/// File extensions read as images (case-insensitive); other files are ignored.
const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Reads a directory of class sub-folders of PNG/JPEG images into a [`Dataset`].
///
/// Errors (all [`CoreError::Dataset`] naming the offending path): `root` has no class
/// sub-folders, a class folder holds no image, an image cannot be decoded, or (without
/// `opts.size`) an image's size differs from the first image's.
pub fn read_image_folder(root: impl AsRef<Path>, opts: &ImageFolderOptions) -> Result<Dataset> {
    if let Some((h, w)) = opts.size {
        if h == 0 || w == 0 {
            return Err(CoreError::InvalidConfig {
                field: "size".into(),
                reason: format!("zero image size {h}x{w}"),
            });
        }
    }
    let mut shape: Option<(usize, usize)> = opts.size;
    read_folder(root.as_ref(), opts.color, |file, chw, channels, h, w| {
        let (th, tw) = *shape.get_or_insert((h, w));
        if (th, tw) == (h, w) {
            Ok(((th, tw), chw))
        } else if opts.size.is_some() {
            Ok(((th, tw), resize_bilinear_u8(&chw, channels, h, w, th, tw)))
        } else {
            Err(dataset_err(
                file,
                format!("image is {h}x{w} but earlier images are {th}x{tw}; set a size to resize"),
            ))
        }
    })
}

/// Reads an ImageFolder tree straight into `spec`'s shape: images decoded as grey or RGB per
/// `spec.channels`, each of any size brought to the input size by `spec.resize`.
pub fn read_image_folder_for(root: impl AsRef<Path>, spec: &InputSpec) -> Result<Dataset> {
    spec.validate()?;
    let color = if spec.channels == 1 {
        ColorMode::Grey
    } else {
        ColorMode::Rgb
    };
    read_folder(root.as_ref(), color, |_, chw, channels, h, w| {
        Ok((
            (spec.height, spec.width),
            spec.conform_image(&chw, (channels, h, w)),
        ))
    })
}

/// The class folders of `root` (sorted) and their image files (sorted).
fn list_classes(root: &Path) -> Result<Vec<(String, Vec<PathBuf>)>> {
    let mut classes: Vec<(String, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(root).map_err(|e| CoreError::io(root, e))? {
        let entry = entry.map_err(|e| CoreError::io(root, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() && !name.starts_with('.') {
            classes.push((name, path));
        }
    }
    if classes.is_empty() {
        return Err(dataset_err(
            root,
            "no class sub-folders (expected root/<class>/<image>.png|jpg)",
        ));
    }
    classes.sort();
    let mut out = Vec::with_capacity(classes.len());
    for (name, dir) in classes {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| CoreError::io(&dir, e))? {
            let path = entry.map_err(|e| CoreError::io(&dir, e))?.path();
            let is_image = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)));
            if is_image && path.is_file() {
                files.push(path);
            }
        }
        if files.is_empty() {
            return Err(dataset_err(
                &dir,
                "class folder holds no .png/.jpg/.jpeg image",
            ));
        }
        files.sort();
        out.push((name, files));
    }
    Ok(out)
}

/// Decodes every image of the tree in `color` and lets `place` turn its CHW pixels
/// (`channels x h x w`) into the dataset's `(height, width)` and pixels.
fn read_folder(
    root: &Path,
    color: ColorMode,
    mut place: impl FnMut(&Path, Vec<u8>, usize, usize, usize) -> Result<((usize, usize), Vec<u8>)>,
) -> Result<Dataset> {
    let classes = list_classes(root)?;
    let channels = match color {
        ColorMode::Rgb => 3,
        ColorMode::Grey => 1,
    };
    let mut shape = None;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for (label, (_, files)) in classes.iter().enumerate() {
        for file in files {
            let img = decode_image(file)?;
            let (w, h) = (img.width() as usize, img.height() as usize);
            let hwc = match color {
                ColorMode::Rgb => img.to_rgb8().into_raw(),
                ColorMode::Grey => img.to_luma8().into_raw(),
            };
            let (size, px) = place(file, hwc_to_chw(&hwc, channels, h, w), channels, h, w)?;
            shape.get_or_insert(size);
            images.extend(px);
            labels.push(label as u32);
        }
    }
    let (height, width) = shape.unwrap_or((0, 0));
    Ok(Dataset {
        images,
        labels,
        channels,
        height,
        width,
        class_names: classes.into_iter().map(|(n, _)| n).collect(),
    })
}

fn dataset_err(path: impl AsRef<Path>, reason: impl Into<String>) -> CoreError {
    CoreError::Dataset {
        path: path.as_ref().display().to_string(),
        reason: reason.into(),
    }
}
