//! Keep-alive connections to backends, reused across requests and clients, so a request
//! pays for neither a TCP connect nor a new flow through Docker's port forwarder.
//!
//! A connection goes back to the pool once its response has been read to the end (hyper's
//! `ready()` says so), at most [`MAX_IDLE_PER_BACKEND`] per backend. The pool of a backend is
//! dropped, closing its connections, when the controller says the backend is removed; an
//! idle connection older than [`IDLE_TIMEOUT`] is closed instead of reused. Upgrades
//! (WebSockets) always get a connection of their own, which becomes their tunnel.

use dashmap::DashMap;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use plane_protocol::names::BackendName;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Idle connections kept per backend; more are closed when their response ends.
pub const MAX_IDLE_PER_BACKEND: usize = 32;
/// An idle connection older than this is closed rather than reused (backends commonly drop
/// keep-alive connections after a minute or so, and a reused dead one costs a retry).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Cheap to clone; every clone sees the same connections.
#[derive(Clone, Default)]
pub struct UpstreamPool {
    idle: Arc<DashMap<BackendName, Vec<IdleConnection>>>,
    /// Set when the proxy shuts down: nothing is pooled any more, so idle connections do
    /// not hold up the drain.
    closed: Arc<AtomicBool>,
}

struct IdleConnection {
    sender: SendRequest<Incoming>,
    since: Instant,
}

impl UpstreamPool {
    /// An idle connection to `backend` that can take a request now, if there is one.
    pub fn take(&self, backend: &BackendName) -> Option<SendRequest<Incoming>> {
        let mut idle = self.idle.get_mut(backend)?;
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
        if !sender.is_ready() || self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut idle = self.idle.entry(backend.clone()).or_default();
        if idle.len() < MAX_IDLE_PER_BACKEND {
            idle.push(IdleConnection {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Closes every idle connection and pools no more (the proxy is shutting down).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.idle.clear();
    }

    /// Closes every idle connection to a backend that is going away.
    pub fn remove_backend(&self, backend: &BackendName) {
        self.idle.remove(backend);
    }
}
