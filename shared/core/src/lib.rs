//! adaptivenet model core: everything both the cloud and the edge need to reason about models.
//!
//! # Layout
//! - [`error`]: the crate's one error enum.
//! - [`weights`]: weight-file readers (safetensors, PyTorch zip `.pth`, legacy non-zip `.pth`).
//! - [`data`]: data-set readers (IDX, ImageFolder), splits and preprocessing.
//! - [`model`]: oracle families (ResNet, small-input ResNet, MobileNetV2, EfficientNet-Lite) as
//!   a stem / chain of blocks / head, with import from family key names.
//! - [`supernet`]: supernet IR, branch construction, subnet codes, counting and sampling.
//! - [`artifact`]: the versioned supernet manifest and content-addressed module blobs.
//! - [`persist`]: atomic writes, sha256 and safetensors bytes (a leaf: imports no other
//!   module of the crate but `error`).
//!
//! Architecture invariant: no network, no database, no async runtime; pure functions of files
//! and tensors.
pub mod artifact;
pub mod data;
pub mod error;
pub mod model;
pub mod persist;
pub mod supernet;
pub mod weights;

pub use error::{CoreError, Result};
pub mod assets;
pub use assets::assets_dir;
