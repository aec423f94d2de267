//! A PostgreSQL restart under load loses nothing: the controller's pool and change listener
//! reconnect, and every action and status written before and after arrives.

use crate::harness::{wait_for, PrivatePostgres, TestEnv, BACKEND_WAIT};
use crate::postgres_test;
use plane_protocol::api::ConnectResponse;
use plane_protocol::backend::{BackendStatus, TerminationKind};
use plane_protocol::names::ClusterName;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How many keys the load during the restart cycles through.
const LOAD_KEYS: usize = 5;

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
        let api = env.api_at(&controller.url());
        let mut drone_config = env.drone_config("pg-drone");
        drone_config.controller_url = controller.url();
        drone_config.cluster = cluster.clone();
        let drone = env.start_drone(drone_config).await;
        let mut spawn = env.spawn_config(&[]);
        spawn.cluster = Some(cluster.clone());

        // Backends started before the restart, each with a status stream that stays open
        // across it.
        let mut before = Vec::new();
        for i in 0..3 {
            before.push(api.connect(&format!("before-{i}"), &spawn).await);
        }
        let streams: Vec<_> = before
            .iter()
            .map(|response| {
                let (api, backend) = (api.clone(), response.backend_id.clone());
                tokio::spawn(async move { api.status_stream(&backend).await })
            })
            .collect();

        // Connects keep coming, one after another, while the database restarts: a few keys
        // over and over, so the load is writes (spawns, then tokens) without a container
        // per request.
        let running = Arc::new(AtomicBool::new(true));
        let attempts = Arc::new(AtomicUsize::new(0));
        let load = {
            let (running, attempts, api, spawn) = (
                running.clone(),
                attempts.clone(),
                api.clone(),
                spawn.clone(),
            );
            tokio::spawn(async move {
                let mut answered = Vec::new();
                while running.load(Ordering::Relaxed) {
                    let n = attempts.fetch_add(1, Ordering::Relaxed);
                    let key = format!("during-{}", n % LOAD_KEYS);
                    if let Ok(response) = api.try_connect(&key, &spawn).await {
                        answered.push(response);
                    }
                }
                answered
            })
        };
        wait_for("the load to get going", Duration::from_secs(10), || async {
            let n = attempts.load(Ordering::Relaxed);
            if n >= 3 {
                Ok(())
            } else {
                Err(format!("{n} connects sent"))
            }
        })
        .await;
        postgres.restart().await;
        let after = wait_for(
            "a connect to succeed after the restart",
            Duration::from_secs(30),
            || api.try_connect("after", &spawn),
        )
        .await;
        running.store(false, Ordering::Relaxed);
        let during = load.await.expect("load task");

        // Every backend the API answered for comes up: no stored action was lost.
        let all: Vec<&ConnectResponse> = before.iter().chain(&during).chain([&after]).collect();
        for response in &all {
            api.wait_for_status(&response.backend_id, BackendStatus::Ready, BACKEND_WAIT)
                .await;
        }
        // Statuses written after the restart reach streams opened before it.
        for response in &before {
            api.terminate(&response.backend_id, TerminationKind::Soft)
                .await;
        }
        for stream in streams {
            let entries = tokio::time::timeout(BACKEND_WAIT, stream)
                .await
                .expect("stream ends")
                .expect("stream task");
            let statuses: Vec<BackendStatus> = entries.iter().map(|e| e.status).collect();
            for expected in [
                BackendStatus::Scheduled,
                BackendStatus::Ready,
                BackendStatus::Terminating,
                BackendStatus::Terminated,
            ] {
                assert!(
                    statuses.contains(&expected),
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
