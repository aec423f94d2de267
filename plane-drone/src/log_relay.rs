//! Relays backends' logs to the controller on the drone socket: each request in its own
//! task, in batches sent only a few ahead of what the controller has passed on, so a slow
//! reader never makes the drone hold more than those few batches.

use crate::executor::{ExecutorHandle, LogsUnavailable};
use crate::runtime::RuntimeError;
use futures_util::{FutureExt, StreamExt};
use plane_protocol::api::BackendLogLine;
use plane_protocol::drone::{LogsOutcome, LogsRequest, MessageFromDrone};
use std::collections::HashMap;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

/// Batches sent ahead of the controller's [`plane_protocol::drone::MessageToDrone::LogsNext`].
const WINDOW: usize = 4;
/// Bounds on one batch: enough lines that a backend printing fast goes through in few
/// messages, small enough that heartbeats on the same socket never wait long behind one.
const BATCH_MAX_LINES: usize = 1_000;
const BATCH_MAX_BYTES: usize = 64 * 1024;
/// How long a batch gathers lines after its first: what a followed line may wait.
const BATCH_GATHER: std::time::Duration = std::time::Duration::from_millis(5);
/// Log requests served at once; more are refused, so readers cannot pile up tasks.
const MAX_RELAYS: usize = 64;

/// The log requests of one controller session. Dropping it stops them all.
pub(crate) struct LogRelays {
    executor: ExecutorHandle,
    /// Per request: where its credits go, and how to stop it.
    relays: HashMap<u64, (mpsc::UnboundedSender<()>, AbortHandle)>,
    tasks: JoinSet<()>,
    outgoing: mpsc::Sender<MessageFromDrone>,
    messages: mpsc::Receiver<MessageFromDrone>,
}

impl LogRelays {
    pub(crate) fn new(executor: ExecutorHandle) -> Self {
        let (outgoing, messages) = mpsc::channel(WINDOW);
        Self {
            executor,
            relays: HashMap::new(),
            tasks: JoinSet::new(),
            outgoing,
            messages,
        }
    }

    pub(crate) fn start(&mut self, request_id: u64, request: LogsRequest) {
        if self.relays.len() >= MAX_RELAYS {
            let outgoing = self.outgoing.clone();
            self.tasks.spawn(async move {
                let message = format!("this drone already serves {MAX_RELAYS} log requests");
                let outcome = LogsOutcome::Failed { message };
                let _ = outgoing
                    .send(MessageFromDrone::LogsEnd {
                        request_id,
                        outcome,
                    })
                    .await;
            });
            return;
        }
        let (credits, credit_receiver) = mpsc::unbounded_channel();
        let relay = relay(
            request_id,
            request,
            self.executor.clone(),
            credit_receiver,
            self.outgoing.clone(),
        );
        let abort = self.tasks.spawn(relay);
        self.relays.insert(request_id, (credits, abort));
    }

    /// The controller passed a batch of `request_id` on.
    pub(crate) fn credit(&self, request_id: u64) {
        if let Some((credits, _)) = self.relays.get(&request_id) {
            let _ = credits.send(());
        }
    }

    /// Nobody reads `request_id` any more.
    pub(crate) fn cancel(&mut self, request_id: u64) {
        if let Some((_, abort)) = self.relays.remove(&request_id) {
            abort.abort();
        }
    }

    /// The next message to send to the controller.
    pub(crate) async fn next_message(&mut self) -> MessageFromDrone {
        loop {
            tokio::select! {
                Some(message) = self.messages.recv() => {
                    if let MessageFromDrone::LogsEnd { request_id, .. } = &message {
                        self.relays.remove(request_id);
                    }
                    return message;
                }
                // Reaps finished tasks; the relay's own end message tells the rest.
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
        }
    }
}

/// Sends one request's lines (first an empty batch once they are found), then how it
/// ended.
async fn relay(
    request_id: u64,
    request: LogsRequest,
    executor: ExecutorHandle,
    mut credits: mpsc::UnboundedReceiver<()>,
    outgoing: mpsc::Sender<MessageFromDrone>,
) {
    let LogsRequest {
        backend_id,
        follow,
        tail,
    } = request;
    let outcome = match executor.logs(backend_id.clone(), follow, tail).await {
        Err(LogsUnavailable::NotKept) => LogsOutcome::NotKept,
        Err(LogsUnavailable::Failed(message)) => LogsOutcome::Failed { message },
        Ok(mut lines) => {
            // A first, empty batch says the logs are there, before any line is: followed
            // logs of a quiet backend may have none for a long time.
            let found = MessageFromDrone::LogLines {
                request_id,
                lines: Vec::new(),
            };
            if outgoing.send(found).await.is_err() {
                return;
            }
            let mut window = WINDOW - 1;
            loop {
                let mut batch = Batch::default();
                // Wait for one line, then take what comes within a few milliseconds: the
                // engine hands lines over a few at a time, and a batch per handful would
                // spend the window on round trips.
                let mut end = batch.take(lines.next().await);
                let gather_until = tokio::time::Instant::now() + BATCH_GATHER;
                while end.is_none() && !batch.full() {
                    let next = match lines.next().now_or_never() {
                        Some(next) => next,
                        None => match tokio::time::timeout_at(gather_until, lines.next()).await {
                            Ok(next) => next,
                            Err(_) => break,
                        },
                    };
                    end = batch.take(next);
                }
                if !batch.lines.is_empty() {
                    if window == 0 {
                        // Cancelled (the sender is gone) ends the task here.
                        if credits.recv().await.is_none() {
                            return;
                        }
                        window += 1;
                    }
                    window -= 1;
                    let message = MessageFromDrone::LogLines {
                        request_id,
                        lines: batch.lines,
                    };
                    if outgoing.send(message).await.is_err() {
                        return;
                    }
                }
                // Credits that came meanwhile.
                while let Ok(()) = credits.try_recv() {
                    window += 1;
                }
                if let Some(outcome) = end {
                    break outcome;
                }
            }
        }
    };
    match &outcome {
        LogsOutcome::Failed { message } => {
            tracing::warn!(backend = %backend_id, %message, "could not read a backend's logs")
        }
        _ => tracing::debug!(backend = %backend_id, follow, ?outcome, "log read ended"),
    }
    let _ = outgoing
        .send(MessageFromDrone::LogsEnd {
            request_id,
            outcome,
        })
        .await;
}

#[derive(Default)]
struct Batch {
    lines: Vec<BackendLogLine>,
    bytes: usize,
}

impl Batch {
    fn full(&self) -> bool {
        self.lines.len() >= BATCH_MAX_LINES || self.bytes >= BATCH_MAX_BYTES
    }

    /// Adds the stream's next item; `Some` when the stream ended with it.
    fn take(&mut self, next: Option<Result<BackendLogLine, RuntimeError>>) -> Option<LogsOutcome> {
        match next {
            None => Some(LogsOutcome::Complete),
            Some(Ok(line)) => {
                self.bytes += line.text.len();
                self.lines.push(line);
                None
            }
            Some(Err(RuntimeError::NotFound(_))) => Some(LogsOutcome::NotKept),
            Some(Err(err)) => Some(LogsOutcome::Failed {
                message: err.to_string(),
            }),
        }
    }
}
