//! The `node` table: every drone and proxy that has connected, which controller holds its
//! session now (under a generation number), when it was last seen, and whether it is lost.

use super::{Store, StoreResult};
use plane_protocol::names::{ClusterName, NodeName};
use plane_protocol::time::Millis;
use sqlx::any::AnyRow;
use sqlx::Row;

/// Drone, proxy or DNS server, as stored in `node.kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeKind {
    Drone,
    Proxy,
    /// A DNS server; its "cluster" is the zone it serves.
    Dns,
}

impl NodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Drone => "drone",
            Self::Proxy => "proxy",
            Self::Dns => "dns",
        }
    }
}

#[derive(Clone, Debug)]
pub struct NodeRow {
    pub name: NodeName,
    pub pool: String,
    pub version: String,
    pub hash: String,
    pub last_seen: Millis,
    /// The controller holding the node's session, if any.
    pub connected_to: Option<String>,
    /// Drones: when it was declared lost (silent past the lost window), if it has not
    /// been heard from since.
    pub lost_at: Option<Millis>,
    /// Drones: drained, so given no new backends.
    pub draining: bool,
}

/// One node's session with one controller.
#[derive(Clone, Debug)]
pub struct NodeSession<'a> {
    pub cluster: &'a ClusterName,
    pub kind: NodeKind,
    pub name: &'a NodeName,
    pub pool: &'a str,
    pub version: &'a str,
    pub hash: &'a str,
    /// The node process (its hello's instance ID).
    pub instance: &'a str,
    /// The controller holding the session.
    pub controller: &'a str,
    /// A drone whose engine can limit a container's disk.
    pub disk_limits: bool,
}

fn parse_name<T: std::str::FromStr>(row: &AnyRow, column: &str) -> StoreResult<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let raw: String = row.try_get(column).map_err(anyhow::Error::from)?;
    Ok(raw.parse().map_err(anyhow::Error::from)?)
}

impl Store {
    /// Records that a node began a session with `session.controller`; returns the session's
    /// generation, which only grows. A reconnect (to any controller) replaces the previous
    /// session, so the controller that held it can no longer mark the node disconnected.
    ///
    /// Returns `None`, and changes nothing, when another instance holds the name: one in a
    /// session heard from since `live_since`. A node's own reconnect (same instance), or a
    /// new process after the old one went quiet, takes the name.
    pub async fn node_connected(
        &self,
        session: &NodeSession<'_>,
        live_since: Millis,
    ) -> StoreResult<Option<i64>> {
        let row = sqlx::query(
            "INSERT INTO node (cluster, kind, name, pool, version, hash, instance, last_seen, connected_to, generation, disk_limits) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 1, $11) \
             ON CONFLICT (cluster, kind, name) DO UPDATE SET pool = excluded.pool, \
             disk_limits = excluded.disk_limits, \
             version = excluded.version, hash = excluded.hash, instance = excluded.instance, \
             last_seen = excluded.last_seen, lost_at = NULL, \
             connected_to = excluded.connected_to, generation = node.generation + 1 \
             WHERE node.connected_to IS NULL OR node.instance = excluded.instance \
             OR node.instance = '' OR node.last_seen < $10 \
             RETURNING generation",
        )
        .bind(session.cluster.as_str())
        .bind(session.kind.as_str())
        .bind(session.name.as_str())
        .bind(session.pool)
        .bind(session.version)
        .bind(session.hash)
        .bind(session.instance)
        .bind(Millis::now().0)
        .bind(session.controller)
        .bind(live_since.0)
        .bind(i64::from(session.disk_limits))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| row.try_get("generation"))
            .transpose()
            .map_err(|err| anyhow::Error::from(err).into())
    }

    /// Records that the session `generation` of a node ended, unless a newer session has
    /// replaced it meanwhile.
    pub async fn node_disconnected(
        &self,
        cluster: &ClusterName,
        kind: NodeKind,
        name: &NodeName,
        generation: i64,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE node SET connected_to = NULL \
             WHERE cluster = $1 AND kind = $2 AND name = $3 AND generation = $4",
        )
        .bind(cluster.as_str())
        .bind(kind.as_str())
        .bind(name.as_str())
        .bind(generation)
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
            .map(|row| Ok((parse_name(row, "cluster")?, parse_name(row, "name")?)))
            .collect()
    }

    /// The drones of a cluster's pool that can take a backend: in a session with some
    /// controller, not drained, and heard from since `seen_since`.
    /// The drones that can take a new backend of `pool` now (with `needs_disk_limits`, only
    /// those that can limit its disk).
    pub async fn placeable_drones(
        &self,
        cluster: &ClusterName,
        pool: &str,
        seen_since: Millis,
        needs_disk_limits: bool,
    ) -> StoreResult<Vec<NodeName>> {
        let rows = sqlx::query(
            "SELECT name FROM node WHERE cluster = $1 AND kind = 'drone' AND pool = $2 \
             AND connected_to IS NOT NULL AND lost_at IS NULL AND draining = 0 AND last_seen >= $3 \
             AND disk_limits >= $4",
        )
        .bind(cluster.as_str())
        .bind(pool)
        .bind(seen_since.0)
        .bind(i64::from(needs_disk_limits))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| parse_name(row, "name")).collect()
    }

    /// Every cluster a drone or proxy has connected to, by name (a DNS server's "cluster"
    /// is its zone).
    pub async fn clusters(&self) -> StoreResult<Vec<ClusterName>> {
        let rows = sqlx::query(
            "SELECT DISTINCT cluster FROM node WHERE kind IN ('drone', 'proxy') ORDER BY cluster",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| super::backends::parse_column(row, "cluster", |s| s.parse().ok()))
            .collect()
    }

    pub async fn nodes(&self, cluster: &ClusterName, kind: NodeKind) -> StoreResult<Vec<NodeRow>> {
        let rows = sqlx::query(
            "SELECT name, pool, version, hash, last_seen, lost_at, connected_to, draining FROM node \
             WHERE cluster = $1 AND kind = $2 ORDER BY name",
        )
        .bind(cluster.as_str())
        .bind(kind.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(NodeRow {
                    name: parse_name(row, "name")?,
                    pool: row.try_get("pool").map_err(anyhow::Error::from)?,
                    version: row.try_get("version").map_err(anyhow::Error::from)?,
                    hash: row.try_get("hash").map_err(anyhow::Error::from)?,
                    draining: row
                        .try_get::<i64, _>("draining")
                        .map_err(anyhow::Error::from)?
                        != 0,
                    last_seen: Millis(row.try_get("last_seen").map_err(anyhow::Error::from)?),
                    connected_to: row.try_get("connected_to").map_err(anyhow::Error::from)?,
                    lost_at: row
                        .try_get::<Option<i64>, _>("lost_at")
                        .map_err(anyhow::Error::from)?
                        .map(Millis),
                })
            })
            .collect()
    }

    /// Drains (or, with `draining` false, undrains) a drone. Returns `None` when the cluster
    /// has no such drone, else whether anything changed.
    pub async fn set_draining(
        &self,
        cluster: &ClusterName,
        drone: &NodeName,
        draining: bool,
    ) -> StoreResult<Option<bool>> {
        // One conditional update, so of two concurrent drains exactly one reports a change.
        let changed = sqlx::query(
            "UPDATE node SET draining = $1 \
             WHERE cluster = $2 AND kind = 'drone' AND name = $3 AND draining <> $1",
        )
        .bind(i64::from(draining))
        .bind(cluster.as_str())
        .bind(drone.as_str())
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0;
        if changed {
            return Ok(Some(true));
        }
        let exists = sqlx::query(
            "SELECT 1 AS one FROM node WHERE cluster = $1 AND kind = 'drone' AND name = $2",
        )
        .bind(cluster.as_str())
        .bind(drone.as_str())
        .fetch_optional(&self.pool)
        .await?
        .is_some();
        Ok(exists.then_some(false))
    }

    /// Takes or keeps the lease named `name` (e.g. the sweeper's) for `holder` until
    /// `expires_at`, if it is free, expired, or already `holder`'s. Returns whether `holder`
    /// holds it now. One conditional upsert, so two controllers never both succeed.
    /// Records where controller `controller_id` can be reached by the others.
    pub async fn register_peer(
        &self,
        controller_id: &str,
        url: &str,
        now: Millis,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO controller_peer (controller_id, url, started_at) VALUES ($1, $2, $3) \
             ON CONFLICT (controller_id) DO UPDATE SET url = excluded.url, started_at = excluded.started_at",
        )
        .bind(controller_id)
        .bind(url)
        .bind(now.0)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn remove_peer(&self, controller_id: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM controller_peer WHERE controller_id = $1")
            .bind(controller_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Where controller `controller_id` can be reached, if it is running.
    pub async fn peer_url(&self, controller_id: &str) -> StoreResult<Option<String>> {
        let row = sqlx::query("SELECT url FROM controller_peer WHERE controller_id = $1")
            .bind(controller_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| row.try_get("url"))
            .transpose()
            .map_err(|err| anyhow::Error::from(err).into())
    }

    pub async fn hold_controller_lease(
        &self,
        name: &str,
        holder: &str,
        now: Millis,
        expires_at: Millis,
    ) -> StoreResult<bool> {
        let row = sqlx::query(
            "INSERT INTO controller_lease (name, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
             expires_at = excluded.expires_at \
             WHERE controller_lease.holder = excluded.holder OR controller_lease.expires_at <= $4 \
             RETURNING holder",
        )
        .bind(name)
        .bind(holder)
        .bind(expires_at.0)
        .bind(now.0)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }
}
