//! A day of activity in virtual time, journaled as the daemon journals it, exported as
//! three consecutive signed reports, verified and reconciled by the vendor's tool; the
//! numbers must equal a ground truth this test keeps on its own, minute by minute. Then
//! the chain is attacked: an edited byte, a missing report, two swapped, a duplicate.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tally_daemon::journal::{build_report, usage_event, ReportIdentity};
use tally_daemon::ledger::{ConnId, FreshLease, Ledger, LedgerSettings, Now};
use tally_protocol::bundle::{Binding, Bundle, Customer, FeatureGrant};
use tally_protocol::keys::SecretKey;
use tally_protocol::lease::{LeaseId, LeaseRecord, LeaseSecret};
use tally_protocol::report::{JournalEntry, ReportState, UsageEvent};
use tally_protocol::time::UnixTime;
use tally_protocol::wire::{CheckoutRequest, ClientIdentity, LeaseRef};
use tally_publisher::reconcile::{reconcile, verify_chain, ReportFile};

const START: u64 = 1_800_000_000;
const MINUTES: u64 = 24 * 60;

/// A small deterministic generator, so the day is the same on every run.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[derive(Default, Debug, PartialEq)]
struct Truth {
    seat_minutes: u64,
    over_minutes: u64,
    full_minutes: u64,
    peak: u32,
    over_peak: u32,
    denials: BTreeMap<String, u64>,
    users: BTreeSet<String>,
    grants: u64,
}

fn bundle(server: &SecretKey) -> Bundle {
    let mut solver = FeatureGrant::counted("solver", 3);
    solver.overdraft = 1;
    Bundle {
        id: "acme-1".into(),
        issued_at: UnixTime(START - 86_400),
        vendor: "Acme".into(),
        customer: Customer {
            id: "C-1".into(),
            name: "Example".into(),
        },
        binding: vec![Binding {
            server_key: server.public(),
            host_fingerprint: "host".into(),
        }],
        supersedes: vec![],
        valid_from: None,
        valid_until: None,
        features: vec![solver, FeatureGrant::counted("viewer", 5)],
    }
}

/// Runs the day; returns the armoured reports and the ground truth per feature.
fn simulate_day(server: &SecretKey) -> (Vec<String>, BTreeMap<String, Truth>, Bundle) {
    let b = bundle(server);
    let licensed: BTreeMap<&str, u32> = [("solver", 3), ("viewer", 5)].into_iter().collect();
    let mut ledger = Ledger::new(
        LedgerSettings {
            default_ttl: Duration::from_secs(90),
            remove_holdoff: Duration::ZERO,
        },
        std::slice::from_ref(&b),
    );
    let mono0 = Instant::now();
    let mut rng = Lcg(42);
    let mut seq = 0u64;
    let mut entries: Vec<JournalEntry> = Vec::new();
    let mut journal = |entries: &mut Vec<JournalEntry>, at: u64, event: UsageEvent| {
        seq += 1;
        entries.push(JournalEntry {
            seq,
            at: UnixTime(at),
            event,
        });
    };
    let mut held: Vec<(LeaseRecord, u64)> = Vec::new(); // (lease, conn)
    let mut truth: BTreeMap<String, Truth> = BTreeMap::new();
    let identity = ReportIdentity {
        key: server.clone(),
        host_fingerprint: "host".into(),
        customers: vec!["C-1".into()],
        bundle_ids: vec!["acme-1".into()],
    };
    let mut state = ReportState::default();
    let mut reports = Vec::new();
    let mut next_id = 1u64;
    for minute in 0..MINUTES {
        let at = START + minute * 60;
        let now = Now {
            mono: mono0 + Duration::from_secs(minute * 60),
            wall: UnixTime(at),
        };
        // Busier in working hours.
        let busy = (8 * 60..18 * 60).contains(&minute);
        let tries = if busy { 3 } else { 1 };
        for _ in 0..tries {
            match rng.next(10) {
                0..=4 => {
                    let feature = if rng.next(3) == 0 { "viewer" } else { "solver" };
                    let user = format!("user{}", rng.next(7));
                    let conn = rng.next(20);
                    let holder = ClientIdentity {
                        user: user.clone(),
                        host: format!("ws{}", rng.next(4)),
                        pid: 1,
                        program: "app".into(),
                        display: None,
                    };
                    let request = CheckoutRequest {
                        feature: feature.into(),
                        count: 1 + rng.next(2) as u32,
                        version: None,
                        build_date: None,
                        wait_secs: 0,
                        borrow_secs: 0,
                    };
                    next_id += 1;
                    let fresh = FreshLease {
                        id: LeaseId(next_id),
                        secret: LeaseSecret([next_id as u8; 16]),
                    };
                    match ledger.checkout(now, ConnId(conn), &holder, &request, fresh) {
                        Ok((record, event)) => {
                            journal(&mut entries, at, usage_event(&event));
                            let t = truth.entry(feature.into()).or_default();
                            t.users.insert(user);
                            t.grants += 1;
                            held.push((record, conn));
                        }
                        Err(reason) => {
                            journal(
                                &mut entries,
                                at,
                                UsageEvent::Denied {
                                    feature: feature.into(),
                                    reason: reason.code().into(),
                                    user,
                                    host: holder.host.clone(),
                                },
                            );
                            *truth
                                .entry(feature.into())
                                .or_default()
                                .denials
                                .entry(reason.code().into())
                                .or_default() += 1;
                        }
                    }
                }
                5..=7 if !held.is_empty() => {
                    let i = rng.next(held.len() as u64) as usize;
                    let (record, _) = held.swap_remove(i);
                    let (_, events) = ledger.checkin(
                        now,
                        &[LeaseRef {
                            id: record.id,
                            secret: record.secret.clone(),
                        }],
                    );
                    for e in events {
                        journal(&mut entries, at, usage_event(&e));
                    }
                }
                8 if !held.is_empty() => {
                    // A client vanishes: its connection closes and all its leases go.
                    let conn = held[rng.next(held.len() as u64) as usize].1;
                    let events = ledger.connection_closed(now, ConnId(conn));
                    held.retain(|(_, c)| *c != conn);
                    for e in events {
                        journal(&mut entries, at, usage_event(&e));
                    }
                }
                _ => {}
            }
        }
        // Everybody still here heartbeats, so nothing expires on its own.
        for (record, conn) in &held {
            ledger.heartbeat(
                now,
                ConnId(*conn),
                &[LeaseRef {
                    id: record.id,
                    secret: record.secret.clone(),
                }],
            );
        }
        // Ground truth: the seats held through the coming minute.
        for (feature, lic) in &licensed {
            let in_use: u32 = held
                .iter()
                .filter(|(r, _)| r.feature == *feature)
                .map(|(r, _)| r.count)
                .sum();
            let t = truth.entry(feature.to_string()).or_default();
            t.seat_minutes += in_use as u64;
            t.over_minutes += in_use.saturating_sub(*lic) as u64;
            if in_use >= *lic {
                t.full_minutes += 1;
            }
            t.peak = t.peak.max(in_use);
            t.over_peak = t.over_peak.max(in_use.saturating_sub(*lic));
        }
        // Three reports: after 8 h, 16 h and 24 h.
        if (minute + 1) % (8 * 60) == 0 {
            let exported = build_report(
                &identity,
                &state,
                std::mem::take(&mut entries),
                UnixTime(at + 60),
            );
            state = exported.state;
            reports.push(exported.text);
        }
    }
    (reports, truth, b)
}

fn files(texts: &[String]) -> Vec<ReportFile> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| ReportFile {
            name: format!("report-{}.report", i + 1),
            text: t.clone(),
        })
        .collect()
}

#[test]
fn reconcile_equals_the_ground_truth_of_a_simulated_day() {
    let server = SecretKey::from_seed([11; 32]);
    let (reports, truth, b) = simulate_day(&server);
    assert_eq!(reports.len(), 3);
    let links = verify_chain(&b, &files(&reports)).unwrap();
    let r = reconcile(&b, &links);
    for (feature, t) in &truth {
        let f = r.features.iter().find(|f| &f.feature == feature).unwrap();
        let s = &f.total;
        assert!(
            t.grants > 20,
            "the simulated day is too quiet for {feature}"
        );
        assert_eq!(s.grants, t.grants, "{feature} grants");
        assert_eq!(s.peak, t.peak, "{feature} peak");
        assert_eq!(
            s.seat_hours,
            t.seat_minutes as f64 / 60.0,
            "{feature} seat-hours"
        );
        assert_eq!(
            s.overdraft_seat_hours,
            t.over_minutes as f64 / 60.0,
            "{feature} overdraft seat-hours"
        );
        assert_eq!(s.overdraft_peak, t.over_peak, "{feature} overdraft peak");
        assert_eq!(
            s.hours_at_full,
            t.full_minutes as f64 / 60.0,
            "{feature} hours at 100%"
        );
        assert_eq!(s.denials, t.denials, "{feature} denials");
        assert_eq!(s.distinct_users, t.users.len(), "{feature} users");
        assert_eq!(
            s.average,
            t.seat_minutes as f64 * 60.0 / (MINUTES * 60) as f64
        );
        // The per-report periods add up to the total.
        let sum: f64 = f.periods.iter().map(|(_, p)| p.seat_hours).sum();
        assert!(
            (sum - s.seat_hours).abs() < 1e-9,
            "{feature}: periods {sum} vs {}",
            s.seat_hours
        );
    }
    // The solver ran into its overdraft and was denied at times: the day is realistic.
    assert!(truth["solver"].over_minutes > 0);
    assert!(truth["solver"].denials.contains_key("all_seats_in_use"));
    // All three output formats render.
    assert!(tally_publisher::reconcile::to_csv(&r).lines().count() > 6);
    let html = tally_publisher::reconcile::to_html(&r);
    assert!(html.contains("<svg") && html.contains("solver"));
}

#[test]
fn edited_missing_swapped_and_duplicated_reports_are_named() {
    let server = SecretKey::from_seed([11; 32]);
    let (reports, _, b) = simulate_day(&server);
    let problems = |texts: Vec<String>| verify_chain(&b, &files(&texts)).unwrap_err().join("\n");

    // One edited byte in the middle report.
    let mut edited = reports.clone();
    let mut lines: Vec<String> = edited[1].lines().map(String::from).collect();
    let line = &mut lines[5];
    let c = line.remove(7);
    line.insert(7, if c == 'x' { 'y' } else { 'x' });
    edited[1] = lines.join("\n");
    let p = problems(edited);
    assert!(p.contains("report-2.report: refused"), "{p}");

    // The middle report removed.
    let p = problems(vec![reports[0].clone(), reports[2].clone()]);
    assert!(p.contains("report 2 missing between"), "{p}");

    // Two reports swapped.
    let p = problems(vec![
        reports[0].clone(),
        reports[2].clone(),
        reports[1].clone(),
    ]);
    assert!(p.contains("out of order"), "{p}");

    // A report given twice.
    let p = problems(vec![
        reports[0].clone(),
        reports[1].clone(),
        reports[1].clone(),
    ]);
    assert!(p.contains("duplicate of report 2"), "{p}");

    // Reports from another server (a clone reporting for this bundle).
    let other = SecretKey::from_seed([12; 32]);
    let (foreign, _, _) = simulate_day(&other);
    let p = problems(foreign);
    assert!(p.contains("but bundle acme-1 binds server key"), "{p}");
}

#[test]
fn the_real_daemon_journals_exports_and_the_vendor_verifies() {
    use std::process::Command;
    use tally_tests::{bin, Daemon};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let spool = dir.path().join("spool");
    let spool_arg = spool.display().to_string();
    let args = ["--report-dir", spool_arg.as_str()];
    let daemon = Daemon::start(&data, "127.0.0.1:0", &args);
    for _ in 0..3 {
        let out = daemon
            .tally()
            .args(["run", "solver", "--", "true"])
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    let out = daemon
        .tally()
        .args(["run", "mesher", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75));
    let first = dir.path().join("first.report");
    let out = daemon
        .tally()
        .args(["admin", "--admin-token-file"])
        .arg(data.join("admin.token"))
        .args(["report", "--out"])
        .arg(&first)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A graceful stop writes the last segment into the spool.
    let addr = daemon.addr.to_string();
    daemon.stop();
    let daemon = Daemon::start(&data, &addr, &args);
    let out = daemon
        .tally()
        .args(["run", "solver", "--count", "2", "--", "true"])
        .output()
        .unwrap();
    assert!(out.status.success());
    daemon.stop();
    let mut spooled: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "report"))
        .collect();
    spooled.sort();
    assert_eq!(spooled.len(), 3, "admin copy, stop, stop: {spooled:?}");
    assert_eq!(
        std::fs::read_to_string(&first).unwrap(),
        std::fs::read_to_string(&spooled[0]).unwrap()
    );
    let bundle = data.join("demo.bundle");
    let out = Command::new(bin("tally-publisher"))
        .arg("verify-report")
        .arg("--bundle")
        .arg(&bundle)
        .args(&spooled)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(bin("tally-publisher"))
        .args(["reconcile", "--format", "json", "--bundle"])
        .arg(&bundle)
        .args(&spooled)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let solver = doc["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["feature"] == "solver")
        .unwrap();
    assert_eq!(solver["total"]["grants"], 4);
    assert_eq!(solver["total"]["peak"], 2);
    let mesher = doc["features"]
        .as_array()
        .unwrap()
        .iter()
        // Denials of names no bundle licenses share one row (issue 20).
        .find(|f| f["feature"] == "(unlicensed)")
        .unwrap();
    assert_eq!(mesher["total"]["denials"]["not_licensed"], 1);
    let out = Command::new(bin("tally-publisher"))
        .arg("inspect")
        .arg(&spooled[1])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("tally usage report 2"));
}
