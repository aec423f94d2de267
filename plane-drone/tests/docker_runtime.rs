//! Drives the Docker runtime against the real engine: a locally built busybox image is
//! started as a backend, answers HTTP on its published port, stops on SIGTERM with the
//! exit code it chose, and is removed. Requires Docker and `/bin/busybox` (Debian:
//! `apt-get install busybox-static`).

use bollard::image::{BuildImageOptions, RemoveImageOptions};
use bollard::Docker;
use futures_util::StreamExt;
use plane_drone::runtime::docker::{
    DockerRuntime, DockerRuntimeConfig, BACKEND_LABEL, DRONE_LABEL,
};
use plane_drone::runtime::{BackendSpec, Runtime, RuntimeError, Signal};
use plane_protocol::api::{ExecutorConfig, PullPolicy};
use plane_protocol::names::{BackendName, NodeName};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const BUSYBOX: &str = "/bin/busybox";

/// Serves HTTP on 8080 and exits with code 7 on SIGTERM (a shell trap, since PID 1 gets no
/// default signal handling).
const DOCKERFILE: &str = r#"FROM scratch
COPY busybox /bin/busybox
ENTRYPOINT ["/bin/busybox", "sh", "-c"]
CMD ["trap 'exit 7' TERM; /bin/busybox httpd -f -p 8080 -h / & wait"]
"#;

fn build_context(dockerfile: &str) -> Vec<u8> {
    let busybox = std::fs::read(BUSYBOX).unwrap_or_else(|err| {
        panic!(
            "this test needs a static busybox at {BUSYBOX} (apt-get install busybox-static): {err}"
        )
    });
    let mut archive = tar::Builder::new(Vec::new());
    for (path, mode, data) in [
        ("Dockerfile", 0o644, dockerfile.as_bytes()),
        ("busybox", 0o755, busybox.as_slice()),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        archive
            .append_data(&mut header, path, data)
            .expect("tar entry");
    }
    archive.into_inner().expect("tar archive")
}

async fn build_image(docker: &Docker, tag: &str) {
    build_image_from(docker, tag, DOCKERFILE).await
}

async fn build_image_from(docker: &Docker, tag: &str, dockerfile: &str) {
    let options = BuildImageOptions {
        t: tag.to_string(),
        rm: true,
        forcerm: true,
        ..Default::default()
    };
    let mut build = docker.build_image(options, None, Some(build_context(dockerfile).into()));
    while let Some(step) = build.next().await {
        let step = step.expect("image build step");
        if let Some(error) = step.error {
            panic!("building {tag} failed: {error}");
        }
    }
}

/// Polls `GET http://address/` until any HTTP response arrives or the deadline passes.
async fn wait_for_http(address: SocketAddr, within: Duration) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("http client");
    let deadline = Instant::now() + within;
    let mut last_error = String::new();
    while Instant::now() < deadline {
        match client
            .get(format!("http://{address}/"))
            .timeout(Duration::from_millis(500))
            .send()
            .await
        {
            Ok(_) => return,
            Err(err) => last_error = err.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("backend at {address} did not answer HTTP within {within:?}; last error: {last_error}");
}

fn executable(image: &str, pull_policy: PullPolicy) -> ExecutorConfig {
    ExecutorConfig {
        image: image.to_string(),
        pull_policy: Some(pull_policy),
        credentials: None,
        env: Default::default(),
        resource_limits: Default::default(),
        mount: None,
        network_name: None,
        ready_path: None,
        gpus: None,
        protocol: Default::default(),
    }
}

/// Removes a test's image, whatever the test got to.
async fn remove_image(docker: &Docker, tag: &str) {
    let options = RemoveImageOptions {
        force: true,
        ..Default::default()
    };
    let _ = docker.remove_image(tag, Some(options), None).await;
}

/// A runtime for `drone` on the local engine, publishing on loopback.
fn runtime_config(drone: &NodeName) -> DockerRuntimeConfig {
    DockerRuntimeConfig {
        drone: drone.clone(),
        cluster: "localhost:9090".parse().expect("valid cluster"),
        ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        pull_timeout: Duration::from_secs(30),
        runtime: None,
        network: None,
        log_max_bytes: 1 << 20,
        metrics: Default::default(),
        allowed_registries: None,
    }
}

#[tokio::test]
async fn docker_runtime_runs_signals_and_removes_a_backend() {
    let cancel = CancellationToken::new();
    let drone = NodeName::new_random("dr-test");
    let runtime = DockerRuntime::connect(runtime_config(&drone), &cancel)
        .await
        .expect("Docker engine reachable");
    let docker = runtime.docker().clone();
    let tag = format!("plane-drone-test:{}", BackendName::new_random());
    let backend_id = BackendName::new_random();

    let outcome = tokio::time::timeout(
        Duration::from_secs(60),
        exercise(&runtime, &docker, &tag, &backend_id, &drone),
    )
    .await;

    // Clean up whatever the test got to, even when it failed.
    let _ = runtime.remove(&backend_id).await;
    remove_image(&docker, &tag).await;
    cancel.cancel();
    outcome.expect("test finished within 60 s");
}

async fn exercise(
    runtime: &DockerRuntime,
    docker: &Docker,
    tag: &str,
    backend_id: &BackendName,
    drone: &NodeName,
) {
    // A missing image fails quickly (no registry is reachable here).
    let started = Instant::now();
    let missing = runtime
        .prepare_image(&executable(
            &format!("plane-drone-test-missing:{}", BackendName::new_random()),
            PullPolicy::IfNotPresent,
        ))
        .await;
    assert!(
        matches!(missing, Err(RuntimeError::ImageUnavailable { .. })),
        "expected ImageUnavailable, got {missing:?}"
    );
    eprintln!("missing image reported after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(20));

    build_image(docker, tag).await;
    runtime
        .prepare_image(&executable(tag, PullPolicy::Never))
        .await
        .expect("locally built image is present");

    let spec = BackendSpec {
        backend_id: backend_id.clone(),
        image: tag.to_string(),
        env: vec![("SESSION_BACKEND_ID".into(), backend_id.to_string())],
        resource_limits: Default::default(),
        network: None,
        gpus: None,
        mount: None,
        ready_path: "/".to_string(),
        warm: true,
    };
    let address = runtime.start_backend(&spec).await.expect("backend starts");
    assert_eq!(address.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    wait_for_http(address, Duration::from_secs(10)).await;

    let info = docker
        .inspect_container(&format!("plane-{backend_id}"), None)
        .await
        .expect("container exists");
    let labels = info.config.and_then(|c| c.labels).unwrap_or_default();
    assert_eq!(labels.get(BACKEND_LABEL), Some(&backend_id.to_string()));
    assert_eq!(labels.get(DRONE_LABEL), Some(&drone.to_string()));
    // Kept with the container, for a later run of the drone that re-adopts it.
    let recorded = runtime.recorded(backend_id).await;
    assert_eq!(recorded.ready_path.as_deref(), Some("/"));
    assert!(recorded.warm, "the warm mark is kept with the container");
    assert_eq!(
        runtime.list_backends().await.expect("list"),
        vec![backend_id.clone()]
    );

    runtime
        .signal(backend_id, Signal::Term)
        .await
        .expect("SIGTERM delivered");
    let exit_code = tokio::time::timeout(Duration::from_secs(10), runtime.wait_exit(backend_id))
        .await
        .expect("exit observed within 10 s")
        .expect("wait_exit succeeds");
    assert_eq!(exit_code, Some(7));
    assert!(matches!(
        runtime.signal(backend_id, Signal::Kill).await,
        Err(RuntimeError::NotRunning(_))
    ));

    runtime.remove(backend_id).await.expect("removed");
    runtime
        .remove(backend_id)
        .await
        .expect("removing twice is fine");
    assert!(runtime.list_backends().await.expect("list").is_empty());
    assert!(matches!(
        runtime.wait_exit(backend_id).await,
        Err(RuntimeError::NotFound(_))
    ));
}

/// Fills a 256 MiB buffer as PID 1, so under a smaller memory limit the kernel kills it.
const OOM_DOCKERFILE: &str = r#"FROM scratch
COPY busybox /bin/busybox
ENTRYPOINT ["/bin/busybox", "dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"]
"#;

/// Asks the way the lifecycle does: again for a while, since the engine can report the
/// exit before it knows of the OOM kill.
async fn oom_killed_within(
    runtime: &DockerRuntime,
    backend_id: &BackendName,
    within: Duration,
) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if runtime.oom_killed(backend_id).await.expect("inspected") {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A process the kernel killed over its memory limit is told apart from one that got a
/// SIGKILL from elsewhere, though both exit with 137, and though the second's container name
/// begins the first's (the engine matches container names by prefix).
#[tokio::test]
async fn an_oom_kill_is_told_apart_from_another_sigkill() {
    let cancel = CancellationToken::new();
    let drone = NodeName::new_random("dr-test");
    let runtime = DockerRuntime::connect(runtime_config(&drone), &cancel)
        .await
        .expect("Docker engine reachable");
    let docker = runtime.docker().clone();
    let suffix = BackendName::new_random();
    let (oom_tag, tag) = (
        format!("plane-drone-test-oom:{suffix}"),
        format!("plane-drone-test:{suffix}"),
    );
    let killed = BackendName::new_random();
    let hungry: BackendName = format!("{killed}x").parse().expect("valid");
    let spec = |backend_id: &BackendName, image: &str| BackendSpec {
        backend_id: backend_id.clone(),
        image: image.to_string(),
        env: vec![],
        resource_limits: plane_protocol::api::ResourceLimits {
            memory_limit_bytes: Some(32 << 20),
            ..Default::default()
        },
        network: None,
        gpus: None,
        mount: None,
        ready_path: "/".to_string(),
        warm: false,
    };
    let outcome = tokio::time::timeout(Duration::from_secs(60), async {
        build_image_from(&docker, &oom_tag, OOM_DOCKERFILE).await;
        build_image(&docker, &tag).await;

        // Started first, so the other's OOM kill falls within its lifetime.
        let address = runtime
            .start_backend(&spec(&killed, &tag))
            .await
            .expect("starts");
        wait_for_http(address, Duration::from_secs(10)).await;

        runtime
            .start_backend(&spec(&hungry, &oom_tag))
            .await
            .expect("starts");
        let exit_code = runtime.wait_exit(&hungry).await.expect("exit observed");
        assert_eq!(exit_code, Some(137));
        assert!(
            oom_killed_within(&runtime, &hungry, Duration::from_secs(10)).await,
            "the engine never said the process was OOM-killed"
        );

        runtime
            .signal(&killed, Signal::Kill)
            .await
            .expect("SIGKILL delivered");
        let exit_code = runtime.wait_exit(&killed).await.expect("exit observed");
        assert_eq!(exit_code, Some(137));
        assert!(!runtime.oom_killed(&killed).await.expect("inspected"));
        runtime.remove(&killed).await.expect("removed");
        assert!(matches!(
            runtime.oom_killed(&killed).await,
            Err(RuntimeError::NotFound(_))
        ));
    })
    .await;

    for backend_id in [&hungry, &killed] {
        let _ = runtime.remove(backend_id).await;
    }
    for image in [&oom_tag, &tag] {
        remove_image(&docker, image).await;
    }
    cancel.cancel();
    outcome.expect("test finished within 60 s");
}

/// What a spawn asks for reaches the container the engine creates: CPU share, CPU time,
/// memory and process limits, the drone's OCI runtime and network, GPU device requests
/// (inspected without starting: there is no GPU here), and a spawn's own network, on which
/// the backend still answers at its published port.
#[tokio::test]
async fn limits_runtime_network_and_gpus_reach_the_container() {
    let cancel = CancellationToken::new();
    let docker = Docker::connect_with_local_defaults().expect("docker");
    let suffix = BackendName::new_random();
    let (drone_network, spawn_network) = (
        format!("plane-test-a-{suffix}"),
        format!("plane-test-b-{suffix}"),
    );
    for name in [&drone_network, &spawn_network] {
        docker
            .create_network(bollard::network::CreateNetworkOptions {
                name: name.as_str(),
                ..Default::default()
            })
            .await
            .expect("create network");
    }
    let config = DockerRuntimeConfig {
        // Present in every Docker engine, unlike runsc.
        runtime: Some("runc".to_string()),
        network: Some(drone_network.clone()),
        ..runtime_config(&NodeName::new_random("dr-test"))
    };
    let runtime = DockerRuntime::connect(config, &cancel)
        .await
        .expect("Docker engine reachable");
    let tag = format!("plane-drone-test:{}", BackendName::new_random());
    let (inspected, started) = (BackendName::new_random(), BackendName::new_random());
    let outcome = tokio::time::timeout(Duration::from_secs(60), async {
        build_image(&docker, &tag).await;
        let limits = plane_protocol::api::ResourceLimits {
            cpu_period: Some(100_000),
            cpu_period_percent: Some(50),
            cpu_time_limit: Some(100),
            memory_limit_bytes: Some(64 * 1024 * 1024),
            disk_limit_bytes: None,
            pids_limit: Some(64),
        };
        let spec = BackendSpec {
            backend_id: inspected.clone(),
            image: tag.clone(),
            env: vec![],
            resource_limits: limits,
            network: None,
            gpus: Some(plane_protocol::api::Gpus::All(
                plane_protocol::api::AllGpus::All,
            )),
            mount: None,
            ready_path: "/".to_string(),
            warm: false,
        };
        let name = format!("plane-{inspected}");
        docker
            .create_container(
                Some(bollard::container::CreateContainerOptions {
                    name: name.clone(),
                    platform: None,
                }),
                runtime.container_config(&spec),
            )
            .await
            .expect("create");
        let host = docker
            .inspect_container(&name, None)
            .await
            .expect("inspect")
            .host_config
            .expect("host config");
        assert_eq!(
            (host.cpu_period, host.cpu_quota),
            (Some(100_000), Some(50_000))
        );
        assert_eq!(host.memory, Some(64 * 1024 * 1024));
        assert_eq!(host.pids_limit, Some(64));
        let cpu = host.ulimits.unwrap_or_default();
        assert_eq!(cpu.len(), 1);
        assert_eq!(
            (cpu[0].name.as_deref(), cpu[0].soft, cpu[0].hard),
            (Some("cpu"), Some(100), Some(100))
        );
        let gpus = host.device_requests.unwrap_or_default();
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].count, Some(-1));
        assert_eq!(gpus[0].capabilities, Some(vec![vec!["gpu".to_string()]]));
        assert_eq!(host.network_mode.as_deref(), Some(drone_network.as_str()));
        assert_eq!(host.runtime.as_deref(), Some("runc"));

        // A disk limit becomes the size storage option, and the drone's reading of its
        // storage driver matches what the engine does with one: creates it, or refuses.
        let disk_limited = BackendName::new_random();
        let mut disk_spec = spec.clone();
        disk_spec.backend_id = disk_limited.clone();
        disk_spec.gpus = None;
        disk_spec.resource_limits.disk_limit_bytes = Some(64 * 1024 * 1024);
        let config = runtime.container_config(&disk_spec);
        let storage_opt = config
            .host_config
            .as_ref()
            .and_then(|h| h.storage_opt.clone());
        assert_eq!(
            storage_opt,
            Some(std::collections::HashMap::from([(
                "size".to_string(),
                "67108864".to_string()
            )]))
        );
        let created = docker
            .create_container(
                Some(bollard::container::CreateContainerOptions {
                    name: format!("plane-{disk_limited}"),
                    platform: None,
                }),
                config,
            )
            .await;
        let _ = runtime.remove(&disk_limited).await;
        let driver = runtime.storage_driver();
        assert_eq!(
            created.is_ok(),
            driver.disk_limits,
            "storage driver {driver:?}; the engine said {created:?}"
        );

        // A spawn's own network wins over the drone's, and the port is published there too.
        let spec = BackendSpec {
            backend_id: started.clone(),
            image: tag.clone(),
            env: vec![],
            resource_limits: Default::default(),
            network: Some(spawn_network.clone()),
            gpus: None,
            mount: None,
            ready_path: "/".to_string(),
            warm: false,
        };
        let address = runtime
            .start_backend(&spec)
            .await
            .expect("starts on its network");
        wait_for_http(address, Duration::from_secs(10)).await;
        let host = docker
            .inspect_container(&format!("plane-{started}"), None)
            .await
            .expect("inspect")
            .host_config
            .expect("host config");
        assert_eq!(host.network_mode.as_deref(), Some(spawn_network.as_str()));
    })
    .await;
    for backend in [&inspected, &started] {
        let _ = runtime.remove(backend).await;
    }
    for name in [&drone_network, &spawn_network] {
        let _ = docker.remove_network(name).await;
    }
    remove_image(&docker, &tag).await;
    cancel.cancel();
    outcome.expect("finished within 60 s");
}

/// A followed read has every line the backend printed after it was asked for, though the
/// engine only gets the request when the stream is first read: here, after the line is
/// already in the engine's log. A tail is the last lines as of the engine's read, and no
/// line comes twice.
#[tokio::test]
async fn a_followed_read_has_every_line_printed_after_it_was_asked_for() {
    let cancel = CancellationToken::new();
    let runtime = DockerRuntime::connect(runtime_config(&NodeName::new_random("dr-test")), &cancel)
        .await
        .expect("Docker engine reachable");
    let docker = runtime.docker().clone();
    let tag = format!("plane-drone-test:{}", BackendName::new_random());
    let backend_id = BackendName::new_random();
    let outcome = tokio::time::timeout(Duration::from_secs(60), async {
        build_image(&docker, &tag).await;
        let spec = BackendSpec {
            backend_id: backend_id.clone(),
            image: tag.clone(),
            env: vec![],
            resource_limits: Default::default(),
            network: None,
            gpus: None,
            mount: None,
            ready_path: "/".to_string(),
            warm: false,
        };
        let address = runtime.start_backend(&spec).await.expect("backend starts");
        wait_for_http(address, Duration::from_secs(10)).await;

        print_line(&docker, &backend_id, "before").await;
        until_logged(&docker, &backend_id, "before").await;
        let followed = runtime.logs(&backend_id, true, Some(0));
        let last_one = runtime.logs(&backend_id, true, Some(1));
        let last_two = runtime.logs(&backend_id, true, Some(2));
        print_line(&docker, &backend_id, "after").await;
        until_logged(&docker, &backend_id, "after").await;
        runtime
            .signal(&backend_id, Signal::Term)
            .await
            .expect("SIGTERM delivered");

        assert_eq!(texts(followed).await, ["after"]);
        assert_eq!(texts(last_one).await, ["after"]);
        assert_eq!(texts(last_two).await, ["before", "after"]);
    })
    .await;
    let _ = runtime.remove(&backend_id).await;
    remove_image(&docker, &tag).await;
    cancel.cancel();
    outcome.expect("finished within 60 s");
}

/// Writes `text` to the container's log, as its main process printing it would.
async fn print_line(docker: &Docker, backend_id: &BackendName, text: &str) {
    let exec = docker
        .create_exec(
            &format!("plane-{backend_id}"),
            bollard::exec::CreateExecOptions {
                cmd: Some(vec![
                    "/bin/busybox".to_string(),
                    "sh".to_string(),
                    "-c".to_string(),
                    format!("echo {text} > /proc/1/fd/1"),
                ]),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await
        .expect("exec created");
    // Attached: its output ends when it exits. Whether the line got into the log is for
    // `until_logged` to see.
    if let bollard::exec::StartExecResults::Attached { mut output, .. } = docker
        .start_exec(&exec.id, None)
        .await
        .expect("exec started")
    {
        while output.next().await.is_some() {}
    }
}

/// Waits until the engine's log holds a line reading `text`, by following it from the
/// engine itself (not through the runtime under test).
async fn until_logged(docker: &Docker, backend_id: &BackendName, text: &str) {
    let options = bollard::container::LogsOptions::<String> {
        follow: true,
        stdout: true,
        tail: "all".to_string(),
        ..Default::default()
    };
    let mut lines = docker.logs(&format!("plane-{backend_id}"), Some(options));
    while let Some(line) = lines.next().await {
        if line.expect("a log line").to_string().trim_end() == text {
            return;
        }
    }
    panic!("the log of {backend_id} ended without {text:?}");
}

async fn texts(
    lines: impl futures_util::Stream<Item = Result<plane_protocol::api::BackendLogLine, RuntimeError>>,
) -> Vec<String> {
    lines
        .map(|line| line.expect("a log line").text)
        .collect()
        .await
}
