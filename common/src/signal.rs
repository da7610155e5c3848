//! Signals for the daemons and `vitals dev`: termination and reload.

use std::future::Future;

/// Resolves on SIGTERM or SIGINT (Ctrl-C). The handlers are installed when
/// this is called, not when the future is first polled: a daemon that tells
/// systemd it is ready already handles the SIGTERM that may follow at once.
/// Must be called inside a tokio runtime.
pub fn termination() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// SIGHUP, the reload request (`systemctl reload` sends it). Install it
/// before anything slow: until it is installed a SIGHUP ends the process.
/// Must be called inside a tokio runtime.
pub fn hangup() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}
