//! The `token` table: connection tokens and what the proxy tells the backend about them.

use super::{Store, StoreResult};
use anyhow::Context;
use plane_protocol::names::{BackendName, BearerToken, SecretToken};
use plane_protocol::time::Millis;
use serde_json::{Map, Value};
use sqlx::Row;

/// A token to record alongside a connect.
pub struct NewToken<'a> {
    pub token: &'a BearerToken,
    pub secret: &'a SecretToken,
    pub user: Option<&'a str>,
    pub auth: &'a Map<String, Value>,
}

/// A stored token.
#[derive(Clone, Debug)]
pub struct TokenRow {
    pub backend_id: BackendName,
    pub user: Option<String>,
    pub auth: Value,
    pub secret: SecretToken,
}

impl Store {
    /// Records another token for an existing backend.
    pub async fn add_token(&self, backend: &BackendName, token: &NewToken<'_>) -> StoreResult<()> {
        let mut conn = self.pool.acquire().await?;
        insert(&mut conn, backend, token, Millis::now()).await
    }

    pub async fn token(&self, token: &BearerToken) -> StoreResult<Option<TokenRow>> {
        let row = sqlx::query(
            "SELECT backend_id, username, auth, secret_token FROM token WHERE token = $1",
        )
        .bind(token.as_str())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let backend_id: String = row.try_get("backend_id").map_err(anyhow::Error::from)?;
        let auth: String = row.try_get("auth").map_err(anyhow::Error::from)?;
        let secret: String = row.try_get("secret_token").map_err(anyhow::Error::from)?;
        Ok(Some(TokenRow {
            backend_id: backend_id.parse().map_err(anyhow::Error::from)?,
            user: row.try_get("username").map_err(anyhow::Error::from)?,
            auth: serde_json::from_str(&auth).context("reading stored auth JSON")?,
            secret: secret.parse().map_err(anyhow::Error::from)?,
        }))
    }
}

pub(super) async fn insert(
    conn: &mut sqlx::AnyConnection,
    backend: &BackendName,
    token: &NewToken<'_>,
    now: Millis,
) -> StoreResult<()> {
    let auth = serde_json::to_string(token.auth).context("serializing auth")?;
    sqlx::query(
        "INSERT INTO token (token, backend_id, username, auth, secret_token, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(token.token.as_str())
    .bind(backend.as_str())
    .bind(token.user)
    .bind(auth)
    .bind(token.secret.as_str())
    .bind(now.0)
    .execute(conn)
    .await?;
    Ok(())
}
