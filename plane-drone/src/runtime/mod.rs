//! The container runtime the drone drives, behind a trait so the backend lifecycle does not
//! depend on Docker (and can be exercised against a fake in unit tests).

pub mod docker;
#[cfg(test)]
pub(crate) mod fake;
pub mod measured;

use futures_util::stream::BoxStream;
use plane_protocol::api::{BackendLogLine, ExecutorConfig, Gpus, ResourceLimits};
use plane_protocol::names::BackendName;
use std::future::Future;
use std::net::SocketAddr;
use std::time::SystemTime;

/// Everything the runtime needs to create and start one backend's container.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendSpec {
    pub backend_id: BackendName,
    /// Image reference, already prepared with [`Runtime::prepare_image`].
    pub image: String,
    /// The complete environment, Plane's reserved variables included.
    pub env: Vec<(String, String)>,
    pub resource_limits: ResourceLimits,
    /// The spawn's Docker network, if it named one.
    pub network: Option<String>,
    pub gpus: Option<Gpus>,
    /// A host directory to bind at `/plane-data`.
    pub mount: Option<std::path::PathBuf>,
    /// The path its readiness and health are probed on, kept with the container so a later
    /// run of the drone that re-adopts it probes the same one.
    pub ready_path: String,
    /// A warm-pool backend waiting for its claim; kept with the container so a later run
    /// of the drone that re-adopts it waits for (or is re-sent) its claim.
    pub warm: bool,
}

/// What a backend's container records about it, for a later run of the drone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    /// [`BackendSpec::ready_path`] (absent on older containers).
    pub ready_path: Option<String>,
    /// [`BackendSpec::warm`].
    pub warm: bool,
}

/// A signal the drone sends to a backend's process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: please exit.
    Term,
    /// SIGKILL: exit now.
    Kill,
}

impl Signal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Term => "SIGTERM",
            Self::Kill => "SIGKILL",
        }
    }
}

/// Why a runtime operation failed; the lifecycle branches on these.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The image is missing and could not (or may not) be pulled.
    #[error("image {image:?} is not available: {message}")]
    ImageUnavailable { image: String, message: String },
    /// The backend has no container (never created, or already removed).
    #[error("backend {0} has no container")]
    NotFound(BackendName),
    /// The backend's container exists but its process is not running.
    #[error("the container of backend {0} is not running")]
    NotRunning(BackendName),
    /// The process exited while the container was being started.
    #[error("backend {backend_id} exited during start (exit code {exit_code:?})")]
    ExitedDuringStart {
        backend_id: BackendName,
        exit_code: Option<i32>,
    },
    /// Any other failure of the engine or of the request to it.
    #[error("{context}: {source}")]
    Engine {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What the drone needs from a container engine. Every method is idempotent enough to be
/// retried, and every future is `Send` so each backend's lifecycle can run in its own task.
pub trait Runtime: Clone + Send + Sync + 'static {
    /// Makes the image available locally according to its pull policy (pulling with the
    /// given credentials when needed).
    fn prepare_image(
        &self,
        executable: &ExecutorConfig,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Creates and starts the backend's container and returns the address its port is
    /// published on. On failure nothing is left behind.
    fn start_backend(
        &self,
        spec: &BackendSpec,
    ) -> impl Future<Output = Result<SocketAddr, RuntimeError>> + Send;

    /// Sends a signal to the backend's process.
    fn signal(
        &self,
        backend_id: &BackendName,
        signal: Signal,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Resolves once the backend's process has exited (at once if it already has), with its
    /// exit code when known. [`RuntimeError::NotFound`] if there is no container.
    fn wait_exit(
        &self,
        backend_id: &BackendName,
    ) -> impl Future<Output = Result<Option<i32>, RuntimeError>> + Send;

    /// Removes the backend's container, killing it if it still runs. Removing a container
    /// that does not exist succeeds.
    fn remove(
        &self,
        backend_id: &BackendName,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// The backends that have a container (running or not) belonging to this drone.
    fn list_backends(&self) -> impl Future<Output = Result<Vec<BackendName>, RuntimeError>> + Send;

    /// Whether the backend's process was killed for exceeding its memory limit (asked after
    /// it exited, before its container is removed; `NotFound` once it is gone). Right after
    /// the exit the engine may not know yet; a `false` then is worth asking again.
    fn oom_killed(
        &self,
        backend_id: &BackendName,
    ) -> impl Future<Output = Result<bool, RuntimeError>> + Send;

    /// What was recorded with the backend's container (nothing if it has none).
    fn recorded(&self, backend_id: &BackendName) -> impl Future<Output = Recorded> + Send;

    /// Whether containers can be given a disk limit (`disk_limit_bytes`).
    fn supports_disk_limits(&self) -> bool;

    /// Whether the backend has a container (running or stopped).
    fn has_container(
        &self,
        backend_id: &BackendName,
    ) -> impl Future<Output = Result<bool, RuntimeError>> + Send;

    /// The backends whose container is kept after its process exited, with when it exited
    /// (for the log retention sweep).
    fn exited_backends(
        &self,
    ) -> impl Future<Output = Result<Vec<(BackendName, SystemTime)>, RuntimeError>> + Send;

    /// What the backend printed (stdout and stderr, oldest first): the last `tail` lines or
    /// all of them, and with `follow` every line printed after this call (even before the
    /// stream is first read), once, until the process exits. Pulled as it is read, so a
    /// slow reader holds the engine back rather than filling memory.
    /// [`RuntimeError::NotFound`] (as the first item) when the container is gone.
    fn logs(
        &self,
        backend_id: &BackendName,
        follow: bool,
        tail: Option<u64>,
    ) -> BoxStream<'static, Result<BackendLogLine, RuntimeError>>;

    /// Where a backend's running container is published, or `None` if it is not running.
    fn running_address(
        &self,
        backend_id: &BackendName,
    ) -> impl Future<Output = Result<Option<SocketAddr>, RuntimeError>> + Send;
}
