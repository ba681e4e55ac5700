//! `tally run` and signals, with the real `tallyd` and `tally`: a waiter interrupted in the
//! queue leaves it and holds nothing; SIGTERM/SIGINT/SIGHUP reach the command, the wrapper
//! waits for it, checks the seat in and exits with its status; the vendor's lost-seat
//! grace from a signed bundle stops the command, or only warns, as the vendor chose.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tally_tests::{bin, wait_until, Daemon, Holder};

/// Sends `signal` (a name: INT, TERM, HUP) to one process.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// A `tally run` in its own process group, stderr into a file, as `user`.
fn spawn_run(daemon: &Daemon, user: &str, args: &[&str], stderr: &Path) -> Child {
    daemon
        .tally()
        .env("USER", user)
        .arg("run")
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).expect("stderr file"))
        .process_group(0)
        .spawn()
        .expect("starting tally run")
}

/// Waits up to `timeout` for `child` to exit; its exit code (`None`: killed by a signal).
fn exit_within(child: &mut Child, timeout: Duration) -> Option<Option<i32>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status.code());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn users(list: &serde_json::Value) -> Vec<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["user"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Holds all five solver seats in two leases (4 + 1), queues waiter A (`ana`) then B
/// (`bo`), signals A, frees a seat with `tally admin remove`, and checks that B gets it
/// at once and A holds nothing.
fn interrupted_waiter_leaves_the_queue(sig: &str, code: i32) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let daemon = Daemon::start(&data, "127.0.0.1:0", &[]);
    let _four = Holder::start_with(&daemon, &["solver", "--count", "4"], 300);
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 4));
    let _one = Holder::start_with(&daemon, &["solver"], 300);
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 5));
    let one_lease = daemon.feature("solver")["holders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["count"] == 1)
        .expect("the one-seat holder")["lease"]
        .as_str()
        .unwrap()
        .to_string();

    let a_err = dir.path().join("a.err");
    let mut a = spawn_run(
        &daemon,
        "ana",
        &["solver", "--wait", "60", "--", "sleep", "300"],
        &a_err,
    );
    assert!(wait_until(Duration::from_secs(30), || users(
        &daemon.feature("solver")["queue"]
    ) == ["ana"]));
    let mut b = spawn_run(
        &daemon,
        "bo",
        &["solver", "--wait", "60", "--", "sleep", "300"],
        &dir.path().join("b.err"),
    );
    assert!(wait_until(Duration::from_secs(30), || users(
        &daemon.feature("solver")["queue"]
    ) == ["ana", "bo"]));

    signal(a.id(), sig);
    let exited = exit_within(&mut a, Duration::from_secs(10));
    let a_stderr = std::fs::read_to_string(&a_err).unwrap_or_default();
    assert_eq!(
        exited,
        Some(Some(code)),
        "waiter A on SIG{sig}; stderr:\n{a_stderr}"
    );
    // A's connection is closed, not left to the idle timeout: its place goes at once.
    assert!(
        wait_until(Duration::from_secs(3), || users(
            &daemon.feature("solver")["queue"]
        ) == ["bo"]),
        "A still queued: {}",
        daemon.feature("solver")
    );

    let out = daemon
        .tally()
        .args(["admin", "--admin-token-file"])
        .arg(data.join("admin.token"))
        .args(["remove", &one_lease])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // B gets the freed seat promptly (well before any idle timeout or TTL), and A holds
    // nothing.
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || users(
            &daemon.feature("solver")["holders"]
        )
        .contains(&"bo".to_string())),
        "B did not get the seat: {}\nlog:\n{}",
        daemon.feature("solver"),
        daemon.log_text()
    );
    eprintln!(
        "B got the seat {} ms after the removal",
        started.elapsed().as_millis()
    );
    let solver = daemon.feature("solver");
    assert!(
        !users(&solver["holders"]).contains(&"ana".to_string()),
        "{solver}"
    );
    assert!(users(&solver["queue"]).is_empty(), "{solver}");
    assert_eq!(solver["in_use"], 5, "{solver}");
    let _ = b.kill();
    let _ = b.wait();
}

#[test]
fn sigint_while_queued_leaves_the_queue_and_exits_130() {
    interrupted_waiter_leaves_the_queue("INT", 130);
}

#[test]
fn sigterm_while_queued_leaves_the_queue_and_exits_143() {
    interrupted_waiter_leaves_the_queue("TERM", 143);
}

/// Kills what is left of a `tally run` process group (a test that failed halfway).
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
}

/// A shell command for `tally run` that records the signal it receives in `record` and
/// exits with status 7 (the wrapper must hand that status on).
fn trapping_child(record: &Path, ready: &Path) -> Vec<String> {
    let script = format!(
        "for s in TERM INT HUP; do trap \"echo $s > {rec}; kill \\$sleeper 2>/dev/null; exit 7\" $s; done; \
         sleep 300 & sleeper=$!; touch {ready}; wait $sleeper",
        rec = record.display(),
        ready = ready.display()
    );
    vec!["sh".into(), "-c".into(), script]
}

#[test]
fn signals_reach_the_command_and_the_seat_is_checked_in_after_it_exits() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("data"), "127.0.0.1:0", &[]);
    for (sig, n) in [("TERM", 15), ("INT", 2), ("HUP", 1)] {
        let record = dir.path().join(format!("{sig}.record"));
        let ready = dir.path().join(format!("{sig}.ready"));
        let mut args = vec!["solver".to_string(), "--".to_string()];
        args.extend(trapping_child(&record, &ready));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = dir.path().join(format!("{sig}.err"));
        let mut run = spawn_run(&daemon, "ana", &args, &err);
        assert!(
            wait_until(Duration::from_secs(30), || ready.exists()
                && daemon.in_use("solver") == 1),
            "the command did not start with its seat"
        );
        signal(run.id(), sig);
        let exited = exit_within(&mut run, Duration::from_secs(10));
        let stderr = std::fs::read_to_string(&err).unwrap_or_default();
        if exited.is_none() {
            kill_group(&mut run);
        }
        // The command heard the signal, exited, and its status is the wrapper's.
        assert_eq!(
            std::fs::read_to_string(&record).unwrap_or_default().trim(),
            sig,
            "SIG{sig} did not reach the command; stderr:\n{stderr}"
        );
        assert_eq!(exited, Some(Some(7)), "SIG{sig}; stderr:\n{stderr}");
        // The seat was checked in before the wrapper exited.
        assert_eq!(daemon.in_use("solver"), 0, "SIG{sig}");
        let log = daemon.log_text();
        assert_eq!(
            log.matches("reason=checkin").count(),
            [15, 2, 1].iter().position(|&x| x == n).unwrap() + 1,
            "SIG{sig}: not checked in:\n{log}"
        );
    }
}

#[test]
fn a_command_killed_by_the_forwarded_signal_gives_128_plus_the_signal() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("data"), "127.0.0.1:0", &[]);
    let ready = dir.path().join("ready");
    let script = format!("touch {}; exec sleep 300", ready.display());
    let err = dir.path().join("err");
    let mut run = spawn_run(&daemon, "ana", &["solver", "--", "sh", "-c", &script], &err);
    assert!(wait_until(Duration::from_secs(30), || ready.exists()
        && daemon.in_use("solver") == 1));
    signal(run.id(), "TERM");
    let exited = exit_within(&mut run, Duration::from_secs(10));
    if exited.is_none() {
        kill_group(&mut run);
    }
    assert_eq!(
        exited,
        Some(Some(143)),
        "{}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    assert_eq!(daemon.in_use("solver"), 0);
}

/// A vendor (`tally-publisher keygen`) and a customer server (`tallyd init`, `request`)
/// with one bundle issued from `spec`, served by `tallyd run` with 1 s heartbeats (so a
/// removed holder hears of it within a second).
fn vendor_site(root: &Path, spec: &str) -> Daemon {
    let ok = |cmd: &mut Command| {
        let out = cmd.output().expect("running a tally binary");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let data = root.join("data");
    let bundles = root.join("bundles");
    std::fs::create_dir_all(&bundles).unwrap();
    ok(Command::new(bin("tallyd"))
        .arg("init")
        .arg("--data-dir")
        .arg(&data));
    ok(Command::new(bin("tallyd"))
        .arg("request")
        .arg("--data-dir")
        .arg(&data)
        .arg("--out")
        .arg(root.join("activation.req")));
    ok(Command::new(bin("tally-publisher"))
        .arg("keygen")
        .arg("--out")
        .arg(root.join("vendor")));
    std::fs::write(root.join("spec.toml"), spec).unwrap();
    ok(Command::new(bin("tally-publisher"))
        .arg("issue")
        .arg("--vendor-key")
        .arg(root.join("vendor.key"))
        .arg("--spec")
        .arg(root.join("spec.toml"))
        .arg("--request")
        .arg(root.join("activation.req"))
        .arg("--out")
        .arg(bundles.join("site.bundle")));
    let config = root.join("tallyd.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nbundle_dir = \"{}\"\nvendor_keys = [\"{}\"]\n\
             heartbeat_secs = 1\nlease_ttl_secs = 10\n",
            data.display(),
            bundles.display(),
            root.join("vendor.pub").display()
        ),
    )
    .unwrap();
    Daemon::run(&config, &root.join("vendor.pub"))
}

const GRACE_SPEC: &str = r#"
vendor = "Acme Simulation"
[customer]
id = "C-1001"
name = "Example Corp"
[[feature]]
name = "solver"
seats = 1
lost_seat_grace_secs = 2
on_lost_seat = "stop"
[[feature]]
name = "viewer"
seats = 1
lost_seat_grace_secs = 2
on_lost_seat = "warn"
"#;

/// The lease id of the one holder of `feature`.
fn only_lease(daemon: &Daemon, feature: &str) -> String {
    daemon.feature(feature)["holders"][0]["lease"]
        .as_str()
        .expect("a holder")
        .to_string()
}

/// Takes the seat of `feature` away from its holder for good: a waiter queued behind it
/// gets it the moment an admin removes the holder's lease. Returns the waiter and when
/// the removal was asked for.
fn take_the_seat_away(daemon: &Daemon, root: &Path, feature: &str) -> (Child, Instant) {
    let lease = only_lease(daemon, feature);
    let waiter = spawn_run(
        daemon,
        "bo",
        &[feature, "--wait", "60", "--", "sleep", "300"],
        &root.join(format!("{feature}-waiter.err")),
    );
    assert!(wait_until(Duration::from_secs(30), || users(
        &daemon.feature(feature)["queue"]
    ) == ["bo"]));
    let removed = Instant::now();
    let out = daemon
        .tally()
        .args(["admin", "--admin-token-file"])
        .arg(root.join("data/admin.token"))
        .args(["remove", &lease])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(wait_until(Duration::from_secs(10), || users(
        &daemon.feature(feature)["holders"]
    ) == ["bo"]));
    (waiter, removed)
}

#[test]
fn the_vendors_grace_stops_a_command_that_lost_its_seat() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let daemon = vendor_site(root, GRACE_SPEC);
    let record = root.join("record");
    let ready = root.join("ready");
    let mut args = vec!["solver".to_string(), "--".to_string()];
    args.extend(trapping_child(&record, &ready));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = root.join("run.err");
    let mut run = spawn_run(&daemon, "ana", &args, &err);
    assert!(wait_until(Duration::from_secs(30), || ready.exists()
        && daemon.in_use("solver") == 1));
    let (mut waiter, removed) = take_the_seat_away(&daemon, root, "solver");
    // Heard within a heartbeat (1 s), then 2 s of grace, then SIGTERM: well within 10 s.
    let exited = exit_within(&mut run, Duration::from_secs(10));
    let took = removed.elapsed();
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    if exited.is_none() {
        kill_group(&mut run);
    }
    kill_group(&mut waiter);
    assert_eq!(exited, Some(Some(75)), "stderr:\n{stderr}");
    assert_eq!(
        std::fs::read_to_string(&record).unwrap_or_default().trim(),
        "TERM",
        "{stderr}"
    );
    assert!(stderr.contains("lost the seat of 'solver'"), "{stderr}");
    assert!(
        stderr.contains("no seat of 'solver' for 2 s, the grace the vendor allows; stopping sh"),
        "{stderr}"
    );
    // Not before the grace ran out.
    assert!(took >= Duration::from_secs(2), "stopped after {took:?}");
    eprintln!("stopped {} ms after the removal", took.as_millis());
}

#[test]
fn the_vendors_grace_only_warns_when_the_vendor_chose_so() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let daemon = vendor_site(root, GRACE_SPEC);
    let err = root.join("run.err");
    let mut run = spawn_run(&daemon, "ana", &["viewer", "--", "sleep", "300"], &err);
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("viewer")
        == 1));
    let (mut waiter, _) = take_the_seat_away(&daemon, root, "viewer");
    let stderr = || std::fs::read_to_string(&err).unwrap_or_default();
    let warned = wait_until(Duration::from_secs(10), || {
        stderr().contains("has run without a seat of 'viewer' for more than 2 s")
    });
    // The command goes on running after the warning (still running a while later).
    let still_running = warned
        && !wait_until(Duration::from_secs(3), || {
            matches!(run.try_wait(), Ok(Some(_)))
        });
    kill_group(&mut run);
    kill_group(&mut waiter);
    assert!(warned, "no warning; stderr:\n{}", stderr());
    assert!(still_running, "the command stopped; stderr:\n{}", stderr());
    assert!(!stderr().contains("stopping"), "{}", stderr());
}

#[test]
fn the_library_reads_the_vendors_terms_from_the_verified_bundle() {
    use tally_client::grace::{LostSeatTerms, OnLostSeat};
    let dir = tempfile::tempdir().unwrap();
    let daemon = vendor_site(dir.path(), GRACE_SPEC);
    let vendor = tally_protocol::keys::public_key_from_armored(
        &std::fs::read_to_string(dir.path().join("vendor.pub")).unwrap(),
    )
    .unwrap();
    let config = tally_client::ClientConfig::new(
        vec![daemon.addr.to_string()],
        tally_client::Trust::Vendor(vec![vendor]),
    );
    let client = tally_client::blocking::Client::connect(config).unwrap();
    assert_eq!(
        client.lost_seat_terms("solver").unwrap(),
        LostSeatTerms {
            grace_secs: 2,
            action: OnLostSeat::Stop
        }
    );
    assert_eq!(
        client.lost_seat_terms("viewer").unwrap(),
        LostSeatTerms {
            grace_secs: 2,
            action: OnLostSeat::Warn
        }
    );
    assert_eq!(
        client.lost_seat_terms("unsold").unwrap(),
        LostSeatTerms::DEFAULT
    );
    client.close();
}

#[test]
fn a_command_that_ignores_sigterm_is_killed_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let daemon = vendor_site(root, GRACE_SPEC);
    let ready = root.join("ready");
    let script = format!(
        "trap '' TERM; touch {}; while :; do sleep 1; done",
        ready.display()
    );
    let err = root.join("run.err");
    let mut run = spawn_run(&daemon, "ana", &["solver", "--", "sh", "-c", &script], &err);
    assert!(wait_until(Duration::from_secs(30), || ready.exists()
        && daemon.in_use("solver") == 1));
    let (mut waiter, removed) = take_the_seat_away(&daemon, root, "solver");
    // A heartbeat, 2 s of grace, SIGTERM ignored, SIGKILL 5 s later.
    let exited = exit_within(&mut run, Duration::from_secs(20));
    let took = removed.elapsed();
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    kill_group(&mut run);
    kill_group(&mut waiter);
    assert_eq!(exited, Some(Some(75)), "stderr:\n{stderr}");
    assert!(
        stderr.contains("sh did not stop within 5 s; killing it"),
        "{stderr}"
    );
    assert!(took >= Duration::from_secs(7), "killed after {took:?}");
}

/// What the daemon does when a waiter dies without a word (SIGKILL: no close, no
/// cancel): a seat freed meanwhile goes to it, and comes back with its connection at the
/// idle timeout, like any lease of a vanished client; never after the lease TTL.
#[test]
fn a_seat_granted_to_a_killed_waiter_comes_back_with_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let daemon = Daemon::start(&data, "127.0.0.1:0", &["--idle-timeout-secs", "5"]);
    let _four = Holder::start_with(&daemon, &["solver", "--count", "4"], 300);
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 4));
    let _one = Holder::start_with(&daemon, &["solver"], 300);
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 5));
    let one_lease = daemon.feature("solver")["holders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["count"] == 1)
        .expect("the one-seat holder")["lease"]
        .as_str()
        .unwrap()
        .to_string();
    let mut a = spawn_run(
        &daemon,
        "ana",
        &["solver", "--wait", "60", "--", "sleep", "300"],
        &dir.path().join("a.err"),
    );
    assert!(wait_until(Duration::from_secs(30), || users(
        &daemon.feature("solver")["queue"]
    ) == ["ana"]));
    let mut b = spawn_run(
        &daemon,
        "bo",
        &["solver", "--wait", "60", "--", "sleep", "300"],
        &dir.path().join("b.err"),
    );
    assert!(wait_until(Duration::from_secs(30), || users(
        &daemon.feature("solver")["queue"]
    ) == ["ana", "bo"]));
    kill_group(&mut a);
    let out = daemon
        .tally()
        .args(["admin", "--admin-token-file"])
        .arg(data.join("admin.token"))
        .args(["remove", &one_lease])
        .output()
        .unwrap();
    assert!(out.status.success());
    let removed = Instant::now();
    // Within the idle timeout (5 s) and some slack, far below the 90 s TTL.
    assert!(
        wait_until(Duration::from_secs(15), || users(
            &daemon.feature("solver")["holders"]
        )
        .contains(&"bo".to_string())),
        "B did not get the seat: {}",
        daemon.feature("solver")
    );
    eprintln!(
        "B got the seat {} ms after the removal",
        removed.elapsed().as_millis()
    );
    let solver = daemon.feature("solver");
    assert!(
        !users(&solver["holders"]).contains(&"ana".to_string()),
        "{solver}"
    );
    let log = daemon.log_text();
    assert!(!log.contains("heartbeat TTL expired"), "{log}");
    kill_group(&mut b);
}

/// A waiter whose server restarts while it waits waits on: it asks the restarted server
/// again and gets the seat that comes free there. (Its queue-position poll once waited
/// for the session lock that the reconnecting checkout held, while the checkout was not
/// polled: the waiter hung for good. And a checkout that found no server at its one
/// retry ended the wait.)
#[test]
fn a_waiter_whose_server_restarts_waits_on_and_gets_the_next_seat() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--idle-timeout-secs", "5"];
    let daemon = Daemon::start(&data, "127.0.0.1:0", &args);
    let addr = daemon.addr;
    let _all = Holder::start_with(&daemon, &["solver", "--count", "5"], 300);
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 5));
    let err = dir.path().join("a.err");
    let mut a = spawn_run(
        &daemon,
        "ana",
        &["solver", "--wait", "120", "--", "sleep", "300"],
        &err,
    );
    assert!(wait_until(Duration::from_secs(30), || users(
        &daemon.feature("solver")["queue"]
    ) == ["ana"]));
    daemon.kill();
    // The waiter notices (idle timeout) and asks again while no server answers.
    assert!(
        wait_until(Duration::from_secs(30), || std::fs::read_to_string(&err)
            .unwrap_or_default()
            .contains("reconnecting")),
        "{}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    std::thread::sleep(Duration::from_secs(2)); // position polls tick while it asks
    let daemon = Daemon::start(&data, &addr.to_string(), &args);
    assert!(
        wait_until(Duration::from_secs(60), || users(
            &daemon.feature("solver")["queue"]
        ) == ["ana"]),
        "the waiter did not queue at the restarted server: {}\n{}",
        daemon.feature("solver"),
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    let lease = daemon.feature("solver")["holders"][0]["lease"]
        .as_str()
        .unwrap()
        .to_string();
    let out = daemon
        .tally()
        .args(["admin", "--admin-token-file"])
        .arg(data.join("admin.token"))
        .args(["remove", &lease])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        wait_until(Duration::from_secs(30), || users(
            &daemon.feature("solver")["holders"]
        ) == ["ana"]),
        "the waiter did not get the seat: {}\n{}",
        daemon.feature("solver"),
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    kill_group(&mut a);
}
