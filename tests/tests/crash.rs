//! SIGKILL `tallyd` at random points while clients hammer checkouts and checkins, 20
//! times, restart it each time, and check the invariants against what the clients were
//! told: every acknowledged lease is still there, nothing is over-granted, nothing
//! appears that nobody asked for, and the usage reports exported along the way verify
//! as one unbroken chain that records every acknowledged grant.
//!
//! The second test does the same with the data directory on a small volume that is
//! filled (and freed, and filled again) between and during the kills: the daemon must
//! start every time, on the full volume too, with every acknowledged lease.
//! `TALLY_CRASH_ROUNDS=N` sets the number of rounds of both (the long run in
//! SECURITY.md); the default keeps CI short.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tally_client::{ClientConfig, Session, Trust};
use tally_protocol::bundle;
use tally_protocol::lease::LeaseId;
use tally_protocol::report::UsageEvent;
use tally_protocol::wire::AdminOp;
use tally_publisher::reconcile::{verify_chain, ReportFile};
use tally_tests::{wait_until, Daemon};

/// What the clients know.
#[derive(Default)]
struct Ledger {
    /// Leases whose grant was acknowledged and whose checkin was never sent.
    held: BTreeSet<String>,
    /// Leases whose checkin was sent but not acknowledged: either state is fine.
    uncertain: BTreeSet<String>,
    /// Every grant acknowledged this round, checked in since or not.
    acknowledged: BTreeSet<String>,
}

const CLIENTS: usize = 4;
const SEATS: usize = 20;
const ROUNDS: usize = 20;

/// Rounds to run: `TALLY_CRASH_ROUNDS`, else `default` (bounded at 2,000).
fn rounds(default: usize) -> usize {
    std::env::var("TALLY_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .clamp(1, 2_000)
}

async fn hammer(
    addr: String,
    book: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    grants: Arc<AtomicUsize>,
) {
    let mut config = ClientConfig::new(vec![addr], Trust::Demo);
    // Generous, for a loaded CI machine: a client stops at its first failed request
    // (its answer unknown), and after the kill the test aborts the clients anyway.
    config.request_timeout = Duration::from_secs(5);
    config.connect_timeout = Duration::from_secs(10);
    let Ok(session) = Session::connect(&config).await else {
        return;
    };
    let request = tally_tests::one_seat("viewer");
    let mut mine = Vec::new();
    // Bounded: at most 2,000 operations per client, and it stops when told.
    for i in 0..2_000u32 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if i % 3 == 2 && !mine.is_empty() {
            let lease: tally_client::Lease = mine.swap_remove((i as usize * 7) % mine.len());
            let id = lease.id().to_string();
            {
                let mut b = book.lock().unwrap();
                b.held.remove(&id);
                b.uncertain.insert(id.clone());
            }
            match session.checkin(&[lease.lease_ref()]).await {
                Ok(_) => {
                    book.lock().unwrap().uncertain.remove(&id);
                }
                Err(_) => break,
            }
        } else {
            match session.checkout(&request).await {
                Ok(lease) => {
                    let mut b = book.lock().unwrap();
                    b.held.insert(lease.id().to_string());
                    b.acknowledged.insert(lease.id().to_string());
                    drop(b);
                    grants.fetch_add(1, Ordering::Relaxed);
                    mine.push(lease);
                }
                Err(tally_client::ClientError::Denied(_)) => {}
                Err(_) => break,
            }
        }
    }
}

fn lease_ids(daemon: &Daemon) -> BTreeSet<String> {
    daemon.feature("viewer")["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["lease"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_lease_and_over_grants_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Leases outlive the test's restarts: the TTL is long, so only the store counts.
    // Between rounds the test clears the seats with admin removals: no hold-off, so
    // the next round's clients (the same user on the same host) are served at once.
    let timing = [
        "--lease-ttl-secs",
        "300",
        "--heartbeat-secs",
        "30",
        "--remove-holdoff-secs",
        "0",
    ];
    let mut daemon = Daemon::start(&data, "127.0.0.1:0", &timing);
    let addr = daemon.addr.to_string();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let book = Arc::new(Mutex::new(Ledger::default()));
    // Kill points vary from round to round: after 1 to 30 grants, then 0 to 150 ms on.
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut random = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut acknowledged: BTreeSet<String> = BTreeSet::new();
    let mut reports: Vec<ReportFile> = Vec::new();
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let rounds = rounds(ROUNDS);
    for round in 0..rounds {
        let kill_after = 1 + random(30) as usize;
        let then = Duration::from_millis(random(150));
        let stop = Arc::new(AtomicBool::new(false));
        let grants = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|_| {
                runtime.spawn(hammer(
                    addr.clone(),
                    book.clone(),
                    stop.clone(),
                    grants.clone(),
                ))
            })
            .collect();
        // Kill in the middle of the traffic: once some grants went through.
        assert!(
            wait_until(Duration::from_secs(30), || grants.load(Ordering::Relaxed)
                >= kill_after),
            "no traffic; log:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(then);
        let killed_log = daemon.log.clone();
        daemon.kill();
        stop.store(true, Ordering::Relaxed);
        // A request cut off here is like one that timed out: its answer is unknown.
        runtime.block_on(async {
            for t in tasks {
                t.abort();
                let _ = t.await;
            }
        });
        daemon = Daemon::start(&data, &addr, &timing);
        let found = lease_ids(&daemon);
        let b = book.lock().unwrap();
        let missing: Vec<_> = b.held.difference(&found).collect();
        assert!(
            missing.is_empty(),
            "round {round}: acknowledged leases lost: {missing:?}; killed daemon's log:\n{}\nrestarted daemon's log:\n{}",
            std::fs::read_to_string(&killed_log).unwrap_or_default(),
            daemon.log_text()
        );
        assert!(
            found.len() <= SEATS,
            "round {round}: {} leases for {SEATS} seats",
            found.len()
        );
        // Beyond the known leases, at most one grant per client can have been durable
        // without its answer arriving before the kill.
        let unknown = found
            .iter()
            .filter(|id| !b.held.contains(*id) && !b.uncertain.contains(*id))
            .count();
        assert!(
            unknown <= CLIENTS,
            "round {round}: {unknown} leases nobody was told about"
        );
        assert_eq!(daemon.in_use("viewer") as usize, found.len());
        acknowledged.extend(b.acknowledged.iter().cloned());
        drop(b);
        // Start the next round from an empty feature, so that it has seats to hammer,
        // and take this round's usage report.
        runtime.block_on(async {
            let session = Session::connect(&ClientConfig::new(vec![addr.clone()], Trust::Demo))
                .await
                .unwrap();
            for id in &found {
                let lease = LeaseId(u64::from_str_radix(id.trim_start_matches('L'), 16).unwrap());
                session
                    .admin(token.trim(), AdminOp::Remove { lease })
                    .await
                    .unwrap();
            }
            let reply = session
                .admin_reply(token.trim(), AdminOp::ExportReport)
                .await
                .unwrap();
            reports.push(ReportFile {
                name: format!("round {round}"),
                text: reply.report.expect("an exported report"),
            });
            session.close().await;
        });
        assert_eq!(daemon.in_use("viewer"), 0);
        *book.lock().unwrap() = Ledger::default();
    }
    // The reports of all rounds form one chain, and it saw every acknowledged grant.
    let bundle_text = std::fs::read_to_string(data.join("demo.bundle")).unwrap();
    let bundle = bundle::verify(
        &bundle::from_armored(&bundle_text).unwrap(),
        &[tally_protocol::keys::demo::vendor_public()],
    )
    .unwrap()
    .bundle;
    let links = verify_chain(&bundle, &reports)
        .unwrap_or_else(|problems| panic!("the report chain is broken: {problems:#?}"));
    let granted: BTreeSet<String> = links
        .iter()
        .flat_map(|l| &l.report.report.events)
        .filter_map(|e| match &e.event {
            UsageEvent::Granted { lease, .. } => Some(lease.to_string()),
            _ => None,
        })
        .collect();
    let unrecorded: Vec<_> = acknowledged.difference(&granted).collect();
    assert!(
        unrecorded.is_empty(),
        "acknowledged grants missing from the usage reports: {unrecorded:?}"
    );
    assert!(
        acknowledged.len() >= rounds,
        "too little traffic to mean much"
    );
    println!(
        "{rounds} SIGKILL rounds: {} acknowledged grants, all in {} verified reports; every lease held at a kill restored",
        acknowledged.len(),
        links.len()
    );
}

/// A mounted volume, unmounted (lazily) when dropped.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the volume holding `filler` to the last byte.
fn fill(filler: &std::path::Path) {
    let out = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No space left"),
        "dd did not fill the volume: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 20: SIGKILL under load with the volume full at some kills, filled during the
/// traffic before others, freed at the kill or between two fills; every start (on the
/// full volume too) must come up with every acknowledged lease, and never with a store
/// that cannot be opened. Needs root (a tmpfs), as CI has; skipped with
/// TALLY_SKIP_MOUNT_TESTS=1 elsewhere.
#[test]
fn sigkill_with_the_volume_full_or_filling_never_leaves_a_store_that_cannot_open() {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        assert!(
            std::env::var_os("TALLY_SKIP_MOUNT_TESTS").is_some(),
            "this test mounts a tmpfs, which needs root; set TALLY_SKIP_MOUNT_TESTS=1 to skip it"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(&vol)
        .status()
        .unwrap();
    assert!(mounted.success());
    let _mount = Mount(vol.clone());
    let data = vol.join("data");
    let filler = vol.join("filler");
    // Between rounds the test clears the seats with admin removals: no hold-off, so
    // the next round's clients (the same user on the same host) are served at once.
    let timing = [
        "--lease-ttl-secs",
        "300",
        "--heartbeat-secs",
        "30",
        "--remove-holdoff-secs",
        "0",
    ];
    // The log lives off the volume: a full volume would swallow it.
    let start = |listen: &str| {
        let mut args: Vec<std::ffi::OsString> = vec!["demo".into(), "--data-dir".into()];
        args.push(data.clone().into());
        args.extend(["--listen".into(), listen.into()]);
        args.extend(timing.iter().map(Into::into));
        Daemon::spawn(&args, &dir.path().join("tallyd"), vec!["--demo".into()])
    };
    let mut daemon = start("127.0.0.1:0");
    let addr = daemon.addr.to_string();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let book = Arc::new(Mutex::new(Ledger::default()));
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut random = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let rounds = rounds(12);
    let (mut killed_full, mut started_full, mut held_at_kills) = (0, 0, 0);
    for round in 0..rounds {
        // 0: a plain kill; 1: filled during the traffic, killed full; 2: as 1, and the
        // space comes back at the kill; 3: full from the start of the round.
        let mode = if round < 4 { round } else { random(4) as usize };
        if mode == 3 && !filler.exists() {
            fill(&filler);
        }
        let kill_after = 1 + random(20) as usize;
        let then = Duration::from_millis(random(150));
        let stop = Arc::new(AtomicBool::new(false));
        let grants = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|_| {
                runtime.spawn(hammer(
                    addr.clone(),
                    book.clone(),
                    stop.clone(),
                    grants.clone(),
                ))
            })
            .collect();
        if mode == 3 {
            // No grant can go through; kill while the clients are refused.
            std::thread::sleep(then);
        } else {
            assert!(
                wait_until(Duration::from_secs(30), || grants.load(Ordering::Relaxed)
                    >= kill_after),
                "round {round}: no traffic; log:\n{}",
                daemon.log_text()
            );
        }
        if mode == 1 || mode == 2 {
            fill(&filler);
            std::thread::sleep(then);
        }
        if mode == 2 {
            std::fs::remove_file(&filler).unwrap();
        }
        killed_full += usize::from(filler.exists());
        daemon.kill();
        stop.store(true, Ordering::Relaxed);
        runtime.block_on(async {
            for t in tasks {
                t.abort();
                let _ = t.await;
            }
        });
        started_full += usize::from(filler.exists());
        daemon = start(&addr);
        let found = lease_ids(&daemon);
        {
            let b = book.lock().unwrap();
            let missing: Vec<_> = b.held.difference(&found).collect();
            assert!(
                missing.is_empty(),
                "round {round} (mode {mode}): acknowledged leases lost: {missing:?}"
            );
            assert!(found.len() <= SEATS, "round {round}: over-granted");
            held_at_kills += b.held.len();
        }
        // Space back (if it was not): the daemon must take grants again by itself.
        if filler.exists() {
            std::fs::remove_file(&filler).unwrap();
        }
        assert!(
            wait_until(Duration::from_secs(60), || daemon
                .http("GET", "/metrics", None)
                .1
                .contains("tally_store_writable 1")),
            "round {round}: the store never became writable again; log:\n{}",
            daemon.log_text()
        );
        runtime.block_on(async {
            let session = Session::connect(&ClientConfig::new(vec![addr.clone()], Trust::Demo))
                .await
                .unwrap();
            for id in &found {
                let lease = LeaseId(u64::from_str_radix(id.trim_start_matches('L'), 16).unwrap());
                session
                    .admin(token.trim(), AdminOp::Remove { lease })
                    .await
                    .unwrap();
            }
            session.close().await;
        });
        assert_eq!(daemon.in_use("viewer"), 0);
        *book.lock().unwrap() = Ledger::default();
    }
    daemon.stop();
    let set_aside = std::fs::read_dir(data.join("store").join("quarantine"))
        .map(|d| d.count())
        .unwrap_or(0);
    println!(
        "{rounds} SIGKILL rounds on a 64 MiB volume: {killed_full} killed with the volume \
         full, {started_full} starts on a full volume, {held_at_kills} acknowledged leases \
         held at the kills, all restored; 0 stores that failed to open; {set_aside} \
         leftovers set aside"
    );
}
