//! The flags of `plane admin connect` and `spawn`, and the API requests they make.

use anyhow::{bail, Context};
use clap::Args;
use plane_protocol::api::{
    ConnectRequest, ExecutorConfig, KeyConfig, PullPolicy, SpawnConfig, SpawnRequest,
};
use plane_protocol::names::{BackendName, ClusterName, PoolName, Subdomain};
use serde_json::{Map, Value};

/// `plane admin connect` (and `plane connect`).
#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    /// Key of the backend (reused if a backend already holds it).
    #[arg(long)]
    pub key: Option<String>,
    /// Namespace of the key.
    #[arg(long, default_value = "")]
    pub namespace: String,
    /// Tag of the key: a running backend is only reused by a connect with the same tag.
    #[arg(long, default_value = "")]
    pub tag: String,
    /// Image to run if a backend must be started (without it, connect only reuses).
    #[arg(long)]
    pub image: Option<String>,
    #[command(flatten)]
    pub spawn: SpawnArgs,
    /// Print the answer and exit without following the status until ready.
    #[arg(long)]
    pub no_follow: bool,
}

/// `plane admin spawn`.
#[derive(Args, Debug, Clone)]
pub struct SpawnCommandArgs {
    /// Image to run.
    #[arg(long)]
    pub image: String,
    #[command(flatten)]
    pub spawn: SpawnArgs,
    /// Print the answer and exit without following the status until ready.
    #[arg(long)]
    pub no_follow: bool,
}

/// How to start a backend and whom its token is for: shared by connect and spawn.
#[derive(Args, Debug, Clone)]
pub struct SpawnArgs {
    /// Cluster to run in (the controller's default if omitted).
    #[arg(long)]
    pub cluster: Option<ClusterName>,
    /// Drone pool within the cluster (the default pool if omitted).
    #[arg(long)]
    pub pool: Option<PoolName>,
    /// When to pull the image: IfNotPresent, Always or Never.
    #[arg(long, value_parser = parse_pull_policy)]
    pub pull_policy: Option<PullPolicy>,
    /// Extra environment variable for the backend, NAME=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Reap the backend after this many seconds without connections.
    #[arg(long)]
    pub max_idle_seconds: Option<i64>,
    /// Terminate the backend this many seconds after it starts.
    #[arg(long)]
    pub lifetime_limit_seconds: Option<i64>,
    /// Seconds the backend has to start answering HTTP.
    #[arg(long)]
    pub startup_timeout_seconds: Option<i64>,
    /// Serve the backend at <SUBDOMAIN>.<cluster>.
    #[arg(long)]
    pub subdomain: Option<Subdomain>,
    /// Issue one token at spawn and hand the same one to every connect.
    #[arg(long)]
    pub static_token: bool,
    /// The new backend's ID (normally chosen by the controller).
    #[arg(long)]
    pub id: Option<BackendName>,
    /// User the token is issued for (sent to the backend as `x-verified-username`).
    #[arg(long)]
    pub user: Option<String>,
    /// JSON object sent to the backend as `x-verified-user-data`.
    #[arg(long, value_parser = parse_auth)]
    pub auth: Option<Map<String, Value>>,
    /// The token stops working this many seconds after it is issued.
    #[arg(long)]
    pub token_ttl_seconds: Option<i64>,
}

/// `plane admin warm`: a warm pool's executable and size.
#[derive(Args, Debug, Clone)]
pub struct WarmArgs {
    /// The cluster whose pool keeps the warm backends.
    #[arg(long)]
    pub cluster: ClusterName,
    /// Drone pool within the cluster (the default pool if omitted).
    #[arg(long)]
    pub pool: Option<PoolName>,
    /// Image to keep warm. A connect claims one only when its executable is exactly this
    /// one: the same image, pull policy and environment.
    #[arg(long)]
    pub image: String,
    /// When to pull the image: IfNotPresent, Always or Never.
    #[arg(long, value_parser = parse_pull_policy)]
    pub pull_policy: Option<PullPolicy>,
    /// Extra environment variable for the backends, NAME=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// How many started, unclaimed backends to keep (0 removes them).
    #[arg(long)]
    pub size: u32,
}

impl WarmArgs {
    pub fn executable(&self) -> ExecutorConfig {
        ExecutorConfig {
            pull_policy: self.pull_policy,
            env: self.env.iter().cloned().collect(),
            ..ExecutorConfig::of_image(&self.image)
        }
    }
}

impl ConnectArgs {
    pub fn request(&self) -> anyhow::Result<ConnectRequest> {
        if self.key.is_none() && self.image.is_none() {
            bail!("give --key, --image, or both");
        }
        Ok(ConnectRequest {
            key: self.key.clone().map(|name| KeyConfig {
                name,
                namespace: self.namespace.clone(),
                tag: self.tag.clone(),
            }),
            spawn_config: self.image.as_ref().map(|image| self.spawn.config(image)),
            user: self.spawn.user.clone(),
            auth: self.spawn.auth.clone().unwrap_or_default(),
            token_ttl_seconds: self.spawn.token_ttl_seconds,
            pool: None,
        })
    }
}

impl SpawnCommandArgs {
    pub fn request(&self) -> SpawnRequest {
        SpawnRequest {
            spawn_config: self.spawn.config(&self.image),
            user: self.spawn.user.clone(),
            auth: self.spawn.auth.clone().unwrap_or_default(),
            token_ttl_seconds: self.spawn.token_ttl_seconds,
        }
    }
}

impl SpawnArgs {
    fn config(&self, image: &str) -> SpawnConfig {
        SpawnConfig {
            id: self.id.clone(),
            cluster: self.cluster.clone(),
            pool: self.pool.clone(),
            executable: ExecutorConfig {
                pull_policy: self.pull_policy,
                env: self.env.iter().cloned().collect(),
                ..ExecutorConfig::of_image(image)
            },
            lifetime_limit_seconds: self.lifetime_limit_seconds,
            max_idle_seconds: self.max_idle_seconds,
            startup_timeout_seconds: self.startup_timeout_seconds,
            use_static_token: self.static_token,
            subdomain: self.subdomain.clone(),
        }
    }
}

fn parse_pull_policy(value: &str) -> Result<PullPolicy, String> {
    [
        PullPolicy::IfNotPresent,
        PullPolicy::Always,
        PullPolicy::Never,
    ]
    .into_iter()
    .find(|policy| policy.as_str() == value)
    .ok_or_else(|| format!("{value:?} is not one of IfNotPresent, Always, Never"))
}

fn parse_env(value: &str) -> Result<(String, String), String> {
    value
        .split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{value:?} is not NAME=VALUE"))
}

fn parse_auth(value: &str) -> Result<Map<String, Value>, String> {
    serde_json::from_str(value)
        .context("not a JSON object")
        .map_err(|err| format!("{err:#}"))
}
