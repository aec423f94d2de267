//! Terminating backends: the soft/hard terminate endpoints and the one function the
//! sweeper also uses.

use super::error::ApiErrorResponse;
use super::ControllerState;
use axum::extract::{Path, State};
use axum::Json;
use plane_protocol::api::TerminateResponse;
use plane_protocol::backend::{BackendStatus, TerminationKind, TerminationReason};
use plane_protocol::drone::MessageToDrone;
use plane_protocol::names::BackendName;
use std::collections::HashMap;

pub async fn handle_soft_terminate(
    State(state): State<ControllerState>,
    Path(params): Path<HashMap<String, String>>,
) -> Result<Json<TerminateResponse>, ApiErrorResponse> {
    let backend = backend_param(&params)?;
    let status = terminate(
        &state,
        &backend,
        TerminationKind::Soft,
        TerminationReason::External,
    )
    .await?;
    Ok(Json(TerminateResponse {
        backend_id: backend,
        status,
    }))
}

pub async fn handle_hard_terminate(
    State(state): State<ControllerState>,
    Path(params): Path<HashMap<String, String>>,
) -> Result<Json<TerminateResponse>, ApiErrorResponse> {
    let backend = backend_param(&params)?;
    let status = terminate(
        &state,
        &backend,
        TerminationKind::Hard,
        TerminationReason::External,
    )
    .await?;
    Ok(Json(TerminateResponse {
        backend_id: backend,
        status,
    }))
}

/// Reads and validates the `{backend}` path segment (shared by every `/b/{backend}` route).
pub fn backend_param(params: &HashMap<String, String>) -> Result<BackendName, ApiErrorResponse> {
    let raw = params
        .get("backend")
        .ok_or_else(|| ApiErrorResponse::bad_request("missing backend id in path"))?;
    raw.parse()
        .map_err(|err| ApiErrorResponse::bad_request(format!("{err}")))
}

/// Asks the backend's drone to stop it. Idempotent: asking again (or asking a terminated
/// backend) changes nothing. Returns the backend's current status.
pub async fn terminate(
    state: &ControllerState,
    backend_id: &BackendName,
    kind: TerminationKind,
    reason: TerminationReason,
) -> Result<BackendStatus, ApiErrorResponse> {
    let backend = state
        .store()
        .backend(backend_id)
        .await?
        .ok_or_else(|| ApiErrorResponse::not_found(format!("no backend {backend_id}")))?;
    if backend.status == BackendStatus::Terminated {
        return Ok(backend.status);
    }
    if state.store().request_termination(backend_id, kind).await? {
        let action = state
            .store()
            .add_action(
                backend_id,
                &backend.cluster,
                &backend.drone,
                plane_protocol::drone::ActionKind::Terminate { kind, reason },
            )
            .await?;
        tracing::info!(backend = %backend_id, ?kind, ?reason, "termination requested");
        state.nodes().send_to_drone(
            &backend.cluster,
            &backend.drone,
            MessageToDrone::Action(action),
        );
    }
    Ok(backend.status)
}
