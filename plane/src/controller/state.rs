//! `ControllerState`: the one cheap-to-clone value every handler, socket session and
//! background task of the controller shares.

use super::config::ControllerConfig;
use super::nodes::ConnectedNodes;
use super::store::{StatusChange, Store};
use plane_protocol::proxy::MessageToProxy;
use std::sync::Arc;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use url::Url;

/// Everything handlers share. Cheap to clone.
#[derive(Clone)]
pub struct ControllerState {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    config: ControllerConfig,
    public_url: Url,
    nodes: ConnectedNodes,
    /// Every applied status change, for status streams and route waits.
    status_changes: broadcast::Sender<Arc<StatusChange>>,
    shutdown: CancellationToken,
}

impl ControllerState {
    pub(super) fn new(store: Store, config: ControllerConfig, public_url: Url) -> Self {
        let (status_changes, _) = broadcast::channel(1024);
        ControllerState {
            inner: Arc::new(Inner {
                store,
                config,
                public_url,
                nodes: ConnectedNodes::default(),
                status_changes,
                shutdown: CancellationToken::new(),
            }),
        }
    }

    /// The base URL of this controller's HTTP API.
    pub fn public_url(&self) -> &Url {
        &self.inner.public_url
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.inner.config
    }

    pub fn nodes(&self) -> &ConnectedNodes {
        &self.inner.nodes
    }

    pub fn subscribe_status_changes(&self) -> broadcast::Receiver<Arc<StatusChange>> {
        self.inner.status_changes.subscribe()
    }

    /// Waits until `changes` delivers a change of `backend` (or reports lag, after which
    /// the caller should re-read). Returns false if `deadline` passes first.
    pub async fn wait_for_change_of(
        changes: &mut broadcast::Receiver<Arc<StatusChange>>,
        backend: &plane_protocol::names::BackendName,
        deadline: tokio::time::Instant,
    ) -> bool {
        loop {
            match tokio::time::timeout_at(deadline, changes.recv()).await {
                Err(_) => return false,
                Ok(Ok(change)) if &change.backend.id != backend => continue,
                Ok(_) => return true,
            }
        }
    }

    pub(super) fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// The public status URL of a backend.
    pub fn status_url(&self, backend: &plane_protocol::names::BackendName) -> String {
        let base = self.inner.public_url.as_str().trim_end_matches('/');
        format!("{base}/pub/b/{backend}/status")
    }

    /// Publishes an applied status change to streams, route waiters and (once the backend
    /// stops taking traffic) the cluster's proxies.
    pub(super) fn publish_status_change(&self, change: StatusChange) {
        if change.entry.status.is_terminating() {
            self.nodes().broadcast_to_proxies(
                &change.backend.cluster,
                MessageToProxy::BackendRemoved {
                    backend_id: change.backend.id.clone(),
                },
            );
        }
        // No receivers is fine: nobody is watching this backend.
        let _ = self.inner.status_changes.send(Arc::new(change));
    }
}
