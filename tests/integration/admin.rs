//! `plane admin` and `plane connect`, the real binary against a real controller, drone and
//! proxy: every command, its `--json` output read back into the API's own types, its text
//! output, and its errors.

use crate::harness::{plane_binary, run_test, test_image, wait_for, Db, TestEnv, BACKEND_WAIT};
use plane_protocol::api::{
    BackendDetails, ClusterState, ConnectResponse, ControllerStatus, DrainResult, RevokeRequest,
};
use plane_protocol::backend::{BackendStatus, BackendStatusStreamEntry, TerminationKind};
use serde::de::DeserializeOwned;
use std::process::Stdio;
use std::time::Duration;

/// What one run of the CLI printed and how it ended.
pub(crate) struct Run {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Each stdout line as JSON of type `T`.
    fn lines<T: DeserializeOwned>(&self) -> Vec<T> {
        self.stdout
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|err| panic!("{line:?} is not the JSON expected: {err}"))
            })
            .collect()
    }

    /// The only stdout line, as JSON of type `T`.
    fn one<T: DeserializeOwned>(&self) -> T {
        let mut lines = self.lines::<T>();
        assert_eq!(lines.len(), 1, "one line expected: {}", self.stdout);
        lines.remove(0)
    }

    pub(crate) fn succeeded(self) -> Self {
        assert!(
            self.success,
            "exit {:?}\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    fn failed(self) -> Self {
        assert!(
            !self.success,
            "expected a failure\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Runs `plane <args>` (with `--controller` set to `controller`), under a hard timeout.
pub(crate) async fn plane(controller: &str, args: &[&str]) -> Run {
    let mut command = tokio::process::Command::new(plane_binary());
    command
        .args(args)
        .env("PLANE_CONTROLLER_URL", controller)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .unwrap_or_else(|_| panic!("plane {args:?} finished within 60 s"))
        .expect("run plane");
    Run {
        success: output.status.success(),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `plane admin --json <args>` against the test's controller.
async fn admin_json(env: &TestEnv, args: &[&str]) -> Run {
    let mut all = vec!["admin", "--json"];
    all.extend_from_slice(args);
    plane(env.controller().url().as_str(), &all).await
}

/// On SQLite only: the CLI goes through the same API as every other test, which runs on both
/// databases.
#[tokio::test(flavor = "current_thread")]
async fn every_admin_command_works_with_json_output() {
    run_test(
        "every_admin_command_works_with_json_output",
        Db::Sqlite,
        |env: TestEnv| async move {
            let cluster = env.cluster.to_string();
            let drone = env.drone.name().to_string();

            let status: ControllerStatus = admin_json(&env, &["status"]).await.succeeded().one();
            assert_eq!(status.status, "ok");
            assert_eq!(status.database.as_deref(), Some("sqlite"));

            // connect: the answer, then each status until ready.
            let run = admin_json(
                &env,
                &[
                    "connect",
                    "--key",
                    "doc-1",
                    "--image",
                    test_image(),
                    "--pull-policy",
                    "Never",
                    "--user",
                    "alice",
                    "--env",
                    "GREETING=hi",
                ],
            )
            .await
            .succeeded();
            let (first, rest) = run.stdout.split_once('\n').expect("several lines");
            let connected: ConnectResponse = serde_json::from_str(first).expect("a response");
            assert!(connected.spawned);
            let entries: Vec<BackendStatusStreamEntry> = rest
                .lines()
                .map(|line| serde_json::from_str(line).expect("a status entry"))
                .collect();
            assert_eq!(
                entries.last().map(|e| e.status),
                Some(BackendStatus::Ready),
                "{}",
                run.stdout
            );
            let backend = connected.backend_id.to_string();
            let (code, _) = env.get_via_proxy(connected.token.as_str(), "/").await;
            assert_eq!(code, 200);

            // `plane connect` is the short form; --no-follow prints only the answer.
            let joined: ConnectResponse = plane(
                env.controller().url().as_str(),
                &["connect", "--json", "--key", "doc-1", "--no-follow"],
            )
            .await
            .succeeded()
            .one();
            assert_eq!(joined.backend_id, connected.backend_id);
            assert!(!joined.spawned);

            let entry: BackendStatusStreamEntry = admin_json(&env, &["status", &backend])
                .await
                .succeeded()
                .one();
            assert_eq!(entry.status, BackendStatus::Ready);

            // backend: the key, the drone and the history up to ready.
            let details: BackendDetails = admin_json(&env, &["backend", &backend])
                .await
                .succeeded()
                .one();
            assert_eq!(details.backend.backend_id, connected.backend_id);
            assert_eq!(
                details.backend.key.as_ref().map(|k| k.name.as_str()),
                Some("doc-1")
            );
            assert_eq!(details.backend.drone.as_str(), drone);
            let history: Vec<BackendStatus> = details.history.iter().map(|e| e.status).collect();
            assert_eq!(
                history.first(),
                Some(&BackendStatus::Scheduled),
                "{history:?}"
            );
            assert_eq!(history.last(), Some(&BackendStatus::Ready), "{history:?}");
            let text = plane(
                env.controller().url().as_str(),
                &["admin", "backend", &backend],
            )
            .await
            .succeeded();
            assert!(
                text.stdout.contains("key      doc-1") && text.stdout.contains("scheduled"),
                "{}",
                text.stdout
            );

            let state: ClusterState = admin_json(&env, &["cluster-state", "--cluster", &cluster])
                .await
                .succeeded()
                .one();
            let ours = state
                .drones
                .iter()
                .find(|d| d.node.name.name().as_str() == drone)
                .expect("the drone is listed");
            assert_eq!(ours.backend_count, 1);
            assert_eq!(state.proxies.len(), 1);

            // drain and undrain say whether they changed anything.
            for (verb, updated) in [
                ("drain", true),
                ("drain", false),
                ("undrain", true),
                ("undrain", false),
            ] {
                let result: DrainResult = admin_json(&env, &[verb, "--cluster", &cluster, &drone])
                    .await
                    .succeeded()
                    .one();
                assert_eq!(result.updated, updated, "{verb}");
            }

            // revoke: alice's token stops working at the proxy.
            let revoked: RevokeRequest = admin_json(&env, &["revoke", &backend, "--user", "alice"])
                .await
                .succeeded()
                .one();
            assert_eq!(revoked.backend_id, connected.backend_id);
            wait_for(
                "the revoked token refused",
                Duration::from_secs(5),
                || async {
                    match env.get_via_proxy(connected.token.as_str(), "/").await {
                        (200, body) => Err(format!("still served: {body}")),
                        _ => Ok(()),
                    }
                },
            )
            .await;

            // status --follow runs until terminated; a soft terminate ends it. (The stream
            // replays the history first, so it ends the same whenever it connects.)
            let follow = {
                let url = env.controller().url().to_string();
                let backend = backend.clone();
                tokio::spawn(async move {
                    plane(&url, &["admin", "--json", "status", &backend, "--follow"]).await
                })
            };
            let ack: serde_json::Value = admin_json(&env, &["terminate", &backend])
                .await
                .succeeded()
                .one();
            assert_eq!(ack["backend_id"], backend);
            assert_eq!(ack["kind"], "soft");
            let followed = tokio::time::timeout(BACKEND_WAIT, follow)
                .await
                .expect("the follower ends when the backend terminates")
                .expect("follower task")
                .succeeded();
            let statuses: Vec<BackendStatus> = followed
                .lines::<BackendStatusStreamEntry>()
                .iter()
                .map(|e| e.status)
                .collect();
            assert_eq!(statuses.last(), Some(&BackendStatus::Terminated));
            assert!(
                statuses.windows(2).all(|w| w[0].number() < w[1].number()),
                "each status once, in order: {statuses:?}"
            );

            // spawn, then terminate --hard --wait.
            let spawned: ConnectResponse = admin_json(
                &env,
                &[
                    "spawn",
                    "--image",
                    test_image(),
                    "--pull-policy",
                    "Never",
                    "--no-follow",
                ],
            )
            .await
            .succeeded()
            .one();
            assert!(spawned.spawned);
            let spawned_id = spawned.backend_id.to_string();
            let run = admin_json(&env, &["terminate", &spawned_id, "--hard", "--wait"])
                .await
                .succeeded();
            let (ack, entries) = run.stdout.split_once('\n').expect("ack and entries");
            assert!(ack.contains("\"hard\""), "{ack}");
            let last: BackendStatusStreamEntry =
                serde_json::from_str(entries.lines().last().expect("an entry"))
                    .expect("a status entry");
            assert_eq!(last.status, BackendStatus::Terminated);
            assert_eq!(last.termination_kind, Some(TerminationKind::Hard));
            env
        },
    )
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn admin_errors_name_what_was_wrong() {
    run_test(
        "admin_errors_name_what_was_wrong",
        Db::Sqlite,
        |env: TestEnv| async move {
            let cluster = env.cluster.to_string();

            let run = admin_json(&env, &["status", "ba-doesnotexist"])
                .await
                .failed();
            assert!(run.stderr.contains("404"), "{}", run.stderr);
            assert!(run.stderr.contains("NotFound"), "{}", run.stderr);

            let run = admin_json(&env, &["drain", "--cluster", &cluster, "dr-nosuch"])
                .await
                .failed();
            assert!(run.stderr.contains("dr-nosuch"), "{}", run.stderr);

            // A key-only connect with nothing running: the controller's 409, said plainly.
            let run = admin_json(&env, &["connect", "--key", "nobody-home"])
                .await
                .failed();
            assert!(
                run.stderr.contains("KeyUnheldNoSpawnConfig"),
                "{}",
                run.stderr
            );

            // A bad flag value is refused before anything is sent, naming the flag.
            let run = admin_json(&env, &["cluster-state", "--cluster", "not a cluster"])
                .await
                .failed();
            assert_eq!(run.code, Some(2));
            assert!(run.stderr.contains("--cluster"), "{}", run.stderr);

            let run = plane("http://127.0.0.1:1", &["admin", "status"])
                .await
                .failed();
            assert!(run.stderr.contains("cannot reach"), "{}", run.stderr);

            // A backend that cannot start: connect follows it to the end and fails.
            let run = admin_json(
                &env,
                &[
                    "connect",
                    "--key",
                    "missing-image",
                    "--image",
                    "plane-test/does-not-exist:1",
                    "--pull-policy",
                    "Never",
                ],
            )
            .await
            .failed();
            assert!(
                run.stderr.contains("terminated before it was ready"),
                "{}",
                run.stderr
            );
            env
        },
    )
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn admin_text_output_and_user_info_tokens() {
    run_test(
        "admin_text_output_and_user_info_tokens",
        Db::Sqlite,
        |env: TestEnv| async move {
            let cluster = env.cluster.to_string();
            let url = env.controller().url().to_string();

            let run = plane(&url, &["admin", "cluster-state", "--cluster", &cluster])
                .await
                .succeeded();
            assert!(run.stdout.contains("DRONE"), "{}", run.stdout);
            assert!(
                run.stdout.contains(env.drone.name().as_str()),
                "{}",
                run.stdout
            );
            let run = plane(&url, &["admin", "status"]).await.succeeded();
            assert!(run.stdout.contains("ok"), "{}", run.stdout);

            // A controller with auth on: the token rides in the URL's user-info.
            let guarded = env
                .start_controller_with(|config| {
                    config.db = env.scratch.join("guarded.db").display().to_string();
                    config.ctrl_tokens = vec!["tok-admin".to_string()];
                })
                .await;
            let bare = guarded.url();
            let run = plane(bare.as_str(), &["admin", "status"]).await.failed();
            assert!(run.stderr.contains("401"), "{}", run.stderr);
            let mut with_token = bare.clone();
            with_token.set_username("tok-admin").expect("user-info");
            let run = plane(with_token.as_str(), &["admin", "--json", "status"])
                .await
                .succeeded();
            let status: ControllerStatus = run.one();
            assert_eq!(status.status, "ok");
            guarded.shutdown().await;
            env
        },
    )
    .await;
}
