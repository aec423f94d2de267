//! Bodies of the controller's HTTP API (`/ctrl/*`, `/pub/*`), shaped like Plane 0.5's so
//! existing clients work unchanged, and the one error body every endpoint returns.

use crate::backend::{BackendStatus, BackendStatusStreamEntry, TerminationKind, TerminationReason};
use crate::names::{
    BackendName, BearerToken, ClusterName, NodeName, PoolName, SecretToken, Subdomain,
};
use crate::time::Millis;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Identifies "the backend for this thing": at most one runs per `(namespace, name)`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The key itself, e.g. a document ID. 1 to 256 printable characters.
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u061c\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2069\\ufeff]+$"
    )]
    pub name: String,
    /// Keys in different namespaces never collide. Empty is the default namespace.
    #[serde(default)]
    #[schema(
        max_length = 64,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u061c\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2069\\ufeff]*$"
    )]
    pub namespace: String,
    /// A running backend is only reused by a connect with the same tag (e.g. an app
    /// version); a different tag gets `409 KeyHeld`.
    #[serde(default)]
    #[schema(
        max_length = 256,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u061c\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2069\\ufeff]*$"
    )]
    pub tag: String,
}

impl KeyConfig {
    /// The key `name` in the default namespace, untagged.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Default::default()
        }
    }
}

/// When the drone pulls the image from its registry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum PullPolicy {
    /// Pull only when the drone does not have the image.
    #[default]
    IfNotPresent,
    /// Pull before every start.
    Always,
    /// Never pull; a missing image fails the start.
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IfNotPresent => "IfNotPresent",
            Self::Always => "Always",
            Self::Never => "Never",
        }
    }
}

/// Registry credentials for pulling a private image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistryCredentials {
    pub username: String,
    pub password: String,
}

/// Limits applied to the backend's container.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceLimits {
    /// CPU accounting period, in microseconds (Docker's default is 100000).
    #[serde(default)]
    #[schema(minimum = 1000, maximum = 1000000)]
    pub cpu_period: Option<i64>,
    /// Percentage of one CPU the container may use per period (1 to 100 per core).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100)]
    pub cpu_period_percent: Option<u8>,
    /// Total CPU time the process may use, in seconds (the `cpu` rlimit: past it the
    /// process is killed with SIGKILL).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 315360000)]
    pub cpu_time_limit: Option<i64>,
    /// Memory limit in bytes.
    #[serde(default)]
    #[schema(minimum = 6291456)]
    pub memory_limit_bytes: Option<i64>,
    /// The most disk the container's writable layer may use, at least 1 MiB. Only drones
    /// whose storage driver can enforce it take such a backend (a 503 `NoDroneAvailable`
    /// when the pool has none).
    #[serde(default)]
    #[schema(minimum = 1048576)]
    pub disk_limit_bytes: Option<i64>,
    /// How many processes and threads the container may have at once.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 4194304)]
    pub pids_limit: Option<i64>,
}

/// What to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecutorConfig {
    /// Docker image reference, e.g. `ghcr.io/acme/app:1.2`.
    #[schema(min_length = 1, max_length = 512, pattern = "^[!-~]+$")]
    pub image: String,
    /// Defaults to `IfNotPresent`.
    #[serde(default)]
    pub pull_policy: Option<PullPolicy>,
    /// Credentials for the image's registry, if it is private.
    #[serde(default, deserialize_with = "objects::optional")]
    pub credentials: Option<RegistryCredentials>,
    /// Extra environment for the process. Names Plane sets itself (`PORT`,
    /// `SESSION_BACKEND_*`) are refused.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "objects::required")]
    pub resource_limits: ResourceLimits,
    /// A directory on the drone (under its `--mount-base`) bound at `/plane-data`: `true`
    /// for one of the key's own, kept for its next backends; a relative path for one that
    /// backends naming it share; `false`, null or absent for none.
    #[serde(default)]
    pub mount: Option<crate::mount::Mount>,
    /// A Docker network to attach the backend to, instead of the drone's
    /// (`--docker-network`, else Docker's default bridge). Its port is published as usual.
    #[serde(default)]
    #[schema(max_length = 128, pattern = "^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    pub network_name: Option<String>,
    /// The path the drone probes, for readiness at start and for health after (`/` by
    /// default): any answer means ready; after that, no answer or a 5xx is a failed check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 1024, pattern = "^/[!-~]*$")]
    pub ready_path: Option<String>,
    /// GPUs to give the container (Docker device requests): a count, or `"all"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<Gpus>,
    /// How the backend serves HTTP (`http1` by default).
    #[serde(default, skip_serializing_if = "BackendProtocol::is_default")]
    pub protocol: BackendProtocol,
}

/// GPUs for a backend: `3`, or `"all"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Gpus {
    Count(u32),
    All(AllGpus),
}

/// Read by hand rather than as an untagged enum, so a count written as a whole float
/// (`2.0`, an integer to JSON Schema) is a count, and a wrong value gets a message that
/// says what is expected.
impl<'de> Deserialize<'de> for Gpus {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct GpusVisitor;

        impl serde::de::Visitor<'_> for GpusVisitor {
            type Value = Gpus;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a count of GPUs or \"all\"")
            }

            fn visit_u64<E: serde::de::Error>(self, count: u64) -> Result<Gpus, E> {
                u32::try_from(count)
                    .map(Gpus::Count)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(count), &self))
            }

            fn visit_i64<E: serde::de::Error>(self, count: i64) -> Result<Gpus, E> {
                u64::try_from(count)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(count), &self))
                    .and_then(|count| self.visit_u64(count))
            }

            fn visit_f64<E: serde::de::Error>(self, count: f64) -> Result<Gpus, E> {
                if count.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&count) {
                    Ok(Gpus::Count(count as u32))
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Float(count), &self))
                }
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Gpus, E> {
                match value {
                    "all" => Ok(Gpus::All(AllGpus::All)),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
        }

        deserializer.deserialize_any(GpusVisitor)
    }
}

/// Written by hand: the derived schema cannot say that a count is at least 1.
impl utoipa::PartialSchema for Gpus {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                        utoipa::openapi::KnownFormat::Int32,
                    )))
                    .minimum(Some(1))
                    .maximum(Some(u32::MAX)),
            )
            .item(<AllGpus as utoipa::PartialSchema>::schema())
            .description(Some(
                "GPUs for a backend: a count of at least 1, or `\"all\"`.",
            ))
            .into()
    }
}

impl utoipa::ToSchema for Gpus {}

/// The `"all"` of [`Gpus`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AllGpus {
    All,
}

/// How the proxy speaks to a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackendProtocol {
    /// HTTP/1.1, whatever the browser spoke to the proxy.
    #[default]
    Http1,
    /// HTTP/2 without TLS, with prior knowledge (h2c), as gRPC servers serve it: every
    /// request goes over one multiplexed connection per backend, except WebSocket upgrades,
    /// which go over HTTP/1.1.
    Http2,
}

impl BackendProtocol {
    pub fn is_default(&self) -> bool {
        *self == Self::Http1
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "http2",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "http1" => Some(Self::Http1),
            "http2" => Some(Self::Http2),
            _ => None,
        }
    }
}

impl ExecutorConfig {
    /// Runs `image` with every other setting at its default.
    pub fn of_image(image: impl Into<String>) -> Self {
        Self {
            image: image.into(),
            pull_policy: None,
            credentials: None,
            env: BTreeMap::new(),
            resource_limits: ResourceLimits::default(),
            mount: None,
            network_name: None,
            ready_path: None,
            gpus: None,
            protocol: BackendProtocol::Http1,
        }
    }
}

/// How to start a backend when one is needed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SpawnConfig {
    /// Choose the backend's ID yourself (it must be unused). Normally left out.
    #[serde(default)]
    /// (The API takes at most 45 characters, Plane 0.5's limit; `revoke` is taken.)
    #[schema(value_type = Option<String>, min_length = 1, max_length = 45, pattern = "^[a-z0-9][a-z0-9-]*$")]
    pub id: Option<BackendName>,
    /// Cluster to run in; the controller's default cluster when absent.
    #[serde(default)]
    pub cluster: Option<ClusterName>,
    /// Drone pool within the cluster; the default pool (empty name) when absent.
    #[serde(default)]
    pub pool: Option<PoolName>,
    #[serde(deserialize_with = "objects::required")]
    pub executable: ExecutorConfig,
    /// Terminate the backend this many seconds after it was scheduled (at least 1).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 315360000)]
    pub lifetime_limit_seconds: Option<i64>,
    /// Terminate the backend once no connection has been open through a proxy for this
    /// many seconds (at least 1).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 315360000)]
    pub max_idle_seconds: Option<i64>,
    /// Seconds from container start until the backend must answer HTTP, overriding the
    /// drone's `--startup-timeout-ms` (1 to 3600). Past it the backend ends
    /// `terminated{startuptimeout}`.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3600)]
    pub startup_timeout_seconds: Option<i64>,
    /// Issue one token at spawn and hand the same one to every connect.
    #[serde(default)]
    pub use_static_token: bool,
    /// Serve the backend at `<subdomain>.<cluster>`: the URL names that host, and proxies
    /// route the backend's tokens only when the request's `Host` is it (403 otherwise).
    #[serde(default)]
    pub subdomain: Option<Subdomain>,
}

impl SpawnConfig {
    /// Runs `image` in the default cluster and pool, every other setting at its default.
    pub fn of_image(image: impl Into<String>) -> Self {
        Self::of(ExecutorConfig::of_image(image))
    }

    /// Runs `executable` in the default cluster and pool, every other setting at its
    /// default.
    pub fn of(executable: ExecutorConfig) -> Self {
        Self {
            id: None,
            cluster: None,
            pool: None,
            executable,
            lifetime_limit_seconds: None,
            max_idle_seconds: None,
            startup_timeout_seconds: None,
            use_static_token: false,
            subdomain: None,
        }
    }
}

/// `POST /ctrl/connect`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectRequest {
    /// Reuse the backend holding this key, or start one that holds it.
    #[serde(default, deserialize_with = "objects::optional")]
    pub key: Option<KeyConfig>,
    /// How to start a backend if one is needed. Without it, connect only reuses.
    #[serde(default, deserialize_with = "objects::optional")]
    pub spawn_config: Option<SpawnConfig>,
    /// Who the token is for; passed to the backend as `x-verified-username`.
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u061c\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2069\\ufeff]+$"
    )]
    pub user: Option<String>,
    /// Arbitrary JSON object passed to the backend as `x-verified-user-data`.
    #[serde(default)]
    pub auth: Map<String, Value>,
    /// The token stops working this many seconds after it is issued (410 `token_expired` at
    /// the proxy). Without it, a token works as long as its backend runs. Not for static
    /// tokens, which are issued once for every connect.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 315360000)]
    pub token_ttl_seconds: Option<i64>,
    /// Drone pool (Plane 0.5 accepted it here as well as in `spawn_config`).
    #[serde(default)]
    pub pool: Option<PoolName>,
}

/// `POST /ctrl/spawn`: always starts a new backend, with no key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    #[serde(deserialize_with = "objects::required")]
    pub spawn_config: SpawnConfig,
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u061c\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2069\\ufeff]+$"
    )]
    pub user: Option<String>,
    #[serde(default)]
    pub auth: Map<String, Value>,
    /// As in [`ConnectRequest::token_ttl_seconds`].
    #[serde(default)]
    #[schema(minimum = 1, maximum = 315360000)]
    pub token_ttl_seconds: Option<i64>,
}

/// The answer to connect and spawn.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConnectResponse {
    pub backend_id: BackendName,
    /// True when this request started the backend; false when it joined a running one.
    pub spawned: bool,
    /// The backend's status when the response was written.
    pub status: BackendStatus,
    /// The connection token (also the first path segment of `url`).
    pub token: BearerToken,
    /// The URL to give the browser.
    pub url: String,
    pub subdomain: Option<Subdomain>,
    pub secret_token: SecretToken,
    /// Public URL of the backend's status (append `-stream` for server-sent events).
    pub status_url: String,
    /// The drone the backend runs on.
    pub drone: Option<NodeName>,
}

/// A node's name as Plane 0.5 writes it in cluster state: tagged with its kind,
/// `{"Drone": "dr-..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum TaggedNodeName {
    Drone(NodeName),
    Proxy(NodeName),
    AcmeDnsServer(NodeName),
}

impl TaggedNodeName {
    pub fn name(&self) -> &NodeName {
        match self {
            Self::Drone(name) | Self::Proxy(name) | Self::AcmeDnsServer(name) => name,
        }
    }
}

/// One node (drone, proxy or DNS server) of a cluster, as `GET /ctrl/c/:cluster/state`
/// shows it. The first five fields are Plane 0.5's; the rest are ours.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeState {
    pub name: TaggedNodeName,
    pub plane_version: String,
    pub plane_hash: String,
    /// The controller holding the node's socket (empty when none does).
    pub controller: String,
    /// Seconds since the controller holding the node's socket last recorded hearing from
    /// it.
    pub controller_heartbeat_age: i64,
    /// Whether the node has a live socket to a controller.
    #[serde(default)]
    pub connected: bool,
    /// When the node last sent anything (heartbeat or message).
    pub last_seen: Millis,
}

/// One drone of a cluster. The first five fields are Plane 0.5's; the rest are ours.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DroneState {
    /// Connected, not lost and not draining: it may be given new backends.
    pub ready: bool,
    /// Drained: it gets no new backends while its own keep serving.
    pub draining: bool,
    /// Seconds since the drone was last heard from.
    pub last_heartbeat_age: i64,
    /// Backends on it that have not terminated.
    pub backend_count: u32,
    pub node: NodeState,
    /// Its pool (empty: the default pool).
    #[serde(default)]
    pub pool: String,
    /// Silent for longer than the controller's lost window; its backends have been
    /// recorded `terminated{lost}`. Cleared when the drone is heard from again.
    #[serde(default)]
    pub lost: bool,
}

/// `GET /ctrl/c/:cluster/state`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterName>,
    pub drones: Vec<DroneState>,
    pub proxies: Vec<NodeState>,
    /// The cluster's warm pools and how full each is.
    #[serde(default)]
    pub warm_pools: Vec<WarmPoolState>,
}

/// `POST /ctrl/c/:cluster/warm` (the default pool) and
/// `POST /ctrl/c/:cluster/pools/:pool/warm`: keep `size` backends of `executable` started
/// and waiting for a claim. Setting it again for the same executable changes the size; 0
/// removes the pool's warm backends of that executable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WarmPoolRequest {
    /// What to keep warm. A connect or spawn claims one when its executable is exactly
    /// this one. A `mount` is refused: a warm backend has no key to mount for.
    #[serde(deserialize_with = "objects::required")]
    pub executable: ExecutorConfig,
    /// How many unclaimed backends to keep, 0 to 1000.
    #[schema(minimum = 0, maximum = 1000)]
    pub size: u32,
}

/// One warm pool: its executable, the size asked for, and how many unclaimed backends it
/// has (`idle` ones can be claimed now; `starting` ones are on their way).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WarmPoolState {
    /// The drone pool (empty: the default pool).
    pub pool: PoolName,
    pub image: String,
    /// What connects are matched on: the SHA-256 of the executable's JSON.
    pub fingerprint: String,
    pub size: u32,
    pub idle: u32,
    pub starting: u32,
}

/// A backend as `GET /ctrl/b/:backend` and the overview show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackendInfo {
    pub backend_id: BackendName,
    pub cluster: ClusterName,
    /// Its drone's pool (empty: the default pool).
    pub pool: String,
    pub drone: NodeName,
    pub status: BackendStatus,
    /// When it entered `status`.
    pub status_time: Millis,
    /// The key it holds (or held), if it was started by a connect with one.
    pub key: Option<BackendKey>,
    pub created_at: Millis,
    /// When it was last seen in use: it became ready, or a proxy reported a connection.
    pub last_active_at: Millis,
    pub termination_kind: Option<TerminationKind>,
    pub termination_reason: Option<TerminationReason>,
    pub exit_code: Option<i32>,
    /// Why it failed, when it did.
    pub message: Option<String>,
    pub subdomain: Option<Subdomain>,
}

/// The key of a [`BackendInfo`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackendKey {
    pub name: String,
    pub namespace: String,
}

/// `GET /ctrl/b/:backend`: the backend and every status it has been in, oldest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackendDetails {
    pub backend: BackendInfo,
    pub history: Vec<BackendStatusStreamEntry>,
}

/// `GET /ctrl/overview` (and each event of `/ctrl/overview-stream`): every cluster with a
/// node, and the backends that are live or ended in the last hour, newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Overview {
    pub clusters: Vec<ClusterState>,
    /// At most [`OVERVIEW_BACKENDS`]; `backends_truncated` says when more matched.
    pub backends: Vec<BackendInfo>,
    pub backends_truncated: bool,
    /// When the controller read it.
    pub time: Millis,
}

/// The most backends an [`Overview`] lists.
pub const OVERVIEW_BACKENDS: usize = 500;

/// `POST /ctrl/c/:cluster/prepull`: every drone of the cluster pulls `image` now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PrepullRequest {
    #[schema(min_length = 1, max_length = 512, pattern = "^[!-~]+$")]
    pub image: String,
    #[serde(default, deserialize_with = "objects::optional")]
    pub credentials: Option<RegistryCredentials>,
    /// How long to wait for the drones, in seconds (default 300, at most 3600); drones
    /// still pulling then are reported `pending` and carry on.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3600)]
    pub timeout_seconds: Option<u64>,
}

/// The answer to a [`PrepullRequest`], one entry per drone of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PrepullResult {
    pub image: String,
    pub drones: Vec<DronePrepull>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DronePrepull {
    pub drone: crate::names::NodeName,
    pub outcome: PrepullOutcome,
    /// Why it failed, for `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long the pull took, for `pulled` and `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub millis: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PrepullOutcome {
    Pulled,
    Failed,
    /// Still pulling when the wait ended.
    Pending,
    /// Connected to another controller that could not be asked (`error` says why); ask that
    /// one (or use `plane drone --prepull`).
    NotReached,
    /// Its connection ended before it answered.
    Disconnected,
}

/// `POST /ctrl/c/:cluster/d/:drone/drain` and `/undrain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DrainResult {
    /// False when the drone was already in the state asked for.
    pub updated: bool,
}

/// `POST /ctrl/b/revoke` (also `/ctrl/revoke`): stop every token issued for `backend_id`
/// to `user`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    pub backend_id: BackendName,
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u061c\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2069\\ufeff]+$"
    )]
    pub user: String,
}

/// `GET /ctrl/status` and `GET /pub/health`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ControllerStatus {
    pub status: String,
    pub version: String,
    /// The commit the controller was built from (`unknown` outside a git checkout).
    pub hash: String,
    /// The database backend in use: `sqlite` or `postgres`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
}

/// What kind of failure an [`ApiError`] reports, serialized by name (`"KeyHeld"`). These
/// are exactly Plane 0.5's kinds, so its clients can read every error we send; failures it
/// has no kind for are `Other`, told apart by the HTTP status and the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum ApiErrorKind {
    /// Plane 0.5 only: the key's lock could not be taken.
    FailedToAcquireKey,
    /// Nothing holds the key and the request had no `spawn_config` to start one (409).
    KeyUnheldNoSpawnConfig,
    /// The key is held by a backend that is still terminating; retry shortly (409).
    KeyHeldUnhealthy,
    /// The key is held by a running backend that was started with a different tag (409).
    KeyHeld,
    /// No connected, undrained drone in the cluster (and pool) can take the backend (503).
    NoDroneAvailable,
    /// Plane 0.5 only: the key's lock could not be released.
    FailedToRemoveKey,
    /// The database failed (500).
    DatabaseError,
    /// No cluster in the request and no default cluster configured (400).
    NoClusterProvided,
    /// The named backend, drone or endpoint does not exist (404).
    NotFound,
    /// A cluster name is malformed (400).
    InvalidClusterName,
    /// Anything else: a malformed request (400), missing credentials (401), a taken backend
    /// ID (409), a wrong method (405), an internal fault (500, details in the log under the
    /// error's `id`).
    Other,
}

/// The body of every error response: `{id, kind, message}`. `id` correlates the response
/// with the controller's log line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiError {
    pub id: String,
    pub kind: ApiErrorKind,
    pub message: String,
}

/// One line a backend printed, as `GET /ctrl/b/:backend/logs` streams it (one SSE event
/// each, oldest first).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackendLogLine {
    pub stream: LogStream,
    /// When the container engine received the line.
    pub time: Millis,
    /// The line without its newline; bytes that are not UTF-8 are replaced.
    pub text: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// Nested request objects that must be JSON objects. Derived structs also accept a JSON
/// array of their fields in order, which the API's document does not allow and no client
/// means; these read the field as a map only, through the same deserializer (so an error
/// still names its full path).
mod objects {
    use serde::de::value::MapAccessDeserializer;
    use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
    use std::fmt;
    use std::marker::PhantomData;

    pub fn required<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        deserializer: D,
    ) -> Result<T, D::Error> {
        deserializer.deserialize_map(ObjectVisitor(PhantomData))
    }

    pub fn optional<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        deserializer: D,
    ) -> Result<Option<T>, D::Error> {
        deserializer.deserialize_option(OptionalVisitor(PhantomData))
    }

    struct ObjectVisitor<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(MapAccessDeserializer::new(map))
        }
    }

    struct OptionalVisitor<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for OptionalVisitor<T> {
        type Value = Option<T>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object or null")
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
            required(deserializer).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_are_a_count_or_all() {
        let read = |json: &str| serde_json::from_str::<Gpus>(json);
        assert_eq!(read("3").expect("count"), Gpus::Count(3));
        assert_eq!(read("3.0").expect("whole float"), Gpus::Count(3));
        assert_eq!(read("\"all\"").expect("all"), Gpus::All(AllGpus::All));
        for wrong in ["-1", "2.5", "4294967296", "\"some\"", "null", "[1]"] {
            let err = read(wrong).expect_err(wrong).to_string();
            assert!(err.contains("a count of GPUs or \"all\""), "{wrong}: {err}");
        }
        assert_eq!(serde_json::to_string(&Gpus::Count(2)).expect("json"), "2");
        assert_eq!(
            serde_json::to_string(&Gpus::All(AllGpus::All)).expect("json"),
            "\"all\""
        );
    }

    #[test]
    fn nested_objects_are_objects_not_arrays() {
        let as_array =
            r#"{"spawn_config": {"executable": {"image": "a", "resource_limits": [null, null]}}}"#;
        let err = serde_json::from_str::<ConnectRequest>(as_array).expect_err("refused");
        assert!(err.to_string().contains("expected a JSON object"), "{err}");
        let whole_array = r#"{"spawn_config": ["x"]}"#;
        assert!(serde_json::from_str::<ConnectRequest>(whole_array).is_err());
        let fine = r#"{"key": null, "spawn_config": {"executable": {"image": "a", "resource_limits": {"pids_limit": 5}, "credentials": null}}}"#;
        let request: ConnectRequest = serde_json::from_str(fine).expect("reads");
        let config = request.spawn_config.expect("spawn config");
        assert_eq!(config.executable.resource_limits.pids_limit, Some(5));
        assert!(request.key.is_none() && config.executable.credentials.is_none());
    }
}
