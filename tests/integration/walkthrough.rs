//! The README walkthrough, with the real `plane` binary: `plane dev`, `plane connect`,
//! traffic through the proxy, the backend reaped when idle, and a clean Ctrl-C.

use crate::harness::{plane_binary, wait_for, PlaneDev};
use std::path::PathBuf;
use std::time::Duration;
use tokio::process::Command;

#[tokio::test]
async fn readme_walkthrough_works_with_the_real_binary() {
    let result = tokio::time::timeout(Duration::from_secs(180), walkthrough()).await;
    result.expect("walkthrough finished within 180 s");
}

async fn walkthrough() {
    let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("scratch/walkthrough");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let plane = plane_binary();

    let mut dev = PlaneDev::start(
        &scratch,
        &[
            "--controller-port",
            "0",
            "--proxy-port",
            "0",
            "--stop-grace-period-seconds",
            "2",
        ],
    )
    .await;
    let field = |name: &str| dev.field(name);
    let controller = field("controller");
    let proxy = field("proxy");
    let cluster = field("cluster");

    let connect = |tag: &'static str| {
        let plane = plane.clone();
        let controller = controller.clone();
        async move {
            Command::new(&plane)
                .args([
                    "connect",
                    "--controller",
                    &controller,
                    "--key",
                    "my-first-key",
                    "--tag",
                    tag,
                ])
                .args(["--image", "plane/demo:latest", "--max-idle-seconds", "2"])
                .output()
                .await
                .expect("run plane connect")
        }
    };
    let first = connect("").await;
    let out = String::from_utf8_lossy(&first.stdout).to_string();
    assert!(
        first.status.success(),
        "plane connect failed: {out}{}",
        String::from_utf8_lossy(&first.stderr)
    );
    for expected in ["(new)", "s] loading", "s] ready", "ready: open "] {
        assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
    }
    let url = out
        .lines()
        .find_map(|line| line.strip_prefix("url:"))
        .expect("a url line")
        .trim()
        .to_string();
    let backend = out
        .lines()
        .find_map(|line| line.strip_prefix("backend:"))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("a backend line")
        .to_string();

    // The same key again: the same backend. Another tag: refused.
    let second = connect("").await;
    let out2 = String::from_utf8_lossy(&second.stdout);
    assert!(
        out2.contains(&backend) && out2.contains("(already running)"),
        "{out2}"
    );
    let other_tag = connect("v2").await;
    assert!(!other_tag.status.success());
    assert!(String::from_utf8_lossy(&other_tag.stderr).contains("KeyHeld"));

    // The URL names cluster localhost:<port>; reach the proxy by its loopback address.
    let token_path = url
        .split_once("localhost:")
        .map(|(_, rest)| rest)
        .and_then(|rest| rest.split_once('/'))
        .map(|(_, path)| path)
        .expect("token path");
    let client = reqwest::Client::new();
    let page = client
        .get(format!("{proxy}/{token_path}"))
        .send()
        .await
        .expect("proxy")
        .text()
        .await
        .expect("page");
    assert!(
        page.contains("Hello from a Plane backend") && page.contains(&backend),
        "{page}"
    );
    let echo: serde_json::Value = client
        .get(format!("{proxy}/{token_path}anything?x=1"))
        .send()
        .await
        .expect("proxy")
        .json()
        .await
        .expect("echo");
    assert_eq!(echo["query"], "x=1");
    assert_eq!(echo["headers"]["x-verified-backend"], backend.as_str());

    // Idle for 2 s: reaped.
    let status_url = format!(
        "{}/pub/b/{backend}/status",
        controller.trim_end_matches('/')
    );
    wait_for(
        "the idle backend to be swept",
        Duration::from_secs(30),
        || async {
            let status: serde_json::Value = client
                .get(&status_url)
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            if status["status"] == "terminated" && status["termination_reason"] == "swept" {
                Ok(())
            } else {
                Err(status.to_string())
            }
        },
    )
    .await;

    // A backend still running when plane dev stops is stopped with it.
    let third = connect("").await;
    assert!(third.status.success());
    let exit = dev.stop().await;
    assert!(exit.success(), "plane dev exit status {exit:?}");
    let docker = bollard::Docker::connect_with_local_defaults().expect("docker");
    let leftovers = docker
        .list_containers(Some(bollard::container::ListContainersOptions::<String> {
            all: true,
            filters: [("label".to_string(), vec!["dev.plane.backend".to_string()])].into(),
            ..Default::default()
        }))
        .await
        .expect("list containers");
    let ours: Vec<_> = leftovers
        .iter()
        .filter(|c| {
            c.labels
                .as_ref()
                .and_then(|labels| labels.get("dev.plane.cluster"))
                .is_some_and(|label| *label == cluster)
        })
        .collect();
    assert!(
        ours.is_empty(),
        "containers left after plane dev stopped: {ours:?}"
    );
    // The drone's fence learns of the clean stop and exits too.
    let data_dir = scratch.join("data").display().to_string();
    wait_for(
        "the drone's fence to exit",
        Duration::from_secs(10),
        || async {
            let fences = processes_mentioning("drone-fence")
                .into_iter()
                .filter(|cmdline| cmdline.contains(&data_dir))
                .collect::<Vec<_>>();
            if fences.is_empty() {
                Ok(())
            } else {
                Err(format!("{fences:?}"))
            }
        },
    )
    .await;
    let _ = std::fs::remove_dir_all(&scratch);
}

/// The command lines (arguments joined by spaces) of running processes that mention `word`.
fn processes_mentioning(word: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .filter_map(|entry| std::fs::read(entry.ok()?.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(word))
        .collect()
}
