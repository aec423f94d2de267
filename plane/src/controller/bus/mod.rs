//! The change bus: the one seam through which what one part of the system writes reaches
//! the parts that must react (status streams, route waits, proxies' route eviction, drone
//! sessions with actions to send, token revocations), on this controller and on every other
//! one.
//!
//! Writes go to the database; the store then signals them in-process and, on PostgreSQL,
//! by `NOTIFY` inside the writing transaction (see [`super::store::Signal`]). The bus turns
//! signals into reads: status changes are read from the `backend_status` table in sequence
//! order, revocations from `token_revocation` likewise, actions from `backend_action`. A signal is only a hint: a catch-up pass every
//! [`CATCH_UP_INTERVAL`] (and whenever the PostgreSQL listener reconnects) reads whatever
//! was missed, so a lost notification delays delivery but never loses it.

mod listener;
mod sequence_reader;

use super::nodes::ConnectedNodes;
use super::store::{DatabaseKind, Signal, StatusChange, Store};
use plane_protocol::names::{ClusterName, NodeName};
use plane_protocol::proxy::MessageToProxy;
use sequence_reader::SequenceReader;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often the bus reads what it may have missed, whatever the signals say.
const CATCH_UP_INTERVAL: Duration = Duration::from_secs(1);

/// How many status changes before the newest at start-up are read again, so that changes
/// other controllers were committing meanwhile are not skipped (they reach nobody here
/// yet: no stream or proxy is connected to a controller that is just starting).
const STARTUP_LOOKBACK: i64 = 1000;

/// Which drones have actions waiting: one of them, or (after a catch-up) any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActionsWaiting {
    For(ClusterName, NodeName),
    Anyone,
}

impl ActionsWaiting {
    /// Whether a drone session of `cluster`/`drone` should look for actions.
    pub fn concerns(&self, cluster: &ClusterName, drone: &NodeName) -> bool {
        match self {
            ActionsWaiting::Anyone => true,
            ActionsWaiting::For(c, d) => c == cluster && d == drone,
        }
    }
}

/// Cheap to clone.
#[derive(Clone)]
pub struct ChangeBus {
    status: broadcast::Sender<Arc<StatusChange>>,
    actions: broadcast::Sender<ActionsWaiting>,
}

impl ChangeBus {
    /// Every status change of every backend, in sequence order. A receiver that lags
    /// should re-read what it cares about from the store.
    pub fn subscribe_status(&self) -> broadcast::Receiver<Arc<StatusChange>> {
        self.status.subscribe()
    }

    /// Wakes drone sessions that may have actions to send.
    pub fn subscribe_actions(&self) -> broadcast::Receiver<ActionsWaiting> {
        self.actions.subscribe()
    }

    /// The next status of `backend` that `changes` delivers, taken from the change itself,
    /// so a waiter that follows one backend needs no read per change.
    pub async fn next_status_of(
        changes: &mut broadcast::Receiver<Arc<StatusChange>>,
        backend: &plane_protocol::names::BackendName,
        deadline: tokio::time::Instant,
    ) -> NextStatus {
        loop {
            match tokio::time::timeout_at(deadline, changes.recv()).await {
                Err(_) => return NextStatus::TimedOut,
                Ok(Ok(change)) if &change.backend_id == backend => {
                    return NextStatus::Changed(change.entry.status)
                }
                Ok(Ok(_)) => continue,
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => return NextStatus::Missed,
                // The bus has stopped (the controller is shutting down): nothing more comes.
                Ok(Err(broadcast::error::RecvError::Closed)) => return NextStatus::TimedOut,
            }
        }
    }

    /// Waits until `changes` delivers a change of `backend` (or reports lag, after which
    /// the caller should re-read). Returns false if `deadline` passes first, or the bus
    /// has stopped.
    pub async fn wait_for_change_of(
        changes: &mut broadcast::Receiver<Arc<StatusChange>>,
        backend: &plane_protocol::names::BackendName,
        deadline: tokio::time::Instant,
    ) -> bool {
        Self::next_status_of(changes, backend, deadline).await != NextStatus::TimedOut
    }
}

/// What [`ChangeBus::next_status_of`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextStatus {
    /// The backend changed to this status.
    Changed(plane_protocol::backend::BackendStatus),
    /// The receiver lagged and changes were lost: read the backend again.
    Missed,
    /// The deadline passed first.
    TimedOut,
}

/// Starts the bus: it runs until `cancel` fires. Status changes that are already stored
/// when it starts are not replayed (streams read history themselves).
pub async fn start(
    store: Store,
    proxies: ConnectedNodes,
    cancel: CancellationToken,
) -> anyhow::Result<(ChangeBus, JoinHandle<()>)> {
    let (status, _) = broadcast::channel(4096);
    let (actions, _) = broadcast::channel(1024);
    let bus = ChangeBus { status, actions };
    let latest_status = store.latest_status_sequence().await?;
    let latest_revocation = store.latest_revocation_sequence().await?;
    let lookback = |latest: i64| latest.saturating_sub(STARTUP_LOOKBACK).max(0);
    let runner = Runner {
        bus: bus.clone(),
        store,
        proxies,
        statuses: SequenceReader::new(lookback(latest_status)),
        revocations: SequenceReader::new(lookback(latest_revocation)),
    };
    let task = tokio::spawn(runner.run(cancel));
    Ok((bus, task))
}

struct Runner {
    bus: ChangeBus,
    store: Store,
    proxies: ConnectedNodes,
    statuses: SequenceReader,
    revocations: SequenceReader,
}

/// What woke the bus.
enum Wake {
    Signal(Signal),
    /// Signals may have been missed: read everything.
    CatchUp,
}

impl Runner {
    async fn run(mut self, cancel: CancellationToken) {
        let mut local = self.store.signals();
        // On PostgreSQL, signals from every controller (ours included) arrive here too.
        let (remote_tx, mut remote) = mpsc::unbounded_channel();
        let listener = (self.store.kind() == DatabaseKind::Postgres).then(|| {
            tokio::spawn(listener::run(
                self.store.url().to_string(),
                remote_tx,
                cancel.child_token(),
            ))
        });
        let mut catch_up = tokio::time::interval(CATCH_UP_INTERVAL);
        catch_up.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = tokio::select! {
                _ = cancel.cancelled() => break,
                signal = local.recv() => match signal {
                    Ok(signal) => Wake::Signal(signal),
                    Err(broadcast::error::RecvError::Lagged(_)) => Wake::CatchUp,
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                Some(wake) = remote.recv() => wake,
                _ = catch_up.tick() => Wake::CatchUp,
            };
            // Take everything else already waiting, so a burst costs one read.
            let mut read_status = false;
            let mut read_revocations = false;
            let mut handle = |wake: Wake| match wake {
                Wake::Signal(Signal::Status) => read_status = true,
                Wake::Signal(Signal::Revocations) => read_revocations = true,
                Wake::Signal(Signal::Actions { cluster, drone }) => {
                    let _ = self.bus.actions.send(ActionsWaiting::For(cluster, drone));
                }
                Wake::CatchUp => {
                    read_status = true;
                    read_revocations = true;
                    let _ = self.bus.actions.send(ActionsWaiting::Anyone);
                }
            };
            handle(wake);
            loop {
                match local.try_recv() {
                    Ok(signal) => handle(Wake::Signal(signal)),
                    Err(broadcast::error::TryRecvError::Lagged(_)) => handle(Wake::CatchUp),
                    Err(_) => break,
                }
            }
            while let Ok(wake) = remote.try_recv() {
                handle(wake);
            }
            if read_status {
                self.publish_new_statuses().await;
            }
            if read_revocations {
                self.publish_new_revocations().await;
            }
        }
        if let Some(listener) = listener {
            listener.abort();
        }
    }

    async fn publish_new_statuses(&mut self) {
        let bus = self.bus.clone();
        let proxies = self.proxies.clone();
        let store = &self.store;
        let result = self
            .statuses
            .read_new(
                |after, limit| store.status_changes_after(after, limit),
                |change| change.sequence,
                |change| {
                    if change.entry.status.is_terminating() {
                        // The backend takes no more traffic: every proxy of its cluster on this
                        // controller drops its routes (other controllers do the same for theirs).
                        proxies.broadcast_to_proxies(
                            &change.cluster,
                            MessageToProxy::BackendRemoved {
                                backend_id: change.backend_id.clone(),
                            },
                        );
                    }
                    // No receivers is fine: nobody is watching.
                    let _ = bus.status.send(Arc::new(change));
                },
            )
            .await;
        if let Err(err) = result {
            tracing::warn!(error = %err, "reading status changes failed; retrying at the next catch-up");
        }
    }

    /// Every proxy of the revoked backend's cluster on this controller drops the user's
    /// tokens (other controllers do the same for theirs).
    async fn publish_new_revocations(&mut self) {
        let store = &self.store;
        let proxies = &self.proxies;
        let result = self
            .revocations
            .read_new(
                |after, limit| store.revocations_after(after, limit),
                |revocation| revocation.sequence,
                |revocation| {
                    proxies.broadcast_to_proxies(
                        &revocation.cluster,
                        MessageToProxy::TokensRevoked {
                            backend_id: revocation.backend_id,
                            user: revocation.user,
                            revoked_at: revocation.time,
                        },
                    );
                },
            )
            .await;
        if let Err(err) = result {
            tracing::warn!(error = %err, "reading revocations failed; retrying at the next catch-up");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plane_protocol::backend::{BackendStatus, BackendStatusStreamEntry};
    use plane_protocol::names::BackendName;
    use plane_protocol::time::Millis;

    fn change(backend: &BackendName, status: BackendStatus) -> Arc<StatusChange> {
        Arc::new(StatusChange {
            sequence: 1,
            backend_id: backend.clone(),
            cluster: "plane.test".parse().expect("cluster"),
            entry: BackendStatusStreamEntry {
                status,
                termination_reason: None,
                termination_kind: None,
                exit_error: None,
                exit_code: None,
                message: None,
                health: None,
                time: Millis(0),
            },
        })
    }

    #[tokio::test(start_paused = true)]
    async fn next_status_of_skips_other_backends_and_says_when_changes_were_missed() {
        let (ours, other) = (BackendName::new_random(), BackendName::new_random());
        let (sender, mut changes) = broadcast::channel(2);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);

        sender
            .send(change(&other, BackendStatus::Ready))
            .expect("send");
        sender
            .send(change(&ours, BackendStatus::Ready))
            .expect("send");
        assert_eq!(
            ChangeBus::next_status_of(&mut changes, &ours, deadline).await,
            NextStatus::Changed(BackendStatus::Ready)
        );

        // Three changes into a channel of two: the oldest is lost, and the waiter is told
        // to read the backend again rather than trust what it saw.
        for _ in 0..3 {
            sender
                .send(change(&other, BackendStatus::Waiting))
                .expect("send");
        }
        assert_eq!(
            ChangeBus::next_status_of(&mut changes, &ours, deadline).await,
            NextStatus::Missed
        );

        // Nothing more for ours: the deadline (paused time moves on to it).
        assert_eq!(
            ChangeBus::next_status_of(&mut changes, &ours, deadline).await,
            NextStatus::TimedOut
        );

        // A bus that has stopped delivers nothing more, so the waiter does not spin.
        drop(sender);
        let later = tokio::time::Instant::now() + Duration::from_secs(10);
        assert_eq!(
            ChangeBus::next_status_of(&mut changes, &ours, later).await,
            NextStatus::TimedOut
        );
    }
}
