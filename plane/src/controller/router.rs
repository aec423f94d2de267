//! The controller's routes: which handler serves each path of the HTTP API and the node
//! sockets. Handlers live in the modules named for what they do.

use super::api::{
    cluster, connect, drain, logs, overview, prepull, revoke, status, terminate, warm,
};
use super::error::ApiErrorResponse;
use super::state::ControllerState;
use super::{auth, dns_socket, drone_socket, metrics, openapi, proxy_socket, ui};
use axum::http::{Method, StatusCode};
use axum::middleware;
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use plane_protocol::api::ApiErrorKind;
use tower_http::cors::{Any, CorsLayer};

/// The prefixes under which the per-backend routes are served: the short form, and the one
/// that also checks the backend belongs to the cluster named.
const CTRL_BACKEND_PREFIXES: [&str; 2] = ["/ctrl/b/{backend}", "/ctrl/c/{cluster}/b/{backend}"];
const PUB_BACKEND_PREFIXES: [&str; 2] = ["/b/{backend}", "/c/{cluster}/b/{backend}"];

pub fn router(state: ControllerState) -> Router {
    let (public_routes, control_routes, dashboard_routes) = routes();

    // Browsers read `/pub/*` (status, status streams) from app pages on other origins. A
    // service of its own, not merged routes, so the CORS layer sees every request under
    // `/pub` (preflights included) before any route or fallback answers it.
    let public_routes = public_routes
        .router
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
    let control_routes = control_routes
        .router
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_ctrl_token,
        ));

    Router::new()
        .nest_service("/pub", public_routes)
        .merge(control_routes)
        // The dashboard's files hold no data: the page itself asks for the token.
        .merge(dashboard_routes.router)
        .fallback(no_such_endpoint)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Every route the API serves, as `(method, path)` in OpenAPI's path syntax: what the
/// OpenAPI document must describe, no more and no less.
pub fn served_routes() -> Vec<(Method, String)> {
    let (public_routes, control_routes, dashboard_routes) = routes();
    public_routes
        .served
        .into_iter()
        .chain(control_routes.served)
        .chain(dashboard_routes.served)
        .collect()
}

/// The routes under `/pub` (without that prefix in their router), those that need the
/// control token, and the dashboard's files.
fn routes() -> (Routes, Routes, Routes) {
    let mut public = Routes::under("/pub");
    for prefix in PUB_BACKEND_PREFIXES {
        public = public
            .get(&format!("{prefix}/status"), get(status::handle_status))
            .get(
                &format!("{prefix}/status-stream"),
                get(status::handle_status_stream),
            );
    }
    let public = public
        .get("/health", get(cluster::handle_health))
        .get("/openapi.json", get(openapi::handle_openapi));

    let mut control = Routes::under("")
        .post("/ctrl/connect", post(connect::handle_connect))
        .post("/ctrl/spawn", post(connect::handle_spawn))
        .post("/ctrl/b/revoke", post(revoke::handle_revoke))
        .post("/ctrl/revoke", post(revoke::handle_revoke));
    for prefix in CTRL_BACKEND_PREFIXES {
        control = control
            .post(
                &format!("{prefix}/soft-terminate"),
                post(terminate::handle_soft_terminate),
            )
            .post(
                &format!("{prefix}/hard-terminate"),
                post(terminate::handle_hard_terminate),
            )
            .get(&format!("{prefix}/logs"), get(logs::handle_logs))
            .get(prefix, get(overview::handle_backend));
    }
    let control = control
        .get("/ctrl/status", get(cluster::handle_controller_status))
        .get("/ctrl/overview", get(overview::handle_overview))
        .get(
            "/ctrl/overview-stream",
            get(overview::handle_overview_stream),
        )
        .get("/metrics", get(metrics::handle_metrics))
        .get(
            "/ctrl/c/{cluster}/state",
            get(cluster::handle_cluster_state),
        )
        .post("/ctrl/c/{cluster}/prepull", post(prepull::handle_prepull))
        .post(
            "/ctrl/c/{cluster}/warm",
            post(warm::handle_set_default_warm_pool),
        )
        .post(
            "/ctrl/c/{cluster}/pools/{pool}/warm",
            post(warm::handle_set_warm_pool),
        )
        .post(
            "/ctrl/c/{cluster}/d/{drone}/drain",
            post(drain::handle_drain),
        )
        .post(
            "/ctrl/c/{cluster}/d/{drone}/undrain",
            post(drain::handle_undrain),
        )
        .get(
            "/ctrl/c/{cluster}/drone-socket",
            get(drone_socket::handle_drone_socket),
        )
        .get(
            "/ctrl/c/{cluster}/proxy-socket",
            get(proxy_socket::handle_proxy_socket),
        )
        .get("/ctrl/dns-socket", get(dns_socket::handle_dns_socket));
    let dashboard = Routes::under("")
        .get("/ctrl/ui", get(ui::handle_ui_redirect))
        .get("/ctrl/ui/", get(ui::handle_ui_index))
        .get("/ctrl/ui/{file}", get(ui::handle_ui_file));
    (public, control, dashboard)
}

/// A router under construction that remembers what it serves. Each route takes one method,
/// named when it is added, so the list cannot drift from the router.
struct Routes {
    prefix: &'static str,
    router: Router<ControllerState>,
    served: Vec<(Method, String)>,
}

impl Routes {
    /// Routes that will be nested at `prefix` (empty: at the root).
    fn under(prefix: &'static str) -> Self {
        Self {
            prefix,
            router: Router::new(),
            served: Vec::new(),
        }
    }

    fn get(self, path: &str, handler: MethodRouter<ControllerState>) -> Self {
        self.add(Method::GET, path, handler)
    }

    fn post(self, path: &str, handler: MethodRouter<ControllerState>) -> Self {
        self.add(Method::POST, path, handler)
    }

    fn add(mut self, method: Method, path: &str, handler: MethodRouter<ControllerState>) -> Self {
        self.router = self.router.route(path, handler);
        self.served.push((method, format!("{}{path}", self.prefix)));
        self
    }
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
