//! Signals, in one small module: SIGTERM and SIGINT ask for a graceful shutdown.
//!
//! signal-hook's iterator runs on its own thread, so no async-signal-unsafe work ever
//! happens in a handler; the thread only forwards the signal to the runtime.

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::future::Future;

/// Installs the handlers and returns a future that completes on the first
/// SIGTERM or SIGINT.
pub fn shutdown_requested() -> Result<impl Future<Output = ()>> {
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                tracing::info!(signal, "received signal");
                let _ = tx.send(());
            }
        })
        .context("starting the signal thread")?;
    Ok(async move {
        let _ = rx.await;
    })
}

/// Installs a SIGHUP handler and returns a channel that yields once per SIGHUP
/// (coalesced: several quick hangups cause one reload).
pub fn hangups() -> Result<tokio::sync::mpsc::Receiver<()>> {
    let mut signals =
        Signals::new([signal_hook::consts::SIGHUP]).context("installing the SIGHUP handler")?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    std::thread::Builder::new()
        .name("sighup".into())
        .spawn(move || {
            for _ in signals.forever() {
                tracing::info!("SIGHUP: reloading bundles");
                if tx.try_send(()).is_err() && tx.is_closed() {
                    return;
                }
            }
        })
        .context("starting the SIGHUP thread")?;
    Ok(rx)
}
