//! Which backends have open connections (in-flight requests, streaming responses, WebSockets)
//! or had traffic lately: the source of the keep-alive reports that stop the controller from
//! reaping a backend someone is using.

use plane_protocol::names::BackendName;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio_util::sync::CancellationToken;

/// Cheap to clone; every clone sees the same counts.
#[derive(Clone, Debug, Default)]
pub struct ConnectionTracker {
    // A plain lock rather than an actor: every operation is a few map updates, done from
    // `Drop` (which cannot await), and the lock is never held across an await.
    state: Arc<Mutex<TrackerState>>,
}

#[derive(Debug, Default)]
struct TrackerState {
    open: HashMap<BackendName, BackendConnections>,
    /// Backends that had a connection open at any point since the last report.
    touched: BTreeSet<BackendName>,
}

#[derive(Debug)]
struct BackendConnections {
    count: usize,
    /// Cancelled when the backend is removed, so tunnels to it end at once.
    removed: CancellationToken,
}

impl ConnectionTracker {
    fn lock(&self) -> MutexGuard<'_, TrackerState> {
        // A panic elsewhere while holding the lock leaves consistent counts (every update is
        // a single step), so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one connection to `backend` as open until the guard is dropped.
    pub fn open(&self, backend: &BackendName) -> ConnectionGuard {
        let mut state = self.lock();
        state.touched.insert(backend.clone());
        let entry = state
            .open
            .entry(backend.clone())
            .or_insert_with(|| BackendConnections {
                count: 0,
                removed: CancellationToken::new(),
            });
        entry.count += 1;
        ConnectionGuard {
            tracker: self.clone(),
            backend: backend.clone(),
            removed: entry.removed.clone(),
        }
    }

    /// How many connections to `backend` are open now.
    #[cfg(test)]
    pub fn open_count(&self, backend: &BackendName) -> usize {
        self.lock().open.get(backend).map_or(0, |entry| entry.count)
    }

    /// The backends to name in the next keep-alive: those with a connection open now, and
    /// those that had one since the previous report. Starts a new report period.
    pub fn take_report(&self) -> Vec<BackendName> {
        let mut state = self.lock();
        let mut report = std::mem::take(&mut state.touched);
        report.extend(state.open.keys().cloned());
        report.into_iter().collect()
    }

    /// Puts a report that could not be sent back, so the next report still names them.
    pub fn restore_report(&self, backends: Vec<BackendName>) {
        self.lock().touched.extend(backends);
    }

    /// Ends every tunnel to `backend` (its guards' [`ConnectionGuard::removed`] fire).
    pub fn backend_removed(&self, backend: &BackendName) {
        if let Some(entry) = self.lock().open.get_mut(backend) {
            entry.removed.cancel();
            // Later connections (a racing request) get a fresh token; they are refused
            // upstream anyway, but must not start out cancelled by accident.
            entry.removed = CancellationToken::new();
        }
    }

    fn close(&self, backend: &BackendName) {
        let mut state = self.lock();
        if let Some(entry) = state.open.get_mut(backend) {
            entry.count = entry.count.saturating_sub(1);
            if entry.count == 0 {
                state.open.remove(backend);
            }
        }
        // A connection that opened and closed within one period still counts as traffic.
        state.touched.insert(backend.clone());
    }
}

/// One open connection to a backend; dropping it closes it in the tracker's eyes.
#[derive(Debug)]
pub struct ConnectionGuard {
    tracker: ConnectionTracker,
    backend: BackendName,
    removed: CancellationToken,
}

impl ConnectionGuard {
    pub fn backend(&self) -> &BackendName {
        &self.backend
    }

    /// Fires when the controller says this connection's backend is going away.
    pub fn removed(&self) -> CancellationToken {
        self.removed.clone()
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.tracker.close(&self.backend);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_connections_are_reported_every_period_and_closed_ones_once() {
        let tracker = ConnectionTracker::default();
        let (long, short) = (BackendName::new_random(), BackendName::new_random());
        let _long_guard = tracker.open(&long);
        drop(tracker.open(&short));

        let mut first = tracker.take_report();
        first.sort();
        let mut expected = vec![long.clone(), short.clone()];
        expected.sort();
        assert_eq!(first, expected);

        assert_eq!(tracker.take_report(), vec![long.clone()]);
        assert_eq!(tracker.open_count(&long), 1);
        assert_eq!(tracker.open_count(&short), 0);
    }

    #[test]
    fn nothing_to_report_when_idle() {
        let tracker = ConnectionTracker::default();
        drop(tracker.open(&BackendName::new_random()));
        assert_eq!(tracker.take_report().len(), 1);
        assert!(tracker.take_report().is_empty());
    }

    #[test]
    fn removal_fires_existing_guards_only() {
        let tracker = ConnectionTracker::default();
        let backend = BackendName::new_random();
        let before = tracker.open(&backend);
        tracker.backend_removed(&backend);
        let after = tracker.open(&backend);
        assert!(before.removed().is_cancelled());
        assert!(!after.removed().is_cancelled());
        drop(before);
        assert_eq!(tracker.open_count(&backend), 1);
    }
}
