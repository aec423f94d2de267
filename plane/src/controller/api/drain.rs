//! `POST /ctrl/c/:cluster/d/:drone/drain` and `/undrain`: a drained drone is given no new
//! backends while the ones it runs keep serving.

use super::paths::DronePath;
use crate::controller::error::{ApiErrorResponse, ControllerError};
use crate::controller::ControllerState;
use axum::extract::State;
use axum::Json;
use plane_protocol::api::DrainResult;
use plane_protocol::names::{ClusterName, NodeName};

#[utoipa::path(
    post,
    path = "/ctrl/c/{cluster}/d/{drone}/drain",
    operation_id = "drain_drone",
    tag = "cluster",
    params(
        ("cluster" = plane_protocol::names::ClusterName, Path, description = "The drone's cluster."),
        ("drone" = plane_protocol::names::NodeName, Path, description = "The drone's name."),
    ),
    responses(
        (status = 200, description = "The drone gets no new backends; its own keep serving. `updated` is false when it was already draining.", body = plane_protocol::api::DrainResult),
        (status = 404, description = "No such drone in the cluster.", body = plane_protocol::api::ApiError),
    ),
)]
pub async fn handle_drain(
    State(state): State<ControllerState>,
    path: DronePath,
) -> Result<Json<DrainResult>, ApiErrorResponse> {
    let updated = drain(&state, &path.cluster, &path.drone, true).await?;
    Ok(Json(DrainResult { updated }))
}

#[utoipa::path(
    post,
    path = "/ctrl/c/{cluster}/d/{drone}/undrain",
    operation_id = "undrain_drone",
    tag = "cluster",
    params(
        ("cluster" = plane_protocol::names::ClusterName, Path, description = "The drone's cluster."),
        ("drone" = plane_protocol::names::NodeName, Path, description = "The drone's name."),
    ),
    responses(
        (status = 200, description = "The drone may be given backends again. `updated` is false when it was not draining.", body = plane_protocol::api::DrainResult),
        (status = 404, description = "No such drone in the cluster.", body = plane_protocol::api::ApiError),
    ),
)]
pub async fn handle_undrain(
    State(state): State<ControllerState>,
    path: DronePath,
) -> Result<Json<DrainResult>, ApiErrorResponse> {
    let updated = drain(&state, &path.cluster, &path.drone, false).await?;
    Ok(Json(DrainResult { updated }))
}

/// Drains or undrains a drone; true when that changed anything. Idempotent.
pub async fn drain(
    state: &ControllerState,
    cluster: &ClusterName,
    drone: &NodeName,
    draining: bool,
) -> Result<bool, ControllerError> {
    let updated = state
        .store()
        .set_draining(cluster, drone, draining)
        .await?
        .ok_or_else(|| ControllerError::DroneNotFound {
            cluster: cluster.clone(),
            drone: drone.clone(),
        })?;
    if updated {
        tracing::info!(%cluster, %drone, draining, "drone drain state changed");
    }
    Ok(updated)
}
