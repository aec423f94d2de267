//! The proxy's configuration: a plain serde struct, filled from the command line by `cli.rs`
//! or built directly by `plane dev` and tests.

use plane_protocol::names::{ClusterName, NodeName};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr};
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

/// Everything a proxy needs to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Base HTTP URL of the controller, e.g. `http://127.0.0.1:8080/`. The proxy socket is
    /// `<this URL with scheme ws>/ctrl/c/<cluster>/proxy-socket`. Only `http` is supported
    /// for now (a `wss` client needs TLS, which comes with the proxy's own TLS work).
    pub controller_url: Url,
    /// The cluster this proxy serves, named by the public host[:port] browsers use.
    pub cluster: ClusterName,
    /// This proxy's name within the cluster, sent in its hello. Random (`px-…`) by default.
    #[serde(default = "random_name")]
    pub name: NodeName,
    /// TCP port to serve plain HTTP on. Default 9090.
    #[serde(default = "default_http_port")]
    pub http_port: u16,
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
fn default_backend_connect_timeout_ms() -> u64 {
    DEFAULT_BACKEND_CONNECT_TIMEOUT_MS
}

/// Why a [`ProxyConfig`] cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("controller URL {0} must use http (https/wss is not supported yet)")]
    UnsupportedControllerScheme(Url),
    #[error("controller URL {0} cannot be a base URL (it has no host)")]
    ControllerUrlNotABase(Url),
    #[error("{0} must be greater than zero")]
    ZeroDuration(&'static str),
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
}

impl ProxyConfig {
    /// A configuration with every optional field at its default and a random name.
    pub fn new(controller_url: Url, cluster: ClusterName) -> Self {
        Self {
            controller_url,
            cluster,
            name: random_name(),
            http_port: DEFAULT_HTTP_PORT,
            bind_ip: DEFAULT_BIND_IP,
            report_interval_ms: DEFAULT_REPORT_INTERVAL_MS,
            hold_timeout_ms: DEFAULT_HOLD_TIMEOUT_MS,
            max_held_requests: DEFAULT_MAX_HELD_REQUESTS,
            cluster_secret: None,
            shutdown_grace_ms: DEFAULT_SHUTDOWN_GRACE_MS,
            backend_connect_timeout_ms: DEFAULT_BACKEND_CONNECT_TIMEOUT_MS,
        }
    }

    /// Checks what serde cannot: the controller URL's scheme and non-zero intervals.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.controller_socket_url().map(|_| ())?;
        for (name, value) in [
            ("report_interval_ms", self.report_interval_ms),
            ("hold_timeout_ms", self.hold_timeout_ms),
            (
                "backend_connect_timeout_ms",
                self.backend_connect_timeout_ms,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::ZeroDuration(name));
            }
        }
        if self.max_held_requests == 0 {
            return Err(ConfigError::Zero("max_held_requests"));
        }
        Ok(())
    }

    /// `ws://…/ctrl/c/<cluster>/proxy-socket`, derived from the controller's base URL so a
    /// path prefix on it (a controller behind a reverse proxy) is kept.
    pub fn controller_socket_url(&self) -> Result<Url, ConfigError> {
        // Credentials go in headers (see `ControllerConnectionConfig::credentials`).
        let (mut url, _) = plane_protocol::auth::split_bearer(&self.controller_url);
        if url.scheme() != "http" {
            return Err(ConfigError::UnsupportedControllerScheme(url));
        }
        if url.set_scheme("ws").is_err() {
            return Err(ConfigError::UnsupportedControllerScheme(url));
        }
        url.set_query(None);
        url.set_fragment(None);
        let cluster = self.cluster.as_str();
        match url.path_segments_mut() {
            Ok(mut segments) => {
                segments
                    .pop_if_empty()
                    .extend(["ctrl", "c", cluster, "proxy-socket"]);
            }
            Err(()) => {
                return Err(ConfigError::ControllerUrlNotABase(
                    self.controller_url.clone(),
                ))
            }
        }
        Ok(url)
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
    fn socket_url_keeps_a_path_prefix() {
        let plain = config("http://127.0.0.1:8080").controller_socket_url();
        assert_eq!(
            plain.map(String::from),
            Ok("ws://127.0.0.1:8080/ctrl/c/localhost:9090/proxy-socket".to_string())
        );
        let prefixed = config("http://ctl.example/plane/?x=1").controller_socket_url();
        assert_eq!(
            prefixed.map(String::from),
            Ok("ws://ctl.example/plane/ctrl/c/localhost:9090/proxy-socket".to_string())
        );
    }

    #[test]
    fn https_controller_is_refused_until_tls_lands() {
        assert!(matches!(
            config("https://ctl.example").validate(),
            Err(ConfigError::UnsupportedControllerScheme(_))
        ));
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
