//! Graceful shutdown: no new connections, in-flight responses finish.

use crate::support::{send, with_timeout, TestEnv};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};

#[tokio::test]
async fn shutdown_lets_an_in_flight_response_finish_and_refuses_new_connections() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, _) = env.route_to_upstream();
        let addr = env.addr();
        let request = Request::get(format!("/{token}/slow"))
            .header("host", "localhost:9090")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let response = send(addr, request).await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let first = body.frame().await.expect("first frame").expect("frame ok");
        assert_eq!(first.into_data().ok(), Some(Bytes::from("start\n")));

        let crate::support::TestEnv {
            proxy,
            upstream,
            controller: _controller,
        } = env;
        let shutdown = tokio::spawn(proxy.shutdown());

        // The listener closes before draining starts, so new connections are refused
        // once shutdown has got going; poll for that.
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(
            !shutdown.is_finished(),
            "shutdown did not wait for the open response"
        );

        upstream.release_slow();
        let rest = body.collect().await.expect("rest of the body").to_bytes();
        assert_eq!(rest, Bytes::from("end\n"));
        shutdown.await.expect("shutdown task");
    })
    .await;
}
