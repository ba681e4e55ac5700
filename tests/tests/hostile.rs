//! Issue 20, hostile input and odd files (scenarios 4, 5, 6 and 8), against the real
//! `tallyd`, `tally` and `tally-publisher` binaries on loopback; every loop is bounded
//! in count and time.
//!
//! - 4: one connection asking for tens of thousands of made-up feature names leaves the
//!   daemon's memory and `/metrics` flat (figures printed, see SECURITY.md).
//! - 5: control characters in identities, feature names and versions are refused with
//!   a clear error, and the forged log line of the issue is not written.
//! - 6: a FIFO and a `/dev/zero` symlink in the bundle directory, and a policy file that
//!   never answers: start, `check-config`, reloads (SIGHUP and admin) and SIGTERM all
//!   finish promptly, memory stays small.
//! - 8: with `status_needs_token`, a denial tells an unauthenticated client how many
//!   seats are held, not by whom; `diagnose` redacts credentials and writes 0600.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_client::{ClientConfig, ClientError, Session, Trust};
use tally_tests::{bin, one_seat, wait_until, Daemon, Holder};

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` to its end, at most `limit`; `None` (and the child killed) if it hangs.
fn run_within(cmd: &mut Command, limit: Duration) -> Option<Output> {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting a tally binary");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => Some(out.expect("waiting for a tally binary")),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            None
        }
    }
}

/// A customer site: vendor key, activated server, one bundle with `solver` = 1 seat.
struct Site {
    root: tempfile::TempDir,
}

impl Site {
    fn new(extra_config: &str) -> Site {
        let site = Site {
            root: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(site.path("bundles")).unwrap();
        for args in [vec!["init", "--data-dir"], vec!["request", "--data-dir"]] {
            let mut c = Command::new(bin("tallyd"));
            c.args(&args).arg(site.path("data"));
            if args[0] == "request" {
                c.arg("--out").arg(site.path("activation.req"));
            }
            ok(c.output().unwrap());
        }
        ok(Command::new(bin("tally-publisher"))
            .args(["keygen", "--out"])
            .arg(site.path("vendor"))
            .output()
            .unwrap());
        std::fs::write(
            site.path("tallyd.toml"),
            format!(
                "listen = \"127.0.0.1:0\"\nhttp = false\ndata_dir = \"{}\"\nbundle_dir = \"{}\"\nvendor_keys = [\"{}\"]\n{extra_config}",
                site.path("data").display(),
                site.path("bundles").display(),
                site.path("vendor.pub").display()
            ),
        )
        .unwrap();
        let spec = site.path("paid.toml");
        std::fs::write(
            &spec,
            "id = \"paid\"\nvendor = \"Acme\"\n[customer]\nid = \"C-1\"\nname = \"Example\"\n[[feature]]\nname = \"solver\"\nseats = 1\n",
        )
        .unwrap();
        ok(Command::new(bin("tally-publisher"))
            .arg("issue")
            .arg("--vendor-key")
            .arg(site.path("vendor.key"))
            .arg("--spec")
            .arg(&spec)
            .arg("--request")
            .arg(site.path("activation.req"))
            .arg("--out")
            .arg(site.path("bundles/paid.bundle"))
            .output()
            .unwrap());
        site
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn daemon(&self) -> Daemon {
        Daemon::run(&self.path("tallyd.toml"), &self.path("vendor.pub"))
    }
}

fn metrics_body(daemon: &Daemon) -> String {
    let (code, body) = daemon.http("GET", "/metrics", None);
    assert_eq!(code, 200, "{body}");
    body
}

/// Scenario 4: every refused checkout added a (feature, reason) counter and a journal
/// row under the name the client chose; one connection grew the daemon by about 38 MB
/// per 100,000 requests.
#[test]
fn distinct_feature_names_from_one_connection_leave_memory_and_metrics_flat() {
    const WARM_UP: usize = 2_000;
    const FLOOD: usize = 30_000;
    const TIME_LIMIT: Duration = Duration::from_secs(240);
    let dir = tempfile::tempdir().unwrap();
    // No rate limit: every request reaches the ledger and the journal (with the limit,
    // the rate-limited denials took the same way into the counters).
    let daemon = Daemon::start(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &["--checkout-rate", "0"],
    );
    let pid = daemon.pid();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut config = ClientConfig::new(vec![daemon.addr.to_string()], Trust::Demo);
    config.local_address = Some(IpAddr::from([127, 0, 0, 1]));
    // A loaded machine may take long over one answer; that is not what is measured.
    config.request_timeout = Duration::from_secs(60);
    let session = Arc::new(rt.block_on(Session::connect(&config)).unwrap());
    let started = Instant::now();
    // 240-byte names, all different, 16 requests in flight (the per-connection limit).
    let flood = |from: usize, to: usize| {
        rt.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(from));
            for _ in 0..16 {
                let (session, next) = (session.clone(), next.clone());
                tasks.spawn(async move {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= to || started.elapsed() > TIME_LIMIT {
                            return;
                        }
                        let name = format!("{i:08}-{}", "x".repeat(231));
                        match session.checkout(&one_seat(&name)).await {
                            Err(ClientError::Denied(d)) => {
                                assert_eq!(d.reason.code(), "not_licensed", "{}", d.reason)
                            }
                            other => panic!("checkout of a made-up name: {other:?}"),
                        }
                    }
                });
            }
            while let Some(t) = tasks.join_next().await {
                t.unwrap();
            }
        })
    };
    flood(0, WARM_UP);
    let (rss_before, metrics_before) = (rss_mib(pid), metrics_body(&daemon).len());
    flood(WARM_UP, WARM_UP + FLOOD);
    let secs = started.elapsed().as_secs_f64();
    assert!(
        started.elapsed() <= TIME_LIMIT,
        "the flood did not finish within {TIME_LIMIT:?}"
    );
    let metrics = metrics_body(&daemon);
    let rss_after = rss_mib(pid);
    println!(
        "distinct-name flood: {} names in {secs:.1} s; daemon RSS {rss_before:.1} -> {rss_after:.1} MiB; /metrics {metrics_before} -> {} bytes",
        WARM_UP + FLOOD,
        metrics.len()
    );
    // The made-up names count under one key.
    let denial_rows: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("tally_denials_total{"))
        .collect();
    let expected = format!(
        "tally_denials_total{{feature=\"(unlicensed)\",reason=\"not_licensed\"}} {}",
        WARM_UP + FLOOD
    );
    assert!(
        denial_rows == [expected.as_str()],
        "{} denial rows; the first: {:?}",
        denial_rows.len(),
        denial_rows.first()
    );
    assert!(
        metrics.len() <= metrics_before + 16,
        "/metrics grew from {metrics_before} to {} bytes",
        metrics.len()
    );
    // Before the fix the same flood grew the daemon by 32 MiB (and /metrics to 9.5 MB);
    // what remains is the journal's share of sled's page cache, capped at 8 MiB.
    assert!(
        rss_after - rss_before < 10.0,
        "daemon RSS grew from {rss_before:.1} to {rss_after:.1} MiB over {FLOOD} made-up names"
    );
    // The legitimate features are still served.
    assert!(rt.block_on(session.checkout(&one_seat("solver"))).is_ok());
}

/// Scenario 5: a user name with a newline and escape sequences wrote a forged
/// `granted` line into tallyd's log and reached other users' terminals.
#[test]
fn control_characters_in_names_are_refused_and_forge_no_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("data"), "127.0.0.1:0", &[]);
    let forged = "mallory\n2026-12-01T00:00:00.000000Z  INFO tally_daemon::server: granted lease=L00000000deadbeef feature=solver count=1 holder=ana@ws";
    let out = run_within(
        daemon
            .tally()
            .env(
                "USER",
                format!("{forged}\u{1b}]0;owned-title\u{7}\u{1b}[31mRED"),
            )
            .args(["run", "solver", "--", "true"]),
        Duration::from_secs(30),
    )
    .expect("tally run hung");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a forged user name got a seat");
    assert!(
        stderr.contains("user contains the control character U+000A"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "escape sequence on the terminal: {stderr:?}"
    );

    // Every other client-supplied name: host, program, display, feature, version.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let base = ClientConfig::new(vec![daemon.addr.to_string()], Trust::Demo);
    for field in ["host", "program", "display", "user"] {
        let mut config = base.clone();
        let id = &mut config.identity;
        match field {
            "host" => id.host = "ws\r\nx".into(),
            "program" => id.program = "p\u{1b}[2J".into(),
            "display" => id.display = Some(":0\u{7}".into()),
            _ => id.user = "ana\u{202e}nim".into(),
        }
        let e = match rt.block_on(Session::connect(&config)) {
            Ok(_) => panic!("hello with a control character in {field} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains(&format!("{field} contains the control character")),
            "{e}"
        );
    }
    let session = rt.block_on(Session::connect(&base)).unwrap();
    let mut bad_feature = one_seat("solver\n INFO granted");
    let mut bad_version = one_seat("solver");
    bad_version.version = Some("2026\u{1b}[31m".into());
    for (what, request) in [
        ("feature name", &mut bad_feature),
        ("version", &mut bad_version),
    ] {
        match rt.block_on(session.checkout(request)) {
            Err(ClientError::Denied(d)) => {
                assert_eq!(d.reason.code(), "invalid_request");
                assert!(
                    d.reason
                        .to_string()
                        .contains(&format!("{what} contains the control character")),
                    "{}",
                    d.reason
                );
            }
            other => panic!("checkout with a control character in the {what}: {other:?}"),
        }
    }
    let log = daemon.log_text();
    assert!(
        !log.lines()
            .any(|l| l.starts_with("2026-12-01T00:00:00") || l.contains("deadbeef")),
        "the forged line reached the log:\n{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "an escape sequence reached the log"
    );
}

/// Scenario 6: a FIFO in the bundle directory hung `tallyd run`, `check-config`, every
/// reload and then shutdown; a `*.bundle` symlink to `/dev/zero` was read to 2.1 GB.
#[test]
fn fifos_devices_and_stuck_files_never_hang_tallyd() {
    let site = Site::new("");
    // The policy: a regular (empty) file at first.
    let policy = site.path("policy.toml");
    std::fs::write(&policy, "").unwrap();
    let mut config = std::fs::read_to_string(site.path("tallyd.toml")).unwrap();
    config.push_str(&format!("policy = \"{}\"\n", policy.display()));
    std::fs::write(site.path("tallyd.toml"), config).unwrap();
    let mkfifo = |p: &Path| {
        assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
    };
    mkfifo(&site.path("bundles/p.bundle"));
    std::os::unix::fs::symlink("/dev/zero", site.path("bundles/zero.bundle")).unwrap();

    let out = run_within(
        Command::new(bin("tallyd"))
            .args(["check-config", "--config"])
            .arg(site.path("tallyd.toml")),
        Duration::from_secs(20),
    )
    .expect("check-config hung on the FIFO");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("p.bundle: refused: not a regular file (a FIFO)"),
        "{text}"
    );
    assert!(
        text.contains("zero.bundle: refused: not a regular file (a device or socket)"),
        "{text}"
    );
    assert!(
        text.contains("paid"),
        "the real bundle is not served: {text}"
    );

    let daemon = site.daemon();
    assert_eq!(daemon.feature("solver")["total"], 1);
    let admin_reload = || {
        run_within(
            daemon
                .tally()
                .args(["admin", "--admin-token-file"])
                .arg(site.path("data/admin.token"))
                .arg("reload"),
            Duration::from_secs(20),
        )
        .expect("tally admin reload hung")
    };
    // The FIFO and /dev/zero are refused by name (exit 65); the real bundle is served.
    let out = admin_reload();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(65), "admin reload: {stderr}");
    assert!(
        stderr.contains("p.bundle: not a regular file (a FIFO)")
            && stderr.contains("zero.bundle: not a regular file (a device or socket)"),
        "{stderr}"
    );
    daemon.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(15), || daemon
            .log_text()
            .matches("reloaded: serving 1 bundle(s)")
            .count()
            >= 2),
        "SIGHUP reload did not finish:\n{}",
        daemon.log_text()
    );

    // A policy file that never answers (a FIFO nobody writes): the reload gives up at
    // its deadline, the next one says an earlier one is stuck, the bundles stay.
    std::fs::remove_file(&policy).unwrap();
    mkfifo(&policy);
    let t = Instant::now();
    let out = admin_reload();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(stderr.contains("did not finish within 5 s"), "{stderr}");
    assert!(t.elapsed() < Duration::from_secs(10));
    let out = admin_reload();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.contains("still stuck"), "{stderr}");
    assert_eq!(
        daemon.feature("solver")["total"],
        1,
        "the bundles were dropped"
    );
    let rss = rss_mib(daemon.pid());
    println!("daemon RSS with a FIFO, /dev/zero and a stuck reload: {rss:.1} MiB");
    assert!(rss < 100.0, "daemon RSS {rss:.1} MiB");

    // SIGTERM ends the daemon promptly, stuck reader or not.
    daemon.signal("TERM");
    assert!(
        daemon.wait_exit(Duration::from_secs(15)),
        "tallyd did not exit after SIGTERM:\n{}",
        daemon.log_text()
    );
}

/// Scenario 8: with `status_needs_token = true`, a denial still listed every holder;
/// `diagnose` copied credentials and wrote its file world-readable.
#[test]
fn hidden_status_hides_holders_and_diagnose_redacts() {
    let site = Site::new("status_needs_token = true\n");
    let daemon = site.daemon();
    let _holder = Holder::from_child(
        daemon
            .tally()
            .env("USER", "ana")
            .args(["run", "solver", "--", "sleep", "120"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own group, so that dropping the holder kills the `sleep` too.
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    // ana holds the seat before bo asks (status needs the token here).
    assert!(wait_until(Duration::from_secs(20), || {
        let out = daemon
            .tally()
            .args(["status", "--json", "--admin-token-file"])
            .arg(site.path("data/admin.token"))
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .map(|s| s["features"][0]["in_use"] == 1)
            .unwrap_or(false)
    }));
    assert!(wait_until(Duration::from_secs(20), || {
        let out = daemon
            .tally()
            .env("USER", "bo")
            .args(["run", "solver", "--", "true"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.code() != Some(75) || !stderr.contains("in use") {
            return false;
        }
        assert!(stderr.contains("(1 held)"), "{stderr}");
        assert!(
            !stderr.contains("ana"),
            "a holder shown without the token: {stderr}"
        );
        true
    }));

    let diag_config = site.path("diag.toml");
    let mut text = std::fs::read_to_string(site.path("tallyd.toml")).unwrap();
    text.push_str(&format!(
        "report_dir = \"{}\"\nreport_upload_url = \"https://ana:s3cret@127.0.0.1:9/up?sig=abc123\"\n",
        site.path("reports").display()
    ));
    std::fs::write(&diag_config, text).unwrap();
    let out_file = site.path("support.json");
    ok(Command::new(bin("tallyd"))
        .args(["diagnose", "--config"])
        .arg(&diag_config)
        .arg("--out")
        .arg(&out_file)
        .output()
        .unwrap());
    let written = std::fs::read_to_string(&out_file).unwrap();
    assert!(
        !written.contains("s3cret") && !written.contains("abc123"),
        "{written}"
    );
    assert!(written.contains("REDACTED@127.0.0.1:9"), "{written}");
    let mode = std::fs::metadata(&out_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "support file mode {mode:o}");
}
