//! How the proxy uses the controller: caching, eviction, sharing and surviving reconnects.

use crate::support::{get, with_timeout, TestEnv};
use futures_util::future::join_all;
use http::StatusCode;
use plane_protocol::proxy::{MessageFromProxy, MessageToProxy};
use std::time::Duration;

#[tokio::test]
async fn routes_are_cached_until_the_backend_is_removed() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, route) = env.route_to_upstream();
        let path = format!("/{token}/");

        assert_eq!(get(env.addr(), &path).await.status, StatusCode::OK);
        assert_eq!(get(env.addr(), &path).await.status, StatusCode::OK);
        assert_eq!(
            env.controller.route_requests(&token),
            1,
            "second request was not served from the cache"
        );

        // The controller forgets the token and tells the proxy the backend is gone.
        env.controller.remove_route(&token);
        env.controller.send(MessageToProxy::BackendRemoved {
            backend_id: route.backend_id.clone(),
        });

        // Eviction is asynchronous to this test, so poll until a request goes back to the
        // controller; each attempt is a real request.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let response = get(env.addr(), &path).await;
            if env.controller.route_requests(&token) == 2 {
                assert_eq!(response.status, StatusCode::NOT_FOUND);
                assert_eq!(response.json()["error"], "unknown_token");
                break;
            }
            assert_eq!(response.status, StatusCode::OK);
            assert!(
                tokio::time::Instant::now() < deadline,
                "the route was still cached 10 s after BackendRemoved"
            );
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_route_to_a_removed_backend_is_refused() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, route) = env.route_to_upstream();
        // The removal arrives first; the controller (wrongly, or racing) still answers with
        // a route to that backend.
        env.controller.send(MessageToProxy::BackendRemoved {
            backend_id: route.backend_id.clone(),
        });
        // The removal and a later route response travel on the same ordered socket, so a
        // route request sent after this point is answered after the removal is applied.
        let response = get(env.addr(), &format!("/{token}/")).await;

        assert_eq!(response.status, StatusCode::GONE);
        assert_eq!(response.json()["error"], "backend_terminated");
    })
    .await;
}

#[tokio::test]
async fn concurrent_requests_for_one_token_share_a_route_request() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, _) = env.route_to_upstream();
        env.controller.hold_answers(true);

        let addr = env.addr();
        let requests: Vec<_> = (0..5)
            .map(|_| {
                let path = format!("/{token}/");
                tokio::spawn(async move { get(addr, &path).await })
            })
            .collect();
        env.controller
            .wait_for("a route request", |log| {
                log.iter()
                    .any(|r| matches!(r.message, MessageFromProxy::RouteRequest { .. }))
            })
            .await;
        // Two report intervals later every request has long been waiting at the proxy; still
        // only one question was asked.
        env.controller.wait_for_pings(2).await;
        assert_eq!(env.controller.route_requests(&token), 1);

        env.controller.release();
        for response in join_all(requests).await {
            assert_eq!(response.expect("request task").status, StatusCode::OK);
        }
        assert_eq!(env.controller.route_requests(&token), 1);
    })
    .await;
}

#[tokio::test]
async fn a_request_waits_for_the_controller_to_come_back() {
    with_timeout(async {
        let env = TestEnv::start().await;
        env.controller.refuse_connections(true);
        env.controller.disconnect_all();
        let mut status = env.proxy.connection_status();
        status
            .wait_for(|connected| !*connected)
            .await
            .expect("status channel open");

        let (token, _) = env.route_to_upstream();
        let addr = env.addr();
        let path = format!("/{token}/page");
        let request = tokio::spawn(async move { get(addr, &path).await });
        // Two more failed reconnects (each after a backoff of at least 100 ms) mean the
        // request has long reached the proxy and is waiting while the controller is away.
        env.controller.wait_for_refusals(2).await;
        assert!(!request.is_finished(), "the request did not wait for the controller");
        env.controller.refuse_connections(false);
        let response = request.await.expect("request task");

        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.json()["path"], "/page");
        // The new connection started with a hello, and the pending request was sent on it.
        let log = env.controller.log();
        let second: Vec<_> = log.iter().filter(|r| r.connection > 0).collect();
        assert!(
            matches!(second.first().map(|r| &r.message), Some(MessageFromProxy::Hello { name, .. }) if name == env.proxy.name()),
            "first message on the new connection was not the hello: {second:#?}"
        );
        assert!(second
            .iter()
            .any(|r| matches!(&r.message, MessageFromProxy::RouteRequest { token: t } if *t == token)));
    })
    .await;
}
