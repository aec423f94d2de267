//! Backend events waiting for the controller's acknowledgement.
//!
//! Every status change is numbered and kept here until the controller acks it, so events
//! produced while disconnected (or sent on a connection that then dropped) are replayed,
//! in order, on the next connection.

use plane_protocol::backend::BackendStateUpdate;
use plane_protocol::drone::BackendEvent;
use plane_protocol::names::BackendName;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// A cheap-to-clone handle to the drone's unacked events.
///
/// A plain mutex rather than an actor: every operation is a short map update that never
/// awaits, and producers (backend tasks) must be able to push without waiting.
#[derive(Clone)]
pub struct EventQueue {
    inner: Arc<Mutex<Inner>>,
    /// Bumped on every push and ack; holds the number of unacked events.
    changed: watch::Sender<usize>,
}

struct Inner {
    next_id: u64,
    pending: BTreeMap<u64, BackendEvent>,
}

impl Default for EventQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl EventQueue {
    pub fn new() -> Self {
        // Starting from the wall clock (in microsecond-sized steps) means a restarted drone
        // does not reuse the IDs of its previous run, which the controller may still hold.
        let epoch_millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Self::starting_at(epoch_millis.saturating_mul(1000))
    }

    fn starting_at(first_id: u64) -> Self {
        let (changed, _) = watch::channel(0);
        Self {
            inner: Arc::new(Mutex::new(Inner {
                next_id: first_id,
                pending: BTreeMap::new(),
            })),
            changed,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the map half-updated (each
        // operation is a single insert or remove), so a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a status change and returns its event ID.
    pub fn push(&self, backend_id: BackendName, update: BackendStateUpdate) -> u64 {
        let (event_id, len) = {
            let mut inner = self.lock();
            let event_id = inner.next_id;
            inner.next_id += 1;
            inner.pending.insert(
                event_id,
                BackendEvent {
                    event_id,
                    backend_id,
                    update,
                },
            );
            (event_id, inner.pending.len())
        };
        self.changed.send_replace(len);
        event_id
    }

    /// Forgets an event the controller has stored. Unknown IDs (duplicate acks) are ignored.
    pub fn ack(&self, event_id: u64) {
        let len = {
            let mut inner = self.lock();
            inner.pending.remove(&event_id);
            inner.pending.len()
        };
        self.changed.send_replace(len);
    }

    /// Unacked events with an ID greater than `after` (all of them for `None`), oldest first.
    pub fn unacked_after(&self, after: Option<u64>) -> Vec<BackendEvent> {
        let inner = self.lock();
        match after {
            None => inner.pending.values().cloned().collect(),
            Some(after) => inner
                .pending
                .range(after.saturating_add(1)..)
                .map(|(_, event)| event.clone())
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.lock().pending.len()
    }

    /// Wakes on every push and ack; the value is the number of unacked events.
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plane_protocol::backend::BackendStatus;

    fn backend(name: &str) -> BackendName {
        name.parse().expect("valid backend name")
    }

    #[test]
    fn unacked_events_are_replayed_in_order_and_acked_ones_are_not() {
        let queue = EventQueue::starting_at(100);
        let loading = BackendStateUpdate::status(BackendStatus::Loading);
        let starting = BackendStateUpdate::status(BackendStatus::Starting);
        let a = queue.push(backend("ba-a"), loading.clone());
        let b = queue.push(backend("ba-a"), starting.clone());
        let c = queue.push(backend("ba-b"), loading.clone());
        assert_eq!((a, b, c), (100, 101, 102));

        queue.ack(b);
        queue.ack(b); // a duplicate ack is harmless
        let replay: Vec<u64> = queue
            .unacked_after(None)
            .iter()
            .map(|e| e.event_id)
            .collect();
        assert_eq!(replay, vec![100, 102]);

        let newer: Vec<u64> = queue
            .unacked_after(Some(100))
            .iter()
            .map(|e| e.event_id)
            .collect();
        assert_eq!(newer, vec![102]);
        assert_eq!(queue.len(), 2);
    }
}
