//! The proxy socket: answers route requests (waiting for starting backends to become
//! ready), records connection reports, and pushes route removals.

use super::api::paths::{ClusterPath, SocketUpgrade};
use super::bus::ChangeBus;
use super::error::ApiErrorResponse;
use super::socket::{self, Incoming, HELLO_TIMEOUT, SILENCE_TIMEOUT};
use super::store::{NodeKind, NodeSession};
use super::ControllerState;
use axum::extract::ws::WebSocket;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::StreamExt;
use plane_protocol::backend::BackendStatus;
use plane_protocol::names::{BearerToken, ClusterName};
use plane_protocol::proxy::{MessageFromProxy, MessageToProxy, RouteAnswer, RouteInfo};
use plane_protocol::time::Millis;
use std::time::Duration;
use tokio::sync::mpsc;

/// Assumed for proxies whose hello does not give their report interval.
const DEFAULT_REPORT_INTERVAL_MS: u64 = 5_000;

pub async fn handle_proxy_socket(
    State(state): State<ControllerState>,
    ClusterPath(cluster): ClusterPath,
    headers: HeaderMap,
    SocketUpgrade(upgrade): SocketUpgrade,
) -> Result<Response, ApiErrorResponse> {
    super::auth::check_cluster_secret(&state, &headers, "proxy")?;
    Ok(upgrade.on_upgrade(move |socket| proxy_session(state, cluster, socket)))
}

async fn proxy_session(state: ControllerState, cluster: ClusterName, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let hello = tokio::time::timeout(HELLO_TIMEOUT, socket::receive(&mut stream)).await;
    let Ok(Incoming::Message(MessageFromProxy::Hello {
        name,
        version,
        hash,
        instance,
        report_interval_ms,
    })) = hello
    else {
        tracing::warn!(%cluster, "proxy socket closed: no hello");
        return;
    };
    // An open connection the proxy told us of counts until three reports pass without it
    // being refreshed (the proxy died with the controller unaware, say).
    let connection_ttl_ms = report_interval_ms
        .unwrap_or(DEFAULT_REPORT_INTERVAL_MS)
        .max(1)
        .saturating_mul(3);
    let session = NodeSession {
        cluster: &cluster,
        kind: NodeKind::Proxy,
        name: &name,
        pool: "",
        version: &version,
        hash: &hash,
        instance: &instance,
        controller: state.controller_id(),
    };
    let generation = match state
        .store()
        .node_connected(&session, socket::live_since())
        .await
    {
        Ok(Some(generation)) => generation,
        Ok(None) => {
            let reason = socket::duplicate_name_reason("proxy", &name);
            tracing::error!(proxy = %name, %cluster, %reason, "refusing proxy");
            let _ = socket::send(&mut sink, &MessageToProxy::Refused { reason }).await;
            return;
        }
        Err(err) => {
            tracing::error!(proxy = %name, error = %err, "could not record proxy");
            return;
        }
    };
    if let Err(err) = state
        .store()
        .proxy_session_started(&cluster, &name, generation, Millis::now())
        .await
    {
        tracing::error!(proxy = %name, error = %err, "could not reset the proxy's connections");
        return;
    }
    let (sender, mut outbox) = mpsc::unbounded_channel();
    let _registration = state
        .nodes()
        .register_proxy(cluster.clone(), name.clone(), sender.clone());
    tracing::info!(proxy = %name, %cluster, "proxy connected");
    // Route lookups run concurrently; they end with the session.
    let mut lookups = tokio::task::JoinSet::new();

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
            Some(_) = lookups.join_next(), if !lookups.is_empty() => {}
            incoming = socket::receive::<MessageFromProxy>(&mut stream) => {
                silence.as_mut().reset(tokio::time::Instant::now() + SILENCE_TIMEOUT);
                match incoming {
                Incoming::Closed => break,
                Incoming::Alive => {}
                Incoming::Invalid(detail) => {
                    tracing::warn!(proxy = %name, %detail, "invalid message from proxy");
                }
                Incoming::Message(MessageFromProxy::Hello { .. }) => {
                    tracing::warn!(proxy = %name, "duplicate hello ignored");
                }
                Incoming::Message(MessageFromProxy::RouteRequest { token }) => {
                    let state = state.clone();
                    let cluster = cluster.clone();
                    let sender = sender.clone();
                    lookups.spawn(async move {
                        let answer = match resolve_route(&state, &cluster, &token).await {
                            Ok(answer) => answer,
                            Err(err) => {
                                tracing::error!(error = %err, "route lookup failed");
                                RouteAnswer::Unknown
                            }
                        };
                        let _ = sender.send(MessageToProxy::RouteResponse { token, answer });
                    });
                }
                Incoming::Message(MessageFromProxy::ConnectionsChanged { opened, closed }) => {
                    let now = Millis::now();
                    let expires_at = now.plus_millis(connection_ttl_ms);
                    if let Err(err) = state
                        .store()
                        .connections_changed(&cluster, &name, generation, &opened, &closed, now, expires_at)
                        .await
                    {
                        tracing::warn!(proxy = %name, error = %err, "could not record connection changes");
                    }
                }
                Incoming::Message(MessageFromProxy::KeepAlive { backends }) => {
                    if let Err(err) = state
                        .store()
                        .mark_active(&cluster, &backends, Millis::now())
                        .await
                    {
                        tracing::warn!(proxy = %name, error = %err, "could not record keep-alive");
                    }
                    let _ = state.store().touch_node(&cluster, NodeKind::Proxy, &name).await;
                }
            }
            }
        }
    }
    lookups.abort_all();
    // Its connections no longer keep anything alive; idle time for them starts now.
    if let Err(err) = state
        .store()
        .proxy_session_ended(&cluster, &name, generation, Millis::now())
        .await
    {
        tracing::warn!(proxy = %name, error = %err, "could not clear the proxy's connections; they lapse on their own");
    }
    if let Err(err) = state
        .store()
        .node_disconnected(&cluster, NodeKind::Proxy, &name, generation)
        .await
    {
        tracing::warn!(proxy = %name, error = %err, "could not record the proxy's disconnection");
    }
    tracing::info!(proxy = %name, %cluster, "proxy disconnected");
}

/// Where a token leads. A backend still starting is waited for, up to the configured limit,
/// and then answered [`RouteAnswer::Starting`] so the proxy can decide whether to ask again.
async fn resolve_route(
    state: &ControllerState,
    cluster: &ClusterName,
    token: &BearerToken,
) -> anyhow::Result<RouteAnswer> {
    let Some(token_row) = state.store().token(token).await? else {
        return Ok(RouteAnswer::Unknown);
    };
    if token_row.expires_at.is_some_and(|at| at <= Millis::now()) {
        return Ok(RouteAnswer::Expired);
    }
    let mut changes = state.bus().subscribe_status();
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(state.config().route_wait_timeout_ms);
    loop {
        let Some(backend) = state.store().backend(&token_row.backend_id).await? else {
            return Ok(RouteAnswer::Unknown);
        };
        if &backend.cluster != cluster {
            return Ok(RouteAnswer::Unknown);
        }
        if backend.status.is_terminating() {
            return Ok(RouteAnswer::Terminated {
                backend_id: backend.id,
                reason: backend.termination_reason,
                exit_code: backend.exit_code,
            });
        }
        if backend.status == BackendStatus::Ready {
            let Some(address) = backend.address else {
                anyhow::bail!("ready backend {} has no address", backend.id);
            };
            return Ok(RouteAnswer::Ready(RouteInfo {
                backend_id: backend.id,
                address,
                secret_token: token_row.secret,
                user: token_row.user,
                user_data: token_row.auth,
                issued_at: token_row.created_at,
                expires_at: token_row.expires_at,
                host: backend
                    .subdomain
                    .as_ref()
                    .map(|subdomain| cluster.host_for(Some(subdomain))),
            }));
        }
        // Wait for this backend's next change, then look again.
        if !ChangeBus::wait_for_change_of(&mut changes, &token_row.backend_id, deadline).await {
            return Ok(RouteAnswer::Starting {
                backend_id: backend.id,
                status: backend.status,
            });
        }
    }
}
