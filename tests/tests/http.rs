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
