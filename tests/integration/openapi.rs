//! The OpenAPI document at `/pub/openapi.json`: it describes exactly the routes a real
//! controller serves, each of them reaches its handler, and schemathesis (the test command
//! installs it from PyPI) finds no server error and no answer that breaks the document when
//! it fuzzes every operation of a controller with a drone, auth and a cluster secret on.

use crate::crashes::PlaneProcess;
use crate::harness::{free_port, run_test, test_registry, wait_for, which, Db, TestEnv};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

#[tokio::test(flavor = "current_thread")]
async fn the_served_document_describes_every_route_and_each_reaches_its_handler() {
    run_test(
        "the_served_document_describes_every_route_and_each_reaches_its_handler",
        Db::Sqlite,
        |env: TestEnv| async move {
            let answer = env
                .client
                .get(env.controller_url("/pub/openapi.json"))
                .send()
                .await
                .expect("document reachable");
            assert_eq!(answer.status().as_u16(), 200);
            let document: Value = answer.json().await.expect("JSON");
            assert_eq!(document["openapi"], "3.1.0");

            let mut documented = BTreeSet::new();
            for (path, item) in document["paths"].as_object().expect("paths") {
                for method in item.as_object().expect("path item").keys() {
                    documented.insert((method.to_uppercase(), path.clone()));
                }
            }
            let served: BTreeSet<(String, String)> = plane::controller::router::served_routes()
                .into_iter()
                .map(|(method, path)| (method.to_string(), path))
                .collect();
            assert_eq!(documented, served);

            // Each documented operation reaches a handler: whatever it answers, it is not the
            // router's own 404 or 405.
            for (method, path) in &documented {
                let url = env.controller_url(
                    &path
                        .replace("{backend}", "ba-none")
                        .replace("{cluster}", env.cluster.as_str())
                        .replace("{drone}", "dr-none"),
                );
                let request = match method.as_str() {
                    "GET" => env.client.get(&url),
                    "POST" => env.client.post(&url).json(&serde_json::json!({})),
                    other => panic!("{other} {path}: no route takes {other}"),
                };
                let answer = request.send().await.expect("answer");
                let status = answer.status().as_u16();
                // Only a refusal's body is read: an event stream's never ends.
                let body = match status {
                    404 | 405 => answer.text().await.unwrap_or_default(),
                    _ => String::new(),
                };
                assert_ne!(status, 405, "{method} {path}: {body}");
                assert!(
                    !(status == 404 && body.contains("no such endpoint")),
                    "{method} {path} is documented but not routed: {body}"
                );
            }
            env
        },
    )
    .await;
}

/// The schemathesis CLI: `PLANE_TEST_SCHEMATHESIS`, which the test command sets to the one
/// it installs, or `schemathesis` on the PATH.
fn schemathesis() -> PathBuf {
    if let Ok(path) = std::env::var("PLANE_TEST_SCHEMATHESIS") {
        return PathBuf::from(path);
    }
    which("schemathesis").expect(
        "schemathesis is installed (the test command installs it from PyPI and sets \
             PLANE_TEST_SCHEMATHESIS)",
    )
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|arg| arg.to_string()).collect()
}

/// What schemathesis is told beyond its defaults. A documented 503 (`NoDroneAvailable`:
/// the fuzzer asks for clusters and pools that have no drone) is an answer, not a fault;
/// every other 5xx fails the run.
const SCHEMATHESIS_CONFIG: &str = r#"
[checks.not_a_server_error]
expected-statuses = ["1XX", "2XX", "3XX", "4XX", "503"]
"#;

#[tokio::test(flavor = "current_thread")]
async fn schemathesis_finds_no_fault_and_no_answer_that_breaks_the_document() {
    let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("scratch")
        .join(format!("schemathesis-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).expect("scratch");
    let port = free_port();
    let cluster = format!("127.0.0.1:{}", free_port());
    let (token, secret) = ("fuzz-token", "fuzz-secret");
    let db = format!("sqlite://{}", scratch.join("plane.db").display());
    let port_arg = port.to_string();
    let _controller = PlaneProcess::start(
        strings(&[
            "controller",
            "--host",
            "127.0.0.1",
            "--port",
            &port_arg,
            "--db",
            &db,
            "--default-cluster",
            &cluster,
            "--ctrl-token",
            token,
            "--cluster-secret",
            secret,
        ]),
        scratch.join("controller.log"),
    )
    .await;
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    wait_for("the controller to answer", Duration::from_secs(30), || {
        let request = client.get(format!("{base}/pub/health")).send();
        async move { request.await.map(|_| ()).map_err(|e| e.to_string()) }
    })
    .await;
    let controller_url = format!("http://{token}@127.0.0.1:{port}");
    let state_dir = scratch.join("drone-state").display().to_string();
    let registry = test_registry();
    let _drone = PlaneProcess::start(
        strings(&[
            "drone",
            "--controller-url",
            &controller_url,
            "--cluster",
            &cluster,
            "--cluster-secret",
            secret,
            "--state-dir",
            &state_dir,
            "--log-retention-seconds",
            "0",
            "--on-shutdown",
            "terminate",
            // The fuzzer names arbitrary images: none may be pulled from anywhere.
            "--allowed-registry",
            &registry,
        ]),
        scratch.join("drone.log"),
    )
    .await;
    wait_for("the drone to connect", Duration::from_secs(30), || {
        let request = client
            .get(format!("{base}/ctrl/c/{cluster}/state"))
            .bearer_auth(token)
            .send();
        async move {
            let state: Value = request
                .await
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            match state["drones"].as_array().map(Vec::len) {
                Some(1) => Ok(()),
                other => Err(format!("drones: {other:?}")),
            }
        }
    })
    .await;

    let config = scratch.join("schemathesis.toml");
    std::fs::write(&config, SCHEMATHESIS_CONFIG).expect("config");
    let report_dir = scratch.join("report");
    let examples = std::env::var("PLANE_TEST_SCHEMATHESIS_EXAMPLES").unwrap_or("40".into());
    let run = tokio::process::Command::new(schemathesis())
        .current_dir(&scratch)
        .arg("--config-file")
        .arg(&config)
        .args(["run", &format!("{base}/pub/openapi.json")])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--checks", "all", "--max-examples", &examples])
        // One worker: concurrent workers trip a CPython 3.11 bug (`AST constructor recursion
        // depth mismatch`) in schemathesis's own code.
        .args(["--workers", "1", "--request-timeout", "10", "--no-color"])
        .args(["--generation-database", "none", "--report", "junit,har"])
        // It never ends (an overview after every change, for as long as the client reads);
        // its first event is checked below instead.
        .args(["--exclude-operation-id", "overview_stream"])
        .arg("--report-dir")
        .arg(&report_dir)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(15 * 60), run)
        .await
        .expect("schemathesis finished within 15 minutes")
        .expect("schemathesis ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found problems (report, controller and drone logs kept in {}):\n{stdout}\n{}",
        scratch.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    // It ran every operation of the document but the one left out.
    let document: Value = client
        .get(format!("{base}/pub/openapi.json"))
        .send()
        .await
        .expect("document")
        .json()
        .await
        .expect("JSON");
    // Schemathesis counts `/ctrl/ui` and `/ctrl/ui/` as one operation.
    let operations = document["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            let path = path.trim_end_matches('/').to_string();
            let methods = item.as_object().expect("path item").keys().cloned();
            methods.map(move |method| (method, path.clone()))
        })
        .collect::<BTreeSet<_>>()
        .len();
    let tested = stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix("Tested: "))
        .unwrap_or_default()
        .to_string();
    assert_eq!(tested, (operations - 1).to_string(), "{stdout}");

    // The stream left out above: its first event is an `Overview`.
    let mut stream = client
        .get(format!("{base}/ctrl/overview-stream"))
        .bearer_auth(token)
        .send()
        .await
        .expect("overview stream");
    assert_eq!(stream.status().as_u16(), 200);
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.chunk())
            .await
            .expect("an event within 10 s")
            .expect("readable")
            .expect("not ended");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let data = text
        .lines()
        .find_map(|line| line.strip_prefix("data:"))
        .expect("a data line");
    let overview: plane_protocol::api::Overview =
        serde_json::from_str(data.trim()).expect("an Overview");
    assert_eq!(overview.clusters.len(), 1, "{overview:?}");
    let _ = std::fs::remove_dir_all(&scratch);
}
