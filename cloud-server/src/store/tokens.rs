//! Credentials: enrollment tokens, API tokens and device credentials. Only sha256 hashes of
//! high-entropy tokens are stored (a fast hash is enough for 256-bit random secrets and
//! keeps the report path cheap).
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use sqlx::Row;
use uuid::Uuid;

use super::{get_opt_uuid, get_uuid, Store};
use crate::domain::{Device, DeviceStatus, Role};
use crate::error::{CloudError, Result};

/// Most credentials one lookup query asks for: far below the bind-parameter limits of both
/// databases (SQLite 32766, PostgreSQL 65535), large enough that a fleet reconnecting at once
/// costs a handful of queries.
pub const MAX_LOOKUP_BATCH: usize = 256;

/// `$1,$2,...,$n`: the same numbered placeholders on both backends (a device query uses the
/// list twice; numbered parameters may repeat).
fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// An API token as stored.
#[derive(Debug, Clone)]
pub struct ApiTokenRow {
    pub id: Uuid,
    pub role: Role,
    pub expires_ms: Option<i64>,
    pub revoked: bool,
    /// The one fleet the token is limited to (None: every fleet).
    pub fleet_id: Option<Uuid>,
}

/// What authenticating a device credential needs.
#[derive(Debug, Clone)]
pub struct DeviceAuthRow {
    pub device_id: Uuid,
    pub fleet_id: Uuid,
    pub status: DeviceStatus,
    pub expires_ms: Option<i64>,
}

impl Store {
    pub async fn insert_enrollment_token(
        &self,
        id: Uuid,
        fleet_id: Uuid,
        token_hash: &str,
        uses: u32,
        expires_ms: Option<i64>,
        now: i64,
    ) -> Result<()> {
        self.get_fleet(fleet_id).await?;
        sqlx::query(
            "INSERT INTO enrollment_tokens (id, fleet_id, token_hash, uses_left, expires_ms, \
             revoked, created_ms) VALUES ($1,$2,$3,$4,$5,0,$6)",
        )
        .bind(id.to_string())
        .bind(fleet_id.to_string())
        .bind(token_hash)
        .bind(uses as i64)
        .bind(expires_ms)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn revoke_enrollment_token(&self, id: Uuid) -> Result<()> {
        let n = sqlx::query("UPDATE enrollment_tokens SET revoked = 1 WHERE id = $1")
            .bind(id.to_string())
            .execute(&self.pool)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(CloudError::not_found("enrollment token", id.to_string()));
        }
        Ok(())
    }

    /// Consumes one use of an enrollment token and inserts the device, atomically. Returns
    /// `Ok(None)` when the token is unknown, used up, expired or revoked.
    pub async fn enroll_device(
        &self,
        token_hash: &str,
        mut device: Device,
        credential_hash: &str,
        credential_expires_ms: Option<i64>,
        now: i64,
    ) -> Result<Option<Device>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "UPDATE enrollment_tokens SET uses_left = uses_left - 1 WHERE token_hash = $1 \
             AND uses_left > 0 AND revoked = 0 AND (expires_ms IS NULL OR expires_ms > $2) \
             RETURNING fleet_id",
        )
        .bind(token_hash)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        device.fleet_id = get_uuid(&row, "fleet_id")?;
        Store::insert_device_tx(&mut tx, &device, credential_hash, credential_expires_ms).await?;
        tx.commit().await?;
        Ok(Some(device))
    }

    /// Stores a new API token (`t.revoked` is ignored: a new token is live).
    pub async fn insert_api_token(
        &self,
        t: &ApiTokenRow,
        token_hash: &str,
        description: &str,
        now: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_tokens (id, role, token_hash, description, expires_ms, revoked, \
             created_ms, fleet_id) VALUES ($1,$2,$3,$4,$5,0,$6,$7)",
        )
        .bind(t.id.to_string())
        .bind(t.role.as_str())
        .bind(token_hash)
        .bind(description)
        .bind(t.expires_ms)
        .bind(now)
        .bind(t.fleet_id.map(|f| f.to_string()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn revoke_api_token(&self, id: Uuid) -> Result<()> {
        let n = sqlx::query("UPDATE api_tokens SET revoked = 1 WHERE id = $1")
            .bind(id.to_string())
            .execute(&self.pool)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(CloudError::not_found("api token", id.to_string()));
        }
        Ok(())
    }

    /// (id, role, description, expires, revoked) of every API token, for `token list`.
    pub async fn list_api_tokens(&self) -> Result<Vec<(ApiTokenRow, String)>> {
        sqlx::query(
            "SELECT id, role, description, expires_ms, revoked, fleet_id FROM api_tokens \
             ORDER BY created_ms",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            let role: String = r.try_get("role")?;
            Ok((
                ApiTokenRow {
                    id: get_uuid(r, "id")?,
                    role: Role::parse(&role)?,
                    expires_ms: r.try_get("expires_ms")?,
                    revoked: r.try_get::<i64, _>("revoked")? != 0,
                    fleet_id: get_opt_uuid(r, "fleet_id")?,
                },
                r.try_get("description")?,
            ))
        })
        .collect()
    }

    /// The API tokens among `hashes` (at most [`MAX_LOOKUP_BATCH`]), by hash, in one query.
    pub async fn api_tokens_by_hashes(
        &self,
        hashes: &[String],
    ) -> Result<HashMap<String, ApiTokenRow>> {
        if hashes.is_empty() {
            return Ok(HashMap::new());
        }
        let sql = format!(
            "SELECT token_hash, id, role, expires_ms, revoked, fleet_id FROM api_tokens \
             WHERE token_hash IN ({})",
            placeholders(hashes.len())
        );
        let mut q = sqlx::query(&sql);
        for h in hashes {
            q = q.bind(h.as_str());
        }
        self.count_credential_query();
        q.fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                let role: String = r.try_get("role")?;
                Ok((
                    r.try_get::<String, _>("token_hash")?,
                    ApiTokenRow {
                        id: get_uuid(r, "id")?,
                        role: Role::parse(&role)?,
                        expires_ms: r.try_get("expires_ms")?,
                        revoked: r.try_get::<i64, _>("revoked")? != 0,
                        fleet_id: get_opt_uuid(r, "fleet_id")?,
                    },
                ))
            })
            .collect()
    }

    /// The devices holding any of `hashes` (at most [`MAX_LOOKUP_BATCH`]) as their current
    /// credential or as their previous one (rotated out, valid until
    /// `prev_credential_expires_ms`), by hash, in one query; `expires_ms` is that
    /// credential's.
    pub async fn devices_by_credentials(
        &self,
        hashes: &[String],
    ) -> Result<HashMap<String, DeviceAuthRow>> {
        if hashes.is_empty() {
            return Ok(HashMap::new());
        }
        let list = placeholders(hashes.len());
        let sql = format!(
            "SELECT id, fleet_id, status, credential_hash, credential_expires_ms, \
             prev_credential_hash, prev_credential_expires_ms FROM devices \
             WHERE credential_hash IN ({list}) OR prev_credential_hash IN ({list})"
        );
        let mut q = sqlx::query(&sql);
        for h in hashes {
            q = q.bind(h.as_str());
        }
        self.count_credential_query();
        let wanted: HashSet<&str> = hashes.iter().map(String::as_str).collect();
        let mut out = HashMap::new();
        for r in q.fetch_all(&self.pool).await? {
            let status: String = r.try_get("status")?;
            let (device_id, fleet_id) = (get_uuid(&r, "id")?, get_uuid(&r, "fleet_id")?);
            let row = |expires_ms: Option<i64>| DeviceAuthRow {
                device_id,
                fleet_id,
                status: DeviceStatus::parse(&status),
                expires_ms,
            };
            let current: String = r.try_get("credential_hash")?;
            if wanted.contains(current.as_str()) {
                let expires = r.try_get("credential_expires_ms")?;
                out.insert(current, row(expires));
            }
            let previous: Option<String> = r.try_get("prev_credential_hash")?;
            if let Some(previous) = previous.filter(|p| wanted.contains(p.as_str())) {
                // A previous credential without an end is no credential.
                let expires = r
                    .try_get::<Option<i64>, _>("prev_credential_expires_ms")?
                    .unwrap_or(0);
                out.entry(previous).or_insert_with(|| row(Some(expires)));
            }
        }
        Ok(out)
    }

    /// Credential lookup queries this store has sent (both kinds), for tests and the fleet
    /// bench: batching shows as far fewer queries than lookups.
    pub fn credential_queries(&self) -> u64 {
        self.credential_queries.load(Ordering::Relaxed)
    }

    fn count_credential_query(&self) {
        self.credential_queries.fetch_add(1, Ordering::Relaxed);
    }

    /// Makes `new_hash` the device's credential if `presented_hash` is its current one (and
    /// it is not revoked); the old one becomes the previous credential, valid until
    /// `grace_until_ms` or its own expiry, whichever is first. Returns that instant, or
    /// `None` when nothing changed.
    pub async fn rotate_device_credential(
        &self,
        device_id: Uuid,
        presented_hash: &str,
        new_hash: &str,
        new_expires_ms: Option<i64>,
        grace_until_ms: i64,
    ) -> Result<Option<i64>> {
        let row = sqlx::query(
            "UPDATE devices SET prev_credential_hash = credential_hash, \
             prev_credential_expires_ms = CASE WHEN credential_expires_ms IS NOT NULL \
               AND credential_expires_ms < $1 THEN credential_expires_ms ELSE $1 END, \
             credential_hash = $2, credential_expires_ms = $3 \
             WHERE id = $4 AND credential_hash = $5 AND status <> 'revoked' \
             RETURNING prev_credential_expires_ms",
        )
        .bind(grace_until_ms)
        .bind(new_hash)
        .bind(new_expires_ms)
        .bind(device_id.to_string())
        .bind(presented_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok(r.try_get::<i64, _>("prev_credential_expires_ms")?))
            .transpose()
    }
}
