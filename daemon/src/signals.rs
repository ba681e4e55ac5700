//! Signals, in one small module: SIGTERM and SIGINT ask for a graceful shutdown.
//!
//! signal-hook's iterator runs on its own thread, so no async-signal-unsafe work ever
//! happens in a handler; the thread only forwards the signal to the runtime.

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::future::Future;

/// Why signal handling could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {cause}")]
pub struct SignalError {
    /// What was being done.
    pub what: &'static str,
    /// The OS error.
    pub cause: std::io::Error,
}

fn failed(what: &'static str) -> impl FnOnce(std::io::Error) -> SignalError {
    move |cause| SignalError { what, cause }
}

/// Installs the handlers and returns a future that completes on the first
/// SIGTERM or SIGINT.
pub fn shutdown_requested() -> Result<impl Future<Output = ()>, SignalError> {
    let mut signals =
        Signals::new([SIGTERM, SIGINT]).map_err(failed("installing signal handlers"))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                tracing::info!(signal, "received signal");
                let _ = tx.send(());
            }
        })
        .map_err(failed("starting the signal thread"))?;
    Ok(async move {
        let _ = rx.await;
    })
}

/// Installs a SIGHUP handler and returns a channel that yields once per SIGHUP
/// (coalesced: several quick hangups cause one reload). Each SIGHUP also reopens the
/// log file ([`crate::logfile`]).
pub fn hangups() -> Result<tokio::sync::mpsc::Receiver<()>, SignalError> {
    let mut signals = Signals::new([signal_hook::consts::SIGHUP])
        .map_err(failed("installing the SIGHUP handler"))?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    std::thread::Builder::new()
        .name("sighup".into())
        .spawn(move || {
            for _ in signals.forever() {
                // First, so that this SIGHUP's own lines land in the new file: logrotate
                // renames the log and then signals (`postrotate`).
                if let Err(e) = crate::logfile::LOG_FILE.reopen() {
                    tracing::warn!(error = %e, "SIGHUP: cannot reopen the log file; still writing the old one");
                }
                tracing::info!("SIGHUP: reloading bundles");
                if tx.try_send(()).is_err() && tx.is_closed() {
                    return;
                }
            }
        })
        .map_err(failed("starting the SIGHUP thread"))?;
    Ok(rx)
}

/// Tells systemd (Type=notify) how the service is doing: `READY=1` once it serves,
/// `STOPPING=1` when it begins to stop. Does nothing outside systemd.
pub fn notify_systemd(state: &str) {
    use std::os::unix::net::UnixDatagram;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket name (systemd's default in containers and user sessions).
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
    } else {
        socket.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}
