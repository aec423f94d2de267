//! Keep-alive connections to backends, reused across requests and clients, so a request
//! pays for neither a TCP connect nor a new flow through Docker's port forwarder.
//!
//! A connection goes back to the pool once its response has been read to the end (see
//! [`PooledReturn`]), at most [`MAX_IDLE_PER_BACKEND`] per backend. The pool of a backend is
//! dropped, closing its connections, when the controller says the backend is removed; an
//! idle connection older than [`IDLE_TIMEOUT`] is closed instead of reused. Upgrades
//! (WebSockets) always get a connection of their own, which becomes their tunnel.

use crate::connection_tracker::Removal;
use crate::route::Route;
use dashmap::DashMap;
use hyper::body::Incoming;
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

struct PoolInner {
    idle: DashMap<BackendName, Vec<IdleConnection>>,
    /// Set when the proxy shuts down: nothing is pooled any more, so idle connections do
    /// not hold up the drain.
    closed: AtomicBool,
    /// Owns the tasks that wait for a connection to become idle (so shutdown sees them).
    tasks: TaskTracker,
    hard_stop: CancellationToken,
}

struct IdleConnection {
    sender: SendRequest<Incoming>,
    since: Instant,
}

impl UpstreamPool {
    pub fn new(tasks: TaskTracker, hard_stop: CancellationToken) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                idle: DashMap::new(),
                closed: AtomicBool::new(false),
                tasks,
                hard_stop,
            }),
        }
    }

    /// An idle connection to `backend` that can take a request now, if there is one.
    pub fn take(&self, backend: &BackendName) -> Option<SendRequest<Incoming>> {
        let mut idle = self.inner.idle.get_mut(backend)?;
        // Newest first: the likeliest to be alive. Stale or closed ones are dropped.
        while let Some(connection) = idle.pop() {
            if connection.since.elapsed() < IDLE_TIMEOUT && connection.sender.is_ready() {
                return Some(connection.sender);
            }
        }
        None
    }

    /// Keeps a connection whose response has ended for the next request to `backend`.
    pub fn put(&self, backend: &BackendName, sender: SendRequest<Incoming>) {
        if !sender.is_ready() || self.inner.closed.load(Ordering::Acquire) {
            return;
        }
        let connection = IdleConnection {
            sender,
            since: Instant::now(),
        };
        // The backend's list usually exists already: no name is cloned for it.
        if let Some(mut idle) = self.inner.idle.get_mut(backend) {
            if idle.len() < MAX_IDLE_PER_BACKEND {
                idle.push(connection);
            }
            return;
        }
        self.inner
            .idle
            .entry(backend.clone())
            .or_default()
            .push(connection);
    }

    /// Closes every idle connection and pools no more (the proxy is shutting down).
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.idle.clear();
    }

    /// Closes every idle connection to a backend that is going away.
    pub fn remove_backend(&self, backend: &BackendName) {
        self.inner.idle.remove(backend);
    }
}

/// A backend connection lent to one response, to be given back when the response body has
/// been read to the end.
pub struct PooledReturn {
    pub pool: UpstreamPool,
    /// The backend the connection leads to.
    pub route: Arc<Route>,
    pub sender: SendRequest<Incoming>,
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
