//! The controller's configuration, as plain serde data.

use plane_protocol::names::ClusterName;
use serde::{Deserialize, Serialize};
use url::Url;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ControllerConfig {
    /// Database to use: `postgres://user:pass@host/db`, `sqlite:///path/plane.db`, or a
    /// plain file path (SQLite).
    pub db: String,
    /// Base URL apps and browsers reach this controller at; used to build `status_url`.
    /// Defaults to `http://<listen address>`.
    pub public_url: Option<Url>,
    /// Cluster used when a spawn config names none.
    pub default_cluster: Option<ClusterName>,
    /// How often the sweeper looks for idle or expired backends, in milliseconds.
    pub sweep_interval_ms: u64,
    /// How long a proxy's route request may wait for a starting backend to become ready,
    /// in milliseconds.
    pub route_wait_timeout_ms: u64,
}

impl ControllerConfig {
    pub fn new(db: impl Into<String>) -> Self {
        Self {
            db: db.into(),
            public_url: None,
            default_cluster: None,
            sweep_interval_ms: 1000,
            route_wait_timeout_ms: 60_000,
        }
    }
}
