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

fn build_context() -> Vec<u8> {
    let busybox = std::fs::read(BUSYBOX).unwrap_or_else(|err| {
        panic!(
            "this test needs a static busybox at {BUSYBOX} (apt-get install busybox-static): {err}"
        )
    });
    let mut archive = tar::Builder::new(Vec::new());
    for (path, mode, data) in [
        ("Dockerfile", 0o644, DOCKERFILE.as_bytes()),
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
    let options = BuildImageOptions {
        t: tag.to_string(),
        rm: true,
        forcerm: true,
        ..Default::default()
    };
    let mut build = docker.build_image(options, None, Some(build_context().into()));
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
        protocol: Default::default(),
    }
}

#[tokio::test]
async fn docker_runtime_runs_signals_and_removes_a_backend() {
    let cancel = CancellationToken::new();
    let drone = NodeName::new_random("dr-test");
    let runtime = DockerRuntime::connect(
        DockerRuntimeConfig {
            drone: drone.clone(),
            cluster: "localhost:9090".parse().expect("valid cluster"),
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            pull_timeout: Duration::from_secs(30),
        },
        &cancel,
    )
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
    let _ = docker
        .remove_image(
            &tag,
            Some(RemoveImageOptions {
                force: true,
                ..Default::default()
            }),
            None,
        )
        .await;
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
