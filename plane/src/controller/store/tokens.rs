//! The `token` table: connection tokens and what the proxy tells the backend about them; and
//! `token_revocation`, the log of revocations the change bus passes on to proxies.

use super::{Signal, Store, StoreResult};
use anyhow::Context;
use plane_protocol::names::{BackendName, BearerToken, ClusterName, SecretToken};
use plane_protocol::time::Millis;
use serde_json::{Map, Value};
use sqlx::Row;

/// A token to record alongside a connect.
pub struct NewToken<'a> {
    pub token: &'a BearerToken,
    pub secret: &'a SecretToken,
    pub user: Option<&'a str>,
    pub auth: &'a Map<String, Value>,
    /// When the token stops working, if it has a lifetime.
    pub expires_at: Option<Millis>,
}

/// A stored token.
#[derive(Clone, Debug)]
pub struct TokenRow {
    pub backend_id: BackendName,
    pub user: Option<String>,
    pub auth: Value,
    pub secret: SecretToken,
    pub created_at: Millis,
    pub expires_at: Option<Millis>,
}

/// One revocation, as the change bus reads it.
#[derive(Clone, Debug)]
pub struct Revocation {
    pub sequence: i64,
    pub backend_id: BackendName,
    pub cluster: ClusterName,
    pub user: String,
    pub time: Millis,
}

impl Store {
    /// Revokes every token of `backend` issued to `user` and logs the revocation for the
    /// change bus, in one transaction. `None` when there is no such backend; otherwise how
    /// many tokens stopped working. A backend's static token, which every connect shares,
    /// is not revoked (terminate the backend to end it).
    ///
    /// The logged time is `now`, or the newest of the user's tokens if that is later
    /// (another controller's clock ahead of ours), so that proxies refuse every revoked
    /// token's route even where clocks disagree.
    pub async fn revoke_tokens(
        &self,
        backend: &BackendName,
        user: &str,
        now: Millis,
    ) -> StoreResult<Option<u64>> {
        let mut tx = self.begin_write(&self.pool).await?;
        let row = sqlx::query("SELECT cluster, static_token FROM backend WHERE id = $1")
            .bind(backend.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let cluster: String = row.try_get("cluster").map_err(anyhow::Error::from)?;
        let static_token: Option<String> =
            row.try_get("static_token").map_err(anyhow::Error::from)?;
        let revoked = sqlx::query(
            "UPDATE token SET revoked_at = $1 \
             WHERE backend_id = $2 AND username = $3 AND revoked_at IS NULL AND token <> $4",
        )
        .bind(now.0)
        .bind(backend.as_str())
        .bind(user)
        .bind(static_token.unwrap_or_default())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let newest = sqlx::query(
            "SELECT COALESCE(MAX(created_at), 0) AS newest FROM token \
             WHERE backend_id = $1 AND username = $2",
        )
        .bind(backend.as_str())
        .bind(user)
        .fetch_one(&mut *tx)
        .await?;
        let newest: i64 = newest.try_get("newest").map_err(anyhow::Error::from)?;
        let revoked_at = now.0.max(newest);
        // Logged even when nothing was revoked here: a proxy may still hold a route that a
        // revocation raced with, and telling it again costs nothing.
        sqlx::query(
            "INSERT INTO token_revocation (backend_id, cluster, username, time) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(backend.as_str())
        .bind(&cluster)
        .bind(user)
        .bind(revoked_at)
        .execute(&mut *tx)
        .await?;
        self.commit_and_signal(tx, &[Signal::Revocations]).await?;
        Ok(Some(revoked))
    }

    /// Revocations with a sequence number above `after`, oldest first, at most `limit`.
    pub async fn revocations_after(&self, after: i64, limit: i64) -> StoreResult<Vec<Revocation>> {
        let rows = sqlx::query(
            "SELECT id, backend_id, cluster, username, time FROM token_revocation \
             WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let backend_id: String = row.try_get("backend_id").map_err(anyhow::Error::from)?;
                let cluster: String = row.try_get("cluster").map_err(anyhow::Error::from)?;
                Ok(Revocation {
                    sequence: row.try_get("id").map_err(anyhow::Error::from)?,
                    backend_id: backend_id.parse().map_err(anyhow::Error::from)?,
                    cluster: cluster.parse().map_err(anyhow::Error::from)?,
                    user: row.try_get("username").map_err(anyhow::Error::from)?,
                    time: Millis(row.try_get("time").map_err(anyhow::Error::from)?),
                })
            })
            .collect()
    }

    /// The sequence number of the newest revocation (0 when there is none).
    pub async fn latest_revocation_sequence(&self) -> StoreResult<i64> {
        let row = sqlx::query("SELECT COALESCE(MAX(id), 0) AS latest FROM token_revocation")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("latest").map_err(anyhow::Error::from)?)
    }

    /// Records another token for an existing backend. Concurrent calls share a commit:
    /// the tokens that arrive while one batch is written go in the next, as one
    /// multi-row insert (group commit), so a burst of joins costs a few writes, not one each.
    ///
    /// On PostgreSQL the commit does not wait for the server's disk (`synchronous_commit =
    /// off` on the token connection): a crash restart or failover of the server can lose the
    /// tokens of the last fraction of a second, which then lead nowhere and are asked for
    /// again. Nothing the guarantees rest on is written this way (docs/architecture.md).
    pub async fn add_token(&self, backend: &BackendName, token: &NewToken<'_>) -> StoreResult<()> {
        let row = TokenInsert {
            token: token.token.to_string(),
            backend: backend.to_string(),
            user: token.user.map(str::to_string),
            auth: serde_json::to_string(token.auth).context("serializing auth")?,
            secret: token.secret.to_string(),
            created_at: Millis::now().0,
            expires_at: token.expires_at.map(|at| at.0),
        };
        let (done, mut answer) = tokio::sync::oneshot::channel();
        self.token_batch.pending().push((row, done));
        let writing = self.token_batch.writing.clone().lock_owned().await;
        // A batch written while this one waited for the lock may have taken it already.
        if let Ok(result) = answer.try_recv() {
            return result;
        }
        let batch = std::mem::take(&mut *self.token_batch.pending());
        // Written by a task of its own, which holds the lock until it is done: a caller
        // that goes away (its client hung up) cannot leave the others unanswered.
        let store = self.clone();
        tokio::spawn(async move {
            store.write_tokens(batch).await;
            drop(writing);
        });
        answer.await.unwrap_or_else(|_| {
            Err(
                anyhow::anyhow!("the task writing this token's batch ended without answering")
                    .into(),
            )
        })
    }

    /// Writes a batch in one transaction, answering each caller; if it fails, each token
    /// is written alone, so one bad row fails only its own connect.
    async fn write_tokens(&self, batch: Vec<(TokenInsert, TokenAnswer)>) {
        let rows: Vec<&TokenInsert> = batch.iter().map(|(row, _)| row).collect();
        match self.insert_tokens(&rows).await {
            Ok(()) => {
                for (_, done) in batch {
                    let _ = done.send(Ok(()));
                }
            }
            // One bad row fails only its own connect.
            Err(_) if batch.len() > 1 => {
                for (row, done) in batch {
                    let _ = done.send(self.insert_tokens(&[&row]).await);
                }
            }
            Err(err) => {
                if let Some((_, done)) = batch.into_iter().next() {
                    let _ = done.send(Err(err));
                }
            }
        }
    }

    /// Inserts `rows`: one statement when they fit in one, which commits on its own (a
    /// transaction would cost two more round trips per batch), else a transaction of several.
    async fn insert_tokens(&self, rows: &[&TokenInsert]) -> StoreResult<()> {
        const ROWS_PER_STATEMENT: usize = super::MAX_LIST_PARAMETERS / TokenInsert::COLUMNS;
        if rows.len() <= ROWS_PER_STATEMENT {
            let sql = TokenInsert::statement(rows.len());
            TokenInsert::bind_all(sqlx::query(&sql), rows)
                .execute(&self.token_writer)
                .await?;
            return Ok(());
        }
        let mut tx = self.begin_write(&self.token_writer).await?;
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let sql = TokenInsert::statement(chunk.len());
            TokenInsert::bind_all(sqlx::query(&sql), chunk)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A token that has not been revoked.
    pub async fn token(&self, token: &BearerToken) -> StoreResult<Option<TokenRow>> {
        let row = sqlx::query(
            "SELECT backend_id, username, auth, secret_token, created_at, expires_at FROM token \
             WHERE token = $1 AND revoked_at IS NULL",
        )
        .bind(token.as_str())
        .fetch_optional(&self.readers)
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
            created_at: Millis(row.try_get("created_at").map_err(anyhow::Error::from)?),
            expires_at: row
                .try_get::<Option<i64>, _>("expires_at")
                .map_err(anyhow::Error::from)?
                .map(Millis),
        }))
    }
}

/// A token waiting in [`TokenBatch`], owned so it can outlive its caller's borrow.
pub(super) struct TokenInsert {
    token: String,
    backend: String,
    user: Option<String>,
    auth: String,
    secret: String,
    created_at: i64,
    expires_at: Option<i64>,
}

impl TokenInsert {
    const COLUMNS: usize = 7;

    /// The multi-row insert of `rows` tokens.
    fn statement(rows: usize) -> String {
        let values = (0..rows)
            .map(|i| {
                format!(
                    "({})",
                    super::placeholders(i * Self::COLUMNS + 1, Self::COLUMNS)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "INSERT INTO token (token, backend_id, username, auth, secret_token, created_at, \
             expires_at) VALUES {values}"
        )
    }

    /// Binds `rows`' columns, in [`Self::statement`]'s order.
    fn bind_all<'q>(
        mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
        rows: &'q [&TokenInsert],
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
        for row in rows {
            query = query
                .bind(row.token.as_str())
                .bind(row.backend.as_str())
                .bind(row.user.as_deref())
                .bind(row.auth.as_str())
                .bind(row.secret.as_str())
                .bind(row.created_at)
                .bind(row.expires_at);
        }
        query
    }
}

type TokenAnswer = tokio::sync::oneshot::Sender<StoreResult<()>>;

/// Tokens of joins waiting to be written, and the lock the task writing a batch holds.
#[derive(Default)]
pub(super) struct TokenBatch {
    pending: std::sync::Mutex<Vec<(TokenInsert, TokenAnswer)>>,
    writing: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl TokenBatch {
    fn pending(&self) -> std::sync::MutexGuard<'_, Vec<(TokenInsert, TokenAnswer)>> {
        // Every use is a push or a take, which cannot leave the list half-changed.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
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
        "INSERT INTO token (token, backend_id, username, auth, secret_token, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(token.token.as_str())
    .bind(backend.as_str())
    .bind(token.user)
    .bind(auth)
    .bind(token.secret.as_str())
    .bind(now.0)
    .bind(token.expires_at.map(|at| at.0))
    .execute(conn)
    .await?;
    Ok(())
}
