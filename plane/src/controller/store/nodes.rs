//! The `node` table: every drone and proxy that has connected, and when it was last seen.

use super::{Store, StoreResult};
use plane_protocol::names::{ClusterName, NodeName};
use plane_protocol::time::Millis;
use sqlx::Row;

/// Drone or proxy, as stored in `node.kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeKind {
    Drone,
    Proxy,
}

impl NodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Drone => "drone",
            Self::Proxy => "proxy",
        }
    }
}

#[derive(Clone, Debug)]
pub struct NodeRow {
    pub name: NodeName,
    pub pool: String,
    pub last_seen: Millis,
    /// Drones: when it was declared lost (silent past the lost window), if it has not
    /// been heard from since.
    pub lost_at: Option<Millis>,
}

impl Store {
    /// Records that a node connected (or reconnected).
    pub async fn upsert_node(
        &self,
        cluster: &ClusterName,
        kind: NodeKind,
        name: &NodeName,
        pool: &str,
        version: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO node (cluster, kind, name, pool, version, last_seen) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (cluster, kind, name) DO UPDATE SET pool = excluded.pool, \
             version = excluded.version, last_seen = excluded.last_seen, lost_at = NULL",
        )
        .bind(cluster.as_str())
        .bind(kind.as_str())
        .bind(name.as_str())
        .bind(pool)
        .bind(version)
        .bind(Millis::now().0)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn touch_node(
        &self,
        cluster: &ClusterName,
        kind: NodeKind,
        name: &NodeName,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE node SET last_seen = $1 WHERE cluster = $2 AND kind = $3 AND name = $4",
        )
        .bind(Millis::now().0)
        .bind(cluster.as_str())
        .bind(kind.as_str())
        .bind(name.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Declares lost every drone not seen since `silent_since` and not yet declared lost;
    /// returns them as `(cluster, name)`.
    pub async fn mark_lost_drones(
        &self,
        silent_since: Millis,
        now: Millis,
    ) -> StoreResult<Vec<(ClusterName, NodeName)>> {
        let rows = sqlx::query(
            "UPDATE node SET lost_at = $1 \
             WHERE kind = 'drone' AND lost_at IS NULL AND last_seen <= $2 \
             RETURNING cluster, name",
        )
        .bind(now.0)
        .bind(silent_since.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let cluster: String = row.try_get("cluster").map_err(anyhow::Error::from)?;
                let name: String = row.try_get("name").map_err(anyhow::Error::from)?;
                Ok((
                    cluster.parse().map_err(anyhow::Error::from)?,
                    name.parse().map_err(anyhow::Error::from)?,
                ))
            })
            .collect()
    }

    pub async fn nodes(&self, cluster: &ClusterName, kind: NodeKind) -> StoreResult<Vec<NodeRow>> {
        let rows = sqlx::query(
            "SELECT name, pool, last_seen, lost_at FROM node WHERE cluster = $1 AND kind = $2 ORDER BY name",
        )
        .bind(cluster.as_str())
        .bind(kind.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let name: String = row.try_get("name").map_err(anyhow::Error::from)?;
                Ok(NodeRow {
                    name: name.parse().map_err(anyhow::Error::from)?,
                    pool: row.try_get("pool").map_err(anyhow::Error::from)?,
                    last_seen: Millis(row.try_get("last_seen").map_err(anyhow::Error::from)?),
                    lost_at: row
                        .try_get::<Option<i64>, _>("lost_at")
                        .map_err(anyhow::Error::from)?
                        .map(Millis),
                })
            })
            .collect()
    }
}
