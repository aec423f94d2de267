//! The body type of every response the proxy sends: a backend's streamed body or one of the
//! proxy's own. A streamed body holds the backend's connection guard until it ends, and hands
//! the backend connection back to the pool the moment its last byte has been read. And the
//! body of every request to a backend, which counts the bytes it carries.

use crate::connection_tracker::ConnectionGuard;
use crate::upstream_pool::PooledReturn;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use prometheus_client::metrics::counter::Counter;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A response body. While it holds a guard, the backend counts as having an open connection,
/// so a long streaming response (server-sent events, a download) keeps it from being reaped.
///
/// An enum rather than a boxed body: no allocation or dynamic dispatch per response.
pub enum ProxyBody {
    /// A complete body the proxy wrote itself (`None` once sent).
    Full(Option<Bytes>),
    /// A backend's body, streamed through.
    Streamed(Box<Streamed>),
}

/// Boxed inside [`ProxyBody`] so the common small cases stay small.
pub struct Streamed {
    body: Incoming,
    /// Bytes passed on to the client.
    relayed: Counter,
    guard: Option<ConnectionGuard>,
    /// The backend connection the body arrives on, to pool again once the body has ended.
    pooled: Option<PooledReturn>,
}

impl ProxyBody {
    /// A complete body the proxy wrote itself.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::Full(Some(bytes.into()))
    }

    pub fn empty() -> Self {
        Self::Full(None)
    }

    /// A backend's body, streamed through; `guard` is released when it ends or is dropped,
    /// and `pooled` goes back to its pool if (and only if) the body was read to the end.
    pub fn streamed(
        body: Incoming,
        guard: ConnectionGuard,
        pooled: Option<PooledReturn>,
        relayed: Counter,
    ) -> Self {
        Self::Streamed(Box::new(Streamed {
            body,
            relayed,
            guard: Some(guard),
            pooled,
        }))
    }
}

impl Streamed {
    /// The body is over: the connection is closed in the tracker's eyes even if hyper keeps
    /// the body a little longer, and a fully read backend connection can serve again.
    fn finish(&mut self, complete: bool) {
        self.guard = None;
        if let Some(pooled) = self.pooled.take() {
            if complete {
                pooled.give_back();
            }
        }
    }
}

impl Drop for Streamed {
    fn drop(&mut self) {
        // A body hyper never had to poll (empty, or ended with its last frame) still ended.
        let complete = self.body.is_end_stream();
        self.finish(complete);
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|bytes| Ok(Frame::data(bytes)))),
            Self::Streamed(streamed) => {
                let polled = Pin::new(&mut streamed.body).poll_frame(cx);
                count_data(&polled, &streamed.relayed);
                match &polled {
                    Poll::Ready(None) => streamed.finish(true),
                    Poll::Ready(Some(Err(_))) => streamed.finish(false),
                    // hyper stops polling once `is_end_stream` says so (a body of known
                    // length), so the end is noticed with the last frame too.
                    Poll::Ready(Some(Ok(_))) if streamed.body.is_end_stream() => {
                        streamed.finish(true)
                    }
                    _ => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(bytes) => bytes.is_none(),
            Self::Streamed(streamed) => streamed.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Self::Full(None) => SizeHint::with_exact(0),
            Self::Streamed(streamed) => streamed.body.size_hint(),
        }
    }
}

/// Adds a polled data frame's length to `relayed`.
fn count_data<E>(polled: &Poll<Option<Result<Frame<Bytes>, E>>>, relayed: &Counter) {
    if let Poll::Ready(Some(Ok(frame))) = polled {
        if let Some(data) = frame.data_ref() {
            relayed.inc_by(data.len() as u64);
        }
    }
}

/// A client's request body on its way to a backend, counting the bytes it carries.
pub struct RequestBody {
    body: Incoming,
    relayed: Counter,
}

impl RequestBody {
    pub fn new(body: Incoming, relayed: Counter) -> Self {
        Self { body, relayed }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        count_data(&polled, &this.relayed);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
