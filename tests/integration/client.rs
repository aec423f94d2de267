//! `plane-client`, the typed client: its status stream resumes across a controller restart
//! with every entry exactly once, and its errors carry what the controller said.

use crate::db_test;
use crate::harness::{TestEnv, BACKEND_WAIT};
use futures_util::StreamExt;
use plane_client::ClientError;
use plane_protocol::api::{ApiErrorKind, ConnectRequest, KeyConfig, SpawnConfig};
use plane_protocol::backend::{BackendStatus, TerminationKind};

db_test!(
    status_stream_resumes_across_a_controller_restart,
    |mut env: TestEnv| async move {
        let response = env.connect_ready("resumed", &env.spawn_config(&[])).await;
        let plane = env.api().plane;
        let mut stream = plane.status_stream(&response.backend_id);
        let mut seen = Vec::new();
        while seen.last() != Some(&BackendStatus::Ready) {
            let entry = tokio::time::timeout(BACKEND_WAIT, stream.next())
                .await
                .expect("the history arrives")
                .expect("the stream goes on")
                .expect("an entry");
            seen.push(entry.status);
        }

        // The stream's connection dies with the controller; the new one on the same address
        // picks up after `ready`.
        env.restart_controller().await;
        env.terminate(&response.backend_id, TerminationKind::Hard)
            .await;
        while let Some(entry) = tokio::time::timeout(BACKEND_WAIT, stream.next())
            .await
            .expect("the stream resumes and ends")
        {
            seen.push(entry.expect("an entry").status);
        }
        assert_eq!(seen.last(), Some(&BackendStatus::Terminated), "{seen:?}");
        assert!(
            seen.windows(2).all(|w| w[0].number() < w[1].number()),
            "each status once, in order: {seen:?}"
        );
        env
    }
);

db_test!(
    client_errors_carry_the_controllers_answer,
    |env: TestEnv| async move {
        let plane = env.api().plane;
        let unknown = "ba-nosuchbackend".parse().expect("name");

        // An unknown backend's stream is one error, then the end.
        let items: Vec<_> = plane.status_stream(&unknown).collect().await;
        assert_eq!(items.len(), 1);
        let error = items
            .into_iter()
            .next()
            .expect("one")
            .expect_err("an error");
        assert_eq!(error.status(), Some(404));
        assert_eq!(
            error.api_error().map(|e| e.kind),
            Some(ApiErrorKind::NotFound)
        );

        // Waiting for `ready` on a backend that cannot start says how it ended.
        let mut missing = SpawnConfig::of_image("plane-test/does-not-exist:1");
        missing.executable.pull_policy = Some(plane_protocol::api::PullPolicy::Never);
        let response = plane
            .connect(&ConnectRequest {
                key: Some(KeyConfig::named("never-starts")),
                spawn_config: Some(missing),
                ..Default::default()
            })
            .await
            .expect("connect");
        let waited = tokio::time::timeout(
            BACKEND_WAIT,
            plane.wait_for_status(&response.backend_id, BackendStatus::Ready),
        )
        .await
        .expect("the wait ends");
        match waited {
            Err(ClientError::TerminatedBefore { entry, .. }) => {
                assert_eq!(entry.status, BackendStatus::Terminated);
                assert!(entry.message.is_some(), "{entry:?}");
            }
            other => panic!("expected TerminatedBefore, got {other:?}"),
        }
        env
    }
);
