//! Terminating backends: the soft/hard terminate endpoints and the one function the
//! sweeper also uses.

use super::error::{ApiErrorResponse, ControllerError};
use super::paths::BackendPath;
use super::ControllerState;
use axum::extract::State;
use axum::Json;
use plane_protocol::backend::{BackendStatus, TerminationKind, TerminationReason};
use plane_protocol::names::BackendName;

pub async fn handle_soft_terminate(
    State(state): State<ControllerState>,
    path: BackendPath,
) -> Result<Json<()>, ApiErrorResponse> {
    terminate_on_request(&state, path, TerminationKind::Soft).await
}

pub async fn handle_hard_terminate(
    State(state): State<ControllerState>,
    path: BackendPath,
) -> Result<Json<()>, ApiErrorResponse> {
    terminate_on_request(&state, path, TerminationKind::Hard).await
}

/// A terminate asked for on the API (reason `external`). Answers `null`.
async fn terminate_on_request(
    state: &ControllerState,
    path: BackendPath,
    kind: TerminationKind,
) -> Result<Json<()>, ApiErrorResponse> {
    path.check_cluster(state).await?;
    terminate(state, &path.backend, kind, TerminationReason::External).await?;
    // Plane 0.5's client reads the body as `()`: JSON `null`, nothing else.
    Ok(Json(()))
}

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
