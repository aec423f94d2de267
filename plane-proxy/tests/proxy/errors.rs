//! The proxy's own answers when a request cannot be forwarded: JSON bodies, fitting statuses.

use crate::support::{get, with_timeout, TestEnv};
use http::StatusCode;
use plane_protocol::names::BearerToken;
use plane_protocol::proxy::MessageFromProxy;
use std::time::Duration;

#[tokio::test]
async fn unknown_token_gets_404_json() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let token = BearerToken::new_random();

        let response = get(env.addr(), &format!("/{token}/page")).await;

        assert_eq!(response.status, StatusCode::NOT_FOUND);
        assert_eq!(response.headers["content-type"], "application/json");
        let body = response.json();
        assert_eq!(body["error"], "unknown_token");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(env.controller.route_requests(&token), 1);
    })
    .await;
}

#[tokio::test]
async fn unknown_tokens_are_not_cached() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let token = BearerToken::new_random();

        assert_eq!(
            get(env.addr(), &format!("/{token}/")).await.status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            get(env.addr(), &format!("/{token}/")).await.status,
            StatusCode::NOT_FOUND
        );

        assert_eq!(env.controller.route_requests(&token), 2);
    })
    .await;
}

#[tokio::test]
async fn malformed_token_gets_404_without_asking_the_controller() {
    with_timeout(async {
        let env = TestEnv::start().await;

        let response = get(env.addr(), "/not-a-token!/x").await;

        assert_eq!(response.status, StatusCode::NOT_FOUND);
        assert_eq!(response.json()["error"], "unknown_token");
        let asked = env
            .controller
            .log()
            .iter()
            .any(|received| matches!(received.message, MessageFromProxy::RouteRequest { .. }));
        assert!(!asked, "the controller was asked about a malformed token");
    })
    .await;
}

#[tokio::test]
async fn bare_root_gets_missing_token() {
    with_timeout(async {
        let env = TestEnv::start().await;

        let response = get(env.addr(), "/").await;

        assert_eq!(response.status, StatusCode::NOT_FOUND);
        assert_eq!(response.json()["error"], "missing_token");
    })
    .await;
}

#[tokio::test]
async fn unreachable_backend_gets_502() {
    with_timeout(async {
        let env = TestEnv::start().await;
        // A port that was just free: nothing listens there.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
            .local_addr()
            .expect("address");
        let (token, _) = env.route_to(closed);

        let response = get(env.addr(), &format!("/{token}/")).await;

        assert_eq!(response.status, StatusCode::BAD_GATEWAY);
        assert_eq!(response.json()["error"], "bad_gateway");
    })
    .await;
}

#[tokio::test]
async fn a_request_held_past_the_hold_timeout_gets_504() {
    with_timeout(async {
        let env = TestEnv::start_with(|config| config.hold_timeout_ms = 300).await;
        env.controller.hold_answers(true);
        let (token, _) = env.route_to_upstream();

        let response = get(env.addr(), &format!("/{token}/")).await;

        assert_eq!(response.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(response.headers["content-type"], "application/json");
        let body = response.json();
        assert_eq!(body["error"], "hold_timeout");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("300 ms")),
            "{body}"
        );
        assert_eq!(env.proxy.held_requests(), 0);
    })
    .await;
}

#[tokio::test]
async fn controller_away_for_the_whole_wait_gets_503() {
    with_timeout(async {
        let env = TestEnv::start_with(|config| config.hold_timeout_ms = 300).await;
        env.controller.refuse_connections(true);
        env.controller.disconnect_all();
        let mut status = env.proxy.connection_status();
        tokio::time::timeout(Duration::from_secs(10), status.wait_for(|c| !*c))
            .await
            .expect("proxy noticed the controller went away")
            .expect("status channel open");
        let (token, _) = env.route_to_upstream();

        let response = get(env.addr(), &format!("/{token}/")).await;

        assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.json()["error"], "controller_unavailable");
    })
    .await;
}
