//! The seat store: sled behind one small module.
//!
//! Only this module knows sled exists. It keeps leases (key: lease id, big-endian; value:
//! an encoded, versioned [`StoredLease`]) and gives the shell three operations: load at
//! start, apply a batch of ledger events, flush. The shell applies a whole batch of
//! grants and then flushes once (group commit), so many concurrent checkouts share one
//! fsync while each grant is still durable before its client hears about it.

use crate::ledger::Event;
use std::path::{Path, PathBuf};
use tally_protocol::lease::{LeaseId, LeaseRecord, StoredClock, StoredLease};
use tally_protocol::report::{JournalEntry, ReportState, StoredJournal, StoredReportState};
use tally_protocol::time::UnixTime;

/// Key of the clock high-water mark in the meta tree.
const CLOCK_KEY: &[u8] = b"clock-high-water";
/// Key of the report chain state in the meta tree.
const REPORT_KEY: &[u8] = b"report-state";

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
    /// The store's files are not there (a volume not mounted, a directory removed).
    #[error("seat store {path}: its files are missing (is its volume mounted?)")]
    Missing {
        /// The store directory.
        path: PathBuf,
    },
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
    meta: sled::Tree,
    journal: sled::Tree,
    /// sled's log file, opened again for fdatasync (see [`Store::flush`]).
    log: std::sync::Arc<std::fs::File>,
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.to_path_buf();
        let err = |cause| StoreError::Sled {
            path: path.clone(),
            cause,
        };
        let db = sled::Config::new()
            .path(dir)
            // The default 1 GiB page cache is sized for databases, not for a seat table.
            .cache_capacity(64 * 1024 * 1024)
            .segment_size(segment_size(dir))
            .open()
            .map_err(err)?;
        let leases = db.open_tree("leases/v1").map_err(err)?;
        let meta = db.open_tree("meta/v1").map_err(err)?;
        let journal = db.open_tree("journal/v1").map_err(err)?;
        let io = |source: std::io::Error| StoreError::Sled {
            path: path.clone(),
            cause: sled::Error::Io(source),
        };
        let log = std::fs::File::open(dir.join("db")).map_err(io)?;
        // The store's directory entries, once, so that a new store survives a power cut.
        sync_dir(dir).map_err(io)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent).map_err(io)?;
        }
        Ok(Store {
            path,
            db,
            leases,
            meta,
            journal,
            log: std::sync::Arc::new(log),
        })
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
        let last = self.journal.last().map_err(|e| self.err(e))?;
        let from_journal = last.map(|(k, _)| seq_of(&k) + 1).unwrap_or(1);
        // A compacted journal may be empty; the report state remembers how far it went.
        let from_state = self.report_state()?.last_event + 1;
        Ok(from_journal.max(from_state))
    }

    /// Appends journal entries (not yet flushed).
    pub fn append_journal(&self, entries: &[JournalEntry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for e in entries {
            batch.insert(&e.seq.to_be_bytes(), StoredJournal::V1(e.clone()).encode());
        }
        self.journal.apply_batch(batch).map_err(|e| self.err(e))
    }

    /// Journal entries after `after`, in order; undecodable ones are skipped and counted.
    pub fn journal_after(&self, after: u64) -> Result<(Vec<JournalEntry>, usize), StoreError> {
        let mut out = Vec::new();
        let mut bad = 0;
        for item in self.journal.range((after + 1).to_be_bytes()..) {
            let (_, v) = item.map_err(|e| self.err(e))?;
            match StoredJournal::decode(&v) {
                Ok(StoredJournal::V1(e)) => out.push(e),
                _ => bad += 1,
            }
        }
        Ok((out, bad))
    }

    /// Deletes exported entries up to `upto` that happened before `before`.
    pub fn compact_journal(&self, upto: u64, before: UnixTime) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in self.journal.range(..=upto.to_be_bytes()) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if let Ok(StoredJournal::V1(e)) = StoredJournal::decode(&v) {
                if e.at >= before {
                    break;
                }
            }
            batch.remove(k);
            n += 1;
        }
        self.journal.apply_batch(batch).map_err(|e| self.err(e))?;
        Ok(n)
    }

    /// The report chain state.
    pub fn report_state(&self) -> Result<ReportState, StoreError> {
        Ok(match self.meta.get(REPORT_KEY).map_err(|e| self.err(e))? {
            Some(bytes) => match StoredReportState::decode(&bytes) {
                Ok(StoredReportState::V1(s)) => s,
                _ => ReportState::default(),
            },
            None => ReportState::default(),
        })
    }

    /// Records the report chain state (not yet flushed).
    pub fn save_report_state(&self, state: &ReportState) -> Result<(), StoreError> {
        self.meta
            .insert(REPORT_KEY, StoredReportState::V1(state.clone()).encode())
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
            .map_err(|e| self.err(sled::Error::Io(std::io::Error::other(e))))?
    }

    /// Flushes synchronously; for shutdown paths outside the runtime.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| self.err(e))?;
        // sled 0.34 ends a flush with sync_file_range on Linux, which writes the data
        // but not the metadata that finds it (file size, new extents); its own fsync
        // comes from a background thread up to 500 ms later. A grant acknowledged in
        // that window was lost when the file system failed under us (the read-only
        // volume test). fdatasync on our own descriptor of the same file closes it.
        self.log
            .sync_data()
            .map_err(|e| self.err(sled::Error::Io(e)))
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

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn seq_of(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = key.len().min(8);
    b[8 - n..].copy_from_slice(&key[..n]);
    u64::from_be_bytes(b)
}

fn key(id: LeaseId) -> [u8; 8] {
    id.0.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let store = Store::open(&old).unwrap();
        store.apply(&[]).unwrap();
        store.flush_blocking().unwrap();
    }
}
