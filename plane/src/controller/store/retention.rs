//! Old-data cleanup (`--retention-days`): what no live backend and no key's safety needs,
//! deleted in small batches so neither database is held busy for long.
//!
//! Deleted once older than the cutoff: terminated backends (by the time they terminated)
//! with their status history, tokens, actions, open-connection rows and revocations; acked
//! actions of any backend; tokens that expired or were revoked; old revocation records.
//! Never deleted: a backend that has not terminated or that a key still names, and any key
//! row, whose fencing token must keep growing however long ago the key was last used.

use super::{Store, StoreResult};
use plane_protocol::backend::BackendStatus;
use plane_protocol::time::Millis;
use sqlx::Row;

/// What one batch deleted, by kind of row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Purged {
    pub backends: u64,
    pub statuses: u64,
    pub tokens: u64,
    pub actions: u64,
    pub revocations: u64,
}

impl Purged {
    pub fn total(&self) -> u64 {
        self.backends + self.statuses + self.tokens + self.actions + self.revocations
    }

    fn add(&mut self, other: Purged) {
        self.backends += other.backends;
        self.statuses += other.statuses;
        self.tokens += other.tokens;
        self.actions += other.actions;
        self.revocations += other.revocations;
    }
}

/// `DELETE FROM table WHERE column IN (ids)`; returns how many rows went.
async fn delete_by_ids(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    table: &str,
    column: &str,
    ids: &[String],
) -> Result<u64, sqlx::Error> {
    // `$1, $2, ...`: both databases take numbered placeholders through `Any`.
    let list = (1..=ids.len())
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!("DELETE FROM {table} WHERE {column} IN ({list})");
    let mut query = sqlx::query(&sql);
    for id in ids {
        query = query.bind(id.as_str());
    }
    Ok(query.execute(&mut **tx).await?.rows_affected())
}

impl Store {
    /// Deletes up to `batch` old terminated backends (with everything that belongs to them)
    /// and up to `batch` rows of each other kind older than `cutoff`, in one transaction.
    /// Call again while it deletes anything.
    pub async fn purge_batch(&self, cutoff: Millis, batch: i64) -> StoreResult<Purged> {
        let mut purged = Purged::default();
        let mut tx = self.begin_write(&self.pool).await?;
        let rows = sqlx::query(
            "SELECT id FROM backend WHERE status_number >= $1 AND status_time < $2 \
             AND NOT EXISTS (SELECT 1 FROM backend_key WHERE backend_key.backend_id = backend.id) \
             LIMIT $3",
        )
        .bind(BackendStatus::Terminated.number())
        .bind(cutoff.0)
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        let ids: Vec<String> = rows
            .iter()
            .map(|row| row.try_get("id"))
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::from)?;
        if !ids.is_empty() {
            // Children first: they reference the backend row.
            purged.tokens += delete_by_ids(&mut tx, "token", "backend_id", &ids).await?;
            purged.statuses += delete_by_ids(&mut tx, "backend_status", "backend_id", &ids).await?;
            purged.actions += delete_by_ids(&mut tx, "backend_action", "backend_id", &ids).await?;
            purged.revocations +=
                delete_by_ids(&mut tx, "token_revocation", "backend_id", &ids).await?;
            delete_by_ids(&mut tx, "backend_connection", "backend_id", &ids).await?;
            purged.backends += delete_by_ids(&mut tx, "backend", "id", &ids).await?;
        }
        for (sql, count) in [
            (
                "DELETE FROM backend_action WHERE id IN (SELECT id FROM backend_action \
                 WHERE acked_at IS NOT NULL AND acked_at < $1 LIMIT $2)",
                &mut purged.actions,
            ),
            (
                "DELETE FROM token WHERE token IN (SELECT token FROM token \
                 WHERE expires_at < $1 OR revoked_at < $1 LIMIT $2)",
                &mut purged.tokens,
            ),
            (
                "DELETE FROM token_revocation WHERE id IN (SELECT id FROM token_revocation \
                 WHERE time < $1 LIMIT $2)",
                &mut purged.revocations,
            ),
        ] {
            let done = sqlx::query(sql)
                .bind(cutoff.0)
                .bind(batch)
                .execute(&mut *tx)
                .await?;
            *count += done.rows_affected();
        }
        tx.commit().await?;
        Ok(purged)
    }

    /// Runs [`Store::purge_batch`] until a batch deletes nothing or `max_batches` ran.
    pub async fn purge(&self, cutoff: Millis, batch: i64, max_batches: u32) -> StoreResult<Purged> {
        let mut purged = Purged::default();
        for _ in 0..max_batches {
            let done = self.purge_batch(cutoff, batch).await?;
            purged.add(done);
            if done.total() == 0 {
                break;
            }
        }
        Ok(purged)
    }
}
