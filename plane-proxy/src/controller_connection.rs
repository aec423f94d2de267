//! The proxy's session with the controller, over the shared node link (`plane-link`, which
//! reconnects with backoff): resolves tokens to routes (holding requests while their backend
//! starts), applies backend removals to the route cache, and sends keep-alive reports.
//! Requests that need the controller while it is away wait for it to come back.

use crate::connection_tracker::ConnectionTracker;
use crate::route::Route;
use crate::route_cache::{Inserted, RouteCache};
use crate::upstream_pool::UpstreamPool;
use plane_link::{Link, LinkConfig, LinkError, Session, SessionEnd};
use plane_protocol::backend::TerminationReason;
use plane_protocol::names::{BearerToken, NodeName};
use plane_protocol::proxy::{
    CertRequest, CertResponse, MessageFromProxy, MessageToProxy, RouteAnswer,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The shortest time between two reports of connections opened or closed.
const MIN_CHANGES_INTERVAL: Duration = Duration::from_millis(50);

type ControllerLink = Link<MessageFromProxy, MessageToProxy>;
type Resolution = Result<Arc<Route>, RouteError>;
type Waiter = oneshot::Sender<Resolution>;
type CertWaiter = oneshot::Sender<CertResponse>;

/// How long a certificate step may wait for the controller's answer.
const CERT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a certificate step got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CertRequestError {
    #[error("the proxy has no connection to the controller")]
    ControllerUnavailable,
    #[error("the controller did not answer within {0:?}")]
    Timeout(Duration),
}

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
    /// Where the controller is and how to reach it.
    pub link: LinkConfig,
    pub name: NodeName,
    pub report_interval: Duration,
    /// How long a request may wait for its route (a starting backend, a lost controller).
    pub hold_timeout: Duration,
    /// How many requests may wait for routes at once; more are refused at once.
    pub max_held_requests: usize,
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
    /// Certificate steps for the connection task to send, each with where its answer goes.
    cert_requests: mpsc::UnboundedSender<(CertRequest, CertWaiter)>,
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
        let (cert_requests_tx, cert_requests_rx) = mpsc::unbounded_channel();
        let (connected_tx, connected_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            cache: RouteCache::default(),
            tracker,
            pool,
            pending: Mutex::new(HashMap::new()),
            requests: requests_tx,
            cert_requests: cert_requests_tx,
            connected: connected_rx,
            hold_timeout: config.hold_timeout,
            max_held_requests: config.max_held_requests,
            held: AtomicUsize::new(0),
        });
        let link = config.link.clone();
        let runner = Runner {
            shared: shared.clone(),
            config,
            instance: plane_protocol::names::new_instance_id(),
            requests: requests_rx,
            cert_requests: cert_requests_rx,
            cert_waiters: HashMap::new(),
            next_cert_id: 0,
            connected: connected_tx,
            cancel: cancel.clone(),
        };
        let task = tokio::spawn(async move {
            if let Err(error) = plane_link::run(link, runner, cancel).await {
                tracing::error!(%error, "cannot link to the controller");
            }
        });
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

    /// Asks the controller one certificate step, once connected. Fails when the controller
    /// is away or does not answer within [`CERT_REQUEST_TIMEOUT`] (an answer lost with its
    /// session never arrives); the caller tries again later.
    pub async fn cert_request(
        &self,
        request: CertRequest,
    ) -> Result<CertResponse, CertRequestError> {
        if !self.is_connected() {
            return Err(CertRequestError::ControllerUnavailable);
        }
        let (tx, rx) = oneshot::channel();
        self.shared
            .cert_requests
            .send((request, tx))
            .map_err(|_| CertRequestError::ControllerUnavailable)?;
        match tokio::time::timeout(CERT_REQUEST_TIMEOUT, rx).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) => Err(CertRequestError::ControllerUnavailable),
            Err(_) => Err(CertRequestError::Timeout(CERT_REQUEST_TIMEOUT)),
        }
    }

    /// Follows the connection: `true` while a hello'd socket to the controller is open.
    pub fn connection_status(&self) -> watch::Receiver<bool> {
        self.shared.connected.clone()
    }
}

struct Runner {
    shared: Arc<Shared>,
    config: ControllerConnectionConfig,
    /// This process's instance ID, the same in every session it opens.
    instance: String,
    requests: mpsc::UnboundedReceiver<BearerToken>,
    cert_requests: mpsc::UnboundedReceiver<(CertRequest, CertWaiter)>,
    /// Certificate steps sent in this session and not answered yet, by request ID.
    cert_waiters: HashMap<u64, CertWaiter>,
    next_cert_id: u64,
    connected: watch::Sender<bool>,
    cancel: CancellationToken,
}

impl Session<MessageFromProxy, MessageToProxy> for Runner {
    async fn run(&mut self, link: &mut ControllerLink) -> SessionEnd {
        let end = match self.session(link).await {
            Ok(end) => end,
            Err(error) => SessionEnd::Lost(error),
        };
        self.connected.send_replace(false);
        // Answers to this session's steps will never come; their callers retry.
        self.cert_waiters.clear();
        while self.cert_requests.try_recv().is_ok() {}
        end
    }
}

impl Runner {
    /// Runs one session until the link fails (`Err`), the controller refuses the proxy, or
    /// the proxy shuts down.
    async fn session(&mut self, link: &mut ControllerLink) -> Result<SessionEnd, LinkError> {
        let hello = MessageFromProxy::Hello {
            name: self.config.name.clone(),
            version: plane_protocol::PLANE_VERSION.to_string(),
            hash: plane_protocol::PLANE_HASH.to_string(),
            instance: self.instance.clone(),
            report_interval_ms: Some(self.config.report_interval.as_millis() as u64),
        };
        link.send(&hello).await?;
        // The controller starts this session knowing nothing of our connections: tell it
        // everything open now, and only changes after that.
        let shared = Arc::clone(&self.shared);
        let tracker = &shared.tracker;
        tracker.take_changes();
        let opened = tracker.open_backends();
        link.send(&MessageFromProxy::ConnectionsChanged {
            opened,
            closed: vec![],
        })
        .await?;
        // Removals sent while we were away were missed, so nothing cached can be trusted:
        // neither routes nor idle connections (to backends that may be gone).
        self.shared.cache.clear();
        self.shared.pool.clear_idle();
        // Every pending token is re-sent below, which covers those queued meanwhile.
        while self.requests.try_recv().is_ok() {}
        for token in self.shared.live_pending_tokens() {
            link.send(&MessageFromProxy::RouteRequest { token }).await?;
        }
        self.connected.send_replace(true);
        info!(name = %self.config.name, "proxy session started");

        let period = self.config.report_interval;
        let silence_limit = plane_link::silence_limit(period);
        let mut report = tokio::time::interval_at(Instant::now() + period, period);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Changes are sent at most this often, so a busy backend whose connections open and
        // close all the time costs a message per interval, not one per request.
        let mut next_changes_at = Instant::now();

        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return Ok(SessionEnd::Shutdown),
                _ = tracker.changed() => {
                    tokio::time::sleep_until(next_changes_at).await;
                    next_changes_at = Instant::now() + MIN_CHANGES_INTERVAL;
                    self.send_changes(link).await?;
                }
                token = self.requests.recv() => match token {
                    Some(token) => link.send(&MessageFromProxy::RouteRequest { token }).await?,
                    None => return Ok(SessionEnd::Shutdown),
                },
                Some((request, waiter)) = self.cert_requests.recv() => {
                    let id = self.next_cert_id;
                    self.next_cert_id += 1;
                    self.cert_waiters.retain(|_, waiter| !waiter.is_closed());
                    self.cert_waiters.insert(id, waiter);
                    link.send(&MessageFromProxy::Cert { id, request }).await?;
                }
                message = link.recv() => match self.handle_message(message?) {
                    Handled::Done => {}
                    Handled::AskAgain(token) => {
                        link.send(&MessageFromProxy::RouteRequest { token }).await?;
                    }
                    Handled::Refused(reason) => return Ok(SessionEnd::Refused(reason)),
                },
                _ = report.tick() => {
                    link.check_silence(silence_limit)?;
                    link.ping().await?;
                    self.send_report(link).await?;
                    // Everything still open, again: the controller lets a report of an open
                    // connection lapse unless it is repeated, and this also repairs one it
                    // failed to store.
                    let opened = tracker.open_backends();
                    if !opened.is_empty() {
                        link.send(&MessageFromProxy::ConnectionsChanged { opened, closed: vec![] }).await?;
                    }
                }
            }
        }
    }

    async fn send_changes(&self, link: &mut ControllerLink) -> Result<(), LinkError> {
        let (opened, closed) = self.shared.tracker.take_changes();
        if opened.is_empty() && closed.is_empty() {
            return Ok(());
        }
        let message = MessageFromProxy::ConnectionsChanged {
            opened: opened.clone(),
            closed: closed.clone(),
        };
        let result = link.send(&message).await;
        if result.is_err() {
            self.shared
                .tracker
                .restore_changes(opened.into_iter().chain(closed));
        }
        result
    }

    /// The backends with traffic since the last report. Sent even when there were none: it
    /// is also the proxy's heartbeat (the cluster state shows its age).
    async fn send_report(&self, link: &mut ControllerLink) -> Result<(), LinkError> {
        let backends = self.shared.tracker.take_report();
        let message = MessageFromProxy::KeepAlive {
            backends: backends.clone(),
        };
        let result = link.send(&message).await;
        if result.is_err() {
            self.shared.tracker.restore_report(backends);
        }
        result
    }

    /// Applies one message from the controller.
    fn handle_message(&mut self, message: MessageToProxy) -> Handled {
        match message {
            MessageToProxy::RouteResponse { token, answer } => {
                if self.shared.resolve(token.clone(), answer) {
                    return Handled::AskAgain(token);
                }
            }
            MessageToProxy::BackendRemoved { backend_id } => {
                debug!(backend = %backend_id, "backend removed");
                self.shared.cache.remove_backend(&backend_id);
                self.shared.tracker.backend_removed(&backend_id);
                self.shared.pool.remove_backend(&backend_id);
            }
            MessageToProxy::Refused { reason } => return Handled::Refused(reason),
            MessageToProxy::TokensRevoked {
                backend_id,
                user,
                revoked_at,
            } => {
                debug!(backend = %backend_id, %user, "tokens revoked");
                self.shared
                    .cache
                    .revoke_user(&backend_id, &user, revoked_at);
            }
            MessageToProxy::Cert { id, response } => {
                // Its caller may have stopped waiting; then nobody needs the answer.
                if let Some(waiter) = self.cert_waiters.remove(&id) {
                    let _ = waiter.send(response);
                }
            }
        }
        Handled::Done
    }
}

/// What is left to do after a message from the controller.
enum Handled {
    Done,
    /// The backend was still starting when the controller stopped waiting: ask again.
    AskAgain(BearerToken),
    /// The controller refused this proxy (its name is taken, say).
    Refused(String),
}
