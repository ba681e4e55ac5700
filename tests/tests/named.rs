//! Named users through real checkouts: a vendor-signed bundle licensing `solver` to 2
//! named users with a 30-day change period, the site's policy listing them, a real
//! `tallyd` and real `tally run`s as different users (`USER=`); the admin replaces a
//! name and reloads by SIGHUP, then the daemon is SIGKILLed and restarted.

use std::process::Output;
use std::time::Duration;
use tally_protocol::time::UnixTime;
use tally_tests::{assert_denied, run_as, wait_until, VendorSite};

const SPEC: &str = r#"
id = "named-1"
vendor = "Acme Simulation"
[customer]
id = "C-1001"
name = "Example Corp"

[[feature]]
name = "solver"
seats = 5
named = "user"
named_limit = 2
named_change_days = 30

[[feature]]
name = "viewer"
seats = 5
"#;

fn served(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

#[test]
fn named_users_are_served_refused_and_keep_their_places_across_a_reload_and_a_restart() {
    let site = VendorSite::new();
    site.issue_spec("named-1", SPEC);
    let policy = site.path("policy.toml");
    // dee is listed third: beyond the licence's 2, refused, and check-config says so.
    std::fs::write(
        &policy,
        "[[named]]\nfeature = \"solver\"\nusers = [\"ana\", \"bo\", \"dee\"]\n\
         [[named]]\nfeature = \"viewer\"\nusers = [\"ana\"]\n",
    )
    .unwrap();
    let config = std::fs::read_to_string(site.path("tallyd.toml")).unwrap();
    std::fs::write(
        site.path("tallyd.toml"),
        format!("{config}policy = \"{}\"\n", policy.display()),
    )
    .unwrap();
    let checked = site.check_config();
    let report = String::from_utf8_lossy(&checked.stdout).to_string()
        + &String::from_utf8_lossy(&checked.stderr);
    assert_eq!(checked.status.code(), Some(0), "{report}");
    assert!(
        report.contains("named solver users: ana, bo, dee"),
        "{report}"
    );
    assert!(
        report.contains("the first 2 count, these are refused: dee"),
        "{report}"
    );
    assert!(
        report.contains("named for 'viewer': the feature is not licensed to named users"),
        "{report}"
    );

    let daemon = site.daemon();
    served(&run_as(&daemon, "ana", &["solver"]));
    let before = UnixTime::now();
    served(&run_as(&daemon, "bo", &["solver"]));
    let after = UnixTime::now();
    // bo's place frees 30 days after its first run (a date either side of a midnight
    // the run may have crossed).
    let frees = [before, after].map(|t| t.plus_secs(30 * 86_400).date());
    served(&run_as(&daemon, "ana", &["solver"]));
    assert_denied(
        &run_as(&daemon, "cy", &["solver"]),
        "'solver' is licensed to 2 named users (ana, bo); cy is not one of them: \
         ask your administrator",
    );
    assert_denied(
        &run_as(&daemon, "dee", &["solver"]),
        "dee is listed after them, beyond the limit",
    );
    // Features not licensed to named users serve anyone.
    served(&run_as(&daemon, "cy", &["viewer"]));

    // The admin replaces bo by cy and reloads: bo's place is kept 30 days, cy waits.
    std::fs::write(
        &policy,
        "[[named]]\nfeature = \"solver\"\nusers = [\"ana\", \"cy\"]\n",
    )
    .unwrap();
    daemon.signal("HUP");
    let mut last = String::new();
    let reloaded = wait_until(Duration::from_secs(20), || {
        let out = run_as(&daemon, "cy", &["solver"]);
        last = String::from_utf8_lossy(&out.stderr).to_string();
        last.contains("cy waits for a place")
    });
    assert!(reloaded, "the reload never applied: {last}");
    let says_date = |out: &Output| {
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(75), "{stderr}");
        assert!(
            frees
                .iter()
                .any(|d| stderr.contains(&format!("bo's place frees on {d}"))),
            "expected bo's place to free on {frees:?}: {stderr}"
        );
    };
    says_date(&run_as(&daemon, "cy", &["solver"]));
    assert_denied(&run_as(&daemon, "bo", &["solver"]), "bo is not one of them");
    served(&run_as(&daemon, "ana", &["solver"]));

    // SIGKILL and restart on the same address: the places come back from the store.
    let config = std::fs::read_to_string(site.path("tallyd.toml")).unwrap();
    std::fs::write(
        site.path("tallyd.toml"),
        config.replace("127.0.0.1:0", &daemon.addr.to_string()),
    )
    .unwrap();
    daemon.kill();
    let daemon = site.daemon();
    says_date(&run_as(&daemon, "cy", &["solver"]));
    served(&run_as(&daemon, "ana", &["solver"]));
    daemon.stop();
}
