//! Backend events waiting for the controller's acknowledgement, kept in SQLite so a drone
//! restart (even `kill -9`) does not lose them.
//!
//! Every status change is numbered, written to `<state_dir>/drone.db` and kept until the
//! controller acks it, so events produced while disconnected, sent on a connection that then
//! dropped, or left unacked by an earlier run of the drone are replayed, in order, on the
//! next connection.

use crate::event_store::{EventStore, Stored};
use plane_protocol::backend::BackendStateUpdate;
use plane_protocol::drone::BackendEvent;
use plane_protocol::names::BackendName;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};

/// How long opening waits for an earlier holder of the state file (an earlier drone in the
/// same process that is still stopping) to let go of it.
const LOCK_WAIT: Duration = Duration::from_secs(5);
/// Most writes committed in one transaction; bounds the time one commit takes.
const MAX_BATCH: usize = 256;

/// A cheap-to-clone handle to the drone's unacked events.
///
/// Reads come from an in-memory mirror behind a plain mutex (every operation on it is a
/// short map update that never awaits). Writes go, in order, to one writer task that owns
/// the SQLite file: it commits a batch, then adds the new events to the mirror and wakes
/// subscribers. So an event becomes visible (and can be sent) only once it is on disk, and
/// events become visible in ID order, which the connection's "send everything after the
/// last one sent" relies on.
#[derive(Clone)]
pub struct EventQueue {
    shared: Arc<Shared>,
    /// The writer task runs until every handle (every sender) is gone.
    writes: mpsc::UnboundedSender<Write>,
}

struct Shared {
    mirror: Mutex<Mirror>,
    /// Bumped on every change of the mirror; holds the number of unacked events.
    changed: watch::Sender<usize>,
}

struct Mirror {
    /// Assigned here, under the same lock as the send to the writer, so the writer receives
    /// events in ID order.
    next_id: u64,
    pending: BTreeMap<u64, BackendEvent>,
}

enum Write {
    Insert {
        event: BackendEvent,
        done: oneshot::Sender<()>,
    },
    Delete(u64),
    Flush(oneshot::Sender<()>),
}

impl EventQueue {
    /// Opens the drone's state file in `state_dir` (creating both if needed), loads every
    /// event an earlier run left unacked, and starts the writer task.
    pub async fn open(state_dir: &Path) -> anyhow::Result<Self> {
        let (store, stored) = EventStore::open(state_dir, LOCK_WAIT).await?;
        let Stored {
            unacked,
            highest_id,
        } = stored;
        if !unacked.is_empty() {
            tracing::info!(
                events = unacked.len(),
                "replaying events an earlier run left unacknowledged"
            );
        }
        // The stored high-water mark alone guarantees growth; the wall clock (in
        // microsecond-sized steps) also keeps IDs growing when the state directory was
        // lost (a container without a volume) or a write failed before a crash.
        let epoch_micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
            .unwrap_or(0);
        let next_id = highest_id.map_or(0, |id| id + 1).max(epoch_micros);

        let pending: BTreeMap<u64, BackendEvent> =
            unacked.into_iter().map(|e| (e.event_id, e)).collect();
        let (changed, _) = watch::channel(pending.len());
        let shared = Arc::new(Shared {
            mirror: Mutex::new(Mirror { next_id, pending }),
            changed,
        });
        let (writes, receiver) = mpsc::unbounded_channel();
        // Owned by the handles: it ends, after committing what is queued, once the last
        // handle is dropped.
        tokio::spawn(writer(store, shared.clone(), receiver));
        Ok(Self { shared, writes })
    }

    /// Records a status change and returns its event ID once it is stored (or, if storing
    /// failed, kept in memory only) and queued for sending.
    ///
    /// If this future is dropped after its first poll, the event is still stored and sent.
    pub async fn push(&self, backend_id: BackendName, update: BackendStateUpdate) -> u64 {
        let (done, stored) = oneshot::channel();
        let event_id = {
            let mut mirror = self.shared.lock();
            let event_id = mirror.next_id;
            mirror.next_id += 1;
            let event = BackendEvent {
                event_id,
                backend_id,
                update,
            };
            if let Err(mpsc::error::SendError(write)) =
                self.writes.send(Write::Insert { event, done })
            {
                // The writer only stops when every handle is gone, so this means it
                // panicked. Keeping the event in memory still gets it sent.
                tracing::error!(
                    event_id,
                    "drone state writer is gone; event kept in memory only"
                );
                if let Write::Insert { event, .. } = write {
                    mirror.pending.insert(event_id, event);
                }
                let len = mirror.pending.len();
                drop(mirror);
                self.shared.changed.send_replace(len);
                return event_id;
            }
            event_id
        };
        // An error means the writer is gone, having published the event or not; nothing
        // more can be done about it here.
        let _ = stored.await;
        event_id
    }

    /// Forgets an event the controller has stored. Unknown IDs (duplicate acks) are ignored.
    ///
    /// The mirror forgets it at once; the row is deleted by a later batch. If the drone
    /// dies before that commit, the event is sent again after the restart, which is
    /// harmless: the controller's handling of events is idempotent.
    pub fn ack(&self, event_id: u64) {
        let len = {
            let mut mirror = self.shared.lock();
            mirror.pending.remove(&event_id);
            mirror.pending.len()
        };
        self.shared.changed.send_replace(len);
        // Fails only if the writer is gone, in which case nothing is stored any more.
        let _ = self.writes.send(Write::Delete(event_id));
    }

    /// Resolves once every write queued before this call is committed (or has failed).
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.writes.send(Write::Flush(done)).is_ok() {
            let _ = flushed.await;
        }
    }

    /// Unacked events with an ID greater than `after` (all of them for `None`), oldest first.
    pub fn unacked_after(&self, after: Option<u64>) -> Vec<BackendEvent> {
        let mirror = self.shared.lock();
        match after {
            None => mirror.pending.values().cloned().collect(),
            Some(after) => mirror
                .pending
                .range(after.saturating_add(1)..)
                .map(|(_, event)| event.clone())
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.shared.lock().pending.len()
    }

    /// Wakes on every push and ack; the value is the number of unacked events.
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.shared.changed.subscribe()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Mirror> {
        // A panic while holding this lock cannot leave the map half-updated (each
        // operation is a single insert or remove), so a poisoned lock is still usable.
        self.mirror
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Commits queued writes in batches, then publishes the batch's new events to the mirror.
async fn writer(
    mut store: EventStore,
    shared: Arc<Shared>,
    mut writes: mpsc::UnboundedReceiver<Write>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while writes.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut inserts = Vec::new();
        let mut deletes = Vec::new();
        let mut waiters = Vec::new();
        for write in batch.drain(..) {
            match write {
                Write::Insert { event, done } => {
                    inserts.push(event);
                    waiters.push(done);
                }
                Write::Delete(event_id) => deletes.push(event_id),
                Write::Flush(done) => waiters.push(done),
            }
        }
        if let Err(err) = store.write(&inserts, &deletes).await {
            // Availability over durability: the events are still sent from memory, they
            // are only lost if the drone also dies before the controller acks them. A
            // failed delete only means a harmless resend after a restart.
            tracing::error!(
                error = format!("{err:#}"),
                events = inserts.len(),
                acks = deletes.len(),
                "could not write to the drone state file (disk full?); keeping events in memory only"
            );
        }
        if !inserts.is_empty() {
            let len = {
                let mut mirror = shared.lock();
                for event in inserts {
                    mirror.pending.insert(event.event_id, event);
                }
                mirror.pending.len()
            };
            shared.changed.send_replace(len);
        }
        for done in waiters {
            let _ = done.send(());
        }
    }
    store.close().await;
}

#[cfg(test)]
pub(crate) mod test_support {
    use plane_protocol::names::BackendName;
    use std::path::{Path, PathBuf};

    /// A fresh state directory under the system temp dir, removed when dropped.
    pub(crate) struct TempStateDir(PathBuf);

    impl TempStateDir {
        pub fn new() -> Self {
            // A random backend name is a handy random, path-safe suffix.
            let dir = std::env::temp_dir().join(format!(
                "plane-drone-test-{}",
                BackendName::new_random().as_str()
            ));
            std::fs::create_dir_all(&dir).expect("create temp state dir");
            Self(dir)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempStateDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::TempStateDir;
    use super::*;
    use plane_protocol::backend::BackendStatus;

    fn backend(name: &str) -> BackendName {
        name.parse().expect("valid backend name")
    }

    fn ids(events: &[BackendEvent]) -> Vec<u64> {
        events.iter().map(|e| e.event_id).collect()
    }

    #[tokio::test]
    async fn unacked_events_are_replayed_in_order_and_acked_ones_are_not() {
        let dir = TempStateDir::new();
        let queue = EventQueue::open(dir.path()).await.expect("open");
        let loading = BackendStateUpdate::status(BackendStatus::Loading);
        let starting = BackendStateUpdate::status(BackendStatus::Starting);
        let a = queue.push(backend("ba-a"), loading.clone()).await;
        let b = queue.push(backend("ba-a"), starting.clone()).await;
        let c = queue.push(backend("ba-b"), loading.clone()).await;
        assert!(a < b && b < c, "IDs grow: {a}, {b}, {c}");

        queue.ack(b);
        queue.ack(b); // a duplicate ack is harmless
        assert_eq!(ids(&queue.unacked_after(None)), vec![a, c]);
        assert_eq!(ids(&queue.unacked_after(Some(a))), vec![c]);
        assert_eq!(queue.len(), 2);
    }

    #[tokio::test]
    async fn unacked_events_survive_a_restart_and_new_ids_are_larger() {
        let dir = TempStateDir::new();
        let queue = EventQueue::open(dir.path()).await.expect("open");
        let mut pushed = Vec::new();
        for (name, status) in [
            ("ba-a", BackendStatus::Loading),
            ("ba-a", BackendStatus::Starting),
            ("ba-b", BackendStatus::Loading),
            ("ba-a", BackendStatus::Ready),
            ("ba-b", BackendStatus::Starting),
        ] {
            let update = BackendStateUpdate::status(status);
            let event_id = queue.push(backend(name), update.clone()).await;
            pushed.push(BackendEvent {
                event_id,
                backend_id: backend(name),
                update,
            });
        }
        queue.ack(pushed[0].event_id);
        queue.ack(pushed[3].event_id);
        // A graceful stop flushes acks; without it they may be replayed, which is harmless
        // but would make this test's expectation racy.
        queue.flush().await;
        drop(queue);

        let reopened = EventQueue::open(dir.path()).await.expect("reopen");
        let expected = vec![pushed[1].clone(), pushed[2].clone(), pushed[4].clone()];
        assert_eq!(reopened.unacked_after(None), expected);
        assert_eq!(reopened.len(), 3);
        assert_eq!(*reopened.subscribe().borrow(), 3);

        let newest = pushed.iter().map(|e| e.event_id).max().expect("events");
        let next = reopened
            .push(
                backend("ba-c"),
                BackendStateUpdate::status(BackendStatus::Loading),
            )
            .await;
        assert!(
            next > newest,
            "new ID {next} must exceed every earlier ID ({newest})"
        );
    }
}
