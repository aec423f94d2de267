//! The controller's configuration, as plain serde data.

use plane_protocol::names::ClusterName;
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use url::Url;

/// The longest lease accepted: a day. Longer ones only delay recovery from a lost drone.
const MAX_LEASE_MS: u64 = 24 * 60 * 60 * 1000;
/// The longest lost window accepted: a week.
const MAX_LOST_WINDOW_MS: u64 = 7 * 24 * 60 * 60 * 1000;
/// The shortest `route_wait_timeout_ms` accepted: proxies ask again after each one.
pub const MIN_ROUTE_WAIT_MS: u64 = 1_000;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ControllerConfig {
    /// Address [`super::run`] listens on (tests and `plane dev` bind their own listener).
    pub listen: SocketAddr,
    /// Database to use: `postgres://user:pass@host/db`, `sqlite:///path/plane.db`, or a
    /// plain file path (SQLite).
    pub db: String,
    /// Base URL apps and browsers reach this controller at; used to build `status_url`.
    /// Defaults to `http://<listen address>`.
    pub public_url: Option<Url>,
    /// Base URL the other controllers on the database reach this one at, to pass it
    /// requests for the nodes connected here (logs, prepulls). Defaults to `public_url`;
    /// set it when that is a load balancer's.
    pub peer_url: Option<Url>,
    /// Cluster used when a spawn config names none.
    pub default_cluster: Option<ClusterName>,
    /// How often the sweeper looks for idle, expired or lost backends, in milliseconds.
    pub sweep_interval_ms: u64,
    /// How long a proxy's route request may wait for a starting backend to become ready,
    /// in milliseconds; then it is answered "still starting" and the proxy may ask again.
    pub route_wait_timeout_ms: u64,
    /// How long one renewal keeps a backend's key lease, in milliseconds. Drones renew on
    /// every heartbeat, so this must be at least two of their heartbeat intervals (plus
    /// twice their fencing margin); a drone whose heartbeat does not fit is refused at hello.
    pub lease_ms: u64,
    /// A drone silent for this many milliseconds is marked lost and its backends
    /// `terminated{lost}`. At least `lease_ms`, so that no drone is declared lost while a
    /// lease it holds could still be valid.
    pub lost_window_ms: u64,
    /// Bearer tokens `/ctrl/*` accepts (`Authorization: Bearer TOKEN`). With none here and
    /// no token file, `/ctrl/*` is open.
    #[serde(default)]
    pub ctrl_tokens: Vec<String>,
    /// More tokens, one per line (blank lines and `#` comments skipped), re-read on SIGHUP.
    /// Set, it turns auth on even while it holds no token.
    #[serde(default)]
    pub ctrl_token_file: Option<PathBuf>,
    /// Every drone, proxy and DNS server must present this to open its socket.
    #[serde(default)]
    pub cluster_secret: Option<String>,
    /// A new backend goes to the least loaded of this many drones drawn at random from its
    /// pool (at least 1; 2 is the default, a large number means "the least loaded of all").
    #[serde(default = "default_placement_best_of")]
    pub placement_best_of: usize,
    /// Terminated backends (with their statuses, tokens and actions), acked actions and
    /// ended tokens older than this many milliseconds are deleted; 0 keeps everything.
    /// `--retention-days` (default 7).
    #[serde(default = "default_retention_ms")]
    pub retention_ms: u64,
    /// Backends of one cluster that may be starting (scheduled to ready) at once; a spawn
    /// past it gets 429. No limit when `None`.
    #[serde(default)]
    pub max_concurrent_spawns: Option<u32>,
    /// Live backends one key namespace may hold; a spawn past it gets 429. No limit when
    /// `None`.
    #[serde(default)]
    pub max_backends_per_namespace: Option<u32>,
    /// How often the controller holding the sweeper's lease deletes what is past retention.
    #[serde(default = "default_retention_interval_ms")]
    pub retention_interval_ms: u64,
    /// Where the controller registers its metrics (`plane dev` shares one with its other
    /// components); served at `/metrics`.
    #[serde(skip)]
    pub metrics: plane_metrics::MetricsRegistry,
    /// Also serve `/metrics` without a token on this port of `--host`.
    #[serde(default)]
    pub metrics_port: Option<u16>,
    /// Clusters whose proxies serve HTTPS on the port their name carries: connect answers
    /// `https://` URLs for them. (A cluster named without a port, or with 443, is HTTPS
    /// anyway, as in Plane 0.5.)
    #[serde(default)]
    pub https_clusters: Vec<ClusterName>,
}

pub(crate) const DAY_MS: u64 = 86_400_000;

fn default_retention_ms() -> u64 {
    7 * DAY_MS
}

fn default_retention_interval_ms() -> u64 {
    60_000
}

fn default_placement_best_of() -> usize {
    2
}

impl ControllerConfig {
    pub fn new(db: impl Into<String>) -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            db: db.into(),
            public_url: None,
            peer_url: None,
            default_cluster: None,
            sweep_interval_ms: 1000,
            route_wait_timeout_ms: 60_000,
            lease_ms: 15_000,
            lost_window_ms: 30_000,
            ctrl_tokens: Vec::new(),
            ctrl_token_file: None,
            cluster_secret: None,
            placement_best_of: default_placement_best_of(),
            retention_ms: default_retention_ms(),
            retention_interval_ms: default_retention_interval_ms(),
            max_concurrent_spawns: None,
            max_backends_per_namespace: None,
            metrics: Default::default(),
            metrics_port: None,
            https_clusters: Vec::new(),
        }
    }

    /// Whether URLs of `cluster`'s backends are `https://`.
    pub fn serves_https(&self, cluster: &ClusterName) -> bool {
        cluster.is_https() || self.https_clusters.contains(cluster)
    }

    /// Refuses timings that cannot work together, naming the flags involved.
    ///
    /// `--route-wait-timeout-ms` is at least [`MIN_ROUTE_WAIT_MS`].
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.sweep_interval_ms > 0,
            "--sweep-interval-ms must be at least 1"
        );
        // Each "still starting" answer makes the proxy ask again at once, so a tiny wait
        // would have proxy and controller spin on a starting backend.
        anyhow::ensure!(
            self.route_wait_timeout_ms >= MIN_ROUTE_WAIT_MS,
            "--route-wait-timeout-ms must be at least {MIN_ROUTE_WAIT_MS}, got {}",
            self.route_wait_timeout_ms
        );
        anyhow::ensure!(
            (100..=MAX_LEASE_MS).contains(&self.lease_ms),
            "--lease-ms must be 100 to {MAX_LEASE_MS} (a day), got {}",
            self.lease_ms
        );
        anyhow::ensure!(
            self.lost_window_ms <= MAX_LOST_WINDOW_MS,
            "--lost-window-ms must be at most {MAX_LOST_WINDOW_MS} (a week), got {}",
            self.lost_window_ms
        );
        anyhow::ensure!(
            self.lost_window_ms >= self.lease_ms,
            "--lost-window-ms ({}) must be at least --lease-ms ({}): a drone must not be declared lost while one of its leases may still be valid",
            self.lost_window_ms,
            self.lease_ms
        );
        anyhow::ensure!(
            self.placement_best_of >= 1,
            "--placement-best-of must be at least 1"
        );
        anyhow::ensure!(
            self.max_concurrent_spawns != Some(0),
            "--max-concurrent-spawns must be at least 1 (leave it out for no limit)"
        );
        anyhow::ensure!(
            self.max_backends_per_namespace != Some(0),
            "--max-backends-per-namespace must be at least 1 (leave it out for no limit)"
        );
        for token in &self.ctrl_tokens {
            anyhow::ensure!(
                !token.is_empty() && !token.chars().any(char::is_whitespace),
                "--ctrl-token must be non-empty and without spaces"
            );
        }
        if let Some(secret) = &self.cluster_secret {
            anyhow::ensure!(
                !secret.is_empty() && secret.chars().all(|c| c.is_ascii_graphic()),
                "--cluster-secret must be non-empty printable ASCII without spaces"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_window_shorter_than_the_lease_is_refused_naming_both_flags() {
        let config = ControllerConfig {
            lease_ms: 10_000,
            lost_window_ms: 5_000,
            ..ControllerConfig::new("plane.db")
        };
        let message = config.validate().expect_err("refused").to_string();
        assert!(message.contains("--lost-window-ms") && message.contains("--lease-ms"));
        assert!(ControllerConfig::new("plane.db").validate().is_ok());
    }

    #[test]
    fn a_zero_admission_limit_is_refused_naming_its_flag() {
        for (config, flag) in [
            (
                ControllerConfig {
                    max_concurrent_spawns: Some(0),
                    ..ControllerConfig::new("plane.db")
                },
                "--max-concurrent-spawns",
            ),
            (
                ControllerConfig {
                    max_backends_per_namespace: Some(0),
                    ..ControllerConfig::new("plane.db")
                },
                "--max-backends-per-namespace",
            ),
        ] {
            let message = config.validate().expect_err("refused").to_string();
            assert!(message.contains(flag), "{message}");
        }
    }
}
