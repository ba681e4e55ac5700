//! Nodes of an in-process cluster for the tests: each its own openraft over the sled
//! store in a temporary directory, its own quinn endpoint on loopback and its own node key.

use super::{NodeId, TestConfig, Values};
use openraft::{Config, Raft};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tally_cluster::net::{serve_peer, tls, PeerIdentity, PeerKeys, PeerNode, QuicNetwork};
use tally_protocol::keys::SecretKey;

/// Every wait in these tests ends by this deadline; elections take well under a second.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub struct Node {
    /// The node's Raft id.
    pub id: NodeId,
    pub raft: Raft<TestConfig>,
    pub machine: Values,
    /// The node's Raft store directory, kept while the node runs.
    pub dir: tempfile::TempDir,
    pub endpoint: quinn::Endpoint,
    pub server: tokio::task::JoinHandle<()>,
}

pub fn key(id: NodeId) -> SecretKey {
    SecretKey::from_seed([id as u8; 32])
}

pub fn raft_config() -> Arc<Config> {
    let config = Config {
        cluster_name: "tally-test".into(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        ..Config::default()
    };
    Arc::new(config.validate().expect("a valid Raft config"))
}

/// A bound endpoint accepting peers whose keys are in `allowed`.
pub fn endpoint(id: NodeId, allowed: &PeerKeys) -> (quinn::Endpoint, Arc<PeerIdentity>) {
    let identity = Arc::new(PeerIdentity::new(&key(id)).unwrap());
    let config = tls::server_config(&identity, allowed.clone()).unwrap();
    let endpoint =
        quinn::Endpoint::server(config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
    (endpoint, identity)
}

/// Starts node `id` on `endpoint`: its Raft, and the accept loop handing each peer
/// connection to `serve_peer`.
pub async fn start(
    id: NodeId,
    endpoint: quinn::Endpoint,
    identity: Arc<PeerIdentity>,
    allowed: PeerKeys,
    config: Arc<Config>,
) -> Node {
    let stored = super::open_store();
    let machine = stored.values;
    let network = QuicNetwork::new(id, endpoint.clone(), identity);
    let raft = Raft::new(id, config, network, stored.log, stored.machine)
        .await
        .unwrap();
    let server = tokio::spawn({
        let (endpoint, raft) = (endpoint.clone(), raft.clone());
        async move {
            while let Some(incoming) = endpoint.accept().await {
                let (raft, allowed) = (raft.clone(), allowed.clone());
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        let _ = serve_peer(conn, raft, allowed).await;
                    }
                });
            }
        }
    });
    Node {
        id,
        raft,
        machine,
        dir: stored.dir,
        endpoint,
        server,
    }
}

pub fn peer_node(id: NodeId, endpoint: &quinn::Endpoint) -> PeerNode {
    PeerNode {
        addr: endpoint.local_addr().unwrap().to_string(),
        key: key(id).public(),
    }
}

/// Three nodes, formed into a cluster by node 1.
pub async fn cluster() -> (Vec<Node>, BTreeMap<NodeId, PeerNode>, PeerKeys) {
    cluster_with(
        raft_config(),
        PeerKeys::new((1..=3).map(|id| key(id).public())),
    )
    .await
}

/// Three nodes with `config`, accepting the keys in `allowed`, formed by node 1.
pub async fn cluster_with(
    config: Arc<Config>,
    allowed: PeerKeys,
) -> (Vec<Node>, BTreeMap<NodeId, PeerNode>, PeerKeys) {
    let mut members = BTreeMap::new();
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let (endpoint, identity) = endpoint(id, &allowed);
        members.insert(id, peer_node(id, &endpoint));
        nodes.push(start(id, endpoint, identity, allowed.clone(), config.clone()).await);
    }
    nodes[0].raft.initialize(members.clone()).await.unwrap();
    (nodes, members, allowed)
}

/// Waits until every node in `nodes` names the same leader, one of them and not `not`.
pub async fn agreed_leader(nodes: &[&Node], not: Option<NodeId>) -> NodeId {
    let ids: Vec<NodeId> = nodes.iter().map(|n| n.id).collect();
    let mut leader = None;
    for node in nodes {
        let m = node
            .raft
            .wait(Some(DEADLINE))
            .metrics(
                |m| {
                    m.current_leader
                        .is_some_and(|l| ids.contains(&l) && Some(l) != not)
                },
                "a leader among the live nodes",
            )
            .await
            .unwrap();
        leader.get_or_insert(m.current_leader.unwrap());
    }
    // Terms may still move; ask again until all agree, within the deadline.
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut seen = Vec::new();
        for node in nodes {
            seen.push(node.raft.current_leader().await);
        }
        if let Some(Some(l)) = seen.first().copied() {
            if seen.iter().all(|s| *s == Some(l)) && ids.contains(&l) && Some(l) != not {
                return l;
            }
        }
        assert!(
            tokio::time::Instant::now() < until,
            "nodes do not agree on a leader: {seen:?}"
        );
        // Leadership settles within heartbeats; look again at the next metrics change.
        let _ = tokio::time::timeout(
            Duration::from_millis(200),
            nodes[0].raft.metrics().changed(),
        )
        .await;
    }
}

/// Waits until every node in `nodes` has applied `values` (in that order).
pub async fn applied_everywhere(nodes: &[&Node], index: u64, values: &[&str]) {
    for node in nodes {
        node.raft
            .wait(Some(DEADLINE))
            .applied_index_at_least(Some(index), "the write applied")
            .await
            .unwrap();
        assert_eq!(node.machine.values().await, values, "node {}", node.id);
    }
}

pub async fn stop(node: Node) {
    node.raft.shutdown().await.unwrap();
    node.endpoint.close(0u32.into(), b"node stopped");
    node.server.abort();
}
