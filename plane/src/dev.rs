//! `plane dev`: controller, drone and proxy in one process on loopback, on the embedded
//! database, with a locally built demo image, so Plane can be tried offline in a minute.

use crate::controller::{self, config::ControllerConfig};
use crate::demo_image::{self, ImageSpec};
use anyhow::Context;
use clap::Args;
use plane_drone::config::DroneConfig;
use plane_protocol::names::{ClusterName, NodeName};
use plane_proxy::config::ProxyConfig;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpListener;

/// The image repository `plane dev` builds its demo backend into.
pub const DEMO_IMAGE: &str = "plane/demo";

#[derive(Args, Debug, Clone)]
pub struct DevOpts {
    /// Where the embedded database (plane.db) and the drone's state (drone/) live.
    #[arg(long, env = "PLANE_DATA_DIR", default_value = "./.plane")]
    pub data_dir: PathBuf,
    /// Port of the controller's HTTP API on 127.0.0.1.
    #[arg(long, env = "PLANE_CONTROLLER_PORT", default_value_t = 8080)]
    pub controller_port: u16,
    /// Port of the proxy on 127.0.0.1; the cluster is named `localhost:<port>`.
    #[arg(long, env = "PLANE_PROXY_PORT", default_value_t = 9090)]
    pub proxy_port: u16,
    /// Seconds a backend gets to exit after SIGTERM before it is killed.
    #[arg(long, env = "PLANE_STOP_GRACE_PERIOD_SECONDS", default_value_t = 10)]
    pub stop_grace_period_seconds: u64,
    /// Serve the cluster over HTTPS too, with a certificate from a CA generated in
    /// `<data-dir>/tls/` (kept across runs; trust `ca.pem` once). The cluster is then named
    /// `localhost:<https-port>` and its URLs are https://.
    #[arg(long, env = "PLANE_DEV_HTTPS")]
    pub https: bool,
    /// Port of the proxy's HTTPS listener on 127.0.0.1, with --https.
    #[arg(long, env = "PLANE_HTTPS_PORT", default_value_t = 9443)]
    pub https_port: u16,
}

pub async fn run(opts: DevOpts) -> anyhow::Result<()> {
    let loopback = Ipv4Addr::LOCALHOST;
    let controller_listener = TcpListener::bind((loopback, opts.controller_port))
        .await
        .with_context(|| {
            format!(
                "--controller-port {}: cannot listen on 127.0.0.1:{}",
                opts.controller_port, opts.controller_port
            )
        })?;
    let proxy_listener = TcpListener::bind((loopback, opts.proxy_port))
        .await
        .with_context(|| {
            format!(
                "--proxy-port {}: cannot listen on 127.0.0.1:{}",
                opts.proxy_port, opts.proxy_port
            )
        })?;
    let proxy_port = proxy_listener.local_addr()?.port();
    let https_listener = match opts.https {
        true => Some(
            TcpListener::bind((loopback, opts.https_port))
                .await
                .with_context(|| {
                    format!(
                        "--https-port {}: cannot listen on 127.0.0.1:{}",
                        opts.https_port, opts.https_port
                    )
                })?,
        ),
        false => None,
    };
    let cluster_port = match &https_listener {
        Some(listener) => listener.local_addr()?.port(),
        None => proxy_port,
    };
    let cluster: ClusterName = format!("localhost:{cluster_port}")
        .parse()
        .context("building the cluster name")?;
    let tls_files = match opts.https {
        true => Some(crate::dev_tls::ensure(&opts.data_dir.join("tls"))?),
        false => None,
    };

    let docker = bollard::Docker::connect_with_local_defaults()
        .context("connecting to the Docker engine (is it running, and may this user use it?)")?;
    docker
        .ping()
        .await
        .context("the Docker engine does not answer (is it running, and may this user use it?)")?;
    let executable = std::env::current_exe().context("finding the plane executable")?;
    let demo_image = demo_image::ensure(
        &docker,
        &ImageSpec {
            executable: executable.clone(),
            args: vec!["demo-backend".to_string()],
            repository: DEMO_IMAGE.to_string(),
        },
    )
    .await
    .context("building the demo backend image")?;

    let db = opts.data_dir.join("plane.db");
    // One registry for every component here: the controller's /metrics serves them all.
    let metrics = plane_metrics::MetricsRegistry::new();
    let mut controller_config = ControllerConfig::new(db.display().to_string());
    controller_config.metrics = metrics.clone();
    controller_config.default_cluster = Some(cluster.clone());
    if opts.https {
        controller_config.https_clusters = vec![cluster.clone()];
    }
    let controller_addr = controller_listener.local_addr()?;
    controller_config.public_url = Some(url::Url::parse(&format!("http://{controller_addr}"))?);
    let controller = controller::start(controller_config, controller_listener).await?;
    let controller_url = controller.url();

    let mut proxy_config = ProxyConfig::new(controller_url.clone(), cluster.clone());
    proxy_config.metrics = metrics.clone();
    proxy_config.name = NodeName::new_random("px");
    if let (Some(files), Some(listener)) = (&tls_files, &https_listener) {
        proxy_config.https_port = Some(listener.local_addr()?.port());
        proxy_config.cert_path = Some(files.certificate.clone());
    }
    let proxy =
        plane_proxy::start_with_listeners(proxy_config, proxy_listener, https_listener).await?;

    let mut drone_config = DroneConfig::new(controller_url.clone(), cluster.clone());
    // Next to the controller's database, so a restarted `plane dev` replays what the
    // drone had not yet reported. Its name is kept there too: a restarted `plane dev`
    // finds the containers its previous run left, and never touches another's.
    drone_config.state_dir = opts.data_dir.join("drone");
    drone_config.name = plane_drone::config::stable_drone_name(&drone_config.state_dir)?;
    drone_config.stop_grace_period_ms = opts.stop_grace_period_seconds * 1000;
    drone_config.fence_executable = Some(executable.clone());
    // Stopping `plane dev` stops what it ran.
    drone_config.on_shutdown = plane_drone::OnShutdown::Terminate;
    drone_config.metrics = metrics.clone();
    let drone = plane_drone::start(drone_config).await?;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(drone.is_connected() && proxy.is_connected()) {
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the drone and proxy did not connect to the controller within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let proxy_addr = SocketAddr::new(loopback.into(), proxy_port);
    println!("plane dev is ready: controller {controller_url} | proxy http://{proxy_addr} | cluster {cluster} | database {}", db.display());
    if let Some(files) = &tls_files {
        println!(
            "HTTPS: https://{cluster}/ with a certificate from a local CA; trust it with: ca {}",
            files.ca.display()
        );
    }
    println!();
    println!("Start a backend and follow it until it is ready:");
    println!(
        "  {} connect --controller {controller_url} --key my-first-key --image {DEMO_IMAGE}:latest --max-idle-seconds 60",
        executable.display()
    );
    println!("Then open the printed URL in a browser. Stop plane dev with Ctrl-C.");
    println!(
        "The dashboard: {}/ctrl/ui/",
        controller_url.as_str().trim_end_matches('/')
    );
    tracing::info!(image = %demo_image, "demo image ready");

    crate::signals::wait_for_shutdown_signal().await;
    // Drone first: it stops its backends and reports it while the controller still listens.
    drone.shutdown().await;
    proxy.shutdown().await;
    controller.shutdown().await;
    Ok(())
}
