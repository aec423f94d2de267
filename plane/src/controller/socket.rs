//! What the drone and proxy sockets share: JSON framing (one message per text frame), the
//! timeouts, and who may take a node's name.

use axum::extract::ws::{Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;

/// How long a node has after connecting to introduce itself.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A node that sends nothing (no heartbeat, report or ping) for this long is treated as
/// gone and its session closed, so a half-open connection does not keep it "connected".
/// Drones and proxies send something every few seconds.
pub const SILENCE_TIMEOUT: Duration = Duration::from_secs(30);

/// A node heard from since this time is live: a second process using its name is refused.
pub fn live_since() -> plane_protocol::time::Millis {
    plane_protocol::time::Millis::now().minus_millis(SILENCE_TIMEOUT.as_millis() as u64)
}

/// Why a hello under the name of a live node is refused.
pub fn duplicate_name_reason(kind: &str, name: &plane_protocol::names::NodeName) -> String {
    format!(
        "another {kind} named {name} is connected to this cluster; give each {kind} its own \
         --name (or, for drones, its own --state-dir), or stop the other one (its name is \
         freed once it disconnects, or {} s after it was last heard from)",
        SILENCE_TIMEOUT.as_secs()
    )
}

/// What arrived on a node socket.
pub enum Incoming<T> {
    Message(T),
    /// A frame that is not a valid message; logged and skipped.
    Invalid(String),
    /// A ping or other control frame: a sign of life, nothing to handle.
    Alive,
    /// The socket closed or failed.
    Closed,
}

/// The next frame, decoded.
pub async fn receive<T: DeserializeOwned>(stream: &mut SplitStream<WebSocket>) -> Incoming<T> {
    match stream.next().await {
        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => Incoming::Closed,
        Some(Ok(Message::Text(text))) => match serde_json::from_str(text.as_str()) {
            Ok(message) => Incoming::Message(message),
            Err(err) => Incoming::Invalid(format!("{err}: {}", text.as_str())),
        },
        // Pings are answered by axum; binary frames are not part of the protocol.
        Some(Ok(_)) => Incoming::Alive,
    }
}

/// How long one message may wait for the node to take it. A node that stops reading would
/// otherwise hold its session (and the silence check) forever.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one message; `Err` when the socket failed or the node did not take it in time.
pub async fn send<T: Serialize>(
    sink: &mut SplitSink<WebSocket, Message>,
    message: &T,
) -> Result<(), ()> {
    let text = serde_json::to_string(message).map_err(|_| ())?;
    match tokio::time::timeout(SEND_TIMEOUT, sink.send(Message::Text(text.into()))).await {
        Ok(result) => result.map_err(|_| ()),
        Err(_) => Err(()),
    }
}
