//! The sweeper: soft-terminates backends idle past `max_idle_seconds` or older than
//! `lifetime_limit_seconds`, with reason `swept`.

use super::terminate::terminate;
use super::ControllerState;
use plane_protocol::backend::{TerminationKind, TerminationReason};
use plane_protocol::time::Millis;
use std::time::Duration;

pub async fn run(state: ControllerState) {
    let mut interval = tokio::time::interval(Duration::from_millis(
        state.config().sweep_interval_ms.max(10),
    ));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = state.shutdown_token().cancelled() => return,
            _ = interval.tick() => {}
        }
        let due = match state.store().sweepable_backends(Millis::now()).await {
            Ok(due) => due,
            Err(err) => {
                tracing::warn!(error = %err, "sweep query failed; retrying next interval");
                continue;
            }
        };
        for backend in due {
            tracing::info!(%backend, "sweeping idle or expired backend");
            if let Err(err) = terminate(
                &state,
                &backend,
                TerminationKind::Soft,
                TerminationReason::Swept,
            )
            .await
            {
                tracing::warn!(%backend, error = %err, "sweep failed");
            }
        }
    }
}
