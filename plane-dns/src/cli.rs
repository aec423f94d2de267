//! `plane dns` command-line options; every flag can also come from a `PLANE_*` variable.

use crate::DnsConfig;
use plane_protocol::names::{ClusterName, NodeName};
use std::net::IpAddr;
use std::path::PathBuf;
use url::Url;

/// Run a DNS server answering ACME DNS-01 challenges for the controller's clusters.
#[derive(Clone, Debug, clap::Args)]
pub struct DnsOpts {
    /// Base URL of the controller, http or https, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "PLANE_CONTROLLER_URL")]
    pub controller_url: Url,
    /// A PEM file of CA certificates to trust for an https controller.
    #[arg(long, env = "PLANE_CONTROLLER_CA")]
    pub controller_ca: Option<PathBuf>,
    /// The controller's cluster secret (its --cluster-secret), when it requires one.
    #[arg(long, env = "PLANE_CLUSTER_SECRET")]
    pub cluster_secret: Option<String>,
    /// The zone to answer for: `<cluster>.<ZONE>` and `_acme-challenge.<cluster>` name a
    /// cluster's challenge.
    #[arg(long, env = "PLANE_ZONE")]
    pub zone: ClusterName,
    /// This server's name [default: random dns-…].
    #[arg(long, env = "PLANE_NAME")]
    pub name: Option<NodeName>,
    /// The UDP and TCP port to answer on.
    #[arg(long, env = "PLANE_DNS_PORT", default_value_t = 53)]
    pub port: u16,
    /// The IP address to listen on.
    #[arg(long, env = "PLANE_LISTEN_IP", default_value = "127.0.0.1")]
    pub listen_ip: IpAddr,
    /// Serve Prometheus metrics at /metrics on this TCP port of --listen-ip [default: off].
    #[arg(long, env = "PLANE_METRICS_PORT")]
    pub metrics_port: Option<u16>,
}

impl DnsOpts {
    pub fn into_config(self) -> DnsConfig {
        let mut config = DnsConfig::new(self.controller_url, self.zone);
        config.controller_ca = self.controller_ca;
        config.cluster_secret = self.cluster_secret;
        if let Some(name) = self.name {
            config.name = name;
        }
        config.port = self.port;
        config.listen_ip = self.listen_ip;
        config.metrics_port = self.metrics_port;
        config
    }
}
