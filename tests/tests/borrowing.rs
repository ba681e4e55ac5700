//! Borrowed leases where features meet (issue 14): a borrowed lease serves only what was
//! borrowed — its feature, its seat count at a time on this machine whatever process
//! asks, and the versions and build dates its licence terms admit — through the real
//! `tallyd` and `tally` binaries and the library, with the server up and stopped.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tally_client::{cache, Client, ClientConfig, ClientError, LeaseStatus, Trust, Want};
use tally_protocol::wire::DenialReason;
use tally_tests::{bin, wait_until, Daemon, Holder};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `tally` against `addr` (up or not), trusting `trust`, with the cache in `cache`.
fn tally_at(addr: &str, trust: &[String], cache: &Path) -> Command {
    let mut c = Command::new(bin("tally"));
    c.env_remove("TALLY_SERVER")
        .env("TALLY_CACHE_DIR", cache)
        .args(["--server", addr])
        .args(trust);
    c
}

/// `tally run ARGS -- sh -c 'touch MARKER; sleep 60'` in its own process group: the
/// marker appears once the seat is held and the command runs.
fn hold(mut tally: Command, run_args: &[&str], marker: &Path) -> Holder {
    let child = tally
        .arg("run")
        .args(run_args)
        .args(["--", "sh", "-c", "touch \"$1\"; exec sleep 60", "sh"])
        .arg(marker)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("starting tally run");
    let holder = Holder::from_child(child);
    assert!(
        wait_until(Duration::from_secs(30), || marker.exists()),
        "tally run {run_args:?} did not start its command"
    );
    holder
}

fn lease_id_of(borrow_output: &str) -> String {
    borrow_output
        .split("(lease ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no lease id in {borrow_output}"))
        .to_string()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn one_borrowed_seat_serves_one_program_at_a_time_and_status_shows_it_offline() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let data = dir.path().join("data");
    let daemon = Daemon::start(&data, "127.0.0.1:0", &[]);
    let addr = daemon.addr.to_string();
    let trust = daemon.trust.clone();
    let tally = || tally_at(&addr, &trust, &cache);
    let borrowed = ok(tally()
        .args(["borrow", "solver", "--for", "3d"])
        .output()
        .unwrap());
    let lease = lease_id_of(&borrowed);
    assert_eq!(daemon.in_use("solver"), 1);
    daemon.kill();

    // Offline: the first program takes the one borrowed seat...
    let first = hold(tally(), &["solver"], &dir.path().join("first"));
    // ...and the next two, while it runs, are refused with the reason.
    for _ in 0..2 {
        let out = tally()
            .args(["run", "solver", "--", "true"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!(
                "borrowed lease {lease} of 'solver' is in use by another program on this machine"
            )),
            "{}",
            stderr(&out)
        );
    }
    // Two seats from a one-seat borrow: refused for the count.
    let out = tally()
        .args(["run", "solver", "--count", "2", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "borrowed lease {lease} of 'solver' has 1 seat; 2 requested"
        )),
        "{}",
        stderr(&out)
    );
    // The lock files keep the cache's permissions.
    assert_eq!(mode(&cache), 0o700);
    assert_eq!(mode(&cache.join("borrowed.json")), 0o600);
    let locks: Vec<PathBuf> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "lock"))
        .collect();
    assert!(!locks.is_empty());
    for lock in &locks {
        assert_eq!(mode(lock), 0o600, "{}", lock.display());
    }

    // `tally status` with no server shows what is borrowed, and until when (exit 0).
    let out = tally().args(["status"]).output().unwrap();
    let text = ok(out);
    assert!(text.contains("solver") && text.contains(&lease), "{text}");
    let out = tally().args(["status", "--json"]).output().unwrap();
    let doc: serde_json::Value = serde_json::from_str(&ok(out)).unwrap();
    assert_eq!(doc["offline"], true);
    assert_eq!(doc["borrowed"][0]["feature"], "solver");
    assert_eq!(doc["borrowed"][0]["lease"], lease.as_str());
    assert_eq!(doc["borrowed"][0]["count"], 1);
    assert!(doc["borrowed"][0]["borrowed_until"].is_string());
    // Nothing borrowed: still "no server" (69).
    let out = tally_at(&addr, &trust, &dir.path().join("empty-cache"))
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));

    // The program holding the seat dies: the kernel frees the seat for the next one.
    drop(first);
    let out = tally()
        .args(["run", "solver", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("using the seat of 'solver' borrowed until"));

    // Online again: the first program uses the borrowed seat, the second (the borrowed
    // seat busy) and a two-seat run (beyond the borrow) get seats from the server.
    let daemon = Daemon::start(&data, &addr, &[]);
    let _first = hold(tally(), &["solver"], &dir.path().join("online-first"));
    assert_eq!(
        daemon.in_use("solver"),
        1,
        "the borrowed seat, no second one"
    );
    let _second = hold(tally(), &["solver"], &dir.path().join("online-second"));
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 2));
    let _pair = hold(
        tally(),
        &["solver", "--count", "2"],
        &dir.path().join("online-pair"),
    );
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 4));
}

/// A vendor site: vendor key, server identity, one bundle with `solver` (5 seats,
/// versions up to 2027.1, updates until 2027-06-30, borrowable for a week), a config.
struct Site {
    root: tempfile::TempDir,
}

impl Site {
    fn new() -> Site {
        let site = Site {
            root: tempfile::tempdir().unwrap(),
        };
        let data = site.path("data");
        std::fs::create_dir_all(site.path("bundles")).unwrap();
        ok(Command::new(bin("tallyd"))
            .arg("init")
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap());
        ok(Command::new(bin("tallyd"))
            .arg("request")
            .arg("--data-dir")
            .arg(&data)
            .arg("--out")
            .arg(site.path("activation.req"))
            .output()
            .unwrap());
        ok(Command::new(bin("tally-publisher"))
            .arg("keygen")
            .arg("--out")
            .arg(site.path("vendor"))
            .output()
            .unwrap());
        let spec = r#"
id = "base"
vendor = "Acme Simulation"
supersedes = []
[customer]
id = "C-1001"
name = "Example Corp"
[[feature]]
name = "solver"
seats = 5
version_ceiling = "2027.1"
maintenance_until = "2027-06-30"
borrow_limit_hours = 168
[[feature]]
name = "viewer"
seats = 5
"#;
        std::fs::write(site.path("base.toml"), spec).unwrap();
        ok(Command::new(bin("tally-publisher"))
            .arg("issue")
            .arg("--vendor-key")
            .arg(site.path("vendor.key"))
            .arg("--spec")
            .arg(site.path("base.toml"))
            .arg("--request")
            .arg(site.path("activation.req"))
            .arg("--out")
            .arg(site.path("bundles/base.bundle"))
            .output()
            .unwrap());
        std::fs::write(
            site.path("tallyd.toml"),
            format!(
                "listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nbundle_dir = \"{}\"\nvendor_keys = [\"{}\"]\n",
                data.display(),
                site.path("bundles").display(),
                site.path("vendor.pub").display()
            ),
        )
        .unwrap();
        site
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn trust(&self) -> Trust {
        let text = std::fs::read_to_string(self.path("vendor.pub")).unwrap();
        Trust::Vendor(vec![
            tally_protocol::keys::public_key_from_armored(&text).unwrap()
        ])
    }
}

#[test]
fn a_borrowed_lease_serves_only_its_count_and_versions_online_offline_and_in_the_library() {
    let site = Site::new();
    let cache = site.path("cache");
    // The library reads the cache location from the environment; only this test of
    // this file runs the library, the others pass it to their `tally` processes.
    std::env::set_var("TALLY_CACHE_DIR", &cache);
    let daemon = Daemon::run(&site.path("tallyd.toml"), &site.path("vendor.pub"));
    let addr = daemon.addr.to_string();
    let trust = daemon.trust.clone();
    let tally = || tally_at(&addr, &trust, &cache);
    let big_new = [
        "run",
        "solver",
        "--count",
        "20",
        "--version",
        "2099.1",
        "--",
        "true",
    ];

    // Without a borrowed lease the server refuses the version.
    let out = tally_at(&addr, &trust, &site.path("no-cache"))
        .args(big_new)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("version 2099.1 of 'solver' is above the licensed version 2027.1")
    );

    let lease = lease_id_of(&ok(tally()
        .args(["borrow", "solver", "--for", "1d"])
        .output()
        .unwrap()));
    // Online with the borrowed lease in the cache: the same answer (the server decides).
    let out = tally().args(big_new).output().unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("version 2099.1 of 'solver' is above the licensed version 2027.1"),
        "{}",
        stderr(&out)
    );
    let out = tally()
        .args(["run", "solver", "--version", "2027.1", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // The library: the same rules through `Client::checkout`.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut config = ClientConfig::new(vec![addr.clone()], site.trust());
    config.connect_timeout = Duration::from_secs(2);
    let client = rt.block_on(Client::connect(config)).unwrap();
    let mut want = Want::feature("solver");
    want.version = Some("2099.1".into());
    want.count = 20;
    match rt.block_on(client.checkout(&want)) {
        Err(ClientError::Denied(d)) => assert!(
            matches!(d.reason, DenialReason::VersionAboveCeiling { .. }),
            "{d}"
        ),
        other => panic!("a 2099.1 checkout of 20 seats was not denied: {other:?}"),
    }
    let mut want = Want::feature("solver");
    want.version = Some("2027.1".into());
    let borrowed = rt.block_on(client.checkout(&want)).unwrap();
    assert!(matches!(borrowed.status(), LeaseStatus::Borrowed { .. }));
    assert_eq!(borrowed.id().to_string(), lease);
    // The one borrowed seat is taken: the next checkout is the server's.
    let second = rt.block_on(client.checkout(&want)).unwrap();
    assert_eq!(second.status(), LeaseStatus::Active);
    assert_eq!(daemon.in_use("solver"), 2);
    drop(second);
    drop(borrowed);
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 1));
    // Dropping the handle freed the borrowed seat on this machine.
    let again = rt.block_on(client.checkout(&want)).unwrap();
    assert!(matches!(again.status(), LeaseStatus::Borrowed { .. }));
    drop(again);
    rt.block_on(client.close());

    daemon.kill();
    // Offline: the borrowed lease answers what the server would have.
    let out = tally().args(big_new).output().unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("version 2099.1 of 'solver' is above the licensed version 2027.1"),
        "{}",
        stderr(&out)
    );
    let out = tally()
        .args(["run", "solver", "--count", "20", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("has 1 seat; 20 requested"),
        "{}",
        stderr(&out)
    );
    let out = tally()
        .args([
            "run",
            "solver",
            "--version",
            "2027.1",
            "--build-date",
            "2027-07-01",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("maintenance expired"),
        "{}",
        stderr(&out)
    );
    // A borrowed solver seat is no viewer seat.
    let out = tally()
        .args(["run", "viewer", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    let out = tally()
        .args([
            "run",
            "solver",
            "--version",
            "2027.1",
            "--build-date",
            "2027-06-30",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The library with no server: `Client::connect` succeeds because a borrowed seat
    // can serve, and checkouts obey the same rules.
    let mut config = ClientConfig::new(vec![addr.clone()], site.trust());
    config.connect_timeout = Duration::from_secs(2);
    let client = rt
        .block_on(Client::connect(config))
        .expect("connect fails with no server although a borrowed seat is cached");
    let mut want = Want::feature("solver");
    want.version = Some("2027.1".into());
    let offline = rt.block_on(client.checkout(&want)).unwrap();
    assert!(matches!(offline.status(), LeaseStatus::Borrowed { .. }));
    assert_eq!(offline.id().to_string(), lease);
    // Its one seat is in use now: a second checkout gets no seat, and says why.
    match rt.block_on(client.checkout(&want)) {
        Err(ClientError::NoServer(why)) => assert!(
            why.iter().any(|w| w.contains("in use by another program")),
            "{why:?}"
        ),
        other => panic!("a second offline checkout of a one-seat borrow: {other:?}"),
    }
    drop(offline);
    want.count = 20;
    match rt.block_on(client.checkout(&want)) {
        Err(ClientError::NoServer(why)) => {
            assert!(
                why.iter().any(|w| w.contains("has 1 seat; 20 requested")),
                "{why:?}"
            )
        }
        other => panic!("20 seats from a one-seat borrow: {other:?}"),
    }
    assert!(matches!(
        rt.block_on(client.checkout(&Want::feature("viewer"))),
        Err(ClientError::NoServer(_))
    ));
    rt.block_on(client.close());
    // The rules are one function of the library, usable offline too.
    let mut want = Want::feature("solver");
    want.version = Some("2099.1".into());
    match cache::claim(
        &site.trust(),
        &want,
        None,
        tally_protocol::time::UnixTime(now()),
    ) {
        Ok(cache::Claim::Refused(why)) => assert!(
            why.to_string()
                .contains("version 2099.1 of 'solver' is above the licensed version 2027.1"),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn a_two_seat_borrow_for_a_version_serves_two_programs_up_to_that_version() {
    let site = Site::new();
    let cache = site.path("cache");
    let daemon = Daemon::run(&site.path("tallyd.toml"), &site.path("vendor.pub"));
    let addr = daemon.addr.to_string();
    let trust = daemon.trust.clone();
    let tally = || tally_at(&addr, &trust, &cache);
    // The server checks the version at borrow time, as for any checkout.
    let out = tally()
        .args(["borrow", "solver", "--for", "1d", "--version", "2028"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(stderr(&out).contains("above the licensed version 2027.1"));
    let lease = lease_id_of(&ok(tally()
        .args([
            "borrow",
            "solver",
            "--for",
            "1d",
            "--count",
            "2",
            "--version",
            "2026.0",
        ])
        .output()
        .unwrap()));
    assert_eq!(daemon.in_use("solver"), 2);
    daemon.kill();

    // Offline: no version above the one borrowed for, though the licence allows it.
    let out = tally()
        .args(["run", "solver", "--version", "2027.1", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "version 2027.1 of 'solver' is above version 2026.0, which borrowed lease {lease} was borrowed for"
        )),
        "{}",
        stderr(&out)
    );
    // Two seats: two programs at once, each on one; a third is refused, and so is a
    // two-seat run while one seat is taken.
    let first = hold(
        tally(),
        &["solver", "--version", "2026.0"],
        &site.path("first"),
    );
    let out = tally()
        .args(["run", "solver", "--count", "2", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is in use by other programs on this machine"),
        "{}",
        stderr(&out)
    );
    let _second = hold(tally(), &["solver"], &site.path("second"));
    let out = tally()
        .args(["run", "solver", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("borrowed lease {lease} of 'solver' is in use")),
        "{}",
        stderr(&out)
    );
    drop(first);
    let out = tally()
        .args(["run", "solver", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// Found by reasoning over the lifecycle test's borrow steps (issue 14, "where features
/// meet"): a program started offline on a borrowed seat never hears of a server, so a
/// `tally return` while it ran handed the seat back to the server, which gave it to
/// someone else: two programs on one seat. The return is now refused while a seat of
/// the lease is in use on this machine (exit 75), and works once the program ended.
#[test]
fn a_borrowed_seat_in_use_is_not_returned_until_its_program_ends() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let data = dir.path().join("data");
    let daemon = Daemon::start(&data, "127.0.0.1:0", &[]);
    let addr = daemon.addr.to_string();
    let trust = daemon.trust.clone();
    let tally = || tally_at(&addr, &trust, &cache);
    let lease = lease_id_of(&ok(tally()
        .args(["borrow", "solver", "--for", "1d"])
        .output()
        .unwrap()));
    daemon.kill();
    // Offline, a program takes the borrowed seat; then the server is back.
    let program = hold(tally(), &["solver"], &dir.path().join("offline"));
    let daemon = Daemon::start(&data, &addr, &[]);
    let out = tally().args(["return", "solver"]).output().unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "borrowed lease {lease} of 'solver' is in use by a program on this machine"
        )),
        "{}",
        stderr(&out)
    );
    // Still borrowed: the server holds the seat, and the other four are all there is.
    assert_eq!(daemon.in_use("solver"), 1);
    let out = tally_at(&addr, &trust, &dir.path().join("other"))
        .args(["run", "solver", "--count", "5", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    // The program ends: the seat can go back.
    drop(program);
    let out = tally().args(["return", "solver"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(daemon.in_use("solver"), 0);
}
