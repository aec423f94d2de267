//! `plane controller` command-line options.

use super::config::ControllerConfig;
use clap::Args;
use plane_protocol::names::ClusterName;
use std::net::{IpAddr, SocketAddr};
use url::Url;

#[derive(Args, Debug, Clone)]
pub struct ControllerOpts {
    /// Database: a postgres:// URL, or a SQLite file path.
    #[arg(long, env = "PLANE_DB", default_value = "./.plane/plane.db")]
    pub db: String,
    /// Address to listen on.
    #[arg(long, env = "PLANE_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on.
    #[arg(long, env = "PLANE_PORT", default_value_t = 8080)]
    pub port: u16,
    /// URL this controller is reachable at (used in status URLs).
    #[arg(long, env = "PLANE_PUBLIC_URL")]
    pub public_url: Option<Url>,
    /// URL the other controllers on the database reach this one at, for requests to the
    /// nodes connected here (logs, prepulls) [default: --public-url].
    #[arg(long, env = "PLANE_PEER_URL")]
    pub peer_url: Option<Url>,
    /// Cluster for spawn configs that name none.
    #[arg(long, env = "PLANE_DEFAULT_CLUSTER")]
    pub default_cluster: Option<ClusterName>,
    /// Milliseconds between sweeps for idle, expired or lost backends.
    #[arg(long, env = "PLANE_SWEEP_INTERVAL_MS", default_value_t = 1000)]
    pub sweep_interval_ms: u64,
    /// Milliseconds a proxy's route request may wait for a starting backend.
    #[arg(long, env = "PLANE_ROUTE_WAIT_TIMEOUT_MS", default_value_t = 60_000)]
    pub route_wait_timeout_ms: u64,
    /// Milliseconds one renewal keeps a backend's key lease (drones renew every heartbeat).
    #[arg(long, env = "PLANE_LEASE_MS", default_value_t = 15_000)]
    pub lease_ms: u64,
    /// Milliseconds of silence after which a drone is marked lost (at least --lease-ms).
    #[arg(long, env = "PLANE_LOST_WINDOW_MS", default_value_t = 30_000)]
    pub lost_window_ms: u64,
    /// A bearer token `/ctrl/*` accepts; repeat for several. Without any (and without
    /// --ctrl-token-file), `/ctrl/*` is open to anyone who can reach it.
    #[arg(long = "ctrl-token", env = "PLANE_CTRL_TOKEN", value_delimiter = ',')]
    pub ctrl_tokens: Vec<String>,
    /// A file of bearer tokens, one per line, re-read on SIGHUP.
    #[arg(long, env = "PLANE_CTRL_TOKEN_FILE")]
    pub ctrl_token_file: Option<std::path::PathBuf>,
    /// A secret every drone, proxy and DNS server must present to join (their
    /// --cluster-secret).
    #[arg(long, env = "PLANE_CLUSTER_SECRET")]
    pub cluster_secret: Option<String>,
    /// A new backend goes to the least loaded of this many drones drawn at random from its
    /// pool.
    #[arg(long, env = "PLANE_PLACEMENT_BEST_OF", default_value_t = 2)]
    pub placement_best_of: usize,
    /// Delete terminated backends (with their statuses, tokens and actions), acked actions
    /// and ended tokens older than this many days, in small batches; 0 keeps everything.
    /// Keys are never deleted (their fencing tokens must keep growing).
    #[arg(long, env = "PLANE_RETENTION_DAYS", default_value_t = 7)]
    pub retention_days: u64,
    /// At most this many backends of a cluster may be starting (between scheduled and
    /// ready) at once; past it a connect or spawn that would start one gets 429 with
    /// Retry-After, and joining a running backend is still served [default: no limit].
    #[arg(long, env = "PLANE_MAX_CONCURRENT_SPAWNS")]
    pub max_concurrent_spawns: Option<u32>,
    /// At most this many live backends may hold keys of one namespace; past it a connect
    /// that would start one gets 429 with Retry-After [default: no limit].
    #[arg(long, env = "PLANE_MAX_BACKENDS_PER_NAMESPACE")]
    pub max_backends_per_namespace: Option<u32>,
    /// Serve Prometheus metrics at /metrics on this port too, without a token (they are also
    /// at /metrics on the API port, behind --ctrl-token when it is set).
    #[arg(long, env = "PLANE_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// A cluster (with a port) whose proxies serve HTTPS there: its URLs are https://
    /// (repeatable). Clusters without a port, or on 443, are HTTPS anyway.
    #[arg(
        long = "https-cluster",
        env = "PLANE_HTTPS_CLUSTER",
        value_delimiter = ','
    )]
    pub https_clusters: Vec<plane_protocol::names::ClusterName>,
}

impl ControllerOpts {
    pub fn into_config(self) -> anyhow::Result<ControllerConfig> {
        let config = ControllerConfig {
            listen: SocketAddr::new(self.host, self.port),
            public_url: self.public_url,
            peer_url: self.peer_url,
            default_cluster: self.default_cluster,
            sweep_interval_ms: self.sweep_interval_ms,
            route_wait_timeout_ms: self.route_wait_timeout_ms,
            lease_ms: self.lease_ms,
            lost_window_ms: self.lost_window_ms,
            ctrl_tokens: self.ctrl_tokens,
            ctrl_token_file: self.ctrl_token_file,
            cluster_secret: self.cluster_secret,
            placement_best_of: self.placement_best_of,
            retention_ms: self.retention_days.saturating_mul(super::config::DAY_MS),
            max_concurrent_spawns: self.max_concurrent_spawns,
            max_backends_per_namespace: self.max_backends_per_namespace,
            metrics_port: self.metrics_port,
            https_clusters: self.https_clusters,
            ..ControllerConfig::new(self.db)
        };
        config.validate()?;
        Ok(config)
    }
}
