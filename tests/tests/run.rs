//! `tally run` and signals, with the real `tallyd` and `tally`: a waiter interrupted in the
//! queue leaves it and holds nothing; SIGTERM/SIGINT/SIGHUP reach the command, the wrapper
//! waits for it, checks the seat in and exits with its status; the vendor's lost-seat
//! grace from a signed bundle stops the command, or only warns, as the vendor chose.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
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
    assert!(!users(&solver["holders"]).contains(&"ana".to_string()), "{solver}");
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

