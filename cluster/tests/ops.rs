//! Cluster operations (`tally_cluster::ops`) on three in-process nodes over real QUIC.

mod support;

use std::collections::BTreeSet;
use support::nodes::{agreed_leader, applied_everywhere, cluster, stop, Node, DEADLINE};
use tally_cluster::ops::{prometheus_samples, ClusterView, ClusterViewBody, Role, Sample};

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
