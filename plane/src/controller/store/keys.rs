//! The `backend_key` table: which backend holds each key, with a fencing token that grows
//! every time the key changes hands.

use super::{Store, StoreResult};
use plane_protocol::api::KeyConfig;
use plane_protocol::backend::BackendStatus;
use plane_protocol::names::BackendName;
use plane_protocol::time::Millis;
use sqlx::Row;

/// The backend currently holding a key.
#[derive(Clone, Debug)]
pub struct KeyHolder {
    pub backend_id: BackendName,
    pub tag: String,
    pub fencing_token: i64,
    /// The holder's lease has run out (on the database's clock): the key may be taken over.
    pub lease_expired: bool,
    /// The holder's row, read in the same query, so a join needs no second read.
    pub backend: super::BackendRow,
}

impl Store {
    /// The live backend holding `(namespace, name)`, if any.
    pub async fn key_holder(&self, namespace: &str, name: &str) -> StoreResult<Option<KeyHolder>> {
        let row = sqlx::query(&format!(
            "SELECT k.backend_id, k.tag, k.fencing_token, \
             CAST(CASE WHEN b.lease_expires_at <= {now} THEN 1 ELSE 0 END AS BIGINT) AS lease_expired, \
             {columns} \
             FROM backend_key k JOIN backend b ON b.id = k.backend_id \
             WHERE k.namespace = $1 AND k.name = $2 AND b.status_number < $3",
            now = self.now_sql(),
            columns = super::backends::backend_columns_of_b(),
        ))
        .bind(namespace)
        .bind(name)
        .bind(i64::from(BackendStatus::Terminated.number()))
        .fetch_optional(&self.readers)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let backend_id: String = row.try_get("backend_id").map_err(anyhow::Error::from)?;
        Ok(Some(KeyHolder {
            backend_id: backend_id.parse().map_err(anyhow::Error::from)?,
            tag: row.try_get("tag").map_err(anyhow::Error::from)?,
            fencing_token: row.try_get("fencing_token").map_err(anyhow::Error::from)?,
            lease_expired: row
                .try_get::<i64, _>("lease_expired")
                .map_err(anyhow::Error::from)?
                == 1,
            backend: super::BackendRow::from_row(&row)?,
        }))
    }
}

/// Takes the key for `backend` if nobody holds it. Returns the new fencing token, or `None`
/// when another backend holds the key. Atomic on both databases: the conditional upsert
/// either claims the row or changes nothing.
pub(super) async fn acquire(
    conn: &mut sqlx::AnyConnection,
    key: &KeyConfig,
    backend: &BackendName,
    now: Millis,
) -> StoreResult<Option<i64>> {
    let row = sqlx::query(
        "INSERT INTO backend_key (namespace, name, tag, backend_id, fencing_token, acquired_at) \
         VALUES ($1, $2, $3, $4, 1, $5) \
         ON CONFLICT (namespace, name) DO UPDATE SET tag = excluded.tag, \
           backend_id = excluded.backend_id, fencing_token = backend_key.fencing_token + 1, \
           acquired_at = excluded.acquired_at \
         WHERE backend_key.backend_id IS NULL \
         RETURNING fencing_token",
    )
    .bind(&key.namespace)
    .bind(&key.name)
    .bind(&key.tag)
    .bind(backend.as_str())
    .bind(now.0)
    .fetch_optional(conn)
    .await?;
    match row {
        Some(row) => Ok(Some(
            row.try_get("fencing_token").map_err(anyhow::Error::from)?,
        )),
        None => Ok(None),
    }
}

/// Frees whatever key `backend` holds.
pub(super) async fn release(
    conn: &mut sqlx::AnyConnection,
    backend: &BackendName,
) -> StoreResult<()> {
    sqlx::query("UPDATE backend_key SET backend_id = NULL WHERE backend_id = $1")
        .bind(backend.as_str())
        .execute(conn)
        .await?;
    Ok(())
}
