//! Messages on the DNS server's socket (`/ctrl/dns-socket`), both directions.

use crate::names::{ClusterName, NodeName};
use serde::{Deserialize, Serialize};

/// DNS server → controller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MessageFromDns {
    /// First message on every connection.
    Hello {
        name: NodeName,
        /// The zone the server answers for (`--zone`); DNS servers are named per zone.
        zone: ClusterName,
        version: String,
        /// The commit the server was built from.
        #[serde(default)]
        hash: String,
        /// This server process (see [`crate::names::new_instance_id`]).
        #[serde(default)]
        instance: String,
    },
    /// What TXT values does the controller hold for `cluster`'s ACME DNS-01 challenge?
    TxtRecordRequest { cluster: ClusterName },
}

/// Controller → DNS server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MessageToDns {
    TxtRecordResponse {
        cluster: ClusterName,
        /// Whether the controller knows the cluster (it has or had drones or proxies): a
        /// query for one it does not know is refused.
        known: bool,
        /// Every unexpired value published for the cluster, oldest first.
        values: Vec<String>,
    },
    /// The server may not use this socket (its name is taken, say); the reason says why.
    Refused { reason: String },
}
