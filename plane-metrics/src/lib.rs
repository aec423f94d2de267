//! Prometheus metrics for every component: one registry per process (`plane dev` runs all
//! its components on one), registered into at start and encoded as OpenMetrics text, which
//! Prometheus scrapes.
//!
//! Conventions: names start with `plane_`, counters end in `_total`, times are in seconds and
//! sizes in bytes (the unit in the name), and no label ever holds a backend ID, key or token,
//! so the number of series stays bounded by the fleet, not by its traffic.

pub use prometheus_client;

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The `Content-Type` of what [`MetricsRegistry::encode`] returns.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The process's registry. Cheap to clone; components register their metrics once, at
/// start, and a scrape encodes them all.
#[derive(Clone, Default)]
pub struct MetricsRegistry {
    registry: Arc<Mutex<Registry>>,
}

impl std::fmt::Debug for MetricsRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsRegistry")
    }
}

/// Every registry equals every other: it is where metrics go, not a setting, so the
/// configurations that carry one compare by their settings alone.
impl PartialEq for MetricsRegistry {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

impl Eq for MetricsRegistry {}

impl MetricsRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers metrics: `register` gets the registry under its lock.
    pub fn register(&self, register: impl FnOnce(&mut Registry)) {
        let mut registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        register(&mut registry);
    }

    /// Every registered metric, in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

/// Buckets for latencies, from half a millisecond to about 16 seconds, doubling.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Buckets for start-up times (connect to ready), from 10 ms to about 5 minutes, doubling.
pub fn startup_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

/// Serves `GET /metrics` on `listener` (a component's `--metrics-port`) until `cancel`.
pub async fn serve(listener: TcpListener, registry: MetricsRegistry, cancel: CancellationToken) {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
                    registry.encode(),
                )
            }
        }),
    );
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
    if let Err(err) = served {
        tracing::error!(error = %err, "the metrics server failed");
    }
}

/// Binds `--metrics-port` on `host` and serves there in the background.
pub async fn serve_on(
    host: std::net::IpAddr,
    port: u16,
    registry: MetricsRegistry,
    cancel: CancellationToken,
) -> anyhow::Result<std::net::SocketAddr> {
    use anyhow::Context;
    let listener = TcpListener::bind((host, port))
        .await
        .with_context(|| format!("binding --metrics-port {port} on {host}"))?;
    let address = listener.local_addr()?;
    tokio::spawn(serve(listener, registry, cancel));
    tracing::info!(%address, "serving metrics at /metrics");
    Ok(address)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn registered_metrics_encode_as_openmetrics_text() {
        let registry = MetricsRegistry::new();
        let counter = Counter::<u64>::default();
        // The encoder ends the help text with its own full stop.
        registry.register(|r| r.register("plane_things", "Things done", counter.clone()));
        counter.inc();
        let text = registry.encode();
        assert!(
            text.contains("# HELP plane_things Things done.\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE plane_things counter"), "{text}");
        assert!(text.contains("plane_things_total 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
