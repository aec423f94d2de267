//! The proxy: HTTP and WebSocket traffic reaches the backend, with verified headers that
//! callers cannot forge.

use crate::db_test;
use crate::harness::TestEnv;
use futures_util::{SinkExt, StreamExt};
use plane_protocol::api::{ConnectRequest, KeyConfig};
use plane_protocol::backend::{BackendStatus, TerminationKind, TerminationReason};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

db_test!(
    http_through_the_proxy_reaches_the_backend_with_verified_headers,
    |env: TestEnv| async move {
        let response = env.connect_ready("http-doc", &env.spawn_config(&[])).await;
        let reply = env
            .client
            .put(env.proxy_url(&format!("/{}/rest/of/path?x=1&y=two", response.token)))
            .header("x-custom", "kept")
            .body("request body")
            .send()
            .await
            .expect("proxy reachable");
        assert_eq!(reply.status().as_u16(), 200);
        let echo: Value = reply.json().await.expect("echo JSON");
        assert_eq!(echo["method"], "PUT");
        assert_eq!(echo["path"], "/rest/of/path");
        assert_eq!(echo["query"], "x=1&y=two");
        assert_eq!(echo["body"], "request body");
        let headers = &echo["headers"];
        assert_eq!(headers["x-custom"], "kept");
        assert_eq!(headers["x-verified-username"], "alice");
        assert_eq!(headers["x-verified-backend"], response.backend_id.as_str());
        assert_eq!(headers["x-verified-secret"], response.secret_token.as_str());
        assert_eq!(headers["x-verified-path"], "/rest/of/path?x=1&y=two");
        assert_eq!(headers["x-verified-user-data"], "{}");
        env
    }
);

db_test!(
    spoofed_verified_headers_never_reach_the_backend,
    |env: TestEnv| async move {
        let response = env.connect_ready("spoof-doc", &env.spawn_config(&[])).await;
        let reply = env
            .client
            .get(env.proxy_url(&format!("/{}/whoami", response.token)))
            .header("x-verified-username", "mallory")
            .header("X-Verified-Secret", "forged")
            .header("x-verified-anything", "forged")
            .send()
            .await
            .expect("proxy reachable");
        let echo: Value = reply.json().await.expect("echo JSON");
        let headers = &echo["headers"];
        assert_eq!(headers["x-verified-username"], "alice");
        assert_eq!(headers["x-verified-secret"], response.secret_token.as_str());
        assert!(headers.get("x-verified-anything").is_none(), "{headers}");
        env
    }
);

db_test!(
    websocket_echo_works_through_the_proxy,
    |env: TestEnv| async move {
        let response = env.connect_ready("ws-doc", &env.spawn_config(&[])).await;
        let url = format!("ws://{}/{}/ws", env.proxy.local_addr(), response.token);
        let (mut socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket through proxy");
        for text in ["hello", "plane"] {
            socket.send(Message::text(text)).await.expect("send");
            let echoed = socket.next().await.expect("a reply").expect("a frame");
            assert_eq!(echoed.into_text().expect("text").as_str(), text);
        }
        env
    }
);

db_test!(unknown_tokens_get_a_clear_404, |env: TestEnv| async move {
    let (code, body) = env
        .get_via_proxy("notarealtoken0000000000000000000", "/x")
        .await;
    assert_eq!(code, 404, "{body}");
    let error: Value = serde_json::from_str(&body).expect("JSON error body");
    assert!(
        error["message"].as_str().unwrap_or("").contains("token"),
        "{error}"
    );
    env
});

db_test!(
    a_terminated_backend_is_no_longer_routed,
    |env: TestEnv| async move {
        let response = env.connect_ready("gone-doc", &env.spawn_config(&[])).await;
        let (code, _) = env.get_via_proxy(response.token.as_str(), "/").await;
        assert_eq!(code, 200);
        env.terminate(&response.backend_id, TerminationKind::Hard)
            .await;
        env.wait_terminated(&response.backend_id).await;
        let (code, body) = env.get_via_proxy(response.token.as_str(), "/").await;
        assert_eq!(code, 410, "{body}");
        let error: Value = serde_json::from_str(&body).expect("JSON error body");
        assert_eq!(error["error"], "backend_terminated", "{error}");
        assert_eq!(error["reason"], "external", "{error}");
        env
    }
);

db_test!(
    a_get_and_a_websocket_opened_right_after_connect_are_held_until_ready,
    |env: TestEnv| async move {
        // Slow enough to start that both arrive long before it listens.
        let config = env.spawn_config(&[("DEMO_STARTUP_DELAY_MS", "1500")]);
        let response = env.connect("held-doc", &config).await;
        assert_ne!(
            env.status(&response.backend_id).await.status,
            BackendStatus::Ready
        );

        let get = env.get_via_proxy(response.token.as_str(), "/held?x=1");
        let url = format!("ws://{}/{}/ws", env.proxy.local_addr(), response.token);
        let socket = tokio_tungstenite::connect_async(url);
        let ((code, body), socket) = tokio::join!(get, socket);

        assert_eq!(code, 200, "{body}");
        let echo: Value = serde_json::from_str(&body).expect("echo JSON");
        assert_eq!(echo["path"], "/held");
        let (mut socket, _) = socket.expect("a WebSocket held until the backend was ready");
        socket.send(Message::text("waited")).await.expect("send");
        let echoed = socket.next().await.expect("a reply").expect("a frame");
        assert_eq!(echoed.into_text().expect("text").as_str(), "waited");
        assert_eq!(env.proxy.held_requests(), 0);
        env
    }
);

db_test!(
    a_request_held_for_a_backend_that_never_starts_gets_its_termination_reason,
    |env: TestEnv| async move {
        // Never listens, so the drone gives up after the spawn's one-second startup timeout.
        let mut config = env.spawn_config(&[("DEMO_STARTUP_DELAY_MS", "600000")]);
        config.startup_timeout_seconds = Some(1);
        let response = env.connect("never-ready-doc", &config).await;

        let (code, body) = env.get_via_proxy(response.token.as_str(), "/").await;

        assert_eq!(code, 410, "{body}");
        let error: Value = serde_json::from_str(&body).expect("JSON error body");
        assert_eq!(error["error"], "backend_terminated", "{error}");
        assert_eq!(error["reason"], "startuptimeout", "{error}");
        let entry = env.wait_terminated(&response.backend_id).await;
        assert_eq!(
            entry.termination_reason,
            Some(TerminationReason::StartupTimeout)
        );
        env
    }
);

db_test!(
    a_token_with_a_lifetime_ends_at_the_proxy_and_others_keep_working,
    |env: TestEnv| async move {
        let plane = env.api().plane;
        let spawn = env.spawn_config(&[]);
        let lasting = env.connect_ready("ttl-doc", &spawn).await;
        let join_for = |token_ttl_seconds: i64| ConnectRequest {
            key: Some(KeyConfig::named("ttl-doc")),
            token_ttl_seconds: Some(token_ttl_seconds),
            ..Default::default()
        };
        let short = plane
            .connect(&join_for(1))
            .await
            .expect("a join with a one-second token")
            .token
            .as_str()
            .to_string();
        // Cached at the proxy while it is valid...
        assert_eq!(env.get_via_proxy(&short, "/").await.0, 200);
        // ...and refused once its second is over, from the cache as from the controller.
        let body = crate::harness::wait_for(
            "the short-lived token to expire",
            std::time::Duration::from_secs(10),
            || async {
                match env.get_via_proxy(&short, "/").await {
                    (410, body) => Ok(body),
                    (code, _) => Err(format!("still {code}")),
                }
            },
        )
        .await;
        let error: Value = serde_json::from_str(&body).expect("JSON error body");
        assert_eq!(error["error"], "token_expired", "{error}");
        let other_proxy = env.start_proxy(&env.controller().url()).await;
        let uncached = reqwest::get(format!("http://{}/{short}/", other_proxy.local_addr()))
            .await
            .expect("proxy reachable");
        assert_eq!(uncached.status(), 410);
        assert_eq!(env.get_via_proxy(lasting.token.as_str(), "/").await.0, 200);

        // Lifetimes that make no sense are refused, on a join as on a spawn.
        let err = plane
            .connect(&join_for(-3600))
            .await
            .expect_err("a join with a negative token lifetime is refused");
        assert_eq!(err.status(), Some(400), "{err}");
        for (ttl, static_token) in [(0, false), (-1, false), (60, true)] {
            let mut spawn = spawn.clone();
            spawn.use_static_token = static_token;
            let request = ConnectRequest {
                key: Some(KeyConfig::named(format!("ttl-bad-{ttl}"))),
                spawn_config: Some(spawn),
                token_ttl_seconds: Some(ttl),
                ..Default::default()
            };
            let err = plane
                .connect(&request)
                .await
                .expect_err("a spawn with a senseless token lifetime is refused");
            assert_eq!(
                err.status(),
                Some(400),
                "{ttl}, static {static_token}: {err}"
            );
            assert!(
                err.api_error()
                    .is_some_and(|e| e.message.contains("token_ttl_seconds")),
                "{err}"
            );
        }
        other_proxy.shutdown().await;
        env
    }
);

db_test!(
    a_subdomain_backend_is_served_only_at_its_own_host,
    |env: TestEnv| async move {
        let mut spawn = env.spawn_config(&[]);
        spawn.subdomain = Some("doc-a".parse().expect("subdomain"));
        let response = env.connect_ready("sub-doc", &spawn).await;
        let host = format!("doc-a.{}", env.cluster);
        assert_eq!(
            response.subdomain.as_ref().map(|s| s.as_str()),
            Some("doc-a")
        );
        assert_eq!(response.url, format!("http://{host}/{}/", response.token));
        // Joining gives the same host.
        let joined = env.connect("sub-doc", &spawn).await;
        assert!(
            joined.url.starts_with(&format!("http://{host}/")),
            "{}",
            joined.url
        );

        let at = |host: String| {
            let request = env
                .client
                .get(env.proxy_url(&format!("/{}/", response.token)))
                .header("host", host);
            async move {
                let response = request.send().await.expect("proxy reachable");
                let status = response.status().as_u16();
                (status, response.text().await.unwrap_or_default())
            }
        };
        assert_eq!(at(host.clone()).await.0, 200);
        assert_eq!(
            at(host.to_uppercase()).await.0,
            200,
            "hosts compare without case"
        );
        for wrong in [env.cluster.to_string(), format!("doc-b.{}", env.cluster)] {
            let (code, body) = at(wrong.clone()).await;
            assert_eq!(code, 403, "{wrong}: {body}");
            let error: Value = serde_json::from_str(&body).expect("JSON error body");
            assert_eq!(error["error"], "wrong_host", "{error}");
            assert_eq!(error["host"], host.as_str(), "{error}");
        }

        // Names that are not one DNS label are refused at connect. Raw JSON on purpose: a
        // typed `Subdomain` cannot hold them.
        for bad in ["Doc", "a.b", "-x", ""] {
            let mut spawn = env.spawn_config(&[]);
            spawn.subdomain = None;
            let mut body =
                serde_json::json!({ "key": { "name": "sub-bad" }, "spawn_config": spawn });
            body["spawn_config"]["subdomain"] = bad.into();
            let (code, error) = env.post("/ctrl/connect", &body).await;
            assert_eq!(code, 400, "{bad:?}: {error}");
            assert!(
                error["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("subdomain"),
                "{error}"
            );
        }
        env
    }
);

db_test!(
    an_idle_proxy_still_heartbeats_so_its_age_stays_low,
    |env: TestEnv| async move {
        // A proxy with no traffic at all, reporting every 200 ms.
        let mut config =
            plane_proxy::config::ProxyConfig::new(env.controller().url(), env.cluster.clone());
        config.report_interval_ms = 200;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let proxy = plane_proxy::start(config, listener).await.expect("proxy");
        let last_seen = || async {
            env.cluster_state()
                .await
                .proxies
                .into_iter()
                .find(|p| p.name.name() == proxy.name())
                .map(|p| p.last_seen)
        };
        let first = crate::harness::wait_for(
            "the idle proxy in the cluster state",
            std::time::Duration::from_secs(20),
            || async { last_seen().await.ok_or("not listed yet") },
        )
        .await;
        // Its report doubles as a heartbeat: `last_seen` moves on without any request.
        crate::harness::wait_for(
            "the idle proxy's last_seen to advance",
            std::time::Duration::from_secs(10),
            || async {
                match last_seen().await {
                    Some(seen) if seen > first => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
        proxy.shutdown().await;
        env
    }
);

db_test!(
    http2_with_prior_knowledge_reaches_the_backend_on_the_plain_port,
    |env: TestEnv| async move {
        let response = env.connect_ready("h2c", &env.spawn_config(&[])).await;
        let h2c = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .expect("client");
        // Several requests multiplexed on the one connection.
        let url = env.proxy_url(&format!("/{}/", response.token));
        let answers = futures_util::future::join_all((0..4).map(|_| h2c.get(&url).send())).await;
        for answer in answers {
            let answer = answer.expect("h2c request");
            assert_eq!(answer.status().as_u16(), 200);
            assert_eq!(answer.version(), reqwest::Version::HTTP_2);
        }
        // HTTP/1.1 on the same port is unchanged.
        let (code, _) = env.get_via_proxy(response.token.as_str(), "/").await;
        assert_eq!(code, 200);
        env
    }
);

db_test!(
    a_backend_that_serves_http2_gets_its_requests_over_http2,
    |env: TestEnv| async move {
        let mut http2 = env.spawn_config(&[]);
        http2.executable.protocol = plane_protocol::api::BackendProtocol::Http2;
        let h2_backend = env.connect_ready("h2-backend", &http2).await;
        let h1_backend = env
            .connect_ready("h1-backend", &env.spawn_config(&[]))
            .await;
        let echoed = |body: String| -> Value { serde_json::from_str(&body).expect("echo JSON") };

        // Whatever the client speaks, the backend sees the protocol it asked for.
        let h2c = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .expect("client");
        for client in [&env.client, &h2c] {
            let url = env.proxy_url(&format!("/{}/echo?q=1", h2_backend.token));
            let answers =
                futures_util::future::join_all((0..4).map(|_| client.get(&url).send())).await;
            for answer in answers {
                let answer = answer.expect("request");
                assert_eq!(answer.status().as_u16(), 200);
                let body = echoed(answer.text().await.expect("body"));
                assert_eq!(body["version"], "HTTP/2.0", "{body}");
                assert_eq!(body["path"], "/echo", "{body}");
                assert_eq!(body["query"], "q=1", "{body}");
                assert_eq!(
                    body["headers"]["x-verified-backend"],
                    h2_backend.backend_id.as_str(),
                    "{body}"
                );
            }
        }
        let (code, body) = env.get_via_proxy(h1_backend.token.as_str(), "/echo").await;
        assert_eq!(code, 200);
        assert_eq!(echoed(body)["version"], "HTTP/1.1");

        // A request body streams through, and WebSockets still work (over HTTP/1.1).
        let answer = env
            .client
            .post(env.proxy_url(&format!("/{}/echo", h2_backend.token)))
            .body("hello over h2")
            .send()
            .await
            .expect("post");
        let body = echoed(answer.text().await.expect("body"));
        assert_eq!(body["body"], "hello over h2", "{body}");
        let ws = format!("ws://{}/{}/ws", env.proxy.local_addr(), h2_backend.token);
        let (mut socket, _) = tokio_tungstenite::connect_async(ws)
            .await
            .expect("websocket");
        socket.send(Message::text("ping")).await.expect("send");
        let echo = socket.next().await.expect("echo").expect("echo");
        assert_eq!(echo.into_text().expect("text").as_str(), "ping");

        // An unknown protocol is refused, naming the field.
        let mut request = serde_json::to_value(&http2).expect("json");
        request["executable"]["protocol"] = "http3".into();
        let (status, body) = env
            .post(
                "/ctrl/connect",
                &serde_json::json!({ "key": { "name": "h3" }, "spawn_config": request }),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["message"].as_str().unwrap_or("").contains("protocol"),
            "{body}"
        );
        env
    }
);

db_test!(
    websockets_over_http2_use_extended_connect_and_share_the_connection,
    |env: TestEnv| async move {
        use http_body_util::{BodyExt, Empty};
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let backend = env
            .connect_ready("h2-websocket", &env.spawn_config(&[]))
            .await;
        let stream = tokio::net::TcpStream::connect(env.proxy.local_addr())
            .await
            .expect("connect");
        let (mut sender, connection) =
            hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .handshake::<_, Empty<bytes::Bytes>>(TokioIo::new(stream))
                .await
                .expect("h2c handshake");
        tokio::spawn(connection);
        let authority = env.proxy.local_addr().to_string();

        // Two WebSockets and a plain request multiplexed on the one HTTP/2 connection.
        let mut sockets = Vec::new();
        for _ in 0..2 {
            let mut request = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(format!("http://{authority}/{}/ws", backend.token))
                .header("sec-websocket-version", "13")
                .body(Empty::new())
                .expect("request");
            request
                .extensions_mut()
                .insert(hyper::ext::Protocol::from_static("websocket"));
            let mut response = sender
                .send_request(request)
                .await
                .expect("extended CONNECT");
            assert_eq!(
                response.status().as_u16(),
                200,
                "RFC 8441 answers 200, not 101"
            );
            assert!(!response.headers().contains_key("sec-websocket-accept"));
            let upgraded = hyper::upgrade::on(&mut response)
                .await
                .expect("upgraded stream");
            sockets.push(
                tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    tokio_tungstenite::tungstenite::protocol::Role::Client,
                    None,
                )
                .await,
            );
        }
        for (n, socket) in sockets.iter_mut().enumerate() {
            socket
                .send(Message::text(format!("over h2 {n}")))
                .await
                .expect("send");
        }
        for (n, socket) in sockets.iter_mut().enumerate() {
            let echo = socket.next().await.expect("echo").expect("echo");
            assert_eq!(
                echo.into_text().expect("text").as_str(),
                format!("over h2 {n}")
            );
        }
        let page = http::Request::builder()
            .uri(format!("http://{authority}/{}/", backend.token))
            .body(Empty::new())
            .expect("request");
        let answer = sender.send_request(page).await.expect("plain request");
        assert_eq!(answer.status().as_u16(), 200);

        // Any other CONNECT is refused plainly.
        let tunnel = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("example.com:443")
            .body(Empty::new())
            .expect("request");
        let answer = sender.send_request(tunnel).await.expect("CONNECT");
        assert_eq!(answer.status().as_u16(), 501);
        let body = answer.into_body().collect().await.expect("body").to_bytes();
        let body: Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(body["error"], "unsupported_connect", "{body}");
        for mut socket in sockets {
            let _ = socket.close(None).await;
        }
        env
    }
);
