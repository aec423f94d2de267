//! Health and state endpoints: `/pub/health`, `/ctrl/status`, `/ctrl/c/:cluster/state`.

use super::error::ApiErrorResponse;
use super::paths::ClusterPath;
use super::store::NodeKind;
use super::ControllerState;
use axum::extract::State;
use axum::Json;
use plane_protocol::api::{ClusterState, ControllerStatus, NodeState};
use plane_protocol::time::Millis;
use plane_protocol::PLANE_VERSION;

/// Public liveness: no details beyond the version.
pub async fn handle_health() -> Json<ControllerStatus> {
    Json(ControllerStatus {
        status: "ok".to_string(),
        version: PLANE_VERSION.to_string(),
        database: None,
    })
}

/// Operator status: also names the database in use.
pub async fn handle_controller_status(
    State(state): State<ControllerState>,
) -> Json<ControllerStatus> {
    Json(ControllerStatus {
        status: "ok".to_string(),
        version: PLANE_VERSION.to_string(),
        database: Some(state.store().kind().as_str().to_string()),
    })
}

pub async fn handle_cluster_state(
    State(state): State<ControllerState>,
    ClusterPath(cluster): ClusterPath,
) -> Result<Json<ClusterState>, ApiErrorResponse> {
    let live = state.store().live_backend_counts(&cluster).await?;
    let fresh_since = Millis::now().minus_millis(state.config().lease_ms);
    let drones = state
        .store()
        .nodes(&cluster, NodeKind::Drone)
        .await?
        .into_iter()
        .map(|node| NodeState {
            // A session recorded by a controller that then died does not count once the
            // drone has been silent for a lease.
            connected: node.connected_to.is_some() && node.last_seen >= fresh_since,
            backends: Some(live.get(&node.name).copied().unwrap_or(0)),
            pool: Some(node.pool),
            lost: node.lost_at.is_some(),
            last_seen: node.last_seen,
            name: node.name,
        })
        .collect();
    let proxies = state
        .store()
        .nodes(&cluster, NodeKind::Proxy)
        .await?
        .into_iter()
        .map(|node| NodeState {
            connected: node.connected_to.is_some(),
            backends: None,
            pool: None,
            lost: false,
            last_seen: node.last_seen,
            name: node.name,
        })
        .collect();
    Ok(Json(ClusterState {
        cluster,
        drones,
        proxies,
    }))
}
