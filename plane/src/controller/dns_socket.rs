//! The DNS server socket (`/ctrl/dns-socket`): answers a DNS server's questions about the TXT
//! values published for clusters' ACME DNS-01 challenges.

use super::api::paths::SocketUpgrade;
use super::error::ApiErrorResponse;
use super::node_session::{self, Flow, Gone, NodeHandler, NodeSink, SILENCE_TIMEOUT};
use super::store::{NodeKind, NodeSession};
use super::ControllerState;
use axum::extract::ws::WebSocket;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use plane_protocol::dns::{MessageFromDns, MessageToDns};
use plane_protocol::time::Millis;

#[utoipa::path(
    get,
    path = "/ctrl/dns-socket",
    operation_id = "dns_socket",
    tag = "nodes",
    responses(
        (status = 101, description = "A WebSocket for the DNS server's session (see docs/architecture.md); not for API clients."),
    ),
)]
pub async fn handle_dns_socket(
    State(state): State<ControllerState>,
    headers: HeaderMap,
    SocketUpgrade(upgrade): SocketUpgrade,
) -> Result<Response, ApiErrorResponse> {
    super::auth::check_cluster_secret(&state, &headers, "dns")?;
    Ok(upgrade.on_upgrade(move |socket| dns_session(state, socket)))
}

async fn dns_session(state: ControllerState, socket: WebSocket) {
    let (mut sink, mut stream) = node_session::split::<MessageFromDns, MessageToDns>(socket);
    let Some(MessageFromDns::Hello {
        name,
        zone,
        version,
        hash,
        instance,
    }) = stream.hello().await
    else {
        tracing::warn!("dns socket closed: no hello");
        return;
    };
    let session = NodeSession {
        cluster: &zone,
        kind: NodeKind::Dns,
        name: &name,
        pool: "",
        version: &version,
        hash: &hash,
        instance: &instance,
        controller: state.controller_id(),
        disk_limits: false,
    };
    let refused = |reason| MessageToDns::Refused { reason };
    let Some(generation) = node_session::register(&state, &session, &mut sink, refused).await
    else {
        return;
    };
    let mut handler = DnsHandler {
        state: state.clone(),
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

/// A DNS server's session: one answer per question, from the store.
struct DnsHandler {
    state: ControllerState,
}

impl NodeHandler for DnsHandler {
    type FromNode = MessageFromDns;
    type ToNode = MessageToDns;
    type Event = ();

    async fn start(&mut self, _sink: &mut NodeSink<MessageToDns>) -> Result<(), Gone> {
        Ok(())
    }

    async fn next_event(&mut self) -> Option<()> {
        std::future::pending().await
    }

    async fn on_event(&mut self, (): (), _sink: &mut NodeSink<MessageToDns>) -> Result<Flow, Gone> {
        Ok(Flow::Continue)
    }

    async fn on_message(
        &mut self,
        message: MessageFromDns,
        sink: &mut NodeSink<MessageToDns>,
    ) -> Result<Flow, Gone> {
        match message {
            MessageFromDns::Hello { name, .. } => {
                tracing::warn!(dns = %name, "duplicate hello ignored");
            }
            MessageFromDns::TxtRecordRequest { cluster } => {
                match self.state.store().acme_txt(&cluster, Millis::now()).await {
                    Ok((known, values)) => {
                        sink.send(&MessageToDns::TxtRecordResponse {
                            cluster,
                            known,
                            values,
                        })
                        .await?;
                    }
                    // No answer: the DNS server answers SERVFAIL when its wait runs out.
                    Err(err) => tracing::warn!(%cluster, error = %err, "could not read TXT values"),
                }
            }
        }
        Ok(Flow::Continue)
    }

    async fn finish(&mut self) {}
}
