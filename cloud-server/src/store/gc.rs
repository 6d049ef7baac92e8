//! Which content-addressed blobs rows still reference (blob garbage collection and oracle
//! deletion). A blob is live while an oracle's weights, a supernet's module list, a dataset's
//! content digest or the checkpoint of a job that may still run names it; checkpoints of
//! settled jobs are garbage.
use std::collections::HashSet;

use sqlx::{Any, Row, Transaction};

use super::Store;
use crate::error::Result;

/// Every reference, as one `UNION ALL` of digests (`$1` filters to one digest when bound).
const REFERENCES: &str = "SELECT weights_sha256 AS sha FROM oracles \
     UNION ALL SELECT sha256 AS sha FROM supernet_blobs \
     UNION ALL SELECT digest AS sha FROM datasets WHERE digest IS NOT NULL \
     UNION ALL SELECT checkpoint_sha256 AS sha FROM jobs \
       WHERE checkpoint_sha256 IS NOT NULL AND state IN ('queued', 'running')";

impl Store {
    /// Every digest some row references.
    pub async fn referenced_blobs(&self) -> Result<HashSet<String>> {
        let rows = sqlx::query(REFERENCES).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| Ok(r.try_get::<String, _>("sha")?))
            .collect()
    }

    /// How many rows reference `sha256`, seen from inside `tx`.
    pub(super) async fn blob_references(
        &self,
        tx: &mut Transaction<'static, Any>,
        sha256: &str,
    ) -> Result<i64> {
        let q = format!("SELECT COUNT(*) AS n FROM ({REFERENCES}) r WHERE r.sha = $1");
        Ok(sqlx::query(&q)
            .bind(sha256)
            .fetch_one(&mut **tx)
            .await?
            .try_get("n")?)
    }
}
