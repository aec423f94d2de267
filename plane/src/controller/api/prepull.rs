//! `POST /ctrl/c/:cluster/prepull`: every drone of the cluster pulls an image now (Deis'
//! "preseed" step, on demand), and the answer says, per drone, how it went.

use super::body::ApiJson;
use super::paths::ClusterPath;
use crate::controller::error::{ApiErrorResponse, ControllerError};
use crate::controller::store::NodeKind;
use crate::controller::ControllerState;
use axum::extract::State;
use axum::Json;
use plane_protocol::api::{DronePrepull, PrepullOutcome, PrepullRequest, PrepullResult};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const DEFAULT_TIMEOUT_SECONDS: u64 = 300;
const MAX_TIMEOUT_SECONDS: u64 = 3600;

pub async fn handle_prepull(
    State(state): State<ControllerState>,
    ClusterPath(cluster): ClusterPath,
    ApiJson(request): ApiJson<PrepullRequest>,
) -> Result<Json<PrepullResult>, ApiErrorResponse> {
    let image = request.image.trim();
    if image.is_empty() || image.len() > 1024 || image.chars().any(char::is_whitespace) {
        return Err(ControllerError::invalid(
            "image must be an image reference of 1 to 1024 characters without spaces",
        )
        .into());
    }
    let timeout = request.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS);
    if !(1..=MAX_TIMEOUT_SECONDS).contains(&timeout) {
        return Err(ControllerError::invalid(format!(
            "timeout_seconds must be 1 to {MAX_TIMEOUT_SECONDS}, got {timeout}"
        ))
        .into());
    }

    let known = state
        .store()
        .nodes(&cluster, NodeKind::Drone)
        .await
        .map_err(ControllerError::from)?;
    let started = Instant::now();
    let (mut wait, asked) =
        state
            .nodes()
            .start_prepull(&cluster, image, request.credentials.clone());
    tracing::info!(%cluster, %image, drones = asked.len(), "prepull asked");
    let mut results: BTreeMap<_, DronePrepull> = BTreeMap::new();
    for drone in &asked {
        results.insert(
            drone.clone(),
            DronePrepull {
                drone: drone.clone(),
                outcome: PrepullOutcome::Pending,
                error: None,
                millis: None,
            },
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let mut remaining = asked.len();
    while remaining > 0 {
        let answer = tokio::time::timeout_at(deadline, wait.answers.recv()).await;
        let Ok(Some((drone, error))) = answer else {
            break;
        };
        if let Some(entry) = results.get_mut(&drone) {
            if entry.outcome == PrepullOutcome::Pending {
                remaining -= 1;
            }
            entry.outcome = if error.is_some() {
                PrepullOutcome::Failed
            } else {
                PrepullOutcome::Pulled
            };
            entry.error = error;
            entry.millis = Some(started.elapsed().as_millis() as u64);
        }
    }
    // Asked, unanswered and no longer connected here: its session ended mid-pull.
    let still_here = state.nodes().drones_connected(&cluster);
    for entry in results.values_mut() {
        if entry.outcome == PrepullOutcome::Pending && !still_here.contains(&entry.drone) {
            entry.outcome = PrepullOutcome::Disconnected;
        }
    }
    // Connected drones this controller could not ask.
    for node in known {
        if node.connected_to.is_some() && !results.contains_key(&node.name) {
            results.insert(
                node.name.clone(),
                DronePrepull {
                    drone: node.name,
                    outcome: PrepullOutcome::NotReached,
                    error: None,
                    millis: None,
                },
            );
        }
    }
    Ok(Json(PrepullResult {
        image: image.to_string(),
        drones: results.into_values().collect(),
    }))
}
