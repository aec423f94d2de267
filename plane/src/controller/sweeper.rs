//! The sweeper: the controller's timed work. Each pass soft-terminates backends idle past
//! `max_idle_seconds` or older than `lifetime_limit_seconds` (reason `swept`), records as
//! `terminated{lost}` every backend whose key lease ran out, and declares drones silent past
//! the lost window lost; and, less often, deletes old data past `--retention-days`.

use super::backends::terminate;
use super::metrics::SweepReason;
use super::ControllerState;
use plane_protocol::backend::{TerminationKind, TerminationReason};
use plane_protocol::time::Millis;
use std::time::Duration;

/// The name of the sweeper's leader lease in `controller_lease`.
const SWEEPER_LEASE: &str = "sweeper";
/// The shortest leader lease, whatever the sweep interval.
const MIN_LEADER_LEASE_MS: u64 = 2_000;

/// How many expired leases one pass handles; the rest wait for the next pass.
const EXPIRED_PER_PASS: i64 = 500;

/// Old rows deleted per transaction, and transactions per retention pass: small, so a
/// backlog (a first run on a database years old) is worked off over many passes without
/// holding either database busy.
const PURGE_BATCH: i64 = 500;
const PURGE_BATCHES_PER_PASS: u32 = 20;

pub async fn run(state: ControllerState) {
    let mut interval = tokio::time::interval(Duration::from_millis(
        state.config().sweep_interval_ms.max(10),
    ));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let retention_interval = Duration::from_millis(state.config().retention_interval_ms);
    let mut last_purge: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = state.shutdown_token().cancelled() => return,
            _ = interval.tick() => {}
        }
        if !is_leader(&state).await {
            continue;
        }
        sweep_idle_and_expired(&state).await;
        sweep_expired_leases(&state).await;
        sweep_lost_drones(&state).await;
        let retention = state.config().retention_ms;
        if retention > 0 && last_purge.is_none_or(|at| at.elapsed() >= retention_interval) {
            last_purge = Some(tokio::time::Instant::now());
            purge_old_data(&state, Millis::now().minus_millis(retention)).await;
        }
    }
}

async fn purge_old_data(state: &ControllerState, cutoff: Millis) {
    match state
        .store()
        .purge(cutoff, PURGE_BATCH, PURGE_BATCHES_PER_PASS)
        .await
    {
        Ok(purged) if purged.total() > 0 => {
            state.metrics().purged(&purged);
            tracing::info!(
                backends = purged.backends,
                statuses = purged.statuses,
                tokens = purged.tokens,
                actions = purged.actions,
                revocations = purged.revocations,
                "deleted data past retention"
            )
        }
        Ok(_) => {}
        Err(err) => {
            tracing::warn!(error = %err, "could not delete data past retention; retrying next pass")
        }
    }
}

/// Whether this controller holds the sweeper's lease, taking or renewing it. Controllers on
/// one database share it, so one at a time does the timed work; if the holder dies, another
/// takes over once the lease (a few sweep intervals) runs out.
async fn is_leader(state: &ControllerState) -> bool {
    let now = Millis::now();
    let ttl = state
        .config()
        .sweep_interval_ms
        .saturating_mul(3)
        .max(MIN_LEADER_LEASE_MS);
    match state
        .store()
        .hold_controller_lease(
            SWEEPER_LEASE,
            state.controller_id(),
            now,
            now.plus_millis(ttl),
        )
        .await
    {
        Ok(held) => held,
        Err(err) => {
            tracing::warn!(error = %err, "could not renew the sweeper lease; skipping this pass");
            false
        }
    }
}

async fn sweep_idle_and_expired(state: &ControllerState) {
    let due = match state.store().sweepable_backends(Millis::now()).await {
        Ok(due) => due,
        Err(err) => {
            tracing::warn!(error = %err, "sweep query failed; retrying next interval");
            return;
        }
    };
    for backend in due {
        tracing::info!(%backend, "sweeping idle or expired backend");
        match terminate(
            state,
            &backend,
            TerminationKind::Soft,
            TerminationReason::Swept,
        )
        .await
        {
            Ok(_) => state.metrics().swept(SweepReason::IdleOrExpired, 1),
            Err(err) => tracing::warn!(%backend, error = %err, "sweep failed"),
        }
    }
}

/// A backend whose lease ran out was stopped by its drone (by protocol, on the drone's own
/// clock, before the lease ended), or its drone is gone: record it `terminated{lost}`, which
/// frees its key and drops its routes.
async fn sweep_expired_leases(state: &ControllerState) {
    let now = Millis::now();
    let expired = match state.store().expired_leases(EXPIRED_PER_PASS).await {
        Ok(expired) => expired,
        Err(err) => {
            tracing::warn!(error = %err, "expired-lease query failed; retrying next interval");
            return;
        }
    };
    for backend in expired {
        let message = format!(
            "drone {} did not renew the lease (it ran out at {} ms)",
            backend.drone, backend.lease_expires_at.0
        );
        match state
            .store()
            .expire_backend(&backend.id, TerminationReason::Lost, message, now)
            .await
        {
            Ok(Some(_)) => {
                tracing::warn!(backend = %backend.id, drone = %backend.drone, "lease ran out; backend lost");
                state.metrics().swept(SweepReason::LeaseExpired, 1);
            }
            Ok(None) => {} // renewed or terminated meanwhile
            Err(err) => {
                tracing::warn!(backend = %backend.id, error = %err, "could not expire backend")
            }
        }
    }
}

async fn sweep_lost_drones(state: &ControllerState) {
    let now = Millis::now();
    let silent_since = now.minus_millis(state.config().lost_window_ms);
    match state.store().mark_lost_drones(silent_since, now).await {
        Ok(lost) => {
            state
                .metrics()
                .swept(SweepReason::DroneLost, lost.len() as u64);
            for (cluster, drone) in lost {
                tracing::warn!(%cluster, %drone, "drone silent past the lost window; declared lost");
            }
        }
        Err(err) => tracing::warn!(error = %err, "lost-drone query failed; retrying next interval"),
    }
}
