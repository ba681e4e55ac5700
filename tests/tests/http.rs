//! The operations endpoint of a real `tallyd demo`: Prometheus metrics that agree with
//! the daemon's state, the status API, the dashboard page, and admin actions that need
//! the token.

use std::time::Duration;
use tally_tests::{wait_until, Daemon, Holder, OVERDRAFT_AND_UNCOUNTED_SPEC};

fn scrape(daemon: &Daemon) -> prometheus_parse::Scrape {
    let (code, body) = daemon.http("GET", "/metrics", None);
    assert_eq!(code, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("valid Prometheus text")
}

fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[test]
fn metrics_status_dashboard_and_admin_actions() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let daemon = Daemon::start(&data, "127.0.0.1:0", &[]);
    assert!(
        daemon.http.is_some(),
        "the demo prints its dashboard address"
    );
    let _holder = Holder::start_with(&daemon, &["solver", "--count", "2"], 120);
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 2));
    let out = daemon
        .tally()
        .args(["run", "mesher", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75));

    let m = scrape(&daemon);
    assert_eq!(
        value(&m, "tally_seats_in_use", &[("feature", "solver")]),
        Some(2.0)
    );
    assert_eq!(
        value(&m, "tally_seats_licensed", &[("feature", "solver")]),
        Some(5.0)
    );
    assert_eq!(
        value(&m, "tally_seats_licensed", &[("feature", "viewer")]),
        Some(20.0)
    );
    assert_eq!(
        value(
            &m,
            "tally_denials_total",
            // Names no bundle licenses share one counter (issue 20).
            &[("feature", "(unlicensed)"), ("reason", "not_licensed")]
        ),
        Some(1.0)
    );
    let ends = value(
        &m,
        "tally_license_expiry_timestamp_seconds",
        &[("feature", "optimizer")],
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let days = (ends - now) / 86_400.0;
    assert!((29.0..=30.0).contains(&days), "{days}");
    assert_eq!(
        value(&m, "tally_queue_depth", &[("feature", "solver")]),
        Some(0.0)
    );

    let (code, body) = daemon.http("GET", "/api/status", None);
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let solver = status["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "solver")
        .unwrap();
    assert_eq!(solver["in_use"], 2);
    let lease = solver["holders"][0]["lease"].as_str().unwrap().to_string();
    assert_eq!(status["recent_denials"][0]["feature"], "mesher");
    // The bundles served, and per feature the bundles that grant it.
    let bundle = &status["bundles"][0];
    assert_eq!(bundle["customer_id"], "demo");
    assert_eq!(bundle["vendor"], "tally demo vendor");
    let id = bundle["id"].as_str().unwrap();
    assert!(id.starts_with("demo-"), "{id}");
    assert_eq!(solver["bundles"], serde_json::json!([id]));

    let (code, page) = daemon.http("GET", "/", None);
    assert_eq!(code, 200);
    assert!(page.contains("<title>tally license server</title>") && page.contains("/api/status"));

    // Admin actions: refused without the token or with a wrong one, done with it.
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    assert_eq!(daemon.http("GET", "/api/admin/check", None).0, 401);
    assert_eq!(
        daemon
            .http("GET", "/api/admin/check", Some("not-the-token"))
            .0,
        401
    );
    assert_eq!(
        daemon.http("GET", "/api/admin/check", Some(token.trim())).0,
        200
    );
    let path = format!("/api/admin/remove/{lease}");
    assert_eq!(daemon.http("POST", &path, None).0, 401);
    assert_eq!(daemon.http("POST", &path, Some("not-the-token")).0, 401);
    let (code, body) = daemon.http("POST", &path, Some(token.trim()));
    assert_eq!(code, 200, "{body}");
    assert_eq!(daemon.http("POST", &path, Some(token.trim())).0, 404);
    let (code, body) = daemon.http("POST", "/api/admin/reload", Some(token.trim()));
    assert_eq!(
        code, 409,
        "the demo has no bundle directory to reload: {body}"
    );
}

/// One raw HTTP/1.1 request with the given `Host` header: the status code.
fn status_with_host(daemon: &Daemon, host: &str) -> u16 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(daemon.http.unwrap()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Issue 20, scenario 7: 2,000 idle or half-sent connections from one address do not
/// keep `/metrics` from answering others and are closed by the server within its
/// request-head timeout (10 s); `Host` headers other than IP literals, localhost and
/// this machine's name are refused; every refused admin request is logged with its
/// source, over HTTP and QUIC, and no token appears in the log.
#[test]
fn slow_loris_connections_are_capped_and_closed_and_refused_admin_requests_are_logged() {
    const FLOOD: usize = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let daemon = Daemon::start(&data, "127.0.0.1:0", &[]);
    let http = daemon.http.expect("the demo serves HTTP");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // The flood, from 127.0.0.2: every other connection sends half a request head.
    let started = std::time::Instant::now();
    let mut flood = runtime.block_on(async {
        let mut streams = Vec::with_capacity(FLOOD);
        for i in 0..FLOOD {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "opening the flood took over 60 s ({i} open)"
            );
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            let Ok(Ok(mut stream)) =
                tokio::time::timeout(Duration::from_secs(5), socket.connect(http)).await
            else {
                continue;
            };
            if i % 2 == 1 {
                use tokio::io::AsyncWriteExt;
                let _ = stream
                    .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                    .await;
            }
            streams.push(stream);
        }
        streams
    });
    assert!(
        flood.len() >= FLOOD / 2,
        "only {} connections opened",
        flood.len()
    );

    // Others are served while the flood holds its connections.
    for _ in 0..3 {
        let asked = std::time::Instant::now();
        let (code, body) = daemon.http("GET", "/metrics", None);
        assert_eq!(code, 200, "{body}");
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "/metrics took {:?} during the flood",
            asked.elapsed()
        );
    }

    // Every flood connection is closed by the server: at once beyond the caps, after
    // the request-head timeout (10 s) within them.
    let open_after = runtime.block_on(async {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
        let mut open = 0;
        for stream in &mut flood {
            let mut buf = [0u8; 256];
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                // Closed (EOF or reset), possibly after a 4xx.
                Ok(Ok(0)) | Ok(Err(_)) => {}
                Ok(Ok(_)) => {
                    // An error answer; the close follows.
                    if !matches!(
                        tokio::time::timeout_at(deadline, stream.read(&mut buf)).await,
                        Ok(Ok(0)) | Ok(Err(_))
                    ) {
                        open += 1;
                    }
                }
                Err(_) => open += 1,
            }
        }
        open
    });
    assert_eq!(open_after, 0, "connections still open 25 s after the flood");
    drop(flood);

    // Host: IP literals, localhost and this machine's name; nothing else.
    let port = http.port();
    assert_eq!(status_with_host(&daemon, &format!("127.0.0.1:{port}")), 200);
    assert_eq!(status_with_host(&daemon, &format!("[::1]:{port}")), 200);
    assert_eq!(status_with_host(&daemon, "localhost"), 200);
    let machine = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(status_with_host(&daemon, machine.trim()), 200);
    assert_eq!(status_with_host(&daemon, "evil.example"), 421);
    assert_eq!(
        status_with_host(&daemon, &format!("evil.example:{port}")),
        421
    );

    // Refused admin requests are logged with their source, never with the token.
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let token = token.trim();
    let prefix = &token[..token.len() / 2];
    for given in [None, Some("wrong-token-b7f3"), Some(prefix)] {
        assert_eq!(daemon.http("POST", "/api/admin/reload", given).0, 401);
    }
    runtime.block_on(async {
        let session = tally_client::Session::connect(&tally_client::ClientConfig::new(
            vec![daemon.addr.to_string()],
            tally_client::Trust::Demo,
        ))
        .await
        .unwrap();
        assert!(session
            .admin(
                "wrong-quic-token-9c1d",
                tally_protocol::wire::AdminOp::Reload
            )
            .await
            .is_err());
        session.close().await;
    });
    assert!(wait_until(Duration::from_secs(10), || {
        let log = daemon.log_text();
        log.matches("admin request refused over HTTP").count() >= 3
            && log.contains("admin request refused over QUIC")
    }));
    let log = daemon.log_text();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("admin request refused"))
        .collect();
    assert_eq!(refusals.len(), 4, "{refusals:#?}");
    for line in &refusals {
        assert!(line.contains("127.0.0.1"), "no source address: {line}");
    }
    assert!(log.contains("no admin token") && log.contains("wrong admin token"));
    for secret in [token, prefix, "wrong-token-b7f3", "wrong-quic-token-9c1d"] {
        assert!(!log.contains(secret), "a token is in the log");
    }
    daemon.stop();
}

/// A vendor site (`tally-publisher issue`, `tallyd run`) serving `spec` with its
/// operations endpoint on a free loopback port.
fn site_with_http(spec: &str) -> (tally_tests::VendorSite, Daemon) {
    let site = tally_tests::VendorSite::new();
    site.enable_http();
    site.issue_spec("site", spec);
    let daemon = site.daemon();
    assert!(
        daemon.http.is_some(),
        "tallyd run prints its dashboard address"
    );
    (site, daemon)
}

/// Every metric family's `# TYPE` in `/metrics`, in order: (name, type).
fn families(body: &str) -> Vec<(String, String)> {
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').expect("TYPE NAME KIND");
            (name.to_string(), kind.to_string())
        })
        .collect()
}

/// The metrics README lists: rows of its metrics table, (name, type).
fn readme_metrics() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"),
    )
    .unwrap();
    readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `tally_"))
        .map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let name = format!("tally_{}", cells[0].trim_end_matches('`'));
            let name = name.split('{').next().unwrap().to_string();
            (name, cells[1].to_string())
        })
        .collect()
}

/// Issue 15: `/metrics` of a live `tallyd run`, parsed whole with a Prometheus
/// text-format parser, follows the conventions a Prometheus user expects (HELP and
/// TYPE for every family, `_total` only on counters, base units in the names, expiry
/// as a Unix timestamp, heartbeat latency as a histogram with buckets, a build-info
/// gauge), agrees with the daemon's state, and is exactly the list README gives.
#[test]
fn metrics_follow_prometheus_conventions_and_match_the_state_and_the_readme() {
    use tally_client::{ClientConfig, Session, Trust};
    const HEARTBEATS: usize = 7;
    let (site, daemon) = site_with_http(OVERDRAFT_AND_UNCOUNTED_SPEC);
    let vendor = tally_protocol::keys::public_key_from_armored(
        &std::fs::read_to_string(site.path("vendor.pub")).unwrap(),
    )
    .unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // 2 licensed seats and 1 overdraft seat of solver, one uncounted viewer seat, a
    // checkout of a feature no bundle has, and heartbeats.
    let session = runtime.block_on(async {
        let config = ClientConfig::new(vec![daemon.addr.to_string()], Trust::Vendor(vec![vendor]));
        let session = Session::connect(&config).await.unwrap();
        let mut two = tally_tests::one_seat("solver");
        two.count = 2;
        let a = session.checkout(&two).await.unwrap();
        let b = session
            .checkout(&tally_tests::one_seat("solver"))
            .await
            .unwrap();
        let c = session
            .checkout(&tally_tests::one_seat("viewer"))
            .await
            .unwrap();
        assert!(session
            .checkout(&tally_tests::one_seat("mesher"))
            .await
            .is_err());
        let refs = [a.lease_ref(), b.lease_ref(), c.lease_ref()];
        for _ in 0..HEARTBEATS {
            session.heartbeat(&refs).await.unwrap();
        }
        session
    });
    assert_eq!(daemon.feature("solver")["overdraft_in_use"], 1);

    let (code, body) = daemon.http("GET", "/metrics", None);
    assert_eq!(code, 200, "{body}");
    let m = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("valid Prometheus text");

    // Every family has HELP and TYPE, once; every sample belongs to a family; names
    // follow the conventions.
    let families = families(&body);
    let mut names: Vec<&str> = families.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(
        names.len(),
        families.len(),
        "a TYPE line repeats: {families:?}"
    );
    for (name, kind) in &families {
        assert!(
            m.docs.get(name).is_some_and(|h| !h.is_empty()),
            "{name} has no HELP"
        );
        assert!(
            name.starts_with("tally_") && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{name}"
        );
        match kind.as_str() {
            "counter" => assert!(name.ends_with("_total"), "counter {name} without _total"),
            "gauge" | "histogram" => {
                assert!(!name.ends_with("_total"), "{kind} {name} ends in _total")
            }
            other => panic!("{name} is a {other}"),
        }
        for unit in ["_days", "_micros", "_millis", "_ms", "_minutes", "_hours"] {
            assert!(!name.contains(unit), "{name}: not a base unit");
        }
    }
    for sample in &m.samples {
        let family = families
            .iter()
            .find(|(n, _)| {
                sample.metric == *n
                    || sample.metric.strip_suffix("_sum") == Some(n)
                    || sample.metric.strip_suffix("_count") == Some(n)
            })
            .unwrap_or_else(|| panic!("sample {} has no TYPE", sample.metric));
        let (name, kind) = family;
        let matches = matches!(
            (kind.as_str(), &sample.value),
            ("counter", prometheus_parse::Value::Counter(_))
                | ("gauge", prometheus_parse::Value::Gauge(_))
                | ("histogram", prometheus_parse::Value::Histogram(_))
                | ("histogram", prometheus_parse::Value::Untyped(_))
        );
        assert!(matches, "{name}: a {kind} with sample {sample:?}");
    }

    // The values are the daemon's state.
    assert_eq!(
        value(&m, "tally_seats_licensed", &[("feature", "solver")]),
        Some(2.0)
    );
    assert_eq!(
        value(&m, "tally_seats_licensed", &[("feature", "viewer")]),
        None
    );
    assert_eq!(
        value(&m, "tally_seats_in_use", &[("feature", "solver")]),
        Some(3.0)
    );
    assert_eq!(
        value(&m, "tally_seats_in_use", &[("feature", "viewer")]),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "tally_seats_overdraft", &[("feature", "solver")]),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "tally_seats_overdraft", &[("feature", "viewer")]),
        Some(0.0)
    );
    assert_eq!(
        value(&m, "tally_seats_reserved", &[("feature", "solver")]),
        Some(0.0)
    );
    assert_eq!(
        value(&m, "tally_queue_depth", &[("feature", "solver")]),
        Some(0.0)
    );
    // The last valid day is 2031-06-30: the grant ends at 2031-07-01T00:00:00Z.
    assert_eq!(
        value(
            &m,
            "tally_license_expiry_timestamp_seconds",
            &[("feature", "solver")]
        ),
        Some(1_940_630_400.0)
    );
    assert_eq!(
        value(
            &m,
            "tally_license_expiry_timestamp_seconds",
            &[("feature", "viewer")]
        ),
        None,
        "a permanent feature has no expiry"
    );
    assert_eq!(
        value(
            &m,
            "tally_denials_total",
            &[("feature", "(unlicensed)"), ("reason", "not_licensed")]
        ),
        Some(1.0)
    );
    let version = tally_tests::ok(tally_tests::run(
        std::process::Command::new(tally_tests::bin("tallyd")).arg("--version"),
    ));
    let build = m
        .samples
        .iter()
        .find(|s| s.metric == "tally_build_info")
        .expect("tally_build_info");
    let labelled = build.labels.get("version").expect("a version label");
    assert!(
        version.trim() == format!("tallyd {labelled}"),
        "tally_build_info says {labelled}, tallyd --version {version}"
    );
    assert_eq!(build.value, prometheus_parse::Value::Gauge(1.0));
    assert!(value(&m, "tally_connections", &[]).unwrap() >= 1.0);
    assert_eq!(value(&m, "tally_store_writable", &[]), Some(1.0));
    assert_eq!(value(&m, "tally_connections_refused_total", &[]), Some(0.0));

    // The heartbeat latency histogram: cumulative buckets up to +Inf, which is the
    // count, and at least the heartbeats sent.
    let hist = m
        .samples
        .iter()
        .find(|s| s.metric == "tally_heartbeat_latency_seconds")
        .expect("the heartbeat latency histogram");
    let prometheus_parse::Value::Histogram(buckets) = &hist.value else {
        panic!("tally_heartbeat_latency_seconds is not a histogram: {hist:?}");
    };
    assert!(buckets.len() >= 10, "{buckets:?}");
    assert!(buckets
        .windows(2)
        .all(|w| w[0].less_than < w[1].less_than && w[0].count <= w[1].count));
    let last = buckets.last().unwrap();
    assert!(last.less_than.is_infinite(), "{buckets:?}");
    let count = value(&m, "tally_heartbeat_latency_seconds_count", &[]).unwrap();
    let sum = value(&m, "tally_heartbeat_latency_seconds_sum", &[]).unwrap();
    assert_eq!(last.count, count);
    assert!(count >= HEARTBEATS as f64, "{count} heartbeats counted");
    assert!(sum > 0.0 && sum < count * 5.0, "sum {sum} s over {count}");
    assert!(
        buckets
            .iter()
            .any(|b| b.less_than <= 1.0 && b.count >= HEARTBEATS as f64),
        "{HEARTBEATS} heartbeats on loopback took over a second: {buckets:?}"
    );

    // README's list is exactly what the endpoint serves.
    let mut served = families.clone();
    served.sort();
    let mut listed = readme_metrics();
    listed.sort();
    assert_eq!(listed, served, "README's metrics table and /metrics differ");

    runtime.block_on(session.close());
    daemon.stop();
}
