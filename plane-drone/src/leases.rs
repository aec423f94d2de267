//! Key leases as this drone sees them: until when each backend may run, on the drone's own
//! monotonic clock, learned from the controller's answers to heartbeats.
//!
//! The controller renews a lease for `lease` from the moment it *receives* a heartbeat; the
//! drone counts the same `lease` from the moment it *sent* that heartbeat, which is earlier.
//! So the drone's idea of a lease's end is never later than the controller's, and no wall
//! clocks are compared. A backend whose lease the drone could not renew is stopped by
//! `fence_margin` before that end and killed by half the margin before it; the other half
//! covers the kill itself and any difference in clock rates.

use crate::fence::FencePublisher;
use plane_protocol::names::BackendName;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// How many recent heartbeats are remembered for matching their answers; an answer to an
/// older one is ignored (a newer answer will follow).
const REMEMBERED_HEARTBEATS: usize = 64;

/// Cheap to clone; shared by the controller connection (which renews) and the backends'
/// lifecycles (which obey).
#[derive(Clone)]
pub struct Leases {
    // A plain lock rather than an actor: every operation is a few map updates that never
    // await, and the lock is never held across an await.
    inner: Arc<Mutex<Inner>>,
    /// Asks the controller connection for a heartbeat now (a new backend needs its lease
    /// confirmed before its process may start).
    renew_now: Arc<Notify>,
    fence_margin: Duration,
    /// Where the kill-by moments go for the fence process, when there is one.
    fence: Option<FencePublisher>,
}

struct Inner {
    next_seq: u64,
    /// Recent heartbeats: their number and when they were sent.
    sent: VecDeque<(u64, Instant)>,
    /// The end of each tracked backend's lease (`None` until first confirmed).
    backends: HashMap<BackendName, watch::Sender<Option<Instant>>>,
    /// When the controller last answered a heartbeat.
    last_renewal: Option<Instant>,
    /// The drone has shut down cleanly and told its fence so; nothing is published after.
    fence_closed: bool,
}

impl Leases {
    pub fn new(fence_margin: Duration) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                next_seq: 1,
                sent: VecDeque::new(),
                backends: HashMap::new(),
                last_renewal: None,
                fence_closed: false,
            })),
            renew_now: Arc::new(Notify::new()),
            fence_margin,
            fence: None,
        }
    }

    /// Publishes every lease change to `fence` (see [`crate::fence`]).
    pub fn with_fence(mut self, fence: Option<FencePublisher>) -> Self {
        self.fence = fence;
        self
    }

    /// Tells the fence the drone stopped cleanly (no backends left to guard). Later lease
    /// changes (a last renewal on the way out) are no longer published, so they cannot
    /// undo this.
    pub fn close_fence(&self) {
        let mut inner = self.lock();
        inner.fence_closed = true;
        if let Some(fence) = &self.fence {
            if let Err(err) = fence.publish([], true) {
                tracing::warn!(error = %err, "could not tell the fence the drone stopped");
            }
        }
    }

    /// Publishes the current deadlines (none yet) so the fence has a file to watch from
    /// the start.
    pub fn open_fence(&self) {
        let inner = self.lock();
        self.publish_to_fence(&inner);
    }

    /// Writes every backend's kill-by moment (half the margin before its lease ends) for the
    /// fence. Called with the lock held, so publications never interleave; the file is
    /// small and local, so the short blocking write is acceptable here.
    fn publish_to_fence(&self, inner: &Inner) {
        let Some(fence) = &self.fence else { return };
        if inner.fence_closed {
            return;
        }
        let half_margin = self.fence_margin / 2;
        let kill_by = inner.backends.iter().filter_map(|(backend, end)| {
            let end = (*end.borrow())?;
            Some((backend, end.checked_sub(half_margin).unwrap_or(end)))
        });
        if let Err(err) = fence.publish(kill_by, false) {
            tracing::error!(error = %err, "could not publish lease deadlines to the fence");
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update is a single map or queue operation, so a poisoned lock still holds
        // consistent data.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts tracking a backend's lease (it has none yet) and asks for a renewal now.
    pub fn track(&self, backend: &BackendName) -> LeaseWatch {
        let (sender, receiver) = watch::channel(None);
        self.lock().backends.insert(backend.clone(), sender);
        self.renew_now.notify_one();
        LeaseWatch {
            end: receiver,
            fence_margin: self.fence_margin,
        }
    }

    /// Tracks a backend an earlier run of the drone left running, whose process had to be
    /// dead by `kill_by` (as that run published it): its lease ends half a margin after, on
    /// the same conservative reckoning, until a renewal moves it on. Asks for a renewal now.
    pub fn adopt(&self, backend: &BackendName, kill_by: Instant) -> LeaseWatch {
        let end = kill_by + self.fence_margin / 2;
        let (sender, receiver) = watch::channel(Some(end));
        let mut inner = self.lock();
        inner.backends.insert(backend.clone(), sender);
        self.publish_to_fence(&inner);
        drop(inner);
        self.renew_now.notify_one();
        LeaseWatch {
            end: receiver,
            fence_margin: self.fence_margin,
        }
    }

    /// Whether a lease that ends half a margin after `kill_by` leaves time to renew it
    /// before the backend would have to stop.
    pub fn adoptable(&self, kill_by: Instant) -> bool {
        kill_by + self.fence_margin / 2 > Instant::now() + self.fence_margin
    }

    pub fn untrack(&self, backend: &BackendName) {
        let mut inner = self.lock();
        inner.backends.remove(backend);
        self.publish_to_fence(&inner);
    }

    /// Records that a heartbeat is being sent now; returns its number.
    pub fn heartbeat_sent(&self) -> u64 {
        let mut inner = self.lock();
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.sent.push_back((seq, Instant::now()));
        while inner.sent.len() > REMEMBERED_HEARTBEATS {
            inner.sent.pop_front();
        }
        seq
    }

    /// Applies the controller's answer to heartbeat `seq`: each renewed backend's lease now
    /// ends `lease` after that heartbeat was sent (never earlier than it already did).
    pub fn renewed(&self, seq: u64, lease: Duration, renewed: &[BackendName]) {
        let mut inner = self.lock();
        inner.last_renewal = Some(Instant::now());
        let Some(&(_, sent_at)) = inner.sent.iter().find(|(s, _)| *s == seq) else {
            tracing::debug!(seq, "lease renewal for a forgotten heartbeat ignored");
            return;
        };
        let Some(end) = sent_at.checked_add(lease) else {
            tracing::warn!(?lease, "lease renewal too long to represent; ignored");
            return;
        };
        for backend in renewed {
            if let Some(sender) = inner.backends.get(backend) {
                sender.send_if_modified(|current| {
                    let later = current.is_none_or(|current| end > current);
                    if later {
                        *current = Some(end);
                    }
                    later
                });
            }
        }
        self.publish_to_fence(&inner);
    }

    /// Every backend whose lease is tracked.
    #[cfg(test)]
    pub fn tracked(&self) -> Vec<BackendName> {
        self.lock().backends.keys().cloned().collect()
    }

    /// When the controller last answered a heartbeat, if ever.
    pub fn last_renewal(&self) -> Option<Instant> {
        self.lock().last_renewal
    }

    /// Resolves when a renewal has been asked for since the last time this resolved.
    pub async fn renewal_requested(&self) {
        self.renew_now.notified().await
    }
}

/// One backend's view of its lease.
pub struct LeaseWatch {
    end: watch::Receiver<Option<Instant>>,
    fence_margin: Duration,
}

impl LeaseWatch {
    /// Resolves once the lease runs for at least twice the fencing margin more: only then
    /// may the backend's process start. One margin is the fence itself; the other is a
    /// budget for creating and starting the container, so that it is not still starting
    /// when the lease ends.
    pub async fn confirmed(&mut self) {
        let margin = self.fence_margin * 2;
        loop {
            let good = self
                .end
                .borrow_and_update()
                .is_some_and(|end| end > Instant::now() + margin);
            if good {
                return;
            }
            if self.end.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Resolves when the backend must start stopping: the fencing margin before its lease
    /// ends, unless a renewal arrives first.
    pub async fn lapsing(&mut self) {
        self.ends_within(self.fence_margin).await
    }

    /// Resolves when the backend's process must be killed: half the fencing margin before
    /// its lease ends, unless a renewal arrives first.
    pub async fn must_be_dead(&mut self) {
        self.ends_within(self.fence_margin / 2).await
    }

    async fn ends_within(&mut self, before: Duration) {
        loop {
            let end = *self.end.borrow_and_update();
            let Some(end) = end else {
                // No lease yet: nothing has been started on it, so nothing to stop.
                if self.end.changed().await.is_err() {
                    return std::future::pending().await;
                }
                continue;
            };
            let deadline = end.checked_sub(before).unwrap_or(end);
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                changed = self.end.changed() => {
                    if changed.is_err() {
                        // Untracked: the lease can no longer be renewed, so the last end stands.
                        tokio::time::sleep_until(deadline).await;
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    fn backend() -> BackendName {
        BackendName::new_random()
    }

    /// Whether `future` is still pending after `elapsed` more (paused) time.
    async fn still_pending_after<F: Future>(
        future: &mut std::pin::Pin<&mut F>,
        elapsed: Duration,
    ) -> bool {
        tokio::select! {
            biased;
            _ = future.as_mut() => false,
            _ = tokio::time::sleep(elapsed) => true,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_counts_from_when_the_heartbeat_was_sent_not_when_the_answer_came() {
        let leases = Leases::new(Duration::from_secs(4));
        let id = backend();
        let mut watch = leases.track(&id);
        let seq = leases.heartbeat_sent();
        // The answer takes 3 s to arrive.
        tokio::time::sleep(Duration::from_secs(3)).await;
        leases.renewed(seq, Duration::from_secs(12), std::slice::from_ref(&id));
        tokio::time::timeout(Duration::from_secs(1), watch.confirmed())
            .await
            .expect("confirmed: 9 s left, more than twice the margin");

        let start = Instant::now();
        let lapsing = watch.lapsing();
        tokio::pin!(lapsing);
        // Sent at t=0, lease 12 s, margin 4 s: stop at t=8, which is 5 s after the answer.
        assert!(still_pending_after(&mut lapsing, Duration::from_millis(4_999)).await);
        assert!(!still_pending_after(&mut lapsing, Duration::from_millis(2)).await);
        assert!(start.elapsed() >= Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_push_the_stop_back_and_the_kill_comes_half_a_margin_before_the_end() {
        let leases = Leases::new(Duration::from_secs(2));
        let id = backend();
        let mut watch = leases.track(&id);
        let seq = leases.heartbeat_sent();
        leases.renewed(seq, Duration::from_secs(6), std::slice::from_ref(&id));

        // Renewed again at t=3: the lease now ends at t=9.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let seq = leases.heartbeat_sent();
        leases.renewed(seq, Duration::from_secs(6), std::slice::from_ref(&id));
        {
            let lapsing = watch.lapsing();
            tokio::pin!(lapsing);
            assert!(still_pending_after(&mut lapsing, Duration::from_millis(3_999)).await); // t≈7
            assert!(!still_pending_after(&mut lapsing, Duration::from_millis(2)).await);
        }
        let dead = watch.must_be_dead();
        tokio::pin!(dead);
        assert!(still_pending_after(&mut dead, Duration::from_millis(990)).await); // t≈8
        assert!(!still_pending_after(&mut dead, Duration::from_millis(20)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_answer_never_shortens_a_lease_and_unknown_heartbeats_are_ignored() {
        let leases = Leases::new(Duration::from_secs(1));
        let id = backend();
        let mut watch = leases.track(&id);
        let old = leases.heartbeat_sent();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let new = leases.heartbeat_sent();
        leases.renewed(new, Duration::from_secs(5), std::slice::from_ref(&id));
        leases.renewed(old, Duration::from_secs(5), std::slice::from_ref(&id));
        leases.renewed(9_999, Duration::from_secs(500), std::slice::from_ref(&id));
        let lapsing = watch.lapsing();
        tokio::pin!(lapsing);
        // Ends at t=7 (new heartbeat at t=2 + 5 s); stop at t=6, i.e. 4 s from now.
        assert!(still_pending_after(&mut lapsing, Duration::from_millis(3_990)).await);
        assert!(!still_pending_after(&mut lapsing, Duration::from_millis(20)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_is_not_confirmed_until_its_lease_outlasts_twice_the_margin() {
        let leases = Leases::new(Duration::from_secs(3));
        let id = backend();
        let mut watch = leases.track(&id);
        let seq = leases.heartbeat_sent();
        // A lease shorter than the margin and a start budget is no permission to start.
        leases.renewed(seq, Duration::from_secs(6), std::slice::from_ref(&id));
        let confirmed = watch.confirmed();
        tokio::pin!(confirmed);
        assert!(still_pending_after(&mut confirmed, Duration::from_secs(1)).await);
        let seq = leases.heartbeat_sent();
        leases.renewed(seq, Duration::from_secs(10), std::slice::from_ref(&id));
        assert!(!still_pending_after(&mut confirmed, Duration::from_millis(1)).await);
    }
}
