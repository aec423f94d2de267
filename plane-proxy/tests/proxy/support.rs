//! Test harness: a real proxy between a fake controller (a WebSocket server speaking the
//! proxy-socket protocol) and a real upstream HTTP server that echoes what it receives.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use plane_protocol::names::{BackendName, BearerToken, SecretToken};
use plane_protocol::proxy::{MessageFromProxy, MessageToProxy, RouteAnswer, RouteInfo};
use plane_proxy::{ProxyConfig, ProxyHandle};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Every test's hard limit.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs a test body under [`TEST_TIMEOUT`].
pub async fn with_timeout<F: Future>(test: F) -> F::Output {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "plane_proxy=debug".into()),
        )
        .with_test_writer()
        .try_init();
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test did not finish within its 20 s limit")
}

/// Aborts the task when dropped, so helpers never outlive their test.
pub struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().expect("test lock poisoned")
}

// ---------------------------------------------------------------------------------------
// Fake controller
// ---------------------------------------------------------------------------------------

/// One message the controller received, and on which connection (numbered from 0).
#[derive(Clone, Debug)]
pub struct Received {
    pub connection: usize,
    pub message: MessageFromProxy,
}

enum Outgoing {
    Message(Box<MessageToProxy>),
    Close,
}

#[derive(Default)]
struct ControllerState {
    /// What each token is answered; a token not here is unknown. A list answers one entry
    /// per request, the last one for good.
    answers: Mutex<HashMap<BearerToken, Vec<RouteAnswer>>>,
    hold_answers: AtomicBool,
    held: Mutex<Vec<(BearerToken, mpsc::UnboundedSender<Outgoing>)>>,
    refuse_connections: AtomicBool,
    /// How many connection attempts were refused so far.
    refused: watch::Sender<usize>,
    /// How many WebSocket pings arrived (the proxy pings once per report interval).
    pings: watch::Sender<usize>,
    connections: AtomicUsize,
    sockets: Mutex<Vec<mpsc::UnboundedSender<Outgoing>>>,
}

/// Speaks the controller's side of the proxy socket and answers route requests from a table.
pub struct FakeController {
    pub addr: SocketAddr,
    state: Arc<ControllerState>,
    log: watch::Receiver<Vec<Received>>,
    _task: AbortOnDrop,
}

impl FakeController {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake controller");
        let addr = listener.local_addr().expect("fake controller address");
        let state = Arc::new(ControllerState::default());
        let (log_tx, log) = watch::channel(Vec::new());
        let task = tokio::spawn(accept_proxies(listener, state.clone(), log_tx));
        Self {
            addr,
            state,
            log,
            _task: AbortOnDrop(task),
        }
    }

    pub fn url(&self) -> url::Url {
        format!("http://{}/", self.addr)
            .parse()
            .expect("controller URL")
    }

    pub fn add_route(&self, token: &BearerToken, route: &RouteInfo) {
        self.answer_with(token, vec![RouteAnswer::Ready(route.clone())]);
    }

    /// Answers the next requests for `token` with `answers` in turn, repeating the last.
    pub fn answer_with(&self, token: &BearerToken, answers: Vec<RouteAnswer>) {
        lock(&self.state.answers).insert(token.clone(), answers);
    }

    pub fn remove_route(&self, token: &BearerToken) {
        lock(&self.state.answers).remove(token);
    }

    /// While held, route requests are recorded but not answered until [`Self::release`].
    pub fn hold_answers(&self, hold: bool) {
        self.state.hold_answers.store(hold, Ordering::SeqCst);
    }

    /// Answers every held route request from the route table.
    pub fn release(&self) {
        self.hold_answers(false);
        let held = std::mem::take(&mut *lock(&self.state.held));
        for (token, socket) in held {
            let _ = socket.send(Outgoing::Message(Box::new(answer(&self.state, token))));
        }
    }

    /// Sends `message` on every open proxy socket.
    pub fn send(&self, message: MessageToProxy) {
        for socket in lock(&self.state.sockets).iter() {
            let _ = socket.send(Outgoing::Message(Box::new(message.clone())));
        }
    }

    /// Closes every open proxy socket.
    pub fn disconnect_all(&self) {
        for socket in lock(&self.state.sockets).drain(..) {
            let _ = socket.send(Outgoing::Close);
        }
    }

    /// While refusing, new TCP connections are closed before the WebSocket handshake.
    pub fn refuse_connections(&self, refuse: bool) {
        self.state
            .refuse_connections
            .store(refuse, Ordering::SeqCst);
    }

    /// Waits until `more` further connection attempts have been refused.
    pub async fn wait_for_refusals(&self, more: usize) {
        let mut refused = self.state.refused.subscribe();
        let target = *refused.borrow() + more;
        let waited = tokio::time::timeout(
            Duration::from_secs(10),
            refused.wait_for(|refused| *refused >= target),
        )
        .await;
        assert!(
            waited.is_ok(),
            "the proxy did not retry its connection {more} more times"
        );
    }

    /// Waits until `more` further pings arrived: proof that report intervals have passed.
    pub async fn wait_for_pings(&self, more: usize) {
        let mut pings = self.state.pings.subscribe();
        let target = *pings.borrow() + more;
        let waited =
            tokio::time::timeout(Duration::from_secs(10), pings.wait_for(|p| *p >= target)).await;
        assert!(waited.is_ok(), "the proxy did not ping {more} more times");
    }

    /// Everything received so far.
    pub fn log(&self) -> Vec<Received> {
        self.log.borrow().clone()
    }

    /// Waits until `done` holds for the log of received messages; panics (naming `what` and
    /// showing the log) if the test's time runs out first.
    pub async fn wait_for(&self, what: &str, done: impl FnMut(&Vec<Received>) -> bool) {
        let mut log = self.log.clone();
        let waited = tokio::time::timeout(Duration::from_secs(10), log.wait_for(done)).await;
        if waited.is_err() {
            panic!(
                "timed out waiting for the controller to receive {what}; it got: {:#?}",
                self.log()
            );
        }
    }

    /// How many times the proxy asked about `token`.
    pub fn route_requests(&self, token: &BearerToken) -> usize {
        self.log()
            .iter()
            .filter(
                |r| matches!(&r.message, MessageFromProxy::RouteRequest { token: t } if t == token),
            )
            .count()
    }
}

fn answer(state: &ControllerState, token: BearerToken) -> MessageToProxy {
    let mut answers = lock(&state.answers);
    let answer = match answers.get_mut(&token) {
        Some(list) if list.len() > 1 => list.remove(0),
        Some(list) => list.first().cloned().unwrap_or(RouteAnswer::Unknown),
        None => RouteAnswer::Unknown,
    };
    MessageToProxy::RouteResponse { token, answer }
}

async fn accept_proxies(
    listener: TcpListener,
    state: Arc<ControllerState>,
    log: watch::Sender<Vec<Received>>,
) {
    let log = Arc::new(log);
    // Owning the connection tasks here means aborting this task ends them too.
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        if state.refuse_connections.load(Ordering::SeqCst) {
            drop(stream);
            state.refused.send_modify(|refused| *refused += 1);
            continue;
        }
        let id = state.connections.fetch_add(1, Ordering::SeqCst);
        connections.spawn(serve_proxy(stream, id, state.clone(), log.clone()));
    }
}

async fn serve_proxy(
    stream: TcpStream,
    id: usize,
    state: Arc<ControllerState>,
    log: Arc<watch::Sender<Vec<Received>>>,
) {
    let Ok(socket) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::unbounded_channel();
    lock(&state.sockets).push(tx.clone());
    let writer = async move {
        while let Some(outgoing) = rx.recv().await {
            let sent = match outgoing {
                Outgoing::Message(message) => {
                    let text = serde_json::to_string(&message).expect("encode message");
                    sink.send(Message::text(text)).await
                }
                Outgoing::Close => {
                    let _ = sink.close().await;
                    return;
                }
            };
            if sent.is_err() {
                return;
            }
        }
    };
    let reader = async move {
        while let Some(Ok(frame)) = stream.next().await {
            let text = match frame {
                Message::Text(text) => text,
                Message::Ping(_) => {
                    state.pings.send_modify(|pings| *pings += 1);
                    continue;
                }
                _ => continue,
            };
            let message: MessageFromProxy =
                serde_json::from_str(text.as_str()).expect("proxy sent a valid message");
            log.send_modify(|log| {
                log.push(Received {
                    connection: id,
                    message: message.clone(),
                })
            });
            if let MessageFromProxy::RouteRequest { token } = message {
                if state.hold_answers.load(Ordering::SeqCst) {
                    lock(&state.held).push((token, tx.clone()));
                } else {
                    let _ = tx.send(Outgoing::Message(Box::new(answer(&state, token))));
                }
            }
        }
    };
    // Either side ending ends the connection.
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
    }
}

// ---------------------------------------------------------------------------------------
// Upstream (the backend)
// ---------------------------------------------------------------------------------------

type UpstreamBody = BoxBody<Bytes, Infallible>;

/// A real HTTP server standing in for a backend. Plain requests get a JSON echo of what
/// arrived; `/slow` streams one chunk, then the rest once released; WebSocket upgrades echo
/// every message back; an upgrade to `raw-echo` echoes bytes until the client half-closes,
/// then sends `bye` and closes.
pub struct Upstream {
    pub addr: SocketAddr,
    release_slow: watch::Sender<bool>,
    /// TCP connections accepted so far, and those still open.
    accepted: Arc<AtomicUsize>,
    open: watch::Receiver<usize>,
    _task: AbortOnDrop,
}

impl Upstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream address");
        let (release_slow, release_rx) = watch::channel(false);
        let accepted = Arc::new(AtomicUsize::new(0));
        let (open_tx, open) = watch::channel(0usize);
        let open_tx = Arc::new(open_tx);
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                open_tx.send_modify(|n| *n += 1);
                let open_tx = open_tx.clone();
                let release = release_rx.clone();
                connections.spawn(async move {
                    // Counts the connection closed however this task ends.
                    struct Closed(Arc<watch::Sender<usize>>);
                    impl Drop for Closed {
                        fn drop(&mut self) {
                            self.0.send_modify(|n| *n -= 1);
                        }
                    }
                    let _closed = Closed(open_tx);
                    let service = hyper::service::service_fn(move |request| {
                        let release = release.clone();
                        async move { Ok::<_, Infallible>(upstream_handle(request, release).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Self {
            addr,
            release_slow,
            accepted,
            open,
            _task: AbortOnDrop(task),
        }
    }

    /// How many TCP connections the upstream has accepted.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Follows how many of its connections are open.
    pub fn open_connections(&self) -> watch::Receiver<usize> {
        self.open.clone()
    }

    /// Lets every `/slow` response finish.
    pub fn release_slow(&self) {
        self.release_slow.send_replace(true);
    }
}

async fn upstream_handle(
    mut request: Request<Incoming>,
    release: watch::Receiver<bool>,
) -> Response<UpstreamBody> {
    if request
        .headers()
        .get("upgrade")
        .is_some_and(|u| u == "raw-echo")
    {
        // A raw byte protocol: echo everything until the client half-closes, then say
        // goodbye and close.
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok(upgraded) = upgrade.await else {
                return;
            };
            let mut io = TokioIo::new(upgraded);
            let mut chunk = [0u8; 4096];
            loop {
                match io.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if io.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = io.write_all(b"bye").await;
            let _ = io.shutdown().await;
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "raw-echo")
            .body(Full::new(Bytes::new()).boxed())
            .expect("101 response");
    }
    if let Some(key) = request.headers().get("sec-websocket-key") {
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else {
                return;
            };
            let mut socket =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            while let Some(Ok(message)) = socket.next().await {
                if (message.is_text() || message.is_binary()) && socket.send(message).await.is_err()
                {
                    return;
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(Full::new(Bytes::new()).boxed())
            .expect("101 response");
    }

    if request.uri().path() == "/slow" {
        let mut release = release;
        let first = futures_util::stream::iter([Ok(Frame::data(Bytes::from("start\n")))]);
        let rest = futures_util::stream::once(async move {
            let _ = release.wait_for(|released| *released).await;
            Ok(Frame::data(Bytes::from("end\n")))
        });
        return Response::new(BodyExt::boxed(StreamBody::new(first.chain(rest))));
    }

    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let values: Vec<&str> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|value| value.to_str().unwrap_or("<non-ascii>"))
            .collect();
        headers.insert(name.to_string(), Value::from(values.join(", ")));
    }
    let echo = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    Response::builder()
        .header("content-type", "application/json")
        .header("x-upstream", "echo")
        .body(Full::new(Bytes::from(echo.to_string())).boxed())
        .expect("echo response")
}

// ---------------------------------------------------------------------------------------
// HTTP client
// ---------------------------------------------------------------------------------------

/// Sends one request on a fresh connection and returns the response head with its body
/// still streaming.
pub async fn send(addr: SocketAddr, request: Request<Full<Bytes>>) -> Response<Incoming> {
    let stream = TcpStream::connect(addr).await.expect("connect to proxy");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP handshake with proxy");
    tokio::spawn(connection);
    sender.send_request(request).await.expect("send request")
}

/// A complete response.
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "body is not JSON ({error}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// For echo responses: the header the upstream received, if any.
    pub fn echoed_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name].as_str().map(str::to_string)
    }
}

/// Sends a request to the proxy and reads the whole response.
pub async fn http(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> TestResponse {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost:9090");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("test request");
    let response = send(addr, request).await;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("read response body").to_bytes();
    TestResponse {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(addr: SocketAddr, path: &str) -> TestResponse {
    http(addr, Method::GET, path, &[], "").await
}

// ---------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------

/// A proxy wired to a fake controller, plus an upstream to route tokens to.
pub struct TestEnv {
    pub controller: FakeController,
    pub upstream: Upstream,
    pub proxy: ProxyHandle,
}

impl TestEnv {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts with test-friendly timings, adjusted by `adjust`, and waits until the proxy
    /// is connected to the controller.
    pub async fn start_with(adjust: impl FnOnce(&mut ProxyConfig)) -> Self {
        let controller = FakeController::start().await;
        let upstream = Upstream::start().await;
        let cluster = "localhost:9090".parse().expect("cluster name");
        let mut config = ProxyConfig::new(controller.url(), cluster);
        config.bind_ip = [127, 0, 0, 1].into();
        config.report_interval_ms = 100;
        config.hold_timeout_ms = 5_000;
        config.shutdown_grace_ms = 5_000;
        adjust(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy listener");
        let proxy = plane_proxy::start(config, listener)
            .await
            .expect("start proxy");
        let mut status = proxy.connection_status();
        status
            .wait_for(|connected| *connected)
            .await
            .expect("proxy connection status");
        Self {
            controller,
            upstream,
            proxy,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.proxy.local_addr()
    }

    /// A fresh token routed to the upstream, as user `alice` with some user data.
    pub fn route_to_upstream(&self) -> (BearerToken, RouteInfo) {
        self.route_to(self.upstream.addr)
    }

    /// A fresh token routed to `address`.
    pub fn route_to(&self, address: SocketAddr) -> (BearerToken, RouteInfo) {
        let token = BearerToken::new_random();
        let route = RouteInfo {
            backend_id: BackendName::new_random(),
            address,
            secret_token: SecretToken::new_random(),
            user: Some("alice".to_string()),
            user_data: json!({"role": "editor", "name": "Zoë"}),
            issued_at: plane_protocol::time::Millis::now(),
            expires_at: None,
            host: None,
            protocol: Default::default(),
        };
        self.controller.add_route(&token, &route);
        (token, route)
    }
}

/// Whether `received` is a keep-alive naming `backend`.
pub fn is_keepalive_for(received: &Received, backend: &BackendName) -> bool {
    matches!(&received.message, MessageFromProxy::KeepAlive { backends } if backends.contains(backend))
}
