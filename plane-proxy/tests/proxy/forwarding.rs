//! Plain HTTP requests reach the backend intact, with the proxy's headers added.

use crate::support::{get, http, is_keepalive_for, send, with_timeout, TestEnv};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};

#[tokio::test]
async fn forwards_method_path_query_and_body_with_verified_headers() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, route) = env.route_to_upstream();

        let response = http(
            env.addr(),
            Method::PUT,
            &format!("/{token}/docs/7?mode=edit&x=%20y"),
            &[("content-type", "text/plain"), ("x-custom", "kept")],
            "the body",
        )
        .await;

        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.headers["x-upstream"], "echo");
        let echo = response.json();
        assert_eq!(echo["method"], "PUT");
        assert_eq!(echo["path"], "/docs/7");
        assert_eq!(echo["query"], "mode=edit&x=%20y");
        assert_eq!(echo["body"], "the body");
        let header = |name| response.echoed_header(name);
        assert_eq!(header("x-custom").as_deref(), Some("kept"));
        assert_eq!(header("content-type").as_deref(), Some("text/plain"));
        assert_eq!(header("host").as_deref(), Some("localhost:9090"));
        assert_eq!(header("x-verified-username").as_deref(), Some("alice"));
        let user_data: serde_json::Value =
            serde_json::from_str(&header("x-verified-user-data").expect("user data header"))
                .expect("user data is JSON");
        assert_eq!(user_data, route.user_data);
        assert_eq!(
            header("x-verified-secret").as_deref(),
            Some(route.secret_token.as_str())
        );
        assert_eq!(
            header("x-verified-backend").as_deref(),
            Some(route.backend_id.as_str())
        );
        assert_eq!(
            header("x-verified-path").as_deref(),
            Some("/docs/7?mode=edit&x=%20y")
        );
        assert_eq!(header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
        assert_eq!(header("x-forwarded-proto").as_deref(), Some("http"));
    })
    .await;
}

#[tokio::test]
async fn spoofed_verified_headers_are_stripped() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, mut route) = env.route_to_upstream();
        // A token issued without a user: no username header may reach the backend at all.
        route.user = None;
        env.controller.add_route(&token, &route);

        let response = http(
            env.addr(),
            Method::GET,
            &format!("/{token}/"),
            &[
                ("X-Verified-Username", "mallory"),
                ("x-verified-secret", "guessed"),
                ("x-VERIFIED-made-up", "anything"),
                ("x_verified_username", "mallory"),
                ("x-forwarded-for", "10.9.9.9"),
            ],
            "",
        )
        .await;

        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.echoed_header("x-verified-username"), None);
        assert_eq!(response.echoed_header("x-verified-made-up"), None);
        assert_eq!(response.echoed_header("x_verified_username"), None);
        assert_eq!(
            response.echoed_header("x-verified-secret").as_deref(),
            Some(route.secret_token.as_str())
        );
        assert_eq!(
            response.echoed_header("x-forwarded-for").as_deref(),
            Some("127.0.0.1")
        );
    })
    .await;
}

#[tokio::test]
async fn token_alone_reaches_the_backend_root() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, _) = env.route_to_upstream();

        let bare = get(env.addr(), &format!("/{token}")).await;
        assert_eq!(bare.status, StatusCode::OK);
        assert_eq!(bare.json()["path"], "/");
        assert_eq!(bare.echoed_header("x-verified-path").as_deref(), Some("/"));

        let with_query = get(env.addr(), &format!("/{token}?a=1")).await;
        assert_eq!(with_query.json()["path"], "/");
        assert_eq!(with_query.json()["query"], "a=1");
    })
    .await;
}

#[tokio::test]
async fn hop_by_hop_headers_stop_at_the_proxy() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, _) = env.route_to_upstream();

        let response = http(
            env.addr(),
            Method::GET,
            &format!("/{token}/"),
            &[
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "secret-to-this-hop"),
                ("keep-alive", "timeout=5"),
                ("proxy-authorization", "Basic abc"),
            ],
            "",
        )
        .await;

        assert_eq!(response.status, StatusCode::OK);
        for name in ["x-hop", "keep-alive", "proxy-authorization"] {
            assert_eq!(response.echoed_header(name), None, "{name} was forwarded");
        }
    })
    .await;
}

#[tokio::test]
async fn streaming_response_keeps_its_backend_reported_until_it_ends() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, route) = env.route_to_upstream();
        let request = Request::get(format!("/{token}/slow"))
            .header("host", "localhost:9090")
            .body(Full::new(Bytes::new()))
            .expect("request");

        let response = send(env.addr(), request).await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let first = body
            .frame()
            .await
            .expect("a first frame")
            .expect("first frame is fine")
            .into_data()
            .expect("data frame");
        assert_eq!(first, Bytes::from("start\n"));

        // Two reports after the body started: the second can only come from the response
        // still being open, not from traffic earlier in the period.
        let seen = env.controller.log().len();
        env.controller
            .wait_for("two keep-alives naming the streaming backend", |log| {
                log[seen..]
                    .iter()
                    .filter(|r| is_keepalive_for(r, &route.backend_id))
                    .count()
                    >= 2
            })
            .await;

        env.upstream.release_slow();
        let rest = body.collect().await.expect("rest of body").to_bytes();
        assert_eq!(rest, Bytes::from("end\n"));
    })
    .await;
}

#[tokio::test]
async fn requests_reuse_keep_alive_connections_to_the_backend() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, _) = env.route_to_upstream();
        for i in 0..20 {
            let response = get(env.addr(), &format!("/{token}/n/{i}")).await;
            assert_eq!(response.status, StatusCode::OK);
        }
        // One after another, so one pooled connection serves them all.
        assert_eq!(
            env.upstream.accepted(),
            1,
            "connections accepted for 20 requests"
        );
    })
    .await;
}

#[tokio::test]
async fn a_removed_backends_pooled_connections_are_closed() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, route) = env.route_to_upstream();
        let response = get(env.addr(), &format!("/{token}/")).await;
        assert_eq!(response.status, StatusCode::OK);
        let mut open = env.upstream.open_connections();
        open.wait_for(|n| *n == 1).await.expect("upstream alive");

        env.controller
            .send(plane_protocol::proxy::MessageToProxy::BackendRemoved {
                backend_id: route.backend_id.clone(),
            });
        open.wait_for(|n| *n == 0).await.expect("upstream alive");
    })
    .await;
}

#[tokio::test]
async fn a_pooled_connection_the_backend_closed_while_idle_is_not_used() {
    with_timeout(async {
        let env = TestEnv::start().await;
        // A backend that answers one request per connection as if keep-alive, then closes
        // the connection once it is idle (as backends with short idle timeouts do).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let backend = listener.local_addr().expect("backend address");
        let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut request = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    let _ = stream.shutdown().await;
                    drop(stream);
                    let _ = closed_tx.send(());
                });
            }
        });
        let (token, _) = env.route_to(backend);

        for round in 0..3 {
            let response = get(env.addr(), &format!("/{token}/")).await;
            assert_eq!(response.status, StatusCode::OK, "request {round}");
            assert_eq!(response.body, "ok");
            // The backend has closed the connection the proxy pooled before the next
            // request is sent.
            closed
                .recv()
                .await
                .expect("the backend closed its connection");
        }
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_parked_and_serves_again() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, _) = env.route_to_upstream();
        let stream = tokio::net::TcpStream::connect(env.addr())
            .await
            .expect("connect to the proxy");
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("HTTP handshake with the proxy");
        let connection = tokio::spawn(connection);
        let request = |path: &str| {
            Request::get(format!("/{token}{path}"))
                .header("host", "localhost:9090")
                .body(Full::new(Bytes::new()))
                .expect("request")
        };

        let first = sender.send_request(request("/one")).await.expect("first");
        assert_eq!(first.status(), StatusCode::OK);
        first.into_body().collect().await.expect("first body");

        // Idle for a while: the proxy frees hyper's buffers for the connection but keeps it.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while env.proxy.parked_connections() != 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the connection was never parked"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(
            !connection.is_finished(),
            "the proxy closed the parked connection"
        );

        sender
            .ready()
            .await
            .expect("the connection is still usable");
        let second = sender.send_request(request("/two")).await.expect("second");
        assert_eq!(second.status(), StatusCode::OK);
        let body = second
            .into_body()
            .collect()
            .await
            .expect("second body")
            .to_bytes();
        let echo: serde_json::Value = serde_json::from_slice(&body).expect("echo JSON");
        assert_eq!(echo["path"], "/two");
        assert_eq!(env.proxy.parked_connections(), 0);
        // Both requests went over the one client connection.
        assert_eq!(env.upstream.accepted(), 1);
    })
    .await;
}
