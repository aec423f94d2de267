//! Which backends have open connections (in-flight requests, streaming responses, WebSockets)
//! or had traffic lately: the source of the reports that stop the controller from reaping a
//! backend someone is using. A backend gaining its first open connection or losing its last
//! is reported as it happens; the periodic keep-alive refreshes the rest.

use plane_protocol::names::BackendName;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Says that a backend is going away. Every request to the backend checks it, so checking
/// is an atomic load (a `CancellationToken` takes a lock); tunnels await [`Removal::wait`].
#[derive(Debug, Default)]
pub struct Removal {
    removed: AtomicBool,
    wake: CancellationToken,
}

impl Removal {
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Resolves once the backend is removed.
    pub async fn wait(&self) {
        self.wake.cancelled().await
    }

    fn fire(&self) {
        self.removed.store(true, Ordering::Release);
        self.wake.cancel();
    }
}

/// Cheap to clone; every clone sees the same counts.
#[derive(Clone, Debug, Default)]
pub struct ConnectionTracker {
    // A plain lock rather than an actor: every operation is a few map updates, done from
    // `Drop` (which cannot await), and the lock is never held across an await.
    state: Arc<Mutex<TrackerState>>,
    /// Woken when a backend gains its first open connection or loses its last.
    changed: Arc<Notify>,
}

#[derive(Debug, Default)]
struct TrackerState {
    open: HashMap<BackendName, BackendConnections>,
    /// Backends whose last connection closed since the last report (those still open are
    /// named in every report anyway).
    touched: BTreeSet<BackendName>,
    /// Backends whose "has an open connection" state flipped since the changes were last
    /// taken.
    flipped: BTreeSet<BackendName>,
}

#[derive(Debug)]
struct BackendConnections {
    count: usize,
    /// Fired when the backend is removed, so tunnels to it end at once.
    removed: Arc<Removal>,
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
        // The hot path (a backend that already has connections open) clones no name: an
        // open backend is in every report anyway, so it need not be marked touched.
        if let Some(entry) = state.open.get_mut(backend) {
            entry.count += 1;
            return ConnectionGuard {
                tracker: self.clone(),
                backend: backend.clone(),
                removed: Arc::clone(&entry.removed),
            };
        }
        let removed = Arc::new(Removal::default());
        state.open.insert(
            backend.clone(),
            BackendConnections {
                count: 1,
                removed: Arc::clone(&removed),
            },
        );
        state.flipped.insert(backend.clone());
        self.changed.notify_one();
        ConnectionGuard {
            tracker: self.clone(),
            backend: backend.clone(),
            removed,
        }
    }

    /// Resolves when some backend gained its first open connection or lost its last since
    /// [`Self::take_changes`] was last called.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// The backends whose open/closed state flipped since the last call, as (now open, now
    /// closed). A backend that flipped and flipped back is listed by its current state.
    pub fn take_changes(&self) -> (Vec<BackendName>, Vec<BackendName>) {
        let mut state = self.lock();
        let flipped = std::mem::take(&mut state.flipped);
        flipped
            .into_iter()
            .partition(|backend| state.open.contains_key(backend))
    }

    /// Puts changes that could not be sent back, so they are sent on the next connection.
    pub fn restore_changes(&self, backends: impl IntoIterator<Item = BackendName>) {
        self.lock().flipped.extend(backends);
    }

    /// Every backend with an open connection now.
    pub fn open_backends(&self) -> Vec<BackendName> {
        self.lock().open.keys().cloned().collect()
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
            entry.removed.fire();
            // Later connections (a racing request) get a fresh token; they are refused
            // upstream anyway, but must not start out cancelled by accident.
            entry.removed = Arc::new(Removal::default());
        }
    }

    fn close(&self, backend: &BackendName) {
        let mut state = self.lock();
        let Some(entry) = state.open.get_mut(backend) else {
            return;
        };
        entry.count = entry.count.saturating_sub(1);
        if entry.count == 0 {
            state.open.remove(backend);
            state.flipped.insert(backend.clone());
            // A connection that opened and closed within one period still counts as
            // traffic in the next report.
            state.touched.insert(backend.clone());
            self.changed.notify_one();
        }
    }
}

/// One open connection to a backend; dropping it closes it in the tracker's eyes.
#[derive(Debug)]
pub struct ConnectionGuard {
    tracker: ConnectionTracker,
    backend: BackendName,
    removed: Arc<Removal>,
}

impl ConnectionGuard {
    pub fn backend(&self) -> &BackendName {
        &self.backend
    }

    /// Fires when the controller says this connection's backend is going away.
    pub fn removed(&self) -> Arc<Removal> {
        Arc::clone(&self.removed)
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
    fn first_open_and_last_close_are_changes_and_the_current_state_wins() {
        let tracker = ConnectionTracker::default();
        let (a, b) = (BackendName::new_random(), BackendName::new_random());
        let first = tracker.open(&a);
        let second = tracker.open(&a);
        let _b_guard = tracker.open(&b);
        let (opened, closed) = tracker.take_changes();
        assert_eq!((opened.len(), closed.len()), (2, 0));

        drop(first); // still one open: no change
        assert_eq!(tracker.take_changes(), (vec![], vec![]));
        drop(second);
        assert_eq!(tracker.take_changes(), (vec![], vec![a.clone()]));

        // Closed and reopened before anyone looked: reported as open.
        drop(tracker.open(&a));
        let _again = tracker.open(&a);
        assert_eq!(tracker.take_changes(), (vec![a.clone()], vec![]));
        tracker.restore_changes([a.clone()]);
        assert_eq!(tracker.take_changes(), (vec![a], vec![]));
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
        assert!(before.removed().is_removed());
        assert!(!after.removed().is_removed());
        drop(before);
        assert_eq!(tracker.open_count(&backend), 1);
    }
}
