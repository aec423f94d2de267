//! Auth: bearer tokens on `/ctrl/*` (`--ctrl-token`, `--ctrl-token-file`, reloaded on SIGHUP),
//! `/pub/*` open, the cluster secret nodes must present, and controller URLs that carry a
//! token in their user-info, as Plane's tools write them.

use crate::db_test;
use crate::harness::{plane_binary, wait_for, TestEnv, BACKEND_WAIT};
use plane::controller::ControllerHandle;
use plane_protocol::api::ClusterState;
use plane_protocol::auth::CLUSTER_SECRET_HEADER;
use plane_protocol::names::ClusterName;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const TOKEN: &str = "tok-fixed";
const FILE_TOKEN: &str = "tok-from-file";
const SECRET: &str = "cluster-s3cret";

/// A controller with auth on, for a cluster of its own, on this test's database (its own
/// SQLite file; on PostgreSQL, the test's database, which controllers share).
async fn auth_controller(
    env: &TestEnv,
    cluster: &ClusterName,
) -> (ControllerHandle, std::path::PathBuf) {
    let token_file = env.scratch.join("ctrl-tokens");
    std::fs::write(&token_file, format!("# operators\n{FILE_TOKEN}\n\n")).expect("token file");
    let sqlite = env.scratch.join("auth.db").display().to_string();
    let controller = env
        .start_controller_with(|config| {
            if env.db() == crate::harness::Db::Sqlite {
                config.db = sqlite;
            }
            config.default_cluster = Some(cluster.clone());
            config.ctrl_tokens = vec![TOKEN.to_string()];
            config.ctrl_token_file = Some(token_file.clone());
            config.cluster_secret = Some(SECRET.to_string());
        })
        .await;
    (controller, token_file)
}

/// GETs `path` with an optional bearer token; returns the status and the JSON body.
async fn get(
    env: &TestEnv,
    base: &url::Url,
    path: &str,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = env.client.get(base.join(path).expect("url"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("controller reachable");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn with_user_info(url: &url::Url, token: &str) -> url::Url {
    let mut url = url.clone();
    url.set_username(token).expect("a URL that takes user-info");
    url
}

/// Opens a node socket with the given headers; returns the HTTP status of the refusal, or
/// `None` if the socket opened.
async fn open_socket(url: &str, headers: &[(&'static str, &str)]) -> Option<u16> {
    let mut request = url.into_client_request().expect("request");
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(*name, value.parse().expect("header value"));
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => None,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Some(response.status().as_u16())
        }
        Err(other) => panic!("unexpected socket error: {other}"),
    }
}

db_test!(
    ctrl_tokens_guard_the_control_api_and_pub_stays_open,
    |env: TestEnv| async move {
        let cluster: ClusterName = "auth.test:1".parse().expect("cluster");
        let (controller, token_file) = auth_controller(&env, &cluster).await;
        let base = controller.url();

        let (status, error) = get(&env, &base, "/ctrl/status", None).await;
        assert_eq!(status, 401, "{error}");
        assert_eq!(error["kind"], "Other");
        assert!(
            error["message"]
                .as_str()
                .unwrap_or_default()
                .contains("Authorization"),
            "{error}"
        );
        let (status, error) = get(&env, &base, "/ctrl/status", Some("guess")).await;
        assert_eq!(status, 401);
        assert!(
            error["message"]
                .as_str()
                .unwrap_or_default()
                .contains("not one"),
            "{error}"
        );
        let raw = env
            .client
            .get(base.join("/ctrl/status").expect("url"))
            .send()
            .await
            .expect("reachable");
        assert_eq!(raw.headers()["www-authenticate"], "Bearer");
        assert_eq!(get(&env, &base, "/ctrl/status", Some(TOKEN)).await.0, 200);
        assert_eq!(
            get(&env, &base, "/ctrl/status", Some(FILE_TOKEN)).await.0,
            200
        );
        // Writes are refused before they do anything.
        let refused = env
            .client
            .post(base.join("/ctrl/connect").expect("url"))
            .json(&json!({ "key": { "name": "k" } }))
            .send()
            .await
            .expect("reachable");
        assert_eq!(refused.status(), 401);
        // The public half stays open.
        assert_eq!(get(&env, &base, "/pub/health", None).await.0, 200);

        // Plane 0.5's client puts the token in the URL's user-info.
        let plane = plane_common::PlaneClient::new(with_user_info(&base, TOKEN));
        plane
            .status()
            .await
            .expect("Plane's client with a token in its URL");
        match plane_common::PlaneClient::new(base.clone()).status().await {
            Err(plane_common::PlaneClientError::PlaneError(_, status)) => assert_eq!(status, 401),
            other => panic!("expected a 401 Plane's client can read, got {other:?}"),
        }

        // The file is re-read on reload (SIGHUP in `plane controller`); a bad file keeps
        // the tokens in force.
        std::fs::write(&token_file, "tok-rotated\n").expect("rotate");
        assert_eq!(controller.reload_ctrl_tokens().expect("reload"), 2);
        assert_eq!(
            get(&env, &base, "/ctrl/status", Some(FILE_TOKEN)).await.0,
            401
        );
        assert_eq!(
            get(&env, &base, "/ctrl/status", Some("tok-rotated"))
                .await
                .0,
            200
        );
        std::fs::remove_file(&token_file).expect("remove");
        assert!(controller.reload_ctrl_tokens().is_err());
        assert_eq!(
            get(&env, &base, "/ctrl/status", Some("tok-rotated"))
                .await
                .0,
            200
        );
        controller.shutdown().await;
        env
    }
);

db_test!(
    nodes_need_the_cluster_secret_and_reach_the_controller_through_user_info_urls,
    |env: TestEnv| async move {
        let proxy_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let cluster: ClusterName = format!(
            "127.0.0.1:{}",
            proxy_listener.local_addr().expect("addr").port()
        )
        .parse()
        .expect("cluster");
        let (controller, _) = auth_controller(&env, &cluster).await;
        let base = controller.url();

        // Without the secret (or with a wrong one) a node is refused before its socket opens.
        let socket = format!(
            "ws://{}/ctrl/c/{cluster}/drone-socket",
            controller.local_addr()
        );
        let bearer = format!("Bearer {TOKEN}");
        assert_eq!(
            open_socket(&socket, &[("authorization", &bearer)]).await,
            Some(401)
        );
        assert_eq!(
            open_socket(
                &socket,
                &[("authorization", &bearer), (CLUSTER_SECRET_HEADER, "wrong")]
            )
            .await,
            Some(401)
        );
        assert_eq!(
            open_socket(&socket, &[(CLUSTER_SECRET_HEADER, SECRET)]).await,
            Some(401)
        );

        // A real drone and proxy with the secret, and the token in their controller URL.
        let authed = with_user_info(&base, TOKEN);
        let mut drone_config = env.drone_config("dr-auth");
        drone_config.controller_url = authed.clone();
        drone_config.cluster = cluster.clone();
        drone_config.cluster_secret = Some(SECRET.to_string());
        let drone = plane_drone::start(drone_config).await.expect("start drone");
        let mut proxy_config =
            plane_proxy::config::ProxyConfig::new(authed.clone(), cluster.clone());
        proxy_config.cluster_secret = Some(SECRET.to_string());
        let proxy = plane_proxy::start(proxy_config, proxy_listener)
            .await
            .expect("start proxy");
        wait_for("the drone and proxy to join", BACKEND_WAIT, || async {
            let (_, state) = get(
                &env,
                &base,
                &format!("/ctrl/c/{cluster}/state"),
                Some(TOKEN),
            )
            .await;
            let state: ClusterState =
                serde_json::from_value(state.clone()).map_err(|e| e.to_string())?;
            let joined = state.drones.iter().any(|d| d.node.connected)
                && state.proxies.iter().any(|p| p.connected);
            joined.then_some(()).ok_or(format!("{state:?}"))
        })
        .await;

        // And the whole path works with auth on: connect, ready, a request through the proxy.
        let plane = plane_common::PlaneClient::new(authed);
        let request: plane_common::types::ConnectRequest = serde_json::from_value(json!({
            "key": { "name": "authed" },
            "spawn_config": { "executable": { "image": crate::harness::test_image() } },
        }))
        .expect("a Plane connect request");
        let response = plane.connect(&request).await.expect("connect with a token");
        let mut stream = plane
            .backend_status_stream(&response.backend_id)
            .await
            .expect("status stream");
        tokio::time::timeout(BACKEND_WAIT, async {
            while let Some(entry) = stream.next().await {
                if entry.status == plane_common::types::BackendStatus::Ready {
                    return;
                }
            }
        })
        .await
        .expect("ready");
        let code = env
            .client
            .get(format!("http://{}/{}/", proxy.local_addr(), response.token))
            .send()
            .await
            .expect("proxy reachable")
            .status();
        assert_eq!(code, 200);
        plane
            .hard_terminate(&response.backend_id)
            .await
            .expect("terminate");
        proxy.shutdown().await;
        drone.shutdown().await;
        controller.shutdown().await;
        env
    }
);

/// SIGHUP makes a running `plane controller` re-read its token file.
#[tokio::test(flavor = "current_thread")]
async fn sighup_reloads_the_token_file_of_a_running_controller() {
    let scratch = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("scratch")
        .join(format!("sighup-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch");
    let token_file = scratch.join("tokens");
    std::fs::write(&token_file, "tok-before\n").expect("token file");
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        probe.local_addr().expect("addr").port()
    };
    let log = std::fs::File::create(scratch.join("controller.log")).expect("log");
    let mut child = tokio::process::Command::new(plane_binary())
        .args([
            "controller",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--db",
        ])
        .arg(scratch.join("plane.db"))
        .arg("--ctrl-token-file")
        .arg(&token_file)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start plane controller");
    let client = reqwest::Client::new();
    let status_with = |token: &'static str| {
        let client = client.clone();
        async move {
            client
                .get(format!("http://127.0.0.1:{port}/ctrl/status"))
                .bearer_auth(token)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .map_err(|e| e.to_string())
        }
    };
    let first = wait_for("the controller to answer", Duration::from_secs(30), || {
        status_with("tok-before")
    })
    .await;
    assert_eq!(first, 200);

    std::fs::write(&token_file, "tok-after\n").expect("rotate");
    let pid = child.id().expect("pid").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill -HUP");
    assert!(sent.success());
    wait_for(
        "the new token accepted",
        Duration::from_secs(10),
        || async {
            match status_with("tok-after").await? {
                200 => Ok(()),
                other => Err(format!("{other}")),
            }
        },
    )
    .await;
    assert_eq!(status_with("tok-before").await.expect("answer"), 401);
    child.start_kill().expect("stop");
    let _ = child.wait().await;
}
