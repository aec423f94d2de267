//! The controller's routes: which handler serves each path of the HTTP API and the node
//! sockets. Handlers live in the modules named for what they do.

use super::api::{cluster, connect, drain, logs, prepull, revoke, status, terminate};
use super::error::ApiErrorResponse;
use super::state::ControllerState;
use super::{auth, dns_socket, drone_socket, metrics, proxy_socket};
use axum::http::StatusCode;
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;
use plane_protocol::api::ApiErrorKind;
use tower_http::cors::{Any, CorsLayer};

pub fn router(state: ControllerState) -> Router {
    let backend_control_routes = Router::new()
        .route("/soft-terminate", post(terminate::handle_soft_terminate))
        .route("/hard-terminate", post(terminate::handle_hard_terminate))
        .route("/logs", get(logs::handle_logs));
    let status_routes = Router::new()
        .route("/status", get(status::handle_status))
        .route("/status-stream", get(status::handle_status_stream));

    // Browsers read `/pub/*` (status, status streams) from app pages on other origins. A
    // service of its own, not merged routes, so the CORS layer sees every request under
    // `/pub` (preflights included) before any route or fallback answers it.
    let public_routes = Router::new()
        .nest("/b/{backend}", status_routes.clone())
        .nest("/c/{cluster}/b/{backend}", status_routes)
        .route("/health", get(cluster::handle_health))
        .fallback(no_such_endpoint)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(
            CorsLayer::new()
                .allow_origin(Any)
                .allow_methods(Any)
                .allow_headers(Any),
        )
        .with_state(state.clone());

    // Everything under `/ctrl` needs a bearer token when the controller has any.
    let control_routes = Router::new()
        .route("/ctrl/connect", post(connect::handle_connect))
        .route("/ctrl/spawn", post(connect::handle_spawn))
        .route("/ctrl/b/revoke", post(revoke::handle_revoke))
        .route("/ctrl/revoke", post(revoke::handle_revoke))
        .nest("/ctrl/b/{backend}", backend_control_routes.clone())
        .nest("/ctrl/c/{cluster}/b/{backend}", backend_control_routes)
        .route("/ctrl/status", get(cluster::handle_controller_status))
        .route("/metrics", get(metrics::handle_metrics))
        .route(
            "/ctrl/c/{cluster}/state",
            get(cluster::handle_cluster_state),
        )
        .route("/ctrl/c/{cluster}/prepull", post(prepull::handle_prepull))
        .route(
            "/ctrl/c/{cluster}/d/{drone}/drain",
            post(drain::handle_drain),
        )
        .route(
            "/ctrl/c/{cluster}/d/{drone}/undrain",
            post(drain::handle_undrain),
        )
        .route(
            "/ctrl/c/{cluster}/drone-socket",
            get(drone_socket::handle_drone_socket),
        )
        .route(
            "/ctrl/c/{cluster}/proxy-socket",
            get(proxy_socket::handle_proxy_socket),
        )
        .route("/ctrl/dns-socket", get(dns_socket::handle_dns_socket))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_ctrl_token,
        ));

    Router::new()
        .nest_service("/pub", public_routes)
        .merge(control_routes)
        .fallback(no_such_endpoint)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn no_such_endpoint() -> ApiErrorResponse {
    ApiErrorResponse::not_found("no such endpoint")
}

async fn method_not_allowed() -> ApiErrorResponse {
    ApiErrorResponse::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ApiErrorKind::Other,
        "this endpoint does not accept that HTTP method",
    )
}
