//! `POST /ctrl/connect` and `POST /ctrl/spawn`: the request in, the backend's tokenized URL
//! out; the work is in [`crate::controller::backends`].

use super::body::ApiJson;
use crate::controller::backends;
use crate::controller::error::{ApiErrorResponse, ControllerError};
use crate::controller::ControllerState;
use axum::extract::State;
use axum::Json;
use plane_protocol::api::{ConnectRequest, ConnectResponse, SpawnRequest};
use std::time::Instant;

#[utoipa::path(
    post,
    path = "/ctrl/connect",
    operation_id = "connect",
    tag = "backends",
    request_body = plane_protocol::api::ConnectRequest,
    responses(
        (status = 200, description = "A token for the key's backend, started by this request or already running.", body = plane_protocol::api::ConnectResponse),
        (status = 409, description = "The key is held by a backend with another tag (`KeyHeld`) or one still terminating (`KeyHeldUnhealthy`), nothing holds it and there is no `spawn_config` (`KeyUnheldNoSpawnConfig`), or `spawn_config.id` is taken.", body = plane_protocol::api::ApiError),
        (status = 429, description = "Starting a backend would pass `--max-concurrent-spawns` or `--max-backends-per-namespace`; nothing was written. Joining a running backend is never refused so.", body = plane_protocol::api::ApiError,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again."))),
        (status = 503, description = "No drone can take the backend (`NoDroneAvailable`).", body = plane_protocol::api::ApiError),
    ),
)]
pub async fn handle_connect(
    State(state): State<ControllerState>,
    ApiJson(request): ApiJson<ConnectRequest>,
) -> Result<Json<ConnectResponse>, ApiErrorResponse> {
    counted(&state, "connect", backends::connect(&state, &request)).await
}

#[utoipa::path(
    post,
    path = "/ctrl/spawn",
    operation_id = "spawn",
    tag = "backends",
    request_body = plane_protocol::api::SpawnRequest,
    responses(
        (status = 200, description = "A new backend, with no key, and a token for it.", body = plane_protocol::api::ConnectResponse),
        (status = 409, description = "`spawn_config.id` is already in use.", body = plane_protocol::api::ApiError),
        (status = 429, description = "Starting a backend would pass `--max-concurrent-spawns` or `--max-backends-per-namespace`; nothing was written. Joining a running backend is never refused so.", body = plane_protocol::api::ApiError,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again."))),
        (status = 503, description = "No drone can take the backend (`NoDroneAvailable`).", body = plane_protocol::api::ApiError),
    ),
)]
pub async fn handle_spawn(
    State(state): State<ControllerState>,
    ApiJson(request): ApiJson<SpawnRequest>,
) -> Result<Json<ConnectResponse>, ApiErrorResponse> {
    counted(&state, "spawn", backends::spawn_new(&state, &request)).await
}

/// Runs a connect or spawn, counting and timing it under `endpoint`.
async fn counted(
    state: &ControllerState,
    endpoint: &'static str,
    work: impl std::future::Future<Output = Result<ConnectResponse, ControllerError>>,
) -> Result<Json<ConnectResponse>, ApiErrorResponse> {
    let started = Instant::now();
    let result = work.await.map_err(ApiErrorResponse::from);
    let spawned = |answer: &ConnectResponse| answer.spawned;
    state
        .metrics()
        .request_done(endpoint, started.elapsed(), &result, spawned);
    result.map(Json)
}
