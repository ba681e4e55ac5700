//! Scale: a real `tallyd` process serving thousands of connections holding a hundred
//! thousand leases; its memory, heartbeat latency and CPU, and how fast it serves again
//! after a SIGKILL with all those leases in its store.

use crate::{percentiles, rss_mib, Row, Sizes};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_protocol::bundle;
use tally_protocol::frame::{self, HEADER_LEN, MAX_RESPONSE_LEN};
use tally_protocol::keys::{public_key_to_armored, SecretKey};
use tally_protocol::wire::*;

/// The `tallyd` to run: `TALLY_BENCH_TALLYD` if set (a wrapper such as a heap profiler
/// around the real binary), else the one next to this executable.
pub fn tallyd() -> PathBuf {
    std::env::var_os("TALLY_BENCH_TALLYD")
        .map(PathBuf::from)
        .unwrap_or_else(|| sibling("tallyd"))
}

/// A binary next to this executable (`target/release/NAME` beside `tally-bench`).
pub fn sibling(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().expect("exe dir").join(name)
}

/// Starts `tallyd run --config` and returns it with the address it printed.
fn spawn_tallyd(config: &Path) -> anyhow::Result<(Child, SocketAddr, Instant)> {
    let started = Instant::now();
    let mut command = Command::new(tallyd());
    command
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn");
    let (child, addr) = spawn_server(command).map_err(|e| {
        anyhow::anyhow!(
            "starting {}: {e} (build it: cargo build --release)",
            tallyd().display()
        )
    })?;
    Ok((child, addr, started))
}

/// Spawns a server process and waits for the `listening on ADDR` line it prints.
fn spawn_server(mut command: Command) -> anyhow::Result<(Child, SocketAddr)> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some((_, rest)) = line.split_once("listening on ") {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(120))?.parse()?;
    Ok((child, addr))
}

/// Runs `n` copies of `task` at most 64 at a time (handshakes in waves, as a site's
/// clients come up) and returns their results in order.
async fn in_waves<T, F, Fut>(n: usize, task: F) -> anyhow::Result<Vec<T>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let wave: Vec<_> = (0..(n - out.len()).min(64))
            .map(|_| tokio::spawn(task()))
            .collect();
        for t in wave {
            out.push(t.await??);
        }
    }
    Ok(out)
}

/// The physical limit of the memory row: a bare QUIC server with tally's TLS and
/// transport settings, in a process of its own, holding as many connections as the tally
/// run, each having made as many requests (one per lease, plus hello and heartbeat).
/// Returns its RSS in MiB.
async fn echo_baseline(conns: usize, requests: usize) -> anyhow::Result<f64> {
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("--echo-server");
    let (mut child, addr) = spawn_server(command)?;
    let endpoint = client_endpoint()?;
    let held = in_waves(conns, || {
        let endpoint = endpoint.clone();
        async move {
            let conn = endpoint.connect(addr, "tally")?.await?;
            for _ in 0..requests {
                crate::echo::request(&conn).await?;
            }
            anyhow::Ok(conn)
        }
    })
    .await?;
    let rss = rss_mib(child.id()).unwrap_or(0.0);
    drop(held);
    endpoint.close(0u32.into(), b"done");
    let _ = child.kill();
    let _ = child.wait();
    Ok(rss)
}

async fn call(conn: &quinn::Connection, request: &Request) -> anyhow::Result<Response> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&frame::encode_request(request)).await?;
    send.finish()?;
    let mut header = [0u8; HEADER_LEN];
    recv.read_exact(&mut header).await?;
    let h = frame::parse_header(&header, MAX_RESPONSE_LEN)?;
    let mut payload = vec![0u8; h.payload_len];
    recv.read_exact(&mut payload).await?;
    Ok(frame::decode_response(h.version, &payload)?)
}

fn hello() -> Request {
    Request::Hello(Hello {
        client: ClientIdentity {
            user: "bench".into(),
            host: "bench-host".into(),
            pid: std::process::id(),
            program: "tally-bench".into(),
            display: None,
        },
    })
}

fn client_endpoint() -> anyhow::Result<quinn::Endpoint> {
    let mut config = tally_client::quic_client_config()?;
    let mut transport = quinn::TransportConfig::default();
    // Many idle connections: a keep-alive well inside the server's 15 s idle timeout,
    // not the interactive client's 2 s.
    transport
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The scale rows.
pub async fn scale(sizes: Sizes) -> anyhow::Result<Vec<Row>> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let status = Command::new(sibling("tallyd"))
        .args(["init", "--data-dir"])
        .arg(&data)
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "tallyd init failed");
    let server_key = tally_daemon::identity::load(&data.join("server.key"))?;
    let vendor = SecretKey::from_seed([31; 32]);
    std::fs::write(
        dir.path().join("vendor.pub"),
        public_key_to_armored(&vendor.public()),
    )?;
    let conns = sizes.scale_conns;
    let per = sizes.scale_leases_per_conn;
    let leases = conns * per;
    let b = crate::workload::bench_bundle(
        &server_key,
        &tally_daemon::host::fingerprint(),
        leases as u32 + 10,
    );
    std::fs::create_dir_all(dir.path().join("bundles"))?;
    std::fs::write(
        dir.path().join("bundles/bench.bundle"),
        bundle::to_armored(&bundle::sign(&b, &vendor)),
    )?;
    let hb = sizes.scale_heartbeat_secs;
    let config = dir.path().join("tallyd.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nbundle_dir = \"{}\"\nvendor_keys = [\"{}\"]\nheartbeat_secs = {hb}\nlease_ttl_secs = {}\nidle_timeout_secs = 15\nhttp = false\n\
             # One loopback address stands for every client here.\n\
             max_connections = 100000\nmax_connections_per_address = 100000\ncheckout_rate = 0\n",
            data.display(),
            dir.path().join("bundles").display(),
            dir.path().join("vendor.pub").display(),
            hb * 4
        ),
    )?;
    // The baseline first, while nothing else runs: hello + one request per lease +
    // one heartbeat per connection, as below.
    let baseline_rss = echo_baseline(conns, per + 2).await?;
    let (mut child, addr, _) = spawn_tallyd(&config)?;
    let pid = child.id();
    let idle_rss = rss_mib(pid).unwrap_or(0.0);
    let endpoint = client_endpoint()?;

    // Connect and check out, 64 connections at a time.
    let setup = Instant::now();
    let checkout = Request::Checkout(crate::workload::bench_seat());
    let held = in_waves(conns, || {
        let endpoint = endpoint.clone();
        let checkout = checkout.clone();
        async move {
            let conn = endpoint.connect(addr, "tally")?.await?;
            call(&conn, &hello()).await?;
            let mut refs = Vec::with_capacity(per);
            for _ in 0..per {
                match call(&conn, &checkout).await? {
                    Response::Checkout(CheckoutReply::Granted(g)) => refs.push(LeaseRef {
                        id: g.id,
                        secret: g.secret,
                    }),
                    other => anyhow::bail!("checkout: {other:?}"),
                }
            }
            anyhow::Ok((conn, refs))
        }
    })
    .await?;
    let setup_secs = setup.elapsed().as_secs_f64();
    let loaded_rss = rss_mib(pid).unwrap_or(0.0);

    // One heartbeat interval: every connection heartbeats its leases once, spread evenly.
    let cpu_before = cpu_ticks(pid);
    let window = Duration::from_secs(hb);
    let begin = Instant::now();
    let mut tasks = Vec::new();
    for (i, (conn, refs)) in held.iter().enumerate() {
        let conn = conn.clone();
        let refs = refs.clone();
        let at = begin + window.mul_f64(i as f64 / conns as f64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            let t = Instant::now();
            match call(
                &conn,
                &Request::Heartbeat(HeartbeatRequest { leases: refs }),
            )
            .await
            {
                Ok(Response::Heartbeat(r)) if r.leases.iter().all(|s| *s == LeaseState::Active) => {
                    Some(t.elapsed().as_secs_f64() * 1e6)
                }
                _ => None,
            }
        }));
    }
    let mut lat = Vec::new();
    let mut failed = 0;
    for t in tasks {
        match t.await? {
            Some(us) => lat.push(us),
            None => failed += 1,
        }
    }
    let elapsed = begin.elapsed().as_secs_f64();
    let cpu = match (cpu_before, cpu_ticks(pid)) {
        (Some(a), Some(b)) => Some((b - a) as f64 / 100.0 / elapsed * 100.0),
        _ => None,
    };
    let hb_rss = rss_mib(pid).unwrap_or(0.0);
    let (p50, p99, max) = percentiles(lat);
    anyhow::ensure!(failed == 0, "{failed} heartbeats failed");

    // SIGKILL with every lease held, restart, time until it answers again.
    child.kill()?;
    child.wait()?;
    let addr_text = addr.to_string();
    let text = std::fs::read_to_string(&config)?.replace("127.0.0.1:0", &addr_text);
    std::fs::write(&config, text)?;
    let (mut child, addr, started) = spawn_tallyd(&config)?;
    let probe = client_endpoint()?;
    let serving = loop {
        if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(2), async {
            probe
                .connect(addr, "tally")?
                .await
                .map_err(anyhow::Error::from)
        })
        .await
        {
            if call(&conn, &hello()).await.is_ok() {
                break started.elapsed().as_secs_f64();
            }
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "tallyd did not come back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let restored = rss_mib(child.id()).unwrap_or(0.0);
    let _ = child.kill();
    let _ = child.wait();
    drop(held);
    endpoint.close(0u32.into(), b"done");

    let scaled = |mib: f64| mib * 100_000.0 / leases as f64;
    let baseline_name = format!("baseline quic echo server holding {conns} conns");
    let tally_rss = loaded_rss.max(hb_rss);
    Ok(vec![
        Row {
            name: baseline_name.clone(),
            rss_mib: Some(baseline_rss),
            ..Row::default()
        },
        Row {
            name: format!("scale: connect+checkout {conns} conns x {per} leases"),
            throughput: Some(leases as f64 / setup_secs),
            seconds: Some(setup_secs),
            rss_mib: Some(idle_rss),
            ..Row::default()
        },
        Row {
            name: format!("scale: daemon RSS holding {leases} leases"),
            rss_mib: Some(tally_rss),
            baseline: Some(baseline_name),
            ratio: (baseline_rss > 0.0).then(|| tally_rss / baseline_rss),
            target: Some("<= 256 MiB for 100,000 leases".into()),
            met: Some(scaled(tally_rss) <= 256.0 || leases < 100_000 && loaded_rss <= 256.0),
            ..Row::default()
        },
        Row {
            name: format!("scale: heartbeats over one {hb} s interval"),
            throughput: Some(conns as f64 / elapsed),
            p50_us: p50,
            p99_us: p99,
            max_us: max,
            seconds: cpu.map(|c| c / 100.0),
            target: cpu.map(|c| format!("daemon CPU {c:.1} % of one core")),
            ..Row::default()
        },
        Row {
            name: format!("scale: restart to serving with {leases} leases"),
            seconds: Some(serving),
            rss_mib: Some(restored),
            target: Some("<= 1 s".into()),
            met: Some(serving <= 1.0),
            ..Row::default()
        },
    ])
}
