//! The `acme_txt` table: values published for clusters' ACME DNS-01 challenges, which
//! `plane dns` serves as TXT records until they expire.

use super::{Store, StoreResult};
use plane_protocol::names::ClusterName;
use plane_protocol::time::Millis;
use sqlx::Row;

impl Store {
    /// Publishes `value` for `cluster` until `expires_at` (publishing it again extends it).
    pub async fn publish_acme_txt(
        &self,
        cluster: &ClusterName,
        value: &str,
        now: Millis,
        expires_at: Millis,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO acme_txt (cluster, value, created_at, expires_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (cluster, value) DO UPDATE SET expires_at = excluded.expires_at",
        )
        .bind(cluster.as_str())
        .bind(value)
        .bind(now.0)
        .bind(expires_at.0)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The cluster's unexpired values, oldest first, and whether the controller knows the
    /// cluster at all (a node of it has connected, or a value was published for it).
    pub async fn acme_txt(
        &self,
        cluster: &ClusterName,
        now: Millis,
    ) -> StoreResult<(bool, Vec<String>)> {
        let rows = sqlx::query(
            "SELECT value FROM acme_txt WHERE cluster = $1 AND expires_at > $2 \
             ORDER BY created_at, value",
        )
        .bind(cluster.as_str())
        .bind(now.0)
        .fetch_all(&self.pool)
        .await?;
        let values = rows
            .iter()
            .map(|row| row.try_get::<String, _>("value"))
            .collect::<Result<Vec<_>, _>>()?;
        if !values.is_empty() {
            return Ok((true, values));
        }
        let known = sqlx::query(
            "SELECT 1 AS one FROM node WHERE cluster = $1 AND kind IN ('drone', 'proxy') \
             UNION ALL SELECT 1 AS one FROM acme_txt WHERE cluster = $1 LIMIT 1",
        )
        .bind(cluster.as_str())
        .fetch_optional(&self.pool)
        .await?
        .is_some();
        Ok((known, values))
    }
}
