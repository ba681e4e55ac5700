//! Issue 14, "reports forget which bundles were served": trial, then a paid bundle that
//! supersedes it, an add-on, and a renewal superseding both, each loaded by a reload
//! of the real daemon with usage in between. The reports carry the bundle history, and
//! `tally-publisher reconcile` given all of the customer's bundles counts licensed seats
//! as they were at each moment: `solver` 2, then 4, 7, 10; `mesher` licensed by the
//! trial while it was used, so no phantom overdraft.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tally_tests::{bin, ok, run, wait_until, Daemon, VendorSite as Site};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Waits for the wall clock to reach the next second, so that what follows is journaled
/// at a later time than what came before (journal times are whole seconds).
fn next_second() {
    let t = unix_now();
    assert!(wait_until(Duration::from_secs(3), || unix_now() > t));
}

fn admin(daemon: &Daemon, site: &Site) -> Command {
    let mut c = daemon.tally();
    c.args(["admin", "--admin-token-file"])
        .arg(site.path("data/admin.token"));
    c
}

/// Holds `count` seats of `feature` for the length of `true`.
fn use_seats(daemon: &Daemon, feature: &str, count: u32) {
    ok(run(daemon.tally().args([
        "run",
        feature,
        "--count",
        &count.to_string(),
        "--",
        "true",
    ])));
}

fn total(daemon: &Daemon, feature: &str) -> u64 {
    daemon.status()["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == feature)
        .map_or(0, |f| f["total"].as_u64().unwrap())
}

/// The licensed seats of each step within each period of `feature`.
fn steps(doc: &serde_json::Value, feature: &str) -> Vec<Vec<serde_json::Value>> {
    feature_of(doc, feature)["periods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p[1]["licensed_steps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    assert_eq!(s["source"], "report", "{s}");
                    s["seats"].clone()
                })
                .collect()
        })
        .collect()
}

fn feature_of<'a>(doc: &'a serde_json::Value, feature: &str) -> &'a serde_json::Value {
    doc["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["feature"] == feature)
        .unwrap_or_else(|| panic!("{feature} not reconciled: {doc}"))
}

fn period(doc: &serde_json::Value, feature: &str, i: usize) -> serde_json::Value {
    feature_of(doc, feature)["periods"][i][1].clone()
}

/// A bundle to issue (id, supersedes, features) and the `solver` seats it brings the total to.
type Phase = (
    &'static str,
    &'static [&'static str],
    &'static [(&'static str, u32)],
    u64,
);

#[test]
fn reconcile_counts_the_bundles_in_force_at_each_moment() {
    let site = Site::new();
    site.issue("C-1001-trial", &[], &[("solver", 2), ("mesher", 1)]);
    let daemon = Daemon::run(&site.path("tallyd.toml"), &site.path("vendor.pub"));
    let mut reports = Vec::new();
    let mut export = |daemon: &Daemon| {
        let path = site.path(&format!("usage-{}.report", reports.len() + 1));
        ok(run(admin(daemon, &site)
            .args(["report", "--out"])
            .arg(&path)));
        reports.push(path);
    };
    // Each phase: a reload one second after the last report, usage one second later,
    // then the phase's report.
    let phases: [Phase; 3] = [
        ("C-1001-2026", &["C-1001-trial"], &[("solver", 4)], 4),
        ("C-1001-addon", &[], &[("solver", 3)], 7),
        (
            "C-1001-2027",
            &["C-1001-2026", "C-1001-addon"],
            &[("solver", 10)],
            10,
        ),
    ];
    next_second();
    use_seats(&daemon, "solver", 2);
    use_seats(&daemon, "mesher", 1);
    next_second();
    export(&daemon);
    for (id, supersedes, features, solver) in phases {
        site.issue(id, supersedes, features);
        next_second();
        ok(run(admin(&daemon, &site).arg("reload")));
        assert_eq!(total(&daemon, "solver"), solver);
        next_second();
        use_seats(&daemon, "solver", solver as u32);
        // mesher came with the trial only: refused from the paid bundle on.
        let out = run(daemon.tally().args(["run", "mesher", "--", "true"]));
        assert_eq!(out.status.code(), Some(75));
        next_second();
        export(&daemon);
    }
    daemon.stop();

    let out = ok(run(Command::new(bin("tally-publisher"))
        .args(["reconcile", "--format", "json", "--bundle"])
        .arg(site.path("bundles"))
        .args(&reports)));
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        doc["bundles"],
        serde_json::json!(["C-1001-2026", "C-1001-2027", "C-1001-addon", "C-1001-trial"])
    );
    // solver: licensed 2, then 4, 7, 10, each from its reload on; never overdrawn.
    let json = |v: &[u32]| v.iter().map(|n| serde_json::json!(n)).collect::<Vec<_>>();
    assert_eq!(
        steps(&doc, "solver"),
        vec![json(&[2]), json(&[2, 4]), json(&[4, 7]), json(&[7, 10])]
    );
    for (i, (licensed, peak)) in [(2, 2), (4, 4), (7, 7), (10, 10)].into_iter().enumerate() {
        let p = period(&doc, "solver", i);
        assert_eq!(p["licensed"], licensed, "period {}: {p}", i + 1);
        assert_eq!(p["peak"], peak, "period {}: {p}", i + 1);
        assert_eq!(p["overdraft_peak"], 0, "period {}: {p}", i + 1);
        assert_eq!(p["overdraft_seat_hours"], 0.0, "period {}: {p}", i + 1);
    }
    // mesher: licensed 1 by the trial while it was used, then not licensed.
    assert_eq!(
        steps(&doc, "mesher"),
        vec![json(&[1]), json(&[1, 0]), json(&[0]), json(&[0])]
    );
    let first = period(&doc, "mesher", 0);
    assert_eq!(first["licensed"], 1, "{first}");
    assert_eq!(first["peak"], 1, "{first}");
    assert_eq!(first["overdraft_peak"], 0, "{first}");
    let total = &feature_of(&doc, "mesher")["total"];
    assert_eq!(total["overdraft_peak"], 0, "{total}");
    assert_eq!(total["overdraft_seat_hours"], 0.0, "{total}");
    assert_eq!(total["denials"]["not_licensed"], 3, "{total}");
    let solver_total = &feature_of(&doc, "solver")["total"];
    assert_eq!(solver_total["overdraft_peak"], 0, "{solver_total}");
    assert_eq!(solver_total["licensed"], 10, "{solver_total}");

    // The report says which bundles were in force when it started.
    let inspected = ok(run(Command::new(bin("tally-publisher"))
        .args(["inspect", "--json"])
        .arg(&reports[2])));
    let r: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(r["bundles_at_start"], serde_json::json!(["C-1001-2026"]));
    assert_eq!(
        r["bundles"],
        serde_json::json!(["C-1001-2026", "C-1001-addon"])
    );
}
