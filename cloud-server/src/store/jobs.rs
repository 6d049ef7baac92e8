//! The job queue. A worker claims the oldest claimable job (queued, or running with an
//! expired lease) in one `UPDATE ... WHERE id = (SELECT ... [FOR UPDATE SKIP LOCKED])
//! RETURNING`, then keeps the lease alive with heartbeats. Every write of a running job is
//! fenced by `lease_owner`, so a worker that lost its lease cannot overwrite the new owner.
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{get_opt_uuid, get_u64, get_uuid, Backend, Store};
use crate::domain::{Job, JobKind, JobState, Page};
use crate::error::{CloudError, Result};

const JOB_COLS: &str = "id, kind, oracle_id, dataset_id, supernet_name, params_json, arch_json, \
    state, stage, progress, attempts, max_attempts, cancel_requested, lease_owner, \
    lease_expires_ms, checkpoint_sha256, error, supernet_id, result_oracle_id, report_json, \
    created_ms, updated_ms";

fn job_from_row(r: &AnyRow) -> Result<Job> {
    let state: String = r.try_get("state")?;
    let kind: String = r.try_get("kind")?;
    Ok(Job {
        id: get_uuid(r, "id")?,
        kind: JobKind::parse(&kind)?,
        oracle_id: get_opt_uuid(r, "oracle_id")?,
        dataset_id: get_opt_uuid(r, "dataset_id")?,
        supernet_name: r.try_get("supernet_name")?,
        params_json: r.try_get("params_json")?,
        arch_json: r.try_get("arch_json")?,
        state: JobState::parse(&state)?,
        stage: r.try_get("stage")?,
        progress: r.try_get("progress")?,
        attempts: get_u64(r, "attempts")? as u32,
        max_attempts: get_u64(r, "max_attempts")? as u32,
        cancel_requested: r.try_get::<i64, _>("cancel_requested")? != 0,
        lease_owner: r.try_get("lease_owner")?,
        lease_expires_ms: r.try_get("lease_expires_ms")?,
        checkpoint_sha256: r.try_get("checkpoint_sha256")?,
        error: r.try_get("error")?,
        supernet_id: get_opt_uuid(r, "supernet_id")?,
        result_oracle_id: get_opt_uuid(r, "result_oracle_id")?,
        report_json: r.try_get("report_json")?,
        created_ms: r.try_get("created_ms")?,
        updated_ms: r.try_get("updated_ms")?,
    })
}

/// A job this worker holds the lease of.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub job: Job,
    pub worker_id: String,
}

impl Store {
    pub async fn insert_job(&self, j: &Job) -> Result<()> {
        sqlx::query(
            "INSERT INTO jobs (id, oracle_id, dataset_id, supernet_name, params_json, state, \
             stage, progress, attempts, max_attempts, cancel_requested, created_ms, updated_ms, \
             kind, arch_json) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15)",
        )
        .bind(j.id.to_string())
        .bind(j.oracle_id.map(|o| o.to_string()))
        .bind(j.dataset_id.map(|d| d.to_string()))
        .bind(&j.supernet_name)
        .bind(&j.params_json)
        .bind(j.state.as_str())
        .bind(&j.stage)
        .bind(j.progress)
        .bind(j.attempts as i64)
        .bind(j.max_attempts as i64)
        .bind(j.cancel_requested as i64)
        .bind(j.created_ms)
        .bind(j.updated_ms)
        .bind(j.kind.as_str())
        .bind(j.arch_json.clone())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_job(&self, id: Uuid) -> Result<Job> {
        let q = format!("SELECT {JOB_COLS} FROM jobs WHERE id = $1");
        let row = sqlx::query(&q)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| CloudError::not_found("job", id.to_string()))?;
        job_from_row(&row)
    }

    pub async fn list_jobs(&self, page: Page, state: Option<JobState>) -> Result<Vec<Job>> {
        let rows = match state {
            Some(s) => {
                let q = format!(
                    "SELECT {JOB_COLS} FROM jobs WHERE state = $3 \
                     ORDER BY created_ms, id LIMIT $1 OFFSET $2"
                );
                sqlx::query(&q)
                    .bind(page.limit)
                    .bind(page.offset)
                    .bind(s.as_str())
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                let q = format!(
                    "SELECT {JOB_COLS} FROM jobs ORDER BY created_ms, id LIMIT $1 OFFSET $2"
                );
                sqlx::query(&q)
                    .bind(page.limit)
                    .bind(page.offset)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(job_from_row).collect()
    }

    /// The `limit` most recently created jobs, newest first: what an operator's view shows
    /// (the paged `list_jobs` runs oldest first, so its first page goes stale as jobs pile up).
    pub async fn recent_jobs(&self, limit: u32) -> Result<Vec<Job>> {
        let q = format!("SELECT {JOB_COLS} FROM jobs ORDER BY created_ms DESC, id DESC LIMIT $1");
        let rows = sqlx::query(&q)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Settles jobs nobody will run: cancel-requested jobs that are queued or whose lease
    /// expired become cancelled; expired jobs out of attempts become failed.
    pub async fn reap_jobs(&self, now: i64) -> Result<u64> {
        let a = sqlx::query(
            "UPDATE jobs SET state = 'cancelled', lease_owner = NULL, updated_ms = $1 \
             WHERE cancel_requested = 1 AND (state = 'queued' OR \
             (state = 'running' AND lease_expires_ms < $1))",
        )
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        let b = sqlx::query(
            "UPDATE jobs SET state = 'failed', lease_owner = NULL, updated_ms = $1, \
             error = 'lease expired after the last allowed attempt' \
             WHERE state = 'running' AND lease_expires_ms < $1 AND attempts >= max_attempts",
        )
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(a + b)
    }

    /// Claims the oldest claimable job for `worker_id` with a lease until `lease_until`.
    pub async fn claim_job(
        &self,
        worker_id: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<ClaimedJob>> {
        let lock = match self.backend {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let q = format!(
            "UPDATE jobs SET state = 'running', lease_owner = $1, lease_expires_ms = $2, \
             attempts = attempts + 1, updated_ms = $3 \
             WHERE id = (SELECT id FROM jobs WHERE cancel_requested = 0 AND attempts < max_attempts \
               AND (state = 'queued' OR (state = 'running' AND lease_expires_ms < $3)) \
               ORDER BY created_ms, id LIMIT 1{lock}) \
             AND (state = 'queued' OR (state = 'running' AND lease_expires_ms < $3)) \
             RETURNING {JOB_COLS}"
        );
        let row = sqlx::query(&q)
            .bind(worker_id)
            .bind(lease_until)
            .bind(now)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => Ok(Some(ClaimedJob {
                job: job_from_row(&r)?,
                worker_id: worker_id.to_string(),
            })),
            None => Ok(None),
        }
    }

    /// Extends the lease. `Ok(None)`: the lease is lost (expired and taken, or the job was
    /// settled); `Ok(Some(cancel_requested))` otherwise.
    pub async fn heartbeat_job(
        &self,
        id: Uuid,
        worker_id: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<bool>> {
        let row = sqlx::query(
            "UPDATE jobs SET lease_expires_ms = $1, updated_ms = $2 \
             WHERE id = $3 AND lease_owner = $4 AND state = 'running' \
             RETURNING cancel_requested",
        )
        .bind(lease_until)
        .bind(now)
        .bind(id.to_string())
        .bind(worker_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => Some(r.try_get::<i64, _>("cancel_requested")? != 0),
            None => None,
        })
    }

    /// Records progress (fenced by the lease). Returns false when the lease is lost.
    pub async fn job_progress(
        &self,
        id: Uuid,
        worker_id: &str,
        stage: &str,
        progress: f64,
        now: i64,
    ) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE jobs SET stage = $1, progress = $2, updated_ms = $3 \
             WHERE id = $4 AND lease_owner = $5 AND state = 'running'",
        )
        .bind(stage)
        .bind(progress)
        .bind(now)
        .bind(id.to_string())
        .bind(worker_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Records the digest of the job's latest checkpoint blob (fenced by the lease).
    pub async fn job_checkpoint(
        &self,
        id: Uuid,
        worker_id: &str,
        sha256: &str,
        now: i64,
    ) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE jobs SET checkpoint_sha256 = $1, updated_ms = $2 \
             WHERE id = $3 AND lease_owner = $4 AND state = 'running'",
        )
        .bind(sha256)
        .bind(now)
        .bind(id.to_string())
        .bind(worker_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Moves a running job to a terminal state (fenced by the lease).
    pub async fn finish_job(
        &self,
        id: Uuid,
        worker_id: &str,
        state: JobState,
        error: Option<&str>,
        supernet_id: Option<Uuid>,
        now: i64,
    ) -> Result<bool> {
        debug_assert!(state.is_terminal());
        let progress_sql = if state == JobState::Succeeded {
            ", progress = 1.0"
        } else {
            ""
        };
        let q = format!(
            "UPDATE jobs SET state = $1, error = $2, supernet_id = $3, updated_ms = $4, \
             lease_owner = NULL, lease_expires_ms = NULL{progress_sql} \
             WHERE id = $5 AND lease_owner = $6 AND state = 'running'"
        );
        let n = sqlx::query(&q)
            .bind(state.as_str())
            .bind(error.map(str::to_string))
            .bind(supernet_id.map(|s| s.to_string()))
            .bind(now)
            .bind(id.to_string())
            .bind(worker_id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    /// Gives a job back to the queue (e.g. on worker shutdown) without counting the attempt.
    pub async fn release_job(&self, id: Uuid, worker_id: &str, now: i64) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires_ms = NULL, \
             attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, updated_ms = $1 \
             WHERE id = $2 AND lease_owner = $3 AND state = 'running'",
        )
        .bind(now)
        .bind(id.to_string())
        .bind(worker_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Requests cancellation: a queued job is cancelled at once, a running one when its
    /// worker next heartbeats. Cancelling a cancelled job is a no-op; a finished one fails.
    pub async fn cancel_job(&self, id: Uuid, now: i64) -> Result<Job> {
        sqlx::query(
            "UPDATE jobs SET cancel_requested = 1, updated_ms = $1, \
             state = CASE WHEN state = 'queued' THEN 'cancelled' ELSE state END \
             WHERE id = $2 AND state IN ('queued', 'running')",
        )
        .bind(now)
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        let job = self.get_job(id).await?;
        match job.state {
            JobState::Succeeded | JobState::Failed => Err(CloudError::FailedPrecondition(format!(
                "job {id} already {}",
                job.state.as_str()
            ))),
            _ => Ok(job),
        }
    }
}
