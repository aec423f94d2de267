//! The proxy's Prometheus metrics. Everything on the request path is a plain atomic (a
//! counter or gauge handle taken once at start), so counting costs no lookup or lock per
//! request; only the upstream latency histogram takes a short lock.

use plane_metrics::MetricsRegistry;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusClass {
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Direction {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Lookup {
    result: &'static str,
}

/// Cheap to clone.
#[derive(Clone)]
pub struct ProxyMetrics {
    inner: Arc<Inner>,
}

struct Inner {
    /// By status class, `1xx` to `5xx`.
    responses: [Counter; 5],
    upstream_seconds: Histogram,
    connections: Gauge,
    websockets: Gauge,
    to_backends: Counter,
    to_clients: Counter,
    route_hits: Counter,
    route_misses: Counter,
}

impl ProxyMetrics {
    pub fn new(registry: &MetricsRegistry) -> Self {
        let responses = Family::<StatusClass, Counter>::default();
        let bytes = Family::<Direction, Counter>::default();
        let lookups = Family::<Lookup, Counter>::default();
        let class = |status_class| series(&responses, &StatusClass { status_class });
        let responses_by_class = [
            class("1xx"),
            class("2xx"),
            class("3xx"),
            class("4xx"),
            class("5xx"),
        ];
        let direction = |direction| series(&bytes, &Direction { direction });
        let lookup = |result| series(&lookups, &Lookup { result });
        let inner = Inner {
            responses: responses_by_class,
            upstream_seconds: plane_metrics::latency_histogram(),
            connections: Gauge::default(),
            websockets: Gauge::default(),
            to_backends: direction("to_backend"),
            to_clients: direction("to_client"),
            route_hits: lookup("hit"),
            route_misses: lookup("miss"),
        };
        registry.register(|r| {
            r.register(
                "plane_proxy_requests",
                "Requests answered, by status class (the proxy's own answers included)",
                responses.clone(),
            );
            r.register_with_unit(
                "plane_proxy_upstream_response_duration",
                "From sending a request to a backend to its response headers",
                Unit::Seconds,
                inner.upstream_seconds.clone(),
            );
            r.register(
                "plane_proxy_open_connections",
                "Client connections open now",
                inner.connections.clone(),
            );
            r.register(
                "plane_proxy_open_websockets",
                "Upgraded connections (WebSockets and other tunnels) open now",
                inner.websockets.clone(),
            );
            r.register_with_unit(
                "plane_proxy_relayed",
                "Bytes relayed between clients and backends (bodies and tunnels), by direction",
                Unit::Bytes,
                bytes.clone(),
            );
            r.register(
                "plane_proxy_route_cache_lookups",
                "Token lookups in the route cache, by result (a miss asks the controller)",
                lookups.clone(),
            );
        });
        Self {
            inner: Arc::new(inner),
        }
    }

    pub fn response(&self, status: http::StatusCode) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.inner.responses[class].inc();
    }

    pub fn upstream_answered(&self, took: std::time::Duration) {
        self.inner.upstream_seconds.observe(took.as_secs_f64());
    }

    pub fn route_lookup(&self, hit: bool) {
        if hit {
            self.inner.route_hits.inc();
        } else {
            self.inner.route_misses.inc();
        }
    }

    /// Counts a client connection open until the guard is dropped.
    pub fn connection_open(&self) -> OpenGuard {
        OpenGuard::new(self.inner.connections.clone())
    }

    /// Counts a tunnel open until the guard is dropped.
    pub fn websocket_open(&self) -> OpenGuard {
        OpenGuard::new(self.inner.websockets.clone())
    }

    /// The counter of bytes from clients to backends.
    pub fn to_backends(&self) -> Counter {
        self.inner.to_backends.clone()
    }

    /// The counter of bytes from backends to clients.
    pub fn to_clients(&self) -> Counter {
        self.inner.to_clients.clone()
    }
}

/// The handle of one series of `family`, created if need be. The family's read guard is
/// dropped here, before the next series is asked for: creating one takes its write lock,
/// and a guard left in a temporary to the end of a statement would deadlock it.
fn series<L, M>(family: &Family<L, M>, labels: &L) -> M
where
    L: Clone + std::hash::Hash + Eq,
    M: Clone + Default,
{
    let metric = family.get_or_create(labels).clone();
    metric
}

/// Holds a gauge one higher while it lives.
pub struct OpenGuard(Gauge);

impl OpenGuard {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
