//! A drone restarted without its users noticing: stopped with SIGKILL, or with SIGTERM
//! under `--on-shutdown keep` (the default), and started again on the same state directory,
//! it re-adopts its running backend, which stays `ready`, keeps serving through the proxy,
//! and whose later exit is still reported. `--on-shutdown terminate` stops them instead.

use crate::crashes::{drone_process, drone_process_with, PlaneProcess};
use crate::db_test;
use crate::harness::{containers_of, wait_for, TestEnv};
use plane_protocol::api::ConnectResponse;
use plane_protocol::backend::{BackendStatus, TerminationReason};
use plane_protocol::names::NodeName;
use serde_json::Value;
use std::time::Duration;

/// A backend on a drone process of the test's own (the in-process drone is drained while
/// it is placed), ready and answering through the proxy.
async fn backend_on(env: &TestEnv, drone: &NodeName, key: &str) -> ConnectResponse {
    wait_for(
        "the drone process to connect",
        Duration::from_secs(30),
        || env.drone_state_is(drone, "connected", true),
    )
    .await;
    env.set_draining(env.drone.name(), true).await;
    let backend = env.connect_ready(key, &env.spawn_config(&[])).await;
    env.set_draining(env.drone.name(), false).await;
    assert_eq!(backend.drone.as_ref(), Some(drone));
    assert_eq!(
        echoed_backend(env, &backend).await,
        backend.backend_id.as_str()
    );
    backend
}

/// The backend ID the backend behind `backend`'s token says it is.
async fn echoed_backend(env: &TestEnv, backend: &ConnectResponse) -> String {
    let (code, body) = env.get_via_proxy(backend.token.as_str(), "/echo").await;
    assert_eq!(code, 200, "{body}");
    let body: Value = serde_json::from_str(&body).expect("echo JSON");
    body["backend_id"].as_str().unwrap_or_default().to_string()
}

/// After the drone process was stopped: started again, it re-adopts the backend, which
/// stays ready past its lease, serves through the proxy, and reports its own exit.
async fn restarts_without_loss(
    env: &TestEnv,
    drone: &mut PlaneProcess,
    name: &NodeName,
    backend: &ConnectResponse,
) {
    assert_eq!(
        containers_of(&backend.backend_id).await.len(),
        1,
        "left running"
    );
    drone.restart();
    wait_for(
        "the drone process to reconnect",
        Duration::from_secs(30),
        || env.drone_state_is(name, "connected", true),
    )
    .await;
    // Longer than a lease (4 s here): only renewals by the new process can keep it.
    env.stays_ready(
        "the re-adopted backend",
        &backend.backend_id,
        Duration::from_secs(6),
    )
    .await;
    assert_eq!(
        echoed_backend(env, backend).await,
        backend.backend_id.as_str()
    );
    assert_eq!(containers_of(&backend.backend_id).await.len(), 1);

    let exit = format!("{}/exit/3", env.proxy_url(&format!("/{}", backend.token)));
    let _ = env.client.post(&exit).send().await;
    let ended = env.wait_terminated(&backend.backend_id).await;
    assert_eq!(ended.exit_code, Some(3), "{ended:?}");
    assert_eq!(
        ended.termination_reason, None,
        "exited on its own: {ended:?}"
    );
}

db_test!(
    a_drone_killed_and_restarted_readopts_its_backend,
    |env: TestEnv| async move {
        let name: NodeName = format!("a-killed-{}", env.drone.name())
            .parse()
            .expect("name");
        let mut drone = drone_process(&env, &name, &env.controller().url()).await;
        let backend = backend_on(&env, &name, "survives-kill").await;
        drone.kill().await;
        restarts_without_loss(&env, &mut drone, &name, &backend).await;
        drone.kill().await;
        env
    }
);

db_test!(
    a_drone_stopped_for_an_upgrade_keeps_its_backend_for_the_next_process,
    |env: TestEnv| async move {
        let name: NodeName = format!("a-upgraded-{}", env.drone.name())
            .parse()
            .expect("name");
        let mut drone = drone_process(&env, &name, &env.controller().url()).await;
        let backend = backend_on(&env, &name, "survives-upgrade").await;
        let status = drone.terminate().await;
        assert!(status.success(), "{status}");
        // Between the two processes the backend still serves.
        assert_eq!(
            env.status(&backend.backend_id).await.status,
            BackendStatus::Ready
        );
        assert_eq!(
            echoed_backend(&env, &backend).await,
            backend.backend_id.as_str()
        );
        restarts_without_loss(&env, &mut drone, &name, &backend).await;
        drone.kill().await;
        env
    }
);

db_test!(
    on_shutdown_terminate_stops_every_backend_before_the_drone_exits,
    |env: TestEnv| async move {
        let name: NodeName = format!("a-tidy-{}", env.drone.name())
            .parse()
            .expect("name");
        let mut drone = drone_process_with(
            &env,
            &env.cluster,
            &name,
            &env.controller().url(),
            &["--on-shutdown", "terminate"],
        )
        .await;
        let backend = backend_on(&env, &name, "stopped-with-drone").await;
        let status = drone.terminate().await;
        assert!(status.success(), "{status}");
        // Reported and removed before the process ended.
        assert!(containers_of(&backend.backend_id).await.is_empty());
        let ended = env.wait_terminated(&backend.backend_id).await;
        assert_eq!(
            ended.termination_reason,
            Some(TerminationReason::Lost),
            "{ended:?}"
        );
        env
    }
);
