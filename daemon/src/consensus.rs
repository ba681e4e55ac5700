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

/// What a node needs to (re)start: its key (its node id and peer certificate), the
/// endpoint its peers are reached through, and the site's members (none: a single
/// server, a cluster of one).
#[derive(Clone)]
pub struct NodeSetup {
    key: SecretKey,
    endpoint: quinn::Endpoint,
    members: BTreeMap<u64, PeerNode>,
    /// Whether a new node waits to be added instead of forming the cluster.
    join: bool,
    slot: NodeSlot,
}

/// The Raft handle of this server.
pub type Node = Raft<Site>;

/// The node running now, if any, for the peers' connections (a node restarted after a
/// disk fault is a new handle).
pub type NodeSlot = Arc<std::sync::RwLock<Option<Node>>>;

/// What this server is to clients now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// It leads (a single server always does, once started): it grants.
    Leading,
    /// Another member leads, at this client address if known; this one grants nothing
    /// and sends clients there.
    Following {
        /// The leader's address (clients and peers share its port).
        leader: Option<String>,
    },
}

impl NodeSetup {
    /// The setup for the server with `key`, whose peers are reached from `endpoint`;
    /// `members` are the site's servers, this one included (empty: a single server).
    pub fn new(key: SecretKey, endpoint: quinn::Endpoint, members: Vec<PeerNode>) -> NodeSetup {
        let members = members.into_iter().map(|m| (m.key.node_id(), m)).collect();
        NodeSetup {
            key,
            endpoint,
            members,
            join: false,
            slot: NodeSlot::default(),
        }
    }

    /// The setup of a member that joins a running cluster (`join_cluster`): with a new
    /// log it waits to be added by the leader ([`tally_cluster::ops::add_node`]) instead
    /// of forming a cluster with the configured members.
    pub fn joining(mut self, join: bool) -> NodeSetup {
        self.join = join;
        self
    }

    /// This node's id (from its key: the start of the key's fingerprint).
    pub fn id(&self) -> u64 {
        self.key.public().node_id()
    }

    /// Whether this server is one of several.
    pub fn is_cluster(&self) -> bool {
        !self.members.is_empty()
    }

    /// The node running now, for the peers' connections.
    pub fn slot(&self) -> NodeSlot {
        self.slot.clone()
    }

    /// Forgets the running node (it was stopped).
    pub fn clear(&self) {
        *self.slot.write().unwrap_or_else(|e| e.into_inner()) = None;
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
                if self.is_cluster() && self.join {
                    tracing::info!(
                        "a new member joining a running cluster: waiting to be added by \
                         `tally admin cluster add` on its leader"
                    );
                    return Ok(());
                }
                let members = if self.is_cluster() {
                    // Every member forms the cluster with the same members from its
                    // config: openraft allows that, and no member has to go first.
                    self.members.clone()
                } else {
                    let addr = self
                        .endpoint
                        .local_addr()
                        .map_err(|e| fail(e.to_string()))?;
                    let me = PeerNode {
                        addr: addr.to_string(),
                        key: self.key.public(),
                    };
                    BTreeMap::from([(self.id(), me)])
                };
                if self.is_cluster() {
                    tracing::info!(members = members.len(), "forming the cluster");
                } else {
                    // A single server's log is an implementation detail, not news.
                    tracing::debug!("starting the Raft log of a single server");
                }
                raft.initialize(members)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
            }
            if self.is_cluster() {
                // A member does not wait to lead: the ledger task serves once it does.
                return Ok(());
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
            Ok(()) => {
                *self.slot.write().unwrap_or_else(|e| e.into_inner()) = Some(raft.clone());
                Ok(raft)
            }
            Err(e) => {
                let _ = raft.shutdown().await;
                Err(e)
            }
        }
    }
}

/// Proposes `batch` and waits until it is committed and applied to the store. A node
/// that does not lead (any more) says so ([`StoreError::NotLeader`]): that is no fault
/// of the store. A member whose proposal is not committed within [`COMMIT_WAIT`] says
/// [`StoreError::NoMajority`]; the proposal stays in its log and may still be
/// committed, so the caller must not take it as undone (the ledger task ends its term
/// and restores from the store once the log is settled, [`wait_to_lead`]). A cluster
/// of one has no majority to lose: it waits for its own disk, as a store without a log
/// did.
pub async fn propose(raft: &Node, batch: StoreBatch, store_path: &Path) -> Result<(), StoreError> {
    let voters = {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        m.membership_config.membership().voter_ids().count()
    };
    let write = raft.client_write(StoreCommand::V3(batch));
    let written = if voters > 1 {
        match tokio::time::timeout(COMMIT_WAIT, write).await {
            Ok(written) => written,
            Err(_) => return Err(StoreError::NoMajority),
        }
    } else {
        write.await
    };
    match written {
        Ok(_) => Ok(()),
        Err(e) => Err(match e.forward_to_leader::<PeerNode>() {
            Some(forward) => StoreError::NotLeader {
                leader: forward.leader_node.as_ref().map(|n| n.addr.clone()),
            },
            None => StoreError::Raft {
                path: store_path.join(RAFT_DIR),
                cause: e.to_string(),
            },
        }),
    }
}

/// The client address of the leader `raft` knows of, unless that is `me` (a member that
/// believes it leads but is not confirmed must not send clients back to itself). From
/// the replicated membership, so that a member added since the start is found.
pub fn leader_addr(raft: &Node, me: u64) -> Option<String> {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    let leader = m.current_leader.filter(|&id| id != me)?;
    let node = m.membership_config.membership().get_node(&leader)?;
    Some(node.addr.clone())
}

/// Waits until `raft` leads with every entry of its log applied (its term's first
/// entry among them): its store is then the site's whole state, and its ledger may be
/// restored from it. Every entry, not only the earlier terms': a proposal of this term
/// that timed out ([`StoreError::NoMajority`]) may still be committed, and a ledger
/// restored before it is applied would not know the leases it grants or releases.
pub async fn wait_to_lead(raft: &Node, id: u64) {
    let mut metrics = raft.metrics();
    let _ = metrics
        .wait_for(|m| {
            m.current_leader == Some(id)
                && m.last_applied.as_ref().map(|l| l.leader_id.term) == Some(m.current_term)
                && m.last_applied.as_ref().map(|l| l.index) == m.last_log_index
        })
        .await;
}

/// Resolves when `raft` no longer leads (or has stopped), or can no longer show that
/// it leads: a leader cut off from the majority keeps believing it leads until it
/// hears of a newer term, so it asks the majority every [`LEAD_CHECK`]. Its clients'
/// heartbeats must not keep leases alive that the majority's leader will expire.
pub async fn lost_lead(raft: &Node, id: u64) {
    let mut metrics = raft.metrics();
    let stepped_down =
        metrics.wait_for(|m| m.current_leader != Some(id) || m.running_state.is_err());
    let cut_off = async {
        loop {
            tokio::time::sleep(LEAD_CHECK).await;
            if !confirm_lead(raft).await {
                tracing::warn!(
                    "this server cannot reach a majority of its cluster: it stops granting \
                     and serving heartbeats; its clients go to the majority's leader"
                );
                return;
            }
        }
    };
    tokio::select! {
        _ = stepped_down => {}
        _ = cut_off => {}
    }
}

/// Whether a majority confirms now that `raft` leads (bounded by [`COMMIT_WAIT`]).
pub async fn confirm_lead(raft: &Node) -> bool {
    matches!(
        tokio::time::timeout(COMMIT_WAIT, raft.ensure_linearizable()).await,
        Ok(Ok(_))
    )
}

/// How often a leader asks its majority whether it still leads.
pub const LEAD_CHECK: Duration = Duration::from_secs(2);

/// How long a proposal may wait to be committed: past it, the leader is taken to be
/// cut off from its majority (which stands for an election 3-4 s after it last heard
/// from it, [`config`]), the grants it carried are refused and its term ends.
pub const COMMIT_WAIT: Duration = Duration::from_secs(4);

/// The Raft settings of a tallyd node. Heartbeats every 500 ms (openraft also times an
/// append out after one interval: shorter fails on a loaded machine). A follower that
/// hears nothing stands for election after the leader's lease (openraft takes
/// `election_timeout_max` for it) plus its own random timeout: 3-4 s of silence, four
/// missed heartbeats at least, so a dead leader is replaced within seconds and a
/// stall of a loaded machine of under 2 s changes nothing. (1.5-3 s timeouts made that
/// 4.5-6 s, and a failover up to 11 s when an election took a second round.) A snapshot is a copy
/// of the whole seat store, so it is taken every 20,000 entries (a few minutes of a
/// busy site), not oftener; the log keeps 1,000 entries behind it for a follower that
/// is a little behind.
fn config() -> Arc<Config> {
    let config = Config {
        cluster_name: "tally".into(),
        heartbeat_interval: 500,
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
