//! The controller's Prometheus metrics, and `GET /metrics`, which refreshes the counts read
//! from the database (backends, nodes, actions) and encodes the process's whole registry
//! (under `plane dev`, the drone's and proxy's too).

use super::error::ApiErrorResponse;
use super::ControllerState;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use plane_metrics::MetricsRegistry;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// `connect` or `spawn`.
    endpoint: &'static str,
    /// `spawned`, `joined`, or the error's kind.
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    cluster: String,
    drone: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    cluster: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    cluster: String,
    /// `sent` (the drone has a session; the ack is awaited) or `pending` (waiting for the
    /// drone to reconnect).
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// Why the sweeper terminated a backend.
#[derive(Clone, Copy, Debug)]
pub enum SweepReason {
    /// Idle past `max_idle_seconds`, or older than its lifetime limit.
    IdleOrExpired,
    /// Its key lease ran out.
    LeaseExpired,
    /// Its drone was silent past the lost window.
    DroneLost,
}

pub struct ControllerMetrics {
    requests: Family<RequestLabels, Counter>,
    request_seconds: Family<EndpointLabels, Histogram>,
    startup_seconds: Histogram,
    backends: Family<BackendLabels, Gauge>,
    nodes: Family<NodeLabels, Gauge>,
    actions_unacked: Family<ActionLabels, Gauge>,
    sweeps: Family<ReasonLabels, Counter>,
    deleted: Family<KindLabels, Counter>,
    registry: MetricsRegistry,
}

impl ControllerMetrics {
    pub fn new(registry: &MetricsRegistry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(plane_metrics::latency_histogram),
            startup_seconds: plane_metrics::startup_histogram(),
            backends: Family::default(),
            nodes: Family::default(),
            actions_unacked: Family::default(),
            sweeps: Family::default(),
            deleted: Family::default(),
            registry: registry.clone(),
        };
        registry.register(|r| {
            r.register(
                "plane_connect_requests",
                "Connect and spawn requests, by endpoint and outcome (spawned, joined, or the error's kind)",
                metrics.requests.clone(),
            );
            r.register_with_unit(
                "plane_connect_request_duration",
                "How long connect and spawn requests took to answer",
                Unit::Seconds,
                metrics.request_seconds.clone(),
            );
            r.register_with_unit(
                "plane_backend_startup_duration",
                "From a backend's creation (its connect or spawn) to its drone reporting it ready",
                Unit::Seconds,
                metrics.startup_seconds.clone(),
            );
            r.register(
                "plane_backends",
                "Backends not yet terminated, by cluster, drone and status",
                metrics.backends.clone(),
            );
            r.register(
                "plane_nodes_connected",
                "Nodes with a session on any controller, by cluster and kind",
                metrics.nodes.clone(),
            );
            r.register(
                "plane_actions_unacked",
                "Actions stored for drones that they have not acknowledged yet, by cluster and state (sent: awaiting the ack; pending: the drone has no session)",
                metrics.actions_unacked.clone(),
            );
            r.register(
                "plane_sweeps",
                "Backends the sweeper ended, by reason",
                metrics.sweeps.clone(),
            );
            r.register(
                "plane_retention_deleted_rows",
                "Rows deleted for being past --retention-days, by kind",
                metrics.deleted.clone(),
            );
        });
        metrics
    }

    /// A connect (`endpoint` "connect") or spawn answered, with how it went.
    pub fn request_done<T>(
        &self,
        endpoint: &'static str,
        took: Duration,
        result: &Result<T, ApiErrorResponse>,
        spawned: impl FnOnce(&T) -> bool,
    ) {
        let outcome = match result {
            Ok(answer) if spawned(answer) => "spawned".to_string(),
            Ok(_) => "joined".to_string(),
            Err(err) => format!("{:?}", err.kind).to_lowercase(),
        };
        self.requests
            .get_or_create(&RequestLabels { endpoint, outcome })
            .inc();
        self.request_seconds
            .get_or_create(&EndpointLabels { endpoint })
            .observe(took.as_secs_f64());
    }

    /// A backend became ready `took` after it was created.
    pub fn backend_ready(&self, took: Duration) {
        self.startup_seconds.observe(took.as_secs_f64());
    }

    pub fn swept(&self, reason: SweepReason, count: u64) {
        let reason = match reason {
            SweepReason::IdleOrExpired => "idle_or_expired",
            SweepReason::LeaseExpired => "lease_expired",
            SweepReason::DroneLost => "drone_lost",
        };
        self.sweeps
            .get_or_create(&ReasonLabels { reason })
            .inc_by(count);
    }

    pub fn purged(&self, purged: &super::store::Purged) {
        for (kind, count) in [
            ("backends", purged.backends),
            ("statuses", purged.statuses),
            ("tokens", purged.tokens),
            ("actions", purged.actions),
            ("revocations", purged.revocations),
        ] {
            if count > 0 {
                self.deleted
                    .get_or_create(&KindLabels { kind })
                    .inc_by(count);
            }
        }
    }
}

/// `GET /metrics`: the counts read now from the database, and everything else the process
/// has registered.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "controller",
    responses((status = 200, description = "Every metric, in the OpenMetrics text format (which Prometheus scrapes).", content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String)),
)]
pub async fn handle_metrics(
    State(state): State<ControllerState>,
) -> Result<impl IntoResponse, ApiErrorResponse> {
    let metrics = state.metrics();
    let store = state.store();
    let backends = store.live_backend_census().await?;
    let nodes = store.connected_node_census().await?;
    let fresh_since = plane_protocol::time::Millis::now().minus_millis(state.config().lease_ms);
    let actions = store.unacked_action_census(fresh_since).await?;
    // Cleared first, so a drone with no backends left, or a cluster gone, leaves no series.
    metrics.backends.clear();
    for counted in backends {
        if let [cluster, drone, status] = counted.labels.as_slice() {
            let labels = BackendLabels {
                cluster: cluster.clone(),
                drone: drone.clone(),
                status: status.clone(),
            };
            metrics.backends.get_or_create(&labels).set(counted.count);
        }
    }
    metrics.nodes.clear();
    for counted in nodes {
        if let [cluster, kind] = counted.labels.as_slice() {
            let labels = NodeLabels {
                cluster: cluster.clone(),
                kind: kind.clone(),
            };
            metrics.nodes.get_or_create(&labels).set(counted.count);
        }
    }
    metrics.actions_unacked.clear();
    for counted in actions {
        if let [cluster, action_state] = counted.labels.as_slice() {
            let labels = ActionLabels {
                cluster: cluster.clone(),
                state: action_state.clone(),
            };
            metrics
                .actions_unacked
                .get_or_create(&labels)
                .set(counted.count);
        }
    }
    Ok((
        [(header::CONTENT_TYPE, plane_metrics::CONTENT_TYPE)],
        metrics.registry.encode(),
    ))
}
