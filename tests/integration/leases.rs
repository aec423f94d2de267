//! One backend per key through partitions: key leases, drone self-fencing, and the time
//! bounds on starting backends. (Crashes of whole processes are in `crashes.rs`.)
//!
//! The harness runs leases of 4 s, drones renewing every 500 ms with a 1 s fencing margin,
//! and a lost window of 5 s.

use crate::db_test;
use crate::harness::{
    containers_of, holds_for, run_test, wait_for, Db, DockerEvents, TestEnv, BACKEND_WAIT,
};
use crate::relay::Relay;
use plane_protocol::api::ConnectResponse;
use plane_protocol::backend::{BackendStatus, TerminationReason};
use serde_json::Value;
use std::time::Duration;

/// The fencing token the backend was given, read from its own environment.
pub async fn fencing_token(env: &TestEnv, response: &ConnectResponse) -> i64 {
    let (status, body) = env.get_via_proxy(response.token.as_str(), "/echo").await;
    assert_eq!(status, 200, "echo through the proxy: {body}");
    let echo: Value = serde_json::from_str(&body).expect("echo JSON");
    echo["env"]["SESSION_BACKEND_FENCING_TOKEN"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no fencing token in {echo}"))
}

db_test!(
    partitioned_drone_stops_its_backend_before_the_key_moves_and_changes_nothing_when_it_heals,
    |env: TestEnv| async move {
        let docker_events = DockerEvents::record(&env.cluster).await;

        // The drone that will be cut off reaches the controller through a relay. The other
        // is drained while the first backend is placed, so it goes to this one.
        let relay = Relay::start(env.controller().local_addr()).await;
        let mut config = env.drone_config("a-cut-off");
        config.controller_url = format!("http://{}", relay.addr()).parse().expect("url");
        let cut_off = env.start_drone(config).await;
        env.set_draining(env.drone.name(), true).await;
        let first = env.connect_ready("partition", &env.spawn_config(&[])).await;
        env.set_draining(env.drone.name(), false).await;
        assert_eq!(first.drone.as_ref(), Some(cut_off.name()));
        let first_token = fencing_token(&env, &first).await;

        relay.partition();
        wait_for(
            "the old backend recorded as stopped",
            BACKEND_WAIT,
            || async {
                let entry = env.status(&first.backend_id).await;
                if entry.status == BackendStatus::Terminated {
                    Ok(entry)
                } else {
                    Err(format!("{entry:?}"))
                }
            },
        )
        .await;
        wait_for(
            "the cut-off drone's session closed",
            Duration::from_secs(20),
            || env.drone_state_is(cut_off.name(), "connected", false),
        )
        .await;
        let second = env.connect_ready("partition", &env.spawn_config(&[])).await;
        assert_eq!(second.drone.as_ref(), Some(env.drone.name()));
        assert!(fencing_token(&env, &second).await > first_token);
        docker_events
            .assert_died_before_started(&first.backend_id, &second.backend_id)
            .await;

        relay.heal();
        wait_for("the cut-off drone back", Duration::from_secs(30), || {
            env.drone_state_is(cut_off.name(), "connected", true)
        })
        .await;
        // Its late reports of the old backend change nothing.
        holds_for(
            "the new backend to stay the key's",
            Duration::from_secs(2),
            || async {
                let again = env.connect("partition", &env.spawn_config(&[])).await;
                let old = env.status(&first.backend_id).await;
                if again.backend_id == second.backend_id && old.status == BackendStatus::Terminated
                {
                    Ok(())
                } else {
                    Err(format!(
                        "key now at {}, old backend {old:?}",
                        again.backend_id
                    ))
                }
            },
        )
        .await;
        assert!(containers_of(&first.backend_id).await.is_empty());
        cut_off.shutdown().await;
        env
    }
);

db_test!(
    terminate_while_waiting_for_the_port_means_it_never_becomes_ready,
    |env: TestEnv| async move {
        let config = env.spawn_config(&[("DEMO_STARTUP_DELAY_MS", "4000")]);
        let response = env.connect("slow-start", &config).await;
        env.wait_for_status(&response.backend_id, BackendStatus::Waiting, BACKEND_WAIT)
            .await;
        env.terminate(
            &response.backend_id,
            plane_protocol::backend::TerminationKind::Soft,
        )
        .await;
        let entry = env.wait_terminated(&response.backend_id).await;
        assert_eq!(entry.termination_reason, Some(TerminationReason::External));
        let statuses = env.status_sequence(&response.backend_id).await;
        assert!(!statuses.contains(&BackendStatus::Ready), "{statuses:?}");
        env
    }
);

db_test!(
    backend_that_never_listens_ends_in_startuptimeout,
    |env: TestEnv| async move {
        // A drone with a short startup timeout, serving its own pool.
        let mut config = env.drone_config("impatient");
        config.startup_timeout_ms = 1_500;
        config.pool = "impatient".parse().expect("pool");
        let impatient = env.start_drone(config).await;
        let mut spawn = env.spawn_config(&[("DEMO_STARTUP_DELAY_MS", "600000")]);
        spawn.pool = Some("impatient".parse().expect("pool"));
        let response = env.connect("never-listens", &spawn).await;
        let entry = env.wait_terminated(&response.backend_id).await;
        assert_eq!(
            entry.termination_reason,
            Some(TerminationReason::StartupTimeout)
        );
        assert!(containers_of(&response.backend_id).await.is_empty());
        impatient.shutdown().await;
        env
    }
);

/// Whether Docker runs `backend`'s container now.
async fn running(backend: &plane_protocol::names::BackendName) -> Result<(), String> {
    let docker = bollard::Docker::connect_with_local_defaults().map_err(|e| e.to_string())?;
    let ids = containers_of(backend).await;
    let id = ids
        .first()
        .ok_or_else(|| format!("{backend} has no container"))?;
    let inspected = docker
        .inspect_container(id, None)
        .await
        .map_err(|e| e.to_string())?;
    match inspected.state.and_then(|state| state.running) {
        Some(true) => Ok(()),
        state => Err(format!("{backend}'s container runs: {state:?}")),
    }
}

/// A drone's status reports wait on the database (a lock the test holds on the status
/// history) for three leases, and its heartbeats are answered meanwhile: its other backend
/// keeps its lease and runs on. A renewal that queued behind the reports would come late,
/// and the drone would stop that backend.
#[tokio::test(flavor = "current_thread")]
async fn heartbeats_are_answered_while_a_drones_status_reports_wait() {
    run_test("renewals-apart", Db::Postgres, |env: TestEnv| async move {
        use sqlx::Connection;
        let steady = env.connect_ready("steady", &env.spawn_config(&[])).await;
        let exits = env
            .connect_ready(
                "exits",
                &env.spawn_config(&[("DEMO_EXIT_AFTER_MS", "5000")]),
            )
            .await;
        let mut lock = sqlx::PgConnection::connect(env.db_url())
            .await
            .expect("a connection of the test's own");
        sqlx::query("BEGIN")
            .execute(&mut lock)
            .await
            .expect("begin");
        // Reads go on; every status change (an insert here) waits.
        sqlx::query("LOCK TABLE backend_status IN EXCLUSIVE MODE")
            .execute(&mut lock)
            .await
            .expect("lock the status history");
        wait_for(
            "the second backend to exit, its report held up by the lock",
            BACKEND_WAIT,
            || async {
                match running(&exits.backend_id).await {
                    Ok(()) => Err("still running".to_string()),
                    Err(_) => Ok(()),
                }
            },
        )
        .await;
        assert_ne!(
            env.status(&exits.backend_id).await.status,
            BackendStatus::Terminated,
            "the exit cannot have been recorded under the lock"
        );
        holds_for(
            "the steady backend to run on through three leases",
            Duration::from_secs(12),
            || running(&steady.backend_id),
        )
        .await;
        sqlx::query("COMMIT")
            .execute(&mut lock)
            .await
            .expect("unlock");
        let entry = env.wait_terminated(&exits.backend_id).await;
        assert_eq!(entry.exit_code, Some(0), "{entry:?}");
        running(&steady.backend_id).await.expect("still running");
        let entry = env.status(&steady.backend_id).await;
        assert_eq!(entry.status, BackendStatus::Ready, "{entry:?}");
        env.terminate(
            &steady.backend_id,
            plane_protocol::backend::TerminationKind::Hard,
        )
        .await;
        env.wait_terminated(&steady.backend_id).await;
        env
    })
    .await;
}
