//! The proxy's configuration: a plain serde struct, filled from the command line by `cli.rs`
//! or built directly by `plane dev` and tests.

use plane_protocol::names::{ClusterName, NodeName};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use url::Url;

/// Port the proxy serves HTTP on unless told otherwise.
pub const DEFAULT_HTTP_PORT: u16 = 9090;
/// Listen on every interface: a proxy is the component browsers reach, so in production it
/// must be reachable from outside the machine. `plane dev` and tests pass 127.0.0.1.
pub const DEFAULT_BIND_IP: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
pub const DEFAULT_REPORT_INTERVAL_MS: u64 = 5_000;
pub const DEFAULT_HOLD_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_MAX_HELD_REQUESTS: usize = 10_000;
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;
pub const DEFAULT_BACKEND_CONNECT_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_UPSTREAM_TIMEOUT_MS: u64 = 60_000;
/// The longest wait between attempts to reach the controller.
const CONTROLLER_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Everything a proxy needs to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Base URL of the controller, `http` or `https`, e.g. `http://127.0.0.1:8080/`. The
    /// proxy socket is `<this URL with scheme ws or wss>/ctrl/c/<cluster>/proxy-socket`.
    pub controller_url: Url,
    /// A PEM file of CA certificates to trust for an `https` controller, besides the web's
    /// public roots.
    #[serde(default)]
    pub controller_ca: Option<PathBuf>,
    /// The cluster this proxy serves, named by the public host[:port] browsers use.
    pub cluster: ClusterName,
    /// This proxy's name within the cluster, sent in its hello. Random (`px-…`) by default.
    #[serde(default = "random_name")]
    pub name: NodeName,
    /// TCP port to serve plain HTTP on. Default 9090.
    #[serde(default = "default_http_port")]
    pub http_port: u16,
    /// TCP port to serve HTTPS on (with `cert_path`); plain HTTP then redirects there.
    #[serde(default)]
    pub https_port: Option<u16>,
    /// PEM file with the certificate chain (leaf first) and its private key, served over
    /// HTTPS and reloaded when the file changes.
    #[serde(default)]
    pub cert_path: Option<PathBuf>,
    /// IP address to listen on. Default 0.0.0.0 (every interface).
    #[serde(default = "default_bind_ip")]
    pub bind_ip: IpAddr,
    /// How often, in milliseconds, the proxy tells the controller which backends had open
    /// connections or traffic (keeps them from being reaped as idle). Default 5000.
    #[serde(default = "default_report_interval_ms")]
    pub report_interval_ms: u64,
    /// How long, in milliseconds, a request (or WebSocket) is held waiting for its token's
    /// backend to become ready, and for a lost controller connection to come back, before
    /// it is answered 504. Default 30000.
    #[serde(default = "default_hold_timeout_ms")]
    pub hold_timeout_ms: u64,
    /// How many requests may be held at once, waiting for their routes; more are answered
    /// 503 with `Retry-After`. Each holds its client connection (a few KiB). Default 10000.
    #[serde(default = "default_max_held_requests")]
    pub max_held_requests: usize,
    /// The cluster secret the controller requires of nodes (its `--cluster-secret`).
    #[serde(default)]
    pub cluster_secret: Option<String>,
    /// On shutdown, how long, in milliseconds, in-flight requests and open WebSockets may
    /// continue after the listener closes before they are cut. Default 10000.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// How long, in milliseconds, to wait for a backend to accept a TCP connection before
    /// answering 502. Default 10000.
    #[serde(default = "default_backend_connect_timeout_ms")]
    pub backend_connect_timeout_ms: u64,
    /// How long, in milliseconds, a backend may take to start answering a request (its
    /// response head) before the proxy answers 504: a frozen backend never leaves a request
    /// hanging. Bodies and WebSockets, once under way, are not limited. Default 60000.
    #[serde(default = "default_upstream_timeout_ms")]
    pub upstream_timeout_ms: u64,
    /// Obtain (and renew) the certificate at `cert_path` from an ACME CA by DNS-01.
    #[serde(default)]
    pub acme: Option<AcmeConfig>,
    /// Where the proxy registers its metrics (`plane dev` shares one with its other
    /// components).
    #[serde(skip)]
    pub metrics: plane_metrics::MetricsRegistry,
    /// Serve Prometheus metrics at /metrics on this port of `bind_ip` (off when `None`).
    #[serde(default)]
    pub metrics_port: Option<u16>,
}

/// Getting the cluster's certificate from an ACME CA by DNS-01 (`--acme-*`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The CA's ACME directory URL (https).
    pub endpoint: Url,
    /// External account binding: the key ID the CA gave.
    #[serde(default)]
    pub eab_kid: Option<String>,
    /// External account binding: the HMAC key the CA gave, base64url.
    #[serde(default)]
    pub eab_hmac_key: Option<String>,
    /// A contact address for the account (without `mailto:`).
    #[serde(default)]
    pub mailto: Option<String>,
    /// A PEM file with the CA certificate to trust for the ACME endpoint's own HTTPS (for
    /// private or test CAs), instead of the platform's roots.
    #[serde(default)]
    pub root_ca: Option<PathBuf>,
    /// Renew this many seconds before the certificate expires. Default: when a third of
    /// its lifetime is left.
    #[serde(default)]
    pub renew_before_seconds: Option<u64>,
    /// The DNS server (IP:port) asked whether the challenge values are visible before the
    /// CA is asked to validate. Default: the system's resolvers.
    #[serde(default)]
    pub dns_resolver: Option<SocketAddr>,
    /// A certificate obtained is not renewed sooner than this, in milliseconds, whatever
    /// the renewal window says. Default 60000.
    #[serde(default = "default_min_renewal_interval_ms")]
    pub min_renewal_interval_ms: u64,
}

pub const DEFAULT_MIN_RENEWAL_INTERVAL_MS: u64 = 60_000;

fn default_min_renewal_interval_ms() -> u64 {
    DEFAULT_MIN_RENEWAL_INTERVAL_MS
}

impl AcmeConfig {
    pub fn new(endpoint: Url) -> Self {
        Self {
            endpoint,
            eab_kid: None,
            eab_hmac_key: None,
            mailto: None,
            root_ca: None,
            renew_before_seconds: None,
            dns_resolver: None,
            min_renewal_interval_ms: DEFAULT_MIN_RENEWAL_INTERVAL_MS,
        }
    }

    /// The external account binding key ID and decoded HMAC key, if one was given.
    pub fn eab(&self) -> Result<Option<(String, Vec<u8>)>, ConfigError> {
        use base64::Engine;
        match (&self.eab_kid, &self.eab_hmac_key) {
            (None, None) => Ok(None),
            (Some(kid), Some(key)) => {
                let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(key.trim_end_matches('='))
                    .map_err(|err| {
                        ConfigError::Acme(format!("--acme-eab-hmac-key is not base64url: {err}"))
                    })?;
                if kid.is_empty() || key.is_empty() {
                    return Err(ConfigError::Acme(
                        "--acme-eab-kid and --acme-eab-hmac-key may not be empty".to_string(),
                    ));
                }
                Ok(Some((kid.clone(), key)))
            }
            _ => Err(ConfigError::Acme(
                "--acme-eab-kid and --acme-eab-hmac-key go together: give both or neither"
                    .to_string(),
            )),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.endpoint.scheme() != "https" {
            return Err(ConfigError::Acme(format!(
                "--acme-endpoint {}: must be an https URL (ACME servers only speak HTTPS)",
                self.endpoint
            )));
        }
        self.eab()?;
        if let Some(mailto) = &self.mailto {
            if !mailto.contains('@') || mailto.starts_with("mailto:") || mailto.contains(',') {
                return Err(ConfigError::Acme(format!(
                    "--acme-mailto {mailto}: give one address, like ops@example.com"
                )));
            }
        }
        if self.renew_before_seconds == Some(0) {
            return Err(ConfigError::ZeroDuration("--acme-renew-before-seconds"));
        }
        if self.min_renewal_interval_ms == 0 {
            return Err(ConfigError::ZeroDuration("min_renewal_interval_ms"));
        }
        Ok(())
    }
}

fn random_name() -> NodeName {
    NodeName::new_random("px")
}
fn default_http_port() -> u16 {
    DEFAULT_HTTP_PORT
}
fn default_bind_ip() -> IpAddr {
    DEFAULT_BIND_IP
}
fn default_report_interval_ms() -> u64 {
    DEFAULT_REPORT_INTERVAL_MS
}
fn default_hold_timeout_ms() -> u64 {
    DEFAULT_HOLD_TIMEOUT_MS
}
fn default_max_held_requests() -> usize {
    DEFAULT_MAX_HELD_REQUESTS
}
fn default_shutdown_grace_ms() -> u64 {
    DEFAULT_SHUTDOWN_GRACE_MS
}
fn default_upstream_timeout_ms() -> u64 {
    DEFAULT_UPSTREAM_TIMEOUT_MS
}

fn default_backend_connect_timeout_ms() -> u64 {
    DEFAULT_BACKEND_CONNECT_TIMEOUT_MS
}

/// Why a [`ProxyConfig`] cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{0}")]
    ControllerUrl(String),
    #[error("{0} must be greater than zero")]
    ZeroDuration(&'static str),
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    #[error("--https-port and --cert-path go together: give both or neither")]
    HttpsNeedsCert,
    #[error("--acme-endpoint needs --https-port and --cert-path (where the certificate is kept)")]
    AcmeNeedsHttps,
    #[error("{0}")]
    Acme(String),
}

impl ProxyConfig {
    /// A configuration with every optional field at its default and a random name.
    pub fn new(controller_url: Url, cluster: ClusterName) -> Self {
        Self {
            controller_url,
            controller_ca: None,
            cluster,
            name: random_name(),
            http_port: DEFAULT_HTTP_PORT,
            https_port: None,
            cert_path: None,
            bind_ip: DEFAULT_BIND_IP,
            report_interval_ms: DEFAULT_REPORT_INTERVAL_MS,
            hold_timeout_ms: DEFAULT_HOLD_TIMEOUT_MS,
            max_held_requests: DEFAULT_MAX_HELD_REQUESTS,
            cluster_secret: None,
            shutdown_grace_ms: DEFAULT_SHUTDOWN_GRACE_MS,
            backend_connect_timeout_ms: DEFAULT_BACKEND_CONNECT_TIMEOUT_MS,
            upstream_timeout_ms: DEFAULT_UPSTREAM_TIMEOUT_MS,
            acme: None,
            metrics: Default::default(),
            metrics_port: None,
        }
    }

    /// Checks what serde cannot: the controller URL's scheme and non-zero intervals.
    pub fn validate(&self) -> Result<(), ConfigError> {
        plane_link::socket_url(&self.controller_url, &self.socket_kind())
            .map_err(|err| ConfigError::ControllerUrl(err.to_string()))?;
        for (name, value) in [
            ("report_interval_ms", self.report_interval_ms),
            ("hold_timeout_ms", self.hold_timeout_ms),
            (
                "backend_connect_timeout_ms",
                self.backend_connect_timeout_ms,
            ),
            ("upstream_timeout_ms", self.upstream_timeout_ms),
        ] {
            if value == 0 {
                return Err(ConfigError::ZeroDuration(name));
            }
        }
        if self.max_held_requests == 0 {
            return Err(ConfigError::Zero("max_held_requests"));
        }
        if self.https_port.is_some() != self.cert_path.is_some() {
            return Err(ConfigError::HttpsNeedsCert);
        }
        if let Some(acme) = &self.acme {
            if self.https_port.is_none() {
                return Err(ConfigError::AcmeNeedsHttps);
            }
            acme.validate()?;
        }
        Ok(())
    }

    fn socket_kind(&self) -> plane_link::SocketKind {
        plane_link::SocketKind::Proxy(self.cluster.clone())
    }

    /// How the proxy links to its controller.
    pub fn link_config(&self) -> plane_link::LinkConfig {
        plane_link::LinkConfig {
            controller: self.controller_url.clone(),
            kind: self.socket_kind(),
            cluster_secret: self.cluster_secret.clone(),
            ca_file: self.controller_ca.clone(),
            max_backoff: CONTROLLER_MAX_BACKOFF,
        }
    }

    pub fn report_interval(&self) -> Duration {
        Duration::from_millis(self.report_interval_ms)
    }

    pub fn hold_timeout(&self) -> Duration {
        Duration::from_millis(self.hold_timeout_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    pub fn backend_connect_timeout(&self) -> Duration {
        Duration::from_millis(self.backend_connect_timeout_ms)
    }

    pub fn upstream_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> ProxyConfig {
        ProxyConfig::new(
            url.parse().expect("test URL"),
            "localhost:9090".parse().expect("test cluster"),
        )
    }

    #[test]
    fn http_and_https_controllers_are_accepted_and_others_named() {
        assert_eq!(config("http://127.0.0.1:8080").validate(), Ok(()));
        assert_eq!(config("https://ctl.example/plane/").validate(), Ok(()));
        let Err(ConfigError::ControllerUrl(message)) = config("ftp://ctl.example").validate()
        else {
            panic!("ftp is refused");
        };
        assert!(message.contains("ftp"), "{message}");
    }

    #[test]
    fn https_port_and_cert_path_go_together() {
        let mut half = config("http://127.0.0.1:8080");
        half.https_port = Some(9443);
        assert_eq!(half.validate(), Err(ConfigError::HttpsNeedsCert));
        half.cert_path = Some(PathBuf::from("/etc/plane/cert.pem"));
        assert_eq!(half.validate(), Ok(()));
    }

    #[test]
    fn serde_fills_defaults() {
        let parsed: ProxyConfig = serde_json::from_str(
            r#"{"controller_url": "http://127.0.0.1:8080/", "cluster": "localhost:9090"}"#,
        )
        .expect("minimal config parses");
        assert_eq!(parsed.http_port, DEFAULT_HTTP_PORT);
        assert_eq!(parsed.report_interval_ms, DEFAULT_REPORT_INTERVAL_MS);
        assert!(parsed.name.as_str().starts_with("px-"));
        assert_eq!(parsed.validate(), Ok(()));
    }
}
