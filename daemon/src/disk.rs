//! The seat store as the ledger task holds it: written through this server's Raft log
//! ([`crate::consensus`]), or broken after a failed write (disk full, file system gone
//! read-only) and reopened once it can be written again.
//!
//! A batch's writes are gathered into a [`StoreBatch`]; a "flush" proposes the batches
//! gathered since the last one as one Raft command and ends when the command is
//! committed (in the log, fsynced) and applied to the store. One proposal runs at a
//! time, so the log holds the batches in the order the ledger decided them.
//!
//! sled keeps its first I/O error for good, and openraft stops a node whose log or
//! state machine failed. So recovery means stopping the node, dropping every handle
//! (sled locks its files), opening the store and its log again, and proposing what they
//! missed: the journal entries kept in memory since the last good proposal, and the
//! lease table rewritten from the ledger. While the store is broken, grants are refused
//! (they could not be made durable) and held leases go on being served from memory:
//! heartbeats and checkins need no disk.

use crate::commit::Outage;
use crate::consensus::{self, Node, NodeSetup};
use crate::ledger::{Detachment, Event, Ledger};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use std::path::PathBuf;
use std::sync::Arc;
use tally_protocol::replicate::{
    Compaction, DetachedChange, Holdoff, LeaseChange, NamedSeat, QueueChange, StoreBatch,
};
use tally_protocol::report::{JournalEntry, ReportState};
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

/// Who the ledger keeps out or in line, for [`Disk::write`]: hold-offs started, and
/// queue places taken and left.
#[derive(Debug, Default)]
pub struct Places {
    /// Hold-offs started by removals.
    pub holdoffs: Vec<Holdoff>,
    /// Queue places taken and left.
    pub queue: Vec<QueueChange>,
    /// Named seats taken (`crate::named`).
    pub named: Vec<NamedSeat>,
}

/// The store, or why it cannot be written.
pub struct Disk {
    path: PathBuf,
    store: Option<Store>,
    /// The Raft node writing the store (none while broken).
    node: Option<Node>,
    setup: NodeSetup,
    broken: Option<Broken>,
    /// The writes gathered since the last proposal.
    pending: StoreBatch,
    /// Journal entries the running proposal carries (kept until it ends well).
    in_flight: Vec<JournalEntry>,
    /// Proposals started, and ended well: a reader of the store (an export) waits for
    /// the proposal that carries the writes it must see.
    proposed: u64,
    applied: u64,
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
    /// Wraps an opened store and the Raft node writing it. A store opened from a copy
    /// because its volume could not be written ([`Store::fault`]), or one whose node
    /// could not start (`node` is the reason), starts broken: grants are refused, and
    /// the real store is reopened once it can be.
    pub fn new(
        store: Store,
        node: Result<Node, StoreError>,
        setup: NodeSetup,
        metrics: Arc<Metrics>,
    ) -> Disk {
        let mut disk = Disk {
            path: store.path().to_path_buf(),
            store: None,
            node: None,
            setup,
            broken: None,
            pending: StoreBatch::new(UnixTime(0)),
            in_flight: Vec::new(),
            proposed: 0,
            applied: 0,
            metrics,
        };
        let fault = match (store.fault(), node) {
            (None, Ok(node)) => {
                disk.store = Some(store);
                disk.node = Some(node);
                return disk;
            }
            (Some(error), node) => {
                if let Ok(node) = node {
                    disk.setup.clear();
                    stop_node(node);
                }
                error
            }
            (None, Err(error)) => Arc::new(error),
        };
        warn!(
            error = %fault,
            "started with a seat store that cannot be written: new checkouts are \
             refused until it can; held leases are restored and served from memory"
        );
        disk.metrics.set_store_error(Some(&fault.to_string()));
        disk.broken = Some(Broken::new(fault));
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

    /// Writes a batch: journal entries (taken from `journal`), lease events, detached
    /// ends, hold-offs and queue places, and the clock mark if given. Not durable until
    /// a flush covers it.
    pub fn write(
        &mut self,
        journal: &mut Vec<JournalEntry>,
        (events, detachments, places): (&[Event], &[Detachment], Places),
        clock: Option<UnixTime>,
    ) -> Result<(), DiskError> {
        if let Some(broken) = &mut self.broken {
            broken.outage.keep(journal.drain(..));
            return Err(DiskError::Store(broken.error.clone()));
        }
        if self.store.is_none() {
            return Err(DiskError::Closed);
        }
        let batch = &mut self.pending;
        batch.journal.append(journal);
        batch.leases.extend(events.iter().map(|event| match event {
            Event::Granted(record) => LeaseChange::Put(record.clone()),
            Event::Released { id, .. } => LeaseChange::Remove(*id),
        }));
        batch.detached.extend(
            detachments
                .iter()
                .map(|&change| DetachedChange::from(change)),
        );
        batch.holdoffs.extend(places.holdoffs);
        batch.queue.extend(places.queue);
        batch.named.extend(places.named);
        if clock.is_some() {
            batch.clock = clock;
        }
        Ok(())
    }

    /// Writes an export's move of the report chain (and the compaction of the journal
    /// it allows); not durable until a flush covers it.
    pub fn write_report(&mut self, state: ReportState, compact: Compaction) {
        if self.broken.is_none() {
            self.pending.report = Some(state);
            self.pending.compact = Some(compact);
        }
    }

    /// The number of the proposal that will carry everything written so far: a reader
    /// of the store waits until [`Disk::applied`] reaches it.
    pub fn written_mark(&self) -> u64 {
        if self.pending.is_empty() {
            self.proposed
        } else {
            self.proposed + 1
        }
    }

    /// How many proposals ended well: everything they carried is in the store.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Starts a flush (a proposal) of everything written so far; `None` while the store
    /// is broken.
    pub fn start_flush(&mut self) -> Option<Flush> {
        let node = self.node.clone().filter(|_| self.broken.is_none())?;
        let path = self.path.clone();
        let mut batch = std::mem::replace(&mut self.pending, StoreBatch::new(UnixTime(0)));
        batch.at = UnixTime::now();
        self.in_flight = batch.journal.clone();
        self.proposed += 1;
        if batch.is_empty() {
            return Some(tokio::spawn(async { Ok(()) }));
        }
        Some(tokio::spawn(async move {
            consensus::propose(&node, batch, &path).await
        }))
    }

    /// Takes the result of a flush started by [`Disk::start_flush`]. A proposal refused
    /// because this member no longer leads breaks nothing: the term ends (the new
    /// leader's log says whether it was committed).
    pub fn flushed(&mut self, result: Result<(), StoreError>) -> Result<(), DiskError> {
        match result {
            Ok(()) => {
                self.in_flight.clear();
                self.applied = self.proposed;
                Ok(())
            }
            Err(e @ (StoreError::NotLeader { .. } | StoreError::NoMajority)) => {
                self.in_flight.clear();
                Err(DiskError::Store(Arc::new(e)))
            }
            Err(e) => Err(self.break_with(e)),
        }
    }

    /// Whether this server is a member of a cluster of several (which serves in terms).
    pub fn is_cluster(&self) -> bool {
        self.setup.is_cluster()
    }

    /// The Raft node, while it runs.
    pub fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }

    /// Resolves when this member no longer leads its cluster (its node stopped or
    /// another leads); never for a single server, which leads for as long as it runs.
    pub fn lost_lead(&self) -> impl std::future::Future<Output = ()> + 'static {
        let node = self.node.clone();
        let (cluster, id) = (self.setup.is_cluster(), self.setup.id());
        async move {
            match (cluster, node) {
                (false, _) => std::future::pending().await,
                (true, None) => {}
                (true, Some(node)) => consensus::lost_lead(&node, id).await,
            }
        }
    }

    /// Drops the writes gathered and not proposed (a term ended: the next leader's
    /// store is the truth).
    pub fn forget_pending(&mut self) {
        self.pending = StoreBatch::new(UnixTime(0));
        self.applied = self.proposed;
    }

    /// Proposes what is left before a stop, stops the node, and flushes the store (so
    /// that the next start has nothing to apply again); says what is lost if the store
    /// is broken.
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
        if !self.pending.is_empty() {
            if let Some(flush) = self.start_flush() {
                let result = flush.await.unwrap_or_else(|e| Err(StoreError::Task(e)));
                self.flushed(result)?;
            }
        }
        if let Some(node) = self.node.take() {
            self.setup.clear();
            if let Err(e) = node.shutdown().await {
                warn!(error = %e, "the Raft node did not stop cleanly");
            }
        }
        let result = store.flush().await;
        self.flushed(result)
    }

    /// Tries to reopen a broken store and its log, and bring them up to date with the
    /// ledger. Returns whether the store is writable now.
    ///
    /// A cluster member (`ledger` is `None`: it does not lead) only restarts its node:
    /// the leader's log brings its store up to date.
    pub async fn try_recover(&mut self, ledger: Option<&Ledger>) -> bool {
        let Some(broken) = &mut self.broken else {
            return true;
        };
        // Every handle must go before sled can open the files again.
        release(self.store.take());
        if let Some(node) = self.node.take() {
            self.setup.clear();
            stop_node(node);
        }
        let path = self.path.clone();
        let setup = self.setup.clone();
        let attempt = async {
            let store = tokio::task::spawn_blocking(move || Store::reopen(&path))
                .await
                .map_err(StoreError::Task)??;
            let node = setup.start(&store).await?;
            let Some(ledger) = ledger else {
                return Ok((store, node, 0, 0));
            };
            let mut batch = StoreBatch::new(UnixTime::now());
            batch.journal = broken.outage.backlog().to_vec();
            let (stored, _) = store.load_leases()?;
            let held: std::collections::HashSet<_> = ledger.records().map(|r| r.id).collect();
            let removed: Vec<_> = stored
                .iter()
                .filter(|r| !held.contains(&r.id))
                .map(|r| LeaseChange::Remove(r.id))
                .collect();
            let (removed_n, added_n) = (removed.len(), held.len());
            batch.leases = removed;
            batch
                .leases
                .extend(ledger.records().map(|r| LeaseChange::Put(r.clone())));
            batch.clock = Some(ledger.clock_high_water());
            batch.holdoffs = ledger.holdoffs(crate::clock::now());
            batch.named = ledger.named_seats(crate::clock::now());
            if let Err(e) = consensus::propose(&node, batch, &self.path).await {
                stop_node(node);
                return Err(e);
            }
            Ok::<_, StoreError>((store, node, removed_n, added_n))
        };
        match attempt.await {
            Ok((store, node, removed, added)) => {
                info!(
                    journal_events = broken.outage.backlog().len(),
                    leases_removed = removed,
                    leases_written = added,
                    dropped_events = broken.outage.dropped(),
                    "the seat store can be written again; checkouts are served"
                );
                self.store = Some(store);
                self.node = Some(node);
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
        let pending = std::mem::replace(&mut self.pending, StoreBatch::new(UnixTime(0)));
        backlog.extend(pending.journal);
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
        release(self.store.take());
        if let Some(node) = self.node.take() {
            self.setup.clear();
            stop_node(node);
        }
        DiskError::Store(error)
    }
}

/// Lets go of a store handle on a volume that failed. sled 0.34's last handle syncs its
/// log file as it drops and panics when that fails (`Log::drop`: `sync_all().unwrap()`)
/// unless sled saw a write error itself, and the error may have been seen by our own
/// fdatasync instead (`Store::flush`). The handle is gone either way and what was not
/// durable is in the backlog, so the panic is caught here: unwinding out of the ledger
/// task would stop the server (seen in CI: clients' connections lost right after the
/// volume went read-only). A handle whose drop is not the last one drops quietly.
fn release(store: Option<Store>) {
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(store)));
    if dropped.is_err() {
        warn!(
            "sled could not sync the seat store's log file as it let go of it (the volume \
             failed); nothing is lost: what was not known durable is kept in memory"
        );
    }
}

/// Stops a Raft node in the background: its tasks end and drop their store handles a
/// moment later (a restart waits for them, see `consensus`).
fn stop_node(node: Node) {
    tokio::spawn(async move {
        let _ = node.shutdown().await;
    });
}
