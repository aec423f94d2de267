//! Where new backends go: spread over a pool's drones by best-of-N least-loaded placement,
//! and only to drones of the pool asked for.

use crate::harness::{run_test, Db, TestEnv};
use plane_protocol::api::{ApiErrorKind, SpawnConfig, SpawnRequest};
use plane_protocol::backend::TerminationKind;
use plane_protocol::names::NodeName;
use std::collections::HashMap;

/// A keyless spawn of `spawn_config`, with no user and no token lifetime.
fn spawn_request(spawn_config: SpawnConfig) -> SpawnRequest {
    SpawnRequest {
        spawn_config,
        user: None,
        auth: Default::default(),
        token_ttl_seconds: None,
    }
}

/// On SQLite only: placement's SQL is the same on both databases, and 20 containers at once
/// are load enough for a shared CI machine.
#[tokio::test(flavor = "current_thread")]
async fn backends_spread_evenly_over_a_pools_drones_and_stay_in_their_pool() {
    run_test(
        "backends_spread_evenly_over_a_pools_drones_and_stay_in_their_pool",
        Db::Sqlite,
        |env: TestEnv| async move {
            let second = env.start_drone(env.drone_config("dr-second")).await;
            let third = env.start_drone(env.drone_config("dr-third")).await;
            let mut gpu_config = env.drone_config("dr-gpu");
            gpu_config.pool = "gpu".parse().expect("pool");
            let gpu = env.start_drone(gpu_config).await;
            let plane = env.api().plane;

            // 20 backends in the default pool, with the default best-of-2 placement.
            let mut per_drone: HashMap<NodeName, usize> = HashMap::new();
            let mut backends = Vec::new();
            for _ in 0..20 {
                let response = plane
                    .spawn(&spawn_request(env.spawn_config(&[])))
                    .await
                    .expect("a spawn in the default pool");
                *per_drone
                    .entry(response.drone.clone().expect("a drone"))
                    .or_default() += 1;
                backends.push(response.backend_id);
            }
            assert!(!per_drone.contains_key(gpu.name()), "{per_drone:?}");
            let default_pool = [env.drone.name(), second.name(), third.name()];
            let counts: Vec<usize> = default_pool
                .iter()
                .map(|d| per_drone.get(*d).copied().unwrap_or(0))
                .collect();
            let (min, max) = (counts.iter().min(), counts.iter().max());
            assert!(
                min.zip(max).is_some_and(|(min, max)| max - min <= 3),
                "20 backends over 3 drones: {per_drone:?}"
            );

            // The gpu pool gets the gpu drone; a pool without drones gets a clear 503.
            let mut in_gpu = env.spawn_config(&[]);
            in_gpu.pool = Some("gpu".parse().expect("pool"));
            let response = plane
                .spawn(&spawn_request(in_gpu))
                .await
                .expect("a spawn in the gpu pool");
            assert_eq!(response.drone.as_ref(), Some(gpu.name()), "{response:?}");
            backends.push(response.backend_id);
            let mut nowhere = env.spawn_config(&[]);
            nowhere.pool = Some("tpu".parse().expect("pool"));
            let err = plane
                .spawn(&spawn_request(nowhere))
                .await
                .expect_err("a spawn in a pool without drones is refused");
            assert_eq!(err.status(), Some(503), "{err}");
            assert_eq!(
                err.api_error().map(|e| e.kind),
                Some(ApiErrorKind::NoDroneAvailable),
                "{err}"
            );
            assert!(
                err.api_error().is_some_and(|e| e.message.contains("tpu")),
                "{err}"
            );

            for backend in &backends {
                env.terminate(backend, TerminationKind::Hard).await;
            }
            for backend in &backends {
                env.wait_terminated(backend).await;
            }
            gpu.shutdown().await;
            third.shutdown().await;
            second.shutdown().await;
            env
        },
    )
    .await;
}
