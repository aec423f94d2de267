//! What the dashboard reads: `GET /ctrl/overview` (every cluster's nodes and the recent
//! backends), `/ctrl/overview-stream` (the same, again after every change), and
//! `GET /ctrl/b/:backend` (one backend with its status history).

use super::cluster::cluster_state;
use super::paths::BackendPath;
use crate::controller::error::ApiErrorResponse;
use crate::controller::store::{BackendRow, StoreError};
use crate::controller::ControllerState;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use futures_util::Stream;
use plane_protocol::api::{BackendDetails, BackendInfo, BackendKey, Overview, OVERVIEW_BACKENDS};
use plane_protocol::time::Millis;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// Terminated backends stay in the overview this long after they ended.
const RECENTLY_ENDED_MS: u64 = 60 * 60 * 1000;

/// How long the stream gathers status changes into one new overview: a burst of connects
/// costs one read of the store per viewer, not one per change.
const COALESCE: Duration = Duration::from_millis(250);

/// A fresh overview at least this often, for what the change bus does not carry (a drone
/// connecting, draining or falling silent; heartbeat ages).
const REFRESH: Duration = Duration::from_secs(5);

#[utoipa::path(
    get,
    path = "/ctrl/overview",
    operation_id = "overview",
    tag = "cluster",
    responses((status = 200, description = "Every cluster with a node, and the backends live or ended in the last hour (newest first, at most 500).", body = plane_protocol::api::Overview)),
)]
pub async fn handle_overview(
    State(state): State<ControllerState>,
) -> Result<Json<Overview>, ApiErrorResponse> {
    Ok(Json(overview(&state).await?))
}

#[utoipa::path(
    get,
    path = "/ctrl/overview-stream",
    operation_id = "overview_stream",
    tag = "cluster",
    responses((status = 200, description = "Server-sent events, each a whole `Overview` as JSON: one at once, then one after each burst of status changes and at least every 5 s.", content_type = "text/event-stream", body = String)),
)]
pub async fn handle_overview_stream(
    State(state): State<ControllerState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (sender, receiver) = mpsc::channel(2);
    tokio::spawn(stream_overviews(state, sender));
    Sse::new(ReceiverStream::new(receiver)).keep_alive(KeepAlive::default())
}

#[utoipa::path(
    get,
    path = "/ctrl/b/{backend}",
    operation_id = "backend",
    tag = "backends",
    params(("backend" = plane_protocol::names::BackendName, Path, description = "The backend's ID.")),
    responses(
        (status = 200, description = "The backend and its status history.", body = plane_protocol::api::BackendDetails),
        (status = 404, description = "No such backend.", body = plane_protocol::api::ApiError),
    ),
)]
pub async fn handle_backend(
    State(state): State<ControllerState>,
    path: BackendPath,
) -> Result<Json<BackendDetails>, ApiErrorResponse> {
    path.check_cluster(&state).await?;
    let store = state.store();
    let Some(row) = store.backend(&path.backend).await? else {
        return Err(ApiErrorResponse::not_found(format!(
            "no backend {}",
            path.backend
        )));
    };
    let history = store.status_history(&path.backend).await?;
    Ok(Json(BackendDetails {
        backend: info(row),
        history,
    }))
}

async fn overview(state: &ControllerState) -> Result<Overview, StoreError> {
    let store = state.store();
    let now = Millis::now();
    let mut clusters = Vec::new();
    for cluster in store.clusters().await? {
        clusters.push(cluster_state(state, cluster).await?);
    }
    // Live backends first, so ended ones never push a live one out.
    let (live, ended) = store
        .recent_backends(
            now.minus_millis(RECENTLY_ENDED_MS),
            OVERVIEW_BACKENDS as i64 + 1,
        )
        .await?;
    let mut rows = live;
    rows.extend(ended);
    let backends_truncated = rows.len() > OVERVIEW_BACKENDS;
    rows.truncate(OVERVIEW_BACKENDS);
    Ok(Overview {
        clusters,
        backends: rows.into_iter().map(info).collect(),
        backends_truncated,
        time: now,
    })
}

fn info(row: BackendRow) -> BackendInfo {
    BackendInfo {
        key: row.key_name.map(|name| BackendKey {
            name,
            namespace: row.key_namespace.unwrap_or_default(),
        }),
        backend_id: row.id,
        cluster: row.cluster,
        pool: row.pool,
        drone: row.drone,
        status: row.status,
        status_time: row.status_time,
        created_at: row.created_at,
        last_active_at: row.last_active_at,
        termination_kind: row.termination_kind,
        termination_reason: row.termination_reason,
        exit_code: row.exit_code,
        message: row.message,
        subdomain: row.subdomain,
    }
}

/// Sends an overview now, then after each burst of status changes and every [`REFRESH`],
/// until the client leaves or the controller stops.
async fn stream_overviews(state: ControllerState, sender: mpsc::Sender<Result<Event, Infallible>>) {
    let mut changes = state.bus().subscribe_status();
    loop {
        let event = match overview(&state).await {
            Ok(overview) => Event::default().json_data(&overview),
            Err(err) => {
                tracing::warn!(error = %err, "overview stream: reading the store failed");
                return; // the client reconnects
            }
        };
        let Ok(event) = event else { return };
        if sender.send(Ok(event)).await.is_err() {
            return;
        }
        // Wait for a change (or the refresh), then let the burst it starts settle.
        let changed = tokio::select! {
            _ = state.shutdown_token().cancelled() => return,
            _ = sender.closed() => return,
            _ = tokio::time::sleep(REFRESH) => false,
            received = changes.recv() => match received {
                // Lagged: changes were missed, which the next read covers.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => true,
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if changed {
            tokio::time::sleep(COALESCE).await;
            // Everything queued meanwhile is in the overview about to be read.
            while !matches!(
                changes.try_recv(),
                Err(broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed)
            ) {}
        }
    }
}
