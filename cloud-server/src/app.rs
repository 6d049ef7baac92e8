//! The shared state of a running cloud and the domain operations the services and the CLI
//! call (no prost types here).
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::auth::{generate_token, hash_token, Authenticator, TokenKind};
use crate::blobs::{sha256_hex, BlobStore};
use crate::domain::{
    now_ms, AdaptationReason, BlobRef, Device, DeviceClass, DeviceStatus, FleetAggregates,
    FleetEvent, FleetEventKind, Role, Supernet,
};
use crate::error::{CloudError, Result};
use crate::ops::metrics::Metrics;
use crate::ops::net::NetLimits;
use crate::store::{ApiTokenRow, JobFence, NewSupernet, Store};

/// Enrolments an enrollment token allows when none is asked for (one-shot).
pub const DEFAULT_ENROLLMENT_USES: u32 = 1;
/// Most enrolments one token may allow: a leaked token enrolls at most this many devices.
pub const MAX_ENROLLMENT_USES: u32 = 10_000;
/// Lifetime of an enrollment token when none is asked for.
pub const DEFAULT_ENROLLMENT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest lifetime of an enrollment token.
pub const MAX_ENROLLMENT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default lifetime of a device credential (`serve --device-credential-ttl-secs`).
pub const DEFAULT_DEVICE_CREDENTIAL_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default validity of a rotated-out credential.
pub const DEFAULT_CREDENTIAL_GRACE: Duration = Duration::from_secs(15 * 60);
/// Default reuse of a credential lookup (`serve --auth-cache-ttl-secs`): twice the default
/// heartbeat interval, so heartbeats hit the cache; also the bound on how late this process
/// sees a revocation made by another one.
pub const DEFAULT_AUTH_CACHE_TTL: Duration = Duration::from_secs(60);

/// `now + ttl` in Unix ms, or INVALID_ARGUMENT naming `field` when it does not fit (a TTL
/// of u64::MAX seconds must be refused, not wrap or panic).
pub fn expiry_ms(field: &str, now: i64, ttl: Duration) -> Result<i64> {
    i64::try_from(ttl.as_millis())
        .ok()
        .and_then(|ms| now.checked_add(ms))
        .ok_or_else(|| CloudError::invalid(field, "too large"))
}

/// Server configuration (filled by the CLI or by tests).
#[derive(Debug, Clone)]
pub struct Config {
    /// `sqlite://path` or `postgres://...`.
    pub database_url: String,
    /// Root of the local blob store; with `blob_url`, the local scratch area for uploads.
    pub blob_dir: PathBuf,
    /// Object store for blobs (`s3://bucket/prefix` with the `s3` feature, `file:///dir`);
    /// `None`: local disk under `blob_dir`.
    pub blob_url: Option<String>,
    pub db_max_connections: u32,
    /// Largest accepted oracle weights file.
    pub max_oracle_bytes: u64,
    /// Largest accepted dataset upload (sum of its shards).
    pub max_dataset_bytes: u64,
    /// The only directory under which `file://` datasets may be registered (`None`: such
    /// registrations are refused).
    pub dataset_root: Option<PathBuf>,
    /// The only `s3://bucket/prefix` locations at or under which datasets may be registered
    /// (empty: `s3://` registrations are refused).
    pub dataset_s3_prefixes: Vec<String>,
    /// Privacy minimum of samples behind a reported quality estimate.
    pub min_report_samples: u64,
    /// Heartbeat interval suggested to agents.
    pub heartbeat_interval: Duration,
    /// Devices missing this many heartbeats are marked stale.
    pub stale_after_missed: u32,
    /// Requests in flight beyond this are shed with RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: usize,
    /// In-process job workers (0 = jobs run only in `worker` processes).
    pub workers: usize,
    pub job_lease: Duration,
    pub job_max_attempts: u32,
    /// How often an idle worker polls the queue.
    pub job_poll: Duration,
    /// How long a credential lookup is reused (see `auth::cache`): revocations by another
    /// process apply here within it. Longer than the heartbeat interval, so a device's
    /// heartbeats normally hit the cache.
    pub auth_cache_ttl: Duration,
    /// Lifetime of device credentials (`None` = until revoked); agents rotate before it ends.
    pub device_credential_ttl: Option<Duration>,
    /// How long a device's previous credential keeps working after `RotateCredential`
    /// (covers a response lost in flight and other replicas' auth caches).
    pub credential_grace: Duration,
    /// k of the dashboard's privacy floor: aggregate groups of fewer devices are suppressed,
    /// extremes are dropped below 2k, and a viewer's aggregates move in steps of k reports.
    pub min_group_devices: u32,
    /// How long health reports NOT_SERVING before the listener closes on shutdown.
    pub drain_grace: Duration,
    /// PostgreSQL: commit reports and heartbeats synchronously (see `store::writer`).
    pub durable_telemetry: bool,
    /// Per-principal quotas, timeouts and HTTP/2 limits (`ops::net`).
    pub net: NetLimits,
    /// How often the rollout engine judges running rollouts (its lease is three ticks).
    pub rollout_tick: Duration,
}

impl Config {
    /// Defaults for a data directory (SQLite file and blobs inside it).
    pub fn for_data_dir(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        Config {
            database_url: format!("sqlite://{}", dir.join("cloud.db").display()),
            blob_dir: dir.join("blobs"),
            blob_url: None,
            db_max_connections: 8,
            max_oracle_bytes: 512 << 20,
            max_dataset_bytes: 2048 << 20,
            dataset_root: None,
            dataset_s3_prefixes: Vec::new(),
            min_report_samples: 100,
            heartbeat_interval: Duration::from_secs(30),
            stale_after_missed: 3,
            max_concurrent_requests: 512,
            workers: 1,
            job_lease: Duration::from_secs(30),
            job_max_attempts: 3,
            job_poll: Duration::from_secs(1),
            auth_cache_ttl: DEFAULT_AUTH_CACHE_TTL,
            device_credential_ttl: Some(DEFAULT_DEVICE_CREDENTIAL_TTL),
            credential_grace: DEFAULT_CREDENTIAL_GRACE,
            min_group_devices: 5,
            drain_grace: Duration::from_secs(2),
            durable_telemetry: false,
            net: NetLimits::default(),
            rollout_tick: Duration::from_secs(5),
        }
    }
}

/// Everything a request handler needs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct App {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    store: Store,
    blobs: BlobStore,
    auth: Authenticator,
    fleet_events: broadcast::Sender<FleetEvent>,
    job_events: broadcast::Sender<Uuid>,
    shutdown: CancellationToken,
    metrics: Metrics,
    /// Viewers' aggregates per fleet filter: (taken at, floored aggregates).
    viewer_aggregates: std::sync::Mutex<HashMap<Option<Uuid>, (i64, FleetAggregates)>>,
}

/// Output of enrolling a device.
#[derive(Debug, Clone)]
pub struct Enrollment {
    pub device_id: Uuid,
    pub fleet_id: Uuid,
    pub credential: String,
    pub expires_ms: Option<i64>,
}

/// Output of rotating a device credential.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub credential: String,
    pub expires_ms: Option<i64>,
    pub previous_valid_until_ms: i64,
}

/// A freshly created secret (shown once).
#[derive(Debug, Clone)]
pub struct NewToken {
    pub id: Uuid,
    pub token: String,
    pub expires_ms: Option<i64>,
}

impl App {
    /// Connects the store (migrating it) and opens the blob store.
    pub async fn open(config: Config) -> Result<Self> {
        let store = Store::connect_with(
            &config.database_url,
            config.db_max_connections,
            config.durable_telemetry,
        )
        .await?;
        store.migrate().await?;
        let blobs = match &config.blob_url {
            Some(url) => BlobStore::open_url(url, &config.blob_dir).await?,
            None => BlobStore::open(&config.blob_dir).await?,
        };
        tracing::info!(blobs = %blobs.describe(), "blob store open");
        Ok(Self::from_parts(config, store, blobs))
    }

    pub fn from_parts(config: Config, store: Store, blobs: BlobStore) -> Self {
        let auth = Authenticator::new(store.clone(), config.auth_cache_ttl);
        App {
            inner: Arc::new(Inner {
                config,
                store,
                blobs,
                auth,
                fleet_events: broadcast::channel(1024).0,
                job_events: broadcast::channel(1024).0,
                shutdown: CancellationToken::new(),
                metrics: Metrics::default(),
                viewer_aggregates: Default::default(),
            }),
        }
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }
    pub fn store(&self) -> &Store {
        &self.inner.store
    }
    pub fn blobs(&self) -> &BlobStore {
        &self.inner.blobs
    }
    pub fn auth(&self) -> &Authenticator {
        &self.inner.auth
    }
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }
    /// Cancelled when the server starts draining; long streams end on it.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// Publishes a fleet change to `WatchFleet` subscribers (dropped if nobody listens).
    pub fn emit_fleet(
        &self,
        kind: FleetEventKind,
        fleet_id: Uuid,
        device_id: Option<Uuid>,
        supernet_id: Option<Uuid>,
    ) {
        let _ = self.inner.fleet_events.send(FleetEvent {
            kind,
            fleet_id,
            device_id,
            supernet_id,
            unix_ms: now_ms(),
        });
    }
    pub fn subscribe_fleet(&self) -> broadcast::Receiver<FleetEvent> {
        self.inner.fleet_events.subscribe()
    }
    /// Signals that a job row changed (wakes `WatchJob` streams and idle workers).
    pub fn emit_job(&self, id: Uuid) {
        let _ = self.inner.job_events.send(id);
    }
    pub fn subscribe_jobs(&self) -> broadcast::Receiver<Uuid> {
        self.inner.job_events.subscribe()
    }

    /// Creates an API token with a role, valid for every fleet.
    pub async fn create_api_token(
        &self,
        role: Role,
        description: &str,
        ttl: Option<Duration>,
    ) -> Result<NewToken> {
        self.create_fleet_api_token(role, description, ttl, None)
            .await
    }

    /// Creates an API token with a role, limited to one existing fleet when `fleet` is set
    /// (developer and viewer only: operator actions are not about one fleet).
    pub async fn create_fleet_api_token(
        &self,
        role: Role,
        description: &str,
        ttl: Option<Duration>,
        fleet: Option<Uuid>,
    ) -> Result<NewToken> {
        if role == Role::Device {
            return Err(CloudError::invalid(
                "role",
                "device credentials come from enrollment",
            ));
        }
        if let Some(f) = fleet {
            if role == Role::Admin {
                return Err(CloudError::invalid(
                    "fleet_id",
                    "admin tokens cannot be limited to a fleet",
                ));
            }
            self.store().get_fleet(f).await?;
        }
        let (token, hash) = generate_token(TokenKind::Api);
        let id = Uuid::new_v4();
        let now = now_ms();
        let expires_ms = ttl.map(|t| expiry_ms("ttl_seconds", now, t)).transpose()?;
        self.store()
            .insert_api_token(
                &ApiTokenRow {
                    id,
                    role,
                    expires_ms,
                    revoked: false,
                    fleet_id: fleet,
                },
                &hash,
                description,
                now,
            )
            .await?;
        Ok(NewToken {
            id,
            token,
            expires_ms,
        })
    }

    /// Creates an enrollment token for a fleet, valid for `uses` enrolments (at most
    /// [`MAX_ENROLLMENT_USES`]) until `ttl` has passed (default 24 h, at most 30 days):
    /// every token expires.
    pub async fn create_enrollment_token(
        &self,
        fleet_id: Uuid,
        uses: u32,
        ttl: Option<Duration>,
    ) -> Result<NewToken> {
        if uses == 0 || uses > MAX_ENROLLMENT_USES {
            return Err(CloudError::invalid(
                "uses",
                format!("must be in 1..={MAX_ENROLLMENT_USES}"),
            ));
        }
        let ttl = ttl.unwrap_or(DEFAULT_ENROLLMENT_TTL);
        if ttl > MAX_ENROLLMENT_TTL {
            return Err(CloudError::invalid(
                "ttl_seconds",
                format!("at most {} s (30 days)", MAX_ENROLLMENT_TTL.as_secs()),
            ));
        }
        let (token, hash) = generate_token(TokenKind::Enrollment);
        let id = Uuid::new_v4();
        let now = now_ms();
        let expires_ms = Some(expiry_ms("ttl_seconds", now, ttl)?);
        self.store()
            .insert_enrollment_token(id, fleet_id, &hash, uses, expires_ms, now)
            .await?;
        Ok(NewToken {
            id,
            token,
            expires_ms,
        })
    }

    pub async fn revoke_api_token(&self, id: Uuid) -> Result<()> {
        self.store().revoke_api_token(id).await?;
        self.auth().invalidate_api_token(id);
        Ok(())
    }

    pub async fn revoke_device(&self, id: Uuid) -> Result<()> {
        let fleet = self.store().revoke_device(id).await?;
        self.auth().invalidate_device(id);
        self.emit_fleet(FleetEventKind::DeviceRevoked, fleet, Some(id), None);
        Ok(())
    }

    /// Exchanges an enrollment token for a device id and credential.
    pub async fn enroll(
        &self,
        token: &str,
        class: DeviceClass,
        agent_version: &str,
    ) -> Result<Enrollment> {
        if !token.starts_with("anv1_enr_") {
            return Err(CloudError::Unauthenticated(
                "not an enrollment token".into(),
            ));
        }
        let now = now_ms();
        let (credential, cred_hash) = generate_token(TokenKind::Device);
        let expires_ms = self.credential_expiry(now)?;
        let device = Device {
            id: Uuid::new_v4(),
            fleet_id: Uuid::nil(),
            device_class: class,
            status: DeviceStatus::Online,
            agent_version: agent_version.to_string(),
            active_supernet_id: None,
            active_subnet: String::new(),
            latency_p50_ms: 0.0,
            latency_p95_ms: 0.0,
            last_reason: AdaptationReason(0),
            applied_generation: 0,
            enrolled_ms: now,
            last_heartbeat_ms: now,
        };
        let device = self
            .store()
            .enroll_device(&hash_token(token), device, &cred_hash, expires_ms, now)
            .await?
            .ok_or_else(|| {
                CloudError::Unauthenticated(
                    "enrollment token unknown, used up, expired or revoked".into(),
                )
            })?;
        self.emit_fleet(
            FleetEventKind::DeviceEnrolled,
            device.fleet_id,
            Some(device.id),
            None,
        );
        Ok(Enrollment {
            device_id: device.id,
            fleet_id: device.fleet_id,
            credential,
            expires_ms,
        })
    }

    fn credential_expiry(&self, now: i64) -> Result<Option<i64>> {
        self.config()
            .device_credential_ttl
            .map(|t| expiry_ms("device_credential_ttl", now, t))
            .transpose()
    }

    /// Replaces `device_id`'s credential, which must be `presented` (the current one, not
    /// one in its grace period): the old one keeps working for [`Config::credential_grace`]
    /// (never beyond its own expiry), then is refused.
    pub async fn rotate_credential(&self, device_id: Uuid, presented: &str) -> Result<Rotation> {
        let now = now_ms();
        let (credential, cred_hash) = generate_token(TokenKind::Device);
        let expires_ms = self.credential_expiry(now)?;
        let grace_until = expiry_ms("credential_grace", now, self.config().credential_grace)?;
        let previous_valid_until_ms = self
            .store()
            .rotate_device_credential(
                device_id,
                &hash_token(presented),
                &cred_hash,
                expires_ms,
                grace_until,
            )
            .await?
            .ok_or_else(|| {
                CloudError::Unauthenticated(
                    "only the device's current credential may rotate it".into(),
                )
            })?;
        // Cached lookups of the old credential carry its old expiry.
        self.auth().invalidate_device(device_id);
        Ok(Rotation {
            credential,
            expires_ms,
            previous_valid_until_ms,
        })
    }

    /// Dashboard aggregates under the privacy floor (`Config::min_group_devices`).
    pub async fn fleet_aggregates(&self, fleet: Option<Uuid>) -> Result<FleetAggregates> {
        let mut a = self.store().fleet_aggregates(fleet).await?;
        a.apply_floor(self.config().min_group_devices);
        Ok(a)
    }

    /// A viewer's aggregates: the floored snapshot is refreshed only once at least k devices
    /// have reported since it was taken, so two views never differ by one device's report
    /// (differencing). Per process: replicas keep their own snapshots.
    pub async fn viewer_fleet_aggregates(&self, fleet: Option<Uuid>) -> Result<FleetAggregates> {
        let k = u64::from(self.config().min_group_devices.max(1));
        // Only existing fleets get a snapshot (bounded; never evicted, since a fresh view
        // after an eviction could differ from the last one by a single report).
        if let Some(f) = fleet {
            self.store().get_fleet(f).await?;
        }
        let cached = self
            .inner
            .viewer_aggregates
            .lock()
            .expect("aggregates lock")
            .get(&fleet)
            .cloned();
        if let Some((taken, a)) = cached {
            if self.store().devices_reported_since(fleet, taken).await? < k {
                return Ok(a);
            }
        }
        // Taken before the read: a report at this instant may be in the snapshot or not,
        // and is then not counted towards the next refresh (errs towards fewer refreshes).
        let taken = now_ms();
        let a = self.fleet_aggregates(fleet).await?;
        self.inner
            .viewer_aggregates
            .lock()
            .expect("aggregates lock")
            .insert(fleet, (taken, a.clone()));
        Ok(a)
    }

    /// Registers a supernet version whose module blobs are already in the blob store.
    ///
    /// The manifest is the core's artifact manifest; its module blobs are the blobs devices
    /// of an assigned fleet may fetch. Every listed blob must exist and match its size.
    pub async fn register_supernet(
        &self,
        name: &str,
        oracle_id: Uuid,
        job_id: Option<Uuid>,
        manifest_json: &[u8],
    ) -> Result<Supernet> {
        let (refs, manifest) = self.check_manifest(manifest_json).await?;
        self.store()
            .insert_supernet(&NewSupernet {
                name,
                oracle_id,
                job_id,
                manifest_json: manifest,
                manifest_sha256: &sha256_hex(manifest_json),
                blobs: &refs,
            })
            .await
    }

    /// Registers the supernet a job produced and settles the job as succeeded, atomically
    /// and fenced by `worker_id`'s lease: `Ok(None)` when the lease was lost (nothing
    /// stored; the job's new owner will register its own result).
    pub async fn register_job_supernet(
        &self,
        job: &crate::domain::Job,
        worker_id: &str,
        manifest_json: &[u8],
    ) -> Result<Option<Supernet>> {
        let (refs, manifest) = self.check_manifest(manifest_json).await?;
        self.store()
            .finish_job_with_supernet(
                &NewSupernet {
                    name: &job.supernet_name,
                    oracle_id: job.oracle_id.ok_or_else(|| {
                        CloudError::Internal("elastification job without an oracle".into())
                    })?,
                    job_id: Some(job.id),
                    manifest_json: manifest,
                    manifest_sha256: &sha256_hex(manifest_json),
                    blobs: &refs,
                },
                JobFence {
                    job_id: job.id,
                    worker_id,
                    now: now_ms(),
                },
            )
            .await
    }

    /// Registers the oracle an oracle-training job produced and settles the job, fenced by
    /// `worker_id`'s lease like [`App::register_job_supernet`]: the weights are validated
    /// exactly as an upload is ([`crate::validate::validate_oracle`]), stored as a blob, and
    /// the oracle row and the job's success committed together. `Ok(None)`: lease lost.
    pub async fn register_job_oracle(
        &self,
        job: &crate::domain::Job,
        worker_id: &str,
        out: &crate::domain::OracleOutput,
    ) -> Result<Option<crate::domain::Oracle>> {
        let (arch, weights) = (out.arch_json.clone(), out.weights.clone());
        let info = tokio::task::spawn_blocking(move || {
            crate::validate::validate_oracle(arch.as_bytes(), &weights)
        })
        .await
        .map_err(|e| CloudError::Internal(format!("validation task: {e}")))??;
        let blob = self.blobs().put(&out.weights).await?;
        let o = crate::domain::Oracle {
            id: Uuid::new_v4(),
            name: job.supernet_name.clone(),
            family: info.family,
            weights_sha256: blob.sha256,
            size_bytes: blob.size_bytes,
            num_params: info.num_params,
            num_tensors: info.num_tensors,
            arch_json: out.arch_json.clone(),
            created_ms: now_ms(),
        };
        self.store()
            .finish_job_with_oracle(
                &o,
                &out.report_json,
                JobFence {
                    job_id: job.id,
                    worker_id,
                    now: now_ms(),
                },
            )
            .await
    }

    /// Validates a manifest and checks every module blob it lists is stored with its size.
    async fn check_manifest<'m>(&self, manifest_json: &'m [u8]) -> Result<(Vec<BlobRef>, &'m str)> {
        let blobs = manifest_blobs(manifest_json)?;
        let mut refs = Vec::with_capacity(blobs.len());
        for (i, (sha, declared)) in blobs.into_iter().enumerate() {
            let size = self.blobs().size(&sha).await.map_err(|_| {
                CloudError::FailedPrecondition(format!(
                    "manifest modules[{i}]: blob {sha} is not stored"
                ))
            })?;
            if declared.is_some_and(|d| d != size) {
                return Err(CloudError::invalid(
                    format!("manifest.modules[{i}].size"),
                    format!("declared {declared:?}, stored blob has {size} bytes"),
                ));
            }
            refs.push(BlobRef {
                sha256: sha,
                size_bytes: size,
            });
        }
        let manifest = std::str::from_utf8(manifest_json)
            .map_err(|_| CloudError::invalid("manifest", "not UTF-8"))?;
        Ok((refs, manifest))
    }
}

/// The (digest, size) of every module blob a supernet manifest lists (stem, head and every
/// (position, choice)), deduplicated; the manifest is validated by the model core.
pub fn manifest_blobs(manifest_json: &[u8]) -> Result<Vec<(String, Option<u64>)>> {
    let m = adaptivenet_core::artifact::Manifest::from_json(manifest_json)
        .map_err(|e| CloudError::invalid("manifest", e.to_string()))?;
    let mut out: Vec<(String, Option<u64>)> = Vec::new();
    for (_, e) in m.modules() {
        if !out.iter().any(|(s, _)| *s == e.sha256) {
            out.push((e.sha256.clone(), Some(e.size)));
        }
    }
    Ok(out)
}
