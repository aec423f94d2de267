//! The nodes connected to this controller right now: proxies, so route removals can be pushed
//! to them, and drones, for requests that are not backend actions (prepulls, logs). Backend actions
//! reach drones through the change bus, and which drones are connected anywhere is in the
//! database.

use dashmap::DashMap;
use plane_protocol::api::BackendLogLine;
use plane_protocol::drone::{LogsOutcome, LogsRequest, MessageToDrone};
use plane_protocol::names::{ClusterName, NodeName};
use plane_protocol::proxy::MessageToProxy;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

type NodeKey = (ClusterName, NodeName);

struct Connection<M> {
    /// Distinguishes a reconnect from the connection it replaced.
    connection_id: u64,
    sender: mpsc::UnboundedSender<M>,
}

type Connections<M> = Arc<DashMap<NodeKey, Connection<M>>>;

/// A drone's answer to a prepull: which drone, and the error if it failed.
pub type PrepullAnswer = (NodeName, Option<String>);

/// Cheap to clone; shared by every node session and the change bus.
#[derive(Clone, Default)]
pub struct ConnectedNodes {
    proxies: Connections<MessageToProxy>,
    drones: Connections<MessageToDrone>,
    next_connection_id: Arc<AtomicU64>,
    /// Prepull requests waiting for drones' answers, by request ID.
    prepulls: Arc<DashMap<u64, mpsc::UnboundedSender<PrepullAnswer>>>,
    /// Log reads relayed from drones, by request ID.
    logs: Arc<DashMap<u64, mpsc::UnboundedSender<LogEvent>>>,
    next_request_id: Arc<AtomicU64>,
}

/// What a drone sent for a log read.
#[derive(Debug)]
pub enum LogEvent {
    Lines(Vec<BackendLogLine>),
    End(LogsOutcome),
}

/// One log read from a drone; dropping it tells the drone to stop.
pub struct LogsRead {
    nodes: ConnectedNodes,
    request_id: u64,
    drone: mpsc::UnboundedSender<MessageToDrone>,
    events: mpsc::UnboundedReceiver<LogEvent>,
}

impl LogsRead {
    /// The drone's next batch or its end; `None` when the drone's session ended first.
    /// Taking a batch lets the drone send another, so at most a few are ever waiting here.
    pub async fn next(&mut self) -> Option<LogEvent> {
        let event = tokio::select! {
            event = self.events.recv() => event?,
            _ = self.drone.closed() => return None,
        };
        if let LogEvent::Lines(_) = &event {
            let _ = self.drone.send(MessageToDrone::LogsNext {
                request_id: self.request_id,
            });
        }
        Some(event)
    }
}

impl Drop for LogsRead {
    fn drop(&mut self) {
        if self.nodes.logs.remove(&self.request_id).is_some() {
            let _ = self.drone.send(MessageToDrone::LogsCancel {
                request_id: self.request_id,
            });
        }
    }
}

/// Unregisters its node when dropped (at the end of the socket session), unless a newer
/// connection of the same node has replaced it.
pub struct Registration<M> {
    connections: Connections<M>,
    key: NodeKey,
    connection_id: u64,
}

impl<M> Drop for Registration<M> {
    fn drop(&mut self) {
        let id = self.connection_id;
        self.connections
            .remove_if(&self.key, |_, conn| conn.connection_id == id);
    }
}

/// A prepull's waiting place; forgotten when dropped.
pub struct PrepullWait {
    nodes: ConnectedNodes,
    pub request_id: u64,
    pub answers: mpsc::UnboundedReceiver<PrepullAnswer>,
}

impl Drop for PrepullWait {
    fn drop(&mut self) {
        self.nodes.prepulls.remove(&self.request_id);
    }
}

fn register<M>(
    connections: &Connections<M>,
    connection_id: u64,
    key: NodeKey,
    sender: mpsc::UnboundedSender<M>,
) -> Registration<M> {
    connections.insert(
        key.clone(),
        Connection {
            connection_id,
            sender,
        },
    );
    Registration {
        connections: connections.clone(),
        key,
        connection_id,
    }
}

impl ConnectedNodes {
    pub fn register_proxy(
        &self,
        cluster: ClusterName,
        name: NodeName,
        sender: mpsc::UnboundedSender<MessageToProxy>,
    ) -> Registration<MessageToProxy> {
        let connection_id = self.next_connection_id.fetch_add(1, Ordering::Relaxed);
        register(&self.proxies, connection_id, (cluster, name), sender)
    }

    pub fn register_drone(
        &self,
        cluster: ClusterName,
        name: NodeName,
        sender: mpsc::UnboundedSender<MessageToDrone>,
    ) -> Registration<MessageToDrone> {
        let connection_id = self.next_connection_id.fetch_add(1, Ordering::Relaxed);
        register(&self.drones, connection_id, (cluster, name), sender)
    }

    /// Asks every drone of `cluster` connected here to pull `image`; returns the wait for
    /// their answers and which drones were asked.
    pub fn start_prepull(
        &self,
        cluster: &ClusterName,
        image: &str,
        credentials: Option<plane_protocol::api::RegistryCredentials>,
    ) -> (PrepullWait, Vec<NodeName>) {
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let (sender, answers) = mpsc::unbounded_channel();
        self.prepulls.insert(request_id, sender);
        let mut asked = Vec::new();
        for entry in self.drones.iter() {
            if &entry.key().0 != cluster {
                continue;
            }
            let message = MessageToDrone::Prepull {
                request_id,
                image: image.to_string(),
                credentials: credentials.clone(),
            };
            if entry.sender.send(message).is_ok() {
                asked.push(entry.key().1.clone());
            }
        }
        let wait = PrepullWait {
            nodes: self.clone(),
            request_id,
            answers,
        };
        (wait, asked)
    }

    /// Asks `drone` for a backend's logs; `None` when that drone is not connected here.
    pub fn start_logs(
        &self,
        cluster: &ClusterName,
        drone: &NodeName,
        request: LogsRequest,
    ) -> Option<LogsRead> {
        let sender = self
            .drones
            .get(&(cluster.clone(), drone.clone()))?
            .sender
            .clone();
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let (events, receiver) = mpsc::unbounded_channel();
        self.logs.insert(request_id, events);
        sender
            .send(MessageToDrone::Logs {
                request_id,
                request,
            })
            .ok()?;
        Some(LogsRead {
            nodes: self.clone(),
            request_id,
            drone: sender,
            events: receiver,
        })
    }

    /// A drone's lines or end for log read `request_id` (ignored once nobody reads it).
    pub fn log_event(&self, request_id: u64, event: LogEvent) {
        let ended = matches!(event, LogEvent::End(_));
        if let Some(reader) = self.logs.get(&request_id) {
            let _ = reader.send(event);
        }
        if ended {
            // The drone has forgotten it; nothing to cancel.
            self.logs.remove(&request_id);
        }
    }

    /// The drones of `cluster` connected to this controller now.
    pub fn drones_connected(&self, cluster: &ClusterName) -> Vec<NodeName> {
        self.drones
            .iter()
            .filter(|entry| &entry.key().0 == cluster)
            .map(|entry| entry.key().1.clone())
            .collect()
    }

    /// A drone's answer to prepull `request_id` (ignored once nobody waits for it).
    pub fn prepull_done(&self, request_id: u64, drone: NodeName, error: Option<String>) {
        if let Some(waiting) = self.prepulls.get(&request_id) {
            let _ = waiting.send((drone, error));
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
