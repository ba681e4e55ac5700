//! The licensing models through real checkouts: a vendor-signed bundle with shared
//! seats, a suite, a package with component counts and a token pool, served by a real
//! `tallyd` to real `tally run` holders (one user on one host, another user by
//! `USER`), across a SIGKILL and restart of the daemon.

use std::time::Duration;
use tally_tests::{
    assert_denied, reconciled_total, run_as, wait_until, Daemon, Holder, VendorSite,
};

const SPEC: &str = r#"
id = "models-1"
vendor = "Acme Simulation"
[customer]
id = "C-1001"
name = "Example Corp"

[[feature]]
name = "solver"
seats = 1
share = "user+host"

[[feature]]
name = "studio"
seats = 1
suite = true
components = ["mesh:3.1:2", "view"]

[[feature]]
name = "cae"
seats = 2
components = ["post:2024.06:3"]

[[feature]]
name = "credits"
seats = 10

[[feature]]
name = "optimizer"
token_pool = "credits"
tokens = 4
"#;

fn leases(daemon: &Daemon, feature: &str) -> usize {
    daemon.feature(feature)["holders"]
        .as_array()
        .map_or(0, Vec::len)
}

/// Waits until `feature` shows `leases` holders and `pool` `seats` in use.
fn settle(daemon: &Daemon, feature: &str, holders: usize, pool: &str, seats: u64) {
    assert!(
        wait_until(Duration::from_secs(20), || leases(daemon, feature)
            == holders
            && daemon.in_use(pool) == seats),
        "{feature}: {} holders (want {holders}); {pool}: {} in use (want {seats})",
        leases(daemon, feature),
        daemon.in_use(pool)
    );
}

#[test]
fn every_model_counts_real_checkouts_and_keeps_counting_after_a_restart() {
    let site = VendorSite::new();
    site.issue_spec("models-1", SPEC);
    let daemon = site.daemon();

    // Shared seats: three runs of ana on this host hold solver's one seat; bo gets none.
    let mut held: Vec<Holder> = (0..3)
        .map(|_| Holder::start_as(&daemon, Some("ana"), &["solver"], 120))
        .collect();
    settle(&daemon, "solver", 3, "solver", 1);
    assert_denied(&run_as(&daemon, "bo", &["solver"]), "solver");

    // A suite: ana's mesh (twice: 2 per suite seat) and view use the one studio seat.
    held.push(Holder::start_as(
        &daemon,
        Some("ana"),
        &["mesh", "--version", "3.1"],
        120,
    ));
    held.push(Holder::start_as(
        &daemon,
        Some("ana"),
        &["mesh", "--version", "3.1"],
        120,
    ));
    held.push(Holder::start_as(&daemon, Some("ana"), &["view"], 120));
    settle(&daemon, "view", 1, "studio", 1);
    settle(&daemon, "mesh", 2, "studio", 1);
    assert_denied(&run_as(&daemon, "bo", &["view"]), "studio");
    // The component's own version ceiling (3.1), not the package's, applies.
    assert_denied(
        &run_as(&daemon, "ana", &["mesh", "--version", "3.2"]),
        "3.1",
    );

    // Component counts: post has 2 x 3 = 6 seats.
    held.push(Holder::start_as(
        &daemon,
        Some("cy"),
        &["post", "--count", "6"],
        120,
    ));
    settle(&daemon, "post", 1, "post", 6);
    assert_denied(&run_as(&daemon, "dy", &["post"]), "post");

    // Tokens: two optimizer runs spend 8 of the 10 credits; a third needs 4 more.
    held.push(Holder::start_as(&daemon, Some("ana"), &["optimizer"], 120));
    held.push(Holder::start_as(&daemon, Some("bo"), &["optimizer"], 120));
    settle(&daemon, "optimizer", 2, "credits", 8);
    assert_denied(&run_as(&daemon, "cy", &["optimizer"]), "credits");

    // SIGKILL and restart on the same address: the holders re-attach and every pool
    // counts what it counted, no more (sharers and suite members regroup).
    let config = std::fs::read_to_string(site.path("tallyd.toml")).unwrap();
    std::fs::write(
        site.path("tallyd.toml"),
        config.replace("127.0.0.1:0", &daemon.addr.to_string()),
    )
    .unwrap();
    daemon.kill();
    let daemon = site.daemon();
    settle(&daemon, "solver", 3, "solver", 1);
    settle(&daemon, "mesh", 2, "studio", 1);
    settle(&daemon, "post", 1, "post", 6);
    settle(&daemon, "optimizer", 2, "credits", 8);
    assert_denied(&run_as(&daemon, "bo", &["solver"]), "solver");
    assert_denied(&run_as(&daemon, "cy", &["optimizer"]), "credits");
    // `tally status` shows the sharers as one holder with several processes, a token
    // product's seats in tokens, and a suite's components as such.
    let status = tally_tests::ok(tally_tests::run(daemon.tally().arg("status")));
    assert!(status.contains("3 processes sharing 1 seat"), "{status}");
    assert!(status.contains("= 4 tokens of credits"), "{status}");
    assert!(status.contains("(suite studio)"), "{status}");

    // The last sharer's exit gives the seat back; ending one optimizer returns 4 credits.
    for h in held.iter_mut().take(3) {
        h.kill_group();
    }
    held[7].kill_group();
    assert!(
        wait_until(Duration::from_secs(60), || daemon.in_use("solver") == 0
            && daemon.in_use("credits") == 4),
        "solver {} credits {}",
        daemon.in_use("solver"),
        daemon.in_use("credits")
    );
    assert_eq!(run_as(&daemon, "bo", &["solver"]).status.code(), Some(0));

    // The vendor's reconciliation counts what the ledger counted: the pools' seats (a
    // shared seat once, a suite seat per user, tokens), the products' checkouts.
    let doc = site.report_reconciled(&daemon, "models-1");
    let row = |name: &str| -> (u64, u64, u64) {
        let t = reconciled_total(&doc, name);
        (
            t["peak"].as_u64().unwrap(),
            t["grants"].as_u64().unwrap(),
            t["overdraft_peak"].as_u64().unwrap(),
        )
    };
    // (peak seats, checkouts, overdraft peak)
    assert_eq!(row("solver"), (1, 4, 0), "three sharers, then bo");
    assert_eq!(row("studio"), (1, 0, 0), "ana's one suite seat");
    assert_eq!(row("mesh"), (0, 2, 0));
    assert_eq!(row("view"), (0, 1, 0));
    assert_eq!(row("post"), (6, 1, 0));
    assert_eq!(row("credits"), (8, 0, 0), "two draws of 4 tokens");
    assert_eq!(row("optimizer"), (0, 2, 0));
}
