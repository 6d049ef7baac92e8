//! Staged rollouts: a fleet moves from supernet A to supernet B in cohort steps, each held
//! for a window and then judged by metric gates against the devices still on A.
//!
//! Invariants:
//! - **Cohorts are a pure function** of (steps, step index, device id, device class): a
//!   device's bucket is a hash of its id, so assignment needs no table, survives restarts and
//!   is the same on every API replica. Cohorts only grow with the step index.
//! - **The database holds all rollout state** (`store::rollouts`); the engine keeps none
//!   between ticks, so a restart or another replica continues where the last one stopped.
//!   Decisions are made by whichever replica holds the rollout's lease, and every state change
//!   is fenced by that lease and the expected state and step.
//! - **Gates respect the privacy floor**: a class is compared only when both sides have at
//!   least k devices (`Config::min_group_devices`); smaller groups are recorded as not
//!   compared, never as a pass or fail on a single device's numbers.
//! - **A device never runs a version its fleet did not choose**: while a rollout is active a
//!   device outside the cohort is pinned to A (not to the fleet's label), one inside to B.
pub mod engine;

/// The model (types, cohorts, the judge) lives below the store, which persists it.
pub use crate::domain::rollout::*;
