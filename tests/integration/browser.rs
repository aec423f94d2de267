//! A real browser (headless Chromium driven over WebDriver) opens a backend's URL through
//! the proxy, runs the demo page, and echoes a message over a WebSocket: over plain HTTP, and
//! over HTTPS and `wss://` with `plane dev --https`, trusting its CA for that run only. And
//! an operator uses the dashboard at `/ctrl/ui/`: signs in, watches a connect turn `ready`
//! without a reload, reads its history, terminates it and drains a drone. The browser runs
//! in a network namespace of its own, so that the container interfaces other tests add on
//! the host do not make it drop its connections.

use crate::harness::{run_test, wait_for, Db, PlaneDev, TestEnv};
use crate::netns::Netns;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

/// A chromedriver process and one browser session in it; both end on drop.
struct Browser {
    driver: Child,
    netns: Netns,
    base: String,
    session: String,
    client: reqwest::Client,
}

impl Browser {
    async fn start() -> Browser {
        Self::start_with_home(None).await
    }

    /// With `home`, Chromium runs with that home directory, whose NSS database
    /// (`.pki/nssdb`) is where it looks for CAs to trust besides the system's.
    ///
    /// Chromedriver and Chromium run in a network namespace of their own (see
    /// [`Netns`]), and [`Browser::open`] relays the port of each URL it opens into it.
    async fn start_with_home(home: Option<&Path>) -> Browser {
        // The namespace is new, so any port is free in it.
        const DRIVER_PORT: u16 = 9515;
        let mut driver = Command::new("unshare");
        if let Some(home) = home {
            driver.env("HOME", home);
        }
        let driver = driver
            .args(["--net", "--", "sh", "-c"])
            .arg(format!(
                "ip link set lo up && exec chromedriver --port={DRIVER_PORT}"
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect(
                "unshare and chromedriver are installed (scripts/test.sh installs chromium-driver)",
            );
        let netns = Netns::of_process(driver.id().expect("chromedriver runs")).await;
        let port = netns.forward_out_of(DRIVER_PORT).await;
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        wait_for(
            "chromedriver to answer",
            Duration::from_secs(20),
            || async {
                let status: Value = client
                    .get(format!("{base}/status"))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .json()
                    .await
                    .map_err(|e| e.to_string())?;
                match status["value"]["ready"].as_bool() {
                    Some(true) => Ok(()),
                    _ => Err(status.to_string()),
                }
            },
        )
        .await;
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
            }
        }}});
        let created: Value = client
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await
            .expect("create session")
            .json()
            .await
            .expect("session JSON");
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_string();
        Browser {
            driver,
            netns,
            base,
            session,
            client,
        }
    }

    async fn command(&self, path: &str, body: Value) -> Value {
        let reply: Value = self
            .client
            .post(format!("{}/session/{}/{path}", self.base, self.session))
            .json(&body)
            .send()
            .await
            .expect("webdriver reachable")
            .json()
            .await
            .expect("webdriver JSON");
        reply["value"].clone()
    }

    /// Loads `url` (on the host's loopback), relaying its port into the browser's namespace.
    async fn open(&self, url: &str) {
        let parsed = url::Url::parse(url).unwrap_or_else(|err| panic!("{url}: {err}"));
        let port = parsed
            .port_or_known_default()
            .unwrap_or_else(|| panic!("{url} has no port"));
        self.netns.forward_into(port).await;
        self.command("url", json!({ "url": url })).await;
    }

    async fn script(&self, script: &str) -> Value {
        self.command("execute/sync", json!({ "script": script, "args": [] }))
            .await
    }

    /// Waits until `script` returns `true`, saying what it returned last otherwise.
    async fn until(&self, what: &str, script: &str) {
        wait_for(what, Duration::from_secs(30), || async {
            match self.script(script).await {
                Value::Bool(true) => Ok(()),
                other => Err(other),
            }
        })
        .await;
    }

    /// Runs `click` (which must open the page's confirmation dialog) and answers the
    /// dialog with the button `answer` (`confirm-ok` or `confirm-cancel`).
    async fn answer(&self, click: &str, answer: &str) {
        self.script(click).await;
        self.until(
            "the confirmation",
            "return document.getElementById('confirm').open",
        )
        .await;
        self.script(&format!("document.getElementById('{answer}').click()"))
            .await;
    }

    /// The page as it looks now, as PNG.
    async fn screenshot(&self) -> Vec<u8> {
        let reply: Value = self
            .client
            .get(format!("{}/session/{}/screenshot", self.base, self.session))
            .send()
            .await
            .expect("webdriver reachable")
            .json()
            .await
            .expect("webdriver JSON");
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(reply["value"].as_str().unwrap_or_default())
            .expect("a base64 PNG")
    }

    async fn close(mut self) {
        let _ = self
            .client
            .delete(format!("{}/session/{}", self.base, self.session))
            .send()
            .await;
        let _ = self.driver.kill().await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_browser_opens_the_backend_url_and_echoes_over_a_websocket() {
    run_test("browser", Db::Sqlite, |env: TestEnv| async move {
        let response = env.connect_ready("browser-doc", &env.spawn_config(&[])).await;
        let browser = Browser::start().await;
        browser.open(&response.url).await;
        let log = "return document.getElementById('log').textContent";
        wait_for("the page's WebSocket to connect", Duration::from_secs(20), || async {
            let text = browser.script(log).await;
            if text.as_str().unwrap_or("").contains("connected") { Ok(()) } else { Err(text) }
        })
        .await;
        let shown = browser.script("return document.getElementById('backend').textContent").await;
        assert_eq!(shown, response.backend_id.as_str());
        browser
            .script("document.getElementById('message').value = 'hi from chromium'; document.getElementById('send').click();")
            .await;
        wait_for("the echo to come back", Duration::from_secs(20), || async {
            let text = browser.script(log).await;
            if text.as_str().unwrap_or("").contains("echo: hi from chromium") { Ok(()) } else { Err(text) }
        })
        .await;
        browser.close().await;
        env
    })
    .await;
}

/// A home directory whose NSS database trusts `ca` to identify web sites: what Chromium on
/// Linux reads, so the CA is trusted by this browser run and nothing else on the machine.
async fn home_trusting(scratch: &Path, ca: &Path) -> PathBuf {
    let home = scratch.join("browser-home");
    let nssdb = home.join(".pki/nssdb");
    std::fs::create_dir_all(&nssdb).expect("nssdb dir");
    let db = format!("sql:{}", nssdb.display());
    let run = |args: Vec<String>| async move {
        let output = Command::new("certutil")
            .args(&args)
            .output()
            .await
            .expect("certutil is installed (scripts/test.sh installs libnss3-tools)");
        assert!(
            output.status.success(),
            "certutil {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(vec![
        "-d".into(),
        db.clone(),
        "-N".into(),
        "--empty-password".into(),
    ])
    .await;
    run(vec![
        "-d".into(),
        db,
        "-A".into(),
        "-t".into(),
        "C,,".into(),
        "-n".into(),
        "plane-dev-ca".into(),
        "-i".into(),
        ca.display().to_string(),
    ])
    .await;
    home
}

#[tokio::test]
async fn a_browser_opens_an_https_backend_of_plane_dev_and_echoes_over_wss() {
    tokio::time::timeout(Duration::from_secs(240), browser_over_https())
        .await
        .expect("finished within 240 s");
}

async fn browser_over_https() {
    let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("scratch/browser-https");
    let (mut dev, ca) = PlaneDev::start_https(&scratch).await;
    let controller = dev.field("controller");
    let connect: Value = reqwest::Client::new()
        .post(format!("{}/ctrl/connect", controller.trim_end_matches('/')))
        .json(&json!({
            "key": { "name": "browser-https" },
            "spawn_config": { "executable": { "image": "plane/demo:latest" } }
        }))
        .send()
        .await
        .expect("connect")
        .json()
        .await
        .expect("connect JSON");
    let url = connect["url"]
        .as_str()
        .unwrap_or_else(|| panic!("{connect}"))
        .to_string();
    assert!(url.starts_with("https://localhost:"), "{url}");

    let home = home_trusting(&scratch, &ca).await;
    let browser = Browser::start_with_home(Some(&home)).await;
    // Held at the proxy until the backend is ready; a certificate the browser did not
    // trust would show its interstitial page instead, which has no #log.
    let log = "return document.getElementById('log') ? document.getElementById('log').textContent : document.title";
    let logs = scratch.join("dev.log");
    browser.open(&url).await;
    let what = format!(
        "the page's wss:// WebSocket to connect (plane dev's log: {})",
        logs.display()
    );
    wait_for(&what, Duration::from_secs(60), || async {
        let text = browser.script(log).await;
        match text.as_str().unwrap_or("").contains("connected") {
            true => Ok(()),
            false => Err(text),
        }
    })
    .await;
    let protocol = browser.script("return location.protocol").await;
    assert_eq!(protocol, json!("https:"));
    browser
        .script("document.getElementById('message').value = 'hi over wss'; document.getElementById('send').click();")
        .await;
    let what = format!(
        "the echo to come back (plane dev's log: {})",
        logs.display()
    );
    wait_for(&what, Duration::from_secs(20), || async {
        let text = browser.script(log).await;
        match text.as_str().unwrap_or("").contains("echo: hi over wss") {
            true => Ok(()),
            false => Err(text),
        }
    })
    .await;
    browser.close().await;
    let status = dev.stop().await;
    assert!(status.success(), "plane dev exit: {status}");
}

const DASHBOARD_TOKEN: &str = "tok-dashboard";

#[tokio::test(flavor = "current_thread")]
async fn an_operator_signs_in_watches_a_backend_become_ready_and_terminates_it_from_the_dashboard()
{
    run_test("dashboard", Db::Sqlite, |env: TestEnv| async move {
        let cluster: plane_protocol::names::ClusterName =
            "dashboard.test:1".parse().expect("cluster");
        let sqlite = env.scratch.join("dashboard.db").display().to_string();
        let controller = env
            .start_controller_with(|config| {
                config.db = sqlite;
                config.default_cluster = Some(cluster.clone());
                config.ctrl_tokens = vec![DASHBOARD_TOKEN.to_string()];
            })
            .await;
        let base = controller.url();
        let mut drone_config = env.drone_config("dr-dash");
        drone_config.cluster = cluster.clone();
        let mut with_token = base.clone();
        with_token.set_username(DASHBOARD_TOKEN).expect("user-info");
        drone_config.controller_url = with_token;
        let drone_name = drone_config.name.clone();
        let _drone = plane_drone::start(drone_config).await.expect("drone");
        let api = |path: &str| base.join(path).expect("url");
        let state_url = api(&format!("/ctrl/c/{cluster}/state"));
        let cluster_state = || async {
            env.client
                .get(state_url.clone())
                .bearer_auth(DASHBOARD_TOKEN)
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json::<plane_protocol::api::ClusterState>()
                .await
                .map_err(|e| e.to_string())
        };
        wait_for("the drone to connect", Duration::from_secs(20), || async {
            let state = cluster_state().await?;
            match state.drones.iter().any(|d| d.ready) {
                true => Ok(()),
                false => Err(format!("{state:?}")),
            }
        })
        .await;

        let browser = Browser::start().await;
        let steps = dashboard_steps(&env, &browser, &base, &cluster, &drone_name, &cluster_state);
        let outcome =
            futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(steps)).await;
        if let Err(panic) = outcome {
            let shot = browser.screenshot().await;
            let path = env.scratch.join("dashboard-failure.png");
            std::fs::write(&path, &shot).expect("write the screenshot");
            eprintln!(
                "the dashboard as it was when the test failed: {}",
                path.display()
            );
            std::panic::resume_unwind(panic);
        }
        browser.close().await;
        env
    })
    .await;
}

async fn dashboard_steps<F, Fut>(
    env: &TestEnv,
    browser: &Browser,
    base: &url::Url,
    cluster: &plane_protocol::names::ClusterName,
    drone: &plane_protocol::names::NodeName,
    cluster_state: &F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<plane_protocol::api::ClusterState, String>>,
{
    let page = base.join("/ctrl/ui/").expect("url");
    browser.open(page.as_str()).await;
    browser
        .until(
            "the sign-in form",
            "return !document.getElementById('login').hidden",
        )
        .await;
    // A wrong token is refused on the form.
    browser
        .script("document.getElementById('token').value = 'wrong'; document.getElementById('login-form').requestSubmit();")
        .await;
    browser
        .until(
            "the refusal",
            "return document.getElementById('login-error').textContent.includes('does not accept')",
        )
        .await;
    browser
        .script(&format!("document.getElementById('token').value = '{DASHBOARD_TOKEN}'; document.getElementById('login-form').requestSubmit();"))
        .await;
    browser
        .until(
            "the overview, live",
            "return !document.getElementById('overview').hidden && document.getElementById('connection').textContent === 'live'",
        )
        .await;
    // The token is in the tab's session, never in the URL.
    let href = browser.script("return location.href").await;
    assert!(
        !href.as_str().unwrap_or_default().contains(DASHBOARD_TOKEN),
        "{href}"
    );
    let kept = browser
        .script("return sessionStorage.getItem('plane-ctrl-token')")
        .await;
    assert_eq!(kept, DASHBOARD_TOKEN);
    browser
        .until(
            "the drone listed, ready",
            &format!("const row = document.querySelector('tr[data-drone=\"{drone}\"]'); return !!row && row.querySelector('.state').textContent === 'ready'"),
        )
        .await;
    // Marks this page load: a reload would lose it.
    browser.script("window.sameLoad = true").await;

    let mut spawn = env.spawn_config(&[]);
    spawn.cluster = Some(cluster.clone());
    let connected: Value = env
        .client
        .post(base.join("/ctrl/connect").expect("url"))
        .bearer_auth(DASHBOARD_TOKEN)
        .json(&json!({ "key": { "name": "dash-doc", "namespace": "team" }, "spawn_config": spawn }))
        .send()
        .await
        .expect("connect")
        .json()
        .await
        .expect("connect JSON");
    let backend = connected["backend_id"]
        .as_str()
        .expect("backend id")
        .to_string();
    let row = format!("document.querySelector('tr[data-backend=\"{backend}\"]')");
    browser
        .until(
            "the connect's backend to appear and turn ready on the open page",
            &format!("const row = {row}; return !!row && row.querySelector('.status').textContent === 'ready' && row.querySelector('.key').textContent === 'team/dash-doc' && window.sameLoad === true"),
        )
        .await;

    // Its page shows its history, up to ready.
    browser
        .script(&format!("{row}.querySelector('a').click()"))
        .await;
    browser
        .until(
            "the backend's page with its history",
            "const statuses = [...document.querySelectorAll('#history tbody tr')].map(r => r.dataset.status); return !document.getElementById('backend').hidden && statuses[0] === 'scheduled' && statuses.includes('ready')",
        )
        .await;

    // Terminate asks first; cancelling does nothing.
    let terminate =
        "document.querySelector('#backend-actions button[data-action=\"terminate\"]').click()";
    browser.answer(terminate, "confirm-cancel").await;
    browser
        .until(
            "the dialog closed",
            "return !document.getElementById('confirm').open",
        )
        .await;
    let status_url = base.join(&format!("/pub/b/{backend}/status")).expect("url");
    let status = || async {
        let entry: Value = env
            .client
            .get(status_url.clone())
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<String, String>(entry["status"].as_str().unwrap_or_default().to_string())
    };
    crate::harness::holds_for(
        "the backend to stay ready after the cancel",
        Duration::from_secs(2),
        || async {
            match status().await?.as_str() {
                "ready" => Ok(()),
                other => Err(other.to_string()),
            }
        },
    )
    .await;
    browser.answer(terminate, "confirm-ok").await;
    wait_for(
        "the backend to terminate",
        Duration::from_secs(30),
        || async {
            match status().await?.as_str() {
                "terminated" => Ok(()),
                other => Err(other.to_string()),
            }
        },
    )
    .await;
    browser
        .until(
            "terminated on its page, with the reason",
            "return document.getElementById('backend-status')?.textContent === 'terminated' && [...document.querySelectorAll('#history tbody tr')].some(r => r.dataset.status === 'terminated')",
        )
        .await;

    // Back on the overview: drain the drone, confirmed.
    browser.script("location.hash = ''").await;
    browser
        .until(
            "the ended backend in the overview",
            &format!("const row = {row}; return !!row && row.querySelector('.status').textContent === 'terminated' && row.querySelector('.reason').textContent.startsWith('external')"),
        )
        .await;
    browser
        .answer(
            &format!("document.querySelector('tr[data-drone=\"{drone}\"] button[data-action=\"drain\"]').click()"),
            "confirm-ok",
        )
        .await;
    wait_for(
        "the drone to be draining",
        Duration::from_secs(20),
        || async {
            let state = cluster_state().await?;
            match state.drones.iter().any(|d| d.draining) {
                true => Ok(()),
                false => Err(format!("{state:?}")),
            }
        },
    )
    .await;
    browser
        .until(
            "the drone shown draining",
            &format!("const row = document.querySelector('tr[data-drone=\"{drone}\"]'); return !!row && row.querySelector('.state').textContent === 'draining'"),
        )
        .await;
}
