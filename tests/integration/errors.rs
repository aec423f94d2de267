//! Bad input gets a 4xx with a JSON `{id, kind, message}` that says what was wrong, and
//! nothing is written.

use crate::db_test;
use crate::harness::TestEnv;
use serde_json::{json, Value};

/// Sends a raw body to connect and returns (status, JSON error).
async fn connect_raw(env: &TestEnv, body: &str) -> (u16, Value) {
    let response = env
        .client
        .post(env.controller_url("/ctrl/connect"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("controller reachable");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON error body"))
}

fn assert_bad_request(status: u16, error: &Value, mentions: &str) {
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["kind"], "Other", "{error}");
    assert!(
        error["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{error}"
    );
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(mentions),
        "message {message:?} should mention {mentions:?}"
    );
}

db_test!(
    bad_requests_get_400_json_errors_naming_the_problem,
    |env: TestEnv| async move {
        let (status, error) = connect_raw(&env, "{not json").await;
        assert_bad_request(status, &error, "invalid request body");

        let (status, error) = connect_raw(&env, r#"{"key": {"name": "a"}, "surprise": 1}"#).await;
        assert_bad_request(status, &error, "surprise");

        let (status, error) = connect_raw(&env, r#"{"key": {"name": "a"}} junk"#).await;
        assert_bad_request(status, &error, "trailing");
        let (status, error) = connect_raw(&env, r#"{}{}"#).await;
        assert_bad_request(status, &error, "trailing");

        let image = crate::harness::test_image();
        let cases: Vec<(Value, &str)> = vec![
            (
                json!({ "key": { "name": "" }, "spawn_config": { "executable": { "image": image } } }),
                "key.name",
            ),
            (json!({ "key": { "name": "a\u{1}b" } }), "key.name"),
            (
                json!({ "spawn_config": { "executable": { "image": image }, "max_idle_seconds": -5 } }),
                "max_idle_seconds",
            ),
            (
                json!({ "spawn_config": { "executable": { "image": image }, "lifetime_limit_seconds": 0 } }),
                "lifetime_limit_seconds",
            ),
            (
                json!({ "spawn_config": { "executable": { "image": "has space" } } }),
                "image",
            ),
            (
                json!({ "spawn_config": { "executable": { "image": image, "env": { "PORT": "1" } } } }),
                "PORT",
            ),
            (
                json!({ "spawn_config": { "executable": { "image": image, "env": { "SESSION_BACKEND_ID": "x" } } } }),
                "SESSION_BACKEND_ID",
            ),
            (
                json!({ "spawn_config": { "executable": { "image": image, "pull_policy": "Sometimes" } } }),
                "pull_policy",
            ),
            (
                json!({ "spawn_config": { "executable": { "image": image }, "cluster": "bad cluster" } }),
                "cluster",
            ),
            (
                json!({ "spawn_config": { "executable": { "image": image }, "id": "Not_Valid" } }),
                "id",
            ),
            (
                json!({ "spawn_config": { "executable": { "image": image, "unknown_field": 1 } } }),
                "unknown_field",
            ),
            (
                json!({ "spawn_config": { "executable": { "image": image }, "max_idle_seconds": 10_000_000_000_i64 } }),
                "max_idle_seconds",
            ),
            (
                json!({ "spawn_config": { "executable": { "image": image }, "startup_timeout_seconds": 0 } }),
                "startup_timeout_seconds",
            ),
            (json!({}), "key"),
            (json!([]), "JSON object"),
            (
                json!({ "spawn_config": { "executable": { "image": image }, "id": "a".repeat(46) } }),
                "spawn_config.id",
            ),
            (json!("connect"), "JSON object"),
            (
                json!({ "key": { "name": "doc\u{202E}fdp.exe" } }),
                "bidirectional",
            ),
            (json!({ "key": { "name": "a\u{200B}b" } }), "key.name"),
            (
                json!({ "key": { "name": "k" }, "user": "eve\u{2066}" }),
                "user",
            ),
            (
                json!({ "key": { "name": "k" }, "spawn_config": { "executable": { "image": image } }, "auth": { "blob": "x".repeat(9000) } }),
                "auth",
            ),
        ];
        for (body, mentions) in cases {
            let (status, error) = env.post("/ctrl/connect", &body).await;
            assert_bad_request(status, &error, mentions);
        }

        // Nothing was written: no backend was scheduled on the drone.
        let (_, state) = env
            .get_json(&format!("/ctrl/c/{}/state", env.cluster))
            .await;
        assert_eq!(state["drones"][0]["backend_count"], 0, "{state}");
        env
    }
);

db_test!(
    bad_paths_and_unknown_backends_get_json_errors,
    |env: TestEnv| async move {
        let (status, error) = env
            .post("/ctrl/b/NOT_A_VALID_ID/soft-terminate", &json!({}))
            .await;
        assert_bad_request(status, &error, "backend id");

        let (status, error) = env
            .post("/ctrl/b/ba-doesnotexist/hard-terminate", &json!({}))
            .await;
        assert_eq!(status, 404, "{error}");
        assert_eq!(error["kind"], "NotFound");

        let (status, error) = env.get_json("/pub/b/ba-doesnotexist/status").await;
        assert_eq!(status, 404, "{error}");
        assert_eq!(error["kind"], "NotFound");

        let (status, error) = env.get_json("/no/such/endpoint").await;
        assert_eq!(status, 404, "{error}");
        assert_eq!(error["kind"], "NotFound");
        env
    }
);

db_test!(
    a_chosen_backend_id_cannot_be_reused,
    |env: TestEnv| async move {
        let mut config = env.spawn_config(&[]);
        // Random, so the SQLite and PostgreSQL runs (sharing one Docker engine) don't collide.
        let id = plane_protocol::names::BackendName::new_random();
        config.id = Some(id.clone());
        let (status, body) = env
            .post("/ctrl/spawn", &json!({ "spawn_config": config }))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["backend_id"], id.as_str());
        let (status, error) = env
            .post("/ctrl/spawn", &json!({ "spawn_config": config }))
            .await;
        assert_eq!(status, 409, "{error}");
        assert_eq!(error["kind"], "Other");
        assert!(error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("already in use"));
        env
    }
);

db_test!(
    a_body_over_the_limit_gets_413_json_not_a_reset,
    |env: TestEnv| async move {
        // 2 MiB of a valid-looking object: refused for its size, with a body that says so.
        let padding = "x".repeat(2 * 1024 * 1024);
        let body = format!(r#"{{"key": {{"name": "big"}}, "user": "{padding}"}}"#);
        let (status, error) = connect_raw(&env, &body).await;
        assert_eq!(status, 413, "{error}");
        assert_eq!(error["kind"], "Other");
        assert!(
            error["message"]
                .as_str()
                .unwrap_or_default()
                .contains("limit"),
            "{error}"
        );

        // Without a declared length (chunked), counted while reading.
        let chunks: Vec<Result<String, std::io::Error>> = vec![
            Ok(body[..body.len() / 2].to_string()),
            Ok(body[body.len() / 2..].to_string()),
        ];
        let response = env
            .client
            .post(env.controller_url("/ctrl/connect"))
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await
            .expect("an answer, not a reset");
        assert_eq!(response.status(), 413);
        let error: Value = response.json().await.expect("a JSON error body");
        assert!(
            error["message"]
                .as_str()
                .unwrap_or_default()
                .contains("limit"),
            "{error}"
        );
        env
    }
);
