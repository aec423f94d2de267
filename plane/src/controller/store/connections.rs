//! The `backend_connection` table: which backends each proxy has open connections to right
//! now. A row keeps its backend from being reaped as idle, whatever the report interval.

use super::{placeholders, Store, StoreResult, MAX_LIST_PARAMETERS};
use plane_protocol::names::{BackendName, ClusterName, NodeName};
use plane_protocol::time::Millis;

impl Store {
    /// Session `generation` of a proxy began: forget what its earlier sessions reported
    /// (it sends everything it has open again right after its hello), and count idle time
    /// for those backends from now.
    pub async fn proxy_session_started(
        &self,
        cluster: &ClusterName,
        proxy: &NodeName,
        generation: i64,
        now: Millis,
    ) -> StoreResult<()> {
        self.forget_connections(cluster, proxy, "<", generation, now)
            .await
    }

    /// Session `generation` of a proxy ended: what it reported no longer keeps anything
    /// alive, and idle time for those backends counts from now. What a newer session of the
    /// same proxy reported stays.
    pub async fn proxy_session_ended(
        &self,
        cluster: &ClusterName,
        proxy: &NodeName,
        generation: i64,
        now: Millis,
    ) -> StoreResult<()> {
        self.forget_connections(cluster, proxy, "=", generation, now)
            .await
    }

    async fn forget_connections(
        &self,
        cluster: &ClusterName,
        proxy: &NodeName,
        // How the sessions to forget compare with `generation`: "<" or "=".
        comparison: &str,
        generation: i64,
        now: Millis,
    ) -> StoreResult<()> {
        let mut tx = self.begin_write(&self.pool).await?;
        sqlx::query(&format!(
            "UPDATE backend SET last_active_at = $1 WHERE id IN \
             (SELECT backend_id FROM backend_connection \
              WHERE cluster = $2 AND proxy = $3 AND generation {comparison} $4)"
        ))
        .bind(now.0)
        .bind(cluster.as_str())
        .bind(proxy.as_str())
        .bind(generation)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "DELETE FROM backend_connection \
             WHERE cluster = $1 AND proxy = $2 AND generation {comparison} $3"
        ))
        .bind(cluster.as_str())
        .bind(proxy.as_str())
        .bind(generation)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Applies a report from session `generation` of a proxy: backends with an open
    /// connection (`opened`: newly, or again on each periodic report) and backends that lost
    /// their last one (`closed`). Open rows live until `expires_at` unless reported again; a
    /// closed backend's idle time starts now.
    #[allow(clippy::too_many_arguments)]
    pub async fn connections_changed(
        &self,
        cluster: &ClusterName,
        proxy: &NodeName,
        generation: i64,
        opened: &[BackendName],
        closed: &[BackendName],
        now: Millis,
        expires_at: Millis,
    ) -> StoreResult<()> {
        let mut tx = self.begin_write(&self.pool).await?;
        for backend in opened {
            sqlx::query(
                "INSERT INTO backend_connection (backend_id, cluster, proxy, generation, expires_at) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (backend_id, cluster, proxy) DO UPDATE SET \
                 expires_at = excluded.expires_at, generation = excluded.generation \
                 WHERE backend_connection.generation <= excluded.generation",
            )
            .bind(backend.as_str())
            .bind(cluster.as_str())
            .bind(proxy.as_str())
            .bind(generation)
            .bind(expires_at.0)
            .execute(&mut *tx)
            .await?;
        }
        for chunk in closed.chunks(MAX_LIST_PARAMETERS) {
            // A late report from an older session never removes what a newer one reported.
            let delete = format!(
                "DELETE FROM backend_connection WHERE cluster = $1 AND proxy = $2 \
                 AND generation <= $3 AND backend_id IN ({})",
                placeholders(4, chunk.len())
            );
            with_list(
                sqlx::query(&delete)
                    .bind(cluster.as_str())
                    .bind(proxy.as_str())
                    .bind(generation),
                chunk,
            )
            .execute(&mut *tx)
            .await?;
        }
        // Idle time for the closed ones starts now.
        mark_active(&mut tx, cluster, closed, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks backends a proxy saw traffic for as active now (its periodic keep-alive).
    pub async fn mark_active(
        &self,
        cluster: &ClusterName,
        backends: &[BackendName],
        now: Millis,
    ) -> StoreResult<()> {
        if backends.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write(&self.pool).await?;
        mark_active(&mut tx, cluster, backends, now).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Sets `last_active_at` of the listed backends to `now`.
async fn mark_active(
    conn: &mut sqlx::AnyConnection,
    cluster: &ClusterName,
    backends: &[BackendName],
    now: Millis,
) -> StoreResult<()> {
    for chunk in backends.chunks(MAX_LIST_PARAMETERS) {
        let touch = format!(
            "UPDATE backend SET last_active_at = $1 WHERE cluster = $2 AND id IN ({})",
            placeholders(3, chunk.len())
        );
        with_list(
            sqlx::query(&touch).bind(now.0).bind(cluster.as_str()),
            chunk,
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Binds each backend ID, in order, after the parameters already bound.
fn with_list<'q>(mut query: AnyQuery<'q>, backends: &'q [BackendName]) -> AnyQuery<'q> {
    for backend in backends {
        query = query.bind(backend.as_str());
    }
    query
}
