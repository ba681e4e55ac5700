//! Three openraft nodes in one process over the QUIC peer transport with mutual TLS:
//! each has its own quinn endpoint on loopback and its own node key.

mod support;

use openraft::error::RPCError;
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::VoteRequest;
use openraft::{Config, Vote};
use std::sync::Arc;
use std::time::Duration;
use support::nodes::{
    agreed_leader, applied_everywhere, cluster, cluster_with, endpoint, key, peer_node,
    raft_config, start, stop, Node, DEADLINE,
};
use support::{NodeId, TestConfig};
use tally_cluster::net::{PeerKeys, QuicNetwork};

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
