//! Fleets, desired state, devices, heartbeats, reports and the dashboard aggregates.
use std::collections::BTreeMap;

use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{get_opt_uuid, get_u64, get_uuid, is_unique_violation, Store};
use crate::domain::rollout::RolloutState;
use crate::domain::{
    now_ms, AdaptationReason, AggregateGroup, BudgetPolicy, DesiredState, Device, DeviceClass,
    DeviceStatus, Distribution, Fleet, FleetAggregates, Heartbeat, InstallFailure, Page, Report,
    ServingReason, SubnetPoint,
};
use crate::error::{CloudError, Result};

const FLEET_COLS: &str = "id, name, desired_label, desired_supernet_id, budget_ms, \
    budget_fraction, hysteresis, generation, created_ms";
const DEVICE_COLS: &str = "id, fleet_id, device_class, status, agent_version, \
    active_supernet_id, active_subnet, latency_p50_ms, latency_p95_ms, last_reason, \
    applied_generation, enrolled_ms, last_heartbeat_ms, serving_reason, failed_supernet_id, \
    install_failure, recent_restarts";

fn fleet_from_row(r: &AnyRow) -> Result<Fleet> {
    let id = get_uuid(r, "id")?;
    Ok(Fleet {
        id,
        name: r.try_get("name")?,
        desired: DesiredState {
            fleet_id: id,
            label: r.try_get("desired_label")?,
            supernet_id: get_opt_uuid(r, "desired_supernet_id")?,
            supernet_version: 0,
            manifest_sha256: String::new(),
            budget: BudgetPolicy {
                latency_budget_ms: r.try_get("budget_ms")?,
                budget_fraction: r.try_get("budget_fraction")?,
                hysteresis: r.try_get("hysteresis")?,
            },
            generation: get_u64(r, "generation")?,
            reason: ServingReason::UNSPECIFIED,
            rollout_id: None,
        },
        created_ms: r.try_get("created_ms")?,
    })
}

fn device_from_row(r: &AnyRow) -> Result<Device> {
    let status: String = r.try_get("status")?;
    Ok(Device {
        id: get_uuid(r, "id")?,
        fleet_id: get_uuid(r, "fleet_id")?,
        device_class: DeviceClass(r.try_get::<i64, _>("device_class")? as i32),
        status: DeviceStatus::parse(&status),
        agent_version: r.try_get("agent_version")?,
        active_supernet_id: get_opt_uuid(r, "active_supernet_id")?,
        active_subnet: r.try_get("active_subnet")?,
        latency_p50_ms: r.try_get("latency_p50_ms")?,
        latency_p95_ms: r.try_get("latency_p95_ms")?,
        last_reason: AdaptationReason(r.try_get::<i64, _>("last_reason")? as i32),
        applied_generation: get_u64(r, "applied_generation")?,
        enrolled_ms: r.try_get("enrolled_ms")?,
        last_heartbeat_ms: r.try_get("last_heartbeat_ms")?,
        serving_reason: ServingReason(r.try_get::<i64, _>("serving_reason")? as i32),
        failed_supernet_id: get_opt_uuid(r, "failed_supernet_id")?,
        install_failure: InstallFailure(r.try_get::<i64, _>("install_failure")? as i32),
        recent_restarts: r
            .try_get::<i64, _>("recent_restarts")?
            .clamp(0, u32::MAX as i64) as u32,
    })
}

impl Store {
    pub async fn create_fleet(&self, name: &str) -> Result<Fleet> {
        let id = Uuid::new_v4();
        let now = now_ms();
        sqlx::query(
            "INSERT INTO fleets (id, name, budget_ms, budget_fraction, hysteresis, generation, \
             created_ms) VALUES ($1, $2, 0, 0, 0, 0, $3)",
        )
        .bind(id.to_string())
        .bind(name)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                CloudError::AlreadyExists {
                    kind: "fleet",
                    id: name.to_string(),
                }
            } else {
                e.into()
            }
        })?;
        self.get_fleet(id).await
    }

    pub async fn get_fleet(&self, id: Uuid) -> Result<Fleet> {
        let q = format!("SELECT {FLEET_COLS} FROM fleets WHERE id = $1");
        let row = sqlx::query(&q)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| CloudError::not_found("fleet", id.to_string()))?;
        fleet_from_row(&row)
    }

    pub async fn fleet_by_name(&self, name: &str) -> Result<Fleet> {
        let q = format!("SELECT {FLEET_COLS} FROM fleets WHERE name = $1");
        let row = sqlx::query(&q)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| CloudError::not_found("fleet", name.to_string()))?;
        fleet_from_row(&row)
    }

    pub async fn list_fleets(&self, page: Page) -> Result<Vec<Fleet>> {
        let q =
            format!("SELECT {FLEET_COLS} FROM fleets ORDER BY created_ms, id LIMIT $1 OFFSET $2");
        sqlx::query(&q)
            .bind(page.limit)
            .bind(page.offset)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(fleet_from_row)
            .collect()
    }

    /// Sets the desired state (exactly one of label / supernet) and bumps the generation.
    pub async fn set_desired_state(
        &self,
        fleet_id: Uuid,
        label: Option<&str>,
        supernet_id: Option<Uuid>,
        budget: BudgetPolicy,
    ) -> Result<DesiredState> {
        if let Some(s) = supernet_id {
            self.get_supernet(s).await?;
        }
        let n = sqlx::query(
            "UPDATE fleets SET desired_label = $1, desired_supernet_id = $2, budget_ms = $3, \
             budget_fraction = $4, hysteresis = $5, generation = generation + 1 WHERE id = $6",
        )
        .bind(label.map(str::to_string))
        .bind(supernet_id.map(|s| s.to_string()))
        .bind(budget.latency_budget_ms)
        .bind(budget.budget_fraction)
        .bind(budget.hysteresis)
        .bind(fleet_id.to_string())
        .execute(&self.pool)
        .await?
        .rows_affected();
        self.assigned.clear();
        if n == 0 {
            return Err(CloudError::not_found("fleet", fleet_id.to_string()));
        }
        self.desired_state(fleet_id).await
    }

    /// The fleet's desired state with its label resolved to a supernet version.
    pub async fn desired_state(&self, fleet_id: Uuid) -> Result<DesiredState> {
        let mut d = self.get_fleet(fleet_id).await?.desired;
        if d.supernet_id.is_none() {
            if let Some(label) = &d.label {
                d.supernet_id = self.resolve_label(fleet_id, label).await?;
            }
        }
        if let Some(s) = d.supernet_id {
            let s = self.get_supernet(s).await?;
            d.supernet_version = s.version;
            d.manifest_sha256 = s.manifest_sha256;
        }
        Ok(d)
    }

    /// What one device should run, and why: the fleet's desired state, except that while
    /// the fleet has an active rollout the device is pinned to the rollout's A or B by its
    /// cohort. After a rollback (or abort) a device on A is told so.
    pub async fn desired_state_for_device(
        &self,
        fleet_id: Uuid,
        device_id: Uuid,
    ) -> Result<DesiredState> {
        let mut d = self.desired_state(fleet_id).await?;
        d.reason = if d.label.is_some() {
            ServingReason::LABEL
        } else {
            ServingReason::PINNED
        };
        match self.latest_rollout(fleet_id).await? {
            Some(r) if r.state.is_active() => {
                let device = self.get_device(device_id).await?;
                let target = r.target_for(device_id, device.device_class);
                let s = self.get_supernet(target).await?;
                d.supernet_id = Some(s.id);
                d.supernet_version = s.version;
                d.manifest_sha256 = s.manifest_sha256;
                d.rollout_id = Some(r.id);
                d.reason = if target == r.to_supernet_id {
                    ServingReason::ROLLOUT_COHORT
                } else {
                    ServingReason::ROLLOUT_CONTROL
                };
            }
            Some(r)
                if matches!(r.state, RolloutState::RolledBack | RolloutState::Aborted)
                    && d.supernet_id == Some(r.from_supernet_id) =>
            {
                d.reason = ServingReason::ROLLED_BACK;
            }
            _ => {}
        }
        Ok(d)
    }

    /// Inserts a freshly enrolled device.
    pub(crate) async fn insert_device_tx(
        tx: &mut sqlx::AnyConnection,
        d: &Device,
        credential_hash: &str,
        credential_expires_ms: Option<i64>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO devices (id, fleet_id, credential_hash, credential_expires_ms, \
             device_class, status, agent_version, active_supernet_id, active_subnet, \
             latency_p50_ms, latency_p95_ms, last_reason, applied_generation, enrolled_ms, \
             last_heartbeat_ms) VALUES ($1,$2,$3,$4,$5,$6,$7,NULL,'',0,0,0,0,$8,$8)",
        )
        .bind(d.id.to_string())
        .bind(d.fleet_id.to_string())
        .bind(credential_hash)
        .bind(credential_expires_ms)
        .bind(d.device_class.0 as i64)
        .bind(d.status.as_str())
        .bind(&d.agent_version)
        .bind(d.enrolled_ms)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    pub async fn get_device(&self, id: Uuid) -> Result<Device> {
        let q = format!("SELECT {DEVICE_COLS} FROM devices WHERE id = $1");
        let row = sqlx::query(&q)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| CloudError::not_found("device", id.to_string()))?;
        device_from_row(&row)
    }

    pub async fn list_devices(&self, page: Page, fleet: Option<Uuid>) -> Result<Vec<Device>> {
        let rows = match fleet {
            Some(f) => {
                let q = format!(
                    "SELECT {DEVICE_COLS} FROM devices WHERE fleet_id = $3 \
                     ORDER BY enrolled_ms, id LIMIT $1 OFFSET $2"
                );
                sqlx::query(&q)
                    .bind(page.limit)
                    .bind(page.offset)
                    .bind(f.to_string())
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                let q = format!(
                    "SELECT {DEVICE_COLS} FROM devices ORDER BY enrolled_ms, id LIMIT $1 OFFSET $2"
                );
                sqlx::query(&q)
                    .bind(page.limit)
                    .bind(page.offset)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(device_from_row).collect()
    }

    /// Records a heartbeat; a stale device becomes online again. Returns false when the
    /// device is revoked (or gone).
    pub async fn device_heartbeat(&self, id: Uuid, hb: &Heartbeat, now: i64) -> Result<bool> {
        Ok(self.heartbeat(id, hb, now).await?.is_some())
    }

    /// Records a heartbeat (group-committed, see `writer`) and returns the fleet's desired
    /// generation; `None` when the device is revoked (or gone).
    pub async fn heartbeat(&self, id: Uuid, hb: &Heartbeat, now: i64) -> Result<Option<u64>> {
        self.writer.heartbeat(id, hb, now).await
    }

    /// Marks online devices whose last heartbeat is older than `cutoff` as stale; returns
    /// (device, fleet) of each.
    pub async fn mark_stale(&self, cutoff: i64) -> Result<Vec<(Uuid, Uuid)>> {
        sqlx::query(
            "UPDATE devices SET status = 'stale' WHERE status = 'online' AND last_heartbeat_ms < $1 \
             RETURNING id, fleet_id",
        )
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((get_uuid(r, "id")?, get_uuid(r, "fleet_id")?)))
        .collect()
    }

    /// Revokes a device: its credential stops working at once.
    pub async fn revoke_device(&self, id: Uuid) -> Result<Uuid> {
        let row =
            sqlx::query("UPDATE devices SET status = 'revoked' WHERE id = $1 RETURNING fleet_id")
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?
                .ok_or_else(|| CloudError::not_found("device", id.to_string()))?;
        get_uuid(&row, "fleet_id")
    }

    /// Stores a device's latest report and counts it; returns once committed. The hot path
    /// of the fleet: reports are group-committed (see `writer`).
    pub async fn upsert_report(
        &self,
        device_id: Uuid,
        fleet_id: Uuid,
        r: &Report,
        now: i64,
    ) -> Result<()> {
        self.writer.report(device_id, fleet_id, r, now).await
    }

    /// Aggregates over the latest report of each non-revoked device, grouped by (supernet,
    /// device class). Only distributions leave this function.
    pub async fn fleet_aggregates(&self, fleet: Option<Uuid>) -> Result<FleetAggregates> {
        let fleet_s = fleet.map(|f| f.to_string());
        let counts = sqlx::query(
            "SELECT status, COUNT(*) AS n FROM devices WHERE ($1 IS NULL OR fleet_id = $1) \
             GROUP BY status",
        )
        .bind(fleet_s.clone())
        .fetch_all(&self.pool)
        .await?;
        let mut agg = FleetAggregates::default();
        for r in &counts {
            let status: String = r.try_get("status")?;
            let n = r.try_get::<i64, _>("n")? as u32;
            match DeviceStatus::parse(&status) {
                DeviceStatus::Online => agg.devices_online += n,
                DeviceStatus::Stale => agg.devices_stale += n,
                DeviceStatus::Revoked => {}
            }
            agg.devices_total += n;
        }
        let rows = sqlx::query(
            "SELECT r.supernet_id AS supernet_id, r.device_class AS device_class, \
             r.active_subnet AS active_subnet, r.latency_p50_ms AS p50, r.latency_p95_ms AS p95, \
             r.latency_budget_ms AS budget, r.quality AS quality \
             FROM device_reports r JOIN devices d ON d.id = r.device_id \
             WHERE d.status <> 'revoked' AND ($1 IS NULL OR r.fleet_id = $1)",
        )
        .bind(fleet_s)
        .fetch_all(&self.pool)
        .await?;
        #[derive(Default)]
        struct Acc {
            p50: Vec<f64>,
            p95: Vec<f64>,
            quality: Vec<f64>,
            within: u32,
            within_p50: u32,
            subnets: BTreeMap<String, u32>,
            /// subnet -> (p50s, qualities)
            points: BTreeMap<String, (Vec<f64>, Vec<f64>)>,
        }
        let mut groups: BTreeMap<(Uuid, i32), Acc> = BTreeMap::new();
        for r in &rows {
            let key = (
                get_uuid(r, "supernet_id")?,
                r.try_get::<i64, _>("device_class")? as i32,
            );
            let a = groups.entry(key).or_default();
            let p50: f64 = r.try_get("p50")?;
            let p95: f64 = r.try_get("p95")?;
            let budget: f64 = r.try_get("budget")?;
            let quality: f64 = r.try_get("quality")?;
            let subnet: String = r.try_get("active_subnet")?;
            a.p50.push(p50);
            a.p95.push(p95);
            a.quality.push(quality);
            if budget > 0.0 && p95 <= budget {
                a.within += 1;
            }
            if budget > 0.0 && p50 <= budget {
                a.within_p50 += 1;
            }
            let pt = a.points.entry(subnet.clone()).or_default();
            pt.0.push(p50);
            pt.1.push(quality);
            *a.subnets.entry(subnet).or_default() += 1;
        }
        for ((supernet_id, class), mut a) in groups {
            let n = a.p50.len() as u32;
            let mut subnets: Vec<(String, u32)> = a.subnets.into_iter().collect();
            subnets.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
            agg.groups.push(AggregateGroup {
                supernet_id,
                device_class: DeviceClass(class),
                devices: n,
                latency_p50_ms: Distribution::of(&mut a.p50),
                latency_p95_ms: Distribution::of(&mut a.p95),
                quality: Distribution::of(&mut a.quality),
                within_budget_fraction: a.within as f64 / n.max(1) as f64,
                within_budget_p50_fraction: a.within_p50 as f64 / n.max(1) as f64,
                subnets,
                points: a
                    .points
                    .into_iter()
                    .map(|(subnet, (mut l, mut q))| SubnetPoint {
                        subnet,
                        devices: l.len() as u32,
                        latency_p50_ms: Distribution::of(&mut l).p50,
                        quality: Distribution::of(&mut q).p50,
                    })
                    .collect(),
            });
        }
        Ok(agg)
    }

    /// Devices (of `fleet`, or all) whose latest report arrived after `since_ms`.
    pub async fn devices_reported_since(&self, fleet: Option<Uuid>, since_ms: i64) -> Result<u64> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM device_reports WHERE reported_ms > $1 \
             AND ($2 IS NULL OR fleet_id = $2)",
        )
        .bind(since_ms)
        .bind(fleet.map(|f| f.to_string()))
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>("n")?.max(0) as u64)
    }
}
