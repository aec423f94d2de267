//! `POST /ctrl/b/:backend/soft-terminate` and `/hard-terminate`.

use super::paths::BackendPath;
use crate::controller::backends::terminate;
use crate::controller::error::ApiErrorResponse;
use crate::controller::ControllerState;
use axum::extract::State;
use axum::Json;
use plane_protocol::backend::{TerminationKind, TerminationReason};

#[utoipa::path(
    post,
    path = "/ctrl/b/{backend}/soft-terminate",
    operation_id = "soft_terminate",
    tag = "backends",
    params(("backend" = plane_protocol::names::BackendName, Path, description = "The backend's ID.")),
    responses(
        (status = 200, description = "The backend is sent SIGTERM and, after the drone's grace period, SIGKILL. Answers `null`.", body = ()),
        (status = 404, description = "No such backend.", body = plane_protocol::api::ApiError),
    ),
)]
pub async fn handle_soft_terminate(
    State(state): State<ControllerState>,
    path: BackendPath,
) -> Result<Json<()>, ApiErrorResponse> {
    terminate_on_request(&state, path, TerminationKind::Soft).await
}

#[utoipa::path(
    post,
    path = "/ctrl/b/{backend}/hard-terminate",
    operation_id = "hard_terminate",
    tag = "backends",
    params(("backend" = plane_protocol::names::BackendName, Path, description = "The backend's ID.")),
    responses(
        (status = 200, description = "The backend is killed at once. Answers `null`.", body = ()),
        (status = 404, description = "No such backend.", body = plane_protocol::api::ApiError),
    ),
)]
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
