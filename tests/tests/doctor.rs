//! `tally doctor`: what usually goes wrong, said with what to fix.

use std::process::Command;
use tally_tests::{bin, Daemon};

#[test]
fn doctor_reports_a_healthy_server_and_names_the_problems() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("data"), "127.0.0.1:0", &[]);
    let out = daemon.tally().args(["doctor", "solver"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("answers over QUIC"), "{text}");
    assert!(text.contains("trust chain: server key"), "{text}");
    assert!(text.contains("clock skew"), "{text}");
    assert!(text.contains("'solver' can be checked out"), "{text}");
    // The demo's evaluation ends within 30 days: a warning, not a failure.
    assert!(text.contains("WARN  'optimizer' ends after"), "{text}");

    // A feature this server does not license: the reason, exit 75 (the server answered;
    // 69 is for no server at all).
    let out = daemon.tally().args(["doctor", "mesher"]).output().unwrap();
    assert_eq!(out.status.code(), Some(75));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not licensed"));

    // Nothing listening: what to check.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = Command::new(bin("tally"))
        .args(["--server", &dead.to_string(), "--demo", "doctor"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stdout).contains("UDP port"));
}
