//! Backend lifecycle: terminations, exits, grace periods and start failures.

use crate::db_test;
use crate::harness::TestEnv;
use plane_protocol::backend::{BackendStatus, TerminationKind, TerminationReason};
use serde_json::json;
use std::time::{Duration, Instant};

db_test!(
    soft_terminate_ends_in_terminated_soft,
    |env: TestEnv| async move {
        let response = env.connect_ready("soft", &env.spawn_config(&[])).await;
        env.terminate(&response.backend_id, TerminationKind::Soft)
            .await;
        let entry = env.wait_terminated(&response.backend_id).await;
        assert_eq!(entry.termination_kind, Some(TerminationKind::Soft));
        assert_eq!(entry.termination_reason, Some(TerminationReason::External));
        // The demo backend exits cleanly on SIGTERM.
        assert_eq!(entry.exit_error, Some(false));
        let statuses: Vec<_> = env.status_sequence(&response.backend_id).await;
        assert!(
            statuses.contains(&BackendStatus::Terminating),
            "{statuses:?}"
        );
        assert!(
            !statuses.contains(&BackendStatus::HardTerminating),
            "{statuses:?}"
        );
        env
    }
);

db_test!(
    hard_terminate_ends_in_terminated_hard,
    |env: TestEnv| async move {
        let response = env.connect_ready("hard", &env.spawn_config(&[])).await;
        let (code, _) = env
            .post(
                &format!(
                    "/ctrl/c/{}/b/{}/hard-terminate",
                    env.cluster, response.backend_id
                ),
                &json!({}),
            )
            .await;
        assert_eq!(code, 200);
        let entry = env.wait_terminated(&response.backend_id).await;
        assert_eq!(entry.termination_kind, Some(TerminationKind::Hard));
        assert_eq!(entry.termination_reason, Some(TerminationReason::External));
        assert_eq!(entry.exit_code, Some(137), "SIGKILL exit code: {entry:?}");
        env
    }
);

db_test!(
    backend_that_exits_by_itself_reports_its_exit_code_and_frees_the_key,
    |env: TestEnv| async move {
        let config = env.spawn_config(&[("DEMO_EXIT_AFTER_MS", "1500"), ("DEMO_EXIT_CODE", "3")]);
        let response = env.connect("exits", &config).await;
        let entry = env.wait_terminated(&response.backend_id).await;
        assert_eq!(entry.exit_code, Some(3));
        assert_eq!(entry.exit_error, Some(true));
        assert_eq!(entry.termination_reason, None);
        let again = env.connect("exits", &env.spawn_config(&[])).await;
        assert!(again.spawned, "the key is free again");
        assert_ne!(again.backend_id, response.backend_id);
        env.terminate(&again.backend_id, TerminationKind::Hard)
            .await;
        env
    }
);

db_test!(
    backend_ignoring_sigterm_is_killed_after_the_grace_period,
    |env: TestEnv| async move {
        let response = env
            .connect(
                "stubborn",
                &env.spawn_config(&[("DEMO_IGNORE_SIGTERM", "1")]),
            )
            .await;
        env.wait_for_status(
            &response.backend_id,
            BackendStatus::Ready,
            Duration::from_secs(30),
        )
        .await;
        let started = Instant::now();
        env.terminate(&response.backend_id, TerminationKind::Soft)
            .await;
        let entry = env.wait_terminated(&response.backend_id).await;
        // The drone's grace period in tests is 1.5 s: the kill cannot come before it.
        assert!(
            started.elapsed() >= Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(entry.exit_code, Some(137));
        let statuses: Vec<_> = env.status_sequence(&response.backend_id).await;
        assert!(
            statuses.contains(&BackendStatus::Terminating),
            "{statuses:?}"
        );
        assert!(
            statuses.contains(&BackendStatus::HardTerminating),
            "{statuses:?}"
        );
        env
    }
);

db_test!(
    nonexistent_image_ends_in_terminated_with_a_reason,
    |env: TestEnv| async move {
        let mut config = env.spawn_config(&[]);
        config.executable.image = "plane-test/does-not-exist:never".to_string();
        let response = env.connect("missing-image", &config).await;
        let entry = env
            .wait_for_status(
                &response.backend_id,
                BackendStatus::Terminated,
                Duration::from_secs(60),
            )
            .await;
        assert_eq!(
            entry.termination_reason,
            Some(TerminationReason::InternalError)
        );
        assert!(entry.message.unwrap_or_default().contains("does-not-exist"));
        let again = env.connect("missing-image", &env.spawn_config(&[])).await;
        assert!(again.spawned, "the key is free again");
        env
    }
);

db_test!(terminating_twice_is_harmless, |env: TestEnv| async move {
    let response = env.connect_ready("twice", &env.spawn_config(&[])).await;
    for _ in 0..2 {
        env.terminate(&response.backend_id, TerminationKind::Hard)
            .await;
    }
    env.wait_terminated(&response.backend_id).await;
    let (code, body) = env
        .post(
            &format!("/ctrl/b/{}/soft-terminate", response.backend_id),
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(code, 200);
    // Plane 0.5's client reads the answer as `()`.
    assert_eq!(body, serde_json::Value::Null);
    assert_eq!(
        env.status(&response.backend_id).await.status,
        BackendStatus::Terminated
    );
    env
});

db_test!(
    connect_during_termination_waits_and_starts_a_fresh_backend,
    |env: TestEnv| async move {
        // Ignoring SIGTERM keeps it terminating for the drone's 1.5 s grace period.
        let config = env.spawn_config(&[("DEMO_IGNORE_SIGTERM", "1")]);
        let old = env.connect_ready("handover", &config).await;
        env.terminate(&old.backend_id, TerminationKind::Soft).await;
        env.wait_for_status(
            &old.backend_id,
            BackendStatus::Terminating,
            Duration::from_secs(30),
        )
        .await;
        let new = env.connect("handover", &env.spawn_config(&[])).await;
        assert!(new.spawned);
        assert_ne!(new.backend_id, old.backend_id);
        // The old one was gone before the new one was scheduled: never two at once.
        assert_eq!(
            env.status(&old.backend_id).await.status,
            BackendStatus::Terminated
        );
        env
    }
);

db_test!(
    backends_survive_a_controller_restart,
    |mut env: TestEnv| async move {
        let response = env.connect_ready("survivor", &env.spawn_config(&[])).await;
        env.restart_controller().await;
        // Still routed, still the key's holder, and still under the controller's command.
        let (code, body) = env
            .get_via_proxy(response.token.as_str(), "/after-restart")
            .await;
        assert_eq!(code, 200, "{body}");
        let again = env.connect("survivor", &env.spawn_config(&[])).await;
        assert!(!again.spawned);
        assert_eq!(again.backend_id, response.backend_id);
        env.terminate(&response.backend_id, TerminationKind::Hard)
            .await;
        let entry = env.wait_terminated(&response.backend_id).await;
        assert_eq!(entry.termination_kind, Some(TerminationKind::Hard));
        env
    }
);
