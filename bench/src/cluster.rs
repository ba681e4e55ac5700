//! Three servers as one: a site of three real `tallyd` processes on loopback forming one
//! Raft cluster (`[[cluster]]` in each `tallyd.toml`, one bundle binding the three keys),
//! set up the way an administrator does it (`tallyd init` per node, a vendor-signed
//! bundle, a config per node) and the way `tests/src/cluster.rs` does for the end-to-end
//! tests.
//!
//! The throughput rows run the single-server client shapes against the leader, in rounds
//! that also measure the bare QUIC echo and a one-node `tallyd` process (a cluster of
//! one, the same binary and settings): each three-node figure is a ratio to the echo of
//! its round and to the one-node figure of its round, so the cost of replicating every
//! grant to two followers is one number, with process boundaries and machine noise the
//! same on both sides.

use crate::scale::tallyd;
use crate::workload::{self, Kind, Measured};
use crate::{echo, Row, Sizes};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tally_client::{Client, ClientConfig, LeaseHandle, LeaseStatus, Session, Trust, Want};
use tally_protocol::bundle::{self, Binding};
use tally_protocol::keys::{public_key_to_armored, PublicKey, SecretKey};

/// How long a site may take to start or to agree on a leader before the run gives up
/// (a bound, not a measurement).
const PATIENCE: Duration = Duration::from_secs(60);
/// How long after a leader's kill a new grant and every re-attachment may take before
/// the round counts them as failed (a bound, not a measurement: the issue aims at
/// seconds).
const FAILOVER_PATIENCE: Duration = Duration::from_secs(90);

/// One `tallyd` process of a site.
struct Node {
    /// Running, or `None` once killed.
    child: Option<Child>,
    /// Its `tallyd.toml`.
    config: PathBuf,
    /// Its stderr.
    log: PathBuf,
    /// The address it listens on (fixed: the members name each other by it).
    addr: SocketAddr,
}

/// A site of `n` `tallyd` processes on loopback (one: a server on its own). Every
/// process is killed when the site is dropped, also when a measurement fails.
pub struct Site {
    dir: tempfile::TempDir,
    vendor: SecretKey,
    nodes: Vec<Node>,
}

impl Drop for Site {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `n` loopback UDP addresses free a moment ago (bound to port 0 and let go): the
/// members must know each other's addresses before any of them starts.
fn free_udp_addrs(n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let sockets = (0..n)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(sockets
        .iter()
        .map(|s| s.local_addr())
        .collect::<Result<Vec<_>, _>>()?)
}

impl Site {
    /// Initialises `n` servers, issues one bundle of a million seats binding all of them,
    /// writes their configs (with `[[cluster]]` naming every member when `n > 1`) and
    /// starts them; returns once each printed its address (not yet with a leader: see
    /// [`Site::leader`]).
    pub fn start(n: usize, idle_timeout_secs: u64) -> anyhow::Result<Site> {
        let dir = tempfile::tempdir()?;
        let vendor = SecretKey::from_seed([41; 32]);
        std::fs::write(
            dir.path().join("vendor.pub"),
            public_key_to_armored(&vendor.public()),
        )?;
        let host = tally_daemon::host::fingerprint();
        let mut keys = Vec::new();
        for i in 0..n {
            let data = dir.path().join(format!("s{i}/data"));
            let status = Command::new(tallyd())
                .args(["init", "--data-dir"])
                .arg(&data)
                .stdout(Stdio::null())
                .status()
                .map_err(|e| {
                    anyhow::anyhow!(
                        "running {}: {e} (build it: cargo build --release -p tally-daemon)",
                        tallyd().display()
                    )
                })?;
            anyhow::ensure!(status.success(), "tallyd init of node {i} failed");
            keys.push(tally_daemon::identity::load(&data.join("server.key"))?);
        }
        let mut b = crate::workload::bench_bundle(&keys[0], &host, 1_000_000);
        b.binding = keys
            .iter()
            .map(|k| Binding {
                server_key: k.public(),
                host_fingerprint: host.clone(),
            })
            .collect();
        let bundles = dir.path().join("bundles");
        std::fs::create_dir_all(&bundles)?;
        std::fs::write(
            bundles.join("bench.bundle"),
            bundle::to_armored(&bundle::sign(&b, &vendor)),
        )?;
        let addrs = free_udp_addrs(n)?;
        let members: String = if n > 1 {
            keys.iter()
                .zip(&addrs)
                .map(|(k, a)| {
                    format!(
                        "\n[[cluster]]\nkey = \"{}\"\naddr = \"{a}\"\n",
                        k.public().fingerprint()
                    )
                })
                .collect()
        } else {
            String::new()
        };
        let mut site = Site {
            vendor,
            nodes: Vec::new(),
            dir,
        };
        for (i, addr) in addrs.into_iter().enumerate() {
            let config = site.dir.path().join(format!("s{i}/tallyd.toml"));
            std::fs::write(
                &config,
                format!(
                    "listen = \"{addr}\"\ndata_dir = \"{}\"\nbundle_dir = \"{}\"\n\
                     vendor_keys = [\"{}\"]\nidle_timeout_secs = {idle_timeout_secs}\nhttp = false\n\
                     # One loopback address stands for every client here.\n\
                     max_connections = 100000\nmax_connections_per_address = 100000\n\
                     checkout_rate = 0\n{members}",
                    site.dir.path().join(format!("s{i}/data")).display(),
                    bundles.display(),
                    site.dir.path().join("vendor.pub").display(),
                ),
            )?;
            site.nodes.push(Node {
                child: None,
                log: site.dir.path().join(format!("s{i}/tallyd.log")),
                config,
                addr,
            });
        }
        // All at once: a member may wait for its peers before it serves.
        let waits = (0..n)
            .map(|i| site.spawn(i))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, rx) in waits.into_iter().enumerate() {
            site.await_banner(i, rx)?;
        }
        Ok(site)
    }

    /// Starts node `i` (`tallyd run --config`); the receiver gets its banner's address.
    fn spawn(&mut self, i: usize) -> anyhow::Result<std::sync::mpsc::Receiver<String>> {
        let node = &mut self.nodes[i];
        let mut child = Command::new(tallyd())
            .args(["run", "--config"])
            .arg(&node.config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&node.log)?)
            .spawn()?;
        let stdout = child.stdout.take().expect("piped");
        node.child = Some(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some((_, rest)) = line.split_once("listening on ") {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
            }
        });
        Ok(rx)
    }

    /// Waits (bounded) for node `i`'s `listening on` line.
    fn await_banner(&self, i: usize, rx: std::sync::mpsc::Receiver<String>) -> anyhow::Result<()> {
        match rx.recv_timeout(PATIENCE) {
            Ok(_) => Ok(()),
            Err(e) => anyhow::bail!(
                "node s{i} printed no 'listening on' line ({e}); its log:\n{}",
                self.log_tail(i)
            ),
        }
    }

    /// Kills node `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.nodes[i].child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts node `i` again (same config, address and data directory).
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let rx = self.spawn(i)?;
        self.await_banner(i, rx)
    }

    /// Every member's address, in order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.addr).collect()
    }

    /// The vendor key clients trust.
    pub fn vendor(&self) -> PublicKey {
        self.vendor.public()
    }

    /// A client configuration for `servers`.
    pub fn client_config(&self, servers: &[SocketAddr]) -> ClientConfig {
        ClientConfig::new(
            servers.iter().map(|a| a.to_string()).collect(),
            Trust::Vendor(vec![self.vendor()]),
        )
    }

    /// The last lines of node `i`'s log, for an error message.
    fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Every running node's last log lines.
    fn logs(&self) -> String {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].child.is_some())
            .map(|i| format!("--- s{i} ---\n{}\n", self.log_tail(i)))
            .collect()
    }

    /// The leader, once every running member asked alone serves a session or names the
    /// one member that does (as the end-to-end tests wait: a member that does not know
    /// the leader yet would otherwise call an election in the middle of a measurement).
    pub async fn leader(&self) -> anyhow::Result<usize> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(i) = self.agreed_leader().await {
                return Ok(i);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the site agreed on no leader within {PATIENCE:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn agreed_leader(&self) -> Option<usize> {
        let mut leader = None;
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let mut config = self.client_config(&[node.addr]);
            config.connect_timeout = Duration::from_secs(2);
            let session = tokio::time::timeout(Duration::from_secs(5), Session::connect(&config))
                .await
                .ok()?
                .ok()?;
            let at = session.server();
            session.close().await;
            let i = self.nodes.iter().position(|n| n.addr == at)?;
            if leader.is_some_and(|l| l != i) {
                return None;
            }
            leader = Some(i);
        }
        leader
    }
}

/// One round at one shape: echo, then one node and three nodes, cycle then heartbeat.
struct Round {
    echo: Measured,
    one_cycle: Measured,
    three_cycle: Measured,
    one_heartbeat: Measured,
    three_heartbeat: Measured,
}

/// The cluster rows: throughput against the leader next to one node and the echo, then
/// the failover rows.
pub async fn cluster(sizes: Sizes) -> anyhow::Result<Vec<Row>> {
    let mut rows = throughput(sizes).await?;
    rows.extend(failover(sizes).await?);
    Ok(rows)
}

/// A tally run of `kind` against `site`'s leader. A run whose sessions could not be set
/// up (the leader changed, or a loaded machine let a handshake time out) is tried again
/// against the leader the site then agrees on, twice at most.
async fn on_leader(
    site: &Site,
    vendor: &PublicKey,
    (conns, inflight): (usize, usize),
    secs: f64,
    kind: Kind,
) -> anyhow::Result<Measured> {
    let mut tries = 0;
    loop {
        let at = site.addrs()[site.leader().await?];
        match workload::run_tally(at, vendor, conns, inflight, secs, kind).await {
            Ok(m) => return Ok(m),
            Err(e) if tries < 2 => {
                tries += 1;
                println!("cluster: a run against {at} could not start ({e}); trying again");
            }
            Err(e) => return Err(e),
        }
    }
}

async fn throughput(sizes: Sizes) -> anyhow::Result<Vec<Row>> {
    let echo = echo::start()?;
    let one = Site::start(1, sizes.cluster_idle_secs)?;
    let three = Site::start(3, sizes.cluster_idle_secs)?;
    one.leader().await?;
    let vendor = one.vendor();
    let mut rows = Vec::new();
    for (conns, inflight) in workload::SHAPES {
        let shape = format!("{conns}x{inflight}");
        let secs = sizes.secs;
        let mut rounds = Vec::new();
        for _ in 0..sizes.rounds.max(1) {
            let leader = three.leader().await?;
            let run = |site, kind| on_leader(site, &vendor, (conns, inflight), secs, kind);
            rounds.push(Round {
                echo: workload::run_echo(echo.addr, conns, inflight, secs).await?,
                one_cycle: run(&one, Kind::Cycle).await?,
                three_cycle: run(&three, Kind::Cycle).await?,
                one_heartbeat: run(&one, Kind::Heartbeat).await?,
                three_heartbeat: run(&three, Kind::Heartbeat).await?,
            });
            let after = three.leader().await?;
            if after != leader {
                println!(
                    "cluster {shape}: the leader changed from s{leader} to s{after} during a \
                     round (a run cut short by it counts what the old leader served)"
                );
            }
        }
        let tp = |m: &Measured| m.requests as f64 / m.secs.max(f64::MIN_POSITIVE);
        let ratio_of = |a: fn(&Round) -> &Measured, b: fn(&Round) -> &Measured| {
            workload::median(
                rounds
                    .iter()
                    .map(|r| tp(a(r)) / tp(b(r)).max(f64::MIN_POSITIVE))
                    .collect(),
            )
        };
        let all = |pick: fn(&Round) -> &Measured| {
            workload::merge(&rounds.iter().map(|r| pick(r).clone()).collect::<Vec<_>>())
        };
        let echo_name = format!("cluster: baseline quic echo {shape}");
        rows.push(workload::row(echo_name.clone(), &all(|r| &r.echo)));
        type Pick = fn(&Round) -> &Measured;
        let cases: [(&str, Pick, Pick); 2] = [
            (
                "checkout+checkin (µs: checkout)",
                |r| &r.one_cycle,
                |r| &r.three_cycle,
            ),
            ("heartbeat", |r| &r.one_heartbeat, |r| &r.three_heartbeat),
        ];
        for (what, one_pick, three_pick) in cases {
            let (label, checkouts) = match what.split_once(" (") {
                Some((label, _)) => (label, true),
                None => (what, false),
            };
            let measured = |pick: Pick, name: String| {
                let m = all(pick);
                let mut r = workload::row(name, &m);
                if checkouts {
                    (r.p50_us, r.p99_us, r.max_us) =
                        crate::percentiles(m.checkout_latencies.clone());
                }
                r.baseline = Some(echo_name.clone());
                r.ratio = Some(ratio_of(pick, |r| &r.echo));
                r
            };
            let one_name = format!("1 node: {label} {shape}");
            rows.push(measured(one_pick, format!("1 node: {what} {shape}")));
            rows.push(measured(three_pick, format!("3 nodes: {what} {shape}")));
            let ratio = ratio_of(three_pick, one_pick);
            rows.push(Row {
                name: format!("3 nodes / 1 node: {label} {shape}"),
                baseline: Some(one_name),
                ratio: Some(ratio),
                target: Some(">= 0.60 x one node".into()),
                met: Some(ratio >= 0.6),
                ..Row::default()
            });
        }
    }
    Ok(rows)
}

/// Seconds from `from` to `to`.
fn secs_between(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64()
}

/// Holders with their seats, all on one server (the leader).
struct Holders {
    clients: Vec<(Client, LeaseHandle)>,
    leader: SocketAddr,
}

/// `n` clients (the library's [`Client`]: background heartbeats, reconnection and
/// re-attachment, as an application runs it), each holding one seat, all served by the
/// same member. `None` when they ended up on different members (the leader changed while
/// they checked out): the caller tries again.
async fn hold(site: &Site, n: usize) -> anyhow::Result<Option<Holders>> {
    let config = site.client_config(&site.addrs());
    let mut clients = Vec::new();
    let mut servers = std::collections::BTreeSet::new();
    for _ in 0..n {
        let client = Client::connect_online(config.clone()).await?;
        let handle = client.checkout(&Want::feature("bench")).await?;
        servers.insert(client.session().await?.server());
        clients.push((client, handle));
    }
    match servers.into_iter().collect::<Vec<_>>()[..] {
        [leader] => Ok(Some(Holders { clients, leader })),
        _ => {
            release(clients).await;
            Ok(None)
        }
    }
}

/// Checks every holder's seat in and closes its client.
async fn release(clients: Vec<(Client, LeaseHandle)>) {
    for (client, handle) in clients {
        let _ = handle.checkin().await;
        client.close().await;
    }
}

/// When `handle` is `Active` again after having been anything else (the client saw its
/// connection go and re-attached the lease); an error when it is lost or not back within
/// [`FAILOVER_PATIENCE`].
fn watch_reattach(handle: &LeaseHandle) -> tokio::task::JoinHandle<anyhow::Result<Instant>> {
    let mut rx = handle.watch();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + FAILOVER_PATIENCE;
        let mut left = false;
        loop {
            let status = rx.borrow_and_update().clone();
            match status {
                LeaseStatus::Active if left => return Ok(Instant::now()),
                LeaseStatus::Active => {}
                LeaseStatus::Lost(why) => anyhow::bail!("lease lost: {why}"),
                _ => left = true,
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => anyhow::bail!("the client let go of the lease"),
                Err(_) => anyhow::bail!("not re-attached within {FAILOVER_PATIENCE:?}"),
            }
        }
    })
}

/// When a member other than `old` first grants a new checkout: the server side of a
/// failover. `config` names the surviving members only, with a short connect timeout;
/// a fresh session is tried 50 ms after the last try ended, each try cut at 1.5 s, so
/// the figure is when the new leader serves (to within one try), not how long a client
/// waits out the dead address (the holders' row has that).
fn probe_new_grant(
    config: ClientConfig,
    old: SocketAddr,
) -> tokio::task::JoinHandle<anyhow::Result<Instant>> {
    let request = crate::workload::bench_seat();
    tokio::spawn(async move {
        let deadline = Instant::now() + FAILOVER_PATIENCE;
        while Instant::now() < deadline {
            let attempt =
                tokio::time::timeout(Duration::from_millis(1500), Session::connect(&config));
            if let Ok(Ok(session)) = attempt.await {
                if session.server() != old {
                    if let Ok(lease) = session.checkout(&request).await {
                        let granted = Instant::now();
                        let _ = session.checkin(&[lease.lease_ref()]).await;
                        session.close().await;
                        return Ok(granted);
                    }
                }
                session.close().await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("no other member granted within {FAILOVER_PATIENCE:?}")
    })
}

/// SIGKILL the leader while clients hold seats, `sizes.failover_rounds` times (the
/// killed member is started again between rounds): the time until another member
/// grants a new checkout, and until every holder has its seat again under the same
/// lease id. Printed as min/median/max; no target on time.
async fn failover(sizes: Sizes) -> anyhow::Result<Vec<Row>> {
    let mut site = Site::start(3, sizes.cluster_idle_secs)?;
    let addrs = site.addrs();
    let n = sizes.failover_holders;
    let mut grants = Vec::new();
    let mut reattached = Vec::new();
    let mut failures = Vec::new();
    for round in 0..sizes.failover_rounds {
        site.leader().await?;
        let mut tries = 0;
        let holders = loop {
            match hold(&site, n).await {
                Ok(Some(h)) => break h,
                Ok(None) => println!("failover: the leader changed while holders checked out"),
                Err(e) => println!("failover: holders could not check out ({e})"),
            }
            tries += 1;
            anyhow::ensure!(tries < 3, "holders could not all hold a seat on one leader");
            site.leader().await?;
        };
        let old = addrs
            .iter()
            .position(|a| *a == holders.leader)
            .ok_or_else(|| anyhow::anyhow!("holders served by {}, not a member", holders.leader))?;
        let ids: Vec<_> = holders.clients.iter().map(|(_, h)| h.id()).collect();
        let watchers: Vec<_> = holders
            .clients
            .iter()
            .map(|(_, h)| watch_reattach(h))
            .collect();
        site.kill(old)?;
        let killed = Instant::now();
        let survivors: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| *a != holders.leader)
            .collect();
        let mut config = site.client_config(&survivors);
        config.connect_timeout = Duration::from_secs(1);
        let probe = probe_new_grant(config, holders.leader);
        let mut last = None;
        let mut failed = 0;
        for (i, w) in watchers.into_iter().enumerate() {
            match w.await? {
                Ok(at) => last = last.max(Some(at)),
                Err(e) => {
                    failed += 1;
                    failures.push(format!("round {round}, holder {i}: {e}"));
                }
            }
        }
        for ((_, handle), id) in holders.clients.iter().zip(&ids) {
            if handle.held_id() != Some(*id) {
                failed += 1;
                failures.push(format!(
                    "round {round}: lease {id} is not held under its id after the failover"
                ));
            }
        }
        let grant = match probe.await? {
            Ok(at) => Some(secs_between(killed, at)),
            Err(e) => {
                failures.push(format!("round {round}: {e}"));
                None
            }
        };
        grants.extend(grant);
        let back = last
            .filter(|_| failed == 0)
            .map(|at| secs_between(killed, at));
        reattached.extend(back);
        let show = |s: Option<f64>| s.map_or_else(|| "-".to_string(), |s| format!("{s:.2} s"));
        println!(
            "failover round {round}: killed leader s{old}; a new leader granted after {}; \
             {n} holders re-attached after {} ({failed} not)",
            show(grant),
            show(back)
        );
        release(holders.clients).await;
        site.restart(old)?;
    }
    for f in &failures {
        println!("failover: {f}");
    }
    let spread = |name: String, v: &[f64]| {
        let mut r = Row {
            name,
            ..Row::default()
        };
        if !v.is_empty() {
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            r.seconds = Some(workload::median(v.to_vec()));
            r.seconds_min = Some(min);
            r.seconds_max = Some(max);
        }
        r
    };
    let rounds = sizes.failover_rounds;
    let idle = sizes.cluster_idle_secs;
    Ok(vec![
        spread(
            format!("failover: kill to a new leader's grant ({rounds} rounds)"),
            &grants,
        ),
        spread(
            format!("failover: kill to {n} holders re-attached (idle {idle} s)"),
            &reattached,
        ),
        Row {
            name: format!("failover: leases lost or grants missed: {}", failures.len()),
            target: Some("none".into()),
            met: Some(failures.is_empty()),
            ..Row::default()
        },
    ])
}
