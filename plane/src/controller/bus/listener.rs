//! The PostgreSQL side of the change bus: a dedicated connection that `LISTEN`s for the
//! signals every controller's writes send, reconnecting with backoff when it drops.

use super::Wake;
use crate::controller::store::{Signal, ACTIONS_CHANNEL, REVOCATIONS_CHANNEL, STATUS_CHANNEL};
use sqlx::postgres::PgListener;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Forwards notifications to the bus until `cancel` fires. After every (re)connection it
/// asks for a catch-up, since notifications sent while it was away are gone.
pub(super) async fn run(
    url: String,
    wakes: mpsc::UnboundedSender<Wake>,
    cancel: CancellationToken,
) {
    let mut backoff = INITIAL_BACKOFF;
    loop {
        let started = tokio::time::Instant::now();
        tokio::select! {
            _ = cancel.cancelled() => return,
            err = listen(&url, &wakes) => {
                tracing::warn!(error = %err, retry_in = ?backoff, "change listener lost its database connection");
            }
        }
        if started.elapsed() > MAX_BACKOFF {
            backoff = INITIAL_BACKOFF;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One listening session; returns what ended it.
async fn listen(url: &str, wakes: &mpsc::UnboundedSender<Wake>) -> anyhow::Error {
    let mut listener = match PgListener::connect(url).await {
        Ok(listener) => listener,
        Err(err) => return err.into(),
    };
    if let Err(err) = listener
        .listen_all([STATUS_CHANNEL, ACTIONS_CHANNEL, REVOCATIONS_CHANNEL])
        .await
    {
        return err.into();
    }
    tracing::debug!("listening for changes from every controller");
    let _ = wakes.send(Wake::CatchUp);
    loop {
        // `try_recv` reports a dropped connection instead of silently reconnecting, so a
        // catch-up can be asked for at the right moment.
        match listener.try_recv().await {
            Ok(Some(notification)) => {
                if let Some(signal) =
                    Signal::from_notification(notification.channel(), notification.payload())
                {
                    let _ = wakes.send(Wake::Signal(signal));
                }
            }
            Ok(None) => return anyhow::anyhow!("the listening connection was closed"),
            Err(err) => return err.into(),
        }
    }
}
