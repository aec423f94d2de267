//! Backends that stop answering after they were ready (a container frozen with `docker
//! pause`): the proxy answers 504 after its upstream timeout instead of leaving the request
//! hanging, and the drone's health checks report the backend unhealthy (and healthy again)
//! and, past their limit, terminate it.

use crate::db_test;
use crate::harness::{containers_of, wait_for, TestEnv};
use plane_protocol::backend::{
    BackendHealth, BackendStatus, BackendStatusStreamEntry, TerminationReason,
};
use plane_proxy::config::ProxyConfig;
use serde_json::Value;
use std::time::Duration;

db_test!(
    a_frozen_backend_gets_a_504_after_the_upstream_timeout,
    |env: TestEnv| async move {
        let mut config = ProxyConfig::new(env.controller().url(), env.cluster.clone());
        config.bind_ip = "127.0.0.1".parse().expect("ip");
        config.upstream_timeout_ms = 1_000;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let proxy = plane_proxy::start(config, listener).await.expect("proxy");
        let backend = env.connect_ready("frozen", &env.spawn_config(&[])).await;
        let url = format!("http://{}/{}/echo", proxy.local_addr(), backend.token);
        assert_eq!(
            env.client
                .get(&url)
                .send()
                .await
                .expect("get")
                .status()
                .as_u16(),
            200
        );

        let docker = bollard::Docker::connect_with_local_defaults().expect("docker");
        let container = containers_of(&backend.backend_id)
            .await
            .pop()
            .expect("container");
        docker
            .pause_container(&container)
            .await
            .expect("docker pause");
        // Bounded by the client too, so a regression fails here rather than hanging.
        let answer = env
            .client
            .get(&url)
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .expect("an answer, not a hang");
        assert_eq!(answer.status().as_u16(), 504);
        let body: Value = answer.json().await.expect("JSON");
        assert_eq!(body["error"], "upstream_timeout", "{body}");
        assert_eq!(body["waited_ms"], 1_000, "{body}");

        // Unfrozen, it answers again.
        docker
            .unpause_container(&container)
            .await
            .expect("docker unpause");
        assert_eq!(
            env.client
                .get(&url)
                .send()
                .await
                .expect("get")
                .status()
                .as_u16(),
            200
        );
        proxy.shutdown().await;
        env
    }
);

db_test!(
    a_backend_that_stops_answering_is_reported_unhealthy_then_terminated,
    |env: TestEnv| async move {
        let mut config = env.drone_config("dr-health");
        config.health_check_interval_ms = 200;
        config.health_check_timeout_ms = 300;
        config.unhealthy_after = 2;
        config.terminate_unhealthy_after = 15;
        let drone = env.start_drone(config).await;
        env.set_draining(env.drone.name(), true).await;
        let backend = env.connect_ready("checked", &env.spawn_config(&[])).await;
        env.set_draining(env.drone.name(), false).await;
        assert_eq!(backend.drone.as_ref(), Some(drone.name()));
        let health = |entry: &BackendStatusStreamEntry| entry.health;

        let docker = bollard::Docker::connect_with_local_defaults().expect("docker");
        let container = containers_of(&backend.backend_id)
            .await
            .pop()
            .expect("container");
        docker
            .pause_container(&container)
            .await
            .expect("docker pause");
        let unhealthy = wait_for("reported unhealthy", Duration::from_secs(20), || async {
            let entry = env.status(&backend.backend_id).await;
            (health(&entry) == Some(BackendHealth::Unhealthy))
                .then_some(entry.clone())
                .ok_or(format!("{entry:?}"))
        })
        .await;
        assert_eq!(
            unhealthy.status,
            BackendStatus::Ready,
            "still ready, not healthy"
        );
        let message = unhealthy.message.clone().unwrap_or_default();
        assert!(
            message.contains("GET / failed 2 times in a row"),
            "{message}"
        );

        // It recovers, and says so.
        docker
            .unpause_container(&container)
            .await
            .expect("docker unpause");
        wait_for(
            "reported healthy again",
            Duration::from_secs(20),
            || async {
                let entry = env.status(&backend.backend_id).await;
                (health(&entry) == Some(BackendHealth::Healthy))
                    .then_some(())
                    .ok_or(format!("{entry:?}"))
            },
        )
        .await;

        // Frozen for good: terminated past the limit, with a reason Plane 0.5 knows and a
        // message naming the check.
        docker
            .pause_container(&container)
            .await
            .expect("docker pause");
        let ended = env.wait_terminated(&backend.backend_id).await;
        assert_eq!(
            ended.termination_reason,
            Some(TerminationReason::Lost),
            "{ended:?}"
        );
        let message = ended.message.clone().unwrap_or_default();
        assert!(
            message.contains("stopped answering its health check: GET / failed 15 times"),
            "{message}"
        );
        // The stream tells the whole story, in order: ready, unhealthy, healthy,
        // unhealthy, then the end.
        let stream = env.status_stream(&backend.backend_id).await;
        let story: Vec<(BackendStatus, Option<BackendHealth>)> =
            stream.iter().map(|e| (e.status, e.health)).collect();
        let ready_part: Vec<_> = story
            .iter()
            .filter(|(status, _)| *status == BackendStatus::Ready)
            .map(|(_, health)| *health)
            .collect();
        assert_eq!(
            ready_part,
            vec![
                None,
                Some(BackendHealth::Unhealthy),
                Some(BackendHealth::Healthy),
                Some(BackendHealth::Unhealthy)
            ],
            "{story:?}"
        );
        assert_eq!(story.last().map(|e| e.0), Some(BackendStatus::Terminated));
        drone.shutdown().await;
        env
    }
);
