//! The walking skeleton end to end: the real `tallyd demo` and real `tally` processes on
//! loopback, a real sled store in a temp dir.

use std::time::Duration;
use tally_tests::{wait_until, Daemon, Holder};

#[test]
fn run_checks_out_runs_and_checks_in_with_the_commands_status() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("data"), "127.0.0.1:0", &[]);
    let out = daemon
        .tally()
        .args(["run", "solver", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = daemon
        .tally()
        .args(["run", "viewer", "--count", "2", "--", "sh", "-c", "exit 3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    // Checked in at exit: nothing left held.
    assert_eq!(daemon.in_use("solver"), 0);
    assert_eq!(daemon.in_use("viewer"), 0);
    // The demo bundle's features as promised.
    let status = daemon.status();
    assert_eq!(status["demo"], true);
    assert_eq!(daemon.feature("solver")["total"], 5);
    assert_eq!(daemon.feature("viewer")["total"], 20);
    assert_eq!(daemon.feature("optimizer")["evaluation"], true);
    assert!(daemon.feature("optimizer")["expires"].is_string());
    // Not licensed here: a denial, exit 75, with the reason.
    let out = daemon
        .tally()
        .args(["run", "mesher", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75));
    assert!(String::from_utf8_lossy(&out.stderr).contains("'mesher' is not licensed"));
    // A command that does not exist: 127, and the seat is not kept.
    let out = daemon
        .tally()
        .args(["run", "solver", "--", "/nonexistent/program"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127));
    assert_eq!(daemon.in_use("solver"), 0);
}

#[test]
fn seats_are_counted_reclaimed_on_kill_and_kept_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Short timings so the test runs in seconds: a killed client's connection times out
    // after 5 s; leases live 6 s without heartbeats, heartbeats come every 2 s.
    let timing = [
        "--idle-timeout-secs",
        "5",
        "--lease-ttl-secs",
        "6",
        "--heartbeat-secs",
        "2",
    ];
    let daemon = Daemon::start(&data, "127.0.0.1:0", &timing);
    let mut holders: Vec<Holder> = (0..5)
        .map(|_| Holder::start(&daemon, "solver", 120))
        .collect();
    assert!(
        wait_until(Duration::from_secs(30), || daemon.in_use("solver") == 5),
        "5 holders did not get their seats; log:\n{}",
        daemon.log_text()
    );

    // The sixth is denied with the reason, exit 75.
    let out = daemon
        .tally()
        .args(["run", "solver", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("all 5 seats of 'solver' are in use (5 held"),
        "{stderr}"
    );

    // A holder dies without a word (SIGKILL): its seat comes back when its connection
    // times out, long before the lease TTL of a FlexLM-style server would.
    holders[0].kill_group();
    assert!(
        wait_until(Duration::from_secs(30), || daemon.in_use("solver") == 4),
        "the killed holder's seat was not freed; log:\n{}",
        daemon.log_text()
    );
    assert!(daemon.log_text().contains("reason=connection closed"));

    // The daemon is killed and restarted on the same data dir and port: the four leases
    // held across the restart are still counted, the moment it is back.
    let before: Vec<String> = lease_ids(&daemon);
    assert_eq!(before.len(), 4);
    let addr = daemon.addr.to_string();
    daemon.kill();
    let daemon = Daemon::start(&data, &addr, &timing);
    assert_eq!(daemon.in_use("solver"), 4);
    assert_eq!(lease_ids(&daemon), before);
    // Their holders re-attach (the connection is reset, the client reconnects and
    // heartbeats with its lease secret): after a full TTL has passed, the same four
    // leases are still there, and no fifth seat was taken by a reconnect.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(lease_ids(&daemon), before, "log:\n{}", daemon.log_text());
    assert_eq!(daemon.in_use("solver"), 4);
    let out = daemon
        .tally()
        .args(["run", "solver", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    drop(holders);
}

fn lease_ids(daemon: &Daemon) -> Vec<String> {
    let mut ids: Vec<String> = daemon.feature("solver")["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["lease"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}
