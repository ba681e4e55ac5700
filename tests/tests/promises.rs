//! Where features meet faults: seats that stay exact across restarts and stalls of
//! tallyd, through the real binaries (issue "Where features meet", scenarios 3 and 5).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tally_tests::{wait_until, Daemon, Holder};

/// Lease ids of `feature`'s holders, sorted.
fn lease_ids(daemon: &Daemon, feature: &str) -> Vec<String> {
    let mut ids: Vec<String> = daemon.feature(feature)["holders"]
        .as_array()
        .expect("holders")
        .iter()
        .map(|h| h["lease"].as_str().expect("lease id").to_string())
        .collect();
    ids.sort();
    ids
}

/// `tally run FEATURE -- sh -c 'wait for FILE'`, in its own process group.
fn run_until_file(daemon: &Daemon, feature: &str, file: &Path) -> Holder {
    let log = std::fs::File::create(file.with_extension("log")).expect("holder log");
    let script = format!("while [ ! -e '{}' ]; do sleep 0.1; done", file.display());
    let child = daemon
        .tally()
        .args(["run", feature, "--", "sh", "-c", &script])
        .env("TALLY_LOG", "debug,rustls=info")
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("starting tally run");
    Holder::from_child(child)
}

/// Scenario 3: a job that ends while tallyd restarts (SIGTERM, as `systemctl restart`
/// does) gets its seat back within seconds of the restart, not after the 90 s TTL: the
/// client keeps its checkin and delivers it when the server answers again.
#[test]
fn a_job_that_ends_during_a_restart_returns_its_seat_when_the_server_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let daemon = Daemon::start(&data, "127.0.0.1:0", &[]);
    let done = dir.path().join("done");
    let mut job = run_until_file(&daemon, "solver", &done);
    assert!(wait_until(Duration::from_secs(20), || daemon
        .in_use("solver")
        == 1));
    let addr = daemon.addr.to_string();
    daemon.stop();
    // The job ends while no server runs.
    std::fs::write(&done, b"").unwrap();
    let daemon = Daemon::start(&data, &addr, &[]);
    let back = Instant::now();
    let freed = wait_until(Duration::from_secs(8), || daemon.in_use("solver") == 0);
    let job_state = job.child.try_wait();
    assert!(
        freed,
        "job: {job_state:?}; the ended job's seat is still held {:?} after the restart (lease TTL 90 s); log:\n{}\ntally run:\n{}",
        back.elapsed(),
        daemon.log_text(),
        std::fs::read_to_string(done.with_extension("log")).unwrap_or_default()
    );
    let status = job.child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "tally run exits with the job's status"
    );
    assert!(
        daemon.log_text().contains("reason=checkin"),
        "{}",
        daemon.log_text()
    );
}

/// Scenario 3: a lease whose holder died while tallyd was down keeps the deadline it
/// had. Restarting tallyd every two seconds (less than the 6 s TTL) used to hand the
/// ghost a fresh TTL each time; now it ends by the previous run's last sign of life
/// plus the clock mark's 10 s slack plus its TTL, however many restarts follow.
#[test]
fn restarts_never_extend_the_lease_of_a_dead_holder() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let timing = [
        "--idle-timeout-secs",
        "5",
        "--lease-ttl-secs",
        "6",
        "--heartbeat-secs",
        "2",
    ];
    let mut daemon = Daemon::start(&data, "127.0.0.1:0", &timing);
    let addr = daemon.addr.to_string();
    let mut holder = Holder::start(&daemon, "solver", 600);
    assert!(wait_until(Duration::from_secs(20), || daemon
        .in_use("solver")
        == 1));
    let ghost = lease_ids(&daemon, "solver");
    // tallyd dies, then the holder dies while it is down: nobody will check in.
    let died = Instant::now();
    daemon.kill();
    holder.kill_group();
    let bound = Duration::from_secs(6 + 10 + 4);
    let mut restarts = 0;
    loop {
        daemon = Daemon::start(&data, &addr, &timing);
        restarts += 1;
        let held = lease_ids(&daemon, "solver");
        if held.is_empty() {
            break;
        }
        assert_eq!(held, ghost);
        assert!(
            died.elapsed() < bound,
            "the dead holder's lease is still held {:?} after it died, through {restarts} restarts",
            died.elapsed()
        );
        std::thread::sleep(Duration::from_secs(2));
        daemon.kill();
    }
    assert!(
        restarts >= 2,
        "the test must restart at least once while the lease runs"
    );
}

/// Scenario 5: tallyd stopped (SIGSTOP, as a paused VM or a stalled machine would) for
/// longer than the idle timeout, then continued. Its clients' connections time out on
/// both sides; the leases are not handed to others: the holders reconnect and
/// re-attach, and newcomers are denied meanwhile. Ten programs on five seats before.
#[test]
fn a_stalled_server_does_not_hand_held_seats_to_others() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let timing = [
        "--idle-timeout-secs",
        "5",
        "--lease-ttl-secs",
        "12",
        "--heartbeat-secs",
        "3",
    ];
    let daemon = Daemon::start(&data, "127.0.0.1:0", &timing);
    let mut holders: Vec<Holder> = (0..5)
        .map(|_| Holder::start(&daemon, "solver", 600))
        .collect();
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 5));
    let held = lease_ids(&daemon, "solver");
    daemon.signal("STOP");
    // The stall itself, longer than the 5 s idle timeout: not a wait for a condition.
    std::thread::sleep(Duration::from_secs(8));
    daemon.signal("CONT");
    // Newcomers right after the stall find every seat still held.
    for _ in 0..3 {
        let out = daemon
            .tally()
            .args(["run", "solver", "--", "true"])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(75),
            "a newcomer got a seat that a stalled-out holder still uses: {}; log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            daemon.log_text()
        );
    }
    // The holders re-attached: after more than a TTL the same five leases are held
    // (a lease nobody re-attached would have expired by now).
    let reattached = Instant::now();
    assert!(wait_until(Duration::from_secs(30), || {
        reattached.elapsed() > Duration::from_secs(14)
    }));
    assert_eq!(
        lease_ids(&daemon, "solver"),
        held,
        "log:\n{}",
        daemon.log_text()
    );
    for h in &mut holders {
        assert!(
            h.child.try_wait().unwrap().is_none(),
            "a holder stopped after the stall"
        );
    }
    let log = daemon.log_text();
    assert!(log.contains("did not run for a while"), "{log}");
    assert!(!log.contains("reason=connection closed"), "{log}");
}

/// A client paused (SIGSTOP: a laptop lid, a paused VM) for longer than the idle timeout
/// but less than its lease TTL loses its connection, and its seat is freed at the
/// timeout (a dead client must not hold it); when it runs again it reconnects and gets
/// the same lease back, because nobody took the seat meanwhile. It used to be told its
/// lease "expired" and lose it for good.
#[test]
fn a_client_paused_past_the_idle_timeout_gets_its_lease_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let timing = [
        "--idle-timeout-secs",
        "5",
        "--lease-ttl-secs",
        "60",
        "--heartbeat-secs",
        "3",
    ];
    let daemon = Daemon::start(&data, "127.0.0.1:0", &timing);
    let done = dir.path().join("done");
    let mut job = run_until_file(&daemon, "solver", &done);
    assert!(wait_until(Duration::from_secs(20), || daemon
        .in_use("solver")
        == 1));
    let held = lease_ids(&daemon, "solver");
    let group = format!("-{}", job.child.id());
    let signal = |name: &str| {
        let ok = std::process::Command::new("kill")
            .args([name, "--", &group])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {name} {group}");
    };
    signal("-STOP");
    // The client's silence runs past the 5 s idle timeout: its seat is free meanwhile.
    let freed = wait_until(Duration::from_secs(20), || daemon.in_use("solver") == 0);
    signal("-CONT");
    assert!(
        freed,
        "the silent client's seat was not freed at the idle timeout"
    );
    assert!(
        wait_until(Duration::from_secs(20), || lease_ids(&daemon, "solver")
            == held),
        "the paused client did not get its lease back; daemon log:\n{}\ntally run:\n{}",
        daemon.log_text(),
        std::fs::read_to_string(done.with_extension("log")).unwrap_or_default()
    );
    assert!(daemon.log_text().contains("lapsed lease re-attached"));
    std::fs::write(&done, b"").unwrap();
    assert_eq!(job.child.wait().unwrap().code(), Some(0));
    let run_log = std::fs::read_to_string(done.with_extension("log")).unwrap_or_default();
    assert!(!run_log.contains("lost the seat"), "{run_log}");
    assert!(wait_until(Duration::from_secs(10), || daemon
        .in_use("solver")
        == 0));
}
