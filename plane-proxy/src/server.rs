//! Accepts client connections and serves HTTP/1.1 on each, one task per connection. Serving
//! is generic over the stream type so a TLS acceptor can be put in front of it later.

use crate::proxy_service::{ClientConnection, ProxyState};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// A client that has not sent a complete request head by then is disconnected, so idle or
/// slow-loris connections cannot pile up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves connections until told to drain.
pub struct Server {
    pub state: ProxyState,
    pub tasks: TaskTracker,
    /// Fires when shutdown begins: stop accepting, finish in-flight requests, then close.
    pub drain: CancellationToken,
    /// Fires when the grace period is over: drop whatever is still open.
    pub hard_stop: CancellationToken,
}

impl Server {
    /// Accepts plain-HTTP connections until `drain` fires, then drops the listener.
    pub async fn accept_loop(self, listener: TcpListener) {
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
                    let client = ClientConnection::new(remote_addr, "http");
                    self.serve_connection(stream, client);
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

    /// Serves HTTP/1.1 (with upgrades) on one client connection, on its own tracked task.
    pub fn serve_connection<I>(&self, io: I, client: ClientConnection)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let state = self.state.clone();
        let drain = self.drain.clone();
        let hard_stop = self.hard_stop.clone();
        self.tasks.spawn(async move {
            let remote_addr = client.remote_addr;
            let service = service_fn(move |request| {
                let state = state.clone();
                let client = client.clone();
                async move { Ok::<_, Infallible>(state.handle(request, client).await) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let connection = builder
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = drain.cancelled() => {
                    // Finish the request in flight (if any), then close.
                    connection.as_mut().graceful_shutdown();
                    tokio::select! {
                        result = connection.as_mut() => result,
                        _ = hard_stop.cancelled() => Ok(()),
                    }
                }
            };
            if let Err(error) = result {
                // Clients vanish mid-request all the time; not worth more than debug.
                debug!(remote = %remote_addr, %error, "client connection ended with an error");
            }
        });
    }
}
