//! `plane connect`: ask a controller for the backend of a key, print where it is, and
//! follow its status stream until it is ready.

use anyhow::{bail, Context};
use clap::Args;
use futures_util::StreamExt;
use plane_protocol::api::{
    ApiError, ConnectRequest, ConnectResponse, ExecutorConfig, KeyConfig, PullPolicy, SpawnConfig,
};
use plane_protocol::backend::{BackendStatus, BackendStatusStreamEntry};
use plane_protocol::names::ClusterName;
use std::collections::BTreeMap;
use url::Url;

#[derive(Args, Debug, Clone)]
pub struct ConnectOpts {
    /// Base URL of the controller; `http://TOKEN@host:port` sends TOKEN as its bearer token.
    #[arg(
        long,
        env = "PLANE_CONTROLLER_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub controller: Url,
    /// Key of the backend (reused if a backend already holds it).
    #[arg(long)]
    pub key: Option<String>,
    /// Namespace of the key.
    #[arg(long, default_value = "")]
    pub namespace: String,
    /// Tag of the key.
    #[arg(long, default_value = "")]
    pub tag: String,
    /// Image to run if a backend must be started.
    #[arg(long)]
    pub image: Option<String>,
    /// Cluster to run in (the controller's default if omitted).
    #[arg(long)]
    pub cluster: Option<ClusterName>,
    /// When to pull the image.
    #[arg(long, value_parser = parse_pull_policy)]
    pub pull_policy: Option<PullPolicy>,
    /// Extra environment variable for the backend, NAME=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Reap the backend after this many seconds without connections.
    #[arg(long)]
    pub max_idle_seconds: Option<i64>,
    /// Terminate the backend this many seconds after it starts.
    #[arg(long)]
    pub lifetime_limit_seconds: Option<i64>,
    /// User the token is issued for.
    #[arg(long)]
    pub user: Option<String>,
    /// Print the response and exit without following the status.
    #[arg(long)]
    pub no_follow: bool,
}

fn parse_pull_policy(value: &str) -> Result<PullPolicy, String> {
    match value {
        "IfNotPresent" => Ok(PullPolicy::IfNotPresent),
        "Always" => Ok(PullPolicy::Always),
        "Never" => Ok(PullPolicy::Never),
        other => Err(format!(
            "{other:?} is not one of IfNotPresent, Always, Never"
        )),
    }
}

fn parse_env(value: &str) -> Result<(String, String), String> {
    value
        .split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{value:?} is not NAME=VALUE"))
}

pub async fn run(opts: ConnectOpts) -> anyhow::Result<()> {
    if opts.key.is_none() && opts.image.is_none() {
        bail!("give --key, --image, or both");
    }
    let request = ConnectRequest {
        key: opts.key.clone().map(|name| KeyConfig {
            name,
            namespace: opts.namespace.clone(),
            tag: opts.tag.clone(),
        }),
        spawn_config: opts.image.clone().map(|image| SpawnConfig {
            id: None,
            cluster: opts.cluster.clone(),
            pool: None,
            executable: ExecutorConfig {
                image,
                pull_policy: opts.pull_policy,
                credentials: None,
                env: opts.env.iter().cloned().collect::<BTreeMap<_, _>>(),
                resource_limits: Default::default(),
                mount: None,
                network_name: None,
            },
            lifetime_limit_seconds: opts.lifetime_limit_seconds,
            max_idle_seconds: opts.max_idle_seconds,
            use_static_token: false,
            startup_timeout_seconds: None,
            subdomain: None,
        }),
        user: opts.user.clone(),
        ..Default::default()
    };

    let client = reqwest::Client::new();
    // `http://TOKEN@host:port` carries the controller's bearer token, as in Plane's tools.
    let (controller, bearer) = plane_protocol::auth::split_bearer(&opts.controller);
    let endpoint = controller
        .join("ctrl/connect")
        .context("--controller is not a base URL")?;
    let mut post = client.post(endpoint.clone());
    if let Some(token) = &bearer {
        post = post.bearer_auth(token);
    }
    let response = post
        .json(&request)
        .send()
        .await
        .with_context(|| format!("--controller {controller}: cannot reach {endpoint}"))?;
    if !response.status().is_success() {
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        match serde_json::from_str::<ApiError>(&text) {
            Ok(error) => bail!(
                "the controller refused ({status}, {:?}): {}",
                error.kind,
                error.message
            ),
            Err(_) => bail!("the controller answered {status}: {text}"),
        }
    }
    let connected: ConnectResponse = response
        .json()
        .await
        .context("reading the connect response")?;
    println!(
        "backend:    {}{}",
        connected.backend_id,
        if connected.spawned {
            " (new)"
        } else {
            " (already running)"
        }
    );
    println!("url:        {}", connected.url);
    println!("status url: {}", connected.status_url);
    if let Some(drone) = &connected.drone {
        println!("drone:      {drone}");
    }
    if opts.no_follow {
        return Ok(());
    }
    follow_status(&client, &connected).await
}

/// Prints each status from the backend's status stream until it is ready (success) or
/// terminated (failure).
async fn follow_status(
    client: &reqwest::Client,
    connected: &ConnectResponse,
) -> anyhow::Result<()> {
    let url = format!("{}-stream", connected.status_url);
    let response = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("opening {url}"))?
        .error_for_status()
        .with_context(|| format!("opening {url}"))?;
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    while let Some(chunk) = body.next().await {
        buffer.push_str(&String::from_utf8_lossy(
            &chunk.context("reading the status stream")?,
        ));
        while let Some(end) = buffer.find('\n') {
            let line = buffer[..end].trim_end_matches('\r').to_string();
            buffer.drain(..=end);
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            let entry: BackendStatusStreamEntry =
                serde_json::from_str(data.trim()).context("reading a status entry")?;
            print_entry(&entry);
            match entry.status {
                BackendStatus::Ready => {
                    println!("ready: open {}", connected.url);
                    return Ok(());
                }
                BackendStatus::Terminated => bail!("the backend terminated before it was ready"),
                _ => {}
            }
        }
    }
    bail!("the status stream ended before the backend was ready")
}

fn print_entry(entry: &BackendStatusStreamEntry) {
    let mut line = format!("status:     {}", entry.status);
    if let Some(reason) = entry.termination_reason {
        line.push_str(&format!(" (reason: {})", reason.as_str()));
    }
    if let Some(code) = entry.exit_code {
        line.push_str(&format!(" (exit code {code})"));
    }
    if let Some(message) = &entry.message {
        line.push_str(&format!(": {message}"));
    }
    println!("{line}");
}
