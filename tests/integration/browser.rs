//! A real browser (headless Chromium driven over WebDriver) opens a backend's URL through
//! the proxy, runs the demo page, and echoes a message over a WebSocket: over plain HTTP, and
//! over HTTPS and `wss://` with `plane dev --https`, trusting its CA for that run only.

use crate::harness::{run_test, wait_for, Db, PlaneDev, TestEnv};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

/// A chromedriver process and one browser session in it; both end on drop.
struct Browser {
    driver: Child,
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
    async fn start_with_home(home: Option<&Path>) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut driver = Command::new("chromedriver");
        if let Some(home) = home {
            driver.env("HOME", home);
        }
        let driver = driver
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver is installed (scripts/test.sh installs chromium-driver)");
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        wait_for(
            "chromedriver to answer",
            Duration::from_secs(20),
            || async {
                client
                    .get(format!("{base}/status"))
                    .send()
                    .await
                    .map_err(|e| e.to_string())
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

    async fn open(&self, url: &str) {
        self.command("url", json!({ "url": url })).await;
    }

    async fn script(&self, script: &str) -> Value {
        self.command("execute/sync", json!({ "script": script, "args": [] }))
            .await
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
    // Under the full suite the browser has been seen to close the page's connections a
    // second after they opened (the proxy's log shows the client going without a TLS
    // goodbye), most likely Chromium dropping its sockets on a network change: the other
    // tests start containers, each a new network interface, all the time. So a page whose
    // load failed (Chromium's error page, titled with the host) or whose socket closed
    // before the echo is loaded again, up to three times.
    let mut attempt = 0;
    loop {
        attempt += 1;
        browser.open(&url).await;
        let what = format!(
            "the page's wss:// WebSocket to connect (plane dev's log: {})",
            logs.display()
        );
        let loaded = wait_for(&what, Duration::from_secs(60), || async {
            let text = browser.script(log).await;
            let text = text.as_str().unwrap_or("").to_string();
            let has_log = browser
                .script("return !!document.getElementById('log')")
                .await;
            if text.contains("connected") {
                Ok(true)
            } else if has_log == json!(false) && text == "localhost" && attempt < 3 {
                Ok(false)
            } else {
                Err(text)
            }
        })
        .await;
        if !loaded {
            eprintln!("the browser could not load the page (attempt {attempt}); loading it again");
            continue;
        }
        let protocol = browser.script("return location.protocol").await;
        assert_eq!(protocol, json!("https:"));
        browser
            .script("document.getElementById('message').value = 'hi over wss'; document.getElementById('send').click();")
            .await;
        let what = format!(
            "the echo to come back (plane dev's log: {})",
            logs.display()
        );
        let outcome = wait_for(&what, Duration::from_secs(20), || async {
            let text = browser.script(log).await;
            let text = text.as_str().unwrap_or("").to_string();
            if text.contains("echo: hi over wss") {
                Ok(true)
            } else if text.contains("closed") && attempt < 3 {
                Ok(false)
            } else {
                Err(text)
            }
        })
        .await;
        if outcome {
            break;
        }
        eprintln!("the browser closed the page's WebSocket (attempt {attempt}); loading it again");
    }
    browser.close().await;
    let status = dev.stop().await;
    assert!(status.success(), "plane dev exit: {status}");
}
