//! `AdminService` (role admin only).
use std::time::Duration;

use adaptivenet_proto::v1 as pb;
use adaptivenet_proto::v1::admin_service_server::AdminService;
use tonic::{Request, Response, Status};

use super::{convert, management};
use crate::app::App;
use crate::auth::Access;
use crate::domain::{check_name, parse_id, Role};
use crate::error::CloudError;

/// Implements `AdminService` over an [`App`].
#[derive(Clone, Debug)]
pub struct AdminApi {
    app: App,
}

impl AdminApi {
    pub fn new(app: App) -> Self {
        AdminApi { app }
    }
}

fn ttl(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_fleet(
        &self,
        req: Request<pb::CreateFleetRequest>,
    ) -> Result<Response<pb::Fleet>, Status> {
        management(&self.app, req.metadata(), Access::Admin).await?;
        check_name("name", &req.get_ref().name)?;
        let f = self.app.store().create_fleet(&req.get_ref().name).await?;
        Ok(Response::new(convert::fleet(&f)))
    }

    async fn create_enrollment_token(
        &self,
        req: Request<pb::CreateEnrollmentTokenRequest>,
    ) -> Result<Response<pb::CreateEnrollmentTokenResponse>, Status> {
        management(&self.app, req.metadata(), Access::Admin).await?;
        let r = req.into_inner();
        let fleet = parse_id("fleet_id", &r.fleet_id)?;
        let uses = if r.uses == 0 { 1 } else { r.uses };
        let t = self
            .app
            .create_enrollment_token(fleet, uses, ttl(r.ttl_seconds))
            .await?;
        Ok(Response::new(pb::CreateEnrollmentTokenResponse {
            token_id: t.id.to_string(),
            token: t.token,
            expires_unix_ms: t.expires_ms.unwrap_or(0),
        }))
    }

    async fn revoke_enrollment_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        management(&self.app, req.metadata(), Access::Admin).await?;
        let id = parse_id("token_id", &req.get_ref().token_id)?;
        self.app.store().revoke_enrollment_token(id).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn create_api_token(
        &self,
        req: Request<pb::CreateApiTokenRequest>,
    ) -> Result<Response<pb::CreateApiTokenResponse>, Status> {
        management(&self.app, req.metadata(), Access::Admin).await?;
        let r = req.into_inner();
        let role = match pb::Role::try_from(r.role) {
            Ok(pb::Role::Admin) => Role::Admin,
            Ok(pb::Role::Developer) => Role::Developer,
            Ok(pb::Role::Viewer) => Role::Viewer,
            _ => {
                return Err(
                    CloudError::invalid("role", "must be admin, developer or viewer").into(),
                )
            }
        };
        if r.description.len() > 256 {
            return Err(CloudError::invalid("description", "longer than 256 characters").into());
        }
        let fleet = if r.fleet_id.is_empty() {
            None
        } else {
            Some(parse_id("fleet_id", &r.fleet_id)?)
        };
        let t = self
            .app
            .create_fleet_api_token(role, &r.description, ttl(r.ttl_seconds), fleet)
            .await?;
        Ok(Response::new(pb::CreateApiTokenResponse {
            token_id: t.id.to_string(),
            token: t.token,
            expires_unix_ms: t.expires_ms.unwrap_or(0),
        }))
    }

    async fn revoke_api_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        management(&self.app, req.metadata(), Access::Admin).await?;
        let id = parse_id("token_id", &req.get_ref().token_id)?;
        self.app.revoke_api_token(id).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn revoke_device(
        &self,
        req: Request<pb::RevokeDeviceRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        management(&self.app, req.metadata(), Access::Admin).await?;
        let id = parse_id("device_id", &req.get_ref().device_id)?;
        self.app.revoke_device(id).await?;
        Ok(Response::new(pb::Empty {}))
    }
}
