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

use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use tally_protocol::bundle::{Bundle, Seats};
use tally_protocol::report::{self, UsageEvent, VerifiedReport};
use tally_protocol::time::UnixTime;

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
    let mut problems = Vec::new();
    let Some(binding) = &bundle.binding else {
        return Err(vec![format!(
            "bundle {} is not bound to a server; reports cannot be attributed",
            bundle.id
        )]);
    };
    let mut links: Vec<ChainLink> = Vec::new();
    let mut seen: BTreeMap<u64, String> = BTreeMap::new();
    for f in files {
        let verified = match report::read(&f.text) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("{}: refused: {e}", f.name));
                continue;
            }
        };
        let r = &verified.report;
        if r.server_key != binding.server_key {
            problems.push(format!(
                "{}: signed by server key {}, but bundle {} binds server key {}",
                f.name,
                r.server_key.fingerprint(),
                bundle.id,
                binding.server_key.fingerprint()
            ));
            continue;
        }
        if let Some(first) = seen.get(&r.report_seq) {
            problems.push(format!(
                "{}: duplicate of report {} ({first})",
                f.name, r.report_seq
            ));
            continue;
        }
        seen.insert(r.report_seq, f.name.clone());
        if let Some(prev) = links.last() {
            let p = &prev.report.report;
            if r.report_seq < p.report_seq {
                problems.push(format!(
                    "{}: report {} comes after report {} ({}): reports are out of order",
                    f.name, r.report_seq, p.report_seq, prev.name
                ));
            } else if r.report_seq > p.report_seq + 1 {
                problems.push(format!(
                    "report(s) {}..={} missing between {} (report {}) and {} (report {})",
                    p.report_seq + 1,
                    r.report_seq - 1,
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
                        "{}: events {}..={} are missing after {}",
                        f.name,
                        next,
                        r.first_event.saturating_sub(1),
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

/// Usage figures of one feature over one period.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Start of the period.
    pub from: String,
    /// End of the period.
    pub to: String,
    /// Licensed seats (none for uncounted).
    pub licensed: Option<u32>,
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
    /// The bundle reconciled against.
    pub bundle: String,
    /// The customer.
    pub customer: String,
    /// Reports covered.
    pub reports: Vec<u64>,
    /// Per feature.
    pub features: Vec<FeatureUsage>,
}

/// Licensed seats per feature in `bundle` (packages give their components seats).
fn licensed(bundle: &Bundle) -> BTreeMap<String, Option<u32>> {
    let mut out: BTreeMap<String, Option<u32>> = BTreeMap::new();
    for f in &bundle.features {
        if f.upgrade_from.is_some() {
            continue;
        }
        for name in std::iter::once(&f.name).chain(f.components.iter()) {
            let entry = out.entry(name.clone()).or_insert(Some(0));
            *entry = match (*entry, f.seats) {
                (Some(a), Seats::Counted(n)) => Some(a.saturating_add(n)),
                _ => None,
            };
        }
    }
    out
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
    users: BTreeSet<String>,
    hosts: BTreeSet<String>,
}

impl Acc {
    fn advance(&mut self, t: u64, licensed: Option<u32>) {
        let dt = t.saturating_sub(self.last) as u128;
        self.seat_seconds += self.in_use as u128 * dt;
        if let Some(l) = licensed {
            self.over_seconds += self.in_use.saturating_sub(l) as u128 * dt;
            if l > 0 && self.in_use >= l {
                self.full_seconds += dt;
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

    fn finish(mut self, from: u64, to: u64, licensed: Option<u32>) -> Stats {
        self.advance(to, licensed);
        let secs = to.saturating_sub(from).max(1) as f64;
        self.stats.from = UnixTime(from).to_string();
        self.stats.to = UnixTime(to).to_string();
        self.stats.licensed = licensed;
        self.stats.seat_hours = self.seat_seconds as f64 / 3600.0;
        self.stats.average = self.seat_seconds as f64 / secs;
        self.stats.overdraft_seat_hours = self.over_seconds as f64 / 3600.0;
        self.stats.hours_at_full = self.full_seconds as f64 / 3600.0;
        self.stats.distinct_users = self.users.len();
        self.stats.distinct_hosts = self.hosts.len();
        self.stats
    }
}

/// Reconciles a verified chain against `bundle`.
pub fn reconcile(bundle: &Bundle, links: &[ChainLink]) -> Reconciliation {
    let licensed = licensed(bundle);
    let mut features: BTreeSet<String> = licensed.keys().cloned().collect();
    for l in links {
        for e in &l.report.report.events {
            if let UsageEvent::Granted { feature, .. } | UsageEvent::Denied { feature, .. } =
                &e.event
            {
                features.insert(feature.clone());
            }
        }
    }
    let mut out = Vec::new();
    for feature in features {
        let lic = licensed.get(&feature).copied().unwrap_or(Some(0));
        let mut in_use: u32 = 0;
        let mut open: BTreeMap<u64, u32> = BTreeMap::new();
        let mut timeline = Vec::new();
        let (Some(first), Some(last)) = (links.first(), links.last()) else {
            continue;
        };
        let start = first.report.report.period_from.0;
        let end = last.report.report.period_to.0;
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
        total.set(in_use, lic);
        let mut periods = Vec::new();
        for link in links {
            let r = &link.report.report;
            let mut acc = Acc {
                last: r.period_from.0,
                ..Acc::default()
            };
            acc.set(in_use, lic);
            for e in &r.events {
                // Not `clamp`, which panics if the period ends before it starts.
                let t = e.at.0.max(r.period_from.0).min(r.period_to.0);
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
                            a.advance(t, lic);
                            a.stats.grants += 1;
                            a.users.insert(user.clone());
                            a.hosts.insert(host.clone());
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
                        acc.advance(t, lic);
                        total.advance(t, lic);
                        in_use = in_use.saturating_sub(count);
                    }
                    UsageEvent::Denied {
                        feature: f, reason, ..
                    } if *f == feature => {
                        for a in [&mut acc, &mut total] {
                            *a.stats.denials.entry(reason.clone()).or_default() += 1;
                        }
                        continue;
                    }
                    _ => continue,
                }
                acc.set(in_use, lic);
                total.set(in_use, lic);
                if timeline.last().map(|(pt, _)| *pt) == Some(t) {
                    timeline.pop();
                }
                timeline.push((t, in_use));
            }
            periods.push((
                r.report_seq,
                acc.finish(r.period_from.0, r.period_to.0, lic),
            ));
        }
        timeline.push((end, in_use));
        out.push(FeatureUsage {
            feature,
            total: total.finish(start, end, lic),
            periods,
            timeline,
        });
    }
    Reconciliation {
        bundle: bundle.id.clone(),
        customer: format!("{} ({})", bundle.customer.name, bundle.customer.id),
        reports: links.iter().map(|l| l.report.report.report_seq).collect(),
        features: out,
    }
}

/// CSV: one row per feature and period, then one total row per feature.
pub fn to_csv(r: &Reconciliation) -> String {
    let mut out = String::from(
        "feature,report,from,to,licensed,peak,average,seat_hours,overdraft_seat_hours,overdraft_peak,hours_at_full,grants,denials,distinct_users,distinct_hosts\n",
    );
    for f in &r.features {
        let rows = f
            .periods
            .iter()
            .map(|(seq, s)| (seq.to_string(), s))
            .chain(std::iter::once(("total".to_string(), &f.total)));
        for (label, s) in rows {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{:.4},{:.4},{:.4},{},{:.4},{},{},{},{}",
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
                s.distinct_hosts
            );
        }
    }
    out
}

/// One CSV field: quoted when it holds a separator, a quote or a line break (RFC 4180),
/// and kept from being read as a formula by a spreadsheet. Feature names come from
/// reports a customer's server signs, so they are not trusted to be plain.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An inline SVG step chart of seats in use, with the licensed count as a dashed line.
fn chart(f: &FeatureUsage) -> String {
    let (w, h, pad) = (720.0f64, 200.0f64, 30.0f64);
    let (Some(&(t0, _)), Some(&(t1, _))) = (f.timeline.first(), f.timeline.last()) else {
        return String::new();
    };
    let span = (t1.saturating_sub(t0)).max(1) as f64;
    let lic = f.total.licensed.unwrap_or(0);
    let top = f.total.peak.max(lic).max(1) as f64;
    let x = |t: u64| pad + (t.saturating_sub(t0)) as f64 / span * (w - 2.0 * pad);
    let y = |v: u32| h - pad - v as f64 / top * (h - 2.0 * pad);
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
    let mut svg = format!(
        "<svg viewBox=\"0 0 {w} {h}\" width=\"100%\" role=\"img\" aria-label=\"seats in use of {}\">",
        html_escape(&f.feature)
    );
    let _ = write!(
        svg,
        "<line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#999\"/>",
        h - pad,
        w - pad,
        h - pad
    );
    if lic > 0 {
        let _ = write!(
            svg,
            "<line x1=\"{pad}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#c00\" stroke-dasharray=\"6 4\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" fill=\"#c00\">licensed {lic}</text>",
            y(lic),
            w - pad,
            y(lic),
            w - pad - 70.0,
            y(lic) - 4.0
        );
    }
    let _ = write!(
        svg,
        "<path d=\"{path}\" fill=\"none\" stroke=\"#1f5fbf\" stroke-width=\"1.5\"/><text x=\"{pad}\" y=\"{}\" font-size=\"11\">{}</text><text x=\"{:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">{}</text><text x=\"4\" y=\"{:.1}\" font-size=\"11\">{}</text></svg>",
        h - 10.0,
        UnixTime(t0),
        w - pad,
        h - 10.0,
        UnixTime(t1),
        y(f.total.peak) + 4.0,
        f.total.peak
    );
    svg
}

/// A self-contained HTML page (inline CSS and SVG, no network) that prints well.
pub fn to_html(r: &Reconciliation) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>tally usage: {}</title><style>\
body{{font-family:system-ui,sans-serif;margin:2em;color:#111}}table{{border-collapse:collapse;margin:.5em 0 1.5em}}\
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}th:first-child,td:first-child{{text-align:left}}\
section{{page-break-inside:avoid;margin-bottom:2em}}@media print{{body{{margin:0}}}}</style></head><body>",
        html_escape(&r.customer)
    );
    let _ =
        write!(
        out,
        "<h1>Usage reconciliation</h1><p>Customer {} &middot; bundle {} &middot; reports {}</p>",
        html_escape(&r.customer),
        html_escape(&r.bundle),
        r.reports.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
    );
    for f in &r.features {
        let _ = write!(
            out,
            "<section><h2>{}</h2>{}",
            html_escape(&f.feature),
            chart(f)
        );
        out.push_str("<table><tr><th>period</th><th>licensed</th><th>peak</th><th>average</th><th>seat-hours</th><th>overdraft seat-hours</th><th>overdraft peak</th><th>hours at 100%</th><th>denials</th><th>users</th><th>hosts</th></tr>");
        let rows = f
            .periods
            .iter()
            .map(|(seq, s)| (format!("report {seq}"), s))
            .chain(std::iter::once(("total".to_string(), &f.total)));
        for (label, s) in rows {
            let denials: Vec<String> = s.denials.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let _ = write!(
                out,
                "<tr><td>{label}<br><small>{} – {}</small></td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td><td>{:.2}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
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
                s.distinct_hosts
            );
        }
        out.push_str("</table></section>");
    }
    out.push_str("</body></html>\n");
    out
}

#[cfg(test)]
mod csv_tests {
    use super::csv_field;

    #[test]
    fn csv_fields_are_quoted_and_never_formulas() {
        assert_eq!(csv_field("solver"), "solver");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(1)"), "'=HYPERLINK(1)");
        assert_eq!(csv_field("-1,2"), "\"'-1,2\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
    }
}
