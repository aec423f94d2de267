//! Keep-alive connections to backends, reused across requests and clients, so a request
//! pays for neither a TCP connect nor a new flow through Docker's port forwarder.
//!
//! A connection goes back to the pool once its response has been read to the end (see
//! [`PooledReturn`]), at most [`MAX_IDLE_PER_BACKEND`] per backend. The pool of a backend is
//! dropped, closing its connections, when the controller says the backend is removed; an
//! idle connection older than [`IDLE_TIMEOUT`] is closed instead of reused. Upgrades
//! (WebSockets) always get a connection of their own, which becomes their tunnel.
//!
//! A backend that serves HTTP/2 (h2c) has one multiplexed connection instead, shared by
//! every request to it at once, and dropped with the backend like the others.

use crate::body::RequestBody;
use crate::connection_tracker::Removal;
use crate::route::Route;
use dashmap::DashMap;
use hyper::client::conn::http1::SendRequest;
use plane_protocol::names::BackendName;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Idle connections kept per backend; more are closed when their response ends.
pub const MAX_IDLE_PER_BACKEND: usize = 32;
/// An idle connection older than this is closed rather than reused (backends commonly drop
/// keep-alive connections after a minute or so, and a reused dead one costs a retry).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Cheap to clone; every clone sees the same connections.
#[derive(Clone)]
pub struct UpstreamPool {
    inner: Arc<PoolInner>,
}

/// A handle to a backend's shared HTTP/2 connection.
pub type MultiplexedSender = hyper::client::conn::http2::SendRequest<RequestBody>;

struct PoolInner {
    idle: DashMap<BackendName, Slot>,
    /// HTTP/2 backends' shared connections. Written only under the backend's `idle` entry
    /// (which holds its removal tombstone), so none is kept after its backend's removal.
    multiplexed: DashMap<BackendName, MultiplexedSender>,
    /// When tombstones were last pruned. A plain lock: held only to compare and set it.
    last_prune: std::sync::Mutex<Instant>,
    /// Set when the proxy shuts down: nothing is pooled any more, so idle connections do
    /// not hold up the drain.
    closed: AtomicBool,
    /// Owns the tasks that wait for a connection to become idle (so shutdown sees them).
    tasks: TaskTracker,
    hard_stop: CancellationToken,
}

/// A backend's entry in the pool.
enum Slot {
    Open(Vec<IdleConnection>),
    /// The backend was removed (at that time): connections to it are never pooled again,
    /// even by a response that was still streaming when the removal arrived.
    Removed(Instant),
}

/// How long a removed backend's tombstone is kept: longer than any response streaming when
/// the removal came (backend IDs are never reused).
const TOMBSTONE_LIFETIME: Duration = Duration::from_secs(600);
/// How often tombstones are pruned (pruning walks the whole map).
const PRUNE_EVERY: Duration = Duration::from_secs(30);

struct IdleConnection {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

impl UpstreamPool {
    pub fn new(tasks: TaskTracker, hard_stop: CancellationToken) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                idle: DashMap::new(),
                multiplexed: DashMap::new(),
                last_prune: std::sync::Mutex::new(Instant::now()),
                closed: AtomicBool::new(false),
                tasks,
                hard_stop,
            }),
        }
    }

    /// An idle connection to `backend` that can take a request now, if there is one.
    pub fn take(&self, backend: &BackendName) -> Option<SendRequest<RequestBody>> {
        let mut slot = self.inner.idle.get_mut(backend)?;
        let Slot::Open(idle) = &mut *slot else {
            return None;
        };
        // Newest first: the likeliest to be alive. Stale or closed ones are dropped.
        while let Some(connection) = idle.pop() {
            if connection.since.elapsed() < IDLE_TIMEOUT && connection.sender.is_ready() {
                return Some(connection.sender);
            }
        }
        None
    }

    /// Keeps a connection whose response has ended for the next request to `backend`,
    /// unless the backend was removed meanwhile.
    pub fn put(&self, backend: &BackendName, sender: SendRequest<RequestBody>) {
        if !sender.is_ready() || self.inner.closed.load(Ordering::Acquire) {
            return;
        }
        let connection = IdleConnection {
            sender,
            since: Instant::now(),
        };
        // The backend's list usually exists already: no name is cloned for it. The check
        // for removal and the push happen under the entry's lock, which `remove_backend`
        // takes too, so a connection is never pooled after its backend's removal.
        if let Some(mut slot) = self.inner.idle.get_mut(backend) {
            if let Slot::Open(idle) = &mut *slot {
                // Connections that aged out while nobody asked go now, not at the next take.
                idle.retain(|old| old.since.elapsed() < IDLE_TIMEOUT);
                if idle.len() < MAX_IDLE_PER_BACKEND {
                    idle.push(connection);
                }
            }
            return;
        }
        let mut slot = self
            .inner
            .idle
            .entry(backend.clone())
            .or_insert_with(|| Slot::Open(Vec::new()));
        if let Slot::Open(idle) = &mut *slot {
            idle.push(connection);
        }
    }

    /// The shared HTTP/2 connection to `backend`, if one is open and usable.
    pub fn take_multiplexed(&self, backend: &BackendName) -> Option<MultiplexedSender> {
        let sender = self.inner.multiplexed.get(backend)?;
        if sender.is_closed() {
            drop(sender);
            self.inner
                .multiplexed
                .remove_if(backend, |_, sender| sender.is_closed());
            return None;
        }
        Some(sender.clone())
    }

    /// Shares a new HTTP/2 connection to `backend` with later requests, unless the backend
    /// was removed meanwhile.
    pub fn put_multiplexed(&self, backend: &BackendName, sender: MultiplexedSender) {
        if self.inner.closed.load(Ordering::Acquire) {
            return;
        }
        let slot = self
            .inner
            .idle
            .entry(backend.clone())
            .or_insert_with(|| Slot::Open(Vec::new()));
        if matches!(*slot, Slot::Open(_)) {
            self.inner.multiplexed.insert(backend.clone(), sender);
        }
    }

    /// Closes every idle connection and pools no more (the proxy is shutting down).
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.idle.clear();
        self.inner.multiplexed.clear();
    }

    /// Closes every idle connection, keeping what is known about removed backends. Used
    /// after the controller connection was down: removals sent meanwhile were missed.
    pub fn clear_idle(&self) {
        self.inner
            .idle
            .retain(|_, slot| matches!(slot, Slot::Removed(_)));
        self.inner.multiplexed.clear();
    }

    /// Closes every idle connection to a backend that is going away, and pools none to it
    /// again.
    pub fn remove_backend(&self, backend: &BackendName) {
        let now = Instant::now();
        self.inner.idle.insert(backend.clone(), Slot::Removed(now));
        self.inner.multiplexed.remove(backend);
        {
            let mut last = self
                .inner
                .last_prune
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if now.duration_since(*last) < PRUNE_EVERY {
                return;
            }
            *last = now;
        }
        self.inner.idle.retain(|_, slot| match slot {
            Slot::Removed(at) => now.duration_since(*at) < TOMBSTONE_LIFETIME,
            Slot::Open(_) => true,
        });
    }

    /// How many idle connections are pooled for `backend`.
    #[cfg(test)]
    fn idle_count(&self, backend: &BackendName) -> usize {
        match self.inner.idle.get(backend).as_deref() {
            Some(Slot::Open(idle)) => idle.len(),
            _ => 0,
        }
    }
}

/// A backend connection lent to one response, to be given back when the response body has
/// been read to the end.
pub struct PooledReturn {
    pub pool: UpstreamPool,
    /// The backend the connection leads to.
    pub route: Arc<Route>,
    pub sender: SendRequest<RequestBody>,
    /// Fired when the backend is going away: its connections are not pooled again.
    pub removed: Arc<Removal>,
}

impl PooledReturn {
    /// Pools the connection now if hyper already counts it idle (the common case: the body
    /// was read to its end), and otherwise on a small task once it is.
    pub fn give_back(self) {
        if self.removed.is_removed() {
            return;
        }
        if self.sender.is_ready() {
            self.pool.put(&self.route.backend_id, self.sender);
            return;
        }
        let Self {
            pool,
            route,
            mut sender,
            removed,
        } = self;
        let hard_stop = pool.inner.hard_stop.clone();
        pool.inner.tasks.clone().spawn(async move {
            tokio::select! {
                ready = sender.ready() => {
                    if ready.is_ok() && !removed.is_removed() {
                        pool.put(&route.backend_id, sender);
                    }
                }
                _ = removed.wait() => {}
                _ = hard_stop.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Response;
    use hyper_util::rt::TokioIo;
    use std::convert::Infallible;
    use tokio::net::{TcpListener, TcpStream};

    /// A real keep-alive connection to a tiny local server, ready for a request.
    async fn connection(listener: &TcpListener) -> SendRequest<RequestBody> {
        let address = listener.local_addr().expect("listener address");
        let (client, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        let (server, _) = accepted.expect("accept");
        tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
            TokioIo::new(server),
            hyper::service::service_fn(|_| async {
                Ok::<_, Infallible>(Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
            }),
        ));
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(client.expect("connect")))
                .await
                .expect("handshake");
        tokio::spawn(connection);
        sender.ready().await.expect("connection ready");
        sender
    }

    #[tokio::test]
    async fn a_removed_backend_gets_nothing_pooled_again_even_after_a_reconnect() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let pool = UpstreamPool::new(TaskTracker::new(), CancellationToken::new());
        let (backend, other) = (BackendName::new_random(), BackendName::new_random());
        pool.put(&backend, connection(&listener).await);
        pool.put(&other, connection(&listener).await);
        assert_eq!(pool.idle_count(&backend), 1);

        pool.remove_backend(&backend);
        assert_eq!(pool.idle_count(&backend), 0);
        // A response that was still streaming when the removal came ends now.
        pool.put(&backend, connection(&listener).await);
        assert_eq!(pool.idle_count(&backend), 0);
        assert!(pool.take(&backend).is_none());

        // After a reconnect idle connections go, and the tombstone stays.
        pool.clear_idle();
        assert_eq!(pool.idle_count(&other), 0);
        pool.put(&backend, connection(&listener).await);
        assert_eq!(pool.idle_count(&backend), 0);
        pool.put(&other, connection(&listener).await);
        assert!(pool.take(&other).is_some());
    }
}
