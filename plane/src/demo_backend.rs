//! The demo backend: a tiny HTTP + WebSocket app that `plane dev` packages into an image,
//! and that the test suite uses as its backend.
//!
//! - `GET /` serves a page that shows the backend's identity and echoes over a WebSocket.
//! - `GET /ws` is a WebSocket echo.
//! - `POST /exit/{code}` makes the process exit with that code.
//! - `POST /print/{count}` prints that many numbered lines to stdout (`?stream=stderr`:
//!   to stderr), for tests of logs.
//! - `POST /.plane/claim` takes a warm-pool claim (`{backend_id, key, fencing_token,
//!   static_token}`): the first is kept, a repeat of it is accepted again, a different one
//!   is refused (409), as the claim protocol asks; `GET /.plane/claim` shows the one kept.
//! - Any other path answers with a JSON echo of the request (method, path, query, headers,
//!   body), so callers can see exactly what reached the backend.
//!
//! Behaviour knobs for tests, read from the environment:
//! `DEMO_IGNORE_SIGTERM=1` ignores SIGTERM; `DEMO_EXIT_AFTER_MS=n` exits after n ms with
//! `DEMO_EXIT_CODE` (default 0); `DEMO_STARTUP_DELAY_MS=n` waits before listening;
//! `DEMO_REFUSE_CLAIM=1` refuses every claim.

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Request};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::time::Duration;

fn env_flag(name: &str) -> bool {
    matches!(std::env::var(name).as_deref(), Ok("1") | Ok("true"))
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Runs the demo backend on `0.0.0.0:$PORT` until SIGTERM (unless told to ignore it).
pub async fn run() -> anyhow::Result<()> {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080);
    if let Some(delay) = env_number("DEMO_STARTUP_DELAY_MS") {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if let Some(after) = env_number("DEMO_EXIT_AFTER_MS") {
        let code = env_number("DEMO_EXIT_CODE").unwrap_or(0) as i32;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(after)).await;
            std::process::exit(code);
        });
    }

    let app = Router::new()
        .route("/", get(page))
        .route("/ws", get(websocket_echo))
        .route("/exit/{code}", post(exit_with))
        .route("/alloc/{mib}", post(allocate))
        .route("/threads/{count}", post(start_threads))
        .route("/print/{count}", post(print_lines))
        .route("/data/{name}", get(read_data).put(write_data))
        .route("/.plane/claim", get(show_claim).post(take_claim))
        .fallback(echo);
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .with_context(|| format!("binding port {port}"))?;
    eprintln!("demo backend listening on port {port}");

    // As PID 1 in a container, SIGTERM only ends us if we handle it ourselves.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    let ignore_sigterm = env_flag("DEMO_IGNORE_SIGTERM");
    let shutdown = async move {
        loop {
            sigterm.recv().await;
            if ignore_sigterm {
                eprintln!("SIGTERM received and ignored (DEMO_IGNORE_SIGTERM)");
            } else {
                eprintln!("SIGTERM received; exiting");
                return;
            }
        }
    };
    tokio::select! {
        result = axum::serve(listener, app) => result.context("serving")?,
        _ = shutdown => {}
    }
    Ok(())
}

/// The warm-pool claim this backend accepted, if it was started warm and claimed.
static CLAIM: std::sync::Mutex<Option<serde_json::Value>> = std::sync::Mutex::new(None);

async fn take_claim(Json(claim): Json<serde_json::Value>) -> impl IntoResponse {
    use axum::http::StatusCode;
    if env_flag("DEMO_REFUSE_CLAIM") {
        return (
            StatusCode::CONFLICT,
            Json(json!({"error": "this backend refuses claims (DEMO_REFUSE_CLAIM)"})),
        );
    }
    let mut kept = CLAIM.lock().unwrap_or_else(|e| e.into_inner());
    match kept.as_ref() {
        Some(existing) if *existing != claim => (
            StatusCode::CONFLICT,
            Json(json!({"error": "already claimed", "claim": existing})),
        ),
        _ => {
            println!("claimed: {claim}");
            *kept = Some(claim.clone());
            (StatusCode::OK, Json(json!({"accepted": true})))
        }
    }
}

async fn show_claim() -> Json<serde_json::Value> {
    Json(
        CLAIM
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default(),
    )
}

async fn page() -> Html<String> {
    let backend = std::env::var("SESSION_BACKEND_ID").unwrap_or_else(|_| "(unknown)".into());
    // A warm backend learns its key from its claim, not its environment.
    let claimed_key = CLAIM
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|claim| claim["key"].as_str().map(str::to_string));
    let key = claimed_key
        .or_else(|| std::env::var("SESSION_BACKEND_KEY").ok())
        .unwrap_or_else(|| "(none)".into());
    let (backend, key) = (escape_html(&backend), escape_html(&key));
    Html(format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>Plane demo backend</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 2em auto">
<h1>Hello from a Plane backend</h1>
<p>Backend <code id="backend">{backend}</code>, key <code id="key">{key}</code>.</p>
<p>WebSocket echo: <input id="message" value="hello"> <button id="send">send</button></p>
<pre id="log"></pre>
<script>
  const log = (line) => document.getElementById('log').textContent += line + '\n';
  const url = new URL('ws', location.href);
  url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const socket = new WebSocket(url);
  socket.onopen = () => log('connected');
  socket.onmessage = (event) => log('echo: ' + event.data);
  socket.onclose = () => log('closed');
  document.getElementById('send').onclick = () => socket.send(document.getElementById('message').value);
</script>
</body></html>"#
    ))
}

/// The text as HTML text: keys are the app's to choose and may hold markup.
fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn websocket_echo(upgrade: WebSocketUpgrade) -> impl IntoResponse {
    upgrade.on_upgrade(|mut socket: WebSocket| async move {
        while let Some(Ok(message)) = socket.recv().await {
            let reply = match message {
                Message::Text(_) | Message::Binary(_) => message,
                Message::Close(_) => break,
                _ => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    })
}

async fn exit_with(Path(code): Path<i32>) -> impl IntoResponse {
    tokio::spawn(async move {
        // Let the response go out first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::process::exit(code);
    });
    Json(json!({ "exiting_with": code }))
}

/// Allocates `mib` MiB and touches every page (so it is really resident), then keeps it:
/// lets tests run a backend out of memory.
async fn allocate(Path(mib): Path<usize>) -> impl IntoResponse {
    static HELD: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
    let block = vec![1u8; mib.saturating_mul(1024 * 1024)];
    HELD.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(block);
    Json(json!({ "allocated_mib": mib }))
}

/// Tries to start `count` threads that sleep for a minute; says how many started: lets
/// tests see a process limit bite.
async fn start_threads(Path(count): Path<usize>) -> impl IntoResponse {
    let started = (0..count)
        .take_while(|_| {
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(|| std::thread::sleep(Duration::from_secs(60)))
                .is_ok()
        })
        .count();
    Json(json!({ "requested": count, "started": started }))
}

/// Prints `line <i> of <count>` for i = 1..=count, to stdout or (`?stream=stderr`) stderr;
/// answers once every line is written.
async fn print_lines(
    Path(count): Path<u64>,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> impl IntoResponse {
    use std::io::Write;
    let to_stderr = query.get("stream").map(String::as_str) == Some("stderr");
    let written = tokio::task::spawn_blocking(move || {
        let mut out: Box<dyn Write> = if to_stderr {
            Box::new(std::io::stderr().lock())
        } else {
            Box::new(std::io::stdout().lock())
        };
        for i in 1..=count {
            writeln!(out, "line {i} of {count}")?;
        }
        out.flush()
    })
    .await;
    match written {
        Ok(Ok(())) => Json(json!({ "printed": count })).into_response(),
        _ => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// A file in the backend's volume (`/plane-data`), for tests of mounts.
fn data_path(name: &str) -> Option<std::path::PathBuf> {
    let plain = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    plain.then(|| std::path::Path::new("/plane-data").join(name))
}

async fn write_data(Path(name): Path<String>, body: Bytes) -> impl IntoResponse {
    let Some(path) = data_path(&name) else {
        return (axum::http::StatusCode::BAD_REQUEST, "bad name".to_string());
    };
    match std::fs::write(&path, &body) {
        Ok(()) => (axum::http::StatusCode::OK, format!("wrote {}", body.len())),
        Err(err) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            err.to_string(),
        ),
    }
}

async fn read_data(Path(name): Path<String>) -> impl IntoResponse {
    let Some(path) = data_path(&name) else {
        return (axum::http::StatusCode::BAD_REQUEST, "bad name".to_string());
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => (axum::http::StatusCode::OK, text),
        Err(err) => (axum::http::StatusCode::NOT_FOUND, err.to_string()),
    }
}

async fn echo(request: Request) -> impl IntoResponse {
    let (parts, body) = request.into_parts();
    let body: Bytes = axum::body::to_bytes(body, 16 * 1024 * 1024)
        .await
        .unwrap_or_default();
    Json(json!({
        "method": parts.method.as_str(),
        "version": format!("{:?}", parts.version),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers_json(&parts.headers),
        "body": String::from_utf8_lossy(&body),
        "backend_id": std::env::var("SESSION_BACKEND_ID").ok(),
        "env": {
            "SESSION_BACKEND_KEY": std::env::var("SESSION_BACKEND_KEY").ok(),
            "SESSION_BACKEND_FENCING_TOKEN": std::env::var("SESSION_BACKEND_FENCING_TOKEN").ok(),
            "SESSION_BACKEND_STATIC_TOKEN": std::env::var("SESSION_BACKEND_STATIC_TOKEN").ok(),
            "DEMO_GREETING": std::env::var("DEMO_GREETING").ok(),
        },
    }))
}

/// Headers as a JSON object; repeated headers are joined with ", ".
fn headers_json(headers: &HeaderMap) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match map.get_mut(name.as_str()) {
            Some(serde_json::Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(&value);
            }
            _ => {
                map.insert(name.as_str().to_string(), serde_json::Value::String(value));
            }
        }
    }
    serde_json::Value::Object(map)
}
