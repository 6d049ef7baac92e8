//! The agent's cloud client: enrollment, supernet sync (resumable, verified blob downloads)
//! and aggregate-only heartbeats and reports over the `DeviceService` gRPC API.
//!
//! - Every call carries a per-request deadline (`Request::set_timeout`, also enforced on the
//!   client side) and, after enrollment, `authorization: Bearer <device credential>`.
//! - The identity (device id, fleet id, credential) is persisted once in the state directory
//!   (`identity.json`, atomic write, mode 0600) and reused on restart: no second enrollment.
//! - [`CloudClient::sync_supernet`] lays out a local cache directory exactly as an artifact
//!   directory (`manifest.json` + `blobs/<sha256>`), so [`crate::serve::ArtifactSource`]
//!   opens it; see [`sync`] for the download protocol.
//! - Heartbeats and reports carry only the aggregates of [`AgentAggregates`]; a report that
//!   cannot be delivered is kept (the latest one only) and retried later, while the agent
//!   keeps serving.
//! - Privacy minimum on the device: a report whose quality rests on fewer local images than
//!   the larger of the cloud's announced minimum and the local floor is withheld
//!   (`ReportWithheld`) and never sent.
//! - The identity is bound to the endpoint that issued it: its credential is never sent to
//!   another one (`EndpointChanged`; re-enrolling replaces it).
//!
//! This is the only module of the crate that does network I/O, and nothing it sends is
//! per-sample: local data never leaves the device.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use adaptivenet_proto::v1 as pb;
use adaptivenet_proto::v1::device_service_client::DeviceServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;

use crate::{EdgeError, Result};

mod desired;
mod identity;
mod report;
pub mod sync;
mod tls;

pub use desired::{BudgetPolicy, DesiredState, InstallFailure, Serving, ServingReason};
pub use identity::{
    identity_path, load_identity, now_unix_ms, write_private, Identity, IDENTITY_FILE,
    IDENTITY_FORMAT, ROTATE_MARGIN,
};
pub(crate) use identity::{same_endpoint, sync_dir};
pub use report::{local_device_class, AgentAggregates, HeartbeatInput};
pub use sync::{BlobSelection, DownloadStats, SyncOptions, SyncReport};
use tls::tls;
pub(crate) use tls::tls_hint;
pub use tls::{TlsOptions, CA_FILE_ENV};

/// Default per-request deadline.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// An error and its sources on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub(crate) fn status_err(op: &'static str, s: tonic::Status) -> EdgeError {
    let mut message = s.message().to_string();
    if let Some(src) = std::error::Error::source(&s) {
        message.push_str(": ");
        message.push_str(&chain(src));
    }
    EdgeError::Cloud {
        op,
        code: s.code(),
        message,
    }
}

/// A connection to the cloud's `DeviceService`.
#[derive(Debug)]
pub struct CloudClient {
    endpoint: String,
    inner: DeviceServiceClient<Channel>,
    deadline: Duration,
    state_dir: Option<PathBuf>,
    /// Behind a lock: credential rotation replaces it while requests are in flight.
    identity: std::sync::RwLock<Option<Identity>>,
    pending_report: Mutex<Option<pb::ReportRequest>>,
    /// Local floor of the privacy minimum (`--min-quality-samples`).
    min_samples_floor: u64,
    /// The cloud's minimum as last announced (0: none announced).
    cloud_min_samples: AtomicU64,
    /// Enroll afresh even with a stored identity (`--re-enroll`).
    re_enroll: bool,
    /// A client certificate is presented (mutual TLS); only for error hints.
    client_cert: bool,
}

impl CloudClient {
    fn endpoint(endpoint: &str, deadline: Duration, opts: &TlsOptions) -> Result<Endpoint> {
        let ep = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| EdgeError::config("cloud endpoint", format!("{endpoint}: {e}")))?
            .connect_timeout(deadline)
            .tcp_nodelay(true);
        if endpoint.starts_with("https://") {
            return tls(ep, endpoint, opts);
        }
        if opts.is_set() {
            return Err(EdgeError::config(
                "--ca-file",
                format!("TLS files are for https:// endpoints, got {endpoint}"),
            ));
        }
        Ok(ep)
    }

    fn with_channel(endpoint: &str, ch: Channel, deadline: Duration) -> Self {
        CloudClient {
            endpoint: endpoint.to_string(),
            inner: DeviceServiceClient::new(ch),
            deadline,
            state_dir: None,
            identity: std::sync::RwLock::new(None),
            pending_report: Mutex::new(None),
            min_samples_floor: 0,
            cloud_min_samples: AtomicU64::new(0),
            re_enroll: false,
            client_cert: false,
        }
    }

    /// Connects now; an unreachable endpoint is `CloudUnreachable` after at most `deadline`.
    /// An `https://` endpoint trusts the CA in [`CA_FILE_ENV`]; see [`Self::connect_tls`].
    pub async fn connect(endpoint: &str, deadline: Duration) -> Result<Self> {
        Self::connect_tls(endpoint, deadline, &TlsOptions::default()).await
    }

    /// [`Self::connect`] with explicit TLS settings. A failed handshake (a certificate the
    /// CA did not sign, a client certificate the cloud refuses) is `CloudUnreachable` whose
    /// reason names the TLS flags.
    pub async fn connect_tls(endpoint: &str, deadline: Duration, tls: &TlsOptions) -> Result<Self> {
        let ep = Self::endpoint(endpoint, deadline, tls)?;
        let ch = match tokio::time::timeout(deadline, ep.connect()).await {
            Ok(Ok(ch)) => ch,
            Ok(Err(e)) => {
                return Err(EdgeError::CloudUnreachable {
                    endpoint: endpoint.to_string(),
                    reason: tls_hint(endpoint, chain(&e)),
                })
            }
            Err(_) => {
                return Err(EdgeError::CloudUnreachable {
                    endpoint: endpoint.to_string(),
                    reason: format!("no connection within {deadline:?}"),
                })
            }
        };
        let mut c = Self::with_channel(endpoint, ch, deadline);
        c.client_cert = tls.client_cert.is_some();
        Ok(c)
    }

    /// A client that connects on first use (and reconnects after breaks): for an agent that
    /// must start while the cloud is down. Must be called inside a tokio runtime.
    pub fn connect_lazy(endpoint: &str, deadline: Duration) -> Result<Self> {
        Self::connect_lazy_tls(endpoint, deadline, &TlsOptions::default())
    }

    /// [`Self::connect_lazy`] with explicit TLS settings.
    pub fn connect_lazy_tls(endpoint: &str, deadline: Duration, tls: &TlsOptions) -> Result<Self> {
        let ch = Self::endpoint(endpoint, deadline, tls)?.connect_lazy();
        let mut c = Self::with_channel(endpoint, ch, deadline);
        c.client_cert = tls.client_cert.is_some();
        Ok(c)
    }

    /// Uses `dir` for the identity and loads a stored one (enrolled earlier).
    pub fn with_state_dir(mut self, dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        let id = load_identity(&dir)?;
        if let Some(id) = &id {
            self.cloud_min_samples
                .store(id.min_quality_samples, Ordering::Relaxed);
        }
        self.set_identity(id);
        self.state_dir = Some(dir);
        Ok(self)
    }

    /// The local floor of the privacy minimum: a report whose quality rests on fewer local
    /// images than the larger of this and the cloud's announced minimum is withheld.
    pub fn with_min_quality_samples(mut self, floor: u64) -> Self {
        self.min_samples_floor = floor;
        self
    }

    /// Makes [`CloudClient::enroll`] exchange the token even when an identity is stored
    /// (replacing it): how an agent moves to another cloud endpoint.
    pub fn with_re_enroll(mut self, re_enroll: bool) -> Self {
        self.re_enroll = re_enroll;
        self
    }

    /// The privacy minimum in force: the larger of the local floor and the cloud's.
    pub fn min_quality_samples(&self) -> u64 {
        self.min_samples_floor
            .max(self.cloud_min_samples.load(Ordering::Relaxed))
    }

    /// Records the cloud's announced minimum and persists it with the identity when it
    /// changed (best effort: the in-memory value holds for this run either way).
    fn learn_min_samples(&self, announced: u64) {
        if self.cloud_min_samples.swap(announced, Ordering::Relaxed) == announced {
            return;
        }
        if let (Some(id), Some(dir)) = (self.identity(), &self.state_dir) {
            let id = Identity {
                min_quality_samples: announced,
                ..id
            };
            self.set_identity(Some(id.clone()));
            let written = serde_json::to_vec_pretty(&id)
                .map_err(|e| EdgeError::config("identity", e.to_string()))
                .and_then(|bytes| write_private(&identity_path(dir), &bytes));
            if let Err(e) = written {
                tracing::warn!("the cloud's report minimum was not persisted: {e}");
            }
        }
    }

    /// The stored identity may only be used with the endpoint that issued it: a changed
    /// `--cloud` must not receive the credential.
    pub fn check_identity_endpoint(&self) -> Result<()> {
        match &self.identity() {
            Some(id) if !same_endpoint(&id.endpoint, &self.endpoint) => {
                Err(EdgeError::EndpointChanged {
                    path: self
                        .state_dir
                        .as_deref()
                        .map(|d| identity_path(d).display().to_string())
                        .unwrap_or_else(|| IDENTITY_FILE.into()),
                    stored: id.endpoint.clone(),
                    given: self.endpoint.clone(),
                })
            }
            _ => Ok(()),
        }
    }

    pub fn endpoint_url(&self) -> &str {
        &self.endpoint
    }
    pub fn deadline(&self) -> Duration {
        self.deadline
    }
    /// The identity in use (a copy: rotation may replace it).
    pub fn identity(&self) -> Option<Identity> {
        self.identity
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_identity(&self, id: Option<Identity>) {
        *self.identity.write().unwrap_or_else(|e| e.into_inner()) = id;
    }

    /// Rotates the device credential when it nears expiry (two thirds of its lifetime gone,
    /// or within [`ROTATE_MARGIN`] when its issue time is unknown): the new identity is
    /// persisted atomically (0600) and used from then on; the old credential stays valid on
    /// the cloud for its grace period, covering requests already in flight. `Ok(false)`:
    /// nothing was due (or the credential never expires).
    pub async fn rotate_credential_if_due(&self, now_unix_ms: i64) -> Result<bool> {
        let Some(id) = self.identity() else {
            return Ok(false);
        };
        if !id.rotation_due(now_unix_ms) {
            return Ok(false);
        }
        let req = self.request(pb::Empty {}, true, self.deadline)?;
        let mut c = self.inner.clone();
        let r = self
            .unary("RotateCredential", c.rotate_credential(req))
            .await?;
        let new = Identity {
            credential: r.device_credential,
            credential_expires_unix_ms: r.credential_expires_unix_ms,
            credential_issued_unix_ms: now_unix_ms,
            ..id
        };
        let persisted = match &self.state_dir {
            Some(dir) => serde_json::to_vec_pretty(&new)
                .map_err(|e| EdgeError::config("identity", e.to_string()))
                .and_then(|bytes| write_private(&identity_path(dir), &bytes)),
            None => Ok(()),
        };
        // The cloud already switched: the new credential is the one to use, persisted or not.
        self.set_identity(Some(new));
        if let Err(e) = persisted {
            tracing::warn!(
                "the rotated credential was not persisted; the stored one stops working \
                 after the cloud's grace period: {e}"
            );
            return Err(e);
        }
        tracing::info!("device credential rotated");
        Ok(true)
    }

    fn state_dir(&self) -> Result<&Path> {
        self.state_dir
            .as_deref()
            .ok_or_else(|| EdgeError::config("state", "the cloud client has no state directory"))
    }

    /// A request with the deadline and, when `auth`, the bearer credential.
    pub(crate) fn request<T>(&self, msg: T, auth: bool, timeout: Duration) -> Result<Request<T>> {
        let mut r = Request::new(msg);
        r.set_timeout(timeout);
        if auth {
            let id = self.identity().ok_or_else(|| EdgeError::NotEnrolled {
                path: self
                    .state_dir
                    .as_deref()
                    .map(|d| identity_path(d).display().to_string())
                    .unwrap_or_else(|| "<no state dir>".into()),
            })?;
            self.check_identity_endpoint()?;
            let v = format!("Bearer {}", id.credential).parse().map_err(|_| {
                EdgeError::CorruptState {
                    path: IDENTITY_FILE.into(),
                    reason: "credential is not valid header text".into(),
                }
            })?;
            r.metadata_mut().insert("authorization", v);
        }
        Ok(r)
    }

    /// A cloud that requires mutual TLS refuses a device certificate after the TLS 1.3
    /// handshake, so the agent sees only a transport error on its first call (an alert, a
    /// closed connection or a broken pipe, whichever comes first): say which flags to check.
    fn mtls_hint(&self, e: EdgeError) -> EdgeError {
        match e {
            EdgeError::Cloud {
                op,
                code,
                mut message,
            } if self.endpoint.starts_with("https://")
                && matches!(
                    code,
                    tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown
                )
                && message.contains("transport error") =>
            {
                message.push_str(if self.client_cert {
                    " (TLS: if the cloud requires mutual TLS, it closes the connection when it \
                     does not trust the device certificate: --tls-cert must be signed by the CA \
                     of its --tls-client-ca)"
                } else {
                    " (TLS: if the cloud requires mutual TLS, it closes the connection of a \
                     device without a certificate: pass --tls-cert and --tls-key)"
                });
                EdgeError::Cloud { op, code, message }
            }
            e => e,
        }
    }

    /// Runs one unary call with the client-side deadline as a backstop to `grpc-timeout`.
    async fn unary<T, F>(&self, op: &'static str, fut: F) -> Result<T>
    where
        F: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(self.deadline + Duration::from_millis(200), fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(self.mtls_hint(status_err(op, s))),
            Err(_) => Err(EdgeError::Cloud {
                op,
                code: tonic::Code::DeadlineExceeded,
                message: format!("no answer within {:?}", self.deadline),
            }),
        }
    }

    /// Enrolls once: with a stored identity nothing is sent and `Ok(false)` is returned (an
    /// identity issued by another endpoint is `EndpointChanged`); otherwise, or with
    /// [`CloudClient::with_re_enroll`], the token is exchanged, the identity persisted (0600,
    /// atomic) and `Ok(true)` returned. Needs [`CloudClient::with_state_dir`].
    pub async fn enroll(
        &mut self,
        token: Option<&str>,
        device_class: pb::DeviceClass,
        agent_version: &str,
    ) -> Result<bool> {
        let dir = self.state_dir()?.to_path_buf();
        if !self.re_enroll {
            if self.identity().is_none() {
                self.set_identity(load_identity(&dir)?);
            }
            if self.identity().is_some() {
                self.check_identity_endpoint()?;
                return Ok(false);
            }
        }
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(EdgeError::NotEnrolled {
                path: identity_path(&dir).display().to_string(),
            });
        };
        let req = self.request(
            pb::EnrollRequest {
                enrollment_token: token.to_string(),
                device_class: device_class as i32,
                agent_version: agent_version.to_string(),
            },
            false,
            self.deadline,
        )?;
        let mut c = self.inner.clone();
        let e = self.unary("Enroll", c.enroll(req)).await?;
        let id = Identity {
            format_version: IDENTITY_FORMAT,
            endpoint: self.endpoint.clone(),
            device_id: e.device_id,
            fleet_id: e.fleet_id,
            credential: e.device_credential,
            credential_expires_unix_ms: e.credential_expires_unix_ms,
            credential_issued_unix_ms: now_unix_ms(),
            min_quality_samples: e.min_quality_samples,
        };
        let bytes = serde_json::to_vec_pretty(&id)
            .map_err(|e| EdgeError::config("identity", e.to_string()))?;
        write_private(&identity_path(&dir), &bytes)?;
        tracing::info!(device = %id.device_id, fleet = %id.fleet_id, "enrolled");
        self.cloud_min_samples
            .store(id.min_quality_samples, Ordering::Relaxed);
        self.set_identity(Some(id));
        self.re_enroll = false;
        Ok(true)
    }

    /// The fleet's desired state.
    pub async fn desired_state(&self) -> Result<DesiredState> {
        let req = self.request(pb::Empty {}, true, self.deadline)?;
        let mut c = self.inner.clone();
        self.unary("GetDesiredState", c.get_desired_state(req))
            .await
            .map(DesiredState::from)
    }

    /// The manifest and blob list of a supernet assigned to the fleet.
    pub async fn manifest(&self, supernet_id: &str) -> Result<pb::GetManifestResponse> {
        let req = self.request(
            pb::GetManifestRequest {
                supernet_id: supernet_id.to_string(),
            },
            true,
            self.deadline,
        )?;
        let mut c = self.inner.clone();
        self.unary("GetManifest", c.get_manifest(req)).await
    }

    /// Sends a heartbeat.
    pub async fn heartbeat(&self, h: &HeartbeatInput) -> Result<pb::HeartbeatResponse> {
        let req = self.request(h.to_request(), true, self.deadline)?;
        let mut c = self.inner.clone();
        let r = self.unary("Heartbeat", c.heartbeat(req)).await?;
        self.learn_min_samples(r.min_quality_samples);
        Ok(r)
    }

    /// Sends a report of aggregates. A report below the privacy minimum
    /// ([`CloudClient::min_quality_samples`]) is `ReportWithheld`, and nothing is sent. When
    /// the cloud is unreachable (a transient error), the report is kept as the pending one
    /// (replacing an older pending report) for [`CloudClient::flush_pending_report`], and
    /// the error is returned.
    pub async fn report(&self, agg: &AgentAggregates) -> Result<()> {
        let r = agg.to_report();
        self.check_minimum(&r)?;
        match self.send_report(r.clone()).await {
            Ok(()) => {
                *self
                    .pending_report
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = None;
                Ok(())
            }
            Err(e) => {
                if e.is_transient() {
                    *self
                        .pending_report
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(r);
                }
                Err(e)
            }
        }
    }

    /// The device-side privacy check: the quality of a report must rest on at least the
    /// minimum number of local images, or the report does not leave the device.
    fn check_minimum(&self, r: &pb::ReportRequest) -> Result<()> {
        let minimum = self.min_quality_samples();
        if r.quality_sample_count < minimum {
            return Err(EdgeError::ReportWithheld {
                samples: r.quality_sample_count,
                minimum,
            });
        }
        Ok(())
    }

    async fn send_report(&self, r: pb::ReportRequest) -> Result<()> {
        self.check_minimum(&r)?;
        let req = self.request(r, true, self.deadline)?;
        let mut c = self.inner.clone();
        self.unary("Report", c.report(req)).await.map(|_| ())
    }

    /// The report waiting for delivery, if any.
    pub fn pending_report(&self) -> Option<pb::ReportRequest> {
        self.pending_report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Retries the pending report: `Ok(true)` when one was delivered, `Ok(false)` when none
    /// was pending; on a transient failure it stays pending.
    pub async fn flush_pending_report(&self) -> Result<bool> {
        let Some(r) = self.pending_report() else {
            return Ok(false);
        };
        match self.send_report(r).await {
            Ok(()) => {
                *self
                    .pending_report
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = None;
                Ok(true)
            }
            Err(e) => {
                if !e.is_transient() {
                    // The cloud rejected it for good (e.g. invalid): do not retry forever.
                    *self
                        .pending_report
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = None;
                }
                Err(e)
            }
        }
    }

    pub(crate) fn raw(&self) -> DeviceServiceClient<Channel> {
        self.inner.clone()
    }
}
