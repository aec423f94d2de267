//! `plane drone` command-line flags (each also readable from a `PLANE_*` environment
//! variable), turned into a [`DroneConfig`].

use crate::config::{DroneConfig, OnShutdown, DEFAULT_STATE_DIR};
use clap::Args;
use plane_protocol::names::{ClusterName, NodeName, PoolName};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use url::Url;

/// Run a drone: start backends as Docker containers on behalf of the controller.
#[derive(Clone, Debug, Args)]
pub struct DroneOpts {
    /// Base URL of the controller, http or https, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "PLANE_CONTROLLER_URL")]
    pub controller_url: Url,

    /// A PEM file of CA certificates to trust for an https controller (besides the web's
    /// public roots).
    #[arg(long, env = "PLANE_CONTROLLER_CA")]
    pub controller_ca: Option<PathBuf>,

    /// The cluster this drone serves, e.g. localhost:9090.
    #[arg(long, env = "PLANE_CLUSTER")]
    pub cluster: ClusterName,

    /// This drone's name, unique in the cluster [default: a random `dr-…` name, kept in the
    /// state directory so the drone keeps it across restarts].
    #[arg(long, env = "PLANE_NAME")]
    pub name: Option<NodeName>,

    /// The drone pool this drone serves (empty: the default pool).
    #[arg(long, env = "PLANE_POOL", default_value = "")]
    pub pool: PoolName,

    /// The host IP backend ports are published on; proxies must reach it.
    #[arg(long, env = "PLANE_IP", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub ip: IpAddr,

    /// Milliseconds between heartbeats to the controller (each renews the leases of this
    /// drone's backends; the controller's --lease-ms must cover two of them plus
    /// twice --fence-margin-ms).
    #[arg(long, env = "PLANE_HEARTBEAT_INTERVAL_MS", default_value_t = 2_000)]
    pub heartbeat_interval_ms: u64,

    /// Milliseconds before a lease ends at which a backend whose lease could not be renewed
    /// is stopped (it is killed by half this before the end).
    #[arg(long, env = "PLANE_FENCE_MARGIN_MS", default_value_t = 5_000)]
    pub fence_margin_ms: u64,

    /// Milliseconds between SIGTERM and SIGKILL on a soft terminate.
    #[arg(long, env = "PLANE_STOP_GRACE_PERIOD_MS", default_value_t = 10_000)]
    pub stop_grace_period_ms: u64,

    /// Milliseconds from container start until the backend must answer HTTP.
    #[arg(long, env = "PLANE_STARTUP_TIMEOUT_MS", default_value_t = 60_000)]
    pub startup_timeout_ms: u64,

    /// Cap, in milliseconds, on the backoff between reconnects to the controller.
    #[arg(long, env = "PLANE_RECONNECT_MAX_BACKOFF_MS", default_value_t = 5_000)]
    pub reconnect_max_backoff_ms: u64,

    /// Milliseconds an image pull may take before the backend fails to start.
    #[arg(long, env = "PLANE_PULL_TIMEOUT_MS", default_value_t = 300_000)]
    pub pull_timeout_ms: u64,

    /// The controller's cluster secret (its --cluster-secret), when it requires one. The
    /// controller's bearer token, if any, goes in the URL: `http://TOKEN@host:port`.
    #[arg(long, env = "PLANE_CLUSTER_SECRET")]
    pub cluster_secret: Option<String>,

    /// Directory for the drone's state (unacked events in drone.db); keep it across
    /// restarts. One drone per directory.
    #[arg(long, env = "PLANE_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,

    /// On SIGTERM: `keep` leaves the backends running for the next drone process on this
    /// --state-dir to re-adopt (upgrades users do not notice; the fence still kills them
    /// if none comes back within their leases); `terminate` stops them all first.
    #[arg(long, env = "PLANE_ON_SHUTDOWN", value_enum, default_value_t = OnShutdown::Keep)]
    pub on_shutdown: OnShutdown,

    /// Milliseconds between health checks of each ready backend (HTTP on its ready path).
    #[arg(long, env = "PLANE_HEALTH_CHECK_INTERVAL_MS", default_value_t = 5_000)]
    pub health_check_interval_ms: u64,

    /// Milliseconds a health check may take before it counts as failed.
    #[arg(long, env = "PLANE_HEALTH_CHECK_TIMEOUT_MS", default_value_t = 2_000)]
    pub health_check_timeout_ms: u64,

    /// Failed health checks in a row after which a backend is reported unhealthy.
    #[arg(long, env = "PLANE_UNHEALTHY_AFTER", default_value_t = 3)]
    pub unhealthy_after: u32,

    /// Failed health checks in a row after which a backend is terminated; 0 never.
    #[arg(long, env = "PLANE_TERMINATE_UNHEALTHY_AFTER", default_value_t = 12)]
    pub terminate_unhealthy_after: u32,

    /// An image to pull before the drone takes work (repeatable): preseeding, so the first
    /// backends of it start without waiting for a pull.
    #[arg(
        long = "prepull",
        value_name = "IMAGE",
        env = "PLANE_PREPULL",
        value_delimiter = ','
    )]
    pub prepull: Vec<String>,

    /// `USER:PASSWORD` for the --prepull images' registry (best given in the environment,
    /// as PLANE_PREPULL_CREDENTIALS, to keep it out of process listings).
    #[arg(long, env = "PLANE_PREPULL_CREDENTIALS", hide_env_values = true)]
    pub prepull_credentials: Option<String>,

    /// Directory for backends' volumes (`executable.mount`), bound into them at
    /// /plane-data [default: none; spawns asking for a mount fail].
    #[arg(long, env = "PLANE_MOUNT_BASE")]
    pub mount_base: Option<PathBuf>,

    /// The OCI runtime to run backends under (e.g. runsc for gVisor); it must be
    /// configured in the Docker engine [default: the engine's].
    #[arg(long, env = "PLANE_DOCKER_RUNTIME")]
    pub docker_runtime: Option<String>,

    /// The Docker network backends join unless their spawn names one [default: Docker's
    /// default bridge].
    #[arg(long, env = "PLANE_DOCKER_NETWORK")]
    pub docker_network: Option<String>,

    /// How long a stopped backend's container, and with it its logs
    /// (`GET /ctrl/b/:backend/logs`), is kept; 0 removes it at once.
    #[arg(long, env = "PLANE_LOG_RETENTION_SECONDS", default_value_t = 3_600)]
    pub log_retention_seconds: u64,

    /// The most disk one backend's logs take (the oldest lines are dropped beyond it); at
    /// least 65536.
    #[arg(long, env = "PLANE_LOG_MAX_BYTES", default_value_t = crate::config::default_log_max_bytes())]
    pub log_max_bytes: u64,

    /// Pull images only from this registry (repeatable; `docker.io` for Docker Hub, else a
    /// host with an optional port, as in image references). A backend whose image would
    /// have to be pulled from another fails to start, saying so; images already on the
    /// drone run whatever their registry [default: any registry].
    #[arg(
        long = "allowed-registry",
        value_name = "REGISTRY",
        env = "PLANE_ALLOWED_REGISTRIES",
        value_delimiter = ','
    )]
    pub allowed_registries: Vec<String>,

    /// Serve Prometheus metrics at /metrics on this port of --ip [default: off].
    #[arg(long, env = "PLANE_METRICS_PORT")]
    pub metrics_port: Option<u16>,
}

/// The engine splits long lines into 16 KiB pieces; below this, each of the two log files
/// would hold barely one.
const MIN_LOG_MAX_BYTES: u64 = 65_536;

impl DroneOpts {
    pub fn into_config(self) -> anyhow::Result<DroneConfig> {
        let name = match self.name {
            Some(name) => name,
            None => crate::config::stable_drone_name(&self.state_dir)?,
        };
        let config = DroneConfig {
            name,
            pool: self.pool,
            ip: self.ip,
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            fence_margin_ms: self.fence_margin_ms,
            stop_grace_period_ms: self.stop_grace_period_ms,
            startup_timeout_ms: self.startup_timeout_ms,
            reconnect_max_backoff_ms: self.reconnect_max_backoff_ms,
            pull_timeout_ms: self.pull_timeout_ms,
            cluster_secret: self.cluster_secret,
            controller_ca: self.controller_ca,
            state_dir: self.state_dir,
            on_shutdown: self.on_shutdown,
            health_check_interval_ms: self.health_check_interval_ms,
            health_check_timeout_ms: self.health_check_timeout_ms,
            unhealthy_after: self.unhealthy_after,
            terminate_unhealthy_after: self.terminate_unhealthy_after,
            mount_base: self.mount_base,
            prepull: self.prepull,
            prepull_credentials: match self.prepull_credentials {
                None => None,
                Some(pair) => match pair.split_once(':') {
                    Some((username, password)) if !username.is_empty() => {
                        Some(plane_protocol::api::RegistryCredentials {
                            username: username.to_string(),
                            password: password.to_string(),
                        })
                    }
                    _ => anyhow::bail!("--prepull-credentials must be USER:PASSWORD"),
                },
            },
            docker_runtime: self.docker_runtime,
            docker_network: self.docker_network,
            log_retention_seconds: self.log_retention_seconds,
            log_max_bytes: self.log_max_bytes,
            metrics_port: self.metrics_port,
            allowed_registries: (!self.allowed_registries.is_empty()).then(|| {
                self.allowed_registries
                    .iter()
                    .map(|registry| registry.trim().to_ascii_lowercase())
                    .collect()
            }),
            // This very binary: `plane drone-fence` guards the leases if the drone dies.
            fence_executable: std::env::current_exe().ok(),
            ..DroneConfig::new(self.controller_url, self.cluster)
        };
        anyhow::ensure!(
            config.heartbeat_interval_ms > 0,
            "--heartbeat-interval-ms must be at least 1"
        );
        anyhow::ensure!(
            config.fence_margin_ms >= 2,
            "--fence-margin-ms must be at least 2"
        );
        anyhow::ensure!(
            config.log_max_bytes >= MIN_LOG_MAX_BYTES,
            "--log-max-bytes must be at least {MIN_LOG_MAX_BYTES}, got {}",
            config.log_max_bytes
        );
        for registry in config.allowed_registries.iter().flatten() {
            anyhow::ensure!(
                !registry.is_empty()
                    && !registry.contains('/')
                    && !registry.contains(char::is_whitespace),
                "--allowed-registry {registry:?} must be a registry host (with an optional \
                 port, e.g. registry.example.com:5000) or docker.io, without a scheme or path"
            );
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        drone: DroneOpts,
    }

    #[test]
    fn flags_become_config_with_defaults() {
        let cli = Cli::try_parse_from([
            "drone",
            "--controller-url",
            "http://127.0.0.1:8080",
            "--cluster",
            "localhost:9090",
            "--name",
            "dr-test",
            "--stop-grace-period-ms",
            "250",
        ])
        .expect("parses");
        let config = cli.drone.into_config().expect("valid config");
        assert_eq!(config.name.as_str(), "dr-test");
        assert_eq!(config.stop_grace_period_ms, 250);
        assert_eq!(config.heartbeat_interval_ms, 2_000);
        assert_eq!(config.ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(config.pool.is_default());
        assert_eq!(config.state_dir, PathBuf::from("./.plane-drone"));
    }
}
