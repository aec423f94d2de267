//! Every response the proxy produces itself (as opposed to forwarding a backend's), built in
//! one place so status codes and the JSON error shape `{"error", "message"}` stay consistent.

use crate::body::ProxyBody;
use http::{header, HeaderValue, Response, StatusCode};
use plane_protocol::backend::TerminationReason;
use serde_json::{json, Value};
use std::time::Duration;

/// What a client refused for lack of room is told to wait before trying again, in seconds.
const RETRY_AFTER_SECONDS: u64 = 1;

/// The `error` field of the proxy's error bodies, one per way a request can fail here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    MissingToken,
    UnknownToken,
    TokenExpired,
    WrongHost,
    BackendTerminated,
    BadGateway,
    ControllerUnavailable,
    HoldTimeout,
    UpstreamTimeout,
    TooManyHeldRequests,
    UnsupportedConnect,
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::UnknownToken => "unknown_token",
            Self::TokenExpired => "token_expired",
            Self::WrongHost => "wrong_host",
            Self::BackendTerminated => "backend_terminated",
            Self::BadGateway => "bad_gateway",
            Self::ControllerUnavailable => "controller_unavailable",
            Self::HoldTimeout => "hold_timeout",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::TooManyHeldRequests => "too_many_held_requests",
            Self::UnsupportedConnect => "unsupported_connect",
            Self::Internal => "internal_error",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            // Not 400: a bare `/` (a browser or a health checker poking the host) is a
            // well-formed request for something that does not exist.
            Self::MissingToken => StatusCode::NOT_FOUND,
            Self::UnknownToken => StatusCode::NOT_FOUND,
            // It worked, and never will again; a new connect issues a new one.
            Self::TokenExpired => StatusCode::GONE,
            // The token is fine; it belongs to a backend served at another host.
            Self::WrongHost => StatusCode::FORBIDDEN,
            // The token was valid, but its backend is gone for good: retrying cannot help.
            Self::BackendTerminated => StatusCode::GONE,
            Self::BadGateway => StatusCode::BAD_GATEWAY,
            Self::ControllerUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::HoldTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::TooManyHeldRequests => StatusCode::SERVICE_UNAVAILABLE,
            // A reverse proxy: it tunnels WebSockets to backends, nothing else.
            Self::UnsupportedConnect => StatusCode::NOT_IMPLEMENTED,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

fn error(kind: ErrorKind, message: &str) -> Response<ProxyBody> {
    error_with(kind, message, json!({}))
}

/// An error whose body carries `details` (an object) beside `error` and `message`.
fn error_with(kind: ErrorKind, message: &str, details: Value) -> Response<ProxyBody> {
    let mut body = details;
    body["error"] = kind.as_str().into();
    body["message"] = message.into();
    json_now(kind.status(), &body)
}

/// A JSON answer about this moment (a token may start working once its backend is ready, a
/// backend may come back, the proxy may link up), so no cache should keep it.
fn json_now(status: StatusCode, body: &Value) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The proxy's own `/ready`: whether it is linked to the controller and (when it serves
/// HTTPS) has a certificate.
pub fn ready(controller_connected: bool, certificate: Option<bool>) -> Response<ProxyBody> {
    let ready = controller_connected && certificate != Some(false);
    let body = json!({
        "ready": ready,
        "controller_connected": controller_connected,
        "certificate": certificate,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_now(status, &body)
}

/// Plain HTTP on a proxy that serves HTTPS: the same URL over HTTPS (308 keeps the method
/// and body).
pub fn redirect_to_https(location: &str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::empty());
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// A CONNECT that is not an HTTP/2 WebSocket (RFC 8441): a forward-proxy tunnel, or
/// another protocol.
pub fn unsupported_connect() -> Response<ProxyBody> {
    error(
        ErrorKind::UnsupportedConnect,
        "this proxy only accepts CONNECT for WebSockets over HTTP/2 (RFC 8441, :protocol websocket)",
    )
}

/// The backend accepted the request but did not start answering within the upstream
/// timeout (frozen, or overwhelmed).
pub fn upstream_timeout(waited: Duration) -> Response<ProxyBody> {
    error_with(
        ErrorKind::UpstreamTimeout,
        "the backend did not answer in time",
        json!({ "waited_ms": waited.as_millis() as u64 }),
    )
}

/// The URL has no token in its first path segment.
pub fn missing_token() -> Response<ProxyBody> {
    error(
        ErrorKind::MissingToken,
        "URLs on this proxy start with a connection token: /<token>/...",
    )
}

/// The controller does not know the token (or it is malformed).
pub fn wrong_host(served_at: &str) -> Response<ProxyBody> {
    error_with(
        ErrorKind::WrongHost,
        "this URL's backend is served at another host",
        json!({ "host": served_at }),
    )
}

pub fn token_expired() -> Response<ProxyBody> {
    error(
        ErrorKind::TokenExpired,
        "this URL's token has expired (token_ttl_seconds); connect again for a new one",
    )
}

pub fn unknown_token() -> Response<ProxyBody> {
    error(
        ErrorKind::UnknownToken,
        "this URL's token is not valid, was revoked, or its backend has stopped",
    )
}

/// The token's backend has stopped (or failed to start) and will never serve it.
pub fn backend_terminated(
    reason: Option<TerminationReason>,
    exit_code: Option<i32>,
) -> Response<ProxyBody> {
    let cause = match (reason, exit_code) {
        (Some(reason), _) => format!(" (reason: {})", reason.as_str()),
        (None, Some(code)) => format!(" (it exited with code {code})"),
        (None, None) => String::new(),
    };
    error_with(
        ErrorKind::BackendTerminated,
        &format!("the backend for this URL has stopped{cause}; ask the app for a new URL"),
        json!({ "reason": reason.map(TerminationReason::as_str), "exit_code": exit_code }),
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

/// The backend did not become ready within the hold timeout.
pub fn hold_timeout(waited: Duration) -> Response<ProxyBody> {
    error(
        ErrorKind::HoldTimeout,
        &format!(
            "the backend for this URL did not become ready within {} ms; try again",
            waited.as_millis()
        ),
    )
}

/// Too many requests are already held waiting for their backends.
pub fn too_many_held_requests() -> Response<ProxyBody> {
    let mut response = error(
        ErrorKind::TooManyHeldRequests,
        "too many requests are waiting for backends to start; try again shortly",
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
    response
}

/// The route's data cannot be expressed as request headers (a fault upstream of us).
pub fn internal_error() -> Response<ProxyBody> {
    error(
        ErrorKind::Internal,
        "the proxy could not build the request for this backend",
    )
}
