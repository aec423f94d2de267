//! `plane controller` command-line options.

use super::config::ControllerConfig;
use clap::Args;
use plane_protocol::names::ClusterName;
use std::net::IpAddr;
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
    /// Cluster for spawn configs that name none.
    #[arg(long, env = "PLANE_DEFAULT_CLUSTER")]
    pub default_cluster: Option<ClusterName>,
    /// Milliseconds between sweeps for idle or expired backends.
    #[arg(long, env = "PLANE_SWEEP_INTERVAL_MS", default_value_t = 1000)]
    pub sweep_interval_ms: u64,
}

impl ControllerOpts {
    pub fn into_config(self) -> ControllerConfig {
        ControllerConfig {
            public_url: self.public_url,
            default_cluster: self.default_cluster,
            sweep_interval_ms: self.sweep_interval_ms,
            ..ControllerConfig::new(self.db)
        }
    }
}
