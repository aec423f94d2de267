//! The controller's routes: which handler serves each path of the HTTP API and the node
//! sockets. Handlers live in the modules named for what they do.

use super::error::ApiErrorResponse;
use super::state::ControllerState;
use super::{cluster, connect, drone_socket, proxy_socket, status, terminate};
use axum::routing::{get, post};
use axum::Router;
use plane_protocol::api::ApiErrorKind;

pub fn router(state: ControllerState) -> Router {
    let terminate_routes = Router::new()
        .route("/soft-terminate", post(terminate::handle_soft_terminate))
        .route("/hard-terminate", post(terminate::handle_hard_terminate));
    let status_routes = Router::new()
        .route("/status", get(status::handle_status))
        .route("/status-stream", get(status::handle_status_stream));

    Router::new()
        .route("/ctrl/connect", post(connect::handle_connect))
        .route("/ctrl/spawn", post(connect::handle_spawn))
        .nest("/ctrl/b/{backend}", terminate_routes.clone())
        .nest("/ctrl/c/{cluster}/b/{backend}", terminate_routes)
        .route("/ctrl/status", get(cluster::handle_controller_status))
        .route(
            "/ctrl/c/{cluster}/state",
            get(cluster::handle_cluster_state),
        )
        .route(
            "/ctrl/c/{cluster}/drone-socket",
            get(drone_socket::handle_drone_socket),
        )
        .route(
            "/ctrl/c/{cluster}/proxy-socket",
            get(proxy_socket::handle_proxy_socket),
        )
        .nest("/pub/b/{backend}", status_routes.clone())
        .nest("/pub/c/{cluster}/b/{backend}", status_routes)
        .route("/pub/health", get(cluster::handle_health))
        .fallback(|| async { ApiErrorResponse::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiErrorResponse::new(
                ApiErrorKind::MethodNotAllowed,
                "this endpoint does not accept that HTTP method",
            )
        })
        .with_state(state)
}
