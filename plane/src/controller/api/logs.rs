//! `GET /ctrl/b/:backend/logs?follow=&tail=`: what a backend printed, relayed from its drone
//! as server-sent events, one line each (`{stream, time, text}`), oldest first. A drone
//! connected to another controller is read through that one (see [`crate::controller::peers`]).

use super::paths::BackendPath;
use crate::controller::error::ApiErrorResponse;
use crate::controller::nodes::{LogEvent, LogsRead};
use crate::controller::store::NodeKind;
use crate::controller::{peers, ControllerState};
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{OriginalUri, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use plane_protocol::api::{ApiErrorKind, BackendLogLine};
use plane_protocol::drone::{LogsOutcome, LogsRequest};
use std::collections::HashMap;
use std::convert::Infallible;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// The largest `tail` accepted; the drone keeps far fewer lines than this anyway.
const MAX_TAIL: u64 = 10_000_000;

#[utoipa::path(
    get,
    path = "/ctrl/b/{backend}/logs",
    operation_id = "backend_logs",
    tag = "backends",
    params(
        ("backend" = plane_protocol::names::BackendName, Path, description = "The backend's ID."),
        ("follow" = Option<bool>, Query, description = "Keep the stream open for new lines until the backend's process exits."),
        ("tail" = Option<u64>, Query, maximum = 10000000, description = "Start with the last this many lines (at most 10000000) instead of the first."),
    ),
    responses(
        (status = 200, description = "Server-sent events, one `BackendLogLine` as JSON in each event's data, oldest first.", content_type = "text/event-stream", body = String),
        (status = 404, description = "No such backend, or its logs are no longer kept.", body = plane_protocol::api::ApiError),
        (status = 502, description = "The backend's drone could not read the logs from its container engine.", body = plane_protocol::api::ApiError),
        (status = 503, description = "The backend's drone is not connected to any controller.", body = plane_protocol::api::ApiError),
    ),
)]
pub async fn handle_logs(
    State(state): State<ControllerState>,
    path: BackendPath,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiErrorResponse> {
    let Query(query) = query.map_err(|err| ApiErrorResponse::bad_request(err.body_text()))?;
    let (follow, tail) = parse_query(&query).map_err(ApiErrorResponse::bad_request)?;
    let backend = path.backend.clone();
    let row = match state.store().backend(&backend).await? {
        Some(row) if path.cluster.as_ref().is_none_or(|c| c == &row.cluster) => row,
        _ => return Err(ApiErrorResponse::not_found(format!("no backend {backend}"))),
    };
    let request = LogsRequest {
        backend_id: backend.clone(),
        follow,
        tail,
    };
    let drone = &row.drone;
    let Some(mut read) = state.nodes().start_logs(&row.cluster, drone, request) else {
        let holder = match peers::was_forwarded(&headers) {
            true => None,
            false => state
                .store()
                .nodes(&row.cluster, NodeKind::Drone)
                .await?
                .into_iter()
                .find(|node| &node.name == drone)
                .and_then(|node| node.connected_to)
                .filter(|controller| controller != state.controller_id()),
        };
        let Some(controller) = holder else {
            let message = format!(
                "the logs of backend {backend} are on drone {drone}, which is not connected to any controller"
            );
            return Err(ApiErrorResponse::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ApiErrorKind::Other,
                message,
            ));
        };
        let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
        return forward(&state, &controller, path, &headers).await;
    };
    // The drone's first answer says whether it has the logs; only then is this a stream.
    match read.next().await {
        Some(LogEvent::Lines(lines)) => {
            let (sender, receiver) = mpsc::channel(64);
            tokio::spawn(relay(state, read, lines, sender));
            Ok(Sse::new(ReceiverStream::new(receiver))
                .keep_alive(KeepAlive::default())
                .into_response())
        }
        Some(LogEvent::End(LogsOutcome::NotKept)) => Err(ApiErrorResponse::not_found(format!(
            "drone {drone} keeps no logs of backend {backend} (a stopped backend's logs are kept for the drone's --log-retention-seconds)"
        ))),
        Some(LogEvent::End(LogsOutcome::Failed { message })) => Err(ApiErrorResponse::new(
            StatusCode::BAD_GATEWAY,
            ApiErrorKind::Other,
            format!("drone {drone} could not read the logs of backend {backend}: {message}"),
        )),
        Some(LogEvent::End(LogsOutcome::Complete)) => {
            // Not sent before the first batch; an empty stream says the same.
            let (_, receiver) = mpsc::channel::<Result<Event, Infallible>>(1);
            Ok(Sse::new(ReceiverStream::new(receiver)).into_response())
        }
        None => Err(ApiErrorResponse::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ApiErrorKind::Other,
            format!("drone {drone} disconnected before sending the logs of backend {backend}"),
        )),
    }
}

/// Reads the logs through `controller`, which holds the drone's session, passing its answer
/// (an event stream, or its error) on as it comes.
async fn forward(
    state: &ControllerState,
    controller: &str,
    path_and_query: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiErrorResponse> {
    let answer = peers::request(
        state,
        controller,
        reqwest::Method::GET,
        path_and_query,
        headers,
    )
    .await?
    .send()
    .await
    .map_err(|err| peers::unreachable(controller, err))?;
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = answer.headers().get(header::CONTENT_TYPE).cloned();
    let mut response = Response::new(Body::from_stream(answer.bytes_stream()));
    *response.status_mut() = status;
    if let Some(content_type) = content_type {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type);
    }
    Ok(response)
}

/// `follow` (`true`/`false`, or bare) and `tail` (a count of lines); anything else is an
/// error naming the parameter.
fn parse_query(query: &HashMap<String, String>) -> Result<(bool, Option<u64>), String> {
    let mut follow = false;
    let mut tail = None;
    for (name, value) in query {
        match name.as_str() {
            "follow" => {
                follow = match value.as_str() {
                    "" | "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(format!("follow must be true or false, got {value:?}")),
                }
            }
            "tail" => {
                tail = match value.parse::<u64>() {
                    Ok(n) if n <= MAX_TAIL => Some(n),
                    _ => {
                        return Err(format!(
                            "tail must be a number of lines from 0 to {MAX_TAIL}, got {value:?}"
                        ))
                    }
                }
            }
            other => {
                return Err(format!(
                    "unknown query parameter {other:?}; logs take follow and tail"
                ))
            }
        }
    }
    Ok((follow, tail))
}

/// Passes the drone's batches on as events until the logs end, the drone goes, the client
/// leaves, or the controller shuts down. Taking the next batch only once this one is queued
/// for the client is what keeps a slow client from filling memory here or on the drone.
async fn relay(
    state: ControllerState,
    mut read: LogsRead,
    first: Vec<BackendLogLine>,
    sender: mpsc::Sender<Result<Event, Infallible>>,
) {
    let mut lines = first;
    loop {
        for line in lines {
            let Ok(event) = Event::default().json_data(&line) else {
                return;
            };
            if sender.send(Ok(event)).await.is_err() {
                return; // the client went away
            }
        }
        let next = tokio::select! {
            _ = state.shutdown_token().cancelled() => return,
            _ = sender.closed() => return,
            next = read.next() => next,
        };
        lines = match next {
            Some(LogEvent::Lines(lines)) => lines,
            Some(LogEvent::End(LogsOutcome::Complete)) => return,
            Some(LogEvent::End(outcome)) => {
                tracing::warn!(?outcome, "a log stream ended early");
                return;
            }
            None => {
                tracing::warn!("a log stream ended early: the drone's session ended");
                return;
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::parse_query;
    use std::collections::HashMap;

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn follow_and_tail_are_parsed_and_anything_else_is_named() {
        assert_eq!(parse_query(&query(&[])), Ok((false, None)));
        assert_eq!(
            parse_query(&query(&[("follow", "true"), ("tail", "20")])),
            Ok((true, Some(20)))
        );
        assert_eq!(parse_query(&query(&[("follow", "")])), Ok((true, None)));
        for (bad, named) in [
            (("follow", "yes"), "follow"),
            (("tail", "-1"), "tail"),
            (("tail", "many"), "tail"),
            (("since", "1"), "since"),
        ] {
            let err = parse_query(&query(&[bad])).expect_err("refused");
            assert!(err.contains(named), "{err}");
        }
    }
}
