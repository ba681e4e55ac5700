//! The operations endpoint of a real `tallyd demo`: Prometheus metrics that agree with
//! the daemon's state, the status API, the dashboard page, and admin actions that need
//! the token.

use std::time::Duration;
use tally_tests::{wait_until, Daemon, Holder};

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
        value(&m, "tally_seats_total", &[("feature", "solver")]),
        Some(5.0)
    );
    assert_eq!(
        value(&m, "tally_seats_total", &[("feature", "viewer")]),
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
    let days = value(&m, "tally_license_expiry_days", &[("feature", "optimizer")]).unwrap();
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

    let (code, page) = daemon.http("GET", "/", None);
    assert_eq!(code, 200);
    assert!(page.contains("<title>tally license server</title>") && page.contains("/api/status"));

    // Admin actions: refused without the token or with a wrong one, done with it.
    let path = format!("/api/admin/remove/{lease}");
    assert_eq!(daemon.http("POST", &path, None).0, 401);
    assert_eq!(daemon.http("POST", &path, Some("not-the-token")).0, 401);
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
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
