//! The gRPC service layer: the only module that sees prost types. Each method authenticates,
//! authorises, converts the request into domain values (naming the offending field on
//! failure), calls the store / app, and converts the result back.
//!
//! # Layout
//! - `convert`: domain <-> wire conversions, one function per type.
//! - `developer`: `DeveloperService` (oracles, datasets, jobs, supernets, publishing).
//! - `device`: `DeviceService` (enroll, desired state, manifest, blobs, heartbeat, report).
//! - `dashboard`: `DashboardService` (read-only views, aggregates, fleet watch).
//! - `admin`: `AdminService` (fleets, tokens, revocation).
//! - `rollout`: the rollout methods (start, read, pause/resume/abort, watch).
//! - `train`: `StartOracleTraining`'s checks (the developer service delegates to it).
//! - `watch`: the one poller shared by every `WatchJob` stream.
pub mod admin;
pub mod convert;
pub mod dashboard;
pub mod developer;
pub mod device;
pub mod rollout;
mod train;
pub mod watch;

use std::pin::Pin;

use futures::Stream;

use crate::app::App;
use crate::auth::{authorize_fleet, authorize_management, authorize_unscoped, Access, Principal};
use crate::error::Result;
use uuid::Uuid;

/// Largest accepted architecture descriptor (uploads and `StartOracleTraining`).
pub const MAX_ARCH_JSON: usize = 1 << 20;

/// The stream type of server-streaming methods.
pub type ServerStream<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;

/// Authenticates a management call that is not about one fleet and checks its access
/// level; fleet-scoped tokens are refused (the safe default for every method).
pub(crate) async fn management(
    app: &App,
    md: &tonic::metadata::MetadataMap,
    access: Access,
) -> Result<Principal> {
    let p = app.auth().authenticate(md).await?;
    authorize_management(&p, access)?;
    authorize_unscoped(&p)?;
    Ok(p)
}

/// Authenticates a management call about the fleet `fleet` parses from the request (None:
/// every fleet), then checks its access level and the token's fleet scope. The request is
/// parsed only after authentication, so an anonymous caller learns nothing from it. Returns
/// the principal and the fleet filter to apply (a fleet-scoped token's query over every
/// fleet is narrowed to its fleet).
pub(crate) async fn management_fleet(
    app: &App,
    md: &tonic::metadata::MetadataMap,
    access: Access,
    fleet: impl FnOnce() -> Result<Option<Uuid>>,
) -> Result<(Principal, Option<Uuid>)> {
    let p = app.auth().authenticate(md).await?;
    authorize_management(&p, access)?;
    let fleet = authorize_fleet(&p, fleet()?)?;
    Ok((p, fleet))
}

/// [`management_fleet`] for a call about exactly one fleet (publishing, desired state).
pub(crate) async fn management_one_fleet(
    app: &App,
    md: &tonic::metadata::MetadataMap,
    access: Access,
    fleet: impl FnOnce() -> Result<Uuid>,
) -> Result<(Principal, Uuid)> {
    let p = app.auth().authenticate(md).await?;
    authorize_management(&p, access)?;
    let f = fleet()?;
    authorize_fleet(&p, Some(f))?;
    Ok((p, f))
}

/// Authenticates a read of the supernet catalogue, which every management token may read
/// (a fleet-scoped developer picks from it what to publish to its fleet).
pub(crate) async fn management_catalogue(
    app: &App,
    md: &tonic::metadata::MetadataMap,
) -> Result<Principal> {
    let p = app.auth().authenticate(md).await?;
    authorize_management(&p, Access::Read)?;
    Ok(p)
}
