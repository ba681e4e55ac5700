//! `tallyd`'s command line: exit codes and messages for bad input.

use std::process::Command;

fn tallyd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tallyd"))
}

#[test]
fn unknown_subcommand_is_a_usage_error() {
    let out = tallyd().arg("serve-everything").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("serve-everything"));
}

#[test]
fn impossible_timing_is_refused_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let out = tallyd()
        .args(["demo", "--listen", "127.0.0.1:0", "--lease-ttl-secs", "10"])
        .args(["--heartbeat-secs", "30", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lease_ttl_secs (10)"), "{stderr}");
}

#[test]
fn init_creates_an_owner_only_identity_and_refuses_a_readable_one() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = tallyd()
        .arg("init")
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = dir.path().join("server.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let first = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(first.contains("created"), "{first}");
    // Running init again keeps the same key.
    let again = tallyd()
        .arg("init")
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let fp = |s: &str| s.lines().last().unwrap_or("").to_string();
    assert_eq!(fp(&first), fp(&String::from_utf8_lossy(&again.stdout)));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = tallyd()
        .arg("init")
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
}
