//! The `backend_action` table: actions for drones, kept until acknowledged so that a
//! drone that reconnects receives everything it missed.

use super::{Store, StoreResult};
use anyhow::Context;
use plane_protocol::drone::{ActionKind, BackendAction};
use plane_protocol::names::{BackendName, ClusterName, NodeName};
use plane_protocol::time::Millis;
use sqlx::Row;

impl Store {
    /// Unacknowledged actions for a drone, oldest first.
    pub async fn pending_actions(
        &self,
        cluster: &ClusterName,
        drone: &NodeName,
    ) -> StoreResult<Vec<BackendAction>> {
        let rows = sqlx::query(
            "SELECT id, backend_id, action FROM backend_action \
             WHERE cluster = $1 AND drone = $2 AND acked_at IS NULL ORDER BY id",
        )
        .bind(cluster.as_str())
        .bind(drone.as_str())
        .fetch_all(&self.pool)
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
