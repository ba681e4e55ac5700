//! openraft's storage (storage-v2) over sled: the Raft log and vote ([`LogStore`]), and
//! the state machine with its snapshots ([`StateMachine`]), generic over the type config.
//!
//! # What is durable, and why
//!
//! - **The log, the vote, the purge point and the committed id** live in one sled
//!   database in the store directory (trees `raft-log/v1`, `raft-meta/v1`). Raft's safety
//!   rests on the log and the vote surviving a crash once acknowledged, so `append` calls
//!   openraft's `LogFlushed` callback and `save_vote` returns only after
//!   [`crate::durable::flush`] (sled's flush, then fdatasync of sled's log file: sled 0.34
//!   alone leaves its fsync to a thread up to 500 ms later). One flusher thread per store
//!   does that for every waiting append and vote at once (group commit), in order.
//!   `truncate` and `purge` flush too (rare: conflicts, compaction). The committed id is
//!   written without a flush of its own: it is durable with the next append or vote, and
//!   an older committed id after a crash only means fewer entries re-applied at start
//!   (openraft learns the rest from the leader).
//! - **The latest snapshot** is a file of its own, `raft-snapshot` in the store
//!   directory, written whole (temp file, fsync, rename, directory fsync). Not a sled
//!   value: sled puts a value over a quarter of a segment into a blob file it never
//!   fsyncs, and a ledger snapshot is that large.
//! - **The applied state is not persisted here.** It is rebuilt at open from the
//!   snapshot ([`Apply::restore`]), and openraft re-applies the committed entries after
//!   it from the log when the node starts (it reads the committed id back for that).
//!   Persisting it per entry would cost a second write and fsync per command on the
//!   grant path; snapshots bound the replay. An application that keeps its own state on
//!   disk (tallyd's seat store) may record how far it applied, unflushed, and skip what
//!   it already holds (see [`Apply::restore`]).
//!
//! Every record carries a format version (an enum tag, `V1`); a record with a tag this
//! build does not know is a [`StoreError::Decode`] naming the tree (or file) and key.

use crate::durable;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, RaftTypeConfig, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership, Vote,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

/// The log tree: key = log index (big-endian u64), value = [`StoredEntry`].
pub const LOG_TREE: &str = "raft-log/v1";
/// The meta tree: vote, committed id, purge point.
pub const META_TREE: &str = "raft-meta/v1";
/// The snapshot file in the store directory.
pub const SNAPSHOT_FILE: &str = "raft-snapshot";

/// The text of sled 0.34's error when its lock on the store is held.
const SLED_LOCK_ERROR: &str = "could not acquire lock on";

const VOTE_KEY: &[u8] = b"vote";
const COMMITTED_KEY: &[u8] = b"committed";
const PURGED_KEY: &[u8] = b"last-purged";

/// Decoding bound of a log entry or meta record: a damaged length prefix must not make us
/// allocate gigabytes.
const MAX_RECORD: usize = 64 << 20;
/// Decoding bound of the snapshot file.
const MAX_SNAPSHOT: usize = 1 << 30;

/// A log entry as stored. The entry is openraft's, carrying our command.
#[derive(Serialize, Deserialize)]
pub enum StoredEntry<E> {
    /// Format version 1.
    V1(E),
}

/// A record of the meta tree (vote, committed id, purge point) as stored.
#[derive(Serialize, Deserialize)]
pub enum StoredMeta<T> {
    /// Format version 1.
    V1(T),
}

/// The snapshot file's content.
#[derive(Serialize, Deserialize)]
pub enum StoredSnapshot<M, D> {
    /// Format version 1: openraft's snapshot meta and the application's snapshot bytes.
    V1 {
        /// Last log id and membership the snapshot includes, and its id.
        meta: M,
        /// [`Apply::snapshot`]'s bytes.
        data: D,
    },
}

/// Why the store failed; the text names the store's directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// sled reported an error.
    #[error("raft store {path}: {cause}")]
    Sled {
        /// The store directory.
        path: PathBuf,
        /// sled's error.
        cause: sled::Error,
    },
    /// Another handle (another process, or one of this process not yet let go of) holds
    /// sled's lock on the store: sled keeps one opener per store.
    #[error("raft store {path}: its lock is held by another process or handle")]
    InUse {
        /// The store directory.
        path: PathBuf,
    },
    /// A file operation (snapshot file, fdatasync) failed.
    #[error("raft store {path}: {cause}")]
    Io {
        /// The store directory.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// A record cannot be decoded (damaged, or written by a later format version).
    #[error("raft store {path}: {tree} key {key}: cannot decode the record: {cause}")]
    Decode {
        /// The store directory.
        path: PathBuf,
        /// The sled tree, or the snapshot file.
        tree: &'static str,
        /// The key, readable (a log index as a number).
        key: String,
        /// What bincode found wrong.
        cause: CodecError,
    },
    /// A record cannot be encoded (a command type that bincode's serde support cannot
    /// write, such as a sequence of unknown length).
    #[error("raft store {path}: {what}: cannot encode the record: {cause}")]
    Encode {
        /// The store directory.
        path: PathBuf,
        /// What was being written.
        what: String,
        /// bincode's reason.
        cause: CodecError,
    },
    /// The application refused the snapshot's bytes ([`Apply::restore`]).
    #[error("raft store {path}: the snapshot cannot be restored: {cause}")]
    Restore {
        /// The store directory.
        path: PathBuf,
        /// The application's reason.
        cause: String,
    },
    /// The flusher thread is gone (it ends only when the store is dropped).
    #[error("raft store {path}: the flusher thread has stopped")]
    FlusherGone {
        /// The store directory.
        path: PathBuf,
    },
}

/// The application behind the state machine: the ledger in tallyd, a map in tests.
///
/// Applying must be deterministic and read no clock: every node applies the same entries
/// and must reach the same state (the leader stamps time into the commands).
pub trait Apply<C: RaftTypeConfig>: Send + Sync + 'static {
    /// Why a command cannot be applied or a snapshot restored (the application's own
    /// error type). An application that keeps its state on disk fails when the disk
    /// does; openraft then stops this node's Raft (a storage error is fatal to it).
    type Error: std::error::Error + Send + Sync + 'static;
    /// Applies one committed command at `log_id`, giving the answer for its proposer.
    fn apply(&mut self, log_id: &LogId<C::NodeId>, command: &C::D) -> Result<C::R, Self::Error>;
    /// The answer for an entry without a command (blank, membership change). An
    /// application that records how far it has applied records `log_id` here too.
    fn no_command(&mut self, log_id: &LogId<C::NodeId>) -> Result<C::R, Self::Error>;
    /// The whole state, encoded (with a format version of its own).
    fn snapshot(&self) -> Result<Vec<u8>, Self::Error>;
    /// Replaces the whole state with a snapshot's, which includes the log up to `last`;
    /// the error says why it cannot. An application whose own state is durable and
    /// already includes `last` (it records how far it applied) may keep its state:
    /// what it holds beyond the log (written while the node was stopped) then survives,
    /// and the entries after `last` are applied again on top of it.
    fn restore(
        &mut self,
        last: Option<&LogId<C::NodeId>>,
        snapshot: &[u8],
    ) -> Result<(), Self::Error>;
}

/// What a storage-v2 type config must be for this store: openraft's entry (so the state
/// machine can read the payload) and snapshots as bytes in memory.
pub trait StoreConfig: RaftTypeConfig<Entry = Entry<Self>, SnapshotData = Cursor<Vec<u8>>> {}
impl<C> StoreConfig for C where C: RaftTypeConfig<Entry = Entry<C>, SnapshotData = Cursor<Vec<u8>>> {}

/// Opens (or creates) the Raft store in `dir`: the log store and the state machine,
/// with `app` restored from the latest snapshot if there is one.
pub fn open<C: StoreConfig, A: Apply<C>>(
    dir: &Path,
    mut app: A,
) -> Result<(LogStore<C>, StateMachine<C, A>), StoreError> {
    let path = dir.to_path_buf();
    let sled_err = |cause| match cause {
        sled::Error::Io(e) if e.to_string().contains(SLED_LOCK_ERROR) => {
            StoreError::InUse { path: path.clone() }
        }
        cause => StoreError::Sled {
            path: path.clone(),
            cause,
        },
    };
    let io_err = |cause| StoreError::Io {
        path: path.clone(),
        cause,
    };
    let db = sled::Config::new()
        .path(dir)
        // sled's 1 GiB default page cache is sized for databases; the log is written at
        // its tail and read back by replication shortly after (as the seat store).
        .cache_capacity(8 * 1024 * 1024)
        .open()
        .map_err(sled_err)?;
    let log = db.open_tree(LOG_TREE).map_err(sled_err)?;
    let meta = db.open_tree(META_TREE).map_err(sled_err)?;
    let file = durable::open_log_file(dir).map_err(io_err)?;
    durable::sync_dir(dir).map_err(io_err)?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        durable::sync_dir(parent).map_err(io_err)?;
    }
    let trees = Trees {
        path: path.clone(),
        log,
        meta,
    };
    // A purge removes the entries after recording its point; a crash between the two
    // leaves entries at or below the point, which are not part of the log any more.
    if let Some(purged) = trees.read_meta::<LogId<C::NodeId>>(PURGED_KEY)? {
        let mut batch = sled::Batch::default();
        for key in trees.log.range(..=index_key(purged.index)).keys() {
            batch.remove(key.map_err(sled_err)?);
        }
        trees.log.apply_batch(batch).map_err(sled_err)?;
    }

    let snapshots = Arc::new(SnapshotFile::<C> {
        path: path.clone(),
        current: Mutex::new(None),
    });
    let mut last_applied = None;
    let mut membership = StoredMembership::default();
    if let Some((meta, data)) = snapshots.load()? {
        app.restore(meta.last_log_id.as_ref(), &data)
            .map_err(|cause| StoreError::Restore {
                path: path.clone(),
                cause: cause.to_string(),
            })?;
        last_applied = meta.last_log_id.clone();
        membership = meta.last_membership.clone();
        *snapshots
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((meta, data));
    }

    let (jobs, rx) = mpsc::channel::<Job<C>>();
    let flushes = Arc::new(AtomicU64::new(0));
    let flusher = Flusher {
        db: db.clone(),
        file,
        dir: dir.to_path_buf(),
        flushes: flushes.clone(),
    };
    std::thread::Builder::new()
        .name("raft-flusher".into())
        .spawn(move || flusher.run(rx))
        .map_err(io_err)?;

    let store = LogStore {
        trees,
        db,
        jobs,
        flushes,
    };
    let sm = StateMachine {
        app,
        last_applied,
        membership,
        snapshots,
        path,
    };
    Ok((store, sm))
}

/// The trees the log store reads and writes; cloned into log readers.
#[derive(Clone)]
struct Trees {
    path: PathBuf,
    log: sled::Tree,
    meta: sled::Tree,
}

impl Trees {
    fn sled_err(&self, cause: sled::Error) -> StoreError {
        StoreError::Sled {
            path: self.path.clone(),
            cause,
        }
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        let Some(bytes) = self.meta.get(key).map_err(|e| self.sled_err(e))? else {
            return Ok(None);
        };
        let StoredMeta::V1(value) =
            decode::<StoredMeta<T>, MAX_RECORD>(&bytes).map_err(|cause| StoreError::Decode {
                path: self.path.clone(),
                tree: META_TREE,
                key: String::from_utf8_lossy(key).into_owned(),
                cause,
            })?;
        Ok(Some(value))
    }

    fn write_meta<T: Serialize>(&self, key: &[u8], value: &T) -> Result<(), StoreError> {
        let bytes = encode(&StoredMeta::V1(value)).map_err(|cause| StoreError::Encode {
            path: self.path.clone(),
            what: format!("{META_TREE} key {}", String::from_utf8_lossy(key)),
            cause,
        })?;
        self.meta.insert(key, bytes).map_err(|e| self.sled_err(e))?;
        Ok(())
    }

    fn entries<C: StoreConfig>(
        &self,
        range: impl RangeBounds<u64>,
    ) -> Result<Vec<Entry<C>>, StoreError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => Bound::Included(index_key(i)),
            Bound::Excluded(&i) => Bound::Excluded(index_key(i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => Bound::Included(index_key(i)),
            Bound::Excluded(&i) => Bound::Excluded(index_key(i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in self.log.range::<[u8; 8], _>((start, end)) {
            let (key, value) = item.map_err(|e| self.sled_err(e))?;
            out.push(self.decode_entry::<C>(&key, &value)?);
        }
        Ok(out)
    }

    fn decode_entry<C: StoreConfig>(
        &self,
        key: &[u8],
        value: &[u8],
    ) -> Result<Entry<C>, StoreError> {
        let StoredEntry::V1(entry) =
            decode::<StoredEntry<Entry<C>>, MAX_RECORD>(value).map_err(|cause| {
                StoreError::Decode {
                    path: self.path.clone(),
                    tree: LOG_TREE,
                    key: index_of(key),
                    cause,
                }
            })?;
        Ok(entry)
    }
}

/// The Raft log and vote ([`RaftLogStorage`]).
pub struct LogStore<C: StoreConfig> {
    trees: Trees,
    db: sled::Db,
    jobs: mpsc::Sender<Job<C>>,
    /// Flushes done by the flusher thread (each covering every write before it).
    flushes: Arc<AtomicU64>,
}

impl<C: StoreConfig> LogStore<C> {
    /// Waits until everything written so far is on disk (through the flusher, in order).
    async fn flushed(&self) -> Result<(), StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let gone = || StoreError::FlusherGone {
            path: self.trees.path.clone(),
        };
        self.jobs.send(Job::Wait(tx)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?.map_err(|e| StoreError::Io {
            path: self.trees.path.clone(),
            cause: e,
        })
    }

    /// How many flushes have made the log durable so far: a flush covers every append
    /// and vote waiting for it (group commit), so appends per flush is the batching.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Bytes the store's sled database takes on disk (the snapshot file not counted).
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db.size_on_disk().map_err(|e| self.trees.sled_err(e))
    }
}

/// A reader of the log for openraft's replication tasks.
pub struct LogReader<C: StoreConfig> {
    trees: Trees,
    _c: std::marker::PhantomData<C>,
}

impl<C: StoreConfig> RaftLogReader<C> for LogReader<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<C::NodeId>> {
        self.trees.entries::<C>(range).map_err(read_logs)
    }
}

impl<C: StoreConfig> RaftLogReader<C> for LogStore<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<C::NodeId>> {
        self.trees.entries::<C>(range).map_err(read_logs)
    }
}

impl<C: StoreConfig> RaftLogStorage<C> for LogStore<C> {
    type LogReader = LogReader<C>;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<C::NodeId>> {
        let last_purged_log_id = self
            .trees
            .read_meta::<LogId<C::NodeId>>(PURGED_KEY)
            .map_err(read_logs)?;
        let last = match self.trees.log.last() {
            Ok(Some((key, value))) => Some(
                self.trees
                    .decode_entry::<C>(&key, &value)
                    .map_err(read_logs)?
                    .log_id,
            ),
            Ok(None) => None,
            Err(e) => return Err(read_logs(self.trees.sled_err(e))),
        };
        Ok(LogState {
            last_log_id: last.or(last_purged_log_id.clone()),
            last_purged_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        LogReader {
            trees: self.trees.clone(),
            _c: std::marker::PhantomData,
        }
    }

    async fn save_vote(&mut self, vote: &Vote<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        let write = |e: StoreError| StorageIOError::write_vote(AnyError::new(&e)).into();
        self.trees.write_meta(VOTE_KEY, vote).map_err(write)?;
        self.flushed().await.map_err(write)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<C::NodeId>>, StorageError<C::NodeId>> {
        self.trees
            .read_meta(VOTE_KEY)
            .map_err(|e| StorageIOError::read_vote(AnyError::new(&e)).into())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<C::NodeId>>,
    ) -> Result<(), StorageError<C::NodeId>> {
        // Durable with the next flush (see the module doc).
        self.trees
            .write_meta(COMMITTED_KEY, &committed)
            .map_err(|e| StorageIOError::write(AnyError::new(&e)).into())
    }

    async fn read_committed(
        &mut self,
    ) -> Result<Option<LogId<C::NodeId>>, StorageError<C::NodeId>> {
        self.trees
            .read_meta::<Option<LogId<C::NodeId>>>(COMMITTED_KEY)
            .map(Option::flatten)
            .map_err(|e| StorageIOError::read(AnyError::new(&e)).into())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<C>,
    ) -> Result<(), StorageError<C::NodeId>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let index = entry.log_id.index;
            let bytes = encode(&StoredEntry::V1(&entry)).map_err(|cause| {
                write_logs(StoreError::Encode {
                    path: self.trees.path.clone(),
                    what: format!("{LOG_TREE} key {index}"),
                    cause,
                })
            })?;
            batch.insert(&index_key(index), bytes);
        }
        // Readable as soon as applied to the tree; on disk once the flusher says so.
        self.trees
            .log
            .apply_batch(batch)
            .map_err(|e| write_logs(self.trees.sled_err(e)))?;
        self.jobs.send(Job::Log(callback)).map_err(|_| {
            write_logs(StoreError::FlusherGone {
                path: self.trees.path.clone(),
            })
        })
    }

    async fn truncate(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        let mut batch = sled::Batch::default();
        for key in self.trees.log.range(index_key(log_id.index)..).keys() {
            batch.remove(key.map_err(|e| write_logs(self.trees.sled_err(e)))?);
        }
        self.trees
            .log
            .apply_batch(batch)
            .map_err(|e| write_logs(self.trees.sled_err(e)))?;
        self.flushed().await.map_err(write_logs)
    }

    async fn purge(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        // The point first: the log then starts after it even if the removal is cut short
        // (the leftovers are removed at the next open).
        self.trees
            .write_meta(PURGED_KEY, &log_id)
            .map_err(write_logs)?;
        let mut batch = sled::Batch::default();
        for key in self.trees.log.range(..=index_key(log_id.index)).keys() {
            batch.remove(key.map_err(|e| write_logs(self.trees.sled_err(e)))?);
        }
        self.trees
            .log
            .apply_batch(batch)
            .map_err(|e| write_logs(self.trees.sled_err(e)))?;
        self.flushed().await.map_err(write_logs)
    }
}

/// The state machine ([`RaftStateMachine`]): the application, what it has applied, and
/// the latest snapshot.
pub struct StateMachine<C: StoreConfig, A> {
    app: A,
    last_applied: Option<LogId<C::NodeId>>,
    membership: StoredMembership<C::NodeId, C::Node>,
    snapshots: Arc<SnapshotFile<C>>,
    path: PathBuf,
}

impl<C: StoreConfig, A: Apply<C>> StateMachine<C, A> {
    /// The application, to read its state (the leader decides on it).
    pub fn app(&self) -> &A {
        &self.app
    }
}

impl<C: StoreConfig, A: Apply<C>> RaftStateMachine<C> for StateMachine<C, A> {
    type SnapshotBuilder = SnapshotBuilder<C>;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<C::NodeId>>,
            StoredMembership<C::NodeId, C::Node>,
        ),
        StorageError<C::NodeId>,
    > {
        Ok((self.last_applied.clone(), self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<C::R>, StorageError<C::NodeId>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut answers = Vec::new();
        for entry in entries {
            let log_id = entry.log_id;
            let answer = match &entry.payload {
                EntryPayload::Normal(command) => self.app.apply(&log_id, command),
                EntryPayload::Blank => self.app.no_command(&log_id),
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(log_id.clone()), m.clone());
                    self.app.no_command(&log_id)
                }
            }
            .map_err(|e| StorageIOError::apply(log_id.clone(), AnyError::new(&e)))?;
            self.last_applied = Some(log_id);
            answers.push(answer);
        }
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // A copy of the state now: the state machine goes on applying meanwhile.
        SnapshotBuilder {
            data: self.app.snapshot().map_err(|e| AnyError::new(&e)),
            last_applied: self.last_applied.clone(),
            membership: self.membership.clone(),
            snapshots: self.snapshots.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<C::NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<C::NodeId, C::Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<C::NodeId>> {
        let data = snapshot.into_inner();
        let failed = |e: StoreError| {
            StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e))
        };
        self.app
            .restore(meta.last_log_id.as_ref(), &data)
            .map_err(|cause| {
                failed(StoreError::Restore {
                    path: self.path.clone(),
                    cause: cause.to_string(),
                })
            })?;
        self.snapshots
            .save(meta.clone(), Arc::new(data), true)
            .await
            .map_err(failed)?;
        self.last_applied = meta.last_log_id.clone();
        self.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<C>>, StorageError<C::NodeId>> {
        let current = self
            .snapshots
            .current
            .lock()
            .expect("snapshot lock")
            .clone();
        Ok(current.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data.as_ref().clone())),
        }))
    }
}

/// Builds a snapshot from a copy of the state machine taken by `get_snapshot_builder`.
pub struct SnapshotBuilder<C: StoreConfig> {
    /// The application's bytes, or why it could not give them.
    data: Result<Vec<u8>, AnyError>,
    last_applied: Option<LogId<C::NodeId>>,
    membership: StoredMembership<C::NodeId, C::Node>,
    snapshots: Arc<SnapshotFile<C>>,
}

impl<C: StoreConfig> RaftSnapshotBuilder<C> for SnapshotBuilder<C> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<C>, StorageError<C::NodeId>> {
        let snapshot_id = match &self.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last_applied.clone(),
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let data = std::mem::replace(&mut self.data, Ok(Vec::new()))
            .map_err(StorageIOError::read_state_machine)?;
        let data = Arc::new(data);
        self.snapshots
            .save(meta.clone(), data.clone(), false)
            .await
            .map_err(|e| {
                StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e))
            })?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data.as_ref().clone())),
        })
    }
}

/// openraft's snapshot meta for the type config `C`.
type Meta<C> = SnapshotMeta<<C as RaftTypeConfig>::NodeId, <C as RaftTypeConfig>::Node>;
/// The current snapshot: its meta and the application's bytes.
type Current<C> = Option<(Meta<C>, Arc<Vec<u8>>)>;

/// The snapshot file, and the latest snapshot in memory.
struct SnapshotFile<C: StoreConfig> {
    path: PathBuf,
    current: Mutex<Current<C>>,
}

impl<C: StoreConfig> SnapshotFile<C> {
    fn load(&self) -> Result<Current<C>, StoreError> {
        let file = self.path.join(SNAPSHOT_FILE);
        let bytes = match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(cause) => {
                return Err(StoreError::Io {
                    path: self.path.clone(),
                    cause,
                })
            }
        };
        let StoredSnapshot::V1 { meta, data } = decode::<
            StoredSnapshot<SnapshotMeta<C::NodeId, C::Node>, Vec<u8>>,
            MAX_SNAPSHOT,
        >(&bytes)
        .map_err(|cause| StoreError::Decode {
            path: self.path.clone(),
            tree: SNAPSHOT_FILE,
            key: "(whole file)".into(),
            cause,
        })?;
        Ok(Some((meta, Arc::new(data))))
    }

    /// Writes the snapshot whole and makes it the current one. A built snapshot
    /// (`install` false) older than the current one is not written: a snapshot installed
    /// from the leader meanwhile stays.
    async fn save(
        self: &Arc<Self>,
        meta: SnapshotMeta<C::NodeId, C::Node>,
        data: Arc<Vec<u8>>,
        install: bool,
    ) -> Result<(), StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.save_blocking(meta, data, install))
            .await
            .map_err(|e| StoreError::Io {
                path: self.path.clone(),
                cause: std::io::Error::other(e),
            })?
    }

    fn save_blocking(
        &self,
        meta: SnapshotMeta<C::NodeId, C::Node>,
        data: Arc<Vec<u8>>,
        install: bool,
    ) -> Result<(), StoreError> {
        // Held across the write: two saves never interleave their files.
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((cur, _)) = current.as_ref() {
            if !install && cur.last_log_id > meta.last_log_id {
                return Ok(());
            }
        }
        let io = |cause| StoreError::Io {
            path: self.path.clone(),
            cause,
        };
        let bytes = encode(&StoredSnapshot::V1 {
            meta: &meta,
            data: data.as_slice(),
        })
        .map_err(|cause| StoreError::Encode {
            path: self.path.clone(),
            what: SNAPSHOT_FILE.into(),
            cause,
        })?;
        let tmp = self.path.join(format!("{SNAPSHOT_FILE}.tmp"));
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, self.path.join(SNAPSHOT_FILE)).map_err(io)?;
        durable::sync_dir(&self.path).map_err(io)?;
        *current = Some((meta, data));
        Ok(())
    }
}

/// A wait for the flusher: an append's callback, or a waiter of `save_vote` and others.
enum Job<C: StoreConfig> {
    Log(LogFlushed<C>),
    Wait(tokio::sync::oneshot::Sender<Result<(), std::io::Error>>),
}

/// The thread that flushes: it takes every job waiting, flushes once, answers them all.
struct Flusher {
    db: sled::Db,
    file: std::fs::File,
    dir: PathBuf,
    flushes: Arc<AtomicU64>,
}

impl Flusher {
    fn run<C: StoreConfig>(self, rx: mpsc::Receiver<Job<C>>) {
        // Ends when the store (the only sender) is dropped.
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            jobs.extend(rx.try_iter());
            let result = durable::flush(&self.db, &self.file, &self.dir);
            if result.is_ok() {
                // Before the answers: whoever is answered sees its flush counted.
                self.flushes.fetch_add(1, Ordering::SeqCst);
            }
            for job in jobs {
                let result = match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(std::io::Error::other(e.to_string())),
                };
                match job {
                    Job::Log(callback) => callback.log_io_completed(result),
                    Job::Wait(tx) => {
                        let _ = tx.send(result);
                    }
                }
            }
        }
    }
}

fn read_logs<NID: openraft::NodeId>(e: StoreError) -> StorageError<NID> {
    StorageIOError::new(ErrorSubject::Logs, ErrorVerb::Read, AnyError::new(&e)).into()
}

fn write_logs<NID: openraft::NodeId>(e: StoreError) -> StorageError<NID> {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// A log tree key as text: the index, or the bytes if they are not one.
fn index_of(key: &[u8]) -> String {
    match <[u8; 8]>::try_from(key) {
        Ok(k) => u64::from_be_bytes(k).to_string(),
        Err(_) => format!("{key:02x?}"),
    }
}

/// What bincode found wrong with a record (its text: bincode's errors are not `Clone`
/// and name nothing of ours).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(String);

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| CodecError(e.to_string()))
}

fn decode<T: DeserializeOwned, const LIMIT: usize>(bytes: &[u8]) -> Result<T, CodecError> {
    let config = bincode::config::standard().with_limit::<LIMIT>();
    let (value, used) =
        bincode::serde::decode_from_slice(bytes, config).map_err(|e| CodecError(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError(format!(
            "{} trailing bytes after the record",
            bytes.len() - used
        )));
    }
    Ok(value)
}
