//! The training path: the oracle from scratch or fine-tuned, and the elastification of an
//! oracle into a supernet (METHOD.md §1), as resumable, cancellable long runs. The cloud's job
//! runner and CLI drive it; the edge's search bench uses it to build its supernet.
//!
//! # Layout
//! - [`optim`]: SGD (momentum, Nesterov, weight decay) and AdamW over `Var`s with
//!   checkpointable state; linear warm-up + cosine schedule.
//! - [`train`]: trainable modules (variables + BN running statistics), the deterministic
//!   batch sampler, losses and evaluation.
//! - [`oracle`]: [`oracle::train_oracle`], oracle training from scratch or from weights.
//! - [`supernet`]: [`supernet::elastify`], stage 0 (path-level feature distillation) and
//!   stage 1 (CE + KD), with checkpoints and resume.
//! - [`priors`]: accuracy of the oracle and of sampled subnets on a validation split.
//! - [`pipeline`]: the one path dataset → elastify → priors → artifact.
//! - [`progress`] and [`checkpoint`]: where a run reports progress and keeps its checkpoint;
//!   the cloud's job worker implements both traits.
//! - [`error`]: [`TrainError`], the crate's one error type.
//!
//! Determinism: every random draw of step `k` of stage `s` comes from a ChaCha8 stream
//! seeded by `(seed, s, k)` and the data order from `(seed, epoch)`, so a checkpoint only has
//! to record the stage, the step and the sample position; a resumed run ends bit-identical to
//! an uninterrupted one.
pub mod checkpoint;
pub mod error;
pub mod optim;
pub mod oracle;
pub mod pipeline;
pub mod priors;
pub mod progress;
pub mod supernet;
pub mod train;

pub use checkpoint::{CheckpointIo, DirCheckpoints};
pub use error::{Result, TrainError};
pub use oracle::{train_oracle, train_oracle_resumable, OracleReport, TrainOracleConfig};
pub use pipeline::DatasetFormat;
pub use priors::evaluate_priors;
pub use progress::{NoProgress, ProgressEvent, ProgressSink};
pub use progress::{PathRole, SizeLoss, TrainedPath};
pub use supernet::{
    elastify, BranchBn, ElastifyConfig, ElastifyOutcome, ElastifyReport, InplaceDistill,
    StageReport,
};
