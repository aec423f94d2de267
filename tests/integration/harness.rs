//! `TestEnv`: a controller, drone and proxy started in-process on 127.0.0.1:0, on SQLite
//! or a fresh PostgreSQL database, plus helpers to drive them and wait on conditions.

use futures_util::StreamExt;
use plane::controller::{self, config::ControllerConfig, ControllerHandle};
use plane::demo_image::{self, ImageSpec};
use plane_client::{ClientError, PlaneClient};
use plane_drone::config::DroneConfig;
use plane_drone::DroneHandle;
use plane_protocol::api::{
    ClusterState, ConnectRequest, ConnectResponse, ExecutorConfig, KeyConfig, SpawnConfig,
};
use plane_protocol::backend::{BackendStatus, BackendStatusStreamEntry, TerminationKind};
use plane_protocol::names::{BackendName, ClusterName, NodeName};
use plane_proxy::config::ProxyConfig;
use plane_proxy::ProxyHandle;
use rand::distributions::{Alphanumeric, DistString};
use serde_json::Value;
use std::future::Future;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::net::TcpListener;

/// How long a test waits for a backend to start or stop.
pub const BACKEND_WAIT: Duration = Duration::from_secs(30);

/// The longest any single test may run.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Which database a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// Declares a test that runs once on SQLite and once on PostgreSQL:
/// `db_test!(name, |env| async move { ... })`.
#[macro_export]
macro_rules! db_test {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "current_thread")]
            async fn sqlite() {
                $crate::harness::run_test(stringify!($name), $crate::harness::Db::Sqlite, $body)
                    .await;
            }

            #[tokio::test(flavor = "current_thread")]
            async fn postgres() {
                $crate::harness::run_test(stringify!($name), $crate::harness::Db::Postgres, $body)
                    .await;
            }
        }
    };
}

/// Declares a test that only makes sense on PostgreSQL (several controllers on one
/// database): `postgres_test!(name, |env| async move { ... })`.
#[macro_export]
macro_rules! postgres_test {
    ($name:ident, $body:expr) => {
        #[tokio::test(flavor = "current_thread")]
        async fn $name() {
            $crate::harness::run_test(stringify!($name), $crate::harness::Db::Postgres, $body)
                .await;
        }
    };
}

/// Starts a `TestEnv`, runs the body under [`TEST_TIMEOUT`], and shuts everything down.
/// On failure the scratch directory (database, notes) is kept and its path printed.
pub async fn run_test<F, Fut>(name: &str, db: Db, body: F)
where
    F: FnOnce(TestEnv) -> Fut,
    Fut: Future<Output = TestEnv>,
{
    init_logging();
    let env = TestEnv::start(name, db).await;
    let scratch = env.scratch.clone();
    let result = tokio::time::timeout(TEST_TIMEOUT, body(env)).await;
    match result {
        Ok(env) => {
            env.shutdown().await;
            let _ = std::fs::remove_dir_all(&scratch);
        }
        Err(_) => panic!(
            "test {name} ({db:?}) timed out after {TEST_TIMEOUT:?}; scratch kept at {}",
            scratch.display()
        ),
    }
}

fn init_logging() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        // Captured per test by the test harness (each test runs on its own thread with a
        // current-thread runtime), so a failing test shows its own logs.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info,sqlx=warn".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

/// The test backend image, built once per test run (on its own runtime, since every test
/// has its own).
pub fn test_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        std::thread::spawn(|| {
            let runtime = tokio::runtime::Runtime::new().expect("runtime for the image build");
            runtime.block_on(async {
                let docker = bollard::Docker::connect_with_local_defaults()
                    .expect("connect to the Docker engine");
                demo_image::ensure(
                    &docker,
                    &ImageSpec {
                        executable: PathBuf::from(env!("CARGO_BIN_EXE_plane-test-backend")),
                        args: vec![],
                        repository: "plane-test/backend".to_string(),
                    },
                )
                .await
                .expect("build the test backend image")
            })
        })
        .join()
        .expect("image build thread")
    })
}

fn random_suffix() -> String {
    Alphanumeric
        .sample_string(&mut rand::thread_rng(), 8)
        .to_lowercase()
}

/// A running controller + drone + proxy.
pub struct TestEnv {
    /// `None` only while [`TestEnv::restart_controller`] swaps it.
    controller: Option<ControllerHandle>,
    controller_config: ControllerConfig,
    pub drone: DroneHandle,
    pub proxy: ProxyHandle,
    pub cluster: ClusterName,
    pub client: reqwest::Client,
    pub scratch: PathBuf,
    postgres_db: Option<(String, String)>,
    db: Db,
}

impl TestEnv {
    async fn start(name: &str, db: Db) -> TestEnv {
        let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("scratch")
            .join(format!("{name}-{db:?}-{}", random_suffix()).to_lowercase());
        std::fs::create_dir_all(&scratch).expect("create scratch dir");
        let (db_url, postgres_db) = match db {
            Db::Sqlite => (scratch.join("plane.db").display().to_string(), None),
            Db::Postgres => {
                let (url, admin, db_name) = create_postgres_database().await;
                (url, Some((admin, db_name)))
            }
        };
        let image = test_image();
        assert!(!image.is_empty());

        let proxy_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let cluster: ClusterName = format!(
            "127.0.0.1:{}",
            proxy_listener.local_addr().expect("addr").port()
        )
        .parse()
        .expect("cluster name");
        let mut controller_config = ControllerConfig::new(db_url);
        controller_config.sweep_interval_ms = 200;
        // Short enough that lease and lost-drone tests take seconds, long enough that a
        // loaded CI machine never misses a renewal: drones renew every 500 ms.
        controller_config.lease_ms = 4_000;
        controller_config.lost_window_ms = 5_000;
        controller_config.default_cluster = Some(cluster.clone());
        let controller_listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind controller");
        let controller = controller::start(controller_config.clone(), controller_listener)
            .await
            .expect("start controller");

        // The proxy's default report interval: idle reaping must not depend on it.
        let proxy_config = ProxyConfig::new(controller.url(), cluster.clone());
        let proxy = plane_proxy::start(proxy_config, proxy_listener)
            .await
            .expect("start proxy");

        let drone_config = test_drone_config(&controller.url(), &cluster, &scratch, "dr-test");
        let drone = plane_drone::start(drone_config).await.expect("start drone");

        let env = TestEnv {
            controller: Some(controller),
            controller_config,
            drone,
            proxy,
            cluster,
            client: reqwest::Client::new(),
            scratch,
            postgres_db,
            db,
        };
        // As the controller sees it (in the database), which is what placement reads.
        env.wait_for_connected_nodes().await;
        env
    }

    pub async fn shutdown(self) {
        self.drone.shutdown().await;
        self.proxy.shutdown().await;
        if let Some(controller) = self.controller {
            controller.shutdown().await;
        }
        if let Some((admin, db_name)) = self.postgres_db {
            drop_postgres_database(&admin, &db_name).await;
        }
    }

    pub fn controller_url(&self, path: &str) -> String {
        format!(
            "{}{}",
            self.controller().url().as_str().trim_end_matches('/'),
            path
        )
    }

    pub fn controller(&self) -> &ControllerHandle {
        self.controller.as_ref().expect("controller is running")
    }

    /// Which database this test runs on.
    pub fn db(&self) -> Db {
        self.db
    }

    /// The database every controller of this test uses.
    pub fn db_url(&self) -> &str {
        &self.controller_config.db
    }

    /// Starts another controller on the same database (on its own port).
    pub async fn start_controller(&self) -> ControllerHandle {
        self.start_controller_with(|_| {}).await
    }

    /// Starts another controller (on its own port) with this test's settings, changed by
    /// `customize`.
    pub async fn start_controller_with(
        &self,
        customize: impl FnOnce(&mut ControllerConfig),
    ) -> ControllerHandle {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind controller");
        let mut config = self.controller_config.clone();
        config.public_url = None;
        customize(&mut config);
        controller::start(config, listener)
            .await
            .expect("start another controller")
    }

    /// Starts a proxy for this cluster connected to the controller at `controller`, and
    /// waits until it is connected.
    pub async fn start_proxy(&self, controller: &url::Url) -> ProxyHandle {
        self.start_proxy_for(controller, &self.cluster).await
    }

    /// [`TestEnv::start_proxy`] for another cluster.
    pub async fn start_proxy_for(
        &self,
        controller: &url::Url,
        cluster: &ClusterName,
    ) -> ProxyHandle {
        self.start_proxy_with(ProxyConfig::new(controller.clone(), cluster.clone()))
            .await
    }

    /// Starts a proxy with `config` on a free loopback port, and waits until it is connected.
    pub async fn start_proxy_with(&self, config: ProxyConfig) -> ProxyHandle {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let proxy = plane_proxy::start(config, listener)
            .await
            .expect("start proxy");
        wait_for("the proxy to connect", Duration::from_secs(20), || async {
            proxy.is_connected().then_some(()).ok_or("not yet")
        })
        .await;
        proxy
    }

    /// As [`TestEnv::restart_controller`], with this test's controller settings changed by
    /// `customize` from now on.
    pub async fn restart_controller_with(&mut self, customize: impl FnOnce(&mut ControllerConfig)) {
        customize(&mut self.controller_config);
        self.restart_controller().await;
    }

    /// Stops the controller (the drone and proxy keep running, trying to reconnect).
    pub async fn stop_controller(&mut self) {
        let controller = self.controller.take().expect("controller is running");
        controller.shutdown().await;
    }

    /// Stops the controller and starts a new one on the same address and database, then
    /// waits for the drone and proxy to reconnect to it.
    pub async fn restart_controller(&mut self) {
        let old = self.controller.take().expect("controller is running");
        let addr = old.local_addr();
        old.shutdown().await;
        let listener = TcpListener::bind(addr)
            .await
            .expect("rebind controller address");
        let controller = controller::start(self.controller_config.clone(), listener)
            .await
            .expect("restart controller");
        self.controller = Some(controller);
        // The nodes notice the old socket closing and reconnect with backoff.
        self.wait_for_connected_nodes().await;
    }

    /// A configuration for another drone of this cluster (same timings as the first), with
    /// its own state directory in the scratch directory.
    pub fn drone_config(&self, name_prefix: &str) -> DroneConfig {
        test_drone_config(
            &self.controller().url(),
            &self.cluster,
            &self.scratch,
            name_prefix,
        )
    }

    /// Starts a drone and waits until its controller shows it connected (so placement can
    /// choose it).
    pub async fn start_drone(&self, config: DroneConfig) -> DroneHandle {
        let state = format!(
            "{}/ctrl/c/{}/state",
            config.controller_url.as_str().trim_end_matches('/'),
            config.cluster
        );
        let name = config.name.clone();
        let drone = plane_drone::start(config).await.expect("start drone");
        wait_for(
            &format!("drone {name} connected in {state}"),
            Duration::from_secs(20),
            || async {
                let state: ClusterState = self
                    .client
                    .get(&state)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .json()
                    .await
                    .map_err(|e| e.to_string())?;
                let connected = state
                    .drones
                    .iter()
                    .any(|d| d.node.name.name() == &name && d.node.connected);
                if connected {
                    Ok(())
                } else {
                    Err(format!("{state:?}"))
                }
            },
        )
        .await;
        drone
    }

    /// Drains (or undrains) one of this cluster's drones, so that placement avoids it.
    pub async fn set_draining(&self, drone: &NodeName, draining: bool) {
        let plane = &self.api().plane;
        let result = if draining {
            plane.drain(&self.cluster, drone).await
        } else {
            plane.undrain(&self.cluster, drone).await
        };
        if let Err(error) = result {
            panic!("drain={draining} {drone}: {error}");
        }
    }

    /// The cluster state, typed.
    pub async fn cluster_state(&self) -> ClusterState {
        match self.api().plane.cluster_state(&self.cluster).await {
            Ok(state) => state,
            Err(error) => panic!("cluster state of {}: {error}", self.cluster),
        }
    }

    /// Whether the cluster state lists `drone` with `field` (`connected`, `lost`) equal to
    /// `value`; the state itself otherwise, for the failure message.
    pub async fn drone_state_is(
        &self,
        drone: &NodeName,
        field: &str,
        value: bool,
    ) -> Result<(), String> {
        let state = self.cluster_state().await;
        let found = state.drones.iter().find(|d| d.node.name.name() == drone);
        match found {
            Some(d) if field == "connected" && d.node.connected == value => Ok(()),
            Some(d) if field == "lost" && d.lost == value => Ok(()),
            _ => Err(format!("{state:?}")),
        }
    }

    /// Checks for all of `during` that the backend stays `ready`.
    pub async fn stays_ready(&self, what: &str, backend: &BackendName, during: Duration) {
        holds_for(what, during, || async {
            let entry = self.status(backend).await;
            if entry.status == BackendStatus::Ready {
                Ok(())
            } else {
                Err(format!("{entry:?}"))
            }
        })
        .await;
    }

    /// Waits until the cluster state shows the drone and proxy connected; returns it.
    pub async fn wait_for_connected_nodes(&self) -> ClusterState {
        wait_for(
            "drone and proxy connected in the cluster state",
            Duration::from_secs(20),
            || async {
                let state = self.cluster_state().await;
                let connected = state.drones.first().is_some_and(|d| d.node.connected)
                    && state.proxies.first().is_some_and(|p| p.connected);
                if connected {
                    Ok(state)
                } else {
                    Err(format!("{state:?}"))
                }
            },
        )
        .await
    }

    pub fn proxy_url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy.local_addr(), path)
    }

    /// A spawn config for the test backend image with the given extra environment.
    pub fn spawn_config(&self, env: &[(&str, &str)]) -> SpawnConfig {
        SpawnConfig {
            id: None,
            cluster: Some(self.cluster.clone()),
            pool: None,
            executable: ExecutorConfig {
                image: test_image().to_string(),
                pull_policy: None,
                credentials: None,
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                resource_limits: Default::default(),
                mount: None,
                network_name: None,
                ready_path: None,
                gpus: None,
                protocol: Default::default(),
            },
            lifetime_limit_seconds: None,
            max_idle_seconds: None,
            use_static_token: false,
            startup_timeout_seconds: None,
            subdomain: None,
        }
    }

    /// The API of this test's controller.
    pub fn api(&self) -> Api {
        self.api_at(&self.controller().url())
    }

    /// The API of the controller at `url` (another controller of the test).
    pub fn api_at(&self, url: &url::Url) -> Api {
        Api {
            base: url.as_str().trim_end_matches('/').to_string(),
            client: self.client.clone(),
            plane: PlaneClient::with_http_client(url.clone(), self.client.clone()),
        }
    }

    /// POSTs JSON to the controller; returns the status code and the JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.api().post(path, body).await
    }

    /// GETs a controller path; returns the status code and the JSON body (`Null` if none).
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        self.api().get_json(path).await
    }

    /// Connects with a key and the given spawn config; panics unless it succeeds.
    pub async fn connect(&self, key: &str, spawn_config: &SpawnConfig) -> ConnectResponse {
        self.api().connect(key, spawn_config).await
    }

    /// Connects (see [`TestEnv::connect`]) and waits until the backend is ready.
    pub async fn connect_ready(&self, key: &str, spawn_config: &SpawnConfig) -> ConnectResponse {
        let response = self.connect(key, spawn_config).await;
        self.wait_for_status(&response.backend_id, BackendStatus::Ready, BACKEND_WAIT)
            .await;
        response
    }

    /// Asks for a soft or hard termination; panics unless the controller accepts it.
    pub async fn terminate(&self, backend: &BackendName, kind: TerminationKind) {
        self.api().terminate(backend, kind).await
    }

    /// Waits until the backend has terminated; returns its final entry.
    pub async fn wait_terminated(&self, backend: &BackendName) -> BackendStatusStreamEntry {
        self.wait_for_status(backend, BackendStatus::Terminated, BACKEND_WAIT)
            .await
    }

    /// The statuses the backend has been through, from its (finished) status stream.
    pub async fn status_sequence(&self, backend: &BackendName) -> Vec<BackendStatus> {
        self.status_stream(backend)
            .await
            .into_iter()
            .map(|entry| entry.status)
            .collect()
    }

    /// The backend's latest status entry.
    pub async fn status(&self, backend: &BackendName) -> BackendStatusStreamEntry {
        self.api().status(backend).await
    }

    /// Waits until the backend reaches `status`; returns the entry seen.
    pub async fn wait_for_status(
        &self,
        backend: &BackendName,
        status: BackendStatus,
        within: Duration,
    ) -> BackendStatusStreamEntry {
        self.api().wait_for_status(backend, status, within).await
    }

    /// Reads the whole status stream of a backend (it ends after `terminated`).
    pub async fn status_stream(&self, backend: &BackendName) -> Vec<BackendStatusStreamEntry> {
        self.api().status_stream(backend).await
    }

    /// GETs a path through the proxy under `token`; returns the status code and body.
    pub async fn get_via_proxy(&self, token: &str, path: &str) -> (u16, String) {
        let response = self
            .client
            .get(self.proxy_url(&format!("/{token}{path}")))
            .send()
            .await
            .expect("proxy reachable");
        (
            response.status().as_u16(),
            response.text().await.unwrap_or_default(),
        )
    }
}

/// The `plane` binary next to this test binary (`target/debug/plane`); the test command
/// builds it first.
pub fn plane_binary() -> PathBuf {
    let test_exe = std::env::current_exe().expect("test executable path");
    let target_dir = test_exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let binary = target_dir.join("plane");
    assert!(
        binary.exists(),
        "{} is missing: build it with `cargo build --bin plane` (scripts/test.sh does)",
        binary.display()
    );
    binary
}

/// The drone settings every test drone uses: quick heartbeats (each renews the leases), a
/// short grace period, and a state directory of its own under `scratch`.
fn test_drone_config(
    controller: &url::Url,
    cluster: &ClusterName,
    scratch: &std::path::Path,
    name_prefix: &str,
) -> DroneConfig {
    let mut config = DroneConfig::new(controller.clone(), cluster.clone());
    config.name = NodeName::new_random(name_prefix);
    config.stop_grace_period_ms = 1500;
    config.heartbeat_interval_ms = 500;
    config.fence_margin_ms = 1_000;
    // Per drone, since tests run concurrently and a state directory serves one drone.
    config.state_dir = scratch.join(format!("state-{}", config.name));
    // In-process drones have no fence to guard backends left running: a test's drone
    // stops its backends when it stops (tests of `keep` choose it).
    config.on_shutdown = plane_drone::OnShutdown::Terminate;
    // Stopped containers go at once, so tests leave none behind (the logs tests choose a
    // retention).
    config.log_retention_seconds = 0;
    config.allowed_registries = Some(vec![test_registry()]);
    config
}

/// The only registry test drones pull from: the test command's own on loopback, so no
/// test ever reaches out for an image it lacks.
pub fn test_registry() -> String {
    std::env::var("PLANE_TEST_REGISTRY").unwrap_or_else(|_| "localhost".to_string())
}

/// Polls `check` every 100 ms for all of `during`, panicking at the first failure with what
/// was expected to hold and what was seen. For promises of the form "X does not happen".
pub async fn holds_for<E, F, Fut>(what: &str, during: Duration, mut check: F)
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    let deadline = tokio::time::Instant::now() + during;
    while tokio::time::Instant::now() < deadline {
        if let Err(seen) = check().await {
            panic!("expected {what} to hold for {during:?}; it stopped holding: {seen}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The IDs of the containers (running or not) Docker has for `backend`.
pub async fn containers_of(backend: &BackendName) -> Vec<String> {
    let docker = bollard::Docker::connect_with_local_defaults().expect("connect to Docker");
    let filters = std::collections::HashMap::from([(
        "label".to_string(),
        vec![format!("dev.plane.backend={backend}")],
    )]);
    docker
        .list_containers(Some(bollard::container::ListContainersOptions {
            all: true,
            filters,
            ..Default::default()
        }))
        .await
        .expect("list containers")
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

/// One controller's HTTP API, as an app would call it: typed through `plane-client`, with
/// raw `post`/`get_json` for the tests that send what no typed client would.
#[derive(Clone)]
pub struct Api {
    base: String,
    client: reqwest::Client,
    pub plane: PlaneClient,
}

impl Api {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs JSON; returns the status code and the JSON body (`Null` if none).
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("controller reachable");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// GETs a path; returns the status code and the JSON body (`Null` if none).
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("controller reachable");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Connects with a key (as user `alice`); the error says what came back instead of a
    /// backend (also when the controller could not be reached at all).
    pub async fn try_connect(
        &self,
        key: &str,
        spawn_config: &SpawnConfig,
    ) -> Result<ConnectResponse, ClientError> {
        self.plane
            .connect(&ConnectRequest {
                key: Some(KeyConfig::named(key)),
                spawn_config: Some(spawn_config.clone()),
                user: Some("alice".to_string()),
                ..Default::default()
            })
            .await
    }

    /// Connects with a key; panics unless it succeeds.
    pub async fn connect(&self, key: &str, spawn_config: &SpawnConfig) -> ConnectResponse {
        match self.try_connect(key, spawn_config).await {
            Ok(response) => response,
            Err(error) => panic!("connect via {} failed: {error}", self.base),
        }
    }

    /// The backend's latest status entry.
    pub async fn status(&self, backend: &BackendName) -> BackendStatusStreamEntry {
        match self.plane.backend_status(backend).await {
            Ok(entry) => entry,
            Err(error) => panic!("status of {backend} via {}: {error}", self.base),
        }
    }

    /// Waits until the backend reaches `status`; returns the entry seen.
    pub async fn wait_for_status(
        &self,
        backend: &BackendName,
        status: BackendStatus,
        within: Duration,
    ) -> BackendStatusStreamEntry {
        wait_for(
            &format!("backend {backend} to reach {status}"),
            within,
            || async {
                let entry = self.status(backend).await;
                if entry.status == status {
                    Ok(entry)
                } else {
                    Err(format!("status is {}: {entry:?}", entry.status))
                }
            },
        )
        .await
    }

    /// Reads the whole status stream of a backend (it ends after `terminated`).
    pub async fn status_stream(&self, backend: &BackendName) -> Vec<BackendStatusStreamEntry> {
        self.plane
            .status_stream(backend)
            .map(|entry| {
                entry.unwrap_or_else(|error| panic!("status stream of {backend}: {error}"))
            })
            .collect()
            .await
    }

    /// Asks for a soft or hard termination; panics unless the controller accepts it.
    pub async fn terminate(&self, backend: &BackendName, kind: TerminationKind) {
        if let Err(error) = self.plane.terminate(backend, kind).await {
            panic!("{} termination of {backend}: {error}", kind.as_str());
        }
    }
}

/// A loopback port free now (for a process that binds it itself).
pub fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    probe.local_addr().expect("addr").port()
}

/// Where `program` is on the PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

/// Polls `check` every 100 ms until it returns `Ok`, or panics after `within` with what was
/// awaited and the last thing seen.
pub async fn wait_for<T, E, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let last = match check().await {
            Ok(value) => return value,
            Err(last) => last,
        };
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates an empty database on the server named by `PLANE_TEST_POSTGRES_URL` and returns
/// (url of the new database, admin url, database name).
pub(crate) async fn create_postgres_database() -> (String, String, String) {
    use sqlx::Connection;
    let admin = std::env::var("PLANE_TEST_POSTGRES_URL").expect(
        "PLANE_TEST_POSTGRES_URL must name a PostgreSQL server for the postgres variants \
         (the README's test command, ./scripts/test.sh, starts one)",
    );
    let db_name = format!("plane_test_{}", random_suffix());
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .expect("connect to the test PostgreSQL server");
    sqlx::query(&format!("CREATE DATABASE {db_name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let mut url = url::Url::parse(&admin).expect("PLANE_TEST_POSTGRES_URL is a URL");
    url.set_path(&db_name);
    (url.to_string(), admin, db_name)
}

pub(crate) async fn drop_postgres_database(admin: &str, db_name: &str) {
    use sqlx::Connection;
    if let Ok(mut conn) = sqlx::PgConnection::connect(admin).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
            .execute(&mut conn)
            .await;
    }
}

/// A PostgreSQL server of one test's own (so the test may restart it), in its scratch
/// directory on a free loopback port. Stopped when dropped.
pub struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    user: String,
}

impl PrivatePostgres {
    pub async fn start(scratch: &std::path::Path) -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect(
                "PostgreSQL is installed under /usr/lib/postgresql (the test command installs it)",
            )
            .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
            .filter(|bin| bin.join("initdb").exists())
            .max()
            .expect("a PostgreSQL version with initdb");
        let dir = scratch.join("postgres");
        std::fs::create_dir_all(&dir).expect("postgres dir");
        let root = Self::is_root().await;
        let user = if root {
            "postgres".to_string()
        } else {
            std::env::var("USER").unwrap_or_else(|_| "postgres".into())
        };
        if root {
            // PostgreSQL refuses to run as root; the package's postgres account owns it.
            Self::run("chown", &["-R", "postgres", &dir.display().to_string()]).await;
        }
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            probe.local_addr().expect("addr").port()
        };
        let server = PrivatePostgres {
            bin,
            data: dir.join("data"),
            port,
            user,
        };
        server
            .pg(
                "initdb",
                &[
                    "-D",
                    &server.data.display().to_string(),
                    "-U",
                    &server.user,
                    "--auth=trust",
                ],
            )
            .await;
        server.pg_ctl("start").await;
        server
    }

    pub fn url(&self) -> String {
        format!("postgres://{}@127.0.0.1:{}/postgres", self.user, self.port)
    }

    /// `pg_ctl restart -m fast`: every client connection is cut, then the server is back.
    pub async fn restart(&self) {
        self.pg_ctl("restart").await;
    }

    async fn pg_ctl(&self, action: &str) {
        // No Unix socket: a scratch path is often longer than a socket path may be.
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories='' -c fsync=off",
            self.port
        );
        let log = self.data.parent().expect("dir").join("server.log");
        self.pg(
            "pg_ctl",
            &[
                "-D",
                &self.data.display().to_string(),
                "-l",
                &log.display().to_string(),
                "-m",
                "fast",
                "-w",
                "-o",
                &options,
                action,
            ],
        )
        .await;
    }

    async fn pg(&self, program: &str, args: &[&str]) {
        let program = self.bin.join(program).display().to_string();
        if Self::is_root().await {
            let mut all = vec!["-u", "postgres", "--", program.as_str()];
            all.extend_from_slice(args);
            Self::run("runuser", &all).await;
        } else {
            Self::run(&program, args).await;
        }
    }

    async fn is_root() -> bool {
        let output = tokio::process::Command::new("id")
            .arg("-u")
            .output()
            .await
            .expect("id -u");
        String::from_utf8_lossy(&output.stdout).trim() == "0"
    }

    async fn run(program: &str, args: &[&str]) {
        let output = tokio::process::Command::new(program)
            .args(args)
            .output()
            .await
            .unwrap_or_else(|err| panic!("running {program}: {err}"));
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let pg_ctl = self.bin.join("pg_ctl").display().to_string();
        let data = self.data.display().to_string();
        let args = ["-D", data.as_str(), "-m", "immediate", "stop"];
        let as_postgres = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", pg_ctl.as_str()])
            .args(args)
            .output();
        if !as_postgres.is_ok_and(|o| o.status.success()) {
            let _ = std::process::Command::new(&pg_ctl).args(args).output();
        }
    }
}

/// Every container start and death in one cluster, in the order Docker reports them, from
/// its own event stream. Stops recording when dropped.
pub struct DockerEvents {
    seen: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
    recorder: tokio::task::JoinHandle<()>,
}

impl DockerEvents {
    pub async fn record(cluster: &ClusterName) -> DockerEvents {
        use futures_util::StreamExt;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let docker = bollard::Docker::connect_with_local_defaults().expect("docker");
        let filters = std::collections::HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            (
                "event".to_string(),
                vec!["start".to_string(), "die".to_string()],
            ),
            (
                "label".to_string(),
                vec![format!("dev.plane.cluster={cluster}")],
            ),
        ]);
        let mut events = docker.events(Some(bollard::system::EventsOptions::<String> {
            filters,
            ..Default::default()
        }));
        let sink = seen.clone();
        let recorder = tokio::spawn(async move {
            while let Some(Ok(event)) = events.next().await {
                let action = event.action.unwrap_or_default();
                let backend = event
                    .actor
                    .and_then(|a| a.attributes)
                    .and_then(|a| a.get("dev.plane.backend").cloned())
                    .unwrap_or_default();
                sink.lock().expect("events").push((action, backend));
            }
        });
        DockerEvents { seen, recorder }
    }

    /// Waits until Docker has reported `old` dying and `new` starting, and checks that the
    /// death came first: the two never ran at once.
    pub async fn assert_died_before_started(&self, old: &BackendName, new: &BackendName) {
        wait_for(
            "Docker to report both containers",
            Duration::from_secs(30),
            || async {
                let seen = self.seen.lock().expect("events").clone();
                let died = seen
                    .iter()
                    .position(|(a, b)| a == "die" && b == old.as_str());
                let started = seen
                    .iter()
                    .position(|(a, b)| a == "start" && b == new.as_str());
                match (died, started) {
                    (Some(died), Some(started)) => {
                        assert!(died < started, "{old} died after {new} started: {seen:?}");
                        Ok(())
                    }
                    _ => Err(format!("{seen:?}")),
                }
            },
        )
        .await;
    }
}

impl Drop for DockerEvents {
    fn drop(&mut self) {
        self.recorder.abort();
    }
}

/// A `plane dev` process started by a test, with its stdout after the ready line.
pub struct PlaneDev {
    pub child: tokio::process::Child,
    /// The `plane dev is ready: ...` line.
    pub ready: String,
    pub stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl PlaneDev {
    /// Starts `plane dev <args> --data-dir <scratch>/data` (stderr in `<scratch>/dev.log`)
    /// and waits up to 120 s for its ready line.
    pub async fn start(scratch: &std::path::Path, args: &[&str]) -> PlaneDev {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(plane_binary())
            // The proxy's debug lines say why a tunnel or connection ended.
            .env("RUST_LOG", "info,plane_proxy=debug")
            .arg("dev")
            .args(args)
            .arg("--data-dir")
            .arg(scratch.join("data"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(scratch.join("dev.log")).expect("log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("start plane dev");
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let ready = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(line) = stdout.next_line().await.expect("read stdout") {
                if line.starts_with("plane dev is ready") {
                    return line;
                }
            }
            panic!(
                "plane dev exited before it was ready; see {}",
                scratch.join("dev.log").display()
            );
        })
        .await
        .expect("plane dev ready within 120 s");
        PlaneDev {
            child,
            ready,
            stdout,
        }
    }

    /// `plane dev --https` on free ports in `scratch` (emptied first), with the CA file it
    /// printed to trust.
    pub async fn start_https(scratch: &std::path::Path) -> (PlaneDev, PathBuf) {
        let _ = std::fs::remove_dir_all(scratch);
        std::fs::create_dir_all(scratch).expect("scratch dir");
        let mut dev = PlaneDev::start(
            scratch,
            &[
                "--https",
                "--controller-port",
                "0",
                "--proxy-port",
                "0",
                "--https-port",
                "0",
                "--stop-grace-period-seconds",
                "1",
            ],
        )
        .await;
        let https = dev
            .stdout
            .next_line()
            .await
            .expect("read stdout")
            .filter(|line| line.starts_with("HTTPS:"))
            .expect("an HTTPS line after the ready line");
        let ca = https
            .split_once("ca ")
            .map(|(_, path)| PathBuf::from(path.trim()))
            .expect("a CA path");
        (dev, ca)
    }

    /// The value after `name ` in the ready line (`controller`, `proxy`, `cluster`).
    pub fn field(&self, name: &str) -> String {
        self.ready
            .split(" | ")
            .find_map(|part| {
                part.split_once(&format!("{name} "))
                    .map(|(_, v)| v.to_string())
            })
            .unwrap_or_else(|| panic!("no {name} in {:?}", self.ready))
    }

    /// Sends SIGTERM (what Ctrl-C or a service manager would send) and waits for the exit.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("plane dev is running").to_string();
        let status = tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("kill");
        assert!(status.success());
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("plane dev exits within 30 s of SIGTERM")
            .expect("wait for plane dev")
    }
}
