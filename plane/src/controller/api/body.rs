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
        parse(&bytes).map(ApiJson)
    }
}

/// How many whole floats (`5.0`) one body may have read as integers.
const MAX_WHOLE_FLOATS: usize = 64;

/// Reads `T` from a JSON object, every error naming the field's path
/// (`spawn_config.executable.pull_policy: ...`). JSON Schema, which the API's document is
/// written in, counts `5.0` as an integer and serde does not: where serde refuses a whole
/// float for an integer, that number is written as one and the body read again (only on
/// that rare path, and only at the number refused, so free-form fields keep theirs).
fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiErrorResponse> {
    let mut body = std::borrow::Cow::Borrowed(bytes);
    for _ in 0..=MAX_WHOLE_FLOATS {
        let mut deserializer = serde_json::Deserializer::from_slice(&body);
        let err = match serde_path_to_error::deserialize(&mut deserializer) {
            Ok(value) => {
                // Nothing but whitespace may follow the object (`{}{}` or `{} junk` are
                // refused).
                deserializer.end().map_err(|err| {
                    ApiErrorResponse::bad_request(format!("invalid request body: {err}"))
                })?;
                return Ok(value);
            }
            Err(err) => err,
        };
        match whole_float_as_integer(&body, err.inner()) {
            Some(rewritten) => body = std::borrow::Cow::Owned(rewritten),
            None => {
                return Err(ApiErrorResponse::bad_request(format!(
                    "invalid request body: {err}"
                )))
            }
        }
    }
    Err(ApiErrorResponse::bad_request(format!(
        "invalid request body: more than {MAX_WHOLE_FLOATS} integers written as floats"
    )))
}

/// `body` with the number `error` refused written as an integer, if the error is a float
/// given for an integer and that float is whole (and exact: within ±2^53).
fn whole_float_as_integer(body: &[u8], error: &serde_json::Error) -> Option<Vec<u8>> {
    if !error
        .to_string()
        .starts_with("invalid type: floating point")
    {
        return None;
    }
    // serde_json places the error at the number's last byte (line and column count from 1).
    let line_start = if error.line() <= 1 {
        0
    } else {
        body.iter()
            .enumerate()
            .filter(|(_, byte)| **byte == b'\n')
            .nth(error.line() - 2)?
            .0
            + 1
    };
    let last = (line_start + error.column()).checked_sub(1)?;
    let in_number = |byte: &u8| byte.is_ascii_digit() || b".eE+-".contains(byte);
    if !in_number(body.get(last)?) {
        return None;
    }
    let start = body[..last]
        .iter()
        .rposition(|byte| !in_number(byte))
        .map_or(0, |i| i + 1);
    let end = last + body[last..].iter().take_while(|b| in_number(b)).count();
    let float: f64 = std::str::from_utf8(&body[start..end]).ok()?.parse().ok()?;
    if float.fract() != 0.0 || float.abs() > 9.0e15 {
        return None;
    }
    let mut rewritten = body[..start].to_vec();
    rewritten.extend_from_slice((float as i64).to_string().as_bytes());
    rewritten.extend_from_slice(&body[end..]);
    Some(rewritten)
}

fn too_large() -> ApiErrorResponse {
    ApiErrorResponse::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        ApiErrorKind::Other,
        format!("the request body is over the limit of {MAX_BODY_BYTES} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Body {
        small: Option<u8>,
        #[serde(default)]
        big: Option<i64>,
        #[serde(default)]
        free: serde_json::Map<String, serde_json::Value>,
    }

    fn read(text: &str) -> Result<Body, String> {
        parse::<Body>(text.as_bytes()).map_err(|err| err.message)
    }

    #[test]
    fn whole_floats_are_integers_and_nothing_else_changes() {
        let body =
            read("{\"small\": 5.0,\n \"big\": -7e2, \"free\": {\"x\": 2.0}}").expect("reads");
        assert_eq!(body.small, Some(5));
        assert_eq!(body.big, Some(-700));
        // Free-form values keep what was sent.
        assert_eq!(body.free["x"], serde_json::json!(2.0));
        assert!(read("{\"small\": 5.5}").unwrap_err().contains("small"));
        assert!(read("{\"small\": 300.0}").unwrap_err().contains("small"));
        assert!(read("{\"big\": 1e300}").unwrap_err().contains("big"));
        // A duplicate key is still refused, floats or not.
        assert!(read("{\"small\": 1.0, \"small\": 2}")
            .unwrap_err()
            .contains("duplicate"));
        assert!(read("{\"small\": 1.0, \"other\": 2}")
            .unwrap_err()
            .contains("unknown field"));
    }
}
