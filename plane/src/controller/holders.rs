//! Which backend holds each key, cached for joins: a connect to a running key reads the
//! holder from here instead of the database. An entry serves only while no status change
//! has been committed through this controller since it was read (the store's status epoch
//! grows before each such commit), and only for [`HOLDER_TTL`]; a change committed by
//! another controller drops it when the change bus delivers it. Only joins use it: taking a
//! key always goes to the database, so the cache cannot put two backends on one key.

use super::store::{KeyHolder, StatusChange};
use dashmap::DashMap;
use plane_protocol::backend::BackendStatus;
use plane_protocol::names::BackendName;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a holder read from the database serves joins. Its lease was live when read;
/// a lease is never shorter than several seconds, so within this it still is, unless its
/// drone was lost just then (which a read a moment earlier would have missed too).
pub const HOLDER_TTL: Duration = Duration::from_secs(1);

/// The cache's key: `(namespace, name)`.
type Key = (String, String);

#[derive(Default)]
pub struct HolderCache {
    by_key: DashMap<Key, Cached>,
    key_of: DashMap<BackendName, Key>,
}

struct Cached {
    holder: KeyHolder,
    read_at: Instant,
    /// The store's status epoch before the read.
    epoch: u64,
}

impl HolderCache {
    /// The cached holder of the key, if it was read within [`HOLDER_TTL`] and at status
    /// epoch `epoch` (no status change committed here since).
    pub fn get(&self, namespace: &str, name: &str, epoch: u64) -> Option<KeyHolder> {
        let key = (namespace.to_string(), name.to_string());
        let entry = self.by_key.get(&key)?;
        if entry.epoch == epoch && entry.read_at.elapsed() < HOLDER_TTL {
            return Some(entry.holder.clone());
        }
        drop(entry);
        self.by_key.remove(&key);
        None
    }

    /// Keeps a holder just read from the database (started at `read_at`, status epoch
    /// `epoch`), if a join may use it: a ready backend whose lease had not run out. Anything
    /// else goes to the database every time, since the connect will wait on it, take its
    /// key over, or refuse.
    pub fn insert(
        &self,
        namespace: &str,
        name: &str,
        holder: &KeyHolder,
        read_at: Instant,
        epoch: u64,
    ) {
        if holder.lease_expired || holder.backend.status != BackendStatus::Ready {
            return;
        }
        let key = (namespace.to_string(), name.to_string());
        self.key_of.insert(holder.backend_id.clone(), key.clone());
        self.by_key.insert(
            key,
            Cached {
                holder: holder.clone(),
                read_at,
                epoch,
            },
        );
    }

    /// The backend's status changed: its entry (if any) is no longer known to be true.
    pub fn forget_backend(&self, backend: &BackendName) {
        if let Some((_, key)) = self.key_of.remove(backend) {
            self.by_key
                .remove_if(&key, |_, cached| &cached.holder.backend_id == backend);
        }
    }

    /// Forgets everything (the bus lagged, so some change may have been missed).
    pub fn clear(&self) {
        self.by_key.clear();
        self.key_of.clear();
    }
}

/// Drops the entry of every backend whose status changes, until `shutdown`. `changes` is
/// subscribed before the controller serves, so no change can slip past the cache.
pub async fn keep_true(
    cache: Arc<HolderCache>,
    mut changes: broadcast::Receiver<Arc<StatusChange>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            change = changes.recv() => match change {
                Ok(change) => cache.forget_backend(&change.backend_id),
                Err(broadcast::error::RecvError::Lagged(_)) => cache.clear(),
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::store::BackendRow;
    use plane_protocol::time::Millis;

    fn holder(id: &BackendName, status: BackendStatus) -> KeyHolder {
        KeyHolder {
            backend_id: id.clone(),
            tag: String::new(),
            fencing_token: 1,
            lease_expired: false,
            backend: BackendRow {
                id: id.clone(),
                cluster: "localhost:9090".parse().expect("cluster"),
                pool: String::new(),
                drone: "dr-1".parse().expect("drone"),
                status,
                status_time: Millis(0),
                address: None,
                termination_kind: None,
                termination_reason: None,
                exit_code: None,
                message: None,
                termination_requested: None,
                key_name: Some("doc".into()),
                key_namespace: Some(String::new()),
                static_token: None,
                subdomain: None,
                protocol: Default::default(),
                created_at: Millis(0),
                last_active_at: Millis(0),
                lease_expires_at: Millis(0),
                warm_fingerprint: None,
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_serves_until_its_ttl_a_status_change_or_its_backends_change() {
        let cache = HolderCache::default();
        let id = BackendName::new_random();
        cache.insert(
            "",
            "doc",
            &holder(&id, BackendStatus::Ready),
            Instant::now(),
            7,
        );
        assert!(cache.get("", "doc", 7).is_some());
        // A status change committed here since the read: not trusted.
        assert!(cache.get("", "doc", 8).is_none());

        cache.insert(
            "",
            "doc",
            &holder(&id, BackendStatus::Ready),
            Instant::now(),
            8,
        );
        tokio::time::advance(HOLDER_TTL - Duration::from_millis(1)).await;
        assert!(cache.get("", "doc", 8).is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(cache.get("", "doc", 8).is_none(), "past its TTL");

        cache.insert(
            "",
            "doc",
            &holder(&id, BackendStatus::Ready),
            Instant::now(),
            8,
        );
        cache.forget_backend(&id);
        assert!(cache.get("", "doc", 8).is_none(), "dropped by the bus");
    }

    #[tokio::test(start_paused = true)]
    async fn only_ready_holders_with_live_leases_are_kept() {
        let cache = HolderCache::default();
        let id = BackendName::new_random();
        cache.insert(
            "",
            "a",
            &holder(&id, BackendStatus::Starting),
            Instant::now(),
            1,
        );
        let mut expired = holder(&id, BackendStatus::Ready);
        expired.lease_expired = true;
        cache.insert("", "b", &expired, Instant::now(), 1);
        assert!(cache.get("", "a", 1).is_none());
        assert!(cache.get("", "b", 1).is_none());
    }
}
