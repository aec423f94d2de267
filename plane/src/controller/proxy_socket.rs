//! The proxy socket: answers route requests (waiting for starting backends to become
//! ready), records connection reports, and pushes route removals.

use super::api::paths::{ClusterPath, SocketUpgrade};
use super::bus::ChangeBus;
use super::error::ApiErrorResponse;
use super::node_session::{self, Flow, Gone, NodeHandler, NodeSink, SILENCE_TIMEOUT};
use super::store::{NodeKind, NodeSession};
use super::ControllerState;
use axum::extract::ws::WebSocket;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use plane_protocol::backend::BackendStatus;
use plane_protocol::names::{BearerToken, ClusterName, NodeName};
use plane_protocol::proxy::{
    CertRequest, CertResponse, MessageFromProxy, MessageToProxy, RouteAnswer, RouteInfo,
    CERT_LEASE_SECONDS,
};
use plane_protocol::time::Millis;
use std::time::Duration;
use tokio::sync::mpsc;

/// Assumed for proxies whose hello does not give their report interval.
const DEFAULT_REPORT_INTERVAL_MS: u64 = 5_000;

#[utoipa::path(
    get,
    path = "/ctrl/c/{cluster}/proxy-socket",
    operation_id = "proxy_socket",
    tag = "nodes",
    params(("cluster" = plane_protocol::names::ClusterName, Path, description = "The cluster the node serves.")),
    responses(
        (status = 101, description = "A WebSocket for the proxy's session (see docs/architecture.md); not for API clients."),
    ),
)]
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
    let (mut sink, mut stream) = node_session::split::<MessageFromProxy, MessageToProxy>(socket);
    let Some(MessageFromProxy::Hello {
        name,
        version,
        hash,
        instance,
        report_interval_ms,
    }) = stream.hello().await
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
        disk_limits: false,
    };
    let refused = |reason| MessageToProxy::Refused { reason };
    let Some(generation) = node_session::register(&state, &session, &mut sink, refused).await
    else {
        return;
    };
    if let Err(err) = state
        .store()
        .proxy_session_started(&cluster, &name, generation, Millis::now())
        .await
    {
        tracing::error!(proxy = %name, error = %err, "could not reset the proxy's connections");
        return;
    }
    let (sender, outbox) = mpsc::unbounded_channel();
    let _registration = state
        .nodes()
        .register_proxy(cluster.clone(), name.clone(), sender.clone());
    let mut handler = ProxyHandler {
        state: state.clone(),
        cluster: cluster.clone(),
        name: name.clone(),
        generation,
        connection_ttl_ms,
        sender,
        outbox,
        lookups: tokio::task::JoinSet::new(),
    };
    node_session::serve(
        &state,
        &session,
        generation,
        SILENCE_TIMEOUT,
        &mut handler,
        &mut sink,
        &mut stream,
    )
    .await;
}

/// A proxy's session: answers its route requests (concurrently: a lookup may wait for a
/// starting backend), records its connection reports, and sends it what the change bus
/// routes to it (backend removals, revocations).
struct ProxyHandler {
    state: ControllerState,
    cluster: ClusterName,
    name: NodeName,
    generation: i64,
    connection_ttl_ms: u64,
    /// Messages for the proxy: route answers, and removals from the change bus.
    sender: mpsc::UnboundedSender<MessageToProxy>,
    outbox: mpsc::UnboundedReceiver<MessageToProxy>,
    /// Route lookups in flight; they end with the session.
    lookups: tokio::task::JoinSet<()>,
}

type ProxySink = NodeSink<MessageToProxy>;

impl NodeHandler for ProxyHandler {
    type FromNode = MessageFromProxy;
    type ToNode = MessageToProxy;
    /// A message to send (`None`: a lookup finished, nothing to send).
    type Event = Option<MessageToProxy>;

    async fn start(&mut self, _sink: &mut ProxySink) -> Result<(), Gone> {
        Ok(())
    }

    async fn next_event(&mut self) -> Option<Self::Event> {
        tokio::select! {
            message = self.outbox.recv() => message.map(Some),
            Some(_) = self.lookups.join_next(), if !self.lookups.is_empty() => Some(None),
        }
    }

    async fn on_event(&mut self, event: Self::Event, sink: &mut ProxySink) -> Result<Flow, Gone> {
        if let Some(message) = event {
            sink.send(&message).await?;
        }
        Ok(Flow::Continue)
    }

    async fn on_message(
        &mut self,
        message: MessageFromProxy,
        sink: &mut ProxySink,
    ) -> Result<Flow, Gone> {
        let (state, cluster, name) = (&self.state, &self.cluster, &self.name);
        match message {
            MessageFromProxy::Hello { .. } => {
                tracing::warn!(proxy = %name, "duplicate hello ignored");
            }
            MessageFromProxy::RouteRequest { token } => {
                let state = state.clone();
                let cluster = cluster.clone();
                let sender = self.sender.clone();
                self.lookups.spawn(async move {
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
            MessageFromProxy::ConnectionsChanged { opened, closed } => {
                let now = Millis::now();
                let expires_at = now.plus_millis(self.connection_ttl_ms);
                if let Err(err) = state
                    .store()
                    .connections_changed(
                        cluster,
                        name,
                        self.generation,
                        &opened,
                        &closed,
                        now,
                        expires_at,
                    )
                    .await
                {
                    tracing::warn!(proxy = %name, error = %err, "could not record connection changes");
                }
            }
            MessageFromProxy::KeepAlive { backends } => {
                // Also the proxy's heartbeat, sent every report interval even when no
                // backend had traffic.
                let marked = state
                    .store()
                    .mark_active(cluster, &backends, Millis::now())
                    .await;
                if let Err(err) = marked {
                    tracing::warn!(proxy = %name, error = %err, "could not record keep-alive");
                }
                let _ = state
                    .store()
                    .touch_node(cluster, NodeKind::Proxy, name)
                    .await;
            }
            MessageFromProxy::Cert { id, request } => {
                // Answered in order, before the next message is read: a certificate stored
                // is kept before the lease is released, so no other proxy orders again.
                let response = match cert_step(state, cluster, name, request).await {
                    Ok(response) => response,
                    Err(err) => {
                        tracing::warn!(proxy = %name, error = %err, "certificate request failed");
                        CertResponse::Failed {
                            error: err.to_string(),
                        }
                    }
                };
                sink.send(&MessageToProxy::Cert { id, response }).await?;
            }
        }
        Ok(Flow::Continue)
    }

    async fn finish(&mut self) {
        self.lookups.abort_all();
        // A proxy that went away mid-order frees the lease for the others at once rather
        // than when it expires.
        if let Err(err) = self
            .state
            .store()
            .release_cert_lease(&self.cluster, &self.name)
            .await
        {
            tracing::warn!(proxy = %self.name, error = %err, "could not release the certificate lease; it expires on its own");
        }
        // Its connections no longer keep anything alive; idle time for them starts now.
        if let Err(err) = self
            .state
            .store()
            .proxy_session_ended(&self.cluster, &self.name, self.generation, Millis::now())
            .await
        {
            tracing::warn!(proxy = %self.name, error = %err, "could not clear the proxy's connections; they lapse on their own");
        }
    }
}

/// How long published challenge values are served unless withdrawn first: long enough for
/// a CA's validation, short enough that a proxy that vanished mid-order leaves nothing behind.
const ACME_TXT_TTL_MS: u64 = 10 * 60 * 1000;

/// One step of a proxy's certificate manager.
async fn cert_step(
    state: &ControllerState,
    cluster: &ClusterName,
    proxy: &NodeName,
    request: CertRequest,
) -> anyhow::Result<CertResponse> {
    let store = state.store();
    let now = Millis::now();
    Ok(match request {
        CertRequest::Fetch => CertResponse::Certificate {
            certificate: store.certificate(cluster).await?,
        },
        CertRequest::TakeLease => {
            let expires_at = now.plus_millis(CERT_LEASE_SECONDS * 1000);
            let granted = store
                .take_cert_lease(cluster, proxy, now, expires_at)
                .await?;
            if granted {
                tracing::info!(%cluster, %proxy, "certificate lease held");
            }
            CertResponse::Lease { granted }
        }
        CertRequest::PublishTxt { values } => {
            if !store.holds_cert_lease(cluster, proxy, now).await? {
                return Ok(CertResponse::TxtPublished { published: false });
            }
            // Served under the host the certificate is for, whatever port the cluster has.
            let host: ClusterName = cluster.hostname().parse()?;
            let expires_at = now.plus_millis(ACME_TXT_TTL_MS);
            for value in &values {
                store
                    .publish_acme_txt(&host, value, now, expires_at)
                    .await?;
            }
            CertResponse::TxtPublished { published: true }
        }
        CertRequest::Store { certificate } => CertResponse::Stored {
            stored: store
                .store_certificate(cluster, &certificate, proxy, now)
                .await?,
        },
        CertRequest::ReleaseLease => {
            store.release_cert_lease(cluster, proxy).await?;
            CertResponse::Released
        }
    })
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
                protocol: backend.protocol,
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
