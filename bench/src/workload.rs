//! Network workloads: the echo baseline, then tally's checkout+checkin cycle, heartbeats
//! and a mix, at the same connection counts and concurrency.

use crate::{echo, percentiles, Row, Sizes};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_client::{ClientConfig, Session, Trust};
use tally_daemon::server::{Server, ServerParams};
use tally_daemon::store::Store;
use tally_protocol::bundle::{self, Binding, Bundle, Customer, FeatureGrant};
use tally_protocol::keys::{PublicKey, SecretKey};
use tally_protocol::time::UnixTime;
use tally_protocol::wire::CheckoutRequest;

/// The shapes measured: (connections, requests in flight per connection).
pub const SHAPES: [(usize, usize); 3] = [(1, 1), (4, 16), (64, 4)];

/// An in-process tallyd with a big bundle, real sled in a temp dir.
pub struct BenchDaemon {
    pub addr: SocketAddr,
    pub vendor: SecretKey,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for BenchDaemon {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A bundle with `seats` seats of `bench`, bound to `server`.
pub fn bench_bundle(server: &SecretKey, host: &str, seats: u32) -> Bundle {
    Bundle {
        id: "bench".into(),
        issued_at: UnixTime(1_700_000_000),
        vendor: "bench".into(),
        customer: Customer {
            id: "bench".into(),
            name: "Bench".into(),
        },
        binding: vec![Binding {
            server_key: server.public(),
            host_fingerprint: host.into(),
        }],
        supersedes: vec![],
        valid_from: None,
        valid_until: None,
        features: vec![FeatureGrant::counted("bench", seats)],
    }
}

pub async fn start_daemon() -> anyhow::Result<BenchDaemon> {
    let dir = tempfile::tempdir()?;
    let key = SecretKey::from_seed([5; 32]);
    let vendor = SecretKey::from_seed([6; 32]);
    let signed = bundle::sign(&bench_bundle(&key, "bench", 1_000_000), &vendor);
    let verified = bundle::verify(&signed, &[vendor.public()])?;
    let server = Server::bind(ServerParams {
        // The bench drives everything from one loopback address: per-address limits
        // would measure the limiter, not the server.
        limits: tally_daemon::admission::Limits {
            max_connections: 100_000,
            max_connections_per_address: 100_000,
            checkout_rate: 0,
            ..Default::default()
        },
        ..ServerParams::new(
            "127.0.0.1:0".parse()?,
            key,
            vec![verified],
            Store::open(&dir.path().join("store"))?,
        )
    })
    .await?;
    let addr = server.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = server
            .run(async {
                let _ = rx.await;
            })
            .await;
    });
    Ok(BenchDaemon {
        addr,
        vendor,
        stop: Some(tx),
        _dir: dir,
    })
}

/// What a tally run does in each of its loops.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Check out a seat, then check it in.
    Cycle,
    /// Heartbeat one lease checked out before the loop.
    Heartbeat,
    /// One checkout, ten heartbeats of it, one checkin.
    Mix,
}

/// What a run measured: requests done, seconds, and latencies (µs) of the requests
/// that matter (all requests; for a cycle, the checkouts separately too).
#[derive(Clone)]
pub struct Measured {
    /// Requests answered.
    pub requests: u64,
    /// Seconds the run took.
    pub secs: f64,
    /// Every request's latency.
    pub latencies: Vec<f64>,
    /// The checkouts' latencies (cycle runs).
    pub checkout_latencies: Vec<f64>,
}

/// `conns` connections with `inflight` requests in flight each against the echo, for `secs`.
pub async fn run_echo(
    addr: SocketAddr,
    conns: usize,
    inflight: usize,
    secs: f64,
) -> anyhow::Result<Measured> {
    let mut handles = Vec::new();
    let mut keep = Vec::new();
    for _ in 0..conns {
        let (endpoint, conn) = echo::connect(addr).await?;
        keep.push(endpoint);
        for _ in 0..inflight {
            let conn = conn.clone();
            handles.push(tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs_f64(secs);
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    if echo::request(&conn).await.is_err() {
                        break;
                    }
                    lat.push(t.elapsed().as_secs_f64() * 1e6);
                }
                lat
            }));
        }
    }
    let start = Instant::now();
    let mut latencies = Vec::new();
    for h in handles {
        latencies.extend(h.await?);
    }
    Ok(Measured {
        requests: latencies.len() as u64,
        secs: start.elapsed().as_secs_f64().max(secs),
        latencies,
        checkout_latencies: vec![],
    })
}

/// `conns` sessions with `inflight` loops of `kind` each against `server`, for `secs`.
pub async fn run_tally(
    server: SocketAddr,
    vendor: &PublicKey,
    conns: usize,
    inflight: usize,
    secs: f64,
    kind: Kind,
) -> anyhow::Result<Measured> {
    let config = ClientConfig::new(vec![server.to_string()], Trust::Vendor(vec![*vendor]));
    let request = bench_seat();
    let mut handles = Vec::new();
    let mut sessions = Vec::new();
    for _ in 0..conns {
        let session = Arc::new(Session::connect(&config).await?);
        sessions.push(session.clone());
        for _ in 0..inflight {
            let session = session.clone();
            let request = request.clone();
            handles.push(tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs_f64(secs);
                let mut lat = Vec::new();
                let mut checkouts = Vec::new();
                let mut held = None;
                if kind == Kind::Heartbeat {
                    held = session.checkout(&request).await.ok();
                }
                while Instant::now() < deadline {
                    match kind {
                        Kind::Cycle => {
                            let t = Instant::now();
                            let Ok(lease) = session.checkout(&request).await else {
                                break;
                            };
                            let us = t.elapsed().as_secs_f64() * 1e6;
                            lat.push(us);
                            checkouts.push(us);
                            let t = Instant::now();
                            if session.checkin(&[lease.lease_ref()]).await.is_err() {
                                break;
                            }
                            lat.push(t.elapsed().as_secs_f64() * 1e6);
                        }
                        Kind::Heartbeat => {
                            let Some(lease) = &held else { break };
                            let t = Instant::now();
                            if session.heartbeat(&[lease.lease_ref()]).await.is_err() {
                                break;
                            }
                            lat.push(t.elapsed().as_secs_f64() * 1e6);
                        }
                        Kind::Mix => {
                            let t = Instant::now();
                            let Ok(lease) = session.checkout(&request).await else {
                                break;
                            };
                            lat.push(t.elapsed().as_secs_f64() * 1e6);
                            for _ in 0..10 {
                                let t = Instant::now();
                                if session.heartbeat(&[lease.lease_ref()]).await.is_err() {
                                    break;
                                }
                                lat.push(t.elapsed().as_secs_f64() * 1e6);
                            }
                            let t = Instant::now();
                            if session.checkin(&[lease.lease_ref()]).await.is_err() {
                                break;
                            }
                            lat.push(t.elapsed().as_secs_f64() * 1e6);
                        }
                    }
                }
                if let Some(lease) = held {
                    let _ = session.checkin(&[lease.lease_ref()]).await;
                }
                (lat, checkouts)
            }));
        }
    }
    let start = Instant::now();
    let mut latencies = Vec::new();
    let mut checkout_latencies = Vec::new();
    for h in handles {
        let (l, c) = h.await?;
        latencies.extend(l);
        checkout_latencies.extend(c);
    }
    let secs = start.elapsed().as_secs_f64().max(secs);
    for s in sessions {
        if let Ok(s) = Arc::try_unwrap(s) {
            s.close().await;
        }
    }
    Ok(Measured {
        requests: latencies.len() as u64,
        secs,
        latencies,
        checkout_latencies,
    })
}

/// A row of a run's throughput and latencies.
pub fn row(name: String, m: &Measured) -> Row {
    let (p50, p99, max) = percentiles(m.latencies.clone());
    Row {
        name,
        throughput: Some(m.requests as f64 / m.secs),
        p50_us: p50,
        p99_us: p99,
        max_us: max,
        ..Row::default()
    }
}

/// Several measurements of one workload merged: all requests over all seconds, all
/// latencies.
pub fn merge(runs: &[Measured]) -> Measured {
    Measured {
        requests: runs.iter().map(|m| m.requests).sum(),
        secs: runs.iter().map(|m| m.secs).sum(),
        latencies: runs.iter().flat_map(|m| m.latencies.clone()).collect(),
        checkout_latencies: runs
            .iter()
            .flat_map(|m| m.checkout_latencies.clone())
            .collect(),
    }
}

/// The median (NaN of nothing).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One round at one shape: the echo, then each tally workload, back to back.
struct Round {
    echo: Measured,
    cycle: Measured,
    heartbeat: Measured,
    mix: Measured,
}

/// All network rows.
///
/// Each shape runs `sizes.rounds` rounds of echo, cycle, heartbeat and mix back to back.
/// A row's figures merge all rounds; its ratio is the median of the rounds' own ratios,
/// each taken against the echo of the same round, so that a slow spell of this shared
/// virtual machine lands on both sides of a ratio instead of on one.
pub async fn network(sizes: Sizes) -> anyhow::Result<Vec<Row>> {
    let echo = echo::start()?;
    let daemon = start_daemon().await?;
    let vendor = daemon.vendor.public();
    let mut rows = Vec::new();
    for (conns, inflight) in SHAPES {
        let shape = format!("{conns}x{inflight}");
        let secs = sizes.secs;
        let mut rounds = Vec::new();
        for _ in 0..sizes.rounds.max(1) {
            rounds.push(Round {
                echo: run_echo(echo.addr, conns, inflight, secs).await?,
                cycle: run_tally(daemon.addr, &vendor, conns, inflight, secs, Kind::Cycle).await?,
                heartbeat: run_tally(daemon.addr, &vendor, conns, inflight, secs, Kind::Heartbeat)
                    .await?,
                mix: run_tally(daemon.addr, &vendor, conns, inflight, secs, Kind::Mix).await?,
            });
        }
        let tp = |m: &Measured| m.requests as f64 / m.secs;
        let p99 = |v: &[f64]| percentiles(v.to_vec()).1.unwrap_or(f64::NAN);
        let ratio_of = |pick: fn(&Round) -> &Measured| {
            median(
                rounds
                    .iter()
                    .map(|r| tp(pick(r)) / tp(&r.echo).max(f64::MIN_POSITIVE))
                    .collect(),
            )
        };
        let all = |pick: fn(&Round) -> &Measured| {
            merge(&rounds.iter().map(|r| pick(r).clone()).collect::<Vec<_>>())
        };
        let base_name = format!("baseline quic echo {shape}");
        rows.push(row(base_name.clone(), &all(|r| &r.echo)));
        let with_ratio = |mut r: Row, ratio: f64, target: Option<(&str, f64)>| {
            r.baseline = Some(base_name.clone());
            r.ratio = Some(ratio);
            if let Some((text, min)) = target {
                r.target = Some(text.to_string());
                r.met = Some(ratio >= min);
            }
            r
        };
        let cycle = all(|r| &r.cycle);
        rows.push(with_ratio(
            row(format!("tally checkout+checkin {shape} (req/s)"), &cycle),
            ratio_of(|r| &r.cycle),
            Some((">= 0.50 x echo", 0.5)),
        ));
        let (co_p50, co_p99, co_max) = percentiles(cycle.checkout_latencies.clone());
        let p99_ratio = median(
            rounds
                .iter()
                .map(|r| p99(&r.cycle.checkout_latencies) / p99(&r.echo.latencies))
                .collect(),
        );
        rows.push(Row {
            name: format!("tally checkout latency {shape}"),
            p50_us: co_p50,
            p99_us: co_p99,
            max_us: co_max,
            baseline: Some(format!("{base_name} p99")),
            ratio: Some(p99_ratio),
            target: Some("p99 <= 2 x echo p99".into()),
            met: Some(p99_ratio <= 2.0),
            ..Row::default()
        });
        rows.push(with_ratio(
            row(format!("tally heartbeat {shape}"), &all(|r| &r.heartbeat)),
            ratio_of(|r| &r.heartbeat),
            Some((">= 0.80 x echo", 0.8)),
        ));
        rows.push(with_ratio(
            row(format!("tally mix 1:10:1 {shape}"), &all(|r| &r.mix)),
            ratio_of(|r| &r.mix),
            None,
        ));
    }
    Ok(rows)
}

/// The checkout every bench client sends: one seat of the bench bundle's feature, no
/// wait, no borrow.
pub fn bench_seat() -> CheckoutRequest {
    CheckoutRequest {
        feature: "bench".into(),
        count: 1,
        version: None,
        build_date: None,
        wait_secs: 0,
        borrow_secs: 0,
    }
}
