//! The `plane` binary: parses the command line and runs the component asked for.

use clap::{Parser, Subcommand};
use plane::admin::{AdminOpts, ConnectOpts};
use plane::controller::cli::ControllerOpts;
use plane::dev::DevOpts;
use plane::logging::{self, LogFormat};
use plane_dns::cli::DnsOpts;
use plane_drone::cli::DroneOpts;
use plane_proxy::cli::ProxyOpts;
use std::process::ExitCode;

/// jemalloc rather than the system allocator, configured (in `.cargo/config.toml`) to purge
/// freed pages from a background thread after a second: after a burst of connections closes
/// (thousands of WebSockets through a proxy, say) the memory goes back to the kernel, where
/// glibc's and mimalloc's defaults kept it resident (see docs/performance.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "plane",
    version,
    about = "Run one stateful backend per key, on demand."
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "PLANE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (HTTP API, node sockets, sweeper).
    Controller(ControllerOpts),
    /// Run a drone: starts backends as Docker containers on this machine.
    Drone(DroneOpts),
    /// Run a proxy: routes tokenized URLs to backends.
    Proxy(ProxyOpts),
    /// Run a DNS server answering ACME DNS-01 challenges with the controller's values.
    Dns(DnsOpts),
    /// Run controller, drone and proxy in one process on loopback, with an embedded database.
    Dev(DevOpts),
    /// Call a controller's API: connect, spawn, terminate, status, drain, revoke, ...
    Admin(AdminOpts),
    /// Ask a controller for the backend of a key and follow it until it is ready (short for
    /// `plane admin connect`).
    Connect(ConnectOpts),
    /// The demo backend that `plane dev` packages as an image (runs inside the container).
    #[command(hide = true)]
    DemoBackend,
    /// The drone's fence, started by the drone: kills its containers if the drone dies and
    /// their leases run out.
    #[command(hide = true)]
    DroneFence {
        /// The drone's --state-dir.
        #[arg(long)]
        state_dir: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The whole cause chain on one line; no backtrace for an operator's mistake.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if !matches!(cli.command, Command::Connect(_) | Command::Admin(_)) {
        logging::init(cli.log_format);
    }
    match cli.command {
        Command::Controller(opts) => plane::controller::run(opts.into_config()?).await,
        Command::Drone(opts) => plane_drone::run(opts.into_config()?).await,
        Command::Proxy(opts) => plane_proxy::run(opts.into_config()?).await,
        Command::Dns(opts) => plane_dns::run(opts.into_config()).await,
        Command::Dev(opts) => plane::dev::run(opts).await,
        Command::Admin(opts) => plane::admin::run(opts).await,
        Command::Connect(opts) => plane::admin::run_connect(opts).await,
        Command::DemoBackend => plane::demo_backend::run().await,
        Command::DroneFence { state_dir } => plane_drone::fence::run(&state_dir).await,
    }
}
