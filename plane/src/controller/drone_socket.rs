//! The drone socket: registers a drone, delivers its actions (re-sending unacked ones on
//! reconnect), and applies the status events it reports.

use super::api::paths::{ClusterPath, SocketUpgrade};
use super::bus::ActionsWaiting;
use super::error::ApiErrorResponse;
use super::node_session::{self, Flow, Gone, NodeHandler, NodeSink, SILENCE_TIMEOUT};
use super::nodes::LogEvent;
use super::store::{NodeKind, NodeSession};
use super::ControllerState;
use axum::extract::ws::WebSocket;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use plane_protocol::backend::BackendStatus;
use plane_protocol::drone::{BackendEvent, MessageFromDrone, MessageToDrone};
use plane_protocol::names::{BackendName, ClusterName, NodeName};
use plane_protocol::time::Millis;
use std::collections::HashSet;
use std::time::Duration;
use tokio::sync::broadcast;

/// How many stored actions are loaded at a time when replaying them to a drone.
const REPLAY_PAGE: i64 = 100;

#[utoipa::path(
    get,
    path = "/ctrl/c/{cluster}/drone-socket",
    operation_id = "drone_socket",
    tag = "nodes",
    params(("cluster" = plane_protocol::names::ClusterName, Path, description = "The cluster the node serves.")),
    responses(
        (status = 101, description = "A WebSocket for the drone's session (see docs/architecture.md); not for API clients."),
    ),
)]
pub async fn handle_drone_socket(
    State(state): State<ControllerState>,
    ClusterPath(cluster): ClusterPath,
    headers: HeaderMap,
    SocketUpgrade(upgrade): SocketUpgrade,
) -> Result<Response, ApiErrorResponse> {
    super::auth::check_cluster_secret(&state, &headers, "drone")?;
    Ok(upgrade.on_upgrade(move |socket| drone_session(state, cluster, socket)))
}

async fn drone_session(state: ControllerState, cluster: ClusterName, socket: WebSocket) {
    let (mut sink, mut stream) = node_session::split::<MessageFromDrone, MessageToDrone>(socket);
    let Some(MessageFromDrone::Hello {
        name,
        pool,
        version,
        hash,
        instance,
        heartbeat_interval_ms,
        fence_margin_ms,
        disk_limits,
    }) = stream.hello().await
    else {
        tracing::warn!(%cluster, "drone socket closed: no hello");
        return;
    };
    if let Err(reason) = check_timings(
        state.config().lease_ms,
        heartbeat_interval_ms,
        fence_margin_ms,
    ) {
        tracing::error!(drone = %name, %cluster, %reason, "refusing drone");
        let _ = sink.send(&MessageToDrone::Refused { reason }).await;
        return;
    }
    let session = NodeSession {
        cluster: &cluster,
        kind: NodeKind::Drone,
        name: &name,
        pool: pool.as_str(),
        version: &version,
        hash: &hash,
        instance: &instance,
        controller: state.controller_id(),
        disk_limits,
    };
    let refused = |reason| MessageToDrone::Refused { reason };
    let Some(generation) = node_session::register(&state, &session, &mut sink, refused).await
    else {
        return;
    };
    // A drone heartbeats at least twice per lease (checked above), so a lease of silence
    // means it is gone.
    let silence = Duration::from_millis(state.config().lease_ms).min(SILENCE_TIMEOUT);
    let (sender, outbox) = tokio::sync::mpsc::unbounded_channel();
    let _registration = state
        .nodes()
        .register_drone(cluster.clone(), name.clone(), sender);
    let mut handler = DroneHandler {
        outbox,
        state: state.clone(),
        cluster: cluster.clone(),
        name: name.clone(),
        generation,
        // Subscribed before the first read, so an action stored meanwhile is not missed.
        waiting: state.bus().subscribe_actions(),
        sent: HashSet::new(),
    };
    // `last_seen` stays at the last heartbeat: the lost window counts from there.
    node_session::serve(
        &state,
        &session,
        generation,
        silence,
        &mut handler,
        &mut sink,
        &mut stream,
    )
    .await;
}

/// A drone's session: sends it every stored action it has not acked (first all that are
/// waiting, then new ones as the change bus announces them), and handles what it sends.
struct DroneHandler {
    /// Messages for the drone that are not backend actions (prepulls, log reads).
    outbox: tokio::sync::mpsc::UnboundedReceiver<MessageToDrone>,
    state: ControllerState,
    cluster: ClusterName,
    name: NodeName,
    /// This session's number among all sessions of the drone; only the newest renews.
    generation: i64,
    waiting: broadcast::Receiver<ActionsWaiting>,
    /// Actions sent in this session and not yet acked; a new session sends them again.
    sent: HashSet<i64>,
}

type DroneSink = NodeSink<MessageToDrone>;

impl NodeHandler for DroneHandler {
    type FromNode = MessageFromDrone;
    type ToNode = MessageToDrone;
    /// An action was stored for this drone (or notices were missed, so one may have been).
    /// Actions are waiting (`None`), or a message to send.
    type Event = Option<MessageToDrone>;

    async fn start(&mut self, sink: &mut DroneSink) -> Result<(), Gone> {
        self.send_pending_actions(sink).await
    }

    async fn next_event(&mut self) -> Option<Self::Event> {
        loop {
            tokio::select! {
                Some(message) = self.outbox.recv() => return Some(Some(message)),
                waiting = self.waiting.recv() => match waiting {
                    Ok(notice) if notice.concerns(&self.cluster, &self.name) => return Some(None),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return Some(None),
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            }
        }
    }

    async fn on_event(&mut self, event: Self::Event, sink: &mut DroneSink) -> Result<(), Gone> {
        match event {
            Some(message) => sink.send(&message).await,
            None => self.send_pending_actions(sink).await,
        }
    }

    async fn on_message(
        &mut self,
        message: MessageFromDrone,
        sink: &mut DroneSink,
    ) -> Result<Flow, Gone> {
        if let MessageFromDrone::ActionAck { action_id } = &message {
            self.sent.remove(action_id);
        }
        match self.handle_message(message).await {
            Reply::Nothing => Ok(Flow::Continue),
            Reply::Send(reply) => sink.send(&reply).await.map(|()| Flow::Continue),
            Reply::Close(reply) => {
                let _ = sink.send(&reply).await;
                Ok(Flow::Close)
            }
        }
    }

    async fn finish(&mut self) {}
}

/// Sends every stored, unacked action of the drone not yet sent in this session, oldest
/// first. In pages, so a drone with a huge backlog neither holds a big result in memory nor
/// keeps the database busy with one long read. `Err` when the socket failed.
/// What to do after handling a message.
enum Reply {
    Nothing,
    Send(MessageToDrone),
    /// Send this, then end the session.
    Close(MessageToDrone),
}

impl DroneHandler {
    async fn send_pending_actions(&mut self, sink: &mut DroneSink) -> Result<(), Gone> {
        let (state, cluster, name) = (&self.state, &self.cluster, &self.name);
        let mut after = 0;
        loop {
            let page = match state
                .store()
                .pending_actions(cluster, name, after, REPLAY_PAGE)
                .await
            {
                Ok(page) => page,
                Err(err) => {
                    // Not fatal: the next catch-up of the change bus tries again.
                    tracing::warn!(drone = %name, error = %err, "could not load pending actions");
                    return Ok(());
                }
            };
            let Some(last) = page.last() else {
                return Ok(());
            };
            after = last.action_id;
            for action in page {
                if self.sent.insert(action.action_id) {
                    sink.send(&MessageToDrone::Action(action)).await?;
                }
            }
        }
    }

    /// Handles one message.
    async fn handle_message(&self, message: MessageFromDrone) -> Reply {
        let (state, cluster, drone) = (&self.state, &self.cluster, &self.name);
        match message {
            MessageFromDrone::Hello { .. } => {
                tracing::warn!(%drone, "duplicate hello ignored");
                Reply::Nothing
            }
            MessageFromDrone::Heartbeat { backends, seq } => self.renew_leases(backends, seq).await,
            MessageFromDrone::ActionAck { action_id } => {
                if let Err(err) = state.store().ack_action(cluster, drone, action_id).await {
                    tracing::warn!(%drone, action_id, error = %err, "could not record action ack");
                }
                Reply::Nothing
            }
            MessageFromDrone::BackendEvent(event) => {
                match apply_event(state, cluster, drone, event).await {
                    Some(ack) => Reply::Send(ack),
                    None => Reply::Nothing,
                }
            }
            MessageFromDrone::PrepullDone { request_id, error } => {
                state.nodes().prepull_done(request_id, drone.clone(), error);
                Reply::Nothing
            }
            MessageFromDrone::LogLines { request_id, lines } => {
                state.nodes().log_event(request_id, LogEvent::Lines(lines));
                Reply::Nothing
            }
            MessageFromDrone::LogsEnd {
                request_id,
                outcome,
            } => {
                state.nodes().log_event(request_id, LogEvent::End(outcome));
                Reply::Nothing
            }
        }
    }

    /// Renews the leases of the backends a drone runs and tells it which it must stop. No
    /// answer when the database is unreachable: the drone then keeps counting down on its own
    /// clock, which is what keeps a key from running twice. A session that a newer one of the
    /// same drone has replaced renews nothing and is closed: two drones claiming one name must
    /// never both hold leases.
    async fn renew_leases(&self, backends: Vec<BackendName>, seq: u64) -> Reply {
        let (state, drone) = (&self.state, &self.name);
        let lease_ms = state.config().lease_ms;
        let renewed = match state
            .store()
            .renew_leases(
                &self.cluster,
                drone,
                self.generation,
                &backends,
                Millis::now(),
                lease_ms,
            )
            .await
        {
            Ok(Some(renewed)) => renewed,
            Ok(None) => {
                tracing::warn!(%drone, generation = self.generation, "a newer session of this drone replaced this one; closing it");
                return Reply::Close(MessageToDrone::Refused {
                reason: "a newer session of a drone with this name has replaced this one; is another drone using the same --name?".into(),
            });
            }
            Err(err) => {
                tracing::warn!(%drone, error = %err, "could not renew leases");
                return Reply::Nothing;
            }
        };
        let renewed_set: HashSet<&BackendName> = renewed.iter().collect();
        let gone: Vec<BackendName> = backends
            .iter()
            .filter(|b| !renewed_set.contains(b))
            .cloned()
            .collect();
        if !gone.is_empty() {
            tracing::warn!(%drone, ?gone, "drone runs backends whose leases are gone; telling it to stop them");
        }
        Reply::Send(MessageToDrone::LeaseRenewal {
            seq,
            lease_ms,
            renewed,
            gone,
        })
    }
}

/// Whether a drone's heartbeats can keep its leases alive: a lease must outlast two
/// heartbeat intervals plus twice the drone's fencing margin (one margin is the fence, the
/// other the drone's budget for starting a container under a fresh lease), or a single late
/// heartbeat would make the drone stop healthy backends. The message names the flags.
fn check_timings(
    lease_ms: u64,
    heartbeat_interval_ms: Option<u64>,
    fence_margin_ms: Option<u64>,
) -> Result<(), String> {
    let (Some(heartbeat), Some(margin)) = (heartbeat_interval_ms, fence_margin_ms) else {
        return Err("this drone does not take part in key leases (no heartbeat interval or fencing margin in its hello); upgrade it".into());
    };
    let needed = heartbeat
        .saturating_mul(2)
        .saturating_add(margin.saturating_mul(2));
    if lease_ms < needed {
        return Err(format!(
            "the controller's --lease-ms ({lease_ms}) is shorter than two of this drone's --heartbeat-interval-ms ({heartbeat}) plus twice its --fence-margin-ms ({margin}); raise --lease-ms to at least {needed} or lower the drone's"
        ));
    }
    Ok(())
}

/// Applies a status report and acks it once it is durably recorded (or known stale). An
/// event that could not be stored is not acked, so the drone sends it again.
async fn apply_event(
    state: &ControllerState,
    cluster: &ClusterName,
    drone: &NodeName,
    event: BackendEvent,
) -> Option<MessageToDrone> {
    if event.update.warm {
        // Not a status change: the warm backend waits for a claim.
        match state
            .store()
            .warm_report(&event.backend_id, cluster, drone)
            .await
        {
            Ok(report) => {
                tracing::debug!(backend = %event.backend_id, ?report, "warm backend waits for a claim")
            }
            Err(err) => {
                tracing::error!(backend = %event.backend_id, error = %err, "could not record a warm backend");
                return None;
            }
        }
        return Some(MessageToDrone::EventAck {
            event_id: event.event_id,
        });
    }
    let result = state
        .store()
        .apply_status(
            &event.backend_id,
            cluster,
            drone,
            &event.update,
            Millis::now(),
        )
        .await;
    match result {
        // The change bus carries it to streams, route waits and proxies.
        Ok(Some(change)) => {
            tracing::info!(backend = %event.backend_id, status = %event.update.status, "backend status");
            let first_ready =
                event.update.status == BackendStatus::Ready && event.update.health.is_none();
            if first_ready {
                // A warm backend's start was paid before anyone waited for it.
                if let Ok(Some(row)) = state.store().backend(&event.backend_id).await {
                    if row.warm_fingerprint.is_some() {
                        return Some(MessageToDrone::EventAck {
                            event_id: event.event_id,
                        });
                    }
                    let took = change.time.0.saturating_sub(row.created_at.0).max(0);
                    state
                        .metrics()
                        .backend_ready(Duration::from_millis(took as u64));
                }
            }
        }
        Ok(None) => {
            tracing::debug!(backend = %event.backend_id, status = %event.update.status, "stale or foreign status ignored");
        }
        Err(err) => {
            tracing::error!(backend = %event.backend_id, error = %err, "could not apply status");
            return None;
        }
    }
    Some(MessageToDrone::EventAck {
        event_id: event.event_id,
    })
}

#[cfg(test)]
mod tests {
    use super::check_timings;

    #[test]
    fn a_lease_shorter_than_two_heartbeats_and_two_margins_is_refused_naming_the_flags() {
        let reason = check_timings(7_000, Some(2_000), Some(2_000)).expect_err("refused");
        for flag in ["--lease-ms", "--heartbeat-interval-ms", "--fence-margin-ms"] {
            assert!(reason.contains(flag), "{reason}");
        }
        assert!(check_timings(8_000, Some(2_000), Some(2_000)).is_ok());
        assert!(check_timings(60_000, None, None).is_err());
    }
}
