//! `GET /pub/b/:backend/status` and `/status-stream`: a backend's current status, and its
//! history followed by live changes as server-sent events.

use super::paths::BackendPath;
use crate::controller::error::ApiErrorResponse;
use crate::controller::ControllerState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use futures_util::Stream;
use plane_protocol::backend::{BackendStatus, BackendStatusStreamEntry};
use plane_protocol::names::BackendName;
use std::convert::Infallible;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

#[utoipa::path(
    get,
    path = "/pub/b/{backend}/status",
    operation_id = "backend_status",
    tag = "public",
    params(("backend" = plane_protocol::names::BackendName, Path, description = "The backend's ID.")),
    responses(
        (status = 200, description = "The backend's latest status.", body = plane_protocol::backend::BackendStatusStreamEntry),
        (status = 404, description = "No such backend.", body = plane_protocol::api::ApiError),
    ),
)]
pub async fn handle_status(
    State(state): State<ControllerState>,
    path: BackendPath,
) -> Result<Json<BackendStatusStreamEntry>, ApiErrorResponse> {
    path.check_cluster(&state).await?;
    let backend = path.backend;
    let history = state.store().status_history(&backend).await?;
    history
        .into_iter()
        .last()
        .map(Json)
        .ok_or_else(|| ApiErrorResponse::not_found(format!("no backend {backend}")))
}

/// Replays the history (after `Last-Event-ID`, if given), then streams each new status.
/// The stream ends after `terminated`; a client resuming after that gets a stream that stays
/// open and silent (keep-alive comments only) rather than one that ends at once. Event IDs are status numbers, so a client that
/// reconnects with `Last-Event-ID` gets exactly what it missed.
#[utoipa::path(
    get,
    path = "/pub/b/{backend}/status-stream",
    operation_id = "backend_status_stream",
    tag = "public",
    params(
        ("backend" = plane_protocol::names::BackendName, Path, description = "The backend's ID."),
        ("Last-Event-ID" = Option<u32>, Header, maximum = 2147483647, description = "The last status number seen: the stream starts after it."),
    ),
    responses(
        (status = 200, description = "Server-sent events, one `BackendStatusStreamEntry` as JSON in each, with the status number as event ID; the stream ends after `terminated`.", content_type = "text/event-stream", body = String),
        (status = 404, description = "No such backend.", body = plane_protocol::api::ApiError),
    ),
)]
pub async fn handle_status_stream(
    State(state): State<ControllerState>,
    path: BackendPath,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiErrorResponse> {
    path.check_cluster(&state).await?;
    let backend = path.backend;
    let last_seen = match headers.get("last-event-id") {
        None => 0,
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .and_then(|v| i32::try_from(v).ok())
            .ok_or_else(|| {
                ApiErrorResponse::bad_request("Last-Event-ID must be an event id from this stream")
            })?,
    };
    // Subscribe before reading history so nothing falls between the two.
    let changes = state.bus().subscribe_status();
    let history = state.store().status_history(&backend).await?;
    if history.is_empty() {
        return Err(ApiErrorResponse::not_found(format!("no backend {backend}")));
    }

    let (sender, receiver) = mpsc::channel(16);
    tokio::spawn(stream_statuses(
        state, backend, history, changes, last_seen, sender,
    ));
    Ok(Sse::new(ReceiverStream::new(receiver)).keep_alive(KeepAlive::default()))
}

/// Feeds one status stream until `terminated`, the client leaves, or shutdown.
async fn stream_statuses(
    state: ControllerState,
    backend: BackendName,
    history: Vec<BackendStatusStreamEntry>,
    mut changes: broadcast::Receiver<std::sync::Arc<crate::controller::store::StatusChange>>,
    mut last_sent: i32,
    sender: mpsc::Sender<Result<Event, Infallible>>,
) {
    // Sends entries newer than the last one sent; returns false once the stream is over.
    // Health entries repeat `ready`'s number, so they go without an event ID (a client's
    // Last-Event-ID stays its last status); `health_sent` counts those sent since, so a
    // replay of the history (`replay`) skips them and a live one is always new.
    async fn send_newer(
        entries: impl IntoIterator<Item = BackendStatusStreamEntry>,
        last_sent: &mut i32,
        health_sent: &mut usize,
        replay: bool,
        sender: &mpsc::Sender<Result<Event, Infallible>>,
    ) -> bool {
        let mut health_seen = 0;
        for entry in entries {
            let number = entry.status.number();
            let event = if number > *last_sent {
                *health_sent = 0;
                health_seen = 0;
                Event::default().id(number.to_string())
            } else if number == *last_sent && entry.health.is_some() {
                health_seen += 1;
                if replay && health_seen <= *health_sent {
                    continue;
                }
                *health_sent += 1;
                Event::default()
            } else {
                continue;
            };
            let Ok(event) = event.json_data(&entry) else {
                return false;
            };
            if sender.send(Ok(event)).await.is_err() {
                return false; // the client went away
            }
            *last_sent = number;
            if entry.status == BackendStatus::Terminated {
                return false;
            }
        }
        true
    }

    let already_over = history
        .last()
        .is_some_and(|entry| entry.status == BackendStatus::Terminated);
    if already_over && last_sent >= BackendStatus::Terminated.number() {
        // The client resumed after the end. Closing now would have it reconnect at once,
        // forever (Plane 0.5's client does exactly that), so leave it an open stream with
        // nothing more to say, as Plane's own streams are, until it hangs up.
        tokio::select! {
            _ = state.shutdown_token().cancelled() => {}
            _ = sender.closed() => {}
        }
        return;
    }
    let mut health_sent = 0;
    if !send_newer(history, &mut last_sent, &mut health_sent, true, &sender).await || already_over {
        // Over: terminated was just sent.
        return;
    }
    loop {
        let received = tokio::select! {
            _ = state.shutdown_token().cancelled() => return,
            _ = sender.closed() => return,
            received = changes.recv() => received,
        };
        let more = match received {
            Ok(change) if change.backend_id == backend => {
                let entry = change.entry.clone();
                send_newer([entry], &mut last_sent, &mut health_sent, false, &sender).await
            }
            Ok(_) => true,
            // We fell behind the broadcast: catch up from the database.
            Err(broadcast::error::RecvError::Lagged(_)) => {
                match state.store().status_history(&backend).await {
                    Ok(history) => {
                        send_newer(history, &mut last_sent, &mut health_sent, true, &sender).await
                    }
                    Err(err) => {
                        tracing::warn!(%backend, error = %err, "status stream catch-up failed");
                        false
                    }
                }
            }
            Err(broadcast::error::RecvError::Closed) => false,
        };
        if !more {
            return;
        }
    }
}
