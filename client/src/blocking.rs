//! A blocking wrapper around [`crate::Client`] for applications without an async
//! runtime (and the base of the C ABI). It owns a small runtime (one worker thread) on
//! which the background heartbeats run while the application does its work.
//!
//! Thread safety: a [`Client`] is `Send + Sync`; several threads may check out, borrow
//! and read terms through one client at once. A [`Lease`] is `Send + Sync` too. None of
//! these calls may be made from async code (they block on the client's runtime), nor
//! from a status callback ([`Lease::on_change`]), which runs on that runtime.

use crate::cache::BorrowedLease;
use crate::info::FeatureInfo;
use crate::{ClientConfig, ClientError, LeaseHandle, LeaseStatus, Want};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tally_protocol::wire::StatusReply;

/// The status a lease reports once its client is closed: nothing tends it any more.
const CLIENT_CLOSED: &str = "the client was closed";

/// A blocking client.
pub struct Client {
    runtime: Arc<tokio::runtime::Runtime>,
    client: Option<crate::Client>,
    /// Set by [`Client::close`]; leases of a closed client are no longer tended.
    closed: Arc<AtomicBool>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("blocking::Client").finish_non_exhaustive()
    }
}

/// A held lease; dropping it checks it in.
pub struct Lease {
    runtime: Arc<tokio::runtime::Runtime>,
    handle: Option<LeaseHandle>,
    closed: Arc<AtomicBool>,
    /// The task running the status callback, if one is set; stopped (and waited for)
    /// before the lease goes, so a callback never runs after checkin or drop returns.
    watcher: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.handle.fmt(f)
    }
}

impl Client {
    /// Connects (see [`crate::Client::connect`]). Must not be called from async code.
    pub fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tally-client")
            .enable_all()
            .build()
            .map_err(|e| ClientError::Config(format!("cannot start the client runtime: {e}")))?;
        let runtime = Arc::new(runtime);
        let client = runtime.block_on(crate::Client::connect(config))?;
        Ok(Client {
            runtime,
            client: Some(client),
            closed: Arc::new(AtomicBool::new(false)),
        })
    }

    fn client(&self) -> &crate::Client {
        self.client.as_ref().expect("present until close")
    }

    fn lease(&self, handle: LeaseHandle) -> Lease {
        Lease {
            runtime: self.runtime.clone(),
            handle: Some(handle),
            closed: self.closed.clone(),
            watcher: None,
        }
    }

    /// Checks seats out. A checkout that finds its connection broken (the server
    /// restarted a moment ago and the client has not noticed yet) is sent once more on
    /// a new connection rather than reported as "no server".
    pub fn checkout(&self, want: &Want) -> Result<Lease, ClientError> {
        self.checkout_queued(want, |_| {})
    }

    /// Checks seats out, waiting in the server's queue for up to `want.wait`; while it
    /// waits, `on_queue` hears this client's place in the queue (1 = next) whenever it
    /// changes (read from the server's status, so not where status is for admins only).
    pub fn checkout_queued(
        &self,
        want: &Want,
        mut on_queue: impl FnMut(u32),
    ) -> Result<Lease, ClientError> {
        let handle = self.runtime.block_on(async {
            match self.checkout_watching(want, &mut on_queue).await {
                Err(ClientError::Connection { .. }) => {
                    self.checkout_watching(want, &mut on_queue).await
                }
                other => other,
            }
        })?;
        Ok(self.lease(handle))
    }

    async fn checkout_watching(
        &self,
        want: &Want,
        on_queue: &mut impl FnMut(u32),
    ) -> Result<LeaseHandle, ClientError> {
        self.client().checkout_showing_queue(want, on_queue).await
    }

    /// Borrows seats for `period` into the per-user cache.
    pub fn borrow(&self, want: &Want, period: Duration) -> Result<BorrowedLease, ClientError> {
        self.runtime.block_on(self.client().borrow(want, period))
    }

    /// Returns the borrowed leases of `feature` early.
    pub fn return_borrowed(&self, feature: &str) -> Result<usize, ClientError> {
        self.runtime
            .block_on(self.client().return_borrowed(feature))
    }

    /// The server's status.
    pub fn status(&self) -> Result<StatusReply, ClientError> {
        self.runtime.block_on(self.client().status())
    }

    /// The vendor's terms for running `feature` without a seat (see [`crate::grace`]),
    /// from the bundles of the server this client is connected to.
    pub fn lost_seat_terms(
        &self,
        feature: &str,
    ) -> Result<crate::grace::LostSeatTerms, ClientError> {
        let session = self.runtime.block_on(self.client().session())?;
        Ok(session.lost_seat_terms(feature))
    }

    /// The licence terms of `feature` (expiry, evaluation, maintenance, attributes) from
    /// the verified bundles of the connected server; `None` if it does not license it.
    pub fn feature_info(&self, feature: &str) -> Result<Option<FeatureInfo>, ClientError> {
        let session = self.runtime.block_on(self.client().session())?;
        Ok(crate::info::feature_info(
            session.bundles(),
            feature,
            tally_protocol::time::UnixTime::now(),
        ))
    }

    /// Checks every lease in and closes the connection. Leases still held report
    /// [`LeaseStatus::Lost`] afterwards (nothing heartbeats them); drop them as usual.
    pub fn close(mut self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(c) = self.client.take() {
            self.runtime.block_on(c.close());
        }
    }
}

impl Drop for Client {
    /// Dropping the client closes it, as [`Client::close`] does: its leases are checked
    /// in and report `Lost`, rather than heartbeating on with no client to see them.
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(c) = self.client.take() {
            if tokio::runtime::Handle::try_current().is_err() {
                self.runtime.block_on(c.close());
            }
        }
    }
}

impl Lease {
    /// The lease's current status. After its client is closed (or dropped), a lease
    /// that was held on line is `Lost`: nothing keeps it alive any more.
    pub fn status(&self) -> LeaseStatus {
        let status = self
            .handle
            .as_ref()
            .map(|h| h.status())
            .unwrap_or(LeaseStatus::Lost("checked in".into()));
        match status {
            LeaseStatus::Active | LeaseStatus::Reconnecting
                if self.closed.load(Ordering::SeqCst) =>
            {
                LeaseStatus::Lost(CLIENT_CLOSED.into())
            }
            other => other,
        }
    }

    /// The lease id.
    pub fn id(&self) -> Option<tally_protocol::lease::LeaseId> {
        self.handle.as_ref().map(|h| h.id())
    }

    /// The grant as the server sent it (feature, seats, TTL, borrowed end, token).
    pub fn grant(&self) -> Option<&tally_protocol::wire::LeaseGrant> {
        self.handle.as_ref().map(|h| &h.lease().grant)
    }

    /// Calls `f` with every change of the lease's status (reconnecting, active again,
    /// lost), from the client's runtime thread. Replaces an earlier callback. `f` must
    /// return quickly and must not call blocking client functions.
    pub fn on_change(&mut self, mut f: impl FnMut(&LeaseStatus) + Send + 'static) {
        self.stop_watching();
        let Some(handle) = self.handle.as_ref() else {
            return;
        };
        let mut watch = handle.watch();
        let closed = self.closed.clone();
        self.watcher = Some(self.runtime.spawn(async move {
            // The sender goes when the lease is forgotten (lost, checked in, client
            // closed); a closed client's lease is reported lost, as `status` says.
            while watch.changed().await.is_ok() {
                let status = watch.borrow_and_update().clone();
                f(&status);
            }
            let last = watch.borrow().clone();
            if matches!(last, LeaseStatus::Active | LeaseStatus::Reconnecting)
                && closed.load(Ordering::SeqCst)
            {
                f(&LeaseStatus::Lost(CLIENT_CLOSED.into()));
            }
        }));
    }

    fn stop_watching(&mut self) {
        if let Some(task) = self.watcher.take() {
            task.abort();
            // Waits for a callback that is running right now to return. A lease
            // dropped on the runtime's own thread (inside a callback, against the
            // rules above) cannot wait; the abort still stops later calls.
            if tokio::runtime::Handle::try_current().is_err() {
                let _ = self.runtime.block_on(task);
            }
        }
    }

    /// Checks the lease in and waits for the answer.
    pub fn checkin(mut self) -> Result<(), ClientError> {
        self.stop_watching();
        match self.handle.take() {
            Some(h) => self.runtime.block_on(h.checkin()),
            None => Ok(()),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop_watching();
        if let Some(h) = self.handle.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                // On a runtime thread we cannot block: the handle checks itself in
                // in the background.
                drop(h);
                return;
            }
            // Checking in on drop must finish before the runtime could go away.
            let _ = self.runtime.block_on(h.checkin());
        }
    }
}
