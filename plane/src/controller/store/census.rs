//! Counts for the controller's metrics, read at each scrape: live backends by cluster, drone
//! and status; connected nodes by cluster and kind; actions not yet acked.

use super::{Store, StoreResult};
use plane_protocol::backend::BackendStatus;
use plane_protocol::time::Millis;
use sqlx::Row;

/// One group of a count.
pub struct Counted {
    pub labels: Vec<String>,
    pub count: i64,
}

impl Store {
    async fn grouped(
        &self,
        sql: &str,
        columns: &[&str],
        bind: Option<i64>,
    ) -> StoreResult<Vec<Counted>> {
        let mut query = sqlx::query(sql);
        if let Some(value) = bind {
            query = query.bind(value);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                let labels = columns
                    .iter()
                    .map(|column| row.try_get::<String, _>(*column))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Counted {
                    labels,
                    count: row.try_get("n")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(|err| anyhow::Error::from(err).into())
    }

    /// Backends not terminated, by `[cluster, drone, status]`.
    pub async fn live_backend_census(&self) -> StoreResult<Vec<Counted>> {
        self.grouped(
            "SELECT cluster, drone, status, COUNT(*) AS n FROM backend WHERE status_number < $1 \
             GROUP BY cluster, drone, status",
            &["cluster", "drone", "status"],
            Some(i64::from(BackendStatus::Terminated.number())),
        )
        .await
    }

    /// Nodes with a session on any controller, by `[cluster, kind]`.
    pub async fn connected_node_census(&self) -> StoreResult<Vec<Counted>> {
        self.grouped(
            "SELECT cluster, kind, COUNT(*) AS n FROM node WHERE connected_to IS NOT NULL \
             GROUP BY cluster, kind",
            &["cluster", "kind"],
            None,
        )
        .await
    }

    /// Actions stored for drones and not yet acked, by `[cluster]`.
    /// Actions not acked, by `[cluster, state]`: `sent` when their drone has a session
    /// heard from since `fresh_since` (its controller sent them and waits for the ack),
    /// `pending` when it has none (they wait for it to reconnect).
    pub async fn unacked_action_census(&self, fresh_since: Millis) -> StoreResult<Vec<Counted>> {
        self.grouped(
            "SELECT a.cluster AS cluster, \
             CASE WHEN n.connected_to IS NOT NULL AND n.last_seen >= $1 THEN 'sent' ELSE 'pending' END AS state, \
             COUNT(*) AS n FROM backend_action a \
             LEFT JOIN node n ON n.cluster = a.cluster AND n.kind = 'drone' AND n.name = a.drone \
             WHERE a.acked_at IS NULL GROUP BY 1, 2",
            &["cluster", "state"],
            Some(fresh_since.0),
        )
        .await
    }
}
