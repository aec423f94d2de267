//! An in-memory [`Runtime`] for unit tests of the lifecycle and executor. The image name
//! picks the behaviour: `missing` cannot be loaded, `hang` never finishes loading, `silent`
//! never answers HTTP, `stubborn` ignores SIGTERM; anything else answers HTTP and exits
//! with 143 on SIGTERM.

use super::{BackendSpec, Runtime, RuntimeError, Signal};
use futures_util::stream::{self, BoxStream, StreamExt};
use plane_protocol::api::{BackendLogLine, ExecutorConfig, LogStream};
use plane_protocol::names::BackendName;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum FakeContainer {
    Running { image: String },
    Exited(Option<i32>),
}

#[derive(Clone)]
pub(crate) struct FakeRuntime {
    containers: Arc<watch::Sender<HashMap<BackendName, FakeContainer>>>,
    started: Arc<Mutex<Vec<BackendName>>>,
    /// When each exited container's process exited.
    exit_times: Arc<Mutex<HashMap<BackendName, SystemTime>>>,
    /// OOM-killed containers, each with how many more times the engine's flag reads false.
    oom_flag_late: Arc<Mutex<HashMap<BackendName, u32>>>,
    answering: SocketAddr,
    /// Answers every request with 409: ready by the probe, but refuses a claim.
    refusing: SocketAddr,
    silent: SocketAddr,
    _silent_listener: Arc<TcpListener>,
}

impl FakeRuntime {
    pub(crate) async fn new() -> Self {
        let answering = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let answering_addr = answering.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = answering.accept().await {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            }
        });
        let refusing = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let refusing_addr = refusing.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = refusing.accept().await {
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 409 Conflict\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    )
                    .await;
            }
        });
        // Bound but never accepted from: connections queue up and no answer ever comes.
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self {
            containers: Arc::new(watch::channel(HashMap::new()).0),
            started: Arc::default(),
            exit_times: Arc::default(),
            oom_flag_late: Arc::default(),
            answering: answering_addr,
            refusing: refusing_addr,
            silent: silent.local_addr().expect("addr"),
            _silent_listener: Arc::new(silent),
        }
    }

    /// Pretends an earlier run left a container behind.
    pub(crate) fn add_orphan(&self, backend_id: BackendName) {
        self.containers.send_modify(|c| {
            c.insert(
                backend_id,
                FakeContainer::Running {
                    image: "orphan".into(),
                },
            );
        });
    }

    /// Makes a running backend exit by itself.
    pub(crate) fn exit(&self, backend_id: &BackendName, code: i32) {
        self.containers.send_modify(|c| {
            c.insert(backend_id.clone(), FakeContainer::Exited(Some(code)));
        });
        self.exited_now(backend_id);
    }

    /// Makes a running backend die as the OOM killer ends one (SIGKILL, exit code 137),
    /// with the engine's OOM flag reading false the first `flag_late_by` times it is asked,
    /// as when the engine hears of the OOM kill after the exit.
    pub(crate) fn oom_kill(&self, backend_id: &BackendName, flag_late_by: u32) {
        let mut late = self.oom_flag_late.lock().expect("lock");
        late.insert(backend_id.clone(), flag_late_by);
        drop(late);
        self.exit(backend_id, 137);
    }

    fn exited_now(&self, backend_id: &BackendName) {
        let mut times = self.exit_times.lock().expect("lock");
        times.insert(backend_id.clone(), SystemTime::now());
    }

    /// Pretends an exited backend exited `by` earlier than it did.
    pub(crate) fn backdate_exit(&self, backend_id: &BackendName, by: Duration) {
        let mut times = self.exit_times.lock().expect("lock");
        if let Some(at) = times.get_mut(backend_id) {
            *at -= by;
        }
    }

    pub(crate) fn container(&self, backend_id: &BackendName) -> Option<FakeContainer> {
        self.containers.borrow().get(backend_id).cloned()
    }

    /// Every backend ever started, in order.
    pub(crate) fn started(&self) -> Vec<BackendName> {
        self.started.lock().expect("lock").clone()
    }
}

impl Runtime for FakeRuntime {
    async fn prepare_image(&self, executable: &ExecutorConfig) -> Result<(), RuntimeError> {
        match executable.image.as_str() {
            "missing" => Err(RuntimeError::ImageUnavailable {
                image: executable.image.clone(),
                message: "no such image".into(),
            }),
            "hang" => std::future::pending().await,
            _ => Ok(()),
        }
    }

    async fn start_backend(&self, spec: &BackendSpec) -> Result<SocketAddr, RuntimeError> {
        self.started
            .lock()
            .expect("lock")
            .push(spec.backend_id.clone());
        self.containers.send_modify(|c| {
            c.insert(
                spec.backend_id.clone(),
                FakeContainer::Running {
                    image: spec.image.clone(),
                },
            );
        });
        Ok(match spec.image.as_str() {
            "silent" => self.silent,
            "refuses-claims" => self.refusing,
            _ => self.answering,
        })
    }

    async fn signal(&self, backend_id: &BackendName, signal: Signal) -> Result<(), RuntimeError> {
        let mut result = Ok(());
        self.containers.send_modify(|c| match c.get(backend_id) {
            None => result = Err(RuntimeError::NotFound(backend_id.clone())),
            Some(FakeContainer::Exited(_)) => {
                result = Err(RuntimeError::NotRunning(backend_id.clone()))
            }
            Some(FakeContainer::Running { image }) => {
                let exit = match signal {
                    Signal::Term if image == "stubborn" => None,
                    Signal::Term => Some(143),
                    Signal::Kill => Some(137),
                };
                if let Some(code) = exit {
                    c.insert(backend_id.clone(), FakeContainer::Exited(Some(code)));
                }
            }
        });
        if result.is_ok() && matches!(self.container(backend_id), Some(FakeContainer::Exited(_))) {
            self.exited_now(backend_id);
        }
        result
    }

    async fn wait_exit(&self, backend_id: &BackendName) -> Result<Option<i32>, RuntimeError> {
        let mut containers = self.containers.subscribe();
        let state = containers
            .wait_for(|c| !matches!(c.get(backend_id), Some(FakeContainer::Running { .. })))
            .await
            .map_err(|err| RuntimeError::Engine {
                context: "fake".into(),
                source: err.into(),
            })?;
        match state.get(backend_id) {
            Some(FakeContainer::Exited(code)) => Ok(*code),
            _ => Err(RuntimeError::NotFound(backend_id.clone())),
        }
    }

    async fn remove(&self, backend_id: &BackendName) -> Result<(), RuntimeError> {
        self.containers.send_modify(|c| {
            c.remove(backend_id);
        });
        Ok(())
    }

    async fn list_backends(&self) -> Result<Vec<BackendName>, RuntimeError> {
        Ok(self.containers.borrow().keys().cloned().collect())
    }

    fn supports_disk_limits(&self) -> bool {
        false
    }

    async fn has_container(&self, backend_id: &BackendName) -> Result<bool, RuntimeError> {
        Ok(self.container(backend_id).is_some())
    }

    async fn exited_backends(&self) -> Result<Vec<(BackendName, SystemTime)>, RuntimeError> {
        let times = self.exit_times.lock().expect("lock").clone();
        Ok(self
            .containers
            .borrow()
            .iter()
            .filter(|(_, container)| matches!(container, FakeContainer::Exited(_)))
            .map(|(id, _)| {
                (
                    id.clone(),
                    times.get(id).copied().unwrap_or_else(SystemTime::now),
                )
            })
            .collect())
    }

    /// One line naming the image while the container exists.
    fn logs(
        &self,
        backend_id: &BackendName,
        _follow: bool,
        _tail: Option<u64>,
    ) -> BoxStream<'static, Result<BackendLogLine, RuntimeError>> {
        let line = match self.container(backend_id) {
            Some(container) => Ok(BackendLogLine {
                stream: LogStream::Stdout,
                time: plane_protocol::time::Millis::now(),
                text: format!("{container:?}"),
            }),
            None => Err(RuntimeError::NotFound(backend_id.clone())),
        };
        stream::iter([line]).boxed()
    }

    async fn recorded(&self, _backend_id: &BackendName) -> super::Recorded {
        super::Recorded::default()
    }

    async fn oom_killed(&self, backend_id: &BackendName) -> Result<bool, RuntimeError> {
        if self.container(backend_id).is_none() {
            return Err(RuntimeError::NotFound(backend_id.clone()));
        }
        let mut late = self.oom_flag_late.lock().expect("lock");
        Ok(match late.get_mut(backend_id) {
            Some(0) => true,
            Some(asks_left) => {
                *asks_left -= 1;
                false
            }
            None => false,
        })
    }

    async fn running_address(
        &self,
        backend_id: &BackendName,
    ) -> Result<Option<SocketAddr>, RuntimeError> {
        Ok(match self.containers.borrow().get(backend_id) {
            Some(FakeContainer::Running { image }) if image == "silent" => Some(self.silent),
            Some(FakeContainer::Running { .. }) => Some(self.answering),
            _ => None,
        })
    }
}
