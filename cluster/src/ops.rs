//! Cluster operations for admins: what the cluster looks like ([`ClusterView`], the
//! `/metrics` samples of [`prometheus_samples`]) and changing who is in it
//! ([`add_node`], [`remove_node`]).
//!
//! These work on any openraft type config whose nodes are [`PeerNode`]s keyed by `u64`
//! (the site's [`crate::Site`], and the tests' own), so the daemon's admin API and CLI
//! call them with the node's `Raft` and its metrics.
//!
//! # Replacing a dead node
//!
//! A server whose machine or data directory is lost does not come back under its old
//! identity: it gets a new key, hence a new node id. (A node that rejoined under its old
//! id with an empty disk would have forgotten the votes and log entries it promised, and
//! could help elect a leader that lacks committed entries.) Two of three servers keep the
//! site running meanwhile, with no margin for another failure, so the replacement is
//! done promptly:
//!
//! 1. **Look**: on a surviving server, show the cluster ([`ClusterView`]): the leader is
//!    one of the survivors; note the dead node's id (its key fingerprint starts with it).
//! 2. **New key**: on the new machine, `tallyd init` and `tallyd request` (a new key).
//! 3. **New bundle**: the vendor issues a bundle binding the two survivors' keys and the
//!    new key, from the three requests. Install it on the survivors and reload: they now
//!    accept the new node at the TLS handshake and refuse the dead key.
//! 4. **Remove the dead node** on the leader ([`remove_node`]). Removing it before adding
//!    the new one keeps every quorum made of live servers: two voters, both live.
//! 5. **Start the new server** with the new bundle and an empty data directory. It waits,
//!    as a node of no cluster, to be added; it must not form a cluster of its own.
//! 6. **Add it** on the leader ([`add_node`] with id `key.node_id()`, its address and
//!    key): it joins as a learner, receives the state (a snapshot when the log behind it
//!    was purged, then the log), and becomes a voter once it holds everything up to its
//!    own addition. The site has three voters again.
//! 7. **Check**: show the cluster: three voters, the new one's lag near 0.
//!
//! The test `a_dead_node_is_replaced_by_a_new_one_that_gets_the_state_by_snapshot`
//! (`cluster/tests/ops.rs`) runs steps 3 to 7 with the leader as the dead node.

use crate::net::PeerNode;
use openraft::error::{ChangeMembershipError, ClientWriteError, Fatal, RaftError};
use openraft::metrics::WaitError;
use openraft::raft::responder::OneshotResponder;
use openraft::{ChangeMembers, Raft, RaftMetrics, RaftTypeConfig, ServerState};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use tokio::time::Instant;

/// What a node says about itself and its cluster, built from its openraft metrics by
/// [`ClusterView::from_metrics`]. A follower's view is as current as the last message it
/// had from the leader; only the leader's view has replication lag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The id of the node this view is from.
    pub node: u64,
    /// That node's role.
    pub role: Role,
    /// The Raft term the node is in.
    pub term: u64,
    /// The leader the node knows of, if any.
    pub leader: Option<u64>,
    /// The leader's address (`host:port`), if the leader is a member this node knows.
    pub leader_addr: Option<String>,
    /// The index of the last entry in the node's log.
    pub last_log_index: Option<u64>,
    /// The index of the last entry the node applied to its store.
    pub applied_index: Option<u64>,
    /// Whether a membership change is half-way (joint consensus): an add or remove was
    /// started and not finished, by a leader that stopped or is still working on it.
    pub changing_membership: bool,
    /// Every member, voters and learners, in id order.
    pub members: Vec<Member>,
    /// On the leader: how far each other member is behind, in id order. `None` on any
    /// other node (only the leader knows).
    pub replication: Option<Vec<PeerLag>>,
}

/// A [`ClusterView`] as it crosses the wire (admin API to CLI); the variant is the format
/// version. A change to [`ClusterView`]'s fields freezes today's struct as
/// `ClusterViewV1` and adds `V2(ClusterView)`, keeping V1 readable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ClusterViewBody {
    /// Format version 1.
    V1(ClusterView),
}

impl From<ClusterView> for ClusterViewBody {
    fn from(view: ClusterView) -> Self {
        ClusterViewBody::V1(view)
    }
}

impl From<ClusterViewBody> for ClusterView {
    fn from(body: ClusterViewBody) -> Self {
        match body {
            ClusterViewBody::V1(view) => view,
        }
    }
}

/// A node's role in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Decides and grants; the only one that writes the log.
    Leader,
    /// A voter following the leader.
    Follower,
    /// A voter asking for votes: no leader is known to it.
    Candidate,
    /// A non-voting member catching up (or a node not yet part of any cluster).
    Learner,
    /// The node's Raft stopped (shut down, or a storage error stopped it).
    Stopped,
}

impl Role {
    /// Every role, in the order `/metrics` lists them.
    pub const ALL: [Role; 5] = [
        Role::Leader,
        Role::Follower,
        Role::Candidate,
        Role::Learner,
        Role::Stopped,
    ];

    /// The role as the admin reads it and as the `role` label of `/metrics` says it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Learner => "learner",
            Role::Stopped => "stopped",
        }
    }
}

impl From<ServerState> for Role {
    fn from(state: ServerState) -> Self {
        match state {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Learner => Role::Learner,
            ServerState::Shutdown => Role::Stopped,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A member of the cluster as the membership in force names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its node id (`PublicKey::node_id` of its key).
    pub id: u64,
    /// Where peers dial it (`host:port`).
    pub addr: String,
    /// Its key's fingerprint, as `tallyd request` and the bundle show it.
    pub fingerprint: String,
    /// A voter counts for quorum; a learner only receives the log.
    pub voter: bool,
}

/// How far one member is behind the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerLag {
    /// The member's node id.
    pub id: u64,
    /// The index of the last entry the leader knows the member holds; `None` before its
    /// first answer.
    pub matched: Option<u64>,
    /// Entries the member is behind the leader's last log entry.
    pub behind: u64,
}

impl ClusterView {
    /// The view of the node whose metrics these are (`raft.metrics().borrow()`).
    pub fn from_metrics(metrics: &RaftMetrics<u64, PeerNode>) -> ClusterView {
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| Member {
                id: *id,
                addr: node.addr.clone(),
                fingerprint: node.key.fingerprint(),
                voter: voters.contains(id),
            })
            .collect();
        let leader_addr = metrics
            .current_leader
            .and_then(|l| membership.get_node(&l))
            .map(|n| n.addr.clone());
        // openraft lists the leader itself among the targets; its lag is always 0.
        let replication = metrics.replication.as_ref().map(|targets| {
            targets
                .iter()
                .filter(|(id, _)| **id != metrics.id)
                .map(|(id, matched)| {
                    let matched = matched.as_ref().map(|m| m.index);
                    PeerLag {
                        id: *id,
                        matched,
                        behind: lag(matched, metrics.last_log_index),
                    }
                })
                .collect()
        });
        ClusterView {
            node: metrics.id,
            role: metrics.state.into(),
            term: metrics.current_term,
            leader: metrics.current_leader,
            leader_addr,
            last_log_index: metrics.last_log_index,
            applied_index: metrics.last_applied.as_ref().map(|l| l.index),
            changing_membership: membership.get_joint_config().len() > 1,
            members,
            replication,
        }
    }

    /// The lag of member `id`, if this is the leader's view and `id` a member.
    pub fn lag_of(&self, id: u64) -> Option<u64> {
        self.replication
            .as_ref()?
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.behind)
    }
}

/// Entries between `matched` and `last`; a member that has answered nothing yet is
/// behind by the whole log (index 0 is openraft's first entry, so that is `last + 1`).
fn lag(matched: Option<u64>, last: Option<u64>) -> u64 {
    match (matched, last) {
        (_, None) => 0,
        (None, Some(last)) => last + 1,
        (Some(m), Some(last)) => last.saturating_sub(m),
    }
}

/// Node ids are 64-bit hashes; the first 16 hex digits read as the start of the key's
/// fingerprint, so the admin matches a row to a `tallyd request` at a glance.
fn hex_id(id: u64) -> String {
    format!("{id:016x}")
}

fn or_dash<T: fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_string(), |v| v.to_string())
}

impl fmt::Display for ClusterView {
    /// An admin-readable summary and one row per member, e.g.
    ///
    /// ```text
    /// node 0000000000000001: leader, term 1
    /// leader: 0000000000000001 at 127.0.0.1:47591
    /// log: last index 5, applied 5
    ///    NODE              VOTE     ADDRESS          KEY                                      LAG
    /// *L 0000000000000001  voter    127.0.0.1:47591  3475:0f98:bd59:fcfc:946d:a45a:aabe:933b  0
    ///    0000000000000002  voter    127.0.0.1:44122  6a38:03d5:f059:902a:1c6d:afbc:9ba4:7292  3
    ///    0000000000000003  voter    127.0.0.1:57061  b62e:867f:a2f3:3afe:62d5:d6b1:642e:1621  0
    /// ```
    ///
    /// `*` marks this node and `L` the leader; LAG (entries behind) is known only on the
    /// leader and `-` elsewhere.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "node {}: {}, term {}",
            hex_id(self.node),
            self.role,
            self.term
        )?;
        match (self.leader, &self.leader_addr) {
            (Some(l), Some(addr)) => writeln!(f, "leader: {} at {addr}", hex_id(l))?,
            (Some(l), None) => writeln!(f, "leader: {} (not a member this node knows)", hex_id(l))?,
            (None, _) => writeln!(f, "leader: none known")?,
        }
        writeln!(
            f,
            "log: last index {}, applied {}",
            or_dash(self.last_log_index),
            or_dash(self.applied_index)
        )?;
        if self.changing_membership {
            writeln!(f, "membership: change in progress (joint consensus)")?;
        }
        let addr_width = self
            .members
            .iter()
            .map(|m| m.addr.len())
            .max()
            .unwrap_or(0)
            .max("ADDRESS".len());
        write!(
            f,
            "   {:<16}  {:<7}  {:<addr_width$}  {:<39}  LAG",
            "NODE", "VOTE", "ADDRESS", "KEY"
        )?;
        for m in &self.members {
            let this = if m.id == self.node { '*' } else { ' ' };
            let leader = if Some(m.id) == self.leader { 'L' } else { ' ' };
            let lag = if m.id == self.node && self.role == Role::Leader {
                "0".to_string()
            } else {
                or_dash(self.lag_of(m.id))
            };
            write!(
                f,
                "\n{this}{leader} {:<16}  {:<7}  {:<addr_width$}  {:<39}  {lag}",
                hex_id(m.id),
                if m.voter { "voter" } else { "learner" },
                m.addr,
                m.fingerprint,
            )?;
        }
        Ok(())
    }
}

/// One `/metrics` sample: metric name, labels (name, value), value.
pub type Sample = (&'static str, Vec<(&'static str, String)>, u64);

/// The cluster metrics a node exports, with their help text, in the order
/// [`prometheus_samples`] gives them; all are gauges.
pub const METRICS: [(&str, &str); 6] = [
    (
        "tally_cluster_role",
        "1 for this node's Raft role (leader, follower, candidate, learner, stopped), 0 for the others.",
    ),
    ("tally_cluster_term", "The Raft term this node is in."),
    (
        "tally_cluster_leader",
        "1 labelled with the leader's node id (hex) while a leader is known; absent otherwise.",
    ),
    (
        "tally_cluster_last_log_index",
        "Index of the last entry in this node's Raft log.",
    ),
    (
        "tally_cluster_applied_index",
        "Index of the last Raft log entry this node applied to its store.",
    ),
    (
        "tally_cluster_replication_lag_entries",
        "On the leader: log entries each other member is behind.",
    ),
];

/// The `/metrics` samples of a node's view: its role (one sample per role, 1 for the one
/// it has, so a query can sum leaders across nodes), term, leader, log and applied
/// index, and on the leader the lag of every other member.
///
/// The leader's id is a label, not a value: ids are 64-bit hashes and Prometheus values
/// are doubles, which would round them.
pub fn prometheus_samples(view: &ClusterView) -> Vec<Sample> {
    let mut samples: Vec<Sample> = Role::ALL
        .iter()
        .map(|r| {
            (
                "tally_cluster_role",
                vec![("role", r.name().to_string())],
                u64::from(*r == view.role),
            )
        })
        .collect();
    samples.push(("tally_cluster_term", Vec::new(), view.term));
    if let Some(leader) = view.leader {
        samples.push(("tally_cluster_leader", vec![("leader", hex_id(leader))], 1));
    }
    if let Some(index) = view.last_log_index {
        samples.push(("tally_cluster_last_log_index", Vec::new(), index));
    }
    if let Some(index) = view.applied_index {
        samples.push(("tally_cluster_applied_index", Vec::new(), index));
    }
    for peer in view.replication.iter().flatten() {
        samples.push((
            "tally_cluster_replication_lag_entries",
            vec![("peer", hex_id(peer.id))],
            peer.behind,
        ));
    }
    samples
}

/// Why a membership change did not happen (or did not finish).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpsError {
    /// Only the leader changes membership; the admin asks the node named here.
    #[error("node {node:016x} is not the leader; {}", leader_hint(*.leader, .leader_addr.as_deref()))]
    NotLeader {
        /// The node that was asked.
        node: u64,
        /// The leader it knows of, if any.
        leader: Option<u64>,
        /// That leader's address, if known.
        leader_addr: Option<String>,
    },
    /// The node to remove is not a member.
    #[error("node {0:016x} is not a member of the cluster")]
    UnknownNode(u64),
    /// The node to add is already a member under another address or key: remove it
    /// first (a replaced server has a new key and so a new id; see the module docs).
    #[error("node {id:016x} is already a member as {existing}, not as {requested}")]
    Conflict {
        /// The node id.
        id: u64,
        /// What the membership has for it.
        existing: PeerNode,
        /// What the caller asked for.
        requested: PeerNode,
    },
    /// Removing it would leave no voter: nobody could commit anything again.
    #[error("node {0:016x} is the last voter; a cluster needs at least one")]
    LastVoter(u64),
    /// Another membership change did not finish by the deadline; one at a time.
    #[error("another membership change is in progress; try again when it has finished")]
    InProgress,
    /// The deadline passed. `stage` says what was not done; what was done stays done
    /// (a learner added stays a learner until removed or added again).
    #[error("node {id:016x}: timed out while {stage}")]
    Timeout {
        /// The node being added or removed.
        id: u64,
        /// What the operation was waiting for.
        stage: &'static str,
    },
    /// This node's Raft stopped (shut down or a storage error).
    #[error("Raft stopped on this node: {0}")]
    Stopped(String),
    /// openraft refused the change for a reason not named above.
    #[error("membership change refused: {0}")]
    Refused(String),
}

fn leader_hint(leader: Option<u64>, addr: Option<&str>) -> String {
    match (leader, addr) {
        (Some(l), Some(a)) => format!("ask node {l:016x} at {a}"),
        (Some(l), None) => format!("ask node {l:016x}"),
        (None, _) => "no leader is known now (an election may be under way)".to_string(),
    }
}

/// The bounds the operations need: a site's Raft with [`PeerNode`]s keyed by `u64`,
/// answering writes on a oneshot (openraft's default).
pub trait SiteConfig:
    RaftTypeConfig<NodeId = u64, Node = PeerNode, Responder = OneshotResponder<Self>>
{
}

impl<C> SiteConfig for C where
    C: RaftTypeConfig<NodeId = u64, Node = PeerNode, Responder = OneshotResponder<C>>
{
}

/// `NotLeader` from this node's metrics, or `None` if it is the leader.
fn not_leader(metrics: &RaftMetrics<u64, PeerNode>) -> Option<OpsError> {
    if metrics.state == ServerState::Leader {
        return None;
    }
    let leader = metrics.current_leader;
    Some(OpsError::NotLeader {
        node: metrics.id,
        leader,
        leader_addr: leader
            .and_then(|l| metrics.membership_config.membership().get_node(&l))
            .map(|n| n.addr.clone()),
    })
}

/// Maps openraft's answer to a membership change.
fn refused(node: u64, error: RaftError<u64, ClientWriteError<u64, PeerNode>>) -> OpsError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => OpsError::NotLeader {
            node,
            leader: f.leader_id,
            leader_addr: f.leader_node.map(|n| n.addr),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::InProgress(_),
        )) => OpsError::InProgress,
        RaftError::APIError(other) => OpsError::Refused(other.to_string()),
        RaftError::Fatal(fatal) => stopped(fatal),
    }
}

fn stopped(fatal: Fatal<u64>) -> OpsError {
    OpsError::Stopped(fatal.to_string())
}

/// Proposes a membership change and waits for it to commit, until `deadline`.
///
/// openraft takes one membership change at a time and refuses another while the last
/// one is not committed, which is also the case for a moment after every election (the
/// new leader has not committed anything of its own term yet). That refusal is retried
/// at each change of this node's metrics until `deadline`; a change still in progress
/// then is [`OpsError::InProgress`], and any other step not done in time a `Timeout`
/// naming `stage`.
async fn propose<C: SiteConfig>(
    raft: &Raft<C>,
    change: ChangeMembers<u64, PeerNode>,
    id: u64,
    stage: &'static str,
    deadline: Instant,
) -> Result<u64, OpsError> {
    let me = raft.metrics().borrow().id;
    let mut changed = raft.metrics();
    loop {
        // Marked seen before proposing, so a commit during the proposal is not missed.
        changed.borrow_and_update();
        let answer =
            tokio::time::timeout_at(deadline, raft.change_membership(change.clone(), false))
                .await
                .map_err(|_| OpsError::Timeout { id, stage })?;
        match answer.map_err(|e| refused(me, e)) {
            Ok(written) => return Ok(written.log_id.index),
            Err(OpsError::InProgress) => {
                // Look again when something moved (a commit, a new term), or give up.
                match tokio::time::timeout_at(deadline, changed.changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Err(stopped(Fatal::Stopped)),
                    Err(_) => return Err(OpsError::InProgress),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Adds node `id` at `node` as a voter: first as a learner, which receives the log (or a
/// snapshot) without counting for quorum, then, once it holds everything up to its own
/// addition, as a voter. Waiting first means the new voter never makes a quorum wait
/// for a node that is still catching up. Call it on the leader.
///
/// For a site, `id` is `node.key.node_id()` and the key must be one the served bundle
/// binds, or the peers refuse the node at the TLS handshake and it never catches up.
///
/// Adding a node that is already a voter with the same address and key does nothing, so
/// an add that timed out can be run again. Past `deadline` the error is
/// [`OpsError::Timeout`]; a learner already added stays one (it costs the leader
/// replication, not quorum) until `add_node` runs again or [`remove_node`] removes it.
///
/// Why 3 or 5 voters: a change commits with a majority of voters. Three voters keep
/// working with one down, five with two down; four need three and so survive only one
/// failure, like three, with more to go wrong; two need both. One voter is a single
/// server, with no redundancy. Add and remove one node at a time, so that the site
/// passes through an even count only briefly.
pub async fn add_node<C: SiteConfig>(
    raft: &Raft<C>,
    id: u64,
    node: PeerNode,
    deadline: Instant,
) -> Result<(), OpsError> {
    let metrics = raft.metrics().borrow().clone();
    if let Some(e) = not_leader(&metrics) {
        return Err(e);
    }
    let membership = metrics.membership_config.membership();
    if let Some(existing) = membership.get_node(&id) {
        if *existing != node {
            return Err(OpsError::Conflict {
                id,
                existing: existing.clone(),
                requested: node,
            });
        }
        if membership.voter_ids().any(|v| v == id) {
            return Ok(());
        }
    }
    // As openraft's own `add_learner`, which cannot be given a deadline.
    let membership_index = propose(
        raft,
        ChangeMembers::AddNodes(BTreeMap::from([(id, node)])),
        id,
        "adding it as a learner",
        deadline,
    )
    .await?;

    // Caught up: the leader knows the learner holds the entry that added it.
    let remaining = deadline.saturating_duration_since(Instant::now());
    let caught_up = raft
        .wait(Some(remaining))
        .metrics(
            |m| {
                m.state != ServerState::Leader
                    || m.membership_config.membership().get_node(&id).is_none()
                    || m.replication
                        .as_ref()
                        .and_then(|r| r.get(&id).cloned().flatten())
                        .is_some_and(|matched| matched.index >= membership_index)
            },
            "the learner holds the log up to its addition",
        )
        .await;
    let metrics = match caught_up {
        Ok(m) => m,
        Err(WaitError::Timeout(..)) => {
            return Err(OpsError::Timeout {
                id,
                stage: "waiting for the learner to catch up (it stays a learner)",
            })
        }
        Err(WaitError::ShuttingDown) => return Err(stopped(Fatal::Stopped)),
    };
    if let Some(e) = not_leader(&metrics) {
        return Err(e);
    }
    if metrics
        .membership_config
        .membership()
        .get_node(&id)
        .is_none()
    {
        // Someone removed it meanwhile.
        return Err(OpsError::UnknownNode(id));
    }

    propose(
        raft,
        ChangeMembers::AddVoterIds(BTreeSet::from([id])),
        id,
        "making it a voter (the change may still complete: show the cluster)",
        deadline,
    )
    .await?;
    Ok(())
}

/// Removes node `id` from the cluster, voter or learner. Call it on the leader; a
/// leader removing itself steps down once the change is committed, and the others elect
/// a new one.
///
/// Refuses to remove the last voter: a cluster without voters can never commit again.
/// It does not refuse going to an even count or to one voter, which an admin replacing a
/// node passes through; see [`add_node`] for why 3 or 5 voters is the aim.
///
/// Past `deadline` the error is [`OpsError::Timeout`] and the change may still complete
/// (openraft goes on with it): show the cluster to see.
pub async fn remove_node<C: SiteConfig>(
    raft: &Raft<C>,
    id: u64,
    deadline: Instant,
) -> Result<(), OpsError> {
    let metrics = raft.metrics().borrow().clone();
    if let Some(e) = not_leader(&metrics) {
        return Err(e);
    }
    let membership = metrics.membership_config.membership();
    if membership.get_node(&id).is_none() {
        return Err(OpsError::UnknownNode(id));
    }
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let change = if voters.contains(&id) {
        if voters.len() == 1 {
            return Err(OpsError::LastVoter(id));
        }
        ChangeMembers::RemoveVoters(BTreeSet::from([id]))
    } else {
        ChangeMembers::RemoveNodes(BTreeSet::from([id]))
    };
    propose(
        raft,
        change,
        id,
        "removing it (the change may still complete: show the cluster)",
        deadline,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(role: Role, leader: Option<u64>) -> ClusterView {
        ClusterView {
            node: 2,
            role,
            term: 7,
            leader,
            leader_addr: leader.map(|_| "127.0.0.1:1".to_string()),
            last_log_index: Some(9),
            applied_index: Some(8),
            changing_membership: true,
            members: vec![
                Member {
                    id: 1,
                    addr: "127.0.0.1:1".into(),
                    fingerprint: "aaaa".into(),
                    voter: true,
                },
                Member {
                    id: 2,
                    addr: "127.0.0.1:2".into(),
                    fingerprint: "bbbb".into(),
                    voter: false,
                },
            ],
            replication: None,
        }
    }

    #[test]
    fn lag_counts_entries_behind_and_the_whole_log_before_a_first_answer() {
        assert_eq!(lag(Some(9), Some(9)), 0);
        assert_eq!(lag(Some(6), Some(9)), 3);
        assert_eq!(lag(None, Some(9)), 10);
        assert_eq!(lag(None, None), 0);
        // A member ahead of a stale metrics snapshot is not negative.
        assert_eq!(lag(Some(10), Some(9)), 0);
    }

    #[test]
    fn a_learner_without_a_leader_says_so_in_table_and_samples() {
        let v = view(Role::Learner, None);
        let table = v.to_string();
        assert!(
            table.starts_with("node 0000000000000002: learner, term 7\n"),
            "{table}"
        );
        assert!(table.contains("leader: none known"), "{table}");
        assert!(table.contains("log: last index 9, applied 8"), "{table}");
        assert!(table.contains("change in progress"), "{table}");
        assert!(table.contains("\n*  0000000000000002  learner"), "{table}");
        assert!(table.contains("\n   0000000000000001  voter"), "{table}");
        let samples = prometheus_samples(&v);
        let ones: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.0 == "tally_cluster_role" && s.2 == 1)
            .collect();
        assert_eq!(ones.len(), 1);
        assert_eq!(ones[0].1, [("role", "learner".to_string())]);
        assert!(!samples.iter().any(|s| s.0 == "tally_cluster_leader"));
        assert!(samples.contains(&("tally_cluster_applied_index", vec![], 8)));
        // Every sample is one of the documented metrics.
        assert!(samples
            .iter()
            .all(|s| METRICS.iter().any(|(name, _)| *name == s.0)));
    }

    #[test]
    fn a_view_reads_back_from_its_versioned_body() {
        let v = view(Role::Follower, Some(1));
        let text = serde_json::to_string(&ClusterViewBody::from(v.clone())).unwrap();
        let back: ClusterViewBody = serde_json::from_str(&text).unwrap();
        assert_eq!(ClusterView::from(back), v);
        assert!(v
            .to_string()
            .contains("leader: 0000000000000001 at 127.0.0.1:1"));
    }
}
