//! `plane dev --https` with the real binary: a local CA in the data directory, the cluster
//! named by its HTTPS port, connect answering `https://` URLs, and a client that trusts only
//! that CA reaching the backend through them.

use crate::harness::{plane_binary, PlaneDev};
use std::path::PathBuf;
use std::time::Duration;
use tokio::process::Command;

#[tokio::test]
async fn plane_dev_https_serves_its_cluster_over_https_with_a_local_ca() {
    tokio::time::timeout(Duration::from_secs(180), dev_https())
        .await
        .expect("finished within 180 s");
}

async fn dev_https() {
    let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("scratch/dev-https");
    let plane = plane_binary();
    let (mut dev, ca) = PlaneDev::start_https(&scratch).await;
    let controller = dev.field("controller");

    let connect = Command::new(&plane)
        .args(["admin", "--json", "--controller", &controller, "connect"])
        .args([
            "--key",
            "tls-dev",
            "--image",
            "plane/demo:latest",
            "--no-follow",
        ])
        .output()
        .await
        .expect("plane admin connect");
    assert!(
        connect.status.success(),
        "{}",
        String::from_utf8_lossy(&connect.stderr)
    );
    let answer: serde_json::Value =
        serde_json::from_slice(&connect.stdout).expect("a connect answer");
    let url = answer["url"].as_str().expect("url").to_string();
    assert!(url.starts_with("https://localhost:"), "{url}");

    let client = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&ca).expect("read CA")).expect("CA"),
        )
        .build()
        .expect("client");
    // Held at the proxy until the backend is ready.
    let page = client.get(&url).send().await.expect("https request");
    assert_eq!(page.status().as_u16(), 200, "{url}");

    let status = dev.stop().await;
    assert!(status.success(), "plane dev exit: {status}");
}
