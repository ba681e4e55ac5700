//! Issue 17, one usage chain for a three-server site, on the vendor's side, through the
//! real `tally-publisher` (and its receiver's decision, `receive::Inbox`).
//!
//! In a cluster the report chain head is replicated and whichever node leads when a
//! report is exported signs it with its own key, so one chain holds reports of several
//! signers. The servers here are real (`tallyd init` and `tallyd request`, one bundle
//! issued by `tally-publisher issue` from the three requests, a fourth server that bundle
//! does not bind); the reports are built by the daemon's own `journal::build_report`
//! with each member's key, the chain state carried from one build to the next as the
//! replicated head carries it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tally_daemon::journal::{build_report, Exported, ReportIdentity};
use tally_protocol::keys::SecretKey;
use tally_protocol::lease::LeaseId;
use tally_protocol::report::{JournalEntry, ReportState, UsageEvent};
use tally_protocol::time::UnixTime;
use tally_publisher::receive::Inbox;
use tally_tests::cluster::ClusterSite;
use tally_tests::{bin, ok, run};

/// A vendor key, three cluster members (`s0`..`s2`) bound by one bundle, and a fourth
/// server (`s3`) it does not bind.
struct Site {
    site: ClusterSite,
    keys: Vec<SecretKey>,
}

const START: u64 = 1_800_000_000;

impl Site {
    fn new() -> Site {
        let site = ClusterSite::new(4);
        let keys = (0..4)
            .map(|i| tally_daemon::identity::load(&site.data_dir(i).join("server.key")).unwrap())
            .collect();
        std::fs::create_dir_all(site.path("bundles")).unwrap();
        ok(site.issue(&site.all_requests()[..3], "bundles/site-ha-1.bundle"));
        Site { site, keys }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.site.path(name)
    }

    /// Report `state.report_seq + 1`, exported by node `node`: one checkout and checkin
    /// by `user` (its own lease, two journal events).
    fn export(&self, node: usize, state: &ReportState, user: &str) -> Exported {
        let n = state.report_seq + 1;
        let at = |k: u64| UnixTime(START + n * 600 + k);
        let seq = state.last_event + 1;
        let entries = vec![
            JournalEntry {
                seq,
                at: at(10),
                event: UsageEvent::Granted {
                    lease: LeaseId(n),
                    feature: "solver".into(),
                    count: 2,
                    overdraft: false,
                    user: user.into(),
                    host: "ws".into(),
                    borrowed_until: None,
                },
            },
            JournalEntry {
                seq: seq + 1,
                at: at(310),
                event: UsageEvent::Released {
                    lease: LeaseId(n),
                    feature: "solver".into(),
                    count: 2,
                    why: "checkin".into(),
                },
            },
        ];
        let identity = ReportIdentity {
            key: self.keys[node].clone(),
            host_fingerprint: format!("host-{node}"),
            customers: vec!["C-1001".into()],
            bundle_ids: vec!["site-ha-1".into()],
        };
        build_report(&identity, state, entries, at(600))
    }

    /// Writes `report` as `name` under the site and returns its path.
    fn write(&self, name: &str, report: &Exported) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, &report.text).unwrap();
        p
    }

    fn fingerprint(&self, node: usize) -> String {
        self.keys[node].public().fingerprint()
    }

    /// Node `node`'s key as the vendor's tools name a signer: the first four groups of
    /// its fingerprint (its node id).
    fn short(&self, node: usize) -> String {
        self.fingerprint(node)[..19].to_string()
    }
}

/// The chain of four reports signed A, A, B, C, and the state after report 2.
fn chain(site: &Site) -> (Vec<Exported>, ReportState) {
    let r1 = site.export(0, &ReportState::default(), "ana");
    let r2 = site.export(0, &r1.state, "bo");
    let r3 = site.export(1, &r2.state, "cy");
    let r4 = site.export(2, &r3.state, "di");
    let s2 = r2.state.clone();
    (vec![r1, r2, r3, r4], s2)
}

fn verify(site: &Site, reports: &[&Path]) -> Output {
    run(Command::new(bin("tally-publisher"))
        .arg("verify-report")
        .arg("--bundle")
        .arg(site.path("bundles"))
        .args(reports))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Refused with exit 65 (bad data) and `what` named on standard error.
fn refused(out: Output, what: &str) -> String {
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(65), "{err}");
    assert!(err.contains(what), "expected {what:?} in: {err}");
    err
}

#[test]
fn a_chain_signed_by_three_members_verifies_and_reconciles_as_one() {
    let site = Site::new();
    let (reports, _) = chain(&site);
    let paths: Vec<PathBuf> = reports
        .iter()
        .enumerate()
        .map(|(i, r)| site.write(&format!("r{}.report", i + 1), r))
        .collect();
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let out = ok(verify(&site, &refs));
    assert!(
        out.contains("4 reports verified: reports 1 to 4, 8 events"),
        "{out}"
    );
    // The failovers are visible: who signed which reports.
    assert!(
        out.contains("signed by 3 bound servers of one cluster"),
        "{out}"
    );
    for (span, node) in [("reports 1 to 2", 0), ("report 3", 1), ("report 4", 2)] {
        let line = format!("  {span} signed by {}\n", site.short(node));
        assert!(out.contains(&line), "{line:?} in {out}");
    }
    // Two reports of one signer: as for a single server, no signer list.
    let out = ok(verify(&site, &refs[..2]));
    assert!(
        out.contains("one unbroken chain signed by the bound server\n"),
        "{out}"
    );
    assert!(!out.contains(" signed by 0"), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");

    // reconcile over the files: one chain, four periods, four grants of 2 seats.
    let out = ok(run(Command::new(bin("tally-publisher"))
        .args(["reconcile", "--format", "json", "--bundle"])
        .arg(site.path("bundles"))
        .args(&refs)));
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["reports"], serde_json::json!([1, 2, 3, 4]));
    assert_eq!(doc["bundle"], "site-ha-1");
    let solver = &doc["features"][0];
    assert_eq!(solver["feature"], "solver");
    assert_eq!(solver["total"]["grants"], 4);
    assert_eq!(solver["total"]["peak"], 2);
    assert_eq!(solver["total"]["distinct_users"], 4);
    let signers = serde_json::json!([
        {"first": 1, "last": 2, "signer": site.short(0)},
        {"first": 3, "last": 3, "signer": site.short(1)},
        {"first": 4, "last": 4, "signer": site.short(2)},
    ]);
    assert_eq!(doc["signers"], signers);
    // CSV: a signer column naming each report's signer; HTML: the runs under the title.
    let reconcile = |format: &str, reports: &[&Path]| {
        ok(run(Command::new(bin("tally-publisher"))
            .args(["reconcile", "--format", format, "--bundle"])
            .arg(site.path("bundles"))
            .args(reports)))
    };
    let csv = reconcile("csv", &refs);
    assert!(csv.lines().next().unwrap().ends_with(",signer"), "{csv}");
    for (report, node) in [(1, 0), (2, 0), (3, 1), (4, 2)] {
        let row = csv
            .lines()
            .find(|l| l.starts_with(&format!("solver,{report},")))
            .unwrap();
        assert!(row.ends_with(&format!(",{}", site.short(node))), "{row}");
    }
    let html = reconcile("html", &refs);
    assert!(
        html.contains(&format!("report 3 signed by {}", site.short(1))),
        "{html}"
    );
    // One signer: output as for a single server.
    let single: serde_json::Value = serde_json::from_str(&reconcile("json", &refs[..2])).unwrap();
    assert!(single.get("signers").is_none(), "{single}");
    assert!(!reconcile("csv", &refs[..2]).contains("signer"));

    // reconcile --dir, the reports spread over one directory per signer (as a
    // receiver keyed by the signer would have stored them): still one chain, one row.
    let tree = site.path("tree");
    for (i, r) in reports.iter().enumerate() {
        let node = [0, 0, 1, 2][i];
        let dir = tree.join(format!("C-1001/node-{node}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("r{}.report", i + 1)), &r.text).unwrap();
    }
    std::fs::copy(
        site.path("bundles/site-ha-1.bundle"),
        tree.join("site-ha-1.bundle"),
    )
    .unwrap();
    let out = ok(run(Command::new(bin("tally-publisher"))
        .args(["reconcile", "--format", "json", "--dir"])
        .arg(&tree)));
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = doc["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(rows[0]["reports"], 4);
    assert_eq!(rows[0]["customer_id"], "C-1001");
    let server = rows[0]["server"].as_str().unwrap();
    for node in 0..3 {
        assert!(server.contains(&site.fingerprint(node)), "{server}");
    }
    assert_eq!(doc["reconciliations"].as_array().unwrap().len(), 1);
    assert_eq!(
        doc["reconciliations"][0]["reports"],
        serde_json::json!([1, 2, 3, 4])
    );
    assert_eq!(doc["reconciliations"][0]["signers"], signers);
}

#[test]
fn gaps_forks_outsiders_edits_and_reordering_are_named_across_signers() {
    let site = Site::new();
    let (reports, s2) = chain(&site);
    let p: Vec<PathBuf> = reports
        .iter()
        .enumerate()
        .map(|(i, r)| site.write(&format!("r{}.report", i + 1), r))
        .collect();

    // Report 3 (signed by B) dropped: a gap between A's report 2 and C's report 4.
    let err = refused(verify(&site, &[&p[0], &p[1], &p[3]]), "report 3 missing");
    assert!(
        err.contains("r2.report") && err.contains("r4.report"),
        "{err}"
    );

    // Reordered across a signer change.
    refused(verify(&site, &[&p[0], &p[2], &p[1], &p[3]]), "out of order");

    // A fork: report 3 signed by B, and a different report 3 signed by C, both
    // following report 2 (two nodes that each believed they led).
    let forked = site.export(2, &s2, "eve");
    assert_eq!(forked.report_seq, 3);
    let f = site.write("r3-fork.report", &forked);
    let err = refused(verify(&site, &[&p[0], &p[1], &p[2], &f]), "the chain forks");
    assert!(err.contains("a second, different report 3"), "{err}");
    // ... and reconcile --dir over a tree holding both refuses to bill anything.
    let tree = site.path("tree");
    std::fs::create_dir_all(&tree).unwrap();
    for (i, path) in [&p[0], &p[1], &p[2], &f].iter().enumerate() {
        std::fs::copy(path, tree.join(format!("{i}.report"))).unwrap();
    }
    std::fs::copy(
        site.path("bundles/site-ha-1.bundle"),
        tree.join("site-ha-1.bundle"),
    )
    .unwrap();
    let out = run(Command::new(bin("tally-publisher"))
        .args(["reconcile", "--dir"])
        .arg(&tree));
    assert!(out.stdout.is_empty(), "nothing reconciled");
    refused(out, "the chain forks");

    // Report 3 signed by a server the bundle does not bind: refused, its key named.
    let outsider = site.export(3, &s2, "mallory");
    let o = site.write("r3-outsider.report", &outsider);
    let err = refused(
        verify(&site, &[&p[0], &p[1], &o]),
        &format!(
            "r3-outsider.report: signed by server key {}",
            site.fingerprint(3)
        ),
    );
    assert!(
        err.contains("but bundle site-ha-1 binds server keys"),
        "{err}"
    );

    // Report 3 (signed by B) with one byte edited: its signature fails.
    let mut lines: Vec<String> = reports[2].text.lines().map(String::from).collect();
    let line = &mut lines[5];
    let c = line.remove(7);
    line.insert(7, if c == 'x' { 'y' } else { 'x' });
    let e = site.path("r3-edited.report");
    std::fs::write(&e, lines.join("\n")).unwrap();
    refused(
        verify(&site, &[&p[0], &p[1], &e, &p[3]]),
        "r3-edited.report: refused",
    );
}

#[test]
fn the_receiver_stores_one_chain_for_the_cluster_and_refuses_a_fork() {
    let site = Site::new();
    let (reports, s2) = chain(&site);
    let store = site.path("received");
    std::fs::create_dir_all(&store).unwrap();
    let inbox = Inbox::new(&store, &site.path("bundles"));
    for r in &reports {
        let outcome = inbox.accept(&r.text);
        assert_eq!(outcome.status, 201, "{}", outcome.message);
    }
    // One directory, the first signer's, holds the whole chain.
    let dir = store
        .join("C-1001")
        .join(site.fingerprint(0).replace(':', ""));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        (1..=4)
            .map(|n| format!("tally-report-{n:08}.report"))
            .collect::<Vec<_>>()
    );
    assert_eq!(std::fs::read_dir(store.join("C-1001")).unwrap().count(), 1);
    // A retry by another member is acknowledged, not stored twice.
    assert_eq!(inbox.accept(&reports[2].text).status, 200);
    // A different report 3, signed by C: a fork of the stored chain.
    let forked = site.export(2, &s2, "eve");
    let outcome = inbox.accept(&forked.text);
    assert_eq!(outcome.status, 409, "{}", outcome.message);
    assert!(
        outcome.message.contains("forks the chain"),
        "{}",
        outcome.message
    );
    // A report of the server no bundle binds: unknown.
    let outsider = site.export(3, &reports[3].state, "mallory");
    assert_eq!(inbox.accept(&outsider.text).status, 403);
}

#[test]
fn a_replaced_node_signs_the_same_chain_under_its_new_bundle() {
    let site = Site::new();
    // Node 2 died; node 3 replaces it: a new bundle binds 0, 1 and 3 and supersedes the
    // first (README's replacement procedure, the vendor's half).
    std::fs::write(
        site.path("spec2.toml"),
        "id = \"site-ha-2\"\nvendor = \"Acme Simulation\"\nsupersedes = [\"site-ha-1\"]\n[customer]\nid = \"C-1001\"\nname = \"Example Corp\"\n[[feature]]\nname = \"solver\"\nseats = 5\n",
    )
    .unwrap();
    let mut cmd = Command::new(bin("tally-publisher"));
    cmd.arg("issue")
        .arg("--vendor-key")
        .arg(site.path("vendor.key"))
        .arg("--spec")
        .arg(site.path("spec2.toml"));
    for i in [0, 1, 3] {
        cmd.arg("--request").arg(site.path(&format!("s{i}.req")));
    }
    ok(run(cmd
        .arg("--out")
        .arg(site.path("bundles/site-ha-2.bundle"))));
    // Reports 1 and 2 by node 2 (under the first bundle), 3 by node 3 (under the second).
    let r1 = site.export(2, &ReportState::default(), "ana");
    let r2 = site.export(2, &r1.state, "bo");
    let r3 = site.export(3, &r2.state, "cy");
    let p: Vec<PathBuf> = [&r1, &r2, &r3]
        .iter()
        .enumerate()
        .map(|(i, r)| site.write(&format!("r{}.report", i + 1), r))
        .collect();
    let refs: Vec<&Path> = p.iter().map(|p| p.as_path()).collect();
    let out = ok(verify(&site, &refs));
    assert!(out.contains("3 reports verified"), "{out}");
    assert!(
        out.contains(&format!("  report 3 signed by {}", site.short(3))),
        "{out}"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&ok(run(Command::new(bin("tally-publisher"))
            .args(["reconcile", "--format", "json", "--bundle"])
            .arg(site.path("bundles"))
            .args(&refs))))
        .unwrap();
    assert_eq!(doc["reports"], serde_json::json!([1, 2, 3]));
    assert_eq!(doc["bundle"], "site-ha-1, site-ha-2");
    // Given only the first bundle, the new node is not bound: refused and named.
    let out = run(Command::new(bin("tally-publisher"))
        .arg("verify-report")
        .arg("--bundle")
        .arg(site.path("bundles/site-ha-1.bundle"))
        .args(&refs));
    refused(
        out,
        &format!("r3.report: signed by server key {}", site.fingerprint(3)),
    );
}
