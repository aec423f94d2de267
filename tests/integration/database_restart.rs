//! A PostgreSQL restart under load loses nothing: the controller's pool and change listener
//! reconnect, and every action and status written before and after arrives.

use crate::harness::{wait_for, PrivatePostgres, TestEnv, BACKEND_WAIT};
use crate::postgres_test;
use plane_protocol::api::ConnectResponse;
use plane_protocol::backend::{BackendStatus, BackendStatusStreamEntry};
use plane_protocol::names::ClusterName;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

postgres_test!(
    postgres_restart_while_connects_and_status_streams_run_loses_nothing,
    |env: TestEnv| async move {
        let postgres = PrivatePostgres::start(&env.scratch).await;
        let cluster: ClusterName = format!("pg-restart-{}.test:1", env.drone.name())
            .parse()
            .expect("cluster");
        let controller = env
            .start_controller_with(|config| {
                config.db = postgres.url();
                config.default_cluster = Some(cluster.clone());
            })
            .await;
        let base = controller.url().as_str().trim_end_matches('/').to_string();
        let mut drone_config = env.drone_config("pg-drone");
        drone_config.controller_url = controller.url();
        drone_config.cluster = cluster.clone();
        let drone = env.start_drone(drone_config).await;

        let client = env.client.clone();
        let spawn = json!({ "executable": { "image": crate::harness::test_image() } });
        let connect = {
            let (client, base, spawn) = (client.clone(), base.clone(), spawn.clone());
            move |key: String| {
                let (client, base, spawn) = (client.clone(), base.clone(), spawn.clone());
                async move {
                    let body = json!({ "key": { "name": key }, "spawn_config": spawn });
                    let response = client
                        .post(format!("{base}/ctrl/connect"))
                        .json(&body)
                        .send()
                        .await
                        .ok()?;
                    if !response.status().is_success() {
                        return None;
                    }
                    response.json::<ConnectResponse>().await.ok()
                }
            }
        };
        let status_of = |backend: String| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let entry: BackendStatusStreamEntry = client
                    .get(format!("{base}/pub/b/{backend}/status"))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .json()
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(entry.status)
            }
        };

        // Backends started before the restart, each with a status stream that stays open
        // across it.
        let mut before = Vec::new();
        for i in 0..3 {
            let response = connect(format!("before-{i}"))
                .await
                .expect("connect before the restart");
            before.push(response);
        }
        let streams: Vec<_> = before
            .iter()
            .map(|response| {
                let url = format!("{base}/pub/b/{}/status-stream", response.backend_id);
                let client = client.clone();
                tokio::spawn(async move {
                    client
                        .get(url)
                        .send()
                        .await
                        .expect("stream")
                        .text()
                        .await
                        .expect("body")
                })
            })
            .collect();

        // Connects keep coming while the database restarts.
        let running = Arc::new(AtomicBool::new(true));
        let load = {
            let (running, connect) = (running.clone(), connect.clone());
            tokio::spawn(async move {
                let mut answered = Vec::new();
                let mut n = 0;
                while running.load(Ordering::Relaxed) {
                    if let Some(response) = connect(format!("during-{n}")).await {
                        answered.push(response);
                    }
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                answered
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        postgres.restart().await;
        let after = wait_for(
            "a connect to succeed after the restart",
            Duration::from_secs(30),
            || {
                let connect = connect.clone();
                async move { connect("after".to_string()).await.ok_or("not yet") }
            },
        )
        .await;
        running.store(false, Ordering::Relaxed);
        let during = load.await.expect("load task");

        // Every backend the API answered for comes up: no stored action was lost.
        let all: Vec<&ConnectResponse> = before.iter().chain(&during).chain([&after]).collect();
        for response in &all {
            let id = response.backend_id.to_string();
            wait_for(&format!("backend {id} ready"), BACKEND_WAIT, || async {
                match status_of(id.clone()).await? {
                    BackendStatus::Ready => Ok(()),
                    other => Err(format!("{other}")),
                }
            })
            .await;
        }
        // Statuses written after the restart reach streams opened before it.
        for response in &before {
            let url = format!("{base}/ctrl/b/{}/soft-terminate", response.backend_id);
            let answer = client
                .post(url)
                .json(&json!({}))
                .send()
                .await
                .expect("terminate");
            assert!(answer.status().is_success());
        }
        for stream in streams {
            let text = tokio::time::timeout(BACKEND_WAIT, stream)
                .await
                .expect("stream ends")
                .expect("stream task");
            let statuses: Vec<String> = text
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|data| {
                    serde_json::from_str::<BackendStatusStreamEntry>(data.trim())
                        .expect("entry")
                        .status
                        .to_string()
                })
                .collect();
            for expected in ["scheduled", "ready", "terminating", "terminated"] {
                assert!(
                    statuses.iter().any(|s| s == expected),
                    "missing {expected} in {statuses:?}"
                );
            }
        }
        tracing::info!(
            during = during.len(),
            "connects answered while the database restarted"
        );
        drone.shutdown().await;
        controller.shutdown().await;
        env
    }
);
