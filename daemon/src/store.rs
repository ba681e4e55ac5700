//! The seat store: sled behind one small module.
//!
//! Only this module knows sled exists. It keeps leases (key: lease id, big-endian; value:
//! an encoded, versioned [`StoredLease`]) and gives the shell three operations: load at
//! start, apply a batch of ledger events, flush. The shell applies a whole batch of
//! grants and then flushes once (group commit), so many concurrent checkouts share one
//! fsync while each grant is still durable before its client hears about it.
//!
//! The usage journal lives in its own tree as chunks: each group commit's entries are a
//! few values ([`StoredJournalChunk`]), each under its first entry's number. Stores written
//! before chunks existed (`journal/v1`, one value per entry) are converted when opened.

use crate::ledger::{Detachment, Event};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tally_cluster::durable::sync_dir;
use tally_protocol::lease::{LeaseId, LeaseRecord, StoredClock, StoredDeadline, StoredLease};
use tally_protocol::replicate::{
    DetachedChange, Holdoff, LeaseChange, NamedSeat, QueueChange, QueuePlace, StoreBatch,
    StoreImage, StoredHoldoff, StoredNamedSeat, StoredPlace,
};
use tally_protocol::report::{
    JournalEntry, ReportState, StoredJournal, StoredJournalChunk, StoredReportState,
};
use tally_protocol::time::UnixTime;

/// Key of the clock high-water mark in the meta tree.
const CLOCK_KEY: &[u8] = b"clock-high-water";
/// Key of the report chain state in the meta tree.
const REPORT_KEY: &[u8] = b"report-state";
/// Meta key of the index of the last Raft log entry applied to the store: a version
/// byte (1), then the index as a big-endian u64.
const APPLIED_KEY: &[u8] = b"raft-applied";
/// The version byte of the applied-index record.
const APPLIED_V1: u8 = 1;

/// Why the store failed; the text names the store's path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// sled reported an error (disk full, permissions, corruption).
    // `cause`, not `source`: the message already holds it, and an error chain would
    // print it twice.
    #[error("seat store {path}: {cause}")]
    Sled {
        /// The store directory.
        path: PathBuf,
        /// sled's error.
        cause: sled::Error,
    },
    /// A replicated command or snapshot of a format this tallyd does not read (written
    /// by a newer tallyd of the same site): upgrade this server.
    #[error("seat store {path}: a replicated {what} is of a newer format than this tallyd reads; upgrade it to the site's version")]
    NewerFormat {
        /// The store directory.
        path: PathBuf,
        /// A command, a snapshot.
        what: &'static str,
    },
    /// Another process (another tallyd, or `tallyd return` / `diagnose` while tallyd
    /// runs) holds the store's lock: sled keeps one process per store.
    #[error(
        "seat store {path}: its lock is held by another process (another tallyd using \
         the same data directory?)"
    )]
    InUse {
        /// The store directory.
        path: PathBuf,
    },
    /// The store's files are not there (a volume not mounted, a directory removed).
    #[error("seat store {path}: its files are missing (is its volume mounted?)")]
    Missing {
        /// The store directory.
        path: PathBuf,
    },
    /// sled's log cannot be read even with the snapshots set aside: the store is
    /// damaged beyond what tallyd repairs on its own.
    #[error(
        "seat store {path}: its log {path}/db cannot be read ({cause}); leftovers of \
         interrupted snapshots were set aside already. To serve again, stop tallyd, move \
         the directory {path} aside (keep it for support) and start tallyd: it starts an \
         empty store, and running programs are told their leases are unknown and check \
         out again"
    )]
    Unreadable {
        /// The store directory.
        path: PathBuf,
        /// sled's error.
        cause: sled::Error,
    },
    /// An I/O error of tallyd's own around sled: probing the volume, copying the store,
    /// opening or fdatasyncing its log file. (The text is sled's own for its I/O errors.)
    #[error("seat store {path}: IO error: {cause}")]
    Io {
        /// The store directory.
        path: PathBuf,
        /// The error.
        cause: std::io::Error,
    },
    /// The blocking task that flushed the store did not finish (it panicked or the
    /// runtime is shutting down).
    #[error("seat store: the flush task did not finish: {0}")]
    Task(tokio::task::JoinError),
    /// A leftover of an interrupted write could not be moved aside.
    #[error("seat store {path}: cannot set aside {file} ({why}): {cause}")]
    SetAside {
        /// The store directory.
        path: PathBuf,
        /// The leftover.
        file: PathBuf,
        /// Why it is a leftover.
        why: &'static str,
        /// The error moving it.
        cause: std::io::Error,
    },
    /// This server does not lead its cluster (any more): another member writes the
    /// store. No fault of the store's.
    #[error("this server does not lead its cluster{}", leader.as_ref().map(|l| format!("; the leader is at {l}")).unwrap_or_default())]
    NotLeader {
        /// The leader's address, if known.
        leader: Option<String>,
    },
    /// A proposal was not committed in time: this server cannot reach a majority of
    /// its cluster. No fault of the store's.
    #[error("this server cannot reach a majority of its cluster")]
    NoMajority,
    /// The Raft log beside the store (in its `raft` directory) failed, or the Raft node
    /// over it stopped: the store cannot be written through it.
    #[error("seat store {path}: the Raft log: {cause}")]
    Raft {
        /// The store directory.
        path: PathBuf,
        /// What failed, as openraft or the log store says it.
        cause: String,
    },
}

impl StoreError {
    /// The fault is the volume's (full, over quota, read-only), not the store's: the
    /// daemon serves what it holds and retries until the volume can be written.
    pub fn is_volume_fault(&self) -> bool {
        let io = match self {
            StoreError::Sled {
                cause: sled::Error::Io(e),
                ..
            } => e,
            StoreError::Io { cause, .. } | StoreError::SetAside { cause, .. } => cause,
            _ => return false,
        };
        // ENOSPC, EROFS, EDQUOT; sled re-creates some errors from their text, so the
        // text counts too.
        matches!(io.raw_os_error(), Some(28 | 30 | 122))
            || [
                "No space left",
                "Read-only file system",
                "Disk quota exceeded",
            ]
            .iter()
            .any(|t| io.to_string().contains(t))
    }
}

/// What an open on a volume that cannot be written (full, read-only) serves from: a copy
/// of the store in a temporary directory, the real store's path and why it failed.
#[derive(Debug)]
struct Fault {
    /// Why the real store could not be opened.
    error: std::sync::Arc<StoreError>,
    /// The copy; removed with the last handle.
    _copy: tempfile::TempDir,
}

/// A lease record in the store that could not be decoded. It is left in place (never
/// deleted on our own initiative) and reported, so no data is lost to a bug.
#[derive(Debug)]
pub struct UnreadableLease {
    /// The raw key.
    pub key: Vec<u8>,
    /// What was wrong.
    pub error: String,
}

/// The sled-backed seat store.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
    db: sled::Db,
    leases: sled::Tree,
    /// Ends of restored leases not re-attached yet (see `ledger::Detachment`).
    detached: sled::Tree,
    /// Hold-offs after removals ([`StoredHoldoff`]), by feature, user and host.
    holdoffs: sled::Tree,
    /// Checkout queue places ([`StoredPlace`]), by number (big-endian).
    queue: sled::Tree,
    /// Named seats ([`StoredNamedSeat`]), by feature and name.
    named: sled::Tree,
    meta: sled::Tree,
    /// Journal chunks, keyed by their first entry's sequence number (big-endian).
    journal: sled::Tree,
    /// sled's log file, opened again for fdatasync (see [`Store::flush`]).
    log: std::sync::Arc<std::fs::File>,
    /// The directory sled runs in: `path`, or the copy of [`Store::open_for_serving`].
    sled_dir: PathBuf,
    /// Set when this is a read-only copy of a store on a volume that cannot be written.
    fault: Option<std::sync::Arc<Fault>>,
}

impl Store {
    /// Opens (or creates) the store in `dir`, after setting aside what an interrupted
    /// write left behind ([`set_aside_leftovers`]).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        // First: the leftovers are only leftovers if nobody is writing the store now; a
        // running tallyd's snapshot in progress must not be moved away under it.
        check_not_in_use(dir)?;
        set_aside_leftovers(dir)?;
        Store::open_sled(dir, dir)
    }

    /// Opens the store for `tallyd run`/`demo`: on a volume that cannot be written (full,
    /// read-only), sled cannot open it (it writes a snapshot at every open), so the
    /// store is copied to a temporary directory and opened there, to restore the held
    /// leases and the journal position from. Such a store reports its fault
    /// ([`Store::fault`]): the daemon then starts with the store broken, refuses grants
    /// and reopens the real store once the volume can be written ([`crate::disk`]).
    pub fn open_for_serving(dir: &Path) -> Result<Store, StoreError> {
        let io = |cause: std::io::Error| StoreError::Io {
            path: dir.to_path_buf(),
            cause,
        };
        let exists = dir.join("db").is_file();
        // An existing store is probed first: sled on a full volume would leave a 0-byte
        // snapshot behind at each try (set aside at the next open, but noise).
        let first = match exists {
            true => probe_writable(dir)
                .map_err(io)
                .and_then(|_| Store::open(dir)),
            false => Store::open(dir),
        };
        let error = match first {
            Ok(store) => return Ok(store),
            Err(e) if e.is_volume_fault() && exists => e,
            Err(e) => return Err(e),
        };
        let copy = tempfile::Builder::new()
            .prefix("tally-store-copy-")
            .tempdir()
            .map_err(io)?;
        copy_dir(dir, copy.path()).map_err(io)?;
        tracing::warn!(
            store = %dir.display(),
            copy = %copy.path().display(),
            error = %error,
            "the seat store cannot be opened for writing: serving the leases it holds from \
             a read-only copy; new checkouts are refused until the volume can be written"
        );
        set_aside_leftovers(copy.path())?;
        let mut store = Store::open_sled(copy.path(), dir)?;
        store.fault = Some(std::sync::Arc::new(Fault {
            error: std::sync::Arc::new(error),
            _copy: copy,
        }));
        Ok(store)
    }

    /// Why the store could not be opened for writing, for a store opened from a copy by
    /// [`Store::open_for_serving`].
    pub fn fault(&self) -> Option<std::sync::Arc<StoreError>> {
        self.fault.as_ref().map(|f| f.error.clone())
    }

    /// Opens sled in `dir`; errors name `path` (the store as the operator knows it).
    fn open_sled(dir: &Path, path: &Path) -> Result<Store, StoreError> {
        let path = path.to_path_buf();
        let err = |cause| match cause {
            sled::Error::Corruption { .. } => StoreError::Unreadable {
                path: path.clone(),
                cause,
            },
            // Taken between our check and sled's own: the same answer.
            sled::Error::Io(e) if e.to_string().contains(SLED_LOCK_ERROR) => {
                StoreError::InUse { path: path.clone() }
            }
            cause => StoreError::Sled {
                path: path.clone(),
                cause,
            },
        };
        let db = sled::Config::new()
            .path(dir)
            // The default 1 GiB page cache is sized for databases, not for a seat table:
            // writes go to the tail of two trees and reads happen at start and export.
            // 8 MiB instead of 64 took 24 MiB off the daemon at 100,000 leases, with no
            // change in the storage figures (BENCHMARKS.md).
            .cache_capacity(8 * 1024 * 1024)
            .segment_size(segment_size(dir))
            .open()
            .map_err(err)?;
        let leases = db.open_tree("leases/v1").map_err(err)?;
        let detached = db.open_tree(DETACHED_TREE).map_err(err)?;
        let holdoffs = db.open_tree(HOLDOFF_TREE).map_err(err)?;
        let queue = db.open_tree(QUEUE_TREE).map_err(err)?;
        let named = db.open_tree(NAMED_TREE).map_err(err)?;
        let meta = db.open_tree("meta/v1").map_err(err)?;
        let journal = db.open_tree(JOURNAL_TREE).map_err(err)?;
        let io = |cause: std::io::Error| StoreError::Io {
            path: path.clone(),
            cause,
        };
        let log = tally_cluster::durable::open_log_file(dir).map_err(io)?;
        // The store's directory entries, once, so that a new store survives a power cut.
        sync_dir(dir).map_err(io)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent).map_err(io)?;
        }
        let store = Store {
            path,
            db,
            leases,
            detached,
            holdoffs,
            queue,
            named,
            meta,
            journal,
            log: std::sync::Arc::new(log),
            sled_dir: dir.to_path_buf(),
            fault: None,
        };
        store.migrate_journal_v1()?;
        Ok(store)
    }

    /// Converts a `journal/v1` tree (one value per entry) into chunks and drops it.
    ///
    /// Safe to interrupt: the chunks are made the same way from the same entries each
    /// time, so a run cut short is redone over the top of itself, and the old tree goes
    /// only after the chunks are flushed (with fdatasync). An entry the old tree could
    /// not decode is carried over as it is, under its own number: it reads as a damaged
    /// chunk, counted and shown as a gap as before, and its number is not given again.
    fn migrate_journal_v1(&self) -> Result<(), StoreError> {
        let names = self.db.tree_names();
        if !names.iter().any(|n| n == JOURNAL_TREE_V1.as_bytes()) {
            return Ok(());
        }
        let old = self
            .db
            .open_tree(JOURNAL_TREE_V1)
            .map_err(|e| self.err(e))?;
        let mut run: Vec<JournalEntry> = Vec::new();
        let mut batch = sled::Batch::default();
        let mut in_batch = 0usize;
        let (mut moved, mut damaged) = (0usize, 0usize);
        let mut write_run = |run: &mut Vec<JournalEntry>, batch: &mut sled::Batch| {
            put_chunks(batch, run);
            moved += run.len();
            run.clear();
        };
        for item in old.iter() {
            let (k, v) = item.map_err(|e| self.err(e))?;
            match StoredJournal::decode(&v) {
                Ok(StoredJournal::V1(e)) => {
                    // Chunks hold consecutive entries: a gap ends a run.
                    if run.last().is_some_and(|last| last.seq + 1 != e.seq) {
                        write_run(&mut run, &mut batch);
                    }
                    run.push(e);
                }
                _ => {
                    write_run(&mut run, &mut batch);
                    batch.insert(k, v);
                    damaged += 1;
                }
            }
            in_batch += 1;
            // Bounded memory for a long journal; the runs written so far stay valid
            // if the conversion is cut short here.
            if in_batch >= 16_384 {
                write_run(&mut run, &mut batch);
                self.journal
                    .apply_batch(std::mem::take(&mut batch))
                    .map_err(|e| self.err(e))?;
                in_batch = 0;
            }
        }
        write_run(&mut run, &mut batch);
        self.journal.apply_batch(batch).map_err(|e| self.err(e))?;
        self.flush_blocking()?;
        drop(old);
        self.db
            .drop_tree(JOURNAL_TREE_V1)
            .map_err(|e| self.err(e))?;
        self.flush_blocking()?;
        tracing::info!(entries = moved, damaged, "journal converted to chunks");
        Ok(())
    }

    /// Opens a store that must already exist in `dir`, as after a failed write: when
    /// its volume is unmounted for repair, the path is there no more (or is an empty
    /// mount point), and opening it would start a new, empty store in its place.
    pub fn reopen(dir: &Path) -> Result<Store, StoreError> {
        for file in ["conf", "db"] {
            if !dir.join(file).is_file() {
                return Err(StoreError::Missing {
                    path: dir.to_path_buf(),
                });
            }
        }
        // sled writes a snapshot at every open: on a volume still full that leaves one
        // more 0-byte leftover per try. A probe of our own first says whether to try.
        probe_writable(dir).map_err(|cause| StoreError::Io {
            path: dir.to_path_buf(),
            cause,
        })?;
        Store::open(dir)
    }

    /// Every lease in the store, plus the records that could not be read.
    pub fn load_leases(&self) -> Result<(Vec<LeaseRecord>, Vec<UnreadableLease>), StoreError> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for item in self.leases.iter() {
            let (key, value) = item.map_err(|e| self.err(e))?;
            match StoredLease::decode(&value) {
                Ok(StoredLease::V1(record)) => good.push(record),
                Ok(_) => bad.push(UnreadableLease {
                    key: key.to_vec(),
                    error: "unknown lease record version".into(),
                }),
                Err(e) => bad.push(UnreadableLease {
                    key: key.to_vec(),
                    error: e.to_string(),
                }),
            }
        }
        Ok((good, bad))
    }

    /// Writes the effects of a batch of ledger events (not yet flushed).
    pub fn apply(&self, events: &[Event]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for event in events {
            match event {
                Event::Granted(record) => {
                    batch.insert(&key(record.id), StoredLease::V1(record.clone()).encode())
                }
                Event::Released { id, .. } => batch.remove(&key(*id)),
            }
        }
        self.leases.apply_batch(batch).map_err(|e| self.err(e))
    }

    /// Writes changes to the stored ends of detached leases (not yet flushed).
    pub fn apply_detachments(&self, changes: &[Detachment]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for change in changes {
            match *change {
                Detachment::Until { id, until } => {
                    batch.insert(&key(id), StoredDeadline::V1(until).encode())
                }
                Detachment::Cleared { id } => batch.remove(&key(id)),
            }
        }
        self.detached.apply_batch(batch).map_err(|e| self.err(e))
    }

    /// The stored ends of detached leases. A record that cannot be read counts as none:
    /// the lease then ends by the clock mark, which is never later than its true end
    /// plus the mark's slack.
    pub fn load_detached(&self) -> Result<HashMap<LeaseId, UnixTime>, StoreError> {
        let mut out = HashMap::new();
        for item in self.detached.iter() {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let (Ok(k), Ok(StoredDeadline::V1(until))) =
                (<[u8; 8]>::try_from(k.as_ref()), StoredDeadline::decode(&v))
            else {
                continue;
            };
            out.insert(LeaseId(u64::from_be_bytes(k)), until);
        }
        Ok(out)
    }

    /// Makes the stored leases exactly `records`: deletes the ones not among them and
    /// writes the missing ones (not yet flushed). Used after the store missed changes
    /// while it could not be written; returns (removed, added).
    pub fn sync_leases<'a>(
        &self,
        records: impl Iterator<Item = &'a LeaseRecord>,
    ) -> Result<(usize, usize), StoreError> {
        let wanted: std::collections::HashMap<[u8; 8], &LeaseRecord> =
            records.map(|r| (key(r.id), r)).collect();
        let mut batch = sled::Batch::default();
        let mut present = std::collections::HashSet::new();
        let mut removed = 0;
        for item in self.leases.iter().keys() {
            let k = item.map_err(|e| self.err(e))?;
            match <[u8; 8]>::try_from(k.as_ref()) {
                Ok(k) if wanted.contains_key(&k) => {
                    present.insert(k);
                }
                // Unreadable keys are left in place, as at load.
                Err(_) => {}
                Ok(k) => {
                    batch.remove(&k);
                    removed += 1;
                }
            }
        }
        let mut added = 0;
        for (k, record) in &wanted {
            if !present.contains(k) {
                batch.insert(k, StoredLease::V1((*record).clone()).encode());
                added += 1;
            }
        }
        self.leases.apply_batch(batch).map_err(|e| self.err(e))?;
        Ok((removed, added))
    }

    /// The store directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The persisted clock high-water mark, if any (an unreadable one counts as none
    /// and is reported by the caller's log of the error).
    pub fn load_clock(&self) -> Result<Option<UnixTime>, StoreError> {
        let Some(bytes) = self.meta.get(CLOCK_KEY).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        Ok(match StoredClock::decode(&bytes) {
            Ok(StoredClock::V1(t)) => Some(t),
            _ => None,
        })
    }

    /// Records the clock high-water mark (not yet flushed).
    pub fn save_clock(&self, t: UnixTime) -> Result<(), StoreError> {
        self.meta
            .insert(CLOCK_KEY, StoredClock::V1(t).encode())
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The next journal sequence number (1 for an empty journal).
    pub fn next_journal_seq(&self) -> Result<u64, StoreError> {
        // The last chunk by key need not hold the highest number: after a store failure
        // the backlog is written again as chunks that may span older, shorter ones. A
        // chunk holds fewer than MAX_ENTRIES numbers from its key on, so the scan stops
        // at the first key too low to matter.
        let mut highest: Option<u64> = None;
        for item in self.journal.iter().rev() {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let key = seq_of(&k);
            if highest.is_some_and(|h| key.saturating_add(CHUNK_SPAN) <= h) {
                break;
            }
            let last = match StoredJournalChunk::decode(&v) {
                Ok(StoredJournalChunk::V1(entries)) => entries.last().map_or(key, |e| e.seq),
                // A damaged chunk: count it as full, so that no number is given twice.
                _ => key.saturating_add(CHUNK_SPAN - 1),
            };
            highest = Some(highest.map_or(last, |h| h.max(last)));
        }
        let from_journal = highest.map_or(1, |h| h + 1);
        // A compacted journal may be empty; the report state remembers how far it went.
        let from_state = self.report_state()?.last_event + 1;
        Ok(from_journal.max(from_state))
    }

    /// Appends journal entries (not yet flushed): consecutive entries, as the ledger
    /// numbers them, stored as chunks ([`StoredJournalChunk::encode_split`]).
    pub fn append_journal(&self, entries: &[JournalEntry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        put_chunks(&mut batch, entries);
        self.journal.apply_batch(batch).map_err(|e| self.err(e))
    }

    /// Journal entries after `after`, in order, each number once; undecodable chunks are
    /// skipped and counted (the report then shows the gap).
    pub fn journal_after(&self, after: u64) -> Result<(Vec<JournalEntry>, usize), StoreError> {
        // A chunk holding `after + 1` may start up to MAX_ENTRIES - 1 before it (and
        // after a store failure more than one may: see `next_journal_seq`).
        let first = after.saturating_add(1);
        let from = first.saturating_sub(CHUNK_SPAN - 1);
        let mut out = Vec::new();
        let mut bad = 0;
        let mut next = first;
        for item in self.journal.range(from.to_be_bytes()..) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            match StoredJournalChunk::decode(&v) {
                Ok(StoredJournalChunk::V1(entries)) => {
                    // Chunks written again after a store failure may overlap.
                    for e in entries {
                        if e.seq >= next {
                            next = e.seq + 1;
                            out.push(e);
                        }
                    }
                }
                // One starting at or before `after` was counted by an earlier read.
                _ if seq_of(&k) <= after => {}
                _ => bad += 1,
            }
        }
        Ok((out, bad))
    }

    /// Deletes exported entries up to `upto` that happened before `before`, a whole chunk
    /// at a time: a chunk holding anything newer stays, and with it the older entries
    /// beside it, until the next compaction. Returns the number of entries deleted.
    pub fn compact_journal(&self, upto: u64, before: UnixTime) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in self.journal.range(..=upto.to_be_bytes()) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            match StoredJournalChunk::decode(&v) {
                Ok(StoredJournalChunk::V1(entries)) => {
                    if entries.iter().any(|e| e.seq > upto || e.at >= before) {
                        break;
                    }
                    n += entries.len();
                }
                // A damaged chunk goes only when it cannot hold a number past `upto`.
                _ => {
                    if seq_of(&k).saturating_add(CHUNK_SPAN - 1) > upto {
                        break;
                    }
                }
            }
            batch.remove(k);
        }
        self.journal.apply_batch(batch).map_err(|e| self.err(e))?;
        Ok(n)
    }

    /// The report chain state.
    pub fn report_state(&self) -> Result<ReportState, StoreError> {
        Ok(match self.meta.get(REPORT_KEY).map_err(|e| self.err(e))? {
            Some(bytes) => match StoredReportState::decode(&bytes) {
                Ok(stored) => stored.into_state(),
                _ => ReportState::default(),
            },
            None => ReportState::default(),
        })
    }

    /// Records the report chain state (not yet flushed).
    pub fn save_report_state(&self, state: &ReportState) -> Result<(), StoreError> {
        self.meta
            .insert(REPORT_KEY, StoredReportState::V2(state.clone()).encode())
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db.size_on_disk().map_err(|e| self.err(e))
    }

    /// Makes everything applied so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        // sled's own flush_async hands the work to its thread pool and was measured at
        // ~12 ms per call here; a blocking flush on tokio's blocking pool takes the
        // fsync's own time (~0.1 ms on this machine's disk).
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.flush_blocking())
            .await
            .map_err(StoreError::Task)?
    }

    /// Flushes synchronously; for shutdown paths outside the runtime.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        // sled's flush alone leaves the fsync to a thread up to 500 ms later: a grant
        // acknowledged in that window was lost when the file system failed under us (the
        // read-only volume test). The shared flush adds fdatasync on our own descriptor
        // of sled's log file (and of any blob file); the Raft log store flushes the same
        // way (tally_cluster::durable).
        use tally_cluster::durable::FlushError;
        tally_cluster::durable::flush(&self.db, &self.log, &self.sled_dir).map_err(|e| match e {
            FlushError::Sled(cause) => self.err(cause),
            FlushError::Io(cause) => StoreError::Io {
                path: self.path.clone(),
                cause,
            },
        })
    }

    fn err(&self, cause: sled::Error) -> StoreError {
        StoreError::Sled {
            path: self.path.clone(),
            cause,
        }
    }
}

/// Segment size of new stores: 128 KiB instead of sled's 512 KiB left 9 % less on disk
/// after the benchmark's million checkout/checkin cycles (66 MiB instead of 73 MiB);
/// 64 KiB did no better and wrote slower. sled refuses to open a store with another
/// segment size than it was made with, so an existing store keeps its own.
const SEGMENT_SIZE: usize = 128 * 1024;

fn segment_size(dir: &Path) -> usize {
    // sled's conf is text lines followed by a binary CRC.
    std::fs::read(dir.join("conf"))
        .ok()
        .and_then(|conf| {
            String::from_utf8_lossy(&conf)
                .lines()
                .find_map(|l| l.strip_prefix("segment_size:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(SEGMENT_SIZE)
}

/// Moves what an interrupted snapshot left in the store directory into its
/// `quarantine/` sub-directory (never deleting it), with a log line saying what and why.
///
/// sled 0.34 writes a snapshot of its page table at every open and now and then while
/// running: into `snap.<lsn>.generating`, fsynced, then renamed to `snap.<lsn>`; the old
/// snapshots are removed after. At open it reads the snapshot whose name sorts last,
/// `.generating` ones included, and refuses to open ("Read corrupted data") if it is
/// shorter than its trailer or fails its CRC. A crash or a full disk mid-write leaves
/// such a file (a full disk: a 0-byte one, at every failed open). A snapshot only
/// spares sled reading its whole log, so setting one aside costs a longer open, no data:
/// sled replays its log from the newest good snapshot, or from the start.
/// (sled 0.34 has no other intermediate files: segment cleaning rewrites in `db`.)
/// The text of sled 0.34's error when another process holds the store's lock (an
/// `io::Error` of kind `Other` with the OS error in Debug form).
const SLED_LOCK_ERROR: &str = "could not acquire lock on";

/// Fails with [`StoreError::InUse`] if another process holds sled's lock on the store's
/// log file (`flock`, which sled takes through fs2). The probe lock is let go at once.
fn check_not_in_use(dir: &Path) -> Result<(), StoreError> {
    use fs2::FileExt;
    let Ok(file) = std::fs::File::open(dir.join("db")) else {
        // No store yet, or one sled will name the problem of.
        return Ok(());
    };
    match file.try_lock_exclusive() {
        Ok(()) => {
            let _ = file.unlock();
            Ok(())
        }
        Err(e) if e.kind() == fs2::lock_contended_error().kind() => Err(StoreError::InUse {
            path: dir.to_path_buf(),
        }),
        // Locks not supported here (some network file systems): sled decides.
        Err(_) => Ok(()),
    }
}

pub(crate) fn set_aside_leftovers(dir: &Path) -> Result<(), StoreError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        // A new store, or one whose directory cannot be read: sled says which.
        return Ok(());
    };
    let mut leftovers = Vec::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        // sled skips `.in___motion` files itself.
        if !name.starts_with("snap.") || name.ends_with(".in___motion") {
            continue;
        }
        let why = if name.ends_with(".generating") {
            "a snapshot whose writing was interrupted (never renamed into place)"
        } else if !snapshot_is_whole(&entry.path()) {
            "a snapshot that fails its length or checksum (cut short or damaged)"
        } else {
            continue;
        };
        leftovers.push((entry.path(), name, why));
    }
    if leftovers.is_empty() {
        return Ok(());
    }
    let quarantine = dir.join(QUARANTINE_DIR);
    // Unix seconds: names sort by when they were set aside.
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for (file, name, why) in leftovers {
        let fail = |cause| StoreError::SetAside {
            path: dir.to_path_buf(),
            file: file.clone(),
            why,
            cause,
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&quarantine)
                .map_err(fail)?;
        }
        let to = quarantine.join(format!("{stamp}-{name}"));
        std::fs::rename(&file, &to).map_err(fail)?;
        sync_dir(dir)
            .and_then(|_| sync_dir(&quarantine))
            .map_err(fail)?;
        tracing::warn!(
            file = %file.display(),
            moved_to = %to.display(),
            why,
            "set aside a leftover of an interrupted write in the seat store; sled rebuilds \
             what it held from its log (nothing is lost; the file is kept for support)"
        );
    }
    Ok(())
}

/// Whether a `snap.<lsn>` file has sled's trailer (length, CRC-32 of the rest, both
/// little-endian) and the CRC matches. A file too large to be a seat store's snapshot
/// (or unreadable) is left to sled to judge.
fn snapshot_is_whole(path: &Path) -> bool {
    const MAX_CHECKED: u64 = 512 * 1024 * 1024;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() <= MAX_CHECKED => {}
        Ok(m) if !m.is_file() => return false,
        _ => return true,
    }
    let Ok(bytes) = std::fs::read(path) else {
        return true;
    };
    if bytes.len() <= 12 {
        return false;
    }
    let (body, trailer) = bytes.split_at(bytes.len() - 12);
    let expected = u32::from_le_bytes(trailer[8..12].try_into().expect("4 bytes"));
    crc32(body) == expected
}

/// CRC-32 (IEEE, as sled's crc32fast computes it), bitwise: snapshots are small and
/// read once per open.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// Writes, syncs and removes a file of a segment's size or more in `dir`: roughly what
/// sled needs to open (a snapshot and a segment).
fn probe_writable(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let probe = dir.join(".tally-write-probe");
    let result = std::fs::File::create(&probe).and_then(|mut f| {
        f.write_all(&vec![0u8; 2 * SEGMENT_SIZE])?;
        f.sync_all()
    });
    let removed = std::fs::remove_file(&probe);
    result.and(removed)
}

/// Copies the store's files (not its quarantine) for [`Store::open_for_serving`].
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            if entry.file_name() != QUARANTINE_DIR {
                copy_dir(&entry.path(), &target)?;
            }
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The journal tree: chunks of entries.
const JOURNAL_TREE: &str = "journal/v2";
/// The journal tree of stores written before chunks: one value per entry.
const JOURNAL_TREE_V1: &str = "journal/v1";
/// How many numbers a chunk can hold from its key on.
const CHUNK_SPAN: u64 = StoredJournalChunk::MAX_ENTRIES as u64;

/// Adds `entries` (consecutive) to `batch` as chunks under their first numbers.
fn put_chunks(batch: &mut sled::Batch, entries: &[JournalEntry]) {
    for (first, value) in StoredJournalChunk::encode_split(entries) {
        batch.insert(&first.to_be_bytes(), value);
    }
}

fn seq_of(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = key.len().min(8);
    b[8 - n..].copy_from_slice(&key[..n]);
    u64::from_be_bytes(b)
}

/// Where leftovers of interrupted writes go, inside the store directory.
pub const QUARANTINE_DIR: &str = "quarantine";

/// Tree of [`StoredDeadline`]s by lease id.
const DETACHED_TREE: &str = "detached/v1";

/// Tree of [`StoredPlace`]s by place number.
const QUEUE_TREE: &str = "queue/v1";

/// Tree of [`StoredHoldoff`]s by [`holdoff_key`].
const HOLDOFF_TREE: &str = "holdoffs/v1";

/// Tree of [`StoredNamedSeat`]s by [`named_key`].
const NAMED_TREE: &str = "named/v1";

/// The key of a named seat: its feature and name, each length-prefixed.
fn named_key(seat: &NamedSeat) -> Vec<u8> {
    let mut k = Vec::new();
    for part in [&seat.feature, &seat.name] {
        k.extend_from_slice(&(part.len() as u32).to_be_bytes());
        k.extend_from_slice(part.as_bytes());
    }
    k
}

/// The key of a hold-off: its feature, user and host, each length-prefixed (so that no
/// two triples share a key, whatever bytes the names hold).
fn holdoff_key(held: &Holdoff) -> Vec<u8> {
    let mut k = Vec::new();
    for part in [&held.feature, &held.user, &held.host] {
        k.extend_from_slice(&(part.len() as u32).to_be_bytes());
        k.extend_from_slice(part.as_bytes());
    }
    k
}

fn key(id: LeaseId) -> [u8; 8] {
    id.0.to_be_bytes()
}

/// The seat store as the servers of a site replicate it (ARCHITECTURE.md, "Cluster"):
/// each server's Raft state machine writes the batches of the log here, and a server too
/// far behind takes the whole store from a snapshot.
impl Store {
    /// Writes a replicated batch, not flushed: the Raft log holds it durably, and a
    /// batch applied again after a crash writes the same records (each is keyed).
    pub fn write(&self, batch: &StoreBatch) -> Result<(), StoreError> {
        let mut leases = sled::Batch::default();
        for change in &batch.leases {
            match change {
                LeaseChange::Put(record) => {
                    leases.insert(&key(record.id), StoredLease::V1(record.clone()).encode())
                }
                LeaseChange::Remove(id) => leases.remove(&key(*id)),
            }
        }
        self.leases.apply_batch(leases).map_err(|e| self.err(e))?;
        let mut detached = sled::Batch::default();
        for change in &batch.detached {
            match *change {
                DetachedChange::Until { id, until } => {
                    detached.insert(&key(id), StoredDeadline::V1(until).encode())
                }
                DetachedChange::Cleared { id } => detached.remove(&key(id)),
            }
        }
        self.detached
            .apply_batch(detached)
            .map_err(|e| self.err(e))?;
        if !batch.holdoffs.is_empty() {
            // Those ended by the batch's time go as new ones come: the tree holds only
            // hold-offs that may still run (the batch's time, not a clock: every
            // server applying the log forgets the same ones).
            let mut holdoffs = sled::Batch::default();
            for (k, held) in self.holdoff_records()? {
                if held.until <= batch.at {
                    holdoffs.remove(k);
                }
            }
            for held in &batch.holdoffs {
                holdoffs.insert(holdoff_key(held), StoredHoldoff::V1(held.clone()).encode());
            }
            self.holdoffs
                .apply_batch(holdoffs)
                .map_err(|e| self.err(e))?;
        }
        if !batch.named.is_empty() {
            // Like the hold-offs: places freed by the batch's time go as new ones come.
            let mut named = sled::Batch::default();
            for (k, seat) in self.named_records()? {
                if seat.until <= batch.at {
                    named.remove(k);
                }
            }
            for seat in &batch.named {
                named.insert(named_key(seat), StoredNamedSeat::V1(seat.clone()).encode());
            }
            self.named.apply_batch(named).map_err(|e| self.err(e))?;
        }
        if !batch.queue.is_empty() {
            let mut queue = sled::Batch::default();
            for change in &batch.queue {
                match change {
                    QueueChange::Joined(place) => queue.insert(
                        &place.seq.to_be_bytes(),
                        StoredPlace::V1(place.clone()).encode(),
                    ),
                    QueueChange::Left(seq) => queue.remove(&seq.to_be_bytes()),
                }
            }
            self.queue.apply_batch(queue).map_err(|e| self.err(e))?;
        }
        self.append_journal(&batch.journal)?;
        if let Some(clock) = batch.clock {
            self.save_clock(clock)?;
        }
        if let Some(state) = &batch.report {
            self.save_report_state(state)?;
        }
        if let Some(compaction) = batch.compact {
            self.compact_journal(compaction.upto, compaction.before)?;
        }
        Ok(())
    }

    /// Everything the servers share, for a snapshot. Unreadable records are left out,
    /// as a restart leaves them out of the ledger.
    pub fn image(&self) -> Result<StoreImage, StoreError> {
        let (leases, _unreadable) = self.load_leases()?;
        let mut detached: Vec<(LeaseId, UnixTime)> = self.load_detached()?.into_iter().collect();
        detached.sort_by_key(|(id, _)| id.0);
        let (journal, _damaged) = self.journal_after(0)?;
        Ok(StoreImage {
            leases,
            detached,
            journal,
            clock: self.load_clock()?,
            report: self.report_state()?,
            holdoffs: self.load_holdoffs()?,
            queue: self.load_queue()?,
            named: self.load_named()?,
        })
    }

    /// The named seats, their places freed or not (the caller judges by its clock). A
    /// record that cannot be read is left out: it would only have kept a name the
    /// policy dropped on the licence a while longer.
    pub fn load_named(&self) -> Result<Vec<NamedSeat>, StoreError> {
        Ok(self
            .named_records()?
            .into_iter()
            .map(|(_, seat)| seat)
            .collect())
    }

    fn named_records(&self) -> Result<Vec<(sled::IVec, NamedSeat)>, StoreError> {
        let mut out = Vec::new();
        for item in self.named.iter() {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if let Ok(StoredNamedSeat::V1(seat)) = StoredNamedSeat::decode(&v) {
                out.push((k, seat));
            }
        }
        Ok(out)
    }

    /// The checkout queues' places, in order. A record that cannot be read is left
    /// out: its waiter joins at the end when it asks again.
    pub fn load_queue(&self) -> Result<Vec<QueuePlace>, StoreError> {
        let mut out = Vec::new();
        for item in self.queue.iter() {
            let (_, v) = item.map_err(|e| self.err(e))?;
            if let Ok(StoredPlace::V1(place)) = StoredPlace::decode(&v) {
                out.push(place);
            }
        }
        Ok(out)
    }

    /// The hold-offs after removals, ended or not (the caller judges by its clock). A
    /// record that cannot be read is left out: the hold-off is a courtesy to the next
    /// in line, not a limit the license sets.
    pub fn load_holdoffs(&self) -> Result<Vec<Holdoff>, StoreError> {
        Ok(self
            .holdoff_records()?
            .into_iter()
            .map(|(_, held)| held)
            .collect())
    }

    fn holdoff_records(&self) -> Result<Vec<(sled::IVec, Holdoff)>, StoreError> {
        let mut out = Vec::new();
        for item in self.holdoffs.iter() {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if let Ok(StoredHoldoff::V1(held)) = StoredHoldoff::decode(&v) {
                out.push((k, held));
            }
        }
        Ok(out)
    }

    /// Makes the store hold exactly `image` (a snapshot from the leader), not flushed.
    pub fn replace(&self, image: &StoreImage) -> Result<(), StoreError> {
        for tree in [
            &self.leases,
            &self.detached,
            &self.holdoffs,
            &self.queue,
            &self.named,
            &self.journal,
        ] {
            tree.clear().map_err(|e| self.err(e))?;
        }
        let mut named = sled::Batch::default();
        for seat in &image.named {
            named.insert(named_key(seat), StoredNamedSeat::V1(seat.clone()).encode());
        }
        self.named.apply_batch(named).map_err(|e| self.err(e))?;
        let mut queue = sled::Batch::default();
        for place in &image.queue {
            queue.insert(
                &place.seq.to_be_bytes(),
                StoredPlace::V1(place.clone()).encode(),
            );
        }
        self.queue.apply_batch(queue).map_err(|e| self.err(e))?;
        let mut holdoffs = sled::Batch::default();
        for held in &image.holdoffs {
            holdoffs.insert(holdoff_key(held), StoredHoldoff::V1(held.clone()).encode());
        }
        self.holdoffs
            .apply_batch(holdoffs)
            .map_err(|e| self.err(e))?;
        let mut leases = sled::Batch::default();
        for record in &image.leases {
            leases.insert(&key(record.id), StoredLease::V1(record.clone()).encode());
        }
        self.leases.apply_batch(leases).map_err(|e| self.err(e))?;
        let mut detached = sled::Batch::default();
        for (id, until) in &image.detached {
            detached.insert(&key(*id), StoredDeadline::V1(*until).encode());
        }
        self.detached
            .apply_batch(detached)
            .map_err(|e| self.err(e))?;
        self.append_journal(&image.journal)?;
        match image.clock {
            Some(clock) => self.save_clock(clock)?,
            None => {
                self.meta.remove(CLOCK_KEY).map_err(|e| self.err(e))?;
            }
        }
        self.save_report_state(&image.report)
    }

    /// The directory sled runs in (the store's own, or the copy a store on a volume
    /// that cannot be written is served from): the Raft log lives beside it.
    pub fn sled_dir(&self) -> &Path {
        &self.sled_dir
    }

    /// The index of the last Raft log entry written here (`None`: none yet, as in a
    /// store written before tallyd ran on Raft). An unreadable record counts as none:
    /// the log is then applied again from the snapshot, which writes the same records.
    pub fn applied_index(&self) -> Result<Option<u64>, StoreError> {
        let Some(bytes) = self.meta.get(APPLIED_KEY).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        Ok(match bytes.split_first() {
            Some((&APPLIED_V1, rest)) => <[u8; 8]>::try_from(rest).ok().map(u64::from_be_bytes),
            _ => None,
        })
    }

    /// Records that the log up to entry `index` is written here (not flushed: sled
    /// recovers a prefix of its writes, so after a crash the record never claims more
    /// than the store holds).
    pub fn save_applied(&self, index: u64) -> Result<(), StoreError> {
        let mut value = [0u8; 9];
        value[0] = APPLIED_V1;
        value[1..].copy_from_slice(&index.to_be_bytes());
        self.meta
            .insert(APPLIED_KEY, &value[..])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The error for a replicated `what` of a format this tallyd does not read.
    pub fn newer_format(&self, what: &'static str) -> StoreError {
        StoreError::NewerFormat {
            path: self.path.clone(),
            what,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_state_of_version_1_reads_with_the_bundles_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let old = tally_protocol::report::ReportStateV1 {
            report_seq: 3,
            last_event: 19,
            ..Default::default()
        };
        store
            .meta
            .insert(REPORT_KEY, StoredReportState::V1(old).encode())
            .unwrap();
        let state = store.report_state().unwrap();
        assert_eq!((state.report_seq, state.last_event), (3, 19));
        assert_eq!(state.bundles, None);
        // Saved again, it is version 2 and keeps what it knows.
        let known = ReportState {
            bundles: Some(vec![]),
            ..state
        };
        store.save_report_state(&known).unwrap();
        assert_eq!(store.report_state().unwrap(), known);
    }

    /// Opens a store that a `sled::Db` of this test just closed: sled lets go of its
    /// file lock only when its background flusher notices, up to ~0.5 s after the drop.
    fn open_after_sled(path: &Path) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(path) {
                Ok(store) => return store,
                Err(e)
                    if e.to_string().contains("lock") && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn new_stores_take_small_segments_and_old_stores_keep_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("fresh");
        drop(Store::open(&fresh).unwrap());
        assert_eq!(segment_size(&fresh), SEGMENT_SIZE);
        // A store made with sled's default segment size (as before) still opens.
        let old = dir.path().join("old");
        drop(sled::Config::new().path(&old).open().unwrap());
        assert_eq!(segment_size(&old), 512 * 1024);
        let store = open_after_sled(&old);
        store.apply(&[]).unwrap();
        store.flush_blocking().unwrap();
    }

    fn entries(seqs: std::ops::RangeInclusive<u64>) -> Vec<JournalEntry> {
        seqs.map(|seq| JournalEntry {
            seq,
            at: UnixTime(seq),
            event: tally_protocol::report::UsageEvent::DaemonStopped,
        })
        .collect()
    }

    fn seqs(entries: &[JournalEntry]) -> Vec<u64> {
        entries.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn journal_chunks_read_back_from_any_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.next_journal_seq().unwrap(), 1);
        store.append_journal(&entries(1..=600)).unwrap();
        store.append_journal(&entries(601..=610)).unwrap();
        // 600 entries in one call make ten chunks of at most 64, then one more.
        assert_eq!(store.journal.len(), 11);
        for item in store.journal.iter() {
            let (_, v) = item.unwrap();
            assert!(
                v.len() <= StoredJournalChunk::MAX_BYTES,
                "{} bytes",
                v.len()
            );
        }
        let (all, bad) = store.journal_after(0).unwrap();
        assert_eq!((seqs(&all), bad), ((1..=610).collect(), 0));
        // From the middle of a chunk.
        let (rest, _) = store.journal_after(300).unwrap();
        assert_eq!(seqs(&rest), (301..=610).collect::<Vec<_>>());
        assert!(store.journal_after(610).unwrap().0.is_empty());
        assert_eq!(store.next_journal_seq().unwrap(), 611);
        // Entries written again after a store failure overlap; each is read once.
        store.append_journal(&entries(605..=620)).unwrap();
        let (all, _) = store.journal_after(0).unwrap();
        assert_eq!(seqs(&all), (1..=620).collect::<Vec<_>>());
        assert_eq!(store.next_journal_seq().unwrap(), 621);
    }

    #[test]
    fn a_backlog_written_over_older_chunks_keeps_its_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // Before the failure: two batches reached the disk, 100..=110 and 280..=290.
        store.append_journal(&entries(100..=110)).unwrap();
        store.append_journal(&entries(280..=290)).unwrap();
        // After it, the backlog 100..=300 goes in again, as chunks keyed 100, 164, 228
        // and 292: the old chunk at 280 now sits among them, holding lower numbers than
        // the one keyed 228 before it.
        store.append_journal(&entries(100..=300)).unwrap();
        assert_eq!(store.next_journal_seq().unwrap(), 301);
        let (all, bad) = store.journal_after(0).unwrap();
        assert_eq!((seqs(&all), bad), ((100..=300).collect(), 0));
        assert_eq!(
            seqs(&store.journal_after(285).unwrap().0),
            (286..=300).collect::<Vec<_>>()
        );
    }

    #[test]
    fn journal_pages_stay_in_the_log_and_out_of_unsynced_blob_files() {
        // sled writes a node over a quarter of a segment to a blob file of its own and
        // does not fsync it; chunks are sized so that journal leaves never get there.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut seq = 0;
        for batch in 0..200u64 {
            let entries: Vec<JournalEntry> = (0..128)
                .map(|i| {
                    seq += 1;
                    JournalEntry {
                        seq,
                        at: UnixTime(1_800_000_000 + seq),
                        event: tally_protocol::report::UsageEvent::Granted {
                            lease: LeaseId(batch * 128 + i),
                            feature: "solver-professional".into(),
                            count: 1,
                            overdraft: false,
                            user: format!("engineer-{i:04}"),
                            host: format!("workstation-{batch:04}.eng.example.com"),
                            borrowed_until: None,
                        },
                    }
                })
                .collect();
            store.append_journal(&entries).unwrap();
            store.flush_blocking().unwrap();
        }
        assert_eq!(store.journal_after(0).unwrap().0.len(), 200 * 128);
        let blobs: Vec<_> = std::fs::read_dir(dir.path().join("blobs"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(blobs.is_empty(), "blob files: {blobs:?}");
    }

    #[test]
    fn journal_compaction_removes_whole_chunks_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.append_journal(&entries(1..=600)).unwrap();
        // Exported up to 300: chunks up to 256 go; 257..=300 wait beside 301..=320.
        assert_eq!(store.compact_journal(300, UnixTime(u64::MAX)).unwrap(), 256);
        assert_eq!(
            seqs(&store.journal_after(0).unwrap().0),
            (257..=600).collect::<Vec<_>>()
        );
        assert_eq!(
            seqs(&store.journal_after(300).unwrap().0),
            (301..=600).collect::<Vec<_>>()
        );
        // Retention: a chunk holding anything at or after `before` stays whole, and
        // so does everything after it (449..=512 holds 500).
        assert_eq!(store.compact_journal(600, UnixTime(500)).unwrap(), 192);
        assert_eq!(
            seqs(&store.journal_after(0).unwrap().0),
            (449..=600).collect::<Vec<_>>()
        );
        assert_eq!(store.compact_journal(600, UnixTime(601)).unwrap(), 152);
        assert!(store.journal_after(0).unwrap().0.is_empty());
        // Numbering goes on from the report state when the journal is empty.
        let state = ReportState {
            last_event: 600,
            ..ReportState::default()
        };
        store.save_report_state(&state).unwrap();
        assert_eq!(store.next_journal_seq().unwrap(), 601);
    }

    #[test]
    fn a_damaged_chunk_is_counted_and_not_renumbered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.append_journal(&entries(1..=10)).unwrap();
        store
            .journal
            .insert(11u64.to_be_bytes(), &b"garbage"[..])
            .unwrap();
        let (all, bad) = store.journal_after(0).unwrap();
        assert_eq!((seqs(&all), bad), ((1..=10).collect(), 1));
        // Counted once: a later read from past its key does not count it again.
        assert_eq!(store.journal_after(11).unwrap().1, 0);
        // Compaction keeps it while it may hold a number past what was exported.
        assert_eq!(store.compact_journal(11, UnixTime(u64::MAX)).unwrap(), 10);
        assert_eq!(store.journal.len(), 1);
        // The damaged chunk may have held up to MAX_ENTRIES numbers; none is reused.
        assert_eq!(
            store.next_journal_seq().unwrap(),
            11 + StoredJournalChunk::MAX_ENTRIES as u64
        );
    }

    #[test]
    fn a_journal_of_single_entries_is_converted_to_chunks() {
        let dir = tempfile::tempdir().unwrap();
        {
            // A store as written before chunks: one value per entry, one of them damaged.
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let old = db.open_tree(JOURNAL_TREE_V1).unwrap();
            for e in entries(1..=300) {
                let value = if e.seq == 100 {
                    b"garbage".to_vec()
                } else {
                    StoredJournal::V1(e.clone()).encode()
                };
                old.insert(e.seq.to_be_bytes(), value).unwrap();
            }
            db.flush().unwrap();
        }
        let expected: Vec<u64> = (1..=300).filter(|s| *s != 100).collect();
        for _ in 0..2 {
            let store = open_after_sled(dir.path());
            assert!(!store
                .db
                .tree_names()
                .iter()
                .any(|n| n == JOURNAL_TREE_V1.as_bytes()));
            // The damaged entry is still there, counted, under its own number.
            let (all, bad) = store.journal_after(0).unwrap();
            assert_eq!((seqs(&all), bad), (expected.clone(), 1));
            // 1..=99 in two chunks, the damaged entry, 101..=300 in four.
            assert_eq!(store.journal.len(), 7);
            assert_eq!(store.next_journal_seq().unwrap(), 301);
        }
    }
}

#[cfg(test)]
mod leftovers {
    use super::*;

    /// A store with journal entries 1..=300 and a clock mark, closed.
    fn written_store(dir: &Path) {
        let store = Store::open(dir).unwrap();
        let entries: Vec<JournalEntry> = (1..=300)
            .map(|seq| JournalEntry {
                seq,
                at: UnixTime(seq),
                event: tally_protocol::report::UsageEvent::DaemonStopped,
            })
            .collect();
        store.append_journal(&entries).unwrap();
        store.save_clock(UnixTime(77)).unwrap();
        store.flush_blocking().unwrap();
    }

    fn quarantined(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.join(QUARANTINE_DIR))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    fn check_contents(store: &Store) {
        let (entries, bad) = store.journal_after(0).unwrap();
        assert_eq!((entries.len(), bad), (300, 0));
        assert_eq!(store.load_clock().unwrap(), Some(UnixTime(77)));
    }

    fn snapshots(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("snap.")
            })
            .collect()
    }

    /// The store that never opened again: a crash (or a failed start) on a full
    /// disk left the 0-byte file sled writes a snapshot into before renaming it.
    #[test]
    fn an_empty_generating_snapshot_is_set_aside_and_the_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        written_store(dir.path());
        let leftover = dir.path().join("snap.FFFFFFFFFFFFFFF0.generating");
        std::fs::write(&leftover, b"").unwrap();
        let store = open_after_close(dir.path());
        check_contents(&store);
        assert!(!leftover.exists());
        let moved = quarantined(dir.path());
        assert_eq!(moved.len(), 1, "{moved:?}");
        assert!(
            moved[0].ends_with("-snap.FFFFFFFFFFFFFFF0.generating"),
            "{moved:?}"
        );
    }

    /// A complete-looking snapshot cut short (or damaged) fails its checksum: it goes
    /// aside and sled rebuilds its page table from the log.
    #[test]
    fn a_damaged_snapshot_is_set_aside_and_the_store_rebuilds_from_its_log() {
        let dir = tempfile::tempdir().unwrap();
        written_store(dir.path());
        // sled writes a snapshot at every open.
        drop(open_after_close(dir.path()));
        let snaps = snapshots(dir.path());
        assert!(!snaps.is_empty(), "sled wrote no snapshot");
        for snap in &snaps {
            let bytes = std::fs::read(snap).unwrap();
            std::fs::write(snap, &bytes[..bytes.len() / 2]).unwrap();
        }
        let store = open_after_close(dir.path());
        check_contents(&store);
        assert_eq!(quarantined(dir.path()).len(), snaps.len());
        // A good snapshot stays where it is.
        drop(store);
        let before = quarantined(dir.path());
        let store = open_after_close(dir.path());
        check_contents(&store);
        assert_eq!(quarantined(dir.path()), before);
    }

    /// Opens a store a handle of this test just dropped (sled lets go of its lock when
    /// its flusher thread notices).
    fn open_after_close(path: &Path) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(path) {
                Ok(store) => return store,
                Err(e)
                    if e.to_string().contains("lock") && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}
