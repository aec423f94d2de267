//! One request's journey: take the token from the path, resolve its route, forward the
//! request to the backend with its headers rewritten, and stream the answer back. An upgrade
//! (WebSocket) the backend accepts becomes a byte tunnel between client and backend.

use crate::body::{ProxyBody, RequestBody};
use crate::connection_tracker::{ConnectionGuard, ConnectionTracker};
use crate::controller_connection::{ControllerClient, RouteError};
use crate::headers;
use crate::metrics::ProxyMetrics;
use crate::responses;
use crate::route::Route;
use crate::tls::CertFile;
use crate::tunnel;
use crate::upstream_pool::{PooledReturn, UpstreamPool};
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo};
use plane_protocol::names::BearerToken;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// What the proxy knows about the client connection a request arrived on.
#[derive(Clone, Debug)]
pub struct ClientConnection {
    pub remote_addr: SocketAddr,
    /// `http` or `https`, as the client connected. Sent as `x-forwarded-proto`.
    pub scheme: &'static str,
    /// `x-forwarded-for`, rendered once per connection rather than per request.
    pub forwarded_for: HeaderValue,
}

impl ClientConnection {
    pub fn new(remote_addr: SocketAddr, scheme: &'static str) -> Self {
        Self {
            remote_addr,
            scheme,
            forwarded_for: headers::forwarded_for(remote_addr.ip()),
        }
    }
}

/// Everything request handling needs. Cheap to clone.
#[derive(Clone)]
pub struct ProxyState {
    inner: Arc<StateParts>,
}

/// What a [`ProxyState`] is made of.
pub struct StateParts {
    pub controller: ControllerClient,
    pub tracker: ConnectionTracker,
    /// Owns the tasks requests spawn (backend connections, tunnels) so shutdown waits for them.
    pub tasks: TaskTracker,
    /// Fires when the shutdown grace period is over and in-flight work must stop.
    pub hard_stop: CancellationToken,
    pub timeouts: BackendTimeouts,
    /// Keep-alive connections to backends, reused across requests.
    pub pool: UpstreamPool,
    /// The HTTPS port, when the proxy serves HTTPS: plain HTTP requests are redirected there.
    pub https_port: Option<u16>,
    /// The certificate served over HTTPS, when it does.
    pub cert: Option<Arc<CertFile>>,
    pub metrics: ProxyMetrics,
}

/// How long a backend may take.
#[derive(Clone, Copy, Debug)]
pub struct BackendTimeouts {
    /// To accept a TCP connection (then 502).
    pub connect: Duration,
    /// To start answering a request: its response head (then 504).
    pub answer: Duration,
}

/// Why the backend exchange failed; every case is answered with 502.
#[derive(Debug, thiserror::Error)]
enum BackendError {
    #[error("connecting timed out")]
    ConnectTimeout,
    #[error("could not connect: {0}")]
    Connect(std::io::Error),
    #[error("HTTP exchange failed: {0}")]
    Http(hyper::Error),
    #[error("the request cannot be sent over HTTP/2: {0}")]
    Request(String),
}

/// The request's URL over HTTPS on `port`: its host (without the HTTP port), path and query.
fn https_location(request: &Request<Incoming>, port: u16) -> String {
    let host = request
        .headers()
        .get(http::header::HOST)
        .and_then(|value| value.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()))
        .unwrap_or("localhost");
    // Strip a port, keeping IPv6 literals (`[::1]:80`) whole.
    let host = match host.rsplit_once(':') {
        Some((name, port)) if !name.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            if host.starts_with('[') && !name.ends_with(']') {
                host
            } else {
                name
            }
        }
        _ => host,
    };
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |path| path.as_str());
    if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    }
}

/// Splits `/<token>/rest?query` into the token and the path the backend sees
/// (`/rest?query`; `/` when the URL is just the token). `None` when there is no token.
/// The path is `Bytes` so the request URI and `x-verified-path` share one copy of it.
fn split_token(uri: &Uri) -> Option<(&str, Bytes)> {
    let rest = uri.path().strip_prefix('/')?;
    let (token, tail) = rest.split_once('/').unwrap_or((rest, ""));
    if token.is_empty() {
        return None;
    }
    let query = uri.query();
    let mut backend_path = Vec::with_capacity(2 + tail.len() + query.map_or(0, str::len));
    backend_path.push(b'/');
    backend_path.extend_from_slice(tail.as_bytes());
    if let Some(query) = query {
        backend_path.push(b'?');
        backend_path.extend_from_slice(query.as_bytes());
    }
    Some((token, Bytes::from(backend_path)))
}

impl ProxyState {
    pub fn new(parts: StateParts) -> Self {
        Self {
            inner: Arc::new(parts),
        }
    }

    pub fn metrics(&self) -> &ProxyMetrics {
        &self.inner.metrics
    }

    /// Answers one request. Never fails: every problem becomes one of `responses`.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        client: ClientConnection,
    ) -> Response<ProxyBody> {
        let response = self.respond(request, client).await;
        self.inner.metrics.response(response.status());
        response
    }

    async fn respond(
        &self,
        mut request: Request<Incoming>,
        client: ClientConnection,
    ) -> Response<ProxyBody> {
        if request.uri().path() == "/ready" {
            return self.ready();
        }
        let h2_websocket = headers::is_h2_websocket(&request);
        if request.method() == http::Method::CONNECT && !h2_websocket {
            return responses::unsupported_connect();
        }
        if let (Some(port), "http") = (self.inner.https_port, client.scheme) {
            // ACME HTTP-01 and similar must stay reachable over plain HTTP.
            if !request.uri().path().starts_with("/.well-known/") {
                return responses::redirect_to_https(&https_location(&request, port));
            }
        }
        let Some((token, backend_path)) = split_token(request.uri()) else {
            return responses::missing_token();
        };
        let cached = self.inner.controller.cached_route(token);
        self.inner.metrics.route_lookup(cached.is_some());
        let route = match cached {
            Some(route) => route,
            None => {
                // A malformed token can never be valid, so it is unknown without asking.
                let Ok(token) = token.parse::<BearerToken>() else {
                    return responses::unknown_token();
                };
                // Held here while the backend starts. Nothing counts as activity on the
                // backend until the route is known, so held requests cannot keep a failing
                // backend alive.
                match self.inner.controller.route(&token).await {
                    Ok(route) => route,
                    Err(error) => return self.route_error(error),
                }
            }
        };
        // A cached route outlives its token's lifetime; the token does not.
        if route.has_expired() {
            return responses::token_expired();
        }
        // A subdomain backend's token works only at its own host (looked up only for those).
        if route.served_at.is_some() {
            let host = request
                .headers()
                .get(http::header::HOST)
                .and_then(|value| value.to_str().ok())
                .or_else(|| {
                    request
                        .uri()
                        .authority()
                        .map(|authority| authority.as_str())
                });
            if !route.serves_host(host) {
                return responses::wrong_host(route.served_at.as_deref().unwrap_or_default());
            }
        }
        // From here until the response body ends (or the tunnel closes) the backend has an
        // open connection.
        let guard = self.inner.tracker.open(&route.backend_id);

        let upgrade = h2_websocket || headers::is_upgrade(request.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
        let backend_request = match backend_request(
            request,
            &route,
            backend_path,
            &client,
            h2_websocket,
            self.inner.metrics.to_backends(),
        ) {
            Ok(backend_request) => backend_request,
            Err(error) => {
                warn!(backend = %route.backend_id, %error, "could not build the backend request");
                return responses::internal_error();
            }
        };

        let exchange = self.exchange(&route, backend_request, upgrade);
        let sent = std::time::Instant::now();
        let (response, sender) = match tokio::time::timeout(self.inner.timeouts.answer, exchange)
            .await
        {
            Ok(Ok(exchanged)) => {
                self.inner.metrics.upstream_answered(sent.elapsed());
                exchanged
            }
            Ok(Err(error)) => {
                debug!(backend = %route.backend_id, address = %route.address, %error, "backend unreachable");
                return responses::bad_gateway();
            }
            Err(_) => {
                // Its connection is dropped with the exchange: nothing reuses it.
                debug!(backend = %route.backend_id, address = %route.address, "backend did not answer in time");
                return responses::upstream_timeout(self.inner.timeouts.answer);
            }
        };

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return match client_upgrade {
                Some(client_upgrade) => {
                    self.start_tunnel(client_upgrade, response, guard, h2_websocket)
                }
                None => {
                    debug!(backend = %route.backend_id, "backend switched protocols unasked");
                    responses::bad_gateway()
                }
            };
        }
        let pooled = sender.map(|sender| PooledReturn {
            pool: self.inner.pool.clone(),
            route: Arc::clone(&route),
            sender,
            removed: guard.removed(),
        });
        let (mut parts, body) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, false);
        let relayed = self.inner.metrics.to_clients();
        Response::from_parts(parts, ProxyBody::streamed(body, guard, pooled, relayed))
    }

    /// `GET /ready`: 200 when the proxy can route (linked to the controller, and holding a
    /// certificate if it serves HTTPS), 503 otherwise; the body says which part is missing.
    /// Never a token, which is longer.
    fn ready(&self) -> Response<ProxyBody> {
        let controller = self.inner.controller.is_connected();
        let certificate = self
            .inner
            .cert
            .as_ref()
            .map(|cert| cert.current().is_some());
        responses::ready(controller, certificate)
    }

    fn route_error(&self, error: RouteError) -> Response<ProxyBody> {
        match error {
            RouteError::Unknown => responses::unknown_token(),
            RouteError::Expired => responses::token_expired(),
            RouteError::Terminated { reason, exit_code } => {
                responses::backend_terminated(reason, exit_code)
            }
            RouteError::HoldTimeout => {
                responses::hold_timeout(self.inner.controller.hold_timeout())
            }
            RouteError::ControllerUnavailable => responses::controller_unavailable(),
            RouteError::TooManyHeld => responses::too_many_held_requests(),
            RouteError::Unusable => responses::internal_error(),
        }
    }

    /// Sends `request` to the backend and returns its response head (the body streams
    /// afterwards) with, for a plain request, the connection to pool again once that body
    /// has been read. A plain request reuses a pooled keep-alive connection when there is
    /// one; an upgrade always gets a fresh connection, which becomes its tunnel.
    async fn exchange(
        &self,
        route: &Route,
        request: Request<RequestBody>,
        upgrade: bool,
    ) -> Result<(Response<Incoming>, Option<SendRequest<RequestBody>>), BackendError> {
        let pool = &self.inner.pool;
        let mut request = request;
        if route.http2 && !upgrade {
            return self.exchange_http2(route, request).await;
        }
        if !upgrade {
            // A pooled connection the backend has meanwhile closed gives the request back
            // unsent; then the next one (or a fresh one) is tried.
            while let Some(mut sender) = pool.take(&route.backend_id) {
                match sender.try_send_request(request).await {
                    Ok(response) => return Ok((response, Some(sender))),
                    Err(mut error) => match error.take_message() {
                        Some(unsent) => request = unsent,
                        None => return Err(BackendError::Http(error.into_error())),
                    },
                }
            }
        }
        let mut sender = self.connect(route.address).await?;
        let response = sender
            .send_request(request)
            .await
            .map_err(BackendError::Http)?;
        Ok((response, (!upgrade).then_some(sender)))
    }

    /// Sends `request` to an HTTP/2 backend over its shared connection (opening it first if
    /// there is none, or the shared one has closed without taking the request).
    async fn exchange_http2(
        &self,
        route: &Route,
        request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<SendRequest<RequestBody>>), BackendError> {
        let pool = &self.inner.pool;
        let mut request = into_http2(request)?;
        if let Some(mut sender) = pool.take_multiplexed(&route.backend_id) {
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, None)),
                Err(mut error) => match error.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(BackendError::Http(error.into_error())),
                },
            }
        }
        let stream = self.connect_tcp(route.address).await?;
        let (mut sender, connection) =
            hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .handshake(TokioIo::new(stream))
                .await
                .map_err(BackendError::Http)?;
        self.drive(connection);
        pool.put_multiplexed(&route.backend_id, sender.clone());
        let response = sender
            .send_request(request)
            .await
            .map_err(BackendError::Http)?;
        Ok((response, None))
    }

    /// Runs a backend connection until it ends (an HTTP/2 one: once every sender is gone),
    /// or a hard stop.
    fn drive<C>(&self, connection: C)
    where
        C: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
    {
        let hard_stop = self.inner.hard_stop.clone();
        self.inner.tasks.spawn(async move {
            tokio::select! {
                result = connection => {
                    if let Err(error) = result {
                        debug!(%error, "backend connection ended with an error");
                    }
                }
                _ = hard_stop.cancelled() => {}
            }
        });
    }

    async fn connect_tcp(&self, address: SocketAddr) -> Result<TcpStream, BackendError> {
        let connect = TcpStream::connect(address);
        let stream = tokio::time::timeout(self.inner.timeouts.connect, connect)
            .await
            .map_err(|_| BackendError::ConnectTimeout)?
            .map_err(BackendError::Connect)?;
        // Interactive traffic (WebSocket frames) should not wait for Nagle's algorithm.
        if let Err(error) = stream.set_nodelay(true) {
            debug!(%error, "could not set TCP_NODELAY on a backend connection");
        }
        Ok(stream)
    }

    /// Opens a new HTTP/1.1 connection to a backend; its driving task ends when every
    /// handle to it is gone (or on a hard stop).
    async fn connect(&self, address: SocketAddr) -> Result<SendRequest<RequestBody>, BackendError> {
        let stream = self.connect_tcp(address).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(BackendError::Http)?;
        // Ends once every sender is gone and the connection is idle, or, for an upgrade,
        // once the connection is handed over to the tunnel.
        self.drive(connection.with_upgrades());
        Ok(sender)
    }

    /// Answers the client's upgrade with the backend's 101 and joins the two connections once
    /// hyper has handed both over. The guard lives as long as the tunnel.
    /// For an RFC 8441 client (`h2_websocket`) the answer is 200 rather than 101.
    fn start_tunnel(
        &self,
        client_upgrade: OnUpgrade,
        mut response: Response<Incoming>,
        guard: ConnectionGuard,
        h2_websocket: bool,
    ) -> Response<ProxyBody> {
        let backend_upgrade = hyper::upgrade::on(&mut response);
        let hard_stop = self.inner.hard_stop.clone();
        let removed = guard.removed();
        let metrics = self.inner.metrics.clone();
        self.inner.tasks.spawn(async move {
            let _open = metrics.websocket_open();
            let backend = guard.backend().clone();
            let tunnel = async {
                let (client, backend) = match tokio::try_join!(client_upgrade, backend_upgrade) {
                    Ok(upgraded) => upgraded,
                    Err(error) => {
                        debug!(%error, "upgrade did not complete");
                        return;
                    }
                };
                let relayed = (metrics.to_backends(), metrics.to_clients());
                if let Err(error) = tunnel::join(client, backend, relayed).await {
                    debug!(%error, "tunnel ended with an error");
                }
            };
            tokio::select! {
                _ = tunnel => {}
                _ = removed.wait() => debug!(%backend, "tunnel closed: backend removed"),
                _ = hard_stop.cancelled() => debug!(%backend, "tunnel cut by shutdown"),
            }
            drop(guard);
        });
        let (mut parts, _) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, true);
        if h2_websocket {
            headers::http1_websocket_response_to_h2(&mut parts);
        }
        Response::from_parts(parts, ProxyBody::empty())
    }
}

/// A backend request (as [`backend_request`] made it) for an HTTP/2 backend: the host moves
/// from the `Host` header to the `:authority`.
fn into_http2(request: Request<RequestBody>) -> Result<Request<RequestBody>, BackendError> {
    let (mut parts, body) = request.into_parts();
    let host = parts
        .headers
        .remove(header::HOST)
        .and_then(|host| host.to_str().ok().map(str::to_string))
        .unwrap_or_else(|| "localhost".to_string());
    let path = parts
        .uri
        .path_and_query()
        .map(|path| path.as_str())
        .unwrap_or("/");
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(host)
        .path_and_query(path)
        .build()
        .map_err(|error| BackendError::Request(error.to_string()))?;
    parts.version = Version::HTTP_2;
    Ok(Request::from_parts(parts, body))
}

/// The request as the backend should see it (an RFC 8441 WebSocket, `h2_websocket`, as the
/// HTTP/1.1 upgrade backends expect): token removed from the path, body streamed
/// as-is, hop-by-hop and spoofed headers removed, verified and forwarding headers added.
fn backend_request(
    request: Request<Incoming>,
    route: &Route,
    backend_path: Bytes,
    client: &ClientConnection,
    h2_websocket: bool,
    relayed: prometheus_client::metrics::counter::Counter,
) -> Result<Request<RequestBody>, anyhow::Error> {
    let (mut parts, body) = request.into_parts();
    if h2_websocket {
        headers::h2_websocket_to_http1(&mut parts);
    }
    let upgrade = headers::is_upgrade(&parts.headers);
    // An HTTP/2 client names the host in `:authority` rather than a Host header.
    let authority = parts
        .uri
        .authority()
        .and_then(|authority| HeaderValue::from_str(authority.as_str()).ok());
    parts.uri = Uri::from_maybe_shared(backend_path.clone())?;
    // HTTP/1.1 to the backend whatever the client spoke, so bodies of unknown length can be
    // streamed chunked.
    parts.version = Version::HTTP_11;
    // Extensions describe the client connection (e.g. its pending upgrade); none of that is
    // meant for the backend connection.
    parts.extensions = http::Extensions::new();
    let headers = &mut parts.headers;
    headers::strip_hop_by_hop(headers, upgrade);
    headers::strip_verified(headers);
    headers::add_verified(
        headers,
        route,
        HeaderValue::from_maybe_shared(backend_path)?,
    );
    headers::set_forwarded(headers, &client.forwarded_for, client.scheme);
    if !headers.contains_key(header::HOST) {
        // HTTP/2 clients send `:authority` instead, HTTP/1.0 clients may send neither;
        // HTTP/1.1 backends require a Host.
        headers.insert(
            header::HOST,
            authority.unwrap_or_else(|| route.host.clone()),
        );
    }
    Ok(Request::from_parts(parts, RequestBody::new(body, relayed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(uri: &str) -> Option<(String, String)> {
        let uri: Uri = uri.parse().expect("test URI");
        split_token(&uri).map(|(token, path)| {
            let path = String::from_utf8(path.to_vec()).expect("paths are ASCII");
            (token.to_string(), path)
        })
    }

    #[test]
    fn the_first_segment_is_the_token_and_the_rest_goes_to_the_backend() {
        let pair = |a: &str, b: &str| Some((a.to_string(), b.to_string()));
        assert_eq!(split("/abc/x/y?q=1&r"), pair("abc", "/x/y?q=1&r"));
        assert_eq!(split("/abc"), pair("abc", "/"));
        assert_eq!(split("/abc/"), pair("abc", "/"));
        assert_eq!(split("/abc?q=1"), pair("abc", "/?q=1"));
        assert_eq!(split("/abc//x"), pair("abc", "//x"));
        assert_eq!(split("/"), None);
        assert_eq!(split("//x"), None);
        assert_eq!(split("*"), None);
    }
}
