//! The `backend_connection` table: which backends each proxy has open connections to right
//! now. A row keeps its backend from being reaped as idle, whatever the report interval.

use super::{placeholders, Store, StoreResult, MAX_LIST_PARAMETERS};
use plane_protocol::names::{BackendName, ClusterName, NodeName};
use plane_protocol::time::Millis;

impl Store {
    /// A proxy's session began: forget what an earlier session of it reported (it sends
    /// everything it has open again right after its hello).
    pub async fn proxy_session_started(
        &self,
        cluster: &ClusterName,
        proxy: &NodeName,
        now: Millis,
    ) -> StoreResult<()> {
        self.proxy_session_ended(cluster, proxy, now).await
    }

    /// A proxy's session ended: its connections no longer keep anything alive, and idle
    /// time for those backends counts from now.
    pub async fn proxy_session_ended(
        &self,
        cluster: &ClusterName,
        proxy: &NodeName,
        now: Millis,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE backend SET last_active_at = $1 WHERE id IN \
             (SELECT backend_id FROM backend_connection WHERE cluster = $2 AND proxy = $3)",
        )
        .bind(now.0)
        .bind(cluster.as_str())
        .bind(proxy.as_str())
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM backend_connection WHERE cluster = $1 AND proxy = $2")
            .bind(cluster.as_str())
            .bind(proxy.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Applies a proxy's report of backends that gained their first open connection
    /// (`opened`) or lost their last one (`closed`). Open rows live until `expires_at`
    /// unless refreshed; a closed backend's idle time starts now.
    pub async fn connections_changed(
        &self,
        cluster: &ClusterName,
        proxy: &NodeName,
        opened: &[BackendName],
        closed: &[BackendName],
        now: Millis,
        expires_at: Millis,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        for backend in opened {
            sqlx::query(
                "INSERT INTO backend_connection (backend_id, cluster, proxy, expires_at) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (backend_id, cluster, proxy) DO UPDATE SET expires_at = excluded.expires_at",
            )
            .bind(backend.as_str())
            .bind(cluster.as_str())
            .bind(proxy.as_str())
            .bind(expires_at.0)
            .execute(&mut *tx)
            .await?;
        }
        for chunk in closed.chunks(MAX_LIST_PARAMETERS) {
            let list = placeholders(3, chunk.len());
            let delete = format!(
                "DELETE FROM backend_connection WHERE cluster = $1 AND proxy = $2 \
                 AND backend_id IN ({list})"
            );
            with_list(
                sqlx::query(&delete)
                    .bind(cluster.as_str())
                    .bind(proxy.as_str()),
                chunk,
            )
            .execute(&mut *tx)
            .await?;
            let touch = format!(
                "UPDATE backend SET last_active_at = $1 WHERE cluster = $2 AND id IN ({list})"
            );
            with_list(
                sqlx::query(&touch).bind(now.0).bind(cluster.as_str()),
                chunk,
            )
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Pushes back the expiry of a proxy's open-connection rows (on each periodic report,
    /// which lists everything it still has open) and marks those backends active.
    pub async fn refresh_connections(
        &self,
        cluster: &ClusterName,
        proxy: &NodeName,
        backends: &[BackendName],
        now: Millis,
        expires_at: Millis,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        for chunk in backends.chunks(MAX_LIST_PARAMETERS) {
            let refresh = format!(
                "UPDATE backend_connection SET expires_at = $1 \
                 WHERE cluster = $2 AND proxy = $3 AND backend_id IN ({})",
                placeholders(4, chunk.len())
            );
            let refresh = sqlx::query(&refresh)
                .bind(expires_at.0)
                .bind(cluster.as_str())
                .bind(proxy.as_str());
            with_list(refresh, chunk).execute(&mut *tx).await?;
            let touch = format!(
                "UPDATE backend SET last_active_at = $1 WHERE cluster = $2 AND id IN ({})",
                placeholders(3, chunk.len())
            );
            with_list(
                sqlx::query(&touch).bind(now.0).bind(cluster.as_str()),
                chunk,
            )
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Binds each backend ID, in order, after the parameters already bound.
fn with_list<'q>(mut query: AnyQuery<'q>, backends: &'q [BackendName]) -> AnyQuery<'q> {
    for backend in backends {
        query = query.bind(backend.as_str());
    }
    query
}
