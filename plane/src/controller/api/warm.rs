//! `POST /ctrl/c/:cluster/warm` and `POST /ctrl/c/:cluster/pools/:pool/warm`: set how many
//! started, unclaimed backends of an executable a pool keeps (the keeper in
//! [`crate::controller::warm`] does the rest).

use super::body::ApiJson;
use super::paths::PoolPath;
use crate::controller::backends::validate::validate_executable;
use crate::controller::error::{ApiErrorResponse, ControllerError};
use crate::controller::ControllerState;
use axum::extract::State;
use axum::Json;
use plane_protocol::api::{WarmPoolRequest, WarmPoolState};
use plane_protocol::time::Millis;

/// The largest warm pool: a thousand backends per executable and pool.
const MAX_WARM_POOL_SIZE: u32 = 1000;

#[utoipa::path(
    post,
    path = "/ctrl/c/{cluster}/pools/{pool}/warm",
    operation_id = "set_warm_pool",
    tag = "cluster",
    params(
        ("cluster" = plane_protocol::names::ClusterName, Path, description = "The cluster."),
        ("pool" = plane_protocol::names::PoolName, Path, description = "The drone pool (`/ctrl/c/{cluster}/warm` is the default pool's)."),
    ),
    request_body = plane_protocol::api::WarmPoolRequest,
    responses((status = 200, description = "The warm pool as it is now; the keeper fills or shrinks it to `size` within a second.", body = plane_protocol::api::WarmPoolState)),
)]
pub async fn handle_set_warm_pool(
    State(state): State<ControllerState>,
    path: PoolPath,
    ApiJson(request): ApiJson<WarmPoolRequest>,
) -> Result<Json<WarmPoolState>, ApiErrorResponse> {
    Ok(Json(set_warm_pool(&state, path, request).await?))
}

#[utoipa::path(
    post,
    path = "/ctrl/c/{cluster}/warm",
    operation_id = "set_default_warm_pool",
    tag = "cluster",
    params(("cluster" = plane_protocol::names::ClusterName, Path, description = "The cluster; its default drone pool keeps the warm backends.")),
    request_body = plane_protocol::api::WarmPoolRequest,
    responses((status = 200, description = "The warm pool as it is now; the keeper fills or shrinks it to `size` within a second.", body = plane_protocol::api::WarmPoolState)),
)]
pub async fn handle_set_default_warm_pool(
    State(state): State<ControllerState>,
    path: PoolPath,
    ApiJson(request): ApiJson<WarmPoolRequest>,
) -> Result<Json<WarmPoolState>, ApiErrorResponse> {
    Ok(Json(set_warm_pool(&state, path, request).await?))
}

async fn set_warm_pool(
    state: &ControllerState,
    PoolPath { cluster, pool }: PoolPath,
    request: WarmPoolRequest,
) -> Result<WarmPoolState, ControllerError> {
    validate_executable("executable", &request.executable)?;
    if request.size > MAX_WARM_POOL_SIZE {
        return Err(ControllerError::invalid(format!(
            "size must be 0 to {MAX_WARM_POOL_SIZE}, got {}",
            request.size
        )));
    }
    if matches!(
        request.executable.mount,
        Some(plane_protocol::mount::Mount::Enabled(true) | plane_protocol::mount::Mount::Path(_))
    ) {
        return Err(ControllerError::invalid(
            "executable.mount cannot be kept warm: a warm backend starts before a connect claims it, so there is nothing to mount yet; leave it out",
        ));
    }
    let fingerprint = state
        .store()
        .set_warm_pool(
            &cluster,
            pool.as_str(),
            &request.executable,
            request.size,
            Millis::now(),
        )
        .await?;
    let counts = state
        .store()
        .warm_counts(Some(&cluster))
        .await?
        .remove(&(cluster.clone(), pool.to_string(), fingerprint.clone()))
        .unwrap_or_default();
    tracing::info!(%cluster, %pool, image = %request.executable.image, size = request.size, "warm pool set");
    Ok(WarmPoolState {
        pool,
        image: request.executable.image,
        fingerprint,
        size: request.size,
        idle: counts.idle,
        starting: counts.starting,
    })
}
