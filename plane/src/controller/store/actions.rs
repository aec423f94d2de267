//! The `backend_action` table: actions for drones, kept until acknowledged so that a
//! drone that reconnects receives everything it missed.

use super::{Store, StoreResult};
use anyhow::Context;
use plane_protocol::drone::{ActionKind, BackendAction};
use plane_protocol::names::{BackendName, ClusterName, NodeName};
use plane_protocol::time::Millis;
use sqlx::Row;

impl Store {
    /// One page of unacknowledged actions for a drone: the oldest `limit` with an ID above
    /// `after`. Paged so that a drone with a huge backlog is replayed in bounded steps.
    pub async fn pending_actions(
        &self,
        cluster: &ClusterName,
        drone: &NodeName,
        after: i64,
        limit: i64,
    ) -> StoreResult<Vec<BackendAction>> {
        let rows = sqlx::query(
            "SELECT id, backend_id, action FROM backend_action \
             WHERE cluster = $1 AND drone = $2 AND acked_at IS NULL AND id > $3 \
             ORDER BY id LIMIT $4",
        )
        .bind(cluster.as_str())
        .bind(drone.as_str())
        .bind(after)
        .bind(limit)
        // Looked for once the writing commit signalled, so a read connection sees them.
        .fetch_all(self.session_reads())
        .await?;
        rows.iter()
            .map(|row| {
                let backend_id: String = row.try_get("backend_id").map_err(anyhow::Error::from)?;
                let action: String = row.try_get("action").map_err(anyhow::Error::from)?;
                Ok(BackendAction {
                    action_id: row.try_get("id").map_err(anyhow::Error::from)?,
                    backend_id: backend_id.parse().map_err(anyhow::Error::from)?,
                    action: serde_json::from_str(&action).context("reading stored action")?,
                })
            })
            .collect()
    }

    /// Marks an action as received by its drone (only that drone may ack it).
    pub async fn ack_action(
        &self,
        cluster: &ClusterName,
        drone: &NodeName,
        action_id: i64,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE backend_action SET acked_at = $1 \
             WHERE id = $2 AND cluster = $3 AND drone = $4 AND acked_at IS NULL",
        )
        .bind(Millis::now().0)
        .bind(action_id)
        .bind(cluster.as_str())
        .bind(drone.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

pub(super) async fn insert(
    conn: &mut sqlx::AnyConnection,
    backend: &BackendName,
    cluster: &ClusterName,
    drone: &NodeName,
    action: &ActionKind,
    now: Millis,
) -> StoreResult<i64> {
    let action = serde_json::to_string(action).context("serializing action")?;
    let row = sqlx::query(
        "INSERT INTO backend_action (backend_id, cluster, drone, action, created_at) \
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(backend.as_str())
    .bind(cluster.as_str())
    .bind(drone.as_str())
    .bind(action)
    .bind(now.0)
    .fetch_one(conn)
    .await?;
    Ok(row.try_get("id").map_err(anyhow::Error::from)?)
}

/// Marks every undelivered action of a backend as done: it has terminated, so re-sending
/// them (say, a spawn to a drone that was away) could only do harm.
pub(super) async fn drop_pending(
    conn: &mut sqlx::AnyConnection,
    backend: &BackendName,
    now: Millis,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE backend_action SET acked_at = $1 WHERE backend_id = $2 AND acked_at IS NULL",
    )
    .bind(now.0)
    .bind(backend.as_str())
    .execute(conn)
    .await?;
    Ok(())
}
