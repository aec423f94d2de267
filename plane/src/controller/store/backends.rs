//! The `backend` and `backend_status` tables: creating backends, moving their status
//! forward, and the queries the sweeper and drone placement need.

use super::{actions, keys, tokens, Signal, Store, StoreError, StoreResult};
use anyhow::Context;
use plane_protocol::api::{BackendProtocol, KeyConfig, SpawnConfig};
use plane_protocol::backend::{
    BackendHealth, BackendStateUpdate, BackendStatus, BackendStatusStreamEntry, TerminationKind,
    TerminationReason,
};
use plane_protocol::drone::{ActionKind, BackendAction};
use plane_protocol::names::{BackendName, BearerToken, ClusterName, NodeName, Subdomain};
use plane_protocol::time::Millis;
use sqlx::any::AnyRow;
use sqlx::Row;
use std::collections::HashMap;
use std::net::SocketAddr;

/// One backend as stored.
#[derive(Clone, Debug)]
pub struct BackendRow {
    pub id: BackendName,
    pub cluster: ClusterName,
    pub pool: String,
    pub drone: NodeName,
    pub status: BackendStatus,
    pub status_time: Millis,
    pub address: Option<SocketAddr>,
    pub termination_kind: Option<TerminationKind>,
    pub termination_reason: Option<TerminationReason>,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    pub termination_requested: Option<TerminationKind>,
    pub key_name: Option<String>,
    pub key_namespace: Option<String>,
    pub static_token: Option<BearerToken>,
    pub subdomain: Option<Subdomain>,
    pub protocol: BackendProtocol,
    pub created_at: Millis,
    pub last_active_at: Millis,
    /// Until when its drone may keep it running without renewing (controller clock).
    pub lease_expires_at: Millis,
    /// The warm pool it was started for, if it was started warm (claimed or not).
    pub warm_fingerprint: Option<String>,
}

/// What [`Store::create_backend`] writes in one transaction.
pub struct NewBackend<'a> {
    pub id: &'a BackendName,
    pub cluster: &'a ClusterName,
    pub pool: &'a str,
    pub drone: &'a NodeName,
    pub spawn_config: &'a SpawnConfig,
    pub key: Option<&'a KeyConfig>,
    pub static_token: Option<&'a BearerToken>,
    /// The first connection token, issued with the backend (none for a warm one, which
    /// gets its first at its claim).
    pub token: Option<tokens::NewToken<'a>>,
    /// A warm-pool backend: counted against its pool's size in the same transaction.
    pub warm: Option<WarmSpawn<'a>>,
    pub now: Millis,
    /// The first lease, in milliseconds from now (the database's now): the drone must
    /// renew it before then.
    pub lease_ms: u64,
    /// The limits the new backend must fit, checked in the same transaction.
    pub admission: Admission,
}

/// Which warm pool a new warm backend fills, and how many unclaimed it may hold.
#[derive(Clone, Copy, Debug)]
pub struct WarmSpawn<'a> {
    pub fingerprint: &'a str,
    pub size: u32,
}

/// Admission limits (`--max-concurrent-spawns`, `--max-backends-per-namespace`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Admission {
    /// Backends of the cluster between `scheduled` and `ready`, this one included.
    pub max_concurrent_spawns: Option<u32>,
    /// Live backends whose key is in the new backend's namespace, this one included.
    pub max_backends_per_namespace: Option<u32>,
}

/// Why a new backend was not admitted, and when to try again.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub message: String,
    pub retry_after_seconds: u64,
}

/// The result of a successful [`Store::create_backend`].
#[derive(Clone, Debug)]
pub struct CreatedBackend {
    pub action_id: i64,
    pub action: ActionKind,
    pub fencing_token: Option<i64>,
}

/// A status transition that was applied (it moved the backend forward), as the change bus
/// delivers it.
#[derive(Clone, Debug)]
pub struct StatusChange {
    /// Position in the `backend_status` table; grows with every change.
    pub sequence: i64,
    pub backend_id: BackendName,
    pub cluster: ClusterName,
    pub entry: BackendStatusStreamEntry,
}

/// A drone's report as [`Store::apply_status`] recorded it, with what the session needs
/// of the backend to account for it (read in the same statement, not after).
#[derive(Clone, Debug)]
pub struct AppliedStatus {
    pub entry: BackendStatusStreamEntry,
    pub created_at: Millis,
    /// Started for a warm pool: its start was paid before anyone waited for it.
    pub warm: bool,
}

impl AppliedStatus {
    fn of(entry: BackendStatusStreamEntry, backend: &AnyRow) -> StoreResult<AppliedStatus> {
        let warm_fingerprint: Option<String> = backend
            .try_get("warm_fingerprint")
            .map_err(anyhow::Error::from)?;
        Ok(AppliedStatus {
            entry,
            created_at: Millis(backend.try_get("created_at").map_err(anyhow::Error::from)?),
            warm: warm_fingerprint.is_some(),
        })
    }
}

pub(super) fn parse_column<T>(
    row: &AnyRow,
    column: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> StoreResult<T> {
    let raw: String = row.try_get(column).map_err(anyhow::Error::from)?;
    parse(&raw)
        .with_context(|| format!("unreadable value {raw:?} in column {column}"))
        .map_err(StoreError::Other)
}

pub(super) fn parse_optional<T>(
    row: &AnyRow,
    column: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> StoreResult<Option<T>> {
    let raw: Option<String> = row.try_get(column).map_err(anyhow::Error::from)?;
    match raw {
        None => Ok(None),
        Some(raw) => parse(&raw)
            .with_context(|| format!("unreadable value {raw:?} in column {column}"))
            .map(Some)
            .map_err(StoreError::Other),
    }
}

impl BackendRow {
    pub(super) fn from_row(row: &AnyRow) -> StoreResult<BackendRow> {
        let get_i64 = |column: &str| -> StoreResult<i64> {
            row.try_get::<i64, _>(column)
                .map_err(|e| StoreError::Other(e.into()))
        };
        let exit_code: Option<i64> = row.try_get("exit_code").map_err(anyhow::Error::from)?;
        Ok(BackendRow {
            id: parse_column(row, "id", |s| s.parse().ok())?,
            cluster: parse_column(row, "cluster", |s| s.parse().ok())?,
            pool: row.try_get("pool").map_err(anyhow::Error::from)?,
            drone: parse_column(row, "drone", |s| s.parse().ok())?,
            status: parse_column(row, "status", BackendStatus::parse)?,
            status_time: Millis(get_i64("status_time")?),
            address: parse_optional(row, "address", |s| s.parse().ok())?,
            termination_kind: parse_optional(row, "termination_kind", TerminationKind::parse)?,
            termination_reason: parse_optional(
                row,
                "termination_reason",
                TerminationReason::parse,
            )?,
            exit_code: exit_code.map(|c| c as i32),
            message: row.try_get("message").map_err(anyhow::Error::from)?,
            termination_requested: parse_optional(
                row,
                "termination_requested",
                TerminationKind::parse,
            )?,
            key_name: row.try_get("key_name").map_err(anyhow::Error::from)?,
            key_namespace: row.try_get("key_namespace").map_err(anyhow::Error::from)?,
            static_token: parse_optional(row, "static_token", |s| s.parse().ok())?,
            subdomain: parse_optional(row, "subdomain", |s| s.parse().ok())?,
            protocol: parse_column(row, "protocol", BackendProtocol::parse)?,
            created_at: Millis(get_i64("created_at")?),
            last_active_at: Millis(get_i64("last_active_at")?),
            lease_expires_at: Millis(get_i64("lease_expires_at")?),
            warm_fingerprint: row
                .try_get("warm_fingerprint")
                .map_err(anyhow::Error::from)?,
        })
    }
}

pub(super) fn entry_from_row(row: &AnyRow) -> StoreResult<BackendStatusStreamEntry> {
    let exit_code: Option<i64> = row.try_get("exit_code").map_err(anyhow::Error::from)?;
    let status = parse_column(row, "status", BackendStatus::parse)?;
    Ok(BackendStatusStreamEntry {
        status,
        termination_reason: parse_optional(row, "termination_reason", TerminationReason::parse)?,
        termination_kind: parse_optional(row, "termination_kind", TerminationKind::parse)?,
        exit_error: exit_error(status, exit_code),
        exit_code: exit_code.map(|c| c as i32),
        message: row.try_get("message").map_err(anyhow::Error::from)?,
        health: parse_optional(row, "health", BackendHealth::parse)?,
        time: Millis(row.try_get("time").map_err(anyhow::Error::from)?),
    })
}

/// Plane 0.5's `exit_error`: set only on `terminated`, true for a non-zero exit code.
fn exit_error(status: BackendStatus, exit_code: Option<i64>) -> Option<bool> {
    (status == BackendStatus::Terminated).then_some(matches!(exit_code, Some(code) if code != 0))
}

/// [`BACKEND_COLUMNS`], each qualified by `b.` (for a query that joins `backend b`). Built
/// once: a connect's key lookup uses it.
pub(super) fn backend_columns_of_b() -> &'static str {
    static COLUMNS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    COLUMNS.get_or_init(|| {
        BACKEND_COLUMNS
            .split(", ")
            .map(|column| format!("b.{column}"))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

const BACKEND_COLUMNS: &str = "id, cluster, pool, drone, status, status_time, address, \
     termination_kind, termination_reason, exit_code, message, termination_requested, \
     key_name, key_namespace, static_token, subdomain, protocol, created_at, last_active_at, lease_expires_at, \
     warm_fingerprint";

impl Store {
    /// Writes a new backend in `scheduled`, takes its key (if any), records its first
    /// token and the spawn action for its drone — all or nothing. Returns `Ok(None)` when
    /// the key is already held (another connect won the race).
    pub async fn create_backend(
        &self,
        new: NewBackend<'_>,
        make_action: impl FnOnce(Option<i64>) -> ActionKind,
    ) -> StoreResult<Option<CreatedBackend>> {
        let mut tx = self.begin_write(&self.pool).await?;
        let spawn_config_json =
            serde_json::to_string(new.spawn_config).context("serializing spawn config")?;
        let expires_at = new
            .spawn_config
            .lifetime_limit_seconds
            .map(|seconds| new.now.plus_seconds(seconds).0);
        sqlx::query(&format!(
            "INSERT INTO backend (id, cluster, pool, drone, status, status_number, status_time, \
             spawn_config, key_namespace, key_name, static_token, max_idle_seconds, created_at, \
             last_active_at, expires_at, lease_expires_at, subdomain, protocol, warm_fingerprint, \
             warm_state) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13, $14, {} + $15, $16, $17, \
             $18, $19)",
            self.now_sql()
        ))
        .bind(new.id.as_str())
        .bind(new.cluster.as_str())
        .bind(new.pool)
        .bind(new.drone.as_str())
        .bind(BackendStatus::Scheduled.as_str())
        .bind(i64::from(BackendStatus::Scheduled.number()))
        .bind(new.now.0)
        .bind(spawn_config_json)
        .bind(new.key.map(|k| k.namespace.clone()))
        .bind(new.key.map(|k| k.name.clone()))
        .bind(new.static_token.map(|t| t.to_string()))
        .bind(new.spawn_config.max_idle_seconds)
        .bind(new.now.0)
        .bind(expires_at)
        .bind(i64::try_from(new.lease_ms).unwrap_or(i64::MAX))
        .bind(new.spawn_config.subdomain.as_ref().map(|s| s.to_string()))
        .bind(new.spawn_config.executable.protocol.as_str())
        .bind(new.warm.map(|warm| warm.fingerprint.to_string()))
        .bind(new.warm.map(|_| super::warm::STARTING))
        .execute(&mut *tx)
        .await?;
        // Counted after the insert, so the count includes this backend; on SQLite the insert
        // took the write lock, on PostgreSQL the cluster's lock below orders the spawns.
        if let Some(refusal) = self.admit(&mut tx, &new).await? {
            return Err(StoreError::Refused(refusal)); // dropping the transaction rolls it back
        }
        // The key first: a connect that loses the race rolls back before taking a number
        // in `backend_status`, which would otherwise leave a gap the change bus must wait out.
        let fencing_token = match new.key {
            Some(key) => match keys::acquire(&mut tx, key, new.id, new.now).await? {
                Some(token) => Some(token),
                None => return Ok(None), // dropping the transaction rolls it back
            },
            None => None,
        };
        insert_history(
            &mut tx,
            new.id,
            &BackendStateUpdate::status(BackendStatus::Scheduled),
            new.now,
        )
        .await?;
        if let Some(token) = &new.token {
            tokens::insert(&mut tx, new.id, token, new.now).await?;
        }
        let action = make_action(fencing_token);
        let action_id =
            actions::insert(&mut tx, new.id, new.cluster, new.drone, &action, new.now).await?;
        let signals = [
            Signal::Status,
            Signal::Actions {
                cluster: new.cluster.clone(),
                drone: new.drone.clone(),
            },
        ];
        self.commit_and_signal(tx, &signals).await?;
        Ok(Some(CreatedBackend {
            action_id,
            action,
            fencing_token,
        }))
    }

    pub async fn backend(&self, id: &BackendName) -> StoreResult<Option<BackendRow>> {
        let row = sqlx::query(&format!(
            "SELECT {BACKEND_COLUMNS} FROM backend WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.readers)
        .await?;
        row.as_ref().map(BackendRow::from_row).transpose()
    }

    /// On PostgreSQL, takes the cluster's admission lock to the end of the transaction: read
    /// committed would let two concurrent spawns (or claims) each count without the other.
    pub(super) async fn lock_admission(
        &self,
        tx: &mut sqlx::AnyConnection,
        cluster: &ClusterName,
    ) -> StoreResult<()> {
        if self.kind() == super::DatabaseKind::Postgres {
            sqlx::query("SELECT CAST(pg_advisory_xact_lock(hashtext($1)) AS TEXT)")
                .bind(format!("plane-admission:{cluster}"))
                .fetch_one(&mut *tx)
                .await?;
        }
        Ok(())
    }

    /// Checks the new backend against its admission limits, inside its transaction.
    async fn admit(
        &self,
        tx: &mut sqlx::AnyConnection,
        new: &NewBackend<'_>,
    ) -> StoreResult<Option<Refusal>> {
        let limits = new.admission;
        if limits.max_concurrent_spawns.is_none()
            && limits.max_backends_per_namespace.is_none()
            && new.warm.is_none()
        {
            return Ok(None);
        }
        self.lock_admission(tx, new.cluster).await?;
        if let Some(max) = limits.max_concurrent_spawns {
            let starting: i64 = sqlx::query_scalar(
                // An idle warm backend waits for a claim, it is not starting.
                "SELECT COUNT(*) FROM backend WHERE cluster = $1 AND status_number < $2 \
                 AND (warm_state IS NULL OR warm_state <> 'idle')",
            )
            .bind(new.cluster.as_str())
            .bind(i64::from(BackendStatus::Ready.number()))
            .fetch_one(&mut *tx)
            .await?;
            if starting > i64::from(max) {
                return Ok(Some(Refusal {
                    message: format!(
                        "cluster {} already has {max} backends starting (--max-concurrent-spawns); retry shortly",
                        new.cluster
                    ),
                    retry_after_seconds: 1,
                }));
            }
        }
        if let Some(warm) = new.warm {
            let unclaimed =
                super::warm::count_unclaimed(tx, new.cluster, new.pool, warm.fingerprint).await?;
            if unclaimed > i64::from(warm.size) {
                return Ok(Some(Refusal {
                    message: format!("the warm pool already holds its {} backends", warm.size),
                    retry_after_seconds: 1,
                }));
            }
        }
        match (limits.max_backends_per_namespace, new.key) {
            (Some(max), Some(key)) => namespace_refusal(tx, &key.namespace, max).await,
            _ => Ok(None),
        }
    }

    /// What the overview lists: the backends not yet terminated, newest first, then those
    /// terminated since `since`, latest ended first; at most `limit` of each.
    pub async fn recent_backends(
        &self,
        since: Millis,
        limit: i64,
    ) -> StoreResult<(Vec<BackendRow>, Vec<BackendRow>)> {
        let terminated = i64::from(BackendStatus::Terminated.number());
        let live = sqlx::query(&format!(
            "SELECT {BACKEND_COLUMNS} FROM backend WHERE status_number < $1 \
             ORDER BY created_at DESC, id LIMIT $2"
        ))
        .bind(terminated)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let ended = sqlx::query(&format!(
            "SELECT {BACKEND_COLUMNS} FROM backend WHERE status_number = $1 AND status_time >= $2 \
             ORDER BY status_time DESC, id LIMIT $3"
        ))
        .bind(terminated)
        .bind(since.0)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let rows = |rows: Vec<AnyRow>| -> StoreResult<Vec<BackendRow>> {
            rows.iter().map(BackendRow::from_row).collect()
        };
        Ok((rows(live)?, rows(ended)?))
    }

    /// Every status the backend has been in, oldest first.
    pub async fn status_history(
        &self,
        id: &BackendName,
    ) -> StoreResult<Vec<BackendStatusStreamEntry>> {
        let rows = sqlx::query(
            "SELECT status, termination_kind, termination_reason, exit_code, message, health, \
             time FROM backend_status WHERE backend_id = $1 ORDER BY status_number, id",
        )
        .bind(id.as_str())
        .fetch_all(&self.readers)
        .await?;
        rows.iter().map(entry_from_row).collect()
    }

    /// Applies a drone's report if it moves the backend forward and the backend belongs to
    /// that drone. On `terminated` the key is released in the same transaction.
    /// Returns the new entry, or `None` for a stale, duplicated or foreign report.
    pub async fn apply_status(
        &self,
        id: &BackendName,
        cluster: &ClusterName,
        drone: &NodeName,
        update: &BackendStateUpdate,
        now: Millis,
    ) -> StoreResult<Option<AppliedStatus>> {
        if update.health.is_some() {
            return self.apply_health(id, cluster, drone, update, now).await;
        }
        let mut tx = self.begin_write(&self.pool).await?;
        let moved = sqlx::query(
            "UPDATE backend SET status = $1, status_number = $2, status_time = $3, \
             address = COALESCE($4, address), \
             termination_kind = COALESCE($5, termination_kind), \
             termination_reason = COALESCE($6, termination_reason), \
             exit_code = COALESCE($7, exit_code), message = COALESCE($8, message), \
             last_active_at = CASE WHEN $1 = 'ready' THEN $3 ELSE last_active_at END \
             WHERE id = $9 AND cluster = $10 AND drone = $11 AND status_number < $2 \
             AND ($1 <> 'ready' OR warm_state IS NULL OR warm_state = 'claimed') \
             RETURNING created_at, warm_fingerprint",
        )
        .bind(update.status.as_str())
        .bind(i64::from(update.status.number()))
        .bind(now.0)
        .bind(update.address.map(|a| a.to_string()))
        .bind(update.termination_kind.map(|k| k.as_str()))
        .bind(update.termination_reason.map(|r| r.as_str()))
        .bind(update.exit_code.map(i64::from))
        .bind(update.message.clone())
        .bind(id.as_str())
        .bind(cluster.as_str())
        .bind(drone.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(moved) = moved else {
            return Ok(None);
        };
        let entry = insert_history(&mut tx, id, update, now).await?;
        if update.status == BackendStatus::Terminated {
            keys::release(&mut tx, id).await?;
        }
        self.commit_and_signal(tx, &[Signal::Status]).await?;
        AppliedStatus::of(entry, &moved).map(Some)
    }

    /// Records a change of a ready backend's health as an entry of its history (status
    /// unchanged), if the backend is still ready on that drone.
    async fn apply_health(
        &self,
        id: &BackendName,
        cluster: &ClusterName,
        drone: &NodeName,
        update: &BackendStateUpdate,
        now: Millis,
    ) -> StoreResult<Option<AppliedStatus>> {
        let mut tx = self.begin_write(&self.pool).await?;
        let ready = sqlx::query(
            "SELECT created_at, warm_fingerprint FROM backend \
             WHERE id = $1 AND cluster = $2 AND drone = $3 AND status = 'ready'",
        )
        .bind(id.as_str())
        .bind(cluster.as_str())
        .bind(drone.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(ready) = ready else {
            return Ok(None);
        };
        let entry = insert_history(&mut tx, id, update, now).await?;
        self.commit_and_signal(tx, &[Signal::Status]).await?;
        AppliedStatus::of(entry, &ready).map(Some)
    }

    /// Renews the leases of the backends `drone` says it runs, for `lease_ms` from now on
    /// the database's clock (never shortening one). Only a backend of that drone that has
    /// not terminated and whose lease has not yet run out is renewed: once a lease has
    /// passed, the backend is dead by protocol (its drone stopped it) and its key may already
    /// belong to another. Returns the renewed ones, or `None` when `generation` is no longer
    /// the drone's current session (a newer one replaced it, which renews instead). Also
    /// records that the drone was seen.
    ///
    /// On PostgreSQL this `UPDATE` and [`Store::expire_backend`] lock the same row, and each
    /// re-checks its condition after the other commits, so a renewal and a takeover of one
    /// lease can never both succeed.
    pub async fn renew_leases(
        &self,
        cluster: &ClusterName,
        drone: &NodeName,
        generation: i64,
        backends: &[BackendName],
        now: Millis,
        lease_ms: u64,
    ) -> StoreResult<Option<Vec<BackendName>>> {
        let lease_ms = i64::try_from(lease_ms).unwrap_or(i64::MAX);
        let mut tx = self.begin_write(&self.liveness).await?;
        let current = sqlx::query(
            "UPDATE node SET last_seen = $1, lost_at = NULL \
             WHERE cluster = $2 AND kind = 'drone' AND name = $3 AND generation = $4",
        )
        .bind(now.0)
        .bind(cluster.as_str())
        .bind(drone.as_str())
        .bind(generation)
        .execute(&mut *tx)
        .await?;
        if current.rows_affected() == 0 {
            return Ok(None);
        }
        let mut renewed = Vec::with_capacity(backends.len());
        for chunk in backends.chunks(super::MAX_LIST_PARAMETERS) {
            let sql = format!(
                "UPDATE backend SET lease_expires_at = {greatest}(lease_expires_at, {now} + $1) \
                 WHERE cluster = $2 AND drone = $3 AND status_number < $4 \
                 AND lease_expires_at > {now} AND id IN ({list}) RETURNING id",
                greatest = self.greatest_sql(),
                now = self.now_sql(),
                list = super::placeholders(5, chunk.len())
            );
            let mut query = sqlx::query(&sql)
                .bind(lease_ms)
                .bind(cluster.as_str())
                .bind(drone.as_str())
                .bind(i64::from(BackendStatus::Terminated.number()));
            for id in chunk {
                query = query.bind(id.as_str());
            }
            for row in query.fetch_all(&mut *tx).await? {
                renewed.push(parse_column(&row, "id", |s| s.parse().ok())?);
            }
        }
        tx.commit().await?;
        Ok(Some(renewed))
    }

    /// Backends not yet terminated whose lease has run out (at most `limit`).
    pub async fn expired_leases(&self, limit: i64) -> StoreResult<Vec<BackendRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {BACKEND_COLUMNS} FROM backend \
             WHERE status_number < $1 AND lease_expires_at <= {now} \
             ORDER BY lease_expires_at LIMIT $2",
            now = self.now_sql()
        ))
        .bind(i64::from(BackendStatus::Terminated.number()))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(BackendRow::from_row).collect()
    }

    /// Records that a backend whose lease has run out is `terminated` (its drone stopped it
    /// before the lease ended, by protocol), frees its key and drops its undelivered
    /// actions, in one transaction. `None` if its lease was renewed meanwhile or it had
    /// already terminated.
    pub async fn expire_backend(
        &self,
        id: &BackendName,
        reason: TerminationReason,
        message: String,
        now: Millis,
    ) -> StoreResult<Option<BackendStatusStreamEntry>> {
        let update = BackendStateUpdate {
            termination_reason: Some(reason),
            message: Some(message),
            ..BackendStateUpdate::status(BackendStatus::Terminated)
        };
        let mut tx = self.begin_write(&self.pool).await?;
        let result = sqlx::query(&format!(
            "UPDATE backend SET status = $1, status_number = $2, status_time = $3, \
             termination_reason = $4, message = $5 \
             WHERE id = $6 AND status_number < $2 AND lease_expires_at <= {now}",
            now = self.now_sql()
        ))
        .bind(update.status.as_str())
        .bind(i64::from(update.status.number()))
        .bind(now.0)
        .bind(reason.as_str())
        .bind(update.message.clone())
        .bind(id.as_str())
        .execute(&mut *tx)
        .await?;
        if result.rows_affected() == 0 {
            return Ok(None);
        }
        let entry = insert_history(&mut tx, id, &update, now).await?;
        keys::release(&mut tx, id).await?;
        actions::drop_pending(&mut tx, id, now).await?;
        self.commit_and_signal(tx, &[Signal::Status]).await?;
        Ok(Some(entry))
    }

    /// Records that `kind` termination was asked for and stores the drone action for it,
    /// in one transaction. Returns `None` when an equal or stronger termination was already
    /// asked for (or the backend has terminated): there is nothing new to send.
    pub async fn request_termination(
        &self,
        backend: &BackendRow,
        kind: TerminationKind,
        reason: TerminationReason,
    ) -> StoreResult<Option<BackendAction>> {
        let allowed_previous = match kind {
            // A soft request only goes out if nothing was requested yet.
            TerminationKind::Soft => "termination_requested IS NULL",
            // A hard request may follow a soft one.
            TerminationKind::Hard => {
                "(termination_requested IS NULL OR termination_requested = 'soft')"
            }
        };
        let mut tx = self.begin_write(&self.pool).await?;
        let result = sqlx::query(&format!(
            "UPDATE backend SET termination_requested = $1 \
             WHERE id = $2 AND status_number < $3 AND {allowed_previous}"
        ))
        .bind(kind.as_str())
        .bind(backend.id.as_str())
        .bind(i64::from(BackendStatus::Terminated.number()))
        .execute(&mut *tx)
        .await?;
        if result.rows_affected() == 0 {
            return Ok(None);
        }
        let action = ActionKind::Terminate { kind, reason };
        let action_id = actions::insert(
            &mut tx,
            &backend.id,
            &backend.cluster,
            &backend.drone,
            &action,
            Millis::now(),
        )
        .await?;
        let signal = Signal::Actions {
            cluster: backend.cluster.clone(),
            drone: backend.drone.clone(),
        };
        self.commit_and_signal(tx, &[signal]).await?;
        Ok(Some(BackendAction {
            action_id,
            backend_id: backend.id.clone(),
            action,
        }))
    }

    /// Backends due for sweeping: ready and idle past `max_idle_seconds`, or past their
    /// lifetime limit, with no termination asked for yet. A backend that any proxy holds a
    /// connection to is never idle; idle time counts from when the last one closed
    /// (`last_active_at`), or from `ready`.
    pub async fn sweepable_backends(&self, now: Millis) -> StoreResult<Vec<BackendName>> {
        let rows = sqlx::query(
            "SELECT id FROM backend WHERE status_number < $1 AND termination_requested IS NULL \
             AND ((max_idle_seconds IS NOT NULL AND status_number = $2 \
                   AND last_active_at + max_idle_seconds * 1000 <= $3 \
                   AND NOT EXISTS (SELECT 1 FROM backend_connection c \
                       WHERE c.backend_id = backend.id AND c.expires_at > $3)) \
               OR (expires_at IS NOT NULL AND expires_at <= $3))",
        )
        .bind(i64::from(BackendStatus::Terminating.number()))
        .bind(i64::from(BackendStatus::Ready.number()))
        .bind(now.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| parse_column(row, "id", |s| s.parse().ok()))
            .collect()
    }

    /// How many not-yet-terminated backends each drone of the cluster has.
    pub async fn live_backend_counts(
        &self,
        cluster: &ClusterName,
    ) -> StoreResult<HashMap<NodeName, u32>> {
        let rows = sqlx::query(
            "SELECT drone, COUNT(*) AS n FROM backend WHERE cluster = $1 AND status_number < $2 \
             GROUP BY drone",
        )
        .bind(cluster.as_str())
        .bind(i64::from(BackendStatus::Terminated.number()))
        .fetch_all(&self.pool)
        .await?;
        let mut counts = HashMap::new();
        for row in &rows {
            let drone = parse_column(row, "drone", |s| s.parse::<NodeName>().ok())?;
            let n: i64 = row.try_get("n").map_err(anyhow::Error::from)?;
            counts.insert(drone, n as u32);
        }
        Ok(counts)
    }
}

/// Refuses when `namespace` has more than `max` live backends (the new one included, since
/// it is counted after it took its key).
pub(super) async fn namespace_refusal(
    tx: &mut sqlx::AnyConnection,
    namespace: &str,
    max: u32,
) -> StoreResult<Option<Refusal>> {
    let live: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM backend WHERE key_namespace = $1 AND status_number < $2",
    )
    .bind(namespace)
    .bind(i64::from(BackendStatus::Terminated.number()))
    .fetch_one(&mut *tx)
    .await?;
    Ok((live > i64::from(max)).then(|| Refusal {
        message: format!(
            "namespace {namespace:?} already has {max} live backends (--max-backends-per-namespace)"
        ),
        retry_after_seconds: 5,
    }))
}

async fn insert_history(
    conn: &mut sqlx::AnyConnection,
    id: &BackendName,
    update: &BackendStateUpdate,
    now: Millis,
) -> StoreResult<BackendStatusStreamEntry> {
    sqlx::query(
        "INSERT INTO backend_status (backend_id, status, status_number, termination_kind, \
         termination_reason, exit_code, message, time, health) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id.as_str())
    .bind(update.status.as_str())
    .bind(i64::from(update.status.number()))
    .bind(update.termination_kind.map(|k| k.as_str()))
    .bind(update.termination_reason.map(|r| r.as_str()))
    .bind(update.exit_code.map(i64::from))
    .bind(update.message.clone())
    .bind(now.0)
    .bind(update.health.map(|h| h.as_str()))
    .execute(conn)
    .await?;
    Ok(BackendStatusStreamEntry {
        status: update.status,
        termination_reason: update.termination_reason,
        termination_kind: update.termination_kind,
        exit_error: exit_error(update.status, update.exit_code.map(i64::from)),
        exit_code: update.exit_code,
        message: update.message.clone(),
        health: update.health,
        time: now,
    })
}
