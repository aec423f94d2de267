//! Plane's DNS server (`plane dns`): answers the TXT queries of ACME DNS-01 challenges with
//! the values the controller holds, over UDP and TCP, and a clear DNS error for everything
//! else. It links to the controller like every node (`/ctrl/dns-socket`).

pub mod cli;
mod controller;
mod handler;

use anyhow::Context;
use hickory_server::ServerFuture;
use plane_protocol::names::{ClusterName, NodeName};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;

/// How long a TCP client may take to send its query.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a DNS server needs.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// Base URL of the controller (`http://TOKEN@host:port` sends TOKEN as bearer token).
    pub controller_url: Url,
    /// CA certificates to trust for an `https` controller.
    pub controller_ca: Option<PathBuf>,
    /// The cluster secret the controller requires of nodes.
    pub cluster_secret: Option<String>,
    /// The zone this server is authoritative for; `<cluster>.<zone>` names a cluster.
    pub zone: ClusterName,
    /// Unique per zone; random `dns-…` by default.
    pub name: NodeName,
    pub listen_ip: IpAddr,
    /// UDP and TCP port.
    pub port: u16,
    /// Where the server registers its metrics.
    pub metrics: plane_metrics::MetricsRegistry,
    /// Serve Prometheus metrics at /metrics on this TCP port of `listen_ip` (off when `None`).
    pub metrics_port: Option<u16>,
}

impl DnsConfig {
    pub fn new(controller_url: Url, zone: ClusterName) -> Self {
        Self {
            controller_url,
            controller_ca: None,
            cluster_secret: None,
            zone,
            name: NodeName::new_random("dns"),
            listen_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 53,
            metrics: Default::default(),
            metrics_port: None,
        }
    }

    fn link_config(&self) -> plane_link::LinkConfig {
        plane_link::LinkConfig {
            controller: self.controller_url.clone(),
            kind: plane_link::SocketKind::Dns,
            cluster_secret: self.cluster_secret.clone(),
            ca_file: self.controller_ca.clone(),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// A running DNS server.
pub struct DnsHandle {
    udp_addr: SocketAddr,
    tcp_addr: SocketAddr,
    server: ServerFuture<handler::Handler>,
    cancel: CancellationToken,
    link: JoinHandle<()>,
}

impl DnsHandle {
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// Stops answering and closes the controller link.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Err(error) = self.server.shutdown_gracefully().await {
            tracing::warn!(%error, "dns server did not stop cleanly");
        }
        let _ = self.link.await;
    }
}

/// Starts a DNS server on bound sockets, linking to the controller in the background.
/// Queries that arrive while the controller is away are answered SERVFAIL.
pub async fn start(
    config: DnsConfig,
    udp: UdpSocket,
    tcp: TcpListener,
) -> anyhow::Result<DnsHandle> {
    anyhow::ensure!(
        !config.zone.as_str().contains(':'),
        "--zone {} must be a DNS name, without a port",
        config.zone
    );
    let link = config.link_config();
    link.check().context("invalid dns server configuration")?;
    let (answers, mut session) = controller::start(config.name.clone(), config.zone.clone());
    let cancel = CancellationToken::new();
    session.cancel = cancel.clone();
    let handler = handler::Handler::new(&config.zone, answers, &config.metrics)
        .map_err(anyhow::Error::msg)?;
    if let Some(port) = config.metrics_port {
        plane_metrics::serve_on(
            config.listen_ip,
            port,
            config.metrics.clone(),
            cancel.child_token(),
        )
        .await?;
    }
    let udp_addr = udp.local_addr().context("reading the UDP address")?;
    let tcp_addr = tcp.local_addr().context("reading the TCP address")?;
    let mut server = ServerFuture::new(handler);
    server.register_socket(udp);
    server.register_listener(tcp, TCP_TIMEOUT);
    let link_cancel = cancel.clone();
    let link = tokio::spawn(async move {
        if let Err(error) = plane_link::run(link, session, link_cancel).await {
            tracing::error!(%error, "cannot link to the controller");
        }
    });
    tracing::info!(name = %config.name, zone = %config.zone, %udp_addr, %tcp_addr, "dns server started");
    Ok(DnsHandle {
        udp_addr,
        tcp_addr,
        server,
        cancel,
        link,
    })
}

/// Binds `--listen-ip`:`--port` (UDP and TCP), serves until SIGINT or SIGTERM, then stops.
pub async fn run(config: DnsConfig) -> anyhow::Result<()> {
    let addr = SocketAddr::new(config.listen_ip, config.port);
    let udp = UdpSocket::bind(addr)
        .await
        .with_context(|| format!("binding UDP {addr}"))?;
    let tcp = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding TCP {addr}"))?;
    let handle = start(config, udp, tcp).await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    handle.shutdown().await;
    Ok(())
}
