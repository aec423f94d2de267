//! `plane admin backup --db URL --to FILE`: a consistent copy of a SQLite database taken
//! while its controller serves (`VACUUM INTO`, which reads one snapshot and writes a
//! compacted copy). Restoring is starting a controller on the copy. PostgreSQL has its own
//! tools for this (`pg_dump`, `pg_restore`; see the README).

use crate::controller::store::DatabaseLocation;
use anyhow::{bail, Context};
use serde::Serialize;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, Row};
use std::path::{Path, PathBuf};

/// What a backup wrote.
#[derive(Debug, Serialize)]
pub struct BackupReport {
    pub file: PathBuf,
    pub bytes: u64,
    pub backends: i64,
    pub keys: i64,
}

pub async fn backup(db: &str, to: &Path) -> anyhow::Result<BackupReport> {
    let source = match DatabaseLocation::parse(db)? {
        DatabaseLocation::Sqlite(path) => path,
        DatabaseLocation::Postgres(_) => bail!(
            "--db is a PostgreSQL database: back it up with its own tools, e.g. `pg_dump --format=custom --file FILE URL`, and restore with `pg_restore --dbname URL FILE` (see the README)"
        ),
    };
    if !source.is_file() {
        bail!("--db {}: no SQLite database there", source.display());
    }
    if to.exists() {
        bail!("--to {}: the file exists; name a new one", to.display());
    }
    let directory = match to.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !directory.is_dir() {
        bail!(
            "--to {}: no directory {}",
            to.display(),
            directory.display()
        );
    }
    // Written beside the target and renamed into place, so a failed backup never leaves a
    // file that looks whole.
    let file_name = to
        .file_name()
        .with_context(|| format!("--to {}: not a file name", to.display()))?;
    let partial = directory.join(format!(".{}.partial", file_name.to_string_lossy()));
    let _ = std::fs::remove_file(&partial);

    let mut conn = SqliteConnectOptions::new()
        .filename(&source)
        .create_if_missing(false)
        // A busy writer (the controller) holds the lock only briefly.
        .busy_timeout(std::time::Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("opening --db {}", source.display()))?;
    let partial_text = partial
        .to_str()
        .context("the --to path is not UTF-8")?
        .to_string();
    let copied = sqlx::query("VACUUM INTO ?")
        .bind(&partial_text)
        .execute(&mut conn)
        .await;
    conn.close().await.ok();
    if let Err(err) = copied {
        let _ = std::fs::remove_file(&partial);
        return Err(err).with_context(|| format!("copying {}", source.display()));
    }

    let counted = check_copy(&partial).await;
    let (backends, keys) = match counted {
        Ok(counts) => counts,
        Err(err) => {
            let _ = std::fs::remove_file(&partial);
            return Err(err);
        }
    };
    std::fs::rename(&partial, to)
        .with_context(|| format!("moving the copy to --to {}", to.display()))?;
    let bytes = std::fs::metadata(to).map(|m| m.len()).unwrap_or(0);
    Ok(BackupReport {
        file: to.to_path_buf(),
        bytes,
        backends,
        keys,
    })
}

/// Checks the copy is a sound database and counts what it holds.
async fn check_copy(path: &Path) -> anyhow::Result<(i64, i64)> {
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .connect()
        .await
        .with_context(|| format!("opening the copy {}", path.display()))?;
    let integrity: String = sqlx::query("PRAGMA integrity_check")
        .fetch_one(&mut conn)
        .await?
        .try_get(0)?;
    if integrity != "ok" {
        bail!("the copy failed SQLite's integrity check: {integrity}");
    }
    let backends: i64 = sqlx::query("SELECT COUNT(*) FROM backend")
        .fetch_one(&mut conn)
        .await?
        .try_get(0)?;
    let keys: i64 = sqlx::query("SELECT COUNT(*) FROM backend_key")
        .fetch_one(&mut conn)
        .await?
        .try_get(0)?;
    conn.close().await.ok();
    Ok((backends, keys))
}
