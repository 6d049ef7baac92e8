//! `DeveloperService`.
use std::time::Duration;

use adaptivenet_proto::v1 as pb;
use adaptivenet_proto::v1::developer_service_server::DeveloperService;
use adaptivenet_proto::v1::upload_oracle_request::Msg;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use super::watch::JobWatches;
use super::{
    convert, management, management_catalogue, management_one_fleet, rollout, ServerStream,
    MAX_ARCH_JSON,
};
use crate::app::App;
use crate::auth::{Access, Principal};
use crate::datasets;
use crate::domain::{
    check_name, check_sha256, now_ms, parse_id, Dataset, FleetEventKind, Job, JobKind, Oracle,
    Page, Role,
};
use crate::elastify::fit::{check_fit, DataShape, HeadFit};
use crate::elastify::params::JobParams;
use crate::error::CloudError;
use crate::ops::metrics::Metrics;
use crate::validate::validate_oracle_file;

/// Largest accepted upload chunk (the gRPC message limit is 4 MiB).
pub const MAX_CHUNK: usize = 4 << 20;

/// Viewers do not see dataset URIs: a URI names storage on the worker (paths, buckets).
fn is_viewer(p: &Principal) -> bool {
    matches!(
        p,
        Principal::Api {
            role: Role::Viewer,
            ..
        }
    )
}

/// Implements `DeveloperService` over an [`App`].
#[derive(Clone, Debug)]
pub struct DeveloperApi {
    app: App,
    watches: JobWatches,
}

impl DeveloperApi {
    pub fn new(app: App) -> Self {
        DeveloperApi {
            app,
            watches: JobWatches::default(),
        }
    }

    /// Reads the header, streams chunks into a temp blob while hashing, checks size and
    /// digest, validates the model and only then commits blob and row.
    async fn upload(
        &self,
        mut stream: Streaming<pb::UploadOracleRequest>,
    ) -> Result<(Oracle, bool), CloudError> {
        let app = &self.app;
        let idle = app.config().net.upload_idle_timeout();
        let first = next_message(&mut stream, idle, "header")
            .await?
            .ok_or_else(|| CloudError::invalid("header", "stream ended before the header"))?;
        let h = match first.msg {
            Some(Msg::Header(h)) => h,
            _ => {
                return Err(CloudError::invalid(
                    "header",
                    "the first message must be the header",
                ))
            }
        };
        check_name("header.name", &h.name)?;
        check_sha256("header.weights_sha256", &h.weights_sha256)?;
        if h.arch_json.len() > MAX_ARCH_JSON {
            return Err(CloudError::invalid(
                "header.arch_json",
                format!("larger than {MAX_ARCH_JSON} bytes"),
            ));
        }
        if h.size_bytes == 0 {
            return Err(CloudError::invalid("header.size_bytes", "must be positive"));
        }
        let limit = app.config().max_oracle_bytes;
        if h.size_bytes > limit {
            return Err(CloudError::invalid(
                "header.size_bytes",
                format!("{} bytes exceeds the limit of {limit} bytes", h.size_bytes),
            ));
        }
        let arch = String::from_utf8(h.arch_json.clone())
            .map_err(|_| CloudError::invalid("header.arch_json", "not UTF-8"))?;
        let mut w = app.blobs().writer().await?;
        while let Some(m) = next_message(&mut stream, idle, "chunk").await? {
            match m.msg {
                Some(Msg::Chunk(c)) => {
                    if c.len() > MAX_CHUNK {
                        return Err(CloudError::invalid(
                            "chunk",
                            format!("larger than {MAX_CHUNK} bytes"),
                        ));
                    }
                    if w.size() + c.len() as u64 > h.size_bytes {
                        return Err(CloudError::invalid(
                            "chunk",
                            format!(
                                "more bytes than the declared header.size_bytes {}",
                                h.size_bytes
                            ),
                        ));
                    }
                    w.write(&c).await?;
                }
                Some(Msg::Header(_)) => {
                    return Err(CloudError::invalid("header", "sent more than once"))
                }
                None => return Err(CloudError::invalid("msg", "empty message")),
            }
        }
        if w.size() != h.size_bytes {
            return Err(CloudError::invalid(
                "header.size_bytes",
                format!(
                    "upload truncated: received {} of {} bytes",
                    w.size(),
                    h.size_bytes
                ),
            ));
        }
        let digest = w.digest();
        if digest != h.weights_sha256 {
            return Err(CloudError::invalid(
                "header.weights_sha256",
                format!(
                    "declared {} but the content hashes to {digest}",
                    h.weights_sha256
                ),
            ));
        }
        if let Some(existing) = app.store().oracle_by_digest(&digest).await? {
            return Ok((existing, false));
        }
        // Validated from the scratch file (mapped), never held in this process's heap.
        let scratch = w.flushed_path().await?;
        let arch_bytes = h.arch_json;
        let info = tokio::task::spawn_blocking(move || validate_oracle_file(&arch_bytes, &scratch))
            .await
            .map_err(|e| CloudError::Internal(format!("validation task: {e}")))??;
        let blob = w
            .commit(Some(("header.weights_sha256", &h.weights_sha256)))
            .await?;
        let o = Oracle {
            id: Uuid::new_v4(),
            name: h.name,
            family: info.family,
            weights_sha256: blob.sha256,
            size_bytes: blob.size_bytes,
            num_params: info.num_params,
            num_tensors: info.num_tensors,
            arch_json: arch,
            created_ms: now_ms(),
        };
        let (o, created) = app.store().insert_oracle(&o).await?;
        if created {
            Metrics::inc(&app.metrics().oracle_uploads_total);
            tracing::info!(oracle = %o.id, sha256 = %o.weights_sha256, "oracle uploaded");
        }
        Ok((o, created))
    }
}

/// The next message of an upload stream; a stream idle for longer than `idle` fails with
/// DEADLINE_EXCEEDED (the caller's partial blob is deleted when its writer drops).
async fn next_message<T>(
    stream: &mut Streaming<T>,
    idle: Duration,
    field: &str,
) -> Result<Option<T>, CloudError> {
    match tokio::time::timeout(idle, stream.message()).await {
        Ok(r) => {
            r.map_err(|s| CloudError::invalid(field, format!("stream failed: {}", s.message())))
        }
        Err(_) => Err(CloudError::DeadlineExceeded(format!(
            "upload stream idle for more than {} ms; nothing was stored",
            idle.as_millis()
        ))),
    }
}

impl DeveloperApi {
    /// Feeds the `UploadDataset` stream to a [`datasets::upload::Upload`] in order.
    async fn upload_dataset_stream(
        &self,
        mut stream: Streaming<pb::UploadDatasetRequest>,
    ) -> Result<(Dataset, bool), CloudError> {
        use pb::upload_dataset_request::Msg as M;
        let idle = self.app.config().net.upload_idle_timeout();
        let h = match next_message(&mut stream, idle, "stream").await? {
            Some(pb::UploadDatasetRequest {
                msg: Some(M::Header(h)),
            }) => h,
            Some(_) => {
                return Err(CloudError::invalid(
                    "header",
                    "the first message must be the header",
                ))
            }
            None => {
                return Err(CloudError::invalid(
                    "header",
                    "stream ended before the header",
                ))
            }
        };
        let opts = convert::dataset_options(h.options.as_ref());
        let mut up =
            datasets::upload::Upload::begin(&self.app, &h.name, &h.format, h.total_bytes, opts)?;
        while let Some(m) = next_message(&mut stream, idle, "stream").await? {
            match m.msg {
                Some(M::Shard(s)) => up.start_shard(&s.sha256, s.size_bytes).await?,
                Some(M::Chunk(c)) => {
                    if c.len() > MAX_CHUNK {
                        return Err(CloudError::invalid(
                            "chunk",
                            format!("larger than {MAX_CHUNK} bytes"),
                        ));
                    }
                    up.chunk(&c).await?
                }
                Some(M::ManifestChunk(c)) => up.manifest_chunk(&c)?,
                Some(M::Header(_)) => {
                    return Err(CloudError::invalid("header", "sent more than once"))
                }
                None => return Err(CloudError::invalid("msg", "empty message")),
            }
        }
        up.finish().await
    }
}

/// The checks of [`StartElastification`] that need both the oracle and the dataset: the
/// branch kinds fit the oracle's chain, `val_size` leaves training images, and the dataset
/// fits the oracle (channels, classes, input size; FAILED_PRECONDITION naming both).
///
/// [`StartElastification`]: DeveloperService::start_elastification
fn check_oracle_fits(oracle: &Oracle, d: &Dataset, params: &JobParams) -> Result<(), CloudError> {
    // Uploads validated the descriptor, so this fails only for rows written some other way.
    let arch = adaptivenet_core::model::ArchDescriptor::from_json(oracle.arch_json.as_bytes())
        .map_err(|e| {
            CloudError::FailedPrecondition(format!(
                "oracle '{}': its stored descriptor does not parse: {e}",
                oracle.name
            ))
        })?;
    let shape = DataShape::of_record(d);
    params.check_oracle(&arch.spec, &oracle.name)?;
    params.check_dataset(&shape)?;
    check_fit(&oracle.name, &arch.spec, &shape, HeadFit::Keep)
}

#[tonic::async_trait]
impl DeveloperService for DeveloperApi {
    async fn upload_oracle(
        &self,
        req: Request<Streaming<pb::UploadOracleRequest>>,
    ) -> Result<Response<pb::UploadOracleResponse>, Status> {
        management(&self.app, req.metadata(), Access::Write).await?;
        let (o, created) = self.upload(req.into_inner()).await?;
        Ok(Response::new(pb::UploadOracleResponse {
            oracle: Some(convert::oracle(&o)),
            created,
        }))
    }

    async fn list_oracles(
        &self,
        req: Request<pb::ListOraclesRequest>,
    ) -> Result<Response<pb::ListOraclesResponse>, Status> {
        management(&self.app, req.metadata(), Access::Read).await?;
        let p = req.get_ref().page.clone().unwrap_or_default();
        let page = Page::new(p.page_size, &p.page_token)?;
        let list = self.app.store().list_oracles(page).await?;
        Ok(Response::new(pb::ListOraclesResponse {
            next_page_token: page.next_token(list.len()),
            oracles: list.iter().map(convert::oracle).collect(),
        }))
    }

    async fn get_oracle(
        &self,
        req: Request<pb::GetOracleRequest>,
    ) -> Result<Response<pb::Oracle>, Status> {
        management(&self.app, req.metadata(), Access::Read).await?;
        let id = parse_id("oracle_id", &req.get_ref().oracle_id)?;
        Ok(Response::new(convert::oracle(
            &self.app.store().get_oracle(id).await?,
        )))
    }

    async fn delete_oracle(
        &self,
        req: Request<pb::DeleteOracleRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        management(&self.app, req.metadata(), Access::Write).await?;
        let id = parse_id("oracle_id", &req.get_ref().oracle_id)?;
        // The weights blob goes only when no other row shares it (content-addressed).
        if let Some(sha) = self.app.store().delete_oracle(id).await? {
            self.app.blobs().delete(&sha).await?;
        }
        Ok(Response::new(pb::Empty {}))
    }

    async fn upload_dataset(
        &self,
        req: Request<Streaming<pb::UploadDatasetRequest>>,
    ) -> Result<Response<pb::UploadDatasetResponse>, Status> {
        management(&self.app, req.metadata(), Access::Write).await?;
        let (d, created) = self.upload_dataset_stream(req.into_inner()).await?;
        Ok(Response::new(pb::UploadDatasetResponse {
            dataset: Some(convert::dataset(&d)),
            created,
        }))
    }

    async fn register_dataset(
        &self,
        req: Request<pb::RegisterDatasetRequest>,
    ) -> Result<Response<pb::Dataset>, Status> {
        management(&self.app, req.metadata(), Access::Write).await?;
        let r = req.into_inner();
        let opts = convert::dataset_options(r.options.as_ref());
        let (d, _) = datasets::register(&self.app, &r.name, &r.uri, &r.format, &opts).await?;
        Ok(Response::new(convert::dataset(&d)))
    }

    async fn get_dataset(
        &self,
        req: Request<pb::GetDatasetRequest>,
    ) -> Result<Response<pb::Dataset>, Status> {
        let who = management(&self.app, req.metadata(), Access::Read).await?;
        let id = parse_id("dataset_id", &req.get_ref().dataset_id)?;
        let mut d = convert::dataset(&self.app.store().get_dataset(id).await?);
        if is_viewer(&who) {
            d.uri.clear();
        }
        Ok(Response::new(d))
    }

    async fn delete_dataset(
        &self,
        req: Request<pb::DeleteDatasetRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        management(&self.app, req.metadata(), Access::Write).await?;
        let id = parse_id("dataset_id", &req.get_ref().dataset_id)?;
        let d = self.app.store().delete_dataset(id).await?;
        datasets::release_blobs(&self.app, &d).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn list_datasets(
        &self,
        req: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        let who = management(&self.app, req.metadata(), Access::Read).await?;
        let p = req.get_ref().page.clone().unwrap_or_default();
        let page = Page::new(p.page_size, &p.page_token)?;
        let list = self.app.store().list_datasets(page).await?;
        let hide_uri = is_viewer(&who);
        Ok(Response::new(pb::ListDatasetsResponse {
            next_page_token: page.next_token(list.len()),
            datasets: list
                .iter()
                .map(|d| {
                    let mut d = convert::dataset(d);
                    if hide_uri {
                        d.uri.clear();
                    }
                    d
                })
                .collect(),
        }))
    }

    async fn start_elastification(
        &self,
        req: Request<pb::StartElastificationRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        management(&self.app, req.metadata(), Access::Write).await?;
        let r = req.into_inner();
        let oracle_id = parse_id("oracle_id", &r.oracle_id)?;
        // Elastification trains on the developer's data: without a dataset the worker could
        // only fail the job later, so the request is refused before anything is read or stored.
        if r.dataset_id.is_empty() {
            return Err(CloudError::invalid(
                "dataset_id",
                "required: the registered dataset to elastify on (upload or register one first)",
            )
            .into());
        }
        let dataset_id = parse_id("dataset_id", &r.dataset_id)?;
        let store = self.app.store();
        let oracle = store.get_oracle(oracle_id).await?;
        let dataset = store.get_dataset(dataset_id).await?;
        let supernet_name = if r.supernet_name.is_empty() {
            oracle.name.clone()
        } else {
            r.supernet_name
        };
        check_name("supernet_name", &supernet_name)?;
        let params_json = if r.params_json.is_empty() {
            "{}".to_string()
        } else {
            r.params_json
        };
        // Everything the worker would refuse is refused here, before a row exists.
        let params = JobParams::parse(&params_json)?;
        check_oracle_fits(&oracle, &dataset, &params)?;
        let job = Job::queued(
            JobKind::Elastify,
            Some(oracle.id),
            Some(dataset.id),
            supernet_name,
            params_json,
            None,
            self.app.config().job_max_attempts,
        );
        store.insert_job(&job).await?;
        self.app.emit_job(job.id);
        Ok(Response::new(convert::job(&job)))
    }

    async fn start_oracle_training(
        &self,
        req: Request<pb::StartOracleTrainingRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        management(&self.app, req.metadata(), Access::Write).await?;
        let job = super::train::start_oracle_training(&self.app, req.into_inner()).await?;
        Ok(Response::new(job))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        management(&self.app, req.metadata(), Access::Read).await?;
        let id = parse_id("job_id", &req.get_ref().job_id)?;
        Ok(Response::new(convert::job(
            &self.app.store().get_job(id).await?,
        )))
    }

    type WatchJobStream = ServerStream<pb::JobEvent>;

    async fn watch_job(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        management(&self.app, req.metadata(), Access::Read).await?;
        let id = parse_id("job_id", &req.get_ref().job_id)?;
        let app = self.app.clone();
        let first = app.store().get_job(id).await?;
        // One shared poller reads the job for every watcher (`api::watch`).
        let mut rx_job = self.watches.subscribe(&app, first.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut last = first;
            if tx
                .send(Ok(pb::JobEvent {
                    job: Some(convert::job(&last)),
                }))
                .await
                .is_err()
            {
                return;
            }
            while !last.state.is_terminal() {
                tokio::select! {
                    _ = app.shutdown_token().cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("server shutting down; watch again"))).await;
                        return;
                    }
                    _ = tx.closed() => return,
                    r = rx_job.changed() => {
                        if r.is_err() {
                            let _ = tx.send(Err(Status::unavailable("job watch ended; watch again"))).await;
                            return;
                        }
                    }
                }
                let job = rx_job.borrow_and_update().clone();
                if job != last {
                    if tx
                        .send(Ok(pb::JobEvent {
                            job: Some(convert::job(&job)),
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    last = job;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        management(&self.app, req.metadata(), Access::Write).await?;
        let id = parse_id("job_id", &req.get_ref().job_id)?;
        let job = self.app.store().cancel_job(id, now_ms()).await?;
        self.app.emit_job(id);
        Ok(Response::new(convert::job(&job)))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        management(&self.app, req.metadata(), Access::Read).await?;
        let r = req.get_ref();
        let p = r.page.clone().unwrap_or_default();
        let page = Page::new(p.page_size, &p.page_token)?;
        let state = pb::JobState::try_from(r.state)
            .map_err(|_| CloudError::invalid("state", format!("unknown job state {}", r.state)))?;
        let list = self
            .app
            .store()
            .list_jobs(page, convert::job_state_from_pb(state))
            .await?;
        Ok(Response::new(pb::ListJobsResponse {
            next_page_token: page.next_token(list.len()),
            jobs: list.iter().map(convert::job).collect(),
        }))
    }

    async fn list_supernets(
        &self,
        req: Request<pb::ListSupernetsRequest>,
    ) -> Result<Response<pb::ListSupernetsResponse>, Status> {
        management_catalogue(&self.app, req.metadata()).await?;
        let r = req.get_ref();
        let p = r.page.clone().unwrap_or_default();
        let page = Page::new(p.page_size, &p.page_token)?;
        let name = (!r.name.is_empty()).then_some(r.name.as_str());
        let list = self.app.store().list_supernets(page, name).await?;
        Ok(Response::new(pb::ListSupernetsResponse {
            next_page_token: page.next_token(list.len()),
            supernets: list.iter().map(convert::supernet).collect(),
        }))
    }

    async fn get_supernet(
        &self,
        req: Request<pb::GetSupernetRequest>,
    ) -> Result<Response<pb::GetSupernetResponse>, Status> {
        management_catalogue(&self.app, req.metadata()).await?;
        let id = parse_id("supernet_id", &req.get_ref().supernet_id)?;
        let (s, manifest, blobs) = self.app.store().get_supernet_full(id).await?;
        Ok(Response::new(pb::GetSupernetResponse {
            supernet: Some(convert::supernet(&s)),
            manifest_json: manifest.into_bytes(),
            blobs: blobs.iter().map(convert::blob_ref).collect(),
        }))
    }

    async fn publish_supernet(
        &self,
        req: Request<pb::PublishSupernetRequest>,
    ) -> Result<Response<pb::Label>, Status> {
        let (md, r) = (req.metadata().clone(), req.into_inner());
        let (_, fleet) = management_one_fleet(&self.app, &md, Access::Write, || {
            parse_id("fleet_id", &r.fleet_id)
        })
        .await?;
        let supernet = parse_id("supernet_id", &r.supernet_id)?;
        check_name("label", &r.label)?;
        let l = self
            .app
            .store()
            .publish_label(fleet, &r.label, supernet)
            .await?;
        self.app
            .emit_fleet(FleetEventKind::LabelPublished, fleet, None, Some(supernet));
        Ok(Response::new(convert::label(&l)))
    }

    async fn start_rollout(
        &self,
        req: Request<pb::StartRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let (md, r) = (req.metadata().clone(), req.into_inner());
        Ok(Response::new(rollout::start(&self.app, &md, r).await?))
    }

    async fn get_rollout(
        &self,
        req: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let r = rollout::get(&self.app, req.metadata(), &req.get_ref().rollout_id).await?;
        Ok(Response::new(r))
    }

    async fn list_rollouts(
        &self,
        req: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        let r = rollout::list(&self.app, req.metadata(), req.get_ref()).await?;
        Ok(Response::new(r))
    }

    async fn pause_rollout(
        &self,
        req: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let id = &req.get_ref().rollout_id;
        Ok(Response::new(
            rollout::act(&self.app, req.metadata(), id, Some(true)).await?,
        ))
    }

    async fn resume_rollout(
        &self,
        req: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let id = &req.get_ref().rollout_id;
        Ok(Response::new(
            rollout::act(&self.app, req.metadata(), id, Some(false)).await?,
        ))
    }

    async fn abort_rollout(
        &self,
        req: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let id = &req.get_ref().rollout_id;
        Ok(Response::new(
            rollout::act(&self.app, req.metadata(), id, None).await?,
        ))
    }

    type WatchRolloutStream = ServerStream<pb::Rollout>;

    async fn watch_rollout(
        &self,
        req: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        let s = rollout::watch(&self.app, req.metadata(), &req.get_ref().rollout_id).await?;
        Ok(Response::new(s))
    }

    async fn set_desired_state(
        &self,
        req: Request<pb::SetDesiredStateRequest>,
    ) -> Result<Response<pb::DesiredState>, Status> {
        let (md, r) = (req.metadata().clone(), req.into_inner());
        let (_, fleet) = management_one_fleet(&self.app, &md, Access::Write, || {
            parse_id("fleet_id", &r.fleet_id)
        })
        .await?;
        let budget = convert::budget_from_pb(r.budget.as_ref());
        budget.validate()?;
        use pb::set_desired_state_request::Target;
        let (label, supernet) = match r.target {
            Some(Target::Label(l)) => {
                check_name("label", &l)?;
                (Some(l), None)
            }
            Some(Target::SupernetId(s)) => (None, Some(parse_id("supernet_id", &s)?)),
            None => return Err(CloudError::invalid("target", "set label or supernet_id").into()),
        };
        let d = self
            .app
            .store()
            .set_desired_state(fleet, label.as_deref(), supernet, budget)
            .await?;
        self.app.emit_fleet(
            FleetEventKind::DesiredStateChanged,
            fleet,
            None,
            d.supernet_id,
        );
        Ok(Response::new(convert::desired(&d)))
    }
}
