//! One session loop for every node socket (drones, proxies): the hello within a timeout,
//! registration under a name no live node holds, typed JSON messages both ways (one per text
//! frame, each send bounded), the silence check, shutdown, and the record of the end. What
//! differs per kind of node is a [`NodeHandler`].

use super::store::NodeSession;
use super::ControllerState;
use axum::extract::ws::{Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::marker::PhantomData;
use std::time::Duration;

/// How long a node has after connecting to introduce itself.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A node that sends nothing (no heartbeat, report or ping) for this long is treated as
/// gone and its session closed, so a half-open connection does not keep it "connected".
/// Drones and proxies send something every few seconds.
pub const SILENCE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one message may wait for the node to take it. A node that stops reading would
/// otherwise hold its session (and the silence check) forever.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// The node's socket failed, or the node did not take a message in time: the session is
/// over.
#[derive(Debug)]
pub struct Gone;

/// The sending half of a node's socket, typed.
pub struct NodeSink<Out> {
    sink: SplitSink<WebSocket, Message>,
    _messages: PhantomData<fn(Out)>,
}

impl<Out: Serialize> NodeSink<Out> {
    pub async fn send(&mut self, message: &Out) -> Result<(), Gone> {
        let text = serde_json::to_string(message).map_err(|_| Gone)?;
        match tokio::time::timeout(SEND_TIMEOUT, self.sink.send(Message::Text(text.into()))).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(Gone),
        }
    }
}

/// The receiving half of a node's socket, typed.
pub struct NodeStream<In> {
    stream: SplitStream<WebSocket>,
    _messages: PhantomData<fn() -> In>,
}

/// What arrived on a node socket.
enum Incoming<T> {
    Message(T),
    /// A frame that is not a valid message; logged and skipped.
    Invalid(String),
    /// A ping or other control frame: a sign of life, nothing to handle.
    Alive,
    /// The socket closed or failed.
    Closed,
}

impl<In: DeserializeOwned> NodeStream<In> {
    async fn receive(&mut self) -> Incoming<In> {
        match self.stream.next().await {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => Incoming::Closed,
            Some(Ok(Message::Text(text))) => match serde_json::from_str(text.as_str()) {
                Ok(message) => Incoming::Message(message),
                Err(err) => Incoming::Invalid(format!("{err}: {}", text.as_str())),
            },
            // Pings are answered by axum; binary frames are not part of the protocol.
            Some(Ok(_)) => Incoming::Alive,
        }
    }

    /// The node's first message, if it sends one within [`HELLO_TIMEOUT`].
    pub async fn hello(&mut self) -> Option<In> {
        match tokio::time::timeout(HELLO_TIMEOUT, self.receive()).await {
            Ok(Incoming::Message(message)) => Some(message),
            _ => None,
        }
    }
}

/// Splits a node's socket into its typed halves.
pub fn split<In, Out>(socket: WebSocket) -> (NodeSink<Out>, NodeStream<In>) {
    let (sink, stream) = socket.split();
    (
        NodeSink {
            sink,
            _messages: PhantomData,
        },
        NodeStream {
            stream,
            _messages: PhantomData,
        },
    )
}

/// A node heard from since this time is live: a second process using its name is refused.
pub fn live_since() -> plane_protocol::time::Millis {
    plane_protocol::time::Millis::now().minus_millis(SILENCE_TIMEOUT.as_millis() as u64)
}

/// Records the node connected and returns its session's generation. A live node of the
/// same name is not replaced: the newcomer is sent `refusal(reason)` and `None` returned.
pub async fn register<Out: Serialize>(
    state: &ControllerState,
    session: &NodeSession<'_>,
    sink: &mut NodeSink<Out>,
    refusal: impl FnOnce(String) -> Out,
) -> Option<i64> {
    let (kind, name, cluster) = (session.kind.as_str(), session.name, session.cluster);
    match state.store().node_connected(session, live_since()).await {
        Ok(Some(generation)) => Some(generation),
        Ok(None) => {
            let reason = format!(
                "another {kind} named {name} is connected to this cluster; give each {kind} its own \
                 --name (or, for drones, its own --state-dir), or stop the other one (its name is \
                 freed once it disconnects, or {} s after it was last heard from)",
                SILENCE_TIMEOUT.as_secs()
            );
            tracing::error!(%kind, %name, %cluster, %reason, "refusing node");
            let _ = sink.send(&refusal(reason)).await;
            None
        }
        Err(err) => {
            tracing::error!(%kind, %name, error = %err, "could not record node");
            None
        }
    }
}

/// Whether the session goes on after a message or event.
pub enum Flow {
    Continue,
    /// End the session (the handler has sent what it had to say).
    Close,
}

/// What one kind of node's session does, between its hello and its end.
pub trait NodeHandler: Send {
    type FromNode: DeserializeOwned + Send;
    type ToNode: Serialize + Send + Sync;
    /// Work of the handler's own (an action stored for a drone, a route lookup finished).
    type Event: Send;

    /// Before the first message: catch the node up.
    fn start(
        &mut self,
        sink: &mut NodeSink<Self::ToNode>,
    ) -> impl Future<Output = Result<(), Gone>> + Send;

    /// Waits for the next event; pending forever if there is none to wait for. `None` ends
    /// the session. Must be cancel-safe (it races the socket).
    fn next_event(&mut self) -> impl Future<Output = Option<Self::Event>> + Send;

    fn on_event(
        &mut self,
        event: Self::Event,
        sink: &mut NodeSink<Self::ToNode>,
    ) -> impl Future<Output = Result<Flow, Gone>> + Send;

    fn on_message(
        &mut self,
        message: Self::FromNode,
        sink: &mut NodeSink<Self::ToNode>,
    ) -> impl Future<Output = Result<Flow, Gone>> + Send;

    /// After the loop, before the node is recorded disconnected.
    fn finish(&mut self) -> impl Future<Output = ()> + Send;
}

/// Runs a registered node's session until it leaves, goes quiet for `silence`, its handler
/// ends it, or the controller shuts down; then records it disconnected (unless a newer
/// session of the node has taken over).
pub async fn serve<H: NodeHandler>(
    state: &ControllerState,
    session: &NodeSession<'_>,
    generation: i64,
    silence: Duration,
    handler: &mut H,
    sink: &mut NodeSink<H::ToNode>,
    stream: &mut NodeStream<H::FromNode>,
) {
    let _running = state.node_sessions().token();
    let (kind, name, cluster) = (session.kind.as_str(), session.name, session.cluster);
    tracing::info!(%kind, %name, %cluster, version = session.version, generation, "node connected");
    if handler.start(sink).await.is_ok() {
        // Reset by every frame received; fires when the node has gone quiet.
        let quiet = tokio::time::sleep(silence);
        tokio::pin!(quiet);
        loop {
            let flow = tokio::select! {
                _ = state.shutdown_token().cancelled() => break,
                _ = &mut quiet => {
                    tracing::warn!(%kind, %name, %cluster, "node silent for {silence:?}; closing its socket");
                    break;
                }
                event = handler.next_event() => match event {
                    Some(event) => handler.on_event(event, sink).await,
                    None => break,
                },
                incoming = stream.receive() => {
                    quiet.as_mut().reset(tokio::time::Instant::now() + silence);
                    match incoming {
                        Incoming::Closed => break,
                        Incoming::Alive => Ok(Flow::Continue),
                        Incoming::Invalid(detail) => {
                            tracing::warn!(%kind, %name, %detail, "invalid message from node");
                            Ok(Flow::Continue)
                        }
                        Incoming::Message(message) => handler.on_message(message, sink).await,
                    }
                }
            };
            match flow {
                Ok(Flow::Continue) => {}
                Ok(Flow::Close) | Err(Gone) => break,
            }
        }
    }
    handler.finish().await;
    if let Err(err) = state
        .store()
        .node_disconnected(cluster, session.kind, name, generation)
        .await
    {
        tracing::warn!(%kind, %name, error = %err, "could not record the node's disconnection");
    }
    tracing::info!(%kind, %name, %cluster, "node disconnected");
}
