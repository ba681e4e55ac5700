//! Verifying a chain of usage reports and reconciling it against what was sold.
//!
//! [`verify_chain`] checks every report's signature, that the signer is the server key the
//! vendor bound in the bundle, and that the reports form one unbroken chain: report
//! numbers consecutive, each naming the digest of the one before, event numbers
//! continuous. Every problem is named with the file it is in.
//!
//! [`reconcile`] replays the events into a step function of seats in use per feature and
//! integrates it: peak, time-weighted average, seat-hours, overdraft, hours at 100 %,
//! denials by reason, distinct users and hosts, per report period and in total.
//!
//! Licensed seats are a step function too: the reports' bundle history (the bundles in
//! force at each report's start, then every change the server journaled) says which
//! bundles counted when, and each bundle's terms say from when to when their seats
//! count. Where a report does not say (reports of format version 1, or after a daemon
//! start until it journals its bundles) the bundles given by the vendor stand in, with
//! the superseded ones dropped.

use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use tally_protocol::bundle::{Bundle, Seats};
use tally_protocol::keys::PublicKey;
use tally_protocol::report::{self, BundleReplay, ServedBundle, UsageEvent, VerifiedReport};
use tally_protocol::time::UnixTime;
use tally_protocol::wire::UNLICENSED_FEATURE;

/// A report file as given: a name for messages, and its text.
pub struct ReportFile {
    /// Name (the path) for messages.
    pub name: String,
    /// The armoured text.
    pub text: String,
}

/// A report that verified, with where it came from.
#[derive(Debug, Clone)]
pub struct ChainLink {
    /// File name.
    pub name: String,
    /// The verified report.
    pub report: VerifiedReport,
}

/// Verifies reports as one chain, in the order given. Returns the links, or every
/// problem found, each naming its file.
pub fn verify_chain(bundle: &Bundle, files: &[ReportFile]) -> Result<Vec<ChainLink>, Vec<String>> {
    verify_site_chain(std::slice::from_ref(bundle), files)
}

/// The server keys of the site `key` belongs to: `key`, every key a bundle binds
/// together with it (the members of a cluster), and so on (a replaced node's new
/// bundle binds the members that stay, which ties the old and the new bundle into one
/// site). A key no bundle binds is a site of its own.
pub fn site_keys(bundles: &[Bundle], key: &PublicKey) -> BTreeSet<PublicKey> {
    let mut keys = BTreeSet::from([*key]);
    // Each pass adds at least one bundle's keys or ends: at most one pass per bundle.
    loop {
        let before = keys.len();
        for b in bundles {
            if b.binding.iter().any(|x| keys.contains(&x.server_key)) {
                keys.extend(b.bound_keys());
            }
        }
        if keys.len() == before {
            return keys;
        }
    }
}

/// The bundles of the site `key` belongs to (see [`site_keys`]): those that bind any of
/// its server keys, in the order given.
pub fn site_bundles(bundles: &[Bundle], key: &PublicKey) -> Vec<Bundle> {
    let keys = site_keys(bundles, key);
    bundles
        .iter()
        .filter(|b| b.binding.iter().any(|x| keys.contains(&x.server_key)))
        .cloned()
        .collect()
}

/// Verifies reports as one chain of one site, in the order given: each report must be
/// signed by a server key one of `site` binds. In a cluster the report chain head is
/// replicated and whichever node leads signs the next report with its own key, so one
/// chain holds reports of several signers; the chain checks (numbers, previous-report
/// digests, event numbers, forks) run across signer changes exactly as within one.
/// Returns the links, or every problem found, each naming its file.
pub fn verify_site_chain(
    site: &[Bundle],
    files: &[ReportFile],
) -> Result<Vec<ChainLink>, Vec<String>> {
    let mut problems = Vec::new();
    let Some(first_bundle) = site.first() else {
        return Err(vec!["no bundle given".into()]);
    };
    if site.iter().all(|b| b.binding.is_empty()) {
        return Err(vec![format!(
            "bundle {} is not bound to a server; reports cannot be attributed",
            first_bundle.id
        )]);
    }
    let mut bound: Vec<String> = Vec::new();
    for k in site.iter().flat_map(|b| b.bound_keys()) {
        let f = k.fingerprint();
        if !bound.contains(&f) {
            bound.push(f);
        }
    }
    let ids: Vec<&str> = site.iter().map(|b| b.id.as_str()).collect();
    let mut links: Vec<ChainLink> = Vec::new();
    // Report number -> (file, digest) of the first report with that number.
    let mut seen: BTreeMap<u64, (String, [u8; 32])> = BTreeMap::new();
    for f in files {
        let verified = match report::read(&f.text) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("{}: refused: {e}", f.name));
                continue;
            }
        };
        let r = &verified.report;
        if !site.iter().any(|b| b.is_bound_to(&r.server_key)) {
            problems.push(match (ids.len(), bound.len()) {
                (1, 1) => format!(
                    "{}: signed by server key {}, but bundle {} binds server key {}",
                    f.name,
                    r.server_key.fingerprint(),
                    ids[0],
                    bound[0]
                ),
                (1, _) => format!(
                    "{}: signed by server key {}, but bundle {} binds server keys {}",
                    f.name,
                    r.server_key.fingerprint(),
                    ids[0],
                    bound.join(", ")
                ),
                _ => format!(
                    "{}: signed by server key {}, but bundles {} bind server keys {}",
                    f.name,
                    r.server_key.fingerprint(),
                    ids.join(", "),
                    bound.join(", ")
                ),
            });
            continue;
        }
        if let Some((first, digest)) = seen.get(&r.report_seq) {
            problems.push(if *digest == verified.digest {
                format!("{}: duplicate of report {} ({first})", f.name, r.report_seq)
            } else {
                format!(
                    "{}: a second, different report {} (the first is {first}, signed by {}; this one by {}): the chain forks",
                    f.name,
                    r.report_seq,
                    links
                        .iter()
                        .find(|l| l.name == *first)
                        .map_or_else(String::new, |l| short_fingerprint(&l.report.report.server_key)),
                    short_fingerprint(&r.server_key)
                )
            });
            continue;
        }
        seen.insert(r.report_seq, (f.name.clone(), verified.digest));
        if let Some(prev) = links.last() {
            let p = &prev.report.report;
            if r.report_seq < p.report_seq {
                problems.push(format!(
                    "{}: report {} comes after report {} ({}): reports are out of order",
                    f.name, r.report_seq, p.report_seq, prev.name
                ));
            } else if r.report_seq > p.report_seq + 1 {
                problems.push(format!(
                    "{} missing between {} (report {}) and {} (report {})",
                    numbered_span("report", "reports", p.report_seq + 1, r.report_seq - 1),
                    prev.name,
                    p.report_seq,
                    f.name,
                    r.report_seq
                ));
            } else {
                if r.previous_digest != prev.report.digest {
                    problems.push(format!(
                        "{}: does not follow {} (its previous-report digest differs): a report was replaced",
                        f.name, prev.name
                    ));
                }
                // Report contents are the customer's: no arithmetic on them may overflow.
                match p.last_event.checked_add(1) {
                    Some(next) if next == r.first_event => {}
                    Some(next) => problems.push(format!(
                        "{}: {} missing after {}",
                        f.name,
                        numbered_span("event", "events", next, r.first_event.saturating_sub(1)),
                        prev.name
                    )),
                    None => problems.push(format!(
                        "{}: cannot follow {}, whose last event number is the largest there is",
                        f.name, prev.name
                    )),
                }
            }
        } else if r.report_seq == 1 && (r.previous_digest != [0; 32] || r.first_event != 1) {
            problems.push(format!("{}: report 1 does not start the chain", f.name));
        }
        // Events inside a report are numbered without gaps.
        // (Not `(r.first_event..).zip(..)`, which overflows past u64::MAX.)
        if let Some((i, e)) = r
            .events
            .iter()
            .enumerate()
            .find(|(i, e)| r.first_event.checked_add(*i as u64) != Some(e.seq))
        {
            let before = match i {
                0 => r.first_event.saturating_sub(1),
                _ => r.events[i - 1].seq,
            };
            problems.push(format!(
                "{}: event {} follows event {}: events are missing",
                f.name, e.seq, before
            ));
        }
        links.push(ChainLink {
            name: f.name.clone(),
            report: verified,
        });
    }
    if problems.is_empty() {
        Ok(links)
    } else {
        Err(problems)
    }
}

/// Verifies reports as one chain against all of a customer's bundles: the chain must be
/// signed by the servers of one site (see [`site_keys`]), which the first report whose
/// signer a bundle binds picks.
pub fn verify_chain_all(
    bundles: &[Bundle],
    files: &[ReportFile],
) -> Result<Vec<ChainLink>, Vec<String>> {
    let Some(first) = bundles.first() else {
        return Err(vec!["no bundle given".into()]);
    };
    let signer = files
        .iter()
        .filter_map(|f| report::read(&f.text).ok())
        .map(|v| v.report.server_key)
        .find(|key| bundles.iter().any(|b| b.is_bound_to(key)));
    match signer {
        Some(key) => verify_site_chain(&site_bundles(bundles, &key), files),
        // No report is signed by a bound server: the first bundle names what it binds.
        None => verify_chain(first, files),
    }
}

/// A server key as the vendor's tools show a signer among a cluster's members: the
/// first four groups of its fingerprint, which read as the node's id in the cluster
/// ([`PublicKey::node_id`]), so the vendor can match it with the customer's cluster view.
pub fn short_fingerprint(key: &PublicKey) -> String {
    key.fingerprint().chars().take(19).collect()
}

/// One step of the licensed-seats step function.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LicensedStep {
    /// From when (Unix seconds).
    pub from_unix: u64,
    /// From when, readable.
    pub from: String,
    /// Seats licensed from then on; `None` for uncounted.
    pub seats: Option<u32>,
    /// `report` when the reports' bundle history says it, `bundles` when the reports did
    /// not say and the given bundles stand in.
    pub source: String,
}

/// A stretch of time with more seats in use than licensed (only where the seats are
/// counted): what a billing analyst invoices as overdraft.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OverdraftPeriod {
    /// Start (Unix seconds).
    pub start_unix: u64,
    /// Start, readable.
    pub start: String,
    /// End (Unix seconds).
    pub end_unix: u64,
    /// End, readable.
    pub end: String,
    /// Most seats beyond the licensed count at once within it.
    pub seats: u32,
    /// Seat-hours beyond the licensed count within it.
    pub seat_hours: f64,
}

/// Usage figures of one feature over one period.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Start of the period.
    pub from: String,
    /// End of the period.
    pub to: String,
    /// Licensed seats at the end of the period (none for uncounted).
    pub licensed: Option<u32>,
    /// Licensed seats over the period: the value at its start, then every change.
    pub licensed_steps: Vec<LicensedStep>,
    /// Most seats in use at once.
    pub peak: u32,
    /// Average seats in use over the period.
    pub average: f64,
    /// Seat-hours used.
    pub seat_hours: f64,
    /// Seat-hours beyond the licensed count.
    pub overdraft_seat_hours: f64,
    /// Most seats beyond the licensed count at once.
    pub overdraft_peak: u32,
    /// Each stretch of overdraft, in time order (adjacent stretches joined).
    pub overdraft_periods: Vec<OverdraftPeriod>,
    /// Hours with every licensed seat in use.
    pub hours_at_full: f64,
    /// Denials by reason code.
    pub denials: BTreeMap<String, u64>,
    /// Distinct users granted seats.
    pub distinct_users: usize,
    /// Distinct hosts granted seats.
    pub distinct_hosts: usize,
    /// Grants.
    pub grants: u64,
    /// Grants whose client reported a virtual machine (the journal's `Session` events).
    pub grants_from_virtual_machines: u64,
    /// Grants whose client reported a remote session.
    pub grants_from_remote_sessions: u64,
}

/// One feature's reconciliation.
#[derive(Debug, Clone, Serialize)]
pub struct FeatureUsage {
    /// The feature.
    pub feature: String,
    /// Over all reports.
    pub total: Stats,
    /// Per report period.
    pub periods: Vec<(u64, Stats)>,
    /// (time, seats in use) after each change, for the chart.
    pub timeline: Vec<(u64, u32)>,
}

/// The whole reconciliation.
#[derive(Debug, Clone, Serialize)]
pub struct Reconciliation {
    /// The bundles reconciled against, comma-separated.
    pub bundle: String,
    /// The bundles reconciled against.
    pub bundles: Vec<String>,
    /// The customer.
    pub customer: String,
    /// Reports covered.
    pub reports: Vec<u64>,
    /// Who signed which reports, when more than one server did (a cluster's members:
    /// each change of signer is a failover); empty, and left out of JSON, for one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub signers: Vec<SignerRun>,
    /// Per feature.
    pub features: Vec<FeatureUsage>,
}

/// Reports in a row of a chain signed by one server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignerRun {
    /// The first report of the run.
    pub first: u64,
    /// The last report of the run.
    pub last: u64,
    /// The signer's short fingerprint ([`short_fingerprint`]).
    pub signer: String,
}

impl std::fmt::Display for SignerRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} signed by {}",
            numbered_span("report", "reports", self.first, self.last),
            self.signer
        )
    }
}

/// The runs of reports of one signer, in chain order, when the chain has more than one
/// signer (a cluster that failed over); empty when one server signed it all.
pub fn signer_runs(links: &[ChainLink]) -> Vec<SignerRun> {
    let mut runs: Vec<(u64, u64, PublicKey)> = Vec::new();
    for l in links {
        let r = &l.report.report;
        match runs.last_mut() {
            Some(run) if run.2 == r.server_key => run.1 = r.report_seq,
            _ => runs.push((r.report_seq, r.report_seq, r.server_key)),
        }
    }
    let signers: BTreeSet<PublicKey> = runs.iter().map(|r| r.2).collect();
    if signers.len() < 2 {
        return Vec::new();
    }
    runs.into_iter()
        .map(|(first, last, key)| SignerRun {
            first,
            last,
            signer: short_fingerprint(&key),
        })
        .collect()
}

/// The bundles in force over the reports' span: `(from, Some(bundles))` where the
/// reports say, `(from, None)` where they do not (the given bundles stand in).
struct Licence {
    segments: Vec<(u64, Option<Vec<ServedBundle>>)>,
    fallback: Vec<ServedBundle>,
}

impl Licence {
    fn new(bundles: &[Bundle], links: &[ChainLink]) -> Licence {
        // The given bundles, the superseded ones dropped: what served when nothing says.
        let fallback: Vec<ServedBundle> = bundles
            .iter()
            .filter(|b| !bundles.iter().any(|o| o.supersedes.contains(&b.id)))
            .map(ServedBundle::of)
            .collect();
        let given: BTreeMap<&str, ServedBundle> = bundles
            .iter()
            .map(|b| (b.id.as_str(), ServedBundle::of(b)))
            .collect();
        let mut segments: Vec<(u64, Option<Vec<ServedBundle>>)> = Vec::new();
        let mut push = |t: u64, replay: &BundleReplay| {
            // Times from a customer's report: kept in order even if its clock was not.
            let t = segments.last().map_or(t, |(last, _)| t.max(*last));
            // A bundle named without journaled terms counts with the given bundle's.
            let set = replay.in_force().map(|set| {
                set.iter()
                    .map(
                        |b| match (replay.terms_of(&b.bundle), given.get(b.bundle.as_str())) {
                            (None, Some(g)) => g.clone(),
                            _ => b.clone(),
                        },
                    )
                    .collect()
            });
            segments.push((t, set));
        };
        let mut replay = BundleReplay::new(None);
        for link in links {
            let r = &link.report.report;
            if let Some(start) = &r.bundles_at_start {
                replay = BundleReplay::new(Some(start));
            }
            push(r.period_from.0, &replay);
            for e in &r.events {
                let t = e.at.0.max(r.period_from.0).min(r.period_to.0);
                if replay.apply(&e.event) {
                    push(t, &replay);
                }
            }
        }
        Licence { segments, fallback }
    }

    /// Every feature any bundle licenses.
    fn features(&self) -> BTreeSet<String> {
        self.all_bundles()
            .flat_map(|b| b.terms.iter().map(|t| t.feature.clone()))
            .collect()
    }

    fn all_bundles(&self) -> impl Iterator<Item = &ServedBundle> {
        self.segments
            .iter()
            .filter_map(|(_, s)| s.as_ref())
            .flatten()
            .chain(self.fallback.iter())
    }

    /// Seats of `feature` licensed at `t`, and whether the reports said so.
    fn at(&self, feature: &str, t: u64) -> (Option<u32>, bool) {
        let seg = self
            .segments
            .iter()
            .rposition(|(from, _)| *from <= t)
            .unwrap_or(0);
        self.at_segment(feature, t, seg)
    }

    /// Seats of `feature` licensed at `t` by the bundles of segment `seg` (the set in
    /// force at a position in the event stream: changes in the same second as a grant
    /// count in journal order).
    fn at_segment(&self, feature: &str, t: u64, seg: usize) -> (Option<u32>, bool) {
        let (bundles, said) = match self.segments.get(seg).and_then(|(_, s)| s.as_ref()) {
            Some(b) => (b, true),
            None => (&self.fallback, false),
        };
        let mut seats: Option<u32> = Some(0);
        for term in bundles
            .iter()
            .flat_map(|b| &b.terms)
            .filter(|x| x.feature == feature && x.upgrade_from.is_none())
            .filter(|x| x.active(UnixTime(t)))
        {
            seats = match (seats, term.seats) {
                (Some(a), Seats::Counted(n)) => Some(a.saturating_add(n)),
                _ => None,
            };
        }
        (seats, said)
    }

    /// The step function of `feature` over `[start, end]`.
    fn steps(&self, feature: &str, start: u64, end: u64) -> Vec<LicensedStep> {
        let mut times: BTreeSet<u64> = BTreeSet::from([start]);
        times.extend(self.segments.iter().map(|(t, _)| *t));
        for term in self
            .all_bundles()
            .flat_map(|b| &b.terms)
            .filter(|x| x.feature == feature)
        {
            times.extend(term.starts.map(|t| t.0));
            times.extend(term.expires.map(|t| t.0));
        }
        let mut steps: Vec<LicensedStep> = Vec::new();
        for t in times.range(start..=end) {
            let (seats, said) = self.at(feature, *t);
            let source = if said { "report" } else { "bundles" };
            if steps
                .last()
                .is_some_and(|s| s.seats == seats && s.source == source)
            {
                continue;
            }
            steps.push(LicensedStep {
                from_unix: *t,
                from: UnixTime(*t).to_string(),
                seats,
                source: source.into(),
            });
        }
        steps
    }
}

/// The licensed seats of `steps` at `t`.
fn licensed_at(steps: &[LicensedStep], t: u64) -> Option<u32> {
    steps
        .iter()
        .rev()
        .find(|s| s.from_unix <= t)
        .or(steps.first())
        .map_or(Some(0), |s| s.seats)
}

/// The steps that describe `[from, to]`: the one in force at `from`, then the changes.
fn steps_within(steps: &[LicensedStep], from: u64, to: u64) -> Vec<LicensedStep> {
    let first = steps.iter().rposition(|s| s.from_unix <= from).unwrap_or(0);
    steps[first..]
        .iter()
        .filter(|s| s.from_unix <= to)
        .cloned()
        .collect()
}

/// Accumulates one feature's figures over a period.
#[derive(Default)]
struct Acc {
    in_use: u32,
    last: u64,
    stats: Stats,
    seat_seconds: u128,
    over_seconds: u128,
    full_seconds: u128,
    /// Overdraft stretches: (start, end, most seats over, seat-seconds over).
    over: Vec<(u64, u64, u32, u128)>,
    users: BTreeSet<String>,
    hosts: BTreeSet<String>,
}

impl Acc {
    /// Integrates up to `t`, piece by piece where the licensed seats change.
    fn advance(&mut self, t: u64, steps: &[LicensedStep]) {
        while self.last < t {
            let next = steps
                .iter()
                .map(|s| s.from_unix)
                .find(|&f| f > self.last)
                .map_or(t, |f| f.min(t));
            let licensed = licensed_at(steps, self.last);
            self.advance_flat(next, licensed);
        }
    }

    fn advance_flat(&mut self, t: u64, licensed: Option<u32>) {
        let dt = t.saturating_sub(self.last) as u128;
        self.seat_seconds += self.in_use as u128 * dt;
        if let Some(l) = licensed {
            let over = self.in_use.saturating_sub(l);
            self.over_seconds += over as u128 * dt;
            if over > 0 && dt > 0 {
                match self.over.last_mut() {
                    Some(last) if last.1 == self.last => {
                        last.1 = t;
                        last.2 = last.2.max(over);
                        last.3 += over as u128 * dt;
                    }
                    _ => self.over.push((self.last, t, over, over as u128 * dt)),
                }
            }
            if l > 0 && self.in_use >= l {
                self.full_seconds += dt;
            }
            // Seats held while the licence shrinks under them are overdraft too.
            if dt > 0 {
                self.stats.overdraft_peak =
                    self.stats.overdraft_peak.max(self.in_use.saturating_sub(l));
            }
        }
        self.last = self.last.max(t);
    }

    fn set(&mut self, in_use: u32, licensed: Option<u32>) {
        self.in_use = in_use;
        self.stats.peak = self.stats.peak.max(in_use);
        if let Some(l) = licensed {
            self.stats.overdraft_peak = self.stats.overdraft_peak.max(in_use.saturating_sub(l));
        }
    }

    fn finish(mut self, from: u64, to: u64, steps: &[LicensedStep]) -> Stats {
        self.advance(to, steps);
        let secs = to.saturating_sub(from).max(1) as f64;
        self.stats.from = UnixTime(from).to_string();
        self.stats.to = UnixTime(to).to_string();
        self.stats.licensed = licensed_at(steps, to);
        self.stats.licensed_steps = steps_within(steps, from, to);
        self.stats.seat_hours = self.seat_seconds as f64 / 3600.0;
        self.stats.average = self.seat_seconds as f64 / secs;
        self.stats.overdraft_seat_hours = self.over_seconds as f64 / 3600.0;
        self.stats.hours_at_full = self.full_seconds as f64 / 3600.0;
        self.stats.overdraft_periods = self
            .over
            .iter()
            .map(|&(start, end, seats, secs)| OverdraftPeriod {
                start_unix: start,
                start: UnixTime(start).to_string(),
                end_unix: end,
                end: UnixTime(end).to_string(),
                seats,
                seat_hours: secs as f64 / 3600.0,
            })
            .collect();
        self.stats.distinct_users = self.users.len();
        self.stats.distinct_hosts = self.hosts.len();
        self.stats
    }
}

/// Reconciles a verified chain against `bundle`.
pub fn reconcile(bundle: &Bundle, links: &[ChainLink]) -> Reconciliation {
    reconcile_all(std::slice::from_ref(bundle), links)
}

/// Reconciles a verified chain against all of a customer's bundles (those bound to the
/// chain's site: its server, or its cluster's members, see [`site_keys`]; the reports'
/// bundle history says which counted when).
pub fn reconcile_all(bundles: &[Bundle], links: &[ChainLink]) -> Reconciliation {
    let site = links
        .first()
        .map(|l| site_keys(bundles, &l.report.report.server_key));
    let ours: Vec<Bundle> = bundles
        .iter()
        .filter(|b| match &site {
            Some(keys) if !b.binding.is_empty() => {
                b.binding.iter().any(|x| keys.contains(&x.server_key))
            }
            _ => true,
        })
        .cloned()
        .collect();
    let licence = Licence::new(&ours, links);
    // Rows: what was licensed at any time, and what was granted. A denial of any other
    // name (a typo, or a client making names up by the thousand) counts in one
    // `(unlicensed)` row, so made-up names never become rows of their own.
    let mut features: BTreeSet<String> = licence.features();
    for l in links {
        for e in &l.report.report.events {
            if let UsageEvent::Granted { feature, .. } = &e.event {
                features.insert(feature.clone());
            }
        }
    }
    let known = features.clone();
    let unlicensed = |f: &str| !known.contains(f);
    if links.iter().any(|l| {
        l.report
            .report
            .events
            .iter()
            .any(|e| matches!(&e.event, UsageEvent::Denied { feature, .. } if unlicensed(feature)))
    }) {
        features.insert(UNLICENSED_FEATURE.to_string());
    }
    let mut out = Vec::new();
    for feature in features {
        let mut in_use: u32 = 0;
        let mut open: BTreeMap<u64, u32> = BTreeMap::new();
        let mut timeline = Vec::new();
        let (Some(first), Some(last)) = (links.first(), links.last()) else {
            continue;
        };
        let start = first.report.report.period_from.0;
        let end = last.report.report.period_to.0.max(start);
        let steps = licence.steps(&feature, start, end);
        for o in first
            .report
            .report
            .open_at_start
            .iter()
            .filter(|o| o.feature == feature)
        {
            open.insert(o.lease.0, o.count);
            in_use = in_use.saturating_add(o.count);
        }
        timeline.push((start, in_use));
        let mut total = Acc {
            last: start,
            ..Acc::default()
        };
        total.set(in_use, licensed_at(&steps, start));
        let mut periods = Vec::new();
        // The segment of `licence` in force at this position of the event stream: one
        // starts with each report and with each change event, as `Licence::new` made them.
        let mut seg: usize = 0;
        for (i, link) in links.iter().enumerate() {
            let r = &link.report.report;
            let mut acc = Acc {
                last: r.period_from.0,
                ..Acc::default()
            };
            if i > 0 {
                seg += 1;
            }
            acc.set(in_use, licensed_at(&steps, r.period_from.0));
            for e in &r.events {
                // Not `clamp`, which panics if the period ends before it starts.
                let t = e.at.0.max(r.period_from.0).min(r.period_to.0);
                if matches!(
                    e.event,
                    UsageEvent::DaemonStarted { .. } | UsageEvent::BundlesInForce { .. }
                ) {
                    seg += 1;
                }
                match &e.event {
                    UsageEvent::Granted {
                        lease,
                        feature: f,
                        count,
                        user,
                        host,
                        ..
                    } if *f == feature => {
                        for a in [&mut acc, &mut total] {
                            a.advance(t, &steps);
                            // A seat set of a licensing model (empty user) is seats,
                            // not a checkout.
                            if !user.is_empty() {
                                a.stats.grants += 1;
                                a.users.insert(user.clone());
                                a.hosts.insert(host.clone());
                            }
                        }
                        open.insert(lease.0, *count);
                        // Counts come from the report: saturate, never wrap or panic.
                        in_use = in_use.saturating_add(*count);
                    }
                    UsageEvent::Released {
                        lease, feature: f, ..
                    } if *f == feature => {
                        let Some(count) = open.remove(&lease.0) else {
                            continue;
                        };
                        acc.advance(t, &steps);
                        total.advance(t, &steps);
                        in_use = in_use.saturating_sub(count);
                    }
                    // Follows its lease's grant, so the lease is open if it is ours.
                    UsageEvent::Session {
                        lease,
                        virtual_machine,
                        remote,
                    } if open.contains_key(&lease.0) => {
                        for a in [&mut acc, &mut total] {
                            a.stats.grants_from_virtual_machines +=
                                u64::from(virtual_machine.is_some());
                            a.stats.grants_from_remote_sessions += u64::from(remote.is_some());
                        }
                        continue;
                    }
                    UsageEvent::Denied {
                        feature: f, reason, ..
                    } if *f == feature || (feature == UNLICENSED_FEATURE && unlicensed(f)) => {
                        for a in [&mut acc, &mut total] {
                            *a.stats.denials.entry(reason.clone()).or_default() += 1;
                        }
                        continue;
                    }
                    _ => continue,
                }
                let licensed = licence.at_segment(&feature, t, seg).0;
                acc.set(in_use, licensed);
                total.set(in_use, licensed);
                if timeline.last().map(|(pt, _)| *pt) == Some(t) {
                    timeline.pop();
                }
                timeline.push((t, in_use));
            }
            let mut stats = acc.finish(r.period_from.0, r.period_to.0, &steps);
            // What was licensed when the report was made, in journal order.
            stats.licensed = licence.at_segment(&feature, r.period_to.0, seg).0;
            periods.push((r.report_seq, stats));
        }
        timeline.push((end, in_use));
        out.push(FeatureUsage {
            feature,
            total: total.finish(start, end, &steps),
            periods,
            timeline,
        });
    }
    let ids: Vec<String> = ours.iter().map(|b| b.id.clone()).collect();
    let customers: Vec<String> = ours.iter().fold(Vec::new(), |mut acc, b| {
        let c = format!("{} ({})", b.customer.name, b.customer.id);
        if !acc.contains(&c) {
            acc.push(c);
        }
        acc
    });
    Reconciliation {
        bundle: ids.join(", "),
        bundles: ids,
        customer: customers.join(", "),
        reports: links.iter().map(|l| l.report.report.report_seq).collect(),
        signers: signer_runs(links),
        features: out,
    }
}

/// One row of the summary over many customers: one feature of one customer's server,
/// over all of that server's reports.
#[derive(Debug, Clone, Serialize)]
pub struct SummaryRow {
    /// The customer's name (from the bundles bound to the server).
    pub customer: String,
    /// The customer's id.
    pub customer_id: String,
    /// The fingerprint of the server key that signed the reports; for a cluster, of each
    /// member that signed some, separated by blanks, in the order they first signed.
    pub server: String,
    /// The feature.
    pub feature: String,
    /// Start of the first report.
    pub from: String,
    /// End of the last report.
    pub to: String,
    /// Seats licensed at the end (`None`: uncounted).
    pub licensed: Option<u32>,
    /// Most seats in use at once.
    pub peak: u32,
    /// Seat-hours used.
    pub seat_hours: f64,
    /// Seat-hours beyond the licensed count.
    pub overdraft_seat_hours: f64,
    /// Most seats beyond the licensed count at once.
    pub overdraft_peak: u32,
    /// Denials, all reasons.
    pub denials: u64,
    /// Reports the row covers.
    pub reports: usize,
    /// Grants whose client reported a virtual machine.
    pub grants_from_virtual_machines: u64,
    /// Grants whose client reported a remote session.
    pub grants_from_remote_sessions: u64,
}

/// The reconciliation of many customers' reports: one summary table, and each chain's
/// full reconciliation.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// One row per customer server and feature, sorted by customer id, server, feature.
    pub rows: Vec<SummaryRow>,
    /// Each report chain's reconciliation, in the order of the rows.
    pub reconciliations: Vec<Reconciliation>,
}

/// Reconciles reports of many customers at once: the reports are grouped by site (the
/// server that signed them, or the members of one cluster, whose reports form one
/// chain whichever member signed each; see [`site_keys`]), each chain put in report
/// order, verified against the bundles of its site, and reconciled. An identical copy
/// of a report (same signed body) counts once. Every problem names its file; one
/// problem anywhere fails the whole summary, so no customer is billed from a partial
/// chain.
pub fn reconcile_many(bundles: &[Bundle], files: Vec<ReportFile>) -> Result<Summary, Vec<String>> {
    let mut problems = Vec::new();
    // Signer -> the site's name: the smallest fingerprint of its keys (a key no bundle
    // binds names a site of its own).
    let mut site_of: BTreeMap<PublicKey, String> = BTreeMap::new();
    // Site -> its server keys.
    let mut members: BTreeMap<String, BTreeSet<PublicKey>> = BTreeMap::new();
    // Site -> (report number, digest, file).
    let mut chains: BTreeMap<String, Vec<(u64, [u8; 32], ReportFile)>> = BTreeMap::new();
    for f in files {
        match report::read(&f.text) {
            Ok(v) => {
                let key = v.report.server_key;
                let site = site_of
                    .entry(key)
                    .or_insert_with(|| {
                        let keys = site_keys(bundles, &key);
                        let name = keys
                            .iter()
                            .map(|k| k.fingerprint())
                            .min()
                            .unwrap_or_else(|| key.fingerprint());
                        members.insert(name.clone(), keys);
                        name
                    })
                    .clone();
                let chain = chains.entry(site).or_default();
                if !chain.iter().any(|(_, d, _)| *d == v.digest) {
                    chain.push((v.report.report_seq, v.digest, f));
                }
            }
            Err(e) => problems.push(format!("{}: refused: {e}", f.name)),
        }
    }
    let mut done: Vec<(String, String, Reconciliation)> = Vec::new();
    for (site, mut chain) in chains {
        chain.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.2.name.cmp(&b.2.name)));
        let files: Vec<ReportFile> = chain.into_iter().map(|(_, _, f)| f).collect();
        let keys = members.get(&site).cloned().unwrap_or_default();
        let ours: Vec<Bundle> = bundles
            .iter()
            .filter(|b| b.binding.iter().any(|x| keys.contains(&x.server_key)))
            .cloned()
            .collect();
        let Some(first) = ours.first() else {
            problems.push(format!(
                "{}{}: signed by server key {site}, which none of the given bundles binds (give that customer's bundles)",
                files[0].name,
                match files.len() {
                    1 => String::new(),
                    n => format!(" and {} other report(s) of that server", n - 1),
                }
            ));
            continue;
        };
        let customer = (first.customer.id.clone(), first.customer.name.clone());
        match verify_site_chain(&ours, &files) {
            Ok(links) => {
                // The signers, in the order they first signed: one for a single server.
                let mut signers: Vec<String> = Vec::new();
                for l in &links {
                    let f = l.report.report.server_key.fingerprint();
                    if !signers.contains(&f) {
                        signers.push(f);
                    }
                }
                done.push((customer.0, signers.join(" "), reconcile_all(&ours, &links)))
            }
            Err(p) => problems.extend(p),
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    done.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let mut rows = Vec::new();
    for (customer_id, server, r) in &done {
        let name = bundles
            .iter()
            .find(|b| b.customer.id == *customer_id)
            .map(|b| b.customer.name.clone())
            .unwrap_or_default();
        for f in &r.features {
            let t = &f.total;
            rows.push(SummaryRow {
                customer: name.clone(),
                customer_id: customer_id.clone(),
                server: server.clone(),
                feature: f.feature.clone(),
                from: t.from.clone(),
                to: t.to.clone(),
                licensed: t.licensed,
                peak: t.peak,
                seat_hours: t.seat_hours,
                overdraft_seat_hours: t.overdraft_seat_hours,
                overdraft_peak: t.overdraft_peak,
                denials: t.denials.values().sum(),
                reports: r.reports.len(),
                grants_from_virtual_machines: t.grants_from_virtual_machines,
                grants_from_remote_sessions: t.grants_from_remote_sessions,
            });
        }
    }
    Ok(Summary {
        rows,
        reconciliations: done.into_iter().map(|(_, _, r)| r).collect(),
    })
}

/// The summary as CSV: one row per customer server and feature.
pub fn summary_csv(s: &Summary) -> String {
    // The grants from virtual machines and remote sessions are the last columns, zeros
    // where none came from either: one layout for billing tools.
    let mut out = String::from(
        "customer,customer_id,server,feature,from,to,licensed,peak,seat_hours,overdraft_seat_hours,overdraft_peak,denials,reports,grants_from_virtual_machines,grants_from_remote_sessions\n",
    );
    for r in &s.rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{:.4},{:.4},{},{},{},{},{}",
            csv_field(&r.customer),
            csv_field(&r.customer_id),
            csv_field(&r.server),
            csv_field(&r.feature),
            r.from,
            r.to,
            r.licensed
                .map(|l| l.to_string())
                .unwrap_or_else(|| "uncounted".into()),
            r.peak,
            r.seat_hours,
            r.overdraft_seat_hours,
            r.overdraft_peak,
            r.denials,
            r.reports,
            r.grants_from_virtual_machines,
            r.grants_from_remote_sessions
        );
    }
    out
}

/// The summary as one self-contained HTML page: the summary table, then each
/// customer's reconciliation with its charts.
pub fn summary_html(s: &Summary) -> String {
    let mut body = String::new();
    let customers: BTreeSet<&str> = s.rows.iter().map(|r| r.customer_id.as_str()).collect();
    let _ = write!(
        body,
        "<h1>Usage summary</h1><p>{} customer(s) &#183; {} server(s)</p>\
<table class=\"summary\"><thead><tr><th>customer</th><th>customer id</th><th>server</th><th>feature</th><th>from</th><th>to</th>\
<th>licensed (seats)</th><th>peak (seats)</th><th>seat-hours</th><th>overdraft seat-hours</th><th>overdraft peak (seats)</th><th>denials</th><th>reports</th>\
<th>grants from VMs</th><th>grants from remote sessions</th></tr></thead><tbody>",
        customers.len(),
        s.reconciliations.len()
    );
    for r in &s.rows {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            html_escape(&r.customer),
            html_escape(&r.customer_id),
            html_escape(&r.server),
            html_escape(&r.feature),
            r.from,
            r.to,
            r.licensed.map(|l| l.to_string()).unwrap_or_else(|| "uncounted".into()),
            r.peak,
            r.seat_hours,
            r.overdraft_seat_hours,
            r.overdraft_peak,
            r.denials,
            r.reports,
            r.grants_from_virtual_machines,
            r.grants_from_remote_sessions
        );
    }
    body.push_str("</tbody></table>");
    for r in &s.reconciliations {
        body.push_str(&reconciliation_body(r, "h2", "h3"));
    }
    page("tally usage summary", &body)
}

/// CSV: one row per feature and period, then one total row per feature. When more than
/// one server signed the chain (a cluster), a last column names each report's signer.
pub fn to_csv(r: &Reconciliation) -> String {
    let mut out = String::from(
        "feature,report,from,to,licensed,peak,average,seat_hours,overdraft_seat_hours,overdraft_peak,hours_at_full,grants,denials,distinct_users,distinct_hosts,grants_from_virtual_machines,grants_from_remote_sessions",
    );
    let signed = !r.signers.is_empty();
    out.push_str(if signed { ",signer\n" } else { "\n" });
    let signer_of = |label: &str| -> &str {
        label
            .parse::<u64>()
            .ok()
            .and_then(|n| r.signers.iter().find(|x| x.first <= n && n <= x.last))
            .map_or("", |x| x.signer.as_str())
    };
    for f in &r.features {
        let rows = f
            .periods
            .iter()
            .map(|(seq, s)| (seq.to_string(), s))
            .chain(std::iter::once(("total".to_string(), &f.total)));
        for (label, s) in rows {
            let _ = write!(
                out,
                "{},{},{},{},{},{},{:.4},{:.4},{:.4},{},{:.4},{},{},{},{},{},{}",
                csv_field(&f.feature),
                label,
                s.from,
                s.to,
                s.licensed
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "uncounted".into()),
                s.peak,
                s.average,
                s.seat_hours,
                s.overdraft_seat_hours,
                s.overdraft_peak,
                s.hours_at_full,
                s.grants,
                s.denials.values().sum::<u64>(),
                s.distinct_users,
                s.distinct_hosts,
                s.grants_from_virtual_machines,
                s.grants_from_remote_sessions
            );
            if signed {
                out.push(',');
                out.push_str(signer_of(&label));
            }
            out.push('\n');
        }
    }
    out
}

/// One CSV field: quoted when it holds a separator, a quote or a line break (RFC 4180),
/// and kept from being read as a formula by a spreadsheet. Feature names come from
/// reports a customer's server signs, so they are not trusted to be plain.
///
/// Spreadsheets split cells on more than commas (`;`, tab, `|`, whatever the locale or
/// the import dialog says) and trim blanks, so a formula can start after any of those,
/// not only at the start of the field: a field with a formula character (`=`, `+`, `-`,
/// `@`) at its start or after a separator or blank is prefixed with `'` and quoted.
/// Control characters are written as `\u{..}` escapes.
fn csv_field(s: &str) -> String {
    let mut after_separator = true;
    let risky = s.chars().any(|c| {
        let formula = after_separator && matches!(c, '=' | '+' | '-' | '@');
        after_separator = matches!(c, ';' | ',' | '|' | '\t') || c.is_whitespace();
        formula
    });
    let s = tally_protocol::wire::escape_unprintable(s);
    if risky {
        format!("\"'{}\"", s.replace('"', "\"\""))
    } else if s.contains([',', '"', ';', '|', '\t', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.into_owned()
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A step for an axis with at most `max_ticks` intervals: 1, 2 or 5 times a power of ten.
fn seat_step(top: u32, max_ticks: u32) -> u32 {
    let mut base: u32 = 1;
    loop {
        for m in [1u32, 2, 5] {
            let step = base.saturating_mul(m);
            if top.div_ceil(step) <= max_ticks || step == u32::MAX {
                return step;
            }
        }
        base = base.saturating_mul(10);
    }
}

/// A step for the time axis with at most about six intervals over `span` seconds, on
/// whole seconds, minutes, hours, days or weeks (UTC).
fn time_step(span: u64) -> u64 {
    const STEPS: [u64; 22] = [
        1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86_400,
        172_800, 604_800, 1_209_600, 2_592_000,
    ];
    STEPS
        .iter()
        .copied()
        .find(|s| span / s <= 6)
        .unwrap_or_else(|| span.div_ceil(6).div_ceil(86_400).saturating_mul(86_400))
}

/// The label of a time tick: the date for steps of a day or more, else the time of day
/// (with seconds for steps under a minute) under the date where the date changes.
fn time_label(t: u64, step: u64, with_date: bool) -> (String, Option<String>) {
    let time = UnixTime(t);
    if step >= 86_400 {
        return (time.date(), None);
    }
    let secs = t % 86_400;
    let clock = if step < 60 {
        format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
    } else {
        format!("{:02}:{:02}", secs / 3600, secs / 60 % 60)
    };
    (clock, with_date.then(|| time.date()))
}

/// An inline SVG step chart of seats in use, with the licensed seats as a dashed step
/// line from the bundle history, a y-axis in seats with ticks, a time axis with date
/// and time ticks (UTC), overdraft stretches shaded, and a legend.
fn chart(f: &FeatureUsage) -> String {
    let (w, h) = (760.0f64, 280.0f64);
    let (left, right, top_pad, bottom) = (56.0f64, 32.0f64, 28.0f64, 56.0f64);
    let (Some(&(t0, _)), Some(&(t1, _))) = (f.timeline.first(), f.timeline.last()) else {
        return String::new();
    };
    let span = t1.saturating_sub(t0).max(1);
    let steps = &f.total.licensed_steps;
    let lic = steps.iter().filter_map(|s| s.seats).max().unwrap_or(0);
    let highest = f.total.peak.max(lic).max(1);
    let ystep = seat_step(highest, 5);
    let ytop = highest.div_ceil(ystep).saturating_mul(ystep);
    let x = |t: u64| left + t.saturating_sub(t0) as f64 / span as f64 * (w - left - right);
    let y = |v: u32| h - bottom - v as f64 / ytop as f64 * (h - bottom - top_pad);
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {w} {h}\" width=\"100%\" role=\"img\" aria-label=\"seats in use and licensed of {}\" xmlns=\"http://www.w3.org/2000/svg\">",
        html_escape(&f.feature)
    );
    // Overdraft stretches, shaded behind the lines.
    for p in &f.total.overdraft_periods {
        let _ = write!(
            svg,
            "<rect class=\"overdraft\" x=\"{:.1}\" y=\"{top_pad}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#fdd\"><title>overdraft {} to {}: {} seat(s) over</title></rect>",
            x(p.start_unix),
            (x(p.end_unix) - x(p.start_unix)).max(1.0),
            h - bottom - top_pad,
            p.start,
            p.end,
            p.seats
        );
    }
    // The y-axis: seats, with a tick and a grid line per step.
    svg.push_str("<g class=\"y-axis\">");
    let _ = write!(
        svg,
        "<line x1=\"{left}\" y1=\"{top_pad}\" x2=\"{left}\" y2=\"{}\" stroke=\"#333\"/>",
        h - bottom
    );
    let mut v = 0u32;
    loop {
        let _ = write!(
            svg,
            "<line class=\"grid\" data-seats=\"{v}\" x1=\"{left}\" y1=\"{yv:.1}\" x2=\"{:.1}\" y2=\"{yv:.1}\" stroke=\"#e4e4e4\"/><line class=\"tick\" x1=\"{:.1}\" y1=\"{yv:.1}\" x2=\"{left}\" y2=\"{yv:.1}\" stroke=\"#333\"/><text class=\"tick-label\" data-seats=\"{v}\" x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{v}</text>",
            w - right,
            left - 5.0,
            left - 8.0,
            y(v) + 4.0,
            yv = y(v),
        );
        if v >= ytop {
            break;
        }
        v = v.saturating_add(ystep);
    }
    let _ = write!(
        svg,
        "<text class=\"axis-title\" x=\"14\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\" transform=\"rotate(-90 14 {:.1})\">seats</text></g>",
        (h - bottom + top_pad) / 2.0,
        (h - bottom + top_pad) / 2.0
    );
    // The time axis: ticks on whole steps of UTC time.
    let tstep = time_step(span);
    svg.push_str("<g class=\"x-axis\">");
    let _ = write!(
        svg,
        "<line x1=\"{left}\" y1=\"{yb}\" x2=\"{:.1}\" y2=\"{yb}\" stroke=\"#333\"/>",
        w - right,
        yb = h - bottom
    );
    let mut t = t0.div_ceil(tstep).saturating_mul(tstep);
    let mut last_date = String::new();
    while t <= t1 {
        let date = UnixTime(t).date();
        let (label, under) = time_label(t, tstep, date != last_date);
        last_date = date;
        let xt = x(t);
        let _ = write!(
            svg,
            "<line class=\"tick\" x1=\"{xt:.1}\" y1=\"{yb}\" x2=\"{xt:.1}\" y2=\"{:.1}\" stroke=\"#333\"/><text class=\"tick-label\" data-unix=\"{t}\" x=\"{xt:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{label}</text>",
            h - bottom + 5.0,
            h - bottom + 17.0,
            yb = h - bottom
        );
        if let Some(d) = under {
            let _ = write!(
                svg,
                "<text class=\"tick-date\" x=\"{xt:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\" fill=\"#555\">{d}</text>",
                h - bottom + 30.0
            );
        }
        match t.checked_add(tstep) {
            Some(next) => t = next,
            None => break,
        }
    }
    let _ = write!(
        svg,
        "<text class=\"axis-title\" x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\">time (UTC), {} to {}</text></g>",
        left + (w - left - right) / 2.0,
        h - 6.0,
        UnixTime(t0),
        UnixTime(t1)
    );
    if lic > 0 {
        // The licensed seats as a dashed step line (uncounted stretches are left out).
        let mut line = String::new();
        let mut prev: Option<u32> = None;
        for (i, s) in steps.iter().enumerate() {
            let until = steps.get(i + 1).map_or(t1, |n| n.from_unix).min(t1);
            match s.seats {
                Some(v) => {
                    let verb = if prev.is_some() { 'L' } else { 'M' };
                    let _ = write!(
                        line,
                        "{verb}{:.1},{:.1} L{:.1},{:.1} ",
                        x(s.from_unix.max(t0)),
                        y(v),
                        x(until),
                        y(v)
                    );
                    prev = Some(v);
                }
                None => prev = None,
            }
        }
        let _ = write!(
            svg,
            "<path class=\"licensed\" d=\"{}\" fill=\"none\" stroke=\"#c00\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"/>",
            line.trim_end()
        );
    }
    let mut path = String::new();
    let mut prev: Option<u32> = None;
    for &(t, v) in &f.timeline {
        match prev {
            None => {
                let _ = write!(path, "M{:.1},{:.1}", x(t), y(v));
            }
            Some(p) => {
                let _ = write!(path, " L{:.1},{:.1} L{:.1},{:.1}", x(t), y(p), x(t), y(v));
            }
        }
        prev = Some(v);
    }
    let _ = write!(
        svg,
        "<path class=\"in-use\" d=\"{path}\" fill=\"none\" stroke=\"#1f5fbf\" stroke-width=\"2\"/>\
<g class=\"legend\" font-size=\"11\"><line x1=\"{left}\" y1=\"12\" x2=\"{:.1}\" y2=\"12\" stroke=\"#1f5fbf\" stroke-width=\"2\"/><text x=\"{:.1}\" y=\"16\">seats in use</text>\
<line x1=\"{:.1}\" y1=\"12\" x2=\"{:.1}\" y2=\"12\" stroke=\"#c00\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"/><text x=\"{:.1}\" y=\"16\">seats licensed</text>\
<rect x=\"{:.1}\" y=\"6\" width=\"18\" height=\"10\" fill=\"#fdd\"/><text x=\"{:.1}\" y=\"16\">overdraft</text></g></svg>",
        left + 24.0,
        left + 28.0,
        left + 120.0,
        left + 144.0,
        left + 148.0,
        left + 250.0,
        left + 272.0,
    );
    svg
}

/// A self-contained HTML page (inline CSS and SVG, no network) that prints well; the
/// markup is also well-formed XML, so tools can read it.
fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/><title>{}</title><style>\
body{{font-family:system-ui,sans-serif;margin:2em;color:#111}}table{{border-collapse:collapse;margin:.5em 0 1.5em}}\
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}th:first-child,td:first-child{{text-align:left}}\
table.summary td:nth-child(-n+6),table.summary th:nth-child(-n+6){{text-align:left}}\
section{{page-break-inside:avoid;margin-bottom:2em}}@media print{{body{{margin:0}}}}</style></head><body>{body}</body></html>\n",
        html_escape(title)
    )
}

/// One reconciliation as HTML: a heading, then per feature (sorted by name) the chart,
/// the licensed seats over time, the overdraft stretches and the figures per period.
fn reconciliation_body(r: &Reconciliation, h_top: &str, h_feature: &str) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<{h_top}>Usage reconciliation: {}</{h_top}><p>Customer {} &#183; bundles {} &#183; reports {}</p>",
        html_escape(&r.customer),
        html_escape(&r.customer),
        html_escape(&r.bundle),
        r.reports.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
    );
    if !r.signers.is_empty() {
        let runs: Vec<String> = r
            .signers
            .iter()
            .map(|x| html_escape(&x.to_string()))
            .collect();
        let _ = write!(
            out,
            "<p class=\"signers\">Signed by the servers of one cluster (each change of signer is a failover): {}</p>",
            runs.join("; ")
        );
    }
    let mut features: Vec<&FeatureUsage> = r.features.iter().collect();
    features.sort_by(|a, b| a.feature.cmp(&b.feature));
    for f in features {
        let _ = write!(
            out,
            "<section class=\"feature\" data-feature=\"{}\"><{h_feature}>{}</{h_feature}>{}",
            html_escape(&f.feature),
            html_escape(&f.feature),
            chart(f)
        );
        out.push_str("<table class=\"licensed\"><caption>Seats licensed</caption><thead><tr><th>from</th><th>seats</th><th>source</th></tr></thead><tbody>");
        for s in &f.total.licensed_steps {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                s.from,
                s.seats
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "uncounted".into()),
                html_escape(&s.source)
            );
        }
        out.push_str("</tbody></table>");
        out.push_str("<table class=\"overdraft\"><caption>Overdraft periods</caption><thead><tr><th>start</th><th>end</th><th>seats over licence (most)</th><th>overdraft seat-hours</th></tr></thead><tbody>");
        if f.total.overdraft_periods.is_empty() {
            out.push_str("<tr><td colspan=\"4\">none</td></tr>");
        }
        for p in &f.total.overdraft_periods {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.4}</td></tr>",
                p.start, p.end, p.seats, p.seat_hours
            );
        }
        out.push_str("</tbody></table>");
        out.push_str("<table class=\"periods\"><caption>By report period</caption><thead><tr><th>period</th><th>licensed (seats)</th><th>peak (seats)</th><th>average (seats)</th><th>seat-hours</th><th>overdraft seat-hours</th><th>overdraft peak (seats)</th><th>hours at 100%</th><th>denials</th><th>users</th><th>hosts</th><th>grants from VMs</th><th>grants from remote sessions</th></tr></thead><tbody>");
        let rows = f
            .periods
            .iter()
            .map(|(seq, s)| (format!("report {seq}"), s))
            .chain(std::iter::once(("total".to_string(), &f.total)));
        for (label, s) in rows {
            let denials: Vec<String> = s.denials.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let _ = write!(
                out,
                "<tr><td>{label}<br/><small>{} to {}</small></td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td><td>{:.2}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                s.from,
                s.to,
                s.licensed.map(|l| l.to_string()).unwrap_or_else(|| "uncounted".into()),
                s.peak,
                s.average,
                s.seat_hours,
                s.overdraft_seat_hours,
                s.overdraft_peak,
                s.hours_at_full,
                html_escape(&denials.join(", ")),
                s.distinct_users,
                s.distinct_hosts,
                s.grants_from_virtual_machines,
                s.grants_from_remote_sessions
            );
        }
        out.push_str("</tbody></table></section>");
    }
    out
}

/// A self-contained HTML page (inline CSS and SVG, no network) that prints well.
pub fn to_html(r: &Reconciliation) -> String {
    page(
        &format!("tally usage: {}", r.customer),
        &reconciliation_body(r, "h1", "h2"),
    )
}

#[cfg(test)]
mod csv_tests {
    use super::csv_field;

    #[test]
    fn csv_fields_are_quoted_and_never_formulas() {
        assert_eq!(csv_field("solver"), "solver");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(1)"), "\"'=HYPERLINK(1)\"");
        assert_eq!(csv_field("-1,2"), "\"'-1,2\"");
        assert_eq!(csv_field("two\nlines"), "two\\u{a}lines");
    }

    /// Issue 20, scenario 10: a formula after a `;`, tab, `|` or blank became a formula
    /// cell in spreadsheets that split on those.
    #[test]
    fn formulas_after_any_separator_are_defused_and_quoted() {
        for name in [
            "x;=cmd|' /C calc'!A0",
            "x\t=1+1",
            "x|@SUM(A1)",
            " =1+1",
            "a +c",
            "x;-2",
        ] {
            let field = csv_field(name);
            assert!(
                field.starts_with("\"'") && field.ends_with('"'),
                "{name:?} written as {field:?}"
            );
        }
        // Harmless names stay as they are.
        assert_eq!(csv_field("solver-pro"), "solver-pro");
        assert_eq!(csv_field("a=b"), "a=b");
        assert_eq!(csv_field("cfd 2026"), "cfd 2026");
    }
}

#[cfg(test)]
mod licence_tests {
    use super::*;
    use tally_protocol::bundle::{Customer, FeatureGrant};
    use tally_protocol::keys::SecretKey;
    use tally_protocol::lease::LeaseId;
    use tally_protocol::report::{JournalEntry, Report};

    fn bundle(id: &str, supersedes: &[&str], seats: u32, expires: Option<u64>) -> Bundle {
        let mut solver = FeatureGrant::counted("solver", seats);
        solver.expires = expires.map(UnixTime);
        Bundle {
            id: id.into(),
            issued_at: UnixTime(0),
            vendor: "Acme".into(),
            customer: Customer {
                id: "C-1".into(),
                name: "Example".into(),
            },
            binding: vec![],
            supersedes: supersedes.iter().map(|s| s.to_string()).collect(),
            valid_from: None,
            valid_until: None,
            features: vec![solver],
        }
    }

    fn link(events: Vec<UsageEvent>, at_start: Option<Vec<ServedBundle>>) -> ChainLink {
        let key = SecretKey::from_seed([3; 32]);
        let events: Vec<JournalEntry> = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| JournalEntry {
                seq: i as u64 + 1,
                at: UnixTime(match &event {
                    UsageEvent::Granted { .. } => 110,
                    UsageEvent::Released { .. } => 170,
                    _ => 120,
                }),
                event,
            })
            .collect();
        let r = Report {
            report_seq: 1,
            server_key: key.public(),
            host_fingerprint: "h".into(),
            customers: vec![],
            bundle_ids: vec![],
            period_from: UnixTime(100),
            period_to: UnixTime(200),
            first_event: 1,
            last_event: events.len() as u64,
            previous_digest: [0; 32],
            open_at_start: vec![],
            events,
            summaries: vec![],
            bundles_at_start: at_start,
        };
        let (text, _) = report::sign(&r, &key);
        ChainLink {
            name: "1".into(),
            report: report::read(&text).unwrap(),
        }
    }

    fn usage() -> Vec<UsageEvent> {
        vec![
            UsageEvent::Granted {
                lease: LeaseId(1),
                feature: "solver".into(),
                count: 4,
                overdraft: false,
                user: "ana".into(),
                host: "ws".into(),
                borrowed_until: None,
            },
            UsageEvent::Released {
                lease: LeaseId(1),
                feature: "solver".into(),
                count: 4,
                why: "checkin".into(),
            },
        ]
    }

    fn seats(s: &Stats) -> Vec<(u64, Option<u32>, &str)> {
        s.licensed_steps
            .iter()
            .map(|x| (x.from_unix, x.seats, x.source.as_str()))
            .collect()
    }

    /// Issue 17: a cluster's members are one site, and so are the members of a bundle
    /// that replaced a dead node (it binds the members that stay); another customer's
    /// server, or a key nothing binds, is a site of its own.
    #[test]
    fn a_site_is_every_key_bound_together_also_across_a_replaced_node() {
        use tally_protocol::bundle::Binding;
        let k = |n: u8| SecretKey::from_seed([n; 32]).public();
        let bind = |mut b: Bundle, keys: &[u8]| {
            b.binding = keys
                .iter()
                .map(|n| Binding {
                    server_key: k(*n),
                    host_fingerprint: "h".into(),
                })
                .collect();
            b
        };
        let all = [
            bind(bundle("ha-1", &[], 4, None), &[1, 2, 3]),
            bind(bundle("other", &[], 1, None), &[9]),
            bind(bundle("ha-2", &["ha-1"], 4, None), &[1, 2, 4]),
        ];
        let members = BTreeSet::from([k(1), k(2), k(3), k(4)]);
        for n in [1, 3, 4] {
            assert_eq!(site_keys(&all, &k(n)), members);
        }
        let ids: Vec<String> = site_bundles(&all, &k(3))
            .into_iter()
            .map(|b| b.id)
            .collect();
        assert_eq!(ids, vec!["ha-1", "ha-2"]);
        assert_eq!(site_keys(&all, &k(9)), BTreeSet::from([k(9)]));
        assert_eq!(site_keys(&all, &k(7)), BTreeSet::from([k(7)]));
        assert!(site_bundles(&all, &k(7)).is_empty());
    }

    /// Issue 20, scenario 4: denials of made-up names were one reconciliation row each.
    #[test]
    fn denials_of_unlicensed_names_share_one_row() {
        let mut events = usage();
        for i in 0..100 {
            events.push(UsageEvent::Denied {
                feature: format!("junk-{i}"),
                reason: "not_licensed".into(),
                user: "mallory".into(),
                host: "ws".into(),
            });
        }
        events.push(UsageEvent::Denied {
            feature: "solver".into(),
            reason: "all_seats_in_use".into(),
            user: "bo".into(),
            host: "ws".into(),
        });
        let r = reconcile_all(&[bundle("paid", &[], 4, None)], &[link(events, None)]);
        let rows: Vec<&str> = r.features.iter().map(|f| f.feature.as_str()).collect();
        assert_eq!(rows, vec![UNLICENSED_FEATURE, "solver"]);
        let denials = |i: usize| r.features[i].total.denials.values().sum::<u64>();
        assert_eq!(denials(0), 100);
        assert_eq!(denials(1), 1);
    }

    #[test]
    fn without_a_history_the_given_bundles_count_with_their_dates() {
        let bundles = [
            bundle("trial", &[], 2, None),
            bundle("paid", &["trial"], 4, Some(150)),
        ];
        let r = reconcile_all(&bundles, &[link(usage(), None)]);
        let s = &r.features[0].total;
        // The trial is superseded; the paid seats end at their expiry inside the period.
        assert_eq!(
            seats(s),
            vec![(100, Some(4), "bundles"), (150, Some(0), "bundles")]
        );
        assert_eq!(s.licensed, Some(0));
        // Held past the expiry: 4 seats for 20 s are overdraft.
        assert_eq!(s.overdraft_peak, 4);
        assert!((s.overdraft_seat_hours - 4.0 * 20.0 / 3600.0).abs() < 1e-12);
        assert!((s.hours_at_full - 40.0 / 3600.0).abs() < 1e-12);
        // One stretch of overdraft: from the expiry to the release.
        let over: Vec<(u64, u64, u32)> = s
            .overdraft_periods
            .iter()
            .map(|p| (p.start_unix, p.end_unix, p.seats))
            .collect();
        assert_eq!(over, vec![(150, 170, 4)]);
    }

    #[test]
    fn with_a_history_the_bundles_in_force_count_from_when_they_came() {
        let trial = bundle("trial", &[], 2, None);
        let paid = bundle("paid", &["trial"], 4, Some(150));
        // In journal (and time) order: the grant at 110, the reload at 120, the release.
        let [grant, release] = <[UsageEvent; 2]>::try_from(usage()).unwrap();
        let events = vec![
            grant,
            UsageEvent::BundleTerms {
                bundle: ServedBundle::of(&paid),
            },
            UsageEvent::BundlesInForce {
                why: "reload".into(),
                bundles: vec!["paid".into()],
                withdrawn: vec![],
            },
            release,
        ];
        let r = reconcile_all(
            &[trial.clone(), paid],
            &[link(events, Some(vec![ServedBundle::of(&trial)]))],
        );
        let s = &r.features[0].total;
        assert_eq!(
            seats(s),
            vec![
                (100, Some(2), "report"),
                (120, Some(4), "report"),
                (150, Some(0), "report")
            ]
        );
        // 110..120 with 4 held on 2 licensed, then 150..170 with none licensed.
        assert_eq!(s.overdraft_peak, 4);
        let over = (2.0 * 10.0 + 4.0 * 20.0) / 3600.0;
        assert!((s.overdraft_seat_hours - over).abs() < 1e-12, "{s:?}");
        // Two stretches, each with its own seats over the licence, and the seat-hours add up.
        let periods: Vec<(u64, u64, u32)> = s
            .overdraft_periods
            .iter()
            .map(|p| (p.start_unix, p.end_unix, p.seats))
            .collect();
        assert_eq!(periods, vec![(110, 120, 2), (150, 170, 4)]);
        let sum: f64 = s.overdraft_periods.iter().map(|p| p.seat_hours).sum();
        assert!((sum - over).abs() < 1e-12);
    }

    /// The `Session` events after grants count per feature the grants from virtual
    /// machines and from remote sessions (a grant reporting both counts in both), and
    /// the CSV gains them as its last columns.
    #[test]
    fn grants_from_virtual_machines_and_remote_sessions_are_counted_per_feature() {
        let grant = |lease: u64, feature: &str| UsageEvent::Granted {
            lease: LeaseId(lease),
            feature: feature.into(),
            count: 1,
            overdraft: false,
            user: "ana".into(),
            host: "ws".into(),
            borrowed_until: None,
        };
        let session = |lease: u64, vm: Option<&str>, remote: Option<&str>| UsageEvent::Session {
            lease: LeaseId(lease),
            virtual_machine: vm.map(str::to_string),
            remote: remote.map(str::to_string),
        };
        let events = vec![
            grant(1, "solver"),
            session(1, Some("KVM/QEMU"), None),
            grant(2, "solver"),
            session(2, Some("VMware"), Some("SSH from 10.0.0.5")),
            grant(3, "solver"),
            grant(4, "mesher"),
            session(4, None, Some("RDP")),
        ];
        let mut paid = bundle("paid", &[], 4, None);
        paid.features.push(FeatureGrant::counted("mesher", 2));
        let r = reconcile_all(&[paid], &[link(events, None)]);
        let counts: Vec<(&str, u64, u64, u64)> = r
            .features
            .iter()
            .map(|f| {
                let t = &f.total;
                (
                    f.feature.as_str(),
                    t.grants,
                    t.grants_from_virtual_machines,
                    t.grants_from_remote_sessions,
                )
            })
            .collect();
        assert_eq!(counts, vec![("mesher", 1, 0, 1), ("solver", 3, 2, 1)]);
        let csv = to_csv(&r);
        let header = csv.lines().next().unwrap();
        assert!(
            header.ends_with(
                ",distinct_hosts,grants_from_virtual_machines,grants_from_remote_sessions"
            ),
            "{header}"
        );
        let solver_total = csv
            .lines()
            .find(|l| l.starts_with("solver,total,"))
            .unwrap();
        assert!(solver_total.ends_with(",2,1"), "{solver_total}");
        // Without such grants the columns are there, with zeros: a billing tool reads
        // one layout.
        let plain = reconcile_all(&[bundle("paid", &[], 4, None)], &[link(usage(), None)]);
        let plain = to_csv(&plain);
        assert!(
            plain.lines().next().unwrap().ends_with("_sessions"),
            "{plain}"
        );
        assert!(plain.lines().nth(1).unwrap().ends_with(",0,0"), "{plain}");
    }
}

/// A run of numbered things as people write it: "report 2", "reports 2 to 5" (not
/// Rust's `2..=5`).
pub fn numbered_span(one: &str, many: &str, first: u64, last: u64) -> String {
    if first == last {
        format!("{one} {first}")
    } else {
        format!("{many} {first} to {last}")
    }
}

/// `n` with its noun, singular or plural: "1 report", "2 reports".
pub fn plural_of(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}
