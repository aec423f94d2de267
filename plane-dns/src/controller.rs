//! The DNS server's session with the controller, over the shared node link: asks for a
//! cluster's TXT values and hands the answers to the queries waiting for them. Concurrent
//! queries for one cluster share one question.

use plane_link::{Link, LinkError, Session, SessionEnd};
use plane_protocol::dns::{MessageFromDns, MessageToDns};
use plane_protocol::names::{ClusterName, NodeName};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// How long a query waits for the controller's answer before it is answered SERVFAIL.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Between pings (and silence checks) on the link.
const PING_INTERVAL: Duration = Duration::from_secs(5);

/// What the controller holds for a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxtAnswer {
    pub known: bool,
    pub values: Vec<String>,
}

type Waiters = HashMap<ClusterName, Vec<oneshot::Sender<TxtAnswer>>>;

/// Asks the controller about clusters. Cheap to clone.
#[derive(Clone)]
pub struct Answers {
    pending: Arc<Mutex<Waiters>>,
    requests: mpsc::UnboundedSender<ClusterName>,
}

impl Answers {
    fn pending(pending: &Mutex<Waiters>) -> std::sync::MutexGuard<'_, Waiters> {
        // Every update is a single step, so a poisoned lock is still consistent.
        pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The controller's answer for `cluster`, or `None` if it does not come within
    /// [`ANSWER_TIMEOUT`] (no link, or a slow controller).
    pub async fn txt(&self, cluster: &ClusterName) -> Option<TxtAnswer> {
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = Self::pending(&self.pending);
            let waiters = pending.entry(cluster.clone()).or_default();
            waiters.retain(|waiter| !waiter.is_closed());
            let first = waiters.is_empty();
            waiters.push(tx);
            if first {
                // Fails only once the session task is gone (shutdown): the wait times out.
                let _ = self.requests.send(cluster.clone());
            }
        }
        tokio::time::timeout(ANSWER_TIMEOUT, rx).await.ok()?.ok()
    }
}

/// The link session, and the handle queries use.
pub fn start(name: NodeName, zone: ClusterName) -> (Answers, DnsSession) {
    let (requests, incoming) = mpsc::unbounded_channel();
    let pending = Arc::new(Mutex::new(HashMap::new()));
    let answers = Answers {
        pending: Arc::clone(&pending),
        requests,
    };
    let session = DnsSession {
        name,
        zone,
        instance: plane_protocol::names::new_instance_id(),
        pending,
        requests: incoming,
        cancel: CancellationToken::new(),
    };
    (answers, session)
}

pub struct DnsSession {
    name: NodeName,
    zone: ClusterName,
    instance: String,
    pending: Arc<Mutex<Waiters>>,
    requests: mpsc::UnboundedReceiver<ClusterName>,
    pub(crate) cancel: CancellationToken,
}

type ControllerLink = Link<MessageFromDns, MessageToDns>;

impl Session<MessageFromDns, MessageToDns> for DnsSession {
    async fn run(&mut self, link: &mut ControllerLink) -> SessionEnd {
        match self.serve(link).await {
            Ok(end) => end,
            Err(error) => SessionEnd::Lost(error),
        }
    }
}

impl DnsSession {
    async fn serve(&mut self, link: &mut ControllerLink) -> Result<SessionEnd, LinkError> {
        link.send(&MessageFromDns::Hello {
            name: self.name.clone(),
            zone: self.zone.clone(),
            version: plane_protocol::PLANE_VERSION.to_string(),
            hash: plane_protocol::PLANE_HASH.to_string(),
            instance: self.instance.clone(),
        })
        .await?;
        // Questions asked while the link was down: ask them now (queued ones are among them).
        while self.requests.try_recv().is_ok() {}
        let waiting: Vec<ClusterName> = {
            let mut pending = Answers::pending(&self.pending);
            pending.retain(|_, waiters| {
                waiters.retain(|waiter| !waiter.is_closed());
                !waiters.is_empty()
            });
            pending.keys().cloned().collect()
        };
        for cluster in waiting {
            link.send(&MessageFromDns::TxtRecordRequest { cluster })
                .await?;
        }
        tracing::info!(name = %self.name, zone = %self.zone, "dns session started");
        let silence = plane_link::silence_limit(PING_INTERVAL);
        let mut ping = tokio::time::interval(PING_INTERVAL);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return Ok(SessionEnd::Shutdown),
                cluster = self.requests.recv() => match cluster {
                    Some(cluster) => link.send(&MessageFromDns::TxtRecordRequest { cluster }).await?,
                    None => return Ok(SessionEnd::Shutdown),
                },
                message = link.recv() => match message? {
                    MessageToDns::TxtRecordResponse { cluster, known, values } => {
                        let waiters = Answers::pending(&self.pending).remove(&cluster).unwrap_or_default();
                        let answer = TxtAnswer { known, values };
                        for waiter in waiters {
                            let _ = waiter.send(answer.clone());
                        }
                    }
                    MessageToDns::Refused { reason } => return Ok(SessionEnd::Refused(reason)),
                },
                _ = ping.tick() => {
                    link.check_silence(silence)?;
                    link.ping().await?;
                }
            }
        }
    }
}
