//! SIGKILL `tallyd` at random points while clients hammer checkouts and checkins, 20
//! times, restart it each time, and check the invariants against what the clients were
//! told: every acknowledged lease is still there, nothing is over-granted, nothing
//! appears that nobody asked for, and the usage reports exported along the way verify
//! as one unbroken chain that records every acknowledged grant.

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
    let timing = ["--lease-ttl-secs", "300", "--heartbeat-secs", "30"];
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
    for round in 0..ROUNDS {
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
        acknowledged.len() >= ROUNDS,
        "too little traffic to mean much"
    );
    println!(
        "{ROUNDS} SIGKILL rounds: {} acknowledged grants, all in {} verified reports; every lease held at a kill restored",
        acknowledged.len(),
        links.len()
    );
}
