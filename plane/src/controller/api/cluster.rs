//! Health and state endpoints: `/pub/health`, `/ctrl/status`, `/ctrl/c/:cluster/state`.

use super::paths::ClusterPath;
use crate::controller::error::ApiErrorResponse;
use crate::controller::store::{NodeKind, NodeRow, StoreError};
use crate::controller::ControllerState;
use axum::extract::State;
use axum::Json;
use plane_protocol::api::{
    ClusterState, ControllerStatus, DroneState, NodeState, TaggedNodeName, WarmPoolState,
};
use plane_protocol::names::ClusterName;
use plane_protocol::time::Millis;
use plane_protocol::{PLANE_HASH, PLANE_VERSION};

/// Public liveness: no details beyond the version.
#[utoipa::path(
    get,
    path = "/pub/health",
    operation_id = "health",
    tag = "controller",
    responses((status = 200, description = "The controller is up.", body = plane_protocol::api::ControllerStatus)),
)]
pub async fn handle_health() -> Json<ControllerStatus> {
    Json(ControllerStatus {
        status: "ok".to_string(),
        version: PLANE_VERSION.to_string(),
        hash: PLANE_HASH.to_string(),
        database: None,
    })
}

/// Operator status: also names the database in use.
#[utoipa::path(
    get,
    path = "/ctrl/status",
    operation_id = "controller_status",
    tag = "controller",
    responses((status = 200, description = "The controller is up; `database` names its store.", body = plane_protocol::api::ControllerStatus)),
)]
pub async fn handle_controller_status(
    State(state): State<ControllerState>,
) -> Json<ControllerStatus> {
    Json(ControllerStatus {
        status: "ok".to_string(),
        version: PLANE_VERSION.to_string(),
        hash: PLANE_HASH.to_string(),
        database: Some(state.store().kind().as_str().to_string()),
    })
}

/// Every drone and proxy that has connected, in Plane 0.5's shape with our fields added.
#[utoipa::path(
    get,
    path = "/ctrl/c/{cluster}/state",
    operation_id = "cluster_state",
    tag = "cluster",
    params(("cluster" = plane_protocol::names::ClusterName, Path, description = "The cluster: the host (and port) its proxies answer on.")),
    responses((status = 200, description = "Every drone and proxy that has connected to the cluster.", body = plane_protocol::api::ClusterState)),
)]
pub async fn handle_cluster_state(
    State(state): State<ControllerState>,
    ClusterPath(cluster): ClusterPath,
) -> Result<Json<ClusterState>, ApiErrorResponse> {
    Ok(Json(cluster_state(&state, cluster).await?))
}

/// The cluster's drones and proxies as the store has them now.
pub async fn cluster_state(
    state: &ControllerState,
    cluster: ClusterName,
) -> Result<ClusterState, StoreError> {
    let live = state.store().live_backend_counts(&cluster).await?;
    let now = Millis::now();
    let fresh_since = now.minus_millis(state.config().lease_ms);
    let drones = state
        .store()
        .nodes(&cluster, NodeKind::Drone)
        .await?
        .into_iter()
        .map(|row| {
            // A session recorded by a controller that then died does not count once the
            // drone has been silent for a lease.
            let connected = row.connected_to.is_some() && row.last_seen >= fresh_since;
            let lost = row.lost_at.is_some();
            DroneState {
                ready: connected && !lost && !row.draining,
                draining: row.draining,
                last_heartbeat_age: seconds_since(row.last_seen, now),
                backend_count: live.get(&row.name).copied().unwrap_or(0),
                pool: row.pool.clone(),
                lost,
                node: node_state(
                    TaggedNodeName::Drone(row.name.clone()),
                    &row,
                    connected,
                    now,
                ),
            }
        })
        .collect();
    let proxies = state
        .store()
        .nodes(&cluster, NodeKind::Proxy)
        .await?
        .into_iter()
        .map(|row| {
            let connected = row.connected_to.is_some();
            node_state(
                TaggedNodeName::Proxy(row.name.clone()),
                &row,
                connected,
                now,
            )
        })
        .collect();
    let mut counts = state.store().warm_counts(Some(&cluster)).await?;
    let warm_pools = state
        .store()
        .warm_pools(Some(&cluster))
        .await?
        .into_iter()
        .map(|pool| {
            let count = counts
                .remove(&(cluster.clone(), pool.pool.clone(), pool.fingerprint.clone()))
                .unwrap_or_default();
            WarmPoolState {
                pool: pool.pool.parse().unwrap_or_default(),
                image: pool.executable.image,
                fingerprint: pool.fingerprint,
                size: pool.size,
                idle: count.idle,
                starting: count.starting,
            }
        })
        .collect();
    Ok(ClusterState {
        cluster: Some(cluster),
        drones,
        proxies,
        warm_pools,
    })
}

fn node_state(name: TaggedNodeName, row: &NodeRow, connected: bool, now: Millis) -> NodeState {
    NodeState {
        name,
        plane_version: row.version.clone(),
        plane_hash: row.hash.clone(),
        controller: row.connected_to.clone().unwrap_or_default(),
        // The holding controller records every message from the node, so this is also how
        // long ago that controller was last known to be alive.
        controller_heartbeat_age: seconds_since(row.last_seen, now),
        connected,
        last_seen: row.last_seen,
    }
}

fn seconds_since(then: Millis, now: Millis) -> i64 {
    (now.0 - then.0).max(0) / 1000
}
