//! Every response the proxy produces itself (as opposed to forwarding a backend's), built in
//! one place so status codes and the JSON error shape `{"error", "message"}` stay consistent.

use crate::body::ProxyBody;
use http::{header, HeaderValue, Response, StatusCode};

/// The `error` field of the proxy's error bodies, one per way a request can fail here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    MissingToken,
    UnknownToken,
    BadGateway,
    ControllerUnavailable,
    RouteTimeout,
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::UnknownToken => "unknown_token",
            Self::BadGateway => "bad_gateway",
            Self::ControllerUnavailable => "controller_unavailable",
            Self::RouteTimeout => "route_timeout",
            Self::Internal => "internal_error",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            // Not 400: a bare `/` (a browser or a health checker poking the host) is a
            // well-formed request for something that does not exist.
            Self::MissingToken => StatusCode::NOT_FOUND,
            Self::UnknownToken => StatusCode::NOT_FOUND,
            Self::BadGateway => StatusCode::BAD_GATEWAY,
            Self::ControllerUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::RouteTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

fn error(kind: ErrorKind, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": kind.as_str(), "message": message });
    let mut response = Response::new(ProxyBody::full(body.to_string()));
    *response.status_mut() = kind.status();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // These answers describe this moment (a token may start working once its backend is
    // ready, a backend may come back), so no cache should keep them.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The URL has no token in its first path segment.
pub fn missing_token() -> Response<ProxyBody> {
    error(
        ErrorKind::MissingToken,
        "URLs on this proxy start with a connection token: /<token>/...",
    )
}

/// The controller does not know the token (or it is malformed).
pub fn unknown_token() -> Response<ProxyBody> {
    error(
        ErrorKind::UnknownToken,
        "this URL's token is not valid, was revoked, or its backend has stopped",
    )
}

/// The backend could not be reached or broke off the exchange.
pub fn bad_gateway() -> Response<ProxyBody> {
    error(
        ErrorKind::BadGateway,
        "the backend for this URL could not be reached",
    )
}

/// The proxy has no connection to the controller, so it cannot resolve the token.
pub fn controller_unavailable() -> Response<ProxyBody> {
    error(
        ErrorKind::ControllerUnavailable,
        "the proxy cannot reach the controller to look up this URL; try again shortly",
    )
}

/// The controller did not resolve the token in time (e.g. the backend is slow to start).
pub fn route_timeout() -> Response<ProxyBody> {
    error(
        ErrorKind::RouteTimeout,
        "the backend for this URL did not become ready in time; try again",
    )
}

/// The route's data cannot be expressed as request headers (a fault upstream of us).
pub fn internal_error() -> Response<ProxyBody> {
    error(
        ErrorKind::Internal,
        "the proxy could not build the request for this backend",
    )
}
