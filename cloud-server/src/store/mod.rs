//! Persistence: one sqlx code path (`sqlx::Any`) over an SQLite file (WAL) or PostgreSQL.
//!
//! Portability rules the queries follow: `$N` placeholders (SQLite accepts them too); only
//! TEXT / BIGINT / DOUBLE PRECISION columns (UUIDs as text, times as Unix ms, flags as 0/1);
//! `INSERT ... ON CONFLICT` and `UPDATE ... RETURNING`, which both backends support. The one
//! dialect difference is the row lock of the job queue (`FOR UPDATE SKIP LOCKED` on
//! PostgreSQL; SQLite serialises writers anyway), chosen by [`Backend`].
//!
//! # Layout
//! - `oracles`: oracles and datasets.
//! - `jobs`: the job queue with leases, heartbeats, checkpoints and cancellation.
//! - `supernets`: supernet versions, their blobs and labels.
//! - `fleet`: fleets, desired state, devices, heartbeats, reports and aggregates.
//! - `rollouts`: staged rollouts, their decisions, and the reports their gates read.
//! - `tokens`: enrollment tokens, API tokens, device credentials (hashes only).
//! - `gc`: which blobs rows still reference (garbage collection, oracle deletion).
//! - `writer`: group commit of reports and heartbeats (one writer task, batched
//!   transactions, callers answered after the commit).
mod census;
mod fleet;
mod gc;
mod jobs;
mod oracles;
mod rollouts;
mod supernets;
mod tokens;
mod writer;

pub use census::Census;
pub use jobs::ClaimedJob;
pub use rollouts::Settle;
pub use supernets::{JobFence, NewSupernet};
pub use tokens::{ApiTokenRow, DeviceAuthRow, MAX_LOOKUP_BATCH};

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use uuid::Uuid;

use crate::error::{CloudError, Result};

/// The migrations embedded in the binary (`cloud-server/migrations`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Which database the URL pointed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A handle to the database (cheap to clone).
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    writer: writer::Writer,
    assigned: Arc<AssignmentCache>,
    /// Credential lookup queries sent (`tokens.rs`).
    credential_queries: Arc<AtomicU64>,
}

/// How long a positive "supernet is assigned to fleet" answer is reused.
const ASSIGNMENT_TTL: Duration = Duration::from_secs(5);
const ASSIGNMENT_CACHE_MAX: usize = 10_000;

/// Positive answers of [`Store::fleet_has_supernet`] (asked on every report). Only positive
/// answers are cached, so a newly assigned supernet is accepted at once; changes made through
/// this store clear the cache, and an unassignment by another process takes effect within
/// [`ASSIGNMENT_TTL`].
#[derive(Debug, Default)]
struct AssignmentCache {
    /// (entries, epoch): the epoch counts clears, so that a lookup that raced with a change
    /// does not cache what it read before the change.
    inner: Mutex<(Assignments, u64)>,
}

/// (fleet, supernet) -> when the assignment was last confirmed.
type Assignments = HashMap<(Uuid, Uuid), Instant>;

impl AssignmentCache {
    /// Whether the pair is cached as assigned; else the epoch to pass to [`Self::put`].
    fn get(&self, key: (Uuid, Uuid)) -> Result<(), u64> {
        let g = self.inner.lock().expect("assignment cache lock");
        match g.0.get(&key) {
            Some(t) if t.elapsed() < ASSIGNMENT_TTL => Ok(()),
            _ => Err(g.1),
        }
    }
    fn put(&self, key: (Uuid, Uuid), epoch: u64) {
        let mut g = self.inner.lock().expect("assignment cache lock");
        if g.1 != epoch {
            return;
        }
        if g.0.len() >= ASSIGNMENT_CACHE_MAX {
            g.0.clear();
        }
        g.0.insert(key, Instant::now());
    }
    fn clear(&self) {
        let mut g = self.inner.lock().expect("assignment cache lock");
        g.0.clear();
        g.1 += 1;
    }
}

impl Store {
    /// Connects to `url` (`sqlite://path` creates the file; `postgres://...`), sets WAL mode
    /// on SQLite. Does not migrate: call [`Store::migrate`].
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        Self::connect_with(url, max_connections, false).await
    }

    /// [`Store::connect`]; `durable_telemetry` makes reports and heartbeats wait for the WAL
    /// flush on PostgreSQL too (see [`writer`]).
    pub async fn connect_with(
        url: &str,
        max_connections: u32,
        durable_telemetry: bool,
    ) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let (url, backend) = if let Some(rest) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let url = if rest.contains("mode=") || rest.contains(":memory:") {
                format!("sqlite://{rest}")
            } else if rest.contains('?') {
                format!("sqlite://{rest}&mode=rwc")
            } else {
                format!("sqlite://{rest}?mode=rwc")
            };
            (url, Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (url.to_string(), Backend::Postgres)
        } else {
            return Err(CloudError::invalid(
                "database_url",
                "must start with sqlite:// or postgres://",
            ));
        };
        let opts = AnyConnectOptions::from_str(&url)?;
        if backend == Backend::Sqlite {
            // WAL is persistent per file. Switching needs an exclusive lock that busy_timeout
            // does not wait for, so do it once here rather than on every pooled connection.
            use sqlx::Connection;
            let mut c = sqlx::AnyConnection::connect_with(&opts).await?;
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&mut c)
                .await?;
            c.close().await?;
        }
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // NORMAL sync is durable in WAL mode except for the last
                        // transactions on power loss.
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA busy_timeout = 10000")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA foreign_keys = ON")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(opts)
            .await?;
        Ok(Store {
            writer: writer::Writer::spawn(
                pool.clone(),
                backend == Backend::Postgres && !durable_telemetry,
            ),
            pool,
            backend,
            assigned: Arc::default(),
            credential_queries: Arc::default(),
        })
    }

    /// Applies pending migrations (idempotent).
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Closes the pool (waits for connections to be returned).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Cheap liveness probe.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

fn get_uuid(row: &AnyRow, col: &str) -> Result<Uuid> {
    let s: String = row.try_get(col)?;
    Uuid::parse_str(&s).map_err(|e| CloudError::Internal(format!("column {col}: {e}")))
}

fn get_opt_uuid(row: &AnyRow, col: &str) -> Result<Option<Uuid>> {
    let s: Option<String> = row.try_get(col)?;
    s.filter(|s| !s.is_empty())
        .map(|s| {
            Uuid::parse_str(&s).map_err(|e| CloudError::Internal(format!("column {col}: {e}")))
        })
        .transpose()
}

fn get_u64(row: &AnyRow, col: &str) -> Result<u64> {
    let v: i64 = row.try_get(col)?;
    Ok(v.max(0) as u64)
}

/// Whether a database error is a unique-constraint violation.
fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.is_unique_violation()
                || d.message().contains("UNIQUE constraint failed")
                || d.code().as_deref() == Some("23505")
        }
        _ => false,
    }
}

/// A foreign-key violation (a row still referenced), on either backend.
fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.is_foreign_key_violation()
                || d.message().contains("FOREIGN KEY constraint failed")
                || d.code().as_deref() == Some("23503")
        }
        _ => false,
    }
}
