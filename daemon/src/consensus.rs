//! This server's Raft node: the one durable path of the seat store (ARCHITECTURE.md,
//! "Cluster"). Every change the ledger task makes durable is a command in the Raft log;
//! the seat store is the state machine the log is applied to ([`SeatMachine`]). A single
//! server is a cluster of one, as etcd and Databend's meta service run: the same log,
//! the same fsync before an answer, the same replay after a crash.
//!
//! The log lives in the `raft` directory inside the seat store's directory, so that
//! whatever moves or copies the store (a read-only volume served from a copy) takes the
//! log with it. A data directory written by a tallyd before the log existed has no
//! `raft` directory: the node starts an empty log over the store as it is (nothing to
//! convert: the store's records are the state).

use crate::replicated::SeatMachine;
use crate::store::{Store, StoreError};
use openraft::{Config, Raft, SnapshotPolicy};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_cluster::net::{PeerIdentity, PeerNode, QuicNetwork};
use tally_cluster::Site;
use tally_protocol::keys::SecretKey;
use tally_protocol::replicate::{StoreBatch, StoreCommand};

/// The directory of the Raft log, inside the seat store's directory.
pub const RAFT_DIR: &str = "raft";

/// How long a start waits for the node to lead and to have applied its log. A cluster
/// of one elects itself at once; the bound is for a disk that stalls.
const START_WAIT: Duration = Duration::from_secs(30);

/// How long a start waits for the handles of a Raft node stopped a moment ago (its
/// tasks drop the log store and the state machine as they end) to let go of sled's locks.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// What a node needs to (re)start: its key (its node id and peer certificate) and the
/// endpoint its peers are reached through.
#[derive(Clone)]
pub struct NodeSetup {
    key: SecretKey,
    endpoint: quinn::Endpoint,
}

/// The Raft handle of this server.
pub type Node = Raft<Site>;

impl NodeSetup {
    /// The setup for the server with `key`, whose peers are reached from `endpoint`.
    pub fn new(key: SecretKey, endpoint: quinn::Endpoint) -> NodeSetup {
        NodeSetup { key, endpoint }
    }

    /// This node's id (from its key: the start of the key's fingerprint).
    pub fn id(&self) -> u64 {
        self.key.public().node_id()
    }

    /// Starts the node over `store`: opens the log beside it, applies what the store
    /// misses, forms a cluster of one if the log is new, and waits until the node leads
    /// and has applied every entry it holds, so that the store is complete when the
    /// ledger is restored from it.
    pub async fn start(&self, store: &Store) -> Result<Node, StoreError> {
        let dir = store.sled_dir().join(RAFT_DIR);
        let path = store.path().join(RAFT_DIR);
        let fail = |cause: String| StoreError::Raft {
            path: path.clone(),
            cause,
        };
        let (log, machine) = open_log(&dir, &path, store).await?;
        let identity = PeerIdentity::new(&self.key).map_err(|e| fail(e.to_string()))?;
        let network = QuicNetwork::new(self.id(), self.endpoint.clone(), Arc::new(identity));
        let raft = Raft::<Site>::new(self.id(), config(), network, log, machine)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let started = async {
            if !raft
                .is_initialized()
                .await
                .map_err(|e| fail(e.to_string()))?
            {
                let addr = self
                    .endpoint
                    .local_addr()
                    .map_err(|e| fail(e.to_string()))?;
                let me = PeerNode {
                    addr: addr.to_string(),
                    key: self.key.public(),
                };
                raft.initialize(BTreeMap::from([(self.id(), me)]))
                    .await
                    .map_err(|e| fail(e.to_string()))?;
            }
            let id = self.id();
            raft.wait(Some(START_WAIT))
                .metrics(
                    |m| {
                        m.current_leader == Some(id)
                            && m.last_applied.as_ref().map(|l| l.index) == m.last_log_index
                    },
                    "leading, with the log applied",
                )
                .await
                .map_err(|e| fail(e.to_string()))?;
            Ok(())
        };
        match started.await {
            Ok(()) => Ok(raft),
            Err(e) => {
                let _ = raft.shutdown().await;
                Err(e)
            }
        }
    }
}

/// Proposes `batch` and waits until it is committed and applied to the store.
pub async fn propose(raft: &Node, batch: StoreBatch, store_path: &Path) -> Result<(), StoreError> {
    raft.client_write(StoreCommand::V1(batch))
        .await
        .map(|_| ())
        .map_err(|e| StoreError::Raft {
            path: store_path.join(RAFT_DIR),
            cause: e.to_string(),
        })
}

/// The Raft settings of a tallyd node. A snapshot is a copy of the whole seat store, so
/// it is taken every 20,000 entries (a few minutes of a busy site), not oftener; the
/// log keeps 1,000 entries behind it for a follower that is a little behind.
fn config() -> Arc<Config> {
    let config = Config {
        cluster_name: "tally".into(),
        heartbeat_interval: 250,
        election_timeout_min: 1_000,
        election_timeout_max: 2_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(20_000),
        max_in_snapshot_log_to_keep: 1_000,
        ..Config::default()
    };
    Arc::new(config.validate().expect("the Raft settings are valid"))
}

/// Opens the log store in `dir` over `store` (on the blocking pool: sled's open reads
/// its files), waiting a moment for the handles of a node stopped just before.
async fn open_log(
    dir: &Path,
    path: &Path,
    store: &Store,
) -> Result<
    (
        tally_cluster::store::LogStore<Site>,
        tally_cluster::store::StateMachine<Site, SeatMachine>,
    ),
    StoreError,
> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        let (dir2, store2): (PathBuf, Store) = (dir.to_path_buf(), store.clone());
        let opened = tokio::task::spawn_blocking(move || {
            create_private_dir(&dir2)?;
            crate::store::set_aside_leftovers(&dir2)?;
            let machine = SeatMachine::new(store2)?;
            Ok::<_, StoreError>(tally_cluster::store::open(&dir2, machine))
        })
        .await
        .map_err(StoreError::Task)??;
        match opened {
            Err(tally_cluster::store::StoreError::InUse { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(tally_cluster::store::StoreError::InUse { .. }) => {
                return Err(StoreError::InUse {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => {
                return Err(StoreError::Raft {
                    path: path.to_path_buf(),
                    cause: e.to_string(),
                })
            }
            Ok(opened) => return Ok(opened),
        }
    }
}

/// Creates the log's directory, readable by tallyd's user only (as the store's).
fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|cause| StoreError::Io {
            path: dir.to_path_buf(),
            cause,
        })
}
