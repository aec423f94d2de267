//! `POST /ctrl/c/:cluster/prepull`: every drone of the cluster pulls an image now (Deis'
//! "preseed" step, on demand), and the answer says, per drone, how it went. Drones connected
//! to other controllers are asked through those (see [`crate::controller::peers`]).

use super::body::ApiJson;
use super::paths::ClusterPath;
use crate::controller::backends::validate::validate_image;
use crate::controller::error::{ApiErrorResponse, ControllerError};
use crate::controller::store::NodeKind;
use crate::controller::{peers, ControllerState};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use plane_protocol::api::{DronePrepull, PrepullOutcome, PrepullRequest, PrepullResult};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const DEFAULT_TIMEOUT_SECONDS: u64 = 300;
const MAX_TIMEOUT_SECONDS: u64 = 3600;

#[utoipa::path(
    post,
    path = "/ctrl/c/{cluster}/prepull",
    operation_id = "prepull",
    tag = "cluster",
    params(("cluster" = plane_protocol::names::ClusterName, Path, description = "The cluster whose drones pull the image.")),
    request_body = plane_protocol::api::PrepullRequest,
    responses((status = 200, description = "How each drone of the cluster fared.", body = plane_protocol::api::PrepullResult)),
)]
pub async fn handle_prepull(
    State(state): State<ControllerState>,
    ClusterPath(cluster): ClusterPath,
    headers: HeaderMap,
    ApiJson(request): ApiJson<PrepullRequest>,
) -> Result<Json<PrepullResult>, ApiErrorResponse> {
    let image = request.image.as_str();
    validate_image("image", image)?;
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
    // The other controllers' drones, asked through them meanwhile (unless this request
    // came from one of them: then only the drones here).
    let mut elsewhere = Vec::new();
    if !peers::was_forwarded(&headers) {
        for (controller, drones) in peers::drones_elsewhere(state.controller_id(), &known) {
            let (state, headers, cluster) = (state.clone(), headers.clone(), cluster.clone());
            let request = PrepullRequest {
                image: image.to_string(),
                credentials: request.credentials.clone(),
                timeout_seconds: Some(timeout),
            };
            let answer = tokio::spawn(async move {
                let path = format!("/ctrl/c/{cluster}/prepull");
                let sent =
                    peers::request(&state, &controller, reqwest::Method::POST, &path, &headers)
                        .await
                        .map_err(|err| err.message)?
                        .json(&request)
                        .send()
                        .await
                        .map_err(|err| format!("controller {controller} did not answer: {err}"))?;
                if !sent.status().is_success() {
                    let status = sent.status();
                    let body = sent.text().await.unwrap_or_default();
                    return Err(format!("controller {controller} answered {status}: {body}"));
                }
                sent.json::<PrepullResult>()
                    .await
                    .map_err(|err| format!("controller {controller}'s answer: {err}"))
            });
            elsewhere.push((drones, answer));
        }
    }
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
    // What the other controllers heard from theirs.
    for (drones, answer) in elsewhere {
        let answer = answer
            .await
            .unwrap_or_else(|err| Err(format!("asking another controller failed: {err}")));
        match answer {
            Ok(theirs) => {
                for entry in theirs.drones {
                    if drones.contains(&entry.drone) {
                        results.insert(entry.drone.clone(), entry);
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "could not prepull through another controller");
                for drone in drones {
                    results.insert(
                        drone.clone(),
                        DronePrepull {
                            drone,
                            outcome: PrepullOutcome::NotReached,
                            error: Some(error.clone()),
                            millis: None,
                        },
                    );
                }
            }
        }
    }
    // Connected drones nobody could ask.
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
