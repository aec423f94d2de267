//! `POST /ctrl/b/revoke` (and `/ctrl/revoke`, which Plane 0.5's client calls): a user's
//! tokens for one backend stop working at every proxy, on every controller.

use super::body::ApiJson;
use crate::controller::backends::validate::validate_text;
use crate::controller::error::{ApiErrorResponse, ControllerError};
use crate::controller::ControllerState;
use axum::extract::State;
use axum::Json;
use plane_protocol::api::RevokeRequest;
use plane_protocol::time::Millis;

/// The longest `user` a connect accepts is the longest worth revoking.
const MAX_USER_LENGTH: usize = 256;

/// Answers `null`, as Plane 0.5 does.
#[utoipa::path(
    post,
    path = "/ctrl/b/revoke",
    operation_id = "revoke",
    tag = "backends",
    request_body = plane_protocol::api::RevokeRequest,
    responses(
        (status = 200, description = "Every token issued for the backend to the user stops working. Answers `null`.", body = ()),
        (status = 404, description = "No such backend.", body = plane_protocol::api::ApiError),
    ),
)]
pub async fn handle_revoke(
    State(state): State<ControllerState>,
    ApiJson(request): ApiJson<RevokeRequest>,
) -> Result<Json<()>, ApiErrorResponse> {
    validate_text("user", &request.user, 1, MAX_USER_LENGTH)?;
    revoke(&state, &request).await?;
    Ok(Json(()))
}

/// Revokes the tokens in the store; the change bus tells the proxies, which drop the
/// cached routes at once (and the store no longer resolves the tokens for anyone).
pub async fn revoke(
    state: &ControllerState,
    request: &RevokeRequest,
) -> Result<(), ControllerError> {
    let revoked = state
        .store()
        .revoke_tokens(&request.backend_id, &request.user, Millis::now())
        .await?
        .ok_or_else(|| ControllerError::BackendNotFound(request.backend_id.clone()))?;
    tracing::info!(backend = %request.backend_id, user = %request.user, revoked, "tokens revoked");
    Ok(())
}
