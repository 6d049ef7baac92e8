//! Oracles and datasets.
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{get_u64, get_uuid, is_foreign_key_violation, is_unique_violation, Store};
use crate::domain::{Dataset, Oracle, Page};
use crate::error::{CloudError, Result};

const ORACLE_COLS: &str =
    "id, name, family, weights_sha256, size_bytes, num_params, num_tensors, arch_json, created_ms";

fn oracle_from_row(r: &AnyRow) -> Result<Oracle> {
    Ok(Oracle {
        id: get_uuid(r, "id")?,
        name: r.try_get("name")?,
        family: r.try_get("family")?,
        weights_sha256: r.try_get("weights_sha256")?,
        size_bytes: get_u64(r, "size_bytes")?,
        num_params: get_u64(r, "num_params")?,
        num_tensors: get_u64(r, "num_tensors")? as u32,
        arch_json: r.try_get("arch_json")?,
        created_ms: r.try_get("created_ms")?,
    })
}

fn dataset_from_row(r: &AnyRow) -> Result<Dataset> {
    Ok(Dataset {
        id: get_uuid(r, "id")?,
        name: r.try_get("name")?,
        uri: r.try_get("uri")?,
        format: r.try_get("format")?,
        num_samples: get_u64(r, "num_samples")?,
        created_ms: r.try_get("created_ms")?,
        input_spec: json_col(r, "input_spec_json")?,
        augment: json_col(r, "augment_json")?.unwrap_or_default(),
        summary: json_col(r, "summary_json")?,
        digest: r.try_get("digest")?,
    })
}

/// A nullable JSON column (written by this code only, so a parse failure is an internal error).
fn json_col<T: serde::de::DeserializeOwned>(r: &AnyRow, col: &str) -> Result<Option<T>> {
    let v: Option<String> = r.try_get(col)?;
    v.map(|s| {
        serde_json::from_str(&s).map_err(|e| CloudError::Internal(format!("datasets.{col}: {e}")))
    })
    .transpose()
}

/// The columns of a dataset row, in `dataset_from_row`'s terms.
const DATASET_COLS: &str = "id, name, uri, format, num_samples, created_ms, input_spec_json, \
                            augment_json, summary_json, digest";

/// The one INSERT of an oracle row: a no-op when the weights digest is already stored (the
/// UNIQUE digest makes identical uploads and job results idempotent without a race).
fn insert_query(o: &Oracle) -> sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments<'_>> {
    sqlx::query(
        "INSERT INTO oracles (id, name, family, weights_sha256, size_bytes, num_params, \
         num_tensors, arch_json, created_ms) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9) \
         ON CONFLICT (weights_sha256) DO NOTHING",
    )
    .bind(o.id.to_string())
    .bind(&o.name)
    .bind(&o.family)
    .bind(&o.weights_sha256)
    .bind(o.size_bytes as i64)
    .bind(o.num_params as i64)
    .bind(o.num_tensors as i64)
    .bind(&o.arch_json)
    .bind(o.created_ms)
}

impl Store {
    /// Inserts an oracle unless one with the same weights digest exists; returns the stored
    /// row and whether it was created (idempotent uploads, race-free via the UNIQUE digest).
    pub async fn insert_oracle(&self, o: &Oracle) -> Result<(Oracle, bool)> {
        let res = insert_query(o).execute(&self.pool).await?;
        let created = res.rows_affected() == 1;
        let stored = self
            .oracle_by_digest(&o.weights_sha256)
            .await?
            .ok_or_else(|| CloudError::Internal("oracle vanished after insert".into()))?;
        Ok((stored, created))
    }

    /// Stores the oracle an oracle-training job produced and settles the job as succeeded
    /// (its `result_oracle_id` and `report_json`) in one transaction, fenced by the worker's
    /// lease: `Ok(None)` when the lease was lost (nothing stored). Identical weights already
    /// stored are reused, as an identical upload would be.
    pub async fn finish_job_with_oracle(
        &self,
        o: &Oracle,
        report_json: &str,
        fence: super::JobFence<'_>,
    ) -> Result<Option<Oracle>> {
        let mut tx = self.pool.begin().await?;
        insert_query(o).execute(&mut *tx).await?;
        let q = format!("SELECT {ORACLE_COLS} FROM oracles WHERE weights_sha256 = $1");
        let stored = oracle_from_row(
            &sqlx::query(&q)
                .bind(&o.weights_sha256)
                .fetch_one(&mut *tx)
                .await?,
        )?;
        let held = sqlx::query(
            "UPDATE jobs SET state = 'succeeded', error = NULL, result_oracle_id = $1, \
             report_json = $2, updated_ms = $3, lease_owner = NULL, lease_expires_ms = NULL, \
             progress = 1.0 WHERE id = $4 AND lease_owner = $5 AND state = 'running'",
        )
        .bind(stored.id.to_string())
        .bind(report_json)
        .bind(fence.now)
        .bind(fence.job_id.to_string())
        .bind(fence.worker_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if held != 1 {
            tx.rollback().await?;
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(stored))
    }

    pub async fn oracle_by_digest(&self, sha256: &str) -> Result<Option<Oracle>> {
        let q = format!("SELECT {ORACLE_COLS} FROM oracles WHERE weights_sha256 = $1");
        sqlx::query(&q)
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(oracle_from_row)
            .transpose()
    }

    pub async fn get_oracle(&self, id: Uuid) -> Result<Oracle> {
        let q = format!("SELECT {ORACLE_COLS} FROM oracles WHERE id = $1");
        let row = sqlx::query(&q)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| CloudError::not_found("oracle", id.to_string()))?;
        oracle_from_row(&row)
    }

    pub async fn list_oracles(&self, page: Page) -> Result<Vec<Oracle>> {
        let q =
            format!("SELECT {ORACLE_COLS} FROM oracles ORDER BY created_ms, id LIMIT $1 OFFSET $2");
        sqlx::query(&q)
            .bind(page.limit)
            .bind(page.offset)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(oracle_from_row)
            .collect()
    }

    /// Deletes an oracle row; refuses while jobs or supernets reference it. The check and
    /// the delete are one conditional statement in one transaction, so a job started
    /// concurrently cannot end up pointing at a deleted oracle. Returns the weights digest
    /// when nothing else references that content-addressed blob any more (the caller then
    /// drops it), `None` when something does (e.g. a supernet module with the same bytes).
    pub async fn delete_oracle(&self, id: Uuid) -> Result<Option<String>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT weights_sha256 FROM oracles WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| CloudError::not_found("oracle", id.to_string()))?;
        let sha: String = row.try_get("weights_sha256")?;
        let deleted = sqlx::query(
            "DELETE FROM oracles WHERE id = $1 \
             AND NOT EXISTS (SELECT 1 FROM jobs WHERE oracle_id = $1) \
             AND NOT EXISTS (SELECT 1 FROM supernets WHERE oracle_id = $1)",
        )
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_foreign_key_violation(&e) {
                CloudError::FailedPrecondition(format!("oracle {id} is referenced"))
            } else {
                e.into()
            }
        })?
        .rows_affected();
        if deleted == 0 {
            let refs: i64 = sqlx::query(
                "SELECT (SELECT COUNT(*) FROM jobs WHERE oracle_id = $1) + \
                 (SELECT COUNT(*) FROM supernets WHERE oracle_id = $1) AS n",
            )
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
            tx.rollback().await?;
            return Err(CloudError::FailedPrecondition(format!(
                "oracle {id} is referenced by {refs} job(s)/supernet(s)"
            )));
        }
        let shared = self.blob_references(&mut tx, &sha).await?;
        tx.commit().await?;
        Ok((shared == 0).then_some(sha))
    }

    pub async fn insert_dataset(&self, d: &Dataset) -> Result<()> {
        sqlx::query(
            "INSERT INTO datasets (id, name, uri, format, num_samples, created_ms, \
             input_spec_json, augment_json, summary_json, digest) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)",
        )
        .bind(d.id.to_string())
        .bind(&d.name)
        .bind(&d.uri)
        .bind(&d.format)
        .bind(d.num_samples as i64)
        .bind(d.created_ms)
        .bind(to_json(&d.input_spec)?)
        .bind(to_json(&Some(d.augment))?)
        .bind(to_json(&d.summary)?)
        .bind(d.digest.clone())
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                CloudError::AlreadyExists {
                    kind: "dataset",
                    id: d.name.clone(),
                }
            } else {
                e.into()
            }
        })?;
        Ok(())
    }

    pub async fn get_dataset(&self, id: Uuid) -> Result<Dataset> {
        let row = sqlx::query(&format!(
            "SELECT {DATASET_COLS} FROM datasets WHERE id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| CloudError::not_found("dataset", id.to_string()))?;
        dataset_from_row(&row)
    }

    /// The dataset with content digest `digest`, if any.
    pub async fn dataset_by_digest(&self, digest: &str) -> Result<Option<Dataset>> {
        sqlx::query(&format!(
            "SELECT {DATASET_COLS} FROM datasets WHERE digest = $1"
        ))
        .bind(digest)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(dataset_from_row)
        .transpose()
    }

    pub async fn dataset_by_name(&self, name: &str) -> Result<Option<Dataset>> {
        sqlx::query(&format!(
            "SELECT {DATASET_COLS} FROM datasets WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(dataset_from_row)
        .transpose()
    }

    /// URIs of every dataset (blob garbage collection reads the uploaded ones' manifests).
    pub async fn uploaded_dataset_uris(&self) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT uri FROM datasets WHERE uri LIKE 'blob://%'")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>("uri").map_err(Into::into))
            .collect()
    }

    /// Deletes a dataset; refuses with FAILED_PRECONDITION while a queued or running job
    /// uses it. Finished jobs keep their history with the dataset reference cleared.
    pub async fn delete_dataset(&self, id: Uuid) -> Result<Dataset> {
        let d = self.get_dataset(id).await?;
        let mut tx = self.pool.begin().await?;
        let active: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM jobs WHERE dataset_id = $1 \
             AND state IN ('queued', 'running')",
        )
        .bind(id.to_string())
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        if active > 0 {
            return Err(CloudError::FailedPrecondition(format!(
                "dataset {id} is used by {active} queued or running job(s); cancel them first"
            )));
        }
        sqlx::query("UPDATE jobs SET dataset_id = NULL WHERE dataset_id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM datasets WHERE id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(d)
    }

    pub async fn list_datasets(&self, page: Page) -> Result<Vec<Dataset>> {
        sqlx::query(&format!(
            "SELECT {DATASET_COLS} FROM datasets ORDER BY created_ms, id LIMIT $1 OFFSET $2"
        ))
        .bind(page.limit)
        .bind(page.offset)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(dataset_from_row)
        .collect()
    }
}

fn to_json<T: serde::Serialize>(v: &Option<T>) -> Result<Option<String>> {
    v.as_ref()
        .map(|v| serde_json::to_string(v).map_err(|e| CloudError::Internal(format!("json: {e}"))))
        .transpose()
}
