//! `plane admin` (and its short form `plane connect`): the controller's API from the command
//! line, through the typed client.

mod backup;
mod output;
mod request;

pub use request::{ConnectArgs, SpawnArgs, SpawnCommandArgs};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use output::{Colour, Output};
use plane_client::PlaneClient;
use plane_protocol::api::{ClusterState, ConnectResponse, NodeState, RevokeRequest, WarmPoolState};
use plane_protocol::backend::{BackendStatus, TerminationKind};
use plane_protocol::names::{BackendName, ClusterName, NodeName};
use serde::Serialize;
use url::Url;

/// The controller to talk to and how to print what it says.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// Base URL of the controller; `http://TOKEN@host:port` sends TOKEN as its bearer token.
    #[arg(
        long,
        global = true,
        env = "PLANE_CONTROLLER_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub controller: Url,
    /// Print results as JSON, one document per line, instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `plane admin ...`.
#[derive(Args, Debug)]
pub struct AdminOpts {
    #[command(flatten)]
    pub target: Target,
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// `plane connect ...`, the short form of `plane admin connect`.
#[derive(Args, Debug)]
pub struct ConnectOpts {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Get the backend of a key (starting one if needed) and follow it until it is ready.
    Connect(ConnectArgs),
    /// Start a new backend without a key and follow it until it is ready.
    Spawn(SpawnCommandArgs),
    /// Ask a backend to stop: gracefully (SIGTERM, then SIGKILL after the drone's grace
    /// period), or at once with --hard.
    Terminate {
        /// The backend's ID (`ba-...`).
        backend: BackendName,
        /// Kill the container now instead of asking it to exit.
        #[arg(long)]
        hard: bool,
        /// Follow the status until the backend has terminated.
        #[arg(long)]
        wait: bool,
    },
    /// The controller's status, or with BACKEND that backend's latest status.
    Status {
        /// A backend's ID (`ba-...`); without it, the controller's own status.
        backend: Option<BackendName>,
        /// Follow the backend's status until it terminates.
        #[arg(long, requires = "backend")]
        follow: bool,
    },
    /// One backend: its key, cluster, drone, times and how it ended, then every status it
    /// has been in.
    Backend {
        /// The backend's ID (`ba-...`).
        backend: BackendName,
    },
    /// Stop placing new backends on a drone; its running backends keep serving.
    Drain {
        #[arg(long)]
        cluster: ClusterName,
        /// The drone's name (`dr-...`), as the cluster state lists it.
        drone: NodeName,
    },
    /// Let a drained drone take new backends again.
    Undrain {
        #[arg(long)]
        cluster: ClusterName,
        /// The drone's name (`dr-...`).
        drone: NodeName,
    },
    /// Stop every token of one user for one backend, at every proxy.
    Revoke {
        /// The backend's ID (`ba-...`).
        backend: BackendName,
        /// The user whose tokens stop working.
        #[arg(long)]
        user: String,
    },
    /// What a backend printed (stdout lines to stdout, stderr lines to stderr); with --json,
    /// one `{stream, time, text}` document per line, all to stdout.
    Logs {
        /// The backend's ID (`ba-...`).
        backend: BackendName,
        /// Keep printing new lines until the backend exits.
        #[arg(long, short)]
        follow: bool,
        /// Only the last N lines so far.
        #[arg(long, value_name = "N")]
        tail: Option<u64>,
        /// Start each line with its time (RFC 3339, milliseconds, UTC).
        #[arg(long, short)]
        timestamps: bool,
    },
    /// Copy a controller's SQLite database while it serves, consistently (restore by
    /// starting a controller with `--db` on the copy). For PostgreSQL use pg_dump.
    Backup {
        /// The database the controller uses (its --db).
        #[arg(long)]
        db: String,
        /// The file to write; it must not exist yet.
        #[arg(long)]
        to: std::path::PathBuf,
    },
    /// Keep a number of backends of an image started and waiting for a claim, so that
    /// connects for it need not wait for a cold start.
    Warm(request::WarmArgs),
    /// The drones and proxies of a cluster.
    ClusterState {
        /// The cluster's name (its proxies' host, e.g. `localhost:9090`).
        #[arg(long)]
        cluster: ClusterName,
    },
}

pub async fn run_connect(opts: ConnectOpts) -> anyhow::Result<()> {
    run(AdminOpts {
        target: opts.target,
        command: AdminCommand::Connect(opts.connect),
    })
    .await
}

pub async fn run(opts: AdminOpts) -> anyhow::Result<()> {
    let client = PlaneClient::new(opts.target.controller.clone());
    let out = Output::new(opts.target.json);
    let controller = client.base_url().clone();
    let failed = |what: &str| format!("{what} at {controller}");
    match opts.command {
        AdminCommand::Connect(args) => {
            let connected = client
                .connect(&args.request()?)
                .await
                .with_context(|| failed("connect"))?;
            print_connected(&out, &connected);
            if !args.no_follow {
                follow_until_ready(&client, &out, &connected).await?;
            }
        }
        AdminCommand::Spawn(args) => {
            let spawned = client
                .spawn(&args.request())
                .await
                .with_context(|| failed("spawn"))?;
            print_connected(&out, &spawned);
            if !args.no_follow {
                follow_until_ready(&client, &out, &spawned).await?;
            }
        }
        AdminCommand::Terminate {
            backend,
            hard,
            wait,
        } => {
            let kind = if hard {
                TerminationKind::Hard
            } else {
                TerminationKind::Soft
            };
            client
                .terminate(&backend, kind)
                .await
                .with_context(|| failed("terminate"))?;
            out.print(
                &TerminateRequested {
                    backend_id: &backend,
                    kind,
                },
                |_| format!("{} termination of {backend} requested", kind.as_str()),
            );
            if wait {
                out.follow(client.status_stream(&backend), |_| false)
                    .await
                    .with_context(|| failed("following the status"))?;
            }
        }
        AdminCommand::Status {
            backend: None,
            follow: _,
        } => {
            let status = client.status().await.with_context(|| failed("status"))?;
            out.print(&status, |out| {
                let mut text = format!(
                    "controller {}: {} (version {}, build {}",
                    client.base_url(),
                    out.paint(Colour::Green, &status.status),
                    status.version,
                    status.hash
                );
                if let Some(database) = &status.database {
                    text.push_str(&format!(", {database}"));
                }
                text.push(')');
                text
            });
        }
        AdminCommand::Status {
            backend: Some(backend),
            follow,
        } => {
            if follow {
                out.follow(client.status_stream(&backend), |_| false)
                    .await
                    .with_context(|| failed("following the status"))?;
            } else {
                let entry = client
                    .backend_status(&backend)
                    .await
                    .with_context(|| failed("status"))?;
                out.current_status(&entry);
            }
        }
        AdminCommand::Backend { backend } => {
            let details = client
                .backend(&backend)
                .await
                .with_context(|| failed("reading the backend"))?;
            out.backend(&details);
        }
        AdminCommand::Drain { cluster, drone } => {
            let result = client
                .drain(&cluster, &drone)
                .await
                .with_context(|| failed("drain"))?;
            out.print(&result, |_| match result.updated {
                true => format!("{drone} is draining: it gets no new backends"),
                false => format!("{drone} was already draining"),
            });
        }
        AdminCommand::Undrain { cluster, drone } => {
            let result = client
                .undrain(&cluster, &drone)
                .await
                .with_context(|| failed("undrain"))?;
            out.print(&result, |_| match result.updated {
                true => format!("{drone} takes new backends again"),
                false => format!("{drone} was not draining"),
            });
        }
        AdminCommand::Revoke { backend, user } => {
            let request = RevokeRequest {
                backend_id: backend,
                user,
            };
            client
                .revoke(&request)
                .await
                .with_context(|| failed("revoke"))?;
            out.print(&request, |_| {
                format!(
                    "revoked every token of {} for {}",
                    request.user, request.backend_id
                )
            });
        }
        AdminCommand::Logs {
            backend,
            follow,
            tail,
            timestamps,
        } => {
            let mut lines = client
                .backend_logs(&backend, follow, tail)
                .await
                .with_context(|| failed("logs"))?;
            while let Some(line) = lines.next().await {
                let line = line.with_context(|| failed("reading the logs"))?;
                match out.log_line(&line, timestamps) {
                    Ok(()) => {}
                    // Read by something that stopped reading (`| head`): done.
                    Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => break,
                    Err(err) => return Err(err).context("printing the logs"),
                }
            }
        }
        AdminCommand::Backup { db, to } => {
            let report = backup::backup(&db, &to).await?;
            out.print(&report, |_| {
                format!(
                    "backed up {} backends and {} keys to {} ({} bytes)",
                    report.backends,
                    report.keys,
                    report.file.display(),
                    report.bytes
                )
            });
        }
        AdminCommand::Warm(args) => {
            let pool = args.pool.clone().unwrap_or_default();
            let warm = client
                .set_warm_pool(&args.cluster, &pool, args.executable(), args.size)
                .await
                .with_context(|| failed("warm"))?;
            out.print(&warm, |_| warm_table(std::slice::from_ref(&warm)));
        }
        AdminCommand::ClusterState { cluster } => {
            let state = client
                .cluster_state(&cluster)
                .await
                .with_context(|| failed("cluster-state"))?;
            out.print(&state, |out| cluster_table(out, &cluster, &state));
        }
    }
    Ok(())
}

/// What `terminate --json` prints: the API answers `null`, so say what was asked.
#[derive(Serialize)]
struct TerminateRequested<'a> {
    backend_id: &'a BackendName,
    kind: TerminationKind,
}

fn print_connected(out: &Output, connected: &ConnectResponse) {
    out.print(connected, |out| {
        let mut lines = vec![
            format!(
                "backend:    {}{}",
                out.paint(Colour::Bold, connected.backend_id.as_str()),
                if connected.spawned {
                    " (new)"
                } else {
                    " (already running)"
                }
            ),
            format!("url:        {}", connected.url),
            format!("status url: {}", connected.status_url),
        ];
        if let Some(drone) = &connected.drone {
            lines.push(format!("drone:      {drone}"));
        }
        lines.join("\n")
    });
}

/// Prints the backend's statuses until it is ready (success) or terminated (failure).
async fn follow_until_ready(
    client: &PlaneClient,
    out: &Output,
    connected: &ConnectResponse,
) -> anyhow::Result<()> {
    let last = out
        .follow(client.status_stream(&connected.backend_id), |entry| {
            entry.status == BackendStatus::Ready || entry.status == BackendStatus::Terminated
        })
        .await
        .context("following the status")?;
    match last.map(|entry| entry.status) {
        Some(BackendStatus::Ready) => {
            if !out.is_json() {
                println!(
                    "{} open {}",
                    out.paint(Colour::Green, "ready:"),
                    connected.url
                );
            }
            Ok(())
        }
        Some(_) => bail!(
            "backend {} terminated before it was ready",
            connected.backend_id
        ),
        None => bail!(
            "the status stream of {} ended before it was ready",
            connected.backend_id
        ),
    }
}

fn cluster_table(out: &Output, cluster: &ClusterName, state: &ClusterState) -> String {
    let yes_no = |value: bool| if value { "yes" } else { "no" };
    let mut rows = vec![vec![
        "DRONE".to_string(),
        "READY".to_string(),
        "DRAINING".to_string(),
        "BACKENDS".to_string(),
        "POOL".to_string(),
        "CONTROLLER".to_string(),
        "LAST SEEN".to_string(),
    ]];
    for drone in &state.drones {
        rows.push(vec![
            drone.node.name.name().to_string(),
            yes_no(drone.ready).to_string(),
            yes_no(drone.draining).to_string(),
            drone.backend_count.to_string(),
            if drone.pool.is_empty() {
                "-".to_string()
            } else {
                drone.pool.clone()
            },
            controller_of(&drone.node),
            format!("{}s ago", drone.last_heartbeat_age),
        ]);
    }
    let mut text = format!(
        "{} {cluster}\n{}",
        out.paint(Colour::Bold, "cluster"),
        table(&rows)
    );
    let mut proxies = vec![vec![
        "PROXY".to_string(),
        "CONNECTED".to_string(),
        "CONTROLLER".to_string(),
        "VERSION".to_string(),
    ]];
    for proxy in &state.proxies {
        proxies.push(vec![
            proxy.name.name().to_string(),
            yes_no(proxy.connected).to_string(),
            controller_of(proxy),
            proxy.plane_version.clone(),
        ]);
    }
    text.push('\n');
    text.push_str(&table(&proxies));
    if !state.warm_pools.is_empty() {
        text.push('\n');
        text.push_str(&warm_table(&state.warm_pools));
    }
    text
}

fn warm_table(pools: &[WarmPoolState]) -> String {
    let mut rows = vec![vec![
        "WARM POOL".to_string(),
        "IMAGE".to_string(),
        "SIZE".to_string(),
        "IDLE".to_string(),
        "STARTING".to_string(),
    ]];
    for pool in pools {
        rows.push(vec![
            if pool.pool.is_default() {
                "-".to_string()
            } else {
                pool.pool.to_string()
            },
            pool.image.clone(),
            pool.size.to_string(),
            pool.idle.to_string(),
            pool.starting.to_string(),
        ]);
    }
    table(&rows)
}

fn controller_of(node: &NodeState) -> String {
    if node.controller.is_empty() {
        "-".to_string()
    } else {
        node.controller.clone()
    }
}

/// Rows as left-aligned columns two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|row| {
            row.iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}
