//! The link every node (drone, proxy, DNS server) keeps to its controller: one WebSocket,
//! typed both ways, opened with the node's credentials, and reopened with backoff whenever it
//! drops, the same way for every kind of node.
//!
//! A node implements [`Session`] (what to do on one open socket) and calls [`run`]:
//!
//! - the socket URL comes from the controller's base URL ([`socket_url`]): `http` becomes
//!   `ws`, `https` becomes `wss`, a path prefix is kept, user-info becomes the bearer token;
//! - TLS (for `https` controllers) trusts the web's public roots and, if given, a CA file;
//! - Nagle's algorithm is off (small frames go at once), connecting is bounded by
//!   [`CONNECT_TIMEOUT`], every send by [`SEND_TIMEOUT`];
//! - reconnects back off from [`INITIAL_BACKOFF`] doubling to the node's maximum, starting
//!   afresh only after a session that stayed up for [`HEALTHY_SESSION`], and waiting the
//!   maximum after a refusal (retrying at once cannot help);
//! - a session treats the controller as gone after [`silence_limit`] without a frame.

mod backoff;
mod tls;

pub use backoff::Backoff;

use futures_util::{SinkExt, StreamExt};
use plane_protocol::auth::NodeCredentials;
use plane_protocol::names::ClusterName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use url::Url;

/// The first wait before reconnecting; doubled after each failure up to the node's maximum.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);

/// A session that stayed up this long was healthy: the next reconnect starts its backoff
/// afresh. One that ended sooner (a hello refused, a controller that drops every session at
/// once) keeps backing off.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(5);

/// Bound on opening the socket (TCP, TLS and the WebSocket handshake), so a black-holed
/// controller address cannot stall reconnection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on writing one frame: a controller that stops reading is treated as gone.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// The least time without a frame after which a session gives the controller up.
pub const MIN_SILENCE: Duration = Duration::from_secs(15);

/// How long a session waits for a frame before giving the controller up: three of the
/// node's own periods (heartbeat, report), and never less than [`MIN_SILENCE`]. TCP alone
/// may not notice a vanished peer for many minutes.
pub fn silence_limit(period: Duration) -> Duration {
    (period * 3).max(MIN_SILENCE)
}

/// Which socket of the controller a node opens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketKind {
    /// `/ctrl/c/<cluster>/drone-socket`
    Drone(ClusterName),
    /// `/ctrl/c/<cluster>/proxy-socket`
    Proxy(ClusterName),
    /// `/ctrl/dns-socket` (a DNS server serves every cluster)
    Dns,
}

impl SocketKind {
    fn segments(&self) -> Vec<&str> {
        match self {
            Self::Drone(cluster) => vec!["ctrl", "c", cluster.as_str(), "drone-socket"],
            Self::Proxy(cluster) => vec!["ctrl", "c", cluster.as_str(), "proxy-socket"],
            Self::Dns => vec!["ctrl", "dns-socket"],
        }
    }

    /// The kind of node, for logs: `drone`, `proxy`, `dns`.
    pub fn node(&self) -> &'static str {
        match self {
            Self::Drone(_) => "drone",
            Self::Proxy(_) => "proxy",
            Self::Dns => "dns",
        }
    }
}

/// Why a controller URL cannot be linked to.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("controller URL {0} has scheme {1:?}; expected http or https")]
    Scheme(Url, String),
    #[error("controller URL {0} cannot have a path")]
    NoPath(Url),
}

/// The socket's URL: the controller's base URL (its path prefix kept) with a WebSocket
/// scheme and the socket's path, without credentials, query or fragment.
pub fn socket_url(controller: &Url, kind: &SocketKind) -> Result<Url, UrlError> {
    let (mut url, _) = plane_protocol::auth::split_bearer(controller);
    let scheme = match controller.scheme() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        other => return Err(UrlError::Scheme(controller.clone(), other.to_string())),
    };
    url.set_scheme(scheme)
        .map_err(|()| UrlError::Scheme(controller.clone(), scheme.to_string()))?;
    url.path_segments_mut()
        .map_err(|()| UrlError::NoPath(controller.clone()))?
        .pop_if_empty()
        .extend(kind.segments());
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

/// Where and how a node links to its controller.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// The controller's base URL; `http://TOKEN@host:port` sends TOKEN as the bearer token.
    pub controller: Url,
    pub kind: SocketKind,
    /// The cluster secret the controller requires of nodes, if it requires one.
    pub cluster_secret: Option<String>,
    /// A PEM file of CA certificates to trust, besides the web's public roots, for an
    /// `https` controller.
    pub ca_file: Option<PathBuf>,
    /// The longest wait between reconnect attempts.
    pub max_backoff: Duration,
}

/// Why a link cannot be set up at all (as opposed to a connection that fails and is retried).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("--controller-ca {path}: {detail}")]
    CaFile { path: PathBuf, detail: String },
    #[error("TLS setup: {0}")]
    Tls(String),
}

impl LinkConfig {
    /// Checks the URL and loads the CA file, as [`run`] will; for a node's startup, so that a
    /// bad flag fails there rather than in the reconnect loop.
    pub fn check(&self) -> Result<(), ConfigError> {
        socket_url(&self.controller, &self.kind)?;
        tls::connector(self.ca_file.as_deref())?;
        Ok(())
    }
}

/// How a session on one socket ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The node is shutting down: close the socket and stop.
    Shutdown,
    /// The socket failed or the controller went quiet: reconnect.
    Lost(LinkError),
    /// The controller refused the node (its hello): reconnect, after the longest backoff.
    Refused(String),
}

impl From<tungstenite::Error> for LinkError {
    fn from(error: tungstenite::Error) -> Self {
        Self::Socket(Box::new(error))
    }
}

impl From<LinkError> for SessionEnd {
    fn from(error: LinkError) -> Self {
        Self::Lost(error)
    }
}

/// What went wrong on an open socket.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("WebSocket error: {0}")]
    Socket(Box<tungstenite::Error>),
    #[error("could not encode a message: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the controller closed the connection{}", .0.as_ref().map(|f| format!(" ({})", f.reason)).unwrap_or_default())]
    Closed(Option<tungstenite::protocol::CloseFrame>),
    #[error("nothing heard from the controller for {0:?}")]
    Silent(Duration),
    #[error("the controller did not take a message within {0:?}")]
    SendTimeout(Duration),
    /// The node's own check of the session failed (e.g. the controller answers pings but
    /// not heartbeats); the message says which.
    #[error("{0}")]
    Unhealthy(String),
}

/// What a node does on one open socket: say hello, then serve until the socket fails, the
/// controller refuses it, or the node shuts down.
pub trait Session<Out, In> {
    fn run(&mut self, link: &mut Link<Out, In>) -> impl Future<Output = SessionEnd> + Send;
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One open socket to the controller: sends `Out`, receives `In`, one JSON message per text
/// frame.
pub struct Link<Out, In> {
    socket: Socket,
    last_heard: Instant,
    _messages: PhantomData<fn(Out) -> In>,
}

impl<Out: Serialize, In: DeserializeOwned> Link<Out, In> {
    fn new(socket: Socket) -> Self {
        Self {
            socket,
            last_heard: Instant::now(),
            _messages: PhantomData,
        }
    }

    /// Sends one message (within [`SEND_TIMEOUT`]).
    pub async fn send(&mut self, message: &Out) -> Result<(), LinkError> {
        let text = serde_json::to_string(message)?;
        self.send_frame(Message::text(text)).await
    }

    /// Sends a ping; the controller's pong counts as a sign of life.
    pub async fn ping(&mut self) -> Result<(), LinkError> {
        self.send_frame(Message::Ping(Default::default())).await
    }

    async fn send_frame(&mut self, frame: Message) -> Result<(), LinkError> {
        match tokio::time::timeout(SEND_TIMEOUT, self.socket.send(frame)).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(LinkError::SendTimeout(SEND_TIMEOUT)),
        }
    }

    /// The next message. Control frames count as signs of life and are not returned;
    /// a frame that is not a message this node knows is logged and skipped (a newer
    /// controller may send messages an older node does not know). Cancel-safe: it awaits
    /// only the next frame, so it can be a branch of `select!`.
    pub async fn recv(&mut self) -> Result<In, LinkError> {
        loop {
            let frame = self.socket.next().await;
            self.last_heard = Instant::now();
            match frame {
                Some(Ok(Message::Text(text))) => match serde_json::from_str(text.as_str()) {
                    Ok(message) => return Ok(message),
                    Err(error) => {
                        tracing::warn!(%error, "ignoring a message from the controller")
                    }
                },
                Some(Ok(Message::Close(frame))) => return Err(LinkError::Closed(frame)),
                None => return Err(LinkError::Closed(None)),
                // Pings are answered by tungstenite; pongs and binary frames are only signs
                // of life.
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error.into()),
            }
        }
    }

    /// `Err` once nothing has arrived for longer than `limit`.
    pub fn check_silence(&self, limit: Duration) -> Result<(), LinkError> {
        let silent_for = self.last_heard.elapsed();
        if silent_for > limit {
            Err(LinkError::Silent(silent_for))
        } else {
            Ok(())
        }
    }

    /// Closes the socket, without letting a stuck controller hold the node up.
    async fn close(&mut self) {
        let close = self.socket.close(None);
        let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
    }
}

/// Links to the controller until `cancel` fires: opens the socket, runs `session` on it, and
/// reopens it with backoff whenever the session ends other than by shutdown. `connected` (if
/// given) is true while a session runs.
///
/// Fails only for a configuration that can never work (see [`LinkConfig::check`]).
pub async fn run<Out, In, S>(
    config: LinkConfig,
    mut session: S,
    cancel: CancellationToken,
) -> Result<(), ConfigError>
where
    Out: Serialize,
    In: DeserializeOwned,
    S: Session<Out, In>,
{
    let url = socket_url(&config.controller, &config.kind)?;
    let connector = tls::connector(config.ca_file.as_deref())?;
    let (_, bearer) = plane_protocol::auth::split_bearer(&config.controller);
    let credentials = NodeCredentials {
        bearer,
        cluster_secret: config.cluster_secret.clone(),
    };
    let node = config.kind.node();
    let mut backoff = Backoff::new(INITIAL_BACKOFF, config.max_backoff);
    loop {
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            attempt = tokio::time::timeout(
                CONNECT_TIMEOUT,
                tokio_tungstenite::connect_async_tls_with_config(
                    request(&url, &credentials),
                    None,
                    // Small frames must not wait for Nagle's algorithm.
                    true,
                    Some(Connector::Rustls(Arc::clone(&connector))),
                ),
            ) => attempt,
        };
        match attempt {
            Ok(Ok((socket, _))) => {
                tracing::info!(%url, node, "connected to the controller");
                let started = Instant::now();
                let mut link = Link::new(socket);
                let end = session.run(&mut link).await;
                if started.elapsed() >= HEALTHY_SESSION {
                    backoff.reset();
                }
                match end {
                    SessionEnd::Shutdown => {
                        link.close().await;
                        return Ok(());
                    }
                    SessionEnd::Lost(error) => {
                        tracing::warn!(%url, node, %error, "lost the controller connection");
                    }
                    SessionEnd::Refused(reason) => {
                        tracing::error!(%url, node, %reason, "the controller refused this node");
                        // Retrying at once cannot help (and, for a node whose name another
                        // uses, would take the name back and forth).
                        backoff.exhaust();
                    }
                }
            }
            Ok(Err(error)) => {
                // A refusal (401: no or a wrong --cluster-secret or token) says why in its
                // body.
                let answer = refusal_body(&error);
                tracing::warn!(%url, node, %error, answer, "could not connect to the controller");
            }
            Err(_) => tracing::warn!(%url, node, "timed out connecting to the controller"),
        }
        let wait = backoff.next_wait();
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The socket's opening request, with the credentials as headers (never in the URL).
fn request(url: &Url, credentials: &NodeCredentials) -> tungstenite::handshake::client::Request {
    use tungstenite::client::IntoClientRequest;
    // `socket_url` made it: a valid ws/wss URL.
    let mut request = url
        .as_str()
        .into_client_request()
        .expect("a valid socket URL");
    for (name, value) in credentials.headers() {
        match value.parse() {
            Ok(value) => {
                request.headers_mut().insert(name, value);
            }
            Err(_) => tracing::error!(header = name, "credential not valid in a header; not sent"),
        }
    }
    request
}

/// The body of an HTTP refusal of the socket, if that is what `error` is.
fn refusal_body(error: &tungstenite::Error) -> String {
    match error {
        tungstenite::Error::Http(response) => response
            .body()
            .as_deref()
            .map(String::from_utf8_lossy)
            .unwrap_or_default()
            .into_owned(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests;
