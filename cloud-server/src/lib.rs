//! adaptivenet cloud server: oracle registry, elastification job queue, supernet hosting and
//! fleet management over gRPC.
//!
//! # Layout
//! - [`error`]: the crate's one error enum and the table mapping it to gRPC status codes.
//! - [`domain`]: domain types and request-independent validation (reports, names, codes);
//!   `domain::rollout`, the rollout model the store persists.
//! - [`store`]: sqlx persistence, one code path for SQLite (WAL) and PostgreSQL; migrations.
//! - [`blobs`]: content-addressed blob store with atomic writes and ranged reads.
//! - [`datasets`]: dataset upload, registration, validation and materialisation for workers.
//! - [`gc`]: garbage collection of blobs no row or dataset manifest references.
//! - [`validate`]: the one function that accepts or rejects an uploaded oracle.
//! - [`auth`]: tokens (hashed at rest), authentication and per-API authorisation rules.
//! - [`jobs`]: the [`jobs::JobRunner`] plug-in and the leasing worker loop.
//! - [`rollout`]: staged rollouts: cohorts, gates and the engine that promotes or rolls back.
//! - [`app`]: shared state, configuration and the domain operations services call.
//! - [`api`]: the gRPC services; the only module that sees prost types.
//! - [`ops`]: metrics, load shedding and the metrics endpoint.
//! - [`server`]: assembling services, health, reflection, background tasks and shutdown.
//! - [`web`]: the read-only operator console (`serve --web-listen`), assets embedded.
//!
//! Architecture invariants: prost types never leave `api`; every domain failure becomes a
//! status code through [`error::CloudError::code`] only; no upload, blob or checkpoint is
//! visible before it is complete and verified; a device reads only what its fleet is
//! assigned and reports only the closed aggregate schema.
pub mod api;
pub mod app;
pub mod auth;
pub mod blobs;
pub mod datasets;
pub mod domain;
pub mod elastify;
pub mod error;
pub mod gc;
pub mod jobs;
pub mod ops;
pub mod rollout;
pub mod server;
pub mod store;
pub mod validate;
pub mod web;

pub use app::{App, Config};
pub use error::{CloudError, Result};
