//! `POST /ctrl/connect` and `POST /ctrl/spawn`: the request in, the backend's tokenized URL
//! out; the work is in [`crate::controller::backends`].

use super::body::ApiJson;
use crate::controller::backends;
use crate::controller::error::ApiErrorResponse;
use crate::controller::ControllerState;
use axum::extract::State;
use axum::Json;
use plane_protocol::api::{ConnectRequest, ConnectResponse, SpawnRequest};
use std::time::Instant;

pub async fn handle_connect(
    State(state): State<ControllerState>,
    ApiJson(request): ApiJson<ConnectRequest>,
) -> Result<Json<ConnectResponse>, ApiErrorResponse> {
    let started = Instant::now();
    let result = backends::connect(&state, &request)
        .await
        .map_err(Into::into);
    let spawned = |answer: &ConnectResponse| answer.spawned;
    state
        .metrics()
        .request_done("connect", started.elapsed(), &result, spawned);
    result.map(Json)
}

pub async fn handle_spawn(
    State(state): State<ControllerState>,
    ApiJson(request): ApiJson<SpawnRequest>,
) -> Result<Json<ConnectResponse>, ApiErrorResponse> {
    let started = Instant::now();
    let result = backends::spawn_new(&state, &request)
        .await
        .map_err(Into::into);
    let spawned = |answer: &ConnectResponse| answer.spawned;
    state
        .metrics()
        .request_done("spawn", started.elapsed(), &result, spawned);
    result.map(Json)
}
