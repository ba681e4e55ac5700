//! The seat store as the ledger task holds it: writable, or broken after a failed write
//! (disk full, file system gone read-only) and reopened once it can be written again.
//!
//! sled keeps its first I/O error for good: once a write or a flush failed, every later
//! one fails too, even after space came back. So recovery means dropping every handle
//! (sled locks its files), opening the store again, and writing what it missed: the
//! journal entries kept in memory since the last good flush, and the lease table
//! rewritten from the ledger. While the store is broken, grants are refused (they could
//! not be made durable) and held leases go on being served from memory: heartbeats and
//! checkins need no disk.

use crate::commit::Outage;
use crate::ledger::{Detachment, Event, Ledger};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use std::path::PathBuf;
use std::sync::Arc;
use tally_protocol::report::JournalEntry;
use tally_protocol::time::UnixTime;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// A running flush.
pub type Flush = JoinHandle<Result<(), StoreError>>;

/// Why the store did not take a write or a flush. The text names the store's path: it
/// is for the log; clients are told the kind of fault only.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DiskError {
    /// The store failed, now or earlier: a broken store refuses every write with the
    /// error that broke it (or the latest one of a failed reopen) until it is reopened.
    #[error(transparent)]
    Store(Arc<StoreError>),
    /// The store was closed.
    #[error("the seat store is closed")]
    Closed,
}

/// The store, or why it cannot be written.
pub struct Disk {
    path: PathBuf,
    store: Option<Store>,
    broken: Option<Broken>,
    /// Journal entries the running flush covers (kept until it ends well).
    in_flight: Vec<JournalEntry>,
    /// Journal entries written after the running flush started.
    unflushed: Vec<JournalEntry>,
    metrics: Arc<Metrics>,
}

/// A broken store: the error that broke it (or the latest one of a failed reopen) and
/// what it owes ([`Outage`]: the journal kept in memory, when to try again).
struct Broken {
    error: Arc<StoreError>,
    outage: Outage,
}

impl Broken {
    /// Broken now by `error`.
    fn new(error: Arc<StoreError>) -> Broken {
        Broken {
            error,
            outage: Outage::new(UnixTime::now(), mono_now()),
        }
    }
}

/// Monotonic now, on tokio's clock (as the ledger's).
fn mono_now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

impl Disk {
    /// Wraps an opened store. A store opened from a copy because its volume could not
    /// be written ([`Store::fault`]) starts broken: the copy is dropped (it served the
    /// restore), grants are refused, and the real store is reopened once it can be.
    pub fn new(store: Store, metrics: Arc<Metrics>) -> Disk {
        let mut disk = Disk {
            path: store.path().to_path_buf(),
            store: None,
            broken: None,
            in_flight: Vec::new(),
            unflushed: Vec::new(),
            metrics,
        };
        match store.fault() {
            None => disk.store = Some(store),
            Some(error) => {
                warn!(
                    error = %error,
                    "started with a seat store that cannot be written: new checkouts are \
                     refused until it can; held leases are restored and served from memory"
                );
                disk.metrics.set_store_error(Some(&error.to_string()));
                disk.broken = Some(Broken::new(error));
            }
        }
        disk
    }

    /// The store, while it can be written.
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref().filter(|_| self.broken.is_none())
    }

    /// Why the store cannot be written, while it is broken.
    pub fn fault(&self) -> Option<DiskError> {
        self.broken
            .as_ref()
            .map(|b| DiskError::Store(b.error.clone()))
    }

    /// Since when and why the store cannot be written, while it cannot (what the
    /// ledger is told, so that it refuses new grants).
    pub fn outage(&self) -> Option<(UnixTime, String)> {
        self.broken
            .as_ref()
            .map(|b| (b.outage.since(), b.error.to_string()))
    }

    /// When to try reopening a broken store.
    pub fn retry_at(&self) -> Option<std::time::Instant> {
        self.broken.as_ref().map(|b| b.outage.retry_at())
    }

    /// Writes a batch: journal entries (taken from `journal`), lease events, and the
    /// clock mark if given. Not durable until a flush covers it.
    pub fn write(
        &mut self,
        journal: &mut Vec<JournalEntry>,
        (events, detachments): (&[Event], &[Detachment]),
        clock: Option<UnixTime>,
    ) -> Result<(), DiskError> {
        if let Some(broken) = &mut self.broken {
            broken.outage.keep(journal.drain(..));
            return Err(DiskError::Store(broken.error.clone()));
        }
        let Some(store) = &self.store else {
            return Err(DiskError::Closed);
        };
        let result = store
            .append_journal(journal)
            .and_then(|_| store.apply(events))
            .and_then(|_| store.apply_detachments(detachments))
            .and_then(|_| clock.map_or(Ok(()), |t| store.save_clock(t)));
        self.unflushed.append(journal);
        result.map_err(|e| self.break_with(e))
    }

    /// Starts a flush of everything written so far; `None` while the store is broken.
    pub fn start_flush(&mut self) -> Option<Flush> {
        let store = self.store()?.clone();
        self.in_flight.append(&mut self.unflushed);
        // Straight onto the blocking pool: the ledger task awaits the flush itself, with
        // no task in between to wake.
        Some(tokio::task::spawn_blocking(move || store.flush_blocking()))
    }

    /// Takes the result of a flush started by [`Disk::start_flush`].
    pub fn flushed(&mut self, result: Result<(), StoreError>) -> Result<(), DiskError> {
        match result {
            Ok(()) => {
                self.in_flight.clear();
                Ok(())
            }
            Err(e) => Err(self.break_with(e)),
        }
    }

    /// Flushes before a stop; says what is lost if the store is broken.
    pub async fn close(&mut self) -> Result<(), DiskError> {
        if let Some(b) = &mut self.broken {
            warn!(
                events = b.outage.backlog().len(),
                "stopping with a seat store that cannot be written: usage events and \
                 checkins since it failed are lost; leases come back from the store and \
                 expire on their TTL"
            );
            return Err(DiskError::Store(b.error.clone()));
        }
        let Some(store) = self.store.clone() else {
            return Ok(());
        };
        self.in_flight.append(&mut self.unflushed);
        let result = store.flush().await;
        self.flushed(result)
    }

    /// Tries to reopen a broken store and bring it up to date with the ledger. Returns
    /// whether the store is writable now.
    pub async fn try_recover(&mut self, ledger: &Ledger) -> bool {
        let Some(broken) = &mut self.broken else {
            return true;
        };
        // Every handle must go before sled can open the files again.
        self.store = None;
        let path = self.path.clone();
        let attempt = async {
            let store = tokio::task::spawn_blocking(move || Store::reopen(&path))
                .await
                .map_err(StoreError::Task)??;
            let (removed, added) = store
                .append_journal(broken.outage.backlog())
                .and_then(|_| store.sync_leases(ledger.records()))
                .and_then(|counts| store.save_clock(ledger.clock_high_water()).map(|_| counts))?;
            store.flush().await?;
            Ok::<_, StoreError>((store, removed, added))
        };
        match attempt.await {
            Ok((store, removed, added)) => {
                info!(
                    journal_events = broken.outage.backlog().len(),
                    leases_removed = removed,
                    leases_added = added,
                    dropped_events = broken.outage.dropped(),
                    "the seat store can be written again; checkouts are served"
                );
                self.store = Some(store);
                self.broken = None;
                self.metrics.set_store_error(None);
                true
            }
            Err(e) => {
                broken.outage.retry_failed(mono_now());
                let error = e.to_string();
                if error != broken.error.to_string() {
                    warn!(error = %error, "the seat store still cannot be written");
                    broken.error = Arc::new(e);
                    self.metrics.set_store_error(Some(&error));
                }
                false
            }
        }
    }

    /// Marks the store broken: what was not known durable goes to the backlog.
    fn break_with(&mut self, e: StoreError) -> DiskError {
        let error = Arc::new(e);
        let mut backlog = std::mem::take(&mut self.in_flight);
        backlog.append(&mut self.unflushed);
        match &mut self.broken {
            Some(b) => b.outage.keep(backlog),
            None => {
                warn!(
                    error = %error,
                    "the seat store cannot be written: new checkouts are refused until it \
                     can; held leases are kept and served from memory"
                );
                let mut broken = Broken::new(error.clone());
                broken.outage.keep(backlog);
                self.broken = Some(broken);
                self.metrics.set_store_error(Some(&error.to_string()));
            }
        }
        // Handles go now, so that an administrator can unmount or repair the volume.
        self.store = None;
        DiskError::Store(error)
    }
}
