//! The seat store as a Raft state machine: what every server of a site applies from the
//! log (ARCHITECTURE.md, "Cluster").
//!
//! The leader's ledger decides; its commit pipeline cuts the decisions of a batch into a
//! [`StoreBatch`] (the records to write); the batch goes through the Raft log; every
//! server applies it here, to its own seat store, with [`Store::write`]. Applying reads no
//! clock and decides nothing, so the servers' stores are equal, and a server that becomes
//! leader restores its ledger from its store as `tallyd run` does at start.
//!
//! Nothing here flushes: the Raft log is flushed before an entry counts as written. The
//! store records, unflushed, the index of the last entry it holds (sled recovers a prefix
//! of its writes after a crash, so the record never claims more than is there); at start
//! the entries after it are applied again and the ones at or before it are skipped, and
//! a snapshot the store already holds is not restored over it. So a store is rewritten
//! only when it is behind (a new or lagging server), and what was written to it while
//! the daemon was stopped (`tallyd return`) survives the start.

use crate::store::{Store, StoreError};
use openraft::LogId;
use tally_cluster::store::Apply;
use tally_cluster::Site;
use tally_protocol::replicate::{StoreCommand, StoreSnapshot};

/// The Raft state machine's application: a server's seat store.
pub struct SeatMachine {
    store: Store,
    /// The index of the last log entry the store holds.
    applied: Option<u64>,
}

impl SeatMachine {
    /// The state machine writing into `store`.
    pub fn new(store: Store) -> Result<SeatMachine, StoreError> {
        let applied = store.applied_index()?;
        Ok(SeatMachine { store, applied })
    }

    /// The store it writes (the leader restores its ledger from it).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether the store holds entry `log_id` already.
    fn holds(&self, log_id: &LogId<u64>) -> bool {
        self.applied.is_some_and(|a| log_id.index <= a)
    }

    fn applied(&mut self, log_id: &LogId<u64>) -> Result<(), StoreError> {
        self.store.save_applied(log_id.index)?;
        self.applied = Some(log_id.index);
        Ok(())
    }
}

impl Apply<Site> for SeatMachine {
    type Error = StoreError;

    fn apply(&mut self, log_id: &LogId<u64>, command: &StoreCommand) -> Result<(), StoreError> {
        if self.holds(log_id) {
            return Ok(());
        }
        match command {
            StoreCommand::V1(_) | StoreCommand::V2(_) | StoreCommand::V3(_) => {
                self.store.write(&command.batch())?
            }
            // A newer tallyd of the site wrote it: this one must not guess what it means.
            _ => return Err(self.store.newer_format("command")),
        }
        self.applied(log_id)
    }

    fn no_command(&mut self, log_id: &LogId<u64>) -> Result<(), StoreError> {
        if self.holds(log_id) {
            return Ok(());
        }
        self.applied(log_id)
    }

    fn snapshot(&self) -> Result<Vec<u8>, StoreError> {
        Ok(StoreSnapshot::V3(self.store.image()?).encode())
    }

    fn restore(&mut self, last: Option<&LogId<u64>>, snapshot: &[u8]) -> Result<(), StoreError> {
        if last.is_some_and(|l| self.holds(l)) {
            return Ok(());
        }
        match StoreSnapshot::decode(snapshot) {
            Ok(read @ (StoreSnapshot::V1(_) | StoreSnapshot::V2(_) | StoreSnapshot::V3(_))) => {
                self.store.replace(&read.into_image())?
            }
            // An undecodable snapshot is most likely a newer format than this reads
            // (the Raft store checked the bytes it stored).
            _ => return Err(self.store.newer_format("snapshot")),
        }
        match last {
            Some(l) => self.applied(l),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{Config, Raft};
    use std::collections::BTreeMap;
    use std::net::{Ipv4Addr, SocketAddr};
    use std::sync::Arc;
    use std::time::Duration;
    use tally_cluster::net::{PeerIdentity, PeerNode, QuicNetwork};
    use tally_protocol::keys::SecretKey;
    use tally_protocol::lease::{LeaseId, LeaseRecord, LeaseSecret};
    use tally_protocol::replicate::{
        Compaction, DetachedChange, Holdoff, LeaseChange, NamedSeat, StoreBatch,
    };
    use tally_protocol::report::{JournalEntry, ReportState, UsageEvent};
    use tally_protocol::time::UnixTime;
    use tally_protocol::wire::ClientIdentity;

    const DEADLINE: Duration = Duration::from_secs(20);

    fn lease(id: u64) -> LeaseRecord {
        LeaseRecord {
            id: LeaseId(id),
            secret: LeaseSecret([id as u8; 16]),
            feature: "solver".into(),
            count: 1,
            holder: ClientIdentity {
                user: "ana".into(),
                host: "ws1".into(),
                pid: 1,
                program: "solve".into(),
                display: None,
            },
            granted_at: UnixTime(1_000),
            ttl_secs: 90,
            version: None,
            linger_secs: 0,
            overdraft: false,
            borrowed_until: None,
        }
    }

    fn entry(seq: u64) -> JournalEntry {
        JournalEntry {
            seq,
            at: UnixTime(1_000 + seq),
            event: UsageEvent::DaemonStopped,
        }
    }

    /// Lease 1 and 2 granted, 1 ended; 2 detached; journal 1..=3; the clock mark.
    fn batches() -> Vec<StoreCommand> {
        vec![
            StoreCommand::V3(StoreBatch {
                leases: vec![LeaseChange::Put(lease(1)), LeaseChange::Put(lease(2))],
                journal: vec![entry(1), entry(2)],
                clock: Some(UnixTime(1_002)),
                ..StoreBatch::new(UnixTime(1_002))
            }),
            StoreCommand::V3(StoreBatch {
                leases: vec![LeaseChange::Remove(LeaseId(1))],
                detached: vec![DetachedChange::Until {
                    id: LeaseId(2),
                    until: UnixTime(2_000),
                }],
                journal: vec![entry(3)],
                ..StoreBatch::new(UnixTime(1_003))
            }),
        ]
    }

    fn log_id(index: u64) -> LogId<u64> {
        LogId::new(openraft::CommittedLeaderId::new(1, 1), index)
    }

    #[test]
    fn applying_the_log_twice_leaves_the_store_as_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut machine = SeatMachine::new(Store::open(dir.path()).unwrap()).unwrap();
        for (i, command) in batches().iter().enumerate() {
            machine.apply(&log_id(i as u64 + 1), command).unwrap();
        }
        let once = machine.store().image().unwrap();
        assert_eq!(once.leases, vec![lease(2)]);
        assert_eq!(once.detached, vec![(LeaseId(2), UnixTime(2_000))]);
        assert_eq!(
            once.journal.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(once.clock, Some(UnixTime(1_002)));
        // After a crash, entries the store does not record as applied are written again
        // (a crash may have cut a batch's write short): the records are keyed.
        for command in batches() {
            let StoreCommand::V3(batch) = command else {
                unreachable!()
            };
            machine.store().write(&batch).unwrap();
        }
        assert_eq!(machine.store().image().unwrap(), once);
        // Entries it records as applied are skipped.
        let again = StoreCommand::V3(StoreBatch {
            leases: vec![LeaseChange::Put(lease(7))],
            ..StoreBatch::new(UnixTime(1_005))
        });
        machine.apply(&log_id(2), &again).unwrap();
        assert_eq!(machine.store().image().unwrap(), once);
        assert_eq!(machine.store().applied_index().unwrap(), Some(2));
    }

    #[test]
    fn a_snapshot_restores_another_store_to_the_same_state() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut leader = SeatMachine::new(Store::open(a.path()).unwrap()).unwrap();
        for (i, command) in batches().iter().enumerate() {
            leader.apply(&log_id(i as u64 + 1), command).unwrap();
        }
        let report = ReportState {
            report_seq: 4,
            last_event: 2,
            ..ReportState::default()
        };
        let export = StoreCommand::V3(StoreBatch {
            report: Some(report.clone()),
            compact: Some(Compaction {
                upto: 2,
                before: UnixTime(5_000),
            }),
            ..StoreBatch::new(UnixTime(1_004))
        });
        leader.apply(&log_id(3), &export).unwrap();
        let snapshot = leader.snapshot().unwrap();

        // The follower had a lease the leader no longer holds: the snapshot replaces all.
        let mut follower = SeatMachine::new(Store::open(b.path()).unwrap()).unwrap();
        let stale = StoreCommand::V3(StoreBatch {
            leases: vec![LeaseChange::Put(lease(9))],
            ..StoreBatch::new(UnixTime(900))
        });
        follower.apply(&log_id(1), &stale).unwrap();
        follower.restore(Some(&log_id(3)), &snapshot).unwrap();
        let image = follower.store().image().unwrap();
        assert_eq!(image, leader.store().image().unwrap());
        assert_eq!(image.report, report);
        assert_eq!(image.journal.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
        assert_eq!(image.leases, vec![lease(2)]);
    }

    #[test]
    fn a_snapshot_of_a_newer_format_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut machine = SeatMachine::new(Store::open(dir.path()).unwrap()).unwrap();
        machine.apply(&log_id(1), &batches()[0]).unwrap();
        let before = machine.store().image().unwrap();
        let mut later = StoreSnapshot::V3(before.clone()).encode();
        later[0] = 7;
        let err = machine.restore(Some(&log_id(2)), &later).unwrap_err();
        assert!(err.to_string().contains("newer format"), "{err}");
        assert_eq!(machine.store().image().unwrap(), before);
    }

    fn holdoff(user: &str, until: u64) -> Holdoff {
        Holdoff {
            feature: "solver".into(),
            user: user.into(),
            host: "h".into(),
            until: UnixTime(until),
        }
    }

    #[test]
    fn hold_offs_are_kept_until_a_later_batch_is_past_them_and_travel_in_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let mut machine = SeatMachine::new(Store::open(dir.path()).unwrap()).unwrap();
        let first = StoreCommand::V3(StoreBatch {
            holdoffs: vec![holdoff("ana", 1_300), holdoff("bo", 2_000)],
            ..StoreBatch::new(UnixTime(1_000))
        });
        machine.apply(&log_id(1), &first).unwrap();
        let mut held = machine.store().load_holdoffs().unwrap();
        held.sort_by(|a, b| a.user.cmp(&b.user));
        assert_eq!(held, vec![holdoff("ana", 1_300), holdoff("bo", 2_000)]);
        // A batch stamped after ana's end forgets hers as it writes cy's; bo's runs on.
        let later = StoreCommand::V3(StoreBatch {
            holdoffs: vec![holdoff("cy", 1_900)],
            ..StoreBatch::new(UnixTime(1_400))
        });
        machine.apply(&log_id(2), &later).unwrap();
        let mut held = machine.store().load_holdoffs().unwrap();
        held.sort_by(|a, b| a.user.cmp(&b.user));
        assert_eq!(held, vec![holdoff("bo", 2_000), holdoff("cy", 1_900)]);
        // A server far behind gets them from the snapshot.
        let other = tempfile::tempdir().unwrap();
        let mut follower = SeatMachine::new(Store::open(other.path()).unwrap()).unwrap();
        follower
            .restore(Some(&log_id(2)), &machine.snapshot().unwrap())
            .unwrap();
        assert_eq!(
            follower.store().image().unwrap(),
            machine.store().image().unwrap()
        );
        assert_eq!(follower.store().load_holdoffs().unwrap().len(), 2);
    }

    fn seat(name: &str, until: u64) -> NamedSeat {
        NamedSeat {
            feature: "solver".into(),
            name: name.into(),
            since: UnixTime(900),
            until: UnixTime(until),
        }
    }

    #[test]
    fn named_seats_are_kept_until_their_places_free_and_travel_in_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let mut machine = SeatMachine::new(Store::open(dir.path()).unwrap()).unwrap();
        let first = StoreCommand::V3(StoreBatch {
            named: vec![seat("ana", 1_300), seat("bo", 2_000)],
            ..StoreBatch::new(UnixTime(1_000))
        });
        machine.apply(&log_id(1), &first).unwrap();
        let names = |m: &SeatMachine| {
            let mut n: Vec<String> = (m.store().load_named().unwrap().into_iter())
                .map(|s| s.name)
                .collect();
            n.sort();
            n
        };
        assert_eq!(names(&machine), ["ana", "bo"]);
        let later = StoreCommand::V3(StoreBatch {
            named: vec![seat("cy", 3_000)],
            ..StoreBatch::new(UnixTime(1_400))
        });
        machine.apply(&log_id(2), &later).unwrap();
        assert_eq!(names(&machine), ["bo", "cy"]);
        // A version-2 command (an older member's) still applies, with no named seats.
        let old = StoreCommand::V2(tally_protocol::replicate::StoreBatchV2 {
            at: UnixTime(1_500),
            leases: Vec::new(),
            detached: Vec::new(),
            journal: Vec::new(),
            clock: Some(UnixTime(1_500)),
            report: None,
            compact: None,
            holdoffs: vec![holdoff("dee", 1_900)],
            queue: Vec::new(),
        });
        machine.apply(&log_id(3), &old).unwrap();
        assert_eq!(names(&machine), ["bo", "cy"]);
        let other = tempfile::tempdir().unwrap();
        let mut follower = SeatMachine::new(Store::open(other.path()).unwrap()).unwrap();
        follower
            .restore(Some(&log_id(3)), &machine.snapshot().unwrap())
            .unwrap();
        assert_eq!(names(&follower), ["bo", "cy"]);
        // And a store reopened (a restart) still has them.
        drop(machine);
        let reopened = SeatMachine::new(Store::open(dir.path()).unwrap()).unwrap();
        assert_eq!(names(&reopened), ["bo", "cy"]);
    }

    fn journal_seqs(machine: &SeatMachine) -> Vec<u64> {
        let image = machine.store().image().unwrap();
        image.journal.iter().map(|e| e.seq).collect()
    }

    /// A snapshot the store already holds is not restored over it: what was written
    /// while the daemon was stopped (a returned bundle's journal entry) survives.
    #[test]
    fn a_snapshot_the_store_holds_already_is_not_restored_over_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut machine = SeatMachine::new(Store::open(dir.path()).unwrap()).unwrap();
        for (i, command) in batches().iter().enumerate() {
            machine.apply(&log_id(i as u64 + 1), command).unwrap();
        }
        let snapshot = machine.snapshot().unwrap();
        machine.store().append_journal(&[entry(4)]).unwrap();
        let store = machine.store().clone();
        drop(machine);
        let mut machine = SeatMachine::new(store).unwrap();
        machine.restore(Some(&log_id(2)), &snapshot).unwrap();
        assert_eq!(journal_seqs(&machine), [1, 2, 3, 4]);
        // A snapshot past what the store holds replaces it.
        machine.restore(Some(&log_id(5)), &snapshot).unwrap();
        assert_eq!(journal_seqs(&machine), [1, 2, 3]);
        assert_eq!(machine.store().applied_index().unwrap(), Some(5));
    }

    /// A one-server site: Raft over the sled log store with the seat store as its state
    /// machine. A committed batch is in the seat store; after a restart from both
    /// directories, the committed entries are applied again and the store is unchanged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cluster_of_one_commits_batches_into_the_seat_store_and_restarts() {
        let (raft_dir, seat_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let key = SecretKey::from_seed([1; 32]);
        let id = key.public().node_id();
        let start = |first: bool| {
            let key = key.clone();
            let (raft_dir, seat_dir) = (raft_dir.path().to_owned(), seat_dir.path().to_owned());
            async move {
                // openraft drops the state machine and the log store (and the sled
                // handles in them) as its tasks end, a moment after `shutdown` returns:
                // wait for sled's locks.
                let deadline = std::time::Instant::now() + DEADLINE;
                let (store, log, machine) = loop {
                    let store = match Store::open(&seat_dir) {
                        Err(StoreError::InUse { .. }) if std::time::Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                        opened => opened.unwrap(),
                    };
                    match tally_cluster::store::open(
                        &raft_dir,
                        SeatMachine::new(store.clone()).unwrap(),
                    ) {
                        Err(tally_cluster::store::StoreError::InUse { .. })
                            if std::time::Instant::now() < deadline =>
                        {
                            drop(store);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        opened => {
                            let (log, machine) = opened.unwrap();
                            break (store, log, machine);
                        }
                    }
                };
                let endpoint =
                    quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
                let identity = Arc::new(PeerIdentity::new(&key).unwrap());
                let node = PeerNode {
                    addr: endpoint.local_addr().unwrap().to_string(),
                    key: key.public(),
                };
                let network = QuicNetwork::new(id, endpoint, identity);
                let config = Arc::new(Config::default().validate().unwrap());
                let raft = Raft::<Site>::new(id, config, network, log, machine)
                    .await
                    .unwrap();
                if first {
                    raft.initialize(BTreeMap::from([(id, node)])).await.unwrap();
                }
                raft.wait(Some(DEADLINE))
                    .current_leader(id, "a cluster of one leads itself")
                    .await
                    .unwrap();
                (raft, store)
            }
        };
        let (raft, store) = start(true).await;
        let mut last = 0;
        for command in batches() {
            last = raft.client_write(command).await.unwrap().log_id.index;
        }
        raft.wait(Some(DEADLINE))
            .applied_index_at_least(Some(last), "the batches applied")
            .await
            .unwrap();
        let image = store.image().unwrap();
        assert_eq!(image.leases, vec![lease(2)]);
        raft.shutdown().await.unwrap();
        drop(raft);
        drop(store);

        let (raft, store) = start(false).await;
        raft.wait(Some(DEADLINE))
            .applied_index_at_least(Some(last), "the log applied again at start")
            .await
            .unwrap();
        assert_eq!(store.image().unwrap(), image);
        raft.shutdown().await.unwrap();
    }
}
