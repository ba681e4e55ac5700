//! Policy, queueing, borrowing, overdraft, clock and admin removal in the ledger, with
//! made-up times.

use std::path::Path;
use std::time::{Duration, Instant};
use tally_config::Policy;
use tally_daemon::ledger::*;
use tally_protocol::bundle::{Bundle, Customer, FeatureGrant};
use tally_protocol::lease::{LeaseId, LeaseRecord, LeaseSecret};
use tally_protocol::time::UnixTime;
use tally_protocol::wire::{CheckoutRequest, ClientIdentity, DenialReason, LeaseRef, LeaseState};

const T0: UnixTime = UnixTime(1_800_000_000);

struct Driver {
    ledger: Ledger,
    start: Instant,
    elapsed: Duration,
    next: u64,
}

fn bundle(features: Vec<FeatureGrant>) -> Bundle {
    Bundle {
        id: "b".into(),
        issued_at: T0,
        vendor: "v".into(),
        customer: Customer {
            id: "c".into(),
            name: "C".into(),
        },
        binding: vec![],
        supersedes: vec![],
        valid_from: None,
        valid_until: None,
        features,
    }
}

impl Driver {
    fn new(features: Vec<FeatureGrant>, policy: &str) -> Driver {
        Driver::with_holdoff(features, policy, Duration::ZERO)
    }

    fn with_holdoff(features: Vec<FeatureGrant>, policy: &str, holdoff: Duration) -> Driver {
        let mut d = Driver {
            ledger: Ledger::new(
                LedgerSettings {
                    default_ttl: Duration::from_secs(90),
                    remove_holdoff: holdoff,
                },
                &[bundle(features)],
            ),
            start: Instant::now(),
            elapsed: Duration::ZERO,
            next: 1,
        };
        let policy = Policy::parse(Path::new("policy.toml"), policy).unwrap();
        let now = d.now();
        d.ledger.set_policy(now, policy);
        d
    }

    fn now(&self) -> Now {
        Now {
            mono: self.start + self.elapsed,
            wall: T0.plus_secs(self.elapsed.as_secs()),
        }
    }

    fn fresh(&mut self) -> FreshLease {
        self.next += 1;
        FreshLease {
            id: LeaseId(self.next),
            secret: LeaseSecret([self.next as u8; 16]),
        }
    }

    fn request(
        &mut self,
        user: &str,
        host: &str,
        feature: &str,
        count: u32,
        wait: u32,
        borrow: u64,
    ) -> Checkout {
        let fresh = self.fresh();
        let request = CheckoutRequest {
            feature: feature.into(),
            count,
            version: None,
            build_date: None,
            wait_secs: wait,
            borrow_secs: borrow,
        };
        let now = self.now();
        let waiter = WaiterId(self.next);
        self.ledger.checkout_or_wait(
            now,
            ConnId(self.next),
            &who(user, host),
            &request,
            fresh,
            waiter,
        )
    }

    fn take(&mut self, user: &str, feature: &str) -> Result<LeaseRecord, DenialReason> {
        match self.request(user, "ws-9", feature, 1, 0, 0) {
            Checkout::Granted(g) => Ok(g.0),
            Checkout::Denied(d) => Err(d),
            Checkout::Queued { .. } => panic!("queued without asking to wait"),
        }
    }

    fn advance(&mut self, secs: u64) -> Vec<Event> {
        self.elapsed += Duration::from_secs(secs);
        let now = self.now();
        self.ledger.expire(now)
    }
}

fn who(user: &str, host: &str) -> ClientIdentity {
    ClientIdentity {
        user: user.into(),
        host: host.into(),
        pid: 1,
        program: "p".into(),
        display: None,
    }
}

fn r(record: &LeaseRecord) -> LeaseRef {
    LeaseRef {
        id: record.id,
        secret: record.secret.clone(),
    }
}

const GROUPS: &str =
    "[groups]\ncfd = [\"ana\", \"bo\"]\n[host_groups]\nlab = [\"lab-1\", \"lab-2\"]\n";

#[test]
fn reserve_keeps_seats_for_the_group() {
    let policy = format!("{GROUPS}[[reserve]]\nfeature = \"solver\"\nseats = 2\ngroup = \"cfd\"\n");
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 4)], &policy);
    d.take("cy", "solver").unwrap();
    d.take("dee", "solver").unwrap();
    match d.take("eve", "solver") {
        Err(e @ DenialReason::ReservedForOthers { .. }) => {
            assert!(e.to_string().contains("reserved for group cfd"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    d.take("ana", "solver").unwrap();
    d.take("bo", "solver").unwrap();
    assert!(matches!(
        d.take("ana", "solver"),
        Err(DenialReason::AllSeatsInUse { .. })
    ));
}

#[test]
fn max_caps_a_user_and_a_group() {
    let policy = format!(
        "{GROUPS}[[max]]\nfeature = \"solver\"\nseats = 1\nuser = \"cy\"\n[[max]]\nfeature = \"solver\"\nseats = 2\ngroup = \"cfd\"\n"
    );
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 10)], &policy);
    d.take("cy", "solver").unwrap();
    match d.take("cy", "solver") {
        Err(e @ DenialReason::MaxReached { .. }) => {
            assert!(
                e.to_string().contains("allows user cy at most 1 seat"),
                "{e}"
            )
        }
        other => panic!("{other:?}"),
    }
    d.take("ana", "solver").unwrap();
    d.take("bo", "solver").unwrap();
    assert!(matches!(
        d.take("ana", "solver"),
        Err(DenialReason::MaxReached { .. })
    ));
    d.take("dee", "solver").unwrap();
}

#[test]
fn include_admits_only_its_subjects_and_exclude_wins() {
    let policy = format!(
        "{GROUPS}[[include]]\nfeature = \"viewer\"\ngroup = \"cfd\"\n[[exclude]]\nfeature = \"viewer\"\nuser = \"bo\"\n[[exclude]]\nfeature = \"solver\"\nhost_group = \"lab\"\n"
    );
    let mut d = Driver::new(
        vec![
            FeatureGrant::counted("viewer", 10),
            FeatureGrant::counted("solver", 10),
        ],
        &policy,
    );
    d.take("ana", "viewer").unwrap();
    assert!(matches!(
        d.take("cy", "viewer"),
        Err(DenialReason::NotIncluded { .. })
    ));
    match d.take("bo", "viewer") {
        Err(e @ DenialReason::Excluded { .. }) => assert!(e.to_string().contains("user bo"), "{e}"),
        other => panic!("{other:?}"),
    }
    match d.request("ana", "LAB-2", "solver", 1, 0, 0) {
        Checkout::Denied(DenialReason::Excluded { rule, .. }) => assert_eq!(rule, "host group lab"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        d.request("ana", "ws-1", "solver", 1, 0, 0),
        Checkout::Granted(_)
    ));
}

#[test]
fn timeout_lengthens_but_never_shortens_the_vendor_ttl() {
    let mut vendor = FeatureGrant::counted("viewer", 5);
    vendor.heartbeat_ttl_secs = Some(120);
    let policy = "[[timeout]]\nfeature = \"solver\"\nsecs = 600\n[[timeout]]\nfeature = \"viewer\"\nsecs = 30\n";
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 5), vendor], policy);
    assert_eq!(d.take("a", "solver").unwrap().ttl_secs, 600);
    assert_eq!(d.take("a", "viewer").unwrap().ttl_secs, 120);
}

#[test]
fn waiters_are_served_first_come_first_served() {
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 1)], "");
    let holder = d.take("a", "solver").unwrap();
    let first = match d.request("b", "h", "solver", 1, 60, 0) {
        Checkout::Queued { position } => {
            assert_eq!(position, 1);
            WaiterId(d.next)
        }
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        d.request("c", "h", "solver", 1, 60, 0),
        Checkout::Queued { position: 2 }
    ));
    let status = d.ledger.status(d.now().wall);
    assert_eq!(status[0].queue.len(), 2);
    assert_eq!(status[0].queue[0].client.user, "b");
    // A newcomer that does not wait cannot overtake the queue.
    assert!(d.take("d", "solver").is_err());
    let now = d.now();
    d.ledger.checkin(now, &[r(&holder)]);
    let outcomes = d.ledger.take_waiter_outcomes();
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].waiter, first);
    match &outcomes[0].result {
        Some(Ok(record)) => assert_eq!(record.holder.user, "b"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(outcomes[0].event, Some(Event::Granted(_))));
    assert_eq!(d.ledger.in_use("solver"), 1);
}

#[test]
fn a_timed_out_or_cancelled_wait_leaves_no_trace() {
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 1)], "");
    d.take("a", "solver").unwrap();
    assert!(matches!(
        d.request("b", "h", "solver", 1, 30, 0),
        Checkout::Queued { .. }
    ));
    assert!(matches!(
        d.request("c", "h", "solver", 1, 60, 0),
        Checkout::Queued { .. }
    ));
    let cancelled_conn = ConnId(d.next);
    assert_eq!(
        d.ledger.next_deadline(),
        Some(d.now().mono + Duration::from_secs(30))
    );
    assert!(d.advance(29).is_empty());
    assert!(d.ledger.take_waiter_outcomes().is_empty());
    d.advance(1);
    let outcomes = d.ledger.take_waiter_outcomes();
    match &outcomes[..] {
        [WaiterOutcome {
            result: Some(Err(e @ DenialReason::QueueTimeout { .. })),
            event: None,
            ..
        }] => assert!(e.to_string().contains("within 30 s"), "{e}"),
        other => panic!("{other:?}"),
    }
    // The other waiter's connection closes: withdrawn, silently.
    let now = d.now();
    assert!(d.ledger.connection_closed(now, cancelled_conn).is_empty());
    let outcomes = d.ledger.take_waiter_outcomes();
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].result, None);
    assert!(d.ledger.status(d.now().wall)[0].queue.is_empty());
    assert_eq!(d.ledger.in_use("solver"), 1);
}

#[test]
fn a_reserved_seat_goes_only_to_a_waiter_of_its_group() {
    let policy = format!("{GROUPS}[[reserve]]\nfeature = \"solver\"\nseats = 1\ngroup = \"cfd\"\n");
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 2)], &policy);
    let ana = d.take("ana", "solver").unwrap();
    let cy = d.take("cy", "solver").unwrap();
    assert!(matches!(
        d.request("dee", "h", "solver", 1, 60, 0),
        Checkout::Queued { .. }
    ));
    assert!(matches!(
        d.request("bo", "h", "solver", 1, 60, 0),
        Checkout::Queued { .. }
    ));
    // ana (cfd) leaves: her seat is the reserved one, so it goes to bo, not to dee ahead.
    let now = d.now();
    d.ledger.checkin(now, &[r(&ana)]);
    let outcomes = d.ledger.take_waiter_outcomes();
    assert_eq!(outcomes.len(), 1);
    assert!(matches!(&outcomes[0].result, Some(Ok(rec)) if rec.holder.user == "bo"));
    // cy leaves: now dee is served.
    let now = d.now();
    d.ledger.checkin(now, &[r(&cy)]);
    let outcomes = d.ledger.take_waiter_outcomes();
    assert!(matches!(&outcomes[0].result, Some(Ok(rec)) if rec.holder.user == "dee"));
}

#[test]
fn borrowing_within_limits_needs_no_heartbeats_and_ends_on_time() {
    let mut f = FeatureGrant::counted("solver", 2);
    f.borrow_limit_secs = 7 * 86_400;
    let policy = "[[borrow]]\nfeature = \"solver\"\nmax_hours = 72\n";
    let mut d = Driver::new(vec![f, FeatureGrant::counted("viewer", 2)], policy);
    match d.request("a", "laptop", "solver", 1, 0, 4 * 86_400) {
        Checkout::Denied(e @ DenialReason::BorrowNotAllowed { .. }) => {
            assert!(e.to_string().contains("at most 72 hour"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        d.request("a", "laptop", "viewer", 1, 0, 3600),
        Checkout::Denied(DenialReason::BorrowNotAllowed { limit_secs: 0, .. })
    ));
    let borrowed = match d.request("a", "laptop", "solver", 1, 0, 2 * 86_400) {
        Checkout::Granted(g) => g.0,
        other => panic!("{other:?}"),
    };
    assert_eq!(borrowed.borrowed_until, Some(T0.plus_secs(2 * 86_400)));
    // The laptop leaves: its connection closes, no heartbeats for a day. Still held.
    let now = d.now();
    assert!(d.ledger.connection_closed(now, ConnId(d.next)).is_empty());
    assert!(d.advance(86_400).is_empty());
    assert_eq!(d.ledger.in_use("solver"), 1);
    // A restart in between keeps it to the same end.
    let records = vec![borrowed.clone()];
    let mut d2 = Driver::new(vec![FeatureGrant::counted("solver", 2)], "");
    d2.elapsed = d.elapsed;
    let now = d2.now();
    d2.ledger.restore(now, records);
    assert!(d2.advance(86_400 - 1).is_empty());
    let events = d2.advance(1);
    assert!(matches!(
        events.as_slice(),
        [Event::Released {
            why: ReleaseReason::BorrowEnded,
            ..
        }]
    ));
    // Returned early: the seat is back at once.
    let early = match d.request("b", "laptop", "solver", 1, 0, 3600) {
        Checkout::Granted(g) => g.0,
        other => panic!("{other:?}"),
    };
    let now = d.now();
    let (released, _) = d.ledger.checkin(now, &[r(&early)]);
    assert_eq!(released, vec![true]);
    assert_eq!(d.ledger.in_use("solver"), 1);
}

#[test]
fn overdraft_seats_are_marked() {
    let mut f = FeatureGrant::counted("solver", 1);
    f.overdraft = 1;
    let mut d = Driver::new(vec![f], "");
    assert!(!d.take("a", "solver").unwrap().overdraft);
    assert!(d.take("b", "solver").unwrap().overdraft);
    let status = d.ledger.status(d.now().wall);
    assert_eq!(status[0].overdraft_in_use, 1);
}

#[test]
fn more_seats_than_exist_are_denied_at_once_and_never_queued() {
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 5)], "");
    // Asked to wait, with nobody holding anything: still denied now, naming the 5.
    let reason = match d.request("a", "ws-1", "solver", 6, 60, 0) {
        Checkout::Denied(reason) => reason,
        other => panic!("6 of 5 seats must be denied at once, got {other:?}"),
    };
    assert_eq!(
        reason,
        DenialReason::MoreThanExist {
            feature: "solver".into(),
            requested: 6,
            total: 5,
            overdraft: 0,
        }
    );
    assert!(
        reason
            .to_string()
            .contains("only 5 seats of 'solver' exist"),
        "{reason}"
    );
    // Also while others wait in the queue: it does not join them.
    for i in 0..5 {
        d.take(&format!("h{i}"), "solver").unwrap();
    }
    assert!(matches!(
        d.request("w", "ws-2", "solver", 1, 60, 0),
        Checkout::Queued { position: 1 }
    ));
    assert!(matches!(
        d.request("b", "ws-3", "solver", 6, 60, 0),
        Checkout::Denied(DenialReason::MoreThanExist { .. })
    ));
    let status = d.ledger.status(d.now().wall);
    assert_eq!(status[0].queue.len(), 1, "{:?}", status[0].queue);
    // Exactly what exists is not refused as "more than exist": it waits its turn.
    assert!(matches!(
        d.request("c", "ws-4", "solver", 5, 60, 0),
        Checkout::Queued { position: 2 }
    ));
}

#[test]
fn overdraft_counts_as_what_can_be_granted_and_denials_in_overdraft_say_so() {
    let mut f = FeatureGrant::counted("solver", 5);
    f.overdraft = 2;
    let mut d = Driver::new(vec![f], "");
    // 7 can be held at once (5 + 2 overdraft): 7 is not "more than exist", 8 is.
    match d.request("a", "ws-1", "solver", 8, 60, 0) {
        Checkout::Denied(reason @ DenialReason::MoreThanExist { .. }) => {
            let text = reason.to_string();
            assert!(
                text.contains(
                    "only 7 seats of 'solver' can ever be held at once (5 licensed + 2 overdraft)"
                ),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
    for i in 0..7 {
        d.take(&format!("h{i}"), "solver").unwrap();
    }
    let reason = d.take("late", "solver").unwrap_err();
    match &reason {
        DenialReason::OverdraftInUse {
            total,
            overdraft,
            in_use,
            ..
        } => assert_eq!((*total, *overdraft, *in_use), (5, 2, 7)),
        other => panic!("{other:?}"),
    }
    let text = reason.to_string();
    assert!(
        text.contains("'solver' is in overdraft: 5 seats licensed + 2 overdraft, 7 held")
            && text.contains("none free"),
        "{text}"
    );
    // A protocol-version-1 client sees the reason it knows, with the counts.
    assert!(matches!(
        reason.clone().for_version_1(),
        DenialReason::AllSeatsInUse {
            total: 5,
            in_use: 7,
            ..
        }
    ));
    // Waiting can cure it: it queues.
    assert!(matches!(
        d.request("w", "ws-2", "solver", 1, 60, 0),
        Checkout::Queued { .. }
    ));
}

#[test]
fn an_expired_feature_shows_when_it_ended_in_status() {
    let mut f = FeatureGrant::counted("trial", 5);
    f.expires = Some(T0.plus_secs(86_400));
    let mut d = Driver::new(vec![f], "");
    assert_eq!(
        d.ledger.status(d.now().wall)[0].expires,
        Some(T0.plus_secs(86_400))
    );
    d.advance(2 * 86_400);
    // Not "permanent" (None): the day it ended.
    assert_eq!(
        d.ledger.status(d.now().wall)[0].expires,
        Some(T0.plus_secs(86_400))
    );
}

#[test]
fn a_clock_set_back_refuses_time_limited_features_only() {
    let mut eval = FeatureGrant::counted("trial", 5);
    eval.expires = Some(T0.plus_secs(30 * 86_400));
    let mut d = Driver::new(vec![eval, FeatureGrant::counted("solver", 5)], "");
    d.elapsed = Duration::from_secs(10 * 86_400);
    let now = d.now();
    d.ledger.observe_clock(now);
    d.take("a", "trial").unwrap();
    // Someone sets the clock back two days (monotonic time keeps running).
    let back = Now {
        mono: now.mono + Duration::from_secs(60),
        wall: UnixTime(now.wall.0 - 2 * 86_400),
    };
    d.ledger.observe_clock(back);
    let request = CheckoutRequest {
        feature: "trial".into(),
        count: 1,
        version: None,
        build_date: None,
        wait_secs: 0,
        borrow_secs: 0,
    };
    let fresh = d.fresh();
    match d
        .ledger
        .checkout(back, ConnId(1), &who("a", "h"), &request, fresh)
    {
        Err(e @ DenialReason::ClockMovedBack { .. }) => {
            assert!(e.to_string().starts_with("system clock moved back"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    let permanent = CheckoutRequest {
        feature: "solver".into(),
        ..request.clone()
    };
    let fresh = d.fresh();
    assert!(d
        .ledger
        .checkout(back, ConnId(1), &who("a", "h"), &permanent, fresh)
        .is_ok());
    // Within the tolerance (an NTP step of half an hour) nothing is refused.
    let small = Now {
        mono: now.mono + Duration::from_secs(120),
        wall: UnixTime(now.wall.0 - 1800),
    };
    let fresh = d.fresh();
    assert!(d
        .ledger
        .checkout(small, ConnId(1), &who("a", "h"), &request, fresh)
        .is_ok());
}

#[test]
fn an_admin_removal_frees_the_seat_and_the_holder_hears_removed() {
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 1)], "");
    let lease = d.take("a", "solver").unwrap();
    let now = d.now();
    let event = d.ledger.remove_lease(now, lease.id).unwrap();
    assert!(matches!(
        event,
        Event::Released {
            why: ReleaseReason::Removed,
            ..
        }
    ));
    assert_eq!(
        d.ledger.heartbeat(now, ConnId(1), &[r(&lease)]),
        vec![LeaseState::Removed]
    );
    assert!(d.ledger.remove_lease(now, lease.id).is_none());
    d.take("b", "solver").unwrap();
}

/// Issue 15: `lmremove` was undone by the holder's automatic retry. After a removal the
/// removed user gets no seat of the feature on that host until the hold-off ends (the
/// denial says when); the freed seat goes to the next waiter; other users, other hosts
/// and other features are not held off; afterwards the user checks out again.
#[test]
fn a_removed_holder_is_held_off_and_its_seat_goes_to_the_waiter() {
    let mut d = Driver::with_holdoff(
        vec![
            FeatureGrant::counted("solver", 1),
            FeatureGrant::counted("viewer", 1),
        ],
        "",
        Duration::from_secs(300),
    );
    let lease = d.take("a", "solver").unwrap();
    assert!(matches!(
        d.request("b", "ws-2", "solver", 1, 600, 0),
        Checkout::Queued { position: 1 }
    ));
    d.advance(10);
    let now = d.now();
    d.ledger.remove_lease(now, lease.id).unwrap();
    // The waiter got the freed seat, not the removed holder's retry.
    let outcomes = d.ledger.take_waiter_outcomes();
    assert_eq!(outcomes.len(), 1);
    let granted = outcomes[0].result.clone().unwrap().unwrap();
    assert_eq!(granted.holder.user, "b");
    // The removed user on that host: denied with the end of the hold-off, also when a
    // seat is free (the waiter checks in).
    let until = T0.plus_secs(10 + 300);
    let held_off = DenialReason::RemovedByAdministrator {
        feature: "solver".into(),
        until,
    };
    assert_eq!(d.take("a", "solver").unwrap_err(), held_off);
    let now = d.now();
    d.ledger.checkin(now, &[r(&granted)]);
    assert_eq!(d.ledger.in_use("solver"), 0);
    d.advance(299);
    assert_eq!(d.take("a", "solver").unwrap_err(), held_off);
    assert!(d.take("a", "solver").unwrap_err().to_string().contains(
        "removed by the administrator; no seat of 'solver' for you on this host until 2027-01-15T08:05:10Z"
    ), "{}", d.take("a", "solver").unwrap_err());
    // Waiting does not queue past it either: the denial is not one waiting can cure.
    assert!(matches!(
        d.request("a", "ws-9", "solver", 1, 600, 0),
        Checkout::Denied(DenialReason::RemovedByAdministrator { .. })
    ));
    // Not held off: another feature, the same user elsewhere, another user.
    let viewer = d.take("a", "viewer").unwrap();
    let now = d.now();
    d.ledger.checkin(now, &[r(&viewer)]);
    assert_eq!(d.ledger.holdoffs(d.now()).len(), 1);
    let elsewhere = match d.request("a", "ws-3", "solver", 1, 0, 0) {
        Checkout::Granted(g) => g.0,
        other => panic!("{other:?}"),
    };
    let now = d.now();
    d.ledger.checkin(now, &[r(&elsewhere)]);
    // The hold-off ends on time.
    d.advance(1);
    assert!(d.ledger.holdoffs(d.now()).is_empty());
    d.take("a", "solver").unwrap();
}

/// A hold-off of zero turns it off: the removed holder may check out again at once.
#[test]
fn a_zero_holdoff_lets_the_removed_holder_back_at_once() {
    let mut d = Driver::new(vec![FeatureGrant::counted("solver", 1)], "");
    let lease = d.take("a", "solver").unwrap();
    let now = d.now();
    d.ledger.remove_lease(now, lease.id).unwrap();
    assert!(d.ledger.holdoffs(now).is_empty());
    d.take("a", "solver").unwrap();
}
