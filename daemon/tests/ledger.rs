//! The seat ledger driven with made-up times: no sockets, no sleeps.

use proptest::prelude::*;
use std::time::{Duration, Instant};
use tally_daemon::ledger::*;
use tally_protocol::bundle::{
    Binding, Bundle, Component, Customer, FeatureGrant, Seats, Share, TokenDraw,
};
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
            binding: vec![Binding {
                server_key: PublicKey([0; 32]),
                host_fingerprint: "h".into(),
            }],
            supersedes: vec![],
            valid_from: None,
            valid_until: None,
            features,
        };
        Driver {
            ledger: Ledger::new(
                LedgerSettings {
                    default_ttl: TTL,
                    remove_holdoff: Duration::from_secs(300),
                },
                &[bundle],
            ),
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

    /// The next lease id and a secret for it.
    fn fresh(&mut self) -> FreshLease {
        let fresh = FreshLease {
            id: LeaseId(self.next),
            secret: LeaseSecret([self.next as u8; 16]),
        };
        self.next += 1;
        fresh
    }

    fn checkout(
        &mut self,
        conn: u64,
        user: &str,
        feature: &str,
        count: u32,
    ) -> Result<LeaseRecord, DenialReason> {
        self.checkout_with(conn, user, feature, count, None, None)
    }

    fn checkout_with(
        &mut self,
        conn: u64,
        user: &str,
        feature: &str,
        count: u32,
        version: Option<&str>,
        build_date: Option<UnixTime>,
    ) -> Result<LeaseRecord, DenialReason> {
        let fresh = self.fresh();
        let request = CheckoutRequest {
            feature: feature.into(),
            count,
            version: version.map(str::to_string),
            build_date,
            wait_secs: 0,
            borrow_secs: 0,
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

fn bundle(id: &str, supersedes: &[&str], features: Vec<FeatureGrant>) -> Bundle {
    Bundle {
        id: id.into(),
        issued_at: T0,
        vendor: "v".into(),
        customer: Customer {
            id: "c".into(),
            name: "C".into(),
        },
        binding: vec![],
        supersedes: supersedes.iter().map(|s| s.to_string()).collect(),
        valid_from: None,
        valid_until: None,
        features,
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
    let events = d.ledger.connection_closed(d.now(), ConnId(1));
    assert_eq!(events.len(), 1);
    assert_eq!(d.ledger.in_use("solver"), 1);
    assert!(d.ledger.connection_closed(d.now(), ConnId(1)).is_empty());
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
    assert!(d.ledger.connection_closed(d.now(), ConnId(1)).is_empty());
    assert_eq!(d.ledger.in_use("solver"), 1);
    assert_eq!(d.ledger.connection_closed(d.now(), ConnId(2)).len(), 1);
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
    Wait { conn: u64, count: u32, secs: u32 },
    Remove { which: usize },
    Reload,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..4, 1u32..3).prop_map(|(conn, count)| Op::Checkout { conn, count }),
        3 => (0u64..4, 0usize..16).prop_map(|(conn, which)| Op::Heartbeat { conn, which }),
        2 => (0usize..16).prop_map(|which| Op::Checkin { which }),
        1 => (0u64..4).prop_map(|conn| Op::Close { conn }),
        2 => (1u64..120).prop_map(|secs| Op::Advance { secs }),
        1 => Just(Op::Restart),
        2 => (0u64..4, 1u32..3, 1u32..100).prop_map(|(conn, count, secs)| Op::Wait { conn, count, secs }),
        1 => (0usize..16).prop_map(|which| Op::Remove { which }),
        1 => Just(Op::Reload),
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
                    let events = d.ledger.connection_closed(d.now(), ConnId(conn));
                    apply(&mut store, events);
                }
                Op::Advance { secs } => {
                    let events = d.advance(Duration::from_secs(secs));
                    apply(&mut store, events);
                }
                Op::Wait { conn, count, secs } => {
                    d.next += 1;
                    let fresh = FreshLease {
                        id: LeaseId(d.next),
                        secret: LeaseSecret([d.next as u8; 16]),
                    };
                    let request = CheckoutRequest {
                        feature: "solver".into(),
                        count,
                        version: None,
                        build_date: None,
                        wait_secs: secs,
                        borrow_secs: 0,
                    };
                    let now = d.now();
                    if let Checkout::Granted(g) = d.ledger.checkout_or_wait(now, ConnId(conn), &who("w"), &request, fresh, WaiterId(d.next)) {
                        store.insert(g.0.id, g.0.clone());
                        granted.push(g.0);
                    }
                }
                Op::Reload => {
                    // A renewal: a new bundle id with the same seats; no lease may drop.
                    d.next += 1;
                    let renewal = bundle(&format!("b{}", d.next), &[], vec![FeatureGrant::counted("solver", seats)]);
                    let now = d.now();
                    d.ledger.reload(now, &[renewal]);
                }
                Op::Remove { which } => {
                    if let Some(rec) = granted.get(which) {
                        let now = d.now();
                        let events: Vec<Event> = d.ledger.remove_lease(now, rec.id).into_iter().collect();
                        apply(&mut store, events);
                    }
                }
                Op::Restart => {
                    // Waiters do not survive a restart: their connections are gone.
                    let elapsed = d.elapsed;
                    let next = d.next;
                    d = Driver::new(vec![FeatureGrant::counted("solver", seats)]);
                    d.elapsed = elapsed;
                    d.next = next;
                    let now = d.now();
                    d.ledger.restore(now, store.values().cloned().collect());
                }
            }
            for outcome in d.ledger.take_waiter_outcomes() {
                if let Some(Ok(record)) = &outcome.result {
                    granted.push(record.clone());
                }
                apply(&mut store, outcome.event.into_iter().collect());
            }
            let held: u32 = store.values().map(|r| r.count).sum();
            prop_assert!(d.ledger.in_use("solver") <= seats);
            prop_assert_eq!(d.ledger.in_use("solver"), held);
            prop_assert_eq!(d.ledger.lease_count(), store.len());
        }
        // Silence: waits run out (at most 100 s) and every lease's TTL passes.
        for _ in 0..3 {
            let events = d.advance(TTL);
            apply(&mut store, events);
            for outcome in d.ledger.take_waiter_outcomes() {
                apply(&mut store, outcome.event.into_iter().collect());
            }
        }
        prop_assert_eq!(d.ledger.in_use("solver"), 0);
        prop_assert!(store.is_empty());
    }
}

fn versioned(name: &str, seats: u32, ceiling: &str) -> FeatureGrant {
    let mut f = FeatureGrant::counted(name, seats);
    f.version_ceiling = Some(ceiling.into());
    f
}

#[test]
fn version_ceiling_denies_newer_versions_naming_the_ceiling() {
    let mut d = Driver::new(vec![versioned("solver", 5, "2027.1")]);
    d.checkout_with(1, "a", "solver", 1, Some("2027.1"), None)
        .unwrap();
    d.checkout_with(1, "a", "solver", 1, Some("2026.4"), None)
        .unwrap();
    match d.checkout_with(1, "a", "solver", 1, Some("2027.2"), None) {
        Err(e @ DenialReason::VersionAboveCeiling { .. }) => {
            assert!(
                e.to_string().contains("above the licensed version 2027.1"),
                "{e}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn seats_of_a_higher_ceiling_serve_older_versions_but_not_the_reverse() {
    // 2 seats up to 2026, 1 seat up to 2027.
    let mut d = Driver::new(vec![
        versioned("solver", 2, "2026"),
        versioned("solver", 1, "2027"),
    ]);
    // Two 2027 users: only one seat admits 2027.
    d.checkout_with(1, "a", "solver", 1, Some("2027"), None)
        .unwrap();
    assert!(matches!(
        d.checkout_with(2, "b", "solver", 1, Some("2027"), None),
        Err(DenialReason::AllSeatsInUse { .. })
    ));
    // Older versions still fit in the 2026 seats.
    d.checkout_with(2, "b", "solver", 1, Some("2025"), None)
        .unwrap();
    d.checkout_with(3, "c", "solver", 1, Some("2026"), None)
        .unwrap();
    assert!(d
        .checkout_with(4, "d", "solver", 1, Some("2024"), None)
        .is_err());
}

#[test]
fn maintenance_gates_new_builds_and_old_builds_keep_running() {
    let mut f = FeatureGrant::counted("solver", 5);
    f.maintenance_until = UnixTime::from_date("2027-06-30");
    let mut d = Driver::new(vec![f]);
    d.checkout_with(1, "a", "solver", 1, None, UnixTime::from_date("2027-06-30"))
        .unwrap();
    d.checkout_with(1, "a", "solver", 1, None, UnixTime::from_date("2026-01-15"))
        .unwrap();
    match d.checkout_with(1, "a", "solver", 1, None, UnixTime::from_date("2027-07-01")) {
        Err(e @ DenialReason::MaintenanceExpired { .. }) => {
            let text = e.to_string();
            assert!(text.starts_with("maintenance expired"), "{text}");
            assert!(
                text.contains("2027-06-30") && text.contains("older build"),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_upgrade_moves_seats_to_the_newer_version() {
    let mut up = versioned("solver", 2, "2027");
    up.upgrade_from = Some("2026".into());
    let mut d = Driver::new(vec![versioned("solver", 5, "2026"), up]);
    let status = d.ledger.status(d.now().wall);
    assert_eq!(
        status[0].total,
        Some(5),
        "an upgrade moves seats, it adds none"
    );
    d.checkout_with(1, "a", "solver", 1, Some("2027"), None)
        .unwrap();
    d.checkout_with(1, "b", "solver", 1, Some("2027"), None)
        .unwrap();
    assert!(d
        .checkout_with(1, "c", "solver", 1, Some("2027"), None)
        .is_err());
    for _ in 0..3 {
        d.checkout_with(1, "e", "solver", 1, Some("2026"), None)
            .unwrap();
    }
    assert!(d
        .checkout_with(1, "f", "solver", 1, Some("2026"), None)
        .is_err());
}

#[test]
fn a_package_grants_its_components() {
    let mut suite = FeatureGrant::counted("design_suite", 3);
    suite.components = vec![Component::named("modeler"), Component::named("drafter")];
    let mut d = Driver::new(vec![suite]);
    for _ in 0..3 {
        d.checkout(1, "a", "modeler", 1).unwrap();
    }
    assert!(d.checkout(1, "a", "modeler", 1).is_err());
    d.checkout(1, "a", "drafter", 1).unwrap();
    d.checkout(1, "a", "design_suite", 1).unwrap();
    assert!(matches!(
        d.checkout(1, "a", "renderer", 1),
        Err(DenialReason::NotLicensed { .. })
    ));
}

#[test]
fn add_ons_add_supersede_replaces_and_reload_keeps_leases() {
    // The combination itself (which bundles count) is decided by the bundle loader;
    // here the ledger gets the result and must keep every lease through a reload.
    let base = bundle("b1", &[], vec![FeatureGrant::counted("solver", 2)]);
    let addon = bundle("b2", &[], vec![FeatureGrant::counted("solver", 3)]);
    let mut d = Driver::new(vec![]);
    d.ledger.reload(d.now(), &[base.clone(), addon]);
    for i in 0..5 {
        d.checkout(i, "a", "solver", 1).unwrap();
    }
    assert!(d.checkout(9, "a", "solver", 1).is_err());
    // Renewal with fewer seats: existing leases stay, new checkouts wait for room.
    let renewal = bundle(
        "b3",
        &["b1", "b2"],
        vec![FeatureGrant::counted("solver", 4)],
    );
    d.ledger.reload(d.now(), &[renewal]);
    assert_eq!(d.ledger.in_use("solver"), 5);
    assert_eq!(d.ledger.lease_count(), 5);
    assert!(d.checkout(9, "a", "solver", 1).is_err());
    d.ledger.connection_closed(d.now(), ConnId(0));
    d.ledger.connection_closed(d.now(), ConnId(1));
    d.checkout(9, "a", "solver", 1).unwrap();
}

#[test]
fn linger_keeps_the_seat_after_checkin() {
    let mut f = FeatureGrant::counted("solver", 1);
    f.linger_secs = 60;
    let mut d = Driver::new(vec![f]);
    let lease = d.checkout(1, "a", "solver", 1).unwrap();
    let (released, events) = d.ledger.checkin(d.now(), &[r(&lease)]);
    assert_eq!(released, vec![true]);
    assert!(events.is_empty(), "the seat lingers");
    assert!(d.checkout(2, "b", "solver", 1).is_err());
    assert!(
        d.ledger.connection_closed(d.now(), ConnId(1)).is_empty(),
        "no longer tied to the connection"
    );
    assert!(d.advance(Duration::from_secs(59)).is_empty());
    let events = d.advance(Duration::from_secs(1));
    assert!(matches!(
        events.as_slice(),
        [Event::Released {
            why: ReleaseReason::LingerEnded,
            ..
        }]
    ));
    d.checkout(2, "b", "solver", 1).unwrap();
}

#[test]
fn a_bundle_validity_window_bounds_its_features() {
    let mut b = bundle("b1", &[], vec![FeatureGrant::counted("solver", 2)]);
    b.valid_until = Some(T0.plus_secs(100));
    let mut d = Driver::new(vec![]);
    d.ledger.reload(d.now(), &[b]);
    d.checkout(1, "a", "solver", 1).unwrap();
    d.elapsed = Duration::from_secs(100);
    assert!(matches!(
        d.checkout(1, "a", "solver", 1),
        Err(DenialReason::Expired { .. })
    ));
}

/// Restarts a ledger from `records` the way the daemon does: `d` is the new run, whose
/// clock says when it started; `detached` and `alive` are what the store kept.
fn restart_with(
    d: &mut Driver,
    records: Vec<LeaseRecord>,
    detached: &std::collections::HashMap<LeaseId, UnixTime>,
    alive: UnixTime,
) -> Vec<Detachment> {
    let facts = RestoreFacts {
        detached: detached.clone(),
        alive: Some((alive, Duration::from_secs(10))),
    };
    d.ledger.restore_with(d.now(), records, &facts);
    d.ledger.take_detachments()
}

#[test]
fn a_restart_never_extends_a_lease_however_many_follow() {
    // The holder of `ghost` dies with the daemon at T0+0; the daemon was last known
    // alive at T0 (its clock mark), so the lease ends by T0 + 10 s slack + 90 s TTL.
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 2)]);
    let ghost = d.checkout(1, "a", "solver", 1).unwrap();
    let mut stored = std::collections::HashMap::new();
    let end = T0.plus_secs(10 + TTL.as_secs());
    // Five restarts, 30 s apart: each sees the stored end, none moves it.
    for round in 0..5u64 {
        let mut next = Driver::new(vec![FeatureGrant::counted("solver", 2)]);
        next.elapsed = Duration::from_secs(30 * round + 1);
        let changes = restart_with(&mut next, vec![ghost.clone()], &stored, T0);
        for c in changes {
            match c {
                Detachment::Until { id, until } => {
                    assert_eq!(until, end, "round {round}: the end must not move");
                    stored.insert(id, until);
                }
                Detachment::Cleared { id } => {
                    stored.remove(&id);
                }
            }
        }
        let left = Duration::from_secs(end.0.saturating_sub(next.now().wall.0));
        if next.now().wall < end {
            assert_eq!(next.ledger.in_use("solver"), 1, "round {round}");
            // Held until just before its end, released at it.
            assert!(next.advance(left - Duration::from_secs(1)).is_empty());
            let events = next.advance(Duration::from_secs(1));
            assert!(
                matches!(events.as_slice(), [Event::Released { id, why: ReleaseReason::Expired, .. }] if *id == ghost.id),
                "round {round}: {events:?}"
            );
        } else {
            // Restarted after its end: gone at the first expiry check.
            let events = next.advance(Duration::ZERO);
            assert_eq!(events.len(), 1, "round {round}: {events:?}");
        }
    }
}

#[test]
fn a_holder_that_comes_back_after_a_restart_clears_its_stored_end() {
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 2)]);
    let kept = d.checkout(1, "a", "solver", 1).unwrap();
    let mut next = Driver::new(vec![FeatureGrant::counted("solver", 2)]);
    let changes = restart_with(&mut next, vec![kept.clone()], &Default::default(), T0);
    assert!(matches!(changes.as_slice(), [Detachment::Until { id, .. }] if *id == kept.id));
    let now = next.now();
    assert_eq!(
        next.ledger.heartbeat(now, ConnId(9), &[r(&kept)]),
        vec![LeaseState::Active]
    );
    assert_eq!(
        next.ledger.take_detachments(),
        vec![Detachment::Cleared { id: kept.id }]
    );
    // Heartbeats decide from now on: well past the old end, still held.
    for _ in 0..5 {
        assert!(next.advance(Duration::from_secs(60)).is_empty());
        let now = next.now();
        next.ledger.heartbeat(now, ConnId(9), &[r(&kept)]);
    }
    assert_eq!(next.ledger.in_use("solver"), 1);
    assert!(next.ledger.take_detachments().is_empty());
}

#[test]
fn a_stall_of_the_daemon_does_not_count_against_holders() {
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 1)]);
    let held = d.checkout(1, "a", "solver", 1).unwrap();
    d.advance(Duration::from_secs(60));
    // The daemon stood still for 100 s: more than the 30 s left of the TTL.
    d.ledger.forgive(Duration::from_secs(100));
    assert!(d.advance(Duration::from_secs(100)).is_empty());
    // Its connection timed out meanwhile: kept, detached, not released.
    let now = d.now();
    d.ledger.connection_lost(now, ConnId(1));
    assert_eq!(d.ledger.in_use("solver"), 1);
    assert!(
        d.checkout(2, "b", "solver", 1).is_err(),
        "no second program on the seat"
    );
    // The holder reconnects and re-attaches.
    let now = d.now();
    assert_eq!(
        d.ledger.heartbeat(now, ConnId(3), &[r(&held)]),
        vec![LeaseState::Active]
    );
    // Without the stall the same silence ends the lease at its TTL.
    let mut plain = Driver::new(vec![FeatureGrant::counted("solver", 1)]);
    plain.checkout(1, "a", "solver", 1).unwrap();
    plain.advance(Duration::from_secs(60));
    assert_eq!(plain.advance(Duration::from_secs(31)).len(), 1);
}

#[test]
fn a_lost_connection_keeps_its_leases_until_their_ttl() {
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 1)]);
    d.checkout(1, "a", "solver", 1).unwrap();
    let now = d.now();
    d.ledger.connection_lost(now, ConnId(1));
    assert!(d.advance(TTL - Duration::from_secs(1)).is_empty());
    assert_eq!(d.advance(Duration::from_secs(1)).len(), 1);
    assert_eq!(d.ledger.in_use("solver"), 0);
}

#[test]
fn a_holder_silent_past_the_idle_timeout_gets_its_lease_back_while_seats_are_free() {
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 1)]);
    let lease = d.checkout(1, "a", "solver", 1).unwrap();
    d.advance(Duration::from_secs(20));
    // Its connection timed out: the seat is free at once, for a client that died.
    let now = d.now();
    let events = d.ledger.connection_timed_out(now, ConnId(1));
    assert!(matches!(
        events.as_slice(),
        [Event::Released {
            why: ReleaseReason::ConnectionClosed,
            ..
        }]
    ));
    assert_eq!(d.ledger.in_use("solver"), 0);
    // A wrong secret gets nothing.
    let forged = LeaseRef {
        id: lease.id,
        secret: LeaseSecret([0xee; 16]),
    };
    let now = d.now();
    assert_eq!(
        d.ledger.heartbeat(now, ConnId(2), &[forged]),
        vec![LeaseState::Unknown]
    );
    // The holder was only silent (a laptop lid): within its TTL it gets the same lease
    // back, to be stored as a grant before it is told.
    d.advance(Duration::from_secs(30));
    let now = d.now();
    assert_eq!(
        d.ledger.heartbeat(now, ConnId(2), &[r(&lease)]),
        vec![LeaseState::Active]
    );
    assert_eq!(d.ledger.take_regranted(), vec![lease.clone()]);
    assert_eq!(d.ledger.in_use("solver"), 1);
    // Heartbeats go on as for any lease.
    assert!(d.advance(Duration::from_secs(60)).is_empty());
}

#[test]
fn a_lapsed_lease_is_not_given_back_once_its_seat_is_taken_or_its_ttl_ran_out() {
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 1)]);
    let first = d.checkout(1, "a", "solver", 1).unwrap();
    let now = d.now();
    d.ledger.connection_timed_out(now, ConnId(1));
    let other = d.checkout(2, "b", "solver", 1).unwrap();
    let now = d.now();
    assert_eq!(
        d.ledger.heartbeat(now, ConnId(3), &[r(&first)]),
        vec![LeaseState::Unknown]
    );
    assert!(d.ledger.take_regranted().is_empty());
    assert_eq!(d.ledger.in_use("solver"), 1);
    // The second one lapses too, and its holder comes back after its TTL: too late.
    let now = d.now();
    d.ledger.connection_timed_out(now, ConnId(2));
    d.advance(TTL);
    let now = d.now();
    assert_eq!(
        d.ledger.heartbeat(now, ConnId(4), &[r(&other)]),
        vec![LeaseState::Unknown]
    );
    assert_eq!(d.ledger.in_use("solver"), 0);
}

/// A checkout of one seat of `feature` by `user` that waits up to 300 s.
fn wait_for(d: &mut Driver, conn: u64, user: &str, feature: &str) -> Checkout {
    let fresh = d.fresh();
    let request = CheckoutRequest {
        feature: feature.into(),
        count: 1,
        version: None,
        build_date: None,
        wait_secs: 300,
        borrow_secs: 0,
    };
    let now = d.now();
    let waiter = WaiterId(d.next);
    d.ledger
        .checkout_or_wait(now, ConnId(conn), &who(user), &request, fresh, waiter)
}

/// The users waiting for `feature`, in order.
fn queue_of(d: &Driver, feature: &str) -> Vec<String> {
    d.ledger
        .status(d.now().wall)
        .into_iter()
        .find(|f| f.name == feature)
        .map(|f| f.queue.into_iter().map(|q| q.client.user).collect())
        .unwrap_or_default()
}

#[test]
fn waiters_asking_again_after_a_restart_get_their_places_back_in_order() {
    use tally_protocol::replicate::{QueueChange, QueuePlace};
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 1)]);
    d.checkout(1, "holder", "solver", 1).unwrap();
    for (i, user) in ["ana", "bo", "cy"].iter().enumerate() {
        assert!(matches!(
            wait_for(&mut d, 10 + i as u64, user, "solver"),
            Checkout::Queued { position } if position == i + 1
        ));
    }
    // What the store would hold: the three places joined.
    let places: Vec<QueuePlace> = d
        .ledger
        .take_queue_changes()
        .into_iter()
        .map(|c| match c {
            QueueChange::Joined(p) => p,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(places.len(), 3);

    // A new ledger (a restart, or a new leader) restores them as kept places; the
    // holder's lease comes back too.
    let held = d.ledger.records().cloned().collect::<Vec<_>>();
    let mut next = Driver::new(vec![FeatureGrant::counted("solver", 1)]);
    next.next = 100;
    next.ledger.restore(next.now(), held);
    next.ledger.restore_queue(next.now(), places);
    // cy reconnects first, then a newcomer, then ana; bo not yet.
    assert!(matches!(
        wait_for(&mut next, 23, "cy", "solver"),
        Checkout::Queued { position: 1 }
    ));
    assert!(matches!(
        wait_for(&mut next, 24, "dee", "solver"),
        Checkout::Queued { .. }
    ));
    assert!(matches!(
        wait_for(&mut next, 21, "ana", "solver"),
        Checkout::Queued { position: 1 }
    ));
    assert_eq!(queue_of(&next, "solver"), ["ana", "cy", "dee"]);

    // The seat comes free: ana gets it. bo, back now, goes ahead of cy and dee.
    let lease = next.ledger.records().next().unwrap().clone();
    next.ledger.checkin(next.now(), &[r(&lease)]);
    let granted: Vec<_> = next.ledger.take_waiter_outcomes();
    assert_eq!(granted.len(), 1);
    let ana = next.ledger.records().next().unwrap().clone();
    assert_eq!(ana.holder.user, "ana");
    assert!(matches!(
        wait_for(&mut next, 22, "bo", "solver"),
        Checkout::Queued { position: 1 }
    ));
    assert_eq!(queue_of(&next, "solver"), ["bo", "cy", "dee"]);
    next.ledger.checkin(next.now(), &[r(&ana)]);
    let granted = next.ledger.take_waiter_outcomes();
    assert!(
        matches!(&granted[..], [o] if matches!(&o.result, Some(Ok(rec)) if rec.holder.user == "bo")),
        "{granted:?}"
    );

    // A kept place whose waiter never comes back is given up after the grace.
    let mut again = Driver::new(vec![FeatureGrant::counted("solver", 1)]);
    again.checkout(1, "holder", "solver", 1).unwrap();
    assert!(matches!(
        wait_for(&mut again, 2, "gone", "solver"),
        Checkout::Queued { .. }
    ));
    let places: Vec<QueuePlace> = again
        .ledger
        .take_queue_changes()
        .into_iter()
        .filter_map(|c| match c {
            QueueChange::Joined(p) => Some(p),
            _ => None,
        })
        .collect();
    // A kept place holds no seat: with the seat free, a newcomer gets it at once.
    let mut later = Driver::new(vec![FeatureGrant::counted("solver", 1)]);
    later.ledger.restore_queue(later.now(), places.clone());
    assert!(matches!(
        wait_for(&mut later, 3, "eve", "solver"),
        Checkout::Granted(_)
    ));
    assert!(later.ledger.next_deadline().is_some());
    later.advance(PLACE_GRACE);
    assert!(later
        .ledger
        .take_queue_changes()
        .contains(&QueueChange::Left(places[0].seq)));
    // And a stop gives up every place, waiting or kept: the next start finds none.
    let mut stopping = Driver::new(vec![FeatureGrant::counted("solver", 1)]);
    stopping.checkout(1, "holder", "solver", 1).unwrap();
    assert!(matches!(
        wait_for(&mut stopping, 2, "w", "solver"),
        Checkout::Queued { .. }
    ));
    stopping
        .ledger
        .restore_queue(stopping.now(), places.clone());
    let joined = stopping.ledger.take_queue_changes();
    stopping.ledger.give_up_places();
    let left = stopping.ledger.take_queue_changes();
    assert_eq!(left.len(), 2, "{joined:?} {left:?}");
    assert!(left.iter().all(|c| matches!(c, QueueChange::Left(_))));
}

// ---- Licensing models: shared seats, component counts, suites, tokens ----

fn who_at(user: &str, host: &str) -> ClientIdentity {
    ClientIdentity {
        host: host.into(),
        ..who(user)
    }
}

fn checkout_as(
    d: &mut Driver,
    conn: u64,
    holder: &ClientIdentity,
    feature: &str,
    count: u32,
    version: Option<&str>,
) -> Result<LeaseRecord, DenialReason> {
    let fresh = d.fresh();
    let request = CheckoutRequest {
        feature: feature.into(),
        count,
        version: version.map(str::to_string),
        build_date: None,
        wait_secs: 0,
        borrow_secs: 0,
    };
    let now = d.now();
    d.ledger
        .checkout(now, ConnId(conn), holder, &request, fresh)
        .map(|(record, _)| record)
}

fn shared(name: &str, seats: u32, limit: u32) -> FeatureGrant {
    FeatureGrant {
        share: Some(Share {
            user: true,
            host: true,
            display: false,
            limit,
        }),
        ..FeatureGrant::counted(name, seats)
    }
}

#[test]
fn sharers_hold_one_seat_until_the_last_checks_in() {
    let mut d = Driver::new(vec![shared("solver", 2, 0)]);
    let ana = who_at("ana", "ws-1");
    let runs: Vec<LeaseRecord> = (0..3)
        .map(|_| checkout_as(&mut d, 1, &ana, "solver", 1, None).unwrap())
        .collect();
    assert_eq!(
        d.ledger.in_use("solver"),
        1,
        "three runs of ana on ws-1: one seat"
    );
    // Another host is another holder; a third holder finds no seat.
    checkout_as(&mut d, 2, &who_at("ana", "ws-2"), "solver", 1, None).unwrap();
    assert_eq!(d.ledger.in_use("solver"), 2);
    let refused = checkout_as(&mut d, 3, &who_at("bo", "ws-1"), "solver", 1, None).unwrap_err();
    assert!(
        matches!(refused, DenialReason::AllSeatsInUse { .. }),
        "{refused:?}"
    );
    // Even with every seat in use, ana's next run on ws-1 shares the seat she holds.
    let fourth = checkout_as(&mut d, 1, &ana, "solver", 1, None).unwrap();
    assert_eq!(d.ledger.in_use("solver"), 2);
    // Another count is not a sharer.
    assert!(checkout_as(&mut d, 1, &ana, "solver", 2, None).is_err());
    // The seat stays while any sharer holds it, whoever came first.
    let now = d.now();
    d.ledger
        .checkin(now, &[r(&runs[0]), r(&runs[1]), r(&runs[2])]);
    assert_eq!(d.ledger.in_use("solver"), 2);
    d.ledger.checkin(now, &[r(&fourth)]);
    assert_eq!(d.ledger.in_use("solver"), 1);
    checkout_as(&mut d, 3, &who_at("bo", "ws-1"), "solver", 1, None).unwrap();
}

#[test]
fn a_share_limit_opens_another_seat_every_n_sharers() {
    let mut d = Driver::new(vec![shared("solver", 5, 2)]);
    let ana = who_at("ana", "ws-1");
    let mut held = Vec::new();
    for (n, seats) in [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)] {
        held.push(checkout_as(&mut d, 1, &ana, "solver", 1, None).unwrap());
        assert_eq!(
            d.ledger.in_use("solver"),
            seats,
            "{n} sharers, at most 2 per seat"
        );
    }
    let now = d.now();
    d.ledger.checkin(now, &[r(&held[0]), r(&held[1])]);
    assert_eq!(d.ledger.in_use("solver"), 2, "3 sharers left: 2 seats");
}

#[test]
fn package_components_have_their_counts_and_versions() {
    // The FlexLM example: FEATURE solver 15, FEATURE mesher 4 (3.1), and a PACKAGE of 3
    // seats with COMPONENTS="solver:2024.06:2 mesher:3.1": solver 15 + 3 x 2 = 21 seats,
    // mesher 4 + 3 = 7 seats at version 3.1.
    let mut package = versioned("cae", 3, "1.0");
    package.components = vec![
        Component {
            name: "solver".into(),
            version: Some("2024.06".into()),
            count: 2,
        },
        Component {
            name: "mesher".into(),
            version: Some("3.1".into()),
            count: 1,
        },
    ];
    let mut d = Driver::new(vec![
        FeatureGrant::counted("solver", 15),
        versioned("mesher", 4, "3.1"),
        package,
    ]);
    for i in 0..21 {
        checkout_as(
            &mut d,
            1,
            &who(&format!("u{i}")),
            "solver",
            1,
            Some("2024.06"),
        )
        .unwrap();
    }
    assert!(checkout_as(&mut d, 1, &who("late"), "solver", 1, Some("2024.06")).is_err());
    for i in 0..7 {
        checkout_as(&mut d, 2, &who(&format!("m{i}")), "mesher", 1, Some("3.1")).unwrap();
    }
    assert!(checkout_as(&mut d, 2, &who("late"), "mesher", 1, Some("3.1")).is_err());
    let status = d.ledger.status(T0);
    let total = |name: &str| status.iter().find(|f| f.name == name).unwrap().total;
    assert_eq!((total("solver"), total("mesher")), (Some(21), Some(7)));
}

fn suite() -> FeatureGrant {
    FeatureGrant {
        suite: true,
        components: vec![
            Component {
                name: "mesh".into(),
                version: None,
                count: 2,
            },
            Component::named("view"),
        ],
        ..FeatureGrant::counted("studio", 2)
    }
}

#[test]
fn a_suite_seat_serves_all_components_for_one_user() {
    let mut d = Driver::new(vec![suite()]);
    let ana = who_at("ana", "ws-1");
    checkout_as(&mut d, 1, &ana, "mesh", 1, None).unwrap();
    checkout_as(&mut d, 1, &ana, "view", 1, None).unwrap();
    // Her second mesh is covered too (2 per suite seat), on another host as well.
    let second = checkout_as(&mut d, 1, &who_at("ana", "ws-9"), "mesh", 1, None).unwrap();
    assert_eq!(d.ledger.in_use("studio"), 1);
    checkout_as(&mut d, 2, &who("bo"), "view", 1, None).unwrap();
    assert_eq!(d.ledger.in_use("studio"), 2);
    // The package's two seats are used: cy waits for one, named by the package.
    match checkout_as(&mut d, 3, &who("cy"), "mesh", 1, None).unwrap_err() {
        DenialReason::AllSeatsInUse { feature, total, .. } => {
            assert_eq!((feature.as_str(), total), ("studio", 2))
        }
        other => panic!("{other:?}"),
    }
    // A third mesh of ana needs a second suite seat: there is none.
    assert!(checkout_as(&mut d, 1, &ana, "mesh", 1, None).is_err());
    let now = d.now();
    d.ledger.checkin(now, &[r(&second)]);
    assert_eq!(d.ledger.in_use("studio"), 2, "ana still runs mesh and view");
}

fn tokens(name: &str, per_seat: u32) -> FeatureGrant {
    FeatureGrant {
        tokens: Some(TokenDraw {
            pool: "credits".into(),
            per_seat,
        }),
        ..FeatureGrant::counted(name, 0)
    }
}

#[test]
fn products_spend_tokens_from_their_pool() {
    let mut d = Driver::new(vec![
        FeatureGrant::counted("credits", 10),
        tokens("optimizer", 3),
        tokens("viewer", 1),
    ]);
    let big = checkout_as(&mut d, 1, &who("ana"), "optimizer", 2, None).unwrap();
    checkout_as(&mut d, 1, &who("bo"), "optimizer", 1, None).unwrap();
    assert_eq!(d.ledger.in_use("credits"), 9);
    match checkout_as(&mut d, 2, &who("cy"), "optimizer", 1, None).unwrap_err() {
        DenialReason::AllSeatsInUse {
            feature,
            total,
            in_use,
            requested,
            ..
        } => assert_eq!(
            (feature.as_str(), total, in_use, requested),
            ("credits", 10, 9, 3)
        ),
        other => panic!("{other:?}"),
    }
    checkout_as(&mut d, 2, &who("cy"), "viewer", 1, None).unwrap();
    assert_eq!(d.ledger.in_use("credits"), 10);
    // More tokens than the pool has is never grantable: said at once.
    assert!(matches!(
        checkout_as(&mut d, 3, &who("dy"), "optimizer", 4, None).unwrap_err(),
        DenialReason::MoreThanExist { requested: 12, .. }
    ));
    let now = d.now();
    d.ledger.checkin(now, &[r(&big)]);
    assert_eq!(d.ledger.in_use("credits"), 4);
}

/// What each pool should hold for `held` leases, computed from the models' definitions
/// alone (not the ledger's code): the oracle of the property test below.
fn expected_in_use(held: &[LeaseRecord]) -> std::collections::BTreeMap<&'static str, u32> {
    use std::collections::BTreeMap;
    let mut out: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut solver_groups: BTreeMap<(String, String, u32), u32> = BTreeMap::new();
    let mut suite_users: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
    for r in held {
        match r.feature.as_str() {
            "optimizer" => *out.entry("credits").or_default() += 3 * r.count,
            "viewer" => *out.entry("credits").or_default() += r.count,
            "post" => *out.entry("post").or_default() += r.count,
            "cad" => *out.entry("cad").or_default() += r.count,
            "solver" => {
                *solver_groups
                    .entry((r.holder.user.clone(), r.holder.host.clone(), r.count))
                    .or_default() += 1
            }
            "mesh" | "view" | "studio" => {
                *suite_users
                    .entry(r.holder.user.clone())
                    .or_default()
                    .entry(r.feature.clone())
                    .or_default() += r.count
            }
            other => panic!("{other}"),
        }
    }
    // solver: shared by user and host, at most 2 per seat.
    for ((_, _, count), n) in solver_groups {
        *out.entry("solver").or_default() += count * n.div_ceil(2);
    }
    // studio: per user, enough suite seats for each component (mesh 2 per seat).
    for (_, uses) in suite_users {
        let need = uses
            .iter()
            .map(|(f, n)| if f == "mesh" { n.div_ceil(2) } else { *n })
            .max()
            .unwrap_or(0);
        *out.entry("studio").or_default() += need;
    }
    out
}

#[derive(Debug, Clone)]
enum ModelOp {
    Checkout {
        user: u8,
        host: u8,
        feature: u8,
        count: u32,
    },
    Checkin {
        which: usize,
    },
    Restart,
}

fn model_op() -> impl Strategy<Value = ModelOp> {
    prop_oneof![
        5 => (0u8..3, 0u8..2, 0u8..7, 1u32..3).prop_map(|(user, host, feature, count)| ModelOp::Checkout { user, host, feature, count }),
        3 => (0usize..24).prop_map(|which| ModelOp::Checkin { which }),
        1 => Just(ModelOp::Restart),
    ]
}

fn model_features() -> Vec<FeatureGrant> {
    let mut post = FeatureGrant::counted("cae", 2);
    post.components = vec![Component {
        name: "post".into(),
        version: None,
        count: 3,
    }];
    vec![
        FeatureGrant::counted("credits", 10),
        tokens("optimizer", 3),
        tokens("viewer", 1),
        shared("solver", 3, 2),
        suite(),
        post,
        named("cad", 3, false, 2, 0),
    ]
}

/// The site's list for `cad` (2 named users licensed): u2 is listed beyond the limit.
const MODEL_POLICY: &str = "[[named]]\nfeature = \"cad\"\nusers = [\"u0\", \"u1\", \"u2\"]\n";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Random checkouts, checkins and restarts over every model at once: each pool's
    /// seats in use equal what the models' definitions give for the leases held (so
    /// sharers never take extra seats), never exceed the pool (tokens, suite seats,
    /// component seats), a sharer with room in its group is never refused, and a feature
    /// licensed to named users serves only the listed names within the limit.
    #[test]
    fn the_models_never_over_grant_and_sharers_take_no_extra_seats(ops in proptest::collection::vec(model_op(), 1..60)) {
        const FEATURES: [&str; 7] = ["optimizer", "viewer", "solver", "mesh", "view", "post", "cad"];
        let capacity = [("credits", 10), ("solver", 3), ("studio", 2), ("post", 6), ("cad", 3)];
        let mut d = with_policy(model_features(), MODEL_POLICY);
        let mut held: Vec<LeaseRecord> = Vec::new();
        for op in ops {
            match op {
                ModelOp::Checkout { user, host, feature, count } => {
                    let holder = who_at(&format!("u{user}"), &format!("h{host}"));
                    let feature = FEATURES[feature as usize];
                    let before = expected_in_use(&held);
                    let sharer_with_room = feature == "solver"
                        && held.iter().filter(|r| r.feature == "solver" && r.holder.user == holder.user && r.holder.host == holder.host && r.count == count).count() % 2 == 1;
                    match checkout_as(&mut d, 1, &holder, feature, count, None) {
                        Ok(record) => {
                            prop_assert!(feature != "cad" || holder.user != "u2", "u2 is beyond cad's 2 named users");
                            held.push(record)
                        }
                        Err(e) => prop_assert!(!sharer_with_room, "a sharer with room was refused: {e:?} ({before:?})"),
                    }
                }
                ModelOp::Checkin { which } => {
                    if which < held.len() {
                        let rec = held.remove(which);
                        let now = d.now();
                        let (ok, _) = d.ledger.checkin(now, &[r(&rec)]);
                        prop_assert_eq!(ok, vec![true]);
                    }
                }
                ModelOp::Restart => {
                    let elapsed = d.elapsed;
                    let next = d.next;
                    d = with_policy(model_features(), MODEL_POLICY);
                    d.elapsed = elapsed;
                    d.next = next;
                    let now = d.now();
                    d.ledger.restore(now, held.clone());
                    // Restored leases re-attach by heartbeat (they have no connection).
                    let refs: Vec<LeaseRef> = held.iter().map(r).collect();
                    let now = d.now();
                    d.ledger.heartbeat(now, ConnId(1), &refs);
                }
            }
            let expected = expected_in_use(&held);
            for (pool, seats) in capacity {
                let want = expected.get(pool).copied().unwrap_or(0);
                prop_assert_eq!(d.ledger.in_use(pool), want, "pool {}", pool);
                prop_assert!(want <= seats, "pool {} over-granted: {} of {}", pool, want, seats);
            }
        }
    }
}

// Rules from FlexLM options files (INCLUDE_BORROW, EXCLUDE_BORROW, BORROW_LOWWATER,
// TIMEOUTALL, LINGER, GROUPCASEINSENSITIVE), as the policy file holds them.

/// A ledger of `features` with the policy text `policy` applied.
fn with_policy(features: Vec<FeatureGrant>, policy: &str) -> Driver {
    let mut d = Driver::new(features);
    let policy = tally_config::Policy::parse(std::path::Path::new("policy.toml"), policy)
        .unwrap_or_else(|e| panic!("{e}"));
    let now = d.now();
    d.ledger.set_policy(now, policy);
    d
}

/// A checkout of `count` seats of `feature` by `user`@`host`, borrowed for `borrow_secs`
/// when that is not 0.
fn take_as(
    d: &mut Driver,
    user: &str,
    host: &str,
    feature: &str,
    count: u32,
    borrow_secs: u64,
) -> Result<LeaseRecord, DenialReason> {
    let fresh = d.fresh();
    let conn = ConnId(d.next);
    let request = CheckoutRequest {
        feature: feature.into(),
        count,
        version: None,
        build_date: None,
        wait_secs: 0,
        borrow_secs,
    };
    let holder = ClientIdentity {
        host: host.into(),
        ..who(user)
    };
    let now = d.now();
    d.ledger
        .checkout(now, conn, &holder, &request, fresh)
        .map(|(record, _)| record)
}

fn borrowable(name: &str, seats: u32) -> FeatureGrant {
    let mut f = FeatureGrant::counted(name, seats);
    f.borrow_limit_secs = 7 * 86_400;
    f
}

#[test]
fn include_and_exclude_borrow_say_who_may_borrow_and_leave_plain_checkouts_alone() {
    let policy = r#"
[groups]
cfd = ["ana", "bo"]
[[include_borrow]]
feature = "solver"
group = "cfd"
[[exclude_borrow]]
feature = "solver"
user = "bo"
[[exclude_borrow]]
feature = "mesher"
host = "kiosk"
"#;
    let day = 86_400;
    let mut d = with_policy(
        vec![borrowable("solver", 5), borrowable("mesher", 5)],
        policy,
    );
    let ana = take_as(&mut d, "ana", "laptop", "solver", 1, day).unwrap();
    assert!(ana.borrowed_until.is_some());
    // bo is in the include list's group but excluded by name: EXCLUDE_BORROW wins.
    for user in ["bo", "cy"] {
        let denial = take_as(&mut d, user, "laptop", "solver", 1, day).unwrap_err();
        assert_eq!(
            denial,
            DenialReason::BorrowNotAllowed {
                feature: "solver".into(),
                limit_secs: 0
            },
            "{user}"
        );
        assert_eq!(denial.to_string(), "'solver' may not be borrowed");
        // On site, the same user checks out as before.
        let plain = take_as(&mut d, user, "laptop", "solver", 1, 0).unwrap();
        assert!(plain.borrowed_until.is_none());
    }
    // No include list for mesher: anyone borrows, except from the excluded host.
    take_as(&mut d, "cy", "laptop", "mesher", 1, day).unwrap();
    assert!(matches!(
        take_as(&mut d, "ana", "KIOSK", "mesher", 1, day),
        Err(DenialReason::BorrowNotAllowed { limit_secs: 0, .. })
    ));
    assert_eq!(
        (d.ledger.in_use("solver"), d.ledger.in_use("mesher")),
        (3, 1)
    );
}

#[test]
fn borrow_lowwater_keeps_seats_from_being_borrowed() {
    let policy = "[[borrow_lowwater]]\nfeature = \"solver\"\nseats = 2\n";
    let day = 86_400;
    let mut d = with_policy(vec![borrowable("solver", 5)], policy);
    let first = take_as(&mut d, "ana", "l1", "solver", 2, day).unwrap();
    // 2 of 5 out on borrow, 2 kept: 1 more may be borrowed, not 2.
    assert!(matches!(
        take_as(&mut d, "bo", "l2", "solver", 2, day),
        Err(DenialReason::BorrowNotAllowed { limit_secs: 0, .. })
    ));
    take_as(&mut d, "bo", "l2", "solver", 1, day).unwrap();
    assert!(matches!(
        take_as(&mut d, "cy", "l3", "solver", 1, day),
        Err(DenialReason::BorrowNotAllowed { limit_secs: 0, .. })
    ));
    // The kept seats serve checkouts on site.
    take_as(&mut d, "cy", "ws", "solver", 2, 0).unwrap();
    assert_eq!(d.ledger.in_use("solver"), 5);
    // A borrow returned early makes room to borrow again.
    let now = d.now();
    d.ledger.checkin(now, &[r(&first)]);
    take_as(&mut d, "dee", "l4", "solver", 2, day).unwrap();
}

#[test]
fn timeoutall_sets_every_ttl_a_feature_timeout_wins_and_the_vendors_is_a_floor() {
    let policy = "timeout_all_secs = 600\n[[timeout]]\nfeature = \"viewer\"\nsecs = 300\n";
    let mut mesher = FeatureGrant::counted("mesher", 1);
    mesher.heartbeat_ttl_secs = Some(900);
    let features = vec![
        FeatureGrant::counted("solver", 1),
        FeatureGrant::counted("viewer", 1),
        mesher,
    ];
    let mut d = with_policy(features, policy);
    let ttl = |d: &mut Driver, f: &str| take_as(d, "a", "ws", f, 1, 0).unwrap().ttl_secs;
    assert_eq!(ttl(&mut d, "solver"), 600, "TIMEOUTALL, not the default 90");
    assert_eq!(ttl(&mut d, "viewer"), 300, "the feature's own TIMEOUT wins");
    assert_eq!(ttl(&mut d, "mesher"), 900, "never below the vendor's");
    // The lease lives by it: silent holders keep solver 600 s, viewer 300 s.
    let now = d.now();
    d.ledger.connection_closed(now, ConnId(1_000));
    d.advance(Duration::from_secs(299));
    assert_eq!(d.ledger.in_use("viewer"), 1);
    d.advance(Duration::from_secs(1));
    assert_eq!(d.ledger.in_use("viewer"), 0);
    d.advance(Duration::from_secs(299));
    assert_eq!(d.ledger.in_use("solver"), 1);
    d.advance(Duration::from_secs(1));
    assert_eq!(d.ledger.in_use("solver"), 0);
    assert_eq!(d.ledger.in_use("mesher"), 1);
}

#[test]
fn a_site_linger_lengthens_the_vendors_and_never_shortens_it() {
    let policy = "[[linger]]\nfeature = \"solver\"\nsecs = 30\n[[linger]]\nfeature = \"mesher\"\nsecs = 120\n";
    let mut solver = FeatureGrant::counted("solver", 1);
    solver.linger_secs = 60;
    let mut mesher = FeatureGrant::counted("mesher", 1);
    mesher.linger_secs = 10;
    let mut d = with_policy(vec![solver, mesher], policy);
    let s = take_as(&mut d, "a", "ws", "solver", 1, 0).unwrap();
    let m = take_as(&mut d, "a", "ws", "mesher", 1, 0).unwrap();
    assert_eq!((s.linger_secs, m.linger_secs), (60, 120));
    let now = d.now();
    d.ledger.checkin(now, &[r(&s), r(&m)]);
    d.advance(Duration::from_secs(60));
    assert_eq!(
        d.ledger.in_use("solver"),
        0,
        "the vendor's 60 s, not the site's 30"
    );
    d.advance(Duration::from_secs(59));
    assert_eq!(
        d.ledger.in_use("mesher"),
        1,
        "the site's 120 s, not the vendor's 10"
    );
    d.advance(Duration::from_secs(1));
    assert_eq!(d.ledger.in_use("mesher"), 0);
}

#[test]
fn case_insensitive_user_names_match_groups_and_rules_in_any_case() {
    let rules = r#"
[groups]
cfd = ["Ana"]
[[exclude]]
feature = "solver"
user = "BO"
[[reserve]]
feature = "solver"
seats = 1
group = "cfd"
[[max]]
feature = "solver"
seats = 1
user = "cy"
"#;
    let mut d = with_policy(
        vec![FeatureGrant::counted("solver", 4)],
        &format!("case_insensitive_users = true\n{rules}"),
    );
    assert!(matches!(
        take_as(&mut d, "bo", "ws", "solver", 1, 0),
        Err(DenialReason::Excluded { .. })
    ));
    take_as(&mut d, "cy", "ws", "solver", 1, 0).unwrap();
    // MAX counts cy's seats whatever the case of the login that holds them.
    assert!(matches!(
        take_as(&mut d, "CY", "ws", "solver", 1, 0),
        Err(DenialReason::MaxReached { .. })
    ));
    take_as(&mut d, "dee", "ws", "solver", 2, 0).unwrap();
    // The last seat is reserved for cfd: ANA is Ana.
    assert!(matches!(
        take_as(&mut d, "eve", "ws", "solver", 1, 0),
        Err(DenialReason::ReservedForOthers { .. })
    ));
    take_as(&mut d, "ANA", "ws", "solver", 1, 0).unwrap();
    // Without the switch names are exact, as before.
    let mut exact = with_policy(vec![FeatureGrant::counted("solver", 4)], rules);
    take_as(&mut exact, "bo", "ws", "solver", 1, 0).unwrap();
    take_as(&mut exact, "CY", "ws", "solver", 1, 0).unwrap();
    take_as(&mut exact, "cy", "ws", "solver", 1, 0).unwrap();
    assert!(matches!(
        take_as(&mut exact, "ANA", "ws", "solver", 1, 0),
        Err(DenialReason::ReservedForOthers { .. })
    ));
}

#[test]
fn includeall_and_excludeall_rule_every_feature() {
    let policy = r#"
[groups]
staff = ["ana", "bo"]
[[include_all]]
group = "staff"
[[exclude_all]]
user = "bo"
[[include]]
feature = "viewer"
user = "guest"
"#;
    let features = vec![
        FeatureGrant::counted("solver", 5),
        FeatureGrant::counted("viewer", 5),
    ];
    let mut d = with_policy(features, policy);
    take_as(&mut d, "ana", "ws", "solver", 1, 0).unwrap();
    take_as(&mut d, "ana", "ws", "viewer", 1, 0).unwrap();
    assert_eq!(
        take_as(&mut d, "guest", "ws", "solver", 1, 0),
        Err(DenialReason::NotIncluded {
            feature: "solver".into()
        })
    );
    take_as(&mut d, "guest", "ws", "viewer", 1, 0).unwrap();
    let denial = take_as(&mut d, "bo", "ws", "viewer", 1, 0).unwrap_err();
    assert_eq!(
        denial.to_string(),
        "'viewer' is not available to user bo (excluded by the site's policy)"
    );
}

#[test]
fn a_site_share_serves_every_checkout_of_the_same_count() {
    let mut g = FeatureGrant::counted("admin_tool", 1);
    g.share = Some(Share {
        user: false,
        host: false,
        display: false,
        limit: 0,
    });
    let mut d = Driver::new(vec![g]);
    checkout_as(&mut d, 1, &who_at("ana", "ws-1"), "admin_tool", 1, None).unwrap();
    checkout_as(&mut d, 2, &who_at("bo", "ws-2"), "admin_tool", 1, None).unwrap();
    assert_eq!(d.ledger.in_use("admin_tool"), 1);
    assert!(checkout_as(&mut d, 3, &who("cy"), "admin_tool", 2, None).is_err());
}

#[test]
fn a_waiter_for_a_token_product_is_served_when_tokens_come_back() {
    let mut d = Driver::new(vec![
        FeatureGrant::counted("credits", 5),
        tokens("optimizer", 3),
    ]);
    let held = checkout_as(&mut d, 1, &who("ana"), "optimizer", 1, None).unwrap();
    let fresh = d.fresh();
    let request = CheckoutRequest {
        feature: "optimizer".into(),
        count: 1,
        version: None,
        build_date: None,
        wait_secs: 60,
        borrow_secs: 0,
    };
    let now = d.now();
    let waiting =
        d.ledger
            .checkout_or_wait(now, ConnId(2), &who("bo"), &request, fresh, WaiterId(9));
    assert!(
        matches!(waiting, Checkout::Queued { position: 1 }),
        "{waiting:?}"
    );
    let now = d.now();
    d.ledger.checkin(now, &[r(&held)]);
    d.ledger.serve_queues(now);
    let outcomes = d.ledger.take_waiter_outcomes();
    assert!(
        matches!(outcomes.as_slice(), [o] if o.waiter == WaiterId(9) && matches!(o.result, Some(Ok(_)))),
        "{outcomes:?}"
    );
    assert_eq!(d.ledger.in_use("credits"), 3);
}

// ---- Named users and named hosts (`[[named]]` with the vendor's `named` terms) ----

/// `name` with `seats` seats licensed to `limit` named users (hosts when `hosts`), names
/// changeable after `change_days`.
fn named(name: &str, seats: u32, hosts: bool, limit: u32, change_days: u32) -> FeatureGrant {
    FeatureGrant {
        named: Some(tally_protocol::bundle::Named {
            hosts,
            limit,
            change_days,
        }),
        ..FeatureGrant::counted(name, seats)
    }
}

#[test]
fn a_named_user_feature_serves_only_the_listed_users_within_the_limit() {
    let policy = r#"
[[named]]
feature = "solver"
users = ["ana", "bo", "dee"]
"#;
    let mut d = with_policy(
        vec![
            named("solver", 5, false, 2, 0),
            FeatureGrant::counted("viewer", 5),
        ],
        policy,
    );
    take_as(&mut d, "ana", "ws-1", "solver", 1, 0).unwrap();
    take_as(&mut d, "bo", "ws-2", "solver", 1, 0).unwrap();
    // The same named user on another host, twice: still one name.
    take_as(&mut d, "ana", "ws-3", "solver", 1, 0).unwrap();
    let denial = take_as(&mut d, "cy", "ws-1", "solver", 1, 0).unwrap_err();
    assert_eq!(denial.code(), "excluded");
    assert_eq!(
        denial.to_string(),
        "'solver' is not available to user cy: 'solver' is licensed to 2 named users (ana, bo); \
         cy is not one of them: ask your administrator (excluded by the site's policy)"
    );
    // Listed, but third in a list the licence allows two of: refused, saying so.
    let denial = take_as(&mut d, "dee", "ws-1", "solver", 1, 0).unwrap_err();
    assert!(
        denial
            .to_string()
            .contains("(ana, bo); dee is listed after them, beyond the limit"),
        "{denial}"
    );
    // Other features are not named: anyone.
    take_as(&mut d, "cy", "ws-1", "viewer", 1, 0).unwrap();
    // User names are compared exactly unless the policy says otherwise.
    assert!(take_as(&mut d, "ANA", "ws-1", "solver", 1, 0).is_err());
    let mut d = with_policy(
        vec![named("solver", 5, false, 2, 0)],
        &format!("case_insensitive_users = true\n{policy}"),
    );
    take_as(&mut d, "ANA", "ws-1", "solver", 1, 0).unwrap();
}

#[test]
fn a_named_host_feature_compares_hosts_without_case_and_needs_a_host_list() {
    let mut d = with_policy(
        vec![named("solver", 5, true, 1, 0)],
        "[[named]]\nfeature = \"solver\"\nhosts = [\"WS-1\"]\n",
    );
    take_as(&mut d, "ana", "ws-1", "solver", 1, 0).unwrap();
    take_as(&mut d, "bo", "Ws-1", "solver", 1, 0).unwrap();
    let denial = take_as(&mut d, "ana", "ws-2", "solver", 1, 0).unwrap_err();
    assert!(
        denial
            .to_string()
            .contains("host ws-2: 'solver' is licensed to 1 named host (WS-1); ws-2 is not one"),
        "{denial}"
    );
    // No list, or a list of users for a feature licensed to hosts: nobody.
    for policy in ["", "[[named]]\nfeature = \"solver\"\nusers = [\"ana\"]\n"] {
        let mut d = with_policy(vec![named("solver", 5, true, 1, 0)], policy);
        let denial = take_as(&mut d, "ana", "ws-1", "solver", 1, 0).unwrap_err();
        assert!(
            denial
                .to_string()
                .contains("licensed to 1 named host and the site's policy lists none"),
            "{denial}"
        );
    }
}

#[test]
fn a_policy_reload_changes_the_named_users_and_the_seats_still_count() {
    let mut d = with_policy(
        vec![named("solver", 1, false, 2, 0)],
        "[[named]]\nfeature = \"solver\"\nusers = [\"ana\", \"bo\"]\n",
    );
    let held = take_as(&mut d, "ana", "ws", "solver", 1, 0).unwrap();
    // One seat: a listed name still waits for it.
    assert!(matches!(
        take_as(&mut d, "bo", "ws", "solver", 1, 0),
        Err(DenialReason::AllSeatsInUse { .. })
    ));
    let policy = tally_config::Policy::parse(
        std::path::Path::new("policy.toml"),
        "[[named]]\nfeature = \"solver\"\nusers = [\"cy\"]\n",
    )
    .unwrap();
    let now = d.now();
    d.ledger.set_policy(now, policy);
    // The lease already held stays; the new list rules new checkouts.
    assert_eq!(d.ledger.in_use("solver"), 1);
    let now = d.now();
    d.ledger.checkin(now, &[r(&held)]);
    assert!(take_as(&mut d, "ana", "ws", "solver", 1, 0).is_err());
    take_as(&mut d, "cy", "ws", "solver", 1, 0).unwrap();
}

fn set_policy(d: &mut Driver, policy: &str) {
    let policy = tally_config::Policy::parse(std::path::Path::new("policy.toml"), policy)
        .unwrap_or_else(|e| panic!("{e}"));
    let now = d.now();
    d.ledger.set_policy(now, policy);
}

const ANA_BO: &str = "[[named]]\nfeature = \"solver\"\nusers = [\"ana\", \"bo\"]\n";
const ANA_CY: &str = "[[named]]\nfeature = \"solver\"\nusers = [\"ana\", \"cy\"]\n";

#[test]
fn a_named_user_keeps_its_place_for_the_change_period_across_policy_changes_and_restarts() {
    let features = || vec![named("solver", 5, false, 2, 30)];
    let mut d = with_policy(features(), ANA_BO);
    let ana = take_as(&mut d, "ana", "ws", "solver", 1, 0).unwrap();
    d.advance(Duration::from_secs(3600));
    let bo = take_as(&mut d, "bo", "ws", "solver", 1, 0).unwrap();
    // Used twice: still one place.
    take_as(&mut d, "bo", "ws-2", "solver", 1, 0).unwrap();
    let now = d.now();
    d.ledger.checkin(now, &[r(&ana), r(&bo)]);
    let taken = d.ledger.take_named_seats();
    let names: Vec<(&str, UnixTime, UnixTime)> = taken
        .iter()
        .map(|s| (s.name.as_str(), s.since, s.until))
        .collect();
    let day = 86_400;
    let bo_frees = T0.plus_secs(3600 + 30 * day);
    assert_eq!(
        names,
        vec![
            ("ana", T0, T0.plus_secs(30 * day)),
            ("bo", T0.plus_secs(3600), bo_frees)
        ]
    );
    assert!(d.ledger.take_named_seats().is_empty());

    // The admin replaces bo by cy ten days later: bo's place is not free yet.
    d.advance(Duration::from_secs(10 * day));
    set_policy(&mut d, ANA_CY);
    let denial = take_as(&mut d, "cy", "ws", "solver", 1, 0).unwrap_err();
    assert_eq!(
        denial.to_string(),
        format!(
            "'solver' is not available to user cy: 'solver' is licensed to 2 named users \
             (ana, bo until {date}); cy waits for a place: bo's place frees on {date}: ask \
             your administrator (excluded by the site's policy)",
            date = bo_frees.date()
        )
    );
    // bo is off the list: refused too, though its place is still taken.
    let denial = take_as(&mut d, "bo", "ws", "solver", 1, 0).unwrap_err();
    assert!(
        denial.to_string().contains("bo is not one of them"),
        "{denial}"
    );
    take_as(&mut d, "ana", "ws", "solver", 1, 0).unwrap();

    // A restart (or a new leader) restores the places from the store: the same.
    let stored = d.ledger.named_seats(d.now());
    assert_eq!(stored, taken);
    let mut e = with_policy(features(), ANA_CY);
    e.elapsed = d.elapsed;
    let now = e.now();
    e.ledger.restore_named_seats(now, stored.clone());
    let again = take_as(&mut e, "cy", "ws", "solver", 1, 0).unwrap_err();
    assert!(
        again
            .to_string()
            .contains(&format!("bo's place frees on {}", bo_frees.date())),
        "{again}"
    );
    // Without them (what a tallyd that forgot them would do) cy would be served.
    let mut forgot = with_policy(features(), ANA_CY);
    forgot.elapsed = d.elapsed;
    take_as(&mut forgot, "cy", "ws", "solver", 1, 0).unwrap();

    // Once the change period ran out, cy takes bo's place; restoring then skips bo's.
    e.advance(Duration::from_secs(20 * day + 3600));
    take_as(&mut e, "cy", "ws", "solver", 1, 0).unwrap();
    let mut f = with_policy(features(), ANA_CY);
    f.elapsed = e.elapsed;
    let now = f.now();
    f.ledger.restore_named_seats(now, stored);
    assert_eq!(
        f.ledger
            .named_seats(now)
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        Vec::<&str>::new()
    );
    take_as(&mut f, "cy", "ws", "solver", 1, 0).unwrap();
}

#[test]
fn without_a_change_period_a_replaced_name_frees_its_place_at_once() {
    let mut d = with_policy(vec![named("solver", 5, false, 2, 0)], ANA_BO);
    take_as(&mut d, "bo", "ws", "solver", 1, 0).unwrap();
    assert!(d.ledger.take_named_seats().is_empty());
    set_policy(&mut d, ANA_CY);
    take_as(&mut d, "cy", "ws", "solver", 1, 0).unwrap();
    assert!(take_as(&mut d, "bo", "ws", "solver", 1, 0).is_err());
}

#[test]
fn names_already_on_the_licence_keep_their_places_before_newly_listed_ones() {
    let mut d = with_policy(vec![named("solver", 5, false, 2, 30)], ANA_BO);
    take_as(&mut d, "ana", "ws", "solver", 1, 0).unwrap();
    take_as(&mut d, "bo", "ws", "solver", 1, 0).unwrap();
    // cy listed first, with ana and bo still on: cy waits, ana and bo keep using it.
    set_policy(
        &mut d,
        "[[named]]\nfeature = \"solver\"\nusers = [\"cy\", \"ana\", \"bo\"]\n",
    );
    take_as(&mut d, "bo", "ws", "solver", 1, 0).unwrap();
    take_as(&mut d, "ana", "ws", "solver", 1, 0).unwrap();
    let denial = take_as(&mut d, "cy", "ws", "solver", 1, 0).unwrap_err();
    assert!(
        denial
            .to_string()
            .contains("(ana, bo); cy is listed after them, beyond the limit"),
        "{denial}"
    );
}

// ---- Remote sessions and virtual machines (FlexLM TS_OK, RLM's VM refusal) ----

/// A checkout of one seat of `feature` by a client that reported `facts` (`None`: a
/// client too old to), borrowed for `borrow_secs` when not 0.
fn take_observed(
    d: &mut Driver,
    feature: &str,
    facts: Option<tally_protocol::observed::ClientFacts>,
    borrow_secs: u64,
) -> Result<LeaseRecord, DenialReason> {
    let fresh = d.fresh();
    let conn = ConnId(d.next);
    let waiter = WaiterId(d.next);
    let request = CheckoutRequest {
        feature: feature.into(),
        count: 1,
        version: None,
        build_date: None,
        wait_secs: 0,
        borrow_secs,
    };
    let now = d.now();
    match d.ledger.checkout_observed(
        now,
        conn,
        &who("ann"),
        &request,
        facts.as_ref(),
        fresh,
        waiter,
    ) {
        Checkout::Granted(granted) => Ok(granted.0),
        Checkout::Denied(reason) => Err(reason),
        Checkout::Queued { .. } => panic!("a checkout that does not wait was queued"),
    }
}

fn facts(vm: Option<&str>, remote: Option<&str>) -> Option<tally_protocol::observed::ClientFacts> {
    Some(tally_protocol::observed::ClientFacts::new(
        vm.map(str::to_string),
        remote.map(str::to_string),
    ))
}

/// `solver` refuses remote sessions, `mesher` virtual machines, `viewer` neither; all
/// borrowable.
fn session_features() -> Vec<FeatureGrant> {
    let mut solver = borrowable("solver", 5);
    solver.deny_remote_sessions = true;
    let mut mesher = borrowable("mesher", 5);
    mesher.deny_virtual_machines = true;
    vec![solver, mesher, borrowable("viewer", 5)]
}

#[test]
fn remote_sessions_and_virtual_machines_are_refused_where_the_vendor_says_naming_what_was_seen() {
    let mut d = Driver::new(session_features());
    let ssh = || facts(None, Some("SSH from 10.0.0.5"));
    let kvm = || facts(Some("KVM/QEMU"), None);
    let err = take_observed(&mut d, "solver", ssh(), 0).unwrap_err();
    assert_eq!(
        err,
        DenialReason::RemoteSessionRefused {
            feature: "solver".into(),
            session: "SSH from 10.0.0.5".into()
        }
    );
    assert!(
        err.to_string()
            .starts_with("'solver' may not be used from a remote session (SSH from 10.0.0.5)"),
        "{err}"
    );
    assert_eq!(err.code(), "remote_session_refused");
    let err = take_observed(&mut d, "mesher", kvm(), 0).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("'mesher' may not be used from a virtual machine (KVM/QEMU)"),
        "{err}"
    );
    assert_eq!(err.code(), "virtual_machine_refused");
    // Each rule refuses only what it names; the console and bare metal pass.
    take_observed(&mut d, "solver", kvm(), 0).unwrap();
    take_observed(&mut d, "mesher", ssh(), 0).unwrap();
    take_observed(&mut d, "solver", facts(None, None), 0).unwrap();
    take_observed(&mut d, "mesher", facts(None, None), 0).unwrap();
    take_observed(&mut d, "viewer", facts(Some("VMware"), Some("RDP")), 0).unwrap();
    // Nothing refused took a seat.
    assert_eq!(d.ledger.in_use("solver"), 2);
    assert_eq!(d.ledger.in_use("mesher"), 2);
}

#[test]
fn a_client_that_cannot_say_where_it_runs_is_told_to_upgrade_where_the_vendor_asks() {
    let mut d = Driver::new(session_features());
    for feature in ["solver", "mesher"] {
        let err = take_observed(&mut d, feature, None, 0).unwrap_err();
        // A reason every client decodes, old ones included.
        let DenialReason::InvalidRequest { what } = &err else {
            panic!("{err:?}")
        };
        assert!(what.contains(&format!("'{feature}'")), "{what}");
        assert!(what.contains("upgrade"), "{what}");
    }
    // Features without the rules serve old clients as before.
    take_observed(&mut d, "viewer", None, 0).unwrap();
    assert_eq!(d.ledger.in_use("solver") + d.ledger.in_use("mesher"), 0);
}

#[test]
fn borrowing_from_a_virtual_machine_or_a_remote_session_follows_the_same_rule() {
    let mut d = Driver::new(session_features());
    let week = 7 * 86_400;
    let err = take_observed(&mut d, "mesher", facts(Some("VirtualBox"), None), week).unwrap_err();
    assert!(
        matches!(err, DenialReason::VirtualMachineRefused { .. }),
        "{err:?}"
    );
    let err = take_observed(&mut d, "solver", facts(None, Some("SSH")), week).unwrap_err();
    assert!(
        matches!(err, DenialReason::RemoteSessionRefused { .. }),
        "{err:?}"
    );
    let borrowed = take_observed(&mut d, "mesher", facts(None, None), week).unwrap();
    assert!(borrowed.borrowed_until.is_some());
}

#[test]
fn a_grant_that_allows_serves_and_a_reload_brings_the_rules_in_and_out() {
    let denying = session_features();
    // An add-on granting `solver` from remote sessions: any grant that allows serves.
    let mut d = Driver::new(vec![]);
    let now = d.now();
    let allowing = bundle("b2", &[], vec![borrowable("solver", 2)]);
    d.ledger
        .reload(now, &[bundle("b1", &[], denying.clone()), allowing]);
    take_observed(&mut d, "solver", facts(None, Some("SSH from 10.0.0.5")), 0).unwrap();
    // Without the add-on the rule holds again.
    let now = d.now();
    d.ledger.reload(now, &[bundle("b1", &[], denying)]);
    take_observed(&mut d, "solver", facts(None, Some("SSH from 10.0.0.5")), 0).unwrap_err();
    // A leader's successor keeps the rules.
    let mut next = Driver {
        ledger: d.ledger.successor(),
        start: d.start,
        elapsed: d.elapsed,
        next: d.next + 100,
    };
    take_observed(&mut next, "mesher", facts(Some("Xen"), None), 0).unwrap_err();
}
