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
//! - setup: [`Ledger::new`], [`Ledger::restore`], [`Ledger::rollback`];
//! - outputs: [`Ledger::next_deadline`], [`Ledger::status`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};
use tally_protocol::bundle::{Bundle, Seats};
use tally_protocol::lease::{LeaseId, LeaseRecord, LeaseSecret};
use tally_protocol::time::UnixTime;
use tally_protocol::version;
use tally_protocol::wire::{
    CheckoutRequest, ClientIdentity, DenialReason, FeatureStatus, HolderStatus, LeaseRef,
    LeaseState,
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
        /// Why it ended.
        why: ReleaseReason,
    },
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
}

impl std::fmt::Display for ReleaseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReleaseReason::Checkin => "checkin",
            ReleaseReason::ConnectionClosed => "connection closed",
            ReleaseReason::Expired => "heartbeat TTL expired",
            ReleaseReason::LingerEnded => "linger ended",
        })
    }
}

/// The ledger's fixed settings.
#[derive(Debug, Clone, Copy)]
pub struct LedgerSettings {
    /// TTL of leases whose feature does not set one.
    pub default_ttl: Duration,
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
            };
            // A package grants each of its components with its own terms (FlexLM's
            // PACKAGE without SUITE); the package name itself stays checkoutable.
            for component in &f.components {
                features
                    .entry(component.clone())
                    .or_default()
                    .push(term.clone());
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
    let active: Vec<&Term> = terms.iter().filter(|t| t.active(wall)).collect();
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
}

/// The seat ledger.
#[derive(Debug)]
pub struct Ledger {
    settings: LedgerSettings,
    /// Feature name to its grant terms, from all loaded bundles.
    features: BTreeMap<String, Vec<Term>>,
    leases: HashMap<LeaseId, Held>,
    /// Seats in use per feature, kept in step with `leases`.
    in_use: HashMap<String, u32>,
    deadlines: BTreeSet<(Instant, LeaseId)>,
    by_conn: HashMap<ConnId, BTreeSet<LeaseId>>,
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
    /// A ledger serving the features of `bundles`.
    pub fn new(settings: LedgerSettings, bundles: &[Bundle]) -> Ledger {
        Ledger {
            settings,
            features: terms_of(bundles),
            leases: HashMap::new(),
            in_use: HashMap::new(),
            deadlines: BTreeSet::new(),
            by_conn: HashMap::new(),
        }
    }

    /// Serves `bundles` from now on. Every lease is kept, also leases of features that
    /// are no longer licensed: they were granted honestly and end on their own.
    pub fn reload(&mut self, bundles: &[Bundle]) {
        self.features = terms_of(bundles);
    }

    /// Re-adds leases found in the store after a restart. They belong to no connection
    /// yet; a holder that comes back re-attaches by heartbeat, the rest expire one TTL
    /// from now. Restored leases count even above today's seat count (a bundle may have
    /// shrunk while we were down): they were granted honestly and drain on their own.
    pub fn restore(&mut self, now: Now, records: Vec<LeaseRecord>) {
        for record in records {
            let deadline = now.mono + Duration::from_secs(record.ttl_secs);
            self.insert(record, None, deadline);
        }
    }

    /// Decides a checkout. On success returns the new lease's record (with an
    /// [`Event::Granted`] to persist); the lease is not durable until the shell says so.
    pub fn checkout(
        &mut self,
        now: Now,
        conn: ConnId,
        holder: &ClientIdentity,
        request: &CheckoutRequest,
        fresh: FreshLease,
    ) -> Result<(LeaseRecord, Event), DenialReason> {
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
        let ttl = eligible
            .iter()
            .filter_map(|t| t.ttl)
            .min()
            .unwrap_or(self.settings.default_ttl);
        let linger = eligible.iter().map(|t| t.linger).max().unwrap_or_default();
        let in_use = self.in_use.get(feature).copied().unwrap_or(0);
        if let Some(pools) = pools(terms, now.wall) {
            let seats = pools.seats();
            let full = || DenialReason::AllSeatsInUse {
                feature: feature.clone(),
                total: seats,
                in_use,
                requested: request.count,
                holders: self.holder_names(feature),
            };
            if in_use.saturating_add(request.count) > seats.saturating_add(pools.overdraft) {
                return Err(full());
            }
            if pools.by_ceiling.iter().any(|(c, _)| c.is_some())
                && !self.fits(feature, &pools, version, request.count)
            {
                return Err(full());
            }
        }
        let mut id = fresh.id;
        while self.leases.contains_key(&id) {
            id = LeaseId(id.0.wrapping_add(1));
        }
        let record = LeaseRecord {
            id,
            secret: fresh.secret,
            feature: feature.clone(),
            count: request.count,
            holder: holder.clone(),
            granted_at: now.wall,
            ttl_secs: ttl.as_secs(),
            version: request.version.clone(),
            linger_secs: linger.as_secs(),
        };
        self.insert(record.clone(), Some(conn), now.mono + ttl);
        Ok((record.clone(), Event::Granted(record)))
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
                let Some(held) = self.leases.get_mut(&r.id) else {
                    return LeaseState::Unknown;
                };
                if !held.record.secret.matches(&r.secret) || held.lingering {
                    return LeaseState::Unknown;
                }
                let deadline = now.mono + Duration::from_secs(held.record.ttl_secs);
                self.deadlines.remove(&(held.deadline, r.id));
                self.deadlines.insert((deadline, r.id));
                held.deadline = deadline;
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
            if held.record.linger_secs > 0 {
                self.start_linger(now, r.id);
            } else {
                events.extend(self.release(r.id, ReleaseReason::Checkin));
            }
        }
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

    /// Releases every lease attached to a connection that closed.
    pub fn connection_closed(&mut self, conn: ConnId) -> Vec<Event> {
        let ids = self.by_conn.remove(&conn).unwrap_or_default();
        ids.into_iter()
            .filter_map(|id| self.release(id, ReleaseReason::ConnectionClosed))
            .collect()
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
                _ => ReleaseReason::Expired,
            };
            events.extend(self.release(id, why));
        }
        events
    }

    /// When [`Ledger::expire`] next has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(d, _)| *d)
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
                });
        }
        self.features
            .iter()
            .map(|(name, terms)| {
                let mut list = holders.remove(name.as_str()).unwrap_or_default();
                list.sort_by_key(|h| (h.since, h.lease));
                let active: Vec<&Term> = terms.iter().filter(|t| t.active(wall)).collect();
                FeatureStatus {
                    name: name.clone(),
                    total: pools(terms, wall).map(|p| p.seats()),
                    in_use: self.in_use.get(name).copied().unwrap_or(0),
                    expires: if active.iter().any(|t| t.expires.is_none()) {
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

    fn holder_names(&self, feature: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .leases
            .values()
            .filter(|h| h.record.feature == feature)
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
        let mut demands: Vec<(&str, u32)> = self
            .leases
            .values()
            .filter(|h| h.record.feature == feature)
            .filter_map(|h| h.record.version.as_deref().map(|v| (v, h.record.count)))
            .collect();
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

    fn insert(&mut self, record: LeaseRecord, conn: Option<ConnId>, deadline: Instant) {
        let id = record.id;
        *self.in_use.entry(record.feature.clone()).or_default() += record.count;
        self.deadlines.insert((deadline, id));
        if let Some(conn) = conn {
            self.by_conn.entry(conn).or_default().insert(id);
        }
        if let Some(old) = self.leases.insert(
            id,
            Held {
                record,
                conn,
                deadline,
                lingering: false,
            },
        ) {
            // Restoring a duplicate id would double-count; undo the old one's share.
            self.uncount(&old);
        }
    }

    fn uncount(&mut self, held: &Held) {
        if let Some(n) = self.in_use.get_mut(&held.record.feature) {
            *n = n.saturating_sub(held.record.count);
        }
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
        Some(Event::Released {
            id,
            feature: held.record.feature,
            why,
        })
    }
}
