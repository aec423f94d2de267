//! The warm-pool keeper: keeps every warm pool at its size. It starts warm backends where a
//! pool has too few unclaimed ones (spread over the pool's drones by the usual placement),
//! stops the newest where it has too many, and stops unclaimed ones that no pool wants any
//! more or whose drone is draining or lost. One controller at a time keeps the pools (a
//! leader lease); the count that decides a refill is checked again in the transaction that
//! writes the new backend, so even two keepers never overfill a pool.

use super::backends::pick_drone;
use super::store::{Admission, NewBackend, StoreError, UnclaimedWarm, WarmPoolRow, WarmSpawn};
use super::ControllerState;
use plane_protocol::api::SpawnConfig;
use plane_protocol::drone::{ActionKind, SpawnAction};
use plane_protocol::names::{BackendName, PoolName};
use plane_protocol::time::Millis;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::time::Instant;

/// The keeper's leader lease in `controller_lease`.
const KEEPER_LEASE: &str = "warm-keeper";
const KEEPER_LEASE_MS: u64 = 3_000;
/// A pass at least this often; status changes (a claimed backend becoming ready, a backend
/// ending) bring the next pass forward.
const PASS_INTERVAL: Duration = Duration::from_millis(500);
/// After a change, wait this long for more before the pass, so a burst of claims costs one.
const CHANGE_SETTLE: Duration = Duration::from_millis(20);
/// Passes are at least this far apart however often statuses change: each one writes the
/// leader lease and reads every unclaimed backend, and under a steady stream of changes
/// (a burst of claims, or a big cluster's churn) a pass every settle would cost more than
/// the claims themselves.
const MIN_PASS_GAP: Duration = Duration::from_millis(200);
/// At most this many of a pool's warm backends are starting at once, so that refilling a
/// pool after a burst of claims does not flood the drones' engines (and their CPUs) while
/// the claimed backends serve; the rest follow as these become idle.
const MAX_STARTING_PER_POOL: u32 = 8;
/// Refills of a pool whose backends fail to start back off from this, doubling, to
/// [`MAX_BACKOFF`]; one backend that reaches idle resets it.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

type PoolKey = (plane_protocol::names::ClusterName, String, String);

/// Backoff of one pool whose warm backends fail to start.
struct Backoff {
    delay: Duration,
    until: tokio::time::Instant,
}

pub async fn run(state: ControllerState) {
    let mut changes = state.bus().subscribe_status();
    let mut backoffs: HashMap<PoolKey, Backoff> = HashMap::new();
    let mut last_pass = Millis::now();
    let mut last_pass_at = Instant::now();
    loop {
        tokio::select! {
            _ = state.shutdown_token().cancelled() => return,
            _ = tokio::time::sleep(PASS_INTERVAL) => {}
            _ = changes.recv() => {
                let at = pass_after_change(last_pass_at, Instant::now());
                tokio::select! {
                    _ = state.shutdown_token().cancelled() => return,
                    _ = tokio::time::sleep_until(at) => {}
                }
                // Whatever else arrived meanwhile is covered by this pass.
                while changes.try_recv().is_ok() {}
            }
        }
        last_pass_at = Instant::now();
        if !is_leader(&state).await {
            continue;
        }
        let started = Millis::now();
        if let Err(err) = pass(&state, &mut backoffs, last_pass).await {
            tracing::warn!(error = %err, "warm pool pass failed; retrying");
        }
        last_pass = started;
    }
}

/// When the pass that a status change at `changed` brings forward runs: once the rest of its
/// burst had time to arrive, and no sooner than [`MIN_PASS_GAP`] after the previous one.
fn pass_after_change(previous_pass: Instant, changed: Instant) -> Instant {
    (changed + CHANGE_SETTLE).max(previous_pass + MIN_PASS_GAP)
}

async fn is_leader(state: &ControllerState) -> bool {
    let now = Millis::now();
    state
        .store()
        .hold_controller_lease(
            KEEPER_LEASE,
            state.controller_id(),
            now,
            now.plus_millis(KEEPER_LEASE_MS),
        )
        .await
        .unwrap_or(false)
}

/// One look at every pool: stop what is unwanted, then fill what is short.
async fn pass(
    state: &ControllerState,
    backoffs: &mut HashMap<PoolKey, Backoff>,
    since: Millis,
) -> Result<(), StoreError> {
    let pools = state.store().warm_pools(None).await?;
    let unclaimed = state.store().unclaimed_warm_backends().await?;
    let wanted: HashMap<PoolKey, &WarmPoolRow> = pools
        .iter()
        .map(|p| {
            (
                (p.cluster.clone(), p.pool.clone(), p.fingerprint.clone()),
                p,
            )
        })
        .collect();
    let mut stopped = HashSet::new();
    // Grouped by pool, newest first (the store's order).
    let mut by_pool: HashMap<PoolKey, Vec<&UnclaimedWarm>> = HashMap::new();
    for backend in &unclaimed {
        let key = (
            backend.cluster.clone(),
            backend.pool.clone(),
            backend.fingerprint.clone(),
        );
        if !wanted.contains_key(&key) || backend.on_unplaceable_drone {
            stop(state, &backend.id, &mut stopped).await;
            continue;
        }
        by_pool.entry(key).or_default().push(backend);
    }
    for (key, pool) in &wanted {
        let backends = by_pool.remove(key).unwrap_or_default();
        let have = backends.len() as u32;
        if have > pool.size {
            // The starting ones go first (they serve nobody yet), newest first.
            let mut extra: Vec<&&UnclaimedWarm> = backends.iter().collect();
            extra.sort_by_key(|b| (b.idle, std::cmp::Reverse(b.created_at)));
            for backend in extra.into_iter().take((have - pool.size) as usize) {
                stop(state, &backend.id, &mut stopped).await;
            }
            continue;
        }
        if have == pool.size {
            continue;
        }
        let now = tokio::time::Instant::now();
        let failed = state
            .store()
            .failed_warm_starts(&pool.cluster, &pool.pool, &pool.fingerprint, since)
            .await?;
        if failed > 0 {
            let delay = next_backoff(backoffs.get(key).map(|b| b.delay));
            tracing::warn!(cluster = %pool.cluster, pool = %pool.pool, image = %pool.executable.image, failed, backoff = ?delay, "warm backends failed to start; backing off");
            backoffs.insert(
                key.clone(),
                Backoff {
                    delay,
                    until: now + delay,
                },
            );
        } else if backends.iter().any(|b| b.idle) {
            backoffs.remove(key);
        }
        if backoffs.get(key).is_some_and(|b| b.until > now) {
            continue;
        }
        let starting = backends.iter().filter(|b| !b.idle).count() as u32;
        let room = MAX_STARTING_PER_POOL.saturating_sub(starting);
        fill(state, pool, (pool.size - have).min(room)).await;
    }
    Ok(())
}

/// The pause before the next refill of a pool whose backends just failed to start, after
/// `previous` (none: the first failure since one reached idle).
fn next_backoff(previous: Option<Duration>) -> Duration {
    previous.map_or(FIRST_BACKOFF, |delay| (delay * 2).min(MAX_BACKOFF))
}

async fn stop(state: &ControllerState, id: &BackendName, stopped: &mut HashSet<BackendName>) {
    if !stopped.insert(id.clone()) {
        return;
    }
    match state.store().stop_unclaimed_warm(id).await {
        Ok(true) => tracing::info!(backend = %id, "stopping an unclaimed warm backend"),
        Ok(false) => {}
        Err(err) => tracing::warn!(backend = %id, error = %err, "could not stop a warm backend"),
    }
}

/// Starts up to `count` warm backends of `pool`.
async fn fill(state: &ControllerState, pool: &WarmPoolRow, count: u32) {
    let pool_name: PoolName = match pool.pool.parse() {
        Ok(name) => name,
        Err(_) => return,
    };
    let spawn_config = SpawnConfig {
        cluster: Some(pool.cluster.clone()),
        pool: (!pool_name.is_default()).then(|| pool_name.clone()),
        ..SpawnConfig::of(pool.executable.clone())
    };
    let needs_disk_limits = pool.executable.resource_limits.disk_limit_bytes.is_some();
    for _ in 0..count {
        let drone = match pick_drone(state, &pool.cluster, &pool_name, needs_disk_limits).await {
            Ok(Some(drone)) => drone,
            // No drone can take one now; the next pass tries again.
            Ok(None) | Err(_) => return,
        };
        let id = BackendName::new_random();
        let new = NewBackend {
            id: &id,
            cluster: &pool.cluster,
            pool: &pool.pool,
            drone: &drone,
            spawn_config: &spawn_config,
            key: None,
            static_token: None,
            token: None,
            warm: Some(WarmSpawn {
                fingerprint: &pool.fingerprint,
                size: pool.size,
            }),
            now: Millis::now(),
            lease_ms: state.config().lease_ms,
            admission: Admission {
                max_concurrent_spawns: state.config().max_concurrent_spawns,
                max_backends_per_namespace: None,
            },
        };
        let created = state
            .store()
            .create_backend(new, |_| {
                ActionKind::Spawn(SpawnAction {
                    executable: pool.executable.clone(),
                    key: None,
                    fencing_token: None,
                    static_token: None,
                    startup_timeout_ms: None,
                    mount_dir: None,
                    warm: true,
                })
            })
            .await;
        match created {
            Ok(_) => {
                tracing::info!(backend = %id, %drone, cluster = %pool.cluster, pool = %pool.pool, image = %pool.executable.image, "warm backend scheduled")
            }
            // Full (another keeper filled it), or the cluster's spawn limit: next pass.
            Err(StoreError::Refused(_)) => return,
            Err(err) => {
                tracing::warn!(error = %err, "could not start a warm backend");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_after_a_quiet_spell_brings_the_pass_forward_to_its_settle() {
        let start = Instant::now();
        let changed = start + Duration::from_secs(5);
        assert_eq!(pass_after_change(start, changed), changed + CHANGE_SETTLE);
    }

    /// A change every millisecond for two seconds, each pass starting when the last one asked
    /// for it: one pass per gap, not one per settle.
    #[test]
    fn a_steady_stream_of_changes_gets_a_pass_per_gap() {
        let start = Instant::now();
        let (mut previous, mut passes) = (start, Vec::new());
        let mut now = start;
        while now < start + Duration::from_secs(2) {
            let at = pass_after_change(previous, now);
            passes.push(at);
            previous = at;
            // The next change the loop sees is the first one at or after the pass.
            now = at.max(now + Duration::from_millis(1));
        }
        assert!(
            passes.windows(2).all(|w| w[1] - w[0] == MIN_PASS_GAP),
            "{passes:?}"
        );
        // A pass had just run at the start; then one per 200 ms.
        assert_eq!(passes.len(), 10);
    }

    #[test]
    fn refills_of_failing_pools_back_off_doubling_to_a_minute() {
        let mut delays = Vec::new();
        let mut delay = None;
        for _ in 0..9 {
            let next = next_backoff(delay);
            delays.push(next.as_secs());
            delay = Some(next);
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
