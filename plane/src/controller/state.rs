//! `ControllerState`: the one cheap-to-clone value every handler, socket session and
//! background task of the controller shares.

use super::auth::CtrlTokens;
use super::bus::ChangeBus;
use super::config::ControllerConfig;
use super::nodes::ConnectedNodes;
use super::store::Store;
use rand::distributions::{Alphanumeric, DistString};
use std::sync::Arc;
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
    /// Names this controller process among all controllers on the database (node sessions
    /// and the sweeper's leader lease are recorded under it).
    controller_id: String,
    nodes: ConnectedNodes,
    bus: ChangeBus,
    shutdown: CancellationToken,
    ctrl_tokens: CtrlTokens,
    /// For requests passed to other controllers.
    peer_http: reqwest::Client,
    metrics: super::metrics::ControllerMetrics,
    holders: Arc<super::holders::HolderCache>,
    /// The node sessions running, so that shutdown can let them record their
    /// disconnection before the store closes.
    node_sessions: tokio_util::task::TaskTracker,
}

/// What [`ControllerState::new`] puts together.
pub(super) struct StateParts {
    pub store: Store,
    pub config: ControllerConfig,
    pub public_url: Url,
    pub nodes: ConnectedNodes,
    pub bus: ChangeBus,
    pub shutdown: CancellationToken,
    pub ctrl_tokens: CtrlTokens,
}

impl ControllerState {
    pub(super) fn new(parts: StateParts) -> Self {
        let suffix = Alphanumeric
            .sample_string(&mut rand::thread_rng(), 10)
            .to_lowercase();
        ControllerState {
            inner: Arc::new(Inner {
                store: parts.store,
                metrics: super::metrics::ControllerMetrics::new(&parts.config.metrics),
                config: parts.config,
                public_url: parts.public_url,
                // Plane 0.5's prefix for controller names.
                controller_id: format!("co-{suffix}"),
                nodes: parts.nodes,
                bus: parts.bus,
                shutdown: parts.shutdown,
                ctrl_tokens: parts.ctrl_tokens,
                holders: Default::default(),
                node_sessions: tokio_util::task::TaskTracker::new(),
                peer_http: reqwest::Client::builder()
                    .no_proxy()
                    .connect_timeout(std::time::Duration::from_secs(5))
                    .build()
                    .unwrap_or_default(),
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

    /// Key holders cached for joins (see [`super::holders`]).
    pub fn holders(&self) -> &Arc<super::holders::HolderCache> {
        &self.inner.holders
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.inner.config
    }

    /// The bearer tokens `/ctrl/*` accepts.
    pub fn ctrl_tokens(&self) -> &CtrlTokens {
        &self.inner.ctrl_tokens
    }

    pub fn controller_id(&self) -> &str {
        &self.inner.controller_id
    }

    pub fn metrics(&self) -> &super::metrics::ControllerMetrics {
        &self.inner.metrics
    }

    pub fn peer_http(&self) -> &reqwest::Client {
        &self.inner.peer_http
    }

    pub fn nodes(&self) -> &ConnectedNodes {
        &self.inner.nodes
    }

    pub fn bus(&self) -> &ChangeBus {
        &self.inner.bus
    }

    /// Every node session holds one of its tokens while it runs (see
    /// [`super::ControllerHandle::shutdown`]).
    pub(super) fn node_sessions(&self) -> &tokio_util::task::TaskTracker {
        &self.inner.node_sessions
    }

    pub(super) fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// The public status URL of a backend.
    pub fn status_url(&self, backend: &plane_protocol::names::BackendName) -> String {
        let base = self.inner.public_url.as_str().trim_end_matches('/');
        format!("{base}/pub/b/{backend}/status")
    }
}
