//! A blocking wrapper around [`crate::Client`] for applications without an async
//! runtime. It owns a small runtime (one worker thread) on which the background
//! heartbeats run while the application does its work.

use crate::cache::BorrowedLease;
use crate::{ClientConfig, ClientError, LeaseHandle, LeaseStatus, Want};
use std::sync::Arc;
use std::time::Duration;
use tally_protocol::wire::StatusReply;

/// A blocking client.
pub struct Client {
    runtime: Arc<tokio::runtime::Runtime>,
    client: Option<crate::Client>,
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
        })
    }

    fn client(&self) -> &crate::Client {
        self.client.as_ref().expect("present until close")
    }

    /// Checks seats out.
    pub fn checkout(&self, want: &Want) -> Result<Lease, ClientError> {
        let handle = self.runtime.block_on(self.client().checkout(want))?;
        Ok(Lease {
            runtime: self.runtime.clone(),
            handle: Some(handle),
        })
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

    /// Checks every lease in and closes the connection.
    pub fn close(mut self) {
        if let Some(c) = self.client.take() {
            self.runtime.block_on(c.close());
        }
    }
}

impl Lease {
    /// The lease's current status.
    pub fn status(&self) -> LeaseStatus {
        self.handle
            .as_ref()
            .map(|h| h.status())
            .unwrap_or(LeaseStatus::Lost("checked in".into()))
    }

    /// The lease id.
    pub fn id(&self) -> Option<tally_protocol::lease::LeaseId> {
        self.handle.as_ref().map(|h| h.id())
    }

    /// Checks the lease in and waits for the answer.
    pub fn checkin(mut self) -> Result<(), ClientError> {
        match self.handle.take() {
            Some(h) => self.runtime.block_on(h.checkin()),
            None => Ok(()),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            // Checking in on drop must finish before the runtime could go away.
            let _ = self.runtime.block_on(h.checkin());
        }
    }
}
