//! The link against real WebSocket servers on loopback: credentials and paths, reconnecting
//! after the controller drops it, `wss` with a CA file, and configuration errors.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// Sends `hello`, then reads until the socket ends.
struct Greeter {
    hello: String,
    sessions: Arc<AtomicUsize>,
    cancel: CancellationToken,
}

impl Session<String, String> for Greeter {
    async fn run(&mut self, link: &mut Link<String, String>) -> SessionEnd {
        self.sessions.fetch_add(1, Ordering::SeqCst);
        if let Err(error) = link.send(&self.hello).await {
            return error.into();
        }
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return SessionEnd::Shutdown,
                received = link.recv() => match received {
                    Ok(text) if text == "go away" => return SessionEnd::Refused(text),
                    Ok(_) => {}
                    Err(error) => return error.into(),
                },
            }
        }
    }
}

fn config(controller: &str, kind: SocketKind) -> LinkConfig {
    LinkConfig {
        controller: controller.parse().expect("url"),
        kind,
        cluster_secret: Some("s3cret".to_string()),
        ca_file: None,
        max_backoff: Duration::from_millis(200),
    }
}

fn cluster() -> ClusterName {
    "localhost:9090".parse().expect("cluster")
}

/// What the server saw of one opening request.
#[derive(Debug, Default, Clone)]
struct Opening {
    path: String,
    authorization: Option<String>,
    secret: Option<String>,
}

// The handshake callback's error type is tungstenite's.
#[allow(clippy::result_large_err)]
async fn accept<S>(stream: S) -> (WebSocketStream<S>, Opening)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let seen = Arc::new(std::sync::Mutex::new(Opening::default()));
    let record = Arc::clone(&seen);
    let socket = tokio_tungstenite::accept_hdr_async(
        stream,
        move |request: &Request, response: Response| {
            let header = |name: &str| {
                request
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            *record.lock().expect("lock") = Opening {
                path: request.uri().path().to_string(),
                authorization: header("authorization"),
                secret: header(plane_protocol::auth::CLUSTER_SECRET_HEADER),
            };
            Ok(response)
        },
    )
    .await
    .expect("handshake");
    let opening = seen.lock().expect("lock").clone();
    (socket, opening)
}

async fn next_text<S>(socket: &mut WebSocketStream<S>) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match socket.next().await.expect("a frame").expect("a frame") {
            Message::Text(text) => return serde_json::from_str(text.as_str()).expect("json"),
            _ => continue,
        }
    }
}

#[tokio::test]
async fn reconnects_after_the_controller_drops_it_with_path_and_credentials() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let sessions = Arc::new(AtomicUsize::new(0));
    let cancel = CancellationToken::new();
    let greeter = Greeter {
        hello: "hello".to_string(),
        sessions: Arc::clone(&sessions),
        cancel: cancel.clone(),
    };
    let link = tokio::spawn(run(
        config(
            &format!("http://tok-1@127.0.0.1:{port}/prefix/"),
            SocketKind::Proxy(cluster()),
        ),
        greeter,
        cancel.clone(),
    ));
    let test = async {
        for round in 0..2 {
            let (stream, _) = listener.accept().await.expect("accept");
            let (mut socket, opening) = accept(stream).await;
            assert_eq!(opening.path, "/prefix/ctrl/c/localhost:9090/proxy-socket");
            assert_eq!(opening.authorization.as_deref(), Some("Bearer tok-1"));
            assert_eq!(opening.secret.as_deref(), Some("s3cret"));
            assert_eq!(next_text(&mut socket).await, "hello", "round {round}");
            // The controller goes away; the node comes back.
            drop(socket);
        }
    };
    tokio::time::timeout(Duration::from_secs(20), test)
        .await
        .expect("two sessions within 20 s");
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), link)
        .await
        .expect("the link stops on cancel")
        .expect("task")
        .expect("no config error");
    assert!(sessions.load(Ordering::SeqCst) >= 2);
}

#[tokio::test]
async fn a_refused_node_comes_back_and_shutdown_closes_the_socket() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let cancel = CancellationToken::new();
    let greeter = Greeter {
        hello: "hello".to_string(),
        sessions: Arc::new(AtomicUsize::new(0)),
        cancel: cancel.clone(),
    };
    let link = tokio::spawn(run(
        config(&format!("http://127.0.0.1:{port}"), SocketKind::Dns),
        greeter,
        cancel.clone(),
    ));
    let test = async {
        let (stream, _) = listener.accept().await.expect("accept");
        let (mut socket, opening) = accept(stream).await;
        assert_eq!(opening.path, "/ctrl/dns-socket");
        assert_eq!(opening.authorization, None);
        next_text(&mut socket).await;
        socket
            .send(Message::text("\"go away\""))
            .await
            .expect("send");
        // Back after the refusal; then the node shuts down and closes its side.
        let (stream, _) = listener.accept().await.expect("accept");
        let (mut socket, _) = accept(stream).await;
        next_text(&mut socket).await;
        cancel.cancel();
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => continue,
                Some(Err(_)) => break,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), test)
        .await
        .expect("refused, back, and closed within 20 s");
    tokio::time::timeout(Duration::from_secs(5), link)
        .await
        .expect("stops")
        .expect("task")
        .expect("no config error");
}

#[tokio::test]
async fn https_controllers_are_reached_over_wss_trusting_a_ca_file() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = std::env::temp_dir().join(format!("plane-link-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(vec![]).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let server_key = rcgen::KeyPair::generate().expect("key");
    let server = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .signed_by(&server_key, &ca, &ca_key)
        .expect("server cert");
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write ca");

    let server_config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![server.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();

    let cancel = CancellationToken::new();
    let mut link_config = config(
        &format!("https://localhost:{port}"),
        SocketKind::Drone(cluster()),
    );
    link_config.ca_file = Some(ca_file.clone());
    link_config.check().expect("a usable CA file");
    let link = tokio::spawn(run(
        link_config,
        Greeter {
            hello: "hello over tls".to_string(),
            sessions: Arc::new(AtomicUsize::new(0)),
            cancel: cancel.clone(),
        },
        cancel.clone(),
    ));
    let test = async {
        let (stream, _) = listener.accept().await.expect("accept");
        let tls = acceptor.accept(stream).await.expect("TLS handshake");
        let (mut socket, opening) = accept(tls).await;
        assert_eq!(opening.path, "/ctrl/c/localhost:9090/drone-socket");
        assert_eq!(next_text(&mut socket).await, "hello over tls");
    };
    tokio::time::timeout(Duration::from_secs(20), test)
        .await
        .expect("a wss session within 20 s");
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), link).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn configuration_errors_name_what_is_wrong() {
    let mut bad_scheme = config("ftp://127.0.0.1:1", SocketKind::Dns);
    let error = bad_scheme.check().expect_err("ftp is refused");
    assert!(error.to_string().contains("ftp"), "{error}");

    bad_scheme.controller = "http://127.0.0.1:1".parse().expect("url");
    bad_scheme.ca_file = Some(PathBuf::from("/nonexistent/ca.pem"));
    let error = bad_scheme
        .check()
        .expect_err("a missing CA file is refused");
    assert!(error.to_string().contains("/nonexistent/ca.pem"), "{error}");

    let empty = std::env::temp_dir().join(format!("plane-link-empty-{}.pem", std::process::id()));
    std::fs::write(&empty, "not a certificate\n").expect("write");
    bad_scheme.ca_file = Some(empty.clone());
    let error = bad_scheme
        .check()
        .expect_err("a file without certificates is refused");
    assert!(error.to_string().contains("no PEM certificate"), "{error}");
    let _ = std::fs::remove_file(&empty);
}

#[test]
fn socket_urls_keep_the_prefix_and_drop_credentials_query_and_fragment() {
    let url = socket_url(
        &"https://tok@ctl.example/plane?x=1#f".parse().expect("url"),
        &SocketKind::Drone(cluster()),
    )
    .expect("url");
    assert_eq!(
        url.as_str(),
        "wss://ctl.example/plane/ctrl/c/localhost:9090/drone-socket"
    );
    let url = socket_url(
        &"ws://127.0.0.1:8080/".parse().expect("url"),
        &SocketKind::Dns,
    )
    .expect("url");
    assert_eq!(url.as_str(), "ws://127.0.0.1:8080/ctrl/dns-socket");
}

#[test]
fn silence_limit_is_three_periods_and_at_least_the_floor() {
    assert_eq!(silence_limit(Duration::from_secs(1)), MIN_SILENCE);
    assert_eq!(
        silence_limit(Duration::from_secs(10)),
        Duration::from_secs(30)
    );
}
