//! Issue 14, "a returned renewal brings back what it replaced": trial, then a paid
//! bundle, an add-on, and a renewal superseding both. Returning the renewal must give
//! back everything it replaced, for good: after a restart the server serves none of
//! it (also once the returned file is deleted), `check-config` lists none of it as
//! served, and the proof tells the vendor exactly which seats stopped.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;
use tally_tests::{bin, ok, run, wait_until, Daemon, VendorSite as Site};

/// Seats of `feature` the daemon serves (0 when it serves none).
fn total(daemon: &Daemon, feature: &str) -> u64 {
    daemon.status()["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == feature)
        .map_or(0, |f| f["total"].as_u64().unwrap())
}

/// The bundle ids `check-config` lists as served.
fn served(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.split_once(": bundle ").map(|(_, rest)| rest))
        .filter(|rest| rest.contains(" for Example Corp"))
        .map(|rest| rest.split_whitespace().next().unwrap().to_string())
        .collect()
}

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn return_bundle(site: &Site, id: &str, proof: &Path) -> String {
    ok(run(Command::new(bin("tallyd"))
        .arg("return")
        .arg("--config")
        .arg(site.path("tallyd.toml"))
        .args(["--bundle", id, "--out"])
        .arg(proof)))
}

#[test]
fn a_returned_renewal_keeps_what_it_superseded_given_back() {
    let site = Site::new();
    site.issue("C-1001-trial", &[], &[("solver", 2)]);
    site.issue("C-1001-2026", &["C-1001-trial"], &[("solver", 4)]);
    site.issue("C-1001-addon", &[], &[("solver", 3)]);
    let renewal = site.issue(
        "C-1001-2027",
        &["C-1001-2026", "C-1001-addon"],
        &[("solver", 10)],
    );
    // A bundle of another product line that the return does not touch.
    site.issue("C-1001-viewer", &[], &[("viewer", 5)]);

    let daemon = site.daemon();
    assert_eq!(total(&daemon, "solver"), 10);
    assert_eq!(total(&daemon, "viewer"), 5);
    daemon.stop();

    // The return: the proof says what stopped and what never counts again.
    let proof = site.path("C-1001-2027.return");
    let said = return_bundle(&site, "C-1001-2027", &proof);
    assert!(said.contains("solver: 10 seats"), "{said}");
    assert!(
        said.contains("never count here again: C-1001-2026, C-1001-addon, C-1001-trial"),
        "{said}"
    );
    let verified = ok(run(Command::new(bin("tally-publisher"))
        .arg("verify-return")
        .arg("--bundle")
        .arg(&renewal)
        .arg(&proof)));
    assert!(verified.contains("may issue its seats"), "{verified}");
    assert!(
        verified.contains("stopped serving:\n    solver: 10 seats, permanent (bundle C-1001-2027)"),
        "{verified}"
    );
    assert!(
        verified.contains("never count there again: C-1001-2026, C-1001-addon, C-1001-trial"),
        "{verified}"
    );
    assert!(!verified.contains("warning"), "{verified}");
    let inspected = ok(run(Command::new(bin("tally-publisher"))
        .args(["inspect", "--json"])
        .arg(&proof)));
    let doc: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(
        doc["released"]["retired"],
        serde_json::json!(["C-1001-2026", "C-1001-addon", "C-1001-trial"])
    );
    assert_eq!(
        doc["released"]["stopped_serving"],
        serde_json::json!([{"bundle": "C-1001-2027", "feature": "solver", "seats": 10, "grant": "solver: 10 seats, permanent"}])
    );

    // After a restart the old server serves none of the solver seats: not the returned
    // renewal, not the paid bundle or the add-on it superseded, not the trial.
    let daemon = site.daemon();
    assert_eq!(total(&daemon, "solver"), 0, "log:\n{}", daemon.log_text());
    assert_eq!(total(&daemon, "viewer"), 5);
    let out = run(daemon.tally().args(["run", "solver", "--", "true"]));
    assert_eq!(
        out.status.code(),
        Some(75),
        "a solver seat was granted after the return: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(daemon.log_text().contains(
        "bundle C-1001-2026 is superseded by bundle C-1001-2027, which this server returned"
    ));
    // A reload reads the directory again and keeps it that way; the returned file is
    // refused by name (exit 65).
    let out = run(daemon
        .tally()
        .args(["admin", "--admin-token-file"])
        .arg(site.path("data/admin.token"))
        .arg("reload"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{err}");
    assert!(err.contains("tally: refused: "), "{err}");
    assert_eq!(total(&daemon, "solver"), 0);
    daemon.stop();

    // check-config agrees: the returned file is refused by name, the rest is not served.
    let out = site.check_config();
    assert_eq!(out.status.code(), Some(65));
    assert_eq!(
        served(&stdout_of(&out)),
        vec!["C-1001-viewer"],
        "{}",
        stdout_of(&out)
    );
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("C-1001-2027.bundle: refused: bundle C-1001-2027 was returned"));

    // Deleting the returned file brings nothing back: the return recorded what it retired.
    std::fs::remove_file(&renewal).unwrap();
    let out = site.check_config();
    assert_eq!(out.status.code(), Some(0), "{}", stdout_of(&out));
    let text = stdout_of(&out);
    assert_eq!(served(&text), vec!["C-1001-viewer"], "{text}");
    assert!(
        text.contains(
            "bundle C-1001-addon is superseded by bundle C-1001-2027, which this server returned"
        ),
        "{text}"
    );
    let daemon = site.daemon();
    assert!(wait_until(Duration::from_secs(10), || total(
        &daemon, "viewer"
    ) == 5));
    assert_eq!(total(&daemon, "solver"), 0);
}
