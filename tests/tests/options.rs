//! `tallyd import-options` through the real binary: a real-shaped FlexLM options file
//! converted (exit code, the unmapped lines on stderr with their line numbers, refusal
//! to overwrite), then the written policy served by a real `tallyd` and its rules shown
//! with real `tally` checkouts and borrows as different users.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;
use tally_tests::{bin, wait_until, Daemon, Holder};

/// For the demo bundle's features (solver: 5 seats, borrowable; viewer: 20). Mixed
/// case, comments, a continuation, quoting, two GROUP lines of one group, RESERVE for a
/// GROUP and a HOST_GROUP, MAX for a GROUP, the borrow rules, TIMEOUTALL, and three
/// lines tally cannot say (an INTERNET subject, a VERSION qualifier, REPORTLOG).
const OPTIONS: &str = r#"# Options for the demo vendor daemon
# (kept by IT; see ticket 4711)
GROUPCASEINSENSITIVE ON
TIMEOUTALL 3600

GROUP cfd ana \
          bo
group cfd cy
GROUP interns eve
HOST_GROUP farm rf-01 rf-02

RESERVE 2 solver GROUP cfd
reserve 1 "viewer" HOST_GROUP farm
MAX 1 viewer GROUP interns
EXCLUDE viewer USER mallory
INCLUDE_BORROW solver GROUP cfd
Exclude_Borrow solver USER bo
MAX_BORROW_HOURS solver 48
INCLUDE solver INTERNET 10.1.2.*
MAX 2 solver:VERSION=2.0 USER ana
REPORTLOG +/var/log/lmgrd/report.log
"#;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn import(args: &[&Path], extra: &[&str]) -> Output {
    Command::new(bin("tallyd"))
        .arg("import-options")
        .args(args)
        .args(extra)
        .output()
        .expect("running tallyd import-options")
}

/// `tally ARGS` as `user`, with the user's own borrowed-lease cache under `caches` (a
/// borrowed lease serves whoever reads its cache: one per user, as their homes would).
fn tally_as(daemon: &Daemon, caches: &Path, user: &str, args: &[&str]) -> Output {
    daemon
        .tally()
        .env("USER", user)
        .env("TALLY_CACHE_DIR", caches.join(user))
        .args(args)
        .output()
        .expect("running tally")
}

fn denied(out: &Output, needle: &str) {
    assert_eq!(out.status.code(), Some(75), "{}", stderr(out));
    assert!(
        stderr(out).contains(needle),
        "expected '{needle}' in: {}",
        stderr(out)
    );
}

#[test]
fn an_options_file_becomes_a_policy_that_a_real_tallyd_enforces() {
    let dir = tempfile::tempdir().unwrap();
    let options = dir.path().join("demo.opt");
    std::fs::write(&options, OPTIONS).unwrap();
    let policy = dir.path().join("policy.toml");

    let out = import(&[&options], &["--out", policy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let name = options.display().to_string();
    let listed: Vec<String> = stderr(&out).lines().map(str::to_string).collect();
    assert_eq!(listed.len(), 3, "{listed:?}");
    for (line, text, why) in [
        (
            19,
            "INCLUDE solver INTERNET 10.1.2.*",
            "INTERNET (IP address)",
        ),
        (20, "MAX 2 solver:VERSION=2.0 USER ana", "'VERSION=2.0'"),
        (21, "REPORTLOG +/var/log/lmgrd/report.log", "report_dir"),
    ] {
        let prefix = format!("{name}:{line}: not mapped: {text} -- ");
        assert!(
            listed
                .iter()
                .any(|l| l.starts_with(&prefix) && l.contains(why)),
            "no '{prefix}...{why}' in {listed:?}"
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("13 line(s) mapped, 3 not mapped"),
        "{stdout}"
    );
    let written = std::fs::read_to_string(&policy).unwrap();
    assert!(
        written.contains("# line 12: RESERVE 2 solver GROUP cfd\n[[reserve]]"),
        "{written}"
    );

    // An existing --out is kept unless --force.
    let again = import(&[&options], &["--out", policy.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(64), "{}", stderr(&again));
    assert!(stderr(&again).contains("exists; --force replaces it"));
    assert_eq!(std::fs::read_to_string(&policy).unwrap(), written);
    let forced = import(&[&options], &["--out", policy.to_str().unwrap(), "--force"]);
    assert_eq!(forced.status.code(), Some(0), "{}", stderr(&forced));

    // A garbled file: 65, naming the line; nothing written.
    let garbled = dir.path().join("garbled.opt");
    std::fs::write(&garbled, "GROUP cfd ana\nRESERVE two solver USER ana\n").unwrap();
    let none = dir.path().join("none.toml");
    let out = import(&[&garbled], &["--out", none.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "{}:2: RESERVE: 'two' is not a number of seats",
            garbled.display()
        )),
        "{}",
        stderr(&out)
    );
    assert!(!none.exists());
    assert_eq!(import(&[], &[]).status.code(), Some(64));

    // The written policy, served.
    let policy_arg = policy.display().to_string();
    let daemon = Daemon::start(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &["--policy", &policy_arg],
    );
    let cache = dir.path().join("cache");
    let cache = cache.as_path();

    // EXCLUDE: mallory gets no viewer, with the reason.
    denied(
        &tally_as(&daemon, cache, "mallory", &["run", "viewer", "--", "true"]),
        "'viewer' is not available to user mallory (excluded by the site's policy)",
    );

    // EXCLUDE_BORROW: bo may not borrow solver, INCLUDE_BORROW keeps eve out too; bo
    // still checks it out on site, and ana (cfd) borrows it.
    for user in ["bo", "eve"] {
        denied(
            &tally_as(&daemon, cache, user, &["borrow", "solver", "--for", "1d"]),
            "'solver' may not be borrowed",
        );
    }
    assert_eq!(daemon.in_use("solver"), 0);
    let out = tally_as(&daemon, cache, "bo", &["run", "solver", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // MAX_BORROW_HOURS 48: three days is too long, one is fine.
    denied(
        &tally_as(&daemon, cache, "ana", &["borrow", "solver", "--for", "3d"]),
        "may be borrowed for at most 48 hours",
    );
    let out = tally_as(&daemon, cache, "ana", &["borrow", "solver", "--for", "1d"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(daemon.in_use("solver"), 1);

    // RESERVE 2 for cfd: ana's borrowed seat is one of them. dee takes the 3 others;
    // eve, outside cfd, is refused the last one, which ANA (same user, any case) gets.
    use std::os::unix::process::CommandExt;
    let dee = daemon
        .tally()
        .env("USER", "dee")
        .args(["run", "solver", "--count", "3", "--", "sleep", "120"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let _dee = Holder::from_child(dee);
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 4));
    denied(
        &tally_as(&daemon, cache, "eve", &["run", "solver", "--", "true"]),
        "reserved for group cfd",
    );
    let out = tally_as(&daemon, cache, "ANA", &["run", "solver", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}
