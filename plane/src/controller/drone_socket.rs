//! The drone socket: registers a drone, delivers its actions (re-sending unacked ones on
//! reconnect), and applies the status events it reports.

use super::error::ApiErrorResponse;
use super::paths::{ClusterPath, SocketUpgrade};
use super::socket::{self, Incoming, HELLO_TIMEOUT, SILENCE_TIMEOUT};
use super::store::NodeKind;
use super::ControllerState;
use axum::extract::ws::WebSocket;
use axum::extract::State;
use axum::response::Response;
use futures_util::StreamExt;
use plane_protocol::drone::{BackendEvent, MessageFromDrone, MessageToDrone};
use plane_protocol::names::{ClusterName, NodeName};
use plane_protocol::time::Millis;
use tokio::sync::mpsc;

pub async fn handle_drone_socket(
    State(state): State<ControllerState>,
    ClusterPath(cluster): ClusterPath,
    SocketUpgrade(upgrade): SocketUpgrade,
) -> Result<Response, ApiErrorResponse> {
    Ok(upgrade.on_upgrade(move |socket| drone_session(state, cluster, socket)))
}

async fn drone_session(state: ControllerState, cluster: ClusterName, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let hello = tokio::time::timeout(HELLO_TIMEOUT, socket::receive(&mut stream)).await;
    let Ok(Incoming::Message(MessageFromDrone::Hello {
        name,
        pool,
        version,
    })) = hello
    else {
        tracing::warn!(%cluster, "drone socket closed: no hello");
        return;
    };
    if let Err(err) = state
        .store()
        .upsert_node(&cluster, NodeKind::Drone, &name, &pool, &version)
        .await
    {
        tracing::error!(drone = %name, error = %err, "could not record drone");
        return;
    }

    // Register first, then replay stored actions straight to the socket before draining
    // the live queue: anything created after registration waits in the queue, so the
    // drone sees every action in creation order (possibly twice, which it tolerates).
    let (sender, mut outbox) = mpsc::unbounded_channel();
    let _registration =
        state
            .nodes()
            .register_drone(cluster.clone(), name.clone(), pool.clone(), sender);
    tracing::info!(drone = %name, %cluster, %pool, %version, "drone connected");
    let pending = match state.store().pending_actions(&cluster, &name).await {
        Ok(pending) => pending,
        Err(err) => {
            tracing::error!(drone = %name, error = %err, "could not load pending actions");
            return;
        }
    };
    for action in pending {
        if socket::send(&mut sink, &MessageToDrone::Action(action))
            .await
            .is_err()
        {
            return;
        }
    }

    // Reset by every frame received; fires when the node has gone quiet.
    let silence = tokio::time::sleep(SILENCE_TIMEOUT);
    tokio::pin!(silence);
    loop {
        tokio::select! {
            _ = state.shutdown_token().cancelled() => break,
            _ = &mut silence => {
                tracing::warn!(%cluster, %name, "node silent for {SILENCE_TIMEOUT:?}; closing its socket");
                break;
            }
            Some(message) = outbox.recv() => {
                if socket::send(&mut sink, &message).await.is_err() {
                    break;
                }
            }
            incoming = socket::receive::<MessageFromDrone>(&mut stream) => {
                silence.as_mut().reset(tokio::time::Instant::now() + SILENCE_TIMEOUT);
                match incoming {
                Incoming::Closed => break,
                Incoming::Alive => {}
                Incoming::Invalid(detail) => {
                    tracing::warn!(drone = %name, %detail, "invalid message from drone");
                }
                Incoming::Message(message) => {
                    if let Some(reply) = handle_message(&state, &cluster, &name, message).await {
                        if socket::send(&mut sink, &reply).await.is_err() {
                            break;
                        }
                    }
                }
            }
            }
        }
    }
    tracing::info!(drone = %name, %cluster, "drone disconnected");
    let _ = state
        .store()
        .touch_node(&cluster, NodeKind::Drone, &name)
        .await;
}

/// Handles one message; returns the reply to send, if any.
async fn handle_message(
    state: &ControllerState,
    cluster: &ClusterName,
    drone: &NodeName,
    message: MessageFromDrone,
) -> Option<MessageToDrone> {
    match message {
        MessageFromDrone::Hello { .. } => {
            tracing::warn!(%drone, "duplicate hello ignored");
            None
        }
        MessageFromDrone::Heartbeat { .. } => {
            if let Err(err) = state
                .store()
                .touch_node(cluster, NodeKind::Drone, drone)
                .await
            {
                tracing::warn!(%drone, error = %err, "could not record heartbeat");
            }
            None
        }
        MessageFromDrone::ActionAck { action_id } => {
            if let Err(err) = state.store().ack_action(cluster, drone, action_id).await {
                tracing::warn!(%drone, action_id, error = %err, "could not record action ack");
            }
            None
        }
        MessageFromDrone::BackendEvent(event) => apply_event(state, cluster, drone, event).await,
    }
}

/// Applies a status report and acks it once it is durably recorded (or known stale). An
/// event that could not be stored is not acked, so the drone sends it again.
async fn apply_event(
    state: &ControllerState,
    cluster: &ClusterName,
    drone: &NodeName,
    event: BackendEvent,
) -> Option<MessageToDrone> {
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
        Ok(Some(change)) => {
            tracing::info!(backend = %event.backend_id, status = %event.update.status, "backend status");
            state.publish_status_change(change);
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
