//! Issue 15, "tallyd's own messages and logs": what an admin reads when something is off
//! (a second tallyd on the same data dir, a missing config file, a policy rule for a
//! feature nobody sells), the log file for sites without journald, and `TALLY_LOG` on
//! the client showing tally's steps rather than quinn's. All through the real binaries.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tally_tests::{bin, ok, run, wait_until, Daemon, VendorSite as Site};

/// Appends `line` to the site's tallyd.toml.
fn configure(site: &Site, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(site.path("tallyd.toml"))
        .unwrap();
    writeln!(f, "{line}").unwrap();
}

/// A `tally run FEATURE -- true` against `daemon` that must succeed.
fn use_a_seat(daemon: &Daemon, feature: &str) {
    ok(run(daemon.tally().args(["run", feature, "--", "true"])));
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_second_tallyd_on_a_used_data_dir_says_another_tallyd_is_using_it_and_exits_75() {
    // `tallyd demo`: the second one names the data dir, not an OS error struct.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = Daemon::start(&data, "127.0.0.1:0", &[]);
    // What a snapshot in progress of the running store looks like: a second tallyd must
    // not take it for a leftover and move it away.
    let in_progress = data.join("store/snap.00000000000000ff.generating");
    std::fs::write(&in_progress, b"being written").unwrap();
    let out = run(Command::new(bin("tallyd"))
        .args(["demo", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(
        stderr.contains(&format!("another tallyd is using {}", data.display())),
        "{stderr}"
    );
    for noise in ["Os {", "WouldBlock", "code: 11", "IO error"] {
        assert!(!stderr.contains(noise), "{noise} in: {stderr}");
    }
    assert_eq!(stderr.lines().count(), 1, "one message: {stderr}");
    assert!(in_progress.exists(), "the running store's file was moved");
    assert!(!data.join("store/quarantine").exists());
    // The first one serves on.
    use_a_seat(&first, "solver");

    // `tallyd run` with a config file: the same.
    let site = Site::new();
    site.issue("C-1001-2026", &[], &[("solver", 2)]);
    let daemon = site.daemon();
    let out = run(Command::new(bin("tallyd"))
        .arg("run")
        .arg("--config")
        .arg(site.path("tallyd.toml")));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "another tallyd is using {}",
            site.path("data").display()
        )),
        "{stderr}"
    );
    use_a_seat(&daemon, "solver");
    // `tallyd return` while tallyd runs: the same code, and nothing recorded.
    let out = run(Command::new(bin("tallyd"))
        .arg("return")
        .arg("--config")
        .arg(site.path("tallyd.toml"))
        .args(["--bundle", "C-1001-2026", "--out"])
        .arg(site.path("C-1001-2026.return")));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("stop tallyd before returning"), "{stderr}");
    assert!(!site.path("C-1001-2026.return").exists());
    assert!(!site.path("data/returned-bundles").exists());
    daemon.stop();
}

#[test]
fn a_missing_config_file_is_reported_once_with_its_path_and_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere/tallyd.toml");
    for command in ["run", "check-config", "diagnose"] {
        let mut cmd = Command::new(bin("tallyd"));
        cmd.arg(command).arg("--config").arg(&missing);
        if command == "diagnose" {
            cmd.arg("--out").arg(dir.path().join("support.json"));
        }
        let out = run(&mut cmd);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{command}: {stderr}");
        assert_eq!(
            stderr.matches(&missing.display().to_string()).count(),
            1,
            "{command}: {stderr}"
        );
        assert_eq!(
            stderr.matches("No such file or directory").count(),
            1,
            "{command}: {stderr}"
        );
    }
}

#[test]
fn the_log_file_gets_every_grant_and_release_line_and_is_reopened_on_sighup() {
    let site = Site::new();
    site.issue("C-1001-2026", &[], &[("solver", 2)]);
    let log = site.path("log/tallyd.log");
    std::fs::create_dir_all(site.path("log")).unwrap();
    configure(&site, &format!("log_file = \"{}\"", log.display()));
    let daemon = site.daemon();
    use_a_seat(&daemon, "solver");
    let grant_and_release = |path: &Path| {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines()
            .any(|l| l.contains(" granted") && l.contains("feature=solver"))
            && text.lines().any(|l| l.contains(" released"))
    };
    assert!(
        wait_until(Duration::from_secs(10), || grant_and_release(&log)),
        "log file:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // The same lines as stderr (journald), without colours.
    let file = std::fs::read_to_string(&log).unwrap();
    let grant = file.lines().find(|l| l.contains(" granted")).unwrap();
    let lease = grant
        .split_whitespace()
        .find(|w| w.starts_with("lease="))
        .unwrap();
    assert!(
        daemon
            .log_text()
            .lines()
            .any(|l| l.contains(" granted") && l.contains(lease)),
        "stderr:\n{}",
        daemon.log_text()
    );
    assert!(!file.contains('\u{1b}'), "colour codes in the log file");
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode & 0o027, 0, "log file mode {mode:o}: at most 0640");

    // logrotate: rename, SIGHUP; the new file gets the next lines, the old one is whole.
    let rotated = site.path("log/tallyd.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    daemon.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_to_string(&log)
            .is_ok_and(|t| t.contains("SIGHUP"))),
        "no new log file after SIGHUP; stderr:\n{}",
        daemon.log_text()
    );
    use_a_seat(&daemon, "solver");
    assert!(wait_until(Duration::from_secs(10), || grant_and_release(
        &log
    )));
    assert!(grant_and_release(&rotated));
    daemon.stop();
    // A support bundle of a site without journald carries the log file's last lines.
    ok(run(Command::new(bin("tallyd"))
        .arg("diagnose")
        .arg("--config")
        .arg(site.path("tallyd.toml"))
        .arg("--out")
        .arg(site.path("support.json"))));
    let support: serde_json::Value =
        serde_json::from_slice(&std::fs::read(site.path("support.json")).unwrap()).unwrap();
    let recent = support["recent_log"].as_str().unwrap();
    assert!(
        recent.contains(" granted") && recent.contains("stopped"),
        "{recent}"
    );
    // Appended across restarts, never truncated.
    let before = std::fs::read_to_string(&log).unwrap();
    let daemon = site.daemon();
    daemon.stop();
    let after = std::fs::read_to_string(&log).unwrap();
    assert!(
        after.starts_with(&before) && after.len() > before.len(),
        "{after}"
    );
}

#[test]
fn log_file_on_the_command_line_and_a_log_that_cannot_be_written_does_not_stop_serving() {
    let site = Site::new();
    site.issue("C-1001-2026", &[], &[("solver", 2)]);
    // --log-file wins over the config's log_file.
    configure(
        &site,
        &format!("log_file = \"{}\"", site.path("config.log").display()),
    );
    let flag_log = site.path("flag.log");
    let daemon = Daemon::spawn(
        &[
            "run".into(),
            "--config".into(),
            site.path("tallyd.toml").into(),
            "--log-file".into(),
            flag_log.clone().into(),
        ],
        &site.path("tallyd.toml"),
        vec![
            "--vendor-key".into(),
            site.path("vendor.pub").display().to_string(),
        ],
    );
    use_a_seat(&daemon, "solver");
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&flag_log).is_ok_and(|t| t.contains(" granted"))
    }));
    assert!(!site.path("config.log").exists());
    daemon.stop();

    // A full disk under the log file: every write fails. tallyd says so once and serves.
    let daemon = Daemon::spawn(
        &[
            "run".into(),
            "--config".into(),
            site.path("tallyd.toml").into(),
            "--log-file".into(),
            "/dev/full".into(),
        ],
        &site.path("tallyd.toml"),
        vec![
            "--vendor-key".into(),
            site.path("vendor.pub").display().to_string(),
        ],
    );
    for _ in 0..3 {
        use_a_seat(&daemon, "solver");
    }
    assert!(wait_until(Duration::from_secs(10), || daemon
        .log_text()
        .matches(" released")
        .count()
        >= 3));
    let stderr = daemon.log_text();
    assert_eq!(
        stderr.matches("cannot write log file /dev/full").count(),
        1,
        "{stderr}"
    );
    daemon.stop();

    // A log file that cannot be opened is a start-up error naming it.
    let out = run(Command::new(bin("tallyd"))
        .arg("run")
        .arg("--config")
        .arg(site.path("tallyd.toml"))
        .arg("--log-file")
        .arg(site.path("no/such/dir/tallyd.log")));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("no/such/dir/tallyd.log"), "{stderr}");
}

#[test]
fn a_policy_rule_for_a_feature_no_bundle_has_is_a_warning_and_check_config_shows_borrow_rules() {
    let site = Site::new();
    site.issue("C-1001-2026", &[], &[("solver", 4), ("mesher", 1)]);
    std::fs::write(
        site.path("policy.toml"),
        "[groups]\ncfd = [\"ana\"]\n\
         [[reserve]]\nfeature = \"sovler\"\nseats = 1\ngroup = \"cfd\"\n\
         [[max]]\nfeature = \"solver\"\nseats = 2\nuser = \"bo\"\n\
         [[borrow]]\nfeature = \"solver\"\nmax_hours = 72\n\
         [[borrow]]\nfeature = \"viewer\"\nmax_hours = 8\n",
    )
    .unwrap();
    configure(
        &site,
        &format!("policy = \"{}\"", site.path("policy.toml").display()),
    );
    let out = site.check_config();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let warnings: Vec<&str> = stdout.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 2, "{stdout}");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("reserve rule for feature 'sovler'")),
        "{stdout}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("borrow rule for feature 'viewer'")),
        "{stdout}"
    );
    assert!(stdout.contains("borrow solver at most 72 h"), "{stdout}");
    assert!(stdout.contains("borrow viewer at most 8 h"), "{stdout}");
    assert!(stdout.contains("max solver 2 seat"), "{stdout}");

    // At load, in the log.
    let daemon = site.daemon();
    assert!(
        wait_until(Duration::from_secs(10), || daemon
            .log_text()
            .contains("reserve rule for feature 'sovler'")),
        "{}",
        daemon.log_text()
    );
    assert!(daemon.log_text().contains("WARN"));
    daemon.stop();
}

#[test]
fn tally_log_debug_shows_the_clients_steps_and_not_quinns() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("data"), "127.0.0.1:0", &[]);
    let with_log = |level: &str, args: &[&str]| {
        let out = run(daemon.tally().env("TALLY_LOG", level).args(args));
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stderr)
    };
    let stderr = with_log("debug", &["run", "solver", "--", "true"]);
    for step in [
        "tally_client",
        "QUIC/TLS handshake done",
        "trust chain holds",
        "checkout granted",
        "checkin",
    ] {
        assert!(stderr.contains(step), "{step} missing: {stderr}");
    }
    assert!(!stderr.contains("quinn"), "{stderr}");
    // Requests are named, never dumped: lease secrets stay out of the log.
    assert!(!stderr.contains("secret"), "{stderr}");
    // A bare level, however verbose, stays with tally's lines.
    let stderr = with_log("trace", &["status"]);
    assert!(stderr.contains("trust chain holds"), "{stderr}");
    assert!(!stderr.contains("quinn"), "{stderr}");
    assert!(!stderr.contains("rustls"), "{stderr}");
    // Asked for by name, quinn's lines come.
    let stderr = with_log("debug,quinn_proto=trace", &["status"]);
    assert!(stderr.contains("quinn_proto"), "{stderr}");

    // At the default level a run that goes well says nothing: its own close of the
    // connection is no "connection closed; reconnecting" warning (it was, now and then).
    for _ in 0..20 {
        let out = run(daemon
            .tally()
            .env_remove("TALLY_LOG")
            .args(["run", "solver", "--", "true"]));
        assert!(out.status.success());
        assert_eq!(text(&out.stderr), "", "a quiet run printed something");
    }

    // A C program: TALLY_LOG gives it the same lines on stderr.
    let c = tally_tests::c::compile(
        &[tally_tests::c::root().join("client/examples/c/checkout.c")],
        &["-DTALLY_DEMO".to_string()],
        dir.path(),
        "checkout",
        tally_tests::c::Link::Shared,
    );
    let out = c
        .command()
        .env("TALLY_LOG", "debug")
        .arg(daemon.addr.to_string())
        .arg("solver")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("tally_client"), "{stderr}");
    assert!(stderr.contains("checkout granted"), "{stderr}");
    assert!(!stderr.contains("quinn"), "{stderr}");
    // Without TALLY_LOG the C program's stderr stays quiet.
    let out = c
        .command()
        .env_remove("TALLY_LOG")
        .arg(daemon.addr.to_string())
        .arg("solver")
        .output()
        .unwrap();
    assert!(!text(&out.stderr).contains("tally_client"));
}
