//! The Docker implementation of [`Runtime`], through bollard.
//!
//! Each backend is a container named `plane-<backend_id>` and labelled with the backend, the
//! drone and the cluster, so a drone only ever lists or touches its own containers even when
//! many drones share one engine. Exits are observed from the engine's event stream.

use super::{BackendSpec, Runtime, RuntimeError, Signal};
use anyhow::Context;
use bollard::auth::DockerCredentials;
use bollard::container::{
    Config, CreateContainerOptions, KillContainerOptions, ListContainersOptions, LogOutput,
    LogsOptions, RemoveContainerOptions,
};
use bollard::errors::Error as BollardError;
use bollard::image::CreateImageOptions;
use bollard::models::{
    ContainerStateStatusEnum, DeviceRequest, HostConfig, HostConfigLogConfig, PortBinding,
    ResourcesUlimits,
};
use bollard::system::EventsOptions;
use bollard::Docker;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use plane_protocol::api::{BackendLogLine, Gpus, LogStream};
use plane_protocol::api::{ExecutorConfig, PullPolicy, ResourceLimits};
use plane_protocol::names::{BackendName, ClusterName, NodeName};
use plane_protocol::time::Millis;
use plane_protocol::BACKEND_CONTAINER_PORT;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};

/// Label holding the backend ID of a Plane container.
pub const BACKEND_LABEL: &str = "dev.plane.backend";
/// Label holding the name of the drone that owns a Plane container.
pub const DRONE_LABEL: &str = "dev.plane.drone";
/// Label holding the cluster of the drone that owns a Plane container.
pub const CLUSTER_LABEL: &str = "dev.plane.cluster";
/// The path the backend is probed on, for a later run of the drone that re-adopts it.
pub const READY_PATH_LABEL: &str = "dev.plane.ready-path";
/// Set (to `1`) on a warm-pool backend's container.
pub const WARM_LABEL: &str = "dev.plane.warm";

/// Docker's default CPU accounting period, in microseconds, used when a backend asks for a
/// CPU percentage without a period.
const DEFAULT_CPU_PERIOD_US: i64 = 100_000;

/// How long to wait before re-subscribing to the event stream after it failed, so a
/// restarting engine is not hammered.
const EVENTS_RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);

/// How long a read of the engine's logged `oom` events may take.
const OOM_EVENTS_TIMEOUT: Duration = Duration::from_secs(1);

/// How often a waiter re-inspects its container even without an event, in case an event
/// was lost (e.g. while the event stream was being re-established).
const EXIT_RECHECK_INTERVAL: Duration = Duration::from_secs(10);

/// What the Docker runtime needs to know about its drone.
#[derive(Clone, Debug)]
pub struct DockerRuntimeConfig {
    /// The owning drone; every container gets it as a label.
    pub drone: NodeName,
    pub cluster: ClusterName,
    /// Host IP backend ports are published on.
    pub ip: IpAddr,
    /// Bound on one image pull.
    pub pull_timeout: Duration,
    /// The OCI runtime containers run under (`--docker-runtime`, e.g. `runsc`); the
    /// engine's default when `None`.
    pub runtime: Option<String>,
    /// The network backends join unless their spawn names one (`--docker-network`);
    /// Docker's default bridge when `None`.
    pub network: Option<String>,
    /// The most a backend's logs take on disk (`--log-max-bytes`): the engine's `local` log
    /// driver keeps two files of half this each and drops the oldest lines beyond.
    pub log_max_bytes: u64,
    /// Where `plane_drone_image_pulls_total` is registered.
    pub metrics: plane_metrics::MetricsRegistry,
    /// The only registries images may be pulled from (`--allowed-registry`); any when
    /// `None`.
    pub allowed_registries: Option<Vec<String>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PullLabels {
    outcome: &'static str,
}

/// A container of ours exited.
#[derive(Clone, Debug)]
struct ContainerExit {
    backend_id: BackendName,
    exit_code: Option<i32>,
}

/// The Docker runtime. Cheap to clone; the event watcher stops when the last clone is
/// dropped or the cancellation token given to [`DockerRuntime::connect`] fires.
#[derive(Clone)]
pub struct DockerRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    docker: Docker,
    /// Image pulls, by outcome (`pulled`, `failed`).
    pulls: Family<PullLabels, Counter>,
    config: DockerRuntimeConfig,
    /// The engine's storage driver, and whether it can limit a container's disk.
    storage: StorageDriver,
    exits: broadcast::Sender<ContainerExit>,
    _stop_events: DropGuard,
}

impl DockerRuntime {
    /// Connects to the engine named by `DOCKER_HOST` (default: the local socket), checks
    /// that it answers, and starts watching for exits of this drone's containers.
    pub async fn connect(
        config: DockerRuntimeConfig,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let endpoint = std::env::var("DOCKER_HOST")
            .unwrap_or_else(|_| "unix:///var/run/docker.sock".to_string());
        let hint = || {
            format!(
                "could not reach the Docker engine at {endpoint} (set DOCKER_HOST to use \
                 another); is Docker running and may this user use its socket?"
            )
        };
        let docker = Docker::connect_with_defaults().with_context(hint)?;
        // The engine may be older than the API version bollard speaks by default.
        let docker = tokio::time::timeout(Duration::from_secs(10), docker.negotiate_version())
            .await
            .map_err(|_| anyhow::anyhow!("no answer within 10 s"))
            .with_context(hint)?
            .with_context(hint)?;
        docker.ping().await.with_context(hint)?;
        let info = docker
            .info()
            .await
            .context("asking the Docker engine about its storage driver")?;
        let storage = StorageDriver::of(&info);
        let pulls = Family::<PullLabels, Counter>::default();
        config.metrics.register(|r| {
            r.register(
                "plane_drone_image_pulls",
                "Image pulls from a registry, by outcome (pulled or failed)",
                pulls.clone(),
            )
        });
        tracing::info!(driver = %storage.name, disk_limits = storage.disk_limits, "Docker storage driver");

        let (exits, _) = broadcast::channel(1024);
        let stop_events = cancel.child_token();
        tokio::spawn(watch_exits(
            docker.clone(),
            ownership_labels(&config),
            exits.clone(),
            stop_events.clone(),
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                docker,
                pulls,
                config,
                storage,
                exits,
                _stop_events: stop_events.drop_guard(),
            }),
        })
    }

    /// The engine's storage driver and whether it can limit disk.
    pub fn storage_driver(&self) -> &StorageDriver {
        &self.inner.storage
    }

    /// The underlying client, for callers that need more than the [`Runtime`] trait.
    pub fn docker(&self) -> &Docker {
        &self.inner.docker
    }

    /// One read of the engine's log of a backend's container, each line with its stamp;
    /// `since_seconds` 0 for no lower bound.
    fn read_logs(
        &self,
        backend_id: &BackendName,
        follow: bool,
        tail: String,
        since_seconds: i64,
    ) -> impl futures_util::Stream<Item = Result<BackendLogLine, RuntimeError>> + 'static {
        let options = LogsOptions {
            follow,
            stdout: true,
            stderr: true,
            timestamps: true,
            since: since_seconds,
            tail,
            ..Default::default()
        };
        let backend_id = backend_id.clone();
        self.inner
            .docker
            .logs(&Self::container_name(&backend_id), Some(options))
            .filter_map(move |item| {
                let line = match item {
                    Ok(LogOutput::StdOut { message }) => {
                        Some(Ok(log_line(LogStream::Stdout, &message)))
                    }
                    Ok(LogOutput::StdErr { message }) => {
                        Some(Ok(log_line(LogStream::Stderr, &message)))
                    }
                    // Containers without a TTY or stdin produce neither.
                    Ok(LogOutput::Console { .. } | LogOutput::StdIn { .. }) => None,
                    Err(err) => Some(Err(not_found_or(err, &backend_id, "reading logs"))),
                };
                std::future::ready(line)
            })
    }

    pub(crate) fn container_name(backend_id: &BackendName) -> String {
        format!("plane-{backend_id}")
    }

    async fn pull(&self, executable: &ExecutorConfig) -> Result<(), RuntimeError> {
        let image = &executable.image;
        if let Some(allowed) = &self.inner.config.allowed_registries {
            let registry = registry_of(image);
            if !allowed.iter().any(|a| registry_of_host(a) == registry) {
                return Err(RuntimeError::ImageUnavailable {
                    image: image.clone(),
                    message: format!(
                        "it would be pulled from {registry}, and this drone pulls only from {} \
                         (--allowed-registry)",
                        allowed.join(", ")
                    ),
                });
            }
        }
        let options = CreateImageOptions {
            from_image: image_reference_with_tag(image),
            ..Default::default()
        };
        let credentials = executable.credentials.as_ref().map(|c| DockerCredentials {
            username: Some(c.username.clone()),
            password: Some(c.password.clone()),
            ..Default::default()
        });
        let pull = async {
            let mut progress = self
                .inner
                .docker
                .create_image(Some(options), None, credentials);
            while let Some(item) = progress.next().await {
                item.map_err(|err| RuntimeError::ImageUnavailable {
                    image: image.clone(),
                    message: format!("pull failed: {}", describe(&err)),
                })?;
            }
            Ok(())
        };
        let timeout = self.inner.config.pull_timeout;
        let result = tokio::time::timeout(timeout, pull)
            .await
            .map_err(|_| RuntimeError::ImageUnavailable {
                image: image.clone(),
                message: format!("pull did not finish within {} ms", timeout.as_millis()),
            })
            .and_then(|pulled| pulled);
        let outcome = if result.is_ok() { "pulled" } else { "failed" };
        self.inner
            .pulls
            .get_or_create(&PullLabels { outcome })
            .inc();
        result
    }

    /// Whether the image is present locally.
    async fn has_image(&self, image: &str) -> Result<bool, RuntimeError> {
        match self.inner.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(err) if status_of(&err) == Some(404) => Ok(false),
            Err(err) => Err(engine(format!("inspecting image {image:?}"), err)),
        }
    }

    /// `Some(exit code)` once the process has exited, `None` while it runs.
    async fn exit_state(
        &self,
        backend_id: &BackendName,
    ) -> Result<Option<Option<i32>>, RuntimeError> {
        let info = self
            .inner
            .docker
            .inspect_container(&Self::container_name(backend_id), None)
            .await
            .map_err(|err| not_found_or(err, backend_id, "inspecting container"))?;
        let state = info.state.unwrap_or_default();
        let running = match state.status {
            Some(ContainerStateStatusEnum::RUNNING)
            | Some(ContainerStateStatusEnum::PAUSED)
            | Some(ContainerStateStatusEnum::RESTARTING) => true,
            Some(_) => false,
            None => state.running.unwrap_or(false),
        };
        if running {
            Ok(None)
        } else {
            Ok(Some(state.exit_code.and_then(|c| i32::try_from(c).ok())))
        }
    }

    async fn published_address(
        &self,
        backend_id: &BackendName,
    ) -> Result<SocketAddr, RuntimeError> {
        let name = Self::container_name(backend_id);
        let info = self
            .inner
            .docker
            .inspect_container(&name, None)
            .await
            .map_err(|err| not_found_or(err, backend_id, "inspecting started container"))?;
        let port_key = format!("{BACKEND_CONTAINER_PORT}/tcp");
        let host_port = info
            .network_settings
            .and_then(|settings| settings.ports)
            .and_then(|mut ports| ports.remove(&port_key).flatten())
            .and_then(|bindings| bindings.into_iter().find_map(|b| b.host_port))
            .and_then(|port| port.parse::<u16>().ok());
        match host_port {
            Some(port) => Ok(SocketAddr::new(self.inner.config.ip, port)),
            // Docker drops the port mapping of a container that has already stopped.
            None => match self.exit_state(backend_id).await? {
                Some(exit_code) => Err(RuntimeError::ExitedDuringStart {
                    backend_id: backend_id.clone(),
                    exit_code,
                }),
                None => Err(RuntimeError::Engine {
                    context: format!("container {name} runs but has no published port {port_key}"),
                    source: "missing port binding".into(),
                }),
            },
        }
    }

    /// The backends of this drone's containers, only those in one of `statuses` when any
    /// are given (`created`, `running`, `exited`, ...).
    async fn our_containers(&self, statuses: &[&str]) -> Result<Vec<BackendName>, RuntimeError> {
        let mut filters =
            HashMap::from([("label".to_string(), ownership_labels(&self.inner.config))]);
        if !statuses.is_empty() {
            let statuses = statuses.iter().map(|s| s.to_string()).collect();
            filters.insert("status".to_string(), statuses);
        }
        let containers = self
            .inner
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters,
                ..Default::default()
            }))
            .await
            .map_err(|err| engine("listing containers", err))?;
        let mut backends = Vec::new();
        for container in containers {
            let label = container
                .labels
                .as_ref()
                .and_then(|labels| labels.get(BACKEND_LABEL));
            match label.map(|l| l.parse::<BackendName>()) {
                Some(Ok(backend_id)) => backends.push(backend_id),
                _ => {
                    tracing::warn!(container = ?container.names, "container with this drone's label has no valid backend label; ignoring it")
                }
            }
        }
        Ok(backends)
    }

    /// The container the engine is asked to create for `spec`: labels, environment, the
    /// published port, limits, network, runtime and GPUs.
    pub fn container_config(&self, spec: &BackendSpec) -> Config<String> {
        let config = &self.inner.config;
        let port_key = format!("{BACKEND_CONTAINER_PORT}/tcp");
        let mut labels = HashMap::from([
            (BACKEND_LABEL.to_string(), spec.backend_id.to_string()),
            (DRONE_LABEL.to_string(), config.drone.to_string()),
            (CLUSTER_LABEL.to_string(), config.cluster.to_string()),
            (READY_PATH_LABEL.to_string(), spec.ready_path.clone()),
        ]);
        if spec.warm {
            labels.insert(WARM_LABEL.to_string(), "1".to_string());
        }
        let env = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let limits = &spec.resource_limits;
        let (cpu_period, cpu_quota) = cpu_limits(limits);
        let host_config = HostConfig {
            port_bindings: Some(HashMap::from([(
                port_key.clone(),
                Some(vec![PortBinding {
                    host_ip: Some(config.ip.to_string()),
                    // Empty: let the engine pick a free ephemeral port.
                    host_port: Some(String::new()),
                }]),
            )])),
            memory: limits.memory_limit_bytes,
            cpu_period,
            cpu_quota,
            pids_limit: limits.pids_limit,
            // The `cpu` rlimit: the kernel kills the process once it has used this much.
            ulimits: limits.cpu_time_limit.map(|seconds| {
                vec![ResourcesUlimits {
                    name: Some("cpu".to_string()),
                    soft: Some(seconds),
                    hard: Some(seconds),
                }]
            }),
            device_requests: spec.gpus.map(|gpus| {
                vec![DeviceRequest {
                    // Whichever driver provides the `gpu` capability (NVIDIA's, say).
                    driver: Some(String::new()),
                    count: Some(match gpus {
                        Gpus::Count(count) => i64::from(count),
                        Gpus::All(_) => -1,
                    }),
                    capabilities: Some(vec![vec!["gpu".to_string()]]),
                    ..Default::default()
                }]
            }),
            binds: spec.mount.as_ref().map(|dir| {
                vec![format!(
                    "{}:{}",
                    dir.display(),
                    plane_protocol::mount::MOUNT_TARGET
                )]
            }),
            // Checked at placement: only drones whose engine can limit disk get these.
            storage_opt: limits
                .disk_limit_bytes
                .map(|bytes| HashMap::from([("size".to_string(), bytes.to_string())])),
            network_mode: spec.network.clone().or_else(|| config.network.clone()),
            runtime: config.runtime.clone(),
            // Set here rather than left to the engine's default (often `json-file` without
            // any size limit), so what a backend prints is bounded on disk and readable
            // back through `docker logs` (and so by us) whatever the engine's setup.
            log_config: Some(HostConfigLogConfig {
                typ: Some("local".to_string()),
                config: Some(HashMap::from([
                    (
                        "max-size".to_string(),
                        (config.log_max_bytes / 2).max(1).to_string(),
                    ),
                    ("max-file".to_string(), "2".to_string()),
                    // Compressing the rotated file is done in the background, and reads
                    // meanwhile were seen to return an older file's lines.
                    ("compress".to_string(), "false".to_string()),
                ])),
            }),
            ..Default::default()
        };
        Config {
            image: Some(spec.image.clone()),
            env: Some(env),
            labels: Some(labels),
            exposed_ports: Some(HashMap::from([(port_key, HashMap::new())])),
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    async fn create_and_start(&self, spec: &BackendSpec) -> Result<SocketAddr, RuntimeError> {
        let name = Self::container_name(&spec.backend_id);
        let container = self.container_config(spec);
        self.inner
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: name.clone(),
                    platform: None,
                }),
                container,
            )
            .await
            .map_err(|err| engine(format!("creating container {name}"), err))?;
        self.inner
            .docker
            .start_container::<String>(&name, None)
            .await
            .map_err(|err| engine(format!("starting container {name}"), err))?;
        self.published_address(&spec.backend_id).await
    }
}

impl Runtime for DockerRuntime {
    fn supports_disk_limits(&self) -> bool {
        self.inner.storage.disk_limits
    }

    async fn prepare_image(&self, executable: &ExecutorConfig) -> Result<(), RuntimeError> {
        let image = &executable.image;
        match executable.pull_policy.unwrap_or_default() {
            PullPolicy::Always => self.pull(executable).await,
            PullPolicy::IfNotPresent => {
                if self.has_image(image).await? {
                    Ok(())
                } else {
                    self.pull(executable).await
                }
            }
            PullPolicy::Never => {
                if self.has_image(image).await? {
                    Ok(())
                } else {
                    Err(RuntimeError::ImageUnavailable {
                        image: image.clone(),
                        message: "not present on this drone and the pull policy is Never"
                            .to_string(),
                    })
                }
            }
        }
    }

    async fn start_backend(&self, spec: &BackendSpec) -> Result<SocketAddr, RuntimeError> {
        let result = self.create_and_start(spec).await;
        if let Err(err) = &result {
            // Leave nothing behind: a created-but-failed container would hold the name.
            if !matches!(err, RuntimeError::ExitedDuringStart { .. }) {
                if let Err(remove_err) = self.remove(&spec.backend_id).await {
                    tracing::warn!(backend = %spec.backend_id, error = %remove_err,
                        "could not remove container after a failed start");
                }
            }
        }
        result
    }

    async fn signal(&self, backend_id: &BackendName, signal: Signal) -> Result<(), RuntimeError> {
        let name = Self::container_name(backend_id);
        let options = KillContainerOptions {
            signal: signal.as_str(),
        };
        match self.inner.docker.kill_container(&name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(err) if status_of(&err) == Some(409) => {
                Err(RuntimeError::NotRunning(backend_id.clone()))
            }
            Err(err) => Err(not_found_or(err, backend_id, "signalling container")),
        }
    }

    async fn wait_exit(&self, backend_id: &BackendName) -> Result<Option<i32>, RuntimeError> {
        // Subscribe before inspecting so an exit between the two is not missed.
        let mut exits = self.inner.exits.subscribe();
        let mut events_closed = false;
        loop {
            if let Some(exit_code) = self.exit_state(backend_id).await? {
                return Ok(exit_code);
            }
            let recheck = tokio::time::sleep(if events_closed {
                EVENTS_RESUBSCRIBE_DELAY
            } else {
                EXIT_RECHECK_INTERVAL
            });
            tokio::pin!(recheck);
            loop {
                tokio::select! {
                    exit = exits.recv(), if !events_closed => match exit {
                        Ok(exit) if exit.backend_id == *backend_id => match exit.exit_code {
                            Some(code) => return Ok(Some(code)),
                            None => break, // inspect for the code
                        },
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => {
                            events_closed = true;
                            break;
                        }
                    },
                    _ = &mut recheck => break,
                }
            }
        }
    }

    async fn remove(&self, backend_id: &BackendName) -> Result<(), RuntimeError> {
        let name = Self::container_name(backend_id);
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            link: false,
        };
        match self
            .inner
            .docker
            .remove_container(&name, Some(options))
            .await
        {
            Ok(()) => Ok(()),
            // Gone already, or another removal is under way: either way it is going away.
            Err(err) if matches!(status_of(&err), Some(404) | Some(409)) => Ok(()),
            Err(err) => Err(engine(format!("removing container {name}"), err)),
        }
    }

    async fn list_backends(&self) -> Result<Vec<BackendName>, RuntimeError> {
        self.our_containers(&[]).await
    }

    async fn recorded(&self, backend_id: &BackendName) -> super::Recorded {
        let info = self
            .inner
            .docker
            .inspect_container(&Self::container_name(backend_id), None)
            .await;
        let mut labels = info
            .ok()
            .and_then(|info| info.config?.labels)
            .unwrap_or_default();
        super::Recorded {
            ready_path: labels.remove(READY_PATH_LABEL),
            warm: labels.get(WARM_LABEL).is_some_and(|v| v == "1"),
        }
    }

    async fn oom_killed(&self, backend_id: &BackendName) -> Result<bool, RuntimeError> {
        let info = match self
            .inner
            .docker
            .inspect_container(&Self::container_name(backend_id), None)
            .await
        {
            Ok(info) => info,
            Err(err) if status_of(&err) == Some(404) => {
                return Err(RuntimeError::NotFound(backend_id.clone()))
            }
            Err(err) => return Err(engine("inspecting an exited container", err)),
        };
        let state = info.state.unwrap_or_default();
        if state.oom_killed == Some(true) {
            return Ok(true);
        }
        // The flag is set only when the engine heard of the OOM kill before the exit (the
        // two reach it as separate events); its own `oom` event is logged either way.
        let started = state.started_at.as_deref().and_then(parse_engine_time);
        Ok(match (info.id, started) {
            (Some(id), Some(started)) => self.oom_event_since(&id, started).await,
            _ => false,
        })
    }

    async fn has_container(&self, backend_id: &BackendName) -> Result<bool, RuntimeError> {
        match self.exit_state(backend_id).await {
            Ok(_) => Ok(true),
            Err(RuntimeError::NotFound(_)) => Ok(false),
            Err(err) => Err(err),
        }
    }

    async fn exited_backends(&self) -> Result<Vec<(BackendName, SystemTime)>, RuntimeError> {
        let mut exited = Vec::new();
        for backend_id in self.our_containers(&["exited", "dead"]).await? {
            let info = match self
                .inner
                .docker
                .inspect_container(&Self::container_name(&backend_id), None)
                .await
            {
                Ok(info) => info,
                // Removed meanwhile.
                Err(err) if status_of(&err) == Some(404) => continue,
                Err(err) => return Err(engine("inspecting an exited container", err)),
            };
            let finished = info
                .state
                .and_then(|state| state.finished_at)
                .and_then(|at| parse_engine_time(&at));
            // An exit the engine gives no time for counts from now: kept a whole
            // retention period rather than removed early.
            exited.push((backend_id, finished.unwrap_or_else(SystemTime::now)));
        }
        Ok(exited)
    }

    fn logs(
        &self,
        backend_id: &BackendName,
        follow: bool,
        tail: Option<u64>,
    ) -> BoxStream<'static, Result<BackendLogLine, RuntimeError>> {
        let Some(tail) = tail.filter(|_| follow) else {
            let tail = tail.map_or_else(|| "all".to_string(), |n| n.to_string());
            return self.read_logs(backend_id, follow, tail, 0).boxed();
        };
        // The engine fixes where a followed read starts when its request arrives, which is
        // when the stream is first polled: after this returns, and after the reader was told
        // the logs are there. Lines printed in between would be neither in the tail nor
        // followed. So this call's time is the boundary, by the engine's stamps (on this
        // host's clock): of the last `tail` lines when the engine reads them, those stamped
        // before it, then every line stamped since. Each line comes once; the tail is short
        // by what was printed between this call and the engine's read, which comes after.
        let asked_at = Millis::now();
        let before = match tail {
            0 => futures_util::stream::empty().boxed(),
            n => self
                .read_logs(backend_id, false, n.to_string(), 0)
                .filter(move |line| stamped(line, |time| time < asked_at))
                .boxed(),
        };
        let since_seconds = asked_at.0.div_euclid(1_000);
        let since = self
            .read_logs(backend_id, true, "all".to_string(), since_seconds)
            .filter(move |line| stamped(line, |time| time >= asked_at));
        before.chain(since).boxed()
    }

    async fn running_address(
        &self,
        backend_id: &BackendName,
    ) -> Result<Option<SocketAddr>, RuntimeError> {
        if self.exit_state(backend_id).await?.is_some() {
            return Ok(None);
        }
        match self.published_address(backend_id).await {
            Ok(address) => Ok(Some(address)),
            Err(RuntimeError::ExitedDuringStart { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }
}

/// The engine's storage driver, as `docker info` tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageDriver {
    /// e.g. `overlay2`, `fuse-overlayfs`, `btrfs`.
    pub name: String,
    /// The filesystem under it, when the engine says (overlay2 does).
    pub backing_filesystem: Option<String>,
    /// Whether `--storage-opt size` works: btrfs, zfs, devicemapper, windowsfilter, and
    /// overlay2 on xfs (which also needs the `pquota` mount option, invisible from here: a
    /// spawn there without it fails with the engine's reason).
    pub disk_limits: bool,
}

impl StorageDriver {
    fn of(info: &bollard::models::SystemInfo) -> Self {
        let name = info.driver.clone().unwrap_or_default();
        let backing_filesystem = info.driver_status.as_ref().and_then(|status| {
            status
                .iter()
                .find(|pair| pair.first().map(String::as_str) == Some("Backing Filesystem"))
                .and_then(|pair| pair.get(1).cloned())
        });
        let disk_limits = match name.as_str() {
            "btrfs" | "zfs" | "devicemapper" | "windowsfilter" => true,
            "overlay2" => backing_filesystem.as_deref() == Some("xfs"),
            _ => false,
        };
        Self {
            name,
            backing_filesystem,
            disk_limits,
        }
    }
}

impl DockerRuntime {
    /// Whether the engine logged an `oom` event for the container (its full ID) between
    /// `since` and now.
    async fn oom_event_since(&self, container_id: &str, since: SystemTime) -> bool {
        let stamp = |at: SystemTime| {
            let at = at.duration_since(UNIX_EPOCH).unwrap_or_default();
            format!("{}.{:09}", at.as_secs(), at.subsec_nanos())
        };
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("event".to_string(), vec!["oom".to_string()]),
            // The engine matches this by prefix; the actor's ID is compared below.
            ("container".to_string(), vec![container_id.to_string()]),
        ]);
        // With `until` not in the future, the engine sends what it logged and ends the
        // stream. An engine whose clock is behind this one's would hold it open until then.
        let events = self.inner.docker.events(Some(EventsOptions {
            since: Some(stamp(since)),
            until: Some(stamp(SystemTime::now())),
            filters,
        }));
        let ours = |event: &Result<bollard::models::EventMessage, BollardError>| {
            let actor = event.as_ref().ok().and_then(|e| e.actor.as_ref());
            std::future::ready(actor.and_then(|a| a.id.as_deref()) == Some(container_id))
        };
        let mut found = std::pin::pin!(events.filter(ours));
        matches!(
            tokio::time::timeout(OOM_EVENTS_TIMEOUT, found.next()).await,
            Ok(Some(_))
        )
    }
}

/// Whether `item` is kept by a filter on its time; errors always are.
fn stamped(
    item: &Result<BackendLogLine, RuntimeError>,
    keep: impl Fn(Millis) -> bool,
) -> std::future::Ready<bool> {
    std::future::ready(item.as_ref().map_or(true, |line| keep(line.time)))
}

/// One line as the engine sends it with timestamps on: `<RFC 3339 time> <text>\n`.
fn log_line(stream: LogStream, message: &[u8]) -> BackendLogLine {
    let message = String::from_utf8_lossy(message);
    let message = message.strip_suffix('\n').unwrap_or(&message);
    let (time, text) = match message.split_once(' ') {
        Some((stamp, text)) => match parse_engine_time(stamp) {
            Some(at) => (at, text),
            None => (SystemTime::now(), message),
        },
        None => match parse_engine_time(message) {
            // An empty line: only the time.
            Some(at) => (at, ""),
            None => (SystemTime::now(), message),
        },
    };
    let millis = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as i64);
    BackendLogLine {
        stream,
        time: Millis(millis),
        text: text.to_string(),
    }
}

/// A time as the engine writes it (RFC 3339, nanoseconds, e.g. in `FinishedAt`); `None`
/// for its zero time (`0001-01-01T00:00:00Z`, "never") and anything unparsable.
fn parse_engine_time(text: &str) -> Option<SystemTime> {
    let at =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    let since_epoch = Duration::try_from(at - time::OffsetDateTime::UNIX_EPOCH).ok()?;
    Some(UNIX_EPOCH + since_epoch)
}

/// Label filters matching exactly this drone's containers: drone names are unique only
/// within a cluster, and several clusters may share one Docker engine.
fn ownership_labels(config: &DockerRuntimeConfig) -> Vec<String> {
    vec![
        format!("{DRONE_LABEL}={}", config.drone),
        format!("{CLUSTER_LABEL}={}", config.cluster),
    ]
}

/// Follows the engine's `die` events for this drone's containers and broadcasts them,
/// re-subscribing (from the last event seen, so nothing is skipped) when the stream ends.
async fn watch_exits(
    docker: Docker,
    labels: Vec<String>,
    exits: broadcast::Sender<ContainerExit>,
    cancel: CancellationToken,
) {
    let mut since = unix_now();
    loop {
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("event".to_string(), vec!["die".to_string()]),
            ("label".to_string(), labels.clone()),
        ]);
        let mut events = docker.events(Some(EventsOptions {
            since: Some(format!("{}.{:09}", since.as_secs(), since.subsec_nanos())),
            until: None,
            filters,
        }));
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => return,
                event = events.next() => event,
            };
            match event {
                Some(Ok(event)) => {
                    if let Some(nanos) = event.time_nano.and_then(|n| u64::try_from(n).ok()) {
                        since = Duration::from_nanos(nanos);
                    }
                    let attributes = event.actor.and_then(|a| a.attributes).unwrap_or_default();
                    let Some(backend_id) = attributes
                        .get(BACKEND_LABEL)
                        .and_then(|b| b.parse::<BackendName>().ok())
                    else {
                        continue;
                    };
                    let exit_code = attributes.get("exitCode").and_then(|c| c.parse().ok());
                    tracing::debug!(backend = %backend_id, ?exit_code, "container died");
                    // No receivers is fine: nobody is waiting on this backend right now.
                    let _ = exits.send(ContainerExit {
                        backend_id,
                        exit_code,
                    });
                }
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "Docker event stream failed; re-subscribing");
                    break;
                }
                None => {
                    tracing::warn!("Docker event stream ended; re-subscribing");
                    break;
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(EVENTS_RESUBSCRIBE_DELAY) => {}
        }
    }
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
}

/// The registry an image reference is pulled from, as Docker reads it (its reference
/// grammar): the first component when it names a host (it has a `.` or a `:`, is
/// `localhost`, or has an uppercase letter, which no repository path may), else Docker Hub.
/// Lowercased, since host names are not case-sensitive.
fn registry_of(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            registry_of_host(first)
        }
        _ => "docker.io".to_string(),
    }
}

/// A registry host as [`registry_of`] compares it: lowercased, and Docker Hub's other names
/// are Docker Hub.
fn registry_of_host(host: &str) -> String {
    match host.to_ascii_lowercase().as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        host => host.to_string(),
    }
}

/// Docker pulls every tag of a repository when given a reference without a tag, so make
/// the implicit `latest` explicit.
fn image_reference_with_tag(image: &str) -> String {
    let last_component = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last_component.contains(':') {
        image.to_string()
    } else {
        format!("{image}:latest")
    }
}

/// Docker's `cpu_period`/`cpu_quota` pair for a backend's limits.
fn cpu_limits(limits: &ResourceLimits) -> (Option<i64>, Option<i64>) {
    match limits.cpu_period_percent {
        Some(percent) => {
            let period = limits.cpu_period.unwrap_or(DEFAULT_CPU_PERIOD_US);
            (Some(period), Some(period * i64::from(percent) / 100))
        }
        None => (limits.cpu_period, None),
    }
}

fn status_of(err: &BollardError) -> Option<u16> {
    match err {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The engine's own message when it gave one, else bollard's description.
fn describe(err: &BollardError) -> String {
    match err {
        BollardError::DockerResponseServerError { message, .. } => message.clone(),
        BollardError::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

fn engine(context: impl Into<String>, err: BollardError) -> RuntimeError {
    let context = context.into();
    RuntimeError::Engine {
        context,
        source: describe(&err).into(),
    }
}

fn not_found_or(err: BollardError, backend_id: &BackendName, context: &str) -> RuntimeError {
    if status_of(&err) == Some(404) {
        RuntimeError::NotFound(backend_id.clone())
    } else {
        engine(format!("{context} for backend {backend_id}"), err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_limits_are_supported_by_the_drivers_docker_documents() {
        let info = |driver: &str, backing: Option<&str>| bollard::models::SystemInfo {
            driver: Some(driver.to_string()),
            driver_status: backing
                .map(|fs| vec![vec!["Backing Filesystem".to_string(), fs.to_string()]]),
            ..Default::default()
        };
        for (driver, backing, supported) in [
            ("overlay2", Some("xfs"), true),
            ("overlay2", Some("extfs"), false),
            ("fuse-overlayfs", None, false),
            ("btrfs", None, true),
            ("zfs", None, true),
            ("vfs", None, false),
        ] {
            let storage = StorageDriver::of(&info(driver, backing));
            assert_eq!(storage.disk_limits, supported, "{driver} on {backing:?}");
            assert_eq!(storage.backing_filesystem.as_deref(), backing);
        }
    }

    #[test]
    fn log_lines_are_split_into_time_and_text() {
        let line = log_line(
            LogStream::Stderr,
            b"2026-12-03T10:47:53.123456789Z hello world\n",
        );
        assert_eq!(line.stream, LogStream::Stderr);
        assert_eq!(line.text, "hello world");
        assert_eq!(line.time, Millis(1_796_294_873_123));
        assert_eq!(
            log_line(LogStream::Stdout, b"2026-12-03T10:47:53Z\n").text,
            ""
        );
        assert_eq!(log_line(LogStream::Stdout, b"no stamp\n").text, "no stamp");
        assert_eq!(parse_engine_time("0001-01-01T00:00:00Z"), None);
    }

    #[test]
    fn untagged_images_pull_latest_only() {
        assert_eq!(image_reference_with_tag("busybox"), "busybox:latest");
        assert_eq!(image_reference_with_tag("busybox:1.36"), "busybox:1.36");
        assert_eq!(
            image_reference_with_tag("localhost:5000/app"),
            "localhost:5000/app:latest"
        );
        assert_eq!(
            image_reference_with_tag("localhost:5000/app:v2"),
            "localhost:5000/app:v2"
        );
        assert_eq!(
            image_reference_with_tag("ghcr.io/a/b@sha256:abcd"),
            "ghcr.io/a/b@sha256:abcd"
        );
    }

    #[test]
    fn an_image_names_its_registry_as_docker_reads_it() {
        for (image, registry) in [
            ("busybox", "docker.io"),
            ("library/busybox:1.36", "docker.io"),
            ("acme/app", "docker.io"),
            ("index.docker.io/acme/app", "docker.io"),
            ("ghcr.io/a/b@sha256:abcd", "ghcr.io"),
            ("localhost/app", "localhost"),
            ("localhost:5000/app:v2", "localhost:5000"),
            ("127.0.0.1:45999/x/y", "127.0.0.1:45999"),
            ("", "docker.io"),
            // Docker reads a first component with capitals as a host, too.
            ("Evil/app", "evil"),
            ("Registry.Example.com:5000/app", "registry.example.com:5000"),
        ] {
            assert_eq!(registry_of(image), registry, "{image}");
        }
    }

    #[test]
    fn cpu_percent_becomes_a_quota_of_the_period() {
        let limits = ResourceLimits {
            cpu_period_percent: Some(50),
            ..Default::default()
        };
        assert_eq!(cpu_limits(&limits), (Some(100_000), Some(50_000)));
        let limits = ResourceLimits {
            cpu_period: Some(20_000),
            cpu_period_percent: Some(25),
            ..Default::default()
        };
        assert_eq!(cpu_limits(&limits), (Some(20_000), Some(5_000)));
        assert_eq!(cpu_limits(&ResourceLimits::default()), (None, None));
    }
}
