//! Crashes of real `plane` processes, killed with SIGKILL: a drone running a backend, a
//! controller in the middle of a spawn, and a drone holding status reports the controller
//! has not acknowledged.

use crate::db_test;
use crate::harness::{
    containers_of, plane_binary, wait_for, Db, DockerEvents, TestEnv, BACKEND_WAIT,
};
use crate::leases::fencing_token;
use crate::relay::Relay;
use plane_protocol::backend::{BackendStatus, TerminationReason};
use plane_protocol::names::{ClusterName, NodeName};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// A `plane` process of the test's own (a controller or a drone), restartable with the same
/// arguments, its stderr appended to a log in the scratch directory.
pub(crate) struct PlaneProcess {
    child: Child,
    args: Vec<String>,
    log: std::path::PathBuf,
}

impl PlaneProcess {
    /// Where the process's stdout and stderr go.
    pub(crate) fn log_path(&self) -> &std::path::Path {
        &self.log
    }

    pub(crate) async fn start(args: Vec<String>, log: std::path::PathBuf) -> Self {
        let child = Self::spawn(&args, &log);
        PlaneProcess { child, args, log }
    }

    fn spawn(args: &[String], log: &std::path::Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("process log");
        Command::new(plane_binary())
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start plane")
    }

    /// SIGTERM, as a service manager stops it, and waits for the exit.
    pub(crate) async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running").to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("kill -TERM");
        assert!(sent.success());
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits within 30 s of SIGTERM")
            .expect("reap the process")
    }

    /// SIGKILL: no shutdown of any kind.
    pub(crate) async fn kill(&mut self) {
        self.child.start_kill().expect("kill -9");
        self.child.wait().await.expect("reap the process");
    }

    pub(crate) fn restart(&mut self) {
        self.child = Self::spawn(&self.args, &self.log);
    }
}

/// A `plane controller` process on a fixed port, so it can be restarted where its nodes
/// expect it. Its lease is long, so that a slow restart is not mistaken for a lost drone.
struct ControllerProcess {
    process: PlaneProcess,
    url: url::Url,
}

impl ControllerProcess {
    async fn start(db: &str, cluster: &ClusterName, scratch: &std::path::Path) -> Self {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            probe.local_addr().expect("addr").port()
        };
        let args = [
            "controller",
            "--db",
            db,
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--default-cluster",
            cluster.as_str(),
            "--lease-ms",
            "20000",
            "--lost-window-ms",
            "40000",
            "--sweep-interval-ms",
            "200",
        ]
        .map(String::from)
        .to_vec();
        let process = PlaneProcess::start(args, scratch.join("controller-process.log")).await;
        let url = format!("http://127.0.0.1:{port}").parse().expect("url");
        let controller = ControllerProcess { process, url };
        controller.wait_healthy().await;
        controller
    }

    async fn wait_healthy(&self) {
        let health = format!("{}pub/health", self.url);
        let client = reqwest::Client::new();
        wait_for(
            &format!(
                "the controller process to answer (log: {})",
                self.process.log.display()
            ),
            Duration::from_secs(30),
            || async {
                match client.get(&health).send().await {
                    Ok(response) if response.status().is_success() => Ok(()),
                    Ok(response) => Err(format!("{}", response.status())),
                    Err(err) => Err(err.to_string()),
                }
            },
        )
        .await;
    }

    async fn kill(&mut self) {
        self.process.kill().await;
    }

    async fn restart(&mut self) {
        self.process.restart();
        self.wait_healthy().await;
    }
}

/// Starts a `plane drone` process for the test's cluster with the harness's timings,
/// reaching the controller at `controller`. Name it to sort before the in-process drone's
/// and it gets the first backend.
pub(crate) async fn drone_process(
    env: &TestEnv,
    name: &NodeName,
    controller: &url::Url,
) -> PlaneProcess {
    drone_process_with(env, &env.cluster, name, controller, &[]).await
}

/// [`drone_process`] for another cluster.
async fn drone_process_in(
    env: &TestEnv,
    cluster: &ClusterName,
    name: &NodeName,
    controller: &url::Url,
) -> PlaneProcess {
    drone_process_with(env, cluster, name, controller, &[]).await
}

/// [`drone_process_in`] with extra arguments.
pub(crate) async fn drone_process_with(
    env: &TestEnv,
    cluster: &ClusterName,
    name: &NodeName,
    controller: &url::Url,
    extra: &[&str],
) -> PlaneProcess {
    let state_dir = env.scratch.join(format!("state-{name}"));
    let registry = crate::harness::test_registry();
    let args = [
        "drone",
        "--controller-url",
        controller.as_str(),
        "--cluster",
        cluster.as_str(),
        "--name",
        name.as_str(),
        "--state-dir",
        &state_dir.display().to_string(),
        "--heartbeat-interval-ms",
        "500",
        "--fence-margin-ms",
        "1000",
        "--stop-grace-period-ms",
        "1500",
        "--allowed-registry",
        &registry,
    ]
    .into_iter()
    // Stopped containers go at once, so tests leave none behind, unless a test asks
    // otherwise.
    .chain(
        (!extra.contains(&"--log-retention-seconds"))
            .then_some(["--log-retention-seconds", "0"])
            .into_iter()
            .flatten(),
    )
    .chain(extra.iter().copied())
    .map(String::from)
    .collect();
    PlaneProcess::start(args, env.scratch.join(format!("{name}.log"))).await
}

db_test!(
    drone_killed_with_sigkill_loses_its_backends_and_the_key_spawns_afresh_on_another_drone,
    |env: TestEnv| async move {
        let name: NodeName = format!("a-doomed-{}", env.drone.name())
            .parse()
            .expect("name");
        let mut drone = drone_process(&env, &name, &env.controller().url()).await;
        wait_for(
            "the drone process to connect",
            Duration::from_secs(30),
            || env.drone_state_is(&name, "connected", true),
        )
        .await;
        let docker_events = DockerEvents::record(&env.cluster).await;
        // The first backend goes to the doomed drone: the other is drained meanwhile.
        env.set_draining(env.drone.name(), true).await;
        let first = env.connect_ready("crash", &env.spawn_config(&[])).await;
        env.set_draining(env.drone.name(), false).await;
        assert_eq!(first.drone.as_ref(), Some(&name));
        let first_token = fencing_token(&env, &first).await;

        drone.kill().await;
        let killed_at = Instant::now();
        // The drone's fence (a process of its own) kills the container when the lease runs
        // out; the container itself stays until a drone removes it.
        assert_eq!(containers_of(&first.backend_id).await.len(), 1);
        let entry = env.wait_terminated(&first.backend_id).await;
        assert_eq!(entry.termination_reason, Some(TerminationReason::Lost));
        let second = env.connect_ready("crash", &env.spawn_config(&[])).await;
        let spawnable_after = killed_at.elapsed();
        tracing::info!(
            ?spawnable_after,
            "key spawnable again after kill -9 of its drone"
        );
        assert!(second.spawned);
        assert_eq!(second.drone.as_ref(), Some(env.drone.name()));
        assert!(fencing_token(&env, &second).await > first_token);
        docker_events
            .assert_died_before_started(&first.backend_id, &second.backend_id)
            .await;
        wait_for(
            "the killed drone shown as lost",
            Duration::from_secs(20),
            || env.drone_state_is(&name, "lost", true),
        )
        .await;

        // Started again, the drone finds the container its killed run left and removes it.
        drone.restart();
        wait_for("the old container removed", BACKEND_WAIT, || async {
            let left = containers_of(&first.backend_id).await;
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        })
        .await;
        wait_for("the drone no longer lost", Duration::from_secs(20), || {
            env.drone_state_is(&name, "lost", false)
        })
        .await;
        assert_eq!(
            env.status(&second.backend_id).await.status,
            BackendStatus::Ready
        );
        assert_eq!(
            env.status(&first.backend_id).await.termination_reason,
            Some(TerminationReason::Lost)
        );
        drone.kill().await;
        env
    }
);

db_test!(
    controller_killed_during_a_spawn_and_restarted_on_the_same_database_still_brings_the_backend_up,
    |env: TestEnv| async move {
        // A cluster of its own, so only this test's drone serves it.
        let cluster: ClusterName = format!("crash-{}.test:1", env.drone.name())
            .parse()
            .expect("cluster");
        let db = match env.db() {
            Db::Sqlite => env.scratch.join("process.db").display().to_string(),
            Db::Postgres => env.db_url().to_string(),
        };
        let mut controller = ControllerProcess::start(&db, &cluster, &env.scratch).await;
        let mut config = env.drone_config("crash-drone");
        config.controller_url = controller.url.clone();
        config.cluster = cluster.clone();
        let drone = env.start_drone(config).await;

        let mut spawn = env.spawn_config(&[("DEMO_STARTUP_DELAY_MS", "1500")]);
        spawn.cluster = Some(cluster.clone());
        let api = env.api_at(&controller.url);
        let response = api.connect("mid-spawn", &spawn).await;
        controller.kill().await;
        controller.restart().await;

        api.wait_for_status(&response.backend_id, BackendStatus::Ready, BACKEND_WAIT)
            .await;
        drone.shutdown().await;
        env
    }
);

db_test!(
    events_a_crashed_drone_never_got_acked_reach_the_controller_after_its_restart,
    |env: TestEnv| async move {
        // A controller of its own with a long lease, so that the drone's late report, not
        // the lease running out, is what ends the backend, however slow the machine.
        let cluster: ClusterName = format!("forgetful-{}.test:1", env.drone.name())
            .parse()
            .expect("cluster");
        let db = match env.db() {
            Db::Sqlite => env.scratch.join("forgetful.db").display().to_string(),
            Db::Postgres => env.db_url().to_string(),
        };
        let controller = env
            .start_controller_with(|config| {
                config.db = db;
                config.default_cluster = Some(cluster.clone());
                config.lease_ms = 60_000;
                config.lost_window_ms = 120_000;
            })
            .await;
        let base = controller.url();
        let relay = Relay::start(controller.local_addr()).await;
        let name: NodeName = format!("a-forgetful-{}", env.drone.name())
            .parse()
            .expect("name");
        let via_relay = format!("http://{}", relay.addr()).parse().expect("url");
        let mut drone = drone_process_in(&env, &cluster, &name, &via_relay).await;
        let proxy = env.start_proxy_for(&base, &cluster).await;

        let mut spawn = env.spawn_config(&[]);
        spawn.cluster = Some(cluster.clone());
        let api = env.api_at(&base);
        let response = wait_for(
            "a connect to reach the drone process",
            Duration::from_secs(30),
            || api.try_connect("exits-alone", &spawn),
        )
        .await;
        assert_eq!(response.drone.as_ref(), Some(&name));
        api.wait_for_status(&response.backend_id, BackendStatus::Ready, BACKEND_WAIT)
            .await;

        // Cut off, the backend exits on its own: the drone stores the report but cannot
        // deliver it. Then the drone is killed.
        relay.partition();
        let url = format!("http://{}/{}/exit/3", proxy.local_addr(), response.token);
        let _ = env.client.post(&url).send().await;
        // The drone is done with a backend once its last report is stored; it then stops
        // publishing a deadline for it to its fence, which the test can read.
        let fence_file = env.scratch.join(format!("state-{name}")).join("fence.json");
        wait_for(
            "the drone to store the exit and let go of the backend",
            BACKEND_WAIT,
            || async {
                let deadlines = std::fs::read_to_string(&fence_file).map_err(|e| e.to_string())?;
                if deadlines.contains(response.backend_id.as_str()) {
                    Err(deadlines)
                } else {
                    Ok(())
                }
            },
        )
        .await;
        assert!(containers_of(&response.backend_id).await.is_empty());
        drone.kill().await;

        // Restarted on the same state directory, it delivers the stored report: the
        // controller learns the real exit code.
        relay.heal();
        drone.restart();
        let entry = api
            .wait_for_status(
                &response.backend_id,
                BackendStatus::Terminated,
                BACKEND_WAIT,
            )
            .await;
        assert_eq!(entry.exit_code, Some(3), "{entry:?}");
        assert_eq!(entry.termination_reason, None, "{entry:?}");
        proxy.shutdown().await;
        controller.shutdown().await;
        drone.kill().await;
        env
    }
);
