//! `tally`'s command line: usage errors exit 64 and say what to do.

use std::process::Command;

fn tally() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tally"));
    c.env_remove("TALLY_SERVER");
    c
}

#[test]
fn missing_trust_is_a_usage_error_that_says_what_to_pass() {
    let out = tally().arg("status").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--vendor-pub") && stderr.contains("--demo"),
        "{stderr}"
    );
}

#[test]
fn run_without_a_command_is_a_usage_error() {
    let out = tally().args(["--demo", "run", "solver"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn unreadable_vendor_key_names_the_file() {
    let out = tally()
        .args(["--vendor-key", "/nonexistent/vendor.pub", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/vendor.pub"));
}
