//! Plane's drone: runs backends as Docker containers on behalf of the controller.
//!
//! [`start`] connects to Docker, opens the drone's state directory (events an earlier run
//! left unacked are replayed), cleans up what an earlier run left, and starts two owned
//! tasks: the executor (one sub-task per backend) and the controller connection. [`run`]
//! does the same and shuts down gracefully on ctrl-c or SIGTERM.

pub mod cli;
pub mod config;
mod controller_connection;
mod event_queue;
mod event_store;
mod executor;
pub mod fence;
mod leases;
mod lifecycle;
mod log_relay;
pub mod runtime;

pub use cli::DroneOpts;
pub use config::{DroneConfig, OnShutdown};

use anyhow::Context;
use controller_connection::Connection;
use event_queue::EventQueue;
use executor::ExecutorHandle;
use leases::Leases;
use lifecycle::LifecycleSettings;
use plane_protocol::names::NodeName;
use runtime::docker::{DockerRuntime, DockerRuntimeConfig};
use runtime::Runtime;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

/// After every backend has been terminated on shutdown, how long to keep the connection
/// open for the controller to acknowledge the final events.
const FINAL_EVENTS_GRACE: Duration = Duration::from_secs(3);

/// A running drone. Stop it with [`DroneHandle::shutdown`]; merely dropping it stops the
/// drone's tasks abruptly and leaves its backends running.
pub struct DroneHandle {
    name: NodeName,
    on_shutdown: OnShutdown,
    connected: watch::Receiver<bool>,
    executor: ExecutorHandle,
    events: EventQueue,
    leases: Leases,
    /// Stops the connection from taking new actions while the drone winds down.
    stop_actions: CancellationToken,
    /// Stops every task of this drone.
    cancel: CancellationToken,
    /// Dropping the handle without [`DroneHandle::shutdown`] stops every task at once, like
    /// a crash: backends keep running and are cleaned up by the next start under this name.
    _stop_on_drop: DropGuard,
    executor_task: JoinHandle<()>,
    connection_task: JoinHandle<()>,
}

/// Starts a drone against the local Docker engine. Fails fast if Docker is unreachable;
/// returns without waiting for the controller (see [`DroneHandle::connected`]).
pub async fn start(config: DroneConfig) -> anyhow::Result<DroneHandle> {
    let cancel = CancellationToken::new();
    let runtime = DockerRuntime::connect(
        DockerRuntimeConfig {
            drone: config.name.clone(),
            cluster: config.cluster.clone(),
            ip: config.ip,
            pull_timeout: config.pull_timeout(),
            runtime: config.docker_runtime.clone(),
            network: config.docker_network.clone(),
            log_max_bytes: config.log_max_bytes,
            metrics: config.metrics.clone(),
            allowed_registries: config.allowed_registries.clone(),
        },
        &cancel,
    )
    .await?;
    start_with_runtime(config, runtime, cancel).await
}

/// Starts a drone on any [`Runtime`]. `cancel` is the drone's root token; it is cancelled
/// by [`DroneHandle::shutdown`]. Fails if another drone uses `config.state_dir`.
pub async fn start_with_runtime<R: Runtime>(
    config: DroneConfig,
    runtime: R,
    cancel: CancellationToken,
) -> anyhow::Result<DroneHandle> {
    let link = config.link_config();
    link.check().context("invalid drone configuration")?;
    let events = EventQueue::open(&config.state_dir)
        .await
        .with_context(|| format!("opening state directory {}", config.state_dir.display()))?;
    let settings = LifecycleSettings {
        stop_grace_period: config.stop_grace_period(),
        startup_timeout: config.startup_timeout(),
        health: config.health(),
        mount_base: config.mount_base.clone(),
        log_retention: config.log_retention(),
    };
    // The backends an earlier run left running, with the leases it published: read before
    // this run publishes its own, which carry the re-adopted ones on (so the fence never
    // sees a moment without them).
    let previous = fence::previous_deadlines(&config.state_dir);
    // Deadlines are published whether or not a fence process runs: they are also how the
    // next run of the drone knows which backends it may re-adopt.
    let fence = Some(fence::FencePublisher::new(&config.state_dir));
    let leases = Leases::new(config.fence_margin()).with_fence(fence);
    // The file first: the fence takes a missing one to mean the drone is gone for good.
    leases.open_fence();
    if let Some(executable) = &config.fence_executable {
        fence::spawn(executable, &config.state_dir)?;
    }
    let leases_handle = leases.clone();
    let runtime = runtime::measured::Measured::new(runtime, &config.metrics);
    if let Some(port) = config.metrics_port {
        plane_metrics::serve_on(
            config.ip,
            port,
            config.metrics.clone(),
            cancel.child_token(),
        )
        .await?;
    }
    let runtime_disk_limits = runtime.supports_disk_limits();
    let (executor, executor_task) = executor::start(
        runtime,
        events.clone(),
        leases.clone(),
        settings,
        previous,
        cancel.child_token(),
    )
    .await
    .context("starting the executor")?;

    // Preseeding: the drone says hello (and so takes work) only once these are pulled.
    for image in &config.prepull {
        let started = std::time::Instant::now();
        match executor
            .prepull(image.clone(), config.prepull_credentials.clone())
            .await
        {
            Ok(()) => tracing::info!(%image, elapsed = ?started.elapsed(), "prepulled"),
            Err(error) => {
                tracing::error!(%image, %error, "could not prepull; starting without it")
            }
        }
    }

    let (connected_tx, connected) = watch::channel(false);
    let stop_actions = CancellationToken::new();
    let link_cancel = cancel.child_token();
    let connection = Connection {
        name: config.name.clone(),
        instance: plane_protocol::names::new_instance_id(),
        pool: config.pool.clone(),
        heartbeat_interval: config.heartbeat_interval(),
        fence_margin: config.fence_margin(),
        disk_limits: runtime_disk_limits,
        leases,
        executor: executor.clone(),
        events: events.clone(),
        connected: connected_tx,
        stop_actions: stop_actions.clone(),
        cancel: link_cancel.clone(),
    };
    let connection_task = tokio::spawn(async move {
        if let Err(error) = plane_link::run(link, connection, link_cancel).await {
            tracing::error!(%error, "cannot link to the controller");
        }
    });
    tracing::info!(drone = %config.name, cluster = %config.cluster, "drone started");

    Ok(DroneHandle {
        name: config.name,
        on_shutdown: config.on_shutdown,
        connected,
        executor,
        events,
        leases: leases_handle,
        stop_actions,
        _stop_on_drop: cancel.clone().drop_guard(),
        cancel,
        executor_task,
        connection_task,
    })
}

impl DroneHandle {
    pub fn name(&self) -> &NodeName {
        &self.name
    }

    /// Whether the drone has a live session with the controller right now.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Follows [`Self::is_connected`]; e.g. `wait_for(|c| *c)` to wait for the first session.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Stops taking actions, terminates every backend (soft, reason `lost`: SIGTERM, the
    /// grace period, then SIGKILL), gives the controller up to a few seconds to acknowledge
    /// the final events, then closes the connection and stops every task.
    /// Shuts down as the configuration's `on_shutdown` says.
    pub async fn shutdown(self) {
        let on_shutdown = self.on_shutdown;
        self.shutdown_with(on_shutdown).await
    }

    /// Shuts down, stopping the backends first (`Terminate`) or leaving them running for
    /// the next drone process on this state directory (`Keep`).
    pub async fn shutdown_with(self, on_shutdown: OnShutdown) {
        tracing::info!(drone = %self.name, ?on_shutdown, "drone shutting down");
        self.stop_actions.cancel();
        if on_shutdown == OnShutdown::Terminate {
            self.executor.shutdown().await;
            // Leaving for good: no drone of this state directory will serve or sweep the
            // logs kept in stopped containers, so they go too.
            self.executor.remove_stopped().await;
        }

        let mut pending = self.events.subscribe();
        let drained = if pending.borrow().eq(&0) {
            true
        } else if !self.is_connected() {
            // Nobody can acknowledge them, so there is nothing to wait for.
            false
        } else {
            tokio::time::timeout(FINAL_EVENTS_GRACE, pending.wait_for(|len| *len == 0))
                .await
                .is_ok()
        };
        if !drained {
            tracing::warn!(
                unacked = self.events.len(),
                "shutting down with events the controller has not acknowledged"
            );
        }

        // Every backend has stopped: the fence has nothing left to guard.
        match on_shutdown {
            OnShutdown::Terminate => self.leases.close_fence(),
            // The deadlines stay published: the fence guards the backends until the next
            // drone process takes them over (or their leases run out).
            OnShutdown::Keep => tracing::info!(
                backends = self.executor.running().await.map(|b| b.len()).unwrap_or(0),
                "leaving the backends running for the next drone process"
            ),
        }
        self.cancel.cancel();
        for (what, task) in [
            ("executor", self.executor_task),
            ("controller connection", self.connection_task),
        ] {
            if let Err(err) = task.await {
                tracing::error!(task = what, error = %err, "drone task failed");
            }
        }
        // Acks received until now are deleted from the state file, so the next start does
        // not replay them (which would be harmless, but noisy).
        self.events.flush().await;
        tracing::info!(drone = %self.name, "drone stopped");
    }
}

/// Runs a drone until ctrl-c or SIGTERM, then shuts it down gracefully.
pub async fn run(config: DroneConfig) -> anyhow::Result<()> {
    let handle = start(config).await?;
    wait_for_signal().await?;
    handle.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.context("listening for ctrl-c")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("listening for ctrl-c")?;
    tracing::info!("shutdown signal received");
    Ok(())
}
