//! The controller's database facade: one `Store` over SQLite or PostgreSQL, one file per
//! table family. Handlers never write SQL; they call methods here.
//!
//! Both databases run the same SQL through sqlx's `Any` driver. Times are stored as
//! milliseconds since the epoch (BIGINT) so no date type has to agree between the two.

mod acme;
mod actions;
mod backends;
mod census;
mod changes;
mod connections;
mod keys;
mod nodes;
mod retention;
mod tokens;
mod warm;

pub use backends::{
    Admission, AppliedStatus, BackendRow, CreatedBackend, NewBackend, Refusal, StatusChange,
    WarmSpawn,
};
pub use census::Counted;
pub use keys::KeyHolder;
pub use nodes::{NodeKind, NodeRow, NodeSession};
pub use retention::Purged;
pub use tokens::{NewToken, Revocation, TokenRow};
pub use warm::{
    fingerprint, ClaimOutcome, ClaimRequest, Claimed, UnclaimedWarm, WarmCounts, WarmPoolRow,
    WarmReport,
};

use anyhow::Context;
use plane_protocol::names::{ClusterName, NodeName};
use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;
use tokio::sync::broadcast;

/// Status-changing commits started and finished (see [`Store::status_epoch`]).
#[derive(Default)]
struct StatusEpoch {
    started: AtomicU64,
    finished: AtomicU64,
}

/// Which database a [`Store`] runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatabaseKind {
    Sqlite,
    Postgres,
}

impl DatabaseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// Failures the store's callers branch on; everything else is an `Other`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint refused the write (e.g. a backend ID already in use).
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// An admission limit refused a new backend; nothing was written.
    #[error("{0}")]
    Refused(Refusal),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db_err) = &err {
            if db_err.is_unique_violation() {
                return StoreError::AlreadyExists(db_err.message().to_string());
            }
        }
        StoreError::Other(anyhow::Error::new(err))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// How many values one `IN (...)` list binds; longer lists are split. Well under the
/// parameter limits of both databases.
const MAX_LIST_PARAMETERS: usize = 200;

/// `$first, $first+1, ...` for `count` bound values.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a committed write changed, for the change bus. Delivered in-process at once and,
/// on PostgreSQL, to every controller by `NOTIFY` (sent inside the writing transaction, so
/// it goes out only if the write commits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Signal {
    /// New rows in `backend_status`.
    Status,
    /// New actions for a drone.
    Actions {
        cluster: ClusterName,
        drone: NodeName,
    },
    /// New rows in `token_revocation`.
    Revocations,
}

impl Signal {
    /// The PostgreSQL channel and payload.
    fn channel_and_payload(&self) -> (&'static str, String) {
        match self {
            Signal::Status => (STATUS_CHANNEL, String::new()),
            Signal::Actions { cluster, drone } => (ACTIONS_CHANNEL, format!("{cluster} {drone}")),
            Signal::Revocations => (REVOCATIONS_CHANNEL, String::new()),
        }
    }

    /// Reads a notification received on `channel` (see [`Signal::channel_and_payload`]).
    pub fn from_notification(channel: &str, payload: &str) -> Option<Signal> {
        match channel {
            STATUS_CHANNEL => Some(Signal::Status),
            REVOCATIONS_CHANNEL => Some(Signal::Revocations),
            ACTIONS_CHANNEL => {
                let (cluster, drone) = payload.split_once(' ')?;
                Some(Signal::Actions {
                    cluster: cluster.parse().ok()?,
                    drone: drone.parse().ok()?,
                })
            }
            _ => None,
        }
    }
}

/// The PostgreSQL channels a controller listens on.
pub const STATUS_CHANNEL: &str = "plane_status";
pub const ACTIONS_CHANNEL: &str = "plane_actions";
pub const REVOCATIONS_CHANNEL: &str = "plane_revocations";

/// Read-only connections to a SQLite database, beside its one writer.
const SQLITE_READERS: u32 = 4;

/// PostgreSQL connections kept for drone sessions (see [`Store::renew_leases`] and
/// [`Store::pending_actions`]): one short transaction per drone heartbeat, and one read per
/// batch of actions stored for a drone.
const LIVENESS_CONNECTIONS: u32 = 4;

/// Cheap to clone: the pools and the signal channel are reference-counted.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// Where the hot reads go (a connect's key holder, backend and token). On SQLite,
    /// connections of their own: in WAL mode readers neither wait for the one writer nor
    /// hold it up, while everything on `pool` queues on its single connection. On
    /// PostgreSQL, `pool` itself.
    readers: AnyPool,
    /// Where drones' lease renewals go, and on PostgreSQL the reads of the actions their
    /// sessions send. On PostgreSQL, connections of their own: a renewal that queues behind
    /// a burst of connects arrives late, and a drone whose renewals are late stops its
    /// healthy backends. A session's action read must not queue there either, since the
    /// session's loop also carries the renewals' answers to the drone. On SQLite, `pool`:
    /// there is one writer either way.
    liveness: AnyPool,
    /// Where joins' tokens are written. On PostgreSQL, a connection of its own whose commits
    /// do not wait for the server's disk (`synchronous_commit = off`): see
    /// [`Store::add_token`]. On SQLite, `pool`.
    token_writer: AnyPool,
    /// Joins' tokens, written in shared commits (see [`Store::add_token`]).
    token_batch: std::sync::Arc<tokens::TokenBatch>,
    /// See [`Store::status_epoch`].
    status_epoch: std::sync::Arc<StatusEpoch>,
    kind: DatabaseKind,
    /// The database URL, for connections outside the pool (PostgreSQL's LISTEN).
    url: String,
    signals: broadcast::Sender<Signal>,
}

/// Where a `--db` URL points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatabaseLocation {
    Postgres(String),
    Sqlite(std::path::PathBuf),
}

impl DatabaseLocation {
    /// `postgres://...` (or `postgresql://`), `sqlite://FILE`, or a plain file path.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres(url.to_string()));
        }
        match url.split_once("://") {
            None => Ok(Self::Sqlite(url.into())),
            Some(("sqlite", path)) => Ok(Self::Sqlite(path.into())),
            Some((scheme, _)) => anyhow::bail!(
                "database {url:?}: unsupported scheme {scheme:?}; use postgres://... or a SQLite file path"
            ),
        }
    }
}

impl Store {
    /// Opens the database named by `url` (`postgres://...`, `sqlite://...`, or a plain file
    /// path for SQLite) and applies the migrations.
    pub async fn open(url: &str) -> anyhow::Result<Store> {
        sqlx::any::install_default_drivers();
        let (kind, url) = match DatabaseLocation::parse(url)? {
            DatabaseLocation::Postgres(url) => (DatabaseKind::Postgres, url),
            DatabaseLocation::Sqlite(path) => {
                let path = path.to_str().context("the SQLite path is not UTF-8")?;
                if let Some(parent) = Path::new(path).parent() {
                    if !parent.as_os_str().is_empty() {
                        std::fs::create_dir_all(parent).with_context(|| {
                            format!("creating the database directory {}", parent.display())
                        })?;
                    }
                }
                // The path becomes part of a URL: escape what would end or re-read it.
                let escaped = path
                    .replace('%', "%25")
                    .replace('?', "%3F")
                    .replace('#', "%23");
                (DatabaseKind::Sqlite, format!("sqlite://{escaped}?mode=rwc"))
            }
        };

        let options = match kind {
            // One connection: SQLite allows one writer at a time, and a single connection
            // turns lock contention (SQLITE_BUSY on lock upgrades) into plain queueing.
            //
            // The writer checkpoints the WAL inside the commit that grows it past
            // `wal_autocheckpoint` pages, and every write queues meanwhile. Under a burst of
            // joins those pauses were the latency's tail; 300 pages (SQLite's default is
            // 1,000) makes them shorter and more frequent: p99 lower in six of seven A/B
            // runs, throughput lower by 5-33% (docs/performance.md). Checkpointing from a
            // connection of its own was tried and was worse (same document).
            DatabaseKind::Sqlite => {
                AnyPoolOptions::new()
                    .max_connections(1)
                    .after_connect(|conn, _meta| {
                        Box::pin(async move {
                            use sqlx::Executor;
                            conn.execute(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                             PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON; \
                             PRAGMA wal_autocheckpoint = 300;",
                            )
                            .await?;
                            Ok(())
                        })
                    })
            }
            DatabaseKind::Postgres => AnyPoolOptions::new().max_connections(10),
        };
        // One direct connection first: a pool reports only "timed out", this says why.
        {
            use sqlx::Connection;
            let conn = sqlx::AnyConnection::connect(&url)
                .await
                .with_context(|| format!("connecting to the {} database", kind.as_str()))?;
            conn.close().await.ok();
        }
        let pool = options
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await
            .with_context(|| format!("connecting to the {} database", kind.as_str()))?;

        let migrator = match kind {
            DatabaseKind::Sqlite => sqlx::migrate!("../migrations/sqlite"),
            DatabaseKind::Postgres => sqlx::migrate!("../migrations/postgres"),
        };
        migrator
            .run(&pool)
            .await
            .context("applying database migrations")?;
        let readers = match kind {
            // Opened after the migrations, which put the file in WAL mode for good.
            DatabaseKind::Sqlite => AnyPoolOptions::new()
                .max_connections(SQLITE_READERS)
                .after_connect(|conn, _meta| {
                    Box::pin(async move {
                        use sqlx::Executor;
                        conn.execute("PRAGMA busy_timeout = 5000; PRAGMA query_only = ON;")
                            .await?;
                        Ok(())
                    })
                })
                .acquire_timeout(Duration::from_secs(10))
                .connect(&url)
                .await
                .context("opening the SQLite read connections")?,
            DatabaseKind::Postgres => pool.clone(),
        };
        let liveness = match kind {
            DatabaseKind::Sqlite => pool.clone(),
            DatabaseKind::Postgres => AnyPoolOptions::new()
                .max_connections(LIVENESS_CONNECTIONS)
                .acquire_timeout(Duration::from_secs(10))
                .connect(&url)
                .await
                .context("opening the PostgreSQL connections for lease renewals")?,
        };
        let token_writer = match kind {
            DatabaseKind::Sqlite => pool.clone(),
            // One batch is written at a time (see `add_token`), so one connection. The
            // setting is a startup parameter, not a `SET`: behind a pooler that shares
            // server connections, a session's `SET` could reach connections whose writes
            // must wait for the disk, while a parameter it cannot pass refuses the start.
            DatabaseKind::Postgres => {
                let mut token_url = url::Url::parse(&url).context("reading the database URL")?;
                token_url
                    .query_pairs_mut()
                    .append_pair("options", "-c synchronous_commit=off");
                AnyPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(token_url.as_str())
                    .await
                    .context("opening the PostgreSQL connection for tokens")?
            }
        };
        let (signals, _) = broadcast::channel(4096);
        Ok(Store {
            pool,
            readers,
            liveness,
            token_writer,
            token_batch: Default::default(),
            status_epoch: Default::default(),
            kind,
            url,
            signals,
        })
    }

    /// SQL for "now" in milliseconds since the epoch on the *database's* clock. Leases are
    /// set and compared with it alone, so controllers whose clocks disagree (or jump) never
    /// cut a lease short: on PostgreSQL every controller reads the one server's clock; on
    /// SQLite there is one controller, on the database's host.
    fn now_sql(&self) -> &'static str {
        match self.kind {
            DatabaseKind::Postgres => {
                "CAST(FLOOR(EXTRACT(EPOCH FROM clock_timestamp()) * 1000) AS BIGINT)"
            }
            DatabaseKind::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
        }
    }

    /// SQL for the larger of two values.
    fn greatest_sql(&self) -> &'static str {
        match self.kind {
            DatabaseKind::Postgres => "GREATEST",
            DatabaseKind::Sqlite => "MAX",
        }
    }

    /// Signals of writes made through this store, as they commit.
    pub fn signals(&self) -> broadcast::Receiver<Signal> {
        self.signals.subscribe()
    }

    /// The database URL (for a PostgreSQL listener connection).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Commits `tx`, with a `NOTIFY` for each signal on PostgreSQL, then signals in-process.
    async fn commit_and_signal(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Any>,
        signals: &[Signal],
    ) -> StoreResult<()> {
        if self.kind == DatabaseKind::Postgres {
            for signal in signals {
                let (channel, payload) = signal.channel_and_payload();
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(channel)
                    .bind(payload)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let changes_status = signals.contains(&Signal::Status);
        if changes_status {
            self.status_epoch.started.fetch_add(1, SeqCst);
        }
        let committed = tx.commit().await;
        if changes_status {
            // Also when the commit failed: the count of writes in flight must come back.
            self.status_epoch.finished.fetch_add(1, SeqCst);
        }
        committed?;
        for signal in signals {
            // Nobody listening (no bus yet, or shutting down) is fine.
            let _ = self.signals.send(signal.clone());
        }
        Ok(())
    }

    pub fn kind(&self) -> DatabaseKind {
        self.kind
    }

    /// Begins a transaction that writes. On SQLite it takes the write lock at its start
    /// (`BEGIN IMMEDIATE`): a deferred transaction that has read cannot wait for a write lock
    /// another connection took since, and SQLite fails it at once ("database is locked")
    /// whatever `busy_timeout` says, while a wait at the start honours it. Another process on
    /// the same file (an operator's `plane` command, a test's second store) is such a writer.
    async fn begin_write(
        &self,
        pool: &AnyPool,
    ) -> sqlx::Result<sqlx::Transaction<'static, sqlx::Any>> {
        match self.kind {
            DatabaseKind::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await,
            DatabaseKind::Postgres => pool.begin().await,
        }
    }

    /// A number that grows with every status change committed through this store, or
    /// `None` while one is being committed. What is read from the database after a `Some(n)`
    /// is current for as long as the epoch is still `Some(n)` (the holder cache relies on
    /// it): a commit counts as started before it can land and as finished only after.
    pub fn status_epoch(&self) -> Option<u64> {
        // Finished first: a write that starts and finishes between the two loads makes
        // them differ, never look equal.
        let finished = self.status_epoch.finished.load(SeqCst);
        let started = self.status_epoch.started.load(SeqCst);
        (started == finished).then_some(started)
    }

    /// Where a drone session reads the actions it sends (see `liveness`); on SQLite the read
    /// connections, which never wait for the writer.
    fn session_reads(&self) -> &AnyPool {
        match self.kind {
            DatabaseKind::Sqlite => &self.readers,
            DatabaseKind::Postgres => &self.liveness,
        }
    }

    /// Closes every pool (on SQLite, `token_writer` and `liveness` are `pool` itself).
    pub async fn close(&self) {
        self.readers.close().await;
        self.token_writer.close().await;
        self.liveness.close().await;
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::{Connection, Executor};

    /// A transaction that reads and then writes, while another connection to the same file
    /// writes after the read: SQLite would fail the deferred transaction's write at once.
    /// One begun with `begin_write` holds the lock from its start, so the other writer is
    /// the one kept out (told at once here, with no busy timeout) and the transaction
    /// commits.
    #[tokio::test]
    async fn a_write_transaction_on_sqlite_holds_the_lock_from_its_start() {
        let dir = std::env::temp_dir().join(format!(
            "plane-store-{}",
            plane_protocol::names::BackendName::new_random()
        ));
        let path = dir.join("plane.db");
        let store = Store::open(path.to_str().expect("utf-8"))
            .await
            .expect("store opens");
        let mut other =
            sqlx::AnyConnection::connect(&format!("sqlite://{}?mode=rwc", path.display()))
                .await
                .expect("second connection");
        other
            .execute("PRAGMA busy_timeout = 0; CREATE TABLE scratch (x INTEGER)")
            .await
            .expect("scratch table");

        let mut tx = store.begin_write(&store.pool).await.expect("begins");
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM scratch")
            .fetch_one(&mut *tx)
            .await
            .expect("read");
        assert_eq!(count, 0);
        let refused = other.execute("INSERT INTO scratch VALUES (2)").await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|err| err.to_string().contains("locked")),
            "the other writer should be kept out: {refused:?}"
        );
        sqlx::query("INSERT INTO scratch VALUES (1)")
            .execute(&mut *tx)
            .await
            .expect("the write after the read");
        tx.commit().await.expect("commits");

        other
            .execute("INSERT INTO scratch VALUES (2)")
            .await
            .expect("the other writer goes after the commit");
        other.close().await.expect("closes");
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
