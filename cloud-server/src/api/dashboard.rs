//! `DashboardService`: read-only, aggregates only.
use adaptivenet_proto::v1 as pb;
use adaptivenet_proto::v1::dashboard_service_server::DashboardService;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use super::{convert, management, management_catalogue, management_fleet, ServerStream};
use crate::app::App;
use std::collections::HashMap;

use uuid::Uuid;

use crate::auth::{Access, Principal};
use crate::domain::{parse_id, Device, FleetAggregates, FleetEventKind, Page, Role};

/// Implements `DashboardService` over an [`App`].
#[derive(Clone, Debug)]
pub struct DashboardApi {
    app: App,
}

impl DashboardApi {
    pub fn new(app: App) -> Self {
        DashboardApi { app }
    }
}

fn page_of(p: &Option<pb::PageRequest>) -> Result<Page, Status> {
    let p = p.clone().unwrap_or_default();
    Ok(Page::new(p.page_size, &p.page_token)?)
}

fn opt_fleet(s: &str) -> crate::error::Result<Option<uuid::Uuid>> {
    if s.is_empty() {
        Ok(None)
    } else {
        Ok(Some(parse_id("fleet_id", s)?))
    }
}

/// A page of devices as `p` may see them: viewers get no per-device latency, which would
/// single a device out of the aggregates. The operator console reads through this too.
pub(crate) async fn devices_for(
    app: &App,
    p: &Principal,
    page: Page,
    fleet: Option<Uuid>,
) -> crate::error::Result<Vec<Device>> {
    let mut list = app.store().list_devices(page, fleet).await?;
    if p.role() == Role::Viewer {
        for d in &mut list {
            d.latency_p50_ms = 0.0;
            d.latency_p95_ms = 0.0;
        }
    }
    Ok(list)
}

/// The aggregates `p` may see: floored at k, and for viewers the snapshot that moves in
/// steps of k reports (see `App::viewer_fleet_aggregates`). Shared with the console.
pub(crate) async fn aggregates_for(
    app: &App,
    p: &Principal,
    fleet: Option<Uuid>,
) -> crate::error::Result<FleetAggregates> {
    if p.role() == Role::Viewer {
        app.viewer_fleet_aggregates(fleet).await
    } else {
        app.fleet_aggregates(fleet).await
    }
}

#[tonic::async_trait]
impl DashboardService for DashboardApi {
    async fn list_fleets(
        &self,
        req: Request<pb::ListFleetsRequest>,
    ) -> Result<Response<pb::ListFleetsResponse>, Status> {
        let (_, scope) =
            management_fleet(&self.app, req.metadata(), Access::Read, || Ok(None)).await?;
        let page = page_of(&req.get_ref().page)?;
        let mut list = match scope {
            // A fleet-scoped token lists its own fleet only.
            Some(f) if page.offset == 0 => vec![self.app.store().get_fleet(f).await?],
            Some(_) => Vec::new(),
            None => self.app.store().list_fleets(page).await?,
        };
        for f in &mut list {
            f.desired = self.app.store().desired_state(f.id).await?;
        }
        Ok(Response::new(pb::ListFleetsResponse {
            next_page_token: page.next_token(list.len()),
            fleets: list.iter().map(convert::fleet).collect(),
        }))
    }

    async fn list_devices(
        &self,
        req: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let r = req.get_ref();
        let (p, fleet) = management_fleet(&self.app, req.metadata(), Access::Read, || {
            opt_fleet(&r.fleet_id)
        })
        .await?;
        let page = page_of(&r.page)?;
        let list = devices_for(&self.app, &p, page, fleet).await?;
        Ok(Response::new(pb::ListDevicesResponse {
            next_page_token: page.next_token(list.len()),
            devices: list.iter().map(convert::device).collect(),
        }))
    }

    async fn list_supernets(
        &self,
        req: Request<pb::ListSupernetsForDashboardRequest>,
    ) -> Result<Response<pb::ListSupernetsForDashboardResponse>, Status> {
        management_catalogue(&self.app, req.metadata()).await?;
        let page = page_of(&req.get_ref().page)?;
        let list = self.app.store().list_supernets(page, None).await?;
        Ok(Response::new(pb::ListSupernetsForDashboardResponse {
            next_page_token: page.next_token(list.len()),
            supernets: list.iter().map(convert::supernet).collect(),
        }))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsForDashboardRequest>,
    ) -> Result<Response<pb::ListJobsForDashboardResponse>, Status> {
        management(&self.app, req.metadata(), Access::Read).await?;
        let page = page_of(&req.get_ref().page)?;
        let list = self.app.store().list_jobs(page, None).await?;
        Ok(Response::new(pb::ListJobsForDashboardResponse {
            next_page_token: page.next_token(list.len()),
            jobs: list.iter().map(convert::job).collect(),
        }))
    }

    async fn get_fleet_aggregates(
        &self,
        req: Request<pb::GetFleetAggregatesRequest>,
    ) -> Result<Response<pb::FleetAggregates>, Status> {
        let (p, fleet) = management_fleet(&self.app, req.metadata(), Access::Read, || {
            opt_fleet(&req.get_ref().fleet_id)
        })
        .await?;
        let a = aggregates_for(&self.app, &p, fleet).await?;
        Ok(Response::new(convert::aggregates(&a)))
    }

    type WatchFleetStream = ServerStream<pb::FleetEvent>;

    async fn watch_fleet(
        &self,
        req: Request<pb::WatchFleetRequest>,
    ) -> Result<Response<Self::WatchFleetStream>, Status> {
        let (p, fleet) = management_fleet(&self.app, req.metadata(), Access::Read, || {
            opt_fleet(&req.get_ref().fleet_id)
        })
        .await?;
        // Viewers: one report event per k reports of a fleet, without the device, so the
        // stream does not say when one device's report moved the aggregates.
        let floor =
            (p.role() == Role::Viewer).then_some(self.app.config().min_group_devices.max(1));
        let mut reports_seen: HashMap<Uuid, u32> = HashMap::new();
        let mut rx = self.app.subscribe_fleet();
        let (tx, out) = tokio::sync::mpsc::channel(64);
        let stop = self.app.shutdown_token().clone();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = stop.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("server shutting down"))).await;
                        return;
                    }
                    _ = tx.closed() => return,
                    ev = rx.recv() => ev,
                };
                match ev {
                    Ok(mut e) => {
                        if fleet.is_some_and(|f| f != e.fleet_id) {
                            continue;
                        }
                        if let (Some(k), FleetEventKind::Report) = (floor, e.kind) {
                            let n = reports_seen.entry(e.fleet_id).or_default();
                            *n += 1;
                            if *n < k {
                                continue;
                            }
                            *n = 0;
                            e.device_id = None;
                            e.supernet_id = None;
                        }
                        if tx.send(Ok(convert::fleet_event(&e))).await.is_err() {
                            return;
                        }
                    }
                    // A slow watcher skips events rather than buffering without bound.
                    Err(RecvError::Lagged(n)) => {
                        tracing::debug!(skipped = n, "fleet watcher lagged")
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }
}
