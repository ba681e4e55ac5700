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

use crate::ledger::{Detachment, Event, Ledger};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tally_protocol::report::JournalEntry;
use tally_protocol::time::UnixTime;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

/// Journal entries kept in memory while the store cannot be written (about 100 bytes
/// each). Past this, the oldest kept ones are dropped and the report shows the gap.
const MAX_BACKLOG: usize = 200_000;
/// First wait before reopening a broken store; doubled after each failed try.
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Longest wait between tries.
const MAX_RETRY: Duration = Duration::from_secs(10);

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

/// What a broken store owes.
struct Broken {
    error: Arc<StoreError>,
    retry_at: Instant,
    backoff: Duration,
    /// Journal entries not known to be durable, in order.
    backlog: std::collections::VecDeque<JournalEntry>,
    /// Entries dropped because the backlog was full.
    dropped: u64,
}

impl Broken {
    fn keep(&mut self, entries: impl IntoIterator<Item = JournalEntry>) {
        for entry in entries {
            if self.backlog.len() >= MAX_BACKLOG {
                self.backlog.pop_front();
                self.dropped += 1;
            }
            self.backlog.push_back(entry);
        }
    }
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
                disk.broken = Some(Broken {
                    error,
                    retry_at: Instant::now() + FIRST_RETRY,
                    backoff: FIRST_RETRY,
                    backlog: Default::default(),
                    dropped: 0,
                });
            }
        }
        disk
    }

    /// The store, while it can be written.
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref().filter(|_| self.broken.is_none())
    }

    /// Why new grants are refused, while the store is broken.
    pub fn refusal(&self) -> Option<String> {
        self.broken.as_ref().map(|b| b.error.to_string())
    }

    /// Why the store cannot be written, while it is broken (as [`Disk::refusal`] says
    /// it, typed).
    pub fn fault(&self) -> Option<DiskError> {
        self.broken
            .as_ref()
            .map(|b| DiskError::Store(b.error.clone()))
    }

    /// When to try reopening a broken store.
    pub fn retry_at(&self) -> Option<Instant> {
        self.broken.as_ref().map(|b| b.retry_at)
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
            broken.keep(journal.drain(..));
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
        if let Some(b) = &self.broken {
            warn!(
                events = b.backlog.len(),
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
                .append_journal(broken.backlog.make_contiguous())
                .and_then(|_| store.sync_leases(ledger.records()))
                .and_then(|counts| store.save_clock(ledger.clock_high_water()).map(|_| counts))?;
            store.flush().await?;
            Ok::<_, StoreError>((store, removed, added))
        };
        match attempt.await {
            Ok((store, removed, added)) => {
                info!(
                    journal_events = broken.backlog.len(),
                    leases_removed = removed,
                    leases_added = added,
                    dropped_events = broken.dropped,
                    "the seat store can be written again; checkouts are served"
                );
                self.store = Some(store);
                self.broken = None;
                self.metrics.set_store_error(None);
                true
            }
            Err(e) => {
                broken.backoff = (broken.backoff * 2).min(MAX_RETRY);
                broken.retry_at = Instant::now() + broken.backoff;
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
            Some(b) => b.keep(backlog),
            None => {
                warn!(
                    error = %error,
                    "the seat store cannot be written: new checkouts are refused until it \
                     can; held leases are kept and served from memory"
                );
                let mut broken = Broken {
                    error: error.clone(),
                    retry_at: Instant::now() + FIRST_RETRY,
                    backoff: FIRST_RETRY,
                    backlog: Default::default(),
                    dropped: 0,
                };
                broken.keep(backlog);
                self.broken = Some(broken);
                self.metrics.set_store_error(Some(&error.to_string()));
            }
        }
        // Handles go now, so that an administrator can unmount or repair the volume.
        self.store = None;
        DiskError::Store(error)
    }
}
