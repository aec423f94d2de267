//! Backends that stop answering after they were ready (a container frozen with `docker
//! pause`): the proxy answers 504 after its upstream timeout instead of leaving the request
//! hanging.

use crate::db_test;
use crate::harness::{containers_of, TestEnv};
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
