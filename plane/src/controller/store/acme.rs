//! Clusters' certificates: the values published for their ACME DNS-01 challenges (which
//! `plane dns` serves as TXT records until they expire), the lease that lets one proxy of a
//! cluster order at a time, and the certificate it got, kept for the others.

use super::{Store, StoreResult};
use plane_protocol::names::{ClusterName, NodeName};
use plane_protocol::proxy::ClusterCertificate;
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

impl Store {
    /// Gives `cluster`'s certificate lease to `holder` until `expires_at` if nobody else
    /// holds an unexpired one (a holder taking it again extends it). Returns whether
    /// `holder` has it now.
    pub async fn take_cert_lease(
        &self,
        cluster: &ClusterName,
        holder: &NodeName,
        now: Millis,
        expires_at: Millis,
    ) -> StoreResult<bool> {
        let taken = sqlx::query(
            "INSERT INTO cert_lease (cluster, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (cluster) DO UPDATE SET holder = excluded.holder, \
             expires_at = excluded.expires_at \
             WHERE cert_lease.holder = excluded.holder OR cert_lease.expires_at <= $4",
        )
        .bind(cluster.as_str())
        .bind(holder.as_str())
        .bind(expires_at.0)
        .bind(now.0)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(taken == 1)
    }

    /// Whether `holder` has `cluster`'s certificate lease now.
    pub async fn holds_cert_lease(
        &self,
        cluster: &ClusterName,
        holder: &NodeName,
        now: Millis,
    ) -> StoreResult<bool> {
        Ok(sqlx::query(
            "SELECT 1 AS one FROM cert_lease WHERE cluster = $1 AND holder = $2 \
             AND expires_at > $3",
        )
        .bind(cluster.as_str())
        .bind(holder.as_str())
        .bind(now.0)
        .fetch_optional(&self.pool)
        .await?
        .is_some())
    }

    /// Ends `holder`'s lease on `cluster`'s certificate, if it has it, and withdraws the
    /// challenge values it published. Returns whether it had the lease.
    pub async fn release_cert_lease(
        &self,
        cluster: &ClusterName,
        holder: &NodeName,
    ) -> StoreResult<bool> {
        let mut tx = self.begin_write(&self.pool).await?;
        let released = sqlx::query("DELETE FROM cert_lease WHERE cluster = $1 AND holder = $2")
            .bind(cluster.as_str())
            .bind(holder.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if released {
            // Only the holder publishes, so every value of the cluster's host is its own.
            sqlx::query("DELETE FROM acme_txt WHERE cluster = $1")
                .bind(cluster.hostname())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(released)
    }

    /// Keeps `certificate` as `cluster`'s unless the one kept already expires later.
    /// Returns whether it was kept.
    pub async fn store_certificate(
        &self,
        cluster: &ClusterName,
        certificate: &ClusterCertificate,
        stored_by: &NodeName,
        now: Millis,
    ) -> StoreResult<bool> {
        let stored = sqlx::query(
            "INSERT INTO cluster_certificate \
             (cluster, chain_pem, key_pem, not_after, stored_at, stored_by) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (cluster) DO UPDATE SET chain_pem = excluded.chain_pem, \
             key_pem = excluded.key_pem, not_after = excluded.not_after, \
             stored_at = excluded.stored_at, stored_by = excluded.stored_by \
             WHERE cluster_certificate.not_after <= excluded.not_after",
        )
        .bind(cluster.as_str())
        .bind(&certificate.chain_pem)
        .bind(&certificate.key_pem)
        .bind(certificate.not_after.0)
        .bind(now.0)
        .bind(stored_by.as_str())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(stored == 1)
    }

    /// The certificate kept for `cluster`, if any.
    pub async fn certificate(
        &self,
        cluster: &ClusterName,
    ) -> StoreResult<Option<ClusterCertificate>> {
        let row = sqlx::query(
            "SELECT chain_pem, key_pem, not_after FROM cluster_certificate WHERE cluster = $1",
        )
        .bind(cluster.as_str())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        Ok(Some(ClusterCertificate {
            chain_pem: row.try_get("chain_pem")?,
            key_pem: row.try_get("key_pem")?,
            not_after: Millis(row.try_get("not_after")?),
        }))
    }
}
