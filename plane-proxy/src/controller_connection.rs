//! The proxy's WebSocket to the controller: resolves tokens to routes (holding requests
//! while their backend starts), applies backend removals to the route cache, and sends
//! keep-alive reports. Reconnects forever with backoff; requests that need the controller
//! while it is away wait for it to come back.

use crate::connection_tracker::ConnectionTracker;
use crate::route::Route;
use crate::route_cache::{Inserted, RouteCache};
use crate::upstream_pool::UpstreamPool;
use futures_util::{SinkExt, StreamExt};
use plane_protocol::backend::TerminationReason;
use plane_protocol::names::{BearerToken, NodeName};
use plane_protocol::proxy::{MessageFromProxy, MessageToProxy, RouteAnswer};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use url::Url;

/// First wait before reconnecting; doubles after every failed attempt.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A connect attempt (TCP + WebSocket handshake) that takes longer is abandoned, so a
/// black-holed controller address cannot stall reconnection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection on which nothing (not even a pong) arrived for this long, and for at least
/// three report intervals, is treated as dead: TCP alone may not notice a vanished peer.
const MIN_SILENCE_LIMIT: Duration = Duration::from_secs(10);
/// The shortest time between two reports of connections opened or closed.
const MIN_CHANGES_INTERVAL: Duration = Duration::from_millis(50);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Resolution = Result<Arc<Route>, RouteError>;
type Waiter = oneshot::Sender<Resolution>;

/// Why a request cannot be routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("unknown or revoked token")]
    Unknown,
    #[error("the token's lifetime has ended")]
    Expired,
    #[error("the backend has stopped")]
    Terminated {
        reason: Option<TerminationReason>,
        exit_code: Option<i32>,
    },
    #[error("the backend did not become ready within the hold timeout")]
    HoldTimeout,
    #[error("the proxy has no connection to the controller")]
    ControllerUnavailable,
    #[error("too many requests are already held waiting for their backends")]
    TooManyHeld,
    #[error("the route cannot be expressed as request headers")]
    Unusable,
}

/// What the connection needs to know.
#[derive(Clone, Debug)]
pub struct ControllerConnectionConfig {
    /// `ws://…/ctrl/c/<cluster>/proxy-socket`.
    pub socket_url: Url,
    pub name: NodeName,
    pub report_interval: Duration,
    /// How long a request may wait for its route (a starting backend, a lost controller).
    pub hold_timeout: Duration,
    /// How many requests may wait for routes at once; more are refused at once.
    pub max_held_requests: usize,
    /// Sent as headers when the socket opens.
    pub credentials: plane_protocol::auth::NodeCredentials,
}

/// Handle for resolving tokens through the controller. Cheap to clone.
#[derive(Clone)]
pub struct ControllerClient {
    shared: Arc<Shared>,
}

struct Shared {
    cache: RouteCache,
    tracker: ConnectionTracker,
    /// Keep-alive connections to backends; a removed backend's are closed.
    pool: UpstreamPool,
    /// Tokens asked about and not yet answered, with everyone waiting for each, so
    /// concurrent requests for one token share a single round-trip. A plain lock: it is only
    /// held for map updates, never across an await.
    pending: Mutex<HashMap<BearerToken, Vec<Waiter>>>,
    /// Wakes the connection task to send a route request for a newly pending token.
    requests: mpsc::UnboundedSender<BearerToken>,
    connected: watch::Receiver<bool>,
    hold_timeout: Duration,
    max_held_requests: usize,
    /// Requests waiting for a route now.
    held: AtomicUsize,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, HashMap<BearerToken, Vec<Waiter>>> {
        // Every update to the map is a single step, so a poisoned lock is still consistent.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets waiters that gave up (timed out), and tokens nobody waits for any more.
    fn prune_pending(pending: &mut HashMap<BearerToken, Vec<Waiter>>) {
        pending.retain(|_, waiters| {
            waiters.retain(|waiter| !waiter.is_closed());
            !waiters.is_empty()
        });
    }

    /// Forgets the waiters of `token` that gave up, and the token if none is left.
    fn prune_token(pending: &mut HashMap<BearerToken, Vec<Waiter>>, token: &BearerToken) {
        if let Some(waiters) = pending.get_mut(token) {
            waiters.retain(|waiter| !waiter.is_closed());
            if waiters.is_empty() {
                pending.remove(token);
            }
        }
    }

    /// Tokens someone is still waiting for.
    fn live_pending_tokens(&self) -> Vec<BearerToken> {
        let mut pending = self.pending();
        Self::prune_pending(&mut pending);
        pending.keys().cloned().collect()
    }

    /// Applies the controller's answer for `token`. Returns whether to ask again: a backend
    /// still starting when the controller stopped waiting is waited for anew (each waiter
    /// still has its own hold deadline).
    fn resolve(&self, token: BearerToken, answer: RouteAnswer) -> bool {
        let resolution = match answer {
            RouteAnswer::Ready(info) => match Route::new(info) {
                // Cache first, then take the waiters: `route()` checks the cache while
                // holding the pending lock, so a request either finds the route cached or
                // is among the waiters.
                Ok(route) => {
                    let route = Arc::new(route);
                    match self.cache.insert(token.clone(), Arc::clone(&route)) {
                        Inserted::Cached => Ok(route),
                        Inserted::BackendRemoved => {
                            debug!(backend = %route.backend_id, "route to a removed backend refused");
                            Err(RouteError::Terminated {
                                reason: None,
                                exit_code: None,
                            })
                        }
                        Inserted::Revoked => {
                            debug!(backend = %route.backend_id, "route of a revoked token refused");
                            Err(RouteError::Unknown)
                        }
                    }
                }
                Err(error) => {
                    warn!(%error, "the controller sent a route no request header can carry");
                    Err(RouteError::Unusable)
                }
            },
            RouteAnswer::Unknown => Err(RouteError::Unknown),
            RouteAnswer::Expired => Err(RouteError::Expired),
            RouteAnswer::Terminated {
                reason, exit_code, ..
            } => Err(RouteError::Terminated { reason, exit_code }),
            RouteAnswer::Starting { .. } => {
                let mut pending = self.pending();
                Self::prune_token(&mut pending, &token);
                return pending.contains_key(&token);
            }
        };
        let waiters = self.pending().remove(&token).unwrap_or_default();
        for waiter in waiters {
            // A waiter that timed out has gone; nothing to tell it.
            let _ = waiter.send(resolution.clone());
        }
        false
    }
}

/// Counts one request as held (waiting for its route) until dropped.
struct HeldRequest<'a>(&'a AtomicUsize);

impl Drop for HeldRequest<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ControllerClient {
    /// Starts the connection task; it runs until `cancel` fires.
    pub fn start(
        config: ControllerConnectionConfig,
        tracker: ConnectionTracker,
        pool: UpstreamPool,
        cancel: CancellationToken,
    ) -> (Self, JoinHandle<()>) {
        let (requests_tx, requests_rx) = mpsc::unbounded_channel();
        let (connected_tx, connected_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            cache: RouteCache::default(),
            tracker,
            pool,
            pending: Mutex::new(HashMap::new()),
            requests: requests_tx,
            connected: connected_rx,
            hold_timeout: config.hold_timeout,
            max_held_requests: config.max_held_requests,
            held: AtomicUsize::new(0),
        });
        let runner = Runner {
            shared: shared.clone(),
            config,
            instance: plane_protocol::names::new_instance_id(),
            requests: requests_rx,
            connected: connected_tx,
            cancel,
        };
        let task = tokio::spawn(runner.run());
        (Self { shared }, task)
    }

    /// The route of `token` if it is cached: the hot path, which neither allocates nor
    /// validates the token (a cached one was valid).
    pub fn cached_route(&self, token: &str) -> Option<Arc<Route>> {
        self.shared.cache.get(token)
    }

    /// Where `token` leads. A token not in the cache is asked about, and the request is
    /// held until its backend is ready, has stopped, or the hold timeout passes (which
    /// includes waiting for a lost controller connection to come back). At most
    /// `max_held_requests` are held at once.
    pub async fn route(&self, token: &BearerToken) -> Result<Arc<Route>, RouteError> {
        if let Some(route) = self.shared.cache.get(token) {
            return Ok(route);
        }
        let held = &self.shared.held;
        if held.fetch_add(1, Ordering::AcqRel) >= self.shared.max_held_requests {
            held.fetch_sub(1, Ordering::AcqRel);
            // The route may have arrived since the first look; then nothing needs holding.
            return self.shared.cache.get(token).ok_or(RouteError::TooManyHeld);
        }
        let _held = HeldRequest(held);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.shared.pending();
            if let Some(route) = self.shared.cache.get(token) {
                return Ok(route);
            }
            match pending.get_mut(token) {
                Some(waiters) => waiters.push(tx),
                None => {
                    pending.insert(token.clone(), vec![tx]);
                    // Sending fails only once the connection task has stopped (shutdown);
                    // the wait below then ends as unavailable.
                    let _ = self.shared.requests.send(token.clone());
                }
            }
        }
        // `let` so the timed-out receiver is dropped before pruning closed waiters.
        let answer = tokio::time::timeout(self.shared.hold_timeout, rx).await;
        match answer {
            Ok(Ok(resolution)) => resolution,
            Ok(Err(_)) => Err(RouteError::ControllerUnavailable),
            Err(_) => {
                // Only this token's waiters: a mass timeout must not scan the whole map
                // once per request under the lock.
                Shared::prune_token(&mut self.shared.pending(), token);
                if self.is_connected() {
                    Err(RouteError::HoldTimeout)
                } else {
                    Err(RouteError::ControllerUnavailable)
                }
            }
        }
    }

    /// How long a request may be held waiting for its route.
    pub fn hold_timeout(&self) -> Duration {
        self.shared.hold_timeout
    }

    /// How many requests are held waiting for their routes now.
    pub fn held_requests(&self) -> usize {
        self.shared.held.load(Ordering::Acquire)
    }

    pub fn is_connected(&self) -> bool {
        *self.shared.connected.borrow()
    }

    /// Follows the connection: `true` while a hello'd socket to the controller is open.
    pub fn connection_status(&self) -> watch::Receiver<bool> {
        self.shared.connected.clone()
    }
}

/// How a session on one socket ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("WebSocket error: {0}")]
    Socket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("could not encode a message: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the controller closed the connection")]
    Closed,
    #[error("nothing heard from the controller for {0:?}")]
    Silent(Duration),
    #[error("the controller did not take a message within {0:?}")]
    SendTimeout(Duration),
}

struct Runner {
    shared: Arc<Shared>,
    config: ControllerConnectionConfig,
    /// This process's instance ID, the same in every session it opens.
    instance: String,
    requests: mpsc::UnboundedReceiver<BearerToken>,
    connected: watch::Sender<bool>,
    cancel: CancellationToken,
}

impl Runner {
    /// The socket's opening request, with the credentials.
    fn socket_request(&self) -> tokio_tungstenite::tungstenite::handshake::client::Request {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        // The URL was built by `ProxyConfig::controller_socket_url`: a valid ws request.
        let mut request = self
            .config
            .socket_url
            .as_str()
            .into_client_request()
            .expect("a valid socket URL");
        for (name, value) in self.config.credentials.headers() {
            match value.parse() {
                Ok(value) => {
                    request.headers_mut().insert(name, value);
                }
                Err(_) => {
                    tracing::error!(header = name, "credential not valid in a header; not sent")
                }
            }
        }
        request
    }

    async fn run(mut self) {
        let url = self.config.socket_url.clone();
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let attempt = tokio::select! {
                _ = self.cancel.cancelled() => return,
                attempt = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    tokio_tungstenite::connect_async(self.socket_request()),
                ) => attempt,
            };
            match attempt {
                Ok(Ok((mut socket, _))) => {
                    let started = Instant::now();
                    let result = self.session(&mut socket).await;
                    self.connected.send_replace(false);
                    match result {
                        Ok(()) => {
                            // Shutting down: say goodbye, but don't let a stuck peer hold us.
                            let close = socket.close(None);
                            let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
                            return;
                        }
                        Err(error) => warn!(%url, %error, "lost the controller connection"),
                    }
                    // A connection that held for a while was healthy: start backoff afresh.
                    // One that dropped at once (e.g. hello refused) keeps backing off.
                    if started.elapsed() >= MAX_BACKOFF {
                        backoff = INITIAL_BACKOFF;
                    }
                }
                Ok(Err(error)) => {
                    // A refusal (401: no or a wrong --cluster-secret or token) says why in
                    // its body.
                    let answer = match &error {
                        tokio_tungstenite::tungstenite::Error::Http(response) => response
                            .body()
                            .as_deref()
                            .map(String::from_utf8_lossy)
                            .unwrap_or_default()
                            .into_owned(),
                        _ => String::new(),
                    };
                    warn!(%url, %error, answer, "could not connect to the controller");
                }
                Err(_) => warn!(%url, "timed out connecting to the controller"),
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Runs one connection until it fails (`Err`) or the proxy shuts down (`Ok`).
    async fn session(&mut self, socket: &mut Socket) -> Result<(), SessionError> {
        let hello = MessageFromProxy::Hello {
            name: self.config.name.clone(),
            version: plane_protocol::PLANE_VERSION.to_string(),
            hash: plane_protocol::PLANE_HASH.to_string(),
            instance: self.instance.clone(),
            report_interval_ms: Some(self.config.report_interval.as_millis() as u64),
        };
        send(socket, &hello).await?;
        // The controller starts this session knowing nothing of our connections: tell it
        // everything open now, and only changes after that.
        let tracker = &self.shared.tracker;
        tracker.take_changes();
        let opened = tracker.open_backends();
        send(
            socket,
            &MessageFromProxy::ConnectionsChanged {
                opened,
                closed: vec![],
            },
        )
        .await?;
        // Removals sent while we were away were missed, so nothing cached can be trusted:
        // neither routes nor idle connections (to backends that may be gone).
        self.shared.cache.clear();
        self.shared.pool.clear_idle();
        // Every pending token is re-sent below, which covers those queued meanwhile.
        while self.requests.try_recv().is_ok() {}
        for token in self.shared.live_pending_tokens() {
            send(socket, &MessageFromProxy::RouteRequest { token }).await?;
        }
        self.connected.send_replace(true);
        info!(url = %self.config.socket_url, name = %self.config.name, "connected to the controller");

        let period = self.config.report_interval;
        let silence_limit = (period * 3).max(MIN_SILENCE_LIMIT);
        let mut report = tokio::time::interval_at(Instant::now() + period, period);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        // Changes are sent at most this often, so a busy backend whose connections open and
        // close all the time costs a message per interval, not one per request.
        let mut next_changes_at = Instant::now();

        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return Ok(()),
                _ = tracker.changed() => {
                    tokio::time::sleep_until(next_changes_at).await;
                    next_changes_at = Instant::now() + MIN_CHANGES_INTERVAL;
                    self.send_changes(socket).await?;
                }
                token = self.requests.recv() => match token {
                    Some(token) => send(socket, &MessageFromProxy::RouteRequest { token }).await?,
                    None => return Ok(()),
                },
                frame = socket.next() => {
                    last_heard = Instant::now();
                    match frame {
                        Some(Ok(Message::Text(text))) => {
                            if let Some(token) = self.handle_message(text.as_str()) {
                                send(socket, &MessageFromProxy::RouteRequest { token }).await?;
                            }
                        }
                        Some(Ok(Message::Close(_))) | None => return Err(SessionError::Closed),
                        // Pongs only matter as signs of life; pings are answered by tungstenite.
                        Some(Ok(_)) => {}
                        Some(Err(error)) => return Err(error.into()),
                    }
                }
                _ = report.tick() => {
                    let silent_for = last_heard.elapsed();
                    if silent_for > silence_limit {
                        return Err(SessionError::Silent(silent_for));
                    }
                    send_frame(socket, Message::Ping(Default::default())).await?;
                    self.send_report(socket).await?;
                    // Everything still open, again: the controller lets a report of an open
                    // connection lapse unless it is repeated, and this also repairs one it
                    // failed to store.
                    let opened = tracker.open_backends();
                    if !opened.is_empty() {
                        send(socket, &MessageFromProxy::ConnectionsChanged { opened, closed: vec![] }).await?;
                    }
                }
            }
        }
    }

    async fn send_changes(&self, socket: &mut Socket) -> Result<(), SessionError> {
        let (opened, closed) = self.shared.tracker.take_changes();
        if opened.is_empty() && closed.is_empty() {
            return Ok(());
        }
        let message = MessageFromProxy::ConnectionsChanged {
            opened: opened.clone(),
            closed: closed.clone(),
        };
        let result = send(socket, &message).await;
        if result.is_err() {
            self.shared
                .tracker
                .restore_changes(opened.into_iter().chain(closed));
        }
        result
    }

    async fn send_report(&self, socket: &mut Socket) -> Result<(), SessionError> {
        let backends = self.shared.tracker.take_report();
        if backends.is_empty() {
            return Ok(());
        }
        let message = MessageFromProxy::KeepAlive {
            backends: backends.clone(),
        };
        let result = send(socket, &message).await;
        if result.is_err() {
            self.shared.tracker.restore_report(backends);
        }
        result
    }

    /// Applies one message; returns a token to ask about again, if any.
    fn handle_message(&self, text: &str) -> Option<BearerToken> {
        match serde_json::from_str::<MessageToProxy>(text) {
            Ok(MessageToProxy::RouteResponse { token, answer }) => {
                if self.shared.resolve(token.clone(), answer) {
                    return Some(token);
                }
            }
            Ok(MessageToProxy::BackendRemoved { backend_id }) => {
                debug!(backend = %backend_id, "backend removed");
                self.shared.cache.remove_backend(&backend_id);
                self.shared.tracker.backend_removed(&backend_id);
                self.shared.pool.remove_backend(&backend_id);
            }
            Ok(MessageToProxy::Refused { reason }) => {
                tracing::error!(%reason, "the controller refused this proxy");
            }
            Ok(MessageToProxy::TokensRevoked {
                backend_id,
                user,
                revoked_at,
            }) => {
                debug!(backend = %backend_id, %user, "tokens revoked");
                self.shared
                    .cache
                    .revoke_user(&backend_id, &user, revoked_at);
            }
            // A newer controller may send messages we don't know yet; skipping them keeps
            // the connection (and every other route) working.
            Err(error) => warn!(%error, "ignoring a message from the controller"),
        }
        None
    }
}

async fn send(socket: &mut Socket, message: &MessageFromProxy) -> Result<(), SessionError> {
    let text = serde_json::to_string(message)?;
    send_frame(socket, Message::text(text)).await
}

/// How long one frame may wait for the controller to take it. A controller that stops
/// reading would otherwise block the session (and its silence check) forever.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

async fn send_frame(socket: &mut Socket, frame: Message) -> Result<(), SessionError> {
    match tokio::time::timeout(SEND_TIMEOUT, socket.send(frame)).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(SessionError::SendTimeout(SEND_TIMEOUT)),
    }
}
