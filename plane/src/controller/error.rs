//! `ApiErrorResponse`: the one place errors become HTTP responses (status, kind, message,
//! correlation id).

use super::store::StoreError;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use plane_protocol::api::{ApiError, ApiErrorKind};
use rand::distributions::{Alphanumeric, DistString};

/// An error on its way to becoming an HTTP response. Handlers return it with `?`.
#[derive(Debug)]
pub struct ApiErrorResponse {
    pub kind: ApiErrorKind,
    pub message: String,
}

impl ApiErrorResponse {
    pub fn new(kind: ApiErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::NotFound, message)
    }

    fn internal(err: anyhow::Error) -> Self {
        // The detail goes to the log (under the response's id), not to the client.
        Self::new(ApiErrorKind::Internal, format!("{err:#}"))
    }

    fn status(&self) -> StatusCode {
        match self.kind {
            ApiErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ApiErrorKind::KeyHeld | ApiErrorKind::BackendIdTaken => StatusCode::CONFLICT,
            ApiErrorKind::KeyUnheldNoSpawnConfig | ApiErrorKind::NotFound => StatusCode::NOT_FOUND,
            ApiErrorKind::NoClusterProvided => StatusCode::BAD_REQUEST,
            ApiErrorKind::NoDroneAvailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiErrorResponse {
    fn into_response(self) -> Response {
        let id = Alphanumeric.sample_string(&mut rand::thread_rng(), 12);
        let status = self.status();
        let message = if self.kind == ApiErrorKind::Internal {
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
        (status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiErrorResponse {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::AlreadyExists(what) => {
                Self::internal(anyhow::anyhow!("already exists: {what}"))
            }
            StoreError::Other(err) => Self::internal(err),
        }
    }
}

impl From<anyhow::Error> for ApiErrorResponse {
    fn from(err: anyhow::Error) -> Self {
        Self::internal(err)
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
