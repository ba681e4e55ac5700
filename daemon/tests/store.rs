//! The sled store: what is applied and flushed is there after reopening.

use tally_daemon::ledger::{Event, ReleaseReason};
use tally_daemon::store::Store;
use tally_protocol::lease::{LeaseId, LeaseRecord, LeaseSecret};
use tally_protocol::time::UnixTime;
use tally_protocol::wire::ClientIdentity;

fn record(id: u64) -> LeaseRecord {
    LeaseRecord {
        id: LeaseId(id),
        secret: LeaseSecret([id as u8; 16]),
        feature: "solver".into(),
        count: 1,
        holder: ClientIdentity {
            user: "ana".into(),
            host: "ws".into(),
            pid: 7,
            program: "solver".into(),
            display: None,
        },
        granted_at: UnixTime(1_800_000_000),
        ttl_secs: 90,
        version: None,
        linger_secs: 0,
        overdraft: false,
        borrowed_until: None,
    }
}

#[test]
fn leases_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store
            .apply(&[
                Event::Granted(record(1)),
                Event::Granted(record(2)),
                Event::Granted(record(3)),
            ])
            .unwrap();
        store
            .apply(&[Event::Released {
                id: LeaseId(2),
                feature: "solver".into(),
                count: 1,
                holder: "ana@ws".into(),
                why: ReleaseReason::Checkin,
            }])
            .unwrap();
        store.flush_blocking().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let (mut leases, unreadable) = store.load_leases().unwrap();
    leases.sort_by_key(|r| r.id);
    assert!(unreadable.is_empty());
    assert_eq!(leases, vec![record(1), record(3)]);
}

#[test]
fn a_store_that_cannot_be_opened_names_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let err = Store::open(&file).unwrap_err();
    assert!(err.to_string().contains("not-a-dir"), "{err}");
}
