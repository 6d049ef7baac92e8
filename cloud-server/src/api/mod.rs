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
//! - `watch`: the one poller shared by every `WatchJob` stream.
pub mod admin;
pub mod convert;
pub mod dashboard;
pub mod developer;
pub mod device;
pub mod watch;

use std::pin::Pin;

use futures::Stream;

use crate::app::App;
use crate::auth::{authorize_management, Access, Principal};
use crate::error::Result;

/// The stream type of server-streaming methods.
pub type ServerStream<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;

/// Authenticates a management call and checks its access level.
pub(crate) async fn management(
    app: &App,
    md: &tonic::metadata::MetadataMap,
    access: Access,
) -> Result<Principal> {
    let p = app.auth().authenticate(md).await?;
    authorize_management(&p, access)?;
    Ok(p)
}
