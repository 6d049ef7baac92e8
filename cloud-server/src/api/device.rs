//! `DeviceService`. Devices authenticate with their credential and are confined to their
//! fleet: a manifest or blob not assigned to the fleet is PERMISSION_DENIED.
use adaptivenet_proto::v1 as pb;
use adaptivenet_proto::v1::device_service_server::DeviceService;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{convert, ServerStream};
use crate::app::App;
use crate::auth::authorize_device;
use crate::blobs::BlobStore;
use crate::domain::{
    check_sha256, check_version_string, now_ms, parse_id, AdaptationReason, DeviceClass,
    FleetEventKind, Heartbeat, InstallFailure, LatencyTableSummary, Report, SearchStats,
    ServingReason,
};
use crate::error::CloudError;
use crate::ops::metrics::Metrics;

/// Default download chunk: 1 MiB keeps per-message overhead low (loopback throughput) while
/// an aborted download wastes at most about one chunk (what HTTP/2 had in flight).
pub const DEFAULT_CHUNK: usize = 1 << 20;
/// Largest download chunk (leaves room under the 4 MiB message limit).
pub const MAX_DOWNLOAD_CHUNK: usize = (4 << 20) - 4096;

/// Implements `DeviceService` over an [`App`].
#[derive(Clone, Debug)]
pub struct DeviceApi {
    app: App,
}

impl DeviceApi {
    pub fn new(app: App) -> Self {
        DeviceApi { app }
    }

    async fn device(&self, md: &tonic::metadata::MetadataMap) -> Result<(Uuid, Uuid), CloudError> {
        let p = self.app.auth().authenticate(md).await?;
        authorize_device(&p)
    }
}

/// Wire report -> domain report (field names as on the wire).
pub fn report_from_pb(r: &pb::ReportRequest) -> Result<Report, CloudError> {
    let s = r.search.unwrap_or_default();
    let t = r.latency_table.unwrap_or_default();
    Ok(Report {
        supernet_id: parse_id("supernet_id", &r.supernet_id)?,
        active_subnet: r.active_subnet.clone(),
        latency_p50_ms: r.latency_p50_ms,
        latency_p95_ms: r.latency_p95_ms,
        latency_budget_ms: r.latency_budget_ms,
        quality_estimate: r.quality_estimate,
        quality_sample_count: r.quality_sample_count,
        search: SearchStats {
            generations: s.generations,
            evaluated_subnets: s.evaluated_subnets,
            search_seconds: s.search_seconds,
            front_size: s.front_size,
        },
        latency_table: LatencyTableSummary {
            num_entries: t.num_entries,
            stem_ms: t.stem_ms,
            head_ms: t.head_ms,
            oracle_ms: t.oracle_ms,
            calibration_factor: t.calibration_factor,
        },
        device_class: DeviceClass::new("device_class", r.device_class)?,
    })
}

#[tonic::async_trait]
impl DeviceService for DeviceApi {
    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let r = req.into_inner();
        if r.enrollment_token.is_empty() {
            return Err(CloudError::Unauthenticated("enrollment_token is required".into()).into());
        }
        // 0 (unset) enrolls as unspecified; the token is what decides (in `App::enroll`).
        let class = DeviceClass::new("device_class", r.device_class)?;
        check_version_string("agent_version", &r.agent_version)?;
        let e = self
            .app
            .enroll(&r.enrollment_token, class, &r.agent_version)
            .await?;
        Metrics::inc(&self.app.metrics().enrollments_total);
        Ok(Response::new(pb::EnrollResponse {
            device_id: e.device_id.to_string(),
            fleet_id: e.fleet_id.to_string(),
            device_credential: e.credential,
            credential_expires_unix_ms: e.expires_ms.unwrap_or(0),
            min_quality_samples: self.app.config().min_report_samples,
        }))
    }

    async fn get_desired_state(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::DesiredState>, Status> {
        let (device, fleet) = self.device(req.metadata()).await?;
        let d = self
            .app
            .store()
            .desired_state_for_device(fleet, device)
            .await?;
        Ok(Response::new(convert::desired(&d)))
    }

    async fn get_manifest(
        &self,
        req: Request<pb::GetManifestRequest>,
    ) -> Result<Response<pb::GetManifestResponse>, Status> {
        let (_, fleet) = self.device(req.metadata()).await?;
        let id = parse_id("supernet_id", &req.get_ref().supernet_id)?;
        let store = self.app.store();
        store.get_supernet(id).await?;
        if !store.fleet_has_supernet(fleet, id).await? {
            return Err(CloudError::PermissionDenied(format!(
                "supernet {id} is not assigned to this device's fleet"
            ))
            .into());
        }
        let (s, manifest, blobs) = store.get_supernet_full(id).await?;
        Ok(Response::new(pb::GetManifestResponse {
            supernet: Some(convert::supernet(&s)),
            manifest_json: manifest.into_bytes(),
            blobs: blobs.iter().map(convert::blob_ref).collect(),
        }))
    }

    type DownloadBlobStream = ServerStream<pb::BlobChunk>;

    async fn download_blob(
        &self,
        req: Request<pb::DownloadBlobRequest>,
    ) -> Result<Response<Self::DownloadBlobStream>, Status> {
        let (_, fleet) = self.device(req.metadata()).await?;
        let r = req.into_inner();
        check_sha256("sha256", &r.sha256)?;
        let size = self
            .app
            .store()
            .fleet_blob_size(fleet, &r.sha256)
            .await?
            .ok_or_else(|| {
                CloudError::PermissionDenied(format!(
                    "blob {} is not assigned to this device's fleet",
                    r.sha256
                ))
            })?;
        if r.offset > size {
            return Err(CloudError::invalid(
                "offset",
                format!("{} is beyond the blob size {size}", r.offset),
            )
            .into());
        }
        let chunk = match r.chunk_size as usize {
            0 => DEFAULT_CHUNK,
            n => n.min(MAX_DOWNLOAD_CHUNK),
        };
        let (mut file, total) = self.app.blobs().open_at(&r.sha256, r.offset).await?;
        // One chunk read ahead: enough to overlap disk reads with sending, and little to
        // throw away when the client aborts (resume re-sends at most what was in flight).
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let app = self.app.clone();
        let sha = r.sha256;
        let mut offset = r.offset;
        tokio::spawn(async move {
            loop {
                let data = tokio::select! {
                    _ = app.shutdown_token().cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("server shutting down; resume from the last offset"))).await;
                        return;
                    }
                    d = BlobStore::read_chunk(&mut file, chunk) => d,
                };
                let data = match data {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                let n = data.len() as u64;
                let last = offset + n >= total;
                let msg = pb::BlobChunk {
                    offset,
                    data,
                    total_size: total,
                    last,
                    sha256: if last { sha.clone() } else { String::new() },
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
                offset += n;
                if last || n == 0 {
                    return;
                }
            }
        });
        // Counted when the HTTP/2 layer takes a chunk (it asks for the next one only once
        // the previous one got flow-control capacity), not when it is read ahead.
        let app = self.app.clone();
        let counted = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            move |m: Result<pb::BlobChunk, Status>| {
                if let Ok(c) = &m {
                    app.metrics()
                        .blob_bytes_sent_total
                        .fetch_add(c.data.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                m
            },
        );
        Ok(Response::new(Box::pin(counted)))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let (device, fleet) = self.device(req.metadata()).await?;
        let r = req.into_inner();
        let mut hb = Heartbeat {
            agent_version: r.agent_version,
            active_supernet_id: if r.active_supernet_id.is_empty() {
                None
            } else {
                Some(parse_id("active_supernet_id", &r.active_supernet_id)?)
            },
            active_subnet: r.active_subnet,
            latency_p50_ms: r.latency_p50_ms,
            latency_p95_ms: r.latency_p95_ms,
            last_reason: AdaptationReason::new("last_adaptation_reason", r.last_adaptation_reason)?,
            applied_generation: r.applied_generation,
            serving_reason: ServingReason::new("serving_reason", r.serving_reason)?,
            failed_supernet_id: if r.failed_supernet_id.is_empty() {
                None
            } else {
                Some(parse_id("failed_supernet_id", &r.failed_supernet_id)?)
            },
            install_failure: InstallFailure::new("install_failure", r.install_failure)?,
            agent_started_ms: r.agent_started_unix_ms,
        };
        hb.validate()?;
        // A supernet the fleet is not assigned is not recorded (nor shown on dashboards):
        // the heartbeat still counts, so an agent that runs a just-unassigned version keeps
        // learning the desired generation and moves on.
        let mut ignored = false;
        if let Some(s) = hb.active_supernet_id {
            if !self.app.store().fleet_has_supernet(fleet, s).await? {
                hb.active_supernet_id = None;
                hb.active_subnet.clear();
                ignored = true;
            }
        }
        let Some(generation) = self.app.store().heartbeat(device, &hb, now_ms()).await? else {
            return Err(CloudError::Unauthenticated("device revoked".into()).into());
        };
        self.app.emit_fleet(
            FleetEventKind::DeviceHeartbeat,
            fleet,
            Some(device),
            hb.active_supernet_id,
        );
        Ok(Response::new(pb::HeartbeatResponse {
            desired_generation: generation,
            heartbeat_interval_ms: self.app.config().heartbeat_interval.as_millis() as u32,
            min_quality_samples: self.app.config().min_report_samples,
            active_supernet_ignored: ignored,
        }))
    }

    async fn rotate_credential(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::RotateCredentialResponse>, Status> {
        let (device, _) = self.device(req.metadata()).await?;
        let presented = crate::auth::bearer(req.metadata())?;
        let r = self.app.rotate_credential(device, presented).await?;
        Ok(Response::new(pb::RotateCredentialResponse {
            device_credential: r.credential,
            credential_expires_unix_ms: r.expires_ms.unwrap_or(0),
            previous_valid_until_unix_ms: r.previous_valid_until_ms,
        }))
    }

    async fn report(&self, req: Request<pb::ReportRequest>) -> Result<Response<pb::Empty>, Status> {
        let (device, fleet) = self.device(req.metadata()).await?;
        let report = report_from_pb(req.get_ref())?;
        report.validate(self.app.config().min_report_samples)?;
        let store = self.app.store();
        if !store.fleet_has_supernet(fleet, report.supernet_id).await? {
            return Err(CloudError::PermissionDenied(format!(
                "supernet_id {} is not assigned to this device's fleet",
                report.supernet_id
            ))
            .into());
        }
        store
            .upsert_report(device, fleet, &report, now_ms())
            .await?;
        Metrics::inc(&self.app.metrics().reports_total);
        self.app.emit_fleet(
            FleetEventKind::Report,
            fleet,
            Some(device),
            Some(report.supernet_id),
        );
        Ok(Response::new(pb::Empty {}))
    }
}
