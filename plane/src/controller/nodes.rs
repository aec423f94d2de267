//! The drones and proxies connected to this controller right now, and how to reach them.

use dashmap::DashMap;
use plane_protocol::drone::MessageToDrone;
use plane_protocol::names::{ClusterName, NodeName};
use plane_protocol::proxy::MessageToProxy;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

type NodeKey = (ClusterName, NodeName);

struct Connection<M> {
    /// Distinguishes a reconnect from the connection it replaced.
    connection_id: u64,
    pool: String,
    sender: mpsc::UnboundedSender<M>,
}

/// Cheap to clone; shared by every socket session and handler.
#[derive(Clone, Default)]
pub struct ConnectedNodes {
    drones: Arc<DashMap<NodeKey, Connection<MessageToDrone>>>,
    proxies: Arc<DashMap<NodeKey, Connection<MessageToProxy>>>,
    next_connection_id: Arc<AtomicU64>,
}

/// Unregisters its node when dropped (at the end of the socket session), unless a newer
/// connection of the same node has replaced it.
pub struct Registration {
    nodes: ConnectedNodes,
    key: NodeKey,
    connection_id: u64,
    is_drone: bool,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let id = self.connection_id;
        if self.is_drone {
            self.nodes
                .drones
                .remove_if(&self.key, |_, conn| conn.connection_id == id);
        } else {
            self.nodes
                .proxies
                .remove_if(&self.key, |_, conn| conn.connection_id == id);
        }
    }
}

impl ConnectedNodes {
    pub fn register_drone(
        &self,
        cluster: ClusterName,
        name: NodeName,
        pool: String,
        sender: mpsc::UnboundedSender<MessageToDrone>,
    ) -> Registration {
        let connection_id = self.next_connection_id.fetch_add(1, Ordering::Relaxed);
        let key = (cluster, name);
        self.drones.insert(
            key.clone(),
            Connection {
                connection_id,
                pool,
                sender,
            },
        );
        Registration {
            nodes: self.clone(),
            key,
            connection_id,
            is_drone: true,
        }
    }

    pub fn register_proxy(
        &self,
        cluster: ClusterName,
        name: NodeName,
        sender: mpsc::UnboundedSender<MessageToProxy>,
    ) -> Registration {
        let connection_id = self.next_connection_id.fetch_add(1, Ordering::Relaxed);
        let key = (cluster, name);
        self.proxies.insert(
            key.clone(),
            Connection {
                connection_id,
                pool: String::new(),
                sender,
            },
        );
        Registration {
            nodes: self.clone(),
            key,
            connection_id,
            is_drone: false,
        }
    }

    /// Sends to a drone if it is connected. An undelivered action is not lost: it stays
    /// stored until acked and is re-sent when the drone reconnects.
    pub fn send_to_drone(&self, cluster: &ClusterName, drone: &NodeName, message: MessageToDrone) {
        if let Some(conn) = self.drones.get(&(cluster.clone(), drone.clone())) {
            let _ = conn.sender.send(message);
        }
    }

    pub fn broadcast_to_proxies(&self, cluster: &ClusterName, message: MessageToProxy) {
        for entry in self.proxies.iter() {
            if &entry.key().0 == cluster {
                let _ = entry.sender.send(message.clone());
            }
        }
    }

    /// The drones of `cluster` in `pool` that are connected now.
    pub fn connected_drones(&self, cluster: &ClusterName, pool: &str) -> Vec<NodeName> {
        self.drones
            .iter()
            .filter(|entry| &entry.key().0 == cluster && entry.pool == pool)
            .map(|entry| entry.key().1.clone())
            .collect()
    }

    pub fn is_drone_connected(&self, cluster: &ClusterName, name: &NodeName) -> bool {
        self.drones.contains_key(&(cluster.clone(), name.clone()))
    }

    pub fn is_proxy_connected(&self, cluster: &ClusterName, name: &NodeName) -> bool {
        self.proxies.contains_key(&(cluster.clone(), name.clone()))
    }

    /// Picks the connected drone with the fewest live backends.
    pub fn pick_drone(
        &self,
        cluster: &ClusterName,
        pool: &str,
        live_backends: &HashMap<NodeName, u32>,
    ) -> Option<NodeName> {
        self.connected_drones(cluster, pool)
            .into_iter()
            .min_by_key(|name| (live_backends.get(name).copied().unwrap_or(0), name.clone()))
    }
}
