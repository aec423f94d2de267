//! The body type of every response the proxy sends: a backend's streamed body or one of the
//! proxy's own, optionally holding a connection guard until the body has been sent.

use crate::connection_tracker::ConnectionGuard;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};

/// A response body. While it holds a guard, the backend counts as having an open connection,
/// so a long streaming response (server-sent events, a download) keeps it from being reaped.
pub struct ProxyBody {
    inner: UnsyncBoxBody<Bytes, hyper::Error>,
    guard: Option<ConnectionGuard>,
}

impl ProxyBody {
    /// A complete body the proxy wrote itself.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self {
            inner: Full::new(bytes.into())
                .map_err(|never| match never {})
                .boxed_unsync(),
            guard: None,
        }
    }

    pub fn empty() -> Self {
        Self {
            inner: Empty::new().map_err(|never| match never {}).boxed_unsync(),
            guard: None,
        }
    }

    /// A backend's body, streamed through; `guard` is released when it ends or is dropped.
    pub fn streamed(body: Incoming, guard: ConnectionGuard) -> Self {
        Self {
            inner: body.boxed_unsync(),
            guard: Some(guard),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            // Finished (or failed): the connection is over even if hyper keeps the body a
            // little longer.
            this.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
