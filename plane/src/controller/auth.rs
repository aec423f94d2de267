//! Who may use the controller: bearer tokens for `/ctrl/*` (`--ctrl-token`,
//! `--ctrl-token-file`, re-read on SIGHUP) and the cluster secret every node must present to
//! open its socket (`--cluster-secret`). Both are off unless configured; `/pub/*` is open.

use super::config::ControllerConfig;
use super::error::ApiErrorResponse;
use super::ControllerState;
use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use plane_protocol::api::ApiErrorKind;
use plane_protocol::auth::{constant_time_eq, CLUSTER_SECRET_HEADER};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The tokens `/ctrl/*` accepts now.
pub struct CtrlTokens {
    fixed: Vec<String>,
    file: Option<PathBuf>,
    /// Swapped whole by [`CtrlTokens::reload`]; held only to clone the `Arc`.
    current: RwLock<Arc<Vec<String>>>,
}

impl CtrlTokens {
    /// The tokens of `--ctrl-token` and `--ctrl-token-file`. Fails if the file cannot be read.
    pub fn load(config: &ControllerConfig) -> anyhow::Result<Self> {
        let tokens = Self {
            fixed: config.ctrl_tokens.clone(),
            file: config.ctrl_token_file.clone(),
            current: RwLock::new(Arc::new(Vec::new())),
        };
        tokens.reload()?;
        Ok(tokens)
    }

    /// Whether `/ctrl/*` needs a token at all.
    pub fn enabled(&self) -> bool {
        !self.fixed.is_empty() || self.file.is_some()
    }

    /// Reads the token file again. On failure the tokens in force stay, and the error says
    /// why. Returns how many tokens are accepted now.
    pub fn reload(&self) -> anyhow::Result<usize> {
        let mut tokens = self.fixed.clone();
        if let Some(file) = &self.file {
            tokens.extend(read_token_file(file)?);
        }
        let count = tokens.len();
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(tokens);
        Ok(count)
    }

    fn accepts(&self, presented: &str) -> bool {
        let tokens = Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        // Every token is compared, so the time taken does not say which one matched.
        tokens.iter().fold(false, |found, token| {
            found | constant_time_eq(token.as_bytes(), presented.as_bytes())
        })
    }
}

/// One token per line; blank lines and lines starting with `#` are skipped.
fn read_token_file(file: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading --ctrl-token-file {}", file.display()))?;
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_string)
        .collect();
    if let Some(bad) = tokens.iter().find(|t| t.chars().any(char::is_whitespace)) {
        anyhow::bail!(
            "--ctrl-token-file {}: a token may not contain spaces ({} characters, starting {:?})",
            file.display(),
            bad.len(),
            bad.chars().take(4).collect::<String>()
        );
    }
    Ok(tokens)
}

/// Middleware for `/ctrl/*`: with tokens configured, a request needs
/// `Authorization: Bearer <one of them>`; otherwise it gets a 401 JSON error.
pub async fn require_ctrl_token(
    State(state): State<ControllerState>,
    request: Request,
    next: Next,
) -> Response {
    let tokens = state.ctrl_tokens();
    if !tokens.enabled() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let refusal = match presented {
        None => "this endpoint needs `Authorization: Bearer <token>` (the controller runs with --ctrl-token)",
        Some(token) if tokens.accepts(token) => return next.run(request).await,
        Some(_) => "the bearer token is not one this controller accepts",
    };
    tracing::warn!(path = %request.uri().path(), reason = refusal, "request refused: unauthorized");
    let mut response =
        ApiErrorResponse::new(StatusCode::UNAUTHORIZED, ApiErrorKind::Other, refusal)
            .into_response();
    response
        .headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// For node sockets: with `--cluster-secret` set, the node must send it in the
/// [`CLUSTER_SECRET_HEADER`] header.
pub fn check_cluster_secret(
    state: &ControllerState,
    headers: &HeaderMap,
    what: &str,
) -> Result<(), ApiErrorResponse> {
    let Some(secret) = &state.config().cluster_secret else {
        return Ok(());
    };
    let presented = headers
        .get(CLUSTER_SECRET_HEADER)
        .map(HeaderValue::as_bytes);
    match presented {
        Some(presented) if constant_time_eq(secret.as_bytes(), presented) => Ok(()),
        presented => {
            let reason = if presented.is_none() {
                "no cluster secret"
            } else {
                "a wrong cluster secret"
            };
            tracing::warn!(node = what, "node socket refused: it sent {reason}");
            Err(ApiErrorResponse::new(
                StatusCode::UNAUTHORIZED,
                ApiErrorKind::Other,
                format!(
                    "this controller requires nodes to send its cluster secret in the \
                     {CLUSTER_SECRET_HEADER} header (--cluster-secret on the {what}); it sent {reason}"
                ),
            ))
        }
    }
}
