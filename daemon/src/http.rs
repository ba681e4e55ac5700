//! The operations endpoint: `/metrics` for Prometheus, `/api/status` as JSON, and a
//! dashboard page, on their own port (loopback by default).
//!
//! Reading needs no credential unless the config says status is for admins only; the
//! dashboard's remove-lease and reload buttons send the admin token as a bearer token,
//! typed in by the admin (there is no default password and no session to steal).

use crate::server::{Metrics, OpsHandle};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::fmt::Write;
use std::sync::Arc;
use tally_protocol::lease::LeaseId;

/// The router for the operations endpoint.
pub fn router(ops: OpsHandle) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .route("/api/admin/remove/{lease}", post(remove))
        .route("/api/admin/reload", post(reload))
        .with_state(ops)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn unauthorized(message: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

async fn status(State(ops): State<OpsHandle>, headers: HeaderMap) -> Response {
    if !ops.may_read(bearer(&headers)) {
        return unauthorized("this server shows its status only with the admin token");
    }
    match ops.status().await {
        Ok(s) => Json(s).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e).into_response(),
    }
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn metrics(State(ops): State<OpsHandle>, headers: HeaderMap) -> Response {
    if !ops.may_read(bearer(&headers)) {
        return unauthorized("this server shows its metrics only with the admin token");
    }
    let status = match ops.raw_status().await {
        Ok(s) => s,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e).into_response(),
    };
    let m: &Arc<Metrics> = ops.metrics();
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (feature, v) in rows {
            let _ = writeln!(out, "{name}{{feature=\"{}\"}} {v}", label(&feature));
        }
    };
    let per = |f: &dyn Fn(&tally_protocol::wire::FeatureStatus) -> Option<f64>| {
        status
            .features
            .iter()
            .filter_map(|s| f(s).map(|v| (s.name.clone(), v)))
            .collect::<Vec<_>>()
    };
    gauge(
        "tally_seats_total",
        "Seats licensed now (absent for uncounted features).",
        per(&|s| s.total.map(f64::from)),
    );
    gauge(
        "tally_seats_in_use",
        "Seats held now.",
        per(&|s| Some(s.in_use as f64)),
    );
    gauge(
        "tally_seats_overdraft",
        "Seats held beyond the licensed count.",
        per(&|s| Some(s.overdraft_in_use as f64)),
    );
    gauge(
        "tally_seats_reserved",
        "Seats the site's policy reserves.",
        per(&|s| Some(s.reserved as f64)),
    );
    gauge(
        "tally_queue_depth",
        "Checkouts waiting for a seat.",
        per(&|s| Some(s.queue.len() as f64)),
    );
    let now = status.server_time.0 as f64;
    gauge(
        "tally_license_expiry_days",
        "Days until the earliest expiry of the grants that count now.",
        per(&|s| s.expires.map(|e| ((e.0 as f64 - now) / 86_400.0).max(0.0))),
    );
    let _ = writeln!(
        out,
        "# HELP tally_denials_total Checkouts refused, by feature and reason.\n# TYPE tally_denials_total counter"
    );
    for ((feature, reason), n) in m.denials.lock().expect("metrics lock").iter() {
        let _ = writeln!(
            out,
            "tally_denials_total{{feature=\"{}\",reason=\"{}\"}} {n}",
            label(feature),
            label(reason)
        );
    }
    let count = m.heartbeats.load(std::sync::atomic::Ordering::Relaxed);
    let micros = m
        .heartbeat_micros
        .load(std::sync::atomic::Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# HELP tally_heartbeat_latency_seconds Time to answer heartbeats.\n# TYPE tally_heartbeat_latency_seconds summary\ntally_heartbeat_latency_seconds_count {count}\ntally_heartbeat_latency_seconds_sum {}",
        micros as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "# HELP tally_connections Client connections open.\n# TYPE tally_connections gauge\ntally_connections {}",
        ops.connections()
    );
    let _ = writeln!(
        out,
        "# HELP tally_connections_refused_total Connection attempts refused by the limits.\n# TYPE tally_connections_refused_total counter\ntally_connections_refused_total {}",
        m.connections_refused.load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP tally_connections_retried_total Connection attempts asked to prove their address first.\n# TYPE tally_connections_retried_total counter\ntally_connections_retried_total {}",
        m.connections_retried.load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP tally_store_writable 1 while the seat store can be written; 0 while new checkouts are refused.\n# TYPE tally_store_writable gauge\ntally_store_writable {}",
        u8::from(m.store_error.lock().expect("metrics lock").is_none())
    );
    let _ = writeln!(
        out,
        "# HELP tally_report_spool_files Usage reports waiting in the spool directory.\n# TYPE tally_report_spool_files gauge\ntally_report_spool_files {}",
        ops.spool_files()
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

async fn remove(
    State(ops): State<OpsHandle>,
    headers: HeaderMap,
    Path(lease): Path<String>,
) -> Response {
    if !ops.is_admin(bearer(&headers)) {
        return unauthorized("admin token missing or wrong");
    }
    let Ok(id) = u64::from_str_radix(lease.trim_start_matches('L'), 16) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": format!("'{lease}' is not a lease id")})),
        )
            .into_response();
    };
    match ops.remove(LeaseId(id)).await {
        Ok(true) => Json(serde_json::json!({"removed": lease})).into_response(),
        Ok(false) => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": format!("no lease {lease}")})),
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e).into_response(),
    }
}

async fn reload(State(ops): State<OpsHandle>, headers: HeaderMap) -> Response {
    if !ops.is_admin(bearer(&headers)) {
        return unauthorized("admin token missing or wrong");
    }
    match ops.reload().await {
        Ok(message) => Json(serde_json::json!({"message": message})).into_response(),
        Err(e) => (StatusCode::CONFLICT, Json(serde_json::json!({"error": e}))).into_response(),
    }
}

/// The dashboard: one self-contained page, no external assets.
const DASHBOARD: &str = include_str!("dashboard.html");
