//! adaptivenet edge agent: profile the device, search the supernet on local data, serve the
//! chosen subnet and keep adapting it (METHOD.md §2-3).
//!
//! # Layout
//! - [`error`]: [`EdgeError`], the library's one error enum.
//! - [`profile`]: per-module latency table (median, p95, conditions), its validation against
//!   end-to-end measurements and a constant calibration factor.
//! - [`quality`]: local evaluation data (stem outputs cached once), labelled accuracy and
//!   label-free agreement with the oracle.
//! - [`search`]: evolutionary search with the four speed-ups (stem caching, latency-guided
//!   initial population, latency-preserving mutation, shared-prefix reuse), Pareto front and
//!   best subnet per budget; plain-EA mode for comparison.
//! - [`serve`]: the active subnet behind an atomic swap that loads only differing modules.
//! - [`adapt`]: the hysteresis controller and the maintenance loop over live latency, drift
//!   detection, the plan (profile + search) and the timeline.
//! - [`agent`]: the runtime: one [`agent::Agent`] and its background tasks (maintenance,
//!   drift re-plan, heartbeat and report, re-sync, replay) under one cancellation token.
//! - [`state`]: atomic persistence of table, search result and active subnet.
//! - [`client`]: the cloud client (enrollment, resumable supernet sync, aggregate reports).
//! - [`plot`]: SVG plots of the persisted state (Pareto front, adaptation timeline).
//! - [`evaluate`]: the plan checked against the labels of local data, on the device (the
//!   chosen subnet as served, the oracle, the front's best by labels); never reported.
//!
//! Architecture invariants: local data never leaves this crate's process (only [`client`]
//! does network I/O, and it sends aggregates only);
//! every subnet returned by search is valid and within budget per the table;
//! timing-dependent logic is driven by injected samples in tests, never by wall-clock limits.
pub mod adapt;
pub mod agent;
pub mod client;
pub mod error;
pub mod evaluate;
pub mod plot;
pub mod profile;
pub mod quality;
pub mod search;
pub mod serve;
pub mod state;

pub use error::{EdgeError, Result};
