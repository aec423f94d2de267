//! Plane's proxy: serves `http://<cluster>/<token>/...`, resolving each token to its backend
//! through the controller, forwarding requests and WebSockets, and reporting open
//! connections so busy backends are not reaped.
//!
//! [`start`] runs a proxy on a listener you bound (tests bind port 0); [`run`] is what
//! `plane proxy` calls: bind, start, wait for a signal, shut down.

mod acme;
mod body;
pub mod cli;
mod client_stream;
pub mod config;
mod connection_tracker;
mod controller_connection;
mod headers;
mod metrics;
mod proxy_service;
mod responses;
mod route;
mod route_cache;
mod server;
mod tls;
mod tunnel;
mod upstream_pool;

pub use cli::ProxyOpts;
pub use config::ProxyConfig;

use anyhow::Context;
use connection_tracker::ConnectionTracker;
use controller_connection::{ControllerClient, ControllerConnectionConfig};
use plane_protocol::names::NodeName;
use proxy_service::ProxyState;
use server::Server;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use upstream_pool::UpstreamPool;

/// A running proxy. Dropping it stops everything at once; [`ProxyHandle::shutdown`] stops
/// gracefully.
pub struct ProxyHandle {
    local_addr: SocketAddr,
    https_addr: Option<SocketAddr>,
    name: NodeName,
    controller: ControllerClient,
    /// Owns every connection, backend-connection and tunnel task.
    tasks: TaskTracker,
    drain: CancellationToken,
    grace: Duration,
    /// Keep-alive connections to backends, closed at shutdown.
    pool: UpstreamPool,
    /// Idle client connections parked (hyper's buffers freed) right now.
    parked: Arc<AtomicUsize>,
    accept_task: JoinHandle<()>,
    controller_task: JoinHandle<()>,
    /// Cancels the root token (and so every task) when the handle goes away.
    hard_stop: DropGuard,
}

impl ProxyHandle {
    /// The address the proxy serves HTTPS on, if it does.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https_addr
    }

    /// The address the proxy serves HTTP on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The name this proxy gives the controller.
    pub fn name(&self) -> &NodeName {
        &self.name
    }

    /// Whether the proxy has a live connection to the controller right now.
    pub fn is_connected(&self) -> bool {
        self.controller.is_connected()
    }

    /// How many requests are held right now, waiting for their backends to become ready
    /// (or for their tokens to resolve).
    pub fn held_requests(&self) -> usize {
        self.controller.held_requests()
    }

    /// How many idle keep-alive client connections are parked right now: open, but with
    /// nothing allocated for them beyond the socket until the client sends again.
    pub fn parked_connections(&self) -> usize {
        self.parked.load(Ordering::Acquire)
    }

    /// Follows the controller connection (`true` while connected), e.g. to wait until the
    /// proxy can serve: `status.wait_for(|connected| *connected).await`.
    pub fn connection_status(&self) -> watch::Receiver<bool> {
        self.controller.connection_status()
    }

    /// Stops accepting connections, lets in-flight requests and open tunnels continue for
    /// the configured grace period (`shutdown_grace_ms`), then cuts whatever is left and
    /// disconnects from the controller (which in-flight requests may still need until then).
    pub async fn shutdown(self) {
        self.drain.cancel();
        // Idle keep-alive connections would otherwise wait out the whole grace period.
        self.pool.close();
        // The accept loop drops the listener as it returns: no new connections after this.
        if let Err(error) = self.accept_task.await {
            warn!(%error, "the accept loop failed");
        }
        self.tasks.close();
        if tokio::time::timeout(self.grace, self.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = self.tasks.len(),
                "shutdown grace period over; cutting the remaining connections"
            );
        }
        let hard_stop = self.hard_stop.disarm();
        hard_stop.cancel();
        self.tasks.wait().await;
        if let Err(error) = self.controller_task.await {
            warn!(%error, "the controller connection task failed");
        }
        info!(name = %self.name, "proxy stopped");
    }
}

/// Starts a proxy serving plain HTTP on `listener` and connecting to the controller in the
/// background. Requests that arrive before the controller connection is up wait for it.
pub async fn start(config: ProxyConfig, listener: TcpListener) -> anyhow::Result<ProxyHandle> {
    let https_listener = match config.https_port {
        Some(port) => {
            let address = SocketAddr::new(config.bind_ip, port);
            Some(
                TcpListener::bind(address)
                    .await
                    .with_context(|| format!("binding the proxy's HTTPS address {address}"))?,
            )
        }
        None => None,
    };
    start_with_listeners(config, listener, https_listener).await
}

/// As [`start`], on an HTTPS listener bound by the caller (who needs its port first, e.g.
/// to name the cluster), when `config.cert_path` is set.
pub async fn start_with_listeners(
    config: ProxyConfig,
    listener: TcpListener,
    https_listener: Option<TcpListener>,
) -> anyhow::Result<ProxyHandle> {
    config.validate().context("invalid proxy configuration")?;
    let link = config.link_config();
    link.check().context("invalid proxy configuration")?;
    let local_addr = listener
        .local_addr()
        .context("reading the proxy listener's address")?;

    let hard_stop = CancellationToken::new();
    let drain = hard_stop.child_token();
    let tasks = TaskTracker::new();
    let tracker = ConnectionTracker::default();
    let pool = UpstreamPool::new(tasks.clone(), hard_stop.clone());

    let (controller, controller_task) = ControllerClient::start(
        ControllerConnectionConfig {
            link,
            name: config.name.clone(),
            report_interval: config.report_interval(),
            hold_timeout: config.hold_timeout(),
            max_held_requests: config.max_held_requests,
        },
        tracker.clone(),
        pool.clone(),
        hard_stop.child_token(),
    );
    // HTTPS, if asked for: the certificate (watched for changes) and its listener.
    let https = match (&config.cert_path, https_listener) {
        (Some(path), Some(listener)) => {
            let cert = match &config.acme {
                // Ordered if missing, unusable or due.
                Some(_) => tls::CertFile::open_if_usable(path),
                None => tls::CertFile::open(path).map_err(anyhow::Error::msg)?,
            };
            let tls_config = tls::server_config(cert.clone()).map_err(anyhow::Error::msg)?;
            tokio::spawn(cert.clone().watch(hard_stop.child_token()));
            if let Some(acme) = &config.acme {
                let manager = acme::CertManager::new(
                    acme.clone(),
                    config.cluster.clone(),
                    cert.clone(),
                    controller.clone(),
                );
                tokio::spawn(manager.run(hard_stop.child_token()));
            }
            Some((listener, tokio_rustls::TlsAcceptor::from(tls_config), cert))
        }
        (None, None) => None,
        _ => anyhow::bail!("--https-port and --cert-path go together: give both or neither"),
    };
    let https_addr = match &https {
        Some((listener, _, _)) => Some(listener.local_addr().context("reading the HTTPS address")?),
        None => None,
    };
    let (https_port, cert) = https_addr
        .zip(https.as_ref())
        .map(|(addr, (_, _, cert))| (addr.port(), cert.clone()))
        .unzip();
    let state = ProxyState::new(proxy_service::StateParts {
        controller: controller.clone(),
        tracker,
        tasks: tasks.clone(),
        hard_stop: hard_stop.clone(),
        timeouts: proxy_service::BackendTimeouts {
            connect: config.backend_connect_timeout(),
            answer: config.upstream_timeout(),
        },
        pool: pool.clone(),
        https_port,
        cert,
        metrics: metrics::ProxyMetrics::new(&config.metrics),
    });
    if let Some(port) = config.metrics_port {
        plane_metrics::serve_on(
            config.bind_ip,
            port,
            config.metrics.clone(),
            hard_stop.child_token(),
        )
        .await?;
    }
    let parked = Arc::new(AtomicUsize::new(0));
    let server = Server {
        state,
        tasks: tasks.clone(),
        drain: drain.clone(),
        hard_stop: hard_stop.clone(),
        parked: parked.clone(),
    };
    if let Some((listener, acceptor, _)) = https {
        let https_server = Server {
            state: server.state.clone(),
            tasks: tasks.clone(),
            drain: drain.clone(),
            hard_stop: hard_stop.clone(),
            parked: parked.clone(),
        };
        tasks.spawn(https_server.accept_loop(listener, Some(acceptor)));
    }
    let accept_task = tokio::spawn(server.accept_loop(listener, None));

    Ok(ProxyHandle {
        local_addr,
        https_addr,
        grace: config.shutdown_grace(),
        name: config.name,
        controller,
        tasks,
        drain,
        pool,
        parked,
        accept_task,
        controller_task,
        hard_stop: hard_stop.drop_guard(),
    })
}

/// Runs a proxy until SIGINT or SIGTERM, then shuts it down gracefully.
pub async fn run(config: ProxyConfig) -> anyhow::Result<()> {
    let address = SocketAddr::new(config.bind_ip, config.http_port);
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the proxy's HTTP address {address}"))?;
    let proxy = start(config, listener).await?;
    info!(address = %proxy.local_addr(), name = %proxy.name(), "proxy listening");
    shutdown_signal().await?;
    info!("shutdown requested; draining connections");
    proxy.shutdown().await;
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.context("listening for SIGINT")?,
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("listening for Ctrl-C")?;
    Ok(())
}
