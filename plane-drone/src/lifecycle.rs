//! One backend's life on the drone, from `loading` to `terminated`, run as its own task.
//!
//! The task is the only writer of its backend's statuses, so they reach the event queue in
//! lifecycle order. It always ends with exactly one `terminated` report and, if a container
//! was created, with its process gone: the stopped container is kept for its logs (removed
//! later by the executor's retention sweep) or, without log retention, removed.

use crate::event_queue::EventQueue;
use crate::leases::LeaseWatch;
use crate::runtime::{BackendSpec, Runtime, RuntimeError, Signal};
use plane_protocol::backend::{
    BackendHealth, BackendStateUpdate, BackendStatus, TerminationKind, TerminationReason,
};
use plane_protocol::drone::{ClaimAction, ClaimBody, SpawnAction};
use plane_protocol::names::BackendName;
use plane_protocol::{BACKEND_CONTAINER_PORT, RESERVED_ENV_VARS};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Per-try bound on one readiness probe; a backend that accepts but does not answer within
/// this is probed again. Generous, so a slow first response still counts as ready (a
/// closed port fails at once, whatever this is); the startup deadline bounds the whole.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pauses between readiness probes: the first short, since most backends listen within
/// milliseconds of starting, doubling to the longest, so a slow starter costs a probe every
/// 100 ms (a refused connection, cheap for it and for the engine) rather than a busy loop.
const PROBE_FIRST_PAUSE: Duration = Duration::from_millis(2);
const PROBE_LONGEST_PAUSE: Duration = Duration::from_millis(100);
/// How long to wait for the exit after SIGKILL before reporting `terminated` anyway, so a
/// wedged engine cannot keep a backend (and its key) from being released forever.
const KILL_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a warm backend has to answer its claim (`POST /.plane/claim`).
const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff between attempts to remove a container the engine would not remove.
const REMOVE_RETRY_INITIAL: Duration = Duration::from_secs(1);
const REMOVE_RETRY_MAX: Duration = Duration::from_secs(30);
/// Pause before asking the engine again when waiting for an exit failed.
const WAIT_RETRY_DELAY: Duration = Duration::from_secs(1);
/// How long a SIGKILL that the drone did not send is taken as a possible OOM kill while
/// the engine does not (yet) say it was one.
const OOM_FLAG_GRACE: Duration = Duration::from_secs(2);
const OOM_FLAG_POLL: Duration = Duration::from_millis(50);
/// The exit code of a process ended by SIGKILL (128 + 9), as the OOM killer ends one.
const SIGKILL_EXIT_CODE: i32 = 137;

/// Timings of the lifecycle, from the drone's configuration.
#[derive(Clone, Debug)]
pub struct LifecycleSettings {
    /// Between SIGTERM and SIGKILL on a soft terminate.
    pub stop_grace_period: Duration,
    /// From container start until the backend must answer HTTP.
    pub startup_timeout: Duration,
    /// Checks of ready backends.
    pub health: HealthSettings,
    /// Where backends' volumes live (`--mount-base`).
    pub mount_base: Option<PathBuf>,
    /// How long a stopped backend's container (and so its logs) is kept
    /// (`--log-retention-seconds`); zero removes it as soon as the process is gone.
    pub log_retention: Duration,
}

/// How the drone checks a ready backend (HTTP on its ready path, as Kubernetes' and
/// Agones' probes do).
#[derive(Clone, Copy, Debug)]
pub struct HealthSettings {
    /// Between checks.
    pub interval: Duration,
    /// A check not answered within this fails.
    pub timeout: Duration,
    /// Failures in a row after which the backend is reported unhealthy.
    pub unhealthy_after: u32,
    /// Failures in a row after which it is terminated (`lost`); `None`: never.
    pub terminate_after: Option<u32>,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            unhealthy_after: 3,
            terminate_after: Some(12),
        }
    }
}

/// What every backend task shares.
pub(crate) struct BackendContext<R> {
    pub runtime: R,
    pub events: EventQueue,
    pub settings: LifecycleSettings,
    /// For readiness probes; built without proxy settings, since backends are local.
    pub http: reqwest::Client,
}

/// A request to stop a backend, as the controller (or the drone's shutdown) sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TerminateRequest {
    pub kind: TerminationKind,
    pub reason: TerminationReason,
}

/// What the executor asks of a running backend's task.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum BackendRequest {
    Terminate(TerminateRequest),
    /// Hand a warm backend to the connect that claimed it.
    Claim(ClaimAction),
}

/// The environment of a backend's process: the user's variables, minus any that would
/// override the ones Plane sets, plus Plane's own.
pub(crate) fn backend_env(backend_id: &BackendName, spawn: &SpawnAction) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = spawn
        .executable
        .env
        .iter()
        .filter(|(name, _)| {
            // The controller already refuses these; the drone still must not let a
            // reserved name through, nor a name that would not survive `NAME=value`.
            let allowed = !RESERVED_ENV_VARS.contains(&name.as_str())
                && !name.is_empty()
                && !name.contains('=')
                && !name.contains('\0');
            if !allowed {
                tracing::warn!(backend = %backend_id, name = %name, "dropping disallowed environment variable");
            }
            allowed
        })
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    env.push(("PORT".into(), BACKEND_CONTAINER_PORT.to_string()));
    env.push(("SESSION_BACKEND_ID".into(), backend_id.to_string()));
    if let Some(key) = &spawn.key {
        env.push(("SESSION_BACKEND_KEY".into(), key.clone()));
    }
    if let Some(token) = spawn.fencing_token {
        env.push(("SESSION_BACKEND_FENCING_TOKEN".into(), token.to_string()));
    }
    if let Some(token) = &spawn.static_token {
        env.push(("SESSION_BACKEND_STATIC_TOKEN".into(), token.to_string()));
    }
    if spawn.warm {
        env.push(("SESSION_BACKEND_WARM".into(), "1".into()));
    }
    env
}

/// How the wait for readiness ended.
enum Startup {
    Ready,
    TimedOut,
    Exited(Option<i32>),
    Terminate(TerminateRequest),
}

/// Runs one backend until it is terminated. `requests` carries terminate requests; when
/// its sender is dropped the executor is gone and this task is about to be aborted.
pub(crate) async fn run_backend<R: Runtime>(
    ctx: std::sync::Arc<BackendContext<R>>,
    backend_id: BackendName,
    spawn: SpawnAction,
    requests: mpsc::UnboundedReceiver<BackendRequest>,
    lease: LeaseWatch,
) {
    let startup_timeout = spawn
        .startup_timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(ctx.settings.startup_timeout);
    let mut backend = Backend {
        ctx: &ctx,
        id: &backend_id,
        lease,
        startup_timeout,
        memory_limit: spawn.executable.resource_limits.memory_limit_bytes,
        ready_path: spawn
            .executable
            .ready_path
            .clone()
            .unwrap_or_else(|| "/".to_string()),
        warm: spawn.warm,
        termination_message: None,
    };
    backend.run(spawn, &mut Requests::new(requests)).await;
}

/// Runs a backend an earlier run of the drone left running (see `executor::reconcile`): once
/// it answers HTTP again it is reported `ready` (at its unchanged address; a repeat of a
/// status the controller has is a no-op there) and then served like any other. One that
/// does not answer within [`ADOPT_PROBE_TIMEOUT`] is stopped: it is never reported ready
/// while unreachable.
pub(crate) async fn adopt_backend<R: Runtime>(
    ctx: std::sync::Arc<BackendContext<R>>,
    backend_id: BackendName,
    address: SocketAddr,
    requests: mpsc::UnboundedReceiver<BackendRequest>,
    lease: LeaseWatch,
) {
    // Recorded with the container when it was created (absent on older containers).
    let recorded = ctx.runtime.recorded(&backend_id).await;
    let ready_path = recorded
        .ready_path
        .filter(|path| path.starts_with('/') && path.chars().all(|c| c.is_ascii_graphic()))
        .unwrap_or_else(|| "/".to_string());
    let mut backend = Backend {
        ctx: &ctx,
        id: &backend_id,
        lease,
        startup_timeout: ctx.settings.startup_timeout,
        // Not known to a later run of the drone.
        memory_limit: None,
        ready_path,
        // Whether it was claimed is the controller's to say: a warm one waits for a claim
        // again, which the controller re-sends if it made one.
        warm: recorded.warm,
        termination_message: None,
    };
    backend.readopt(address, &mut Requests::new(requests)).await;
}

/// How long a re-adopted backend has to answer HTTP before it is stopped.
const ADOPT_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

struct Backend<'a, R> {
    ctx: &'a BackendContext<R>,
    id: &'a BackendName,
    /// The backend's key lease: its process starts only once the lease is confirmed, and is
    /// stopped on the drone's own clock if the lease cannot be renewed.
    lease: LeaseWatch,
    /// From container start until it must answer HTTP (the spawn's, else the drone's).
    startup_timeout: Duration,
    /// The spawn's memory limit, to name in an out-of-memory report.
    memory_limit: Option<i64>,
    /// The path probed for readiness and health (`/` unless the spawn names one).
    ready_path: String,
    /// A warm-pool backend: once it answers, it waits for a claim before it is `ready`.
    warm: bool,
    /// Said in the `terminated` report of a stop the drone decided itself (a failed
    /// health check), when there is more to say than the reason.
    termination_message: Option<String>,
}

/// What the drone does to a backend whose lease it could not renew: stop it (the lease's
/// fencing margin bounds the grace period, see [`Backend::terminate`]).
const FENCE: TerminateRequest = TerminateRequest {
    kind: TerminationKind::Soft,
    reason: TerminationReason::KeyExpired,
};

impl<'a, R: Runtime> Backend<'a, R> {
    async fn report(&self, update: BackendStateUpdate) {
        tracing::info!(backend = %self.id, status = %update.status, "backend status");
        self.ctx.events.push(self.id.clone(), update).await;
    }

    async fn report_status(&self, status: BackendStatus) {
        self.report(BackendStateUpdate::status(status)).await;
    }

    async fn run(&mut self, spawn: SpawnAction, requests: &mut Requests) {
        let runtime = &self.ctx.runtime;
        let image = &spawn.executable.image;
        let startup_timeout = self.startup_timeout;

        self.report_status(BackendStatus::Loading).await;
        let prepared = tokio::select! {
            biased;
            request = requests.terminate() => {
                // Nothing exists yet; dropping the preparation cancels any pull.
                self.report(BackendStateUpdate {
                    termination_kind: Some(request.kind),
                    termination_reason: Some(request.reason),
                    ..BackendStateUpdate::status(BackendStatus::Terminated)
                }).await;
                return;
            }
            prepared = runtime.prepare_image(&spawn.executable) => prepared,
        };
        if let Err(err) = prepared {
            self.report_start_failed(format!("could not load image {image:?}: {err}"))
                .await;
            return;
        }

        // The process may only start under a lease the controller has confirmed: a spawn
        // that reached us late (after its lease ran out and its key moved on) never runs.
        let confirmed = tokio::select! {
            biased;
            request = requests.terminate() => Err(request),
            _ = self.lease.confirmed() => Ok(()),
            _ = tokio::time::sleep(startup_timeout) => Err(TerminateRequest {
                kind: TerminationKind::Hard,
                reason: TerminationReason::KeyExpired,
            }),
        };
        if let Err(request) = confirmed {
            let message = (request.reason == TerminationReason::KeyExpired).then(|| {
                "the controller did not confirm this backend's lease; it was never started"
                    .to_string()
            });
            self.report(BackendStateUpdate {
                termination_kind: Some(request.kind),
                termination_reason: Some(request.reason),
                message,
                ..BackendStateUpdate::status(BackendStatus::Terminated)
            })
            .await;
            return;
        }

        self.report_status(BackendStatus::Starting).await;
        let mount = match &spawn.mount_dir {
            None => None,
            Some(dir) => match prepare_mount(self.ctx.settings.mount_base.as_deref(), dir) {
                Ok(path) => Some(path),
                Err(message) => return self.report_start_failed(message).await,
            },
        };
        let spec = BackendSpec {
            backend_id: self.id.clone(),
            image: image.clone(),
            env: backend_env(self.id, &spawn),
            resource_limits: spawn.executable.resource_limits.clone(),
            network: spawn.executable.network_name.clone(),
            gpus: spawn.executable.gpus,
            mount,
            ready_path: self.ready_path.clone(),
            warm: spawn.warm,
        };
        // Not raced against terminate requests: dropping a create request midway could
        // leave a container the engine finishes creating after we stopped looking. A
        // request that arrives meanwhile stays queued and is handled right after.
        let address = match runtime.start_backend(&spec).await {
            Ok(address) => address,
            Err(RuntimeError::ExitedDuringStart { exit_code, .. }) => {
                self.finish(exit_code, None, Some("exited while starting".into()))
                    .await;
                return;
            }
            Err(err) => {
                self.report_start_failed(format!("could not start image {image:?}: {err}"))
                    .await;
                return;
            }
        };
        let started_at = Instant::now();

        self.report(BackendStateUpdate {
            address: Some(address),
            ..BackendStateUpdate::status(BackendStatus::Waiting)
        })
        .await;
        let deadline = started_at + startup_timeout;
        let exit = self.wait_exit();
        let startup = tokio::select! {
            biased;
            request = requests.terminate() => Startup::Terminate(request),
            _ = self.lease.lapsing() => {
                tracing::warn!(backend = %self.id, "lease not renewed in time; stopping the backend");
                Startup::Terminate(FENCE)
            }
            exit_code = exit => Startup::Exited(exit_code),
            ready = tokio::time::timeout_at(deadline, wait_until_ready(&self.ctx.http, address, &self.ready_path)) => {
                match ready {
                    Ok(()) => Startup::Ready,
                    Err(_) => Startup::TimedOut,
                }
            }
        };
        match startup {
            Startup::Ready => {}
            Startup::Exited(exit_code) => return self.finish(exit_code, None, None).await,
            Startup::Terminate(request) => return self.terminate(request, requests).await,
            Startup::TimedOut => {
                let request = TerminateRequest {
                    kind: TerminationKind::Hard,
                    reason: TerminationReason::StartupTimeout,
                };
                return self.terminate(request, requests).await;
            }
        }
        if self.warm && !self.claimed(address, requests).await {
            return;
        }

        self.report(BackendStateUpdate {
            address: Some(address),
            ..BackendStateUpdate::status(BackendStatus::Ready)
        })
        .await;
        self.serve(address, requests).await;
    }

    /// A warm backend that answers HTTP: reports that it waits for a claim, then hands the
    /// claim to it. True once it accepted one (a 2xx to `POST /.plane/claim`); false when
    /// it ended meanwhile or refused the claim (then it is terminated, and the connect that
    /// claimed it starts a backend of its own).
    async fn claimed(&mut self, address: SocketAddr, requests: &mut Requests) -> bool {
        self.report(BackendStateUpdate::warm(address)).await;
        let exit = self.wait_exit();
        tokio::pin!(exit);
        let request = tokio::select! {
            biased;
            request = requests.claim_or_terminate() => request,
            _ = self.lease.lapsing() => {
                tracing::warn!(backend = %self.id, "lease not renewed in time; stopping the warm backend");
                BackendRequest::Terminate(FENCE)
            }
            exit_code = &mut exit => {
                self.finish(exit_code, None, None).await;
                return false;
            }
        };
        let claim = match request {
            BackendRequest::Claim(claim) => claim,
            BackendRequest::Terminate(request) => {
                self.terminate(request, requests).await;
                return false;
            }
        };
        let body = ClaimBody {
            backend_id: self.id.clone(),
            key: claim.key,
            fencing_token: claim.fencing_token,
            static_token: claim.static_token,
        };
        let url = format!("http://{address}/.plane/claim");
        // Raced like every other phase: a stop, a lapsing lease or an exit ends the wait.
        let answer = tokio::select! {
            biased;
            request = requests.terminate() => {
                self.terminate(request, requests).await;
                return false;
            }
            _ = self.lease.lapsing() => {
                tracing::warn!(backend = %self.id, "lease not renewed in time; stopping the backend being claimed");
                self.terminate(FENCE, requests).await;
                return false;
            }
            exit_code = &mut exit => {
                self.finish(exit_code, None, None).await;
                return false;
            }
            answer = self.ctx.http.post(&url).json(&body).timeout(CLAIM_TIMEOUT).send() => answer,
        };
        let refusal = match answer {
            Ok(response) if response.status().is_success() => None,
            Ok(response) => Some(format!("answered {}", response.status())),
            Err(err) if err.is_timeout() => Some(format!(
                "did not answer within {} s",
                CLAIM_TIMEOUT.as_secs()
            )),
            Err(err) => Some(format!("could not be asked: {err}")),
        };
        let Some(refusal) = refusal else {
            tracing::info!(backend = %self.id, key = ?body.key, "warm backend accepted its claim");
            return true;
        };
        tracing::warn!(backend = %self.id, %refusal, "warm backend refused its claim; terminating it");
        self.termination_message = Some(format!("refused its claim: POST /.plane/claim {refusal}"));
        let request = TerminateRequest {
            kind: TerminationKind::Hard,
            reason: TerminationReason::InternalError,
        };
        self.terminate(request, requests).await;
        false
    }

    /// A ready backend: until it is asked to stop, its lease lapses, or it exits. Meanwhile
    /// it is checked every interval: failures in a row past the settings' thresholds are
    /// reported (`unhealthy`, then `healthy` again when it recovers) and, past the last,
    /// end it. A check runs beside everything else, so it never delays a stop.
    async fn serve(&mut self, address: SocketAddr, requests: &mut Requests) {
        let health = self.ctx.settings.health;
        let url = format!("http://{address}{}", self.ready_path);
        let exit = self.wait_exit();
        tokio::pin!(exit);
        let mut ticks = tokio::time::interval_at(Instant::now() + health.interval, health.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        type Check =
            std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;
        let mut check: Option<Check> = None;
        let mut failures = 0u32;
        let mut reported_unhealthy = false;
        loop {
            tokio::select! {
                biased;
                request = requests.terminate() => return self.terminate(request, requests).await,
                _ = self.lease.lapsing() => {
                    tracing::warn!(backend = %self.id, "lease not renewed in time; stopping the backend");
                    return self.terminate(FENCE, requests).await;
                }
                exit_code = &mut exit => return self.finish(exit_code, None, None).await,
                result = async { check.as_mut().expect("a check runs").await }, if check.is_some() => {
                    check = None;
                    match result {
                        Ok(()) => {
                            if reported_unhealthy {
                                tracing::info!(backend = %self.id, "health check passing again");
                                self.report(BackendStateUpdate::health(
                                    BackendHealth::Healthy,
                                    format!("health check passing again: GET {}", self.ready_path),
                                ))
                                .await;
                            }
                            failures = 0;
                            reported_unhealthy = false;
                        }
                        Err(error) => {
                            failures += 1;
                            let what = format!(
                                "GET {} failed {failures} time{} in a row (last: {error})",
                                self.ready_path,
                                if failures == 1 { "" } else { "s" }
                            );
                            tracing::debug!(backend = %self.id, %what, "health check failed");
                            if health.terminate_after.is_some_and(|limit| failures >= limit) {
                                tracing::warn!(backend = %self.id, %what, "terminating an unhealthy backend");
                                self.termination_message =
                                    Some(format!("stopped answering its health check: {what}"));
                                let request = TerminateRequest {
                                    kind: TerminationKind::Hard,
                                    reason: TerminationReason::Lost,
                                };
                                return self.terminate(request, requests).await;
                            }
                            if failures >= health.unhealthy_after && !reported_unhealthy {
                                tracing::warn!(backend = %self.id, %what, "backend unhealthy");
                                reported_unhealthy = true;
                                self.report(BackendStateUpdate::health(
                                    BackendHealth::Unhealthy,
                                    format!("health check failing: {what}"),
                                ))
                                .await;
                            }
                        }
                    }
                }
                _ = ticks.tick(), if check.is_none() => {
                    check = Some(Box::pin(health_check(self.ctx.http.clone(), url.clone(), health.timeout)));
                }
            }
        }
    }

    async fn readopt(&mut self, address: SocketAddr, requests: &mut Requests) {
        let exit = self.wait_exit();
        let answering = tokio::select! {
            biased;
            request = requests.terminate() => return self.terminate(request, requests).await,
            exit_code = exit => return self.finish(exit_code, None, None).await,
            answered = tokio::time::timeout(
                ADOPT_PROBE_TIMEOUT,
                wait_until_ready(&self.ctx.http, address, &self.ready_path),
            ) => answered.is_ok(),
        };
        if !answering {
            tracing::warn!(backend = %self.id, %address, "a backend left running does not answer; stopping it");
            let request = TerminateRequest {
                kind: TerminationKind::Hard,
                reason: TerminationReason::Lost,
            };
            return self.terminate(request, requests).await;
        }
        tracing::info!(backend = %self.id, %address, "re-adopted backend answers");
        if self.warm && !self.claimed(address, requests).await {
            return;
        }
        self.report(BackendStateUpdate {
            address: Some(address),
            ..BackendStateUpdate::status(BackendStatus::Ready)
        })
        .await;
        self.serve(address, requests).await;
    }

    async fn report_start_failed(&self, message: String) {
        tracing::warn!(backend = %self.id, %message, "backend failed to start");
        self.report(BackendStateUpdate {
            termination_reason: Some(TerminationReason::InternalError),
            message: Some(message),
            ..BackendStateUpdate::status(BackendStatus::Terminated)
        })
        .await;
    }

    /// Stops a started backend: SIGTERM and the grace period for a soft request (a hard
    /// request arriving meanwhile, or the lease nearing its end, cuts it short), then
    /// SIGKILL.
    async fn terminate(&mut self, request: TerminateRequest, requests: &mut Requests) {
        let TerminateRequest { kind, reason } = request;
        let runtime = &self.ctx.runtime;
        let exit = self.wait_exit();
        tokio::pin!(exit);

        // Signals go out before the status is reported: a report waits for a durable
        // write, and a stop that fences a lease cannot wait for the disk.
        if kind == TerminationKind::Soft {
            match runtime.signal(self.id, Signal::Term).await {
                Ok(()) | Err(RuntimeError::NotRunning(_)) => {}
                Err(RuntimeError::NotFound(_)) => {
                    return self.finish(None, Some(request), None).await;
                }
                Err(err) => {
                    tracing::warn!(backend = %self.id, error = %err, "SIGTERM failed; killing");
                }
            }
            self.report(BackendStateUpdate {
                termination_kind: Some(kind),
                termination_reason: Some(reason),
                ..BackendStateUpdate::status(BackendStatus::Terminating)
            })
            .await;
            let grace = tokio::time::sleep(self.ctx.settings.stop_grace_period);
            tokio::pin!(grace);
            let exited = {
                let lease_end = self.lease.must_be_dead();
                tokio::pin!(lease_end);
                loop {
                    tokio::select! {
                        exit_code = &mut exit => break Some(exit_code),
                        _ = &mut grace => break None,
                        _ = &mut lease_end => {
                            tracing::warn!(backend = %self.id, "lease about to end during the grace period; killing");
                            break None;
                        }
                        next = requests.terminate() => {
                            if next.kind == TerminationKind::Hard {
                                break None;
                            }
                            // Already terminating softly; a repeated soft request changes nothing.
                        }
                    }
                }
            };
            if let Some(exit_code) = exited {
                return self.finish(exit_code, Some(request), None).await;
            }
        }

        match runtime.signal(self.id, Signal::Kill).await {
            Ok(()) | Err(RuntimeError::NotRunning(_)) => {}
            Err(RuntimeError::NotFound(_)) => {
                return self.finish(None, Some(request), None).await;
            }
            Err(err) => {
                tracing::warn!(backend = %self.id, error = %err, "SIGKILL failed");
            }
        }
        self.report(BackendStateUpdate {
            termination_kind: Some(kind),
            termination_reason: Some(reason),
            ..BackendStateUpdate::status(BackendStatus::HardTerminating)
        })
        .await;
        let message = match reason {
            TerminationReason::StartupTimeout => Some(format!(
                "did not answer HTTP within {} ms of starting",
                self.startup_timeout.as_millis()
            )),
            _ => self.termination_message.take(),
        };
        match tokio::time::timeout(KILL_EXIT_TIMEOUT, &mut exit).await {
            Ok(exit_code) => self.finish(exit_code, Some(request), message).await,
            Err(_) => {
                tracing::error!(backend = %self.id, "no exit observed after SIGKILL; removing the container");
                let message = message.unwrap_or_else(|| "exit not observed after SIGKILL".into());
                // Only removal proves the process gone; its logs go with it.
                remove_until_gone(&self.ctx.runtime, self.id).await;
                self.finish(None, Some(request), Some(message)).await
            }
        }
    }

    /// The process is gone (its exit observed, or its container already removed): report
    /// `terminated`, first removing the container unless its logs are kept. Removing first
    /// means `terminated` then also promises the container is gone.
    async fn finish(
        &self,
        exit_code: Option<i32>,
        request: Option<TerminateRequest>,
        message: Option<String>,
    ) {
        // Asked before the container (and what the engine knows of it) is gone.
        let message = match message {
            Some(message) => Some(message),
            None if self.oom_killed(exit_code, request.is_some()).await => {
                Some(self.out_of_memory())
            }
            None => None,
        };
        if self.ctx.settings.log_retention.is_zero() {
            remove_until_gone(&self.ctx.runtime, self.id).await;
        }
        self.report(BackendStateUpdate {
            termination_kind: request.map(|r| r.kind),
            termination_reason: request.map(|r| r.reason),
            exit_code,
            message,
            ..BackendStateUpdate::status(BackendStatus::Terminated)
        })
        .await;
    }

    /// Whether the kernel's OOM killer ended the process (always by SIGKILL). When the drone
    /// did not send that SIGKILL, the engine is asked again for a moment: it reports the
    /// exit (its `die` event) before it stores the exited state, and may hear of the OOM
    /// kill after the exit.
    async fn oom_killed(&self, exit_code: Option<i32>, drone_ended_it: bool) -> bool {
        if exit_code != Some(SIGKILL_EXIT_CODE) {
            return false;
        }
        let give_up = Instant::now() + OOM_FLAG_GRACE;
        loop {
            match self.ctx.runtime.oom_killed(self.id).await {
                Ok(true) => return true,
                // Removed by someone else: nothing more to learn.
                Err(RuntimeError::NotFound(_)) => return false,
                Ok(false) | Err(_) => {}
            }
            if drone_ended_it || Instant::now() >= give_up {
                return false;
            }
            tokio::time::sleep(OOM_FLAG_POLL).await;
        }
    }

    fn out_of_memory(&self) -> String {
        match self.memory_limit {
            Some(bytes) => {
                format!("out of memory: killed for exceeding its memory limit of {bytes} bytes")
            }
            None => "out of memory: killed by the kernel's OOM killer".to_string(),
        }
    }

    /// Waits for the process to exit; `None` as the code when it is unknown (e.g. the
    /// container vanished). Engine failures are retried, since giving up would mean
    /// reporting an exit that did not happen. Borrows only the context and ID, so a
    /// lifecycle can wait on this and on its lease at once.
    fn wait_exit(&self) -> impl std::future::Future<Output = Option<i32>> + 'a {
        let (ctx, id) = (self.ctx, self.id);
        async move {
            loop {
                match ctx.runtime.wait_exit(id).await {
                    Ok(exit_code) => return exit_code,
                    Err(RuntimeError::NotFound(_)) => return None,
                    Err(err) => {
                        tracing::warn!(backend = %id, error = %err, "waiting for exit failed; retrying");
                        tokio::time::sleep(WAIT_RETRY_DELAY).await;
                    }
                }
            }
        }
    }
}

/// Removes a backend's container, retrying with backoff until the engine confirms it is
/// gone. Only then may the backend be reported `terminated`: that report frees its key at
/// once, so it must never go out while the process might still run. Until then the backend
/// stays listed in heartbeats, so its lease (and key) stay held.
pub(crate) async fn remove_until_gone<R: Runtime>(runtime: &R, id: &BackendName) {
    let mut backoff = REMOVE_RETRY_INITIAL;
    loop {
        match runtime.remove(id).await {
            Ok(()) => return,
            Err(err) => {
                tracing::error!(backend = %id, error = %err, retry_in = ?backoff, "could not remove container; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(REMOVE_RETRY_MAX);
            }
        }
    }
}

/// Makes sure a backend's process is gone for good: with `keep_logs`, by killing it and
/// seeing it exit (the stopped container stays for its logs); otherwise, or when the exit
/// cannot be confirmed, by removing the container (see [`remove_until_gone`]).
pub(crate) async fn stop_for_good<R: Runtime>(runtime: &R, id: &BackendName, keep_logs: bool) {
    if keep_logs {
        let killed = match runtime.signal(id, Signal::Kill).await {
            Ok(()) | Err(RuntimeError::NotRunning(_)) => true,
            Err(RuntimeError::NotFound(_)) => return,
            Err(err) => {
                tracing::warn!(backend = %id, error = %err, "SIGKILL failed; removing the container");
                false
            }
        };
        if killed {
            match tokio::time::timeout(KILL_EXIT_TIMEOUT, runtime.wait_exit(id)).await {
                Ok(Ok(_)) | Ok(Err(RuntimeError::NotFound(_))) => return,
                Ok(Err(err)) => {
                    tracing::warn!(backend = %id, error = %err, "could not confirm the exit; removing the container")
                }
                Err(_) => {
                    tracing::warn!(backend = %id, "no exit observed after SIGKILL; removing the container")
                }
            }
        }
    }
    remove_until_gone(runtime, id).await;
}

/// A backend task's end of the executor's requests. A claim that arrives before the backend
/// waits for one (a repeat re-sent on reconnection, say) is kept for when it does; one that
/// arrives after it accepted a claim is a repeat and is never used.
pub(crate) struct Requests {
    receiver: mpsc::UnboundedReceiver<BackendRequest>,
    claim: Option<ClaimAction>,
}

impl Requests {
    fn new(receiver: mpsc::UnboundedReceiver<BackendRequest>) -> Self {
        Self {
            receiver,
            claim: None,
        }
    }

    /// The next request, a kept claim first. If the executor has gone away (sender
    /// dropped) this never resolves: the executor aborts its tasks when it stops.
    async fn next(&mut self) -> BackendRequest {
        match self.receiver.recv().await {
            Some(request) => request,
            None => std::future::pending().await,
        }
    }

    /// The next terminate request; claims meanwhile are kept.
    async fn terminate(&mut self) -> TerminateRequest {
        loop {
            match self.next().await {
                BackendRequest::Terminate(request) => return request,
                BackendRequest::Claim(claim) => {
                    self.claim.get_or_insert(claim);
                }
            }
        }
    }

    /// A kept claim, else the next request of either kind.
    async fn claim_or_terminate(&mut self) -> BackendRequest {
        match self.claim.take() {
            Some(claim) => BackendRequest::Claim(claim),
            None => self.next().await,
        }
    }
}

/// Makes (if needed) the volume directory `dir` (as the controller named it) under `base`
/// and returns its absolute path. Refused: no base, a name not of the controller's safe form,
/// any symlink on the way (it could lead outside the base), anything but directories.
fn prepare_mount(base: Option<&std::path::Path>, dir: &str) -> Result<PathBuf, String> {
    let Some(base) = base else {
        return Err("this backend asks for a mount and its drone has no --mount-base".to_string());
    };
    plane_protocol::mount::check_mount_dir(dir)?;
    let fail = |what: &str, err: std::io::Error| format!("mount {dir:?}: {what}: {err}");
    std::fs::create_dir_all(base).map_err(|err| fail("creating the mount base", err))?;
    let base = base
        .canonicalize()
        .map_err(|err| fail("resolving the mount base", err))?;
    let mut path = base.clone();
    for component in dir.split('/') {
        path.push(component);
        match std::fs::symlink_metadata(&path) {
            Ok(metadata) if metadata.file_type().is_symlink() => {
                return Err(format!(
                    "mount {dir:?}: {} is a symlink, which could lead outside the mount base; refused",
                    path.display()
                ));
            }
            Ok(metadata) if metadata.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "mount {dir:?}: {} is not a directory",
                    path.display()
                ));
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                match std::fs::create_dir(&path) {
                    Ok(()) => {}
                    // Another backend of the same path made it meanwhile.
                    Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(err) => return Err(fail("creating the directory", err)),
                }
            }
            Err(err) => return Err(fail("inspecting the directory", err)),
        }
    }
    // Belt and braces: whatever happened on disk meanwhile, the result is inside the base.
    let resolved = path
        .canonicalize()
        .map_err(|err| fail("resolving the directory", err))?;
    if !resolved.starts_with(&base) {
        return Err(format!(
            "mount {dir:?} resolves outside the mount base; refused"
        ));
    }
    Ok(resolved)
}

/// One health check: any answer below 500 within `timeout` passes.
async fn health_check(http: reqwest::Client, url: String, timeout: Duration) -> Result<(), String> {
    match http.get(&url).timeout(timeout).send().await {
        Ok(response) if response.status().is_server_error() => {
            Err(format!("answered {}", response.status()))
        }
        Ok(_) => Ok(()),
        Err(err) if err.is_timeout() => Err(format!("no answer within {} ms", timeout.as_millis())),
        Err(err) if err.is_connect() => Err("connection refused or failed".to_string()),
        Err(err) => Err(err.to_string()),
    }
}

/// Probes `http://address<path>` until any HTTP response arrives (whatever its status: the
/// backend is serving). The caller bounds this with the startup deadline.
async fn wait_until_ready(http: &reqwest::Client, address: SocketAddr, path: &str) {
    let url = format!("http://{address}{path}");
    let mut pause = PROBE_FIRST_PAUSE;
    loop {
        match http.get(&url).timeout(PROBE_TIMEOUT).send().await {
            Ok(_) => return,
            Err(err) => tracing::trace!(%address, error = %err, "backend not answering yet"),
        }
        tokio::time::sleep(pause).await;
        pause = next_probe_pause(pause);
    }
}

fn next_probe_pause(pause: Duration) -> Duration {
    (pause * 2).min(PROBE_LONGEST_PAUSE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use plane_protocol::api::ExecutorConfig;
    use std::collections::BTreeMap;

    fn spawn_with_env(env: &[(&str, &str)]) -> SpawnAction {
        SpawnAction {
            executable: ExecutorConfig {
                image: "app:1".into(),
                pull_policy: None,
                credentials: None,
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
                resource_limits: Default::default(),
                mount: None,
                network_name: None,
                ready_path: None,
                gpus: None,
                protocol: Default::default(),
            },
            key: Some("doc-1".into()),
            fencing_token: Some(7),
            static_token: None,
            startup_timeout_ms: None,
            mount_dir: None,
            warm: false,
        }
    }

    #[test]
    fn mounts_are_made_under_the_base_and_symlinks_refused() {
        let base = std::env::temp_dir().join(format!("plane-mount-{}", BackendName::new_random()));
        let made = prepare_mount(Some(&base), "paths/projects/one").expect("made");
        assert!(made.is_dir() && made.starts_with(base.canonicalize().expect("base")));
        assert_eq!(
            prepare_mount(Some(&base), "paths/projects/one").expect("again"),
            made
        );
        let outside = base.with_extension("outside");
        std::fs::create_dir_all(&outside).expect("outside");
        std::os::unix::fs::symlink(&outside, base.join("paths/evil")).expect("symlink");
        let refused = prepare_mount(Some(&base), "paths/evil/x").expect_err("symlink");
        assert!(refused.contains("symlink"), "{refused}");
        assert!(!outside.join("x").exists());
        assert!(prepare_mount(Some(&base), "paths/../etc").is_err());
        assert!(prepare_mount(None, "paths/a")
            .expect_err("no base")
            .contains("--mount-base"));
        let _ = std::fs::remove_dir_all(&base);
        let _ = std::fs::remove_dir_all(&outside);
    }

    #[test]
    fn probes_back_off_from_milliseconds_to_a_tenth_of_a_second() {
        let mut pauses = vec![PROBE_FIRST_PAUSE];
        for _ in 0..8 {
            let last = *pauses.last().expect("a pause");
            pauses.push(next_probe_pause(last));
        }
        let millis: Vec<u128> = pauses.iter().map(Duration::as_millis).collect();
        assert_eq!(millis, [2, 4, 8, 16, 32, 64, 100, 100, 100]);
    }

    #[test]
    fn user_env_never_overrides_reserved_variables() {
        let backend_id: BackendName = "ba-test".parse().expect("valid");
        let spawn = spawn_with_env(&[
            ("PORT", "1"),
            ("SESSION_BACKEND_ID", "evil"),
            ("SESSION_BACKEND_STATIC_TOKEN", "evil"),
            ("A=B", "x"),
            ("", "x"),
            ("APP_MODE", "debug"),
        ]);
        let env = backend_env(&backend_id, &spawn);
        let get = |name: &str| -> Vec<&str> {
            env.iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(get("PORT"), vec!["8080"]);
        assert_eq!(get("SESSION_BACKEND_ID"), vec!["ba-test"]);
        assert_eq!(get("SESSION_BACKEND_KEY"), vec!["doc-1"]);
        assert_eq!(get("SESSION_BACKEND_FENCING_TOKEN"), vec!["7"]);
        assert!(get("SESSION_BACKEND_STATIC_TOKEN").is_empty());
        assert_eq!(get("APP_MODE"), vec!["debug"]);
        assert!(env.iter().all(|(k, _)| !k.is_empty() && !k.contains('=')));
    }
}
