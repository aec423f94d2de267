//! Admission control: past `--max-concurrent-spawns` (backends of a cluster still starting)
//! or `--max-backends-per-namespace` (live backends of a key namespace), a connect or spawn
//! that would start a backend gets 429 with `Retry-After`, and nothing is written; joining a
//! running backend is never refused by them. Concurrent spawns count exactly on both
//! databases.

use crate::db_test;
use crate::harness::TestEnv;
use plane_protocol::backend::TerminationKind;
use serde_json::{json, Value};

/// POSTs a connect; returns the status, the `Retry-After` header and the body.
async fn connect(env: &TestEnv, body: Value) -> (u16, Option<String>, Value) {
    let answer = env
        .client
        .post(env.controller_url("/ctrl/connect"))
        .json(&body)
        .send()
        .await
        .expect("controller reachable");
    let status = answer.status().as_u16();
    let retry_after = answer
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    (
        status,
        retry_after,
        answer.json().await.unwrap_or(Value::Null),
    )
}

fn keyed(namespace: &str, name: &str, spawn: &plane_protocol::api::SpawnConfig) -> Value {
    json!({ "key": { "name": name, "namespace": namespace }, "spawn_config": spawn })
}

db_test!(
    spawns_past_a_limit_get_429_with_retry_after_and_joins_are_still_served,
    |mut env: TestEnv| async move {
        env.restart_controller_with(|config| config.max_concurrent_spawns = Some(3))
            .await;
        // Backends that stay starting for the whole test.
        let slow = env.spawn_config(&[("DEMO_STARTUP_DELAY_MS", "120000")]);

        // Ten spawns at once: exactly three are admitted.
        let attempts = (0..10).map(|i| connect(&env, keyed("", &format!("slow-{i}"), &slow)));
        let answers = futures_util::future::join_all(attempts).await;
        let admitted: Vec<&Value> = answers
            .iter()
            .filter(|(status, _, _)| *status == 200)
            .map(|(_, _, body)| body)
            .collect();
        assert_eq!(admitted.len(), 3, "{answers:?}");
        for (status, retry_after, body) in &answers {
            if *status != 200 {
                assert_eq!(*status, 429, "{body}");
                assert_eq!(retry_after.as_deref(), Some("1"), "{body}");
                assert_eq!(body["kind"], "Other");
                let message = body["message"].as_str().unwrap_or_default();
                assert!(message.contains("--max-concurrent-spawns"), "{body}");
            }
        }
        // Nothing was written for the refused ones: their keys are free, and only the
        // admitted backends exist.
        for (i, (admitted_status, _, _)) in answers.iter().enumerate() {
            let (status, _, body) =
                connect(&env, json!({ "key": { "name": format!("slow-{i}") } })).await;
            if *admitted_status == 200 {
                assert_eq!(status, 200, "{body}");
                assert_eq!(body["spawned"], false, "{body}");
            } else {
                assert_eq!(status, 409, "{body}");
                assert_eq!(body["kind"], "KeyUnheldNoSpawnConfig", "{body}");
            }
        }
        let state = env.cluster_state().await;
        let live: u32 = state.drones.iter().map(|d| d.backend_count).sum();
        assert_eq!(live, 3, "{state:?}");
        // A keyless spawn is refused too; joining a starting backend is served.
        let (status, retry_after, body) = {
            let answer = env
                .client
                .post(env.controller_url("/ctrl/spawn"))
                .json(&json!({ "spawn_config": slow }))
                .send()
                .await
                .expect("reachable");
            let status = answer.status().as_u16();
            let retry = answer.headers().get("retry-after").cloned();
            (
                status,
                retry,
                answer.json::<Value>().await.unwrap_or(Value::Null),
            )
        };
        assert_eq!(status, 429, "{body}");
        assert!(retry_after.is_some());

        for body in &admitted {
            let id = body["backend_id"]
                .as_str()
                .expect("id")
                .parse()
                .expect("backend id");
            env.terminate(&id, TerminationKind::Hard).await;
            env.wait_terminated(&id).await;
        }

        // Per namespace: one live backend each.
        env.restart_controller_with(|config| {
            config.max_concurrent_spawns = None;
            config.max_backends_per_namespace = Some(1);
        })
        .await;
        let fast = env.spawn_config(&[]);
        let (status, _, first) = connect(&env, keyed("team", "one", &fast)).await;
        assert_eq!(status, 200, "{first}");
        let (status, retry_after, body) = connect(&env, keyed("team", "two", &fast)).await;
        assert_eq!(status, 429, "{body}");
        assert_eq!(retry_after.as_deref(), Some("5"));
        assert!(
            body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("--max-backends-per-namespace"),
            "{body}"
        );
        let (status, _, other) = connect(&env, keyed("other", "two", &fast)).await;
        assert_eq!(status, 200, "{other}");
        // The namespace's own key joins.
        let (status, _, again) = connect(&env, keyed("team", "one", &fast)).await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["backend_id"], first["backend_id"]);
        for body in [&first, &other] {
            let id = body["backend_id"]
                .as_str()
                .expect("id")
                .parse()
                .expect("backend id");
            env.terminate(&id, TerminationKind::Hard).await;
            env.wait_terminated(&id).await;
        }
        env
    }
);
