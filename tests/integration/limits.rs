//! Resource limits and isolation, end to end through the API on the real engine: a backend
//! over its memory limit ends `terminated` saying it ran out of memory, the process limit
//! caps its threads, CPU limits show in `docker inspect`, a spawn's own Docker network
//! works, GPU requests reach the engine, and what cannot be honoured is refused with a 400.

use crate::db_test;
use crate::harness::{containers_of, TestEnv};
use plane_protocol::api::ResourceLimits;
use plane_protocol::backend::TerminationReason;
use serde_json::{json, Value};

/// The host config Docker holds for `backend`'s container.
async fn host_config(backend: &plane_protocol::names::BackendName) -> bollard::models::HostConfig {
    let docker = bollard::Docker::connect_with_local_defaults().expect("docker");
    let container = containers_of(backend).await.pop().expect("container");
    docker
        .inspect_container(&container, None)
        .await
        .expect("inspect")
        .host_config
        .expect("host config")
}

async fn post_via_proxy(env: &TestEnv, token: &str, path: &str) -> Option<Value> {
    let answer = env
        .client
        .post(env.proxy_url(&format!("/{token}{path}")))
        .send()
        .await
        .ok()?;
    answer.json().await.ok()
}

db_test!(
    a_backend_over_its_memory_limit_ends_saying_it_ran_out_of_memory,
    |env: TestEnv| async move {
        let mut spawn = env.spawn_config(&[]);
        spawn.executable.resource_limits.memory_limit_bytes = Some(32 * 1024 * 1024);
        let backend = env.connect_ready("oom", &spawn).await;
        // The answer never comes: the kernel kills the process mid-allocation.
        let _ = post_via_proxy(&env, backend.token.as_str(), "/alloc/256").await;
        let ended = env.wait_terminated(&backend.backend_id).await;
        assert_eq!(ended.exit_code, Some(137), "{ended:?}");
        let message = ended.message.clone().unwrap_or_default();
        assert!(
            message.contains("out of memory") && message.contains("33554432"),
            "{ended:?}"
        );
        env
    }
);

db_test!(
    the_process_limit_caps_a_backends_threads_and_cpu_limits_reach_docker,
    |env: TestEnv| async move {
        let mut spawn = env.spawn_config(&[]);
        spawn.executable.resource_limits = ResourceLimits {
            cpu_period: Some(100_000),
            cpu_period_percent: Some(50),
            cpu_time_limit: Some(600),
            memory_limit_bytes: None,
            disk_limit_bytes: None,
            pids_limit: Some(32),
        };
        let backend = env.connect_ready("pids", &spawn).await;
        let threads = post_via_proxy(&env, backend.token.as_str(), "/threads/200")
            .await
            .expect("an answer");
        let started = threads["started"].as_u64().expect("count");
        assert!(started > 0 && started < 32, "{threads}");

        let host = host_config(&backend.backend_id).await;
        assert_eq!(
            (host.cpu_period, host.cpu_quota),
            (Some(100_000), Some(50_000))
        );
        assert_eq!(host.pids_limit, Some(32));
        let ulimits = host.ulimits.unwrap_or_default();
        assert_eq!(ulimits[0].name.as_deref(), Some("cpu"));
        assert_eq!(ulimits[0].hard, Some(600));
        env
    }
);

db_test!(
    a_spawn_joins_its_docker_network_and_gpu_requests_reach_the_engine,
    |env: TestEnv| async move {
        let docker = bollard::Docker::connect_with_local_defaults().expect("docker");
        let network = format!("plane-test-{}", backend_suffix());
        docker
            .create_network(bollard::network::CreateNetworkOptions {
                name: network.as_str(),
                ..Default::default()
            })
            .await
            .expect("create network");
        let mut spawn = env.spawn_config(&[]);
        spawn.executable.network_name = Some(network.clone());
        let backend = env.connect_ready("networked", &spawn).await;
        let (code, _) = env.get_via_proxy(backend.token.as_str(), "/").await;
        assert_eq!(code, 200);
        let host = host_config(&backend.backend_id).await;
        assert_eq!(host.network_mode.as_deref(), Some(network.as_str()));
        env.terminate(
            &backend.backend_id,
            plane_protocol::backend::TerminationKind::Hard,
        )
        .await;
        env.wait_terminated(&backend.backend_id).await;
        let _ = docker.remove_network(&network).await;

        // No GPU here: the engine refuses to start it, and the failure says why.
        let mut spawn = env.spawn_config(&[]);
        spawn.executable.gpus = Some(plane_protocol::api::Gpus::Count(1));
        let backend = env.connect("gpu", &spawn).await;
        let ended = env.wait_terminated(&backend.backend_id).await;
        assert_eq!(
            ended.termination_reason,
            Some(TerminationReason::InternalError)
        );
        let message = ended.message.clone().unwrap_or_default();
        assert!(message.contains("gpu"), "{ended:?}");
        env
    }
);

/// Whether this machine's engine can limit a container's disk, as a drone reads it.
async fn engine_limits_disk() -> bool {
    let cancel = tokio_util::sync::CancellationToken::new();
    let config = plane_drone::runtime::docker::DockerRuntimeConfig {
        drone: plane_protocol::names::NodeName::new_random("dr-probe"),
        cluster: "localhost:9090".parse().expect("cluster"),
        ip: std::net::Ipv4Addr::LOCALHOST.into(),
        pull_timeout: std::time::Duration::from_secs(10),
        runtime: None,
        network: None,
        log_max_bytes: 1 << 20,
        metrics: Default::default(),
        allowed_registries: None,
    };
    let runtime = plane_drone::runtime::docker::DockerRuntime::connect(config, &cancel)
        .await
        .expect("Docker engine reachable");
    let supported = runtime.storage_driver().disk_limits;
    cancel.cancel();
    supported
}

db_test!(
    a_disk_limit_goes_to_a_drone_that_can_enforce_it_or_is_refused,
    |env: TestEnv| async move {
        let mut spawn = env.spawn_config(&[]);
        spawn.executable.resource_limits.disk_limit_bytes = Some(256 * 1024 * 1024);
        if engine_limits_disk().await {
            let backend = env.connect_ready("disk", &spawn).await;
            let host = host_config(&backend.backend_id).await;
            let size = host.storage_opt.unwrap_or_default().remove("size");
            assert_eq!(size.as_deref(), Some("268435456"));
        } else {
            // No drone of the cluster can: no drone is available for it (503, saying why),
            // and nothing is started.
            let body = json!({ "key": { "name": "disk" }, "spawn_config": spawn });
            let (status, body) = env.post("/ctrl/connect", &body).await;
            assert_eq!(status, 503, "{body}");
            assert_eq!(body["kind"], "NoDroneAvailable", "{body}");
            let message = body["message"].as_str().unwrap_or_default();
            assert!(
                message.contains("disk_limit_bytes cannot be enforced by any drone"),
                "{body}"
            );
            let state = env.cluster_state().await;
            assert!(
                state.drones.iter().all(|d| d.backend_count == 0),
                "{state:?}"
            );
        }
        env
    }
);

fn backend_suffix() -> String {
    plane_protocol::names::BackendName::new_random().to_string()
}

db_test!(
    limits_that_cannot_be_honoured_are_refused_naming_the_field,
    |env: TestEnv| async move {
        let base = serde_json::to_value(env.spawn_config(&[])).expect("json");
        for (path, value, expected) in [
            (
                &["resource_limits", "disk_limit_bytes"][..],
                json!(4096),
                "disk_limit_bytes must be at least 1048576",
            ),
            (
                &["resource_limits", "cpu_time_limit"][..],
                json!(0),
                "cpu_time_limit must be 1 to",
            ),
            (
                &["resource_limits", "pids_limit"][..],
                json!(0),
                "pids_limit must be 1 to",
            ),
            (
                &["network_name"][..],
                json!("../host"),
                "is not a Docker network name",
            ),
            (&["gpus"][..], json!(0), "gpus must be a positive count"),
            (&["gpus"][..], json!("some"), "gpus"),
        ] {
            let mut spawn = base.clone();
            let mut target = &mut spawn["executable"];
            for key in &path[..path.len() - 1] {
                target = &mut target[*key];
            }
            target[path[path.len() - 1]] = value;
            let (status, body) = env
                .post(
                    "/ctrl/connect",
                    &json!({ "key": { "name": "refused" }, "spawn_config": spawn }),
                )
                .await;
            assert_eq!(status, 400, "{path:?}: {body}");
            let message = body["message"].as_str().unwrap_or_default();
            assert!(message.contains(expected), "{path:?}: {body}");
        }
        env
    }
);
