//! Warm pools: the `warm_pool` table (how many unclaimed backends of an executable a pool
//! keeps) and the warm columns of `backend` (`warm_fingerprint`, `warm_state`), with the
//! claim that hands one of those backends to a connect in one transaction.

use super::backends::{namespace_refusal, parse_column};
use super::{actions, keys, tokens, Signal, Store, StoreError, StoreResult};
use anyhow::Context;
use plane_protocol::api::{ExecutorConfig, KeyConfig};
use plane_protocol::backend::{BackendStatus, TerminationKind, TerminationReason};
use plane_protocol::drone::{ActionKind, ClaimAction};
use plane_protocol::names::{BackendName, BearerToken, ClusterName, NodeName, Subdomain};
use plane_protocol::time::Millis;
use sqlx::Row;

/// `warm_state` of a warm backend its drone has not yet reported waiting for a claim.
pub(super) const STARTING: &str = "starting";
/// `warm_state` of a warm backend that answers HTTP and waits for a claim.
const IDLE: &str = "idle";
/// `warm_state` of a warm backend a connect has claimed.
const CLAIMED: &str = "claimed";

/// A claim is not made on a backend whose lease ends sooner than this: its drone might be
/// about to give it up.
const CLAIM_LEASE_MARGIN_MS: i64 = 2_000;

/// One warm pool as configured.
#[derive(Clone, Debug)]
pub struct WarmPoolRow {
    pub cluster: ClusterName,
    pub pool: String,
    pub fingerprint: String,
    pub executable: ExecutorConfig,
    pub size: u32,
}

/// How many unclaimed backends a warm pool has, by stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WarmCounts {
    /// Scheduled, or starting on their drone.
    pub starting: u32,
    /// Answering and waiting for a claim.
    pub idle: u32,
}

/// An unclaimed warm backend the keeper may stop.
#[derive(Clone, Debug)]
pub struct UnclaimedWarm {
    pub id: BackendName,
    pub cluster: ClusterName,
    pub pool: String,
    pub fingerprint: String,
    pub idle: bool,
    pub created_at: Millis,
    /// Its drone is draining or lost: it should not wait there for a claim.
    pub on_unplaceable_drone: bool,
}

/// What a connect asks of a claim.
pub struct ClaimRequest<'a> {
    pub cluster: &'a ClusterName,
    pub pool: &'a str,
    pub fingerprint: &'a str,
    pub key: Option<&'a KeyConfig>,
    pub static_token: Option<&'a BearerToken>,
    pub token: tokens::NewToken<'a>,
    pub max_idle_seconds: Option<i64>,
    pub lifetime_limit_seconds: Option<i64>,
    pub subdomain: Option<&'a Subdomain>,
    pub max_backends_per_namespace: Option<u32>,
    pub now: Millis,
}

/// A warm backend a connect now holds.
#[derive(Clone, Debug)]
pub struct Claimed {
    pub backend_id: BackendName,
    pub drone: NodeName,
    pub fencing_token: Option<i64>,
    /// Its status when claimed: neither `ready` (a warm backend becomes ready only once
    /// claimed) nor terminating.
    pub status: BackendStatus,
}

/// How a claim ended.
#[derive(Debug)]
pub enum ClaimOutcome {
    Claimed(Claimed),
    /// No idle backend of that pool and executable: start one cold.
    NoneIdle,
    /// Another connect took the key meanwhile; nothing was written.
    KeyTaken,
}

/// What a drone's "waiting for a claim" report did.
#[derive(Debug, PartialEq, Eq)]
pub enum WarmReport {
    /// The backend may now be claimed.
    Idle,
    /// It was claimed already (its drone restarted, or the report is a repeat): the claim
    /// went out again.
    ClaimResent,
    /// Not a warm backend of that drone, or no longer live.
    Ignored,
}

/// The fingerprint warm pools and connects are matched on: the SHA-256 of the
/// executable's JSON (its maps are sorted, so equal executables give equal JSON).
pub fn fingerprint(executable: &ExecutorConfig) -> String {
    use sha2::Digest;
    let json = serde_json::to_vec(executable).expect("an executable serializes");
    let digest = sha2::Sha256::digest(&json);
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Unclaimed, live warm backends of one pool and executable.
pub(super) async fn count_unclaimed(
    conn: &mut sqlx::AnyConnection,
    cluster: &ClusterName,
    pool: &str,
    fingerprint: &str,
) -> StoreResult<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM backend WHERE cluster = $1 AND pool = $2 AND warm_fingerprint = $3 \
         AND warm_state IN ($4, $5) AND status_number < $6 AND termination_requested IS NULL",
    )
    .bind(cluster.as_str())
    .bind(pool)
    .bind(fingerprint)
    .bind(STARTING)
    .bind(IDLE)
    .bind(i64::from(BackendStatus::Terminating.number()))
    .fetch_one(&mut *conn)
    .await?)
}

impl Store {
    /// Sets a warm pool's size (replacing any earlier one for the same executable); zero
    /// removes it, and the keeper stops its unclaimed backends.
    pub async fn set_warm_pool(
        &self,
        cluster: &ClusterName,
        pool: &str,
        executable: &ExecutorConfig,
        size: u32,
        now: Millis,
    ) -> StoreResult<String> {
        let fingerprint = fingerprint(executable);
        if size == 0 {
            sqlx::query(
                "DELETE FROM warm_pool WHERE cluster = $1 AND pool = $2 AND fingerprint = $3",
            )
            .bind(cluster.as_str())
            .bind(pool)
            .bind(&fingerprint)
            .execute(&self.pool)
            .await?;
            return Ok(fingerprint);
        }
        let json = serde_json::to_string(executable).context("serializing executable")?;
        sqlx::query(
            "INSERT INTO warm_pool (cluster, pool, fingerprint, executable, size, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (cluster, pool, fingerprint) DO UPDATE SET size = excluded.size, \
             updated_at = excluded.updated_at",
        )
        .bind(cluster.as_str())
        .bind(pool)
        .bind(&fingerprint)
        .bind(json)
        .bind(i64::from(size))
        .bind(now.0)
        .execute(&self.pool)
        .await?;
        Ok(fingerprint)
    }

    /// Every warm pool, or those of one cluster.
    pub async fn warm_pools(&self, cluster: Option<&ClusterName>) -> StoreResult<Vec<WarmPoolRow>> {
        let rows = sqlx::query(
            "SELECT cluster, pool, fingerprint, executable, size FROM warm_pool \
             WHERE $1 IS NULL OR cluster = $1 ORDER BY cluster, pool, fingerprint",
        )
        .bind(cluster.map(|c| c.to_string()))
        .fetch_all(&self.readers)
        .await?;
        rows.iter()
            .map(|row| {
                let executable: String = row.try_get("executable").map_err(anyhow::Error::from)?;
                let size: i64 = row.try_get("size").map_err(anyhow::Error::from)?;
                Ok(WarmPoolRow {
                    cluster: parse_column(row, "cluster", |s| s.parse().ok())?,
                    pool: row.try_get("pool").map_err(anyhow::Error::from)?,
                    fingerprint: row.try_get("fingerprint").map_err(anyhow::Error::from)?,
                    executable: serde_json::from_str(&executable)
                        .context("reading a warm pool's executable")?,
                    size: u32::try_from(size).unwrap_or(u32::MAX),
                })
            })
            .collect()
    }

    /// The unclaimed counts of every warm pool of `cluster` (or of all), by
    /// `(cluster, pool, fingerprint)`.
    pub async fn warm_counts(
        &self,
        cluster: Option<&ClusterName>,
    ) -> StoreResult<std::collections::HashMap<(ClusterName, String, String), WarmCounts>> {
        let rows = sqlx::query(
            "SELECT cluster, pool, warm_fingerprint, warm_state, COUNT(*) AS n FROM backend \
             WHERE warm_state IN ($1, $2) AND status_number < $3 \
             AND termination_requested IS NULL AND ($4 IS NULL OR cluster = $4) \
             GROUP BY cluster, pool, warm_fingerprint, warm_state",
        )
        .bind(STARTING)
        .bind(IDLE)
        .bind(i64::from(BackendStatus::Terminating.number()))
        .bind(cluster.map(|c| c.to_string()))
        .fetch_all(&self.readers)
        .await?;
        let mut counts = std::collections::HashMap::new();
        for row in &rows {
            let key = (
                parse_column(row, "cluster", |s| s.parse().ok())?,
                row.try_get("pool").map_err(anyhow::Error::from)?,
                row.try_get("warm_fingerprint")
                    .map_err(anyhow::Error::from)?,
            );
            let state: String = row.try_get("warm_state").map_err(anyhow::Error::from)?;
            let n: i64 = row.try_get("n").map_err(anyhow::Error::from)?;
            let entry: &mut WarmCounts = counts.entry(key).or_default();
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            if state == IDLE {
                entry.idle = n;
            } else {
                entry.starting = n;
            }
        }
        Ok(counts)
    }

    /// Warm backends of the pool that ended since `since` before they ever waited for a
    /// claim, with nobody having asked them to stop (a failed start): the keeper backs off
    /// refilling on these.
    pub async fn failed_warm_starts(
        &self,
        cluster: &ClusterName,
        pool: &str,
        fingerprint: &str,
        since: Millis,
    ) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM backend WHERE cluster = $5 AND pool = $6 \
             AND warm_fingerprint = $1 AND warm_state = $2 AND status_number = $3 \
             AND status_time >= $4 AND termination_requested IS NULL",
        )
        .bind(fingerprint)
        .bind(STARTING)
        .bind(i64::from(BackendStatus::Terminated.number()))
        .bind(since.0)
        .bind(cluster.as_str())
        .bind(pool)
        .fetch_one(&self.readers)
        .await?)
    }

    /// Every unclaimed, live warm backend, newest first.
    pub async fn unclaimed_warm_backends(&self) -> StoreResult<Vec<UnclaimedWarm>> {
        let rows = sqlx::query(
            "SELECT b.id, b.cluster, b.pool, b.warm_fingerprint, b.warm_state, b.created_at, \
             CAST(CASE WHEN n.draining <> 0 OR n.lost_at IS NOT NULL THEN 1 ELSE 0 END AS BIGINT) \
               AS unplaceable \
             FROM backend b LEFT JOIN node n \
               ON n.cluster = b.cluster AND n.kind = 'drone' AND n.name = b.drone \
             WHERE b.warm_state IN ($1, $2) AND b.status_number < $3 \
             AND b.termination_requested IS NULL ORDER BY b.created_at DESC, b.id",
        )
        .bind(STARTING)
        .bind(IDLE)
        .bind(i64::from(BackendStatus::Terminating.number()))
        .fetch_all(&self.readers)
        .await?;
        rows.iter()
            .map(|row| {
                let state: String = row.try_get("warm_state").map_err(anyhow::Error::from)?;
                let unplaceable: Option<i64> =
                    row.try_get("unplaceable").map_err(anyhow::Error::from)?;
                Ok(UnclaimedWarm {
                    id: parse_column(row, "id", |s| s.parse().ok())?,
                    cluster: parse_column(row, "cluster", |s| s.parse().ok())?,
                    pool: row.try_get("pool").map_err(anyhow::Error::from)?,
                    fingerprint: row
                        .try_get("warm_fingerprint")
                        .map_err(anyhow::Error::from)?,
                    idle: state == IDLE,
                    created_at: Millis(row.try_get("created_at").map_err(anyhow::Error::from)?),
                    on_unplaceable_drone: unplaceable == Some(1),
                })
            })
            .collect()
    }

    /// Claims an idle warm backend of the pool and executable for a connect, in one
    /// transaction: the backend takes the key (a fresh fencing token) and the connect's
    /// limits, the connect's token is stored, and the claim action goes to its drone. Its
    /// status stays `waiting` until the drone reports that the backend accepted the claim.
    pub async fn claim_warm(&self, claim: ClaimRequest<'_>) -> StoreResult<ClaimOutcome> {
        let mut tx = self.begin_write(&self.pool).await?;
        // Skipping rows another claim has locked keeps concurrent claims on PostgreSQL
        // from queueing on one backend; SQLite has one writer, so there is nothing to skip.
        let lock = match self.kind() {
            super::DatabaseKind::Postgres => "FOR UPDATE OF b SKIP LOCKED",
            super::DatabaseKind::Sqlite => "",
        };
        let candidate = sqlx::query(&format!(
            "SELECT b.id, b.drone, b.status FROM backend b JOIN node n \
               ON n.cluster = b.cluster AND n.kind = 'drone' AND n.name = b.drone \
             WHERE b.cluster = $1 AND b.pool = $2 AND b.warm_fingerprint = $3 \
             AND b.warm_state = $4 AND b.status_number < $5 AND b.termination_requested IS NULL \
             AND b.lease_expires_at > {now} + $6 AND n.draining = 0 AND n.lost_at IS NULL \
             ORDER BY b.created_at LIMIT 1 {lock}",
            now = self.now_sql()
        ))
        .bind(claim.cluster.as_str())
        .bind(claim.pool)
        .bind(claim.fingerprint)
        .bind(IDLE)
        .bind(i64::from(BackendStatus::Terminating.number()))
        .bind(CLAIM_LEASE_MARGIN_MS)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(candidate) = candidate else {
            return Ok(ClaimOutcome::NoneIdle);
        };
        let backend_id: BackendName = parse_column(&candidate, "id", |s| s.parse().ok())?;
        let drone: NodeName = parse_column(&candidate, "drone", |s| s.parse().ok())?;
        let status = parse_column(&candidate, "status", BackendStatus::parse)?;
        let expires_at = claim
            .lifetime_limit_seconds
            .map(|seconds| claim.now.plus_seconds(seconds).0);
        let updated = sqlx::query(
            "UPDATE backend SET warm_state = $1, key_namespace = $2, key_name = $3, \
             static_token = $4, max_idle_seconds = $5, expires_at = $6, subdomain = $7, \
             last_active_at = $8 WHERE id = $9 AND warm_state = $10 \
             AND termination_requested IS NULL",
        )
        .bind(CLAIMED)
        .bind(claim.key.map(|k| k.namespace.clone()))
        .bind(claim.key.map(|k| k.name.clone()))
        .bind(claim.static_token.map(|t| t.to_string()))
        .bind(claim.max_idle_seconds)
        .bind(expires_at)
        .bind(claim.subdomain.map(|s| s.to_string()))
        .bind(claim.now.0)
        .bind(backend_id.as_str())
        .bind(IDLE)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            // Claimed by another connect between the read and the write (PostgreSQL, read
            // committed): none idle for this one.
            return Ok(ClaimOutcome::NoneIdle);
        }
        let fencing_token = match claim.key {
            Some(key) => {
                if let Some(max) = claim.max_backends_per_namespace {
                    self.lock_admission(&mut tx, claim.cluster).await?;
                    if let Some(refusal) = namespace_refusal(&mut tx, &key.namespace, max).await? {
                        return Err(StoreError::Refused(refusal));
                    }
                }
                match keys::acquire(&mut tx, key, &backend_id, claim.now).await? {
                    Some(token) => Some(token),
                    None => return Ok(ClaimOutcome::KeyTaken),
                }
            }
            None => None,
        };
        tokens::insert(&mut tx, &backend_id, &claim.token, claim.now).await?;
        let action = ActionKind::Claim(ClaimAction {
            key: claim.key.map(|k| k.name.clone()),
            fencing_token,
            static_token: claim.static_token.cloned(),
        });
        actions::insert(
            &mut tx,
            &backend_id,
            claim.cluster,
            &drone,
            &action,
            claim.now,
        )
        .await?;
        let signal = Signal::Actions {
            cluster: claim.cluster.clone(),
            drone: drone.clone(),
        };
        self.commit_and_signal(tx, &[signal]).await?;
        Ok(ClaimOutcome::Claimed(Claimed {
            backend_id,
            drone,
            fencing_token,
            status,
        }))
    }

    /// Asks the drone to stop an unclaimed warm backend (soft, reason `swept`). False if it
    /// was claimed (or asked to stop) meanwhile: a claim and this never both succeed.
    pub async fn stop_unclaimed_warm(&self, id: &BackendName) -> StoreResult<bool> {
        let mut tx = self.begin_write(&self.pool).await?;
        let row = sqlx::query(
            "UPDATE backend SET termination_requested = 'soft' WHERE id = $1 \
             AND warm_state IN ($2, $3) AND termination_requested IS NULL AND status_number < $4 \
             RETURNING cluster, drone",
        )
        .bind(id.as_str())
        .bind(STARTING)
        .bind(IDLE)
        .bind(i64::from(BackendStatus::Terminated.number()))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(false) };
        let cluster: ClusterName = parse_column(&row, "cluster", |s| s.parse().ok())?;
        let drone: NodeName = parse_column(&row, "drone", |s| s.parse().ok())?;
        let action = ActionKind::Terminate {
            kind: TerminationKind::Soft,
            reason: TerminationReason::Swept,
        };
        actions::insert(&mut tx, id, &cluster, &drone, &action, Millis::now()).await?;
        self.commit_and_signal(tx, &[Signal::Actions { cluster, drone }])
            .await?;
        Ok(true)
    }

    /// A drone says its warm backend answers and waits for a claim: it becomes claimable,
    /// or, if a connect claimed it already, the claim is sent again (the drone may have
    /// restarted before handing it over).
    pub async fn warm_report(
        &self,
        id: &BackendName,
        cluster: &ClusterName,
        drone: &NodeName,
    ) -> StoreResult<WarmReport> {
        let mut tx = self.begin_write(&self.pool).await?;
        let row = sqlx::query(
            "SELECT warm_state, key_name, static_token FROM backend \
             WHERE id = $1 AND cluster = $2 AND drone = $3 AND status_number < $4",
        )
        .bind(id.as_str())
        .bind(cluster.as_str())
        .bind(drone.as_str())
        .bind(i64::from(BackendStatus::Terminating.number()))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(WarmReport::Ignored);
        };
        let state: Option<String> = row.try_get("warm_state").map_err(anyhow::Error::from)?;
        match state.as_deref() {
            Some(STARTING) => {
                sqlx::query("UPDATE backend SET warm_state = $1 WHERE id = $2 AND warm_state = $3")
                    .bind(IDLE)
                    .bind(id.as_str())
                    .bind(STARTING)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(WarmReport::Idle)
            }
            Some(CLAIMED) => {
                let key_name: Option<String> =
                    row.try_get("key_name").map_err(anyhow::Error::from)?;
                let static_token =
                    super::backends::parse_optional(&row, "static_token", |s| s.parse().ok())?;
                let fencing_token: Option<i64> = match &key_name {
                    Some(_) => {
                        sqlx::query_scalar(
                            "SELECT fencing_token FROM backend_key WHERE backend_id = $1",
                        )
                        .bind(id.as_str())
                        .fetch_optional(&mut *tx)
                        .await?
                    }
                    None => None,
                };
                let action = ActionKind::Claim(ClaimAction {
                    key: key_name,
                    fencing_token,
                    static_token,
                });
                actions::insert(&mut tx, id, cluster, drone, &action, Millis::now()).await?;
                let signal = Signal::Actions {
                    cluster: cluster.clone(),
                    drone: drone.clone(),
                };
                self.commit_and_signal(tx, &[signal]).await?;
                Ok(WarmReport::ClaimResent)
            }
            _ => Ok(WarmReport::Ignored),
        }
    }
}
