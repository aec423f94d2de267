//! WebSockets pass through the proxy and keep their backend alive while open.

use crate::support::{is_keepalive_for, with_timeout, TestEnv};
use futures_util::{SinkExt, StreamExt};
use plane_protocol::proxy::MessageToProxy;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn websocket_echoes_through_the_proxy() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, _) = env.route_to_upstream();

        let url = format!("ws://{}/{token}/socket", env.addr());
        let (mut socket, response) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WebSocket handshake through the proxy");
        assert_eq!(response.status(), http::StatusCode::SWITCHING_PROTOCOLS);

        for text in ["hello", "again"] {
            socket.send(Message::text(text)).await.expect("send");
            let echoed = socket.next().await.expect("an echo").expect("a message");
            assert_eq!(echoed, Message::text(text));
        }
        socket
            .send(Message::binary(vec![0u8, 1, 2, 255]))
            .await
            .expect("send binary");
        let echoed = socket.next().await.expect("an echo").expect("a message");
        assert_eq!(echoed, Message::binary(vec![0u8, 1, 2, 255]));
        socket.close(None).await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn keepalive_names_a_backend_with_an_open_websocket() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, route) = env.route_to_upstream();
        let url = format!("ws://{}/{token}/socket", env.addr());
        let (mut socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WebSocket handshake");

        // The socket is idle throughout: only its being open can explain the second report.
        let seen = env.controller.log().len();
        env.controller
            .wait_for("two keep-alives naming the WebSocket's backend", |log| {
                log[seen..]
                    .iter()
                    .filter(|r| is_keepalive_for(r, &route.backend_id))
                    .count()
                    >= 2
            })
            .await;

        socket
            .send(Message::text("still here"))
            .await
            .expect("send");
        assert!(socket.next().await.is_some_and(|m| m.is_ok()));
    })
    .await;
}

#[tokio::test]
async fn removing_the_backend_closes_its_websockets() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, route) = env.route_to_upstream();
        let url = format!("ws://{}/{token}/socket", env.addr());
        let (mut socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WebSocket handshake");
        socket.send(Message::text("ping")).await.expect("send");
        assert!(socket.next().await.is_some_and(|m| m.is_ok()));

        env.controller.send(MessageToProxy::BackendRemoved {
            backend_id: route.backend_id.clone(),
        });

        // The tunnel is cut, so the stream ends (with or without an error).
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(Ok(_)) = socket.next().await {}
        })
        .await;
        assert!(
            ended.is_ok(),
            "the WebSocket stayed open after its backend was removed"
        );
    })
    .await;
}

#[tokio::test]
async fn large_messages_cross_the_tunnel_intact_both_ways() {
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, _) = env.route_to_upstream();
        let url = format!("ws://{}/{token}/socket", env.addr());
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WebSocket handshake through the proxy");
        let (mut sink, mut stream) = socket.split();
        // Several MiB in flight at once, more than socket buffers hold, so both directions
        // of the tunnel have to wait for the other side to take bytes.
        let messages: Vec<Vec<u8>> = (0..6u8)
            .map(|n| (0..1_000_000u32).map(|i| (i as u8) ^ n).collect())
            .collect();
        let sent = messages.clone();
        let writer = tokio::spawn(async move {
            for message in sent {
                sink.send(Message::binary(message)).await.expect("send");
            }
            sink
        });
        for expected in &messages {
            let echoed = stream.next().await.expect("an echo").expect("a message");
            assert!(
                echoed.into_data().as_ref() == expected.as_slice(),
                "an echo differs"
            );
        }
        let mut sink = writer.await.expect("writer task");
        sink.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn a_tunnel_passes_early_bytes_and_half_closes_both_ways() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    with_timeout(async {
        let env = TestEnv::start().await;
        let (token, _) = env.route_to_upstream();
        let mut client = tokio::net::TcpStream::connect(env.addr())
            .await
            .expect("connect to the proxy");
        // The first bytes of the new protocol travel in the same write as the handshake.
        let handshake = format!(
            "GET /{token}/raw HTTP/1.1\r\nhost: localhost\r\nconnection: upgrade\r\nupgrade: raw-echo\r\n\r\nearly;"
        );
        client
            .write_all(handshake.as_bytes())
            .await
            .expect("send the handshake");

        let mut received = Vec::new();
        let mut chunk = [0u8; 1024];
        let head_end = loop {
            let n = client.read(&mut chunk).await.expect("read the answer");
            assert!(n > 0, "the proxy closed before answering");
            received.extend_from_slice(&chunk[..n]);
            if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
        };
        let head = String::from_utf8_lossy(&received[..head_end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let mut echoed = received[head_end..].to_vec();
        while echoed.len() < b"early;".len() {
            let n = client.read(&mut chunk).await.expect("read the echo");
            assert!(n > 0, "the tunnel closed before echoing the early bytes");
            echoed.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(echoed, b"early;");

        client.write_all(b"later").await.expect("send more");
        // Half-close: the backend sees the end, and may still answer.
        client.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("read to the end");
        assert_eq!(rest, b"laterbye");
    })
    .await;
}
