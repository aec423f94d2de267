//! Passing a request on to the controller a node is connected to: a drone's session lives
//! on one controller, so a backend's logs or a prepull asked of another one are forwarded
//! there, at the URL that controller recorded at start (`--peer-url`). A forwarded request
//! carries [`FORWARDED_HEADER`] and is never forwarded again, so two controllers that
//! disagree about where a drone is cannot pass a request back and forth.

use super::error::ApiErrorResponse;
use super::store::NodeRow;
use super::ControllerState;
use axum::http::{header, HeaderMap, StatusCode};
use plane_protocol::api::ApiErrorKind;
use plane_protocol::names::NodeName;
use std::collections::HashMap;
use url::Url;

/// Names the controller that passed a request on.
pub const FORWARDED_HEADER: &str = "x-plane-forwarded-by";

/// Whether this request was passed on by another controller (and so must be served here).
pub fn was_forwarded(headers: &HeaderMap) -> bool {
    headers.contains_key(FORWARDED_HEADER)
}

/// Of `drones` (a cluster's, as the store lists them), the ones with a session on another
/// controller than `here`, by that controller.
pub fn drones_elsewhere(here: &str, drones: &[NodeRow]) -> HashMap<String, Vec<NodeName>> {
    let mut elsewhere: HashMap<String, Vec<NodeName>> = HashMap::new();
    for node in drones {
        match &node.connected_to {
            Some(controller) if controller != here => elsewhere
                .entry(controller.clone())
                .or_default()
                .push(node.name.clone()),
            _ => {}
        }
    }
    elsewhere
}

/// A request to `path_and_query` on controller `controller`, with the caller's credentials;
/// a 503 naming the controller when it left no URL.
pub async fn request(
    state: &ControllerState,
    controller: &str,
    method: reqwest::Method,
    path_and_query: &str,
    headers: &HeaderMap,
) -> Result<reqwest::RequestBuilder, ApiErrorResponse> {
    let unreachable = |why: String| {
        ApiErrorResponse::new(StatusCode::SERVICE_UNAVAILABLE, ApiErrorKind::Other, why)
    };
    let base = state.store().peer_url(controller).await?.ok_or_else(|| {
        unreachable(format!(
            "controller {controller} has recorded no --peer-url"
        ))
    })?;
    let url = Url::parse(&base)
        .and_then(|base| base.join(path_and_query))
        .map_err(|err| {
            unreachable(format!(
                "controller {controller}'s --peer-url {base:?}: {err}"
            ))
        })?;
    let mut request = state
        .peer_http()
        .request(method, url)
        .header(FORWARDED_HEADER, state.controller_id());
    // Controllers of one deployment take the same tokens.
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        request = request.header(header::AUTHORIZATION, auth.clone());
    }
    Ok(request)
}

/// The error for a peer that did not answer.
pub fn unreachable(controller: &str, err: reqwest::Error) -> ApiErrorResponse {
    ApiErrorResponse::new(
        StatusCode::BAD_GATEWAY,
        ApiErrorKind::Other,
        format!("controller {controller}, which the drone is connected to, did not answer: {err}"),
    )
}
