//! Each policy rule through a real checkout: `tallyd demo --policy` and `tally run` as
//! different users; the queue; admin removal and shutdown.

use std::time::Duration;
use tally_tests::{assert_denied, run_as, wait_until, Daemon, Holder};

const POLICY: &str = r#"
[groups]
cfd = ["ana", "bo"]

[[reserve]]
feature = "solver"
seats = 2
group = "cfd"

[[max]]
feature = "solver"
seats = 1
user = "cy"

[[include]]
feature = "viewer"
group = "cfd"

[[exclude]]
feature = "viewer"
user = "bo"

[[exclude]]
feature = "optimizer"
host = "THIS_HOST"
"#;

#[test]
fn policy_rules_apply_to_real_checkouts() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    std::fs::write(&policy, POLICY.replace("THIS_HOST", host.trim())).unwrap();
    let policy_arg = policy.display().to_string();
    let daemon = Daemon::start(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &["--policy", &policy_arg],
    );

    // INCLUDE and EXCLUDE on viewer.
    assert_eq!(
        run_as(&daemon, "ana", &["viewer", "--", "true"])
            .status
            .code(),
        Some(0)
    );
    assert_denied(
        &run_as(&daemon, "cy", &["viewer", "--", "true"]),
        "include list",
    );
    assert_denied(
        &run_as(&daemon, "bo", &["viewer", "--", "true"]),
        "not available to user bo",
    );

    // EXCLUDE by host: nobody on this machine gets the optimizer.
    assert_denied(
        &run_as(&daemon, "ana", &["optimizer", "--", "true"]),
        &format!("not available to host {}", host.trim()),
    );

    // MAX: cy may hold one seat of solver.
    let _cy = Holder::start_as(&daemon, Some("cy"), &["solver"], 120);
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 1));
    assert_denied(
        &run_as(&daemon, "cy", &["solver", "--", "true"]),
        "allows user cy at most 1 seat",
    );

    // RESERVE: of 5 seats, 2 are kept for cfd; others get 3 in all.
    let _dee = Holder::start_as(&daemon, Some("dee"), &["solver", "--count", "2"], 120);
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 3));
    assert_denied(
        &run_as(&daemon, "eve", &["solver", "--", "true"]),
        "reserved for group cfd",
    );
    assert_eq!(
        run_as(&daemon, "ana", &["solver", "--", "true"])
            .status
            .code(),
        Some(0)
    );
}

#[test]
fn a_waiting_checkout_gets_the_next_free_seat_and_sees_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("data"), "127.0.0.1:0", &[]);
    let mut holder = Holder::start_with(&daemon, &["solver", "--count", "5"], 120);
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 5));
    // Without waiting: denied at once. With --wait: queued until the holder leaves.
    assert_denied(
        &run_as(&daemon, "ana", &["solver", "--", "true"]),
        "all 5 seats",
    );
    let waiter = daemon
        .tally()
        .env("USER", "ana")
        .args(["run", "solver", "--wait", "60", "--", "true"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || daemon.feature("solver")
            ["queue"]
            .as_array()
            .is_some_and(|q| q.len() == 1 && q[0]["user"] == "ana")),
        "the waiter is not in the queue"
    );
    holder.kill_group();
    let out = waiter.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("position 1 in the queue"), "{stderr}");
    assert!(daemon.feature("solver")["queue"]
        .as_array()
        .unwrap()
        .is_empty());
    // A wait that runs out: exit 75, and nothing left in the queue.
    let _again = Holder::start_with(&daemon, &["solver", "--count", "5"], 120);
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 5));
    assert_denied(
        &run_as(&daemon, "bo", &["solver", "--wait", "2", "--", "true"]),
        "within 2 s",
    );
    assert!(daemon.feature("solver")["queue"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn admin_remove_frees_a_seat_and_admin_shutdown_stops_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // No hold-off after the removal (0 turns it off; tests/tests/admin_truth.rs has it
    // on): the removed holder takes a free seat again at once.
    let daemon = Daemon::start(
        &data,
        "127.0.0.1:0",
        &[
            "--heartbeat-secs",
            "1",
            "--lease-ttl-secs",
            "10",
            "--remove-holdoff-secs",
            "0",
        ],
    );
    let _holder = Holder::start_with(&daemon, &["solver", "--count", "5"], 120);
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 5));
    let lease = daemon.feature("solver")["holders"][0]["lease"]
        .as_str()
        .unwrap()
        .to_string();
    let token = data.join("admin.token");
    let out = daemon
        .tally()
        .args(["admin", "--admin-token-file"])
        .arg(&token)
        .args(["remove", &lease])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(daemon
        .log_text()
        .contains("lease removed by the administrator"));
    // The holder hears "removed" on its next heartbeat and takes a free seat again, as
    // a running application would; the lease id changes.
    assert!(
        wait_until(Duration::from_secs(30), || {
            let h = &daemon.feature("solver")["holders"];
            h.as_array()
                .is_some_and(|a| a.len() == 1 && a[0]["lease"] != lease.as_str())
        }),
        "log:\n{}",
        daemon.log_text()
    );
    // Without the token: refused.
    let out = daemon
        .tally()
        .args(["admin", "--admin-token-file", "/dev/null", "shutdown"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(77));
    let out = daemon
        .tally()
        .args(["admin", "--admin-token-file"])
        .arg(&token)
        .arg("shutdown")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        daemon.wait_exit(Duration::from_secs(30)),
        "tallyd did not stop"
    );
    assert!(daemon
        .log_text()
        .contains("shutting down on an admin request"));
}
