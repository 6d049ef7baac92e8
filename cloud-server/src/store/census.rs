//! The counts behind `/metrics`' fleet and queue gauges: two small `GROUP BY` queries run by
//! a timer in `serve` (`server::census_refresher`), never per scrape, so scraping stays free
//! however large the fleet.
use sqlx::Row;

use super::Store;
use crate::domain::{DeviceStatus, JobState};
use crate::error::Result;

/// Devices per status and jobs per state, labels from the domain enums only.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Census {
    pub devices: Vec<(&'static str, u64)>,
    pub jobs: Vec<(&'static str, u64)>,
}

impl Store {
    pub async fn census(&self) -> Result<Census> {
        let mut c = Census::default();
        for r in sqlx::query("SELECT status, COUNT(*) AS n FROM devices GROUP BY status")
            .fetch_all(&self.pool)
            .await?
        {
            let s: String = r.try_get("status")?;
            let n: i64 = r.try_get("n")?;
            c.devices
                .push((DeviceStatus::parse(&s).as_str(), n.max(0) as u64));
        }
        for r in sqlx::query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
            .fetch_all(&self.pool)
            .await?
        {
            let s: String = r.try_get("state")?;
            let n: i64 = r.try_get("n")?;
            if let Ok(state) = JobState::parse(&s) {
                c.jobs.push((state.as_str(), n.max(0) as u64));
            }
        }
        Ok(c)
    }
}
