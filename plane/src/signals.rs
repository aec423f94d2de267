//! Signals from the operator: stop (SIGINT or SIGTERM), reload (SIGHUP).

/// Resolves on Ctrl-C or SIGTERM, whichever comes first.
pub async fn wait_for_shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("received Ctrl-C; shutting down"),
        _ = terminate => tracing::info!("received SIGTERM; shutting down"),
    }
}

/// Starts catching SIGHUP, from now on. Take it before serving: until a process catches
/// SIGHUP, the signal's default action ends it.
pub fn catch_hangups() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// Calls `reload` on every SIGHUP caught by `hangups`, until the returned task is aborted.
pub fn on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    reload: impl Fn() + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            reload();
        }
    })
}
