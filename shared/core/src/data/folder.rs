//! ImageFolder reader: `root/<class>/<image>.{png,jpg,jpeg}`, the torchvision layout.
//!
//! Class sub-folders sorted by name give the class indices; images inside a class are read in
//! file-name order, so the resulting [`Dataset`] is the same on every machine.
use std::path::{Path, PathBuf};

use image::DynamicImage;

use super::transform::{hwc_to_chw, resize_bilinear_u8};
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
    let root = root.as_ref();
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

    let channels = match opts.color {
        ColorMode::Rgb => 3,
        ColorMode::Grey => 1,
    };
    let mut shape: Option<(usize, usize)> = opts.size;
    if let Some((h, w)) = shape {
        if h == 0 || w == 0 {
            return Err(CoreError::InvalidConfig {
                field: "size".into(),
                reason: format!("zero image size {h}x{w}"),
            });
        }
    }
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for (label, (_, dir)) in classes.iter().enumerate() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| CoreError::io(dir, e))? {
            let path = entry.map_err(|e| CoreError::io(dir, e))?.path();
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
                dir,
                "class folder holds no .png/.jpg/.jpeg image",
            ));
        }
        files.sort();
        for file in files {
            let img = decode_image(&file)?;
            let (w, h) = (img.width() as usize, img.height() as usize);
            let hwc = match opts.color {
                ColorMode::Rgb => img.to_rgb8().into_raw(),
                ColorMode::Grey => img.to_luma8().into_raw(),
            };
            let chw = hwc_to_chw(&hwc, channels, h, w);
            let (th, tw) = *shape.get_or_insert((h, w));
            if (th, tw) == (h, w) {
                images.extend_from_slice(&chw);
            } else if opts.size.is_some() {
                images.extend(resize_bilinear_u8(&chw, channels, h, w, th, tw));
            } else {
                return Err(dataset_err(
                    &file,
                    format!(
                        "image is {h}x{w} but earlier images are {th}x{tw}; set a size to resize"
                    ),
                ));
            }
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

/// Decodes an image file, guessing the format from its content; errors name the file.
pub(crate) fn decode_image(path: &Path) -> Result<DynamicImage> {
    image::ImageReader::open(path)
        .map_err(|e| CoreError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| CoreError::io(path, e))?
        .decode()
        .map_err(|e| dataset_err(path, format!("cannot decode image: {e}")))
}

fn dataset_err(path: impl AsRef<Path>, reason: impl Into<String>) -> CoreError {
    CoreError::Dataset {
        path: path.as_ref().display().to_string(),
        reason: reason.into(),
    }
}
