//! Reading the change log: `backend_status` rows in sequence order, which the change bus
//! turns into status changes for streams, route waits and proxies on every controller.

use super::backends::{entry_from_row, parse_column, StatusChange};
use super::{Store, StoreResult};
use sqlx::Row;

impl Store {
    /// Status changes with a sequence number above `after`, oldest first, at most `limit`.
    pub async fn status_changes_after(
        &self,
        after: i64,
        limit: i64,
    ) -> StoreResult<Vec<StatusChange>> {
        let rows = sqlx::query(
            "SELECT s.id, s.backend_id, b.cluster, s.status, s.termination_kind, \
             s.termination_reason, s.exit_code, s.message, s.health, s.time \
             FROM backend_status s JOIN backend b ON b.id = s.backend_id \
             WHERE s.id > $1 ORDER BY s.id LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        // Read after the writing commit signalled, so a read connection sees it.
        .fetch_all(&self.readers)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(StatusChange {
                    sequence: row.try_get("id").map_err(anyhow::Error::from)?,
                    backend_id: parse_column(row, "backend_id", |s| s.parse().ok())?,
                    cluster: parse_column(row, "cluster", |s| s.parse().ok())?,
                    entry: entry_from_row(row)?,
                })
            })
            .collect()
    }

    /// The sequence number of the newest status change (0 when there is none).
    pub async fn latest_status_sequence(&self) -> StoreResult<i64> {
        let row = sqlx::query("SELECT COALESCE(MAX(id), 0) AS latest FROM backend_status")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("latest").map_err(anyhow::Error::from)?)
    }
}
