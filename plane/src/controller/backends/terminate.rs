//! Terminating a backend: the one function the terminate endpoints and the sweeper share.

use crate::controller::error::ControllerError;
use crate::controller::ControllerState;
use plane_protocol::backend::{BackendStatus, TerminationKind, TerminationReason};
use plane_protocol::names::BackendName;

/// Asks the backend's drone to stop it. Idempotent: asking again (or asking a terminated
/// backend) changes nothing. Returns the backend's current status.
pub async fn terminate(
    state: &ControllerState,
    backend_id: &BackendName,
    kind: TerminationKind,
    reason: TerminationReason,
) -> Result<BackendStatus, ControllerError> {
    let backend = state
        .store()
        .backend(backend_id)
        .await?
        .ok_or_else(|| ControllerError::BackendNotFound(backend_id.clone()))?;
    if backend.status == BackendStatus::Terminated {
        return Ok(backend.status);
    }
    // The stored action reaches the drone through the change bus.
    if let Some(action) = state
        .store()
        .request_termination(&backend, kind, reason)
        .await?
    {
        tracing::info!(backend = %backend_id, ?kind, ?reason, action_id = action.action_id, "termination requested");
    }
    Ok(backend.status)
}
