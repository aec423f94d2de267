//! The controller: the HTTP API, the node sockets, the sweeper, and the store behind them.
//!
//! Shaped like the other components: [`config`] (plain serde), [`cli`] (clap → config),
//! [`start`] (serve on bound listeners, return a handle) and [`run`] (bind, start, wait for a
//! signal, shut down). Handlers only translate HTTP; the domain operations they call
//! (`connect`, `terminate`, the sweeper) return [`error::ControllerError`], which becomes
//! HTTP in one place.

mod api;
mod auth;
mod backends;
mod bus;
pub mod cli;
pub mod config;
mod dns_socket;
mod drone_socket;
mod error;
mod holders;
pub mod metrics;
mod node_session;
mod nodes;
pub mod openapi;
mod peers;
mod proxy_socket;
pub mod router;
mod state;
pub mod store;
mod sweeper;
mod ui;
mod warm;

pub use self::state::ControllerState;

use self::config::ControllerConfig;
use self::nodes::ConnectedNodes;
use self::state::StateParts;
use self::store::Store;
use anyhow::Context;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;

/// How long in-flight HTTP requests may run after shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A running controller.
pub struct ControllerHandle {
    state: ControllerState,
    local_addr: SocketAddr,
    server: JoinHandle<()>,
    sweeper: JoinHandle<()>,
    warm_keeper: JoinHandle<()>,
    bus: JoinHandle<()>,
}

impl ControllerHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The base URL of this controller's HTTP API.
    pub fn url(&self) -> Url {
        self.state.public_url().clone()
    }

    pub fn state(&self) -> &ControllerState {
        &self.state
    }

    /// Reads `--ctrl-token-file` again (what SIGHUP does); returns how many tokens are
    /// accepted now. On failure the tokens in force stay.
    pub fn reload_ctrl_tokens(&self) -> anyhow::Result<usize> {
        self.state.ctrl_tokens().reload()
    }

    /// Stops accepting, lets in-flight requests finish for up to [`SHUTDOWN_GRACE`], then
    /// aborts the rest; gives the node sessions as long again to record their end; then
    /// closes the database.
    pub async fn shutdown(self) {
        self.state.shutdown_token().cancel();
        let mut server = self.server;
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
        // Node sessions run on upgraded connections, which the server does not wait for.
        // They end on the shutdown token; let them record their disconnection first.
        let sessions = self.state.node_sessions();
        sessions.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!("node sessions still running after {SHUTDOWN_GRACE:?}; closing the database under them");
        }
        self.sweeper.abort();
        self.warm_keeper.abort();
        self.bus.abort();
        if let Err(err) = self
            .state
            .store()
            .remove_peer(self.state.controller_id())
            .await
        {
            tracing::warn!(error = %err, "could not remove this controller's peer record");
        }
        self.state.store().close().await;
    }
}

/// Opens the store, then serves the API on `listener` (which takes the place of
/// `config.listen`) until [`ControllerHandle::shutdown`].
pub async fn start(
    config: ControllerConfig,
    listener: TcpListener,
) -> anyhow::Result<ControllerHandle> {
    config.validate()?;
    let ctrl_tokens = auth::CtrlTokens::load(&config)?;
    let store = Store::open(&config.db).await?;
    let local_addr = listener
        .local_addr()
        .context("reading the listen address")?;
    let public_url = match &config.public_url {
        Some(url) => url.clone(),
        None => Url::parse(&format!("http://{local_addr}")).context("building the public URL")?,
    };
    let shutdown = CancellationToken::new();
    let nodes = ConnectedNodes::default();
    let (bus, bus_task) = bus::start(store.clone(), nodes.clone(), shutdown.child_token())
        .await
        .context("starting the change bus")?;
    let state = ControllerState::new(StateParts {
        store,
        config,
        public_url,
        nodes,
        bus,
        shutdown,
        ctrl_tokens,
    });

    // Subscribed before serving, so the cache's first entry already has its keeper.
    tokio::spawn(holders::keep_true(
        state.holders().clone(),
        state.bus().subscribe_status(),
        state.shutdown_token().clone(),
    ));
    let app = router::router(state.clone());
    let shutdown = state.shutdown_token().clone();
    let server = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(err) = result {
            tracing::error!(%err, "controller HTTP server failed");
        }
    });
    let peer_url = state
        .config()
        .peer_url
        .clone()
        .unwrap_or_else(|| state.public_url().clone());
    state
        .store()
        .register_peer(
            state.controller_id(),
            peer_url.as_str(),
            plane_protocol::time::Millis::now(),
        )
        .await
        .context("recording this controller's --peer-url")?;
    if let Some(port) = state.config().metrics_port {
        let host = state.config().listen.ip();
        let listener = TcpListener::bind((host, port))
            .await
            .with_context(|| format!("binding --metrics-port {port} on {host}"))?;
        let app = axum::Router::new()
            .route("/metrics", axum::routing::get(metrics::handle_metrics))
            .with_state(state.clone());
        let shutdown = state.shutdown_token().clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
            if let Err(err) = served {
                tracing::error!(error = %err, "the metrics server failed");
            }
        });
    }
    let sweeper = tokio::spawn(sweeper::run(state.clone()));
    let warm_keeper = tokio::spawn(warm::run(state.clone()));
    tracing::info!(%local_addr, database = state.store().kind().as_str(), "controller listening");
    Ok(ControllerHandle {
        state,
        local_addr,
        server,
        sweeper,
        warm_keeper,
        bus: bus_task,
    })
}

/// Runs a controller on `config.listen` until SIGINT or SIGTERM.
pub async fn run(config: ControllerConfig) -> anyhow::Result<()> {
    let listen = config.listen;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the controller to {listen} (--host, --port)"))?;
    // Caught before the controller serves: an operator's SIGHUP right after it answers must
    // reload the tokens, not end the process.
    let hangups = crate::signals::catch_hangups().context("catching SIGHUP")?;
    let handle = start(config, listener).await?;
    let reload = crate::signals::on_hangup(hangups, {
        let state = handle.state.clone();
        move || match state.ctrl_tokens().reload() {
            Ok(count) => tracing::info!(tokens = count, "SIGHUP: reloaded --ctrl-token-file"),
            Err(err) => {
                tracing::error!(error = %format!("{err:#}"), "SIGHUP: keeping the tokens in force")
            }
        }
    });
    crate::signals::wait_for_shutdown_signal().await;
    reload.abort();
    handle.shutdown().await;
    Ok(())
}
