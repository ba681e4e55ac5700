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
}

impl std::fmt::Display for ReleaseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReleaseReason::Checkin => "checkin",
            ReleaseReason::ConnectionClosed => "connection closed",
            ReleaseReason::Expired => "heartbeat TTL expired",
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
}

impl Term {
    fn active(&self, wall: UnixTime) -> bool {
        self.starts.is_none_or(|s| s <= wall) && self.expires.is_none_or(|e| wall < e)
    }
}

/// What the ledger knows of a held lease.
#[derive(Debug, Clone)]
struct Held {
    record: LeaseRecord,
    conn: Option<ConnId>,
    deadline: Instant,
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
        let mut features: BTreeMap<String, Vec<Term>> = BTreeMap::new();
        for bundle in bundles {
            for f in &bundle.features {
                features.entry(f.name.clone()).or_default().push(Term {
                    seats: f.seats,
                    overdraft: f.overdraft,
                    starts: f.starts,
                    expires: f.expires,
                    evaluation: f.evaluation,
                    ttl: f.heartbeat_ttl_secs.map(Duration::from_secs),
                });
            }
        }
        Ledger {
            settings,
            features,
            leases: HashMap::new(),
            in_use: HashMap::new(),
            deadlines: BTreeSet::new(),
            by_conn: HashMap::new(),
        }
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

    /// Seats of `feature` that count at `wall`: (licensed, overdraft), `None` if uncounted.
    fn capacity(&self, terms: &[Term], wall: UnixTime) -> Option<(u32, u32)> {
        let mut seats = 0u32;
        let mut overdraft = 0u32;
        for t in terms.iter().filter(|t| t.active(wall)) {
            match t.seats {
                Seats::Uncounted => return None,
                Seats::Counted(n) => seats = seats.saturating_add(n),
            }
            overdraft = overdraft.saturating_add(t.overdraft);
        }
        Some((seats, overdraft))
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
        let ttl = terms
            .iter()
            .filter(|t| t.active(now.wall))
            .filter_map(|t| t.ttl)
            .min()
            .unwrap_or(self.settings.default_ttl);
        let capacity = self.capacity(terms, now.wall);
        let in_use = self.in_use.get(feature).copied().unwrap_or(0);
        if let Some((seats, overdraft)) = capacity {
            let limit = seats.saturating_add(overdraft);
            if in_use.saturating_add(request.count) > limit {
                return Err(DenialReason::AllSeatsInUse {
                    feature: feature.clone(),
                    total: seats,
                    in_use,
                    requested: request.count,
                    holders: self.holder_names(feature),
                });
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
                if !held.record.secret.matches(&r.secret) {
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

    /// Releases the leases whose secrets match.
    pub fn checkin(&mut self, leases: &[LeaseRef]) -> (Vec<bool>, Vec<Event>) {
        let mut events = Vec::new();
        let released = leases
            .iter()
            .map(|r| {
                let ok = self
                    .leases
                    .get(&r.id)
                    .is_some_and(|h| h.record.secret.matches(&r.secret));
                if ok {
                    events.extend(self.release(r.id, ReleaseReason::Checkin));
                }
                ok
            })
            .collect();
        (released, events)
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
            events.extend(self.release(id, ReleaseReason::Expired));
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
                    total: self.capacity(terms, wall).map(|(seats, _)| seats),
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
