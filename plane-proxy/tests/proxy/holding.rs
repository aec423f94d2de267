//! Requests for a backend that is still starting are held until it is ready, answered with
//! the termination reason if it stops instead, and bounded in number.

use crate::support::{get, with_timeout, TestEnv};
use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use plane_protocol::backend::{BackendStatus, TerminationReason};
use plane_protocol::names::BackendName;
use plane_protocol::proxy::{MessageFromProxy, RouteAnswer};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// Waits until the proxy holds exactly `count` requests.
async fn wait_until_held(env: &TestEnv, count: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while env.proxy.held_requests() != count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the proxy holds {} requests, not {count}",
            env.proxy.held_requests()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_held_request_and_websocket_go_through_once_the_route_arrives() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, _) = env.route_to_upstream();
        env.controller.hold_answers(true);

        let addr = env.addr();
        let path = format!("/{token}/page");
        let request = tokio::spawn(async move { get(addr, &path).await });
        let url = format!("ws://{addr}/{token}/socket");
        let socket = tokio::spawn(tokio_tungstenite::connect_async(url));
        wait_until_held(&env, 2).await;
        assert!(!request.is_finished() && !socket.is_finished());

        env.controller.release();
        let response = request.await.expect("request task");
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.json()["path"], "/page");
        let (mut socket, _) = socket
            .await
            .expect("socket task")
            .expect("WebSocket handshake through the proxy");
        socket.send(Message::text("held")).await.expect("send");
        let echoed = socket.next().await.expect("an echo").expect("a message");
        assert_eq!(echoed, Message::text("held"));
        assert_eq!(env.proxy.held_requests(), 0);
    })
    .await;
}

#[tokio::test]
async fn a_backend_still_starting_when_the_controller_stops_waiting_is_asked_about_again() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, route) = env.route_to_upstream();
        let starting = RouteAnswer::Starting {
            backend_id: route.backend_id.clone(),
            status: BackendStatus::Waiting,
        };
        env.controller.answer_with(
            &token,
            vec![starting.clone(), starting, RouteAnswer::Ready(route)],
        );

        let response = get(env.addr(), &format!("/{token}/")).await;

        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(env.controller.route_requests(&token), 3);
    })
    .await;
}

#[tokio::test]
async fn a_backend_that_stops_instead_gets_410_naming_the_reason() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (timed_out, exited) = (
            plane_protocol::names::BearerToken::new_random(),
            plane_protocol::names::BearerToken::new_random(),
        );
        env.controller.answer_with(
            &timed_out,
            vec![RouteAnswer::Terminated {
                backend_id: BackendName::new_random(),
                reason: Some(TerminationReason::StartupTimeout),
                exit_code: None,
            }],
        );
        env.controller.answer_with(
            &exited,
            vec![RouteAnswer::Terminated {
                backend_id: BackendName::new_random(),
                reason: None,
                exit_code: Some(3),
            }],
        );

        let response = get(env.addr(), &format!("/{timed_out}/")).await;
        assert_eq!(response.status, StatusCode::GONE);
        assert_eq!(response.headers["content-type"], "application/json");
        let body = response.json();
        assert_eq!(body["error"], "backend_terminated");
        assert_eq!(body["reason"], "startuptimeout");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("startuptimeout")),
            "{body}"
        );

        let body = get(env.addr(), &format!("/{exited}/")).await.json();
        assert_eq!(body["error"], "backend_terminated");
        assert_eq!(body["reason"], serde_json::Value::Null);
        assert_eq!(body["exit_code"], 3);
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("code 3")),
            "{body}"
        );
    })
    .await;
}

#[tokio::test]
async fn past_max_held_requests_the_next_gets_503_with_retry_after() {
    with_timeout(async {
        let env = TestEnv::start_with(|config| config.max_held_requests = 2).await;
        let (token, _) = env.route_to_upstream();
        env.controller.hold_answers(true);

        let addr = env.addr();
        let held: Vec<_> = (0..2)
            .map(|_| {
                let path = format!("/{token}/");
                tokio::spawn(async move { get(addr, &path).await })
            })
            .collect();
        wait_until_held(&env, 2).await;

        let refused = get(addr, &format!("/{token}/")).await;
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.headers["retry-after"], "1");
        assert_eq!(refused.json()["error"], "too_many_held_requests");

        env.controller.release();
        for response in join_all(held).await {
            assert_eq!(response.expect("request task").status, StatusCode::OK);
        }
        // Once routed, the token is cached: requests no longer need holding at all.
        assert_eq!(
            get(addr, &format!("/{token}/")).await.status,
            StatusCode::OK
        );
        assert_eq!(env.controller.route_requests(&token), 1);
    })
    .await;
}

#[tokio::test]
async fn a_held_request_is_not_reported_as_a_connection() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, route) = env.route_to_upstream();
        env.controller.hold_answers(true);
        let addr = env.addr();
        let path = format!("/{token}/");
        let request = tokio::spawn(async move { get(addr, &path).await });
        wait_until_held(&env, 1).await;
        // Two report intervals pass with the request held: nothing may name the backend, or
        // a backend that never starts would look busy.
        env.controller.wait_for_pings(2).await;
        let named = env
            .controller
            .log()
            .iter()
            .any(|received| match &received.message {
                MessageFromProxy::KeepAlive { backends } => backends.contains(&route.backend_id),
                MessageFromProxy::ConnectionsChanged { opened, .. } => {
                    opened.contains(&route.backend_id)
                }
                _ => false,
            });
        assert!(!named, "a held request was reported as activity");
        env.controller.release();
        assert_eq!(request.await.expect("request task").status, StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn a_held_request_whose_client_leaves_is_no_longer_held() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, _) = env.route_to_upstream();
        env.controller.hold_answers(true);
        let mut client = tokio::net::TcpStream::connect(env.addr())
            .await
            .expect("connect to the proxy");
        use tokio::io::AsyncWriteExt;
        client
            .write_all(format!("GET /{token}/ HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes())
            .await
            .expect("send a request");
        wait_until_held(&env, 1).await;

        drop(client);

        // hyper notices the closed connection and drops the request, and with it the hold.
        wait_until_held(&env, 0).await;
    })
    .await;
}
