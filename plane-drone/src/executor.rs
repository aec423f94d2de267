//! The executor: an actor that owns every backend on this drone and runs each one's
//! lifecycle in its own task.
//!
//! [`ExecutorHandle`] is the cheap-to-clone front; the runner owns the state (which backends
//! run, which have finished) so spawn, terminate and shutdown never race each other.

use crate::event_queue::EventQueue;
use crate::leases::Leases;
use crate::lifecycle::{
    adopt_backend, remove_until_gone, run_backend, stop_for_good, BackendContext, BackendRequest,
    LifecycleSettings, TerminateRequest,
};
use crate::runtime::Runtime;
use anyhow::Context;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use plane_protocol::api::{BackendLogLine, ExecutorConfig, PullPolicy, RegistryCredentials};
use plane_protocol::backend::{
    BackendStateUpdate, BackendStatus, TerminationKind, TerminationReason,
};
use plane_protocol::drone::{ClaimAction, SpawnAction};
use plane_protocol::names::BackendName;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How many finished backends the executor remembers, so that a re-sent spawn for one of
/// them is recognised as a duplicate instead of starting it again.
const FINISHED_MEMORY: usize = 100_000;

/// The longest pause between two sweeps for stopped containers past their log retention.
const RETENTION_SWEEP_MAX_INTERVAL: Duration = Duration::from_secs(60);

/// A backend's log lines as the runtime reads them.
pub type LogLines = BoxStream<'static, Result<BackendLogLine, crate::runtime::RuntimeError>>;

/// Why a backend's logs cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum LogsUnavailable {
    /// No container of it here: never here, or removed after its log retention.
    #[error("no logs of this backend are kept here")]
    NotKept,
    #[error("{0}")]
    Failed(String),
}

/// Why the executor refused a request.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("the drone is shutting down")]
    ShuttingDown,
}

enum Command {
    Spawn {
        backend_id: BackendName,
        spawn: Box<SpawnAction>,
        reply: oneshot::Sender<Result<(), ExecutorError>>,
    },
    Terminate {
        backend_id: BackendName,
        request: TerminateRequest,
        reply: oneshot::Sender<Result<(), ExecutorError>>,
    },
    Claim {
        backend_id: BackendName,
        claim: ClaimAction,
        reply: oneshot::Sender<Result<(), ExecutorError>>,
    },
    Running {
        reply: oneshot::Sender<Vec<BackendName>>,
    },
    /// Pull an image now (its result comes back once the pull ends; other commands do
    /// not wait for it).
    Prepull {
        executable: Box<ExecutorConfig>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Logs {
        backend_id: BackendName,
        follow: bool,
        tail: Option<u64>,
        reply: oneshot::Sender<BoxFuture<'static, Result<LogLines, LogsUnavailable>>>,
    },
    /// Remove every stopped container of this drone now, kept logs or not.
    RemoveStopped {
        reply: oneshot::Sender<()>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Sends requests to the executor's runner.
#[derive(Clone)]
pub struct ExecutorHandle {
    commands: mpsc::Sender<Command>,
}

impl ExecutorHandle {
    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, ExecutorError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| ExecutorError::ShuttingDown)?;
        answer.await.map_err(|_| ExecutorError::ShuttingDown)
    }

    /// Takes on a backend. Returns once the backend is accepted (not once it runs); a
    /// backend the executor already knows is accepted again without starting it twice.
    pub async fn spawn(
        &self,
        backend_id: BackendName,
        spawn: SpawnAction,
    ) -> Result<(), ExecutorError> {
        self.request(|reply| Command::Spawn {
            backend_id,
            spawn: Box::new(spawn),
            reply,
        })
        .await?
    }

    /// Hands a claim to a warm backend. One not running here is reported `terminated` at
    /// once (the connect that claimed it then starts a backend of its own).
    pub async fn claim(
        &self,
        backend_id: BackendName,
        claim: ClaimAction,
    ) -> Result<(), ExecutorError> {
        self.request(|reply| Command::Claim {
            backend_id,
            claim,
            reply,
        })
        .await?
    }

    /// Asks a backend to stop. An unknown backend is reported `terminated` at once.
    pub async fn terminate(
        &self,
        backend_id: BackendName,
        kind: TerminationKind,
        reason: TerminationReason,
    ) -> Result<(), ExecutorError> {
        self.request(|reply| Command::Terminate {
            backend_id,
            request: TerminateRequest { kind, reason },
            reply,
        })
        .await?
    }

    /// The backends not yet terminated.
    pub async fn running(&self) -> Result<Vec<BackendName>, ExecutorError> {
        self.request(|reply| Command::Running { reply }).await
    }

    /// Pulls `image` (always, even if present: preseeding wants the latest), with
    /// `credentials` for a private registry. The error says why it failed.
    pub async fn prepull(
        &self,
        image: String,
        credentials: Option<RegistryCredentials>,
    ) -> Result<(), String> {
        let executable = ExecutorConfig {
            pull_policy: Some(PullPolicy::Always),
            credentials,
            ..ExecutorConfig::of_image(image)
        };
        let (reply, answer) = oneshot::channel();
        let command = Command::Prepull {
            executable: Box::new(executable),
            reply,
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| "the drone is shutting down".to_string())?;
        answer
            .await
            .map_err(|_| "the drone is shutting down".to_string())?
    }

    /// A backend's logs (see [`crate::runtime::Runtime::logs`]): those of a running backend,
    /// or of a stopped one whose container is still kept. Resolves once the container is
    /// known to be there, before any line is read.
    pub async fn logs(
        &self,
        backend_id: BackendName,
        follow: bool,
        tail: Option<u64>,
    ) -> Result<LogLines, LogsUnavailable> {
        let found = self
            .request(|reply| Command::Logs {
                backend_id,
                follow,
                tail,
                reply,
            })
            .await
            .map_err(|err| LogsUnavailable::Failed(err.to_string()))?;
        found.await
    }

    /// Removes every container of a backend whose task has finished, kept for its logs:
    /// for a drone leaving for good.
    pub async fn remove_stopped(&self) {
        let _ = self.request(|reply| Command::RemoveStopped { reply }).await;
    }

    /// Refuses new spawns, soft-terminates every backend (reason `lost`) and resolves once
    /// all of them have reported `terminated`.
    pub async fn shutdown(&self) {
        // An error means the runner is already gone, which is what we want anyway.
        let _ = self.request(|reply| Command::Shutdown { reply }).await;
    }
}

/// Starts the executor: first removes containers an earlier run of this drone left behind
/// (reporting each as `terminated{lost}`), then runs until `cancel` fires. Cancelling
/// aborts every backend task; call [`ExecutorHandle::shutdown`] first for a graceful stop.
pub(crate) async fn start<R: Runtime>(
    runtime: R,
    events: EventQueue,
    leases: Leases,
    settings: LifecycleSettings,
    previous: BTreeMap<BackendName, Instant>,
    cancel: CancellationToken,
) -> anyhow::Result<(ExecutorHandle, JoinHandle<()>)> {
    let http = reqwest::Client::builder()
        .no_proxy()
        // Any answer means the backend is serving, a redirect included; following it could
        // lead anywhere.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("building the HTTP client for readiness probes")?;
    let mut finished = RecentSet::new(FINISHED_MEMORY);
    let keep_logs = !settings.log_retention.is_zero();
    let (removed, adoptable) = reconcile(&runtime, &events, &leases, &previous, keep_logs).await?;
    for backend_id in removed {
        finished.insert(backend_id);
    }
    let (commands, receiver) = mpsc::channel(64);
    let mut runner = Runner {
        ctx: Arc::new(BackendContext {
            runtime,
            events,
            settings,
            http,
        }),
        leases,
        running: HashMap::new(),
        task_backends: HashMap::new(),
        finished,
        tasks: JoinSet::new(),
        shutdown_waiters: None,
    };
    for (backend_id, address, kill_by) in adoptable {
        runner.adopt(backend_id, address, kill_by);
    }
    let task = tokio::spawn(runner.run(receiver, cancel));
    Ok((ExecutorHandle { commands }, task))
}

/// Sorts the containers an earlier run of this drone left: one still running under a
/// lease that run published (and that leaves time to renew it) is re-adopted; one that had
/// exited after that run reported it (it held no lease any more) is only kept for its logs;
/// every other is stopped for good and reported `terminated{lost}`. Returns the backends
/// not adopted, and the ones to adopt with their addresses and kill-by moments.
async fn reconcile<R: Runtime>(
    runtime: &R,
    events: &EventQueue,
    leases: &Leases,
    previous: &BTreeMap<BackendName, Instant>,
    keep_logs: bool,
) -> anyhow::Result<(Vec<BackendName>, Vec<(BackendName, SocketAddr, Instant)>)> {
    let found = runtime
        .list_backends()
        .await
        .context("listing containers left by an earlier run of this drone")?;
    let exited: HashSet<BackendName> = runtime
        .exited_backends()
        .await
        .context("listing exited containers left by an earlier run of this drone")?
        .into_iter()
        .map(|(backend_id, _)| backend_id)
        .collect();
    let mut orphans = Vec::new();
    let mut reported = Vec::new();
    let mut adoptable = Vec::new();
    for backend_id in found {
        if exited.contains(&backend_id) && !previous.contains_key(&backend_id) && keep_logs {
            reported.push(backend_id);
            continue;
        }
        let kill_by = previous
            .get(&backend_id)
            .copied()
            .filter(|kill_by| leases.adoptable(*kill_by));
        let address = match kill_by {
            Some(_) => runtime.running_address(&backend_id).await.unwrap_or_else(|err| {
                tracing::warn!(backend = %backend_id, error = %err, "could not inspect a container left by an earlier run");
                None
            }),
            None => None,
        };
        match (kill_by, address) {
            (Some(kill_by), Some(address)) => adoptable.push((backend_id, address, kill_by)),
            _ => orphans.push(backend_id),
        }
    }
    for backend_id in &orphans {
        tracing::warn!(backend = %backend_id, "stopping a container left by an earlier run");
        // Reported only once its process is gone: the report frees the backend's key at once.
        stop_for_good(runtime, backend_id, keep_logs).await;
        let message = "drone restarted; backend stopped".to_string();
        events
            .push(
                backend_id.clone(),
                BackendStateUpdate {
                    termination_kind: Some(TerminationKind::Hard),
                    termination_reason: Some(TerminationReason::Lost),
                    message: Some(message),
                    ..BackendStateUpdate::status(BackendStatus::Terminated)
                },
            )
            .await;
    }
    orphans.extend(reported);
    Ok((orphans, adoptable))
}

/// Removes the stopped containers of this drone that exited longer than `retention` ago,
/// except those of backends whose task still runs (`busy`). Failures are left for the next
/// sweep.
async fn sweep_retained<R: Runtime>(runtime: R, retention: Duration, busy: HashSet<BackendName>) {
    let exited = match runtime.exited_backends().await {
        Ok(exited) => exited,
        Err(err) => {
            tracing::warn!(error = %err, "could not list stopped containers for the log retention sweep");
            return;
        }
    };
    let now = SystemTime::now();
    for (backend_id, exited_at) in exited {
        let age = now.duration_since(exited_at).unwrap_or(Duration::ZERO);
        if age < retention || busy.contains(&backend_id) {
            continue;
        }
        match runtime.remove(&backend_id).await {
            Ok(()) => {
                tracing::debug!(backend = %backend_id, "log retention over; container removed")
            }
            Err(err) => {
                tracing::warn!(backend = %backend_id, error = %err, "could not remove a container past its log retention")
            }
        }
    }
}

/// Removes every container of this drone but those of backends whose task still runs
/// (`busy`), whatever state the engine gives it: Docker reports an exit (its `die` event,
/// which ends a task) before it records the container as exited, so a container whose
/// backend has just finished can still be listed as running. Failures are logged.
async fn remove_finished<R: Runtime>(runtime: R, busy: HashSet<BackendName>) {
    let ours = match runtime.list_backends().await {
        Ok(ours) => ours,
        Err(err) => {
            tracing::warn!(error = %err, "could not list containers to remove");
            return;
        }
    };
    for backend_id in ours.into_iter().filter(|id| !busy.contains(id)) {
        if let Err(err) = runtime.remove(&backend_id).await {
            tracing::warn!(backend = %backend_id, error = %err, "could not remove a finished backend's container");
        }
    }
}

/// The pause between retention sweeps: often enough that a container outlives its
/// retention by at most half of it (and at most a minute).
fn retention_sweep_interval(retention: Duration) -> Duration {
    (retention / 2).clamp(Duration::from_millis(100), RETENTION_SWEEP_MAX_INTERVAL)
}

struct Runner<R> {
    ctx: Arc<BackendContext<R>>,
    leases: Leases,
    /// Backends whose task runs, with the channel to ask them to stop.
    running: HashMap<BackendName, mpsc::UnboundedSender<BackendRequest>>,
    /// Which backend each task runs, to clean up after a task that panicked.
    task_backends: HashMap<tokio::task::Id, BackendName>,
    finished: RecentSet,
    tasks: JoinSet<()>,
    /// Set once shutdown began: who to tell when the last backend has finished.
    shutdown_waiters: Option<Vec<oneshot::Sender<()>>>,
}

impl<R: Runtime> Runner<R> {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, cancel: CancellationToken) {
        let retention = self.ctx.settings.log_retention;
        let mut sweep = tokio::time::interval(retention_sweep_interval(retention));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One sweep at a time; a slow engine must not pile them up.
        let mut sweeping: Option<JoinHandle<()>> = None;
        loop {
            tokio::select! {
                _ = sweep.tick(), if !retention.is_zero() => {
                    if sweeping.as_ref().is_none_or(|task| task.is_finished()) {
                        let busy = self.running.keys().cloned().collect();
                        sweeping = Some(tokio::spawn(sweep_retained(self.ctx.runtime.clone(), retention, busy)));
                    }
                }
                _ = cancel.cancelled() => break,
                // Handling may await an event's commit to the state file (an fsync, a few
                // milliseconds); later commands wait meanwhile, which keeps them ordered.
                command = commands.recv() => match command {
                    Some(command) => self.handle(command).await,
                    None => break,
                },
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.task_done(done).await;
                }
            }
        }
        // Dropping the JoinSet aborts whatever still runs.
        if !self.tasks.is_empty() {
            tracing::warn!(
                backends = self.tasks.len(),
                "executor stopped with backends still running"
            );
        }
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Spawn {
                backend_id,
                spawn,
                reply,
            } => {
                let _ = reply.send(self.spawn(backend_id, *spawn));
            }
            Command::Terminate {
                backend_id,
                request,
                reply,
            } => {
                self.terminate(backend_id, request).await;
                let _ = reply.send(Ok(()));
            }
            Command::Claim {
                backend_id,
                claim,
                reply,
            } => {
                self.claim(backend_id, claim).await;
                let _ = reply.send(Ok(()));
            }
            Command::Running { reply } => {
                let _ = reply.send(self.running.keys().cloned().collect());
            }
            Command::Prepull { executable, reply } => {
                let runtime = self.ctx.runtime.clone();
                tokio::spawn(async move {
                    let result = runtime.prepare_image(&executable).await;
                    match &result {
                        Ok(()) => tracing::info!(image = %executable.image, "image pulled"),
                        Err(err) => {
                            tracing::warn!(image = %executable.image, error = %err, "prepull failed")
                        }
                    }
                    let _ = reply.send(result.map_err(|err| err.to_string()));
                });
            }
            Command::Logs {
                backend_id,
                follow,
                tail,
                reply,
            } => {
                // Looked up in the caller's task: the engine's answer must not hold up
                // other commands.
                let runtime = self.ctx.runtime.clone();
                let _ = reply.send(Box::pin(async move {
                    match runtime.has_container(&backend_id).await {
                        Ok(true) => Ok(runtime.logs(&backend_id, follow, tail)),
                        Ok(false) => Err(LogsUnavailable::NotKept),
                        Err(err) => Err(LogsUnavailable::Failed(err.to_string())),
                    }
                }));
            }
            Command::RemoveStopped { reply } => {
                let busy = self.running.keys().cloned().collect();
                let runtime = self.ctx.runtime.clone();
                tokio::spawn(async move {
                    remove_finished(runtime, busy).await;
                    let _ = reply.send(());
                });
            }
            Command::Shutdown { reply } => self.shutdown(reply),
        }
    }

    /// Runs a backend an earlier run of the drone left running, from where it was.
    fn adopt(&mut self, backend_id: BackendName, address: SocketAddr, kill_by: Instant) {
        tracing::info!(backend = %backend_id, %address, "re-adopting a backend left running by an earlier run");
        let (requests, receiver) = mpsc::unbounded_channel();
        let lease = self.leases.adopt(&backend_id, kill_by);
        let lifecycle = adopt_backend(
            self.ctx.clone(),
            backend_id.clone(),
            address,
            receiver,
            lease,
        );
        let task = self
            .tasks
            .spawn(lifecycle.instrument(backend_span(&backend_id)));
        self.task_backends.insert(task.id(), backend_id.clone());
        self.running.insert(backend_id, requests);
    }

    fn spawn(&mut self, backend_id: BackendName, spawn: SpawnAction) -> Result<(), ExecutorError> {
        if self.running.contains_key(&backend_id) || self.finished.contains(&backend_id) {
            tracing::debug!(backend = %backend_id, "duplicate spawn; already known");
            return Ok(());
        }
        if self.shutdown_waiters.is_some() {
            return Err(ExecutorError::ShuttingDown);
        }
        tracing::info!(backend = %backend_id, image = %spawn.executable.image, "spawning backend");
        let (requests, receiver) = mpsc::unbounded_channel();
        let lease = self.leases.track(&backend_id);
        let lifecycle = run_backend(self.ctx.clone(), backend_id.clone(), spawn, receiver, lease);
        let task = self
            .tasks
            .spawn(lifecycle.instrument(backend_span(&backend_id)));
        self.task_backends.insert(task.id(), backend_id.clone());
        self.running.insert(backend_id, requests);
        Ok(())
    }

    async fn claim(&mut self, backend_id: BackendName, claim: ClaimAction) {
        if let Some(requests) = self.running.get(&backend_id) {
            let _ = requests.send(BackendRequest::Claim(claim));
            return;
        }
        // Gone, or never here: the same as a terminate for it.
        let request = TerminateRequest {
            kind: TerminationKind::Hard,
            reason: TerminationReason::Lost,
        };
        self.terminate(backend_id, request).await;
    }

    async fn terminate(&mut self, backend_id: BackendName, request: TerminateRequest) {
        if let Some(requests) = self.running.get(&backend_id) {
            // The task holds the receiver until it has reported `terminated`; a send that
            // fails means it is finishing on its own.
            let _ = requests.send(BackendRequest::Terminate(request));
        } else if self.finished.contains(&backend_id) {
            tracing::debug!(backend = %backend_id, "terminate for a finished backend; nothing to do");
        } else {
            // Unknown here (e.g. the drone restarted): say so at once, so the controller does
            // not wait for a backend that will never report.
            tracing::info!(backend = %backend_id, "terminate for an unknown backend; reporting it terminated");
            self.ctx
                .events
                .push(
                    backend_id.clone(),
                    BackendStateUpdate {
                        termination_kind: Some(request.kind),
                        termination_reason: Some(request.reason),
                        message: Some("not running on this drone".into()),
                        ..BackendStateUpdate::status(BackendStatus::Terminated)
                    },
                )
                .await;
            self.finished.insert(backend_id);
        }
    }

    fn shutdown(&mut self, reply: oneshot::Sender<()>) {
        if self.shutdown_waiters.is_none() {
            tracing::info!(
                backends = self.running.len(),
                "terminating every backend for shutdown"
            );
            for requests in self.running.values() {
                let _ = requests.send(BackendRequest::Terminate(TerminateRequest {
                    kind: TerminationKind::Soft,
                    reason: TerminationReason::Lost,
                }));
            }
        }
        self.shutdown_waiters
            .get_or_insert_with(Vec::new)
            .push(reply);
        self.notify_if_drained();
    }

    async fn task_done(&mut self, done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let (id, panicked) = match done {
            Ok((id, ())) => (id, None),
            Err(err) => (err.id(), Some(err)),
        };
        let Some(backend_id) = self.task_backends.remove(&id) else {
            return;
        };
        if let Some(err) = panicked {
            tracing::error!(backend = %backend_id, error = %err, "backend task failed");
            // Its container may still run. A clean-up task takes the backend's place: it
            // removes the container (retrying until the engine confirms) and only then
            // reports it terminated. Meanwhile the backend stays listed, so its lease and key
            // stay held.
            let ctx = self.ctx.clone();
            let orphan = backend_id.clone();
            let cleanup = self.tasks.spawn(async move {
                remove_until_gone(&ctx.runtime, &orphan).await;
                let update = BackendStateUpdate {
                    termination_reason: Some(TerminationReason::InternalError),
                    message: Some("the drone lost track of this backend".into()),
                    ..BackendStateUpdate::status(BackendStatus::Terminated)
                };
                ctx.events.push(orphan, update).await;
            });
            self.task_backends.insert(cleanup.id(), backend_id);
            return;
        }
        self.running.remove(&backend_id);
        self.leases.untrack(&backend_id);
        self.finished.insert(backend_id);
        self.notify_if_drained();
    }

    fn notify_if_drained(&mut self) {
        if self.running.is_empty() && self.task_backends.is_empty() {
            if let Some(waiters) = self.shutdown_waiters.as_mut() {
                for waiter in waiters.drain(..) {
                    let _ = waiter.send(());
                }
            }
        }
    }
}

/// The span a backend's lifecycle runs in, so every line it logs carries `backend_id`.
fn backend_span(backend_id: &BackendName) -> tracing::Span {
    tracing::info_span!("backend", backend_id = %backend_id)
}

/// A set that forgets its oldest entries beyond a fixed size.
struct RecentSet {
    members: HashSet<BackendName>,
    order: VecDeque<BackendName>,
    capacity: usize,
}

impl RecentSet {
    fn new(capacity: usize) -> Self {
        Self {
            members: HashSet::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    fn insert(&mut self, backend_id: BackendName) {
        if self.members.insert(backend_id.clone()) {
            self.order.push_back(backend_id);
            while self.order.len() > self.capacity {
                if let Some(oldest) = self.order.pop_front() {
                    self.members.remove(&oldest);
                }
            }
        }
    }

    fn contains(&self, backend_id: &BackendName) -> bool {
        self.members.contains(backend_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_queue::test_support::TempStateDir;
    use crate::runtime::fake::{FakeContainer, FakeRuntime};
    use futures_util::StreamExt;
    use plane_protocol::api::ExecutorConfig;

    struct Harness {
        /// Kept for the queue's lifetime; removed on drop.
        _state_dir: TempStateDir,
        runtime: FakeRuntime,
        events: EventQueue,
        executor: ExecutorHandle,
        cancel: CancellationToken,
    }

    async fn harness(orphans: &[&BackendName]) -> Harness {
        harness_after_restart(orphans, &[], BTreeMap::new(), Duration::ZERO).await
    }

    /// As if an earlier run left containers for `orphans` (running) and `exited`, and had
    /// published `previous` leases; stopped containers are kept for `log_retention`.
    async fn harness_after_restart(
        orphans: &[&BackendName],
        exited: &[&BackendName],
        previous: BTreeMap<BackendName, Instant>,
        log_retention: Duration,
    ) -> Harness {
        let runtime = FakeRuntime::new().await;
        for orphan in orphans.iter().chain(exited) {
            runtime.add_orphan((*orphan).clone());
        }
        for gone in exited {
            runtime.exit(gone, 0);
        }
        let state_dir = TempStateDir::new();
        let events = EventQueue::open(state_dir.path())
            .await
            .expect("event queue opens");
        let cancel = CancellationToken::new();
        let settings = LifecycleSettings {
            stop_grace_period: Duration::from_millis(300),
            startup_timeout: Duration::from_millis(1500),
            health: Default::default(),
            mount_base: None,
            log_retention,
        };
        // Stands in for the controller's side of the lease protocol: every renewal asked
        // for is granted for an hour.
        let leases = Leases::new(Duration::from_millis(100));
        let granting = leases.clone();
        let grant_cancel = cancel.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = grant_cancel.cancelled() => return,
                    _ = granting.renewal_requested() => {}
                }
                let seq = granting.heartbeat_sent();
                granting.renewed(seq, Duration::from_secs(3600), &granting.tracked());
            }
        });
        let (executor, _task) = start(
            runtime.clone(),
            events.clone(),
            leases,
            settings,
            previous,
            cancel.clone(),
        )
        .await
        .expect("executor starts");
        Harness {
            _state_dir: state_dir,
            runtime,
            events,
            executor,
            cancel,
        }
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            self.cancel.cancel();
        }
    }

    fn spawn_action(image: &str) -> SpawnAction {
        SpawnAction {
            executable: ExecutorConfig {
                image: image.into(),
                pull_policy: None,
                credentials: None,
                env: Default::default(),
                resource_limits: Default::default(),
                mount: None,
                network_name: None,
                ready_path: None,
                gpus: None,
                protocol: Default::default(),
            },
            key: None,
            fencing_token: None,
            static_token: None,
            startup_timeout_ms: None,
            mount_dir: None,
            warm: false,
        }
    }

    fn updates_for(events: &EventQueue, backend_id: &BackendName) -> Vec<BackendStateUpdate> {
        events
            .unacked_after(None)
            .into_iter()
            .filter(|e| &e.backend_id == backend_id)
            .map(|e| e.update)
            .collect()
    }

    /// Waits until the backend has reported `status`; returns all its updates so far.
    async fn wait_for_status(
        events: &EventQueue,
        backend_id: &BackendName,
        status: BackendStatus,
    ) -> Vec<BackendStateUpdate> {
        let mut changed = events.subscribe();
        let wait = async {
            loop {
                let updates = updates_for(events, backend_id);
                if updates.iter().any(|u| u.status == status) {
                    return updates;
                }
                changed.changed().await.expect("queue alive");
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), wait).await {
            Ok(updates) => updates,
            Err(_) => panic!(
                "backend {backend_id} never reported {status}; saw {:?}",
                statuses(&updates_for(events, backend_id))
            ),
        }
    }

    fn statuses(updates: &[BackendStateUpdate]) -> Vec<BackendStatus> {
        updates.iter().map(|u| u.status).collect()
    }

    fn last(updates: &[BackendStateUpdate]) -> &BackendStateUpdate {
        updates.last().expect("at least one update")
    }

    use BackendStatus::*;

    fn claim_for(key: &str) -> ClaimAction {
        ClaimAction {
            key: Some(key.to_string()),
            fencing_token: Some(3),
            static_token: None,
        }
    }

    #[tokio::test]
    async fn a_warm_backend_waits_for_its_claim_and_is_ready_once_it_accepts_it() {
        let h = harness(&[]).await;
        let id = BackendName::new_random();
        let spawn = SpawnAction {
            warm: true,
            ..spawn_action("app")
        };
        h.executor.spawn(id.clone(), spawn).await.expect("accepted");
        let mut changed = h.events.subscribe();
        let waiting = loop {
            let updates = updates_for(&h.events, &id);
            if updates.iter().any(|u| u.warm) {
                break updates;
            }
            tokio::time::timeout(Duration::from_secs(10), changed.changed())
                .await
                .expect("a warm report within 10 s")
                .expect("queue alive");
        };
        // Answering, and reported waiting for a claim: not ready until claimed.
        assert_eq!(
            statuses(&waiting),
            vec![Loading, Starting, Waiting, Waiting]
        );
        assert!(last(&waiting).warm && last(&waiting).address.is_some());

        h.executor
            .claim(id.clone(), claim_for("doc"))
            .await
            .expect("accepted");
        let updates = wait_for_status(&h.events, &id, Ready).await;
        assert_eq!(
            statuses(&updates),
            vec![Loading, Starting, Waiting, Waiting, Ready]
        );
        // A repeat of the claim is dropped; the backend keeps serving.
        h.executor
            .claim(id.clone(), claim_for("doc"))
            .await
            .expect("accepted");
        assert_eq!(
            h.executor.running().await.expect("running"),
            vec![id.clone()]
        );
    }

    #[tokio::test]
    async fn a_refused_claim_terminates_the_warm_backend_saying_why() {
        let h = harness(&[]).await;
        let id = BackendName::new_random();
        let spawn = SpawnAction {
            warm: true,
            ..spawn_action("refuses-claims")
        };
        h.executor.spawn(id.clone(), spawn).await.expect("accepted");
        h.executor
            .claim(id.clone(), claim_for("doc"))
            .await
            .expect("accepted");
        let updates = wait_for_status(&h.events, &id, Terminated).await;
        assert!(!statuses(&updates).contains(&Ready), "{updates:?}");
        let end = last(&updates);
        assert_eq!(
            end.termination_reason,
            Some(TerminationReason::InternalError)
        );
        let message = end.message.clone().unwrap_or_default();
        assert!(
            message.contains("refused its claim") && message.contains("409"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_claim_for_a_backend_not_here_reports_it_terminated() {
        let h = harness(&[]).await;
        let id = BackendName::new_random();
        h.executor
            .claim(id.clone(), claim_for("doc"))
            .await
            .expect("accepted");
        let updates = wait_for_status(&h.events, &id, Terminated).await;
        assert_eq!(statuses(&updates), vec![Terminated]);
    }

    #[tokio::test]
    async fn soft_terminate_walks_the_whole_lifecycle_and_removes_the_container() {
        let h = harness(&[]).await;
        let id = BackendName::new_random();
        h.executor
            .spawn(id.clone(), spawn_action("app"))
            .await
            .expect("accepted");
        let updates = wait_for_status(&h.events, &id, Ready).await;
        assert_eq!(statuses(&updates), vec![Loading, Starting, Waiting, Ready]);
        assert!(last(&updates).address.is_some());
        assert_eq!(
            h.executor.running().await.expect("running"),
            vec![id.clone()]
        );

        h.executor
            .terminate(
                id.clone(),
                TerminationKind::Soft,
                TerminationReason::External,
            )
            .await
            .expect("accepted");
        let updates = wait_for_status(&h.events, &id, Terminated).await;
        assert_eq!(
            statuses(&updates),
            vec![Loading, Starting, Waiting, Ready, Terminating, Terminated]
        );
        let done = last(&updates);
        assert_eq!(done.exit_code, Some(143));
        assert_eq!(done.termination_kind, Some(TerminationKind::Soft));
        assert_eq!(done.termination_reason, Some(TerminationReason::External));
        assert_eq!(h.runtime.container(&id), None);
    }

    #[tokio::test]
    async fn soft_terminate_escalates_to_sigkill_after_the_grace_period() {
        let h = harness(&[]).await;
        let id = BackendName::new_random();
        h.executor
            .spawn(id.clone(), spawn_action("stubborn"))
            .await
            .expect("accepted");
        wait_for_status(&h.events, &id, Ready).await;
        h.executor
            .terminate(id.clone(), TerminationKind::Soft, TerminationReason::Swept)
            .await
            .expect("accepted");
        let updates = wait_for_status(&h.events, &id, Terminated).await;
        assert_eq!(
            statuses(&updates)[4..],
            [Terminating, HardTerminating, Terminated]
        );
        assert_eq!(
            updates[5].termination_reason,
            Some(TerminationReason::Swept)
        );
        assert_eq!(last(&updates).exit_code, Some(137));
    }

    #[tokio::test]
    async fn a_backend_that_exits_by_itself_reports_only_its_exit_code() {
        let h = harness(&[]).await;
        let id = BackendName::new_random();
        h.executor
            .spawn(id.clone(), spawn_action("app"))
            .await
            .expect("accepted");
        wait_for_status(&h.events, &id, Ready).await;
        h.runtime.exit(&id, 3);
        let updates = wait_for_status(&h.events, &id, Terminated).await;
        let done = last(&updates);
        assert_eq!(done.exit_code, Some(3));
        assert_eq!(done.termination_reason, None);
        assert_eq!(done.termination_kind, None);
        assert!(h.executor.running().await.expect("running").is_empty());
    }

    #[tokio::test]
    async fn an_oom_kill_the_engine_hears_of_after_the_exit_is_reported_as_out_of_memory() {
        let h = harness(&[]).await;
        let id = BackendName::new_random();
        let mut spawn = spawn_action("app");
        spawn.executable.resource_limits.memory_limit_bytes = Some(32 << 20);
        h.executor.spawn(id.clone(), spawn).await.expect("accepted");
        wait_for_status(&h.events, &id, Ready).await;
        h.runtime.oom_kill(&id, 3);
        let updates = wait_for_status(&h.events, &id, Terminated).await;
        let done = last(&updates);
        assert_eq!(done.exit_code, Some(137));
        assert_eq!(
            done.message.as_deref(),
            Some("out of memory: killed for exceeding its memory limit of 33554432 bytes")
        );
    }

    #[tokio::test]
    async fn a_sigkill_that_was_no_oom_kill_ends_without_an_oom_message() {
        let h = harness(&[]).await;
        let id = BackendName::new_random();
        h.executor
            .spawn(id.clone(), spawn_action("app"))
            .await
            .expect("accepted");
        wait_for_status(&h.events, &id, Ready).await;
        h.runtime.exit(&id, 137);
        let updates = wait_for_status(&h.events, &id, Terminated).await;
        let done = last(&updates);
        assert_eq!((done.exit_code, done.message.as_deref()), (Some(137), None));
    }

    #[tokio::test]
    async fn an_unloadable_image_fails_the_start_with_a_message() {
        let h = harness(&[]).await;
        let id = BackendName::new_random();
        h.executor
            .spawn(id.clone(), spawn_action("missing"))
            .await
            .expect("accepted");
        let updates = wait_for_status(&h.events, &id, Terminated).await;
        assert_eq!(statuses(&updates), vec![Loading, Terminated]);
        let done = last(&updates);
        assert_eq!(
            done.termination_reason,
            Some(TerminationReason::InternalError)
        );
        let message = done.message.as_deref().unwrap_or_default();
        assert!(message.contains("\"missing\""), "message: {message}");
    }

    #[tokio::test]
    async fn a_backend_that_never_answers_http_times_out() {
        let h = harness(&[]).await;
        let id = BackendName::new_random();
        h.executor
            .spawn(id.clone(), spawn_action("silent"))
            .await
            .expect("accepted");
        let updates = wait_for_status(&h.events, &id, Terminated).await;
        assert_eq!(
            statuses(&updates),
            vec![Loading, Starting, Waiting, HardTerminating, Terminated]
        );
        assert_eq!(
            last(&updates).termination_reason,
            Some(TerminationReason::StartupTimeout)
        );
        assert_eq!(h.runtime.container(&id), None);
    }

    #[tokio::test]
    async fn terminate_while_loading_ends_the_backend_without_starting_it() {
        let h = harness(&[]).await;
        let id = BackendName::new_random();
        h.executor
            .spawn(id.clone(), spawn_action("hang"))
            .await
            .expect("accepted");
        wait_for_status(&h.events, &id, Loading).await;
        h.executor
            .terminate(
                id.clone(),
                TerminationKind::Hard,
                TerminationReason::External,
            )
            .await
            .expect("accepted");
        let updates = wait_for_status(&h.events, &id, Terminated).await;
        assert_eq!(statuses(&updates), vec![Loading, Terminated]);
        assert_eq!(
            last(&updates).termination_reason,
            Some(TerminationReason::External)
        );
        assert!(h.runtime.started().is_empty());
    }

    #[tokio::test]
    async fn duplicate_spawns_start_a_backend_once_even_after_it_ended() {
        let h = harness(&[]).await;
        let id = BackendName::new_random();
        for _ in 0..2 {
            h.executor
                .spawn(id.clone(), spawn_action("app"))
                .await
                .expect("accepted");
        }
        wait_for_status(&h.events, &id, Ready).await;
        h.executor
            .terminate(
                id.clone(),
                TerminationKind::Hard,
                TerminationReason::External,
            )
            .await
            .expect("accepted");
        wait_for_status(&h.events, &id, Terminated).await;
        h.executor
            .spawn(id.clone(), spawn_action("app"))
            .await
            .expect("accepted again");
        // The executor handles commands in order, so once this answers the re-sent spawn
        // has been processed.
        assert!(h.executor.running().await.expect("running").is_empty());
        assert_eq!(h.runtime.started(), vec![id]);
    }

    #[tokio::test]
    async fn terminate_for_an_unknown_backend_reports_it_terminated_at_once() {
        let h = harness(&[]).await;
        let id = BackendName::new_random();
        h.executor
            .terminate(
                id.clone(),
                TerminationKind::Soft,
                TerminationReason::KeyExpired,
            )
            .await
            .expect("accepted");
        let updates = updates_for(&h.events, &id);
        assert_eq!(statuses(&updates), vec![Terminated]);
        assert_eq!(
            updates[0].termination_reason,
            Some(TerminationReason::KeyExpired)
        );
    }

    #[tokio::test]
    async fn a_running_backend_under_a_live_lease_is_readopted_and_the_rest_removed() {
        let (adopted, expired, stopped) = (
            BackendName::new_random(),
            BackendName::new_random(),
            BackendName::new_random(),
        );
        let later = Instant::now() + Duration::from_secs(60);
        let previous = BTreeMap::from([
            (adopted.clone(), later),
            // Too close to its end to renew in time.
            (expired.clone(), Instant::now() + Duration::from_millis(10)),
            (stopped.clone(), later),
        ]);
        let h = harness_after_restart(&[&adopted, &expired], &[&stopped], previous, Duration::ZERO)
            .await;
        let ready = wait_for_status(&h.events, &adopted, Ready).await;
        assert!(last(&ready).address.is_some());
        assert_eq!(
            h.runtime.started(),
            Vec::<BackendName>::new(),
            "nothing restarted"
        );
        assert!(h
            .executor
            .running()
            .await
            .expect("running")
            .contains(&adopted));
        for gone in [&expired, &stopped] {
            let updates = updates_for(&h.events, gone);
            assert_eq!(statuses(&updates), vec![Terminated], "{gone}");
            assert_eq!(h.runtime.container(gone), None);
        }
        // Its later exit is still observed and reported.
        h.runtime.exit(&adopted, 7);
        let ended = wait_for_status(&h.events, &adopted, Terminated).await;
        assert_eq!(last(&ended).exit_code, Some(7));
        h.cancel.cancel();
    }

    #[tokio::test]
    async fn leaving_for_good_removes_finished_backends_containers_even_if_listed_running() {
        let retention = Duration::from_secs(3600);
        let h = harness_after_restart(&[], &[], BTreeMap::new(), retention).await;
        let (kept, stale, busy) = (
            BackendName::new_random(),
            BackendName::new_random(),
            BackendName::new_random(),
        );
        h.executor
            .spawn(kept.clone(), spawn_action("app"))
            .await
            .expect("accepted");
        wait_for_status(&h.events, &kept, Ready).await;
        h.executor
            .terminate(
                kept.clone(),
                TerminationKind::Hard,
                TerminationReason::External,
            )
            .await
            .expect("accepted");
        wait_for_status(&h.events, &kept, Terminated).await;
        assert!(h.runtime.container(&kept).is_some(), "kept for its logs");
        // As the engine can list a container whose exit it has just reported: running.
        h.runtime.add_orphan(stale.clone());
        h.runtime.add_orphan(busy.clone());

        remove_finished(h.runtime.clone(), HashSet::from([busy.clone()])).await;
        assert_eq!(h.runtime.container(&kept), None);
        assert_eq!(h.runtime.container(&stale), None);
        assert!(
            h.runtime.container(&busy).is_some(),
            "a running task's stays"
        );
    }

    #[tokio::test]
    async fn with_log_retention_a_stopped_container_is_kept_until_its_retention_is_over() {
        let retention = Duration::from_secs(3600);
        let h = harness_after_restart(&[], &[], BTreeMap::new(), retention).await;
        let id = BackendName::new_random();
        h.executor
            .spawn(id.clone(), spawn_action("app"))
            .await
            .expect("accepted");
        wait_for_status(&h.events, &id, Ready).await;
        h.executor
            .terminate(
                id.clone(),
                TerminationKind::Hard,
                TerminationReason::External,
            )
            .await
            .expect("accepted");
        let updates = wait_for_status(&h.events, &id, Terminated).await;
        assert_eq!(last(&updates).exit_code, Some(137));
        assert_eq!(
            h.runtime.container(&id),
            Some(FakeContainer::Exited(Some(137)))
        );
        let mut lines = h
            .executor
            .logs(id.clone(), false, None)
            .await
            .expect("logs");
        assert!(
            lines.next().await.expect("a line").is_ok(),
            "logs still readable"
        );

        // A sweep leaves it while its retention lasts, and removes it once it is over.
        sweep_retained(h.runtime.clone(), retention, HashSet::new()).await;
        assert!(h.runtime.container(&id).is_some());
        h.runtime.backdate_exit(&id, retention);
        sweep_retained(h.runtime.clone(), retention, HashSet::from([id.clone()])).await;
        assert!(
            h.runtime.container(&id).is_some(),
            "a busy backend is never swept"
        );
        sweep_retained(h.runtime.clone(), retention, HashSet::new()).await;
        assert_eq!(h.runtime.container(&id), None);
        assert!(matches!(
            h.executor.logs(id.clone(), false, None).await,
            Err(LogsUnavailable::NotKept)
        ));
    }

    #[tokio::test]
    async fn after_a_restart_reported_exits_are_kept_for_their_logs_and_the_rest_stopped() {
        let (reported, unreported, running) = (
            BackendName::new_random(),
            BackendName::new_random(),
            BackendName::new_random(),
        );
        // `unreported` still had a lease: it exited while the drone was down.
        let soon = Instant::now() + Duration::from_millis(10);
        let previous = BTreeMap::from([(unreported.clone(), soon), (running.clone(), soon)]);
        let h = harness_after_restart(
            &[&running],
            &[&reported, &unreported],
            previous,
            Duration::from_secs(3600),
        )
        .await;
        assert!(
            updates_for(&h.events, &reported).is_empty(),
            "told once already"
        );
        for gone in [&unreported, &running] {
            let updates = updates_for(&h.events, gone);
            assert_eq!(statuses(&updates), vec![Terminated], "{gone}");
            assert_eq!(updates[0].termination_reason, Some(TerminationReason::Lost));
        }
        for kept in [&reported, &unreported, &running] {
            assert!(
                matches!(h.runtime.container(kept), Some(FakeContainer::Exited(_))),
                "{kept} stopped and kept"
            );
        }
        // None of them starts again.
        h.executor
            .spawn(reported.clone(), spawn_action("app"))
            .await
            .expect("accepted");
        assert!(h.runtime.started().is_empty());
    }

    #[tokio::test]
    async fn orphans_are_removed_reported_lost_and_never_restarted() {
        let orphan = BackendName::new_random();
        let h = harness(&[&orphan]).await;
        let updates = updates_for(&h.events, &orphan);
        assert_eq!(statuses(&updates), vec![Terminated]);
        assert_eq!(updates[0].termination_reason, Some(TerminationReason::Lost));
        assert_eq!(h.runtime.container(&orphan), None);

        h.executor
            .spawn(orphan.clone(), spawn_action("app"))
            .await
            .expect("accepted");
        assert!(h.executor.running().await.expect("running").is_empty());
        assert!(h.runtime.started().is_empty());
    }

    #[tokio::test]
    async fn shutdown_terminates_every_backend_as_lost_and_refuses_new_ones() {
        let h = harness(&[]).await;
        let ready = BackendName::new_random();
        let loading = BackendName::new_random();
        h.executor
            .spawn(ready.clone(), spawn_action("app"))
            .await
            .expect("accepted");
        h.executor
            .spawn(loading.clone(), spawn_action("hang"))
            .await
            .expect("accepted");
        wait_for_status(&h.events, &ready, Ready).await;

        tokio::time::timeout(Duration::from_secs(10), h.executor.shutdown())
            .await
            .expect("shutdown finishes");
        for id in [&ready, &loading] {
            let updates = updates_for(&h.events, id);
            let done = last(&updates);
            assert_eq!(done.status, Terminated);
            assert_eq!(done.termination_reason, Some(TerminationReason::Lost));
            assert_eq!(done.termination_kind, Some(TerminationKind::Soft));
        }
        assert!(matches!(
            h.runtime.container(&ready),
            None | Some(FakeContainer::Exited(_))
        ));
        let refused = h
            .executor
            .spawn(BackendName::new_random(), spawn_action("app"))
            .await;
        assert!(matches!(refused, Err(ExecutorError::ShuttingDown)));
    }
}
