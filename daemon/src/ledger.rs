//! The seat ledger: a sans-IO state machine that decides who gets a seat.
//!
//! Inputs are requests and the current time ([`Now`]); outputs are decisions and the
//! [`Event`]s the shell must persist before it tells anyone "granted". The ledger opens no
//! socket, reads no clock and draws no random numbers (ids and secrets come in with the
//! request), so every rule is tested by calling methods with made-up times.
//!
//! Methods, grouped like quinn-proto's `Connection`:
//! - inputs: [`Ledger::checkout`], [`Ledger::heartbeat`], [`Ledger::checkin`],
//!   [`Ledger::connection_closed`], [`Ledger::expire`];
//! - setup: [`Ledger::new`], [`Ledger::restore_with`], [`Ledger::rollback`];
//! - outputs: [`Ledger::next_deadline`], [`Ledger::status`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};
use tally_config::policy::Refusal;
use tally_config::Policy;
use tally_protocol::bundle::{Bundle, Named, Seats, Share};
use tally_protocol::lease::{LeaseId, LeaseRecord, LeaseSecret};
use tally_protocol::replicate::{Holdoff, NamedSeat, QueueChange, QueuePlace};
use tally_protocol::time::UnixTime;
use tally_protocol::version;
use tally_protocol::wire::{
    CheckoutRequest, ClientIdentity, DenialReason, FeatureStatus, HolderStatus, LeaseRef,
    LeaseState, QueueEntry,
};

/// The time as the ledger sees it: monotonic for lease timing (immune to clock changes),
/// wall clock for licence dates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time, for heartbeats and TTLs.
    pub mono: Instant,
    /// Wall-clock time, for start and expiry dates.
    pub wall: UnixTime,
}

/// Identifies one client connection to the shell; the ledger only compares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// A change to the stored end of a lease that belongs to no connection. A lease restored
/// after a restart keeps the deadline it had: the ledger stores that deadline once, so
/// that the next restart (or the one after) cannot hand it a fresh TTL again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detachment {
    /// The lease ends by `until` (wall clock) unless its holder re-attaches.
    Until {
        /// The lease.
        id: LeaseId,
        /// When it ends.
        until: UnixTime,
    },
    /// Forget the stored end: the holder re-attached, or the lease ended.
    Cleared {
        /// The lease.
        id: LeaseId,
    },
}

/// A detachment as the replicated store records it (the log's command type).
impl From<Detachment> for tally_protocol::replicate::DetachedChange {
    fn from(change: Detachment) -> Self {
        use tally_protocol::replicate::DetachedChange;
        match change {
            Detachment::Until { id, until } => DetachedChange::Until { id, until },
            Detachment::Cleared { id } => DetachedChange::Cleared { id },
        }
    }
}

/// What the store knows at start about the leases it restores.
#[derive(Debug, Clone, Default)]
pub struct RestoreFacts {
    /// Stored ends of leases that were restored before and never re-attached.
    pub detached: HashMap<LeaseId, UnixTime>,
    /// The latest wall-clock time the previous run is known to have been alive (the
    /// persisted clock mark), and how stale that mark can be. A lease attached to a
    /// connection when the daemon stopped was heartbeated at the latest then, so it
    /// ends at the latest `alive + slack + TTL`.
    pub alive: Option<(UnixTime, Duration)>,
}

/// A change the shell must make durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A lease was granted; it must be stored before the client is told.
    Granted(LeaseRecord),
    /// A lease ended.
    Released {
        /// The lease.
        id: LeaseId,
        /// The feature it held.
        feature: String,
        /// Seats it held.
        count: u32,
        /// Who held it, `user@host` (for the log line).
        holder: String,
        /// Why it ended.
        why: ReleaseReason,
    },
}

/// How grants and releases count in the usage journal when a licensing model makes
/// their seats differ from the seats asked: the lease of a sharer, a suite component or
/// a token product counts no seats of its own, and the seats its model holds are
/// journaled as *seat sets* (grants with an empty user) of the pool: one per set of
/// shared seats, per suite seat of a user, per token draw. Their ids are derived from
/// what they are (pool, group, index; or the lease), so the sets a restart regroups are
/// the ones already open in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeatChange {
    /// The lease's own grant or release counts no seats in the journal.
    Member(LeaseId),
    /// A set of `seats` seats of `pool` came into use.
    Opened {
        /// The set's id (never a lease's).
        id: LeaseId,
        /// The pool feature.
        pool: String,
        /// Seats.
        seats: u32,
    },
    /// A set of seats went back.
    Closed {
        /// The set's id.
        id: LeaseId,
        /// The pool feature.
        pool: String,
        /// Seats.
        seats: u32,
    },
}

/// The id of a seat set: FNV-1a over what it is, so the same set gets the same id in
/// every run.
fn set_id(parts: &[&[u8]]) -> LeaseId {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(std::iter::once(&0xff)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    LeaseId(h)
}

/// Why a lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseReason {
    /// The holder checked it in.
    Checkin,
    /// The holder's connection closed or timed out.
    ConnectionClosed,
    /// No heartbeat within the TTL.
    Expired,
    /// The linger time after a checkin ended.
    LingerEnded,
    /// An administrator removed it.
    Removed,
    /// A borrowed lease reached its end.
    BorrowEnded,
    /// Granted, but its requester was gone before the grant reached it (it stopped
    /// waiting a moment too late): nobody knows its secret, so nobody can use it.
    Unclaimed,
}

impl std::fmt::Display for ReleaseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReleaseReason::Checkin => "checkin",
            ReleaseReason::ConnectionClosed => "connection closed",
            ReleaseReason::Expired => "heartbeat TTL expired",
            ReleaseReason::Unclaimed => "granted to a requester that was gone",
            ReleaseReason::LingerEnded => "linger ended",
            ReleaseReason::Removed => "removed by the administrator",
            ReleaseReason::BorrowEnded => "borrow period ended",
        })
    }
}

/// The ledger's fixed settings.
#[derive(Debug, Clone, Copy)]
pub struct LedgerSettings {
    /// TTL of leases whose feature does not set one.
    pub default_ttl: Duration,
    /// After `tally admin remove`, how long the removed lease's user on its host gets no
    /// seat of that feature (so the seat goes to someone else instead of to the holder's
    /// automatic retry, which undoes an `lmremove`); zero: no hold-off.
    pub remove_holdoff: Duration,
}

/// How far the wall clock may fall behind the latest time seen before time-limited
/// licences are refused. Small corrections (NTP, a DST mistake) pass; setting the clock
/// back a day to stretch an evaluation does not.
pub const CLOCK_TOLERANCE_SECS: u64 = 3600;

/// How many removed lease ids are remembered, so their holders hear "removed" rather
/// than "unknown" on their next heartbeat.
const REMEMBERED_REMOVALS: usize = 1024;
/// Most hold-offs remembered at once; when full, the one that ends first is dropped.
const REMEMBERED_HOLDOFFS: usize = 1024;

/// How long a restored queue place waits for its waiter to ask again (after a restart
/// or a change of leader every client reconnects: the idle timeout that shows it the
/// old server is gone, 15 s by default, and a few seconds more). Past it, the place is
/// given up. A kept place holds no seat: a seat freed meanwhile goes to the first
/// waiter that is there (holding seats for a waiter that may be gone for good would
/// refuse newcomers with seats free, as a restored lease whose holder died does).
pub const PLACE_GRACE: Duration = Duration::from_secs(30);
/// Most leases remembered as lapsed (released by an idle timeout, re-attachable while
/// their TTL runs); the oldest are forgotten first. About 300 bytes each.
const REMEMBERED_LAPSED: usize = 20_000;

/// Names a waiting checkout; chosen by the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WaiterId(pub u64);

/// What happened to a checkout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checkout {
    /// Granted now; persist the event before answering. Boxed: a record is large next
    /// to the other outcomes.
    Granted(Box<(LeaseRecord, Event)>),
    /// Refused now.
    Denied(DenialReason),
    /// Waiting in the feature's queue at this position (1 is next); the answer comes
    /// later as a [`WaiterOutcome`].
    Queued {
        /// Position in the queue, 1-based.
        position: usize,
    },
}

/// The end of a wait: granted, timed out, or cancelled (`None`: leaves no trace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaiterOutcome {
    /// The waiter.
    pub waiter: WaiterId,
    /// The result; `None` when the wait was cancelled.
    pub result: Option<Result<LeaseRecord, DenialReason>>,
    /// The grant to persist before answering.
    pub event: Option<Event>,
}

#[derive(Debug, Clone)]
struct Waiter {
    id: WaiterId,
    /// Its place's number (the order of service; see [`QueuePlace`]).
    place: u64,
    conn: ConnId,
    holder: ClientIdentity,
    request: CheckoutRequest,
    fresh: FreshLease,
    since: Now,
    deadline: Instant,
}

/// What a successful decision grants.
#[derive(Debug, Clone)]
struct Terms {
    ttl: Duration,
    linger: Duration,
    overdraft: bool,
    borrow: Option<Duration>,
    charge: Charge,
    /// Licensed to named users or hosts: the grant takes the name's place.
    named: Option<Named>,
}

/// Where a term's checkouts take their seats from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Draw {
    /// The feature's own seats, shared among checkouts as `Share` says.
    Own(Option<Share>),
    /// The seats of the suite `package`, grouped by user: one package seat covers
    /// `limit` checkouts of this component by one user (all its components at once).
    Suite { package: String, limit: u32 },
    /// `per_seat` tokens per seat from the pool feature `pool`.
    Tokens { pool: String, per_seat: u32 },
}

/// Where one lease's seats count, decided when it is granted (or restored) and kept
/// with it, so a reload that changes the model never miscounts what is held.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Charge {
    /// The feature whose seats it uses (itself, a suite's package, a token pool).
    pool: String,
    /// Seats it holds alone; 0 when it is in a group.
    seats: u32,
    /// The group of sharers it belongs to.
    group: Option<Grouping>,
}

/// A lease's part in a group of sharers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grouping {
    /// Who shares: the identity fields the model compares (and the count asked).
    key: String,
    /// The feature the lease is of (a suite's component).
    member: String,
    /// Checkouts it counts as.
    units: u32,
    /// Checkouts of `member` one group seat covers; 0 is any number.
    limit: u32,
    /// Seats per group seat (the count the sharers asked for).
    mult: u32,
}

/// Sharers of one pool with one key. The group holds, for each member feature,
/// enough group seats for its checkouts, and the most any member needs: a suite seat
/// covers every component at once.
#[derive(Debug, Clone, Default)]
struct Group {
    mult: u32,
    members: HashMap<String, (u32, u32)>,
}

impl Group {
    /// Sets of `mult` seats the group holds: what its most demanding member needs.
    fn sets(&self) -> u32 {
        self.members
            .values()
            .map(|&(units, limit)| match limit {
                0 => u32::from(units > 0),
                l => units.div_ceil(l),
            })
            .max()
            .unwrap_or(0)
    }

    fn seats(&self) -> u32 {
        self.sets().saturating_mul(self.mult)
    }
}

/// The id of a group's `index`th set of seats.
fn group_set_id(pool: &str, key: &str, index: u32) -> LeaseId {
    set_id(&[
        b"group",
        pool.as_bytes(),
        key.as_bytes(),
        &index.to_le_bytes(),
    ])
}

/// The id of the seats a lease draws from another feature's pool (tokens).
fn draw_set_id(lease: LeaseId, pool: &str) -> LeaseId {
    set_id(&[b"draw", &lease.0.to_le_bytes(), pool.as_bytes()])
}

/// The key that makes checkouts sharers under `share`: the fields it compares, and
/// the count (FlexLM and RLM share only checkouts of the same count).
fn share_key(share: &Share, count: u32, who: &ClientIdentity) -> String {
    let field = |on: bool, v: &str| if on { v.to_string() } else { String::new() };
    format!(
        "share\0{count}\0{}\0{}\0{}",
        field(share.user, &who.user),
        field(share.host, &who.host.to_ascii_lowercase()),
        field(share.display, who.display.as_deref().unwrap_or("")),
    )
}

/// Denials after which waiting can help.
fn queueable(reason: &DenialReason) -> bool {
    matches!(
        reason,
        DenialReason::AllSeatsInUse { .. }
            | DenialReason::OverdraftInUse { .. }
            | DenialReason::ReservedForOthers { .. }
            | DenialReason::MaxReached { .. }
    )
}

/// The sources of seats of `terms`, each once, in the order they are tried: the
/// feature's own seats, then suites, then token pools.
fn draws_of<'a>(terms: &[&'a Term]) -> Vec<&'a Draw> {
    let mut draws: Vec<&Draw> = Vec::new();
    for rank in 0..3 {
        for t in terms {
            let r = match t.draw {
                Draw::Own(_) => 0,
                Draw::Suite { .. } => 1,
                Draw::Tokens { .. } => 2,
            };
            if r == rank && !draws.iter().any(|d| same_source(d, &t.draw)) {
                draws.push(&t.draw);
            }
        }
    }
    draws
}

/// Whether two draws take from the same seats (a feature's own seats are one source,
/// however its terms share them: the first term's rule applies).
fn same_source(a: &Draw, b: &Draw) -> bool {
    match (a, b) {
        (Draw::Own(_), Draw::Own(_)) => true,
        (Draw::Suite { package: p, .. }, Draw::Suite { package: q, .. }) => p == q,
        (Draw::Tokens { pool: p, .. }, Draw::Tokens { pool: q, .. }) => p == q,
        _ => false,
    }
}

/// The charge of a checkout of `feature` from `draw`. A borrow shares nothing: the
/// laptop takes its seats away with it.
fn charge_of(
    feature: &str,
    draw: &Draw,
    holder: &ClientIdentity,
    request: &CheckoutRequest,
) -> Charge {
    let count = request.count;
    let borrow = request.borrow_secs > 0;
    match draw {
        Draw::Own(Some(share)) if !borrow => Charge {
            pool: feature.to_string(),
            seats: 0,
            group: Some(Grouping {
                key: share_key(share, count, holder),
                member: feature.to_string(),
                units: 1,
                limit: share.limit,
                mult: count,
            }),
        },
        Draw::Own(_) => Charge {
            pool: feature.to_string(),
            seats: count,
            group: None,
        },
        Draw::Suite { package, limit } if !borrow => Charge {
            pool: package.clone(),
            seats: 0,
            group: Some(Grouping {
                key: format!("suite\0{}", holder.user),
                member: feature.to_string(),
                units: count,
                limit: *limit,
                mult: 1,
            }),
        },
        Draw::Suite { package, limit } => Charge {
            pool: package.clone(),
            seats: count.div_ceil((*limit).max(1)),
            group: None,
        },
        Draw::Tokens { pool, per_seat } => Charge {
            pool: pool.clone(),
            seats: count.saturating_mul(*per_seat),
            group: None,
        },
    }
}

/// Adds a member's checkouts to a group.
fn join(group: &mut Group, g: &Grouping) {
    group.mult = group.mult.max(g.mult);
    let m = group
        .members
        .entry(g.member.clone())
        .or_insert((0, g.limit));
    m.0 = m.0.saturating_add(g.units);
    m.1 = g.limit;
}

/// How many holders a denial names; enough to find a colleague, not a data dump.
const DENIAL_HOLDERS_SHOWN: usize = 5;

/// One grant term of a feature, from one bundle.
#[derive(Debug, Clone)]
struct Term {
    seats: Seats,
    overdraft: u32,
    starts: Option<UnixTime>,
    expires: Option<UnixTime>,
    evaluation: bool,
    ttl: Option<Duration>,
    ceiling: Option<String>,
    upgrade_from: Option<String>,
    maintenance_until: Option<UnixTime>,
    linger: Duration,
    borrow_limit: Duration,
    /// Where checkouts under this term take their seats.
    draw: Draw,
    /// Whether the term's seats count in this feature's own pool (not for a suite's
    /// components, nor for a product spending tokens).
    adds_seats: bool,
    /// Licensed to named users or hosts only (`crate::named`).
    named: Option<Named>,
}

/// Seats of a feature that count at one moment, by version ceiling.
#[derive(Debug, Default)]
struct Pools {
    /// (ceiling, seats); `None` is no ceiling. Equal ceilings are merged.
    by_ceiling: Vec<(Option<String>, u32)>,
    overdraft: u32,
}

impl Pools {
    fn seats(&self) -> u32 {
        self.by_ceiling.iter().map(|(_, n)| *n).sum()
    }

    /// Seats (overdraft included) usable by version `v`.
    fn usable_by(&self, v: &str) -> u32 {
        self.by_ceiling
            .iter()
            .filter(|(c, _)| c.as_deref().is_none_or(|c| version::within(v, c)))
            .map(|(_, n)| *n)
            .sum::<u32>()
            .saturating_add(self.overdraft)
    }

    fn add(&mut self, ceiling: Option<&str>, n: i64) {
        let slot = self
            .by_ceiling
            .iter_mut()
            .find(|(c, _)| match (c.as_deref(), ceiling) {
                (None, None) => true,
                (Some(a), Some(b)) => version::compare(a, b) == std::cmp::Ordering::Equal,
                _ => false,
            });
        match slot {
            Some((_, seats)) => *seats = (*seats as i64 + n).clamp(0, u32::MAX as i64) as u32,
            None if n > 0 => self
                .by_ceiling
                .push((ceiling.map(str::to_string), n.min(u32::MAX as i64) as u32)),
            None => {}
        }
    }
}

impl Term {
    fn active(&self, wall: UnixTime) -> bool {
        self.starts.is_none_or(|s| s <= wall) && self.expires.is_none_or(|e| wall < e)
    }

    fn admits_version(&self, version: Option<&str>) -> bool {
        match (version, &self.ceiling) {
            (Some(v), Some(c)) => version::within(v, c),
            _ => true,
        }
    }

    fn admits_build(&self, build: Option<UnixTime>) -> bool {
        match (build, self.maintenance_until) {
            (Some(b), Some(m)) => b <= m,
            _ => true,
        }
    }
}

fn terms_of(bundles: &[Bundle]) -> BTreeMap<String, Vec<Term>> {
    let mut features: BTreeMap<String, Vec<Term>> = BTreeMap::new();
    for bundle in bundles {
        for f in &bundle.features {
            let term = Term {
                seats: f.seats,
                overdraft: f.overdraft,
                // A bundle's own validity window bounds every term in it.
                starts: max_opt(f.starts, bundle.valid_from),
                expires: min_opt(f.expires, bundle.valid_until),
                evaluation: f.evaluation,
                ttl: f.heartbeat_ttl_secs.map(Duration::from_secs),
                ceiling: f.version_ceiling.clone(),
                upgrade_from: f.upgrade_from.clone(),
                maintenance_until: f.maintenance_until,
                linger: Duration::from_secs(f.linger_secs),
                borrow_limit: Duration::from_secs(f.borrow_limit_secs),
                draw: match &f.tokens {
                    Some(t) => Draw::Tokens {
                        pool: t.pool.clone(),
                        per_seat: t.per_seat.max(1),
                    },
                    None if f.suite => Draw::Suite {
                        package: f.name.clone(),
                        limit: 1,
                    },
                    None => Draw::Own(f.share),
                },
                adds_seats: f.tokens.is_none(),
                named: f.named,
            };
            // A package grants its components: in a suite, from the package's seats,
            // one per user for all of them; otherwise (FlexLM's PACKAGE without SUITE)
            // each component has seats of its own, the package's times its count, up
            // to its own version. The package name itself stays checkoutable.
            for c in &f.components {
                let mut t = term.clone();
                if let Some(v) = &c.version {
                    t.ceiling = Some(v.clone());
                }
                if f.suite {
                    t.draw = Draw::Suite {
                        package: f.name.clone(),
                        limit: c.count.max(1),
                    };
                    t.adds_seats = false;
                } else if let Seats::Counted(n) = t.seats {
                    t.seats = Seats::Counted(n.saturating_mul(c.count));
                    t.overdraft = t.overdraft.saturating_mul(c.count);
                }
                features.entry(c.name.clone()).or_default().push(t);
            }
            features.entry(f.name.clone()).or_default().push(term);
        }
    }
    features
}

fn max_opt(a: Option<UnixTime>, b: Option<UnixTime>) -> Option<UnixTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn min_opt(a: Option<UnixTime>, b: Option<UnixTime>) -> Option<UnixTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The seats of `terms` that count at `wall`; `None` for an uncounted feature.
/// Upgrade terms move their seats from the `upgrade_from` ceiling to their own.
fn pools(terms: &[Term], wall: UnixTime) -> Option<Pools> {
    let mut pools = Pools::default();
    let active: Vec<&Term> = terms
        .iter()
        .filter(|t| t.adds_seats && t.active(wall))
        .collect();
    for t in &active {
        pools.overdraft = pools.overdraft.saturating_add(t.overdraft);
        match t.seats {
            Seats::Uncounted => return None,
            Seats::Counted(n) if t.upgrade_from.is_none() => {
                pools.add(t.ceiling.as_deref(), n as i64)
            }
            Seats::Counted(_) => {}
        }
    }
    for t in active.iter().filter(|t| t.upgrade_from.is_some()) {
        if let Seats::Counted(n) = t.seats {
            // Only seats that exist can move: an upgrade of more seats than the old
            // ceiling holds upgrades what there is.
            let from = t.upgrade_from.as_deref();
            let available = pools
                .by_ceiling
                .iter()
                .find(|(c, _)| {
                    matches!((c.as_deref(), from), (Some(a), Some(b)) if version::compare(a, b).is_eq())
                })
                .map(|(_, s)| *s)
                .unwrap_or(0);
            let moved = n.min(available) as i64;
            pools.add(from, -moved);
            pools.add(t.ceiling.as_deref(), moved);
        }
    }
    Some(pools)
}

/// What the ledger knows of a held lease.
#[derive(Debug, Clone)]
struct Held {
    record: LeaseRecord,
    conn: Option<ConnId>,
    deadline: Instant,
    /// Checked in, but held until `deadline` by the feature's linger time.
    lingering: bool,
    /// Its end is in the store as a [`Detachment::Until`].
    stored_until: bool,
    /// Where its seats count.
    charge: Charge,
}

/// The seat ledger.
#[derive(Debug)]
pub struct Ledger {
    settings: LedgerSettings,
    /// Feature name to its grant terms, from all loaded bundles.
    features: BTreeMap<String, Vec<Term>>,
    leases: HashMap<LeaseId, Held>,
    /// Seats in use per feature, kept in step with `leases` (a token pool's or a suite
    /// package's seats count here under the pool's name).
    in_use: HashMap<String, u32>,
    /// Groups of sharers by (pool, key).
    groups: HashMap<(String, String), Group>,
    /// Seat changes of the licensing models not yet handed to the journal.
    seat_changes: Vec<SeatChange>,
    deadlines: BTreeSet<(Instant, LeaseId)>,
    by_conn: HashMap<ConnId, BTreeSet<LeaseId>>,
    policy: Policy,
    queues: BTreeMap<String, VecDeque<Waiter>>,
    waiter_deadlines: BTreeSet<(Instant, WaiterId)>,
    outcomes: Vec<WaiterOutcome>,
    removed: VecDeque<LeaseId>,
    removed_set: HashSet<LeaseId>,
    /// Hold-offs after an admin removal, by (feature, user, host): when they end, in
    /// monotonic time (what counts) and wall time (what the denial shows).
    holdoffs: HashMap<HoldoffKey, (Instant, UnixTime)>,
    /// Hold-offs started and not yet handed to the shell to write.
    new_holdoffs: Vec<Holdoff>,
    /// Names that used a named feature and keep their places (`crate::named`).
    named_seats: crate::named::Seats,
    /// Queue places restored from the store whose waiters have not asked again yet, by
    /// feature, in order, each with when it is given up.
    kept_places: BTreeMap<String, Vec<(QueuePlace, Instant)>>,
    /// The next queue place's number.
    next_place: u64,
    /// Queue places taken and left, not yet handed to the shell to write.
    queue_changes: Vec<QueueChange>,
    high_water: UnixTime,
    detachments: Vec<Detachment>,
    unclaimed: Vec<LeaseId>,
    /// Leases released because their connection timed out, by id, with the deadline
    /// their TTL gave them: a holder that was only silent (a laptop lid, a paused VM)
    /// gets its lease back by heartbeat while the seats are still free.
    lapsed: HashMap<LeaseId, (LeaseRecord, Instant)>,
    lapsed_order: VecDeque<LeaseId>,
    /// Leases given back to lapsed holders since the last [`Ledger::take_regranted`].
    regranted: Vec<LeaseRecord>,
    /// Since when, and why, the store cannot be written (the shell says so): no new
    /// checkout is granted then, since it could not be made durable.
    storage_down: Option<(UnixTime, String)>,
    /// Which features refuse remote sessions or virtual machines.
    sessions: crate::sessions::SessionRules,
}

/// Whom a hold-off keeps from a feature: the feature, user and host of the removed lease
/// (what FlexLM's `lmremove` names), not the process: the same user's next run on that
/// host is the retry the removal must not be undone by.
type HoldoffKey = (String, String, String);

fn holdoff_key(feature: &str, who: &ClientIdentity) -> HoldoffKey {
    (feature.to_string(), who.user.clone(), who.host.clone())
}

/// The identity and secret the shell drew for a new lease.
#[derive(Debug, Clone)]
pub struct FreshLease {
    /// A random lease id; the ledger moves to the next free id if it is taken.
    pub id: LeaseId,
    /// A random secret.
    pub secret: LeaseSecret,
}

impl Ledger {
    /// For the shell's unit tests: a ledger with `seats` seats of `solver` from one
    /// unbound bundle, a 90 s TTL and no remove hold-off.
    #[cfg(test)]
    pub(crate) fn for_tests(seats: u32) -> Ledger {
        use tally_protocol::bundle::{Customer, FeatureGrant};
        let bundle = Bundle {
            id: "b1".into(),
            issued_at: UnixTime(1_800_000_000),
            vendor: "v".into(),
            customer: Customer {
                id: "c".into(),
                name: "C".into(),
            },
            binding: Vec::new(),
            supersedes: vec![],
            valid_from: None,
            valid_until: None,
            features: vec![FeatureGrant::counted("solver", seats)],
        };
        let settings = LedgerSettings {
            default_ttl: Duration::from_secs(90),
            remove_holdoff: Duration::ZERO,
        };
        Ledger::new(settings, &[bundle])
    }

    /// A ledger serving the features of `bundles`.
    pub fn new(settings: LedgerSettings, bundles: &[Bundle]) -> Ledger {
        Ledger {
            settings,
            features: terms_of(bundles),
            leases: HashMap::new(),
            in_use: HashMap::new(),
            groups: HashMap::new(),
            seat_changes: Vec::new(),
            deadlines: BTreeSet::new(),
            by_conn: HashMap::new(),
            policy: Policy::default(),
            queues: BTreeMap::new(),
            waiter_deadlines: BTreeSet::new(),
            outcomes: Vec::new(),
            removed: VecDeque::new(),
            removed_set: HashSet::new(),
            holdoffs: HashMap::new(),
            new_holdoffs: Vec::new(),
            named_seats: Default::default(),
            kept_places: BTreeMap::new(),
            next_place: 1,
            queue_changes: Vec::new(),
            high_water: UnixTime(0),
            detachments: Vec::new(),
            unclaimed: Vec::new(),
            lapsed: HashMap::new(),
            lapsed_order: VecDeque::new(),
            regranted: Vec::new(),
            storage_down: None,
            sessions: crate::sessions::SessionRules::of(bundles),
        }
    }

    /// A ledger for a server that takes over as its cluster's leader: the same terms
    /// (bundles, settings, policy) and clock mark, and nothing held yet: the leases come
    /// from the replicated store ([`Ledger::restore_with`]). What lived only in this
    /// ledger's memory (queues, hold-offs, lapsed leases) is not carried over.
    pub fn successor(&self) -> Ledger {
        let mut next = Ledger {
            features: self.features.clone(),
            sessions: self.sessions.clone(),
            policy: self.policy.clone(),
            high_water: self.high_water,
            ..Ledger::new(self.settings, &[])
        };
        next.storage_down = self.storage_down.clone();
        next
    }

    /// The store cannot be written since `since` (`what`: why, for the denial): new
    /// checkouts are refused with [`DenialReason::StorageUnavailable`] until
    /// [`Ledger::storage_available`]. Held leases are served on (heartbeats, checkins
    /// and releases need no disk: the shell keeps their journal in memory meanwhile).
    /// Told again with another reason, the denials name the newer one; the start of
    /// the outage stays.
    pub fn storage_unavailable(&mut self, since: UnixTime, what: String) {
        let since = self.storage_down.as_ref().map_or(since, |(t, _)| *t);
        self.storage_down = Some((since, what));
    }

    /// The store can be written again: checkouts are decided as usual.
    pub fn storage_available(&mut self) {
        self.storage_down = None;
    }

    /// Since when and why the store cannot be written, if it cannot.
    pub fn storage_down(&self) -> Option<(UnixTime, &str)> {
        self.storage_down.as_ref().map(|(t, w)| (*t, w.as_str()))
    }

    /// The denial every new checkout gets while the store cannot be written.
    fn storage_refusal(&self) -> Option<DenialReason> {
        self.storage_down
            .as_ref()
            .map(|(_, what)| DenialReason::StorageUnavailable { what: what.clone() })
    }

    /// Applies the site's policy from now on; existing leases are kept.
    pub fn set_policy(&mut self, now: Now, policy: Policy) {
        self.policy = policy;
        self.serve_queues(now);
    }

    /// Notes the wall clock; the high-water mark only moves forward.
    pub fn observe_clock(&mut self, now: Now) {
        self.high_water = self.high_water.max(now.wall);
    }

    /// The latest wall-clock time seen (persisted by the shell).
    pub fn clock_high_water(&self) -> UnixTime {
        self.high_water
    }

    /// Restores the persisted high-water mark after a restart.
    pub fn set_clock_high_water(&mut self, t: UnixTime) {
        self.high_water = self.high_water.max(t);
    }

    fn clock_moved_back(&self, now: Now) -> bool {
        now.wall.plus_secs(CLOCK_TOLERANCE_SECS) < self.high_water
    }

    /// Serves `bundles` from now on. Every lease is kept, also leases of features that
    /// are no longer licensed: they were granted honestly and end on their own.
    pub fn reload(&mut self, now: Now, bundles: &[Bundle]) {
        self.features = terms_of(bundles);
        self.sessions = crate::sessions::SessionRules::of(bundles);
        self.serve_queues(now);
    }

    /// The feature names served now (package components included).
    pub fn feature_names(&self) -> BTreeSet<String> {
        self.features.keys().cloned().collect()
    }

    /// Re-adds leases found in the store after a restart, with nothing known of the
    /// previous run: they expire one TTL from now unless re-attached. The daemon uses
    /// [`Ledger::restore_with`].
    pub fn restore(&mut self, now: Now, records: Vec<LeaseRecord>) {
        self.restore_with(now, records, &RestoreFacts::default());
    }

    /// Re-adds leases found in the store after a restart. They belong to no connection
    /// yet; a holder that comes back re-attaches by heartbeat, the rest end when their
    /// TTL from the last heartbeat they can have had runs out (see [`RestoreFacts`]): a
    /// restart never extends a lease, however many restarts follow. The ends computed
    /// here are handed out as [`Detachment`]s to store. Restored leases count even
    /// above today's seat count (a bundle may have shrunk while we were down): they
    /// were granted honestly and drain on their own.
    pub fn restore_with(&mut self, now: Now, records: Vec<LeaseRecord>, facts: &RestoreFacts) {
        let until_mono =
            |until: UnixTime| now.mono + Duration::from_secs(until.0.saturating_sub(now.wall.0));
        // The journal already holds these leases and the seat sets they opened (their
        // ids are derived from what they are): nothing to journal again.
        let journaled = self.seat_changes.len();
        for record in records {
            let id = record.id;
            let (deadline, stored) = match record.borrowed_until {
                Some(until) => (until_mono(until), false),
                None => {
                    let until = match (facts.detached.get(&id), facts.alive) {
                        (Some(&until), _) => until,
                        (None, Some((alive, slack))) => {
                            alive.plus_secs(slack.as_secs()).plus_secs(record.ttl_secs)
                        }
                        (None, None) => now.wall.plus_secs(record.ttl_secs),
                    };
                    if facts.detached.get(&id) != Some(&until) {
                        self.detachments.push(Detachment::Until { id, until });
                    }
                    (until_mono(until), true)
                }
            };
            let charge = self.restore_charge(now, &record);
            self.insert(record, None, deadline, charge);
            if let Some(held) = self.leases.get_mut(&id) {
                held.stored_until = stored;
            }
        }
        self.seat_changes.truncate(journaled);
    }

    /// The changes to stored lease ends since the last call, for the shell to write.
    pub fn take_detachments(&mut self) -> Vec<Detachment> {
        std::mem::take(&mut self.detachments)
    }

    /// The daemon itself did not run for `stalled` (the process was stopped, the
    /// machine paused): heartbeats could not arrive, so the time does not count against
    /// the holders. Every heartbeated lease's deadline moves on by `stalled`.
    pub fn forgive(&mut self, stalled: Duration) {
        let shifted: Vec<(Instant, LeaseId)> = self
            .deadlines
            .iter()
            .filter(|(_, id)| {
                self.leases.get(id).is_some_and(|h| {
                    !h.lingering && h.record.borrowed_until.is_none() && !h.stored_until
                })
            })
            .copied()
            .collect();
        for (deadline, id) in shifted {
            self.deadlines.remove(&(deadline, id));
            let moved = deadline + stalled;
            self.deadlines.insert((moved, id));
            if let Some(h) = self.leases.get_mut(&id) {
                h.deadline = moved;
            }
        }
    }

    /// Decides a checkout that does not wait. On success returns the new lease's record
    /// (with an [`Event::Granted`] to persist); the lease is not durable until the shell
    /// says so.
    pub fn checkout(
        &mut self,
        now: Now,
        conn: ConnId,
        holder: &ClientIdentity,
        request: &CheckoutRequest,
        fresh: FreshLease,
    ) -> Result<(LeaseRecord, Event), DenialReason> {
        if let Some(refusal) = self.storage_refusal() {
            return Err(refusal);
        }
        let terms = self.decide(now, holder, request)?;
        Ok(self.grant(now, conn, holder, request, fresh, terms))
    }

    /// [`Ledger::checkout_or_wait`] for a client that reported where it runs (`facts`;
    /// `None` from a client too old to): a feature whose vendor refuses remote sessions
    /// or virtual machines is refused first (`crate::sessions`). Borrowing too.
    #[allow(clippy::too_many_arguments)]
    pub fn checkout_observed(
        &mut self,
        now: Now,
        conn: ConnId,
        holder: &ClientIdentity,
        request: &CheckoutRequest,
        facts: Option<&tally_protocol::observed::ClientFacts>,
        fresh: FreshLease,
        waiter: WaiterId,
    ) -> Checkout {
        if let Err(reason) = self.sessions.check(&request.feature, facts) {
            return Checkout::Denied(reason);
        }
        self.checkout_or_wait(now, conn, holder, request, fresh, waiter)
    }

    /// Decides a checkout that may wait `request.wait_secs` in the feature's queue.
    pub fn checkout_or_wait(
        &mut self,
        now: Now,
        conn: ConnId,
        holder: &ClientIdentity,
        request: &CheckoutRequest,
        fresh: FreshLease,
        waiter: WaiterId,
    ) -> Checkout {
        // While the store cannot be written, no grant (it could not be made durable)
        // and no wait either: the refusal comes before every other rule.
        if let Some(refusal) = self.storage_refusal() {
            return Checkout::Denied(refusal);
        }
        // A waiter asking again after a restart or a change of leader takes back the
        // place it had. Waiters are served first come, first served: nobody overtakes
        // those waiting ahead of it.
        let kept = self.take_kept_place(holder, request);
        let place = kept.as_ref().map_or(u64::MAX, |p| p.seq);
        let queued = self
            .queues
            .get(&request.feature)
            .is_some_and(|q| q.front().is_some_and(|w| w.place < place));
        let decision = if queued {
            self.decide(now, holder, request)
                .and_then(|_| Err(self.queue_full_reason(now, request)))
        } else {
            self.decide(now, holder, request)
        };
        match decision {
            Ok(terms) => {
                if let Some(place) = &kept {
                    self.queue_changes.push(QueueChange::Left(place.seq));
                }
                let (record, event) = self.grant(now, conn, holder, request, fresh, terms);
                Checkout::Granted(Box::new((record, event)))
            }
            // Only a denial that waiting can cure queues: a request the licence can
            // never serve (more seats than exist, expired, excluded) is answered now,
            // also while others wait.
            Err(reason)
                if request.wait_secs > 0 && request.borrow_secs == 0 && queueable(&reason) =>
            {
                let wait = Duration::from_secs(request.wait_secs as u64);
                let deadline = now.mono + wait;
                let (seq, since) = match &kept {
                    Some(p) => {
                        let ago = Duration::from_secs(now.wall.0.saturating_sub(p.since.0));
                        let mono = now.mono.checked_sub(ago).unwrap_or(now.mono);
                        (
                            p.seq,
                            Now {
                                mono,
                                wall: p.since,
                            },
                        )
                    }
                    None => {
                        self.next_place += 1;
                        (self.next_place - 1, now)
                    }
                };
                self.queue_changes.push(QueueChange::Joined(QueuePlace {
                    seq,
                    feature: request.feature.clone(),
                    count: request.count,
                    holder: holder.clone(),
                    since: since.wall,
                    until: now.wall.plus_secs(request.wait_secs as u64),
                }));
                let queue = self.queues.entry(request.feature.clone()).or_default();
                let at = queue.partition_point(|w| w.place < seq);
                queue.insert(
                    at,
                    Waiter {
                        id: waiter,
                        place: seq,
                        conn,
                        holder: holder.clone(),
                        request: request.clone(),
                        fresh,
                        since,
                        deadline,
                    },
                );
                self.waiter_deadlines.insert((deadline, waiter));
                Checkout::Queued { position: at + 1 }
            }
            Err(reason) => {
                if let Some(place) = &kept {
                    self.queue_changes.push(QueueChange::Left(place.seq));
                }
                Checkout::Denied(reason)
            }
        }
    }

    /// Takes the kept place (see [`Ledger::restore_queue`]) of the waiter `holder`
    /// asking for `request`, if it had one: same feature and seats, same user, host,
    /// program and process.
    fn take_kept_place(
        &mut self,
        holder: &ClientIdentity,
        request: &CheckoutRequest,
    ) -> Option<QueuePlace> {
        let places = self.kept_places.get_mut(&request.feature)?;
        let at = places
            .iter()
            .position(|(p, _)| p.holder == *holder && p.count == request.count)?;
        let (place, _) = places.remove(at);
        if places.is_empty() {
            self.kept_places.remove(&request.feature);
        }
        Some(place)
    }

    /// Restores the checkout queues' places from the store after a restart or a change
    /// of leader: each is kept for its waiter, which reconnects and asks again (and is
    /// put back in line by it, ahead of those who came later), until its wait would have
    /// ended or [`PLACE_GRACE`] has passed, whichever comes first; places already past
    /// are given up.
    pub fn restore_queue(&mut self, now: Now, places: Vec<QueuePlace>) {
        for place in places {
            self.next_place = self.next_place.max(place.seq + 1);
            let left = place.until.0.saturating_sub(now.wall.0);
            if left == 0 {
                self.queue_changes.push(QueueChange::Left(place.seq));
                continue;
            }
            let until = now.mono + PLACE_GRACE.min(Duration::from_secs(left));
            let kept = self.kept_places.entry(place.feature.clone()).or_default();
            let at = kept.partition_point(|(p, _)| p.seq < place.seq);
            kept.insert(at, (place, until));
        }
    }

    /// Gives up every queue place, waiting or kept (the server stops and tells its
    /// waiters so): the next start finds none. The waits themselves end with the ledger.
    pub fn give_up_places(&mut self) {
        let waiting = self.queues.values().flatten().map(|w| w.place);
        let kept = self.kept_places.values().flatten().map(|(p, _)| p.seq);
        self.queue_changes
            .extend(waiting.chain(kept).map(QueueChange::Left));
        self.kept_places.clear();
    }

    /// The queue places taken and left since the last call, for the shell to write.
    pub fn take_queue_changes(&mut self) -> Vec<QueueChange> {
        std::mem::take(&mut self.queue_changes)
    }

    /// The denial a newcomer gets while others wait ahead of it.
    fn queue_full_reason(&self, now: Now, request: &CheckoutRequest) -> DenialReason {
        let feature = &request.feature;
        let (total, overdraft) = self
            .features
            .get(feature)
            .and_then(|t| pools(t, now.wall))
            .map(|p| (p.seats(), p.overdraft))
            .unwrap_or((0, 0));
        self.no_seat_free(feature, total, overdraft, request.count)
    }

    /// The denial for "no seat free": one that names the overdraft when the feature
    /// has some, so a user does not read "all 5 seats in use (7 held)".
    fn no_seat_free(
        &self,
        feature: &str,
        total: u32,
        overdraft: u32,
        requested: u32,
    ) -> DenialReason {
        let in_use = self.in_use(feature);
        let holders = self.holder_names(feature);
        if overdraft > 0 {
            DenialReason::OverdraftInUse {
                feature: feature.to_string(),
                total,
                overdraft,
                in_use,
                requested,
                holders,
            }
        } else {
            DenialReason::AllSeatsInUse {
                feature: feature.to_string(),
                total,
                in_use,
                requested,
                holders,
            }
        }
    }

    /// Withdraws a waiting checkout; it leaves no trace.
    pub fn cancel_wait(&mut self, waiter: WaiterId) {
        for queue in self.queues.values_mut() {
            if let Some(pos) = queue.iter().position(|w| w.id == waiter) {
                let w = queue.remove(pos).expect("position is in range");
                self.waiter_deadlines.remove(&(w.deadline, w.id));
                self.queue_changes.push(QueueChange::Left(w.place));
                self.outcomes.push(WaiterOutcome {
                    waiter,
                    result: None,
                    event: None,
                });
            }
        }
        self.queues.retain(|_, q| !q.is_empty());
    }

    /// The ends of waits since the last call: grants, timeouts, cancellations.
    pub fn take_waiter_outcomes(&mut self) -> Vec<WaiterOutcome> {
        std::mem::take(&mut self.outcomes)
    }

    /// Grants waiting checkouts that fit now, in queue order. Called after anything that
    /// frees seats; a waiter that cannot be served yet (a reserved seat that is not for
    /// it, more seats than are free) does not block those behind it that can.
    pub fn serve_queues(&mut self, now: Now) {
        let features: Vec<String> = self.queues.keys().cloned().collect();
        for feature in features {
            let Some(mut queue) = self.queues.remove(&feature) else {
                continue;
            };
            let mut kept = VecDeque::with_capacity(queue.len());
            while let Some(w) = queue.pop_front() {
                match self.decide(now, &w.holder, &w.request) {
                    Ok(terms) => {
                        self.waiter_deadlines.remove(&(w.deadline, w.id));
                        self.queue_changes.push(QueueChange::Left(w.place));
                        let (record, event) =
                            self.grant(now, w.conn, &w.holder, &w.request, w.fresh.clone(), terms);
                        self.outcomes.push(WaiterOutcome {
                            waiter: w.id,
                            result: Some(Ok(record)),
                            event: Some(event),
                        });
                    }
                    Err(reason) if queueable(&reason) => kept.push_back(w),
                    Err(reason) => {
                        // The licence itself changed (expired, reloaded away): waiting
                        // cannot help any more.
                        self.waiter_deadlines.remove(&(w.deadline, w.id));
                        self.queue_changes.push(QueueChange::Left(w.place));
                        self.outcomes.push(WaiterOutcome {
                            waiter: w.id,
                            result: Some(Err(reason)),
                            event: None,
                        });
                    }
                }
            }
            if !kept.is_empty() {
                self.queues.insert(feature, kept);
            }
        }
    }

    /// Checks everything short of inserting the lease.
    fn decide(
        &self,
        now: Now,
        holder: &ClientIdentity,
        request: &CheckoutRequest,
    ) -> Result<Terms, DenialReason> {
        if request.count == 0 {
            return Err(DenialReason::InvalidRequest {
                what: "count must be at least 1".into(),
            });
        }
        let feature = &request.feature;
        let Some(terms) = self.features.get(feature) else {
            return Err(DenialReason::NotLicensed {
                feature: feature.clone(),
            });
        };
        if !terms.iter().any(|t| t.active(now.wall)) {
            // Say the most useful thing: starts soon, or expired when.
            if let Some(starts) = terms
                .iter()
                .filter_map(|t| t.starts.filter(|s| *s > now.wall))
                .min()
            {
                return Err(DenialReason::NotYetValid {
                    feature: feature.clone(),
                    starts,
                });
            }
            let expired = terms.iter().filter_map(|t| t.expires).max();
            return Err(DenialReason::Expired {
                feature: feature.clone(),
                expired: expired.unwrap_or(now.wall),
            });
        }
        let version = request.version.as_deref();
        let active: Vec<&Term> = terms.iter().filter(|t| t.active(now.wall)).collect();
        if !active.iter().any(|t| t.admits_version(version)) {
            let ceiling = active
                .iter()
                .filter_map(|t| t.ceiling.as_deref())
                .max_by(|a, b| version::compare(a, b))
                .unwrap_or("?");
            return Err(DenialReason::VersionAboveCeiling {
                feature: feature.clone(),
                requested: version.unwrap_or("?").to_string(),
                ceiling: ceiling.to_string(),
            });
        }
        let eligible: Vec<&Term> = active
            .iter()
            .copied()
            .filter(|t| t.admits_version(version) && t.admits_build(request.build_date))
            .collect();
        if eligible.is_empty() {
            let maintenance_until = active
                .iter()
                .filter(|t| t.admits_version(version))
                .filter_map(|t| t.maintenance_until)
                .max()
                .unwrap_or(now.wall);
            return Err(DenialReason::MaintenanceExpired {
                feature: feature.clone(),
                build_date: request.build_date.unwrap_or(now.wall),
                maintenance_until,
            });
        }
        // A clock set back would stretch every date; refuse what dates limit.
        if self.clock_moved_back(now)
            && eligible
                .iter()
                .any(|t| t.expires.is_some() || t.starts.is_some() || t.evaluation)
        {
            return Err(DenialReason::ClockMovedBack {
                feature: feature.clone(),
                now: now.wall,
                high_water: self.high_water,
            });
        }
        self.check_policy_access(feature, holder)?;
        let named = crate::named::combine(eligible.iter().map(|t| t.named));
        if let Some(named) = named {
            let seats = &self.named_seats;
            crate::named::check(&self.policy, feature, named, holder, seats, now.wall)?;
        }
        if let Some(until) = self.held_off(now, feature, holder) {
            return Err(DenialReason::RemovedByAdministrator {
                feature: feature.clone(),
                until,
            });
        }
        let vendor_ttl = eligible.iter().filter_map(|t| t.ttl).min();
        // The site may lengthen the TTL and the linger, never shorten the vendor's.
        let ttl = self
            .policy
            .ttl_for(feature, vendor_ttl, self.settings.default_ttl);
        let linger = eligible.iter().map(|t| t.linger).max().unwrap_or_default();
        let linger = self.policy.linger_for(feature, linger);
        let refused_borrow = || DenialReason::BorrowNotAllowed {
            feature: feature.clone(),
            limit_secs: 0,
        };
        let borrow = if request.borrow_secs > 0 {
            // INCLUDE_BORROW / EXCLUDE_BORROW: this client may not borrow at all.
            let access = self
                .policy
                .borrow_access(feature, &holder.user, &holder.host);
            if access.is_err() {
                return Err(refused_borrow());
            }
            let vendor = eligible
                .iter()
                .map(|t| t.borrow_limit)
                .max()
                .unwrap_or_default();
            let limit = match self.policy.borrow_limit_secs.get(feature) {
                Some(&secs) => vendor.min(Duration::from_secs(secs)),
                None => vendor,
            };
            if limit.is_zero() || request.borrow_secs > limit.as_secs() {
                return Err(DenialReason::BorrowNotAllowed {
                    feature: feature.clone(),
                    limit_secs: limit.as_secs(),
                });
            }
            // BORROW_LOWWATER: of the feature's own seats, some are never borrowed.
            if let Some(own) = pools(terms, now.wall) {
                let lent = self
                    .leases
                    .values()
                    .filter(|h| h.record.feature == *feature && h.record.borrowed_until.is_some());
                let lent = lent.map(|h| h.record.count).sum();
                if !self
                    .policy
                    .borrow_fits(feature, own.seats(), lent, request.count)
                {
                    return Err(refused_borrow());
                }
            }
            Some(Duration::from_secs(request.borrow_secs))
        } else {
            None
        };
        // The seats come from the first source that has them: the feature's own, then a
        // suite it is part of, then a token pool (a vendor may sell both).
        let mut first_refusal = None;
        for draw in draws_of(&eligible) {
            let charge = charge_of(feature, draw, holder, request);
            let extra = self.extra_seats(&charge);
            let version = match draw {
                Draw::Own(_) => version,
                // A component's and a product's own ceilings were checked above; the
                // pool's seats serve any of its users.
                Draw::Suite { .. } | Draw::Tokens { .. } => None,
            };
            match self.capacity(
                now,
                feature,
                &charge.pool,
                extra,
                version,
                holder,
                request.count,
            ) {
                Ok(overdraft) => {
                    return Ok(Terms {
                        ttl,
                        linger,
                        overdraft,
                        borrow,
                        charge,
                        named,
                    })
                }
                Err(refusal) => {
                    first_refusal.get_or_insert(refusal);
                }
            }
        }
        Err(first_refusal.unwrap_or_else(|| DenialReason::NotLicensed {
            feature: feature.clone(),
        }))
    }

    /// Whether `extra` more seats of `pool` can be used (for a checkout of `feature`):
    /// the seats, the version ceilings, the policy's MAX and RESERVE. `Ok(true)` when
    /// they come from the overdraft.
    #[allow(clippy::too_many_arguments)]
    fn capacity(
        &self,
        now: Now,
        feature: &str,
        pool: &str,
        extra: u32,
        version: Option<&str>,
        holder: &ClientIdentity,
        count: u32,
    ) -> Result<bool, DenialReason> {
        let Some(terms) = self.features.get(pool) else {
            return Err(DenialReason::NotLicensed {
                feature: pool.to_string(),
            });
        };
        if pool != feature && !terms.iter().any(|t| t.adds_seats && t.active(now.wall)) {
            let expired = terms.iter().filter_map(|t| t.expires).max();
            return Err(DenialReason::Expired {
                feature: pool.to_string(),
                expired: expired.unwrap_or(now.wall),
            });
        }
        if extra == 0 {
            // Joining sharers that already hold the seats: nothing more is used.
            return Ok(false);
        }
        let in_use = self.in_use(pool);
        let Some(pools) = pools(terms, now.wall) else {
            self.check_policy_max(feature, holder, count)?;
            return Ok(false);
        };
        let seats = pools.seats();
        let full = || self.no_seat_free(pool, seats, pools.overdraft, extra);
        let limit = seats.saturating_add(pools.overdraft);
        if extra > limit {
            // Never grantable at once, however long it waits: said now, not queued.
            return Err(DenialReason::MoreThanExist {
                feature: pool.to_string(),
                requested: extra,
                total: seats,
                overdraft: pools.overdraft,
            });
        }
        if in_use.saturating_add(extra) > limit {
            return Err(full());
        }
        if pools.by_ceiling.iter().any(|(c, _)| c.is_some())
            && !self.fits(pool, &pools, version, extra)
        {
            return Err(full());
        }
        self.check_policy_max(feature, holder, count)?;
        let (reserved, for_whom) = self.reserved_for_others(pool, holder);
        if in_use.saturating_add(extra).saturating_add(reserved) > limit {
            return Err(DenialReason::ReservedForOthers {
                feature: pool.to_string(),
                reserved_for: for_whom,
            });
        }
        Ok(in_use.saturating_add(extra) > seats)
    }

    /// Seats `charge` would add to its pool now.
    fn extra_seats(&self, charge: &Charge) -> u32 {
        let Some(g) = &charge.group else {
            return charge.seats;
        };
        let mut group = self
            .groups
            .get(&(charge.pool.clone(), g.key.clone()))
            .cloned()
            .unwrap_or_default();
        let before = group.seats();
        join(&mut group, g);
        group.seats().saturating_sub(before)
    }

    /// Counts a lease's seats in its pool.
    fn add_charge(&mut self, id: LeaseId, feature: &str, charge: &Charge) {
        let added = match &charge.group {
            None => charge.seats,
            Some(g) => {
                let group = self
                    .groups
                    .entry((charge.pool.clone(), g.key.clone()))
                    .or_default();
                let before = group.sets();
                join(group, g);
                let (after, mult) = (group.sets(), group.mult);
                for index in before..after {
                    self.seat_changes.push(SeatChange::Opened {
                        id: group_set_id(&charge.pool, &g.key, index),
                        pool: charge.pool.clone(),
                        seats: mult,
                    });
                }
                after.saturating_sub(before).saturating_mul(mult)
            }
        };
        if charge.group.is_some() || charge.pool != feature {
            self.seat_changes.push(SeatChange::Member(id));
            if charge.group.is_none() {
                self.seat_changes.push(SeatChange::Opened {
                    id: draw_set_id(id, &charge.pool),
                    pool: charge.pool.clone(),
                    seats: charge.seats,
                });
            }
        }
        *self.in_use.entry(charge.pool.clone()).or_default() += added;
    }

    /// Stops counting a lease's seats; a group's go when its last member leaves.
    fn remove_charge(&mut self, id: LeaseId, feature: &str, charge: &Charge) {
        if charge.group.is_some() || charge.pool != feature {
            self.seat_changes.push(SeatChange::Member(id));
        }
        let freed = match &charge.group {
            None => {
                if charge.pool != feature {
                    self.seat_changes.push(SeatChange::Closed {
                        id: draw_set_id(id, &charge.pool),
                        pool: charge.pool.clone(),
                        seats: charge.seats,
                    });
                }
                charge.seats
            }
            Some(g) => {
                let key = (charge.pool.clone(), g.key.clone());
                let Some(group) = self.groups.get_mut(&key) else {
                    return;
                };
                let before = group.sets();
                if let Some(m) = group.members.get_mut(&g.member) {
                    m.0 = m.0.saturating_sub(g.units);
                    if m.0 == 0 {
                        group.members.remove(&g.member);
                    }
                }
                let (after, mult) = (group.sets(), group.mult);
                if group.members.is_empty() {
                    self.groups.remove(&key);
                }
                for index in (after..before).rev() {
                    self.seat_changes.push(SeatChange::Closed {
                        id: group_set_id(&charge.pool, &g.key, index),
                        pool: charge.pool.clone(),
                        seats: mult,
                    });
                }
                before.saturating_sub(after).saturating_mul(mult)
            }
        };
        if let Some(n) = self.in_use.get_mut(&charge.pool) {
            *n = n.saturating_sub(freed);
        }
    }

    /// The seat changes of the licensing models since the last call, in order, for the
    /// journal (see [`SeatChange`]).
    pub fn take_seat_changes(&mut self) -> Vec<SeatChange> {
        std::mem::take(&mut self.seat_changes)
    }

    /// The charge of a lease restored from the store: the first source with room for
    /// it, else the first source (restored leases count even above today's seats).
    fn restore_charge(&self, now: Now, record: &LeaseRecord) -> Charge {
        let request = CheckoutRequest {
            feature: record.feature.clone(),
            count: record.count,
            version: record.version.clone(),
            build_date: None,
            wait_secs: 0,
            borrow_secs: record.borrowed_until.map_or(0, |_| 1),
        };
        let plain = Charge {
            pool: record.feature.clone(),
            seats: record.count,
            group: None,
        };
        let Some(terms) = self.features.get(&record.feature) else {
            return plain;
        };
        let all: Vec<&Term> = terms.iter().collect();
        let mut first = None;
        for draw in draws_of(&all) {
            let charge = charge_of(&record.feature, draw, &record.holder, &request);
            let extra = self.extra_seats(&charge);
            let free = self
                .features
                .get(&charge.pool)
                .and_then(|t| pools(t, now.wall))
                .map_or(u32::MAX, |p| {
                    p.seats()
                        .saturating_add(p.overdraft)
                        .saturating_sub(self.in_use(&charge.pool))
                });
            if extra <= free {
                return charge;
            }
            first.get_or_insert(charge);
        }
        first.unwrap_or(plain)
    }

    /// INCLUDE(ALL) and EXCLUDE(ALL): EXCLUDE wins; an INCLUDE list admits only its
    /// subjects (`Policy::access`).
    fn check_policy_access(
        &self,
        feature: &str,
        holder: &ClientIdentity,
    ) -> Result<(), DenialReason> {
        let refusal = match self.policy.access(feature, &holder.user, &holder.host) {
            Ok(()) => return Ok(()),
            Err(refusal) => refusal,
        };
        let feature = feature.to_string();
        Err(match refusal {
            Refusal::Excluded(subject) => DenialReason::Excluded {
                feature,
                rule: subject.to_string(),
            },
            Refusal::NotIncluded => DenialReason::NotIncluded { feature },
        })
    }

    /// MAX: seats held by the capped user or group, plus the new ones, within the cap.
    fn check_policy_max(
        &self,
        feature: &str,
        holder: &ClientIdentity,
        count: u32,
    ) -> Result<(), DenialReason> {
        let p = &self.policy;
        for rule in p
            .max
            .iter()
            .filter(|r| r.feature == feature && p.matches(&r.subject, &holder.user, &holder.host))
        {
            let held = self.held_by(feature, |h| p.matches(&rule.subject, &h.user, &h.host));
            if held.saturating_add(count) > rule.seats {
                return Err(DenialReason::MaxReached {
                    feature: feature.to_string(),
                    limit: rule.seats,
                    who: rule.subject.to_string(),
                });
            }
        }
        Ok(())
    }

    /// RESERVE: seats kept for others and not yet used by them, and for whom.
    fn reserved_for_others(&self, feature: &str, holder: &ClientIdentity) -> (u32, Vec<String>) {
        let p = &self.policy;
        let mut total = 0u32;
        let mut whom = Vec::new();
        for rule in p.reserve.iter().filter(|r| r.feature == feature) {
            if p.matches(&rule.subject, &holder.user, &holder.host) {
                continue;
            }
            let used = self.held_by(feature, |h| p.matches(&rule.subject, &h.user, &h.host));
            let unused = rule.seats.saturating_sub(used);
            if unused > 0 {
                total = total.saturating_add(unused);
                whom.push(rule.subject.to_string());
            }
        }
        (total, whom)
    }

    /// Seats of `feature` held by clients for which `pred` holds.
    fn held_by(&self, feature: &str, pred: impl Fn(&ClientIdentity) -> bool) -> u32 {
        self.leases
            .values()
            .filter(|h| h.record.feature == feature && pred(&h.record.holder))
            .map(|h| h.record.count)
            .sum()
    }

    fn grant(
        &mut self,
        now: Now,
        conn: ConnId,
        holder: &ClientIdentity,
        request: &CheckoutRequest,
        fresh: FreshLease,
        terms: Terms,
    ) -> (LeaseRecord, Event) {
        let mut id = fresh.id;
        while self.leases.contains_key(&id) {
            id = LeaseId(id.0.wrapping_add(1));
        }
        let charge = terms.charge.clone();
        let record = LeaseRecord {
            id,
            secret: fresh.secret,
            feature: request.feature.clone(),
            count: request.count,
            holder: holder.clone(),
            granted_at: now.wall,
            ttl_secs: terms.ttl.as_secs(),
            version: request.version.clone(),
            linger_secs: terms.linger.as_secs(),
            overdraft: terms.overdraft,
            borrowed_until: terms.borrow.map(|b| now.wall.plus_secs(b.as_secs())),
        };
        // A borrowed lease belongs to no connection: the laptop leaves the network.
        let (conn, deadline) = match terms.borrow {
            Some(b) => (None, now.mono + b),
            None => (Some(conn), now.mono + terms.ttl),
        };
        self.insert(record.clone(), conn, deadline, charge);
        if let Some(named) = terms.named {
            let feature = &request.feature;
            (self.named_seats).used(&self.policy, feature, named, holder, now.wall);
        }
        (record.clone(), Event::Granted(record))
    }

    /// When the hold-off that keeps `holder` from `feature` ends, if one is running.
    fn held_off(&self, now: Now, feature: &str, holder: &ClientIdentity) -> Option<UnixTime> {
        if self.holdoffs.is_empty() {
            return None;
        }
        self.holdoffs
            .get(&holdoff_key(feature, holder))
            .filter(|(ends, _)| now.mono < *ends)
            .map(|(_, until)| *until)
    }

    /// The hold-offs running now, by feature, user and host (as the store keeps them).
    pub fn holdoffs(&self, now: Now) -> Vec<Holdoff> {
        let mut list: Vec<Holdoff> = self
            .holdoffs
            .iter()
            .filter(|(_, (ends, _))| now.mono < *ends)
            .map(|((feature, user, host), (_, until))| Holdoff {
                feature: feature.clone(),
                user: user.clone(),
                host: host.clone(),
                until: *until,
            })
            .collect();
        list.sort_by(|a, b| (&a.feature, &a.user, &a.host).cmp(&(&b.feature, &b.user, &b.host)));
        list
    }

    /// Removes a lease on an administrator's request; its holder learns on its next
    /// heartbeat. Its user on its host then gets no seat of the feature for the
    /// configured hold-off, so the freed seat goes to the next in line.
    pub fn remove_lease(&mut self, now: Now, id: LeaseId) -> Option<Event> {
        let key = self
            .leases
            .get(&id)
            .map(|h| holdoff_key(&h.record.feature, &h.record.holder));
        let event = self.release(id, ReleaseReason::Removed)?;
        if let Some(key) = key.filter(|_| !self.settings.remove_holdoff.is_zero()) {
            let hold = self.settings.remove_holdoff;
            let until = now.wall.plus_secs(hold.as_secs_f64().ceil() as u64);
            self.new_holdoffs.push(Holdoff {
                feature: key.0.clone(),
                user: key.1.clone(),
                host: key.2.clone(),
                until,
            });
            self.hold_off(now, key, (now.mono + hold, until));
        }
        if self.removed.len() >= REMEMBERED_REMOVALS {
            if let Some(old) = self.removed.pop_front() {
                self.removed_set.remove(&old);
            }
        }
        self.removed.push_back(id);
        self.removed_set.insert(id);
        self.serve_queues(now);
        Some(event)
    }

    /// Starts (or replaces) a hold-off, forgetting those ended and, when
    /// [`REMEMBERED_HOLDOFFS`] run, the one that ends first.
    fn hold_off(&mut self, now: Now, key: HoldoffKey, ends: (Instant, UnixTime)) {
        self.holdoffs.retain(|_, (end, _)| now.mono < *end);
        if self.holdoffs.len() >= REMEMBERED_HOLDOFFS && !self.holdoffs.contains_key(&key) {
            if let Some(first) = self
                .holdoffs
                .iter()
                .min_by_key(|(_, (end, _))| *end)
                .map(|(k, _)| k.clone())
            {
                self.holdoffs.remove(&first);
            }
        }
        self.holdoffs.insert(key, ends);
    }

    /// The hold-offs started since the last call, for the shell to write: a restart
    /// or a new leader keeps them ([`Ledger::restore_holdoffs`]).
    pub fn take_holdoffs(&mut self) -> Vec<Holdoff> {
        std::mem::take(&mut self.new_holdoffs)
    }

    /// Restores stored hold-offs that have not ended by `now` (by the wall clock: the
    /// store's times are the only ones that survive a restart), each ending after the
    /// time left of it.
    pub fn restore_holdoffs(&mut self, now: Now, stored: Vec<Holdoff>) {
        for held in stored {
            let left = held.until.0.saturating_sub(now.wall.0);
            if left == 0 {
                continue;
            }
            let key = (held.feature, held.user, held.host);
            self.hold_off(now, key, (now.mono + Duration::from_secs(left), held.until));
        }
    }

    /// The named seats taken since the last call, for the shell to write: a restart or
    /// a new leader keeps them ([`Ledger::restore_named_seats`]).
    pub fn take_named_seats(&mut self) -> Vec<NamedSeat> {
        self.named_seats.take_new()
    }

    /// The named seats whose places are still taken (as the store keeps them).
    pub fn named_seats(&self, now: Now) -> Vec<NamedSeat> {
        self.named_seats.all(now.wall)
    }

    /// Restores stored named seats whose places are still taken at `now` (wall clock).
    pub fn restore_named_seats(&mut self, now: Now, stored: Vec<NamedSeat>) {
        self.named_seats.restore(now.wall, stored);
    }

    /// Notes a durable grant that could not be delivered (its requester stopped waiting
    /// just before it was decided, or was never there to answer): it is released by the
    /// next [`Ledger::release_unclaimed`], and its seat goes to the next in line.
    pub fn unclaimed(&mut self, id: LeaseId) {
        self.unclaimed.push(id);
    }

    /// Releases the grants noted by [`Ledger::unclaimed`].
    pub fn release_unclaimed(&mut self, now: Now) -> Vec<Event> {
        if self.unclaimed.is_empty() {
            return Vec::new();
        }
        let events = std::mem::take(&mut self.unclaimed)
            .into_iter()
            .filter_map(|id| self.release(id, ReleaseReason::Unclaimed))
            .collect();
        self.serve_queues(now);
        events
    }

    /// Undoes a grant that could not be made durable; the client is told it was denied.
    pub fn rollback(&mut self, id: LeaseId) {
        self.remove(id);
    }

    /// Extends the leases whose secrets match, and attaches them to `conn` (this is how a
    /// client that reconnected, or outlived a daemon restart, re-attaches its leases).
    pub fn heartbeat(&mut self, now: Now, conn: ConnId, leases: &[LeaseRef]) -> Vec<LeaseState> {
        leases
            .iter()
            .map(|r| {
                if !self.leases.contains_key(&r.id) {
                    return if self.removed_set.contains(&r.id) {
                        LeaseState::Removed
                    } else if self.reattach_lapsed(now, conn, r) {
                        LeaseState::Active
                    } else {
                        LeaseState::Unknown
                    };
                }
                let Some(held) = self.leases.get_mut(&r.id) else {
                    return LeaseState::Unknown;
                };
                if !held.record.secret.matches(&r.secret) || held.lingering {
                    return LeaseState::Unknown;
                }
                if held.record.borrowed_until.is_some() {
                    // A borrowed lease runs to its end whatever the heartbeats say.
                    return LeaseState::Active;
                }
                let deadline = now.mono + Duration::from_secs(held.record.ttl_secs);
                self.deadlines.remove(&(held.deadline, r.id));
                self.deadlines.insert((deadline, r.id));
                held.deadline = deadline;
                if held.stored_until {
                    // Alive again: from now on heartbeats decide its end.
                    held.stored_until = false;
                    self.detachments.push(Detachment::Cleared { id: r.id });
                }
                if held.conn != Some(conn) {
                    if let Some(old) = held.conn {
                        if let Some(set) = self.by_conn.get_mut(&old) {
                            set.remove(&r.id);
                        }
                    }
                    held.conn = Some(conn);
                    self.by_conn.entry(conn).or_default().insert(r.id);
                }
                LeaseState::Active
            })
            .collect()
    }

    /// Releases the leases whose secrets match. A lease of a feature with a linger time
    /// stays held (detached from its connection) until the linger ends.
    pub fn checkin(&mut self, now: Now, leases: &[LeaseRef]) -> (Vec<bool>, Vec<Event>) {
        let mut events = Vec::new();
        let mut released = Vec::with_capacity(leases.len());
        for r in leases {
            let Some(held) = self.leases.get(&r.id) else {
                released.push(false);
                continue;
            };
            if !held.record.secret.matches(&r.secret) {
                released.push(false);
                continue;
            }
            if held.lingering {
                // Checked in already; a repeated checkin is answered the same way.
                released.push(true);
                continue;
            }
            released.push(true);
            if held.record.linger_secs > 0 && held.record.borrowed_until.is_none() {
                self.start_linger(now, r.id);
            } else {
                events.extend(self.release(r.id, ReleaseReason::Checkin));
            }
        }
        self.serve_queues(now);
        (released, events)
    }

    fn start_linger(&mut self, now: Now, id: LeaseId) {
        let Some(held) = self.leases.get_mut(&id) else {
            return;
        };
        let deadline = now.mono + Duration::from_secs(held.record.linger_secs);
        self.deadlines.remove(&(held.deadline, id));
        self.deadlines.insert((deadline, id));
        held.deadline = deadline;
        held.lingering = true;
        if let Some(conn) = held.conn.take() {
            if let Some(set) = self.by_conn.get_mut(&conn) {
                set.remove(&id);
            }
        }
    }

    /// Releases every lease attached to a connection that closed, and withdraws its
    /// waiting checkouts.
    pub fn connection_closed(&mut self, now: Now, conn: ConnId) -> Vec<Event> {
        self.cancel_waits_of(conn);
        let ids = self.by_conn.remove(&conn).unwrap_or_default();
        let events = ids
            .into_iter()
            .filter_map(|id| self.release(id, ReleaseReason::ConnectionClosed))
            .collect();
        self.serve_queues(now);
        events
    }

    /// Withdraws every waiting checkout of `conn` (its streams are gone with it).
    fn cancel_waits_of(&mut self, conn: ConnId) {
        let waiting: Vec<WaiterId> = self
            .queues
            .values()
            .flatten()
            .filter(|w| w.conn == conn)
            .map(|w| w.id)
            .collect();
        for w in waiting {
            self.cancel_wait(w);
        }
    }

    /// A connection timed out (nothing heard from the client for the idle timeout): its
    /// leases are released at once, as for a closed connection, so a client that died
    /// frees its seats quickly; but they are remembered until their TTL would have run
    /// out, and a holder that was only silent gets them back by heartbeat if the seats
    /// are still free (see [`Ledger::take_regranted`]).
    pub fn connection_timed_out(&mut self, now: Now, conn: ConnId) -> Vec<Event> {
        let ids: Vec<LeaseId> = self
            .by_conn
            .get(&conn)
            .map(|set| set.iter().copied().collect())
            .unwrap_or_default();
        for id in ids {
            if let Some(held) = self.leases.get(&id) {
                if !held.lingering && held.record.borrowed_until.is_none() {
                    self.remember_lapsed(now, held.record.clone(), held.deadline);
                }
            }
        }
        self.connection_closed(now, conn)
    }

    fn remember_lapsed(&mut self, now: Now, record: LeaseRecord, deadline: Instant) {
        // Forget what has run out, then the oldest beyond the bound.
        while let Some(id) = self.lapsed_order.front().copied() {
            let stale = match self.lapsed.get(&id) {
                Some((_, d)) => *d <= now.mono,
                None => true,
            };
            if !stale && self.lapsed.len() < REMEMBERED_LAPSED {
                break;
            }
            self.lapsed_order.pop_front();
            self.lapsed.remove(&id);
        }
        let id = record.id;
        if self.lapsed.insert(id, (record, deadline)).is_none() {
            self.lapsed_order.push_back(id);
        }
    }

    /// Gives a lapsed lease back to the holder that proves it with its secret, if its
    /// TTL has not run out and the rules would grant the same seats now (seats free,
    /// nobody waiting ahead, policy). The lease keeps its id, secret and record.
    fn reattach_lapsed(&mut self, now: Now, conn: ConnId, r: &LeaseRef) -> bool {
        let Some((record, deadline)) = self.lapsed.get(&r.id) else {
            return false;
        };
        if !record.secret.matches(&r.secret) {
            return false;
        }
        let (record, deadline) = (record.clone(), *deadline);
        self.lapsed.remove(&r.id);
        if deadline <= now.mono {
            return false;
        }
        if self
            .queues
            .get(&record.feature)
            .is_some_and(|q| !q.is_empty())
        {
            // Others are waiting for these seats: they go first.
            return false;
        }
        let request = CheckoutRequest {
            feature: record.feature.clone(),
            count: record.count,
            version: record.version.clone(),
            build_date: None,
            wait_secs: 0,
            borrow_secs: 0,
        };
        let Ok(terms) = self.decide(now, &record.holder, &request) else {
            return false;
        };
        let deadline = now.mono + Duration::from_secs(record.ttl_secs);
        self.insert(record.clone(), Some(conn), deadline, terms.charge);
        self.regranted.push(record);
        true
    }

    /// Leases given back to lapsed holders since the last call: each must be stored
    /// (as a grant) before the heartbeat that re-attached it is answered, and undone
    /// with [`Ledger::rollback`] if that fails.
    pub fn take_regranted(&mut self) -> Vec<LeaseRecord> {
        std::mem::take(&mut self.regranted)
    }

    /// A connection timed out while the daemon itself was stalled: its holder is most
    /// likely alive and reconnecting, so its leases are kept, detached, until their TTL
    /// runs out or the holder re-attaches by heartbeat. Its waits end (their streams are
    /// gone with the connection).
    pub fn connection_lost(&mut self, now: Now, conn: ConnId) {
        self.cancel_waits_of(conn);
        for id in self.by_conn.remove(&conn).unwrap_or_default() {
            if let Some(held) = self.leases.get_mut(&id) {
                held.conn = None;
            }
        }
        self.serve_queues(now);
    }

    /// Releases every lease whose heartbeat deadline is at or before `now`.
    pub fn expire(&mut self, now: Now) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now.mono {
                break;
            }
            let why = match self.leases.get(&id) {
                Some(h) if h.lingering => ReleaseReason::LingerEnded,
                Some(h) if h.record.borrowed_until.is_some() => ReleaseReason::BorrowEnded,
                _ => ReleaseReason::Expired,
            };
            events.extend(self.release(id, why));
        }
        while let Some(&(deadline, waiter)) = self.waiter_deadlines.first() {
            if deadline > now.mono {
                break;
            }
            self.waiter_deadlines.remove(&(deadline, waiter));
            for queue in self.queues.values_mut() {
                if let Some(pos) = queue.iter().position(|w| w.id == waiter) {
                    let w = queue.remove(pos).expect("position is in range");
                    self.queue_changes.push(QueueChange::Left(w.place));
                    self.outcomes.push(WaiterOutcome {
                        waiter,
                        result: Some(Err(DenialReason::QueueTimeout {
                            feature: w.request.feature.clone(),
                            waited_secs: w.request.wait_secs,
                        })),
                        event: None,
                    });
                }
            }
            self.queues.retain(|_, q| !q.is_empty());
        }
        // Kept places whose waiters did not come back in time are given up.
        for places in self.kept_places.values_mut() {
            places.retain(|(place, until)| {
                let keep = *until > now.mono;
                if !keep {
                    self.queue_changes.push(QueueChange::Left(place.seq));
                }
                keep
            });
        }
        self.kept_places.retain(|_, p| !p.is_empty());
        self.serve_queues(now);
        events
    }

    /// When [`Ledger::expire`] next has work (a lease, a wait or a kept place runs out).
    pub fn next_deadline(&self) -> Option<Instant> {
        let lease = self.deadlines.first().map(|(d, _)| *d);
        let waiter = self.waiter_deadlines.first().map(|(d, _)| *d);
        let kept = self.kept_places.values().flatten().map(|(_, d)| *d).min();
        [lease, waiter, kept].into_iter().flatten().min()
    }

    /// Seats and holders per feature.
    pub fn status(&self, wall: UnixTime) -> Vec<FeatureStatus> {
        let mut holders: BTreeMap<&str, Vec<HolderStatus>> = BTreeMap::new();
        for held in self.leases.values() {
            holders
                .entry(held.record.feature.as_str())
                .or_default()
                .push(HolderStatus {
                    lease: held.record.id,
                    client: held.record.holder.clone(),
                    count: held.record.count,
                    since: held.record.granted_at,
                    overdraft: held.record.overdraft,
                    borrowed_until: held.record.borrowed_until,
                });
        }
        self.features
            .iter()
            .map(|(name, terms)| {
                let mut list = holders.remove(name.as_str()).unwrap_or_default();
                list.sort_by_key(|h| (h.since, h.lease));
                let active: Vec<&Term> = terms.iter().filter(|t| t.active(wall)).collect();
                let total = pools(terms, wall).map(|p| p.seats());
                let in_use = self.in_use.get(name).copied().unwrap_or(0);
                FeatureStatus {
                    name: name.clone(),
                    total,
                    in_use,
                    overdraft_in_use: total.map(|t| in_use.saturating_sub(t)).unwrap_or(0),
                    reserved: self
                        .policy
                        .reserve
                        .iter()
                        .filter(|r| r.feature == *name)
                        .map(|r| r.seats)
                        .sum(),
                    queue: self
                        .queues
                        .get(name)
                        .map(|q| {
                            q.iter()
                                .map(|w| QueueEntry {
                                    client: w.holder.clone(),
                                    count: w.request.count,
                                    since: w.since.wall,
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    expires: if active.is_empty() {
                        // Nothing in force: when it ended (a date in the past, shown as
                        // "expired"), not "permanent".
                        terms
                            .iter()
                            .filter(|t| t.starts.is_none_or(|s| s <= wall))
                            .filter_map(|t| t.expires)
                            .max()
                    } else if active.iter().any(|t| t.expires.is_none()) {
                        None
                    } else {
                        active.iter().filter_map(|t| t.expires).min()
                    },
                    evaluation: active.iter().any(|t| t.evaluation),
                    holders: list,
                }
            })
            .collect()
    }

    /// Seats of `feature` in use now.
    pub fn in_use(&self, feature: &str) -> u32 {
        self.in_use.get(feature).copied().unwrap_or(0)
    }

    /// Number of leases held.
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// Every lease held, as the store keeps it; used to rewrite a store that missed
    /// changes while it could not be written.
    pub fn records(&self) -> impl Iterator<Item = &LeaseRecord> {
        self.leases.values().map(|h| &h.record)
    }

    fn holder_names(&self, feature: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .leases
            .values()
            .filter(|h| h.record.feature == feature || h.charge.pool == feature)
            .map(|h| h.record.holder.to_string())
            .collect();
        names.sort();
        names.dedup();
        names.truncate(DENIAL_HOLDERS_SHOWN);
        names
    }

    /// Whether the feature's leases plus a new one of `count` seats at `version` can all
    /// be placed in seats whose ceilings admit them. Ceilings are nested (a seat for 2028
    /// also serves 2027), so by Hall's theorem it suffices that for every version `t`
    /// asked for, the seats asked by versions at or above `t` fit in the seats whose
    /// ceiling is at or above `t`.
    fn fits(&self, feature: &str, pools: &Pools, version: Option<&str>, count: u32) -> bool {
        // A group of sharers is one demand: its seats, at its highest version.
        let mut grouped: HashMap<&str, &str> = HashMap::new();
        let mut demands: Vec<(&str, u32)> = Vec::new();
        for h in self.leases.values().filter(|h| h.charge.pool == feature) {
            let Some(v) = h
                .record
                .version
                .as_deref()
                .filter(|_| h.record.feature == feature)
            else {
                continue;
            };
            match &h.charge.group {
                None => demands.push((v, h.charge.seats)),
                Some(g) => {
                    let top = grouped.entry(g.key.as_str()).or_insert(v);
                    if version::compare(v, top).is_gt() {
                        *top = v;
                    }
                }
            }
        }
        for (key, v) in grouped {
            let seats = self
                .groups
                .get(&(feature.to_string(), key.to_string()))
                .map_or(0, Group::seats);
            demands.push((v, seats));
        }
        if let Some(v) = version {
            demands.push((v, count));
        }
        demands.iter().all(|(threshold, _)| {
            let asked: u32 = demands
                .iter()
                .filter(|(v, _)| version::compare(v, threshold).is_ge())
                .map(|(_, n)| *n)
                .sum();
            asked <= pools.usable_by(threshold)
        })
    }

    fn insert(
        &mut self,
        record: LeaseRecord,
        conn: Option<ConnId>,
        deadline: Instant,
        charge: Charge,
    ) {
        let id = record.id;
        if let Some(old) = self.leases.remove(&id) {
            // Restoring a duplicate id would double-count; undo the old one's share.
            self.uncount(&old);
        }
        self.add_charge(id, &record.feature, &charge);
        self.deadlines.insert((deadline, id));
        if let Some(conn) = conn {
            self.by_conn.entry(conn).or_default().insert(id);
        }
        self.leases.insert(
            id,
            Held {
                record,
                conn,
                deadline,
                lingering: false,
                stored_until: false,
                charge,
            },
        );
    }

    fn uncount(&mut self, held: &Held) {
        self.remove_charge(held.record.id, &held.record.feature, &held.charge);
        self.deadlines.remove(&(held.deadline, held.record.id));
        if let Some(conn) = held.conn {
            if let Some(set) = self.by_conn.get_mut(&conn) {
                set.remove(&held.record.id);
                if set.is_empty() {
                    self.by_conn.remove(&conn);
                }
            }
        }
    }

    fn remove(&mut self, id: LeaseId) -> Option<Held> {
        let held = self.leases.remove(&id)?;
        self.uncount(&held);
        Some(held)
    }

    fn release(&mut self, id: LeaseId, why: ReleaseReason) -> Option<Event> {
        let held = self.remove(id)?;
        if held.stored_until {
            self.detachments.push(Detachment::Cleared { id });
        }
        Some(Event::Released {
            id,
            count: held.record.count,
            holder: held.record.holder.to_string(),
            feature: held.record.feature,
            why,
        })
    }
}
