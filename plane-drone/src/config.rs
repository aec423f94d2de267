//! The drone's configuration: a plain serde struct, built from the command line by
//! [`crate::cli::DroneOpts`] or directly by `plane dev` and tests.

use anyhow::Context;
use plane_protocol::names::{ClusterName, NodeName, PoolName};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use url::Url;

/// Everything a drone needs to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DroneConfig {
    /// Base HTTP(S) URL of the controller, e.g. `http://127.0.0.1:8080`. The drone connects
    /// its WebSocket to `<this with ws/wss scheme>/ctrl/c/<cluster>/drone-socket`.
    pub controller_url: Url,
    /// A PEM file of CA certificates to trust for an `https` controller, besides the web's
    /// public roots.
    #[serde(default)]
    pub controller_ca: Option<PathBuf>,
    /// The cluster this drone serves.
    pub cluster: ClusterName,
    /// This drone's name, unique within the cluster. Containers are labelled with it, so a
    /// drone restarted under the same name cleans up what its previous run left behind.
    pub name: NodeName,
    /// The drone pool this drone serves; empty for the cluster's default pool.
    #[serde(default)]
    pub pool: PoolName,
    /// The host IP address backend ports are published on; proxies connect to backends at
    /// this address, so it must be reachable from them.
    #[serde(default = "default_ip")]
    pub ip: IpAddr,
    /// Milliseconds between heartbeats to the controller.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// Milliseconds before a backend's key lease ends (as this drone counts it) at which the
    /// drone starts stopping a backend whose lease it could not renew; it kills it no later
    /// than half this before the end. The controller refuses a drone unless its lease is at
    /// least two heartbeat intervals plus twice this margin.
    #[serde(default = "default_fence_margin_ms")]
    pub fence_margin_ms: u64,
    /// Milliseconds a soft-terminated backend gets between SIGTERM and SIGKILL.
    #[serde(default = "default_stop_grace_period_ms")]
    pub stop_grace_period_ms: u64,
    /// Milliseconds from container start until the backend must answer HTTP on its port;
    /// after that it is killed and reported `terminated{startuptimeout}`.
    #[serde(default = "default_startup_timeout_ms")]
    pub startup_timeout_ms: u64,
    /// Upper bound, in milliseconds, of the exponential backoff between attempts to
    /// reconnect to the controller (the first retry waits about 100 ms).
    #[serde(default = "default_reconnect_max_backoff_ms")]
    pub reconnect_max_backoff_ms: u64,
    /// Milliseconds an image pull may take before the backend fails to start. Bounds the
    /// `loading` status when a registry hangs rather than refusing.
    #[serde(default = "default_pull_timeout_ms")]
    pub pull_timeout_ms: u64,
    /// The cluster secret the controller requires of nodes (its `--cluster-secret`).
    #[serde(default)]
    pub cluster_secret: Option<String>,
    /// Directory for the drone's local state, created if missing: `drone.db`, a SQLite
    /// file holding status events until the controller acknowledges them, so they survive
    /// a restart. One drone per directory (a second one fails to start); keep it across
    /// restarts, e.g. on a volume, or unacked events are lost.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The `plane` executable to run the fence with (`plane drone-fence`): a process that
    /// outlives the drone and kills its containers if the drone dies and their leases run
    /// out. `None` runs no fence (drones inside a test process, which cannot start one).
    #[serde(default)]
    pub fence_executable: Option<PathBuf>,
    /// What a clean shutdown (SIGTERM) does to the backends (default `keep`).
    #[serde(default)]
    pub on_shutdown: OnShutdown,
    /// Milliseconds between health checks of each ready backend. Default 5000.
    #[serde(default = "default_health_check_interval_ms")]
    pub health_check_interval_ms: u64,
    /// Milliseconds a health check may take before it fails. Default 2000.
    #[serde(default = "default_health_check_timeout_ms")]
    pub health_check_timeout_ms: u64,
    /// Failed checks in a row after which a backend is reported unhealthy. Default 3.
    #[serde(default = "default_unhealthy_after")]
    pub unhealthy_after: u32,
    /// Failed checks in a row after which a backend is terminated (`lost`); 0 never.
    /// Default 12 (a minute at the default interval).
    #[serde(default = "default_terminate_unhealthy_after")]
    pub terminate_unhealthy_after: u32,
    /// Images to pull before the drone takes work (`--prepull`).
    #[serde(default)]
    pub prepull: Vec<String>,
    /// Registry credentials for those pulls, if their registry needs them.
    #[serde(default)]
    pub prepull_credentials: Option<plane_protocol::api::RegistryCredentials>,
    /// Where backends' volumes (`executable.mount`) live; spawns asking for one fail when
    /// this is `None`.
    #[serde(default)]
    pub mount_base: Option<PathBuf>,
    /// The OCI runtime backends run under (e.g. `runsc`); the engine's default if `None`.
    #[serde(default)]
    pub docker_runtime: Option<String>,
    /// The Docker network backends join unless their spawn names one; the default bridge
    /// if `None`.
    #[serde(default)]
    pub docker_network: Option<String>,
    /// How long a stopped backend's container, and so its logs, is kept (default an hour;
    /// 0: removed at once, logs gone with it).
    #[serde(default = "default_log_retention_seconds")]
    pub log_retention_seconds: u64,
    /// The most disk one backend's logs take (default 16 MiB); older lines are dropped
    /// beyond it.
    #[serde(default = "default_log_max_bytes")]
    pub log_max_bytes: u64,
    /// Where the drone registers its metrics (`plane dev` shares one with its other
    /// components).
    #[serde(skip)]
    pub metrics: plane_metrics::MetricsRegistry,
    /// Serve Prometheus metrics at /metrics on this port of `--ip` (off when `None`).
    #[serde(default)]
    pub metrics_port: Option<u16>,
    /// The only registries images are pulled from (`--allowed-registry`); any when `None`.
    #[serde(default)]
    pub allowed_registries: Option<Vec<String>>,
}

/// What a drone does with its backends when it shuts down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnShutdown {
    /// Leave them running, under their leases and the fence, for the next drone process on
    /// this `--state-dir` to re-adopt: an upgrade or restart that users do not notice. If no
    /// drone comes back in time, the fence kills them when their leases run out and the
    /// controller reports them lost.
    #[default]
    Keep,
    /// Stop every backend (`terminated{lost}`) and remove its container (and with it the
    /// containers kept for their logs) before exiting.
    Terminate,
}

fn default_log_retention_seconds() -> u64 {
    3_600
}

pub(crate) fn default_log_max_bytes() -> u64 {
    16 * 1024 * 1024
}

fn default_ip() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

fn default_heartbeat_interval_ms() -> u64 {
    2_000
}

fn default_fence_margin_ms() -> u64 {
    5_000
}

fn default_stop_grace_period_ms() -> u64 {
    10_000
}

fn default_startup_timeout_ms() -> u64 {
    60_000
}

fn default_health_check_interval_ms() -> u64 {
    5_000
}

fn default_health_check_timeout_ms() -> u64 {
    2_000
}

fn default_unhealthy_after() -> u32 {
    3
}

fn default_terminate_unhealthy_after() -> u32 {
    12
}

fn default_reconnect_max_backoff_ms() -> u64 {
    5_000
}

fn default_pull_timeout_ms() -> u64 {
    300_000
}

/// Relative to the working directory, like `--state-dir`'s default.
pub(crate) fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

/// The default of [`DroneConfig::state_dir`] and `--state-dir`.
pub const DEFAULT_STATE_DIR: &str = "./.plane-drone";

impl DroneConfig {
    /// A configuration with every optional field at its default and a random drone name.
    /// Drones running side by side (tests, `plane dev`) must each be given their own
    /// `state_dir`.
    pub fn new(controller_url: Url, cluster: ClusterName) -> Self {
        Self {
            controller_url,
            controller_ca: None,
            cluster,
            name: NodeName::new_random("dr"),
            pool: PoolName::default(),
            ip: default_ip(),
            heartbeat_interval_ms: default_heartbeat_interval_ms(),
            fence_margin_ms: default_fence_margin_ms(),
            stop_grace_period_ms: default_stop_grace_period_ms(),
            startup_timeout_ms: default_startup_timeout_ms(),
            reconnect_max_backoff_ms: default_reconnect_max_backoff_ms(),
            pull_timeout_ms: default_pull_timeout_ms(),
            cluster_secret: None,
            state_dir: default_state_dir(),
            fence_executable: None,
            on_shutdown: OnShutdown::default(),
            health_check_interval_ms: default_health_check_interval_ms(),
            health_check_timeout_ms: default_health_check_timeout_ms(),
            unhealthy_after: default_unhealthy_after(),
            terminate_unhealthy_after: default_terminate_unhealthy_after(),
            docker_runtime: None,
            docker_network: None,
            log_retention_seconds: default_log_retention_seconds(),
            log_max_bytes: default_log_max_bytes(),
            metrics: Default::default(),
            metrics_port: None,
            allowed_registries: None,
            mount_base: None,
            prepull: Vec::new(),
            prepull_credentials: None,
        }
    }

    pub(crate) fn health(&self) -> crate::lifecycle::HealthSettings {
        crate::lifecycle::HealthSettings {
            // Zero intervals would make `tokio::time::interval` panic.
            interval: Duration::from_millis(self.health_check_interval_ms.max(1)),
            timeout: Duration::from_millis(self.health_check_timeout_ms.max(1)),
            unhealthy_after: self.unhealthy_after.max(1),
            terminate_after: (self.terminate_unhealthy_after > 0)
                .then_some(self.terminate_unhealthy_after),
        }
    }

    pub(crate) fn log_retention(&self) -> Duration {
        Duration::from_secs(self.log_retention_seconds)
    }

    pub(crate) fn heartbeat_interval(&self) -> Duration {
        // A zero interval would make `tokio::time::interval` panic.
        Duration::from_millis(self.heartbeat_interval_ms.max(1))
    }

    pub(crate) fn fence_margin(&self) -> Duration {
        Duration::from_millis(self.fence_margin_ms)
    }

    pub(crate) fn stop_grace_period(&self) -> Duration {
        Duration::from_millis(self.stop_grace_period_ms)
    }

    pub(crate) fn startup_timeout(&self) -> Duration {
        Duration::from_millis(self.startup_timeout_ms)
    }

    pub(crate) fn reconnect_max_backoff(&self) -> Duration {
        Duration::from_millis(self.reconnect_max_backoff_ms.max(1))
    }

    /// How the drone links to its controller.
    pub fn link_config(&self) -> plane_link::LinkConfig {
        plane_link::LinkConfig {
            controller: self.controller_url.clone(),
            kind: plane_link::SocketKind::Drone(self.cluster.clone()),
            cluster_secret: self.cluster_secret.clone(),
            ca_file: self.controller_ca.clone(),
            max_backoff: self.reconnect_max_backoff(),
        }
    }

    pub(crate) fn pull_timeout(&self) -> Duration {
        Duration::from_millis(self.pull_timeout_ms)
    }
}

/// The name kept in `state_dir`, or a new random `dr-…` one stored there. Stable per state
/// directory, so a restarted drone finds (and cleans up or re-adopts) its own containers, and
/// unique per directory, so two drones on one host never take each other's name (as they did
/// when the default was the hostname).
pub fn stable_drone_name(state_dir: &Path) -> anyhow::Result<NodeName> {
    let file = state_dir.join(NAME_FILE);
    match std::fs::read_to_string(&file) {
        Ok(stored) => {
            return stored.trim().parse().with_context(|| {
                format!(
                    "{} holds no valid drone name; fix or delete it",
                    file.display()
                )
            })
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => {
            return Err(err).with_context(|| format!("reading {} (--state-dir)", file.display()))
        }
    }
    std::fs::create_dir_all(state_dir).with_context(|| {
        format!(
            "creating the state directory {} (--state-dir)",
            state_dir.display()
        )
    })?;
    // A state directory of a drone from before names were kept here: that drone was named
    // for its host, and its containers are labelled so; keep the name to find them.
    let upgraded = state_dir.join(crate::event_store::DB_FILE).exists();
    let name = match hostname_node_name() {
        Some(hostname) if upgraded => hostname,
        _ => NodeName::new_random("dr"),
    };
    // Written whole under a temporary name, then renamed: a crash never leaves half a name.
    let partial = state_dir.join(format!("{NAME_FILE}.partial"));
    std::fs::write(&partial, format!("{name}\n"))
        .and_then(|()| std::fs::rename(&partial, &file))
        .with_context(|| format!("storing the drone's name in {}", file.display()))?;
    Ok(name)
}

/// The machine's hostname as a node name, when it is a valid one (the default name of drones
/// before names were kept in the state directory).
fn hostname_node_name() -> Option<NodeName> {
    let from_kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    let raw = from_kernel.or_else(|| std::env::var("HOSTNAME").ok())?;
    raw.trim().parse().ok()
}

/// The file in the state directory that holds the drone's generated name.
const NAME_FILE: &str = "drone-name";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_optional_fields_take_their_defaults() {
        let config: DroneConfig = serde_json::from_str(
            r#"{"controller_url": "http://127.0.0.1:8080", "cluster": "localhost:9090", "name": "dr-1"}"#,
        )
        .expect("parses");
        let url: Url = "http://127.0.0.1:8080".parse().expect("valid url");
        let cluster: ClusterName = "localhost:9090".parse().expect("valid cluster");
        let expected = DroneConfig {
            name: "dr-1".parse().expect("valid name"),
            ..DroneConfig::new(url, cluster)
        };
        assert_eq!(config, expected);
    }

    #[test]
    fn a_drone_without_a_name_keeps_one_per_state_directory() {
        let root = std::env::temp_dir().join(format!("plane-drone-name-{}", std::process::id()));
        let (a, b) = (root.join("a"), root.join("b"));
        let first = stable_drone_name(&a).expect("a name");
        assert!(first.as_str().starts_with("dr-"), "{first}");
        assert_eq!(stable_drone_name(&a).expect("the same name"), first);
        assert_ne!(stable_drone_name(&b).expect("another name"), first);

        // A drone from before names were kept here was named for its host.
        let old = root.join("old");
        std::fs::create_dir_all(&old).expect("old state dir");
        std::fs::write(old.join(crate::event_store::DB_FILE), "").expect("old event store");
        let kept = stable_drone_name(&old).expect("a name");
        if let Some(hostname) = hostname_node_name() {
            assert_eq!(kept, hostname);
        }

        std::fs::write(a.join(NAME_FILE), "not a name!\n").expect("write");
        let err = stable_drone_name(&a).expect_err("a bad stored name is refused");
        assert!(format!("{err:#}").contains("drone-name"), "{err:#}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
