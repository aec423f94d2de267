//! A [`Runtime`] that counts and times every call to the one it wraps, for the drone's
//! Prometheus metrics: `plane_drone_runtime_calls_total{call, outcome}` and
//! `plane_drone_runtime_call_duration_seconds{call}`.

use super::{BackendSpec, Runtime, RuntimeError, Signal};
use futures_util::stream::BoxStream;
use plane_metrics::MetricsRegistry;
use plane_protocol::api::{BackendLogLine, ExecutorConfig};
use plane_protocol::names::BackendName;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    call: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallName {
    call: &'static str,
}

struct CallMetrics {
    calls: Family<CallLabels, Counter>,
    seconds: Family<CallName, Histogram>,
}

#[derive(Clone)]
pub struct Measured<R> {
    inner: R,
    metrics: Arc<CallMetrics>,
}

impl<R: Runtime> Measured<R> {
    pub fn new(inner: R, registry: &MetricsRegistry) -> Self {
        let metrics = CallMetrics {
            calls: Family::default(),
            seconds: Family::new_with_constructor(plane_metrics::latency_histogram),
        };
        registry.register(|r| {
            r.register(
                "plane_drone_runtime_calls",
                "Calls to the container engine, by call and outcome (ok or error)",
                metrics.calls.clone(),
            );
            r.register_with_unit(
                "plane_drone_runtime_call_duration",
                "How long calls to the container engine took, by call",
                Unit::Seconds,
                metrics.seconds.clone(),
            );
        });
        Self {
            inner,
            metrics: Arc::new(metrics),
        }
    }

    async fn observe<T>(
        &self,
        call: &'static str,
        work: impl Future<Output = Result<T, RuntimeError>>,
    ) -> Result<T, RuntimeError> {
        let started = Instant::now();
        let result = work.await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .calls
            .get_or_create(&CallLabels { call, outcome })
            .inc();
        self.metrics
            .seconds
            .get_or_create(&CallName { call })
            .observe(started.elapsed().as_secs_f64());
        result
    }
}

impl<R: Runtime> Runtime for Measured<R> {
    async fn prepare_image(&self, executable: &ExecutorConfig) -> Result<(), RuntimeError> {
        self.observe("prepare_image", self.inner.prepare_image(executable))
            .await
    }

    async fn start_backend(&self, spec: &BackendSpec) -> Result<SocketAddr, RuntimeError> {
        self.observe("start", self.inner.start_backend(spec)).await
    }

    async fn signal(&self, backend_id: &BackendName, signal: Signal) -> Result<(), RuntimeError> {
        self.observe("signal", self.inner.signal(backend_id, signal))
            .await
    }

    /// Not timed: it lasts as long as the backend does.
    async fn wait_exit(&self, backend_id: &BackendName) -> Result<Option<i32>, RuntimeError> {
        self.inner.wait_exit(backend_id).await
    }

    async fn remove(&self, backend_id: &BackendName) -> Result<(), RuntimeError> {
        self.observe("remove", self.inner.remove(backend_id)).await
    }

    async fn list_backends(&self) -> Result<Vec<BackendName>, RuntimeError> {
        self.observe("list", self.inner.list_backends()).await
    }

    async fn oom_killed(&self, backend_id: &BackendName) -> Result<bool, RuntimeError> {
        self.inner.oom_killed(backend_id).await
    }

    async fn recorded(&self, backend_id: &BackendName) -> super::Recorded {
        self.inner.recorded(backend_id).await
    }

    fn supports_disk_limits(&self) -> bool {
        self.inner.supports_disk_limits()
    }

    async fn has_container(&self, backend_id: &BackendName) -> Result<bool, RuntimeError> {
        self.observe("inspect", self.inner.has_container(backend_id))
            .await
    }

    async fn exited_backends(&self) -> Result<Vec<(BackendName, SystemTime)>, RuntimeError> {
        self.observe("list_exited", self.inner.exited_backends())
            .await
    }

    fn logs(
        &self,
        backend_id: &BackendName,
        follow: bool,
        tail: Option<u64>,
    ) -> BoxStream<'static, Result<BackendLogLine, RuntimeError>> {
        self.inner.logs(backend_id, follow, tail)
    }

    async fn running_address(
        &self,
        backend_id: &BackendName,
    ) -> Result<Option<SocketAddr>, RuntimeError> {
        self.observe("inspect", self.inner.running_address(backend_id))
            .await
    }
}
