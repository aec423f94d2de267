//! `ApiJson`, the JSON request body of the control API: at most [`MAX_BODY_BYTES`], a JSON
//! object, and every refusal a JSON [`ApiErrorResponse`] (400, or 413 when too large).

use crate::controller::error::ApiErrorResponse;
use axum::extract::{FromRequest, Request};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::StatusCode;
use plane_protocol::api::ApiErrorKind;
use serde::de::DeserializeOwned;

/// The largest request body accepted: far above any real connect (whose `auth` and `env` are
/// bounded well below it), far below what could hurt the controller.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// A JSON object body deserialized into `T`.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiErrorResponse;

    async fn from_request(request: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let headers = request.headers();
        let is_json = headers
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split(';').next())
            .map(str::trim)
            .is_some_and(|mime| {
                mime.eq_ignore_ascii_case("application/json") || mime.ends_with("+json")
            });
        if !is_json {
            return Err(ApiErrorResponse::bad_request(
                "expected a JSON body with `Content-Type: application/json`",
            ));
        }
        // Refused before reading when the length is declared; counted while reading when not.
        let declared = headers
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if declared.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
            return Err(too_large());
        }
        let bytes = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES)
            .await
            .map_err(|err| {
                if std::error::Error::source(&err)
                    .is_some_and(|source| source.is::<http_body_util::LengthLimitError>())
                {
                    too_large()
                } else {
                    ApiErrorResponse::bad_request(format!("reading the request body: {err}"))
                }
            })?;
        let first = bytes.iter().find(|byte| !byte.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(ApiErrorResponse::bad_request(
                "invalid request body: expected a JSON object ({...})",
            ));
        }
        // The error names the field's path (`spawn_config.executable.pull_policy: ...`).
        let mut deserializer = serde_json::Deserializer::from_slice(&bytes);
        match serde_path_to_error::deserialize(&mut deserializer) {
            Ok(value) => {
                // Nothing but whitespace may follow the object (`{}{}` or `{} junk` are
                // refused).
                deserializer.end().map_err(|err| {
                    ApiErrorResponse::bad_request(format!("invalid request body: {err}"))
                })?;
                Ok(ApiJson(value))
            }
            // JSON Schema, which the API's document is written in, counts `5.0` as an integer;
            // serde does not. Only on this rare path is the body read a second time.
            Err(err) => match integral_floats_as_integers(&bytes)
                .and_then(|value| serde_path_to_error::deserialize(value).ok())
            {
                Some(value) => Ok(ApiJson(value)),
                None => Err(ApiErrorResponse::bad_request(format!(
                    "invalid request body: {err}"
                ))),
            },
        }
    }
}

/// The body with every number that is a whole float (`5.0`) written as an integer, or
/// `None` if it has none.
fn integral_floats_as_integers(bytes: &[u8]) -> Option<serde_json::Value> {
    fn walk(value: &mut serde_json::Value) -> bool {
        match value {
            serde_json::Value::Number(number) => {
                // Within ±2^53 every integer is exact as a float.
                match number.as_f64() {
                    Some(float)
                        if number.is_f64() && float.fract() == 0.0 && float.abs() <= 9.0e15 =>
                    {
                        *value = serde_json::Value::from(float as i64);
                        true
                    }
                    _ => false,
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().fold(false, |c, v| walk(v) | c),
            serde_json::Value::Object(map) => map.values_mut().fold(false, |c, v| walk(v) | c),
            _ => false,
        }
    }
    let mut value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    walk(&mut value).then_some(value)
}

fn too_large() -> ApiErrorResponse {
    ApiErrorResponse::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        ApiErrorKind::Other,
        format!("the request body is over the limit of {MAX_BODY_BYTES} bytes"),
    )
}
