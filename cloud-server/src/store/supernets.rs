//! Supernet versions (immutable, numbered per name), the blobs each may serve, and labels.
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{get_opt_uuid, get_u64, get_uuid, is_unique_violation, Store};
use crate::domain::{now_ms, BlobRef, Label, Page, Supernet};
use crate::error::{CloudError, Result};

const SUPERNET_COLS: &str = "id, name, version, oracle_id, job_id, manifest_sha256, num_modules, \
    total_bytes, created_ms";

fn supernet_from_row(r: &AnyRow) -> Result<Supernet> {
    Ok(Supernet {
        id: get_uuid(r, "id")?,
        name: r.try_get("name")?,
        version: get_u64(r, "version")?,
        oracle_id: get_uuid(r, "oracle_id")?,
        job_id: get_opt_uuid(r, "job_id")?,
        manifest_sha256: r.try_get("manifest_sha256")?,
        num_modules: get_u64(r, "num_modules")? as u32,
        total_bytes: get_u64(r, "total_bytes")?,
        created_ms: r.try_get("created_ms")?,
    })
}

/// What a new supernet version consists of.
pub struct NewSupernet<'a> {
    pub name: &'a str,
    pub oracle_id: Uuid,
    pub job_id: Option<Uuid>,
    pub manifest_json: &'a str,
    pub manifest_sha256: &'a str,
    pub blobs: &'a [BlobRef],
}

/// The lease a job's supernet registration is fenced by.
#[derive(Debug, Clone, Copy)]
pub struct JobFence<'a> {
    pub job_id: Uuid,
    pub worker_id: &'a str,
    pub now: i64,
}

impl Store {
    /// Inserts the next version of `name` with its blob list, in one transaction.
    pub async fn insert_supernet(&self, n: &NewSupernet<'_>) -> Result<Supernet> {
        self.insert_supernet_fenced(n, None)
            .await?
            .ok_or_else(|| CloudError::Internal("unfenced insert refused".into()))
    }

    /// Registers a job's supernet and marks the job succeeded in one transaction, fenced by
    /// the worker's lease: `Ok(None)` (nothing stored) when the lease is lost, so a worker
    /// whose job was taken over can never add a second version for it.
    pub async fn finish_job_with_supernet(
        &self,
        n: &NewSupernet<'_>,
        fence: JobFence<'_>,
    ) -> Result<Option<Supernet>> {
        self.insert_supernet_fenced(n, Some(fence)).await
    }

    async fn insert_supernet_fenced(
        &self,
        n: &NewSupernet<'_>,
        fence: Option<JobFence<'_>>,
    ) -> Result<Option<Supernet>> {
        // Two writers may pick the same next version: the UNIQUE(name, version) makes the
        // loser retry.
        for _ in 0..5 {
            let mut tx = self.pool.begin().await?;
            let max: Option<i64> =
                sqlx::query("SELECT MAX(version) AS v FROM supernets WHERE name = $1")
                    .bind(n.name)
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get("v")?;
            let s = Supernet {
                id: Uuid::new_v4(),
                name: n.name.to_string(),
                version: max.unwrap_or(0) as u64 + 1,
                oracle_id: n.oracle_id,
                job_id: n.job_id,
                manifest_sha256: n.manifest_sha256.to_string(),
                num_modules: n.blobs.len() as u32,
                total_bytes: n.blobs.iter().map(|b| b.size_bytes).sum(),
                created_ms: now_ms(),
            };
            let ins = sqlx::query(
                "INSERT INTO supernets (id, name, version, oracle_id, job_id, manifest_json, \
                 manifest_sha256, num_modules, total_bytes, created_ms) \
                 VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)",
            )
            .bind(s.id.to_string())
            .bind(&s.name)
            .bind(s.version as i64)
            .bind(s.oracle_id.to_string())
            .bind(s.job_id.map(|j| j.to_string()))
            .bind(n.manifest_json)
            .bind(&s.manifest_sha256)
            .bind(s.num_modules as i64)
            .bind(s.total_bytes as i64)
            .bind(s.created_ms)
            .execute(&mut *tx)
            .await;
            match ins {
                Err(e) if is_unique_violation(&e) => {
                    tx.rollback().await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
                Ok(_) => {}
            }
            for b in n.blobs {
                sqlx::query(
                    "INSERT INTO supernet_blobs (supernet_id, sha256, size_bytes) \
                     VALUES ($1,$2,$3) ON CONFLICT (supernet_id, sha256) DO NOTHING",
                )
                .bind(s.id.to_string())
                .bind(&b.sha256)
                .bind(b.size_bytes as i64)
                .execute(&mut *tx)
                .await?;
            }
            if let Some(f) = fence {
                let held = sqlx::query(
                    "UPDATE jobs SET state = 'succeeded', error = NULL, supernet_id = $1, \
                     updated_ms = $2, lease_owner = NULL, lease_expires_ms = NULL, progress = 1.0 \
                     WHERE id = $3 AND lease_owner = $4 AND state = 'running'",
                )
                .bind(s.id.to_string())
                .bind(f.now)
                .bind(f.job_id.to_string())
                .bind(f.worker_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if held != 1 {
                    tx.rollback().await?;
                    return Ok(None);
                }
            }
            tx.commit().await?;
            return Ok(Some(s));
        }
        Err(CloudError::Unavailable(
            "supernet version contention, retry".into(),
        ))
    }

    pub async fn get_supernet(&self, id: Uuid) -> Result<Supernet> {
        let q = format!("SELECT {SUPERNET_COLS} FROM supernets WHERE id = $1");
        let row = sqlx::query(&q)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| CloudError::not_found("supernet", id.to_string()))?;
        supernet_from_row(&row)
    }

    /// The supernet with its manifest and blob list.
    pub async fn get_supernet_full(&self, id: Uuid) -> Result<(Supernet, String, Vec<BlobRef>)> {
        let s = self.get_supernet(id).await?;
        let manifest: String = sqlx::query("SELECT manifest_json FROM supernets WHERE id = $1")
            .bind(id.to_string())
            .fetch_one(&self.pool)
            .await?
            .try_get("manifest_json")?;
        let blobs = sqlx::query(
            "SELECT sha256, size_bytes FROM supernet_blobs WHERE supernet_id = $1 ORDER BY sha256",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(BlobRef {
                sha256: r.try_get("sha256")?,
                size_bytes: get_u64(r, "size_bytes")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        Ok((s, manifest, blobs))
    }

    pub async fn list_supernets(&self, page: Page, name: Option<&str>) -> Result<Vec<Supernet>> {
        let rows = match name {
            Some(n) => {
                let q = format!(
                    "SELECT {SUPERNET_COLS} FROM supernets WHERE name = $3 \
                     ORDER BY created_ms, id LIMIT $1 OFFSET $2"
                );
                sqlx::query(&q)
                    .bind(page.limit)
                    .bind(page.offset)
                    .bind(n)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                let q = format!(
                    "SELECT {SUPERNET_COLS} FROM supernets ORDER BY created_ms, id LIMIT $1 OFFSET $2"
                );
                sqlx::query(&q)
                    .bind(page.limit)
                    .bind(page.offset)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(supernet_from_row).collect()
    }

    /// Points `label` of a fleet at a supernet; bumps the fleet's generation when its desired
    /// state follows that label.
    pub async fn publish_label(
        &self,
        fleet_id: Uuid,
        label: &str,
        supernet_id: Uuid,
    ) -> Result<Label> {
        self.get_supernet(supernet_id).await?;
        self.get_fleet(fleet_id).await?;
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO fleet_labels (fleet_id, label, supernet_id, updated_ms) VALUES ($1,$2,$3,$4) \
             ON CONFLICT (fleet_id, label) DO UPDATE SET supernet_id = $3, updated_ms = $4",
        )
        .bind(fleet_id.to_string())
        .bind(label)
        .bind(supernet_id.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE fleets SET generation = generation + 1 WHERE id = $1 AND desired_label = $2",
        )
        .bind(fleet_id.to_string())
        .bind(label)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.assigned.clear();
        Ok(Label {
            fleet_id,
            label: label.to_string(),
            supernet_id,
            updated_ms: now,
        })
    }

    /// Every label (of `fleet`, or of all fleets), by fleet and label name.
    pub async fn list_labels(&self, fleet: Option<Uuid>) -> Result<Vec<Label>> {
        let rows = sqlx::query(
            "SELECT fleet_id, label, supernet_id, updated_ms FROM fleet_labels \
             WHERE ($1 IS NULL OR fleet_id = $1) ORDER BY fleet_id, label",
        )
        .bind(fleet.map(|f| f.to_string()))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Label {
                    fleet_id: get_uuid(r, "fleet_id")?,
                    label: r.try_get("label")?,
                    supernet_id: get_uuid(r, "supernet_id")?,
                    updated_ms: r.try_get("updated_ms")?,
                })
            })
            .collect()
    }

    /// The supernet a label of a fleet points at.
    pub async fn resolve_label(&self, fleet_id: Uuid, label: &str) -> Result<Option<Uuid>> {
        let row =
            sqlx::query("SELECT supernet_id FROM fleet_labels WHERE fleet_id = $1 AND label = $2")
                .bind(fleet_id.to_string())
                .bind(label)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| get_uuid(&r, "supernet_id")).transpose()
    }

    /// Whether a supernet is assigned to a fleet: through any label, its desired state, or
    /// either side of one of its rollouts (a settled one too, so that a device still serving
    /// B while a rollback reaches it can report what it serves). Blob downloads are narrower
    /// (`fleet_blob_size`: active rollouts only).
    pub async fn fleet_has_supernet(&self, fleet_id: Uuid, supernet_id: Uuid) -> Result<bool> {
        let Err(epoch) = self.assigned.get((fleet_id, supernet_id)) else {
            return Ok(true);
        };
        let n: i64 = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM fleet_labels WHERE fleet_id = $1 AND supernet_id = $2) + \
             (SELECT COUNT(*) FROM fleets WHERE id = $1 AND desired_supernet_id = $2) + \
             (SELECT COUNT(*) FROM rollouts WHERE fleet_id = $1 AND \
              (from_supernet_id = $2 OR to_supernet_id = $2)) AS n",
        )
        .bind(fleet_id.to_string())
        .bind(supernet_id.to_string())
        .fetch_one(&self.pool)
        .await?
        .try_get("n")?;
        if n > 0 {
            self.assigned.put((fleet_id, supernet_id), epoch);
        }
        Ok(n > 0)
    }

    /// The size of a blob if some supernet assigned to the fleet lists it; `None` when the
    /// fleet may not read it. `Err(NotFound)` when no supernet lists it at all.
    pub async fn fleet_blob_size(&self, fleet_id: Uuid, sha256: &str) -> Result<Option<u64>> {
        let row = sqlx::query(
            "SELECT b.size_bytes AS size_bytes FROM supernet_blobs b WHERE b.sha256 = $1 AND \
             (b.supernet_id IN (SELECT supernet_id FROM fleet_labels WHERE fleet_id = $2) OR \
              b.supernet_id IN (SELECT desired_supernet_id FROM fleets WHERE id = $2 \
                                AND desired_supernet_id IS NOT NULL) OR \
              b.supernet_id IN (SELECT from_supernet_id FROM rollouts WHERE active_fleet_id = $2) OR \
              b.supernet_id IN (SELECT to_supernet_id FROM rollouts WHERE active_fleet_id = $2)) \
             LIMIT 1",
        )
        .bind(sha256)
        .bind(fleet_id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        if let Some(r) = row {
            return Ok(Some(get_u64(&r, "size_bytes")?));
        }
        let any = sqlx::query("SELECT 1 AS one FROM supernet_blobs WHERE sha256 = $1 LIMIT 1")
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await?;
        match any {
            Some(_) => Ok(None),
            None => Err(CloudError::not_found("blob", sha256)),
        }
    }
}
