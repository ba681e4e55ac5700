//! Three real `tallyd` processes on loopback run as one cluster (`[[cluster]]`, one
//! bundle binding the three): the leader is SIGKILLed while clients check out and
//! hold seats, round after round, and the cluster must lose no acknowledged lease
//! (each holder keeps its lease id), grant no seat beyond the licence (seats in use
//! sampled all along), and grant again through a new leader (the time is printed).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tally_tests::cluster::{free_udp_addrs, ClusterSite};
use tally_tests::{ok, wait_until, Daemon, Holder};

/// Seats the bundle sells.
const SEATS: u64 = 5;
/// Long-running holders (the rest of the seats churn in the storm).
const HOLDERS: usize = 3;
/// Leader kills.
const ROUNDS: usize = 3;
/// How long anything may take before the test gives up (a bound, not a measurement).
const PATIENCE: Duration = Duration::from_secs(60);

/// `tally status --json` through any member (the client finds the leader); `None` while
/// no member leads or answers.
fn status(c: &ClusterSite, addrs: &[SocketAddr]) -> Option<serde_json::Value> {
    let out = c
        .tally(addrs)
        .args(["status", "--json"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The solver feature's holders' lease ids and the seats in use, as the leader says.
fn seats(doc: &serde_json::Value) -> (BTreeSet<String>, u64) {
    let feature = doc["features"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["name"] == "solver"))
        .cloned()
        .unwrap_or_default();
    let leases = feature["holders"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|h| h["lease"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    (leases, feature["in_use"].as_u64().unwrap_or(0))
}

/// The member that answered `doc`.
fn answered_by(doc: &serde_json::Value, addrs: &[SocketAddr]) -> usize {
    let server = doc["server"].as_str().unwrap_or_default();
    addrs
        .iter()
        .position(|a| a.to_string() == server)
        .unwrap_or_else(|| panic!("status answered by {server}, not a member"))
}

/// The end of every running member's log, for a failure's message.
fn logs(daemons: &[Option<Daemon>]) -> String {
    daemons
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.as_ref().map(|d| (i, d.log_text())))
        .map(|(i, log)| {
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            format!("--- s{i} ---\n{tail}\n")
        })
        .collect()
}

/// A three-server site, configured and running.
fn running_cluster() -> (ClusterSite, Vec<SocketAddr>, Vec<Option<Daemon>>) {
    let c = ClusterSite::new(3);
    ok(c.issue_seats(&c.all_requests(), "ha.bundle", SEATS as u32));
    for i in 0..3 {
        c.install("ha.bundle", i);
    }
    let addrs = free_udp_addrs(3);
    c.configure(&addrs, |_, j| addrs[j]);
    let daemons = (0..3).map(|i| Some(c.daemon(i))).collect();
    (c, addrs, daemons)
}

#[test]
fn the_leader_killed_during_a_checkout_storm_loses_no_lease_and_overgrants_nothing() {
    let (c, addrs, mut daemons) = running_cluster();
    assert!(
        wait_until(PATIENCE, || status(&c, &addrs).is_some()),
        "no member came to lead: {}",
        daemons[0].as_ref().unwrap().log_text()
    );

    // Long holders: they must keep their leases, with the same ids, through every kill.
    let mut holders: Vec<Holder> = (0..HOLDERS)
        .map(|_| {
            Holder::from_child(
                c.tally(&addrs)
                    .args(["run", "solver", "--", "sleep", "600"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .process_group(0)
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let mut held = BTreeSet::new();
    assert!(
        wait_until(PATIENCE, || {
            let Some(doc) = status(&c, &addrs) else {
                return false;
            };
            let (leases, in_use) = seats(&doc);
            held = leases;
            in_use == HOLDERS as u64
        }),
        "the holders did not get their seats"
    );

    // The storm: short runs take the other seats and give them back, all along; a
    // sampler reads the seats in use from whoever leads.
    let stop = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicU64::new(0));
    let granted = Arc::new(AtomicU64::new(0));
    // Each grant's run: when it started and when it ended (the grant was acknowledged
    // in between).
    let runs = Arc::new(Mutex::new(Vec::<(Instant, Instant)>::new()));
    let storm: Vec<_> = (0..2)
        .map(|_| {
            let (stop, granted, runs) = (stop.clone(), granted.clone(), runs.clone());
            let mut cmd = c.tally(&addrs);
            cmd.args(["run", "solver", "--", "sleep", "0.2"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            std::thread::spawn(move || {
                let started = Instant::now();
                // Bounded in count and time.
                for _ in 0..2_000 {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(300)
                    {
                        break;
                    }
                    let began = Instant::now();
                    if cmd.status().is_ok_and(|s| s.success()) {
                        granted.fetch_add(1, Ordering::Relaxed);
                        runs.lock().unwrap().push((began, Instant::now()));
                    }
                }
            })
        })
        .collect();
    let sampler = {
        let (stop, most) = (stop.clone(), most.clone());
        let mut cmd = c.tally(&addrs);
        cmd.args(["status", "--json"]).stderr(Stdio::null());
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut samples = 0u64;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(300) {
                if let Ok(out) = cmd.output() {
                    if let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                        most.fetch_max(seats(&doc).1, Ordering::Relaxed);
                        samples += 1;
                    }
                }
            }
            samples
        })
    };

    let mut failovers = Vec::new();
    for round in 0..ROUNDS {
        let before = granted.load(Ordering::Relaxed);
        assert!(
            wait_until(PATIENCE, || granted.load(Ordering::Relaxed) >= before + 2),
            "round {round}: the storm gets no seats"
        );
        let doc = status(&c, &addrs).expect("a leader answers");
        let leader = answered_by(&doc, &addrs);
        daemons[leader].take().unwrap().kill();
        let killed = Instant::now();
        let others: Vec<SocketAddr> = (0..3).filter(|&i| i != leader).map(|i| addrs[i]).collect();
        // A new leader grants again: a run of the storm that started after the kill got
        // its seat (the time counts to that run's end, so it is an upper bound)...
        let mut failover = None;
        assert!(
            wait_until(PATIENCE, || {
                failover = runs
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(began, _)| *began > killed)
                    .map(|(_, ended)| *ended - killed)
                    .min();
                failover.is_some()
            }),
            "round {round}: no grant after the leader was killed\n{}",
            logs(&daemons)
        );
        let failover = failover.unwrap();
        // ...and holds every acknowledged long lease, under its id.
        let mut now_held = BTreeSet::new();
        assert!(
            wait_until(PATIENCE, || {
                let Some(doc) = status(&c, &others) else {
                    return false;
                };
                now_held = seats(&doc).0;
                held.is_subset(&now_held)
            }),
            "round {round}: long leases lost: held {held:?}, now {now_held:?}\n{}",
            logs(&daemons)
        );
        for h in &mut holders {
            assert!(
                matches!(h.child.try_wait(), Ok(None)),
                "round {round}: a holder lost its seat and ended"
            );
        }
        println!("round {round}: killed leader s{leader}; a new leader granted after {failover:?}");
        failovers.push(failover);
        daemons[leader] = Some(c.daemon(leader));
    }
    stop.store(true, Ordering::Relaxed);
    for t in storm {
        t.join().unwrap();
    }
    let samples = sampler.join().unwrap();
    let most = most.load(Ordering::Relaxed);
    println!(
        "{ROUNDS} leader kills; failover (kill to next grant): {failovers:?}; seats in use \
         at most {most} of {SEATS} in {samples} samples; {} storm grants",
        granted.load(Ordering::Relaxed)
    );
    assert!(
        most <= SEATS,
        "over-granted: {most} seats in use of {SEATS}"
    );
    assert!(samples > 0);
}
