//! Connect: get-or-create by key, status progression, token reuse rules.

use crate::db_test;
use crate::harness::TestEnv;
use futures_util::StreamExt;
use plane_protocol::api::{ApiErrorKind, ConnectRequest, KeyConfig};
use plane_protocol::backend::{BackendStatus, TerminationKind};
use std::time::Duration;

db_test!(
    connect_spawns_a_backend_that_becomes_ready_with_ordered_statuses,
    |env: TestEnv| async move {
        let response = env.connect("doc-1", &env.spawn_config(&[])).await;
        assert!(response.spawned);
        assert_eq!(response.status, BackendStatus::Scheduled);
        assert_eq!(
            response.url,
            format!("http://{}/{}/", env.cluster, response.token)
        );
        assert!(response
            .status_url
            .ends_with(&format!("/pub/b/{}/status", response.backend_id)));
        env.wait_for_status(
            &response.backend_id,
            BackendStatus::Ready,
            Duration::from_secs(30),
        )
        .await;

        // Terminate so the stream ends, then check it replays every status, in order.
        env.terminate(&response.backend_id, TerminationKind::Hard)
            .await;
        let statuses: Vec<BackendStatus> = env.status_sequence(&response.backend_id).await;
        assert_eq!(
            statuses,
            vec![
                BackendStatus::Scheduled,
                BackendStatus::Loading,
                BackendStatus::Starting,
                BackendStatus::Waiting,
                BackendStatus::Ready,
                BackendStatus::HardTerminating,
                BackendStatus::Terminated,
            ]
        );
        env
    }
);

db_test!(
    second_connect_with_same_key_reuses_backend_with_a_new_token,
    |env: TestEnv| async move {
        let first = env.connect("shared-doc", &env.spawn_config(&[])).await;
        let second = env.connect("shared-doc", &env.spawn_config(&[])).await;
        assert_eq!(first.backend_id, second.backend_id);
        assert!(first.spawned);
        assert!(!second.spawned);
        assert_ne!(first.token, second.token);
        env.wait_for_status(
            &first.backend_id,
            BackendStatus::Ready,
            Duration::from_secs(30),
        )
        .await;
        for token in [&first.token, &second.token] {
            let (code, body) = env.get_via_proxy(token.as_str(), "/hello").await;
            assert_eq!(code, 200, "token {token} should work: {body}");
        }
        env
    }
);

db_test!(
    connect_with_a_different_tag_is_refused_with_409,
    |env: TestEnv| async move {
        let plane = env.api().plane;
        let tagged = |tag: &str| ConnectRequest {
            key: Some(KeyConfig {
                tag: tag.to_string(),
                ..KeyConfig::named("tagged")
            }),
            spawn_config: Some(env.spawn_config(&[])),
            ..Default::default()
        };
        plane
            .connect(&tagged("v1"))
            .await
            .expect("the first connect starts the backend");
        let err = plane
            .connect(&tagged("v2"))
            .await
            .expect_err("a connect with another tag is refused");
        assert_eq!(err.status(), Some(409), "{err}");
        let error = err.api_error().expect("an API error body");
        assert_eq!(error.kind, ApiErrorKind::KeyHeld);
        assert!(!error.id.is_empty(), "{error:?}");
        assert!(error.message.contains("v1"), "{error:?}");
        env
    }
);

db_test!(
    namespaces_keep_equal_key_names_apart,
    |env: TestEnv| async move {
        let plane = env.api().plane;
        let mut backends = Vec::new();
        for namespace in ["team-a", "team-b"] {
            let request = ConnectRequest {
                key: Some(KeyConfig {
                    namespace: namespace.to_string(),
                    ..KeyConfig::named("same-name")
                }),
                spawn_config: Some(env.spawn_config(&[])),
                ..Default::default()
            };
            let response = plane
                .connect(&request)
                .await
                .unwrap_or_else(|err| panic!("connect in {namespace}: {err}"));
            assert!(response.spawned, "{response:?}");
            backends.push(response.backend_id);
        }
        assert_ne!(backends[0], backends[1]);
        env
    }
);

db_test!(
    key_only_connect_with_nothing_running_is_refused,
    |env: TestEnv| async move {
        let request = ConnectRequest {
            key: Some(KeyConfig::named("nobody-home")),
            ..Default::default()
        };
        let err = env
            .api()
            .plane
            .connect(&request)
            .await
            .expect_err("a key-only connect with nothing running is refused");
        assert_eq!(err.status(), Some(409), "{err}");
        assert_eq!(
            err.api_error().map(|e| e.kind),
            Some(ApiErrorKind::KeyUnheldNoSpawnConfig),
            "{err}"
        );
        env
    }
);

db_test!(
    connect_to_a_cluster_without_drones_is_refused,
    |env: TestEnv| async move {
        let mut spawn_config = env.spawn_config(&[]);
        spawn_config.cluster = Some("no-drones.example:1234".parse().expect("cluster"));
        let request = ConnectRequest {
            key: Some(KeyConfig::named("k")),
            spawn_config: Some(spawn_config),
            ..Default::default()
        };
        let err = env
            .api()
            .plane
            .connect(&request)
            .await
            .expect_err("a connect to a cluster without drones is refused");
        assert_eq!(err.status(), Some(503), "{err}");
        assert_eq!(
            err.api_error().map(|e| e.kind),
            Some(ApiErrorKind::NoDroneAvailable),
            "{err}"
        );
        env
    }
);

db_test!(
    backend_gets_its_key_and_fencing_token,
    |env: TestEnv| async move {
        let response = env
            .connect("fenced", &env.spawn_config(&[("DEMO_GREETING", "hi")]))
            .await;
        env.wait_for_status(
            &response.backend_id,
            BackendStatus::Ready,
            Duration::from_secs(30),
        )
        .await;
        let (code, body) = env.get_via_proxy(response.token.as_str(), "/env").await;
        assert_eq!(code, 200, "{body}");
        let echo: serde_json::Value = serde_json::from_str(&body).expect("echo JSON");
        assert_eq!(echo["backend_id"], response.backend_id.as_str());
        assert_eq!(echo["env"]["SESSION_BACKEND_KEY"], "fenced");
        assert_eq!(echo["env"]["SESSION_BACKEND_FENCING_TOKEN"], "1");
        assert_eq!(echo["env"]["DEMO_GREETING"], "hi");
        env
    }
);

db_test!(
    cluster_state_lists_connected_drone_and_proxy,
    |env: TestEnv| async move {
        let state = env.wait_for_connected_nodes().await;
        assert_eq!(state.drones[0].node.name.name(), env.drone.name());
        assert_eq!(state.proxies[0].name.name(), env.proxy.name());
        env
    }
);

db_test!(
    status_stream_resumes_after_last_event_id,
    |env: TestEnv| async move {
        let response = env.connect_ready("resume", &env.spawn_config(&[])).await;
        env.terminate(&response.backend_id, TerminationKind::Hard)
            .await;
        env.wait_terminated(&response.backend_id).await;
        // Event ids are status numbers: resuming after `ready` (50) replays only what followed.
        let statuses: Vec<BackendStatus> = env
            .api()
            .plane
            .status_stream_after(&response.backend_id, BackendStatus::Ready.number())
            .map(|entry| entry.expect("a status entry").status)
            .collect()
            .await;
        assert_eq!(
            statuses,
            vec![BackendStatus::HardTerminating, BackendStatus::Terminated]
        );

        // A client that already saw `terminated` (as EventSource and Plane 0.5's client do
        // on reconnect) gets a stream that stays open with nothing in it: one that ended at
        // once would have such clients reconnect in a loop. Raw HTTP on purpose: the typed
        // stream reconnects by itself, so it could not tell "open and silent" from "closed".
        let resumed = env
            .client
            .get(env.controller_url(&format!("/pub/b/{}/status-stream", response.backend_id)))
            .header(
                "last-event-id",
                BackendStatus::Terminated.number().to_string(),
            )
            .send()
            .await
            .expect("stream");
        assert_eq!(resumed.status(), 200);
        let mut body = resumed.bytes_stream();
        let first = tokio::time::timeout(Duration::from_secs(2), body.next()).await;
        assert!(
            first.is_err(),
            "the resumed stream stays open and silent: {first:?}"
        );
        env
    }
);

db_test!(
    fencing_token_grows_each_time_a_key_changes_hands,
    |env: TestEnv| async move {
        for expected in ["1", "2"] {
            let response = env
                .connect_ready("fence-grows", &env.spawn_config(&[]))
                .await;
            let (_, body) = env.get_via_proxy(response.token.as_str(), "/env").await;
            let echo: serde_json::Value = serde_json::from_str(&body).expect("echo JSON");
            assert_eq!(echo["env"]["SESSION_BACKEND_FENCING_TOKEN"], expected);
            env.terminate(&response.backend_id, TerminationKind::Hard)
                .await;
            env.wait_terminated(&response.backend_id).await;
        }
        env
    }
);

db_test!(
    static_token_backends_hand_every_connect_the_same_token,
    |env: TestEnv| async move {
        let mut config = env.spawn_config(&[]);
        config.use_static_token = true;
        let first = env.connect("static", &config).await;
        let second = env.connect("static", &config).await;
        assert_eq!(first.token, second.token);
        assert_eq!(first.secret_token, second.secret_token);
        env.wait_for_status(
            &first.backend_id,
            BackendStatus::Ready,
            Duration::from_secs(30),
        )
        .await;
        let (_, body) = env.get_via_proxy(first.token.as_str(), "/env").await;
        let echo: serde_json::Value = serde_json::from_str(&body).expect("echo JSON");
        assert_eq!(
            echo["env"]["SESSION_BACKEND_STATIC_TOKEN"],
            first.token.as_str()
        );
        env
    }
);

db_test!(
    concurrent_connects_for_one_key_start_exactly_one_backend,
    |env: TestEnv| async move {
        let spawn_config = env.spawn_config(&[]);
        let connects = (0..20).map(|_| env.connect("contended", &spawn_config));
        let responses = futures_util::future::join_all(connects).await;
        let spawned = responses.iter().filter(|r| r.spawned).count();
        assert_eq!(spawned, 1, "exactly one connect starts the backend");
        let first = &responses[0].backend_id;
        assert!(responses.iter().all(|r| &r.backend_id == first));
        let tokens: std::collections::HashSet<_> = responses.iter().map(|r| &r.token).collect();
        assert_eq!(
            tokens.len(),
            responses.len(),
            "every connect gets its own token"
        );
        env
    }
);

db_test!(
    public_status_answers_cors_requests_from_any_origin,
    |env: TestEnv| async move {
        let response = env.connect_ready("cors", &env.spawn_config(&[])).await;
        let status_path = format!("/pub/b/{}/status", response.backend_id);
        // A browser's preflight, then the request itself.
        let preflight = env
            .client
            .request(reqwest::Method::OPTIONS, env.controller_url(&status_path))
            .header("origin", "https://app.example")
            .header("access-control-request-method", "GET")
            .send()
            .await
            .expect("controller reachable");
        assert!(preflight.status().is_success(), "{}", preflight.status());
        assert_eq!(
            preflight.headers()["access-control-allow-origin"],
            "*",
            "{:?}",
            preflight.headers()
        );
        let get = env
            .client
            .get(env.controller_url(&status_path))
            .header("origin", "https://app.example")
            .send()
            .await
            .expect("controller reachable");
        assert_eq!(get.status(), 200);
        assert_eq!(get.headers()["access-control-allow-origin"], "*");
        // The control API is not for browsers: no CORS there.
        let ctrl = env
            .client
            .get(env.controller_url("/ctrl/status"))
            .header("origin", "https://app.example")
            .send()
            .await
            .expect("controller reachable");
        assert!(ctrl.headers().get("access-control-allow-origin").is_none());
        env
    }
);

db_test!(
    concurrent_joins_each_get_a_token_of_their_own_that_works,
    |env: TestEnv| async move {
        // Joins share commits of their tokens (group commit): every one must still be
        // stored, distinct, and accepted by the proxy.
        let spawn = env.spawn_config(&[]);
        let first = env.connect_ready("joined-at-once", &spawn).await;
        let joins = (0..64).map(|_| {
            let api = env.api();
            let spawn = spawn.clone();
            async move { api.try_connect("joined-at-once", &spawn).await }
        });
        let answers = futures_util::future::join_all(joins).await;
        let mut tokens = std::collections::HashSet::new();
        for answer in answers {
            let joined = answer.expect("a join is answered");
            assert_eq!(joined.backend_id, first.backend_id);
            assert!(!joined.spawned);
            assert!(
                tokens.insert(joined.token.to_string()),
                "a token given twice"
            );
        }
        for token in &tokens {
            let (code, body) = env.get_via_proxy(token, "/").await;
            assert_eq!(code, 200, "{token}: {body}");
        }
        env
    }
);
