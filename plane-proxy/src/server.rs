//! Accepts client connections (plain and TLS) and serves HTTP/1.1 or HTTP/2 on each, one task
//! per connection.
//!
//! A keep-alive connection that sits idle is *parked*: hyper's part of it ends (freeing the
//! read and write buffers hyper keeps for every connection, some 11 KiB) while the socket
//! stays open, and hyper starts on it afresh when the client sends again. So thousands of idle
//! keep-alive connections cost little more than their sockets.

use crate::body::ProxyBody;
use crate::client_stream::ClientStream;
use crate::proxy_service::{ClientConnection, ProxyState};
use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// A client that has not sent a complete request head by then is disconnected, so idle or
/// slow-loris connections cannot pile up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// A connection with no request in flight, and none begun, for this long is parked. Long
/// enough that a client sending requests back to back never pays for a restart of hyper.
const PARK_AFTER: Duration = Duration::from_secs(2);
/// A parked connection that stays silent this long is closed, as hyper closes one that sends
/// no complete request head within [`HEADER_READ_TIMEOUT`].
const PARKED_TIMEOUT: Duration = HEADER_READ_TIMEOUT;

/// Serves connections until told to drain.
pub struct Server {
    pub state: ProxyState,
    pub tasks: TaskTracker,
    /// Fires when shutdown begins: stop accepting, finish in-flight requests, then close.
    pub drain: CancellationToken,
    /// Fires when the grace period is over: drop whatever is still open.
    pub hard_stop: CancellationToken,
    /// How many client connections are parked right now.
    pub parked: Arc<AtomicUsize>,
}

/// Counts a connection as parked while it lives.
struct Parked<'a>(&'a AtomicUsize);

impl<'a> Parked<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Server {
    /// Accepts connections until `drain` fires, then drops the listener: plain HTTP, or
    /// HTTPS when given a TLS acceptor.
    pub async fn accept_loop(self, listener: TcpListener, tls: Option<TlsAcceptor>) {
        loop {
            let accepted = tokio::select! {
                _ = self.drain.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, remote_addr)) => {
                    if let Err(error) = stream.set_nodelay(true) {
                        debug!(%error, "could not set TCP_NODELAY on a client connection");
                    }
                    match &tls {
                        None => {
                            let client = ClientConnection::new(remote_addr, "http");
                            self.serve_connection(stream, client);
                        }
                        Some(acceptor) => {
                            let client = ClientConnection::new(remote_addr, "https");
                            self.serve_tls_connection(stream, acceptor.clone(), client);
                        }
                    }
                }
                Err(error) => {
                    warn!(%error, "accepting a connection failed");
                    tokio::select! {
                        _ = self.drain.cancelled() => return,
                        _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                    }
                }
            }
        }
    }

    /// Serves HTTP/1.1 (with upgrades) on one client connection, on its own tracked task,
    /// parking it whenever it sits idle.
    pub fn serve_connection(&self, stream: TcpStream, client: ClientConnection) {
        let state = self.state.clone();
        let drain = self.drain.clone();
        let hard_stop = self.hard_stop.clone();
        let parked_count = self.parked.clone();
        self.tasks.spawn(async move {
            let _open = state.metrics().connection_open();
            let remote_addr = client.remote_addr;
            // HTTP/2 with prior knowledge (h2c) starts with its preface; such a connection is
            // served by hyper's HTTP/2 server for its whole life (it multiplexes, so it is
            // never idle in the way parking needs).
            match starts_with_h2_preface(&stream).await {
                Some(true) => {
                    serve_whole(stream, state, client, drain, hard_stop).await;
                    return;
                }
                Some(false) => {}
                None => return,
            }
            let keep_open = Arc::new(AtomicBool::new(false));
            let mut stream = stream;
            let mut prefix = Bytes::new();
            loop {
                // Boxed: hyper's connection state lives on the heap only while it runs, so a
                // parked connection's task is a few hundred bytes, not the size of hyper's.
                let served = Box::pin(serve_until_idle(
                    ClientStream::new(stream, prefix, keep_open.clone()),
                    &state,
                    &client,
                    &keep_open,
                    &drain,
                    &hard_stop,
                ))
                .await;
                let (parked, early) = match served {
                    Ok(Some(parked)) => parked,
                    Ok(None) => return,
                    Err(error) => {
                        // Clients vanish mid-request all the time; not worth more than debug.
                        debug!(remote = %remote_addr, %error, "client connection ended with an error");
                        return;
                    }
                };
                if early.is_empty() {
                    // Parked: nothing but the socket is held until the client speaks.
                    let _parked = Parked::new(&parked_count);
                    tokio::select! {
                        readable = parked.readable() => if readable.is_err() { return },
                        _ = tokio::time::sleep(PARKED_TIMEOUT) => return,
                        _ = drain.cancelled() => return,
                    }
                }
                stream = parked;
                prefix = early;
            }
        });
    }
}

/// Runs hyper on `io` until the client closes, an upgrade takes the connection over, or it
/// has been idle for [`PARK_AFTER`]. In the last case returns the socket with the bytes
/// hyper had read but not used, for the next round.
async fn serve_until_idle(
    io: ClientStream,
    state: &ProxyState,
    client: &ClientConnection,
    keep_open: &AtomicBool,
    drain: &CancellationToken,
    hard_stop: &CancellationToken,
) -> Result<Option<(TcpStream, Bytes)>, hyper::Error> {
    keep_open.store(false, Ordering::Release);
    let activity = Arc::new(Activity::default());
    let service = {
        let state = state.clone();
        let client = client.clone();
        let activity = activity.clone();
        service_fn(move |request| {
            let state = state.clone();
            let client = client.clone();
            let busy = activity.begin();
            async move {
                let response = state.handle(request, client).await;
                Ok::<_, Infallible>(response.map(|body| TrackedBody { body, _busy: busy }))
            }
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let mut connection = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut parking = false;
    let mut draining = false;
    let result = loop {
        tokio::select! {
            result = &mut connection => break result,
            _ = activity.idle_for(PARK_AFTER), if !parking && !draining => {
                // hyper closes an idle connection at once; its closing shutdown is not
                // passed on, so the client's connection stays open.
                parking = true;
                keep_open.store(true, Ordering::Release);
                Pin::new(&mut connection).graceful_shutdown();
            }
            _ = drain.cancelled(), if !draining => {
                // Finish the request in flight (if any), then really close.
                draining = true;
                keep_open.store(false, Ordering::Release);
                Pin::new(&mut connection).graceful_shutdown();
            }
            _ = hard_stop.cancelled() => return Ok(None),
        }
    };
    result?;
    if !parking || draining {
        return Ok(None);
    }
    // `None` once upgraded: the tunnel owns the connection now.
    let Some(parts) = connection.into_parts() else {
        return Ok(None);
    };
    let (stream, unread_prefix) = parts.io.into_inner().into_parts();
    // hyper's buffered bytes came before what it never read of the prefix. Copied out (and
    // an empty one replaced), because `read_buf` shares hyper's whole read buffer: keeping it
    // would keep the very memory parking is meant to free.
    let early = if parts.read_buf.is_empty() && unread_prefix.is_empty() {
        Bytes::new()
    } else {
        let mut early = BytesMut::with_capacity(parts.read_buf.len() + unread_prefix.len());
        early.extend_from_slice(&parts.read_buf);
        early.extend_from_slice(&unread_prefix);
        early.freeze()
    };
    Ok(Some((stream, early)))
}

/// The first bytes of every HTTP/2 connection (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the client's first bytes are the HTTP/2 preface, without consuming them. `None`
/// when the client sends nothing within [`HEADER_READ_TIMEOUT`] or goes away.
async fn starts_with_h2_preface(stream: &TcpStream) -> Option<bool> {
    let look = async {
        let mut buffer = [0u8; 24];
        loop {
            let read = stream.peek(&mut buffer).await.ok()?;
            if read == 0 {
                return None;
            }
            if buffer[..read] != H2_PREFACE[..read] {
                return Some(false);
            }
            if read == H2_PREFACE.len() {
                return Some(true);
            }
            // Part of the preface so far: the rest is on its way.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(HEADER_READ_TIMEOUT, look)
        .await
        .ok()
        .flatten()
}

/// Serves a connection for its whole life, without parking: HTTP/2 if it opens with the
/// preface, else HTTP/1.1 (with upgrades); until the client closes it or the proxy shuts down.
/// For TLS connections (whose session state must stay) and h2c (multiplexed, rarely idle).
async fn serve_whole<I>(
    io: I,
    state: ProxyState,
    client: ClientConnection,
    drain: CancellationToken,
    hard_stop: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let remote_addr = client.remote_addr;
    let service = service_fn(move |request| {
        let state = state.clone();
        let client = client.clone();
        async move { Ok::<_, Infallible>(state.handle(request, client).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    // WebSockets over HTTP/2 (RFC 8441): advertised, so browsers keep them on the one
    // connection instead of opening an HTTP/1.1 one per socket.
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol();
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        tokio::select! {
            result = &mut connection => {
                if let Err(error) = result {
                    debug!(remote = %remote_addr, %error, "client connection ended with an error");
                }
                return;
            }
            _ = drain.cancelled(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = hard_stop.cancelled() => return,
        }
    }
}

/// How long a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Server {
    /// Serves HTTP/2 or HTTP/1.1 (with upgrades) over TLS on one client connection, on its own
    /// tracked task. TLS connections are not parked: their session state must stay.
    fn serve_tls_connection(
        &self,
        stream: TcpStream,
        acceptor: TlsAcceptor,
        client: ClientConnection,
    ) {
        let state = self.state.clone();
        let drain = self.drain.clone();
        let hard_stop = self.hard_stop.clone();
        self.tasks.spawn(async move {
            let _open = state.metrics().connection_open();
            let remote_addr = client.remote_addr;
            let tls =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        debug!(remote = %remote_addr, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(remote = %remote_addr, "TLS handshake timed out");
                        return;
                    }
                };
            // HTTP/2 when the client chose it by ALPN, else HTTP/1.1.
            serve_whole(tls, state, client, drain, hard_stop).await;
        });
    }
}

/// Whether a connection has requests in flight, and since when it has had none.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    /// Counts requests begun, so an idle period interrupted by a request is noticed.
    begun: AtomicU64,
    /// Woken when the last request in flight ends.
    idle: Notify,
}

impl Activity {
    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.begun.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    /// Resolves once no request has been in flight, and none has begun, for `period`.
    async fn idle_for(&self, period: Duration) {
        loop {
            if self.in_flight.load(Ordering::Acquire) == 0 {
                let begun = self.begun.load(Ordering::Acquire);
                tokio::time::sleep(period).await;
                if self.in_flight.load(Ordering::Acquire) == 0
                    && self.begun.load(Ordering::Acquire) == begun
                {
                    return;
                }
            } else {
                // A permit stored by `notify_one` is not lost if the request ended between
                // the load above and this wait.
                self.idle.notified().await;
            }
        }
    }
}

/// One request in flight on a connection, until its response body is gone.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_one();
        }
    }
}

/// A response body that keeps its request counted as in flight until hyper is done with it.
struct TrackedBody {
    body: ProxyBody,
    _busy: Busy,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
