//! Idle reaping and lifetime limits.

use crate::db_test;
use crate::harness::TestEnv;
use futures_util::{SinkExt, StreamExt};
use plane_protocol::backend::TerminationReason;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

db_test!(
    idle_backend_is_reaped_while_one_with_an_open_websocket_is_kept,
    |env: TestEnv| async move {
        let mut config = env.spawn_config(&[]);
        config.max_idle_seconds = Some(2);
        let idle = env.connect("idle", &config).await;
        let busy = env.connect_ready("busy", &config).await;
        let url = format!("ws://{}/{}/ws", env.proxy.local_addr(), busy.token);
        let (mut socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket");

        // The idle one is reaped after its 2 s...
        let entry = env.wait_terminated(&idle.backend_id).await;
        assert_eq!(entry.termination_reason, Some(TerminationReason::Swept));
        // ...and by then the busy one has been idle-eligible for as long, yet it is kept
        // while its WebSocket stays open.
        env.stays_ready(
            "the busy backend to stay ready",
            &busy.backend_id,
            Duration::from_secs(3),
        )
        .await;
        socket
            .send(Message::text("still here"))
            .await
            .expect("send");
        let echoed = socket.next().await.expect("reply").expect("frame");
        assert_eq!(echoed.into_text().expect("text").as_str(), "still here");

        // Once the socket closes, it is reaped too.
        drop(socket);
        let entry = env.wait_terminated(&busy.backend_id).await;
        assert_eq!(entry.termination_reason, Some(TerminationReason::Swept));
        env
    }
);

db_test!(
    backend_nobody_connects_to_is_reaped,
    |env: TestEnv| async move {
        let mut config = env.spawn_config(&[]);
        config.max_idle_seconds = Some(1);
        let response = env.connect("lonely", &config).await;
        let entry = env.wait_terminated(&response.backend_id).await;
        assert_eq!(entry.termination_reason, Some(TerminationReason::Swept));
        let scrape = crate::metrics::Scrape::of(&env.client, &env.controller_url("/metrics")).await;
        let swept = [("reason", "idle_or_expired")];
        assert!(scrape.value("plane_sweeps_total", &swept) >= 1.0);
        env
    }
);

db_test!(
    lifetime_limit_terminates_even_a_busy_backend,
    |env: TestEnv| async move {
        let mut config = env.spawn_config(&[]);
        config.lifetime_limit_seconds = Some(3);
        let response = env.connect_ready("short-lived", &config).await;
        let url = format!("ws://{}/{}/ws", env.proxy.local_addr(), response.token);
        let (_socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket");
        let entry = env.wait_terminated(&response.backend_id).await;
        assert_eq!(entry.termination_reason, Some(TerminationReason::Swept));
        env
    }
);

db_test!(
    idle_websocket_keeps_a_backend_with_a_one_second_idle_limit_at_the_default_report_interval,
    |env: TestEnv| async move {
        // The proxy reports on its default 5 s timer; the idle limit is 1 s. Only reports of
        // opens and closes as they happen can keep this backend alive, and reap it on time.
        let mut config = env.spawn_config(&[]);
        config.max_idle_seconds = Some(1);
        let busy = env.connect_ready("one-second", &config).await;
        let url = format!("ws://{}/{}/ws", env.proxy.local_addr(), busy.token);
        let (mut socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket");
        env.stays_ready(
            "the backend with an idle WebSocket to stay ready",
            &busy.backend_id,
            Duration::from_secs(7),
        )
        .await;
        socket.send(Message::text("ping")).await.expect("send");
        let echoed = socket.next().await.expect("reply").expect("frame");
        assert_eq!(echoed.into_text().expect("text").as_str(), "ping");
        drop(socket);
        let entry = env.wait_terminated(&busy.backend_id).await;
        assert_eq!(entry.termination_reason, Some(TerminationReason::Swept));
        env
    }
);
