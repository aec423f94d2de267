//! The drone's session with the controller, over the shared node link (`plane-link`, which
//! reconnects with capped exponential backoff): says hello, replays unacked events,
//! heartbeats, hands actions to the executor and acks them.

use crate::event_queue::EventQueue;
use crate::executor::ExecutorHandle;
use crate::leases::Leases;
use crate::log_relay::LogRelays;
use plane_link::{Link, LinkError, Session, SessionEnd};
use plane_protocol::backend::{TerminationKind, TerminationReason};
use plane_protocol::drone::{ActionKind, BackendAction, MessageFromDrone, MessageToDrone};
use plane_protocol::names::{NodeName, PoolName};
use plane_protocol::PLANE_VERSION;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

type ControllerLink = Link<MessageFromDrone, MessageToDrone>;

/// How many of the oldest unacked events are sent again when acks stop coming.
const RESEND_PAGE: usize = 100;
/// A session whose controller has not answered a heartbeat for this many heartbeat
/// intervals is dropped and a new one opened.
const RENEWAL_LIMIT_HEARTBEATS: u32 = 4;

/// What the connection task needs.
pub(crate) struct Connection {
    pub name: NodeName,
    /// This process's instance ID, the same in every session it opens.
    pub instance: String,
    pub pool: PoolName,
    pub heartbeat_interval: Duration,
    pub fence_margin: Duration,
    /// Whether the engine can limit a container's disk (told to the controller).
    pub disk_limits: bool,
    /// Heartbeats renew these; answers update them.
    pub leases: Leases,
    pub executor: ExecutorHandle,
    pub events: EventQueue,
    /// True while a session is open (hello sent).
    pub connected: watch::Sender<bool>,
    /// Once cancelled, incoming actions are ignored (and not acked), so the controller
    /// re-sends them to whoever takes over. Events keep flowing.
    pub stop_actions: CancellationToken,
    /// The drone is shutting down: end the session (and the link).
    pub cancel: CancellationToken,
}

/// Why a session ends early: the link failed, or the controller refused the drone.
enum Stop {
    Link(LinkError),
    Refused(String),
}

impl From<LinkError> for Stop {
    fn from(error: LinkError) -> Self {
        Self::Link(error)
    }
}

impl Session<MessageFromDrone, MessageToDrone> for Connection {
    async fn run(&mut self, link: &mut ControllerLink) -> SessionEnd {
        let end = self.session(link).await;
        self.connected.send_replace(false);
        end
    }
}

impl Connection {
    async fn session(&self, link: &mut ControllerLink) -> SessionEnd {
        match self.serve(link).await {
            Ok(()) => SessionEnd::Shutdown,
            Err(Stop::Link(error)) => SessionEnd::Lost(error),
            Err(Stop::Refused(reason)) => SessionEnd::Refused(reason),
        }
    }

    /// Runs one session until the drone shuts down (`Ok`) or it must end.
    async fn serve(&self, link: &mut ControllerLink) -> Result<(), Stop> {
        // Subscribe before the replay so an event pushed during it wakes the loop below.
        let mut events_changed = self.events.subscribe();
        let hello = MessageFromDrone::Hello {
            name: self.name.clone(),
            pool: self.pool.clone(),
            version: PLANE_VERSION.to_string(),
            hash: plane_protocol::PLANE_HASH.to_string(),
            instance: self.instance.clone(),
            heartbeat_interval_ms: Some(self.heartbeat_interval.as_millis() as u64),
            fence_margin_ms: Some(self.fence_margin.as_millis() as u64),
            disk_limits: self.disk_limits,
        };
        link.send(&hello).await?;
        self.connected.send_replace(true);
        // The highest event ID sent on this connection; everything unacked is re-sent on
        // a new one, since the controller may not have seen it.
        let mut last_sent = None;
        self.send_new_events(link, &mut last_sent).await?;

        let silence_limit = plane_link::silence_limit(self.heartbeat_interval);
        let renewal_limit = self.heartbeat_interval * RENEWAL_LIMIT_HEARTBEATS;
        let session_start = Instant::now();
        // The oldest unacked event at the previous heartbeat. Still unacked a whole
        // interval later means the controller did not store it (it acks only what it
        // stored), so everything unacked is sent again; duplicates are harmless.
        let mut oldest_unacked_at_last_beat = None;
        let mut heartbeat = tokio::time::interval(self.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Pulls the controller asked for; their answers go on this session (one that ends
        // first is reported disconnected by the controller).
        let mut pulls = tokio::task::JoinSet::new();
        // Log requests, likewise answered on this session only.
        let mut logs = LogRelays::new(self.executor.clone());

        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return Ok(()),
                message = link.recv() => match message? {
                    MessageToDrone::Prepull { request_id, image, credentials } => {
                        tracing::info!(%image, "pulling an image the controller asked for");
                        let executor = self.executor.clone();
                        pulls.spawn(async move {
                            let error = executor.prepull(image, credentials).await.err();
                            MessageFromDrone::PrepullDone { request_id, error }
                        });
                    }
                    MessageToDrone::Logs { request_id, request } => logs.start(request_id, request),
                    MessageToDrone::LogsNext { request_id } => logs.credit(request_id),
                    MessageToDrone::LogsCancel { request_id } => logs.cancel(request_id),
                    message => self.handle_message(link, message).await?,
                },
                Some(Ok(done)) = pulls.join_next(), if !pulls.is_empty() => link.send(&done).await?,
                message = logs.next_message() => link.send(&message).await?,
                _ = heartbeat.tick() => {
                    link.check_silence(silence_limit)?;
                    let last_renewal = self
                        .leases
                        .last_renewal()
                        .map_or(session_start, |at| at.max(session_start));
                    if last_renewal.elapsed() > renewal_limit {
                        // The controller answers pings but not heartbeats (its database is
                        // out of reach, say): try again, perhaps reaching another controller,
                        // rather than let every lease run out on this session.
                        return Err(Stop::Link(LinkError::Unhealthy(format!(
                            "no lease renewal from the controller for {renewal_limit:?}"
                        ))));
                    }
                    let oldest = self.events.unacked_after(None).first().map(|e| e.event_id);
                    let stuck = oldest.is_some() && oldest == oldest_unacked_at_last_beat;
                    oldest_unacked_at_last_beat = oldest;
                    self.heartbeat(link).await?;
                    if stuck {
                        // Only the oldest page goes again: a controller that is merely slow
                        // is not sent its whole backlog once more every beat.
                        self.resend_oldest_events(link).await?;
                    } else {
                        self.send_new_events(link, &mut last_sent).await?;
                    }
                }
                Ok(()) = events_changed.changed() => {
                    self.send_new_events(link, &mut last_sent).await?;
                }
                // A new backend waits for its lease: renew now rather than at the next beat.
                _ = self.leases.renewal_requested() => self.renew_leases(link).await?,
            }
        }
    }

    async fn heartbeat(&self, link: &mut ControllerLink) -> Result<(), LinkError> {
        self.renew_leases(link).await?;
        // Gives a quiet controller something to answer, so the silence check above
        // only trips on a dead connection.
        link.ping().await
    }

    /// Sends a heartbeat naming every backend this drone runs; the controller's answer
    /// ([`MessageToDrone::LeaseRenewal`]) renews their leases.
    async fn renew_leases(&self, link: &mut ControllerLink) -> Result<(), LinkError> {
        let backends = match self.executor.running().await {
            Ok(backends) => backends,
            // Shutting down: the last heartbeats are not worth a reconnect.
            Err(_) => return Ok(()),
        };
        // Recorded before sending, so the lease is counted from no later than the send.
        let seq = self.leases.heartbeat_sent();
        link.send(&MessageFromDrone::Heartbeat { backends, seq })
            .await
    }

    async fn send_new_events(
        &self,
        link: &mut ControllerLink,
        last_sent: &mut Option<u64>,
    ) -> Result<(), LinkError> {
        for event in self.events.unacked_after(*last_sent) {
            let event_id = event.event_id;
            link.send(&MessageFromDrone::BackendEvent(event)).await?;
            *last_sent = Some(event_id);
        }
        Ok(())
    }

    /// Sends the oldest unacked events again (at most a page of them).
    async fn resend_oldest_events(&self, link: &mut ControllerLink) -> Result<(), LinkError> {
        for event in self
            .events
            .unacked_after(None)
            .into_iter()
            .take(RESEND_PAGE)
        {
            link.send(&MessageFromDrone::BackendEvent(event)).await?;
        }
        Ok(())
    }

    async fn handle_message(
        &self,
        link: &mut ControllerLink,
        message: MessageToDrone,
    ) -> Result<(), Stop> {
        match message {
            MessageToDrone::EventAck { event_id } => {
                self.events.ack(event_id);
                Ok(())
            }
            MessageToDrone::Action(action) => Ok(self.handle_action(link, action).await?),
            MessageToDrone::LeaseRenewal {
                seq,
                lease_ms,
                renewed,
                gone,
            } => {
                self.leases
                    .renewed(seq, Duration::from_millis(lease_ms), &renewed);
                for backend_id in gone {
                    // The controller has given this backend up (its lease ran out, or this
                    // drone was declared lost): whatever still runs must stop now.
                    tracing::warn!(backend = %backend_id, "controller says this backend is gone; killing it");
                    let _ = self
                        .executor
                        .terminate(backend_id, TerminationKind::Hard, TerminationReason::Lost)
                        .await;
                }
                Ok(())
            }
            MessageToDrone::Refused { reason } => Err(Stop::Refused(reason)),
            // Handled by the session loop, which owns the pulls in flight.
            // Served by the session loop.
            MessageToDrone::Prepull { .. }
            | MessageToDrone::Logs { .. }
            | MessageToDrone::LogsNext { .. }
            | MessageToDrone::LogsCancel { .. } => Ok(()),
        }
    }

    async fn handle_action(
        &self,
        link: &mut ControllerLink,
        action: BackendAction,
    ) -> Result<(), LinkError> {
        if self.stop_actions.is_cancelled() {
            tracing::info!(
                action_id = action.action_id,
                "shutting down; leaving action unacked"
            );
            return Ok(());
        }
        let BackendAction {
            action_id,
            backend_id,
            action,
        } = action;
        let accepted = match action {
            ActionKind::Spawn(spawn) => self.executor.spawn(backend_id, spawn).await,
            ActionKind::Claim(claim) => self.executor.claim(backend_id, claim).await,
            ActionKind::Terminate { kind, reason } => {
                self.executor.terminate(backend_id, kind, reason).await
            }
        };
        match accepted {
            Ok(()) => link.send(&MessageFromDrone::ActionAck { action_id }).await,
            Err(err) => {
                tracing::info!(action_id, error = %err, "action not accepted; leaving it unacked");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DroneConfig;
    use crate::event_queue::test_support::TempStateDir;
    use crate::executor;
    use crate::lifecycle::LifecycleSettings;
    use crate::runtime::fake::FakeRuntime;
    use futures_util::{SinkExt, StreamExt};
    use plane_protocol::api::ExecutorConfig;
    use plane_protocol::backend::{BackendStateUpdate, BackendStatus, TerminationReason};
    use plane_protocol::drone::{BackendEvent, SpawnAction};
    use plane_protocol::names::BackendName;
    use plane_protocol::names::ClusterName;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::{accept_hdr_async, WebSocketStream};
    use url::Url;

    type ServerSocket = WebSocketStream<TcpStream>;

    async fn accept(listener: &TcpListener) -> ServerSocket {
        let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("drone connects within 10 s")
            .expect("accept");
        // The callback's signature is tungstenite's; its error type is not ours to shrink.
        #[allow(clippy::result_large_err)]
        let check_path = |request: &Request, response: Response| {
            assert_eq!(request.uri().path(), "/ctrl/c/localhost:9090/drone-socket");
            Ok(response)
        };
        accept_hdr_async(stream, check_path)
            .await
            .expect("websocket handshake")
    }

    /// The drone's next message other than a heartbeat.
    /// Answers heartbeats as a controller does, renewing every listed backend's lease for a
    /// minute, so that spawned backends may start.
    async fn next_message(socket: &mut ServerSocket) -> MessageFromDrone {
        let read = async {
            loop {
                let frame = socket.next().await.expect("socket open").expect("frame");
                if let Message::Text(text) = frame {
                    let message: MessageFromDrone =
                        serde_json::from_str(&text).expect("valid drone message");
                    let MessageFromDrone::Heartbeat { backends, seq } = message else {
                        return message;
                    };
                    let renewal = MessageToDrone::LeaseRenewal {
                        seq,
                        lease_ms: 60_000,
                        renewed: backends,
                        gone: vec![],
                    };
                    send_to_drone(socket, &renewal).await;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("a message within 10 s")
    }

    fn runtime_started(runtime: &FakeRuntime) -> usize {
        runtime.started().len()
    }

    async fn send_to_drone(socket: &mut ServerSocket, message: &MessageToDrone) {
        let json = serde_json::to_string(message).expect("encodes");
        socket.send(Message::Text(json.into())).await.expect("send");
    }

    #[tokio::test]
    async fn unacked_events_are_replayed_after_a_reconnect_and_actions_are_acked() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base: Url = format!("http://{}", listener.local_addr().expect("addr"))
            .parse()
            .expect("url");
        let cluster: ClusterName = "localhost:9090".parse().expect("cluster");
        let cancel = CancellationToken::new();
        let state_dir = TempStateDir::new();
        let events = EventQueue::open(state_dir.path()).await.expect("open");
        let leases = Leases::new(Duration::from_millis(100));
        let (executor, _task) = executor::start(
            FakeRuntime::new().await,
            events.clone(),
            leases.clone(),
            LifecycleSettings {
                stop_grace_period: Duration::from_millis(100),
                startup_timeout: Duration::from_secs(1),
                health: Default::default(),
                mount_base: None,
                log_retention: Duration::ZERO,
            },
            std::collections::BTreeMap::new(),
            cancel.clone(),
        )
        .await
        .expect("executor");
        let earlier = BackendName::new_random();
        let event_id = events
            .push(
                earlier.clone(),
                BackendStateUpdate::status(BackendStatus::Loading),
            )
            .await;
        let (connected_tx, mut connected) = watch::channel(false);
        let connection = Connection {
            name: "dr-conn-test".parse().expect("name"),
            instance: "test-instance".to_string(),
            pool: PoolName::default(),
            heartbeat_interval: Duration::from_millis(50),
            fence_margin: Duration::from_millis(100),
            disk_limits: false,
            leases,
            executor,
            events: events.clone(),
            connected: connected_tx,
            stop_actions: CancellationToken::new(),
            cancel: cancel.clone(),
        };
        let link = plane_link::LinkConfig {
            controller: base,
            kind: plane_link::SocketKind::Drone(cluster),
            cluster_secret: None,
            ca_file: None,
            max_backoff: Duration::from_millis(200),
        };
        let task = tokio::spawn(plane_link::run(link, connection, cancel.clone()));

        // First connection: hello, then the pending event; drop it without acking.
        let mut socket = accept(&listener).await;
        assert!(matches!(
            next_message(&mut socket).await,
            MessageFromDrone::Hello { ref name, .. } if name.as_str() == "dr-conn-test"
        ));
        match next_message(&mut socket).await {
            MessageFromDrone::BackendEvent(event) => assert_eq!(event.event_id, event_id),
            other => panic!("expected the pending event, got {other:?}"),
        }
        connected.wait_for(|c| *c).await.expect("watch alive");
        drop(socket);

        // Second connection: hello and the same event again, since it was never acked.
        let mut socket = accept(&listener).await;
        assert!(matches!(
            next_message(&mut socket).await,
            MessageFromDrone::Hello { .. }
        ));
        match next_message(&mut socket).await {
            MessageFromDrone::BackendEvent(event) => assert_eq!(event.event_id, event_id),
            other => panic!("expected the replayed event, got {other:?}"),
        }
        send_to_drone(&mut socket, &MessageToDrone::EventAck { event_id }).await;

        let unknown = BackendName::new_random();
        send_to_drone(
            &mut socket,
            &MessageToDrone::Action(BackendAction {
                action_id: 5,
                backend_id: unknown.clone(),
                action: ActionKind::Terminate {
                    kind: plane_protocol::backend::TerminationKind::Hard,
                    reason: plane_protocol::backend::TerminationReason::External,
                },
            }),
        )
        .await;
        let mut acked = false;
        let mut reported = false;
        while !(acked && reported) {
            match next_message(&mut socket).await {
                MessageFromDrone::ActionAck { action_id } => {
                    assert_eq!(action_id, 5);
                    acked = true;
                }
                MessageFromDrone::BackendEvent(event) => {
                    assert_eq!(event.backend_id, unknown);
                    assert_eq!(event.update.status, BackendStatus::Terminated);
                    reported = true;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // The ack above was processed before the action, so only the new event is pending.
        assert!(events
            .unacked_after(None)
            .iter()
            .all(|e| e.event_id != event_id));

        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("connection task stops")
            .expect("no panic")
            .expect("a usable link configuration");
        assert!(!*connected.borrow());
    }

    /// Reads drone messages until the event that reports `status` for `backend_id`, and
    /// returns every event seen on the way (acking none of them).
    async fn events_until(
        socket: &mut ServerSocket,
        backend_id: &BackendName,
        status: BackendStatus,
    ) -> Vec<BackendEvent> {
        let mut seen = Vec::new();
        loop {
            match next_message(socket).await {
                MessageFromDrone::BackendEvent(event) => {
                    let done = &event.backend_id == backend_id && event.update.status == status;
                    seen.push(event);
                    if done {
                        return seen;
                    }
                }
                MessageFromDrone::ActionAck { .. } => {}
                other => panic!("expected events, got {other:?} after {seen:?}"),
            }
        }
    }

    /// Reads the drone's messages, answering each heartbeat with what `answer` returns
    /// (nothing for `None`), until `backend` reports `status`; returns that backend's
    /// updates, in order. When the drone drops the connection (it does after heartbeats go
    /// unanswered), accepts its next one on `listener`.
    async fn updates_answering(
        listener: &TcpListener,
        socket: &mut ServerSocket,
        backend: &BackendName,
        status: BackendStatus,
        mut answer: impl FnMut(u64, Vec<BackendName>) -> Option<MessageToDrone>,
    ) -> Vec<BackendStateUpdate> {
        let mut seen = Vec::new();
        // Nothing is acked here, so the drone re-sends its events; count each once.
        let mut ids = std::collections::HashSet::new();
        let read = async {
            loop {
                let frame = match socket.next().await {
                    Some(Ok(frame)) => frame,
                    None | Some(Err(_)) => {
                        *socket = accept(listener).await;
                        continue;
                    }
                };
                let Message::Text(text) = frame else { continue };
                match serde_json::from_str(&text).expect("valid drone message") {
                    MessageFromDrone::Heartbeat { backends, seq } => {
                        if let Some(reply) = answer(seq, backends) {
                            let json = serde_json::to_string(&reply).expect("encodes");
                            // A failed send shows up as a closed socket on the next read.
                            let _ = socket.send(Message::Text(json.into())).await;
                        }
                    }
                    MessageFromDrone::BackendEvent(event)
                        if &event.backend_id == backend && ids.insert(event.event_id) =>
                    {
                        let done = event.update.status == status;
                        seen.push(event.update);
                        if done {
                            return;
                        }
                    }
                    _ => {}
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .is_err()
        {
            panic!("{backend} never reported {status}; saw {seen:?}");
        }
        seen
    }

    fn renew(seq: u64, lease_ms: u64, renewed: Vec<BackendName>) -> Option<MessageToDrone> {
        Some(MessageToDrone::LeaseRenewal {
            seq,
            lease_ms,
            renewed,
            gone: vec![],
        })
    }

    /// A drone on the fake runtime connected to a fake controller, with one backend of
    /// `image` spawned and reported `ready`, its lease renewed for `lease_ms` each time.
    async fn drone_with_ready_backend(
        image: &str,
        lease_ms: u64,
        state_dir: &TempStateDir,
    ) -> (crate::DroneHandle, TcpListener, ServerSocket, BackendName) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base: Url = format!("http://{}", listener.local_addr().expect("addr"))
            .parse()
            .expect("url");
        let config = DroneConfig {
            name: "dr-lease-test".parse().expect("name"),
            heartbeat_interval_ms: 50,
            fence_margin_ms: 300,
            // Longer than any lease here: only the lease can cut it short.
            stop_grace_period_ms: 30_000,
            state_dir: state_dir.path().to_path_buf(),
            ..DroneConfig::new(base, "localhost:9090".parse().expect("cluster"))
        };
        let drone =
            crate::start_with_runtime(config, FakeRuntime::new().await, CancellationToken::new())
                .await
                .expect("drone starts");
        let mut socket = accept(&listener).await;
        let backend = BackendName::new_random();
        let spawn = SpawnAction {
            executable: ExecutorConfig {
                image: image.into(),
                pull_policy: None,
                credentials: None,
                env: Default::default(),
                resource_limits: Default::default(),
                mount: None,
                network_name: None,
                ready_path: None,
                gpus: None,
                protocol: Default::default(),
            },
            key: Some("k".into()),
            fencing_token: Some(1),
            static_token: None,
            startup_timeout_ms: None,
            mount_dir: None,
            warm: false,
        };
        send_to_drone(
            &mut socket,
            &MessageToDrone::Action(BackendAction {
                action_id: 1,
                backend_id: backend.clone(),
                action: ActionKind::Spawn(spawn),
            }),
        )
        .await;
        updates_answering(
            &listener,
            &mut socket,
            &backend,
            BackendStatus::Ready,
            |seq, listed| renew(seq, lease_ms, listed),
        )
        .await;
        (drone, listener, socket, backend)
    }

    #[tokio::test]
    async fn a_backend_whose_lease_is_no_longer_renewed_is_stopped_and_killed_on_the_drones_own_clock(
    ) {
        let state_dir = TempStateDir::new();
        // `stubborn` ignores SIGTERM; the grace period is 30 s, the lease 1.5 s.
        let (drone, listener, mut socket, backend) =
            drone_with_ready_backend("stubborn", 1_500, &state_dir).await;
        // The controller goes quiet: no more renewals, nothing closed.
        let updates = updates_answering(
            &listener,
            &mut socket,
            &backend,
            BackendStatus::Terminated,
            |_, _| None,
        )
        .await;
        // (Earlier events are re-sent too, since this controller acks nothing.)
        let statuses: Vec<BackendStatus> = updates.iter().map(|u| u.status).collect();
        assert!(
            statuses.ends_with(&[
                BackendStatus::Ready,
                BackendStatus::Terminating,
                BackendStatus::HardTerminating,
                BackendStatus::Terminated
            ]),
            "{statuses:?}"
        );
        let done = updates.last().expect("terminated");
        assert_eq!(done.termination_reason, Some(TerminationReason::KeyExpired));
        assert_eq!(done.exit_code, Some(137));
        drop(drone);
    }

    #[tokio::test]
    async fn a_backend_the_controller_calls_gone_is_killed_at_once() {
        let state_dir = TempStateDir::new();
        let (drone, listener, mut socket, backend) =
            drone_with_ready_backend("app", 60_000, &state_dir).await;
        let gone = backend.clone();
        let updates = updates_answering(
            &listener,
            &mut socket,
            &backend,
            BackendStatus::Terminated,
            |seq, _| {
                Some(MessageToDrone::LeaseRenewal {
                    seq,
                    lease_ms: 60_000,
                    renewed: vec![],
                    gone: vec![gone.clone()],
                })
            },
        )
        .await;
        let done = updates.last().expect("terminated");
        assert_eq!(done.termination_kind, Some(TerminationKind::Hard));
        assert_eq!(done.termination_reason, Some(TerminationReason::Lost));
        drop(drone);
    }

    #[tokio::test]
    async fn events_unacked_when_the_drone_crashed_are_replayed_and_its_backend_readopted() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base: Url = format!("http://{}", listener.local_addr().expect("addr"))
            .parse()
            .expect("url");
        let cluster: ClusterName = "localhost:9090".parse().expect("cluster");
        let state_dir = TempStateDir::new();
        let config = DroneConfig {
            name: "dr-crash-test".parse().expect("name"),
            heartbeat_interval_ms: 50,
            reconnect_max_backoff_ms: 200,
            state_dir: state_dir.path().to_path_buf(),
            ..DroneConfig::new(base, cluster)
        };
        // Shared by both runs, like the Docker engine: the backend's container outlives
        // the crashed drone.
        let runtime = FakeRuntime::new().await;

        let first =
            crate::start_with_runtime(config.clone(), runtime.clone(), CancellationToken::new())
                .await
                .expect("first drone starts");
        let mut socket = accept(&listener).await;
        assert!(matches!(
            next_message(&mut socket).await,
            MessageFromDrone::Hello { .. }
        ));
        let backend = BackendName::new_random();
        send_to_drone(
            &mut socket,
            &MessageToDrone::Action(BackendAction {
                action_id: 1,
                backend_id: backend.clone(),
                action: ActionKind::Spawn(SpawnAction {
                    executable: ExecutorConfig {
                        image: "answers-http".into(),
                        pull_policy: None,
                        credentials: None,
                        env: Default::default(),
                        resource_limits: Default::default(),
                        mount: None,
                        network_name: None,
                        ready_path: None,
                        gpus: None,
                        protocol: Default::default(),
                    },
                    key: None,
                    fencing_token: None,
                    static_token: None,
                    startup_timeout_ms: None,
                    mount_dir: None,
                    warm: false,
                }),
            }),
        )
        .await;
        // The controller hears the backend become ready but acks nothing; then the drone
        // dies without a graceful shutdown.
        let before_crash = events_until(&mut socket, &backend, BackendStatus::Ready).await;
        drop(first);
        drop(socket);

        let second = crate::start_with_runtime(config, runtime.clone(), CancellationToken::new())
            .await
            .expect("second drone starts on the same state directory");
        let mut socket = accept(&listener).await;
        assert!(matches!(
            next_message(&mut socket).await,
            MessageFromDrone::Hello { .. }
        ));
        // The replayed events, then (its lease still running, its container too) the new
        // run re-adopting the backend: `ready` again, under an ID the earlier run never used.
        let newest_before = before_crash.iter().map(|e| e.event_id).max();
        let mut after_restart = Vec::new();
        loop {
            let more = events_until(&mut socket, &backend, BackendStatus::Ready).await;
            let done = more.last().map(|e| e.event_id) > newest_before;
            after_restart.extend(more);
            if done {
                break;
            }
        }
        let (replayed, new) = after_restart.split_at(after_restart.len() - 1);
        assert_eq!(
            replayed,
            before_crash.as_slice(),
            "the unacked events, in order"
        );
        assert_eq!(new[0].update.status, BackendStatus::Ready);
        assert!(new[0].update.address.is_some());
        assert_eq!(
            runtime_started(&runtime),
            1,
            "re-adopted, not started again"
        );

        drop(second);
    }
}
