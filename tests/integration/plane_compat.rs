//! Plane 0.5.5's own client (`plane-common`'s `PlaneClient`, the crate from crates.io, not a
//! copy) against our controller: an app written for Plane works by changing only the URL.

use crate::harness::{test_image, wait_for, TestEnv, BACKEND_WAIT};
use crate::relay::Relay;
use crate::{db_test, postgres_test};
use plane_common::names::{BackendName, DroneName};
use plane_common::protocol::{ApiError, ApiErrorKind};
use plane_common::sse::SseStream;
use plane_common::types::backend_state::BackendStatusStreamEntry;
use plane_common::types::{
    BackendStatus, ClusterName, ConnectRequest, ConnectResponse, DockerCpuPeriod,
    DockerExecutorConfig, DockerRegistryAuth, KeyConfig, Mount, PullPolicy, ResourceLimits,
    RevokeRequest, SpawnConfig, TerminationReason,
};
use plane_common::{PlaneClient, PlaneClientError};
use reqwest::StatusCode;
use std::collections::HashMap;
use std::time::Duration;

fn plane_client(env: &TestEnv) -> PlaneClient {
    PlaneClient::new(env.controller().url())
}

fn plane_cluster(env: &TestEnv) -> ClusterName {
    env.cluster
        .as_str()
        .parse()
        .expect("Plane parses our cluster name")
}

/// Everything Plane's executor config can say, as its client serializes it.
fn executable(image: &str) -> DockerExecutorConfig {
    DockerExecutorConfig {
        image: image.to_string(),
        pull_policy: Some(PullPolicy::IfNotPresent),
        credentials: Some(DockerRegistryAuth::UsernamePassword {
            username: "unused".to_string(),
            password: "unused".to_string(),
        }),
        env: HashMap::from([("GREETING".to_string(), "hello".to_string())]),
        resource_limits: ResourceLimits {
            cpu_period: Some(DockerCpuPeriod::default()),
            cpu_period_percent: Some(80),
            cpu_time_limit: None,
            memory_limit_bytes: Some(256 * 1024 * 1024),
            disk_limit_bytes: None,
        },
        mount: Some(Mount::Bool(false)),
        network_name: None,
    }
}

fn spawn_config(env: &TestEnv, executable: DockerExecutorConfig) -> SpawnConfig {
    SpawnConfig {
        id: None,
        cluster: Some(plane_cluster(env)),
        pool: Default::default(),
        executable: serde_json::to_value(executable).expect("serializes"),
        lifetime_limit_seconds: Some(600),
        max_idle_seconds: Some(300),
        use_static_token: false,
        subdomain: None,
    }
}

fn connect_request(key: &str, tag: &str, spawn: Option<SpawnConfig>) -> ConnectRequest {
    ConnectRequest {
        key: Some(KeyConfig {
            name: key.to_string(),
            namespace: "compat".to_string(),
            tag: tag.to_string(),
        }),
        spawn_config: spawn,
        user: Some("alice".to_string()),
        auth: serde_json::json!({ "role": "editor" })
            .as_object()
            .cloned()
            .unwrap_or_default(),
    }
}

/// The API error a call failed with, as Plane's client decoded it.
fn api_error<T: std::fmt::Debug>(result: Result<T, PlaneClientError>) -> (ApiError, StatusCode) {
    match result {
        Err(PlaneClientError::PlaneError(error, status)) => (error, status),
        other => panic!("expected an API error Plane's client can read, got {other:?}"),
    }
}

/// Plane's `ApiErrorKind` has no `PartialEq`; its `Debug` names the kind.
fn assert_kind(error: &ApiError, code: StatusCode, kind: ApiErrorKind, expected: StatusCode) {
    assert_eq!(
        format!("{:?}", error.kind),
        format!("{kind:?}"),
        "{error:?}"
    );
    assert_eq!(code, expected, "{error:?}");
}

/// Reads the stream until `status` (or later) arrives; every entry must parse.
async fn follow_to(
    stream: &mut SseStream<BackendStatusStreamEntry>,
    status: BackendStatus,
) -> BackendStatusStreamEntry {
    tokio::time::timeout(BACKEND_WAIT, async {
        loop {
            let entry = stream.next().await.expect("the stream goes on");
            if entry.status.as_int() >= status.as_int() {
                return entry;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {status} in the status stream"))
}

fn ours(backend: &BackendName) -> plane_protocol::names::BackendName {
    backend.to_string().parse().expect("our backend ID")
}

db_test!(
    plane_clients_connect_join_and_terminate,
    |env: TestEnv| async move {
        let client = plane_client(&env);
        let status = client.status().await.expect("status parses");
        assert_eq!(status.status, "ok");
        assert!(!status.hash.is_empty());
        client.health_check().await.expect("health");

        let spawn = spawn_config(&env, executable(test_image()));
        let first: ConnectResponse = client
            .connect(&connect_request("doc-1", "v1", Some(spawn.clone())))
            .await
            .expect("Plane's connect is accepted");
        assert!(first.spawned);
        assert!(first
            .url
            .starts_with(&format!("http://{}/{}/", env.cluster, first.token)));
        assert!(first.secret_token.is_some());
        let drone = first.drone.clone().expect("the drone is named");
        assert!(drone.to_string().starts_with("dr-"), "{drone}");
        assert!(first
            .status_url
            .ends_with(&format!("/pub/b/{}/status", first.backend_id)));

        let mut stream = client
            .backend_status_stream(&first.backend_id)
            .await
            .expect("status stream");
        follow_to(&mut stream, BackendStatus::Ready).await;
        let current = client
            .backend_status(&first.backend_id)
            .await
            .expect("status");
        assert_eq!(current.status, BackendStatus::Ready);
        let (code, _) = env.get_via_proxy(&first.token.to_string(), "/").await;
        assert_eq!(code, 200);

        // The same key and tag joins the running backend with a token of its own.
        let second = client
            .connect(&connect_request("doc-1", "v1", Some(spawn.clone())))
            .await
            .expect("join");
        assert!(!second.spawned);
        assert_eq!(second.backend_id, first.backend_id);
        assert_ne!(second.token, first.token);
        assert_eq!(second.status, BackendStatus::Ready);

        // Refusals come back as errors Plane's client can read.
        let (error, code) = api_error(
            client
                .connect(&connect_request("doc-1", "v2", Some(spawn.clone())))
                .await,
        );
        assert_kind(&error, code, ApiErrorKind::KeyHeld, StatusCode::CONFLICT);
        let (error, code) = api_error(client.connect(&connect_request("doc-none", "", None)).await);
        assert_kind(
            &error,
            code,
            ApiErrorKind::KeyUnheldNoSpawnConfig,
            StatusCode::CONFLICT,
        );
        let unknown = BackendName::try_from("ba-nobody".to_string()).expect("name");
        let (error, code) = api_error(client.soft_terminate(&unknown).await);
        assert_kind(&error, code, ApiErrorKind::NotFound, StatusCode::NOT_FOUND);

        client
            .soft_terminate(&first.backend_id)
            .await
            .expect("soft terminate answers what Plane's client expects");
        let last = follow_to(&mut stream, BackendStatus::Terminated).await;
        assert_eq!(last.termination_reason, Some(TerminationReason::External));
        // Terminating a terminated backend is a no-op, not an error.
        client
            .hard_terminate(&first.backend_id)
            .await
            .expect("hard terminate");

        // A static token is the same for every connect, and marked static.
        let mut static_spawn = spawn;
        static_spawn.use_static_token = true;
        let one = client
            .connect(&connect_request(
                "doc-static",
                "",
                Some(static_spawn.clone()),
            ))
            .await
            .expect("static connect");
        let two = client
            .connect(&connect_request("doc-static", "", Some(static_spawn)))
            .await
            .expect("static join");
        assert!(one.token.is_static(), "{}", one.token);
        assert_eq!(one.token, two.token);

        // A subdomain, as Plane's types carry it.
        let mut sub_spawn = spawn_config(&env, executable(test_image()));
        sub_spawn.subdomain = Some("doc-sub".parse().expect("Plane parses the subdomain"));
        let with_subdomain = client
            .connect(&connect_request("doc-sub", "", Some(sub_spawn)))
            .await
            .expect("connect with a subdomain");
        assert_eq!(
            with_subdomain.subdomain.as_deref(),
            Some("doc-sub"),
            "{with_subdomain:?}"
        );
        assert!(with_subdomain
            .url
            .starts_with(&format!("http://doc-sub.{}/", env.cluster)));
        client
            .hard_terminate(&with_subdomain.backend_id)
            .await
            .expect("hard terminate");
        client
            .hard_terminate(&one.backend_id)
            .await
            .expect("hard terminate");
        env.wait_terminated(&ours(&one.backend_id)).await;
        env
    }
);

db_test!(
    plane_clients_follow_a_failed_start_to_its_end_without_spinning,
    |env: TestEnv| async move {
        // Through a relay that counts the requests Plane's client makes.
        let relay = Relay::start(env.controller().local_addr()).await;
        let client = PlaneClient::new(
            format!("http://{}/", relay.addr())
                .parse()
                .expect("relay URL"),
        );
        let mut missing = executable("plane-test/does-not-exist:1");
        missing.pull_policy = Some(PullPolicy::Never);
        let response = client
            .connect(&connect_request(
                "doc-missing",
                "",
                Some(spawn_config(&env, missing)),
            ))
            .await
            .expect("connect");
        let mut stream = client
            .backend_status_stream(&response.backend_id)
            .await
            .expect("status stream");
        let last = follow_to(&mut stream, BackendStatus::Terminated).await;
        assert_eq!(last.status, BackendStatus::Terminated);
        assert_eq!(
            last.termination_reason,
            Some(TerminationReason::InternalError)
        );

        // Reading on after the end: Plane's client resumes with Last-Event-ID. It must get
        // a stream that waits, not one that ends at once and has it reconnect in a loop.
        let before = relay.requests();
        let more = tokio::time::timeout(Duration::from_secs(3), stream.next()).await;
        assert!(more.is_err(), "nothing comes after terminated: {more:?}");
        let resumes = relay.requests() - before;
        assert!(resumes <= 1, "the client reconnected {resumes} times");
        env
    }
);

db_test!(
    plane_clients_read_cluster_state_and_drain,
    |env: TestEnv| async move {
        let client = plane_client(&env);
        let cluster = plane_cluster(&env);
        let spawn = spawn_config(&env, executable(test_image()));
        let running = client
            .connect(&connect_request("doc-drain", "", Some(spawn.clone())))
            .await
            .expect("connect");
        env.wait_for_status(
            &ours(&running.backend_id),
            plane_protocol::backend::BackendStatus::Ready,
            BACKEND_WAIT,
        )
        .await;

        let state = client
            .cluster_state(&cluster)
            .await
            .expect("cluster state parses");
        let drone_name = env.drone.name().to_string();
        let drone = state
            .drones
            .iter()
            .find(|d| d.node.name.to_string() == drone_name)
            .expect("our drone is listed");
        assert!(drone.ready && !drone.draining);
        assert_eq!(drone.backend_count, 1);
        assert!(!drone.node.plane_version.is_empty());
        assert!(state
            .proxies
            .iter()
            .any(|p| p.name.to_string() == env.proxy.name().as_str()));

        // Drained: no new backends, while the running one keeps serving.
        let drone_name = DroneName::try_from(drone_name).expect("a name Plane's tools accept");
        let drained = client.drain(&cluster, &drone_name).await.expect("drain");
        assert!(drained.updated);
        let again = client
            .drain(&cluster, &drone_name)
            .await
            .expect("drain again");
        assert!(!again.updated);
        let state = client.cluster_state(&cluster).await.expect("cluster state");
        assert!(state.drones.iter().all(|d| d.draining && !d.ready));
        let (error, code) = api_error(
            client
                .connect(&connect_request("doc-new", "", Some(spawn.clone())))
                .await,
        );
        assert_kind(
            &error,
            code,
            ApiErrorKind::NoDroneAvailable,
            StatusCode::SERVICE_UNAVAILABLE,
        );
        let (code, _) = env.get_via_proxy(&running.token.to_string(), "/").await;
        assert_eq!(code, 200);
        let joined = client
            .connect(&connect_request("doc-drain", "", Some(spawn.clone())))
            .await
            .expect("joining a backend of a drained drone still works");
        assert_eq!(joined.backend_id, running.backend_id);

        // Undrain (ours; Plane has no undrain) reverses it.
        let path = format!("/ctrl/c/{}/d/{}/undrain", env.cluster, drone_name);
        let (code, body) = env.post(&path, &serde_json::json!(null)).await;
        assert_eq!((code, body["updated"].as_bool()), (200, Some(true)));
        wait_for("a connect after undrain", BACKEND_WAIT, || async {
            client
                .connect(&connect_request("doc-new", "", Some(spawn.clone())))
                .await
                .map_err(|err| err.to_string())
        })
        .await;

        let unknown = DroneName::try_from("dr-nobody".to_string()).expect("name");
        let (error, code) = api_error(client.drain(&cluster, &unknown).await);
        assert_kind(&error, code, ApiErrorKind::NotFound, StatusCode::NOT_FOUND);
        env
    }
);

/// Connects `user` to the key's backend; returns the token.
async fn connect_as(client: &PlaneClient, env: &TestEnv, key: &str, user: &str) -> String {
    let mut request = connect_request(key, "", Some(spawn_config(env, executable(test_image()))));
    request.user = Some(user.to_string());
    client
        .connect(&request)
        .await
        .expect("connect")
        .token
        .to_string()
}

/// Tokens for alice and for bob to one ready backend of `key`, and the backend.
async fn alice_and_bob(
    client: &PlaneClient,
    env: &TestEnv,
    key: &str,
) -> (String, String, BackendName) {
    let alice = connect_as(client, env, key, "alice").await;
    let bob = connect_as(client, env, key, "bob").await;
    let backend = client
        .connect(&connect_request(key, "", None))
        .await
        .expect("join")
        .backend_id;
    env.wait_for_status(
        &ours(&backend),
        plane_protocol::backend::BackendStatus::Ready,
        BACKEND_WAIT,
    )
    .await;
    (alice, bob, backend)
}

/// GETs `/` with `token` through the proxy at `proxy`; returns the status code.
async fn proxy_status(env: &TestEnv, proxy: std::net::SocketAddr, token: &str) -> u16 {
    env.client
        .get(format!("http://{proxy}/{token}/"))
        .send()
        .await
        .expect("proxy reachable")
        .status()
        .as_u16()
}

/// Polls until `token` is refused at `proxy`, for at most a second: the promise revocation
/// makes. Returns the refusal's status code.
async fn refused_within_a_second(env: &TestEnv, proxy: std::net::SocketAddr, token: &str) -> u16 {
    wait_for(
        "the revoked token refused",
        Duration::from_secs(1),
        || async {
            match proxy_status(env, proxy, token).await {
                200 => Err("still served".to_string()),
                code => Ok(code),
            }
        },
    )
    .await
}

db_test!(
    plane_clients_revoke_one_users_tokens,
    |env: TestEnv| async move {
        let client = plane_client(&env);
        let (alice, bob, backend) = alice_and_bob(&client, &env, "doc-revoke").await;
        let proxy = env.proxy.local_addr();
        // Both routes are cached at the proxy before the revocation.
        assert_eq!(proxy_status(&env, proxy, &alice).await, 200);
        assert_eq!(proxy_status(&env, proxy, &bob).await, 200);

        client
            .revoke(&RevokeRequest {
                backend_id: backend.clone(),
                user: "alice".to_string(),
            })
            .await
            .expect("revoke answers what Plane's client expects");
        assert_eq!(refused_within_a_second(&env, proxy, &alice).await, 404);
        assert_eq!(proxy_status(&env, proxy, &bob).await, 200);
        // Tokens issued to alice afterwards work: revocation is of tokens, not of the user.
        let fresh = connect_as(&client, &env, "doc-revoke", "alice").await;
        assert_eq!(proxy_status(&env, proxy, &fresh).await, 200);

        // Our path for it, and an unknown backend.
        let (code, body) = env
            .post(
                "/ctrl/b/revoke",
                &serde_json::json!({ "backend_id": backend.to_string(), "user": "bob" }),
            )
            .await;
        assert_eq!((code, body), (200, serde_json::Value::Null));
        refused_within_a_second(&env, proxy, &bob).await;
        let unknown = BackendName::try_from("ba-nobody".to_string()).expect("name");
        let (error, code) = api_error(
            client
                .revoke(&RevokeRequest {
                    backend_id: unknown,
                    user: "alice".to_string(),
                })
                .await,
        );
        assert_kind(&error, code, ApiErrorKind::NotFound, StatusCode::NOT_FOUND);

        // A static token is shared by every connect: revoking its spawner's user leaves it.
        let mut static_spawn = spawn_config(&env, executable(test_image()));
        static_spawn.use_static_token = true;
        let shared = client
            .connect(&connect_request(
                "doc-revoke-static",
                "",
                Some(static_spawn.clone()),
            ))
            .await
            .expect("static connect");
        client
            .revoke(&RevokeRequest {
                backend_id: shared.backend_id.clone(),
                user: "alice".to_string(),
            })
            .await
            .expect("revoke");
        let again = client
            .connect(&connect_request(
                "doc-revoke-static",
                "",
                Some(static_spawn),
            ))
            .await
            .expect("joins still get the static token");
        assert_eq!(again.token, shared.token);
        client
            .hard_terminate(&shared.backend_id)
            .await
            .expect("terminate");
        env
    }
);

postgres_test!(
    a_revocation_reaches_the_proxies_of_every_controller,
    |env: TestEnv| async move {
        let client = plane_client(&env);
        let other = env.start_controller().await;
        let other_proxy = env.start_proxy(&other.url()).await;
        let (alice, bob, backend) = alice_and_bob(&client, &env, "doc-everywhere").await;
        let far = other_proxy.local_addr();
        assert_eq!(proxy_status(&env, far, &alice).await, 200);

        // Revoked on the first controller; the proxy of the second one drops it.
        client
            .revoke(&RevokeRequest {
                backend_id: backend,
                user: "alice".to_string(),
            })
            .await
            .expect("revoke");
        refused_within_a_second(&env, far, &alice).await;
        assert_eq!(proxy_status(&env, far, &bob).await, 200);
        other_proxy.shutdown().await;
        other.shutdown().await;
        env
    }
);
