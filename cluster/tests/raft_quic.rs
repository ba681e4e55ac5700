//! Three openraft nodes in one process over the QUIC peer transport with mutual TLS:
//! each has its own quinn endpoint on loopback and its own node key.

mod support;

use openraft::error::RPCError;
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::VoteRequest;
use openraft::{Config, Raft, Vote};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use support::{NodeId, TestConfig, Values};
use tally_cluster::net::{serve_peer, tls, PeerIdentity, PeerKeys, PeerNode, QuicNetwork};
use tally_protocol::keys::SecretKey;

/// Every wait in these tests ends by this deadline; elections take well under a second.
const DEADLINE: Duration = Duration::from_secs(20);

struct Node {
    id: NodeId,
    raft: Raft<TestConfig>,
    machine: Values,
    /// The node's Raft store directory, kept while the node runs.
    _dir: tempfile::TempDir,
    endpoint: quinn::Endpoint,
    server: tokio::task::JoinHandle<()>,
}

fn key(id: NodeId) -> SecretKey {
    SecretKey::from_seed([id as u8; 32])
}

fn raft_config() -> Arc<Config> {
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
fn endpoint(id: NodeId, allowed: &PeerKeys) -> (quinn::Endpoint, Arc<PeerIdentity>) {
    let identity = Arc::new(PeerIdentity::new(&key(id)).unwrap());
    let config = tls::server_config(&identity, allowed.clone()).unwrap();
    let endpoint =
        quinn::Endpoint::server(config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
    (endpoint, identity)
}

/// Starts node `id` on `endpoint`: its Raft, and the accept loop handing each peer
/// connection to `serve_peer`.
async fn start(
    id: NodeId,
    endpoint: quinn::Endpoint,
    identity: Arc<PeerIdentity>,
    allowed: PeerKeys,
    config: Arc<Config>,
) -> Node {
    let stored = support::open_store();
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
        _dir: stored.dir,
        endpoint,
        server,
    }
}

fn peer_node(id: NodeId, endpoint: &quinn::Endpoint) -> PeerNode {
    PeerNode {
        addr: endpoint.local_addr().unwrap().to_string(),
        key: key(id).public(),
    }
}

/// Three nodes, formed into a cluster by node 1.
async fn cluster() -> (Vec<Node>, BTreeMap<NodeId, PeerNode>, PeerKeys) {
    cluster_with(
        raft_config(),
        PeerKeys::new((1..=3).map(|id| key(id).public())),
    )
    .await
}

/// Three nodes with `config`, accepting the keys in `allowed`, formed by node 1.
async fn cluster_with(
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
async fn agreed_leader(nodes: &[&Node], not: Option<NodeId>) -> NodeId {
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
async fn applied_everywhere(nodes: &[&Node], index: u64, values: &[&str]) {
    for node in nodes {
        node.raft
            .wait(Some(DEADLINE))
            .applied_index_at_least(Some(index), "the write applied")
            .await
            .unwrap();
        assert_eq!(node.machine.values().await, values, "node {}", node.id);
    }
}

async fn stop(node: Node) {
    node.raft.shutdown().await.unwrap();
    node.endpoint.close(0u32.into(), b"node stopped");
    node.server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_quic_elect_replicate_and_fail_over() {
    let (mut nodes, _members, _allowed) = cluster().await;
    let leader = agreed_leader(&nodes.iter().collect::<Vec<_>>(), None).await;
    let at = |id: NodeId, nodes: &[Node]| nodes.iter().position(|n| n.id == id).unwrap();

    let written = nodes[at(leader, &nodes)]
        .raft
        .client_write("first".to_string())
        .await
        .unwrap();
    applied_everywhere(
        &nodes.iter().collect::<Vec<_>>(),
        written.log_id.index,
        &["first"],
    )
    .await;

    // The leader goes away: Raft shut down and its endpoint closed, as a killed tallyd.
    let old = nodes.remove(at(leader, &nodes));
    let stopped = std::time::Instant::now();
    stop(old).await;
    let live: Vec<&Node> = nodes.iter().collect();
    let new_leader = agreed_leader(&live, Some(leader)).await;
    let written = nodes[at(new_leader, &nodes)]
        .raft
        .client_write("second".to_string())
        .await
        .unwrap();
    applied_everywhere(&live, written.log_id.index, &["first", "second"]).await;
    println!(
        "leader {leader} stopped; leader {new_leader} committed a write on both survivors after {:?} \
         (election timeout 400-800 ms)",
        stopped.elapsed()
    );

    for node in nodes {
        stop(node).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_endpoint_with_an_unknown_key_cannot_take_part() {
    let (nodes, members, _allowed) = cluster().await;
    let all: Vec<&Node> = nodes.iter().collect();
    let leader = agreed_leader(&all, None).await;
    let term_before = nodes[0].raft.metrics().borrow().current_term;

    // The stranger has a key of its own and knows the nodes' addresses and keys.
    let stranger_keys = PeerKeys::new([key(9).public()]);
    let (stranger_endpoint, stranger_identity) = endpoint(9, &stranger_keys);
    let mut network = QuicNetwork::new(9, stranger_endpoint.clone(), stranger_identity);
    let option = RPCOption::new(Duration::from_secs(5));
    for (id, node) in &members {
        let mut client =
            RaftNetworkFactory::<TestConfig>::new_client(&mut network, *id, node).await;
        // A vote with a far higher term would depose the leader if it reached Raft.
        let vote = VoteRequest::new(Vote::new(term_before + 100, 9), None);
        let answer = client.vote(vote, option.clone()).await;
        assert!(
            matches!(answer, Err(RPCError::Unreachable(_))),
            "node {id} must refuse the stranger at the handshake: {answer:?}"
        );
    }

    // Nothing reached Raft: the same leader in the same term still commits writes.
    let written = nodes[(leader - 1) as usize]
        .raft
        .client_write("after the stranger".to_string())
        .await
        .unwrap();
    applied_everywhere(&all, written.log_id.index, &["after the stranger"]).await;
    let metrics = nodes[0].raft.metrics().borrow().clone();
    assert_eq!(metrics.current_term, term_before);
    assert_eq!(metrics.current_leader, Some(leader));

    stranger_endpoint.close(0u32.into(), b"done");
    for node in nodes {
        stop(node).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_node_catches_up_from_a_snapshot_sent_in_chunks() {
    // Small chunks so that one snapshot takes many install_snapshot RPCs.
    let config = Config {
        snapshot_max_chunk_size: 64,
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
        ..(*raft_config()).clone()
    };
    let config = Arc::new(config.validate().unwrap());
    let allowed = PeerKeys::new((1..=4).map(|id| key(id).public()));
    let (nodes, _members, allowed) = cluster_with(config.clone(), allowed).await;
    let all: Vec<&Node> = nodes.iter().collect();
    let leader = agreed_leader(&all, None).await;
    let leader = &nodes[(leader - 1) as usize];
    let values: Vec<String> = (0..20).map(|i| format!("value number {i}")).collect();
    let mut last = 0;
    for value in &values {
        last = leader
            .raft
            .client_write(value.clone())
            .await
            .unwrap()
            .log_id
            .index;
    }
    // Snapshot and drop the log behind it, so a newcomer can only be sent the snapshot.
    leader.raft.trigger().snapshot().await.unwrap();
    leader
        .raft
        .wait(Some(DEADLINE))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= last),
            "the snapshot is built",
        )
        .await
        .unwrap();
    leader.raft.trigger().purge_log(last).await.unwrap();
    leader
        .raft
        .wait(Some(DEADLINE))
        .metrics(
            |m| m.purged.is_some_and(|p| p.index >= last),
            "the log is purged",
        )
        .await
        .unwrap();

    let (endpoint4, identity4) = endpoint(4, &allowed);
    let node4 = peer_node(4, &endpoint4);
    let late = start(4, endpoint4, identity4, allowed, config).await;
    leader.raft.add_learner(4, node4, true).await.unwrap();
    late.raft
        .wait(Some(DEADLINE))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= last),
            "the learner installed the leader's snapshot",
        )
        .await
        .unwrap();
    late.raft
        .wait(Some(DEADLINE))
        .applied_index_at_least(Some(last), "the learner caught up")
        .await
        .unwrap();
    assert_eq!(late.machine.values().await, values);

    stop(late).await;
    for node in nodes {
        stop(node).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_removed_from_the_allowed_keys_is_refused_on_its_open_connection() {
    let (nodes, members, allowed) = cluster().await;
    let all: Vec<&Node> = nodes.iter().collect();
    let leader = agreed_leader(&all, None).await;
    let leader_node = &members[&leader];

    // Node 3's key dials the leader and is answered.
    let (endpoint3, identity3) = endpoint(3, &allowed);
    let mut network = QuicNetwork::new(3, endpoint3.clone(), identity3);
    let mut client =
        RaftNetworkFactory::<TestConfig>::new_client(&mut network, leader, leader_node).await;
    let option = RPCOption::new(Duration::from_secs(5));
    let stale = || VoteRequest::new(Vote::new(0, 3), None);
    let answer = client.vote(stale(), option.clone()).await;
    assert!(matches!(answer, Ok(ref v) if !v.vote_granted), "{answer:?}");

    // A bundle reload drops node 3: its next RPC, on the same connection, is refused, and
    // so is a fresh dial.
    allowed.replace([key(1).public(), key(2).public()]);
    let answer = client.vote(stale(), option.clone()).await;
    assert!(
        matches!(answer, Err(RPCError::Unreachable(_))),
        "{answer:?}"
    );
    let answer = client.vote(stale(), option.clone()).await;
    assert!(
        matches!(answer, Err(RPCError::Unreachable(_))),
        "{answer:?}"
    );

    endpoint3.close(0u32.into(), b"done");
    for node in nodes {
        stop(node).await;
    }
}
