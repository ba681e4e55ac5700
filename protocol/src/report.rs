//! Usage reports: the journal of what the server did, signed and hash-chained, for the
//! vendor to verify and reconcile without trusting anybody's word.
//!
//! Each report covers a contiguous range of journal sequence numbers and names the
//! digest of the report before it, so a vendor holding reports 1..n detects an edited
//! report (signature), a removed one (a gap in report numbers or event numbers), a
//! duplicated one, and reports handed in out of order. The report also carries the
//! leases open at its start, so each report can be reconciled on its own.

use crate::armor::{armor, dearmor_limited, ArmorError};
use crate::keys::PublicKey;
use crate::lease::LeaseId;
use crate::signed::{Domain, Signed};
use crate::time::UnixTime;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Armour label of usage reports.
pub const REPORT_LABEL: &str = "USAGE REPORT";
/// Largest armoured report read (about four million events).
pub const MAX_REPORT_TEXT: usize = 512 * 1024 * 1024;

/// One journal entry: a numbered, timed event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Sequence number, from 1, without gaps.
    pub seq: u64,
    /// Wall-clock time of the event.
    pub at: UnixTime,
    /// What happened.
    pub event: UsageEvent,
}

/// Something the vendor may want to count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum UsageEvent {
    /// The daemon started.
    DaemonStarted {
        /// tallyd version.
        version: String,
    },
    /// The daemon stopped gracefully.
    DaemonStopped,
    /// A bundle is being served (at start and after each reload).
    BundleLoaded {
        /// Its id.
        bundle: String,
    },
    /// Seats were granted. A grant with an empty `user` and `host` is a seat set a
    /// licensing model holds for its members (a set of shared seats, a user's suite
    /// seat, the tokens of one draw): it counts seats of `feature`, not a checkout; the
    /// members' own grants count 0 seats.
    Granted {
        /// The lease.
        lease: LeaseId,
        /// The feature.
        feature: String,
        /// Seats.
        count: u32,
        /// Beyond the licensed count.
        overdraft: bool,
        /// Who.
        user: String,
        /// Where.
        host: String,
        /// For a borrow, its end.
        borrowed_until: Option<UnixTime>,
    },
    /// Seats came back.
    Released {
        /// The lease.
        lease: LeaseId,
        /// The feature.
        feature: String,
        /// Seats.
        count: u32,
        /// Why: checkin, connection closed, expired, removed, ...
        why: String,
    },
    /// A checkout was refused.
    Denied {
        /// The feature.
        feature: String,
        /// A short reason code (`all_seats_in_use`, `expired`, ...).
        reason: String,
        /// Who.
        user: String,
        /// Where.
        host: String,
    },
    /// A checkout started waiting in the queue.
    Queued {
        /// The feature.
        feature: String,
        /// Who.
        user: String,
        /// Where.
        host: String,
    },
    /// The wall clock was found behind the high-water mark.
    ClockMovedBack {
        /// The clock.
        clock: UnixTime,
        /// The latest time seen before.
        high_water: UnixTime,
    },
    /// The terms of a bundle about to come into force (journaled before the
    /// [`UsageEvent::BundlesInForce`] that names it), so that a report alone says what
    /// was licensed. A large bundle's terms come in several such events (each a journal
    /// entry of bounded size, see [`ServedBundle::parts`]); the parts since the last
    /// `BundlesInForce` add up.
    BundleTerms {
        /// The bundle and its terms.
        bundle: ServedBundle,
    },
    /// The served bundle set changed: from now on exactly `bundles` count (until the
    /// next change; a `DaemonStarted` leaves it unknown until the next one).
    BundlesInForce {
        /// Why: `start`, `reload`, `returned B`.
        why: String,
        /// The ids of the bundles in force from now on.
        bundles: Vec<String>,
        /// Bundles that stopped counting with this change, and why.
        withdrawn: Vec<Withdrawn>,
    },
    /// Where the client of the grant just journaled said it runs, when it reported a
    /// virtual machine or a remote session (journaled right after the lease's
    /// [`UsageEvent::Granted`]; a grant without it came from neither, or from a client
    /// too old to say). Facts the client reports: a modified client can lie.
    Session {
        /// The lease.
        lease: LeaseId,
        /// The hypervisor reported (`KVM/QEMU`).
        virtual_machine: Option<String>,
        /// The remote session reported (`SSH from 10.0.0.5`).
        remote: Option<String>,
    },
}

/// A bundle that stopped counting, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withdrawn {
    /// Its id.
    pub bundle: String,
    /// `superseded by B`, `expired`, `returned`, `no longer served` ...
    pub why: String,
}

/// A bundle in force, with the terms that count seats (what reconciliation needs; the
/// signed bundle itself stays with the vendor).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedBundle {
    /// The bundle id.
    pub bundle: String,
    /// The customer id.
    pub customer: String,
    /// One term per feature grant (a package's grant appears once per component and
    /// once under its own name, as the ledger counts it).
    pub terms: Vec<LicensedTerm>,
}

/// One grant of seats as the ledger counts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LicensedTerm {
    /// The feature.
    pub feature: String,
    /// Seats.
    pub seats: crate::bundle::Seats,
    /// Seats beyond `seats` usable as overdraft.
    pub overdraft: u32,
    /// Highest version served.
    pub version_ceiling: Option<String>,
    /// For an upgrade: the ceiling whose seats it moves (adds no seats).
    pub upgrade_from: Option<String>,
    /// First instant it counts (the later of the grant's start and the bundle's).
    pub starts: Option<UnixTime>,
    /// First instant it no longer counts (the earlier of the grant's and the bundle's end).
    pub expires: Option<UnixTime>,
    /// An evaluation grant.
    pub evaluation: bool,
}

impl LicensedTerm {
    /// Whether the term counts at `t`.
    pub fn active(&self, t: UnixTime) -> bool {
        self.starts.is_none_or(|s| s <= t) && self.expires.is_none_or(|e| t < e)
    }
}

impl ServedBundle {
    /// Most encoded bytes of terms in one [`UsageEvent::BundleTerms`]: an entry stays
    /// within a journal chunk's budget ([`StoredJournalChunk::MAX_BYTES`]).
    pub const PART_BYTES: usize = 1024;

    /// The bundle split into parts of at most [`Self::PART_BYTES`] of terms each (at
    /// least one term per part, and one part for a bundle without terms).
    pub fn parts(&self) -> Vec<ServedBundle> {
        let mut parts: Vec<ServedBundle> = Vec::new();
        let mut size = 0;
        for term in &self.terms {
            let bytes = crate::encode(term).len();
            match parts.last_mut() {
                Some(p) if size + bytes <= Self::PART_BYTES => {
                    p.terms.push(term.clone());
                    size += bytes;
                }
                _ => {
                    parts.push(ServedBundle {
                        bundle: self.bundle.clone(),
                        customer: self.customer.clone(),
                        terms: vec![term.clone()],
                    });
                    size = bytes;
                }
            }
        }
        if parts.is_empty() {
            parts.push(self.clone());
        }
        parts
    }

    /// The counting terms of `bundle`, bounded by its validity window.
    pub fn of(bundle: &crate::bundle::Bundle) -> ServedBundle {
        let later = |a: Option<UnixTime>, b: Option<UnixTime>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let earlier = |a: Option<UnixTime>, b: Option<UnixTime>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut terms = Vec::new();
        for f in &bundle.features {
            // As the ledger counts them: a package's components (not a suite's, which
            // use the package's seats) have the package's seats times their count, up
            // to their own version.
            let own = std::iter::once((f.name.as_str(), f.seats, f.overdraft, &f.version_ceiling));
            let components = f.components.iter().filter(|_| !f.suite).map(|c| {
                let times = |n: u32| n.saturating_mul(c.count);
                let seats = match f.seats {
                    crate::bundle::Seats::Counted(n) => crate::bundle::Seats::Counted(times(n)),
                    uncounted => uncounted,
                };
                let ceiling = if c.version.is_some() {
                    &c.version
                } else {
                    &f.version_ceiling
                };
                (c.name.as_str(), seats, times(f.overdraft), ceiling)
            });
            for (name, seats, overdraft, ceiling) in components.chain(own) {
                terms.push(LicensedTerm {
                    feature: name.to_string(),
                    seats,
                    overdraft,
                    version_ceiling: ceiling.clone(),
                    upgrade_from: f.upgrade_from.clone(),
                    starts: later(f.starts, bundle.valid_from),
                    expires: earlier(f.expires, bundle.valid_until),
                    evaluation: f.evaluation,
                });
            }
        }
        ServedBundle {
            bundle: bundle.id.clone(),
            customer: bundle.customer.id.clone(),
            terms,
        }
    }
}

/// Replays the bundle history of a journal: the terms known per bundle and the set in
/// force. Shared by the daemon's report state and the vendor's reconciliation.
#[derive(Debug, Clone, Default)]
pub struct BundleReplay {
    /// Terms per bundle id, as last journaled (or known at the start).
    catalog: std::collections::BTreeMap<String, ServedBundle>,
    /// Parts of `BundleTerms` since the last `BundlesInForce`, added up.
    pending: std::collections::BTreeMap<String, ServedBundle>,
    /// The bundles in force; `None` while unknown.
    in_force: Option<Vec<ServedBundle>>,
}

impl BundleReplay {
    /// Starts from the bundles in force at a report's start (`None`: unknown).
    pub fn new(start: Option<&[ServedBundle]>) -> BundleReplay {
        BundleReplay {
            catalog: start
                .into_iter()
                .flatten()
                .map(|b| (b.bundle.clone(), b.clone()))
                .collect(),
            pending: Default::default(),
            in_force: start.map(<[ServedBundle]>::to_vec),
        }
    }

    /// Applies one event; returns whether the set in force changed (or became unknown).
    pub fn apply(&mut self, event: &UsageEvent) -> bool {
        match event {
            UsageEvent::DaemonStarted { .. } => {
                self.in_force = None;
                true
            }
            UsageEvent::BundleTerms { bundle } => {
                match self.pending.get_mut(&bundle.bundle) {
                    Some(p) => p.terms.extend(bundle.terms.iter().cloned()),
                    None => {
                        self.pending.insert(bundle.bundle.clone(), bundle.clone());
                    }
                }
                false
            }
            UsageEvent::BundlesInForce { bundles, .. } => {
                self.catalog.append(&mut self.pending);
                self.in_force = Some(
                    bundles
                        .iter()
                        .map(|id| match self.catalog.get(id) {
                            Some(b) => b.clone(),
                            // Named without terms: kept, counting no seat.
                            None => ServedBundle {
                                bundle: id.clone(),
                                customer: String::new(),
                                terms: Vec::new(),
                            },
                        })
                        .collect(),
                );
                true
            }
            _ => false,
        }
    }

    /// The bundles in force now; `None` while unknown.
    pub fn in_force(&self) -> Option<&[ServedBundle]> {
        self.in_force.as_deref()
    }

    /// Terms known for bundle `id`, if any.
    pub fn terms_of(&self, id: &str) -> Option<&ServedBundle> {
        self.catalog.get(id)
    }
}

/// The bundles in force after `events`, starting from `start` (`None`: unknown).
pub fn replay_bundles(
    start: Option<&[ServedBundle]>,
    events: &[JournalEntry],
) -> Option<Vec<ServedBundle>> {
    let mut replay = BundleReplay::new(start);
    for e in events {
        replay.apply(&e.event);
    }
    replay.in_force().map(<[ServedBundle]>::to_vec)
}

/// The journal entry as stored; the variant is the format version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StoredJournal {
    /// Format version 1.
    V1(JournalEntry),
}

impl StoredJournal {
    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        crate::encode(self)
    }

    /// Decodes from the store, bounded.
    pub fn decode(bytes: &[u8]) -> Result<StoredJournal, crate::DecodeError> {
        crate::decode::<StoredJournal, 65536>(bytes)
    }
}

/// Consecutive journal entries stored as one record under the first entry's number.
///
/// A few sled values per group commit instead of one per event: sled's log keeps far
/// less per record, so a store that exports and compacts every 200,000 events stays at about
/// 22 MiB instead of 66 MiB (BENCHMARKS.md). The variant is the format version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StoredJournalChunk {
    /// Format version 1: entries in sequence order, without gaps.
    V1(Vec<JournalEntry>),
}

impl StoredJournalChunk {
    /// Most entries the daemon puts in one chunk; a damaged chunk loses at most this
    /// many events, and readers look this far back for the chunk holding a number.
    pub const MAX_ENTRIES: usize = 64;

    /// Most encoded bytes the daemon puts in one chunk (a single larger entry still gets
    /// a chunk of its own). sled stores a node larger than a quarter of a segment (32 KiB
    /// with tally's 128 KiB segments) in a blob file of its own, which its flush does
    /// not fsync; a leaf of up to 17 chunks must stay below that.
    pub const MAX_BYTES: usize = 1536;

    /// Splits consecutive entries into chunks of at most [`Self::MAX_ENTRIES`] entries
    /// and [`Self::MAX_BYTES`] encoded bytes, the same way every time.
    pub fn split(entries: &[JournalEntry]) -> Vec<&[JournalEntry]> {
        Self::split_encoded(entries)
            .into_iter()
            .map(|(chunk, _)| chunk)
            .collect()
    }

    /// The chunks of [`Self::split`] as the store keeps them: (first entry's number,
    /// encoded chunk). Each entry is encoded once, for its size and for the value.
    pub fn encode_split(entries: &[JournalEntry]) -> Vec<(u64, Vec<u8>)> {
        Self::split_encoded(entries)
            .into_iter()
            .map(|(chunk, body)| {
                // The encoding of `V1(chunk)`: variant index, length, then the entries.
                let mut value = crate::encode(&0u32);
                value.extend(crate::encode(&(chunk.len() as u64)));
                value.extend(body);
                (chunk[0].seq, value)
            })
            .collect()
    }

    /// Each chunk with its entries' encodings, concatenated.
    fn split_encoded(entries: &[JournalEntry]) -> Vec<(&[JournalEntry], Vec<u8>)> {
        let mut out = Vec::new();
        let mut start = 0;
        let mut body = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let bytes = crate::encode(e);
            if i > start
                && (i - start == Self::MAX_ENTRIES || body.len() + bytes.len() > Self::MAX_BYTES)
            {
                out.push((&entries[start..i], std::mem::take(&mut body)));
                start = i;
            }
            body.extend(bytes);
        }
        if start < entries.len() {
            out.push((&entries[start..], body));
        }
        out
    }

    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        crate::encode(self)
    }

    /// Decodes from the store, bounded (a chunk of entries each near the request size
    /// limit still fits).
    pub fn decode(bytes: &[u8]) -> Result<StoredJournalChunk, crate::DecodeError> {
        crate::decode::<StoredJournalChunk, { 32 * 1024 * 1024 }>(bytes)
    }
}

/// A lease open at a report's start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenLease {
    /// The lease.
    pub lease: LeaseId,
    /// The feature.
    pub feature: String,
    /// Seats.
    pub count: u32,
    /// Beyond the licensed count.
    pub overdraft: bool,
    /// Who.
    pub user: String,
    /// Where.
    pub host: String,
    /// Since when.
    pub since: UnixTime,
}

/// The server's own per-feature summary of a report (the vendor recomputes it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureSummary {
    /// The feature.
    pub feature: String,
    /// Grants.
    pub grants: u64,
    /// Denials.
    pub denials: u64,
    /// Most seats in use at once.
    pub peak_in_use: u32,
    /// Seat-seconds used in the period.
    pub seat_seconds: u64,
}

/// A usage report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Report number, from 1, without gaps.
    pub report_seq: u64,
    /// The server key (also the signer).
    pub server_key: PublicKey,
    /// The host fingerprint.
    pub host_fingerprint: String,
    /// Customer ids of the bundles served.
    pub customers: Vec<String>,
    /// Ids of the bundles served at export.
    pub bundle_ids: Vec<String>,
    /// Start of the period (the previous report's end, or the first event).
    pub period_from: UnixTime,
    /// End of the period (export time).
    pub period_to: UnixTime,
    /// First journal sequence number covered.
    pub first_event: u64,
    /// Last journal sequence number covered (`first_event - 1` if none).
    pub last_event: u64,
    /// Digest of the previous report; zeros for the first.
    pub previous_digest: [u8; 32],
    /// Leases open at `period_from`.
    pub open_at_start: Vec<OpenLease>,
    /// The events.
    pub events: Vec<JournalEntry>,
    /// The server's summaries.
    pub summaries: Vec<FeatureSummary>,
    /// The bundles in force at `period_from`, with their terms; with the
    /// `BundleTerms`/`BundlesInForce` events this is the period's bundle history.
    /// `None` when the server did not know (reports of format version 1, and the first
    /// report after an upgrade from such a server).
    pub bundles_at_start: Option<Vec<ServedBundle>>,
}

/// Version 1 of the report body, as older tallyd wrote it (no bundle history).
#[derive(Serialize, Deserialize)]
struct ReportV1 {
    report_seq: u64,
    server_key: PublicKey,
    host_fingerprint: String,
    customers: Vec<String>,
    bundle_ids: Vec<String>,
    period_from: UnixTime,
    period_to: UnixTime,
    first_event: u64,
    last_event: u64,
    previous_digest: [u8; 32],
    open_at_start: Vec<OpenLease>,
    events: Vec<JournalEntry>,
    summaries: Vec<FeatureSummary>,
}

impl From<ReportV1> for Report {
    fn from(r: ReportV1) -> Report {
        Report {
            report_seq: r.report_seq,
            server_key: r.server_key,
            host_fingerprint: r.host_fingerprint,
            customers: r.customers,
            bundle_ids: r.bundle_ids,
            period_from: r.period_from,
            period_to: r.period_to,
            first_event: r.first_event,
            last_event: r.last_event,
            previous_digest: r.previous_digest,
            open_at_start: r.open_at_start,
            events: r.events,
            summaries: r.summaries,
            bundles_at_start: None,
        }
    }
}

#[derive(Serialize, Deserialize)]
enum ReportBody {
    V1(ReportV1),
    /// Version 2 adds the bundle history (`bundles_at_start`).
    V2(Report),
}

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// The armour is damaged, truncated, or not a report.
    #[error(transparent)]
    Armor(#[from] ArmorError),
    /// The contents do not decode.
    #[error("malformed report: {0}")]
    Malformed(String),
    /// The signature does not verify.
    #[error("signature does not verify (the report was edited or corrupted)")]
    BadSignature,
    /// Signed by another key than the server key it names.
    #[error("signed by key {signer}, but it names server key {named}")]
    WrongSigner {
        /// Who signed.
        signer: String,
        /// Whom it names.
        named: String,
    },
}

/// A report that verified against its own signer, with its digest for the chain.
#[derive(Debug, Clone)]
pub struct VerifiedReport {
    /// The report.
    pub report: Report,
    /// SHA-256 of the signed body, which the next report names.
    pub digest: [u8; 32],
}

/// Signs and armours a report; returns the text and the digest the next report names.
pub fn sign(report: &Report, key: &crate::keys::SecretKey) -> (String, [u8; 32]) {
    let body = crate::encode(&ReportBody::V2(report.clone()));
    let digest: [u8; 32] = Sha256::digest(&body).into();
    let signed = Signed::sign(Domain::Report, body, key);
    (armor(REPORT_LABEL, &crate::encode(&signed)), digest)
}

/// Reads and verifies a report (signature by the server key it names).
pub fn read(text: &str) -> Result<VerifiedReport, ReportError> {
    let bytes = dearmor_limited(REPORT_LABEL, text, MAX_REPORT_TEXT)?;
    let signed: Signed = crate::decode::<Signed, MAX_REPORT_TEXT>(&bytes)
        .map_err(|e| ReportError::Malformed(e.0))?;
    signed
        .verify(Domain::Report)
        .map_err(|_| ReportError::BadSignature)?;
    let report = match crate::decode::<ReportBody, MAX_REPORT_TEXT>(&signed.body)
        .map_err(|e| ReportError::Malformed(e.0))?
    {
        ReportBody::V1(r) => Report::from(r),
        ReportBody::V2(r) => r,
    };
    if report.server_key != signed.signer {
        return Err(ReportError::WrongSigner {
            signer: signed.signer.fingerprint(),
            named: report.server_key.fingerprint(),
        });
    }
    // tallyd never writes one (its period ends at the later of now and the start), and
    // everything that integrates over the period assumes it.
    if report.period_to < report.period_from {
        return Err(ReportError::Malformed(format!(
            "the period ends ({}) before it starts ({})",
            report.period_to, report.period_from
        )));
    }
    let digest: [u8; 32] = Sha256::digest(&signed.body).into();
    Ok(VerifiedReport { report, digest })
}

/// Where the report chain stands, as the daemon persists it; the variant is the format
/// version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StoredReportState {
    /// Format version 1 (no bundles in force).
    V1(ReportStateV1),
    /// Format version 2: with the bundles in force at the end of the last report.
    V2(ReportState),
}

/// Version 1 of the chain state, as older tallyd stored it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportStateV1 {
    /// Number of the last report exported (0 before the first).
    pub report_seq: u64,
    /// Last journal sequence number exported.
    pub last_event: u64,
    /// Digest of the last report.
    pub digest: [u8; 32],
    /// End of the last report's period.
    pub period_end: Option<UnixTime>,
    /// Leases open at the end of the last report.
    pub open: Vec<OpenLease>,
}

impl StoredReportState {
    /// The state, whatever version it was stored in (version 1 did not know the bundles).
    pub fn into_state(self) -> ReportState {
        match self {
            StoredReportState::V1(s) => ReportState {
                report_seq: s.report_seq,
                last_event: s.last_event,
                digest: s.digest,
                period_end: s.period_end,
                open: s.open,
                bundles: None,
            },
            StoredReportState::V2(s) => s,
        }
    }
}

/// Where the report chain stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportState {
    /// Number of the last report exported (0 before the first).
    pub report_seq: u64,
    /// Last journal sequence number exported.
    pub last_event: u64,
    /// Digest of the last report.
    pub digest: [u8; 32],
    /// End of the last report's period.
    pub period_end: Option<UnixTime>,
    /// Leases open at the end of the last report.
    pub open: Vec<OpenLease>,
    /// Bundles in force at the end of the last report (`None`: unknown).
    pub bundles: Option<Vec<ServedBundle>>,
}

impl StoredReportState {
    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        crate::encode(self)
    }

    /// Decodes from the store, bounded.
    pub fn decode(bytes: &[u8]) -> Result<StoredReportState, crate::DecodeError> {
        crate::decode::<StoredReportState, { 256 * 1024 * 1024 }>(bytes)
    }
}

/// Replays `events` over the leases open at the start; returns the leases open at the
/// end. Releases of unknown leases are ignored (their grant predates the chain).
pub fn replay_open(open: &[OpenLease], events: &[JournalEntry]) -> Vec<OpenLease> {
    let mut map: std::collections::BTreeMap<crate::lease::LeaseId, OpenLease> =
        open.iter().map(|o| (o.lease, o.clone())).collect();
    for e in events {
        match &e.event {
            UsageEvent::Granted {
                lease,
                feature,
                count,
                overdraft,
                user,
                host,
                ..
            } => {
                map.insert(
                    *lease,
                    OpenLease {
                        lease: *lease,
                        feature: feature.clone(),
                        count: *count,
                        overdraft: *overdraft,
                        user: user.clone(),
                        host: host.clone(),
                        since: e.at,
                    },
                );
            }
            UsageEvent::Released { lease, .. } => {
                map.remove(lease);
            }
            _ => {}
        }
    }
    map.into_values().collect()
}

/// The server's summaries: grants, denials, peak and seat-seconds per feature over
/// `[from, to]`.
pub fn summarize(
    open: &[OpenLease],
    events: &[JournalEntry],
    from: UnixTime,
    to: UnixTime,
) -> Vec<FeatureSummary> {
    use std::collections::BTreeMap;
    #[derive(Default)]
    struct Acc {
        grants: u64,
        denials: u64,
        in_use: u64,
        peak: u64,
        seat_seconds: u64,
        last: u64,
    }
    let mut acc: BTreeMap<String, Acc> = BTreeMap::new();
    for o in open {
        let a = acc.entry(o.feature.clone()).or_default();
        a.in_use += o.count as u64;
        a.peak = a.peak.max(a.in_use);
        a.last = from.0;
    }
    for e in events {
        // Not `clamp`, which panics if `from` is after `to`.
        let t = e.at.0.max(from.0).min(to.0);
        let (feature, delta, grant, denial) = match &e.event {
            // A seat set (empty user) counts seats, not a checkout.
            UsageEvent::Granted {
                feature,
                count,
                user,
                ..
            } => (feature, *count as i64, u64::from(!user.is_empty()), 0),
            UsageEvent::Released { feature, count, .. } => (feature, -(*count as i64), 0, 0),
            UsageEvent::Denied { feature, .. } => (feature, 0, 0, 1),
            _ => continue,
        };
        let a = acc.entry(feature.clone()).or_insert_with(|| Acc {
            last: from.0,
            ..Acc::default()
        });
        a.seat_seconds += a.in_use * t.saturating_sub(a.last);
        a.last = t;
        a.in_use = (a.in_use as i64 + delta).max(0) as u64;
        a.peak = a.peak.max(a.in_use);
        a.grants += grant;
        a.denials += denial;
    }
    acc.into_iter()
        .map(|(feature, a)| FeatureSummary {
            feature,
            grants: a.grants,
            denials: a.denials,
            peak_in_use: a.peak.min(u32::MAX as u64) as u32,
            seat_seconds: a.seat_seconds + a.in_use * to.0.saturating_sub(a.last),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(seq: u64, user: &str) -> JournalEntry {
        JournalEntry {
            seq,
            at: UnixTime(seq),
            event: UsageEvent::Denied {
                feature: "solver".into(),
                reason: "all_seats_in_use".into(),
                user: user.into(),
                host: "ws".into(),
            },
        }
    }

    #[test]
    fn chunks_are_bounded_in_entries_and_bytes_and_cover_everything_in_order() {
        let mut entries: Vec<JournalEntry> = (1..=500).map(|s| denied(s, "ana")).collect();
        // One entry alone bigger than a chunk's byte budget gets a chunk of its own.
        entries[200] = denied(201, &"x".repeat(4000));
        let chunks = StoredJournalChunk::split(&entries);
        let joined: Vec<u64> = chunks
            .iter()
            .flat_map(|c| c.iter().map(|e| e.seq))
            .collect();
        assert_eq!(joined, (1..=500).collect::<Vec<_>>());
        for c in &chunks {
            assert!(!c.is_empty() && c.len() <= StoredJournalChunk::MAX_ENTRIES);
            let bytes = StoredJournalChunk::V1(c.to_vec()).encode().len();
            assert!(
                bytes <= StoredJournalChunk::MAX_BYTES + 8 || c.len() == 1,
                "{} entries in {bytes} bytes",
                c.len()
            );
        }
        assert!(chunks.iter().any(|c| c.len() == 1 && c[0].seq == 201));
        // The same entries split the same way, which the store's conversion relies on.
        assert_eq!(StoredJournalChunk::split(&entries), chunks);
        assert!(StoredJournalChunk::split(&[]).is_empty());
    }

    #[test]
    fn chunks_encoded_entry_by_entry_are_the_chunk_encoding() {
        let mut entries: Vec<JournalEntry> = (1..=500).map(|s| denied(s, "ana")).collect();
        entries[200] = denied(201, &"x".repeat(4000));
        let encoded = StoredJournalChunk::encode_split(&entries);
        let chunks = StoredJournalChunk::split(&entries);
        assert_eq!(encoded.len(), chunks.len());
        for ((seq, value), chunk) in encoded.iter().zip(&chunks) {
            assert_eq!(*seq, chunk[0].seq);
            assert_eq!(*value, StoredJournalChunk::V1(chunk.to_vec()).encode());
        }
        assert!(StoredJournalChunk::encode_split(&[]).is_empty());
    }

    #[test]
    fn reports_of_version_1_still_read_without_a_bundle_history() {
        let key = crate::keys::SecretKey::from_seed([5; 32]);
        let old = ReportV1 {
            report_seq: 1,
            server_key: key.public(),
            host_fingerprint: "h".into(),
            customers: vec!["C-1".into()],
            bundle_ids: vec!["b-1".into()],
            period_from: UnixTime(10),
            period_to: UnixTime(20),
            first_event: 1,
            last_event: 1,
            previous_digest: [0; 32],
            open_at_start: vec![],
            events: vec![denied(1, "ana")],
            summaries: vec![],
        };
        let body = crate::encode(&ReportBody::V1(old));
        let signed = Signed::sign(Domain::Report, body, &key);
        let text = armor(REPORT_LABEL, &crate::encode(&signed));
        let read = read(&text).unwrap();
        assert_eq!(read.report.bundle_ids, vec!["b-1".to_string()]);
        assert_eq!(read.report.events.len(), 1);
        assert_eq!(read.report.bundles_at_start, None);
        // Written again, it is version 2 and reads back the same.
        let (again, digest) = sign(&read.report, &key);
        let back = super::read(&again).unwrap();
        assert_eq!((back.report, back.digest), (read.report, digest));
    }

    #[test]
    fn the_bundles_in_force_follow_the_journal_and_a_start_makes_them_unknown() {
        let mut bundle = crate::bundle::Bundle {
            id: "paid".into(),
            issued_at: UnixTime(0),
            vendor: "Acme".into(),
            customer: crate::bundle::Customer {
                id: "C-1".into(),
                name: "Example".into(),
            },
            binding: vec![],
            supersedes: vec![],
            valid_from: None,
            valid_until: Some(UnixTime(100)),
            features: vec![crate::bundle::FeatureGrant::counted("solver", 4)],
        };
        bundle.features[0].expires = Some(UnixTime(200));
        let paid = ServedBundle::of(&bundle);
        // The bundle's end bounds its terms.
        assert_eq!(paid.terms[0].expires, Some(UnixTime(100)));
        assert!(paid.terms[0].active(UnixTime(99)) && !paid.terms[0].active(UnixTime(100)));
        let trial = ServedBundle {
            bundle: "trial".into(),
            customer: "C-1".into(),
            terms: vec![],
        };
        let at = |seq, event| JournalEntry {
            seq,
            at: UnixTime(seq),
            event,
        };
        let events = vec![
            at(
                1,
                UsageEvent::BundleTerms {
                    bundle: paid.clone(),
                },
            ),
            at(
                2,
                UsageEvent::BundlesInForce {
                    why: "reload".into(),
                    bundles: vec!["paid".into()],
                    withdrawn: vec![Withdrawn {
                        bundle: "trial".into(),
                        why: "superseded by paid".into(),
                    }],
                },
            ),
        ];
        let start = [trial.clone()];
        assert_eq!(
            replay_bundles(Some(&start), &events),
            Some(vec![paid.clone()])
        );
        assert_eq!(
            replay_bundles(Some(&start), &events[..1]),
            Some(vec![trial])
        );
        // Unknown at the start: known from the first change on.
        assert_eq!(replay_bundles(None, &events), Some(vec![paid.clone()]));
        let mut restarted = events.clone();
        restarted.push(at(
            3,
            UsageEvent::DaemonStarted {
                version: "0".into(),
            },
        ));
        assert_eq!(replay_bundles(Some(&start), &restarted), None);
        // A set that names a bundle whose terms were never journaled keeps it, termless.
        restarted.push(at(
            4,
            UsageEvent::BundlesInForce {
                why: "start".into(),
                bundles: vec!["paid".into(), "other".into()],
                withdrawn: vec![],
            },
        ));
        let end = replay_bundles(None, &restarted).unwrap();
        assert_eq!(end[0], paid);
        assert_eq!((end[1].bundle.as_str(), end[1].terms.len()), ("other", 0));
    }

    #[test]
    fn a_large_bundle_is_journaled_in_bounded_parts_that_add_up() {
        let features = (0..300)
            .map(|i| crate::bundle::FeatureGrant::counted(&format!("feature-{i:03}"), i))
            .collect();
        let bundle = crate::bundle::Bundle {
            id: "big".into(),
            issued_at: UnixTime(0),
            vendor: "Acme".into(),
            customer: crate::bundle::Customer {
                id: "C-1".into(),
                name: "Example".into(),
            },
            binding: vec![],
            supersedes: vec![],
            valid_from: None,
            valid_until: None,
            features,
        };
        let served = ServedBundle::of(&bundle);
        let parts = served.parts();
        assert!(parts.len() > 5, "{} parts", parts.len());
        let mut events: Vec<JournalEntry> = parts
            .into_iter()
            .enumerate()
            .map(|(i, bundle)| JournalEntry {
                seq: i as u64 + 1,
                at: UnixTime(1),
                event: UsageEvent::BundleTerms { bundle },
            })
            .collect();
        for e in &events {
            let bytes = crate::encode(e).len();
            assert!(bytes <= StoredJournalChunk::MAX_BYTES, "{bytes} bytes");
        }
        events.push(JournalEntry {
            seq: events.len() as u64 + 1,
            at: UnixTime(1),
            event: UsageEvent::BundlesInForce {
                why: "start".into(),
                bundles: vec!["big".into()],
                withdrawn: vec![],
            },
        });
        assert_eq!(replay_bundles(None, &events), Some(vec![served]));
    }
}
