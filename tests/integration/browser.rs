//! A real browser (headless Chromium driven over WebDriver) opens a backend's URL through
//! the proxy, runs the demo page, and echoes a message over a WebSocket.

use crate::harness::{run_test, wait_for, Db, TestEnv};
use serde_json::{json, Value};
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
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let driver = Command::new("chromedriver")
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
