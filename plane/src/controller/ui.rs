//! The dashboard at `/ctrl/ui/`: a page, a script and a stylesheet compiled into the binary
//! (no build step, nothing fetched from elsewhere). The files hold no data and need no
//! token; the page asks for one when the controller has any, keeps it in the tab's
//! `sessionStorage`, and sends it as a bearer token to the API it reads.

use super::error::ApiErrorResponse;
use axum::extract::Path;
use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, LOCATION};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Each file: its name under `/ctrl/ui/`, its type, its contents.
const FILES: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("ui/style.css"),
    ),
];

/// Only this origin's own files and API: a script injected through some name on the page
/// could load nothing and send nothing elsewhere.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                      connect-src 'self'; img-src 'self' data:; form-action 'self'; \
                      frame-ancestors 'none'; base-uri 'none'";

#[utoipa::path(
    get,
    path = "/ctrl/ui",
    operation_id = "dashboard_redirect",
    tag = "dashboard",
    responses((status = 308, description = "To `/ctrl/ui/`.")),
)]
pub async fn handle_ui_redirect() -> Response {
    (StatusCode::PERMANENT_REDIRECT, [(LOCATION, "/ctrl/ui/")]).into_response()
}

#[utoipa::path(
    get,
    path = "/ctrl/ui/",
    operation_id = "dashboard",
    tag = "dashboard",
    responses((status = 200, description = "The dashboard's page.", content_type = "text/html; charset=utf-8", body = String)),
)]
pub async fn handle_ui_index() -> Response {
    serve("index.html")
}

#[utoipa::path(
    get,
    path = "/ctrl/ui/{file}",
    operation_id = "dashboard_file",
    tag = "dashboard",
    params(("file" = String, Path, description = "One of the dashboard's files.")),
    responses(
        (status = 200, description = "The file.", content(
            (String = "text/javascript; charset=utf-8"),
            (String = "text/css; charset=utf-8"),
            (String = "text/html; charset=utf-8"),
        )),
        (status = 404, description = "The dashboard has no such file.", body = plane_protocol::api::ApiError),
    ),
)]
pub async fn handle_ui_file(Path(file): Path<String>) -> Response {
    serve(&file)
}

fn serve(name: &str) -> Response {
    match FILES.iter().find(|(file, _, _)| *file == name) {
        Some((_, content_type, body)) => (
            [
                (CONTENT_TYPE, *content_type),
                (CONTENT_SECURITY_POLICY, POLICY),
                // The files change with the binary; a reload after an upgrade gets them.
                (CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response(),
        None => ApiErrorResponse::not_found(format!("the dashboard has no file {name:?}"))
            .into_response(),
    }
}
