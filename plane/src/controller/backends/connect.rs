//! Connect and spawn: join the backend holding a key (with a fresh token), claim a warm
//! backend of a matching pool, or place a new one on a drone and store it with its spawn
//! action, in one transaction.

use super::placement::pick_drone;
use super::validate::{
    validate_caller, validate_connect, validate_spawn_config, validate_token_ttl,
};
use crate::controller::bus::{ChangeBus, NextStatus};
use crate::controller::error::ControllerError;
use crate::controller::store::{
    Admission, BackendRow, ClaimOutcome, ClaimRequest, NewBackend, NewToken, StatusChange,
    StoreError,
};
use crate::controller::ControllerState;
use plane_protocol::api::{ConnectRequest, ConnectResponse, KeyConfig, SpawnConfig, SpawnRequest};
use plane_protocol::backend::{BackendStatus, TerminationReason};
use plane_protocol::drone::{ActionKind, SpawnAction};
use plane_protocol::names::{
    BackendName, BearerToken, ClusterName, NodeName, PoolName, SecretToken, Subdomain,
};
use plane_protocol::time::Millis;
use serde_json::{Map, Value};

/// How long a connect waits for a terminating backend to release the key it wants.
const KEY_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How often a connect retries after losing a race for a key to another connect.
const KEY_RACE_RETRIES: usize = 5;

/// How long a connect that claimed a warm backend waits for the backend to accept the
/// claim (the drone gives it 10 s) before answering with the status it has.
const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// What [`spawn`] did.
enum Spawned {
    Response(ConnectResponse),
    /// The key was taken by a concurrent connect; nothing was written.
    KeyTaken,
    /// The warm backend it claimed refused the claim (and was terminated): start cold.
    ClaimRefused,
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
        return spawn_keyless(state, spawn_config, &pool, caller).await;
    };

    let mut allow_warm = true;
    for _ in 0..KEY_RACE_RETRIES {
        // Subscribed before reading, so a change between the read and a wait for the holder
        // to let go is not missed.
        let mut changes = state.bus().subscribe_status();
        if let Some(holder) = key_holder(state, key, &mut changes).await? {
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
            if let Some(response) = join_existing(state, holder.backend, changes, caller).await? {
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
        match spawn(state, spawn_config, &pool, Some(key), caller, allow_warm).await? {
            Spawned::Response(response) => return Ok(response),
            // Another connect took the key first; join its backend on the next pass.
            Spawned::KeyTaken => {}
            Spawned::ClaimRefused => allow_warm = false,
        }
    }
    Err(anyhow::anyhow!(
        "gave up after {KEY_RACE_RETRIES} races for key {:?}",
        key.name
    )
    .into())
}

/// The key's holder: from the holder cache when a join read it recently and no status has
/// changed since, else from the database (and then cached, unless the bus delivered a change
/// of it since `changes` was subscribed, which was before the read).
async fn key_holder(
    state: &ControllerState,
    key: &KeyConfig,
    changes: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<StatusChange>>,
) -> Result<Option<crate::controller::store::KeyHolder>, ControllerError> {
    let cache = state.holders();
    let epoch = state.store().status_epoch();
    if let Some(holder) = epoch.and_then(|epoch| cache.get(&key.namespace, &key.name, epoch)) {
        return Ok(Some(holder));
    }
    let read_at = tokio::time::Instant::now();
    let holder = state.store().key_holder(&key.namespace, &key.name).await?;
    if let Some(holder) = &holder {
        let mut changed = false;
        loop {
            match changes.try_recv() {
                Ok(change) => changed |= change.backend_id == holder.backend_id,
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => changed = true,
                Err(_) => break,
            }
        }
        if let (false, Some(epoch)) = (changed, epoch) {
            cache.insert(&key.namespace, &key.name, holder, read_at, epoch);
        }
    }
    Ok(holder)
}

/// `POST /ctrl/spawn`: always a new backend, with no key.
pub async fn spawn_new(
    state: &ControllerState,
    request: &SpawnRequest,
) -> Result<ConnectResponse, ControllerError> {
    validate_spawn_config(&request.spawn_config)?;
    validate_caller(request.user.as_deref(), &request.auth)?;
    validate_token_ttl(request.token_ttl_seconds, Some(&request.spawn_config))?;
    let pool = request.spawn_config.pool.clone().unwrap_or_default();
    let caller = Caller {
        user: request.user.as_deref(),
        auth: &request.auth,
        token_ttl_seconds: request.token_ttl_seconds,
    };
    spawn_keyless(state, &request.spawn_config, &pool, caller).await
}

/// A new backend without a key: a warm one if its pool has one idle that accepts the
/// claim, else a cold one.
async fn spawn_keyless(
    state: &ControllerState,
    spawn_config: &SpawnConfig,
    pool: &PoolName,
    caller: Caller<'_>,
) -> Result<ConnectResponse, ControllerError> {
    let mut allow_warm = true;
    loop {
        match spawn(state, spawn_config, pool, None, caller, allow_warm).await? {
            Spawned::Response(response) => return Ok(response),
            Spawned::ClaimRefused if allow_warm => allow_warm = false,
            _ => return Err(anyhow::anyhow!("a spawn without a key lost a key race").into()),
        }
    }
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
    backend: BackendRow,
    mut changes: tokio::sync::broadcast::Receiver<std::sync::Arc<StatusChange>>,
    caller: Caller<'_>,
) -> Result<Option<ConnectResponse>, ControllerError> {
    let backend_id = &backend.id;
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

/// Starts a new backend: claims a warm one when `allow_warm` and the pool keeps warm
/// backends of this executable, else places a cold one.
async fn spawn(
    state: &ControllerState,
    spawn_config: &SpawnConfig,
    pool: &PoolName,
    key: Option<&KeyConfig>,
    caller: Caller<'_>,
    allow_warm: bool,
) -> Result<Spawned, ControllerError> {
    let mount_dir = plane_protocol::mount::mount_dir(
        spawn_config.executable.mount.as_ref(),
        key.map(|key| (key.namespace.as_str(), key.name.as_str())),
    )
    .map_err(ControllerError::invalid)?;
    let cluster = spawn_config
        .cluster
        .clone()
        .or_else(|| state.config().default_cluster.clone())
        .ok_or(ControllerError::NoClusterProvided)?;
    // A chosen backend ID or a key's own mount is not something a warm backend can have.
    let claimable = spawn_config.id.is_none() && mount_dir.is_none();
    if allow_warm && claimable {
        if let Some(spawned) = claim_warm(state, spawn_config, &cluster, pool, key, caller).await? {
            return Ok(spawned);
        }
    }
    let needs_disk_limits = spawn_config
        .executable
        .resource_limits
        .disk_limit_bytes
        .is_some();
    let drone = pick_drone(state, &cluster, pool, needs_disk_limits)
        .await?
        .ok_or_else(|| ControllerError::NoDroneAvailable {
            cluster: cluster.clone(),
            pool: pool.to_string(),
        })?;

    let backend_id = spawn_config
        .id
        .clone()
        .unwrap_or_else(BackendName::new_random);
    let (token, secret, static_token) = first_token(spawn_config);
    let new = NewBackend {
        id: &backend_id,
        cluster: &cluster,
        pool: pool.as_str(),
        drone: &drone,
        spawn_config,
        key,
        static_token: static_token.as_ref(),
        token: Some(NewToken {
            token: &token,
            secret: &secret,
            user: caller.user,
            auth: caller.auth,
            expires_at: caller.token_expires_at(),
        }),
        warm: None,
        now: Millis::now(),
        lease_ms: state.config().lease_ms,
        admission: Admission {
            max_concurrent_spawns: state.config().max_concurrent_spawns,
            max_backends_per_namespace: state.config().max_backends_per_namespace,
        },
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
                mount_dir: mount_dir.clone(),
                warm: false,
            })
        })
        .await;
    let created = match created {
        Ok(Some(created)) => created,
        Ok(None) => return Ok(Spawned::KeyTaken),
        Err(StoreError::AlreadyExists(_)) => {
            return Err(ControllerError::BackendIdTaken(backend_id))
        }
        Err(StoreError::Refused(refusal)) => return Err(ControllerError::NotAdmitted(refusal)),
        Err(err) => return Err(err.into()),
    };
    // The stored spawn action reaches the drone through the change bus, from whichever
    // controller holds its session.
    tracing::debug!(action_id = created.action_id, fencing_token = ?created.fencing_token, "spawn action stored");
    tracing::info!(backend = %backend_id, %drone, %cluster, key = ?key.map(|k| &k.name), "backend scheduled");
    Ok(Spawned::Response(response(
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

/// Claims an idle warm backend of the pool whose executable is this spawn's, and waits
/// (up to [`CLAIM_WAIT`]) for it to accept the claim. `None` when the pool has none idle.
async fn claim_warm(
    state: &ControllerState,
    spawn_config: &SpawnConfig,
    cluster: &ClusterName,
    pool: &PoolName,
    key: Option<&KeyConfig>,
    caller: Caller<'_>,
) -> Result<Option<Spawned>, ControllerError> {
    let fingerprint = crate::controller::store::fingerprint(&spawn_config.executable);
    let (token, secret, static_token) = first_token(spawn_config);
    // Subscribed before claiming, so the backend's answer cannot slip past.
    let mut changes = state.bus().subscribe_status();
    let claim = ClaimRequest {
        cluster,
        pool: pool.as_str(),
        fingerprint: &fingerprint,
        key,
        static_token: static_token.as_ref(),
        token: NewToken {
            token: &token,
            secret: &secret,
            user: caller.user,
            auth: caller.auth,
            expires_at: caller.token_expires_at(),
        },
        max_idle_seconds: spawn_config.max_idle_seconds,
        lifetime_limit_seconds: spawn_config.lifetime_limit_seconds,
        subdomain: spawn_config.subdomain.as_ref(),
        max_backends_per_namespace: state.config().max_backends_per_namespace,
        now: Millis::now(),
    };
    let claimed = match state.store().claim_warm(claim).await {
        Ok(ClaimOutcome::Claimed(claimed)) => claimed,
        Ok(ClaimOutcome::NoneIdle) => return Ok(None),
        Ok(ClaimOutcome::KeyTaken) => return Ok(Some(Spawned::KeyTaken)),
        Err(StoreError::Refused(refusal)) => return Err(ControllerError::NotAdmitted(refusal)),
        Err(err) => return Err(err.into()),
    };
    let backend_id = claimed.backend_id;
    tracing::info!(backend = %backend_id, drone = %claimed.drone, %cluster, key = ?key.map(|k| &k.name), fencing_token = ?claimed.fencing_token, "warm backend claimed");
    let deadline = tokio::time::Instant::now() + CLAIM_WAIT;
    // What changes after the claim comes on the bus (subscribed before it); the backend is
    // read again only if this receiver missed some.
    let mut status = claimed.status;
    while status != BackendStatus::Ready && !status.is_terminating() {
        status = match ChangeBus::next_status_of(&mut changes, &backend_id, deadline).await {
            NextStatus::Changed(next) => next,
            NextStatus::Missed => state
                .store()
                .backend(&backend_id)
                .await?
                .map_or(BackendStatus::Terminated, |b| b.status),
            // Slow to answer: the caller follows its status like any other backend's.
            NextStatus::TimedOut => break,
        };
    }
    if status.is_terminating() {
        tracing::warn!(backend = %backend_id, "the claimed warm backend did not accept its claim; starting one cold");
        return Ok(Some(Spawned::ClaimRefused));
    }
    Ok(Some(Spawned::Response(response(
        state,
        backend_id,
        true,
        status,
        cluster,
        spawn_config.subdomain.clone(),
        token,
        secret,
        claimed.drone,
    ))))
}

/// A new backend's first token and secret, and the token again if it is the backend's
/// one static token.
fn first_token(spawn_config: &SpawnConfig) -> (BearerToken, SecretToken, Option<BearerToken>) {
    let token = if spawn_config.use_static_token {
        BearerToken::new_random_static()
    } else {
        BearerToken::new_random()
    };
    let static_token = spawn_config.use_static_token.then(|| token.clone());
    (token, SecretToken::new_random(), static_token)
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
        url: format!(
            "{}/{token}/",
            cluster.base_url_with(subdomain.as_ref(), state.config().serves_https(cluster))
        ),
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
