//! `POST /ctrl/connect` and `POST /ctrl/spawn`: get-or-create a backend by key, place it
//! on a drone, and hand back a tokenized URL.

use super::body::ApiJson;
use super::bus::ChangeBus;
use super::error::{ApiErrorResponse, ControllerError};
use super::store::{NewBackend, NewToken};
use super::ControllerState;
use axum::extract::State;
use axum::Json;
use plane_protocol::api::{ConnectRequest, ConnectResponse, KeyConfig, SpawnConfig, SpawnRequest};
use plane_protocol::backend::{BackendStatus, TerminationReason};
use plane_protocol::drone::{ActionKind, SpawnAction};
use plane_protocol::names::{
    BackendName, BearerToken, ClusterName, NodeName, PoolName, SecretToken, Subdomain,
};
use plane_protocol::time::Millis;
use plane_protocol::RESERVED_ENV_VARS;
use serde_json::{Map, Value};

/// How long a connect waits for a terminating backend to release the key it wants.
const KEY_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The largest idle or lifetime limit accepted: ten years, in seconds. Larger values would
/// overflow millisecond arithmetic in the database.
const MAX_LIMIT_SECONDS: i64 = 10 * 365 * 24 * 60 * 60;

/// The longest startup timeout a spawn may ask for: an hour.
const MAX_STARTUP_TIMEOUT_SECONDS: i64 = 3600;

/// The longest backend ID a spawn may choose (Plane 0.5's limit).
const MAX_BACKEND_ID_INPUT: usize = 45;

/// How often a connect retries after losing a race for a key to another connect.
const KEY_RACE_RETRIES: usize = 5;

pub async fn handle_connect(
    State(state): State<ControllerState>,
    ApiJson(request): ApiJson<ConnectRequest>,
) -> Result<Json<ConnectResponse>, ApiErrorResponse> {
    Ok(Json(connect(&state, &request).await?))
}

/// Get-or-create by key: joins the backend holding the key (with a fresh token), or starts
/// one that takes it. Without a key, always starts a new backend.
pub async fn connect(
    state: &ControllerState,
    request: &ConnectRequest,
) -> Result<ConnectResponse, ControllerError> {
    validate_connect(request)?;
    let pool = request
        .spawn_config
        .as_ref()
        .and_then(|c| c.pool.clone())
        .or(request.pool.clone())
        .unwrap_or_default();
    let caller = Caller {
        user: request.user.as_deref(),
        auth: &request.auth,
        token_ttl_seconds: request.token_ttl_seconds,
    };

    let Some(key) = &request.key else {
        let spawn_config = request.spawn_config.as_ref().ok_or_else(|| {
            ControllerError::invalid("a connect needs a `key`, a `spawn_config`, or both")
        })?;
        return spawn(state, spawn_config, &pool, None, caller)
            .await?
            .ok_or_else(|| anyhow::anyhow!("spawn without a key lost a key race").into());
    };

    for _ in 0..KEY_RACE_RETRIES {
        if let Some(holder) = state.store().key_holder(&key.namespace, &key.name).await? {
            if holder.lease_expired {
                // The holder's drone did not renew in time, so by protocol it has stopped
                // the backend on its own clock: record that, and the key is free.
                let message = format!(
                    "its key lease ran out without renewal; key {:?} was taken over",
                    key.name
                );
                let expired = state
                    .store()
                    .expire_backend(
                        &holder.backend_id,
                        TerminationReason::KeyExpired,
                        message,
                        Millis::now(),
                    )
                    .await?;
                if expired.is_some() {
                    tracing::warn!(backend = %holder.backend_id, key = %key.name, "key lease expired; taking the key over");
                }
                continue;
            }
            if holder.tag != key.tag {
                return Err(ControllerError::KeyHeld {
                    name: key.name.clone(),
                    namespace: key.namespace.clone(),
                    holder: holder.backend_id,
                    held_tag: holder.tag,
                    requested_tag: key.tag.clone(),
                });
            }
            if let Some(response) = join_existing(state, &holder.backend_id, caller).await? {
                return Ok(response);
            }
            // The holder has terminated (or just finished terminating); try again.
            continue;
        }
        let Some(spawn_config) = &request.spawn_config else {
            return Err(ControllerError::KeyUnheldNoSpawnConfig {
                name: key.name.clone(),
                namespace: key.namespace.clone(),
            });
        };
        if let Some(response) = spawn(state, spawn_config, &pool, Some(key), caller).await? {
            return Ok(response);
        }
        // Another connect took the key first; join its backend on the next pass.
    }
    Err(anyhow::anyhow!(
        "gave up after {KEY_RACE_RETRIES} races for key {:?}",
        key.name
    )
    .into())
}

pub async fn handle_spawn(
    State(state): State<ControllerState>,
    ApiJson(request): ApiJson<SpawnRequest>,
) -> Result<Json<ConnectResponse>, ApiErrorResponse> {
    validate_spawn_config(&request.spawn_config)?;
    validate_caller(request.user.as_deref(), &request.auth)?;
    let pool = request.spawn_config.pool.clone().unwrap_or_default();
    validate_token_ttl(request.token_ttl_seconds, Some(&request.spawn_config))?;
    let caller = Caller {
        user: request.user.as_deref(),
        auth: &request.auth,
        token_ttl_seconds: request.token_ttl_seconds,
    };
    let response = spawn(&state, &request.spawn_config, &pool, None, caller)
        .await?
        .ok_or_else(|| {
            ControllerError::from(anyhow::anyhow!("spawn without a key lost a key race"))
        })?;
    Ok(Json(response))
}

/// Who a token is issued to.
#[derive(Clone, Copy)]
struct Caller<'a> {
    user: Option<&'a str>,
    auth: &'a Map<String, Value>,
    /// The token ends this long after it is issued.
    token_ttl_seconds: Option<i64>,
}

impl Caller<'_> {
    fn token_expires_at(&self) -> Option<Millis> {
        self.token_ttl_seconds
            // Validated to 1 ..= MAX_LIMIT_SECONDS, so this neither wraps nor overflows.
            .map(|seconds| Millis::now().plus_millis(seconds.unsigned_abs().saturating_mul(1000)))
    }
}

/// Issues a token for a running backend. `None` if it terminated meanwhile.
async fn join_existing(
    state: &ControllerState,
    backend_id: &BackendName,
    caller: Caller<'_>,
) -> Result<Option<ConnectResponse>, ControllerError> {
    // Subscribe before reading, so a change between the read and the wait is not missed.
    let mut changes = state.bus().subscribe_status();
    let Some(backend) = state.store().backend(backend_id).await? else {
        return Ok(None);
    };
    if backend.status.is_terminating() {
        // A terminating backend keeps its key until its process is gone, so that two never
        // run at once. Wait for it to let go, then the caller starts a fresh one.
        let deadline = tokio::time::Instant::now() + KEY_RELEASE_WAIT;
        loop {
            let status = state.store().backend(backend_id).await?.map(|b| b.status);
            if status.is_none_or(|s| s == BackendStatus::Terminated) {
                return Ok(None);
            }
            if !ChangeBus::wait_for_change_of(&mut changes, backend_id, deadline).await {
                return Err(ControllerError::KeyStillTerminating {
                    holder: backend_id.clone(),
                    waited_seconds: KEY_RELEASE_WAIT.as_secs(),
                });
            }
        }
    }
    let (token, secret) = match backend.static_token.clone() {
        Some(_) if caller.token_ttl_seconds.is_some() => {
            return Err(ControllerError::invalid(format!(
                "token_ttl_seconds does not apply to backend {backend_id}: it has one static token for every connect"
            )));
        }
        // A static token and its secret were recorded once, at spawn.
        Some(token) => {
            let row = state.store().token(&token).await?.ok_or_else(|| {
                anyhow::anyhow!("the static token of backend {backend_id} is missing")
            })?;
            (token, row.secret)
        }
        None => {
            let token = BearerToken::new_random();
            let secret = SecretToken::new_random();
            let new_token = NewToken {
                token: &token,
                secret: &secret,
                user: caller.user,
                auth: caller.auth,
                expires_at: caller.token_expires_at(),
            };
            state.store().add_token(backend_id, &new_token).await?;
            (token, secret)
        }
    };
    Ok(Some(response(
        state,
        backend_id.clone(),
        false,
        backend.status,
        &backend.cluster,
        backend.subdomain.clone(),
        token,
        secret,
        backend.drone,
    )))
}

/// Starts a new backend. `None` when `key` was taken by a concurrent connect.
async fn spawn(
    state: &ControllerState,
    spawn_config: &SpawnConfig,
    pool: &PoolName,
    key: Option<&KeyConfig>,
    caller: Caller<'_>,
) -> Result<Option<ConnectResponse>, ControllerError> {
    let cluster = spawn_config
        .cluster
        .clone()
        .or_else(|| state.config().default_cluster.clone())
        .ok_or(ControllerError::NoClusterProvided)?;
    let drone = pick_drone(state, &cluster, pool).await?.ok_or_else(|| {
        ControllerError::NoDroneAvailable {
            cluster: cluster.clone(),
            pool: pool.to_string(),
        }
    })?;

    let backend_id = spawn_config
        .id
        .clone()
        .unwrap_or_else(BackendName::new_random);
    let token = if spawn_config.use_static_token {
        BearerToken::new_random_static()
    } else {
        BearerToken::new_random()
    };
    let secret = SecretToken::new_random();
    let static_token = spawn_config.use_static_token.then(|| token.clone());
    let new = NewBackend {
        id: &backend_id,
        cluster: &cluster,
        pool: pool.as_str(),
        drone: &drone,
        spawn_config,
        key,
        static_token: static_token.as_ref(),
        token: NewToken {
            token: &token,
            secret: &secret,
            user: caller.user,
            auth: caller.auth,
            expires_at: caller.token_expires_at(),
        },
        now: Millis::now(),
        lease_ms: state.config().lease_ms,
    };
    let created = state
        .store()
        .create_backend(new, |fencing_token| {
            ActionKind::Spawn(SpawnAction {
                executable: spawn_config.executable.clone(),
                key: key.map(|k| k.name.clone()),
                fencing_token,
                static_token: static_token.clone(),
                startup_timeout_ms: spawn_config
                    .startup_timeout_seconds
                    .map(|seconds| seconds.unsigned_abs().saturating_mul(1000)),
            })
        })
        .await;
    let created = match created {
        Ok(Some(created)) => created,
        Ok(None) => return Ok(None),
        Err(super::store::StoreError::AlreadyExists(_)) => {
            return Err(ControllerError::BackendIdTaken(backend_id))
        }
        Err(err) => return Err(err.into()),
    };
    // The stored spawn action reaches the drone through the change bus, from whichever
    // controller holds its session.
    tracing::debug!(action_id = created.action_id, fencing_token = ?created.fencing_token, "spawn action stored");
    tracing::info!(backend = %backend_id, %drone, %cluster, key = ?key.map(|k| &k.name), "backend scheduled");
    Ok(Some(response(
        state,
        backend_id,
        true,
        BackendStatus::Scheduled,
        &cluster,
        spawn_config.subdomain.clone(),
        token,
        secret,
        drone,
    )))
}

/// A drone of the pool for a new backend: of `--placement-best-of` drones drawn at random
/// from those that can take one (a session with any controller, heard from within a lease,
/// not drained), the one with the fewest live backends; ties are broken at random.
///
/// Sampling rather than taking the least loaded of all keeps concurrent connects, which all
/// read the same counts, from piling onto one drone, while two choices already keep the
/// load nearly even ("the power of two choices").
async fn pick_drone(
    state: &ControllerState,
    cluster: &ClusterName,
    pool: &PoolName,
) -> Result<Option<NodeName>, ControllerError> {
    let seen_since = Millis::now().minus_millis(state.config().lease_ms);
    let candidates = state
        .store()
        .placeable_drones(cluster, pool.as_str(), seen_since)
        .await?;
    if candidates.len() <= 1 {
        return Ok(candidates.into_iter().next());
    }
    let live = state.store().live_backend_counts(cluster).await?;
    Ok(choose_best_of(
        candidates,
        state.config().placement_best_of,
        |drone| live.get(drone).copied().unwrap_or(0),
        &mut rand::thread_rng(),
    ))
}

/// Of `n` candidates drawn at random, the least loaded (ties at random).
fn choose_best_of<R: rand::Rng>(
    candidates: Vec<NodeName>,
    n: usize,
    load: impl Fn(&NodeName) -> u32,
    rng: &mut R,
) -> Option<NodeName> {
    use rand::seq::SliceRandom;
    // Shuffled, so taking the first of the least loaded breaks ties at random.
    let mut sample: Vec<NodeName> = candidates.choose_multiple(rng, n.max(1)).cloned().collect();
    sample.shuffle(rng);
    sample.into_iter().min_by_key(|drone| load(drone))
}

#[allow(clippy::too_many_arguments)]
fn response(
    state: &ControllerState,
    backend_id: BackendName,
    spawned: bool,
    status: BackendStatus,
    cluster: &ClusterName,
    subdomain: Option<Subdomain>,
    token: BearerToken,
    secret_token: SecretToken,
    drone: NodeName,
) -> ConnectResponse {
    ConnectResponse {
        url: format!("{}/{token}/", cluster.base_url_for(subdomain.as_ref())),
        status_url: state.status_url(&backend_id),
        backend_id,
        spawned,
        status,
        token,
        subdomain,
        secret_token,
        drone: Some(drone),
    }
}

fn validate_connect(request: &ConnectRequest) -> Result<(), ControllerError> {
    if let Some(key) = &request.key {
        validate_text("key.name", &key.name, 1, 256)?;
        validate_text("key.namespace", &key.namespace, 0, 64)?;
        validate_text("key.tag", &key.tag, 0, 256)?;
    }
    if let Some(spawn_config) = &request.spawn_config {
        validate_spawn_config(spawn_config)?;
    }
    validate_token_ttl(request.token_ttl_seconds, request.spawn_config.as_ref())?;
    validate_caller(request.user.as_deref(), &request.auth)
}

fn validate_token_ttl(
    ttl: Option<i64>,
    spawn_config: Option<&SpawnConfig>,
) -> Result<(), ControllerError> {
    let Some(ttl) = ttl else { return Ok(()) };
    if !(1..=MAX_LIMIT_SECONDS).contains(&ttl) {
        return Err(ControllerError::invalid(format!(
            "token_ttl_seconds must be 1 to {MAX_LIMIT_SECONDS}, got {ttl}"
        )));
    }
    if spawn_config.is_some_and(|config| config.use_static_token) {
        return Err(ControllerError::invalid(
            "token_ttl_seconds does not apply with spawn_config.use_static_token: one static token serves every connect",
        ));
    }
    Ok(())
}

/// The largest `auth` accepted, as JSON. Proxies pass it to the backend as a header
/// (`x-verified-user-data`), and a request whose headers are too large fails at the proxy.
const MAX_AUTH_BYTES: usize = 8 * 1024;

fn validate_caller(user: Option<&str>, auth: &Map<String, Value>) -> Result<(), ControllerError> {
    if let Some(user) = user {
        validate_text("user", user, 1, 256)?;
    }
    let auth_bytes = serde_json::to_string(auth).map_or(usize::MAX, |json| json.len());
    if auth_bytes > MAX_AUTH_BYTES {
        return Err(ControllerError::invalid(format!(
            "auth must be at most {MAX_AUTH_BYTES} bytes of JSON, got {auth_bytes}"
        )));
    }
    Ok(())
}

fn validate_spawn_config(config: &SpawnConfig) -> Result<(), ControllerError> {
    // Plane 0.5's tools take backend IDs of at most 45 characters; IDs stored by earlier
    // versions (up to 64) stay readable.
    if let Some(id) = &config.id {
        if id.as_str().len() > MAX_BACKEND_ID_INPUT {
            return Err(ControllerError::invalid(format!(
                "spawn_config.id must be at most {MAX_BACKEND_ID_INPUT} characters, got {}",
                id.as_str().len()
            )));
        }
    }
    let executable = &config.executable;
    if executable.image.is_empty()
        || executable.image.len() > 512
        || executable
            .image
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ControllerError::invalid(format!(
            "spawn_config.executable.image {:?} is not a valid image reference",
            executable.image
        )));
    }
    for (name, value) in &executable.env {
        let valid_name = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(ControllerError::invalid(format!(
                "spawn_config.executable.env: {name:?} is not a valid variable name (letters, digits and '_', not starting with a digit)"
            )));
        }
        if RESERVED_ENV_VARS.contains(&name.as_str()) {
            return Err(ControllerError::invalid(format!(
                "spawn_config.executable.env: {name:?} is set by Plane and cannot be overridden"
            )));
        }
        if value.contains('\0') {
            return Err(ControllerError::invalid(format!(
                "spawn_config.executable.env.{name} contains a NUL byte"
            )));
        }
    }
    let limits = &executable.resource_limits;
    if limits.cpu_time_limit.is_some() {
        return Err(ControllerError::invalid(
            "spawn_config.executable.resource_limits.cpu_time_limit is not supported",
        ));
    }
    if limits.disk_limit_bytes.is_some() {
        return Err(ControllerError::invalid(
            "spawn_config.executable.resource_limits.disk_limit_bytes is not supported",
        ));
    }
    if let Some(bytes) = limits.memory_limit_bytes {
        if bytes < 6 * 1024 * 1024 {
            return Err(ControllerError::invalid(format!(
                "spawn_config.executable.resource_limits.memory_limit_bytes must be at least 6291456 (6 MiB), got {bytes}"
            )));
        }
    }
    if let Some(percent) = limits.cpu_period_percent {
        if !(1..=100).contains(&percent) {
            return Err(ControllerError::invalid(format!(
                "spawn_config.executable.resource_limits.cpu_period_percent must be 1 to 100, got {percent}"
            )));
        }
    }
    if let Some(period) = limits.cpu_period {
        if !(1000..=1_000_000).contains(&period) {
            return Err(ControllerError::invalid(format!(
                "spawn_config.executable.resource_limits.cpu_period must be 1000 to 1000000 microseconds, got {period}"
            )));
        }
    }
    match &executable.mount {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(_) => {
            return Err(ControllerError::invalid(
                "spawn_config.executable.mount is not supported",
            ))
        }
    }
    if executable.network_name.is_some() {
        return Err(ControllerError::invalid(
            "spawn_config.executable.network_name is not supported yet; leave it out or null",
        ));
    }
    for (field, value) in [
        ("spawn_config.max_idle_seconds", config.max_idle_seconds),
        (
            "spawn_config.lifetime_limit_seconds",
            config.lifetime_limit_seconds,
        ),
    ] {
        if let Some(seconds) = value {
            if !(1..=MAX_LIMIT_SECONDS).contains(&seconds) {
                return Err(ControllerError::invalid(format!(
                    "{field} must be 1 to {MAX_LIMIT_SECONDS} (ten years), got {seconds}"
                )));
            }
        }
    }
    if let Some(seconds) = config.startup_timeout_seconds {
        if !(1..=MAX_STARTUP_TIMEOUT_SECONDS).contains(&seconds) {
            return Err(ControllerError::invalid(format!(
                "spawn_config.startup_timeout_seconds must be 1 to {MAX_STARTUP_TIMEOUT_SECONDS}, got {seconds}"
            )));
        }
    }
    Ok(())
}

fn validate_text(field: &str, value: &str, min: usize, max: usize) -> Result<(), ControllerError> {
    let length = value.chars().count();
    if length < min || length > max {
        return Err(ControllerError::invalid(format!(
            "{field} must be {min} to {max} characters long, got {length}"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ControllerError::invalid(format!(
            "{field} may not contain control characters"
        )));
    }
    if value.chars().any(is_invisible_format) {
        return Err(ControllerError::invalid(format!(
            "{field} may not contain bidirectional overrides or other invisible formatting characters"
        )));
    }
    Ok(())
}

/// Characters that change how text around them is displayed without being seen themselves:
/// bidirectional embeddings, overrides, isolates and marks, zero-width characters, and the
/// byte-order mark. In a key or user name they let two different names look the same.
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{061C}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::collections::HashMap;

    fn drones(n: usize) -> Vec<NodeName> {
        (0..n)
            .map(|i| format!("dr-{i}").parse().expect("name"))
            .collect()
    }

    #[test]
    fn best_of_two_keeps_the_load_nearly_even() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let candidates = drones(3);
        let mut load: HashMap<NodeName, u32> = HashMap::new();
        for _ in 0..300 {
            let chosen = choose_best_of(
                candidates.clone(),
                2,
                |d| load.get(d).copied().unwrap_or(0),
                &mut rng,
            )
            .expect("a drone");
            *load.entry(chosen).or_default() += 1;
        }
        let (min, max) = (load.values().min(), load.values().max());
        assert!(
            max.zip(min).is_some_and(|(max, min)| max - min <= 3),
            "{load:?}"
        );
    }

    #[test]
    fn best_of_all_is_the_least_loaded_and_ties_are_random() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let candidates = drones(3);
        let busy: NodeName = "dr-1".parse().expect("name");
        let loads = |d: &NodeName| if *d == busy { 0 } else { 5 };
        for _ in 0..20 {
            assert_eq!(
                choose_best_of(candidates.clone(), 3, loads, &mut rng).as_ref(),
                Some(&busy)
            );
        }
        let picked: std::collections::HashSet<NodeName> = (0..50)
            .filter_map(|_| choose_best_of(candidates.clone(), 3, |_| 0, &mut rng))
            .collect();
        assert_eq!(picked.len(), 3, "equal loads: every drone gets picked");
    }
}
