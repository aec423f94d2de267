//! The drone's SQLite state file, `<state_dir>/drone.db`: backend events the controller has
//! not acknowledged yet. The only place in the drone with SQL.

use anyhow::Context;
use plane_protocol::backend::BackendStateUpdate;
use plane_protocol::drone::BackendEvent;
use plane_protocol::names::BackendName;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteLockingMode, SqliteSynchronous,
};
use sqlx::{Connection, Row};
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;

/// The database's file name inside the state directory.
pub(crate) const DB_FILE: &str = "drone.db";

/// How often to retry while another connection holds the file's lock.
const LOCK_RETRY_INTERVAL: Duration = Duration::from_millis(50);

// AUTOINCREMENT makes SQLite remember the highest event ID ever stored (in
// `sqlite_sequence`), even after every row has been acked and deleted, so a restarted drone
// never reuses an ID. `state_update` is the `BackendStateUpdate` as JSON, as on the wire.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS backend_events (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    backend_id TEXT NOT NULL,
    state_update TEXT NOT NULL
)";

/// An open state file. Holds SQLite's exclusive lock on it until closed or dropped, so a
/// second drone pointed at the same state directory fails to start instead of replaying
/// (and deleting) this drone's events as its own.
pub(crate) struct EventStore {
    conn: SqliteConnection,
}

/// What the state file held when it was opened.
pub(crate) struct Stored {
    /// Every unacked event, oldest first.
    pub unacked: Vec<BackendEvent>,
    /// The highest event ID ever stored in this file, acked or not.
    pub highest_id: Option<u64>,
}

impl EventStore {
    /// Opens (creating the directory and file if needed) `<state_dir>/drone.db` and loads
    /// what it holds. While another connection holds the file, retries for up to
    /// `lock_wait`: a drone restarted in the same process (tests) may still be closing it.
    pub async fn open(state_dir: &Path, lock_wait: Duration) -> anyhow::Result<(Self, Stored)> {
        tokio::fs::create_dir_all(state_dir)
            .await
            .with_context(|| format!("creating state directory {}", state_dir.display()))?;
        let path = state_dir.join(DB_FILE);
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            // Set before WAL is entered, so no shared-memory index is used and the lock is
            // held for the connection's lifetime: one drone per state directory.
            .locking_mode(SqliteLockingMode::Exclusive)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL rather than NORMAL: in WAL mode NORMAL survives a process kill but may
            // lose the last commits on power loss, and an event is sent only after its
            // commit returns. The controller could then hold an event (and its ID) that the
            // drone forgot. Events are a handful per backend lifetime, and commits are
            // batched, so the extra fsync per commit is cheap.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(lock_wait);
        let deadline = Instant::now() + lock_wait;
        loop {
            match Self::try_open(&options).await {
                Ok(opened) => return Ok(opened),
                Err(err) if is_busy(&err) && Instant::now() < deadline => {
                    tokio::time::sleep(LOCK_RETRY_INTERVAL).await;
                }
                Err(err) if is_busy(&err) => {
                    return Err(err).with_context(|| {
                        format!(
                            "{} is locked; is another drone using this state directory?",
                            path.display()
                        )
                    })
                }
                Err(err) => return Err(err).with_context(|| format!("opening {}", path.display())),
            }
        }
    }

    async fn try_open(options: &SqliteConnectOptions) -> Result<(Self, Stored), sqlx::Error> {
        let mut conn = SqliteConnection::connect_with(options).await?;
        // EXCLUSIVE takes the write lock now rather than at the first event, so a second
        // drone is refused at start.
        let mut tx = conn.begin_with("BEGIN EXCLUSIVE").await?;
        sqlx::query(SCHEMA).execute(&mut *tx).await?;
        let rows = sqlx::query(
            "SELECT event_id, backend_id, state_update FROM backend_events ORDER BY event_id",
        )
        .fetch_all(&mut *tx)
        .await?;
        let sequence: Option<i64> =
            sqlx::query_scalar("SELECT seq FROM sqlite_sequence WHERE name = 'backend_events'")
                .fetch_optional(&mut *tx)
                .await?;

        let mut unacked = Vec::with_capacity(rows.len());
        let mut highest = sequence.and_then(|seq| u64::try_from(seq).ok());
        for row in rows {
            let event_id: i64 = row.try_get("event_id")?;
            let backend_id: String = row.try_get("backend_id")?;
            let state_update: String = row.try_get("state_update")?;
            match decode(event_id, &backend_id, &state_update) {
                Ok(event) => {
                    highest = highest.max(Some(event.event_id));
                    unacked.push(event);
                }
                Err(why) => {
                    // Written by an incompatible drone version: it can never be sent, and
                    // keeping it would only repeat this warning at every start.
                    tracing::warn!(event_id, reason = %why, "dropping unreadable stored event");
                    sqlx::query("DELETE FROM backend_events WHERE event_id = ?")
                        .bind(event_id)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        tx.commit().await?;
        Ok((
            Self { conn },
            Stored {
                unacked,
                highest_id: highest,
            },
        ))
    }

    /// Stores `inserts` and forgets the events `deletes` in one transaction (one fsync);
    /// on error none of it took effect.
    pub async fn write(&mut self, inserts: &[BackendEvent], deletes: &[u64]) -> anyhow::Result<()> {
        let mut tx = self.conn.begin().await.context("beginning a transaction")?;
        for event in inserts {
            let update = serde_json::to_string(&event.update).context("encoding an event")?;
            sqlx::query(
                "INSERT INTO backend_events (event_id, backend_id, state_update) VALUES (?, ?, ?)",
            )
            .bind(to_sql_id(event.event_id)?)
            .bind(event.backend_id.as_str())
            .bind(update)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("storing event {}", event.event_id))?;
        }
        for &event_id in deletes {
            sqlx::query("DELETE FROM backend_events WHERE event_id = ?")
                .bind(to_sql_id(event_id)?)
                .execute(&mut *tx)
                .await
                .with_context(|| format!("deleting event {event_id}"))?;
        }
        tx.commit().await.context("committing")
    }

    /// Closes the file cleanly (checkpointing the WAL) and releases its lock.
    pub async fn close(self) {
        if let Err(err) = self.conn.close().await {
            tracing::warn!(error = %err, "closing the drone state file failed");
        }
    }
}

fn decode(event_id: i64, backend_id: &str, state_update: &str) -> Result<BackendEvent, String> {
    let event_id = u64::try_from(event_id).map_err(|_| format!("negative event ID {event_id}"))?;
    let backend_id: BackendName = backend_id
        .parse()
        .map_err(|err| format!("backend ID {backend_id:?}: {err}"))?;
    let update: BackendStateUpdate =
        serde_json::from_str(state_update).map_err(|err| format!("state update: {err}"))?;
    Ok(BackendEvent {
        event_id,
        backend_id,
        update,
    })
}

fn to_sql_id(event_id: u64) -> anyhow::Result<i64> {
    i64::try_from(event_id).with_context(|| format!("event ID {event_id} does not fit SQLite"))
}

/// Whether SQLite refused because another connection holds the lock (`SQLITE_BUSY` or one
/// of its extended codes).
fn is_busy(err: &sqlx::Error) -> bool {
    const SQLITE_BUSY: i64 = 5;
    match err {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|code| code.parse::<i64>().ok())
            .is_some_and(|code| code & 0xff == SQLITE_BUSY),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_queue::test_support::TempStateDir;
    use plane_protocol::backend::BackendStatus;

    fn event(event_id: u64) -> BackendEvent {
        BackendEvent {
            event_id,
            backend_id: "ba-a".parse().expect("valid backend name"),
            update: BackendStateUpdate::status(BackendStatus::Loading),
        }
    }

    #[tokio::test]
    async fn the_highest_id_is_remembered_after_every_event_is_deleted() {
        let dir = TempStateDir::new();
        let (mut store, stored) = EventStore::open(dir.path(), Duration::from_secs(5))
            .await
            .expect("open");
        assert!(stored.unacked.is_empty());
        assert_eq!(stored.highest_id, None);
        store
            .write(&[event(7), event(9)], &[])
            .await
            .expect("insert");
        store.write(&[], &[7, 9]).await.expect("delete");
        store.close().await;

        let (store, stored) = EventStore::open(dir.path(), Duration::from_secs(5))
            .await
            .expect("reopen");
        assert!(stored.unacked.is_empty());
        assert_eq!(stored.highest_id, Some(9));
        store.close().await;
    }

    #[tokio::test]
    async fn a_second_drone_cannot_open_a_state_dir_in_use() {
        let dir = TempStateDir::new();
        let (first, _) = EventStore::open(dir.path(), Duration::from_secs(5))
            .await
            .expect("open");
        let err = EventStore::open(dir.path(), Duration::from_millis(300))
            .await
            .err()
            .expect("a second open fails while the first holds the file");
        assert!(
            format!("{err:#}").contains("another drone"),
            "unexpected error: {err:#}"
        );

        // Once the holder lets go, a waiting open succeeds.
        let second = tokio::spawn({
            let dir = dir.path().to_path_buf();
            async move { EventStore::open(&dir, Duration::from_secs(5)).await }
        });
        // Not a wait for a condition: gives the second open time to hit the lock, so the
        // test covers waiting (it passes, proving less, if the open is slower than this).
        tokio::time::sleep(Duration::from_millis(200)).await;
        first.close().await;
        let (second, _) = second
            .await
            .expect("no panic")
            .expect("opens after release");
        second.close().await;
    }
}
