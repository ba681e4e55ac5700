//! The storage of the transport tests: the real sled Raft store (`tally_cluster::store`)
//! in a temporary directory, with an application that keeps the list of written strings,
//! which is what the tests compare across nodes.

#![allow(dead_code)]

use openraft::LogId;
use std::convert::Infallible;
use std::io::Cursor; // the default snapshot data of `declare_raft_types!`
use std::sync::{Arc, Mutex};
use tally_cluster::net::PeerNode;
use tally_cluster::store::{self, Apply, LogStore, StateMachine};

pub mod nodes;

openraft::declare_raft_types!(
    /// The tests' type config: commands are strings, answers the count applied so far.
    pub TestConfig:
        D = String,
        R = u64,
        Node = PeerNode,
);

/// The node id type of [`TestConfig`].
pub type NodeId = u64;

/// The strings applied, in order; clones share them, so a test keeps one while the
/// state machine that owns the other is inside openraft.
#[derive(Clone, Default)]
pub struct Values(Arc<Mutex<Vec<String>>>);

impl Values {
    /// The strings applied so far, in log order.
    pub async fn values(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl Apply<TestConfig> for Values {
    type Error = Infallible;
    fn apply(&mut self, _: &LogId<NodeId>, command: &String) -> Result<u64, Infallible> {
        let mut values = self.0.lock().unwrap();
        values.push(command.clone());
        Ok(values.len() as u64)
    }

    fn no_command(&mut self, _: &LogId<NodeId>) -> Result<u64, Infallible> {
        Ok(self.0.lock().unwrap().len() as u64)
    }

    fn snapshot(&self) -> Result<Vec<u8>, Infallible> {
        Ok(self.0.lock().unwrap().join("\n").into_bytes())
    }

    fn restore(&mut self, _: Option<&LogId<NodeId>>, snapshot: &[u8]) -> Result<(), Infallible> {
        let text = String::from_utf8_lossy(snapshot);
        *self.0.lock().unwrap() = if text.is_empty() {
            Vec::new()
        } else {
            text.split('\n').map(str::to_owned).collect()
        };
        Ok(())
    }
}

/// A node's Raft store in a directory of its own (kept as long as the store is).
pub struct Stored {
    /// The Raft log and vote.
    pub log: LogStore<TestConfig>,
    /// The state machine over [`Values`].
    pub machine: StateMachine<TestConfig, Values>,
    /// What the state machine applied, for the test to read.
    pub values: Values,
    /// The store's directory, removed when the test drops it.
    pub dir: tempfile::TempDir,
}

/// Opens a fresh sled Raft store in a temporary directory.
pub fn open_store() -> Stored {
    let dir = tempfile::tempdir().unwrap();
    let values = Values::default();
    let (log, machine) = store::open(dir.path(), values.clone()).unwrap();
    Stored {
        log,
        machine,
        values,
        dir,
    }
}
