//! Cluster operations (`tally_cluster::ops`) on three in-process nodes over real QUIC.

mod support;

use openraft::{Config, SnapshotPolicy};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use support::nodes::{
    agreed_leader, applied_everywhere, cluster, cluster_with, endpoint, key, peer_node,
    raft_config, start, stop, Node, DEADLINE,
};
use tally_cluster::net::PeerKeys;
use tally_cluster::ops::{
    add_node, prometheus_samples, remove_node, ClusterView, ClusterViewBody, OpsError, Role, Sample,
};

fn view(node: &Node) -> ClusterView {
    ClusterView::from_metrics(&node.raft.metrics().borrow())
}

/// Waits until the leader's view says every other member is `behind` entries behind
/// (`behind == 0`: all caught up).
async fn leader_sees_lag(
    leader: &Node,
    members: &[u64],
    behind: impl Fn(u64) -> u64 + Send + Sync,
) -> ClusterView {
    let m = leader
        .raft
        .wait(Some(DEADLINE))
        .metrics(
            |m| {
                let v = ClusterView::from_metrics(m);
                members
                    .iter()
                    .filter(|id| **id != v.node)
                    .all(|id| v.lag_of(*id) == Some(behind(*id)))
            },
            "the leader's view shows the expected lag",
        )
        .await
        .unwrap();
    ClusterView::from_metrics(&m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_and_follower_views_agree_and_lag_follows_replication() {
    let (nodes, members, _allowed) = cluster().await;
    let all: Vec<&Node> = nodes.iter().collect();
    let leader_id = agreed_leader(&all, None).await;
    let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();
    let follower = nodes.iter().find(|n| n.id != leader_id).unwrap();
    let follower_id = follower.id;
    let ids: Vec<u64> = members.keys().copied().collect();

    let written = leader.raft.client_write("one".to_string()).await.unwrap();
    applied_everywhere(&all, written.log_id.index, &["one"]).await;
    let on_leader = leader_sees_lag(leader, &ids, |_| 0).await;
    follower
        .raft
        .wait(Some(DEADLINE))
        .metrics(
            |m| m.current_leader == Some(leader_id),
            "the follower knows the leader",
        )
        .await
        .unwrap();
    let on_follower = view(follower);

    // Both name the same leader, term and members.
    assert_eq!(on_leader.role, Role::Leader);
    assert_eq!(on_follower.role, Role::Follower);
    assert_eq!(on_leader.node, leader_id);
    assert_eq!(on_follower.node, follower_id);
    for v in [&on_leader, &on_follower] {
        assert_eq!(v.leader, Some(leader_id));
        assert_eq!(
            v.leader_addr.as_deref(),
            Some(members[&leader_id].addr.as_str())
        );
        assert!(!v.changing_membership);
        let listed: BTreeSet<u64> = v.members.iter().map(|m| m.id).collect();
        assert_eq!(listed, members.keys().copied().collect());
        for m in &v.members {
            assert!(m.voter, "{m:?}");
            assert_eq!(m.addr, members[&m.id].addr);
            assert_eq!(m.fingerprint, members[&m.id].key.fingerprint());
        }
    }
    assert_eq!(on_leader.term, on_follower.term);
    assert_eq!(on_leader.members, on_follower.members);
    assert!(on_leader.applied_index >= Some(written.log_id.index));
    assert!(on_follower.applied_index >= Some(written.log_id.index));
    // Only the leader knows replication; it lists the two others, not itself.
    assert_eq!(on_leader.replication.as_ref().map(Vec::len), Some(2));
    assert_eq!(on_follower.replication, None);

    // The table names each member and marks the leader.
    let table = on_leader.to_string();
    println!("{table}");
    assert!(table.contains("leader, term"), "{table}");
    for m in members.values() {
        assert!(table.contains(&m.key.fingerprint()), "{table}");
        assert!(table.contains(&m.addr), "{table}");
    }

    // The view crosses the wire versioned, and reads back the same.
    let json = serde_json::to_string(&ClusterViewBody::from(on_leader.clone())).unwrap();
    assert!(json.starts_with("{\"V1\":"), "{json}");
    let back: ClusterViewBody = serde_json::from_str(&json).unwrap();
    assert_eq!(ClusterView::from(back), on_leader);

    // /metrics: the leader says leader=1 and zero lag per peer; the follower no lag.
    let samples = prometheus_samples(&on_leader);
    let role = |samples: &[Sample], r: &str| {
        samples
            .iter()
            .find(|(n, l, _)| *n == "tally_cluster_role" && l[0].1 == r)
            .map(|s| s.2)
    };
    assert_eq!(role(&samples, "leader"), Some(1));
    assert_eq!(role(&samples, "follower"), Some(0));
    let lags: Vec<u64> = samples
        .iter()
        .filter(|s| s.0 == "tally_cluster_replication_lag_entries")
        .map(|s| s.2)
        .collect();
    assert_eq!(lags, [0, 0]);
    assert!(samples.contains(&("tally_cluster_term", vec![], on_leader.term)));
    let follower_samples = prometheus_samples(&on_follower);
    assert_eq!(role(&follower_samples, "follower"), Some(1));
    assert_eq!(role(&follower_samples, "leader"), Some(0));
    assert!(!follower_samples
        .iter()
        .any(|s| s.0 == "tally_cluster_replication_lag_entries"));
    assert!(follower_samples.contains(&(
        "tally_cluster_leader",
        vec![("leader", format!("{leader_id:016x}"))],
        1
    )));

    // A stopped follower falls behind by exactly the entries committed without it.
    let mut nodes = nodes;
    let gone = nodes.remove(nodes.iter().position(|n| n.id == follower_id).unwrap());
    let gone_id = gone.id;
    stop(gone).await;
    let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();
    for value in ["two", "three", "four"] {
        leader.raft.client_write(value.to_string()).await.unwrap();
    }
    let on_leader = leader_sees_lag(leader, &ids, |id| if id == gone_id { 3 } else { 0 }).await;
    println!("{on_leader}");

    for node in nodes {
        stop(node).await;
    }
}

fn deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + DEADLINE
}

/// The ids of voters and learners in `node`'s view.
fn voters_and_learners(node: &Node) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let v = view(node);
    let voters = v.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
    let learners = v
        .members
        .iter()
        .filter(|m| !m.voter)
        .map(|m| m.id)
        .collect();
    (voters, learners)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_is_added_as_a_voter_and_removed_again() {
    let allowed = PeerKeys::new((1..=4).map(|id| key(id).public()));
    let (nodes, members, allowed) = cluster_with(raft_config(), allowed).await;
    let all: Vec<&Node> = nodes.iter().collect();
    let leader_id = agreed_leader(&all, None).await;
    let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();
    let written = leader
        .raft
        .client_write("before".to_string())
        .await
        .unwrap();
    applied_everywhere(&all, written.log_id.index, &["before"]).await;

    let (endpoint4, identity4) = endpoint(4, &allowed);
    let node4 = peer_node(4, &endpoint4);
    let fourth = start(4, endpoint4, identity4, allowed.clone(), raft_config()).await;

    // Asked on a follower: refused, naming the leader and where it is.
    let follower = nodes.iter().find(|n| n.id != leader_id).unwrap();
    follower
        .raft
        .wait(Some(DEADLINE))
        .metrics(
            |m| m.current_leader == Some(leader_id),
            "the follower knows the leader",
        )
        .await
        .unwrap();
    let refused = add_node(&follower.raft, 4, node4.clone(), deadline()).await;
    match &refused {
        Err(OpsError::NotLeader {
            node,
            leader,
            leader_addr,
        }) => {
            assert_eq!(*node, follower.id);
            assert_eq!(*leader, Some(leader_id));
            assert_eq!(
                leader_addr.as_deref(),
                Some(members[&leader_id].addr.as_str())
            );
        }
        other => panic!("expected NotLeader, got {other:?}"),
    }
    let message = refused.unwrap_err().to_string();
    assert!(message.contains(&members[&leader_id].addr), "{message}");
    // An id that is a member under another key is not silently re-pointed.
    let conflict = add_node(&leader.raft, 2, node4.clone(), deadline()).await;
    assert!(
        matches!(conflict, Err(OpsError::Conflict { id: 2, .. })),
        "{conflict:?}"
    );

    add_node(&leader.raft, 4, node4.clone(), deadline())
        .await
        .unwrap();
    let (voters, learners) = voters_and_learners(leader);
    assert_eq!(voters, BTreeSet::from([1, 2, 3, 4]));
    assert!(learners.is_empty());
    // It received what was written before it came, and takes part from now on.
    let written = leader.raft.client_write("after".to_string()).await.unwrap();
    let mut four: Vec<&Node> = nodes.iter().collect();
    four.push(&fourth);
    applied_everywhere(&four, written.log_id.index, &["before", "after"]).await;
    assert_eq!(view(&fourth).role, Role::Follower);
    // Adding it again changes nothing.
    add_node(&leader.raft, 4, node4, deadline()).await.unwrap();
    assert_eq!(voters_and_learners(leader).0.len(), 4);

    remove_node(&leader.raft, 4, deadline()).await.unwrap();
    let v = view(leader);
    assert_eq!(
        v.members.iter().map(|m| m.id).collect::<BTreeSet<_>>(),
        BTreeSet::from([1, 2, 3])
    );
    assert_eq!(v.lag_of(4), None, "the leader still replicates to 4: {v}");
    let written = leader
        .raft
        .client_write("without 4".to_string())
        .await
        .unwrap();
    applied_everywhere(
        &all,
        written.log_id.index,
        &["before", "after", "without 4"],
    )
    .await;
    // Removing it again names the mistake.
    let again = remove_node(&leader.raft, 4, deadline()).await;
    assert!(matches!(again, Err(OpsError::UnknownNode(4))), "{again:?}");

    stop(fourth).await;
    for node in nodes {
        stop(node).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_catch_up_times_out_as_a_learner_and_is_removed() {
    // Node 5 accepts no key of this site (as a server holding another site's bundle):
    // it refuses the leader at the handshake, so it never receives the log.
    let (nodes, _members, _allowed) = cluster().await;
    let allowed = PeerKeys::new([key(5).public()]);
    let all: Vec<&Node> = nodes.iter().collect();
    let leader_id = agreed_leader(&all, None).await;
    let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();
    let (endpoint5, identity5) = endpoint(5, &allowed);
    let node5 = peer_node(5, &endpoint5);
    let fifth = start(5, endpoint5, identity5, allowed.clone(), raft_config()).await;

    let soon = tokio::time::Instant::now() + Duration::from_secs(2);
    let timed_out = add_node(&leader.raft, 5, node5, soon).await;
    assert!(
        matches!(timed_out, Err(OpsError::Timeout { id: 5, .. })),
        "{timed_out:?}"
    );
    println!("{}", timed_out.unwrap_err());
    let (voters, learners) = voters_and_learners(leader);
    assert_eq!(voters, BTreeSet::from([1, 2, 3]));
    assert_eq!(learners, BTreeSet::from([5]));
    // The learner does not count for quorum: writes commit meanwhile.
    let written = leader
        .raft
        .client_write("meanwhile".to_string())
        .await
        .unwrap();
    applied_everywhere(&all, written.log_id.index, &["meanwhile"]).await;

    remove_node(&leader.raft, 5, deadline()).await.unwrap();
    let (voters, learners) = voters_and_learners(leader);
    assert_eq!(voters, BTreeSet::from([1, 2, 3]));
    assert!(learners.is_empty());

    stop(fifth).await;
    for node in nodes {
        stop(node).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_follower_is_not_needed_and_the_last_voter_stays() {
    let (mut nodes, _members, _allowed) = cluster().await;
    let all: Vec<&Node> = nodes.iter().collect();
    let leader_id = agreed_leader(&all, None).await;
    let followers: Vec<u64> = nodes
        .iter()
        .map(|n| n.id)
        .filter(|id| *id != leader_id)
        .collect();
    let at = |id: u64, nodes: &[Node]| nodes.iter().position(|n| n.id == id).unwrap();

    // Remove one follower and stop it: the two left commit (both are needed now).
    remove_node(&nodes[at(leader_id, &nodes)].raft, followers[0], deadline())
        .await
        .unwrap();
    stop(nodes.remove(at(followers[0], &nodes))).await;
    let leader = &nodes[at(leader_id, &nodes)];
    assert_eq!(
        voters_and_learners(leader).0,
        BTreeSet::from([leader_id, followers[1]])
    );
    let written = leader
        .raft
        .client_write("with two".to_string())
        .await
        .unwrap();
    applied_everywhere(
        &nodes.iter().collect::<Vec<_>>(),
        written.log_id.index,
        &["with two"],
    )
    .await;

    // Down to one voter is allowed (a single server); below it is not.
    remove_node(&leader.raft, followers[1], deadline())
        .await
        .unwrap();
    assert_eq!(voters_and_learners(leader).0, BTreeSet::from([leader_id]));
    let last = remove_node(&leader.raft, leader_id, deadline()).await;
    assert!(
        matches!(last, Err(OpsError::LastVoter(id)) if id == leader_id),
        "{last:?}"
    );
    let written = leader.raft.client_write("alone".to_string()).await.unwrap();
    leader
        .raft
        .wait(Some(DEADLINE))
        .applied_index_at_least(Some(written.log_id.index), "the lone voter commits")
        .await
        .unwrap();
    assert_eq!(leader.machine.values().await, ["with two", "alone"]);

    for node in nodes {
        stop(node).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_replaced_by_a_new_one_that_gets_the_state_by_snapshot() {
    // A small snapshot policy, and no log kept behind a snapshot: by the time the new
    // node joins, the start of the log exists only inside the snapshot.
    let config = Config {
        snapshot_policy: SnapshotPolicy::LogsSinceLast(5),
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
        ..(*raft_config()).clone()
    };
    let config = Arc::new(config.validate().unwrap());
    let allowed = PeerKeys::new((1..=3).map(|id| key(id).public()));
    let (mut nodes, _members, allowed) = cluster_with(config.clone(), allowed).await;
    let at = |id: u64, nodes: &[Node]| nodes.iter().position(|n| n.id == id).unwrap();
    let leader_id = agreed_leader(&nodes.iter().collect::<Vec<_>>(), None).await;
    let mut values: Vec<String> = Vec::new();
    for i in 0..5 {
        values.push(format!("before {i}"));
        let leader = &nodes[at(leader_id, &nodes)];
        leader.raft.client_write(values[i].clone()).await.unwrap();
    }

    // The leader dies and its disk with it.
    let dead = nodes.remove(at(leader_id, &nodes));
    let dead_dir = dead.dir.path().to_path_buf();
    stop(dead).await;
    assert!(!dead_dir.exists(), "the dead node's store is gone");
    let survivors: Vec<u64> = nodes.iter().map(|n| n.id).collect();
    let leader_id = agreed_leader(&nodes.iter().collect::<Vec<_>>(), Some(leader_id)).await;
    let dead_id = (1..=3).find(|id| !survivors.contains(id)).unwrap();
    let leader = &nodes[at(leader_id, &nodes)];

    // 1. The new bundle binds the survivors and the new node's key (a new key: a new id).
    allowed.replace([
        key(survivors[0]).public(),
        key(survivors[1]).public(),
        key(4).public(),
    ]);
    // 2. The dead node leaves the membership: the two survivors are the quorum.
    remove_node(&leader.raft, dead_id, deadline())
        .await
        .unwrap();
    assert_eq!(
        voters_and_learners(leader).0,
        survivors.iter().copied().collect::<BTreeSet<_>>()
    );
    // Writes go on meanwhile; snapshots are taken and the log behind them purged.
    let mut last = 0;
    for i in 0..12 {
        values.push(format!("meanwhile {i}"));
        last = leader
            .raft
            .client_write(values.last().unwrap().clone())
            .await
            .unwrap()
            .log_id
            .index;
    }
    let purged = leader
        .raft
        .wait(Some(DEADLINE))
        .metrics(
            |m| m.purged.is_some_and(|p| p.index >= 10),
            "the leader purged the start of its log",
        )
        .await
        .unwrap()
        .purged
        .unwrap()
        .index;
    assert!(purged <= last);

    // 3. The new node starts with a fresh store and is added by the leader.
    let (endpoint4, identity4) = endpoint(4, &allowed);
    let node4 = peer_node(4, &endpoint4);
    let new = start(4, endpoint4, identity4, allowed.clone(), config).await;
    add_node(&leader.raft, 4, node4, deadline()).await.unwrap();
    let v = view(leader);
    println!("{v}");
    assert_eq!(
        v.members
            .iter()
            .filter(|m| m.voter)
            .map(|m| m.id)
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([survivors[0], survivors[1], 4])
    );
    assert!(v.members.iter().all(|m| m.id != dead_id));

    // It holds every value, including those only the snapshot still had (entries up to
    // `purged` can no longer be sent as log entries).
    new.raft
        .wait(Some(DEADLINE))
        .applied_index_at_least(Some(last), "the new node caught up")
        .await
        .unwrap();
    assert_eq!(new.machine.values().await, values);
    let installed = new.raft.metrics().borrow().snapshot;
    assert!(
        installed.is_some_and(|s| s.index >= purged),
        "{installed:?}"
    );

    // 4. The cluster commits with it: even with the other survivor stopped, the leader
    // and the new node are a quorum of three.
    let other = survivors.into_iter().find(|id| *id != leader_id).unwrap();
    stop(nodes.remove(at(other, &nodes))).await;
    let leader = &nodes[at(leader_id, &nodes)];
    values.push("with the new node".to_string());
    let written = tokio::time::timeout(
        DEADLINE,
        leader.raft.client_write(values.last().unwrap().clone()),
    )
    .await
    .expect("the leader and the new node commit")
    .unwrap();
    new.raft
        .wait(Some(DEADLINE))
        .applied_index_at_least(Some(written.log_id.index), "the new node applied it")
        .await
        .unwrap();
    assert_eq!(new.machine.values().await, values);

    stop(new).await;
    for node in nodes {
        stop(node).await;
    }
}
