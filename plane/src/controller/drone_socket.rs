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
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::task::AbortOnDropHandle;

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
    let mut handler = DroneHandler::new(&state, &cluster, &name, generation, outbox);
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

/// How many of a drone's status reports and acks may wait for the applier before the
/// session stops reading the socket.
const ORDERED_BACKLOG: usize = 256;

/// A drone's session: sends it every stored action it has not acked (first all that are
/// waiting, then new ones as the change bus announces them), and handles what it sends.
///
/// What the drone sends is handled off the socket's loop, by two tasks of the session, so
/// that reading never waits for the database:
/// - the **applier** records status reports and acks one at a time, in the drone's order;
/// - the **renewer** answers heartbeats. A heartbeat must not queue behind a burst of status
///   reports: the drone counts its leases down from the moment it sent it, and a late
///   answer makes it stop healthy backends. Only the newest heartbeat waiting is answered,
///   since it names every backend the drone still runs and was sent last.
struct DroneHandler {
    /// Messages for the drone that are not backend actions (prepulls, log reads).
    outbox: mpsc::UnboundedReceiver<MessageToDrone>,
    state: ControllerState,
    cluster: ClusterName,
    name: NodeName,
    waiting: broadcast::Receiver<ActionsWaiting>,
    /// Actions sent in this session and not yet acked; a new session sends them again.
    sent: HashSet<i64>,
    /// To the renewer: the newest heartbeat not yet answered.
    heartbeats: watch::Sender<Option<Heartbeat>>,
    /// To the applier.
    ordered: mpsc::Sender<MessageFromDrone>,
    /// From the applier and the renewer: what to send the drone.
    replies: mpsc::UnboundedReceiver<Reply>,
    _workers: [AbortOnDropHandle<()>; 2],
}

/// A heartbeat: the backends the drone runs, and its number.
#[derive(Clone)]
struct Heartbeat {
    backends: Vec<BackendName>,
    seq: u64,
}

type DroneSink = NodeSink<MessageToDrone>;

/// Something for the session's loop to do.
enum DroneEvent {
    /// A message that is not a backend action.
    Outbox(MessageToDrone),
    /// An action was stored for this drone (or notices were missed, so one may have been).
    ActionsWaiting,
    /// The applier's or the renewer's answer.
    Reply(Reply),
}

impl NodeHandler for DroneHandler {
    type FromNode = MessageFromDrone;
    type ToNode = MessageToDrone;
    type Event = DroneEvent;

    async fn start(&mut self, sink: &mut DroneSink) -> Result<(), Gone> {
        self.send_pending_actions(sink).await
    }

    async fn next_event(&mut self) -> Option<Self::Event> {
        loop {
            tokio::select! {
                Some(message) = self.outbox.recv() => return Some(DroneEvent::Outbox(message)),
                Some(reply) = self.replies.recv() => return Some(DroneEvent::Reply(reply)),
                waiting = self.waiting.recv() => match waiting {
                    Ok(notice) if notice.concerns(&self.cluster, &self.name) => return Some(DroneEvent::ActionsWaiting),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return Some(DroneEvent::ActionsWaiting),
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            }
        }
    }

    async fn on_event(&mut self, event: Self::Event, sink: &mut DroneSink) -> Result<Flow, Gone> {
        match event {
            DroneEvent::Outbox(message) | DroneEvent::Reply(Reply::Send(message)) => {
                sink.send(&message).await?;
            }
            DroneEvent::ActionsWaiting => self.send_pending_actions(sink).await?,
            // Forgotten only once its ack is recorded: until then a catch-up would still load
            // it, and must not send it again.
            DroneEvent::Reply(Reply::AckHandled(action_id)) => {
                self.sent.remove(&action_id);
            }
            DroneEvent::Reply(Reply::Close(message)) => {
                let _ = sink.send(&message).await;
                return Ok(Flow::Close);
            }
        }
        Ok(Flow::Continue)
    }

    async fn on_message(
        &mut self,
        message: MessageFromDrone,
        _sink: &mut DroneSink,
    ) -> Result<Flow, Gone> {
        let (state, drone) = (&self.state, &self.name);
        match message {
            MessageFromDrone::Hello { .. } => {
                tracing::warn!(%drone, "duplicate hello ignored");
            }
            MessageFromDrone::Heartbeat { backends, seq } => {
                self.heartbeats
                    .send_replace(Some(Heartbeat { backends, seq }));
            }
            ordered @ (MessageFromDrone::ActionAck { .. } | MessageFromDrone::BackendEvent(_)) => {
                self.apply_in_order(ordered).await?;
            }
            MessageFromDrone::PrepullDone { request_id, error } => {
                state.nodes().prepull_done(request_id, drone.clone(), error);
            }
            MessageFromDrone::LogLines { request_id, lines } => {
                state.nodes().log_event(request_id, LogEvent::Lines(lines));
            }
            MessageFromDrone::LogsEnd {
                request_id,
                outcome,
            } => {
                state.nodes().log_event(request_id, LogEvent::End(outcome));
            }
        }
        Ok(Flow::Continue)
    }

    async fn finish(&mut self) {}
}

/// What the applier or the renewer has done.
enum Reply {
    /// This is to be sent to the drone.
    Send(MessageToDrone),
    /// The drone's ack of this action is recorded, or failed to be (then a catch-up sends
    /// the action again, and the drone acks it again).
    AckHandled(i64),
    /// Send this, then end the session.
    Close(MessageToDrone),
}

impl DroneHandler {
    fn new(
        state: &ControllerState,
        cluster: &ClusterName,
        name: &NodeName,
        generation: i64,
        outbox: mpsc::UnboundedReceiver<MessageToDrone>,
    ) -> DroneHandler {
        let (replies_to_session, replies) = mpsc::unbounded_channel();
        let (heartbeats, newest_heartbeat) = watch::channel(None);
        let (ordered, in_order) = mpsc::channel(ORDERED_BACKLOG);
        let session = DroneSession {
            state: state.clone(),
            cluster: cluster.clone(),
            name: name.clone(),
            generation,
            replies: replies_to_session,
        };
        let renewer =
            AbortOnDropHandle::new(tokio::spawn(session.clone().renew_leases(newest_heartbeat)));
        let applier = AbortOnDropHandle::new(tokio::spawn(session.apply_in_order(in_order)));
        DroneHandler {
            outbox,
            state: state.clone(),
            cluster: cluster.clone(),
            name: name.clone(),
            // Subscribed before the first read, so an action stored meanwhile is not missed.
            waiting: state.bus().subscribe_actions(),
            sent: HashSet::new(),
            heartbeats,
            ordered,
            replies,
            _workers: [renewer, applier],
        }
    }

    /// Hands a status report or ack to the applier; waits only when it is far behind.
    async fn apply_in_order(&self, message: MessageFromDrone) -> Result<(), Gone> {
        self.ordered.send(message).await.map_err(|_| Gone)
    }

    /// Sends every stored, unacked action of the drone not yet sent in this session, oldest
    /// first. In pages, so a drone with a huge backlog neither holds a big result in memory
    /// nor keeps the database busy with one long read. `Err` when the socket failed.
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
            let whole_page = page.len() as i64 == REPLAY_PAGE;
            for action in page {
                if self.sent.insert(action.action_id) {
                    sink.send(&MessageToDrone::Action(action)).await?;
                }
            }
            if !whole_page {
                // That was the last page: no read that can only come back empty.
                return Ok(());
            }
        }
    }
}

/// What the session's applier and renewer share.
#[derive(Clone)]
struct DroneSession {
    state: ControllerState,
    cluster: ClusterName,
    name: NodeName,
    /// This session's number among all sessions of the drone; only the newest renews.
    generation: i64,
    replies: mpsc::UnboundedSender<Reply>,
}

impl DroneSession {
    /// The applier: records the drone's status reports and acks in the order it sent them.
    async fn apply_in_order(self, mut in_order: mpsc::Receiver<MessageFromDrone>) {
        let (state, cluster, drone) = (&self.state, &self.cluster, &self.name);
        while let Some(message) = in_order.recv().await {
            match message {
                MessageFromDrone::ActionAck { action_id } => {
                    if let Err(err) = state.store().ack_action(cluster, drone, action_id).await {
                        tracing::warn!(%drone, action_id, error = %err, "could not record action ack");
                    }
                    let _ = self.replies.send(Reply::AckHandled(action_id));
                }
                MessageFromDrone::BackendEvent(event) => {
                    if let Some(ack) = apply_event(state, cluster, drone, event).await {
                        let _ = self.replies.send(Reply::Send(ack));
                    }
                }
                _ => {}
            }
        }
    }

    /// The renewer: answers the newest heartbeat, each time one arrives.
    async fn renew_leases(self, mut newest: watch::Receiver<Option<Heartbeat>>) {
        while newest.changed().await.is_ok() {
            let Some(heartbeat) = newest.borrow_and_update().clone() else {
                continue;
            };
            if let Some(reply) = self.renewal(heartbeat).await {
                let _ = self.replies.send(reply);
            }
        }
    }

    /// Renews the leases of the backends a drone runs and tells it which it must stop. No
    /// answer when the database is unreachable: the drone then keeps counting down on its own
    /// clock, which is what keeps a key from running twice. A session that a newer one of the
    /// same drone has replaced renews nothing and is closed: two drones claiming one name must
    /// never both hold leases.
    async fn renewal(&self, Heartbeat { backends, seq }: Heartbeat) -> Option<Reply> {
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
                return Some(Reply::Close(MessageToDrone::Refused {
                reason: "a newer session of a drone with this name has replaced this one; is another drone using the same --name?".into(),
            }));
            }
            Err(err) => {
                tracing::warn!(%drone, error = %err, "could not renew leases");
                return None;
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
        Some(Reply::Send(MessageToDrone::LeaseRenewal {
            seq,
            lease_ms,
            renewed,
            gone,
        }))
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
        Ok(Some(applied)) => {
            tracing::info!(backend = %event.backend_id, status = %event.update.status, "backend status");
            let first_ready =
                event.update.status == BackendStatus::Ready && event.update.health.is_none();
            // A warm backend's start was paid before anyone waited for it.
            if first_ready && !applied.warm {
                let took = applied
                    .entry
                    .time
                    .0
                    .saturating_sub(applied.created_at.0)
                    .max(0);
                state
                    .metrics()
                    .backend_ready(Duration::from_millis(took as u64));
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
