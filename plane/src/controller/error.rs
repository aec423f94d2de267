//! Errors of the controller: `ControllerError`, what domain operations (connect, spawn,
//! terminate, sweep) fail with, and `ApiErrorResponse`, the one place any error becomes an
//! HTTP response (status, kind, message, correlation id).

use super::store::StoreError;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use plane_protocol::api::{ApiError, ApiErrorKind};
use plane_protocol::names::{BackendName, ClusterName, NodeName};
use rand::distributions::{Alphanumeric, DistString};

/// Why a domain operation failed. Callers that are not HTTP handlers (the sweeper, socket
/// sessions) log it; handlers turn it into an [`ApiErrorResponse`] with `?`.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The request is malformed or a field is invalid; the message names it.
    #[error("{0}")]
    InvalidRequest(String),
    #[error("key {name:?} in namespace {namespace:?} is held by backend {holder} with tag {held_tag:?}; this request has tag {requested_tag:?}")]
    KeyHeld {
        name: String,
        namespace: String,
        holder: BackendName,
        held_tag: String,
        requested_tag: String,
    },
    #[error("backend {holder} holding this key is still terminating after {waited_seconds} s; retry shortly")]
    KeyStillTerminating {
        holder: BackendName,
        waited_seconds: u64,
    },
    #[error("no backend holds key {name:?} in namespace {namespace:?}, and the request has no spawn_config to start one")]
    KeyUnheldNoSpawnConfig { name: String, namespace: String },
    #[error("spawn_config.cluster is missing and the controller has no default cluster")]
    NoClusterProvided,
    #[error(
        "no drone that can take a backend is connected for cluster {cluster} and pool {pool:?}"
    )]
    NoDroneAvailable { cluster: ClusterName, pool: String },
    /// An admission limit (`--max-concurrent-spawns`, `--max-backends-per-namespace`)
    /// refused a new backend (429 with Retry-After).
    #[error(transparent)]
    NotAdmitted(super::store::Refusal),
    /// Drones are there, but none can give the backend what it asks for; the message says
    /// what.
    #[error("{0}")]
    NoCapableDrone(String),
    #[error("spawn_config.id {0} is already in use")]
    BackendIdTaken(BackendName),
    #[error("no backend {0}")]
    BackendNotFound(BackendName),
    #[error("no drone {drone} in cluster {cluster}")]
    DroneNotFound {
        cluster: ClusterName,
        drone: NodeName,
    },
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ControllerError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidRequest(message.into())
    }
}

/// An error on its way to becoming an HTTP response. Handlers return it with `?`.
#[derive(Debug)]
pub struct ApiErrorResponse {
    pub status: StatusCode,
    pub kind: ApiErrorKind,
    pub message: String,
    /// Seconds for a `Retry-After` header (with 429 and 503).
    pub retry_after_seconds: Option<u64>,
}

impl ApiErrorResponse {
    pub fn new(status: StatusCode, kind: ApiErrorKind, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            retry_after_seconds: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ApiErrorKind::Other, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ApiErrorKind::NotFound, message)
    }

    fn internal(kind: ApiErrorKind, err: anyhow::Error) -> Self {
        // The detail goes to the log (under the response's id), not to the client.
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, kind, format!("{err:#}"))
    }
}

impl IntoResponse for ApiErrorResponse {
    fn into_response(self) -> Response {
        let id = Alphanumeric.sample_string(&mut rand::thread_rng(), 12);
        // Only faults are hidden; a 503 (no drone) says what is missing.
        let message = if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error_id = %id, error = %self.message, "internal error");
            "internal error; see the controller log for this error id".to_string()
        } else {
            tracing::debug!(error_id = %id, kind = ?self.kind, message = %self.message, "request refused");
            self.message
        };
        let body = ApiError {
            id,
            kind: self.kind,
            message,
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after_seconds {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl From<ControllerError> for ApiErrorResponse {
    fn from(err: ControllerError) -> Self {
        // Plane 0.5's kinds, with our status codes where they differ (README, "Differences").
        let (status, kind) = match &err {
            ControllerError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, ApiErrorKind::Other),
            ControllerError::KeyHeld { .. } => (StatusCode::CONFLICT, ApiErrorKind::KeyHeld),
            ControllerError::KeyStillTerminating { .. } => {
                (StatusCode::CONFLICT, ApiErrorKind::KeyHeldUnhealthy)
            }
            ControllerError::KeyUnheldNoSpawnConfig { .. } => {
                (StatusCode::CONFLICT, ApiErrorKind::KeyUnheldNoSpawnConfig)
            }
            ControllerError::NoClusterProvided => {
                (StatusCode::BAD_REQUEST, ApiErrorKind::NoClusterProvided)
            }
            ControllerError::NoDroneAvailable { .. } | ControllerError::NoCapableDrone(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                ApiErrorKind::NoDroneAvailable,
            ),
            ControllerError::BackendIdTaken(_) => (StatusCode::CONFLICT, ApiErrorKind::Other),
            ControllerError::NotAdmitted(refusal) => {
                let mut response = Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    ApiErrorKind::Other,
                    refusal.message.clone(),
                );
                response.retry_after_seconds = Some(refusal.retry_after_seconds);
                return response;
            }
            ControllerError::BackendNotFound(_) | ControllerError::DroneNotFound { .. } => {
                (StatusCode::NOT_FOUND, ApiErrorKind::NotFound)
            }
            ControllerError::Store(_) => {
                return Self::internal(ApiErrorKind::DatabaseError, anyhow::Error::new(err));
            }
            ControllerError::Internal(_) => {
                return Self::internal(ApiErrorKind::Other, anyhow::Error::new(err));
            }
        };
        Self::new(status, kind, err.to_string())
    }
}

impl From<StoreError> for ApiErrorResponse {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::AlreadyExists(what) => Self::internal(
                ApiErrorKind::DatabaseError,
                anyhow::anyhow!("already exists: {what}"),
            ),
            StoreError::Refused(refusal) => ControllerError::NotAdmitted(refusal).into(),
            StoreError::Other(err) => Self::internal(ApiErrorKind::DatabaseError, err),
        }
    }
}

impl From<anyhow::Error> for ApiErrorResponse {
    fn from(err: anyhow::Error) -> Self {
        Self::internal(ApiErrorKind::Other, err)
    }
}

impl From<JsonRejection> for ApiErrorResponse {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::MissingJsonContentType(_) => {
                Self::bad_request("expected a JSON body with `Content-Type: application/json`")
            }
            other => Self::bad_request(format!("invalid request body: {}", other.body_text())),
        }
    }
}

impl From<PathRejection> for ApiErrorResponse {
    fn from(rejection: PathRejection) -> Self {
        Self::bad_request(format!("invalid path: {}", rejection.body_text()))
    }
}
