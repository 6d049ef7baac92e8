//! Group commit of the fleet's hot writes: reports and heartbeats.
//!
//! Thousands of agents each writing one row per request would make every request pay for its
//! own transaction commit (an fsync on PostgreSQL) and, on SQLite, fight over the single write
//! lock (whose busy handler sleeps in steps of milliseconds). Instead every report and
//! heartbeat is sent over one bounded channel to a single writer task, which takes whatever
//! has queued up (at most [`MAX_BATCH`]), writes it in one transaction — reports as
//! multi-row upserts, heartbeats as one `UPDATE ... RETURNING` each — and only after the
//! commit answers each caller. An acknowledged write is therefore committed (visible to every
//! later read; durable as described next), and a batch costs one commit.
//!
//! Durability: on PostgreSQL these transactions commit with `synchronous_commit = off` unless
//! the server runs with `--durable-telemetry`. A WAL flush (fsync) per batch otherwise sets
//! the tail latency of every report (p99 61-290 ms against 15-26 ms without, fleet bench on
//! this machine). The trade-off matches SQLite's `synchronous = NORMAL` in WAL mode: a
//! database crash may lose the last fraction of a second of acknowledged telemetry, never
//! corrupt it, and agents send fresh heartbeats and reports anyway. Everything else (uploads,
//! jobs, credentials, desired state) commits synchronously.
//!
//! If a batch fails, its writes are retried one per transaction so that one failing write
//! cannot fail the others; each caller gets its own outcome. Validation happens before a
//! write is queued, so bad input never reaches the writer.
use std::collections::HashMap;
use std::sync::OnceLock;

use sqlx::AnyPool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::domain::{Heartbeat, Report};
use crate::error::{CloudError, Result};

/// Most writes committed in one transaction.
pub const MAX_BATCH: usize = 256;
/// Writes queued beyond the one being committed; senders wait when it is full (the request
/// layer's concurrency limit keeps it from filling in practice).
const QUEUE: usize = 1024;
/// Largest multi-row upsert; batches are split into power-of-two statements so that only
/// `log2(MAX_ROWS) + 1` distinct statements exist and all stay in the prepared-statement cache.
const MAX_ROWS: usize = 128;

enum Write {
    Report {
        device_id: Uuid,
        fleet_id: Uuid,
        report: Box<Report>,
        now: i64,
        done: oneshot::Sender<Result<()>>,
    },
    Heartbeat {
        device_id: Uuid,
        hb: Box<Heartbeat>,
        now: i64,
        done: oneshot::Sender<Result<Option<u64>>>,
    },
}

/// What one write produced: nothing for a report; for a heartbeat the fleet's desired
/// generation, or `None` when the device is revoked or gone.
type Outcome = Option<u64>;

impl Write {
    fn answer(self, r: Result<Outcome>) {
        match self {
            Write::Report { done, .. } => {
                let _ = done.send(r.map(|_| ()));
            }
            Write::Heartbeat { done, .. } => {
                let _ = done.send(r);
            }
        }
    }
}

/// The sending side of the writer (cheap to clone with the store).
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    tx: mpsc::Sender<Write>,
}

impl std::fmt::Debug for Write {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Write::Report { device_id, .. } => write!(f, "Report({device_id})"),
            Write::Heartbeat { device_id, .. } => write!(f, "Heartbeat({device_id})"),
        }
    }
}

fn closed() -> CloudError {
    CloudError::Unavailable("the store is shutting down".into())
}

impl Writer {
    /// Spawns the writer task on the current runtime. It ends when every [`Writer`] clone is
    /// dropped. `async_commit` (PostgreSQL): commit without waiting for the WAL flush.
    pub(crate) fn spawn(pool: AnyPool, async_commit: bool) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(pool, async_commit, rx));
        Writer { tx }
    }

    /// Stores a report; returns once it is committed.
    pub(crate) async fn report(
        &self,
        device_id: Uuid,
        fleet_id: Uuid,
        report: &Report,
        now: i64,
    ) -> Result<()> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Write::Report {
                device_id,
                fleet_id,
                report: Box::new(report.clone()),
                now,
                done,
            })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Records a heartbeat; returns once it is committed, with the fleet's desired
    /// generation, or `None` when the device is revoked or gone.
    pub(crate) async fn heartbeat(
        &self,
        device_id: Uuid,
        hb: &Heartbeat,
        now: i64,
    ) -> Result<Option<u64>> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Write::Heartbeat {
                device_id,
                hb: Box::new(hb.clone()),
                now,
                done,
            })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }
}

async fn run(pool: AnyPool, async_commit: bool, mut rx: mpsc::Receiver<Write>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        match write_tx(&pool, async_commit, &batch).await {
            Ok(out) => {
                for (w, o) in batch.drain(..).zip(out) {
                    w.answer(Ok(o));
                }
            }
            Err(e) if batch.len() == 1 => {
                batch.pop().expect("one write").answer(Err(e));
            }
            Err(e) => {
                tracing::warn!(error = %e, writes = batch.len(), "batch failed; retrying one by one");
                for w in batch.drain(..) {
                    let r = write_tx(&pool, async_commit, std::slice::from_ref(&w))
                        .await
                        .map(|mut v| v.pop().flatten());
                    w.answer(r);
                }
            }
        }
    }
}

/// Writes `batch` in one transaction; one outcome per write, in order.
async fn write_tx(pool: &AnyPool, async_commit: bool, batch: &[Write]) -> Result<Vec<Outcome>> {
    let mut tx = pool.begin().await?;
    if async_commit {
        // PostgreSQL only (see the module docs): no wait for the WAL flush.
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
    }
    let mut out = vec![None; batch.len()];
    // Heartbeats in arrival order; the fleet's generation comes back with the update.
    for (i, w) in batch.iter().enumerate() {
        if let Write::Heartbeat {
            device_id, hb, now, ..
        } = w
        {
            out[i] = heartbeat_row(&mut tx, *device_id, hb, *now).await?;
        }
    }
    // Reports: the latest one per device wins, `report_count` grows by all of them.
    let mut rows: Vec<(usize, i64)> = Vec::new();
    let mut by_device: HashMap<Uuid, usize> = HashMap::new();
    for (i, w) in batch.iter().enumerate() {
        if let Write::Report { device_id, .. } = w {
            match by_device.get(device_id) {
                Some(&r) => {
                    rows[r].0 = i;
                    rows[r].1 += 1;
                }
                None => {
                    by_device.insert(*device_id, rows.len());
                    rows.push((i, 1));
                }
            }
        }
    }
    let mut rest = &rows[..];
    while !rest.is_empty() {
        let n = MAX_ROWS.min(1 << rest.len().ilog2());
        let (now_rows, later) = rest.split_at(n);
        let mut q = sqlx::query(upsert_sql(n));
        for &(i, count) in now_rows {
            let Write::Report {
                device_id,
                fleet_id,
                report: r,
                now,
                ..
            } = &batch[i]
            else {
                unreachable!("rows index reports only")
            };
            q = q
                .bind(device_id.to_string())
                .bind(fleet_id.to_string())
                .bind(r.supernet_id.to_string())
                .bind(r.active_subnet.clone())
                .bind(r.latency_p50_ms)
                .bind(r.latency_p95_ms)
                .bind(r.latency_budget_ms)
                .bind(r.quality_estimate)
                .bind(r.quality_sample_count as i64)
                .bind(r.search.generations as i64)
                .bind(r.search.evaluated_subnets as i64)
                .bind(r.search.search_seconds)
                .bind(r.search.front_size as i64)
                .bind(r.latency_table.num_entries as i64)
                .bind(r.latency_table.stem_ms)
                .bind(r.latency_table.head_ms)
                .bind(r.latency_table.oracle_ms)
                .bind(r.latency_table.calibration_factor)
                .bind(count)
                .bind(*now);
        }
        q.execute(&mut *tx).await?;
        rest = later;
    }
    tx.commit().await?;
    Ok(out)
}

async fn heartbeat_row(
    tx: &mut sqlx::AnyConnection,
    id: Uuid,
    hb: &Heartbeat,
    now: i64,
) -> Result<Option<u64>> {
    use sqlx::Row;
    let row = sqlx::query(
        "UPDATE devices SET agent_version = $1, active_supernet_id = $2, active_subnet = $3, \
         latency_p50_ms = $4, latency_p95_ms = $5, last_reason = $6, applied_generation = $7, \
         last_heartbeat_ms = $8, status = 'online', serving_reason = $10, \
         failed_supernet_id = $11, install_failure = $12, \
         recent_restarts = CASE WHEN $13 = 0 OR agent_started_ms = 0 OR agent_started_ms = $13 \
           THEN recent_restarts WHEN last_restart_ms >= $8 - 600000 THEN recent_restarts + 1 \
           ELSE 1 END, \
         last_restart_ms = CASE WHEN $13 = 0 OR agent_started_ms = 0 OR agent_started_ms = $13 \
           THEN last_restart_ms ELSE $8 END, \
         agent_started_ms = CASE WHEN $13 = 0 THEN agent_started_ms ELSE $13 END \
         WHERE id = $9 AND status <> 'revoked' \
         RETURNING (SELECT generation FROM fleets WHERE fleets.id = devices.fleet_id) AS generation",
    )
    .bind(hb.agent_version.clone())
    .bind(hb.active_supernet_id.map(|s| s.to_string()))
    .bind(hb.active_subnet.clone())
    .bind(hb.latency_p50_ms)
    .bind(hb.latency_p95_ms)
    .bind(hb.last_reason.0 as i64)
    .bind(hb.applied_generation as i64)
    .bind(now)
    .bind(id.to_string())
    .bind(hb.serving_reason.0 as i64)
    .bind(hb.failed_supernet_id.map(|s| s.to_string()))
    .bind(hb.install_failure.0 as i64)
    .bind(hb.agent_started_ms)
    .fetch_optional(&mut *tx)
    .await?;
    row.map(|r| Ok(r.try_get::<i64, _>("generation")?.max(0) as u64))
        .transpose()
}

/// Columns of one report row, in bind order (`device_class` is not bound, see
/// [`build_upsert`]).
const REPORT_COLS: [&str; 21] = [
    "device_id",
    "fleet_id",
    "supernet_id",
    "device_class",
    "active_subnet",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_budget_ms",
    "quality",
    "quality_samples",
    "search_generations",
    "search_evaluated",
    "search_seconds",
    "front_size",
    "lt_entries",
    "lt_stem_ms",
    "lt_head_ms",
    "lt_oracle_ms",
    "lt_calibration",
    "report_count",
    "reported_ms",
];

/// The upsert of `n` report rows (`n` a power of two up to [`MAX_ROWS`]).
fn upsert_sql(n: usize) -> &'static str {
    static SQL: OnceLock<Vec<String>> = OnceLock::new();
    let all = SQL.get_or_init(|| {
        (0..=MAX_ROWS.ilog2())
            .map(|k| build_upsert(1 << k))
            .collect()
    });
    &all[n.ilog2() as usize]
}

/// The device class is not bound: it is the class recorded at enrollment, read in the same
/// statement, so an agent cannot file its report under another class.
fn build_upsert(n: usize) -> String {
    let k = REPORT_COLS.len() - 1;
    let values: Vec<String> = (0..n)
        .map(|r| {
            let mut next = r * k;
            let ps: Vec<String> = REPORT_COLS
                .iter()
                .map(|c| {
                    if *c == "device_class" {
                        format!(
                            "(SELECT device_class FROM devices WHERE id = ${})",
                            r * k + 1
                        )
                    } else {
                        next += 1;
                        format!("${next}")
                    }
                })
                .collect();
            format!("({})", ps.join(","))
        })
        .collect();
    let updates: Vec<String> = REPORT_COLS[1..]
        .iter()
        .map(|c| match *c {
            "report_count" => {
                "report_count = device_reports.report_count + excluded.report_count".to_string()
            }
            c => format!("{c} = excluded.{c}"),
        })
        .collect();
    format!(
        "INSERT INTO device_reports ({}) VALUES {} ON CONFLICT (device_id) DO UPDATE SET {}",
        REPORT_COLS.join(", "),
        values.join(","),
        updates.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upserts_have_one_placeholder_per_value() {
        for k in 0..=MAX_ROWS.ilog2() {
            let n = 1usize << k;
            let sql = upsert_sql(n);
            let bound = REPORT_COLS.len() - 1;
            let last = format!("${}", n * bound);
            assert!(sql.contains(&last), "{n} rows: {sql}");
            let beyond = format!("${},", n * bound + 1);
            assert!(!sql.contains(&beyond));
            assert!(sql.contains("report_count = device_reports.report_count + excluded"));
        }
    }
}
