//! The controller: the HTTP API, the node sockets, the sweeper, and the store behind them.

pub mod cli;
mod cluster;
pub mod config;
mod connect;
mod drone_socket;
mod error;
mod nodes;
mod paths;
mod proxy_socket;
mod socket;
mod status;
pub mod store;
mod sweeper;
mod terminate;

use self::config::ControllerConfig;
use self::error::ApiErrorResponse;
use self::nodes::ConnectedNodes;
use self::store::{StatusChange, Store};
use anyhow::Context;
use axum::routing::{get, post};
use axum::Router;
use plane_protocol::api::ApiErrorKind;
use plane_protocol::proxy::MessageToProxy;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;

/// How long in-flight HTTP requests may run after shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

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

    fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// The public status URL of a backend.
    pub fn status_url(&self, backend: &plane_protocol::names::BackendName) -> String {
        let base = self.inner.public_url.as_str().trim_end_matches('/');
        format!("{base}/pub/b/{backend}/status")
    }

    /// Publishes an applied status change to streams, route waiters and (once the backend
    /// stops taking traffic) the cluster's proxies.
    fn publish_status_change(&self, change: StatusChange) {
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

fn router(state: ControllerState) -> Router {
    let terminate_routes = Router::new()
        .route("/soft-terminate", post(terminate::handle_soft_terminate))
        .route("/hard-terminate", post(terminate::handle_hard_terminate));
    let status_routes = Router::new()
        .route("/status", get(status::handle_status))
        .route("/status-stream", get(status::handle_status_stream));

    Router::new()
        .route("/ctrl/connect", post(connect::handle_connect))
        .route("/ctrl/spawn", post(connect::handle_spawn))
        .nest("/ctrl/b/{backend}", terminate_routes.clone())
        .nest("/ctrl/c/{cluster}/b/{backend}", terminate_routes)
        .route("/ctrl/status", get(cluster::handle_controller_status))
        .route(
            "/ctrl/c/{cluster}/state",
            get(cluster::handle_cluster_state),
        )
        .route(
            "/ctrl/c/{cluster}/drone-socket",
            get(drone_socket::handle_drone_socket),
        )
        .route(
            "/ctrl/c/{cluster}/proxy-socket",
            get(proxy_socket::handle_proxy_socket),
        )
        .nest("/pub/b/{backend}", status_routes.clone())
        .nest("/pub/c/{cluster}/b/{backend}", status_routes)
        .route("/pub/health", get(cluster::handle_health))
        .fallback(|| async { ApiErrorResponse::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiErrorResponse::new(
                ApiErrorKind::MethodNotAllowed,
                "this endpoint does not accept that HTTP method",
            )
        })
        .with_state(state)
}

/// A running controller.
pub struct ControllerHandle {
    state: ControllerState,
    local_addr: SocketAddr,
    server: JoinHandle<()>,
    sweeper: JoinHandle<()>,
}

impl ControllerHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The base URL of this controller's HTTP API.
    pub fn url(&self) -> Url {
        self.state.inner.public_url.clone()
    }

    pub fn state(&self) -> &ControllerState {
        &self.state
    }

    /// Stops accepting, lets in-flight requests finish for up to [`SHUTDOWN_GRACE`], then
    /// aborts the rest and closes the database.
    pub async fn shutdown(self) {
        self.state.shutdown_token().cancel();
        let mut server = self.server;
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
        self.sweeper.abort();
        self.state.store().close().await;
    }
}

/// Opens the store, then serves the API on `listener` until [`ControllerHandle::shutdown`].
pub async fn start(
    config: ControllerConfig,
    listener: TcpListener,
) -> anyhow::Result<ControllerHandle> {
    let store = Store::open(&config.db).await?;
    let local_addr = listener
        .local_addr()
        .context("reading the listen address")?;
    let public_url = match &config.public_url {
        Some(url) => url.clone(),
        None => Url::parse(&format!("http://{local_addr}")).context("building the public URL")?,
    };
    let (status_changes, _) = broadcast::channel(1024);
    let state = ControllerState {
        inner: Arc::new(Inner {
            store,
            config,
            public_url,
            nodes: ConnectedNodes::default(),
            status_changes,
            shutdown: CancellationToken::new(),
        }),
    };

    let app = router(state.clone());
    let shutdown = state.shutdown_token().clone();
    let server = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(err) = result {
            tracing::error!(%err, "controller HTTP server failed");
        }
    });
    let sweeper = tokio::spawn(sweeper::run(state.clone()));
    tracing::info!(%local_addr, database = state.store().kind().as_str(), "controller listening");
    Ok(ControllerHandle {
        state,
        local_addr,
        server,
        sweeper,
    })
}

/// Runs a controller on `host:port` until SIGINT or SIGTERM.
pub async fn run(config: ControllerConfig, listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the controller to {listen}"))?;
    let handle = start(config, listener).await?;
    crate::signals::wait_for_shutdown_signal().await;
    handle.shutdown().await;
    Ok(())
}
