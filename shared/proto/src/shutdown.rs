//! The shutdown signal both binaries wait on before draining: Ctrl-C, or SIGTERM (what
//! containers, Kubernetes and systemd send). It lives here because the cloud and the edge
//! both serve this crate's services and share no other crate with an async runtime.

/// Resolves on Ctrl-C or SIGTERM; an error means a handler could not be installed.
pub async fn signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
