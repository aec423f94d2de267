//! Backend logs through `GET /ctrl/b/:backend/logs`, relayed from the drone: complete and in
//! order for a backend that prints 10,000 lines, followed live until the backend exits, kept
//! after it ends for the drone's `--log-retention-seconds` and not after, bounded on disk by
//! `--log-max-bytes`, and readable with `plane admin logs`.

use crate::admin::plane;
use crate::harness::{containers_of, run_test, wait_for, Db, TestEnv, BACKEND_WAIT};
use futures_util::StreamExt;
use plane_client::ClientError;
use plane_drone::DroneHandle;
use plane_protocol::api::{BackendLogLine, ConnectResponse, LogStream};
use plane_protocol::backend::TerminationKind;
use plane_protocol::names::BackendName;

/// A drone keeping logs `retention_seconds` (at most `max_bytes` each), which takes every
/// backend while the in-process one (which keeps none) is drained.
async fn logging_drone(env: &TestEnv, retention_seconds: u64, max_bytes: u64) -> DroneHandle {
    let mut config = env.drone_config("dr-logs");
    config.log_retention_seconds = retention_seconds;
    config.log_max_bytes = max_bytes;
    let drone = env.start_drone(config).await;
    env.set_draining(env.drone.name(), true).await;
    drone
}

async fn print(env: &TestEnv, backend: &ConnectResponse, count: u64, stream: &str) {
    let url = env.proxy_url(&format!("/{}/print/{count}?stream={stream}", backend.token));
    let answer = env.client.post(url).send().await.expect("proxy reachable");
    assert_eq!(answer.status().as_u16(), 200, "{:?}", answer.text().await);
}

async fn logs(
    env: &TestEnv,
    backend: &BackendName,
    tail: Option<u64>,
) -> Result<Vec<BackendLogLine>, ClientError> {
    let mut stream = env.api().plane.backend_logs(backend, false, tail).await?;
    let mut lines = Vec::new();
    while let Some(line) = stream.next().await {
        lines.push(line.expect("a log line"));
    }
    Ok(lines)
}

/// The whole log once it holds every line of `wanted`: the engine's copiers write what a
/// backend printed a little after it was printed (later still on a loaded machine), one
/// copier per stream.
async fn until_logged(
    env: &TestEnv,
    backend: &BackendName,
    wanted: &[&str],
) -> Vec<BackendLogLine> {
    let what = format!("the logs to hold {wanted:?}");
    wait_for(&what, BACKEND_WAIT, || async {
        let lines = logs(env, backend, None)
            .await
            .map_err(|err| err.to_string())?;
        let held = |text: &&str| lines.iter().any(|line| line.text == *text);
        if wanted.iter().all(held) {
            Ok(lines)
        } else {
            Err(format!(
                "{} lines, the last {:?}",
                lines.len(),
                lines.last()
            ))
        }
    })
    .await
}

/// What a followed stream still sends; it must end (with the backend) within the wait.
async fn rest_of(
    followed: impl futures_util::Stream<Item = Result<BackendLogLine, ClientError>>,
) -> Vec<BackendLogLine> {
    let rest = tokio::time::timeout(BACKEND_WAIT, followed.collect::<Vec<_>>())
        .await
        .expect("the followed stream ends with the backend");
    rest.into_iter()
        .map(|line| line.expect("a log line"))
        .collect()
}

fn texts(lines: &[BackendLogLine], stream: LogStream) -> Vec<String> {
    lines
        .iter()
        .filter(|line| line.stream == stream)
        .map(|line| line.text.clone())
        .collect()
}

fn numbered(range: std::ops::RangeInclusive<u64>, count: u64) -> Vec<String> {
    range.map(|i| format!("line {i} of {count}")).collect()
}

/// The stopped containers the test's drone kept would otherwise outlive the test by their
/// retention.
async fn remove_container(backend: &BackendName) {
    let docker = bollard::Docker::connect_with_local_defaults().expect("connect to Docker");
    for id in containers_of(backend).await {
        let options = bollard::container::RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        let _ = docker.remove_container(&id, Some(options)).await;
    }
}

/// On SQLite only: logs come from the drone, never from the database.
#[tokio::test(flavor = "current_thread")]
async fn ten_thousand_lines_arrive_complete_in_order_live_and_after_the_end() {
    run_test(
        "ten_thousand_lines_arrive_complete_in_order_live_and_after_the_end",
        Db::Sqlite,
        |env: TestEnv| async move {
            let _drone = logging_drone(&env, 3_600, 16 << 20).await;
            let backend = env.connect_ready("printer", &env.spawn_config(&[])).await;
            let id = backend.backend_id.clone();

            // Followed from now on (nothing before: tail 0), while the backend prints.
            let mut followed = env
                .api()
                .plane
                .backend_logs(&id, true, Some(0))
                .await
                .expect("followed logs");
            print(&env, &backend, 10_000, "stdout").await;
            print(&env, &backend, 3, "stderr").await;

            let lines = until_logged(&env, &id, &["line 10000 of 10000", "line 3 of 3"]).await;
            assert_eq!(
                texts(&lines, LogStream::Stdout),
                numbered(1..=10_000, 10_000)
            );
            let stderr = texts(&lines, LogStream::Stderr);
            assert!(
                stderr[0].starts_with("demo backend listening"),
                "{stderr:?}"
            );
            assert_eq!(stderr[1..], numbered(1..=3, 3));
            // Each stream's times never go back (across the two, the engine's copiers
            // stamp lines independently).
            for stream in [LogStream::Stdout, LogStream::Stderr] {
                let times: Vec<_> = lines
                    .iter()
                    .filter(|l| l.stream == stream)
                    .map(|l| l.time)
                    .collect();
                assert!(
                    times.windows(2).all(|pair| pair[0] <= pair[1]),
                    "{stream:?} times go back"
                );
            }

            // The engine orders lines across the two streams as its copiers write them, so
            // the last five are whatever the whole log ends with.
            let last = logs(&env, &id, Some(5)).await.expect("tail");
            assert_eq!(last, lines[lines.len() - 5..].to_vec());

            // The followed stream saw the same, live, and ends when the backend does.
            let mut live = Vec::new();
            while live.len() < 10_003 {
                let line = tokio::time::timeout(BACKEND_WAIT, followed.next())
                    .await
                    .expect("followed lines keep coming")
                    .expect("the stream goes on while the backend runs")
                    .expect("a log line");
                live.push(line);
            }
            assert_eq!(
                texts(&live, LogStream::Stdout),
                numbered(1..=10_000, 10_000)
            );
            assert_eq!(texts(&live, LogStream::Stderr), numbered(1..=3, 3));
            env.terminate(&id, TerminationKind::Soft).await;
            env.wait_terminated(&id).await;
            let rest = rest_of(followed).await;
            assert_eq!(
                texts(&rest, LogStream::Stderr),
                vec!["SIGTERM received; exiting".to_string()]
            );

            // Kept after the end, whole.
            let after = until_logged(&env, &id, &["SIGTERM received; exiting"]).await;
            assert_eq!(
                texts(&after, LogStream::Stdout),
                numbered(1..=10_000, 10_000)
            );

            // `plane admin logs`: JSON documents, and text split by stream.
            let controller = env.controller().url().to_string();
            let json = plane(
                &controller,
                &["admin", "--json", "logs", id.as_str(), "--tail", "2"],
            )
            .await
            .succeeded();
            let parsed: Vec<BackendLogLine> = json
                .stdout
                .lines()
                .map(|line| serde_json::from_str(line).expect("a JSON log line"))
                .collect();
            assert_eq!(parsed, after[after.len() - 2..].to_vec());
            let text = plane(&controller, &["admin", "logs", id.as_str(), "--tail", "5"])
                .await
                .succeeded();
            let of_stream = |stream| {
                let last_five = &after[after.len() - 5..];
                texts(last_five, stream)
                    .into_iter()
                    .map(|text| format!("{text}\n"))
                    .collect::<String>()
            };
            assert_eq!(text.stdout, of_stream(LogStream::Stdout));
            assert_eq!(text.stderr, of_stream(LogStream::Stderr));
            assert!(
                text.stderr.ends_with("SIGTERM received; exiting\n"),
                "{}",
                text.stderr
            );
            let stamped = plane(
                &controller,
                &["admin", "logs", id.as_str(), "--tail", "1", "-t"],
            )
            .await
            .succeeded();
            assert!(
                stamped.stderr.contains("Z SIGTERM received"),
                "{}",
                stamped.stderr
            );

            remove_container(&id).await;
            env
        },
    )
    .await;
}

/// On SQLite only, as above.
#[tokio::test(flavor = "current_thread")]
async fn logs_are_bounded_on_disk_and_gone_after_their_retention() {
    run_test(
        "logs_are_bounded_on_disk_and_gone_after_their_retention",
        Db::Sqlite,
        |env: TestEnv| async move {
            // The smallest bound the drone takes, far below what 10,000 lines need; and a
            // retention of two seconds.
            let _drone = logging_drone(&env, 2, 65_536).await;
            let backend = env.connect_ready("bounded", &env.spawn_config(&[])).await;
            let id = backend.backend_id.clone();
            print(&env, &backend, 10_000, "stdout").await;

            // The oldest lines went; what is kept ends with the newest, in order. (Not always
            // every line since the oldest kept: under load the engine's local driver was seen
            // to lose a few dozen lines where it rotated its files.)
            let lines = texts(
                &until_logged(&env, &id, &["line 10000 of 10000"]).await,
                LogStream::Stdout,
            );
            let numbers: Vec<u64> = lines
                .iter()
                .map(|text| {
                    let number = text
                        .strip_prefix("line ")
                        .and_then(|t| t.strip_suffix(" of 10000"));
                    number
                        .and_then(|n| n.parse().ok())
                        .unwrap_or_else(|| panic!("{text:?}"))
                })
                .collect();
            let kept = numbers.len();
            assert!((100..10_000).contains(&kept), "kept {kept} lines");
            assert_eq!(numbers.last(), Some(&10_000));
            assert!(numbers.windows(2).all(|pair| pair[0] < pair[1]), "in order");
            let span = 10_001 - numbers[0];
            assert!(
                span as usize - kept <= 200,
                "{kept} kept of the last {span}: more than a rotation's loss"
            );

            env.terminate(&id, TerminationKind::Hard).await;
            env.wait_terminated(&id).await;
            // Past the retention the drone removes the container, and the logs with it.
            let refused = wait_for("the logs to be dropped", BACKEND_WAIT, || async {
                match logs(&env, &id, None).await {
                    Err(err) if err.status() == Some(404) => Ok(err),
                    other => Err(format!("{other:?}")),
                }
            })
            .await;
            let message = &refused.api_error().expect("an API error").message;
            assert!(message.contains("--log-retention-seconds"), "{message}");
            assert!(containers_of(&id).await.is_empty());
            env
        },
    )
    .await;
}

/// On SQLite only, as above.
#[tokio::test(flavor = "current_thread")]
async fn log_requests_that_cannot_be_served_say_why() {
    run_test(
        "log_requests_that_cannot_be_served_say_why",
        Db::Sqlite,
        |env: TestEnv| async move {
            let drone = logging_drone(&env, 3_600, 16 << 20).await;
            let backend = env.connect_ready("errors", &env.spawn_config(&[])).await;
            let id = backend.backend_id.clone();
            for (query, named) in [
                ("follow=maybe", "follow"),
                ("tail=-3", "tail"),
                ("since=10m", "since"),
            ] {
                let (status, body) = env.get_json(&format!("/ctrl/b/{id}/logs?{query}")).await;
                assert_eq!(status, 400, "{query}: {body}");
                assert!(
                    body["message"].as_str().unwrap_or("").contains(named),
                    "{body}"
                );
            }
            let (status, body) = env
                .get_json(&format!("/ctrl/b/{}/logs", BackendName::new_random()))
                .await;
            assert_eq!(
                (status, body["kind"].as_str()),
                (404, Some("NotFound")),
                "{body}"
            );
            let (status, _) = env
                .get_json(&format!("/ctrl/c/other.example/b/{id}/logs"))
                .await;
            assert_eq!(status, 404);
            let (status, _) = env
                .get_json(&format!("/ctrl/c/{}/b/{id}/logs?tail=1", env.cluster))
                .await;
            assert_eq!(status, 200);

            // With its drone gone, nobody can read them: 503, naming the drone.
            let drone_name = drone.name().clone();
            drone.shutdown().await;
            let (status, body) = env.get_json(&format!("/ctrl/b/{id}/logs")).await;
            assert_eq!(status, 503, "{body}");
            let message = body["message"].as_str().unwrap_or("");
            assert!(message.contains(drone_name.as_str()), "{message}");
            remove_container(&id).await;
            env
        },
    )
    .await;
}

crate::postgres_test!(
    logs_of_a_drone_on_another_controller_come_through_that_one,
    |env: TestEnv| async move {
        let _drone = logging_drone(&env, 3_600, 16 << 20).await;
        let backend = env.connect_ready("elsewhere", &env.spawn_config(&[])).await;
        print(&env, &backend, 100, "stdout").await;
        until_logged(&env, &backend.backend_id, &["line 100 of 100"]).await;
        // The drone is connected to the first controller; read through the second.
        let other = env.start_controller().await;
        let mut followed = env
            .api_at(&other.url())
            .plane
            .backend_logs(&backend.backend_id, true, Some(100))
            .await
            .expect("logs through the other controller");
        let mut lines = Vec::new();
        while lines.len() < 100 {
            let line = tokio::time::timeout(BACKEND_WAIT, followed.next())
                .await
                .expect("lines come")
                .expect("the stream goes on")
                .expect("a log line");
            lines.push(line);
        }
        assert_eq!(texts(&lines, LogStream::Stdout), numbered(1..=100, 100));
        // Followed live through both controllers, to the end.
        print(&env, &backend, 2, "stderr").await;
        env.terminate(&backend.backend_id, TerminationKind::Soft)
            .await;
        let rest = rest_of(followed).await;
        assert_eq!(
            texts(&rest, LogStream::Stderr),
            [
                numbered(1..=2, 2),
                vec!["SIGTERM received; exiting".to_string()]
            ]
            .concat()
        );
        // An unknown backend is a 404 there as anywhere.
        let missing = env
            .api_at(&other.url())
            .plane
            .backend_logs(&BackendName::new_random(), false, None)
            .await
            .err()
            .and_then(|err| err.status());
        assert_eq!(missing, Some(404));
        other.shutdown().await;
        remove_container(&backend.backend_id).await;
        env
    }
);

/// On SQLite only, as above: the drone's own log, as an operator collects it.
#[tokio::test(flavor = "current_thread")]
async fn a_json_logging_drones_lines_about_a_backend_carry_its_id() {
    run_test(
        "a_json_logging_drones_lines_about_a_backend_carry_its_id",
        Db::Sqlite,
        |env: TestEnv| async move {
            let name: plane_protocol::names::NodeName =
                format!("json-{}", env.drone.name()).parse().expect("name");
            let controller = env.controller().url();
            let mut drone = crate::crashes::drone_process_with(
                &env,
                &env.cluster,
                &name,
                &controller,
                &["--log-format", "json"],
            )
            .await;
            wait_for("the drone process to connect", BACKEND_WAIT, || {
                env.drone_state_is(&name, "connected", true)
            })
            .await;
            env.set_draining(env.drone.name(), true).await;
            let backend = env
                .connect_ready("json-logged", &env.spawn_config(&[]))
                .await;
            assert_eq!(backend.drone.as_ref(), Some(&name));
            let id = backend.backend_id.to_string();
            let log = drone.log_path().to_path_buf();
            wait_for(
                "a status line carrying the backend's ID",
                BACKEND_WAIT,
                || async {
                    let text = std::fs::read_to_string(&log).map_err(|err| err.to_string())?;
                    let carries_id = text
                        .lines()
                        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                        .any(|line| {
                            let status_line = line["fields"]["message"] == "backend status";
                            let spans = line["spans"].as_array().cloned().unwrap_or_default();
                            status_line
                                && spans.iter().any(|span| {
                                    span["name"] == "backend" && span["backend_id"] == id.as_str()
                                })
                        });
                    if carries_id {
                        Ok(())
                    } else {
                        Err(format!("no such line yet in {}", log.display()))
                    }
                },
            )
            .await;
            // `pretty` names the human format too.
            plane(
                controller.as_str(),
                &["--log-format", "pretty", "admin", "status"],
            )
            .await
            .succeeded();
            drone.terminate().await;
            env
        },
    )
    .await;
}
