//! The operations endpoint: `/metrics` for Prometheus, `/api/status` as JSON, and a
//! dashboard page, on their own port (loopback by default).
//!
//! Reading needs no credential unless the config says status is for admins only; the
//! dashboard's remove-lease and reload buttons send the admin token as a bearer token,
//! typed in by the admin (there is no default password and no session to steal) and
//! checked at login with `GET /api/admin/check`.
//!
//! The port is meant for loopback or an admin network, and is guarded all the same:
//! at most [`MAX_CONNECTIONS`] connections ([`MAX_CONNECTIONS_PER_ADDRESS`] per IP
//! address; more are closed at once), a connection must be answered within
//! [`HEAD_TIMEOUT`] of its opening (so a request head must arrive by then) and is
//! closed [`IDLE_TIMEOUT`] after its last answer, so idle or half-sent connections
//! (slow-loris) cannot hold the port. A `Host` header must be an IP literal,
//! `localhost`, this machine's name or a name in `http_hosts` (else 421): a web page
//! cannot reach the port through a name it controls (DNS rebinding). Every refused
//! admin request is logged with its source address, never with the token.

pub use crate::metrics::{LatencyHistogram, LATENCY_BUCKETS_MICROS};
use crate::metrics::{Metrics, ReloadRecord};
use crate::ops::OpsHandle;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::collections::HashMap;
use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tally_protocol::lease::LeaseId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

/// Most connections to the operations port at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Most connections from one IP address at once.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 32;
/// Time from a connection's opening to its first answer.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time from an answer to the next one before the connection is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The router for the operations endpoint; `hosts` are the names it answers to
/// besides IP literals, `localhost` and this machine's name.
pub fn router(ops: OpsHandle, hosts: Vec<String>) -> Router {
    let hosts = Arc::new(hosts);
    Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .route("/api/cluster", get(cluster))
        .route("/api/admin/remove/{lease}", post(remove))
        .route("/api/admin/reload", post(reload))
        .route("/api/admin/check", get(check_token))
        .layer(axum::middleware::from_fn_with_state(hosts, check_host))
        .with_state(ops)
}

/// Serves the operations endpoint on `listener` under the limits above until
/// `shutdown` completes, then shuts down gracefully (requests under way are answered,
/// idle connections closed).
pub async fn serve(
    listener: TcpListener,
    ops: OpsHandle,
    hosts: Vec<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = Guarded::new(listener, HEAD_TIMEOUT, IDLE_TIMEOUT);
    axum::serve(
        listener,
        router(ops, hosts).into_make_service_with_connect_info::<Peer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// The source address of a request, for the log.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Guarded>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Guarded>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

/// The source address of a request, when the server knows it (it always does when
/// started by [`serve`]).
#[derive(Debug, Clone, Copy)]
pub struct Source(pub Option<SocketAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Source {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Source, Self::Rejection> {
        Ok(Source(
            parts.extensions.get::<ConnectInfo<Peer>>().map(|c| c.0 .0),
        ))
    }
}

/// Connections held, in all and per address.
#[derive(Debug, Default)]
struct Slots {
    held: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One connection's place in [`Slots`], given back when the connection is dropped.
#[derive(Debug)]
struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Slots {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut held = self.held.lock().expect("slots lock");
        let (total, per) = &mut *held;
        let mine = per.get(&ip).copied().unwrap_or(0);
        if *total >= MAX_CONNECTIONS || mine >= MAX_CONNECTIONS_PER_ADDRESS {
            return None;
        }
        *total += 1;
        per.insert(ip, mine + 1);
        Some(Slot {
            slots: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().expect("slots lock");
        let (total, per) = &mut *held;
        *total -= 1;
        if let Some(n) = per.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
    }
}

/// The operations port's listener: connections beyond the caps are closed at once.
pub struct Guarded {
    inner: TcpListener,
    slots: Arc<Slots>,
    /// When the last "connections refused" warning was logged (one per 10 s at most).
    last_warning: Option<tokio::time::Instant>,
    /// [`HEAD_TIMEOUT`] and [`IDLE_TIMEOUT`] (shorter in unit tests).
    timeouts: (Duration, Duration),
}

impl Guarded {
    /// Guards `inner` with the connection caps and these timeouts.
    fn new(inner: TcpListener, head: Duration, idle: Duration) -> Guarded {
        Guarded {
            inner,
            slots: Arc::new(Slots::default()),
            last_warning: None,
            timeouts: (head, idle),
        }
    }
}

impl axum::serve::Listener for Guarded {
    type Io = TimedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TimedStream, SocketAddr) {
        loop {
            let (stream, addr) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: wait instead of spinning.
                    debug!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(slot) = self.slots.take(addr.ip()) else {
                let now = tokio::time::Instant::now();
                if self
                    .last_warning
                    .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
                {
                    self.last_warning = Some(now);
                    warn!(
                        source = %addr,
                        "HTTP connections refused: the operations port holds its maximum \
                         ({MAX_CONNECTIONS} in all, {MAX_CONNECTIONS_PER_ADDRESS} per address)"
                    );
                }
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            return (
                TimedStream {
                    stream,
                    deadline: Box::pin(tokio::time::sleep(self.timeouts.0)),
                    idle: self.timeouts.1,
                    _slot: slot,
                },
                addr,
            );
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection that reads nothing more once its deadline passed: [`HEAD_TIMEOUT`] from
/// its opening, [`IDLE_TIMEOUT`] from its last answer. The server then closes it.
pub struct TimedStream {
    stream: TcpStream,
    deadline: Pin<Box<tokio::time::Sleep>>,
    idle: Duration,
    _slot: Slot,
}

impl AsyncRead for TimedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if std::future::Future::poll(self.deadline.as_mut(), cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no complete request in time",
            )));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TimedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            let next = tokio::time::Instant::now() + self.idle;
            self.deadline.as_mut().reset(next);
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Refuses a request whose `Host` is not one this endpoint answers to (421).
async fn check_host(
    State(hosts): State<Arc<Vec<String>>>,
    request: Request,
    next: Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or("\u{fffd}").to_string());
    match host {
        // HTTP/1.0 tools send none; a browser always does.
        None => next.run(request).await,
        Some(h) if host_allowed(&h, &hosts) => next.run(request).await,
        Some(h) => {
            let peer = request
                .extensions()
                .get::<ConnectInfo<Peer>>()
                .map(|c| c.0 .0);
            debug!(source = ?peer, host = %h.escape_debug(), "HTTP request for another host refused");
            (
                StatusCode::MISDIRECTED_REQUEST,
                Json(serde_json::json!({
                    "error": "this endpoint answers to IP addresses, localhost, this machine's \
                              name and the names in http_hosts only"
                })),
            )
                .into_response()
        }
    }
}

/// Whether `host` (a `Host` header: name or IP literal, with an optional port) is an IP
/// literal, `localhost`, this machine's name (full or first label) or one of `extra`.
pub fn host_allowed(host: &str, extra: &[String]) -> bool {
    let port_ok = |p: &str| {
        p.is_empty()
            || p.strip_prefix(':')
                .is_some_and(|p| p.parse::<u16>().is_ok())
    };
    if let Some(rest) = host.strip_prefix('[') {
        return rest
            .split_once(']')
            .is_some_and(|(ip, tail)| ip.parse::<std::net::Ipv6Addr>().is_ok() && port_ok(tail));
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port_ok(&format!(":{port}")) => name,
        Some(_) => return false,
        None => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.parse::<std::net::Ipv4Addr>().is_ok() || name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let machine = machine_name();
    let short = machine.split('.').next().unwrap_or_default();
    (!machine.is_empty()
        && (name.eq_ignore_ascii_case(machine) || name.eq_ignore_ascii_case(short)))
        || extra
            .iter()
            .any(|e| name.eq_ignore_ascii_case(e.trim_end_matches('.')))
}

/// This machine's host name, read once.
fn machine_name() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|n| n.trim().to_string())
            .unwrap_or_default()
    })
}

/// Logs a refused admin (or token-gated) request: its source and what was wrong with
/// the credential, never the credential itself.
fn log_refusal(peer: Source, what: &str, headers: &HeaderMap) {
    let why = match headers.get(header::AUTHORIZATION) {
        None => "no admin token",
        Some(v)
            if v.to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_none() =>
        {
            "an Authorization header that is not a bearer token"
        }
        Some(_) => "a wrong admin token",
    };
    let source = peer
        .0
        .map(|p| p.to_string())
        .unwrap_or_else(|| "unknown".into());
    warn!(%source, request = what, "admin request refused over HTTP: {why}");
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

async fn status(State(ops): State<OpsHandle>, peer: Source, headers: HeaderMap) -> Response {
    if !ops.may_read(bearer(&headers)) {
        log_refusal(peer, "GET /api/status", &headers);
        return unauthorized("this server shows its status only with the admin token");
    }
    match ops.status().await {
        Ok(s) => Json(s).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.client_message()).into_response(),
    }
}

/// `/api/cluster`: this member's view of its cluster (404 on a single server).
async fn cluster(State(ops): State<OpsHandle>, peer: Source, headers: HeaderMap) -> Response {
    if !ops.may_read(bearer(&headers)) {
        log_refusal(peer, "GET /api/cluster", &headers);
        return unauthorized("this server shows its cluster only with the admin token");
    }
    match ops.cluster_view() {
        Some(view) => Json(view).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": "this server is not a member of a cluster" })),
        )
            .into_response(),
    }
}

/// The `tally_cluster_*` gauges of a cluster member (none on a single server).
fn cluster_metrics(out: &mut String, view: Option<&tally_cluster::ops::ClusterView>) {
    let Some(view) = view else {
        return;
    };
    let samples = tally_cluster::ops::prometheus_samples(view);
    for (name, help) in tally_cluster::ops::METRICS {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (_, labels, value) in samples.iter().filter(|(n, _, _)| *n == name) {
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
                .collect();
            match labels.is_empty() {
                true => {
                    let _ = writeln!(out, "{name} {value}");
                }
                false => {
                    let _ = writeln!(out, "{name}{{{}}} {value}", labels.join(","));
                }
            }
        }
    }
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One metric family without labels: HELP, TYPE and its sample.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// The `/metrics` page by Prometheus conventions: base units in names (seconds,
/// timestamps in Unix seconds), `_total` only on counters, HELP and TYPE for every
/// family. README's metrics list names each of them; keep the two in step.
async fn metrics(State(ops): State<OpsHandle>, peer: Source, headers: HeaderMap) -> Response {
    if !ops.may_read(bearer(&headers)) {
        log_refusal(peer, "GET /metrics", &headers);
        return unauthorized("this server shows its metrics only with the admin token");
    }
    let view = ops.cluster_view();
    let status = match ops.raw_status().await {
        Ok(s) => Some(s),
        // A member that does not lead has no ledger to count seats from; its cluster
        // gauges say who does.
        Err(_) if view.is_some() => None,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.client_message()).into_response(),
    };
    let spool_files = ops.spool_files().await;
    let m: &Arc<Metrics> = ops.metrics();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP tally_build_info Always 1; the version label is tallyd's release.\n\
         # TYPE tally_build_info gauge\ntally_build_info{{version=\"{}\"}} 1",
        label(env!("CARGO_PKG_VERSION"))
    );
    if let Some(status) = &status {
        seat_metrics(&mut out, &status.features);
    }
    cluster_metrics(&mut out, view.as_ref());
    denial_metrics(&mut out, m);
    m.heartbeat_latency.render(
        &mut out,
        "tally_heartbeat_latency_seconds",
        "Time from reading a heartbeat request to having its answer.",
    );
    server_metrics(&mut out, m, ops.connections(), spool_files);
    reload_metrics(&mut out, &m.reloads.lock().expect("metrics lock"));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// The per-feature gauges: seats licensed, in use, over the count, reserved, the
/// queue, the licence's end.
fn seat_metrics(out: &mut String, features: &[tally_protocol::wire::FeatureStatus]) {
    let mut gauge = |name: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (feature, v) in rows {
            let _ = writeln!(out, "{name}{{feature=\"{}\"}} {v}", label(&feature));
        }
    };
    let per = |f: &dyn Fn(&tally_protocol::wire::FeatureStatus) -> Option<f64>| {
        features
            .iter()
            .filter_map(|s| f(s).map(|v| (s.name.clone(), v)))
            .collect::<Vec<_>>()
    };
    gauge(
        "tally_seats_licensed",
        "Seats licensed now, overdraft not included (absent for uncounted features).",
        per(&|s| s.total.map(f64::from)),
    );
    gauge(
        "tally_seats_in_use",
        "Seats held now, overdraft included.",
        per(&|s| Some(f64::from(s.in_use))),
    );
    gauge(
        "tally_seats_overdraft",
        "Seats held now beyond the licensed count.",
        per(&|s| Some(f64::from(s.overdraft_in_use))),
    );
    gauge(
        "tally_seats_reserved",
        "Seats the site's policy reserves.",
        per(&|s| Some(f64::from(s.reserved))),
    );
    gauge(
        "tally_queue_depth",
        "Checkouts waiting for a seat.",
        per(&|s| Some(s.queue.len() as f64)),
    );
    gauge(
        "tally_license_expiry_timestamp_seconds",
        "When the earliest of the grants that count now ends, in Unix seconds (absent for \
         permanent features).",
        per(&|s| s.expires.map(|e| e.0 as f64)),
    );
}

/// Checkouts refused, by feature and reason.
fn denial_metrics(out: &mut String, m: &Metrics) {
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
}

/// The server's own state: connections open, refused and retried, whether the store
/// can be written, reports waiting in the spool.
fn server_metrics(out: &mut String, m: &Metrics, connections: usize, spool_files: usize) {
    single(
        out,
        "tally_connections",
        "gauge",
        "Client connections open.",
        connections,
    );
    single(
        out,
        "tally_connections_refused_total",
        "counter",
        "Connection attempts refused by the limits.",
        m.connections_refused
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    single(
        out,
        "tally_connections_retried_total",
        "counter",
        "Connection attempts asked to prove their address first.",
        m.connections_retried
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    single(
        out,
        "tally_store_writable",
        "gauge",
        "1 while the seat store can be written; 0 while new checkouts are refused.",
        u8::from(m.store_error.lock().expect("metrics lock").is_none()),
    );
    single(
        out,
        "tally_report_spool_files",
        "gauge",
        "Usage reports waiting in the spool directory.",
        spool_files,
    );
}

/// Bundle loading for Prometheus: refused files now, the last load with nothing refused
/// (the start counts; 0 while none), reloads that refused something or failed.
fn reload_metrics(out: &mut String, r: &ReloadRecord) {
    let _ = writeln!(
        out,
        "# HELP tally_bundles_refused Bundle files refused by the load in force (start or last reload).\n# TYPE tally_bundles_refused gauge\ntally_bundles_refused {}",
        r.refused.len()
    );
    let _ = writeln!(
        out,
        "# HELP tally_reload_last_success_timestamp_seconds When bundles were last loaded with nothing refused (the start counts), Unix seconds; 0 if never.\n# TYPE tally_reload_last_success_timestamp_seconds gauge\ntally_reload_last_success_timestamp_seconds {}",
        r.last_success.map_or(0, |t| t.0)
    );
    let _ = writeln!(
        out,
        "# HELP tally_reload_failures_total Reloads that refused a bundle file or failed (broken policy, unreadable directory).\n# TYPE tally_reload_failures_total counter\ntally_reload_failures_total {}",
        r.failures
    );
}

async fn remove(
    State(ops): State<OpsHandle>,
    peer: Source,
    headers: HeaderMap,
    Path(lease): Path<String>,
) -> Response {
    if !ops.is_admin(bearer(&headers)) {
        log_refusal(peer, "POST /api/admin/remove", &headers);
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
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.client_message()).into_response(),
    }
}

/// Answers 200 for the admin token and 401 (logged) for any other: the dashboard's
/// login asks this before it keeps a token, so a mistyped one is said at once rather
/// than at the first button.
async fn check_token(State(ops): State<OpsHandle>, peer: Source, headers: HeaderMap) -> Response {
    if !ops.is_admin(bearer(&headers)) {
        log_refusal(peer, "GET /api/admin/check", &headers);
        return unauthorized("admin token missing or wrong");
    }
    Json(serde_json::json!({"admin": true})).into_response()
}

async fn reload(State(ops): State<OpsHandle>, peer: Source, headers: HeaderMap) -> Response {
    if !ops.is_admin(bearer(&headers)) {
        log_refusal(peer, "POST /api/admin/reload", &headers);
        return unauthorized("admin token missing or wrong");
    }
    // Refused files do not stop the others from loading (200, with `ok: false` and the
    // refusals); a reload that changed nothing (broken policy, no bundle directory, a
    // stuck one) is a conflict.
    let outcome = ops.reload().await;
    let body = serde_json::json!({
        "ok": outcome.ok(),
        "message": crate::reload::outcome_text(&outcome),
        "loaded": outcome.loaded,
        "refused": outcome.refused,
        "policy_error": outcome.policy_error,
    });
    if outcome.error.is_some() || outcome.policy_error.is_some() {
        let mut body = body;
        body["error"] = body["message"].clone();
        (StatusCode::CONFLICT, Json(body)).into_response()
    } else {
        Json(body).into_response()
    }
}

/// The dashboard: one self-contained page, no external assets.
const DASHBOARD: &str = include_str!("dashboard.html");

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn host_headers_are_ip_literals_localhost_this_machine_or_configured() {
        let extra = vec!["tally.corp.example".to_string()];
        for ok in [
            "127.0.0.1",
            "127.0.0.1:27301",
            "10.1.2.3:80",
            "[::1]",
            "[::1]:27301",
            "localhost",
            "LOCALHOST:27301",
            "tally.corp.example",
            "Tally.Corp.Example.:8080",
        ] {
            assert!(host_allowed(ok, &extra), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:27301",
            "127.0.0.1.evil.example",
            "127.0.0.1:99999",
            "[::1]x",
            "[evil]",
            "localhost.evil.example",
            "",
        ] {
            assert!(!host_allowed(bad, &extra), "{bad}");
        }
    }

    #[test]
    fn the_latency_histogram_is_cumulative_with_inclusive_bounds() {
        let h = LatencyHistogram::default();
        for micros in [0, 500, 501, 1_000, 7_000, 5_000_000, 9_000_000] {
            h.observe(Duration::from_micros(micros));
        }
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "Test.");
        let line = |le: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("x_seconds_bucket{{le=\"{le}\"}} ")))
                .unwrap_or_else(|| panic!("no bucket {le} in {out}"))
                .to_string()
        };
        assert_eq!(line("0.0005"), "2", "{out}");
        assert_eq!(line("0.001"), "4");
        assert_eq!(line("0.01"), "5");
        assert_eq!(line("5"), "6");
        assert_eq!(line("+Inf"), "7");
        assert!(out.contains("\nx_seconds_count 7\n"), "{out}");
        assert!(out.contains("\nx_seconds_sum 14.009001\n"), "{out}");
        assert!(out.starts_with("# HELP x_seconds Test.\n# TYPE x_seconds histogram\n"));
        assert_eq!(h.count(), 7);
    }

    #[test]
    fn connections_are_capped_per_address_and_in_all() {
        let slots = Arc::new(Slots::default());
        let a = IpAddr::from([10, 0, 0, 1]);
        let held: Vec<Slot> = (0..MAX_CONNECTIONS_PER_ADDRESS)
            .map(|_| slots.take(a).expect("under the cap"))
            .collect();
        assert!(slots.take(a).is_none());
        let mut others = Vec::new();
        for i in 0..(MAX_CONNECTIONS - MAX_CONNECTIONS_PER_ADDRESS) {
            let ip = IpAddr::from([10, 1, (i / 16) as u8, (i % 16) as u8]);
            others.push(slots.take(ip).expect("under the total"));
        }
        assert!(slots.take(IpAddr::from([10, 2, 0, 1])).is_none());
        drop(held);
        assert!(slots.take(a).is_some());
        drop(others);
        assert_eq!(slots.held.lock().unwrap().1.len(), 0, "entries stay behind");
    }

    /// Reads from the server side of a guarded connection until it fails; how long that
    /// took. Bounded by `limit`.
    async fn time_to_close(stream: &mut TimedStream, limit: Duration) -> Duration {
        let start = tokio::time::Instant::now();
        let mut buf = [0u8; 64];
        tokio::time::timeout(limit, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("the connection outlived its deadline");
        start.elapsed()
    }

    #[tokio::test]
    async fn a_connection_gets_the_head_timeout_then_the_idle_timeout_after_each_answer() {
        let head = Duration::from_millis(300);
        let idle = Duration::from_millis(900);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut guarded = Guarded::new(listener, head, idle);

        // Half a request head, then nothing: closed at the head timeout, bytes or not.
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let (mut server, _) = guarded.accept().await;
        let took = time_to_close(&mut server, Duration::from_secs(5)).await;
        assert!(
            took >= head - Duration::from_millis(50) && took < idle,
            "{took:?}"
        );

        // After an answer, the connection may stay idle for the idle timeout.
        let _client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = guarded.accept().await;
        server.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        let took = time_to_close(&mut server, Duration::from_secs(5)).await;
        assert!(took >= idle - Duration::from_millis(50), "{took:?}");
    }
}
