//! The client library against real daemons: failover, re-attach across a restart,
//! tampered tokens, borrowing with the daemon stopped, and the C example program.

use std::process::Command;
use std::time::Duration;
use tally_client::{verify_grant, Client, ClientConfig, LeaseStatus, Trust, Want};
use tally_tests::{bin, wait_until, Daemon, Holder};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn config(servers: Vec<String>) -> ClientConfig {
    let mut c = ClientConfig::new(servers, Trust::Demo);
    c.connect_timeout = Duration::from_secs(2);
    c.request_timeout = Duration::from_secs(3);
    c
}

async fn wait_status(
    handle: &tally_client::LeaseHandle,
    want: impl Fn(&LeaseStatus) -> bool,
) -> bool {
    let mut watch = handle.watch();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if want(&watch.borrow()) {
            return true;
        }
        if tokio::time::timeout_at(deadline, watch.changed())
            .await
            .is_err()
        {
            return false;
        }
    }
}

#[test]
fn a_lease_reattaches_across_a_daemon_restart_without_a_second_seat() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let timing = ["--heartbeat-secs", "1", "--lease-ttl-secs", "20"];
    let daemon = Daemon::start(&data, "127.0.0.1:0", &timing);
    let addr = daemon.addr.to_string();
    let rt = runtime();
    let client = rt
        .block_on(Client::connect(config(vec![addr.clone()])))
        .unwrap();
    let handle = rt
        .block_on(client.checkout(&Want::feature("solver")))
        .unwrap();
    assert_eq!(handle.status(), LeaseStatus::Active);
    let id = handle.id().to_string();
    daemon.kill();
    assert!(rt.block_on(wait_status(&handle, |s| *s == LeaseStatus::Reconnecting)));
    let daemon = Daemon::start(&data, &addr, &timing);
    assert!(rt.block_on(wait_status(&handle, |s| *s == LeaseStatus::Active)));
    assert_eq!(daemon.in_use("solver"), 1, "re-attached, not a second seat");
    assert_eq!(daemon.feature("solver")["holders"][0]["lease"], id.as_str());
    // Dropping the handle checks the seat in.
    drop(handle);
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 0));
    rt.block_on(client.close());
}

#[test]
fn the_client_fails_over_to_the_next_server() {
    let dir = tempfile::tempdir().unwrap();
    let first = Daemon::start(
        &dir.path().join("a"),
        "127.0.0.1:0",
        &["--heartbeat-secs", "1"],
    );
    let second = Daemon::start(
        &dir.path().join("b"),
        "127.0.0.1:0",
        &["--heartbeat-secs", "1"],
    );
    let rt = runtime();
    let client = rt
        .block_on(Client::connect(config(vec![
            first.addr.to_string(),
            second.addr.to_string(),
        ])))
        .unwrap();
    let handle = rt
        .block_on(client.checkout(&Want::feature("viewer")))
        .unwrap();
    assert_eq!(first.in_use("viewer"), 1);
    first.kill();
    // The client moves to the second server, which never granted this lease: the
    // application hears that the seat is lost and checks out again there.
    assert!(rt.block_on(wait_status(&handle, |s| matches!(s, LeaseStatus::Lost(_)))));
    let again = rt
        .block_on(client.checkout(&Want::feature("viewer")))
        .unwrap();
    assert_eq!(second.in_use("viewer"), 1);
    let session = rt.block_on(client.session()).unwrap();
    assert_eq!(session.server(), second.addr);
    drop(again);
    rt.block_on(client.close());
}

#[test]
fn a_tampered_lease_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("data"), "127.0.0.1:0", &[]);
    let rt = runtime();
    rt.block_on(async {
        let session = tally_client::Session::connect(&config(vec![daemon.addr.to_string()]))
            .await
            .unwrap();
        let request = tally_protocol::wire::CheckoutRequest {
            feature: "solver".into(),
            count: 1,
            version: None,
            build_date: None,
            wait_secs: 0,
            borrow_secs: 0,
        };
        let lease = session.checkout(&request).await.unwrap();
        let key = session.server_key();
        assert!(verify_grant(&key, &lease.grant).is_ok());
        for i in 0..lease.grant.token.body.len() {
            let mut tampered = lease.grant.clone();
            tampered.token.body[i] ^= 0x20;
            assert!(verify_grant(&key, &tampered).is_err(), "byte {i}");
        }
        // A genuine token presented for another grant (more seats) is refused too.
        let mut inflated = lease.grant.clone();
        inflated.count = 5;
        assert!(verify_grant(&key, &inflated).is_err());
        session.close().await;
    });
}

#[test]
fn a_borrowed_seat_works_with_the_daemon_stopped_and_an_edited_cache_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let daemon = Daemon::start(&dir.path().join("data"), "127.0.0.1:0", &[]);
    let tally = |args: &[&str]| {
        daemon
            .tally()
            .env("TALLY_CACHE_DIR", &cache)
            .args(args)
            .output()
            .unwrap()
    };
    // Longer than the vendor allows: refused with the limit.
    let out = tally(&["borrow", "solver", "--for", "2w"]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most 168 hour"));
    let out = tally(&["borrow", "solver", "--for", "2d"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(daemon.in_use("solver"), 1);
    assert!(daemon.feature("solver")["holders"][0]["borrowed_until"].is_string());
    // Returned early, then borrowed again.
    assert!(tally(&["return", "solver"]).status.success());
    assert_eq!(daemon.in_use("solver"), 0);
    assert!(tally(&["borrow", "solver", "--for", "1d"]).status.success());
    // While online, running the application uses the borrowed seat, not a second one.
    let out = tally(&["run", "solver", "--", "true"]);
    assert!(out.status.success());
    assert_eq!(daemon.in_use("solver"), 1);
    let addr = daemon.addr.to_string();
    daemon.kill();

    let offline = |args: &[&str]| {
        Command::new(bin("tally"))
            .env("TALLY_CACHE_DIR", &cache)
            .args(["--server", &addr, "--demo"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = offline(&["run", "solver", "--", "true"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("using the seat of 'solver' borrowed until"),
        "{stderr}"
    );
    // Nothing borrowed for viewer: no server, no seat.
    assert_eq!(
        offline(&["run", "viewer", "--", "true"]).status.code(),
        Some(69)
    );
    // Stretching the borrow by editing the file is refused.
    let file = cache.join("borrowed.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let until = doc["leases"][0]["borrowed_until"]
        .as_str()
        .unwrap()
        .to_string();
    let stretched = until.replacen("20", "29", 1);
    std::fs::write(&file, text.replace(&until, &stretched)).unwrap();
    let out = offline(&["run", "solver", "--", "true"]);
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused"));
}

#[test]
fn the_c_example_checks_a_seat_out_and_in() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("data"), "127.0.0.1:0", &[]);
    let c = tally_tests::c::compile(
        &[tally_tests::c::root().join("client/examples/c/checkout.c")],
        &["-DTALLY_DEMO".to_string()],
        dir.path(),
        "checkout",
        tally_tests::c::Link::Shared,
    );
    let run = |feature: &str| {
        c.command()
            .arg(daemon.addr.to_string())
            .arg(feature)
            .output()
            .unwrap()
    };
    let out = run("solver");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("checked out solver, status 0") && stdout.contains("checked in"));
    // The demo bundle sets no lost-seat terms: the default, warn after 300 s.
    assert!(
        stdout.contains("without a seat: warn after 300 s"),
        "{stdout}"
    );
    assert_eq!(daemon.in_use("solver"), 0);
    let out = run("mesher");
    assert_eq!(out.status.code(), Some(75));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("'mesher' is not licensed"), "{stderr}");
    assert!(stderr.contains("(not_licensed)"), "{stderr}");
}

#[test]
fn a_replayed_borrowed_lease_and_a_token_for_another_feature_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let daemon = Daemon::start(&dir.path().join("data"), "127.0.0.1:0", &[]);
    let tally = |args: &[&str]| {
        daemon
            .tally()
            .env("TALLY_CACHE_DIR", &cache)
            .args(args)
            .output()
            .unwrap()
    };
    assert!(tally(&["borrow", "solver", "--for", "1d"]).status.success());
    let file = cache.join("borrowed.json");
    let copy = std::fs::read_to_string(&file).unwrap();

    // A genuine solver token filed under viewer is refused (offline: no server here).
    let swapped = copy.replace("\"feature\": \"solver\"", "\"feature\": \"viewer\"");
    assert_ne!(swapped, copy, "{copy}");
    std::fs::write(&file, &swapped).unwrap();
    let out = Command::new(bin("tally"))
        .env("TALLY_CACHE_DIR", &cache)
        .args([
            "--server",
            "127.0.0.1:9",
            "--demo",
            "run",
            "viewer",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("do not match the signed lease token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&file, &copy).unwrap();

    // Return early, keeping a copy of the cache: the seat is back on the server.
    assert!(tally(&["return", "solver"]).status.success());
    assert_eq!(daemon.in_use("solver"), 0);
    // Every seat taken by others, then the copy is put back and replayed online.
    let holders: Vec<Holder> = (0..5)
        .map(|_| Holder::start(&daemon, "solver", 60))
        .collect();
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 5));
    std::fs::write(&file, &copy).unwrap();
    let out = tally(&["run", "solver", "--", "true"]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "the replayed lease gave a sixth seat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("all 5 seat"));
    // The client forgot the returned lease.
    let text = std::fs::read_to_string(&file).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["leases"].as_array().unwrap().len(), 0, "{text}");
    drop(holders);
}

/// A server that stops (SIGTERM closes its connections) is noticed at once, not at the
/// next heartbeat (60 s here): the lease reads `Reconnecting` within seconds, and when
/// the server is back the lease is re-attached by itself, same id, one seat.
#[test]
fn a_stopped_server_is_noticed_at_once_and_the_lease_comes_back_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let timing = ["--heartbeat-secs", "60", "--lease-ttl-secs", "180"];
    let daemon = Daemon::start(&data, "127.0.0.1:0", &timing);
    let addr = daemon.addr.to_string();
    let rt = runtime();
    let client = rt
        .block_on(Client::connect(config(vec![addr.clone()])))
        .unwrap();
    let handle = rt
        .block_on(client.checkout(&Want::feature("solver")))
        .unwrap();
    let id = handle.id().to_string();
    daemon.stop();
    let mut watch = handle.watch();
    let noticed = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), async {
            while *watch.borrow_and_update() != LeaseStatus::Reconnecting {
                if watch.changed().await.is_err() {
                    return false;
                }
            }
            true
        })
        .await
        .unwrap_or(false)
    });
    assert!(
        noticed,
        "the closed connection was not noticed within 5 s: {:?}",
        handle.status()
    );
    let daemon = Daemon::start(&data, &addr, &timing);
    assert!(rt.block_on(wait_status(&handle, |s| *s == LeaseStatus::Active)));
    assert_eq!(daemon.in_use("solver"), 1);
    assert_eq!(daemon.feature("solver")["holders"][0]["lease"], id.as_str());
    rt.block_on(handle.checkin()).unwrap();
    assert_eq!(daemon.in_use("solver"), 0);
    rt.block_on(client.close());
}

#[test]
fn the_blocking_client_has_what_the_c_api_has() {
    use std::sync::{Arc, Mutex};
    use tally_client::blocking;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &["--heartbeat-secs", "1"],
    );
    // (TALLY_SERVER with no list is covered by the C test, in a process of its own.)
    let mut config = config(vec![daemon.addr.to_string()]);
    // A service checking out for its users names them.
    config.identity.user = "svc-batch".into();
    let client = blocking::Client::connect(config).unwrap();

    // Licence terms: the demo's optimizer is a 30-day evaluation, solver is permanent.
    let optimizer = client.feature_info("optimizer").unwrap().unwrap();
    assert!(optimizer.evaluation && optimizer.expires.is_some());
    let solver = client.feature_info("solver").unwrap().unwrap();
    assert!(!solver.evaluation && solver.expires.is_none());
    assert_eq!(client.feature_info("mesher").unwrap(), None);

    // Five solver seats held; a sixth waits in the queue and hears its place.
    let mut held: Vec<blocking::Lease> = (0..5)
        .map(|_| client.checkout(&Want::feature("solver")).unwrap())
        .collect();
    assert_eq!(daemon.feature("solver")["holders"][0]["user"], "svc-batch");
    let positions = Arc::new(Mutex::new(Vec::new()));
    let mut want = Want::feature("solver");
    want.wait = Duration::from_secs(60);
    // The client is Sync: the queued checkout runs on another thread.
    let waiter = std::thread::scope(|s| {
        let sink = positions.clone();
        let client = &client;
        let want = &want;
        let handle =
            s.spawn(move || client.checkout_queued(want, |p| sink.lock().unwrap().push(p)));
        assert!(wait_until(Duration::from_secs(30), || !positions
            .lock()
            .unwrap()
            .is_empty()));
        held.pop().unwrap().checkin().unwrap();
        handle.join().unwrap()
    });
    let mut waiter = waiter.unwrap();
    assert_eq!(*positions.lock().unwrap(), vec![1]);

    // A status callback, and a lease that outlives its client reports Lost.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    waiter.on_change(move |s| sink.lock().unwrap().push(s.clone()));
    assert_eq!(waiter.status(), LeaseStatus::Active);
    client.close();
    assert!(matches!(waiter.status(), LeaseStatus::Lost(_)));
    assert!(wait_until(Duration::from_secs(10), || seen
        .lock()
        .unwrap()
        .iter()
        .any(|s| matches!(s, LeaseStatus::Lost(_)))));
    drop(waiter);
    drop(held);
    assert!(wait_until(Duration::from_secs(10), || daemon
        .in_use("solver")
        == 0));
}

/// A lease dropped as the application's runtime shuts down (`#[tokio::main]` returning
/// right after) is still checked in: the task spawned for it never runs, so the last
/// reference's drop delivers it on a thread of its own. It used to wait for the
/// server's idle timeout (60 s here).
#[test]
fn a_lease_dropped_as_the_runtime_shuts_down_is_still_checked_in() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &["--idle-timeout-secs", "60"],
    );
    // A current-thread runtime, as `#[tokio::main(flavor = "current_thread")]` makes: a
    // task spawned in its last moment never runs.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rt
        .block_on(Client::connect(config(vec![daemon.addr.to_string()])))
        .unwrap();
    let handle = rt
        .block_on(client.checkout(&Want::feature("solver")))
        .unwrap();
    assert_eq!(daemon.in_use("solver"), 1);
    // What `main` returning does: the handle and the client go, then the runtime.
    let dropped = std::time::Instant::now();
    rt.block_on(async move {
        drop(handle);
        drop(client);
    });
    drop(rt);
    assert!(
        wait_until(Duration::from_secs(20), || daemon.in_use("solver") == 0),
        "the seat is still held {:?} after the runtime went",
        dropped.elapsed()
    );
}

/// An application that asked for it (`Want::reacquire`) gets a seat again by itself when
/// the server no longer holds its lease: here tallyd was down for longer than the
/// lease's TTL, so the restored lease has run out. The handle reads `Lost` meanwhile,
/// then `Active` under a new lease id; dropping it checks the new seat in.
#[test]
fn a_lost_lease_is_checked_out_again_when_the_application_asked_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let timing = [
        "--lease-ttl-secs",
        "4",
        "--heartbeat-secs",
        "2",
        "--idle-timeout-secs",
        "5",
    ];
    let daemon = Daemon::start(&data, "127.0.0.1:0", &timing);
    let addr = daemon.addr.to_string();
    let rt = runtime();
    let client = rt
        .block_on(Client::connect(config(vec![addr.clone()])))
        .unwrap();
    let mut want = Want::feature("solver");
    want.reacquire = true;
    let handle = rt.block_on(client.checkout(&want)).unwrap();
    let first = handle.id();
    daemon.kill();
    // Down for longer than the TTL plus the clock mark's slack: the lease ends.
    let down = std::time::Instant::now();
    assert!(wait_until(Duration::from_secs(30), || down.elapsed()
        > Duration::from_secs(4 + 10 + 2)));
    let daemon = Daemon::start(&data, &addr, &timing);
    assert!(
        rt.block_on(wait_status(&handle, |s| *s == LeaseStatus::Active
            && handle.held_id() != Some(first))),
        "not checked out again: {:?}; log:\n{}",
        handle.status(),
        daemon.log_text()
    );
    let now_held = handle.held_id().unwrap();
    assert_ne!(now_held, first);
    assert_eq!(daemon.in_use("solver"), 1);
    assert_eq!(
        daemon.feature("solver")["holders"][0]["lease"],
        now_held.to_string().as_str()
    );
    drop(handle);
    assert!(wait_until(Duration::from_secs(10), || daemon
        .in_use("solver")
        == 0));
    rt.block_on(client.close());
}
