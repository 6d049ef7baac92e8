//! Credentials: enrollment tokens, API tokens and device credentials. Only sha256 hashes of
//! high-entropy tokens are stored (a fast hash is enough for 256-bit random secrets and
//! keeps the report path cheap).
use sqlx::Row;
use uuid::Uuid;

use super::{get_opt_uuid, get_uuid, Store};
use crate::domain::{Device, DeviceStatus, Role};
use crate::error::{CloudError, Result};

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

    pub async fn api_token_by_hash(&self, hash: &str) -> Result<Option<ApiTokenRow>> {
        let row = sqlx::query(
            "SELECT id, role, expires_ms, revoked, fleet_id FROM api_tokens WHERE token_hash = $1",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let role: String = r.try_get("role")?;
            Ok(ApiTokenRow {
                id: get_uuid(&r, "id")?,
                role: Role::parse(&role)?,
                expires_ms: r.try_get("expires_ms")?,
                revoked: r.try_get::<i64, _>("revoked")? != 0,
                fleet_id: get_opt_uuid(&r, "fleet_id")?,
            })
        })
        .transpose()
    }

    /// The device holding `hash` as its current credential or as its previous one (rotated
    /// out, valid until `prev_credential_expires_ms`); `expires_ms` is that credential's.
    pub async fn device_by_credential(&self, hash: &str) -> Result<Option<DeviceAuthRow>> {
        let row = sqlx::query(
            "SELECT id, fleet_id, status, credential_hash, credential_expires_ms, \
             prev_credential_expires_ms FROM devices \
             WHERE credential_hash = $1 OR prev_credential_hash = $1",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let status: String = r.try_get("status")?;
            let current: String = r.try_get("credential_hash")?;
            let expires_ms = if current == hash {
                r.try_get("credential_expires_ms")?
            } else {
                // A previous credential without an end is no credential.
                Some(
                    r.try_get::<Option<i64>, _>("prev_credential_expires_ms")?
                        .unwrap_or(0),
                )
            };
            Ok(DeviceAuthRow {
                device_id: get_uuid(&r, "id")?,
                fleet_id: get_uuid(&r, "fleet_id")?,
                status: DeviceStatus::parse(&status),
                expires_ms,
            })
        })
        .transpose()
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
