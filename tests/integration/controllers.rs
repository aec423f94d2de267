//! Several controllers on one PostgreSQL database, with no load balancer: a drone on one, a
//! proxy on another, the app calling either. They coordinate only through the database.

use crate::harness::{wait_for, TestEnv, BACKEND_WAIT};
use crate::postgres_test;
use futures_util::{SinkExt, StreamExt};
use plane_protocol::backend::{BackendStatus, TerminationKind, TerminationReason};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

postgres_test!(
    a_drone_on_one_controller_serves_apps_and_proxies_on_another,
    |env: TestEnv| async move {
        let a = env.api();
        let other = env.start_controller().await;
        let b = env.api_at(&other.url());
        let proxy_b = env.start_proxy(&other.url()).await;

        // Placement on B sees the drone connected to A.
        let state = b
            .plane
            .cluster_state(&env.cluster)
            .await
            .expect("cluster state on B");
        assert!(
            state.drones.first().is_some_and(|d| d.node.connected),
            "{state:?}"
        );

        let spawn = env.spawn_config(&[]);
        let response = b.connect("shared", &spawn).await;
        assert_eq!(response.drone.as_ref(), Some(env.drone.name()));
        // A stream on B follows what the drone reports to A, live.
        let stream_b = {
            let (b, backend) = (b.clone(), response.backend_id.clone());
            tokio::spawn(async move { b.status_stream(&backend).await })
        };
        env.wait_for_status(&response.backend_id, BackendStatus::Ready, BACKEND_WAIT)
            .await;
        let joined = a.connect("shared", &spawn).await;
        assert_eq!(joined.backend_id, response.backend_id);
        assert!(!joined.spawned);

        // The proxy on B routes to it.
        let url = format!("http://{}/{}/echo", proxy_b.local_addr(), response.token);
        let answer = env.client.get(&url).send().await.expect("proxy reachable");
        assert_eq!(answer.status().as_u16(), 200);

        // Terminated through A: B's stream ends, and B's proxy drops the route at once.
        a.terminate(&response.backend_id, TerminationKind::Hard)
            .await;
        let streamed = tokio::time::timeout(BACKEND_WAIT, stream_b)
            .await
            .expect("stream ends")
            .expect("stream task");
        assert_eq!(
            streamed.last().map(|e| e.status),
            Some(BackendStatus::Terminated),
            "{streamed:?}"
        );
        let on_b = b.status_stream(&response.backend_id).await;
        assert_eq!(
            on_b.last().map(|e| e.status),
            Some(BackendStatus::Terminated)
        );
        wait_for(
            "B's proxy to stop routing the token",
            Duration::from_secs(10),
            || async {
                let status = env
                    .client
                    .get(&url)
                    .send()
                    .await
                    .expect("proxy reachable")
                    .status()
                    .as_u16();
                if status == 200 {
                    Err(format!("still {status}"))
                } else {
                    Ok(())
                }
            },
        )
        .await;

        // Idle reaping sees connections reported by a proxy on another controller.
        let mut config = env.spawn_config(&[]);
        config.max_idle_seconds = Some(1);
        let busy = a.connect("busy", &config).await;
        env.wait_for_status(&busy.backend_id, BackendStatus::Ready, BACKEND_WAIT)
            .await;
        let ws = format!("ws://{}/{}/ws", proxy_b.local_addr(), busy.token);
        let (mut socket, _) = tokio_tungstenite::connect_async(ws)
            .await
            .expect("websocket");
        env.stays_ready(
            "the backend with a WebSocket through B to stay ready",
            &busy.backend_id,
            Duration::from_secs(3),
        )
        .await;
        socket.send(Message::text("hi")).await.expect("send");
        assert!(socket.next().await.is_some());
        drop(socket);
        let entry = env.wait_terminated(&busy.backend_id).await;
        assert_eq!(entry.termination_reason, Some(TerminationReason::Swept));

        proxy_b.shutdown().await;
        other.shutdown().await;
        env
    }
);

postgres_test!(
    concurrent_connects_split_across_two_controllers_start_one_backend,
    |env: TestEnv| async move {
        let a = env.api();
        let other = env.start_controller().await;
        let b = env.api_at(&other.url());
        let spawn = env.spawn_config(&[]);
        for round in 0..10 {
            let key = format!("race-{round}");
            let connects = (0..200).map(|i| {
                let api = if i % 2 == 0 { &a } else { &b };
                let (key, spawn) = (&key, &spawn);
                async move { api.connect(key, spawn).await }
            });
            let responses = futures_util::future::join_all(connects).await;
            let first = &responses[0].backend_id;
            assert!(
                responses.iter().all(|r| &r.backend_id == first),
                "round {round}: more than one backend for one key"
            );
            assert_eq!(
                responses.iter().filter(|r| r.spawned).count(),
                1,
                "round {round}"
            );
        }
        other.shutdown().await;
        env
    }
);

postgres_test!(
    timed_work_is_done_by_one_controller_and_taken_over_when_it_stops,
    |env: TestEnv| async move {
        let other = env.start_controller().await;
        // Whichever controller holds the sweeper lease, idle backends are reaped...
        let mut config = env.spawn_config(&[]);
        config.max_idle_seconds = Some(1);
        let first = env.connect("idle-1", &config).await;
        assert_eq!(
            env.wait_terminated(&first.backend_id)
                .await
                .termination_reason,
            Some(TerminationReason::Swept)
        );
        // ...exactly once: one request to stop, one `terminating` entry.
        let sequence = env.status_sequence(&first.backend_id).await;
        assert_eq!(
            sequence
                .iter()
                .filter(|s| **s == BackendStatus::Terminating)
                .count(),
            1,
            "{sequence:?}"
        );

        // The second controller stops; if it held the lease, the first takes over.
        other.shutdown().await;
        let second = env.connect("idle-2", &config).await;
        assert_eq!(
            env.wait_terminated(&second.backend_id)
                .await
                .termination_reason,
            Some(TerminationReason::Swept)
        );
        env
    }
);

crate::db_test!(
    a_node_session_replaced_elsewhere_is_not_ended_by_the_controller_it_left,
    |env: TestEnv| async move {
        use plane::controller::store::{NodeKind, NodeSession, Store};
        use plane_protocol::names::NodeName;
        // The store both controllers would use (for SQLite, a file of this test's own).
        let db = match env.db() {
            crate::harness::Db::Sqlite => env.scratch.join("sessions.db").display().to_string(),
            crate::harness::Db::Postgres => env.db_url().to_string(),
        };
        let store = Store::open(&db).await.expect("open the store");
        let name: NodeName = "dr-wanderer".parse().expect("name");
        let session = |controller: &'static str, instance: &'static str| NodeSession {
            cluster: &env.cluster,
            kind: NodeKind::Drone,
            name: &name,
            pool: "",
            version: "test",
            hash: "test",
            instance,
            controller,
            disk_limits: false,
        };
        let live_since = plane_protocol::time::Millis::now().minus_millis(30_000);
        let on_a = store
            .node_connected(&session("co-a", "one"), live_since)
            .await
            .expect("session on A")
            .expect("a free name");
        // The same process reconnecting elsewhere takes its session over.
        let on_b = store
            .node_connected(&session("co-b", "one"), live_since)
            .await
            .expect("session on B")
            .expect("its own name");
        assert!(on_b > on_a);
        // Another process under that name is refused while the first is live.
        let second = store
            .node_connected(&session("co-a", "two"), live_since)
            .await
            .expect("store");
        assert_eq!(second, None);
        // A notices its (replaced) session is gone only now.
        store
            .node_disconnected(&env.cluster, NodeKind::Drone, &name, on_a)
            .await
            .expect("A ends its session");
        let nodes = store
            .nodes(&env.cluster, NodeKind::Drone)
            .await
            .expect("nodes");
        let node = nodes.iter().find(|n| n.name == name).expect("the drone");
        assert_eq!(node.connected_to.as_deref(), Some("co-b"));
        // B's own end of the session does end it.
        store
            .node_disconnected(&env.cluster, NodeKind::Drone, &name, on_b)
            .await
            .expect("B ends its session");
        let nodes = store
            .nodes(&env.cluster, NodeKind::Drone)
            .await
            .expect("nodes");
        assert_eq!(
            nodes
                .iter()
                .find(|n| n.name == name)
                .expect("drone")
                .connected_to,
            None
        );
        // Once it has disconnected, another process may take the name.
        let taken = store
            .node_connected(&session("co-a", "two"), live_since)
            .await
            .expect("store");
        assert!(taken.is_some_and(|generation| generation > on_b));
        store.close().await;
        env
    }
);

crate::db_test!(
    a_second_drone_under_a_connected_drones_name_is_refused,
    |env: TestEnv| async move {
        use futures_util::{SinkExt, StreamExt};
        use plane_protocol::drone::{MessageFromDrone, MessageToDrone};
        use tokio_tungstenite::tungstenite::Message;
        let url = format!(
            "ws://{}/ctrl/c/{}/drone-socket",
            env.controller().local_addr(),
            env.cluster
        );
        let (mut socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("the drone socket opens");
        let hello = MessageFromDrone::Hello {
            name: env.drone.name().clone(),
            pool: Default::default(),
            version: plane_protocol::PLANE_VERSION.to_string(),
            hash: plane_protocol::PLANE_HASH.to_string(),
            instance: "an-impostor".to_string(),
            heartbeat_interval_ms: Some(500),
            fence_margin_ms: Some(1000),
            disk_limits: false,
        };
        let text = serde_json::to_string(&hello).expect("serializes");
        socket.send(Message::text(text)).await.expect("hello sent");
        let answer = tokio::time::timeout(crate::harness::BACKEND_WAIT, socket.next())
            .await
            .expect("an answer")
            .expect("a frame")
            .expect("a message");
        let refused: MessageToDrone =
            serde_json::from_str(answer.to_text().expect("text")).expect("a drone message");
        let MessageToDrone::Refused { reason } = refused else {
            panic!("expected a refusal, got {refused:?}");
        };
        assert!(reason.contains("another drone named"), "{reason}");
        // The real drone keeps its session and keeps serving.
        env.drone_state_is(env.drone.name(), "connected", true)
            .await
            .expect("the first drone stays connected");
        let response = env
            .connect_ready("after-impostor", &env.spawn_config(&[]))
            .await;
        let (code, _) = env.get_via_proxy(response.token.as_str(), "/").await;
        assert_eq!(code, 200);
        env
    }
);

crate::db_test!(
    a_controller_that_shuts_down_records_its_node_sessions_ended,
    |mut env: TestEnv| async move {
        use plane::controller::store::{NodeKind, Store};
        env.stop_controller().await;
        // Read after the controller closed its store: its sessions' last writes are in.
        let store = Store::open(env.db_url()).await.expect("open the store");
        for kind in [NodeKind::Drone, NodeKind::Proxy] {
            let nodes = store.nodes(&env.cluster, kind).await.expect("nodes");
            assert!(!nodes.is_empty(), "the {kind:?} nodes were recorded");
            for node in nodes {
                assert_eq!(
                    node.connected_to, None,
                    "{kind:?} {} is still recorded as connected to the stopped controller",
                    node.name
                );
            }
        }
        store.close().await;
        env
    }
);
