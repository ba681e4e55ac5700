//! The Raft store against openraft's storage conformance suite, and what must survive
//! closing and reopening it. Real sled in a fresh temp dir per case.

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{log_id, membership_ent, StoreBuilder, Suite};
use openraft::{
    Entry, EntryPayload, LogId, Membership, RaftLogReader, RaftSnapshotBuilder, StorageError,
    StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::time::{Duration, Instant};
use tally_cluster::store::{self, Apply, LogStore, StateMachine, StoreError};

/// A command of the test application: set a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Set {
    key: String,
    value: String,
}

openraft::declare_raft_types!(
    /// The test type config: a key-value map.
    Kv:
        D = Set,
        R = Option<String>,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<Kv>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The test application: a map; answers the previous value of the key set.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Map(BTreeMap<String, String>);

impl Apply<Kv> for Map {
    type Error = serde_json::Error;
    fn apply(
        &mut self,
        _log_id: &LogId<u64>,
        command: &Set,
    ) -> Result<Option<String>, Self::Error> {
        Ok(self.0.insert(command.key.clone(), command.value.clone()))
    }
    fn no_command(&mut self, _log_id: &LogId<u64>) -> Result<Option<String>, Self::Error> {
        Ok(None)
    }
    fn snapshot(&self) -> Result<Vec<u8>, Self::Error> {
        serde_json::to_vec(&self.0)
    }
    fn restore(
        &mut self,
        _last: Option<&LogId<u64>>,
        snapshot: &[u8],
    ) -> Result<(), serde_json::Error> {
        self.0 = serde_json::from_slice(snapshot)?;
        Ok(())
    }
}

type Store = LogStore<Kv>;
type Sm = StateMachine<Kv, Map>;

struct Builder;

impl StoreBuilder<Kv, Store, Sm, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, Store, Sm), StorageError<u64>> {
        let dir = tempfile::tempdir().unwrap();
        let (store, sm) = store::open(dir.path(), Map::default()).unwrap();
        Ok((dir, store, sm))
    }
}

#[test]
fn openraft_storage_conformance_suite() {
    Suite::test_all(Builder).unwrap();
}

/// An entry setting `k<index>` to `v<index>`.
fn set(term: u64, index: u64) -> Entry<Kv> {
    Entry {
        log_id: log_id(term, 0, index),
        payload: EntryPayload::Normal(Set {
            key: format!("k{index}"),
            value: format!("v{index}"),
        }),
    }
}

/// The log of these tests: a membership entry at 0 (node 0 alone), then sets 1..=`last`.
fn log(last: u64) -> Vec<Entry<Kv>> {
    let mut entries = vec![membership_ent::<Kv>(1, 0, 0, vec![[0].into()])];
    entries.extend((1..=last).map(|i| set(1, i)));
    entries
}

/// Opens the store in `dir` again once the handles just dropped have let go of sled's
/// lock (sled's own flusher thread lets go of it shortly after).
fn reopen(dir: &Path) -> (Store, Sm) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store::open(dir, Map::default()) {
            Err(StoreError::InUse { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => return other.unwrap(),
        }
    }
}

/// sled opened directly on the store's directory, to write what a store would not.
fn raw_sled(dir: &Path) -> sled::Db {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match sled::open(dir) {
            Err(sled::Error::Io(e))
                if e.to_string().contains("lock") && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => return other.unwrap(),
        }
    }
}

#[tokio::test]
async fn log_vote_committed_and_snapshot_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, mut sm) = store::open(dir.path(), Map::default()).unwrap();
    store.blocking_append(log(10)).await.unwrap();
    // committed is durable with the next flush: the vote's.
    store.save_committed(Some(log_id(1, 0, 8))).await.unwrap();
    store.save_vote(&Vote::new(2, 0)).await.unwrap();
    sm.apply(log(10).into_iter().take(7)).await.unwrap();
    let built = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(built.meta.last_log_id, Some(log_id(1, 0, 6)));
    // Applied after the snapshot: not durable, re-applied by openraft from the log.
    sm.apply(log(10).into_iter().skip(7).take(2)).await.unwrap();
    drop((store, sm));

    let (mut store, mut sm) = reopen(dir.path());
    assert_eq!(store.read_vote().await.unwrap(), Some(Vote::new(2, 0)));
    assert_eq!(store.read_committed().await.unwrap(), Some(log_id(1, 0, 8)));
    let state = store.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(1, 0, 10)));
    assert_eq!(state.last_purged_log_id, None);
    assert_eq!(store.try_get_log_entries(0..).await.unwrap(), log(10));
    let mut reader = store.get_log_reader().await;
    assert_eq!(reader.try_get_log_entries(3..5).await.unwrap(), log(4)[3..]);

    let (applied, membership) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 0, 6)));
    assert_eq!(
        membership,
        StoredMembership::new(
            Some(log_id(1, 0, 0)),
            Membership::new(vec![[0].into()], None)
        )
    );
    let want: BTreeMap<String, String> = (1..=6)
        .map(|i| (format!("k{i}"), format!("v{i}")))
        .collect();
    assert_eq!(sm.app().0, want, "the state restored from the snapshot");
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, built.meta);
    assert_eq!(current.snapshot.into_inner(), built.snapshot.into_inner());
}

#[tokio::test]
async fn truncate_and_purge_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, sm) = store::open(dir.path(), Map::default()).unwrap();
    store.blocking_append(log(10)).await.unwrap();
    store.purge(log_id(1, 0, 3)).await.unwrap();
    store.truncate(log_id(1, 0, 8)).await.unwrap();
    drop((store, sm));

    let (mut store, _sm) = reopen(dir.path());
    let state = store.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 0, 3)));
    assert_eq!(state.last_log_id, Some(log_id(1, 0, 7)));
    assert_eq!(store.try_get_log_entries(0..).await.unwrap(), log(7)[4..]);

    // Everything purged: the log is empty and ends at the purge point.
    store.purge(log_id(1, 0, 7)).await.unwrap();
    drop(store);
    let (mut store, _sm) = reopen(dir.path());
    let state = store.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 0, 7)));
    assert_eq!(state.last_log_id, Some(log_id(1, 0, 7)));
    assert!(store.try_get_log_entries(0..).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_purge_cut_short_is_finished_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, sm) = store::open(dir.path(), Map::default()).unwrap();
    store.blocking_append(log(10)).await.unwrap();
    store.purge(log_id(1, 0, 3)).await.unwrap();
    let entries = store.try_get_log_entries(0..).await.unwrap();
    drop((store, sm));
    // The purge point is written, the removal never happened: entries 2 and 3 are back.
    let db = raw_sled(dir.path());
    let tree = db.open_tree(store::LOG_TREE).unwrap();
    let raw4 = tree.get(4u64.to_be_bytes()).unwrap().unwrap();
    assert_eq!(entries.len(), 7);
    // An entry's record holds its log id, so a copy of 4's under keys 2 and 3 would
    // read as index 4: enough to see whether the leftovers are removed.
    tree.insert(2u64.to_be_bytes(), raw4.clone()).unwrap();
    tree.insert(3u64.to_be_bytes(), raw4).unwrap();
    db.flush().unwrap();
    drop((tree, db));

    let (mut store, _sm) = reopen(dir.path());
    assert_eq!(store.try_get_log_entries(0..).await.unwrap(), log(10)[4..]);
}

#[tokio::test]
async fn a_record_of_an_unknown_format_is_an_error_naming_tree_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, sm) = store::open(dir.path(), Map::default()).unwrap();
    store.blocking_append(log(5)).await.unwrap();
    store.save_vote(&Vote::new(1, 0)).await.unwrap();
    drop((store, sm));
    let db = raw_sled(dir.path());
    // Tag 7: a format version this build does not know.
    db.open_tree(store::LOG_TREE)
        .unwrap()
        .insert(3u64.to_be_bytes(), &[7, 1, 2, 3][..])
        .unwrap();
    db.open_tree(store::META_TREE)
        .unwrap()
        .insert("vote", &[9, 0][..])
        .unwrap();
    db.flush().unwrap();
    drop(db);

    let (mut store, _sm) = reopen(dir.path());
    let err = store
        .try_get_log_entries(0..)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("raft-log/v1 key 3"), "{err}");
    let err = store.read_vote().await.unwrap_err().to_string();
    assert!(err.contains("raft-meta/v1 key vote"), "{err}");
    // The entries around the bad one still read.
    assert_eq!(store.try_get_log_entries(4..).await.unwrap(), log(5)[4..]);
    drop((store, _sm));

    std::fs::write(dir.path().join(store::SNAPSHOT_FILE), [5, 0, 0]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match store::open::<Kv, Map>(dir.path(), Map::default()) {
            Err(StoreError::InUse { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => break e,
            Ok(_) => panic!("a snapshot of an unknown format opened"),
        }
    };
    assert!(
        matches!(
            err,
            StoreError::Decode {
                tree: "raft-snapshot",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("raft-snapshot"), "{err}");
}

/// Append+flush throughput for batches of 1, 16 and 256 entries, printed (run with
/// `--nocapture`); never asserted, as the figure is the machine's. Each append waits for
/// its flush (`blocking_append`): the worst case, as openraft itself goes on appending
/// while a flush is under way and the flusher then covers several appends at once.
#[tokio::test]
async fn append_and_flush_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _sm) = store::open(dir.path(), Map::default()).unwrap();
    let mut next = 1u64;
    for batch in [1u64, 16, 256] {
        let started = Instant::now();
        let mut appended = 0u64;
        // Bounded in count and time.
        for _ in 0..2_000 {
            if started.elapsed() > Duration::from_secs(2) {
                break;
            }
            let entries: Vec<_> = (next..next + batch).map(|i| set(1, i)).collect();
            store.blocking_append(entries).await.unwrap();
            next += batch;
            appended += batch;
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "append+flush, batches of {batch:>3}: {:>9.0} entries/s ({:.3} ms per flush)",
            appended as f64 / secs,
            secs * 1000.0 / (appended / batch) as f64
        );
        assert!(appended > 0);
    }
    assert_eq!(
        store.get_log_state().await.unwrap().last_log_id,
        Some(log_id(1, 0, next - 1))
    );
}

#[tokio::test]
async fn an_append_and_a_vote_are_answered_only_after_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _sm) = store::open(dir.path(), Map::default()).unwrap();
    for i in 0..20u64 {
        let before = store.flushes();
        store.blocking_append([set(1, i)]).await.unwrap();
        assert!(
            store.flushes() > before,
            "append {i} answered before a flush"
        );
        let before = store.flushes();
        store.save_vote(&Vote::new(i + 1, 0)).await.unwrap();
        assert!(store.flushes() > before, "vote {i} answered before a flush");
    }
}

#[tokio::test]
async fn a_snapshot_built_from_an_older_state_does_not_replace_an_installed_one() {
    let leader_dir = tempfile::tempdir().unwrap();
    let (_leader_store, mut leader) = store::open(leader_dir.path(), Map::default()).unwrap();
    leader.apply(log(8)).await.unwrap();
    let from_leader = leader
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (store, mut sm) = store::open(dir.path(), Map::default()).unwrap();
    sm.apply(log(6)).await.unwrap();
    // A build begun at 6, finished after the leader's snapshot at 8 is installed.
    let mut stale = sm.get_snapshot_builder().await;
    let mut received = sm.begin_receiving_snapshot().await.unwrap();
    *received = *from_leader.snapshot;
    sm.install_snapshot(&from_leader.meta, received)
        .await
        .unwrap();
    stale.build_snapshot().await.unwrap();
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, from_leader.meta);
    drop((store, sm));

    let (_store, mut sm) = reopen(dir.path());
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 0, 8)));
    assert_eq!(sm.app().0.len(), 8);
}
