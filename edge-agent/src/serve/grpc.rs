//! The local `EdgeInference` gRPC API: `Infer(images) -> class scores` on the subnet serving
//! now, and `Status`. This is the service edge: wire types are converted here and nowhere
//! else, and every bad request is `INVALID_ARGUMENT` naming the offending field, before any
//! tensor work.
//!
//! Forward passes run on the blocking pool (they are CPU-bound), and their latency feeds the
//! same window the controller reads, so served traffic drives adaptation.
//!
//! Exposure: at most [`ApiConfig::max_concurrent`] inferences run at once and the rest are
//! refused at once (RESOURCE_EXHAUSTED, HTTP 429) rather than queued, so a flood cannot
//! starve the device's own serving; with [`ApiConfig::token`] every call needs
//! `authorization: Bearer <token>`; a listener that is not loopback is logged as a warning.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use adaptivenet_proto::v1 as pb;
use adaptivenet_proto::v1::edge_inference_server::{EdgeInference, EdgeInferenceServer};
use candle_core::{Device, Tensor};
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status};

use super::Server;
use crate::{EdgeError, Result};

/// Settings of the local API.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Largest batch accepted (larger ones are refused, not split: the caller controls
    /// latency by its batch size).
    pub max_batch: usize,
    /// Inferences served at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_concurrent: usize,
    /// Bearer token every call must carry (None: no authentication).
    pub token: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            max_batch: 64,
            max_concurrent: 4,
            token: None,
        }
    }
}

/// Equality in time independent of where the inputs differ (a bearer token check).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The warning for a listener reachable beyond this machine, if `addr` is not loopback.
pub fn exposure_warning(addr: &SocketAddr, authenticated: bool) -> Option<String> {
    if addr.ip().is_loopback() {
        return None;
    }
    Some(format!(
        "the local inference API listens on {addr}, which is not loopback: other machines can \
         reach it{}",
        if authenticated {
            " (calls need the bearer token)"
        } else {
            "; without --listen-token-file anyone who reaches it may use it"
        }
    ))
}

/// The service: the shared server plus the budget it reports.
#[derive(Debug, Clone)]
pub struct InferenceService {
    server: Arc<Server>,
    cfg: ApiConfig,
    /// One permit per inference served at once.
    slots: Arc<Semaphore>,
    /// The budget the controller works to, as f64 bits (changes on re-sync).
    budget_bits: Arc<AtomicU64>,
}

impl InferenceService {
    pub fn new(server: Arc<Server>, cfg: ApiConfig, budget_ms: f64) -> Self {
        InferenceService {
            server,
            slots: Arc::new(Semaphore::new(cfg.max_concurrent.max(1))),
            cfg,
            budget_bits: Arc::new(AtomicU64::new(budget_ms.to_bits())),
        }
    }

    /// Reports the budget held in `bits` (f64 bits), shared with whoever updates it.
    pub fn share_budget(&mut self, bits: Arc<AtomicU64>) {
        self.budget_bits = bits;
    }

    /// A handle to update the reported budget.
    pub fn budget_handle(&self) -> Arc<AtomicU64> {
        self.budget_bits.clone()
    }

    /// Takes one of the `max_concurrent` inference slots (held until the permit drops), or
    /// RESOURCE_EXHAUSTED at once when all are taken.
    pub fn try_slot(&self) -> std::result::Result<OwnedSemaphorePermit, Status> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "busy: {} inferences in flight (the limit); retry later",
                self.cfg.max_concurrent.max(1)
            ))
        })
    }

    /// With a configured token, the call must carry it as `authorization: Bearer <token>`.
    fn authorize(&self, md: &tonic::metadata::MetadataMap) -> std::result::Result<(), Status> {
        let Some(want) = &self.cfg.token else {
            return Ok(());
        };
        let given = md
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if same_secret(given.as_bytes(), want.as_bytes()) {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "missing or wrong bearer token (authorization: Bearer <token>)",
            ))
        }
    }

    /// Checks a request against the model's input and builds the input tensor.
    pub fn input_tensor(&self, req: &pb::InferRequest) -> std::result::Result<Tensor, Status> {
        let input = self.server.source().manifest.input.clone();
        let [c, h, w] = input.shape;
        let (field, shape) = match &req.images {
            Some(pb::infer_request::Images::Tensor(t)) => ("tensor", &t.shape),
            Some(pb::infer_request::Images::Raw(r)) => ("raw", &r.shape),
            None => return Err(invalid("images", "missing: set tensor or raw")),
        };
        if shape.len() != 4 {
            return Err(invalid(
                &format!("images.{field}.shape"),
                &format!("expected [batch, {c}, {h}, {w}], got {shape:?}"),
            ));
        }
        let n = shape[0] as usize;
        if [shape[1], shape[2], shape[3]].map(|v| v as usize) != [c, h, w] {
            return Err(invalid(
                &format!("images.{field}.shape"),
                &format!("expected [batch, {c}, {h}, {w}], got {shape:?}"),
            ));
        }
        if n == 0 {
            return Err(invalid(&format!("images.{field}.shape"), "empty batch"));
        }
        if n > self.cfg.max_batch {
            return Err(invalid(
                &format!("images.{field}.shape"),
                &format!("batch {n} exceeds the maximum of {}", self.cfg.max_batch),
            ));
        }
        let len = n * c * h * w;
        let data: Vec<f32> = match &req.images {
            Some(pb::infer_request::Images::Tensor(t)) => {
                if t.data.len() != len {
                    return Err(invalid(
                        "images.tensor.data",
                        &format!("{} values for shape {shape:?} (need {len})", t.data.len()),
                    ));
                }
                if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
                    return Err(invalid(
                        "images.tensor.data",
                        &format!("value {i} is not finite"),
                    ));
                }
                t.data.clone()
            }
            Some(pb::infer_request::Images::Raw(r)) => {
                if r.pixels.len() != len {
                    return Err(invalid(
                        "images.raw.pixels",
                        &format!("{} bytes for shape {shape:?} (need {len})", r.pixels.len()),
                    ));
                }
                if input.mean.len() != c || input.std.len() != c {
                    return Err(Status::failed_precondition(
                        "the artifact's input spec has no per-channel mean/std",
                    ));
                }
                r.pixels
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let ch = (i / (h * w)) % c;
                        (f32::from(v) / 255.0 - input.mean[ch]) / input.std[ch]
                    })
                    .collect()
            }
            None => return Err(invalid("images", "missing: set tensor or raw")),
        };
        Tensor::from_vec(data, (n, c, h, w), &Device::Cpu)
            .map_err(|e| Status::internal(format!("building the input tensor: {e}")))
    }
}

fn invalid(field: &str, reason: &str) -> Status {
    Status::invalid_argument(format!("invalid {field}: {reason}"))
}

fn internal(e: EdgeError) -> Status {
    tracing::warn!("inference failed: {e}");
    Status::internal(format!("inference failed: {e}"))
}

#[tonic::async_trait]
impl EdgeInference for InferenceService {
    async fn infer(
        &self,
        request: Request<pb::InferRequest>,
    ) -> std::result::Result<Response<pb::InferResponse>, Status> {
        self.authorize(request.metadata())?;
        let _slot = self.try_slot()?;
        let req = request.into_inner();
        let x = self.input_tensor(&req)?;
        drop(req);
        let server = self.server.clone();
        let out = tokio::task::spawn_blocking(move || server.infer_tagged(&x))
            .await
            .map_err(|e| Status::internal(format!("inference task: {e}")))?
            .map_err(internal)?;
        let (batch, classes) = out
            .scores
            .dims2()
            .map_err(|e| internal(EdgeError::Candle(e)))?;
        let top1 = crate::quality::top1(&out.scores).map_err(internal)?;
        let scores = out
            .scores
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| internal(EdgeError::Candle(e)))?;
        Ok(Response::new(pb::InferResponse {
            scores,
            batch: batch as u32,
            num_classes: classes as u32,
            top1,
            subnet: out.subnet.to_string(),
            model_version: out.version,
            latency_ms: out.millis,
        }))
    }

    async fn status(
        &self,
        request: Request<pb::AgentStatusRequest>,
    ) -> std::result::Result<Response<pb::AgentStatusResponse>, Status> {
        self.authorize(request.metadata())?;
        let m = self.server.active();
        let w = self.server.window_snapshot();
        let (requests, images) = self.server.served();
        let input = self.server.source().manifest.input.clone();
        Ok(Response::new(pb::AgentStatusResponse {
            supernet_id: m.supernet_id.clone(),
            subnet: m.subnet.to_string(),
            model_version: m.version,
            budget_ms: f64::from_bits(self.budget_bits.load(Ordering::Relaxed)),
            window_samples: w.samples as u32,
            latency_p50_ms: if w.samples > 0 { w.p50_ms } else { 0.0 },
            latency_p95_ms: if w.samples > 0 { w.p95_ms } else { 0.0 },
            requests_served: requests,
            images_served: images,
            input_shape: input.shape.iter().map(|&v| v as u32).collect(),
            max_batch: self.cfg.max_batch as u32,
            class_names: input.class_names,
        }))
    }
}

/// A running local API.
#[derive(Debug)]
pub struct ApiHandle {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::result::Result<(), tonic::transport::Error>>,
}

impl ApiHandle {
    /// Stops accepting, lets in-flight requests finish, and waits for the server.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("local API stopped with an error: {e}"),
            Err(e) => tracing::warn!("local API task: {e}"),
        }
    }
}

/// Binds `addr` (use `127.0.0.1:0` for an ephemeral port) and serves `svc` until shutdown.
pub async fn serve(addr: &str, svc: InferenceService) -> Result<ApiHandle> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| EdgeError::config("listen", format!("cannot bind {addr}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| EdgeError::config("listen", format!("{addr}: {e}")))?;
    if let Some(w) = exposure_warning(&local, svc.cfg.token.is_some()) {
        tracing::warn!("{w}");
    }
    let [c, h, w] = svc.server.source().manifest.input.shape;
    // Room for the largest accepted batch as floats (the default 4 MiB would refuse large
    // images before the batch check could name the field).
    let limit = (svc.cfg.max_batch * c * h * w * 4 + (64 << 10)).max(4 << 20);
    let (stop, mut rx) = watch::channel(false);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EdgeInferenceServer::new(svc).max_decoding_message_size(limit))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.wait_for(|v| *v).await;
            }),
    );
    Ok(ApiHandle {
        addr: local,
        stop,
        task,
    })
}
