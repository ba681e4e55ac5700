//! The Raft store against openraft's storage conformance suite, and what must survive
//! closing and reopening it. Real sled in a fresh temp dir per case.

use openraft::testing::{StoreBuilder, Suite};
use openraft::{LogId, StorageError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Cursor;
use tally_cluster::store::{self, Apply, LogStore, StateMachine};

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
    fn apply(&mut self, _log_id: &LogId<u64>, command: &Set) -> Option<String> {
        self.0.insert(command.key.clone(), command.value.clone())
    }
    fn no_command(&mut self, _log_id: &LogId<u64>) -> Option<String> {
        None
    }
    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&self.0).unwrap()
    }
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.0 = serde_json::from_slice(snapshot).map_err(|e| e.to_string())?;
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
