//! The proxies connected to this controller right now, so route removals can be pushed to
//! them. (Drones need no such list: their actions reach them through the change bus, and
//! which drones are connected anywhere is in the database.)

use dashmap::DashMap;
use plane_protocol::names::{ClusterName, NodeName};
use plane_protocol::proxy::MessageToProxy;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

type NodeKey = (ClusterName, NodeName);

struct Connection {
    /// Distinguishes a reconnect from the connection it replaced.
    connection_id: u64,
    sender: mpsc::UnboundedSender<MessageToProxy>,
}

/// Cheap to clone; shared by every proxy session and the change bus.
#[derive(Clone, Default)]
pub struct ConnectedNodes {
    proxies: Arc<DashMap<NodeKey, Connection>>,
    next_connection_id: Arc<AtomicU64>,
}

/// Unregisters its proxy when dropped (at the end of the socket session), unless a newer
/// connection of the same proxy has replaced it.
pub struct Registration {
    nodes: ConnectedNodes,
    key: NodeKey,
    connection_id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let id = self.connection_id;
        self.nodes
            .proxies
            .remove_if(&self.key, |_, conn| conn.connection_id == id);
    }
}

impl ConnectedNodes {
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
                sender,
            },
        );
        Registration {
            nodes: self.clone(),
            key,
            connection_id,
        }
    }

    pub fn broadcast_to_proxies(&self, cluster: &ClusterName, message: MessageToProxy) {
        for entry in self.proxies.iter() {
            if &entry.key().0 == cluster {
                let _ = entry.sender.send(message.clone());
            }
        }
    }
}
