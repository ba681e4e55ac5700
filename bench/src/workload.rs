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
use tally_protocol::keys::SecretKey;
use tally_protocol::time::UnixTime;
use tally_protocol::wire::CheckoutRequest;

/// The shapes measured: (connections, requests in flight per connection).
const SHAPES: [(usize, usize); 3] = [(1, 1), (4, 16), (64, 4)];

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
        binding: Some(Binding {
            server_key: server.public(),
            host_fingerprint: host.into(),
        }),
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
        listen: "127.0.0.1:0".parse()?,
        identity: key,
        bundles: vec![verified],
        store: Store::open(&dir.path().join("store"))?,
        lease_ttl: Duration::from_secs(90),
        heartbeat: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(15),
        demo: false,
        reloader: None,
        admin_token: None,
        reload_signal: None,
        policy: Default::default(),
        status_needs_token: false,
        reports: Default::default(),
        http_listen: None,
        // The bench drives everything from one loopback address: per-address limits
        // would measure the limiter, not the server.
        limits: tally_daemon::admission::Limits {
            max_connections: 100_000,
            max_connections_per_address: 100_000,
            checkout_rate: 0,
            ..Default::default()
        },
    })?;
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Cycle,
    Heartbeat,
    Mix,
}

/// What a run measured: requests done, seconds, and latencies (µs) of the requests
/// that matter (all requests; for a cycle, the checkouts separately too).
struct Measured {
    requests: u64,
    secs: f64,
    latencies: Vec<f64>,
    checkout_latencies: Vec<f64>,
}

async fn run_echo(
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

async fn run_tally(
    daemon: &BenchDaemon,
    conns: usize,
    inflight: usize,
    secs: f64,
    kind: Kind,
) -> anyhow::Result<Measured> {
    let config = ClientConfig::new(
        vec![daemon.addr.to_string()],
        Trust::Vendor(vec![daemon.vendor.public()]),
    );
    let request = CheckoutRequest {
        feature: "bench".into(),
        count: 1,
        version: None,
        build_date: None,
        wait_secs: 0,
        borrow_secs: 0,
    };
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

fn row(name: String, m: &Measured) -> Row {
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

/// All network rows.
pub async fn network(sizes: Sizes) -> anyhow::Result<Vec<Row>> {
    let echo = echo::start()?;
    let daemon = start_daemon().await?;
    let mut rows = Vec::new();
    for (conns, inflight) in SHAPES {
        let shape = format!("{conns}x{inflight}");
        let base = run_echo(echo.addr, conns, inflight, sizes.secs).await?;
        let base_row = row(format!("baseline quic echo {shape}"), &base);
        let base_tp = base_row.throughput.unwrap_or(1.0);
        let base_p99 = base_row.p99_us.unwrap_or(1.0);
        let base_name = base_row.name.clone();
        rows.push(base_row);
        let with_ratio = |mut r: Row, target: Option<(&str, f64)>| {
            let ratio = r.throughput.unwrap_or(0.0) / base_tp;
            r.baseline = Some(base_name.clone());
            r.ratio = Some(ratio);
            if let Some((text, min)) = target {
                r.target = Some(text.to_string());
                r.met = Some(ratio >= min);
            }
            r
        };
        let cycle = run_tally(&daemon, conns, inflight, sizes.secs, Kind::Cycle).await?;
        rows.push(with_ratio(
            row(format!("tally checkout+checkin {shape} (req/s)"), &cycle),
            Some((">= 0.50 x echo", 0.5)),
        ));
        let (_, co_p99, _) = percentiles(cycle.checkout_latencies.clone());
        let (co_p50, _, co_max) = percentiles(cycle.checkout_latencies.clone());
        let p99_ratio = co_p99.unwrap_or(0.0) / base_p99;
        rows.push(Row {
            name: format!("tally checkout latency {shape}"),
            p50_us: co_p50,
            p99_us: co_p99,
            max_us: co_max,
            baseline: Some(format!("baseline quic echo {shape} p99")),
            ratio: Some(p99_ratio),
            target: Some("p99 <= 2 x echo p99".into()),
            met: Some(p99_ratio <= 2.0),
            ..Row::default()
        });
        let hb = run_tally(&daemon, conns, inflight, sizes.secs, Kind::Heartbeat).await?;
        rows.push(with_ratio(
            row(format!("tally heartbeat {shape}"), &hb),
            Some((">= 0.80 x echo", 0.8)),
        ));
        let mix = run_tally(&daemon, conns, inflight, sizes.secs, Kind::Mix).await?;
        rows.push(with_ratio(
            row(format!("tally mix 1:10:1 {shape}"), &mix),
            None,
        ));
    }
    Ok(rows)
}
