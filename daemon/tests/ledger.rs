//! The seat ledger driven with made-up times: no sockets, no sleeps.

use proptest::prelude::*;
use std::time::{Duration, Instant};
use tally_daemon::ledger::*;
use tally_protocol::bundle::{Binding, Bundle, Customer, FeatureGrant, Seats};
use tally_protocol::keys::PublicKey;
use tally_protocol::lease::{LeaseId, LeaseRecord, LeaseSecret};
use tally_protocol::time::UnixTime;
use tally_protocol::wire::{CheckoutRequest, ClientIdentity, DenialReason, LeaseRef, LeaseState};

const TTL: Duration = Duration::from_secs(90);
const T0: UnixTime = UnixTime(1_800_000_000);

/// A test driver: a ledger, a virtual clock and a lease id counter.
struct Driver {
    ledger: Ledger,
    start: Instant,
    elapsed: Duration,
    next: u64,
}

impl Driver {
    fn new(features: Vec<FeatureGrant>) -> Driver {
        let bundle = Bundle {
            id: "b1".into(),
            issued_at: T0,
            vendor: "v".into(),
            customer: Customer {
                id: "c".into(),
                name: "C".into(),
            },
            binding: Some(Binding {
                server_key: PublicKey([0; 32]),
                host_fingerprint: "h".into(),
            }),
            supersedes: vec![],
            valid_from: None,
            valid_until: None,
            features,
        };
        Driver {
            ledger: Ledger::new(LedgerSettings { default_ttl: TTL }, &[bundle]),
            start: Instant::now(),
            elapsed: Duration::ZERO,
            next: 1,
        }
    }

    fn now(&self) -> Now {
        Now {
            mono: self.start + self.elapsed,
            wall: T0.plus_secs(self.elapsed.as_secs()),
        }
    }

    fn advance(&mut self, d: Duration) -> Vec<Event> {
        self.elapsed += d;
        self.ledger.expire(self.now())
    }

    fn checkout(
        &mut self,
        conn: u64,
        user: &str,
        feature: &str,
        count: u32,
    ) -> Result<LeaseRecord, DenialReason> {
        let fresh = FreshLease {
            id: LeaseId(self.next),
            secret: LeaseSecret([self.next as u8; 16]),
        };
        self.next += 1;
        let request = CheckoutRequest {
            feature: feature.into(),
            count,
            version: None,
            build_date: None,
        };
        let now = self.now();
        self.ledger
            .checkout(now, ConnId(conn), &who(user), &request, fresh)
            .map(|(record, event)| {
                assert_eq!(event, Event::Granted(record.clone()));
                record
            })
    }
}

fn who(user: &str) -> ClientIdentity {
    ClientIdentity {
        user: user.into(),
        host: "ws".into(),
        pid: 1,
        program: "solver".into(),
        display: None,
    }
}

fn r(record: &LeaseRecord) -> LeaseRef {
    LeaseRef {
        id: record.id,
        secret: record.secret.clone(),
    }
}

#[test]
fn sixth_checkout_of_five_seats_is_denied_naming_feature_and_holders() {
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 5)]);
    for i in 0..5 {
        d.checkout(i, &format!("user{i}"), "solver", 1).unwrap();
    }
    let denial = d.checkout(9, "late", "solver", 1).unwrap_err();
    match &denial {
        DenialReason::AllSeatsInUse {
            feature,
            total,
            in_use,
            holders,
            ..
        } => {
            assert_eq!((feature.as_str(), *total, *in_use), ("solver", 5, 5));
            assert_eq!(holders.len(), 5);
            assert!(holders.contains(&"user0@ws".to_string()));
        }
        other => panic!("unexpected {other:?}"),
    }
    let text = denial.to_string();
    assert!(
        text.contains("all 5 seats of 'solver' are in use"),
        "{text}"
    );
    assert_eq!(d.ledger.in_use("solver"), 5);
}

#[test]
fn multi_seat_checkouts_count_every_seat() {
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 5)]);
    d.checkout(1, "a", "solver", 3).unwrap();
    assert!(d.checkout(2, "b", "solver", 3).is_err());
    d.checkout(2, "b", "solver", 2).unwrap();
    assert_eq!(d.ledger.in_use("solver"), 5);
    assert!(matches!(
        d.checkout(3, "c", "solver", 0),
        Err(DenialReason::InvalidRequest { .. })
    ));
}

#[test]
fn unknown_feature_is_not_licensed() {
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 5)]);
    assert_eq!(
        d.checkout(1, "a", "mesher", 1),
        Err(DenialReason::NotLicensed {
            feature: "mesher".into()
        })
    );
}

#[test]
fn checkin_frees_the_seat_and_needs_the_secret() {
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 1)]);
    let lease = d.checkout(1, "a", "solver", 1).unwrap();
    let forged = LeaseRef {
        id: lease.id,
        secret: LeaseSecret([0xee; 16]),
    };
    let (released, events) = d.ledger.checkin(d.now(), &[forged]);
    assert_eq!((released, events.len()), (vec![false], 0));
    let (released, events) = d.ledger.checkin(d.now(), &[r(&lease)]);
    assert_eq!(released, vec![true]);
    assert!(matches!(
        events[0],
        Event::Released {
            why: ReleaseReason::Checkin,
            ..
        }
    ));
    d.checkout(2, "b", "solver", 1).unwrap();
}

#[test]
fn silent_holder_is_reclaimed_after_the_ttl_and_heartbeats_extend() {
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 1)]);
    let lease = d.checkout(1, "a", "solver", 1).unwrap();
    // Heartbeats every 30 s keep it for as long as they come.
    for _ in 0..10 {
        assert!(d.advance(Duration::from_secs(30)).is_empty());
        assert_eq!(
            d.ledger.heartbeat(d.now(), ConnId(1), &[r(&lease)]),
            vec![LeaseState::Active]
        );
    }
    // Then silence: nothing happens just before the TTL, the seat returns at the TTL.
    assert!(d.advance(TTL - Duration::from_secs(1)).is_empty());
    assert_eq!(
        d.ledger.next_deadline(),
        Some(d.now().mono + Duration::from_secs(1))
    );
    let events = d.advance(Duration::from_secs(1));
    assert!(matches!(
        events.as_slice(),
        [Event::Released {
            why: ReleaseReason::Expired,
            ..
        }]
    ));
    assert_eq!(d.ledger.in_use("solver"), 0);
    assert_eq!(
        d.ledger.heartbeat(d.now(), ConnId(1), &[r(&lease)]),
        vec![LeaseState::Unknown]
    );
}

#[test]
fn feature_ttl_overrides_the_default() {
    let mut f = FeatureGrant::counted("solver", 1);
    f.heartbeat_ttl_secs = Some(20);
    let mut d = Driver::new(vec![f]);
    let lease = d.checkout(1, "a", "solver", 1).unwrap();
    assert_eq!(lease.ttl_secs, 20);
    assert_eq!(d.advance(Duration::from_secs(20)).len(), 1);
}

#[test]
fn closing_the_connection_frees_its_seats_at_once() {
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 2)]);
    d.checkout(1, "a", "solver", 1).unwrap();
    d.checkout(2, "b", "solver", 1).unwrap();
    let events = d.ledger.connection_closed(ConnId(1));
    assert_eq!(events.len(), 1);
    assert_eq!(d.ledger.in_use("solver"), 1);
    assert!(d.ledger.connection_closed(ConnId(1)).is_empty());
}

#[test]
fn reattach_moves_the_lease_to_the_new_connection_without_a_second_seat() {
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 1)]);
    let lease = d.checkout(1, "a", "solver", 1).unwrap();
    // The client reconnects (connection 2) and heartbeats before connection 1 is
    // noticed as dead.
    assert_eq!(
        d.ledger.heartbeat(d.now(), ConnId(2), &[r(&lease)]),
        vec![LeaseState::Active]
    );
    assert_eq!(d.ledger.in_use("solver"), 1);
    // The old connection's close must not take the re-attached lease with it.
    assert!(d.ledger.connection_closed(ConnId(1)).is_empty());
    assert_eq!(d.ledger.in_use("solver"), 1);
    assert_eq!(d.ledger.connection_closed(ConnId(2)).len(), 1);
}

#[test]
fn restored_leases_count_and_expire_unless_their_holder_returns() {
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 2)]);
    let kept = d.checkout(1, "a", "solver", 1).unwrap();
    let orphan = d.checkout(2, "b", "solver", 1).unwrap();
    // A restart: a new ledger gets the stored records.
    let mut d2 = Driver::new(vec![FeatureGrant::counted("solver", 2)]);
    d2.ledger
        .restore(d2.now(), vec![kept.clone(), orphan.clone()]);
    assert_eq!(d2.ledger.in_use("solver"), 2);
    assert!(
        d2.checkout(3, "c", "solver", 1).is_err(),
        "no over-grant after restart"
    );
    assert_eq!(
        d2.ledger.heartbeat(d2.now(), ConnId(7), &[r(&kept)]),
        vec![LeaseState::Active]
    );
    d2.advance(Duration::from_secs(60));
    d2.ledger.heartbeat(d2.now(), ConnId(7), &[r(&kept)]);
    let events = d2.advance(Duration::from_secs(30));
    assert!(matches!(
        events.as_slice(),
        [Event::Released { id, why: ReleaseReason::Expired, .. }] if *id == orphan.id
    ));
    assert_eq!(d2.ledger.in_use("solver"), 1);
}

#[test]
fn dates_gate_checkouts_and_expired_grants_stop_counting() {
    let mut eval = FeatureGrant::counted("optimizer", 3);
    eval.evaluation = true;
    eval.expires = Some(T0.plus_secs(3600));
    let mut later = FeatureGrant::counted("mesher", 2);
    later.starts = Some(T0.plus_secs(86_400));
    let mut addon = FeatureGrant::counted("solver", 2);
    addon.expires = Some(T0.plus_secs(3600));
    let mut d = Driver::new(vec![eval, later, FeatureGrant::counted("solver", 1), addon]);
    assert!(matches!(
        d.checkout(1, "a", "mesher", 1),
        Err(DenialReason::NotYetValid { .. })
    ));
    let status = d.ledger.status(d.now().wall);
    let solver = status.iter().find(|f| f.name == "solver").unwrap();
    assert_eq!(solver.total, Some(3));
    d.checkout(1, "a", "optimizer", 1).unwrap();
    d.elapsed += Duration::from_secs(3600);
    match d.checkout(2, "b", "optimizer", 1) {
        Err(DenialReason::Expired { expired, .. }) => assert_eq!(expired, T0.plus_secs(3600)),
        other => panic!("{other:?}"),
    }
    let status = d.ledger.status(d.now().wall);
    let solver = status.iter().find(|f| f.name == "solver").unwrap();
    assert_eq!(solver.total, Some(1), "the expired add-on stops counting");
}

#[test]
fn uncounted_and_overdraft() {
    let mut site = FeatureGrant::counted("viewer", 0);
    site.seats = Seats::Uncounted;
    let mut solver = FeatureGrant::counted("solver", 1);
    solver.overdraft = 1;
    let mut d = Driver::new(vec![site, solver]);
    for i in 0..50 {
        d.checkout(i, "a", "viewer", 1).unwrap();
    }
    d.checkout(1, "a", "solver", 1).unwrap();
    d.checkout(2, "b", "solver", 1).unwrap();
    assert!(d.checkout(3, "c", "solver", 1).is_err());
}

#[derive(Debug, Clone)]
enum Op {
    Checkout { conn: u64, count: u32 },
    Heartbeat { conn: u64, which: usize },
    Checkin { which: usize },
    Close { conn: u64 },
    Advance { secs: u64 },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..4, 1u32..3).prop_map(|(conn, count)| Op::Checkout { conn, count }),
        3 => (0u64..4, 0usize..16).prop_map(|(conn, which)| Op::Heartbeat { conn, which }),
        2 => (0usize..16).prop_map(|which| Op::Checkin { which }),
        1 => (0u64..4).prop_map(|conn| Op::Close { conn }),
        2 => (1u64..120).prop_map(|secs| Op::Advance { secs }),
        1 => Just(Op::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Random interleavings, restarts included: in use never exceeds the count, always
    /// equals the sum of held leases (as a store that applies the events would hold them),
    /// and everything is released once heartbeats stop for a TTL.
    #[test]
    fn seats_are_never_over_granted_and_always_come_back(ops in proptest::collection::vec(op(), 1..80)) {
        let seats = 4;
        let mut d = Driver::new(vec![FeatureGrant::counted("solver", seats)]);
        // The store as a map of lease id to record, maintained from events only.
        let mut store: std::collections::BTreeMap<LeaseId, LeaseRecord> = Default::default();
        let apply = |store: &mut std::collections::BTreeMap<LeaseId, LeaseRecord>, events: Vec<Event>| {
            for e in events {
                match e {
                    Event::Granted(r) => { store.insert(r.id, r); }
                    Event::Released { id, .. } => { store.remove(&id); }
                }
            }
        };
        let mut granted: Vec<LeaseRecord> = Vec::new();
        for op in ops {
            match op {
                Op::Checkout { conn, count } => {
                    if let Ok(record) = d.checkout(conn, "u", "solver", count) {
                        store.insert(record.id, record.clone());
                        granted.push(record);
                    }
                }
                Op::Heartbeat { conn, which } => {
                    if let Some(rec) = granted.get(which) {
                        let now = d.now();
                        d.ledger.heartbeat(now, ConnId(conn), &[r(rec)]);
                    }
                }
                Op::Checkin { which } => {
                    if let Some(rec) = granted.get(which) {
                        let (_, events) = d.ledger.checkin(d.now(), &[r(rec)]);
                        apply(&mut store, events);
                    }
                }
                Op::Close { conn } => {
                    let events = d.ledger.connection_closed(ConnId(conn));
                    apply(&mut store, events);
                }
                Op::Advance { secs } => {
                    let events = d.advance(Duration::from_secs(secs));
                    apply(&mut store, events);
                }
                Op::Restart => {
                    let elapsed = d.elapsed;
                    let next = d.next;
                    d = Driver::new(vec![FeatureGrant::counted("solver", seats)]);
                    d.elapsed = elapsed;
                    d.next = next;
                    let now = d.now();
                    d.ledger.restore(now, store.values().cloned().collect());
                }
            }
            let held: u32 = store.values().map(|r| r.count).sum();
            prop_assert!(d.ledger.in_use("solver") <= seats);
            prop_assert_eq!(d.ledger.in_use("solver"), held);
            prop_assert_eq!(d.ledger.lease_count(), store.len());
        }
        let events = d.advance(TTL);
        apply(&mut store, events);
        prop_assert_eq!(d.ledger.in_use("solver"), 0);
        prop_assert!(store.is_empty());
    }
}
