//! Rollouts and their decisions. At most one active (running or paused) rollout per fleet,
//! enforced by a UNIQUE column that holds the fleet id only while the rollout is active.
//! Every engine transition is fenced by the evaluation lease, the expected state and step.
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{get_u64, get_uuid, is_unique_violation, Store};
use crate::domain::rollout::{Decision, Gates, Rollout, RolloutState, Sample, Step};
use crate::domain::DeviceClass;
use crate::error::{CloudError, Result};

const COLS: &str = "id, fleet_id, from_supernet_id, to_supernet_id, steps_json, gates_json, \
    step_index, step_started_ms, state, status, created_ms, updated_ms";

fn rollout_from_row(r: &AnyRow) -> Result<Rollout> {
    let steps: String = r.try_get("steps_json")?;
    let gates: String = r.try_get("gates_json")?;
    let bad = |e: serde_json::Error| CloudError::Internal(format!("rollout row: {e}"));
    Ok(Rollout {
        id: get_uuid(r, "id")?,
        fleet_id: get_uuid(r, "fleet_id")?,
        from_supernet_id: get_uuid(r, "from_supernet_id")?,
        to_supernet_id: get_uuid(r, "to_supernet_id")?,
        steps: serde_json::from_str::<Vec<Step>>(&steps).map_err(bad)?,
        gates: serde_json::from_str::<Gates>(&gates).map_err(bad)?,
        step_index: get_u64(r, "step_index")? as usize,
        step_started_ms: r.try_get("step_started_ms")?,
        state: RolloutState::parse(&r.try_get::<String, _>("state")?)?,
        status: r.try_get("status")?,
        created_ms: r.try_get("created_ms")?,
        updated_ms: r.try_get("updated_ms")?,
    })
}

/// How a settled rollout leaves the fleet.
pub enum Settle {
    /// B becomes what the fleet runs: its label (or pinned supernet) moves to B.
    Succeeded,
    /// Every device goes back to A.
    RolledBack,
    Aborted,
}

impl Store {
    /// Inserts a running rollout at step 0 and bumps the fleet's generation so its devices
    /// fetch their (cohort-dependent) desired state.
    pub async fn insert_rollout(&self, r: &Rollout, start: &serde_json::Value) -> Result<Rollout> {
        let mut tx = self.pool.begin().await?;
        let res = sqlx::query(&format!(
            "INSERT INTO rollouts ({COLS}, active_fleet_id) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$2)"
        ))
        .bind(r.id.to_string())
        .bind(r.fleet_id.to_string())
        .bind(r.from_supernet_id.to_string())
        .bind(r.to_supernet_id.to_string())
        .bind(serde_json::to_string(&r.steps).expect("steps serialise"))
        .bind(serde_json::to_string(&r.gates).expect("gates serialise"))
        .bind(r.step_index as i64)
        .bind(r.step_started_ms)
        .bind(r.state.as_str())
        .bind(&r.status)
        .bind(r.created_ms)
        .bind(r.updated_ms)
        .execute(&mut *tx)
        .await;
        if let Err(e) = res {
            if is_unique_violation(&e) {
                let active = self.active_rollout(r.fleet_id).await?;
                return Err(CloudError::FailedPrecondition(format!(
                    "fleet {} already has an active rollout{}; abort it or wait for it to settle",
                    r.fleet_id,
                    active.map(|a| format!(" ({})", a.id)).unwrap_or_default()
                )));
            }
            return Err(e.into());
        }
        Self::decision_tx(&mut tx, r.id, r.created_ms, 0, "start", start).await?;
        Self::bump_generation_tx(&mut tx, r.fleet_id).await?;
        tx.commit().await?;
        self.assigned.clear();
        self.get_rollout(r.id).await
    }

    pub async fn get_rollout(&self, id: Uuid) -> Result<Rollout> {
        let row = sqlx::query(&format!("SELECT {COLS} FROM rollouts WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| CloudError::not_found("rollout", id.to_string()))?;
        rollout_from_row(&row)
    }

    /// The fleet's running or paused rollout.
    pub async fn active_rollout(&self, fleet_id: Uuid) -> Result<Option<Rollout>> {
        let row = sqlx::query(&format!(
            "SELECT {COLS} FROM rollouts WHERE active_fleet_id = $1"
        ))
        .bind(fleet_id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| rollout_from_row(&r)).transpose()
    }

    /// Rollouts, newest first, optionally of one fleet (at most 200).
    pub async fn list_rollouts(&self, fleet_id: Option<Uuid>) -> Result<Vec<Rollout>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM rollouts WHERE ($1 IS NULL OR fleet_id = $1) \
             ORDER BY created_ms DESC, id LIMIT 200"
        ))
        .bind(fleet_id.map(|f| f.to_string()))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rollout_from_row).collect()
    }

    /// Ids of running rollouts (the engine's work list).
    pub async fn running_rollouts(&self) -> Result<Vec<Uuid>> {
        let rows = sqlx::query("SELECT id FROM rollouts WHERE state = 'running'")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| get_uuid(r, "id")).collect()
    }

    pub async fn rollout_decisions(&self, id: Uuid) -> Result<Vec<Decision>> {
        let rows = sqlx::query(
            "SELECT seq, at_ms, step_index, action, detail_json FROM rollout_decisions \
             WHERE rollout_id = $1 ORDER BY seq",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let detail: String = r.try_get("detail_json")?;
                Ok(Decision {
                    seq: get_u64(r, "seq")?,
                    at_ms: r.try_get("at_ms")?,
                    step_index: get_u64(r, "step_index")? as usize,
                    action: r.try_get("action")?,
                    detail: serde_json::from_str(&detail)
                        .map_err(|e| CloudError::Internal(format!("decision row: {e}")))?,
                })
            })
            .collect()
    }

    /// Takes (or keeps) the right to decide for a running rollout until `until`; false when
    /// another replica holds an unexpired lease or the rollout is no longer running.
    pub async fn lease_rollout(&self, id: Uuid, owner: &str, now: i64, until: i64) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE rollouts SET lease_owner = $1, lease_expires_ms = $2 \
             WHERE id = $3 AND state = 'running' AND \
             (lease_owner IS NULL OR lease_owner = $1 OR lease_expires_ms < $4)",
        )
        .bind(owner)
        .bind(until)
        .bind(id.to_string())
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Records what a running step waits for (fenced by the lease); no decision row.
    pub async fn rollout_status(
        &self,
        r: &Rollout,
        owner: &str,
        status: &str,
        now: i64,
    ) -> Result<bool> {
        if r.status == status {
            return Ok(true);
        }
        let n = sqlx::query(
            "UPDATE rollouts SET status = $1, updated_ms = $2 \
             WHERE id = $3 AND lease_owner = $4 AND state = 'running' AND step_index = $5",
        )
        .bind(status)
        .bind(now)
        .bind(r.id.to_string())
        .bind(owner)
        .bind(r.step_index as i64)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Moves a running rollout to its next step (fenced by the lease, state and step) and
    /// bumps the fleet's generation: the grown cohort fetches B.
    pub async fn promote_rollout(
        &self,
        r: &Rollout,
        owner: &str,
        detail: &serde_json::Value,
        now: i64,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let next = r.step_index + 1;
        let n = sqlx::query(
            "UPDATE rollouts SET step_index = $1, step_started_ms = $2, updated_ms = $2, status = $3 \
             WHERE id = $4 AND lease_owner = $5 AND state = 'running' AND step_index = $6",
        )
        .bind(next as i64)
        .bind(now)
        .bind(format!("step {} of {} started", next + 1, r.steps.len()))
        .bind(r.id.to_string())
        .bind(owner)
        .bind(r.step_index as i64)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n != 1 {
            return Ok(false);
        }
        Self::decision_tx(&mut tx, r.id, now, r.step_index, "promote", detail).await?;
        Self::bump_generation_tx(&mut tx, r.fleet_id).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Settles a rollout. `owner` fences an engine decision; `None` is a person's action
    /// (abort), allowed from running or paused. On success the fleet's label (or pinned
    /// supernet) moves to B in the same transaction, so no device ever sees A again.
    pub async fn settle_rollout(
        &self,
        r: &Rollout,
        owner: Option<&str>,
        how: Settle,
        detail: &serde_json::Value,
        now: i64,
    ) -> Result<bool> {
        let (state, action) = match how {
            Settle::Succeeded => (RolloutState::Succeeded, "succeed"),
            Settle::RolledBack => (RolloutState::RolledBack, "rollback"),
            Settle::Aborted => (RolloutState::Aborted, "abort"),
        };
        let status = match how {
            Settle::Succeeded => "every device serves B".to_string(),
            Settle::RolledBack => format!("rolled back to A at step {}", r.step_index + 1),
            Settle::Aborted => "aborted; every device serves A".to_string(),
        };
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE rollouts SET state = $1, status = $2, updated_ms = $3, active_fleet_id = NULL, \
             lease_owner = NULL, lease_expires_ms = NULL \
             WHERE id = $4 AND active_fleet_id IS NOT NULL AND \
             ($5 IS NULL OR (lease_owner = $5 AND state = 'running' AND step_index = $6))",
        )
        .bind(state.as_str())
        .bind(&status)
        .bind(now)
        .bind(r.id.to_string())
        .bind(owner)
        .bind(r.step_index as i64)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n != 1 {
            return Ok(false);
        }
        Self::decision_tx(&mut tx, r.id, now, r.step_index, action, detail).await?;
        if matches!(how, Settle::Succeeded) {
            let fleet = r.fleet_id.to_string();
            let to = r.to_supernet_id.to_string();
            // The fleet follows a label: the label moves to B. Otherwise its pinned supernet does.
            sqlx::query(
                "UPDATE fleet_labels SET supernet_id = $1, updated_ms = $2 WHERE fleet_id = $3 \
                 AND label = (SELECT desired_label FROM fleets WHERE id = $3)",
            )
            .bind(&to)
            .bind(now)
            .bind(&fleet)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE fleets SET desired_supernet_id = $1 WHERE id = $2 AND desired_label IS NULL",
            )
            .bind(&to)
            .bind(&fleet)
            .execute(&mut *tx)
            .await?;
        }
        Self::bump_generation_tx(&mut tx, r.fleet_id).await?;
        tx.commit().await?;
        self.assigned.clear();
        Ok(true)
    }

    /// Pauses a running rollout or resumes a paused one (a resumed step's window restarts).
    pub async fn pause_rollout(&self, r: &Rollout, pause: bool, now: i64) -> Result<bool> {
        let (from, to, action) = if pause {
            ("running", "paused", "pause")
        } else {
            ("paused", "running", "resume")
        };
        let status = if pause {
            format!("paused at step {} of {}", r.step_index + 1, r.steps.len())
        } else {
            format!("step {} of {} resumed", r.step_index + 1, r.steps.len())
        };
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE rollouts SET state = $1, status = $2, updated_ms = $3, step_started_ms = \
             CASE WHEN $1 = 'running' THEN $3 ELSE step_started_ms END, lease_owner = NULL, \
             lease_expires_ms = NULL WHERE id = $4 AND state = $5",
        )
        .bind(to)
        .bind(&status)
        .bind(now)
        .bind(r.id.to_string())
        .bind(from)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n != 1 {
            return Ok(false);
        }
        Self::decision_tx(
            &mut tx,
            r.id,
            now,
            r.step_index,
            action,
            &serde_json::json!({}),
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The fleet's non-revoked devices with their classes.
    pub async fn fleet_device_classes(&self, fleet_id: Uuid) -> Result<Vec<(Uuid, DeviceClass)>> {
        let rows = sqlx::query(
            "SELECT id, device_class FROM devices WHERE fleet_id = $1 AND status <> 'revoked'",
        )
        .bind(fleet_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    get_uuid(r, "id")?,
                    DeviceClass(r.try_get::<i64, _>("device_class")? as i32),
                ))
            })
            .collect()
    }

    /// The latest report of every non-revoked device of the fleet.
    pub async fn fleet_samples(&self, fleet_id: Uuid) -> Result<Vec<Sample>> {
        let rows = sqlx::query(
            "SELECT r.device_id, r.device_class, r.supernet_id, r.quality, r.latency_p95_ms, \
             r.latency_budget_ms, r.reported_ms FROM device_reports r \
             JOIN devices d ON d.id = r.device_id \
             WHERE r.fleet_id = $1 AND d.status <> 'revoked'",
        )
        .bind(fleet_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Sample {
                    device_id: get_uuid(r, "device_id")?,
                    class: DeviceClass(r.try_get::<i64, _>("device_class")? as i32),
                    supernet_id: get_uuid(r, "supernet_id")?,
                    quality: r.try_get("quality")?,
                    latency_p95_ms: r.try_get("latency_p95_ms")?,
                    latency_budget_ms: r.try_get("latency_budget_ms")?,
                    reported_ms: r.try_get("reported_ms")?,
                })
            })
            .collect()
    }

    async fn decision_tx(
        tx: &mut sqlx::AnyConnection,
        id: Uuid,
        at: i64,
        step: usize,
        action: &str,
        detail: &serde_json::Value,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO rollout_decisions (rollout_id, seq, at_ms, step_index, action, detail_json) \
             VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM rollout_decisions WHERE rollout_id = $1), \
             $2, $3, $4, $5)",
        )
        .bind(id.to_string())
        .bind(at)
        .bind(step as i64)
        .bind(action)
        .bind(detail.to_string())
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    async fn bump_generation_tx(tx: &mut sqlx::AnyConnection, fleet: Uuid) -> Result<()> {
        sqlx::query("UPDATE fleets SET generation = generation + 1 WHERE id = $1")
            .bind(fleet.to_string())
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}
