//! Prometheus metrics, scraped and parsed as Prometheus text: the controller's at `/metrics`
//! (behind the control token when there is one, and on `--metrics-port` without), a drone's
//! at its `--metrics-port`, and `plane dev`'s components all at its controller's `/metrics`.
//! The named families move when the matching thing happens.

use crate::harness::{free_port, run_test, wait_for, Db, PlaneDev, TestEnv, BACKEND_WAIT};
use plane_protocol::api::ConnectRequest;
use std::collections::HashMap;

/// One scrape: every sample by name, with its labels.
pub(crate) struct Scrape {
    samples: Vec<prometheus_parse::Sample>,
}

impl Scrape {
    pub(crate) async fn of(client: &reqwest::Client, url: &str) -> Scrape {
        let answer = client.get(url).send().await.expect("metrics reachable");
        assert_eq!(answer.status().as_u16(), 200, "{url}");
        let text = answer.text().await.expect("metrics text");
        let lines = text.lines().map(|line| Ok(line.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
        Scrape {
            samples: parsed.samples,
        }
    }

    /// The sum of `name`'s samples whose labels include every pair of `labels`.
    pub(crate) fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|sample| sample.metric == name)
            .filter(|sample| labels.iter().all(|(k, v)| sample.labels.get(k) == Some(*v)))
            .map(|sample| match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(ref buckets) => {
                    buckets.last().map_or(0.0, |b| b.count)
                }
                _ => 0.0,
            })
            .sum()
    }

    fn names(&self) -> HashMap<&str, usize> {
        let mut names = HashMap::new();
        for sample in &self.samples {
            *names.entry(sample.metric.as_str()).or_default() += 1;
        }
        names
    }
}

/// On SQLite only: what is counted does not depend on the database.
#[tokio::test(flavor = "current_thread")]
async fn the_controller_and_a_drone_export_metrics_that_move_with_what_happens() {
    run_test(
        "the_controller_and_a_drone_export_metrics_that_move_with_what_happens",
        Db::Sqlite,
        |env: TestEnv| async move {
            let drone_port = free_port();
            let mut config = env.drone_config("dr-metrics");
            config.metrics_port = Some(drone_port);
            let _drone = env.start_drone(config).await;
            env.set_draining(env.drone.name(), true).await;
            let metrics_url = env.controller_url("/metrics");
            let drone_url = format!("http://127.0.0.1:{drone_port}/metrics");
            let before = Scrape::of(&env.client, &metrics_url).await;
            let drone_before = Scrape::of(&env.client, &drone_url).await;

            let spawn = env.spawn_config(&[]);
            let backend = env.connect_ready("counted", &spawn).await;
            env.connect("counted", &spawn).await;
            let refused = env
                .api()
                .plane
                .connect(&ConnectRequest::default())
                .await
                .expect_err("a connect without key or spawn config is refused");
            assert_eq!(refused.status(), Some(400));

            let after = Scrape::of(&env.client, &metrics_url).await;
            let requests = "plane_connect_requests_total";
            for (outcome, more) in [("spawned", 1.0), ("joined", 1.0)] {
                let labels = [("endpoint", "connect"), ("outcome", outcome)];
                assert_eq!(
                    after.value(requests, &labels) - before.value(requests, &labels),
                    more,
                    "{outcome}"
                );
            }
            assert!(after.value(requests, &[("endpoint", "connect")]) >= 3.0);
            let latency = "plane_connect_request_duration_seconds_count";
            assert!(after.value(latency, &[("endpoint", "connect")]) >= 3.0);
            let startup = "plane_backend_startup_duration_seconds_count";
            assert_eq!(after.value(startup, &[]) - before.value(startup, &[]), 1.0);
            let drone = backend.drone.as_ref().expect("drone").to_string();
            let live = [("drone", drone.as_str()), ("status", "ready")];
            assert_eq!(after.value("plane_backends", &live), 1.0);
            for kind in ["drone", "proxy"] {
                assert!(
                    after.value("plane_nodes_connected", &[("kind", kind)]) >= 1.0,
                    "{kind}"
                );
            }

            // The drone counted its engine calls.
            let drone_after = Scrape::of(&env.client, &drone_url).await;
            let calls = "plane_drone_runtime_calls_total";
            let started = [("call", "start"), ("outcome", "ok")];
            assert_eq!(
                drone_after.value(calls, &started) - drone_before.value(calls, &started),
                1.0
            );
            assert!(
                drone_after.value(
                    "plane_drone_runtime_call_duration_seconds_count",
                    &[("call", "start")]
                ) >= 1.0
            );

            // Stopped: gone from the live count.
            env.terminate(
                &backend.backend_id,
                plane_protocol::backend::TerminationKind::Hard,
            )
            .await;
            env.wait_terminated(&backend.backend_id).await;
            let ended = Scrape::of(&env.client, &metrics_url).await;
            assert_eq!(
                ended.value("plane_backends", &[("drone", drone.as_str())]),
                0.0
            );
            env
        },
    )
    .await;
}

/// An action for a drone that is away waits as `pending`, and is gone once the drone is
/// back and has acknowledged it.
#[tokio::test(flavor = "current_thread")]
async fn an_action_for_an_absent_drone_is_counted_pending_until_it_is_acked() {
    run_test(
        "an_action_for_an_absent_drone_is_counted_pending_until_it_is_acked",
        Db::Sqlite,
        |env: TestEnv| async move {
            let mut config = env.drone_config("dr-away");
            // Its backend stays running while it is away, to be re-adopted.
            config.on_shutdown = plane_drone::OnShutdown::Keep;
            let name = config.name.clone();
            let away = env.start_drone(config.clone()).await;
            env.set_draining(env.drone.name(), true).await;
            let backend = env.connect_ready("away", &env.spawn_config(&[])).await;
            assert_eq!(backend.drone.as_ref(), Some(&name));
            away.shutdown().await;
            wait_for("the drone gone", BACKEND_WAIT, || {
                env.drone_state_is(&name, "connected", false)
            })
            .await;

            let metrics_url = env.controller_url("/metrics");
            let unacked = "plane_actions_unacked";
            env.terminate(
                &backend.backend_id,
                plane_protocol::backend::TerminationKind::Hard,
            )
            .await;
            let scrape = Scrape::of(&env.client, &metrics_url).await;
            assert_eq!(scrape.value(unacked, &[("state", "pending")]), 1.0);
            assert_eq!(scrape.value(unacked, &[("state", "sent")]), 0.0);

            let back = env.start_drone(config).await;
            env.wait_terminated(&backend.backend_id).await;
            wait_for("the action acked", BACKEND_WAIT, || async {
                let scrape = Scrape::of(&env.client, &metrics_url).await;
                match scrape.value(unacked, &[]) {
                    0.0 => Ok(()),
                    other => Err(other),
                }
            })
            .await;
            back.shutdown_with(plane_drone::OnShutdown::Terminate).await;
            env.set_draining(env.drone.name(), false).await;
            env
        },
    )
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn controller_metrics_need_the_token_on_the_api_port_and_not_on_the_metrics_port() {
    run_test(
        "controller_metrics_need_the_token_on_the_api_port_and_not_on_the_metrics_port",
        Db::Sqlite,
        |env: TestEnv| async move {
            let port = free_port();
            let db = env.scratch.join("metrics-auth.db").display().to_string();
            let controller = env
                .start_controller_with(|config| {
                    config.db = db;
                    config.ctrl_tokens = vec!["metrics-token".to_string()];
                    config.metrics_port = Some(port);
                })
                .await;
            let url = controller.url().join("/metrics").expect("url");
            let refused = env.client.get(url.clone()).send().await.expect("reachable");
            assert_eq!(refused.status().as_u16(), 401);
            let allowed = env
                .client
                .get(url)
                .bearer_auth("metrics-token")
                .send()
                .await
                .expect("reachable");
            assert_eq!(allowed.status().as_u16(), 200);
            let open = Scrape::of(&env.client, &format!("http://127.0.0.1:{port}/metrics")).await;
            let names = open.names();
            assert!(
                names.contains_key("plane_backend_startup_duration_seconds_count"),
                "{names:?}"
            );
            controller.shutdown().await;
            env
        },
    )
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn plane_dev_serves_every_components_metrics_at_its_controller() {
    tokio::time::timeout(BACKEND_WAIT * 4, async {
        let scratch =
            std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("scratch/dev-metrics");
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).expect("scratch directory");
        let mut dev = PlaneDev::start(&scratch, &[]).await;
        let url = format!("{}/metrics", dev.field("controller").trim_end_matches('/'));
        let client = reqwest::Client::new();
        let names = wait_for("the drone's first engine calls", BACKEND_WAIT, || async {
            let scrape = Scrape::of(&client, &url).await;
            let names: Vec<String> = scrape.names().keys().map(|n| n.to_string()).collect();
            if names.iter().any(|n| n == "plane_drone_runtime_calls_total") {
                Ok(names)
            } else {
                Err(format!("{names:?}"))
            }
        })
        .await;
        assert!(
            names.iter().any(|n| n.starts_with("plane_nodes_connected")),
            "{names:?}"
        );
        let status = dev.stop().await;
        assert!(status.success(), "plane dev exit: {status}");
    })
    .await
    .expect("finished in time");
}

/// On SQLite only, as above.
#[tokio::test(flavor = "current_thread")]
async fn a_proxy_exports_requests_bytes_connections_and_route_lookups() {
    run_test(
        "a_proxy_exports_requests_bytes_connections_and_route_lookups",
        Db::Sqlite,
        |env: TestEnv| async move {
            let port = free_port();
            let mut config =
                plane_proxy::config::ProxyConfig::new(env.controller().url(), env.cluster.clone());
            config.metrics_port = Some(port);
            let proxy = env.start_proxy_with(config).await;
            let metrics_url = format!("http://127.0.0.1:{port}/metrics");
            let backend = env.connect_ready("proxied", &env.spawn_config(&[])).await;
            let base = format!("http://{}/{}", proxy.local_addr(), backend.token);

            let before = Scrape::of(&env.client, &metrics_url).await;
            for _ in 0..3 {
                let answer = env
                    .client
                    .post(format!("{base}/echo"))
                    .body(vec![b'x'; 10_000])
                    .send()
                    .await
                    .expect("proxied");
                assert_eq!(answer.status().as_u16(), 200);
                answer.bytes().await.expect("body");
            }
            let missing = env
                .client
                .get(format!("http://{}/no-such-token/", proxy.local_addr()))
                .send()
                .await
                .expect("proxy answers");
            assert_eq!(missing.status().as_u16(), 404);
            // A WebSocket stays open while it is counted.
            let ws_url = format!("ws://{}/{}/ws", proxy.local_addr(), backend.token);
            let (socket, _) = tokio_tungstenite::connect_async(ws_url)
                .await
                .expect("websocket through the proxy");

            let after = Scrape::of(&env.client, &metrics_url).await;
            let delta = |name: &str, labels: &[(&str, &str)]| {
                after.value(name, labels) - before.value(name, labels)
            };
            let requests = "plane_proxy_requests_total";
            assert!(delta(requests, &[("status_class", "2xx")]) >= 3.0);
            assert!(delta(requests, &[("status_class", "4xx")]) >= 1.0);
            assert!(
                delta(requests, &[("status_class", "1xx")]) >= 1.0,
                "the 101"
            );
            let relayed = "plane_proxy_relayed_bytes_total";
            assert!(delta(relayed, &[("direction", "to_backend")]) >= 30_000.0);
            assert!(
                delta(relayed, &[("direction", "to_client")]) >= 30_000.0,
                "the echoes"
            );
            let lookups = "plane_proxy_route_cache_lookups_total";
            assert!(delta(lookups, &[("result", "hit")]) >= 2.0);
            assert!(delta(lookups, &[("result", "miss")]) >= 1.0);
            assert!(delta("plane_proxy_upstream_response_duration_seconds_count", &[]) >= 3.0);
            assert_eq!(after.value("plane_proxy_open_websockets", &[]), 1.0);
            assert!(after.value("plane_proxy_open_connections", &[]) >= 1.0);
            drop(socket);
            wait_for(
                "the WebSocket to be counted closed",
                BACKEND_WAIT,
                || async {
                    let scrape = Scrape::of(&env.client, &metrics_url).await;
                    let open = scrape.value("plane_proxy_open_websockets", &[]);
                    if open == 0.0 {
                        Ok(())
                    } else {
                        Err(open)
                    }
                },
            )
            .await;
            proxy.shutdown().await;
            env
        },
    )
    .await;
}
