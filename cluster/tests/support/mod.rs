//! A minimal in-memory Raft log and state machine for the transport tests.
//!
//! Kept apart from the tests so that the sled store (cluster/src/store*.rs) can take its
//! place: the transport tests only need *a* storage that openraft accepts. The state
//! machine keeps the list of written strings, which is what the tests compare across nodes.

#![allow(dead_code)]

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::Arc;
use tally_cluster::net::PeerNode;
use tokio::sync::Mutex;

openraft::declare_raft_types!(
    /// The tests' type config: commands are strings, answers the count applied so far.
    pub TestConfig:
        D = String,
        R = u64,
        Node = PeerNode,
);

/// The node id type of [`TestConfig`].
pub type NodeId = u64;

#[derive(Default)]
struct Log {
    entries: BTreeMap<u64, Entry<TestConfig>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    last_purged: Option<LogId<NodeId>>,
}

/// The Raft log and vote, in memory; clones share it (the log reader is a clone).
#[derive(Clone, Default)]
pub struct MemLog(Arc<Mutex<Log>>);

impl RaftLogReader<TestConfig> for MemLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TestConfig>>, StorageError<NodeId>> {
        let log = self.0.lock().await;
        Ok(log.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TestConfig> for MemLog {
    type LogReader = MemLog;

    async fn get_log_state(&mut self) -> Result<LogState<TestConfig>, StorageError<NodeId>> {
        let log = self.0.lock().await;
        let last = log.entries.values().next_back().map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id: log.last_purged,
            last_log_id: last.or(log.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> MemLog {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.0.lock().await.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.0.lock().await.vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.0.lock().await.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.0.lock().await.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TestConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TestConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut log = self.0.lock().await;
        for entry in entries {
            log.entries.insert(entry.log_id.index, entry);
        }
        // Memory is "on disk" as soon as it is written.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut log = self.0.lock().await;
        log.entries.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut log = self.0.lock().await;
        log.last_purged = Some(log_id);
        log.entries = log.entries.split_off(&(log_id.index + 1));
        Ok(())
    }
}

/// What the state machine holds and a snapshot carries.
#[derive(Clone, Default, serde::Serialize, serde::Deserialize)]
struct State {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, PeerNode>,
    values: Vec<String>,
}

#[derive(Default)]
struct Machine {
    state: State,
    snapshot: Option<(SnapshotMeta<NodeId, PeerNode>, Vec<u8>)>,
    snapshots_built: u64,
}

/// The state machine: the strings written, in log order; clones share it.
#[derive(Clone, Default)]
pub struct MemMachine(Arc<Mutex<Machine>>);

impl MemMachine {
    /// The strings applied so far.
    pub async fn values(&self) -> Vec<String> {
        self.0.lock().await.state.values.clone()
    }
}

fn io_error(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(&e).into()
}

impl RaftSnapshotBuilder<TestConfig> for MemMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TestConfig>, StorageError<NodeId>> {
        let mut machine = self.0.lock().await;
        let bytes = bincode::serde::encode_to_vec(&machine.state, bincode::config::standard())
            .map_err(io_error)?;
        machine.snapshots_built += 1;
        let meta = SnapshotMeta {
            last_log_id: machine.state.last_applied,
            last_membership: machine.state.membership.clone(),
            snapshot_id: format!("snapshot-{}", machine.snapshots_built),
        };
        machine.snapshot = Some((meta.clone(), bytes.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TestConfig> for MemMachine {
    type SnapshotBuilder = MemMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, PeerNode>), StorageError<NodeId>>
    {
        let machine = self.0.lock().await;
        Ok((machine.state.last_applied, machine.state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<u64>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TestConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut machine = self.0.lock().await;
        let mut answers = Vec::new();
        for entry in entries {
            machine.state.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(value) => machine.state.values.push(value),
                EntryPayload::Membership(m) => {
                    machine.state.membership = StoredMembership::new(Some(entry.log_id), m)
                }
            }
            answers.push(machine.state.values.len() as u64);
        }
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> MemMachine {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, PeerNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_inner();
        let (state, _): (State, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
                .map_err(io_error)?;
        let mut machine = self.0.lock().await;
        machine.state = state;
        machine.snapshot = Some((meta.clone(), bytes));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TestConfig>>, StorageError<NodeId>> {
        let machine = self.0.lock().await;
        Ok(machine.snapshot.as_ref().map(|(meta, bytes)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(bytes.clone())),
        }))
    }
}
