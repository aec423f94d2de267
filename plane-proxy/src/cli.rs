//! `plane proxy` command-line options; every flag can also come from a `PLANE_*` variable.

use crate::config::{
    AcmeConfig, ProxyConfig, DEFAULT_BACKEND_CONNECT_TIMEOUT_MS, DEFAULT_BIND_IP,
    DEFAULT_HOLD_TIMEOUT_MS, DEFAULT_HTTP_PORT, DEFAULT_MAX_HELD_REQUESTS,
    DEFAULT_REPORT_INTERVAL_MS, DEFAULT_SHUTDOWN_GRACE_MS, DEFAULT_UPSTREAM_TIMEOUT_MS,
};
use anyhow::Context;
use plane_protocol::names::{ClusterName, NodeName};
use std::net::IpAddr;
use std::path::PathBuf;
use url::Url;

/// Run a proxy: route tokenized URLs of one cluster to their backends.
#[derive(Clone, Debug, clap::Args)]
pub struct ProxyOpts {
    /// Base URL of the controller, http or https, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "PLANE_CONTROLLER_URL")]
    pub controller_url: Url,

    /// A PEM file of CA certificates to trust for an https controller (besides the web's
    /// public roots).
    #[arg(long, env = "PLANE_CONTROLLER_CA")]
    pub controller_ca: Option<PathBuf>,

    /// The cluster to serve, named by the public host[:port] browsers use.
    #[arg(long, env = "PLANE_CLUSTER")]
    pub cluster: ClusterName,

    /// This proxy's name within the cluster [default: random px-…].
    #[arg(long, env = "PLANE_NAME")]
    pub name: Option<NodeName>,

    /// TCP port to serve HTTP on.
    #[arg(long, env = "PLANE_HTTP_PORT", default_value_t = DEFAULT_HTTP_PORT)]
    pub http_port: u16,

    /// TCP port to serve HTTPS on (needs --cert-path); plain HTTP then redirects to it.
    #[arg(long, env = "PLANE_HTTPS_PORT")]
    pub https_port: Option<u16>,

    /// PEM file with the certificate chain (leaf first) and private key to serve over
    /// HTTPS; reloaded when it changes.
    #[arg(long, env = "PLANE_CERT_PATH")]
    pub cert_path: Option<PathBuf>,

    /// IP address to listen on.
    #[arg(long, env = "PLANE_BIND_IP", default_value_t = DEFAULT_BIND_IP)]
    pub bind_ip: IpAddr,

    /// How often to report open connections to the controller, in milliseconds.
    #[arg(long, env = "PLANE_REPORT_INTERVAL_MS", default_value_t = DEFAULT_REPORT_INTERVAL_MS)]
    pub report_interval_ms: u64,

    /// How long a request is held waiting for its backend to become ready (or for the
    /// controller to come back) before it gets 504, in milliseconds.
    #[arg(long, env = "PLANE_HOLD_TIMEOUT_MS", default_value_t = DEFAULT_HOLD_TIMEOUT_MS)]
    pub hold_timeout_ms: u64,

    /// How many requests may be held at once; more get 503 with Retry-After.
    #[arg(long, env = "PLANE_MAX_HELD_REQUESTS", default_value_t = DEFAULT_MAX_HELD_REQUESTS)]
    pub max_held_requests: usize,

    /// How long in-flight requests may finish after shutdown begins, in milliseconds.
    #[arg(long, env = "PLANE_SHUTDOWN_GRACE_MS", default_value_t = DEFAULT_SHUTDOWN_GRACE_MS)]
    pub shutdown_grace_ms: u64,

    /// How long to wait for a backend to accept a connection, in milliseconds.
    #[arg(
        long,
        env = "PLANE_BACKEND_CONNECT_TIMEOUT_MS",
        default_value_t = DEFAULT_BACKEND_CONNECT_TIMEOUT_MS
    )]
    pub backend_connect_timeout_ms: u64,

    /// How long a backend may take to start answering a request before it gets 504, in
    /// milliseconds (bodies and WebSockets under way are not limited).
    #[arg(long, env = "PLANE_UPSTREAM_TIMEOUT_MS", default_value_t = DEFAULT_UPSTREAM_TIMEOUT_MS)]
    pub upstream_timeout_ms: u64,

    /// Serve Prometheus metrics at /metrics on this port of --bind-ip [default: off].
    #[arg(long, env = "PLANE_METRICS_PORT")]
    pub metrics_port: Option<u16>,

    /// The controller's cluster secret (its --cluster-secret), when it requires one. The
    /// controller's bearer token, if any, goes in the URL: `http://TOKEN@host:port`.
    #[arg(long, env = "PLANE_CLUSTER_SECRET")]
    pub cluster_secret: Option<String>,

    /// Obtain and renew the certificate at --cert-path from this ACME directory URL, by
    /// DNS-01 through the controller and `plane dns`.
    #[arg(long, env = "PLANE_ACME_ENDPOINT")]
    pub acme_endpoint: Option<Url>,

    /// External account binding key ID, for CAs that require one.
    #[arg(long, env = "PLANE_ACME_EAB_KID", requires = "acme_endpoint")]
    pub acme_eab_kid: Option<String>,

    /// External account binding HMAC key (base64url), with --acme-eab-kid.
    #[arg(long, env = "PLANE_ACME_EAB_HMAC_KEY", requires = "acme_endpoint")]
    pub acme_eab_hmac_key: Option<String>,

    /// Contact email for the ACME account.
    #[arg(long, env = "PLANE_ACME_MAILTO", requires = "acme_endpoint")]
    pub acme_mailto: Option<String>,

    /// PEM file with the CA certificate to trust for the ACME endpoint's HTTPS (private or
    /// test CAs).
    #[arg(long, env = "PLANE_ACME_ROOT_CA", requires = "acme_endpoint")]
    pub acme_root_ca: Option<PathBuf>,

    /// Renew this many seconds before expiry [default: when a third of the lifetime is left].
    #[arg(
        long,
        env = "PLANE_ACME_RENEW_BEFORE_SECONDS",
        requires = "acme_endpoint"
    )]
    pub acme_renew_before_seconds: Option<u64>,

    /// DNS server (IP:port) to check challenge values are visible on before validation
    /// [default: the system's resolvers].
    #[arg(long, env = "PLANE_ACME_DNS_RESOLVER", requires = "acme_endpoint")]
    pub acme_dns_resolver: Option<std::net::SocketAddr>,
}

impl ProxyOpts {
    pub fn into_config(self) -> anyhow::Result<ProxyConfig> {
        let mut config = ProxyConfig::new(self.controller_url, self.cluster);
        if let Some(name) = self.name {
            config.name = name;
        }
        config.http_port = self.http_port;
        config.https_port = self.https_port;
        config.cert_path = self.cert_path;
        config.bind_ip = self.bind_ip;
        config.report_interval_ms = self.report_interval_ms;
        config.hold_timeout_ms = self.hold_timeout_ms;
        config.max_held_requests = self.max_held_requests;
        config.shutdown_grace_ms = self.shutdown_grace_ms;
        config.backend_connect_timeout_ms = self.backend_connect_timeout_ms;
        config.upstream_timeout_ms = self.upstream_timeout_ms;
        config.metrics_port = self.metrics_port;
        config.cluster_secret = self.cluster_secret;
        config.controller_ca = self.controller_ca;
        config.acme = self.acme_endpoint.map(|endpoint| AcmeConfig {
            eab_kid: self.acme_eab_kid,
            eab_hmac_key: self.acme_eab_hmac_key,
            mailto: self.acme_mailto,
            root_ca: self.acme_root_ca,
            renew_before_seconds: self.acme_renew_before_seconds,
            dns_resolver: self.acme_dns_resolver,
            ..AcmeConfig::new(endpoint)
        });
        config.validate().context("invalid proxy options")?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: ProxyOpts,
    }

    fn parse(args: &[&str]) -> anyhow::Result<ProxyConfig> {
        let base = ["plane-proxy"];
        let cli = Cli::try_parse_from(base.iter().chain(args))?;
        cli.opts.into_config()
    }

    #[test]
    fn flags_become_config() {
        let config = parse(&[
            "--controller-url",
            "http://127.0.0.1:8080",
            "--cluster",
            "localhost:9090",
            "--name",
            "px-one",
            "--http-port",
            "9191",
            "--bind-ip",
            "127.0.0.1",
            "--report-interval-ms",
            "250",
        ])
        .expect("valid flags");
        assert_eq!(config.name.as_str(), "px-one");
        assert_eq!(config.http_port, 9191);
        assert_eq!(config.bind_ip.to_string(), "127.0.0.1");
        assert_eq!(config.report_interval_ms, 250);
        assert_eq!(config.hold_timeout_ms, DEFAULT_HOLD_TIMEOUT_MS);
        assert_eq!(config.max_held_requests, DEFAULT_MAX_HELD_REQUESTS);
    }

    #[test]
    fn invalid_values_are_refused() {
        let bad_cluster = parse(&[
            "--controller-url",
            "http://127.0.0.1:8080",
            "--cluster",
            "not a host",
        ]);
        assert!(bad_cluster.is_err());
        let zero_interval = parse(&[
            "--controller-url",
            "http://127.0.0.1:8080",
            "--cluster",
            "localhost:9090",
            "--report-interval-ms",
            "0",
        ]);
        assert!(zero_interval.is_err());
    }

    #[test]
    fn acme_flags_become_config_and_bad_ones_are_named() {
        let base = [
            "--controller-url",
            "http://127.0.0.1:8080",
            "--cluster",
            "plane.example.com",
            "--https-port",
            "9443",
            "--cert-path",
            "/var/lib/plane/cert.pem",
            "--acme-endpoint",
            "https://acme.example/dir",
        ];
        let with = |extra: &[&str]| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            parse(&args)
        };
        let config = with(&[
            "--acme-eab-kid",
            "kid-1",
            "--acme-eab-hmac-key",
            "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W",
            "--acme-mailto",
            "ops@example.com",
            "--acme-renew-before-seconds",
            "86400",
        ])
        .expect("valid acme flags");
        let acme = config.acme.expect("acme");
        assert_eq!(acme.endpoint.as_str(), "https://acme.example/dir");
        assert_eq!(acme.renew_before_seconds, Some(86_400));
        assert!(acme.eab().expect("eab").is_some());

        let error = |extra: &[&str]| format!("{:#}", with(extra).expect_err("refused"));
        assert!(error(&["--acme-eab-kid", "kid-1"])
            .contains("--acme-eab-kid and --acme-eab-hmac-key go together"));
        assert!(
            error(&["--acme-eab-kid", "k", "--acme-eab-hmac-key", "not base64!"])
                .contains("--acme-eab-hmac-key")
        );
        assert!(error(&["--acme-mailto", "mailto:ops@example.com"]).contains("--acme-mailto"));
        assert!(
            error(&["--acme-renew-before-seconds", "0"]).contains("--acme-renew-before-seconds")
        );

        let http_endpoint = parse(&[
            "--controller-url",
            "http://127.0.0.1:8080",
            "--cluster",
            "plane.example.com",
            "--https-port",
            "9443",
            "--cert-path",
            "/c.pem",
            "--acme-endpoint",
            "http://acme.example/dir",
        ]);
        assert!(format!("{:#}", http_endpoint.expect_err("http")).contains("must be an https URL"));
        let no_https = parse(&[
            "--controller-url",
            "http://127.0.0.1:8080",
            "--cluster",
            "plane.example.com",
            "--acme-endpoint",
            "https://acme.example/dir",
        ]);
        assert!(format!("{:#}", no_https.expect_err("no https"))
            .contains("--acme-endpoint needs --https-port"));
        let without_endpoint = parse(&[
            "--controller-url",
            "http://127.0.0.1:8080",
            "--cluster",
            "plane.example.com",
            "--acme-mailto",
            "ops@example.com",
        ]);
        assert!(without_endpoint.is_err());
    }
}
