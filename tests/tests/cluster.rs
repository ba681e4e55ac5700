//! Three real `tallyd` processes on loopback run as one cluster (`[[cluster]]`, one
//! bundle binding the three). The faults: the leader SIGKILLed while clients check out
//! and hold seats, round after round; the peers' links cut through a fault-injecting
//! UDP relay (the leader isolated, a follower isolated, a flapping link); all three
//! stopped and started at once. Each time the cluster must lose no acknowledged lease
//! (every holder keeps its lease id), grant no seat beyond the licence (seats in use
//! sampled all along), and grant again through a leader of the majority.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tally_tests::cluster::{free_udp_addrs, ClusterSite};
use tally_tests::relay::Relay;
use tally_tests::{ok, wait_until, Daemon, Holder};

/// Seats the bundle sells.
const SEATS: u64 = 5;
/// Long-running holders (the rest of the seats churn in the storm).
const HOLDERS: usize = 3;
/// Leader kills (`TALLY_CLUSTER_ROUNDS` for a long run).
fn rounds() -> usize {
    std::env::var("TALLY_CLUSTER_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
}
/// How long anything may take before the test gives up (a bound, not a measurement).
const PATIENCE: Duration = Duration::from_secs(60);
/// How long the storm may go without a grant after a fault: through the relay, clients
/// follow leaders named by relay addresses that may be cut and wait out their connect
/// timeout (a test artifact: a real member names a reachable address), so the first
/// grant after isolating the leader took 6-65 s in runs on a loaded machine.
const STORM_PATIENCE: Duration = Duration::from_secs(150);

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
    answered_through(doc, addrs, None)
}

/// The member that answered `doc`, also when the client reached it through the relay
/// (a member names the leader by the address it reaches it at: the relay's).
fn answered_through(doc: &serde_json::Value, addrs: &[SocketAddr], relay: Option<&Relay>) -> usize {
    let server = doc["server"].as_str().unwrap_or_default();
    let direct = addrs.iter().position(|a| a.to_string() == server);
    let relayed = || {
        let relay = relay?;
        (0..addrs.len())
            .flat_map(|i| {
                (0..addrs.len())
                    .filter(move |&j| j != i)
                    .map(move |j| (i, j))
            })
            .find(|&(i, j)| relay.addr_of(i, j).to_string() == server)
            .map(|(_, j)| j)
    };
    direct
        .or_else(relayed)
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

/// The log lines of every run of every server of the site (killed ones too) that name
/// one of `leases` or a change of leader, in time order, for a failure's message.
fn lines_naming(c: &ClusterSite, leases: &BTreeSet<String>) -> String {
    let mut lines = Vec::new();
    for i in 0..8 {
        let Ok(dir) = std::fs::read_dir(c.path(&format!("s{i}"))) else {
            continue;
        };
        for file in dir.flatten() {
            if !file
                .file_name()
                .to_string_lossy()
                .starts_with("tallyd.log.")
            {
                continue;
            }
            let text = std::fs::read_to_string(file.path()).unwrap_or_default();
            for line in text.lines() {
                if leases.iter().any(|l| line.contains(l.as_str()))
                    || line.contains("lead")
                    || line.contains("released")
                    || line.contains("cluster member")
                {
                    // Lines start with their time: sorted, they interleave the servers.
                    lines.push(format!("{line} [s{i}]"));
                }
            }
        }
    }
    lines.sort();
    lines.join("\n")
}

/// A three-server site, configured (members reach each other at `peer(addrs, i, j)`)
/// and running, with a leader.
fn running_cluster(
    peer: impl Fn(&[SocketAddr], usize, usize) -> SocketAddr,
    addrs: Vec<SocketAddr>,
) -> (ClusterSite, Vec<SocketAddr>, Vec<Option<Daemon>>) {
    let c = ClusterSite::new(3);
    ok(c.issue_seats(&c.all_requests(), "ha.bundle", SEATS as u32));
    for i in 0..3 {
        c.install("ha.bundle", i);
    }
    c.configure(&addrs, |i, j| peer(&addrs, i, j));
    let daemons: Vec<Option<Daemon>> = (0..3).map(|i| Some(c.daemon(i))).collect();
    // Every member knows the leader (asked alone, each answers or names it): a member
    // started last does not then call an election of its own.
    assert!(
        wait_until(PATIENCE, || (0..3)
            .all(|i| status(&c, &addrs[i..=i]).is_some())),
        "no member came to lead\n{}",
        logs(&daemons)
    );
    (c, addrs, daemons)
}

/// A `tally run solver ARGS -- sleep 600` through `addrs`, in its own process group,
/// its stderr to `stderr`.
fn holder(c: &ClusterSite, addrs: &[SocketAddr], args: &[&str], stderr: Stdio) -> Holder {
    Holder::from_child(
        c.tally(addrs)
            .args(["run", "solver"])
            .args(args)
            .args(["--", "sleep", "600"])
            .env("TALLY_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .unwrap(),
    )
}

/// `HOLDERS` long `tally run` holders; returns them and their lease ids once all hold.
/// A holder whose `tally run` ended before it held a seat (a grant refused while the
/// young cluster changed leader) is started again: this is the set-up, not the fault.
fn hold(c: &ClusterSite, addrs: &[SocketAddr]) -> (Vec<Holder>, BTreeSet<String>) {
    // Each holder's log (debug) in `holder-N.log`, for `still_held` to show.
    let start = |n: usize| {
        let log = std::fs::File::create(c.path(&format!("holder-{n}.log"))).unwrap();
        holder(c, addrs, &[], log.into())
    };
    let mut holders: Vec<Holder> = (0..HOLDERS).map(start).collect();
    let mut held = BTreeSet::new();
    let mut restarts = 0;
    // The lease each holder was told it got (its log's last "checkout granted"): the
    // seats in use must be exactly those, so that no holder still waits for an answer.
    let told = |n: usize| -> Option<String> {
        let log = std::fs::read_to_string(c.path(&format!("holder-{n}.log"))).ok()?;
        let line = log.lines().rev().find(|l| l.contains("checkout granted"))?;
        let lease = line.split("lease=").nth(1)?.split_whitespace().next()?;
        Some(lease.to_string())
    };
    let mut daemons_said = String::new();
    assert!(
        wait_until(PATIENCE, || {
            for (n, h) in holders.iter_mut().enumerate() {
                if !matches!(h.child.try_wait(), Ok(None)) && restarts < 10 {
                    restarts += 1;
                    *h = start(n);
                }
            }
            let Some(doc) = status(c, addrs) else {
                return false;
            };
            let (leases, in_use) = seats(&doc);
            held = leases;
            let answered: BTreeSet<String> = (0..HOLDERS).filter_map(told).collect();
            daemons_said = format!("told {answered:?}");
            in_use == HOLDERS as u64
                && answered == held
                && holders
                    .iter_mut()
                    .all(|h| matches!(h.child.try_wait(), Ok(None)))
        }),
        "the holders did not get their seats (held {held:?}, {daemons_said})\n{}\n{}",
        (0..HOLDERS)
            .map(|n| format!(
                "--- holder {n} ---\n{}",
                std::fs::read_to_string(c.path(&format!("holder-{n}.log"))).unwrap_or_default()
            ))
            .collect::<String>(),
        lines_naming(c, &held)
    );
    (holders, held)
}

/// Waits until the leader holds every lease of `held` (same ids) and every holder
/// still runs.
fn still_held(
    c: &ClusterSite,
    addrs: &[SocketAddr],
    held: &BTreeSet<String>,
    holders: &mut [Holder],
    (what, daemons): (&str, &[Option<Daemon>]),
) {
    let mut now_held = BTreeSet::new();
    assert!(
        wait_until(PATIENCE, || {
            let Some(doc) = status(c, addrs) else {
                return false;
            };
            now_held = seats(&doc).0;
            held.is_subset(&now_held)
        }),
        "{what}: long leases lost: held {held:?}, now {now_held:?}\n{}\n{}",
        logs(daemons),
        lines_naming(c, held)
    );
    for (n, h) in holders.iter_mut().enumerate() {
        let ended = h.child.try_wait();
        if !matches!(ended, Ok(None)) {
            let log =
                std::fs::read_to_string(c.path(&format!("holder-{n}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "{what}: holder {n} lost its seat and ended ({ended:?}); its log's end:\n{}\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
                logs(daemons)
            );
        }
    }
}

/// Short runs taking the free seats and giving them back, all along, and a sampler of
/// the seats in use (from whoever leads); bounded in count and time.
struct Storm {
    stop: Arc<AtomicBool>,
    most: Arc<AtomicU64>,
    /// Each granted run: when it started and when it ended (the grant was
    /// acknowledged in between).
    runs: Arc<Mutex<Vec<(Instant, Instant)>>>,
    threads: Vec<JoinHandle<()>>,
    sampler: JoinHandle<u64>,
}

impl Storm {
    fn start(c: &ClusterSite, addrs: &[SocketAddr]) -> Storm {
        let stop = Arc::new(AtomicBool::new(false));
        let most = Arc::new(AtomicU64::new(0));
        let runs = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..2)
            .map(|_| {
                let (stop, runs) = (stop.clone(), runs.clone());
                let mut cmd = c.tally(addrs);
                cmd.args(["run", "solver", "--", "sleep", "0.2"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                std::thread::spawn(move || {
                    let started = Instant::now();
                    for _ in 0..2_000 {
                        if stop.load(Ordering::Relaxed)
                            || started.elapsed() > Duration::from_secs(300)
                        {
                            break;
                        }
                        let began = Instant::now();
                        if cmd.status().is_ok_and(|s| s.success()) {
                            runs.lock().unwrap().push((began, Instant::now()));
                        }
                    }
                })
            })
            .collect();
        let sampler = {
            let (stop, most) = (stop.clone(), most.clone());
            let mut cmd = c.tally(addrs);
            cmd.args(["status", "--json"]).stderr(Stdio::null());
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut samples = 0u64;
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(300)
                {
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
        Storm {
            stop,
            most,
            runs,
            threads,
            sampler,
        }
    }

    /// Waits until a run that started after `since` got its seat; how long after
    /// `since` it ended (an upper bound of when a leader granted again).
    fn grant_after(&self, since: Instant, what: &str, daemons: &[Option<Daemon>]) -> Duration {
        let mut first = None;
        assert!(
            wait_until(STORM_PATIENCE, || {
                first = self
                    .runs
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(began, _)| *began > since)
                    .map(|(_, ended)| *ended - since)
                    .min();
                first.is_some()
            }),
            "{what}: no grant since\n{}",
            logs(daemons)
        );
        first.unwrap()
    }

    /// Stops the storm; the most seats in use sampled, the samples, the grants.
    fn finish(self) -> (u64, u64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let samples = self.sampler.join().unwrap();
        let grants = self.runs.lock().unwrap().len();
        (self.most.load(Ordering::Relaxed), samples, grants)
    }
}

#[test]
fn the_leader_killed_during_a_checkout_storm_loses_no_lease_and_overgrants_nothing() {
    let (c, addrs, mut daemons) = running_cluster(|a, _, j| a[j], free_udp_addrs(3));
    let (mut holders, held) = hold(&c, &addrs);
    let storm = Storm::start(&c, &addrs);
    let mut failovers = Vec::new();
    let rounds = rounds();
    for round in 0..rounds {
        storm.grant_after(Instant::now(), "before the kill", &daemons);
        let doc = status(&c, &addrs).expect("a leader answers");
        let leader = answered_by(&doc, &addrs);
        daemons[leader].take().unwrap().kill();
        let killed = Instant::now();
        let failover = storm.grant_after(killed, &format!("round {round}"), &daemons);
        let others: Vec<SocketAddr> = (0..3).filter(|&i| i != leader).map(|i| addrs[i]).collect();
        let what = format!("round {round}");
        still_held(&c, &others, &held, &mut holders, (&what, &daemons));
        println!("round {round}: killed leader s{leader}; a new leader granted after {failover:?}");
        failovers.push(failover);
        daemons[leader] = Some(c.daemon(leader));
    }
    let (most, samples, grants) = storm.finish();
    println!(
        "{rounds} leader kills; failover (kill to the end of the first run granted after \
         it): {failovers:?}; seats in use at most {most} of {SEATS} in {samples} samples; \
         {grants} storm grants"
    );
    assert!(
        most <= SEATS,
        "over-granted: {most} seats in use of {SEATS}"
    );
    assert!(samples > 0);
}

#[test]
fn partitions_elect_in_the_majority_and_heal_without_a_manual_step() {
    let addrs = free_udp_addrs(3);
    let relay = Relay::start(&addrs);
    let (c, addrs, mut daemons) = running_cluster(|_, i, j| relay.addr_of(i, j), addrs);
    let (mut holders, held) = hold(&c, &addrs);
    let storm = Storm::start(&c, &addrs);

    // The leader cut off from both others: the majority elects one of its own, the old
    // leader stops granting, and clients (who reach every member) go to the new one.
    let doc = status(&c, &addrs).expect("a leader answers");
    let old = answered_through(&doc, &addrs, Some(&relay));
    relay.isolate(old);
    let cut = Instant::now();
    let new = loop {
        let doc = status(&c, &addrs);
        if let Some(i) = doc
            .map(|d| answered_through(&d, &addrs, Some(&relay)))
            .filter(|&i| i != old)
        {
            break i;
        }
        assert!(
            cut.elapsed() < PATIENCE,
            "no leader in the majority\n{}",
            logs(&daemons)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let failover = storm.grant_after(cut, "leader isolated", &daemons);
    still_held(
        &c,
        &addrs,
        &held,
        &mut holders,
        ("leader isolated", &daemons),
    );
    // Asked directly, the isolated member grants nothing: it sends the client on.
    let out = c
        .tally(&addrs[old..=old])
        .args(["status", "--json"])
        .output()
        .unwrap();
    if out.status.success() {
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_ne!(
            answered_through(&doc, &addrs, Some(&relay)),
            old,
            "the cut-off member still serves"
        );
    }
    println!("leader s{old} isolated: s{new} leads; a grant after {failover:?}");

    // Healed: the old leader follows with no manual step; then the new leader is
    // killed, and the old one (caught up) must hold every lease in the new majority.
    relay.heal_all();
    assert!(
        wait_until(PATIENCE, || daemons[old]
            .as_ref()
            .unwrap()
            .log_text()
            .matches("no longer leading")
            .count()
            >= 1),
        "the cut-off leader never stepped down\n{}",
        logs(&daemons)
    );
    std::thread::sleep(Duration::from_secs(2)); // let the healed member catch up
    daemons[new].take().unwrap().kill();
    let killed = Instant::now();
    let others: Vec<SocketAddr> = (0..3).filter(|&i| i != new).map(|i| addrs[i]).collect();
    storm.grant_after(killed, "after healing, the new leader killed", &daemons);
    still_held(
        &c,
        &others,
        &held,
        &mut holders,
        ("healed, then killed", &daemons),
    );
    daemons[new] = Some(c.daemon(new));

    // A follower cut off: the leader goes on granting with the other.
    let doc = status(&c, &addrs).expect("a leader answers");
    let leader = answered_through(&doc, &addrs, Some(&relay));
    let follower = (leader + 1) % 3;
    relay.isolate(follower);
    let cut = Instant::now();
    storm.grant_after(cut, "follower isolated", &daemons);
    relay.heal_all();

    // A flapping link between the leader and a follower for a few seconds.
    let doc = status(&c, &addrs).expect("a leader answers");
    let leader = answered_through(&doc, &addrs, Some(&relay));
    let until = Instant::now() + Duration::from_secs(6);
    relay.flap(leader, (leader + 1) % 3, Duration::from_millis(700), until);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
    }
    storm.grant_after(until, "after flapping", &daemons);
    still_held(
        &c,
        &addrs,
        &held,
        &mut holders,
        ("after flapping", &daemons),
    );

    let (most, samples, grants) = storm.finish();
    println!(
        "partitions: seats in use at most {most} of {SEATS} in {samples} samples; \
         {grants} storm grants; relay {:?}",
        relay.total()
    );
    assert!(
        most <= SEATS,
        "over-granted: {most} seats in use of {SEATS}"
    );
}

#[test]
fn all_three_restarted_at_once_keep_every_lease() {
    let (c, addrs, mut daemons) = running_cluster(|a, _, j| a[j], free_udp_addrs(3));
    let (mut holders, held) = hold(&c, &addrs);
    // ana's lease removed by the admin: her user on this host is held off the feature
    // (300 s by default), through both restarts below.
    let ana_holds = |doc: &serde_json::Value| {
        doc["features"][0]["holders"]
            .as_array()
            .and_then(|h| h.iter().find(|h| h["user"] == "ana"))
            .and_then(|h| h["lease"].as_str().map(String::from))
    };
    let mut ana = Holder::from_child(
        c.tally(&addrs)
            .env("USER", "ana")
            .args(["run", "solver", "--", "sleep", "600"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    let mut lease = None;
    assert!(
        wait_until(PATIENCE, || {
            lease = status(&c, &addrs).and_then(|d| ana_holds(&d));
            lease.is_some()
        }),
        "ana got no seat"
    );
    let leader = answered_by(&status(&c, &addrs).expect("a leader answers"), &addrs);
    let removed = c
        .tally(&addrs[leader..=leader])
        .args(["admin", "--admin-token-file"])
        .arg(c.admin_token(leader))
        .args(["remove", lease.as_deref().unwrap()])
        .output()
        .unwrap();
    assert!(removed.status.success(), "{removed:?}");
    ana.kill_group();
    let ana_held_off = |what: &str| {
        let out = c
            .tally(&addrs)
            .env("USER", "ana")
            .args(["run", "solver", "--", "true"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(75),
            "{what}: ana got a seat: {stderr}"
        );
        assert!(
            stderr.contains("was removed by the administrator"),
            "{what}: {stderr}"
        );
    };
    ana_held_off("before the restarts");
    for d in &mut daemons {
        d.take().unwrap().stop();
    }
    for (i, d) in daemons.iter_mut().enumerate() {
        *d = Some(c.daemon(i));
    }
    still_held(&c, &addrs, &held, &mut holders, ("all restarted", &daemons));
    // And SIGKILLed at once, too.
    for d in &mut daemons {
        d.take().unwrap().kill();
    }
    for (i, d) in daemons.iter_mut().enumerate() {
        *d = Some(c.daemon(i));
    }
    still_held(&c, &addrs, &held, &mut holders, ("all killed", &daemons));
    ana_held_off("after all three restarted twice");
    let doc = status(&c, &addrs).expect("a leader answers");
    assert_eq!(seats(&doc).1, HOLDERS as u64, "{doc}");

    // /metrics: one leader among the three, which alone shows the seats.
    let leader = answered_by(&doc, &addrs);
    for (i, d) in daemons.iter().enumerate() {
        let (code, page) = d.as_ref().unwrap().http("GET", "/metrics", None);
        assert_eq!(code, 200, "s{i}: {page}");
        let role = if i == leader { "leader" } else { "follower" };
        assert!(
            page.contains(&format!("tally_cluster_role{{role=\"{role}\"}} 1")),
            "s{i} is a {role}: {page}"
        );
        assert_eq!(
            page.contains("tally_seats_in_use{feature=\"solver\"} 3"),
            i == leader,
            "s{i}: {page}"
        );
        let (code, view) = d.as_ref().unwrap().http("GET", "/api/cluster", None);
        assert_eq!(code, 200, "s{i}: {view}");
        let view: serde_json::Value = serde_json::from_str(&view).unwrap();
        assert_eq!(view["members"].as_array().map(Vec::len), Some(3), "{view}");
    }

    // The dashboard of each member shows the three nodes and which leads; a member that
    // does not lead says that the seats are on the leader's. (Asked again if the leader
    // changed meanwhile: a loaded machine can miss a heartbeat.)
    for (i, d) in daemons.iter().enumerate() {
        let mut last = String::new();
        assert!(
            wait_until(PATIENCE, || {
                let Some(doc) = status(&c, &addrs) else {
                    return false;
                };
                let leader = answered_by(&doc, &addrs);
                last = tally_tests::dashboard_dom(d.as_ref().unwrap());
                dashboard_agrees(&last, &node_id(&c, leader), i == leader)
            }),
            "s{i}: {last}"
        );
    }
    // `tally doctor` asks each listed member alone: one leads, two send it on.
    let doctor = |addrs: &[SocketAddr]| {
        let out = c.tally(addrs).args(["doctor", "solver"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.code(), text)
    };
    let (code, text) = doctor(&addrs);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(text.matches(" leads (server key").count(), 1, "{text}");
    assert_eq!(
        text.matches("a member that does not lead").count(),
        2,
        "{text}"
    );
    assert!(!text.contains("WARN"), "{text}");
    // A client that lists one of the three is told to list them all.
    let (code, text) = doctor(&addrs[leader..=leader]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("the bundle binds 3 servers but this client lists 1 server"),
        "{text}"
    );
    // A member down: the site serves, with a warning naming the silent one.
    let follower = (leader + 1) % 3;
    // Only what the leader logs from the kill on counts: a loaded machine's stall during
    // the restart above can have logged the same member as silent and answering again.
    let logged_before = daemons[leader].as_ref().unwrap().log_text().lines().count();
    daemons[follower].take().unwrap().kill();
    let (code, text) = doctor(&addrs);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("cluster: {} does not answer", addrs[follower])),
        "{text}"
    );
    println!("tally doctor with a member down:\n{text}");
    // The leader says so in its log once, in its own words (not openraft's line for
    // every failed RPC, twice a second). (A stall of the loaded machine can make it say
    // so of the live member too, which then "answers again": not counted here.)
    let leader_log = || daemons[leader].as_ref().unwrap().log_text();
    let silent = |log: &str| {
        log.lines()
            .skip(logged_before)
            .filter(|l| {
                l.contains("cluster member does not answer")
                    && l.contains(&format!("peer={} ", addrs[follower]))
            })
            .count()
    };
    assert!(
        wait_until(PATIENCE, || silent(&leader_log()) > 0),
        "{}",
        leader_log()
    );
    std::thread::sleep(Duration::from_secs(3)); // more failed RPCs, which must stay quiet
    let log = leader_log();
    assert_eq!(silent(&log), 1, "{log}");
    assert!(!log.contains("openraft::replication"), "{log}");
}

/// Whether a member's dashboard `dom` shows three members with `leader` as the leader,
/// and says that the seats are elsewhere unless it is the leader itself.
fn dashboard_agrees(dom: &str, leader: &str, is_leader: bool) -> bool {
    // The table as the script filled it (the script's own text names the row too).
    let table = dom
        .split("<table id=\"cluster\">")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .unwrap_or_default();
    let meta = dom
        .split("id=\"meta\">")
        .nth(1)
        .and_then(|t| t.split("</div>").next())
        .unwrap_or_default();
    !dom.contains("id=\"cluster-section\" hidden")
        && table.matches("<tr data-node=").count() == 3
        && table
            .split("<tr data-node=")
            .find(|row| row.starts_with(&format!("\"{leader}\"")))
            .is_some_and(|row| row.contains("<td class=\"role\">leader</td>"))
        && meta.contains("this member does not lead its cluster") != is_leader
}

/// The node id of server `i` as `tally admin cluster` shows it: the first 16 hex digits
/// of its key fingerprint.
fn node_id(c: &ClusterSite, i: usize) -> String {
    c.key(i).replace(':', "")[..16].to_string()
}

/// A member's machine is lost with its data directory and replaced by a new server (new
/// key, empty data directory) the way the README says, while the other two serve: the
/// vendor's bundle binds the new key, the survivors get it and the new `[[cluster]]` and
/// reload, the lost member is removed, the new one starts with `join_cluster` and is
/// added. The held leases survive throughout, and the new member holds the whole state:
/// with it and one survivor alone the cluster still has every lease.
#[test]
fn a_member_whose_data_is_lost_is_replaced_by_a_new_server_while_the_others_serve() {
    let c = ClusterSite::new(4);
    let addrs = free_udp_addrs(4);
    let first = [0, 1, 2];
    ok(c.issue_seats(&first.map(|i| c.request(i)), "ha.bundle", SEATS as u32));
    for i in first {
        c.install("ha.bundle", i);
        c.configure_member(i, &first, |j| addrs[j], false);
    }
    let mut daemons: Vec<Option<Daemon>> = (0..4).map(|i| (i < 3).then(|| c.daemon(i))).collect();
    assert!(
        wait_until(PATIENCE, || first.iter().all(|&i| status(
            &c,
            &addrs[i..=i]
        )
        .is_some())),
        "no member came to lead\n{}",
        logs(&daemons)
    );
    let (mut holders, held) = hold(&c, &addrs);

    // The leader's machine is lost: killed, its data directory gone.
    let doc = status(&c, &addrs).expect("a leader answers");
    let lost = answered_by(&doc, &addrs);
    daemons[lost].take().unwrap().kill();
    std::fs::remove_dir_all(c.data_dir(lost)).unwrap();
    let survivors: Vec<usize> = first.into_iter().filter(|&i| i != lost).collect();
    still_held(&c, &addrs, &held, &mut holders, ("member lost", &daemons));

    // The vendor binds the survivors and the new server s3; each gets that bundle in
    // place of the old one and the new members, and the survivors reload (SIGHUP).
    let now = [survivors[0], survivors[1], 3];
    ok(c.issue_seats(&now.map(|i| c.request(i)), "ha2.bundle", SEATS as u32));
    for i in now {
        let _ = std::fs::remove_file(c.path(&format!("s{i}/bundles/ha.bundle")));
        c.install("ha2.bundle", i);
        c.configure_member(i, &now, |j| addrs[j], i == 3);
    }
    for &i in &survivors {
        daemons[i].as_ref().unwrap().signal("HUP");
    }
    assert!(
        wait_until(PATIENCE, || survivors.iter().all(|&i| daemons[i]
            .as_ref()
            .unwrap()
            .log_text()
            .contains("configured members changed"))),
        "the survivors did not take the new members\n{}",
        logs(&daemons)
    );

    // On the leader (with its admin token: each server has its own): the lost member
    // out, then the new one, started to join, in.
    let leader = answered_by(&status(&c, &addrs).expect("a leader answers"), &addrs);
    let admin = |args: &[&str]| {
        c.tally(&addrs[leader..=leader])
            .arg("admin")
            .arg("--admin-token-file")
            .arg(c.admin_token(leader))
            .arg("cluster")
            .args(args)
            .output()
            .unwrap()
    };
    let out = admin(&["remove", &node_id(&c, lost)]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && text.contains("the cluster has 2 voters"),
        "remove: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A member it does not know is named as such (exit 76: the server refused it).
    let out = admin(&["remove", &node_id(&c, lost)]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no member of the cluster"),
        "{out:?}"
    );

    // check-config shows the members it will join, itself among them.
    let checked = ok(c.check_config(3));
    assert!(
        checked.contains("cluster       3 servers as one; this one joins it"),
        "{checked}"
    );
    assert!(
        checked.contains(&format!("{} at {} (this server)", c.key(3), addrs[3])),
        "{checked}"
    );
    daemons[3] = Some(c.daemon(3));
    assert!(
        wait_until(PATIENCE, || daemons[3]
            .as_ref()
            .unwrap()
            .log_text()
            .contains("waiting to be added")),
        "the new server did not wait to be added\n{}",
        logs(&daemons)
    );
    // Until it is added it leads nothing and names no leader: status through it alone
    // finds no server that grants.
    assert!(status(&c, &addrs[3..=3]).is_none());
    let key = c.key(3);
    let mut added = String::new();
    assert!(
        wait_until(PATIENCE, || {
            // Timed out (exit 75) while catching up: the same command finishes it.
            let out = admin(&["add", &key]);
            added = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            out.status.success()
        }),
        "add: {added}\n{}",
        logs(&daemons)
    );
    assert!(added.contains("the cluster has 3 voters"), "{added}");
    let out = admin(&[]);
    let view = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    let voter_line = view
        .lines()
        .find(|l| l.contains(&node_id(&c, 3)))
        .unwrap_or_else(|| panic!("the new member is not shown: {view}"));
    assert!(voter_line.contains("voter"), "{view}");
    assert!(!view.contains(&node_id(&c, lost)), "{view}");
    println!("replaced s{lost} by s3: {}\n{view}", added.trim());

    // The leader killed: the new member and the other survivor are the majority now,
    // and every lease is there.
    daemons[leader].take().unwrap().kill();
    let rest: Vec<SocketAddr> = now
        .iter()
        .filter(|&&i| i != leader)
        .map(|&i| addrs[i])
        .collect();
    still_held(
        &c,
        &rest,
        &held,
        &mut holders,
        ("the new member and one survivor", &daemons),
    );
}

/// Clients waiting in the queue when the leader dies wait on under the new leader, in
/// the order they joined (not the order their reconnects happen to win), and the first
/// gets the first seat that comes free there.
#[test]
fn a_queued_checkout_survives_a_failover_and_gets_the_next_free_seat() {
    let (c, addrs, mut daemons) = running_cluster(|a, _, j| a[j], free_udp_addrs(3));
    let (mut holders, mut held) = hold(&c, &addrs);
    // The rest of the seats taken too.
    let mut fillers: Vec<Holder> = (HOLDERS as u64..SEATS)
        .map(|_| holder(&c, &addrs, &[], Stdio::null()))
        .collect();
    let mut full = BTreeSet::new();
    assert!(
        wait_until(PATIENCE, || {
            full = status(&c, &addrs).map(|d| seats(&d).0).unwrap_or_default();
            full.len() == SEATS as usize
        }),
        "the seats were not all taken: {full:?}"
    );
    // Three waiters (three users), each in the queue before the next comes.
    let queue = |doc: &serde_json::Value| -> Vec<String> {
        doc["features"]
            .as_array()
            .and_then(|f| f.iter().find(|f| f["name"] == "solver"))
            .and_then(|f| f["queue"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|q| q["user"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let order = ["wa", "wb", "wc"];
    let mut waiters = Vec::new();
    for (i, user) in order.iter().enumerate() {
        let log = std::fs::File::create(c.path(&format!("{user}.log"))).unwrap();
        waiters.push(Holder::from_child(
            c.tally(&addrs)
                .env("USER", user)
                .args(["run", "solver", "--wait", "300", "--", "sleep", "600"])
                .env("TALLY_LOG", "debug")
                .stdout(Stdio::null())
                .stderr(log)
                .process_group(0)
                .spawn()
                .unwrap(),
        ));
        assert!(
            wait_until(PATIENCE, || status(&c, &addrs)
                .is_some_and(|d| queue(&d) == order[..=i])),
            "{user} is not in the queue after {:?}",
            &order[..i]
        );
    }

    // The first waiter is stopped (SIGSTOP) over the failover, so that it asks the new
    // leader last: its reconnect loses the race, its place must not.
    let signal = |w: &Holder, sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &w.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig}");
    };
    signal(&waiters[0], "-STOP");
    let leader = answered_by(&status(&c, &addrs).expect("a leader answers"), &addrs);
    daemons[leader].take().unwrap().kill();
    held.extend(full.iter().cloned());
    let others: Vec<SocketAddr> = (0..3).filter(|&i| i != leader).map(|i| addrs[i]).collect();
    still_held(
        &c,
        &others,
        &held,
        &mut holders,
        ("leader killed", &daemons),
    );
    // Every waiter reconnects and asks again: each gets its place back.
    let mut now_queued = Vec::new();
    assert!(
        wait_until(2 * PATIENCE, || {
            now_queued = status(&c, &others).map(|d| queue(&d)).unwrap_or_default();
            now_queued.contains(&"wb".to_string()) && now_queued.contains(&"wc".to_string())
        }),
        "the waiters did not queue at the new leader: {now_queued:?}"
    );
    signal(&waiters[0], "-CONT");
    assert!(
        wait_until(2 * PATIENCE, || {
            now_queued = status(&c, &others).map(|d| queue(&d)).unwrap_or_default();
            now_queued.len() == order.len()
        }),
        "the waiters did not all queue at the new leader: {now_queued:?}"
    );
    assert_eq!(now_queued, order, "the waiters changed places");
    // A seat comes free under the new leader: the first waiter, still waiting, gets it. (A
    // holder killed before it re-attached to the new leader keeps its seat until one
    // TTL, 60 s, after the take-over: the new leader cannot tell it from one whose
    // heartbeats are on their way.)
    let mut freed = fillers.pop().unwrap();
    freed.kill_group();
    let holders_of = |doc: &serde_json::Value| -> Vec<String> {
        doc["features"][0]["holders"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|h| h["user"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let mut doc = serde_json::Value::Null;
    assert!(
        wait_until(2 * PATIENCE, || {
            doc = status(&c, &others).unwrap_or_default();
            seats(&doc).1 == SEATS && holders_of(&doc).iter().any(|u| order.contains(&u.as_str()))
        }),
        "no waiter got the freed seat: {doc}\n{}\nwa: {}",
        daemons
            .iter()
            .flatten()
            .flat_map(|d| d
                .log_text()
                .lines()
                .filter(|l| !l.contains("openraft") && !l.contains("peer RPC"))
                .map(String::from)
                .collect::<Vec<_>>())
            .collect::<Vec<_>>()
            .join("\n"),
        std::fs::read_to_string(c.path("wa.log")).unwrap_or_default()
    );
    let users = holders_of(&doc);
    assert!(
        users.iter().any(|u| u == "wa") && !users.iter().any(|u| u == "wb" || u == "wc"),
        "the first waiter did not get the seat: {users:?}"
    );
    assert_eq!(queue(&doc), ["wb", "wc"], "{doc}");
    assert!(
        matches!(waiters[0].child.try_wait(), Ok(None)),
        "the waiter ended instead of running with its seat"
    );
    for w in &mut waiters {
        w.kill_group();
    }
}
