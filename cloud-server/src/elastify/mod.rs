//! The cloud's side of training: the job bodies a worker runs and the local CLI, over the
//! training path of `adaptivenet-train` (optimizers, oracle training, the elastification
//! stages, priors, checkpoints).
//!
//! # Layout
//! - [`params`]: a job's `params_json`, parsed and range-checked (keys named in errors).
//! - [`fit`]: whether a dataset fits an oracle (channels, classes, input vs strides).
//! - [`runner`]: the elastification job body, checkpoints in the blob store.
//! - [`train_job`]: the oracle-training job body (from scratch or fine-tuned with a new
//!   head), registered by the worker as a new oracle.
//! - [`cli`]: `clap` argument structs and `run_*` entry points with a progress bar.
pub mod cli;
pub mod fit;
pub mod params;
pub mod runner;
pub mod train_job;

pub use cli::{run_elastify, run_train_oracle, ElastifyArgs, TrainOracleArgs};
