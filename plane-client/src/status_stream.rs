//! A backend's status stream (server-sent events) that resumes where it stopped when the
//! connection drops, and ends after `terminated`.

use crate::{error_from, ClientError, PlaneClient};
use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures_util::stream::{self, BoxStream};
use futures_util::{Stream, StreamExt};
use plane_protocol::backend::{BackendStatus, BackendStatusStreamEntry};
use plane_protocol::names::BackendName;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// Consecutive failed attempts (refused connections, 5xx answers, streams closed before
/// delivering anything) after which the stream gives up with the last error.
const MAX_ATTEMPTS: u32 = 8;

/// The wait before the first retry; doubled per failure up to [`MAX_BACKOFF`]. With
/// [`MAX_ATTEMPTS`] a controller may be away for about 15 s (a restart) without the stream
/// failing.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The entries of a backend's status stream, in order, each once: from the first status
/// (or after the one a resume names), then live, ending after `terminated`.
///
/// A connection that drops or a controller that restarts is not the end: the stream
/// reconnects with `Last-Event-ID` and carries on from the entry after the last one it
/// delivered, waiting longer after each failure in a row and giving up after
/// [`MAX_ATTEMPTS`] of them. An error answer (404 for an unknown backend, 401) ends it at
/// once, as an `Err` item.
pub struct StatusStream {
    entries: BoxStream<'static, Result<BackendStatusStreamEntry, ClientError>>,
}

impl StatusStream {
    pub(crate) fn new(client: PlaneClient, backend: BackendName, after: Option<i32>) -> Self {
        let state = Follow {
            url: client.url(&["pub", "b", backend.as_str(), "status-stream"]),
            client,
            backend,
            last_event_id: after.map(|number| number.to_string()),
            events: None,
            failures: 0,
            finished: false,
        };
        Self {
            entries: stream::unfold(state, Follow::next).boxed(),
        }
    }
}

impl Stream for StatusStream {
    type Item = Result<BackendStatusStreamEntry, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.entries.poll_next_unpin(cx)
    }
}

type Events = BoxStream<'static, Result<Event, EventStreamError<reqwest::Error>>>;

/// Where a status stream is: the open connection's events, if one is open, and the last
/// event delivered.
struct Follow {
    client: PlaneClient,
    backend: BackendName,
    url: url::Url,
    last_event_id: Option<String>,
    events: Option<Events>,
    /// Failures since the last entry was delivered.
    failures: u32,
    finished: bool,
}

impl Follow {
    async fn next(mut self) -> Option<(Result<BackendStatusStreamEntry, ClientError>, Follow)> {
        loop {
            if self.finished {
                return None;
            }
            let Some(events) = self.events.as_mut() else {
                if let Err(error) = self.open().await {
                    return Some((Err(error), self));
                }
                continue;
            };
            match events.next().await {
                Some(Ok(event)) => {
                    if event.data.is_empty() {
                        continue;
                    }
                    if !event.id.is_empty() {
                        self.last_event_id = Some(event.id.clone());
                    }
                    self.failures = 0;
                    let entry = serde_json::from_str::<BackendStatusStreamEntry>(&event.data)
                        .map_err(|err| ClientError::Decode {
                            url: self.url.clone(),
                            detail: format!("status entry {:?}: {err}", event.data),
                        });
                    if let Ok(entry) = &entry {
                        self.finished = entry.status == BackendStatus::Terminated;
                    }
                    return Some((entry, self));
                }
                // Dropped or closed before `terminated`: resume.
                Some(Err(_)) | None => {
                    self.events = None;
                    self.failures += 1;
                }
            }
        }
    }

    /// Opens the stream (after the backoff its failures call for), resuming after the last
    /// event delivered. `Err` is final: an error answer, or too many failures in a row.
    async fn open(&mut self) -> Result<(), ClientError> {
        if self.failures >= MAX_ATTEMPTS {
            self.finished = true;
            return Err(ClientError::StreamEnded {
                backend: self.backend.clone(),
                wanted: BackendStatus::Terminated,
            });
        }
        if self.failures > 0 {
            tokio::time::sleep(backoff(self.failures)).await;
        }
        let mut request = self
            .client
            .request(reqwest::Method::GET, self.url.clone())
            .header("accept", "text/event-stream");
        if let Some(id) = &self.last_event_id {
            request = request.header("last-event-id", id);
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                self.events = Some(response.bytes_stream().eventsource().boxed());
                Ok(())
            }
            // The controller is there but not serving (restarting behind a balancer):
            // worth another try.
            Ok(response) if response.status().is_server_error() => {
                self.failures += 1;
                if self.failures >= MAX_ATTEMPTS {
                    self.finished = true;
                    return Err(error_from(self.url.clone(), response).await);
                }
                Ok(())
            }
            Ok(response) => {
                self.finished = true;
                Err(error_from(self.url.clone(), response).await)
            }
            Err(source) => {
                self.failures += 1;
                if self.failures >= MAX_ATTEMPTS {
                    self.finished = true;
                    return Err(ClientError::Unreachable {
                        url: self.url.clone(),
                        source,
                    });
                }
                Ok(())
            }
        }
    }
}

/// The wait before attempt number `failures + 1`.
fn backoff(failures: u32) -> Duration {
    let doubled = FIRST_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(16));
    doubled.min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let waits: Vec<u128> = (1..=8).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }
}
