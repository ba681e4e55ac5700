//! The QUIC shell around the ledger.
//!
//! It carries bytes and decides nothing: each connection task reads request frames,
//! hands typed requests to the single ledger task, and writes its answers back. The
//! ledger task owns the [`Ledger`] and the [`Store`]; it takes requests in batches, so
//! all grants of a batch share one flush (group commit), and it answers only after the
//! flush: a client never hears "granted" for a seat the store could lose.

use crate::admission::{Admission, Permit, Verdict};
use crate::disk::Disk;
use crate::journal::{self, Exported, ReportIdentity};
use crate::ledger::{Checkout, ConnId, Event, FreshLease, Ledger, Now, WaiterId};
pub use crate::params::{ReloadError, Reloaded, Reloader, ReportSettings, ServerParams};
use crate::store::Store;
use anyhow::{Context, Result};
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tally_config::Policy;
use tally_protocol::bundle::VerifiedBundle;
use tally_protocol::frame::{self, FrameError, HEADER_LEN, MAX_REQUEST_LEN};
use tally_protocol::keys::SecretKey;
use tally_protocol::lease::{LeaseId, LeaseRecord, LeaseSecret};
use tally_protocol::report::{JournalEntry, UsageEvent};
use tally_protocol::signed::{Domain, Signed};
use tally_protocol::time::UnixTime;
use tally_protocol::wire::*;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// How long a client may take to send a request once it opened a stream; a stream left
/// open without a request must not hold daemon memory forever.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a grant's stream waits for the client to acknowledge the grant.
const GRANT_ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a reload may take to read the bundle directory and the policy. A reload
/// that cannot finish in time (a file that never answers) is given up: the previous
/// bundles stay, and neither shutdown nor later reloads wait for it. Below the
/// client's request timeout (10 s), so `tally admin reload` hears why.
const RELOAD_DEADLINE: Duration = Duration::from_secs(5);
/// Most requests the ledger task takes into one batch (one flush).
const MAX_BATCH: usize = 256;
/// Queue of requests waiting for the ledger task; when full, connection tasks wait,
/// which pushes back on clients through QUIC flow control.
const LEDGER_QUEUE: usize = 4096;
/// The ledger task wakes at least this often, so that a gap between two wakes longer
/// than [`STALL_THRESHOLD`] shows that the daemon itself did not run.
const LEDGER_TICK: Duration = Duration::from_millis(500);
/// A gap between ledger wakes above this is a stall of the daemon (SIGSTOP, a paused
/// VM, a machine that froze), not of its clients.
const STALL_THRESHOLD: Duration = Duration::from_secs(3);
/// How often the clock mark (the last time the daemon is known to have been alive) is
/// written; a lease attached when the daemon died ends at the latest this long after
/// the mark plus its TTL.
const CLOCK_SAVE_SECS: u64 = 10;

/// Counters the operations endpoint shows.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Denials by (feature, reason code); features no bundle licenses count under
    /// [`UNLICENSED_FEATURE`], so the map is bounded by the licensed names times the
    /// reason codes, whatever names clients make up.
    pub denials: Mutex<std::collections::BTreeMap<(String, String), u64>>,
    /// The feature names the ledger served at any time since the start (added to at
    /// each reload, never taken from: a feature that ended with a trial is still
    /// worth naming in a denial). Bounded by what the vendor's bundles name.
    pub licensed: RwLock<Arc<std::collections::BTreeSet<String>>>,
    /// The most recent denials, newest last.
    pub recent: Mutex<std::collections::VecDeque<RecentDenial>>,
    /// How long heartbeat requests took to answer (a histogram for `/metrics`).
    pub heartbeat_latency: crate::http::LatencyHistogram,
    /// Why the seat store cannot be written, while it cannot.
    pub store_error: Mutex<Option<String>>,
    /// Connection attempts refused by the limits.
    pub connections_refused: AtomicU64,
    /// Connection attempts asked to validate their address first.
    pub connections_retried: AtomicU64,
    /// Bundle files refused and the last reload's outcome.
    pub reloads: Mutex<ReloadRecord>,
}

/// What the operations endpoint shows of bundle loading: the refusals of the bundle
/// set in force (from the start, or from the last reload that read the directory),
/// the last reload, and counters for Prometheus.
#[derive(Debug, Default, Clone)]
pub struct ReloadRecord {
    /// Bundle files refused by the load in force.
    pub refused: Vec<Refused>,
    /// The last reload (SIGHUP, `tally admin reload`, the dashboard); `None` before any.
    pub last: Option<LastReload>,
    /// When bundles were last loaded with nothing refused (the start counts).
    pub last_success: Option<UnixTime>,
    /// Reloads that refused a bundle or failed.
    pub failures: u64,
}

/// The last reload, as `/api/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LastReload {
    /// When it ran.
    pub at: UnixTime,
    /// Whether everything loaded.
    pub ok: bool,
    /// One line for a person.
    pub summary: String,
}

/// A denial as the dashboard lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecentDenial {
    /// When.
    pub at: String,
    /// The feature.
    pub feature: String,
    /// Who.
    pub user: String,
    /// Where.
    pub host: String,
    /// Why, for people.
    pub reason: String,
}

/// How many recent denials the dashboard keeps.
const RECENT_DENIALS: usize = 50;

impl Metrics {
    /// Records whether the store can be written (`None`) or why not.
    pub fn set_store_error(&self, error: Option<&str>) {
        *self.store_error.lock().expect("metrics lock") = error.map(str::to_string);
    }

    /// Adds feature names that get counters (and journal rows) of their own.
    pub fn set_licensed(&self, names: std::collections::BTreeSet<String>) {
        let mut licensed = self.licensed.write().expect("metrics lock");
        if !names.is_subset(&licensed) {
            let mut all = (**licensed).clone();
            all.extend(names);
            *licensed = Arc::new(all);
        }
    }

    /// The name a denial of `feature` counts under: itself if licensed (now or
    /// earlier in this run), else [`UNLICENSED_FEATURE`].
    pub fn counted_as<'a>(&self, feature: &'a str) -> &'a str {
        if self
            .licensed
            .read()
            .expect("metrics lock")
            .contains(feature)
        {
            feature
        } else {
            UNLICENSED_FEATURE
        }
    }

    fn denied(&self, at: UnixTime, feature: &str, holder: &ClientIdentity, reason: &DenialReason) {
        let key = (
            self.counted_as(feature).to_string(),
            reason.code().to_string(),
        );
        *self
            .denials
            .lock()
            .expect("metrics lock")
            .entry(key)
            .or_default() += 1;
        let mut recent = self.recent.lock().expect("metrics lock");
        if recent.len() >= RECENT_DENIALS {
            recent.pop_front();
        }
        recent.push_back(RecentDenial {
            at: at.to_string(),
            feature: feature.to_string(),
            user: holder.user.clone(),
            host: holder.host.clone(),
            reason: reason.to_string(),
        });
    }
}

/// What the operations endpoint may ask of a running server.
#[derive(Clone)]
pub struct OpsHandle {
    shared: Arc<Shared>,
}

impl OpsHandle {
    /// Whether a reader with this bearer token may see status and metrics.
    pub fn may_read(&self, token: Option<&str>) -> bool {
        !self.shared.status_needs_token || self.is_admin(token)
    }

    /// Whether this bearer token is the admin token.
    pub fn is_admin(&self, token: Option<&str>) -> bool {
        self.shared.is_admin(token)
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// The ledger's status.
    pub async fn raw_status(&self) -> Result<StatusReply, String> {
        let (reply, rx) = oneshot::channel();
        self.shared
            .ledger
            .send(Command::Status { reply })
            .await
            .map_err(|_| "the server is shutting down".to_string())?;
        let features = rx
            .await
            .map_err(|_| "the server is shutting down".to_string())?;
        Ok(StatusReply {
            server_time: now().wall,
            server_fingerprint: self.shared.key.public().fingerprint(),
            features,
        })
    }

    /// Status as the dashboard and `/api/status` show it.
    pub async fn status(&self) -> Result<serde_json::Value, String> {
        let s = self.raw_status().await?;
        let recent: Vec<RecentDenial> = self
            .shared
            .metrics
            .recent
            .lock()
            .expect("metrics lock")
            .iter()
            .rev()
            .cloned()
            .collect();
        let mut doc = s.to_json(self.shared.demo);
        doc["recent_denials"] = serde_json::json!(recent);
        let bundles = self.shared.bundles.read().expect("bundles lock").clone();
        add_bundles(&mut doc, &bundles);
        let reloads = self.shared.metrics.reloads.lock().expect("metrics lock");
        doc["refused_bundles"] = serde_json::json!(reloads.refused);
        doc["last_reload"] = match &reloads.last {
            Some(last) => serde_json::json!({
                "at": last.at.to_string(),
                "ok": last.ok,
                "summary": last.summary,
            }),
            None => serde_json::Value::Null,
        };
        Ok(doc)
    }

    /// Client connections open now.
    pub fn connections(&self) -> usize {
        self.shared.admission.connections()
    }

    /// Reports waiting in the spool directory.
    pub fn spool_files(&self) -> usize {
        self.shared
            .reports
            .spool
            .as_ref()
            .and_then(|d| std::fs::read_dir(d).ok())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "report"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Removes a lease.
    pub async fn remove(&self, lease: LeaseId) -> Result<bool, String> {
        let (reply, rx) = oneshot::channel();
        self.shared
            .ledger
            .send(Command::Remove { lease, reply })
            .await
            .map_err(|_| "the server is shutting down".to_string())?;
        let removed = rx
            .await
            .map_err(|_| "the server is shutting down".to_string())?;
        if removed {
            info!(%lease, "lease removed by the administrator (dashboard)");
        }
        Ok(removed)
    }

    /// Reloads bundles and policy (logged like a SIGHUP).
    pub async fn reload(&self) -> ReloadOutcome {
        reload(&self.shared).await
    }
}

/// Adds the bundles served to a status document, for the dashboard: `bundles` (id,
/// vendor, customer, features, end) and, per feature, the ids of the bundles that grant
/// it (a package's components included), so an admin can tell the vendor which
/// contract a number comes from.
fn add_bundles(doc: &mut serde_json::Value, bundles: &[VerifiedBundle]) {
    let grants = |b: &VerifiedBundle, feature: &str| {
        b.bundle
            .features
            .iter()
            .any(|g| g.name == feature || g.components.iter().any(|c| c == feature))
    };
    if let Some(features) = doc["features"].as_array_mut() {
        for f in features {
            let name = f["name"].as_str().unwrap_or_default().to_string();
            f["bundles"] = serde_json::json!(bundles
                .iter()
                .filter(|b| grants(b, &name))
                .map(|b| b.bundle.id.as_str())
                .collect::<Vec<_>>());
        }
    }
    doc["bundles"] = serde_json::json!(bundles
        .iter()
        .map(|b| serde_json::json!({
            "id": b.bundle.id,
            "vendor": b.bundle.vendor,
            "customer_id": b.bundle.customer.id,
            "customer_name": b.bundle.customer.name,
            "features": b.bundle.features.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
            "valid_until": b.bundle.valid_until.map(|u| u.last_day()),
        }))
        .collect::<Vec<_>>());
}

/// A bound server, ready to run.
#[must_use = "a server does nothing until run"]
pub struct Server {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    ledger_rx: mpsc::Receiver<Command>,
    ledger: Ledger,
    store: Store,
    reload_signal: Option<mpsc::Receiver<()>>,
    startup: Vec<UsageEvent>,
    http: Option<tokio::net::TcpListener>,
    idle_timeout: Duration,
}

/// State every connection task reads.
struct Shared {
    ledger: mpsc::Sender<Command>,
    key: SecretKey,
    /// The bundles presented in hello, replaced on reload.
    bundles: RwLock<Arc<Vec<VerifiedBundle>>>,
    heartbeat_secs: u64,
    demo: bool,
    next_conn: AtomicU64,
    reloader: Option<Reloader>,
    admin_token: Option<String>,
    status_needs_token: bool,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    /// Reload threads still reading: more than 0 while a reload is waited for, and
    /// after one missed its deadline until it ends (then no other one starts, so at
    /// most one thread is ever stuck).
    reloads_running: Arc<std::sync::atomic::AtomicUsize>,
    next_waiter: AtomicU64,
    /// The hold-off after an admin removal (for the admin's answer).
    remove_holdoff: Duration,
    /// Notified by an admin shutdown request.
    shutdown: tokio::sync::Notify,
    reports: ReportSettings,
    /// Reports exported but not yet written to the spool (never dropped).
    unspooled: tokio::sync::Mutex<Vec<(u64, String)>>,
    metrics: Arc<Metrics>,
    /// Wakes the uploader after an export.
    upload_wake: Arc<tokio::sync::Notify>,
    /// Connection and checkout limits.
    admission: Arc<Admission>,
    /// Requests read and not yet answered to the end: a stop waits (bounded) for them.
    answering: AtomicUsize,
}

impl Shared {
    /// A denial as a client may see it: with `status_needs_token`, who holds the seats
    /// is for admins only (the count stays); a storage fault is named by its kind,
    /// without the server's paths or internal error text (the log has those).
    fn client_view(&self, reason: DenialReason) -> DenialReason {
        match reason {
            DenialReason::AllSeatsInUse {
                feature,
                total,
                in_use,
                requested,
                holders,
            } => DenialReason::AllSeatsInUse {
                feature,
                total,
                in_use,
                requested,
                holders: if self.status_needs_token {
                    Vec::new()
                } else {
                    holders
                },
            },
            DenialReason::OverdraftInUse {
                feature,
                total,
                overdraft,
                in_use,
                requested,
                holders,
            } => DenialReason::OverdraftInUse {
                feature,
                total,
                overdraft,
                in_use,
                requested,
                holders: if self.status_needs_token {
                    Vec::new()
                } else {
                    holders
                },
            },
            DenialReason::StorageUnavailable { what } => DenialReason::StorageUnavailable {
                what: storage_fault(&what),
            },
            other => other,
        }
    }

    /// Whether `token` is the admin token (compared in constant time).
    fn is_admin(&self, token: Option<&str>) -> bool {
        match (&self.admin_token, token) {
            (Some(expected), Some(given)) => {
                constant_time_eq(given.trim().as_bytes(), expected.as_bytes())
            }
            _ => false,
        }
    }
}

/// A request to the ledger task.
enum Command {
    /// A queued checkout whose client stopped waiting.
    /// A grant whose answer did not reach its client (see `serve_stream`).
    Unclaimed {
        lease: LeaseId,
    },
    CancelWait {
        waiter: WaiterId,
    },
    Checkout {
        conn: ConnId,
        holder: ClientIdentity,
        request: CheckoutRequest,
        fresh: FreshLease,
        waiter: WaiterId,
        reply: oneshot::Sender<Result<LeaseRecord, DenialReason>>,
    },
    Remove {
        lease: LeaseId,
        reply: oneshot::Sender<bool>,
    },
    Heartbeat {
        conn: ConnId,
        leases: Vec<LeaseRef>,
        reply: oneshot::Sender<Vec<LeaseState>>,
    },
    Checkin {
        leases: Vec<LeaseRef>,
        reply: oneshot::Sender<Vec<bool>>,
    },
    Status {
        reply: oneshot::Sender<Vec<FeatureStatus>>,
    },
    Closed {
        conn: ConnId,
        /// Closed by the QUIC idle timeout (nothing heard from the client), rather than
        /// by either side or a network error.
        timed_out: bool,
    },
    Reload {
        bundles: Vec<tally_protocol::bundle::Bundle>,
        /// How the served set changes (`journal::bundle_changes`), journaled with it.
        changes: Vec<UsageEvent>,
        policy: Policy,
        done: oneshot::Sender<()>,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
    Journal {
        event: UsageEvent,
    },
    Export {
        identity: Box<ReportIdentity>,
        retention: Duration,
        reply: oneshot::Sender<Result<Exported, String>>,
    },
}

/// The current time for the ledger. Uses tokio's clock so paused-time tests drive it.
pub fn now() -> Now {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Now {
        mono: tokio::time::Instant::now().into_std(),
        wall: UnixTime(wall),
    }
}

impl Server {
    /// Restores the ledger from the store and binds the UDP port.
    pub fn bind(params: ServerParams) -> Result<Server> {
        let settings = crate::ledger::LedgerSettings {
            default_ttl: params.lease_ttl,
            remove_holdoff: params.remove_holdoff,
        };
        let bundles: Vec<_> = params.bundles.iter().map(|b| b.bundle.clone()).collect();
        let mut ledger = Ledger::new(settings, &bundles);
        let start = now();
        ledger.set_policy(start, params.policy);
        let mut startup = vec![UsageEvent::DaemonStarted {
            version: env!("CARGO_PKG_VERSION").to_string(),
        }];
        startup.extend(bundles.iter().map(|b| UsageEvent::BundleLoaded {
            bundle: b.id.clone(),
        }));
        startup.extend(journal::bundles_at_start(&bundles));
        if let Some(t) = params.store.load_clock()? {
            ledger.set_clock_high_water(t);
            if start.wall.plus_secs(crate::ledger::CLOCK_TOLERANCE_SECS) < t {
                warn!(
                    clock = %start.wall, seen = %t,
                    "system clock moved back: time-limited licences are refused until it is fixed"
                );
                startup.push(UsageEvent::ClockMovedBack {
                    clock: start.wall,
                    high_water: t,
                });
            }
        }
        let (records, unreadable) = params.store.load_leases()?;
        for bad in &unreadable {
            warn!(key = ?bad.key, error = %bad.error, "lease record in the store could not be read; left in place");
        }
        let restored = records.len();
        // A restored lease keeps the deadline it had: its stored end if an earlier run
        // restored it already, else its TTL from the last moment the previous run is
        // known to have been alive.
        let facts = crate::ledger::RestoreFacts {
            detached: params.store.load_detached()?,
            alive: params
                .store
                .load_clock()?
                .map(|t| (t, Duration::from_secs(CLOCK_SAVE_SECS))),
        };
        ledger.restore_with(now(), records, &facts);
        let detachments = ledger.take_detachments();
        if !detachments.is_empty() {
            // Durable before serving: a crash right after this start must not let the
            // next start compute a later end from a newer clock mark.
            params.store.apply_detachments(&detachments)?;
            params.store.flush_blocking()?;
        }
        if restored > 0 {
            info!(
                leases = restored,
                "restored leases from the store; holders re-attach by heartbeat"
            );
        }
        let config = crate::tls::server_config(&params.identity, params.idle_timeout)?;
        let socket = std::net::UdpSocket::bind(params.listen)
            .with_context(|| format!("binding UDP {}", params.listen))?;
        let endpoint = quinn::Endpoint::new(
            crate::tls::endpoint_config(&params.identity),
            Some(config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .with_context(|| format!("starting QUIC on {}", params.listen))?;
        let (tx, rx) = mpsc::channel(LEDGER_QUEUE);
        let shared = Arc::new(Shared {
            ledger: tx,
            key: params.identity,
            bundles: RwLock::new(Arc::new(params.bundles)),
            heartbeat_secs: params.heartbeat.as_secs().max(1),
            demo: params.demo,
            next_conn: AtomicU64::new(1),
            reloader: params.reloader,
            admin_token: params.admin_token,
            status_needs_token: params.status_needs_token,
            reloading: tokio::sync::Mutex::new(()),
            reloads_running: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            next_waiter: AtomicU64::new(1),
            remove_holdoff: params.remove_holdoff,
            shutdown: tokio::sync::Notify::new(),
            reports: params.reports,
            unspooled: tokio::sync::Mutex::new(Vec::new()),
            metrics: Arc::new(Metrics::default()),
            upload_wake: Arc::new(tokio::sync::Notify::new()),
            admission: Admission::new(params.limits),
            answering: AtomicUsize::new(0),
        });
        shared.metrics.set_licensed(ledger.feature_names());
        {
            let mut reloads = shared.metrics.reloads.lock().expect("metrics lock");
            reloads.last_success = params.refused.is_empty().then_some(start.wall);
            reloads.refused = params.refused;
        }
        let http = match params.http_listen {
            Some(addr) => {
                let std_listener = std::net::TcpListener::bind(addr)
                    .with_context(|| format!("binding the HTTP endpoint on {addr}"))?;
                std_listener.set_nonblocking(true)?;
                Some(tokio::net::TcpListener::from_std(std_listener)?)
            }
            None => None,
        };
        Ok(Server {
            endpoint,
            shared,
            ledger_rx: rx,
            ledger,
            store: params.store,
            reload_signal: params.reload_signal,
            startup,
            http,
            idle_timeout: params.idle_timeout,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// The operations endpoint's address, if it has one.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` completes, then stops the ledger (flushing the store)
    /// before closing connections, so that closing them does not release their leases:
    /// leases outlive a restart.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let Server {
            endpoint,
            shared,
            ledger_rx,
            ledger,
            store,
            reload_signal,
            startup,
            http,
            idle_timeout,
        } = self;
        let ledger_task = tokio::spawn(run_ledger(
            ledger,
            store,
            ledger_rx,
            startup,
            (shared.metrics.clone(), idle_timeout),
        ));
        if let Some(uploader) = shared.reports.uploader.clone() {
            tokio::spawn(crate::upload::run(uploader, shared.upload_wake.clone()));
        }
        if let Some(listener) = http {
            let ops = OpsHandle {
                shared: shared.clone(),
            };
            let hosts = shared.admission.limits().http_hosts.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::http::serve(listener, ops, hosts).await {
                    warn!(error = %e, "the HTTP endpoint stopped");
                }
            });
        }
        if let (Some(_), Some(every)) = (&shared.reports.spool, shared.reports.interval) {
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                loop {
                    tick.tick().await;
                    match export_to_spool(&shared).await {
                        Ok(Some(path)) => info!(path = %path.display(), "usage report written"),
                        Ok(None) => {}
                        Err(e) => warn!("scheduled usage report failed: {e}"),
                    }
                }
            });
        }
        if let Some(mut signal) = reload_signal {
            let shared = shared.clone();
            tokio::spawn(async move {
                while signal.recv().await.is_some() {
                    // Logged by `reload`, the same way as an admin reload.
                    reload(&shared).await;
                }
            });
        }
        let accept = {
            let endpoint = endpoint.clone();
            let shared = shared.clone();
            async move {
                while let Some(incoming) = endpoint.accept().await {
                    let remote = incoming.remote_address();
                    match shared.admission.admit(
                        remote.ip(),
                        incoming.remote_address_validated(),
                        incoming.may_retry(),
                    ) {
                        Verdict::Accept(permit) => {
                            let conn = ConnId(shared.next_conn.fetch_add(1, Ordering::Relaxed));
                            tokio::spawn(serve_connection(
                                Box::new(incoming),
                                conn,
                                shared.clone(),
                                permit,
                            ));
                        }
                        Verdict::Retry => {
                            shared
                                .metrics
                                .connections_retried
                                .fetch_add(1, Ordering::Relaxed);
                            if incoming.retry().is_err() {
                                debug!(%remote, "retry refused by quinn; connection ignored");
                            }
                        }
                        Verdict::Refuse(why) => {
                            shared
                                .metrics
                                .connections_refused
                                .fetch_add(1, Ordering::Relaxed);
                            debug!(%remote, why, "connection refused");
                            incoming.refuse();
                        }
                    }
                }
            }
        };
        tokio::select! {
            _ = accept => {}
            _ = shutdown => info!("shutting down"),
            _ = shared.shutdown.notified() => info!("shutting down on an admin request"),
        }
        // The last report segment, so a stop loses nothing the vendor should see.
        if shared.reports.spool.is_some() {
            let _ = shared
                .ledger
                .send(Command::Journal {
                    event: UsageEvent::DaemonStopped,
                })
                .await;
            match export_to_spool(&shared).await {
                Ok(Some(path)) => info!(path = %path.display(), "final usage report written"),
                Ok(None) => {}
                Err(e) => warn!("final usage report failed: {e}"),
            }
        }
        let (done_tx, done_rx) = oneshot::channel();
        if shared
            .ledger
            .send(Command::Shutdown { done: done_tx })
            .await
            .is_ok()
        {
            let _ = done_rx.await;
        }
        // The ledger answered every grant its final flush made durable; let the streams
        // deliver those answers (and any "shutting down") before the connections close,
        // or a client granted a moment before the stop never hears of its seat.
        let drained = tokio::time::Instant::now() + Duration::from_secs(2);
        while shared.answering.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < drained
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        endpoint.close(0u32.into(), b"server shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        let _ = ledger_task.await;
        info!("stopped; leases are kept in the store");
        Ok(())
    }
}

/// A reply owed to a client once the batch is durable.
enum Pending {
    Grant(
        oneshot::Sender<Result<LeaseRecord, DenialReason>>,
        Result<LeaseRecord, DenialReason>,
    ),
    Heartbeat(oneshot::Sender<Vec<LeaseState>>, Vec<LeaseState>),
    /// A heartbeat that gave lapsed leases back: answered once they are durable.
    Regranted(
        oneshot::Sender<Vec<LeaseState>>,
        Vec<(LeaseId, LeaseState)>,
        Vec<LeaseRecord>,
    ),
    Checkin(oneshot::Sender<Vec<bool>>, Vec<bool>),
    Status(oneshot::Sender<Vec<FeatureStatus>>, Vec<FeatureStatus>),
}

/// The ledger task: owns the ledger and the store.
async fn run_ledger(
    mut ledger: Ledger,
    store: Store,
    mut rx: mpsc::Receiver<Command>,
    startup: Vec<UsageEvent>,
    (metrics, idle_timeout): (Arc<Metrics>, Duration),
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut next_seq = match store.next_journal_seq() {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "cannot read the journal; usage events start a new range");
            1
        }
    };
    let mut journal: Vec<JournalEntry> = Vec::new();
    let mut record = |journal: &mut Vec<JournalEntry>, at, event| {
        journal.push(JournalEntry {
            seq: next_seq,
            at,
            event,
        });
        next_seq += 1;
    };
    let start = now().wall;
    for event in startup {
        record(&mut journal, start, event);
    }
    // Replies owed to checkouts waiting in a queue.
    let mut waiting: std::collections::HashMap<
        WaiterId,
        oneshot::Sender<Result<LeaseRecord, DenialReason>>,
    > = std::collections::HashMap::new();
    let mut clock_saved = ledger.clock_high_water();
    // Group commit, pipelined: while one flush runs, the next batches are decided and
    // written, and their grants wait for the flush after it. Answers go out only once a
    // flush that started after their writes has finished.
    let mut disk = Disk::new(store, metrics.clone());
    let mut flushing: Option<crate::disk::Flush> = None;
    let mut in_flight: Vec<Durable> = Vec::new();
    let mut unflushed: Vec<Durable> = Vec::new();
    // Writes since the last flush started that no answer waits for (checkins, reclaims,
    // denials in the journal): flushed promptly all the same, so a crash loses at most
    // one flush's worth of them.
    let mut dirty = false;
    // Journal events of grants taken back (the store failed under them), recorded with
    // the next batch.
    let mut rolled_back: Vec<UsageEvent> = Vec::new();
    let mut stall = StallWatch::new(idle_timeout);
    loop {
        // Woken at least every tick, so that a stall of the daemon shows as a gap.
        let deadline = Some(match ledger.next_deadline() {
            Some(d) => d.min(stall.next_tick()),
            None => stall.next_tick(),
        });
        // A broken store is reopened between flushes, never under a running one.
        let retry_at = disk.retry_at().filter(|_| flushing.is_none());
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let expiry = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                None => std::future::pending().await,
            }
        };
        let flushed = async {
            match flushing.as_mut() {
                Some(f) => f.await.unwrap_or_else(|e| Err(join_error(e))),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            n = rx.recv_many(&mut batch, MAX_BATCH) => if n == 0 { return },
            _ = expiry => {}
            result = flushed => {
                let result = disk.flushed(result);
                // Grants taken back only happen while the store is broken; they are
                // journaled (into its backlog) with the next batch.
                rolled_back.extend(answer_flushed(
                    &mut ledger,
                    std::mem::take(&mut in_flight),
                    result.err(),
                ));
                flushing = flush_if_owed(
                    &mut disk,
                    &mut ledger,
                    (&mut unflushed, &mut in_flight),
                    &mut dirty,
                    &mut rolled_back,
                );
                continue;
            }
            _ = retry => {
                disk.try_recover(&ledger).await;
                continue;
            }
        }
        let now = now();
        // Before anything else of this batch: connections that timed out while the
        // daemon stood still are its own fault, not their holders'.
        stall.observe(now, &mut ledger);
        ledger.observe_clock(now);
        let mut events = ledger.expire(now);
        events.extend(ledger.release_unclaimed(now));
        let mut pending = Vec::with_capacity(batch.len());
        let mut shutdown = None;
        let mut exports = Vec::new();
        for command in batch.drain(..) {
            match command {
                Command::Checkout {
                    conn,
                    holder,
                    request,
                    fresh,
                    waiter,
                    reply,
                } => {
                    // While the store cannot be written, no grant: it could not be made
                    // durable. Everything else goes on.
                    let decided = match disk.refusal() {
                        Some(what) => Checkout::Denied(DenialReason::StorageUnavailable { what }),
                        None => {
                            ledger.checkout_or_wait(now, conn, &holder, &request, fresh, waiter)
                        }
                    };
                    match decided {
                        Checkout::Granted(granted) => {
                            let (record, event) = *granted;
                            events.push(event);
                            pending.push(Pending::Grant(reply, Ok(record)));
                        }
                        Checkout::Denied(reason) => {
                            info!(feature = %request.feature, holder = %holder, %reason, "denied");
                            metrics.denied(now.wall, &request.feature, &holder, &reason);
                            // The fact of the denial is kept; a name no bundle
                            // licenses is not (clients can make up any number).
                            record(
                                &mut journal,
                                now.wall,
                                UsageEvent::Denied {
                                    feature: metrics.counted_as(&request.feature).to_string(),
                                    reason: reason.code().into(),
                                    user: holder.user.clone(),
                                    host: holder.host.clone(),
                                },
                            );
                            pending.push(Pending::Grant(reply, Err(reason)));
                        }
                        Checkout::Queued { position } => {
                            info!(feature = %request.feature, holder = %holder, position, "queued");
                            record(
                                &mut journal,
                                now.wall,
                                UsageEvent::Queued {
                                    feature: request.feature.clone(),
                                    user: holder.user.clone(),
                                    host: holder.host.clone(),
                                },
                            );
                            waiting.insert(waiter, reply);
                        }
                    }
                }
                Command::Remove { lease, reply } => {
                    let removed = ledger.remove_lease(now, lease);
                    let _ = reply.send(removed.is_some());
                    events.extend(removed);
                }
                Command::Heartbeat {
                    conn,
                    leases,
                    reply,
                } => {
                    let states = ledger.heartbeat(now, conn, &leases);
                    let regranted = ledger.take_regranted();
                    if regranted.is_empty() {
                        pending.push(Pending::Heartbeat(reply, states));
                    } else {
                        // A lapsed lease given back is a grant: stored before the
                        // holder hears it is active again.
                        for record in &regranted {
                            info!(lease = %record.id, feature = %record.feature, holder = %record.holder, "lapsed lease re-attached");
                            events.push(Event::Granted(record.clone()));
                        }
                        let states = leases.iter().map(|r| r.id).zip(states).collect();
                        pending.push(Pending::Regranted(reply, states, regranted));
                    }
                }
                Command::Checkin { leases, reply } => {
                    let (released, ev) = ledger.checkin(now, &leases);
                    events.extend(ev);
                    pending.push(Pending::Checkin(reply, released));
                }
                Command::Status { reply } => {
                    pending.push(Pending::Status(reply, ledger.status(now.wall)))
                }
                Command::Closed { conn, timed_out } => {
                    if timed_out && stall.recent(now) {
                        ledger.connection_lost(now, conn);
                    } else if timed_out {
                        events.extend(ledger.connection_timed_out(now, conn));
                    } else {
                        events.extend(ledger.connection_closed(now, conn));
                    }
                }
                Command::CancelWait { waiter } => ledger.cancel_wait(waiter),
                Command::Unclaimed { lease } => ledger.unclaimed(lease),
                Command::Reload {
                    bundles,
                    changes,
                    policy,
                    done,
                } => {
                    for b in &bundles {
                        record(
                            &mut journal,
                            now.wall,
                            UsageEvent::BundleLoaded {
                                bundle: b.id.clone(),
                            },
                        );
                    }
                    for event in changes {
                        record(&mut journal, now.wall, event);
                    }
                    ledger.reload(now, &bundles);
                    metrics.set_licensed(ledger.feature_names());
                    ledger.set_policy(now, policy);
                    let _ = done.send(());
                }
                Command::Shutdown { done } => shutdown = Some(done),
                Command::Journal { event } => record(&mut journal, now.wall, event),
                Command::Export {
                    identity,
                    retention,
                    reply,
                } => exports.push((identity, retention, reply)),
            }
        }
        for outcome in ledger.take_waiter_outcomes() {
            let reply = waiting.remove(&outcome.waiter);
            events.extend(outcome.event);
            let Some(reply) = reply else {
                // A grant with nobody to answer is stored (its event above) and then
                // released at once, never left to a TTL.
                if let Some(Ok(record)) = &outcome.result {
                    ledger.unclaimed(record.id);
                }
                continue;
            };
            if let Some(result) = outcome.result {
                if let Err(reason) = &result {
                    info!(%reason, "wait ended");
                    if let Some(feature) = denied_feature(reason) {
                        record(
                            &mut journal,
                            now.wall,
                            UsageEvent::Denied {
                                feature,
                                reason: reason.code().into(),
                                user: String::new(),
                                host: String::new(),
                            },
                        );
                    }
                }
                pending.push(Pending::Grant(reply, result));
            }
        }
        for event in &events {
            record(&mut journal, now.wall, journal::usage_event(event));
        }
        // The high-water mark, which also says when the daemon was last alive, is worth
        // a write every few seconds and at a stop, not once a request.
        let clock = ledger.clock_high_water();
        let save_clock =
            clock.0 >= clock_saved.0.saturating_add(CLOCK_SAVE_SECS) || shutdown.is_some();
        let detachments = ledger.take_detachments();
        dirty |= !journal.is_empty() || !events.is_empty() || !detachments.is_empty() || save_clock;
        let written = disk.write(
            &mut journal,
            (&events, &detachments),
            save_clock.then_some(clock),
        );
        if written.is_ok() && save_clock {
            clock_saved = clock;
        }
        let failure = written.err();
        for event in &events {
            if !matches!(event, Event::Granted(_)) {
                log_event(event, true);
            }
        }
        // Exports see this batch's journal, and become durable with it.
        for (identity, retention, reply) in exports.drain(..) {
            let result = match (&failure, disk.store()) {
                (None, Some(store)) => export(store, &identity, now.wall, retention),
                (Some(e), _) => Err(e.clone()),
                (None, None) => Err("the seat store is closed".into()),
            };
            unflushed.push(Durable::Export(reply, result));
        }
        for p in pending {
            match p {
                // Only grants (and exports) wait for the disk: a checkin or reclaim lost to
                // a crash comes back as a restored lease that expires on its TTL, costing
                // nobody a seat for long.
                Pending::Grant(reply, Ok(record)) => match &failure {
                    None => unflushed.push(Durable::Grant(reply, record)),
                    Some(what) => {
                        ledger.rollback(record.id);
                        rolled_back.push(not_recorded(&record));
                        let _ = reply
                            .send(Err(DenialReason::StorageUnavailable { what: what.clone() }));
                    }
                },
                Pending::Grant(reply, denied) => {
                    let _ = reply.send(denied);
                }
                Pending::Heartbeat(reply, r) => {
                    let _ = reply.send(r);
                }
                Pending::Regranted(reply, states, records) => match &failure {
                    None => unflushed.push(Durable::Regranted(reply, states, records)),
                    Some(_) => {
                        let _ = reply.send(undo_regrants(
                            &mut ledger,
                            &mut rolled_back,
                            states,
                            records,
                        ));
                    }
                },
                Pending::Checkin(reply, r) => {
                    let _ = reply.send(r);
                }
                Pending::Status(reply, r) => {
                    let _ = reply.send(r);
                }
            }
        }
        if let Some(done) = shutdown {
            if let Some(running) = flushing.take() {
                let result = running.await.unwrap_or_else(|e| Err(join_error(e)));
                let result = disk.flushed(result);
                // At a stop, a store that failed keeps nothing more: its backlog is lost
                // with the process, as the log says.
                let _ = answer_flushed(&mut ledger, std::mem::take(&mut in_flight), result.err());
            }
            let result = disk.close().await;
            if let Err(e) = &result {
                warn!(error = %e, "final flush failed");
            }
            let _ = answer_flushed(&mut ledger, std::mem::take(&mut unflushed), result.err());
            let _ = done.send(());
            return;
        }
        if flushing.is_none() {
            flushing = flush_if_owed(
                &mut disk,
                &mut ledger,
                (&mut unflushed, &mut in_flight),
                &mut dirty,
                &mut rolled_back,
            );
        }
        if !rolled_back.is_empty() {
            for event in rolled_back.drain(..) {
                record(&mut journal, now.wall, event);
            }
            let _ = disk.write(&mut journal, (&[], &[]), None);
            dirty = true;
        }
    }
}

/// Notices that the daemon itself stood still: the ledger task wakes at least every
/// [`LEDGER_TICK`], so a longer gap between two wakes means the process did not run.
/// Time it did not run does not count against lease holders ([`Ledger::forgive`]), and
/// connections that time out during or shortly after such a stall keep their leases
/// ([`Ledger::connection_lost`]): their clients are most likely alive and reconnecting,
/// and handing their seats to others would put two programs on one seat.
struct StallWatch {
    last: std::time::Instant,
    /// When the last stall ended.
    ended: Option<std::time::Instant>,
    idle_timeout: Duration,
}

impl StallWatch {
    fn new(idle_timeout: Duration) -> StallWatch {
        StallWatch {
            last: std::time::Instant::now(),
            ended: None,
            idle_timeout,
        }
    }

    fn next_tick(&self) -> std::time::Instant {
        self.last + LEDGER_TICK
    }

    fn observe(&mut self, now: Now, ledger: &mut Ledger) {
        let gap = now.mono.saturating_duration_since(self.last);
        self.last = now.mono;
        if gap > STALL_THRESHOLD {
            let stalled = gap - LEDGER_TICK;
            warn!(
                stalled_ms = stalled.as_millis() as u64,
                "tallyd did not run for a while (stopped or paused): lease deadlines move on by as much, and connections that time out now keep their leases for their holders to re-attach"
            );
            ledger.forgive(stalled);
            self.ended = Some(now.mono);
        }
    }

    /// Whether a connection that timed out now may owe its timeout to a stall: the
    /// stall ended less than one idle timeout (plus a margin for the backlog of work a
    /// stall leaves) ago.
    fn recent(&self, now: Now) -> bool {
        self.ended.is_some_and(|e| {
            now.mono.saturating_duration_since(e) <= self.idle_timeout + STALL_THRESHOLD
        })
    }
}

/// Starts a flush if answers or writes are waiting for one (call it when none runs); it
/// covers `unflushed`, which becomes `in_flight`. While the store is broken there is no
/// flush, and the answers waiting for one are failed at once.
fn flush_if_owed(
    disk: &mut Disk,
    ledger: &mut Ledger,
    (unflushed, in_flight): (&mut Vec<Durable>, &mut Vec<Durable>),
    dirty: &mut bool,
    rolled_back: &mut Vec<UsageEvent>,
) -> Option<crate::disk::Flush> {
    if unflushed.is_empty() && !*dirty {
        return None;
    }
    *dirty = false;
    match disk.start_flush() {
        Some(flush) => {
            *in_flight = std::mem::take(unflushed);
            Some(flush)
        }
        None => {
            rolled_back.extend(answer_flushed(
                ledger,
                std::mem::take(unflushed),
                disk.refusal(),
            ));
            None
        }
    }
}

/// An answer that waits for the flush covering its writes.
enum Durable {
    Grant(
        oneshot::Sender<Result<LeaseRecord, DenialReason>>,
        LeaseRecord,
    ),
    Export(
        oneshot::Sender<Result<Exported, String>>,
        Result<Exported, String>,
    ),
    Regranted(
        oneshot::Sender<Vec<LeaseState>>,
        Vec<(LeaseId, LeaseState)>,
        Vec<LeaseRecord>,
    ),
}

/// Takes back lapsed leases that were given back but could not be stored: they read
/// as unknown to their holder, and the journal says they were not recorded.
fn undo_regrants(
    ledger: &mut Ledger,
    rolled_back: &mut Vec<UsageEvent>,
    states: Vec<(LeaseId, LeaseState)>,
    records: Vec<LeaseRecord>,
) -> Vec<LeaseState> {
    let undone: std::collections::HashSet<LeaseId> = records.iter().map(|r| r.id).collect();
    for record in &records {
        ledger.rollback(record.id);
        rolled_back.push(not_recorded(record));
    }
    states
        .into_iter()
        .map(|(id, state)| {
            if undone.contains(&id) {
                LeaseState::Unknown
            } else {
                state
            }
        })
        .collect()
}

fn join_error(e: tokio::task::JoinError) -> crate::store::StoreError {
    crate::store::StoreError::Sled {
        path: Default::default(),
        cause: sled::Error::Io(std::io::Error::other(e)),
    }
}

/// Sends the answers a flush covered; if it failed, grants are rolled back and denied,
/// and the journal events that say so are returned (the grants' own events may have
/// reached the disk).
#[must_use]
fn answer_flushed(
    ledger: &mut Ledger,
    answers: Vec<Durable>,
    failure: Option<String>,
) -> Vec<UsageEvent> {
    let mut rolled_back = Vec::new();
    for answer in answers {
        match (answer, &failure) {
            (Durable::Grant(reply, record), None) => {
                log_event(&Event::Granted(record.clone()), true);
                if let Err(Ok(record)) = reply.send(Ok(record)) {
                    // Nobody is left to hear of it: the requester stopped waiting (or
                    // its connection closed) after the grant was decided.
                    ledger.unclaimed(record.id);
                }
            }
            (Durable::Grant(reply, record), Some(what)) => {
                ledger.rollback(record.id);
                rolled_back.push(not_recorded(&record));
                let _ = reply.send(Err(DenialReason::StorageUnavailable { what: what.clone() }));
            }
            (Durable::Export(reply, result), None) => {
                let _ = reply.send(result);
            }
            (Durable::Regranted(reply, states, _), None) => {
                let _ = reply.send(states.into_iter().map(|(_, s)| s).collect());
            }
            (Durable::Regranted(reply, states, records), Some(_)) => {
                let _ = reply.send(undo_regrants(ledger, &mut rolled_back, states, records));
            }
            (Durable::Export(reply, _), Some(what)) => {
                let _ = reply.send(Err(what.clone()));
            }
        }
    }
    rolled_back
}

/// The journal's word for a grant taken back because it could not be made durable.
fn not_recorded(record: &LeaseRecord) -> UsageEvent {
    UsageEvent::Released {
        lease: record.id,
        feature: record.feature.clone(),
        count: record.count,
        why: "not_recorded".into(),
    }
}

/// The feature a queue-timeout denial is about (waits that end otherwise are logged
/// when they start).
fn denied_feature(reason: &DenialReason) -> Option<String> {
    match reason {
        DenialReason::QueueTimeout { feature, .. } => Some(feature.clone()),
        _ => None,
    }
}

/// Builds the next report and moves the chain state; compacts what is old enough.
fn export(
    store: &Store,
    identity: &ReportIdentity,
    now: UnixTime,
    retention: Duration,
) -> Result<Exported, String> {
    let state = store.report_state().map_err(|e| e.to_string())?;
    let (entries, unreadable) = store
        .journal_after(state.last_event)
        .map_err(|e| e.to_string())?;
    if unreadable > 0 {
        warn!(
            unreadable,
            "journal records could not be read; the report names the gap"
        );
    }
    let exported = journal::build_report(identity, &state, entries, now);
    store
        .save_report_state(&exported.state)
        .map_err(|e| e.to_string())?;
    // Bounded growth: exported events past the retention period go.
    let before = UnixTime(now.0.saturating_sub(retention.as_secs()));
    match store.compact_journal(exported.state.last_event, before) {
        Ok(0) => {}
        Ok(n) => info!(events = n, "compacted exported journal events"),
        Err(e) => warn!(error = %e, "journal compaction failed"),
    }
    Ok(exported)
}

/// Asks the ledger task for the next report.
async fn request_export(shared: &Shared) -> Result<Exported, String> {
    let bundles = shared.bundles.read().expect("bundles lock").clone();
    let mut customers = Vec::new();
    let mut bundle_ids = Vec::new();
    for v in bundles.iter() {
        if !customers.contains(&v.bundle.customer.id) {
            customers.push(v.bundle.customer.id.clone());
        }
        bundle_ids.push(v.bundle.id.clone());
    }
    let identity = Box::new(ReportIdentity {
        key: shared.key.clone(),
        host_fingerprint: shared.reports.host_fingerprint.clone(),
        customers,
        bundle_ids,
    });
    let (reply, rx) = oneshot::channel();
    shared
        .ledger
        .send(Command::Export {
            identity,
            retention: shared.reports.retention,
            reply,
        })
        .await
        .map_err(|_| SHUTTING_DOWN.to_string())?;
    rx.await.map_err(|_| SHUTTING_DOWN.to_string())?
}

/// Why an export did not happen when the ledger task has gone (not a storage fault).
const SHUTTING_DOWN: &str = "the server is shutting down";

/// Exports into the spool; a report that cannot be written is kept and retried.
async fn export_to_spool(shared: &Shared) -> Result<Option<std::path::PathBuf>, String> {
    let Some(dir) = shared.reports.spool.clone() else {
        return Ok(None);
    };
    let exported = request_export(shared).await?;
    let mut unspooled = shared.unspooled.lock().await;
    unspooled.push((exported.report_seq, exported.text));
    let mut last = None;
    while let Some((seq, text)) = unspooled.first().cloned() {
        let path = dir.join(format!("tally-report-{seq:08}.report"));
        match write_report(&path, &text) {
            Ok(()) => {
                unspooled.remove(0);
                last = Some(path);
                shared.upload_wake.notify_one();
            }
            Err(e) => {
                return Err(format!(
                    "{}: {e} (kept in memory, retried at the next export)",
                    path.display()
                ))
            }
        }
    }
    Ok(last)
}

fn write_report(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::files::write_atomic(path, text.as_bytes(), 0o644)
}

fn log_event(event: &Event, durable: bool) {
    match event {
        Event::Granted(r) if durable => info!(
            lease = %r.id, feature = %r.feature, count = r.count, holder = %r.holder, "granted"
        ),
        Event::Granted(_) => {}
        Event::Released {
            id, feature, why, ..
        } => {
            info!(lease = %id, feature = %feature, reason = %why, "released")
        }
    }
}

/// One client connection: accepts its request streams until it closes, then tells the
/// ledger so that its leases are reclaimed at once.
///
/// The task lives as long as the connection, so its size counts per idle client (see
/// BENCHMARKS.md, scale): the handshake and the final ledger message are boxed, so that
/// their state is freed when done instead of sizing the whole task for its lifetime.
async fn serve_connection(
    incoming: Box<quinn::Incoming>,
    conn_id: ConnId,
    shared: Arc<Shared>,
    mut permit: Permit,
) {
    let remote = incoming.remote_address();
    let handshake = Box::pin((*incoming).into_future()).await;
    permit.handshake_done();
    let connection = match handshake {
        Ok(c) => c,
        Err(e) => {
            debug!(%remote, error = %e, "handshake failed");
            return;
        }
    };
    debug!(%remote, conn = conn_id.0, "connected");
    let identity = Arc::new(Mutex::new(None::<ClientIdentity>));
    let reason = loop {
        match connection.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(serve_stream(
                    send,
                    recv,
                    (conn_id, remote.ip()),
                    shared.clone(),
                    identity.clone(),
                ));
            }
            Err(e) => break e,
        }
    };
    debug!(%remote, conn = conn_id.0, %reason, "connection closed");
    let timed_out = matches!(reason, quinn::ConnectionError::TimedOut);
    let _ = Box::pin(shared.ledger.send(Command::Closed {
        conn: conn_id,
        timed_out,
    }))
    .await;
}

/// Why reading a request failed.
enum ReadFailure {
    /// A bad frame, with the protocol version its header named (answers go in it).
    Frame(FrameError, u16),
    Stream(String),
}

/// Reads one request; returns it with the protocol version the client spoke.
async fn read_request(recv: &mut quinn::RecvStream) -> Result<(u16, Request), ReadFailure> {
    let mut header = [0u8; HEADER_LEN];
    recv.read_exact(&mut header)
        .await
        .map_err(|e| ReadFailure::Stream(e.to_string()))?;
    let version = u16::from_be_bytes([header[4], header[5]]);
    let fail = |e| ReadFailure::Frame(e, version);
    let header = frame::parse_header(&header, MAX_REQUEST_LEN).map_err(fail)?;
    frame::check_request_version(header.version).map_err(fail)?;
    // Bounded by MAX_REQUEST_LEN, checked above before anything was allocated.
    let mut payload = vec![0u8; header.payload_len];
    recv.read_exact(&mut payload)
        .await
        .map_err(|e| ReadFailure::Stream(e.to_string()))?;
    let request = frame::decode_request(header.version, &payload).map_err(fail)?;
    Ok((version, request))
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    (conn, remote): (ConnId, std::net::IpAddr),
    shared: Arc<Shared>,
    identity: Arc<Mutex<Option<ClientIdentity>>>,
) {
    // Counted from a complete request to its answer's end, so that a stop lets answers
    // out before it closes the connections.
    let mut _answering = None;
    let bytes = match tokio::time::timeout(REQUEST_READ_TIMEOUT, read_request(&mut recv)).await {
        // The client's version is unknown: version 1, which every client reads.
        Err(_) => frame::encode_response_for(
            frame::MIN_SUPPORTED_VERSION,
            error(
                ErrorCode::BadRequest,
                format!(
                    "no complete request within {} s",
                    REQUEST_READ_TIMEOUT.as_secs()
                ),
            ),
        ),
        Ok(Err(ReadFailure::Frame(FrameError::UnsupportedVersion { got, .. }, _))) => {
            frame::encode_version_negotiation(got)
        }
        Ok(Err(ReadFailure::Frame(e, version))) => {
            frame::encode_response_for(version, error(ErrorCode::BadRequest, e.to_string()))
        }
        Ok(Err(ReadFailure::Stream(e))) => {
            debug!(conn = conn.0, error = %e, "stream ended before a request");
            return;
        }
        Ok(Ok((version, request))) => {
            _answering = Some(Answering::new(shared.clone()));
            let response = dispatch(request, (conn, remote), &send, &shared, &identity).await;
            let granted = match &response {
                Response::Checkout(CheckoutReply::Granted(g)) => Some(g.id),
                _ => None,
            };
            let bytes = frame::encode_response_for(version, response);
            if let Some(lease) = granted {
                if !delivered(&mut send, &bytes).await {
                    // The client stopped the stream before the grant reached it (it gave
                    // up waiting in the same instant the seat was granted): nobody holds
                    // the secret, so the seat goes back at once.
                    debug!(conn = conn.0, %lease, "grant not received; taking it back");
                    let _ = shared.ledger.send(Command::Unclaimed { lease }).await;
                }
                return;
            }
            bytes
        }
    };
    if send.write_all(&bytes).await.is_ok() {
        let _ = send.finish();
    }
}

/// One request being answered (see `Shared::answering`).
struct Answering(Arc<Shared>);

impl Answering {
    fn new(shared: Arc<Shared>) -> Answering {
        shared.answering.fetch_add(1, Ordering::AcqRel);
        Answering(shared)
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.answering.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends a grant and waits (bounded) until the client's QUIC stack acknowledged all of
/// it; false if the client stopped the stream first or the connection went away. A
/// client whose stack acknowledged the grant and whose application then dropped it
/// before reading remains: its seat comes back with its connection or TTL.
async fn delivered(send: &mut quinn::SendStream, bytes: &[u8]) -> bool {
    if send.write_all(bytes).await.is_err() || send.finish().is_err() {
        return false;
    }
    match tokio::time::timeout(GRANT_ACK_TIMEOUT, send.stopped()).await {
        // Abandoned by a client that says so (a dropped stream stops with code 0, also
        // after reading the answer, so only this code means "not received").
        Ok(Ok(Some(code))) => code != quinn::VarInt::from_u32(frame::STOP_ABANDONED),
        Ok(Ok(None)) => true,
        // No word either way (the connection went, or no answer in time): the
        // connection's own fate decides, as for any lease.
        Ok(Err(_)) | Err(_) => true,
    }
}

/// A failure with its code; a version-1 client gets the message alone
/// (`frame::encode_response_for`).
fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Failed(ServerError::new(code, message))
}

/// Checks that no identity field is empty, oversized or holds control characters:
/// these names go into the log, other users' terminals, the dashboard and the vendor's
/// report, and a line break or an escape sequence in them forges what people read.
fn check_identity(client: &ClientIdentity) -> Result<(), String> {
    let fields = [
        ("user", client.user.as_str()),
        ("host", client.host.as_str()),
        ("program", client.program.as_str()),
        ("display", client.display.as_deref().unwrap_or("-")),
    ];
    for (name, value) in fields {
        check_name(name, value).map_err(|e| format!("hello: {e}"))?;
    }
    Ok(())
}

/// Checks the names of a checkout (feature, version) like identity fields.
fn check_checkout(request: &CheckoutRequest) -> Result<(), String> {
    check_name("feature name", &request.feature)?;
    if let Some(version) = &request.version {
        check_name("version", version)?;
    }
    Ok(())
}

async fn dispatch(
    request: Request,
    (conn, remote): (ConnId, std::net::IpAddr),
    send: &quinn::SendStream,
    shared: &Arc<Shared>,
    identity: &Mutex<Option<ClientIdentity>>,
) -> Response {
    let closed = || error(ErrorCode::ShuttingDown, "the server is shutting down");
    match request {
        Request::Hello(hello) => {
            if let Err(what) = check_identity(&hello.client) {
                return error(ErrorCode::BadRequest, what);
            }
            *identity.lock().expect("identity lock") = Some(hello.client);
            let bundles = shared
                .bundles
                .read()
                .expect("bundles lock")
                .iter()
                .map(|b| b.signed.clone())
                .collect();
            Response::Hello(HelloReply {
                server_version: env!("CARGO_PKG_VERSION").to_string(),
                bundles,
                server_time: now().wall,
                heartbeat_secs: shared.heartbeat_secs,
                demo: shared.demo,
            })
        }
        Request::Checkout(request) => {
            let Some(holder) = identity.lock().expect("identity lock").clone() else {
                return error(ErrorCode::BadRequest, "send hello before checkout");
            };
            if let Err(what) = check_checkout(&request) {
                return Response::Checkout(CheckoutReply::Denied(Denial {
                    reason: DenialReason::InvalidRequest { what },
                }));
            }
            if let Err(wait) = shared.admission.checkout(remote, std::time::Instant::now()) {
                let reason = DenialReason::RateLimited {
                    retry_after_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX).max(1),
                };
                shared
                    .metrics
                    .denied(now().wall, &request.feature, &holder, &reason);
                return Response::Checkout(CheckoutReply::Denied(Denial { reason }));
            }
            let fresh = match fresh_lease() {
                Ok(f) => f,
                Err(e) => {
                    return error(
                        ErrorCode::Internal,
                        format!("no randomness for a lease secret: {e}"),
                    )
                }
            };
            let (reply, rx) = oneshot::channel();
            let waiter = WaiterId(shared.next_waiter.fetch_add(1, Ordering::Relaxed));
            let command = Command::Checkout {
                conn,
                holder: holder.clone(),
                request,
                fresh,
                waiter,
                reply,
            };
            if shared.ledger.send(command).await.is_err() {
                return closed();
            }
            // A client that gives up waiting (its request future dropped, the stream
            // stopped) while keeping the connection leaves the queue at once, instead of
            // holding its place, and later a seat nobody would use, until its timeout.
            let answer = tokio::select! {
                answer = rx => answer,
                _ = send.stopped() => {
                    let _ = shared.ledger.send(Command::CancelWait { waiter }).await;
                    return closed();
                }
            };
            match answer {
                Ok(Ok(record)) => {
                    Response::Checkout(CheckoutReply::Granted(grant(&record, &holder, &shared.key)))
                }
                Ok(Err(reason)) => Response::Checkout(CheckoutReply::Denied(Denial {
                    reason: shared.client_view(reason),
                })),
                Err(_) => closed(),
            }
        }
        Request::Heartbeat(request) => {
            let started = std::time::Instant::now();
            let (reply, rx) = oneshot::channel();
            let command = Command::Heartbeat {
                conn,
                leases: request.leases,
                reply,
            };
            if shared.ledger.send(command).await.is_err() {
                return closed();
            }
            match rx.await {
                Ok(leases) => {
                    shared.metrics.heartbeat_latency.observe(started.elapsed());
                    Response::Heartbeat(HeartbeatReply { leases })
                }
                Err(_) => closed(),
            }
        }
        Request::Checkin(request) => {
            let (reply, rx) = oneshot::channel();
            let command = Command::Checkin {
                leases: request.leases,
                reply,
            };
            if shared.ledger.send(command).await.is_err() {
                return closed();
            }
            match rx.await {
                Ok(released) => Response::Checkin(CheckinReply { released }),
                Err(_) => closed(),
            }
        }
        Request::Status(status) => {
            if shared.status_needs_token && !shared.is_admin(status.admin_token.as_deref()) {
                let why = if status.admin_token.is_some() {
                    "a wrong admin token"
                } else {
                    "no admin token"
                };
                warn!(%remote, conn = conn.0, "status request refused over QUIC: {why}");
                return error(
                    ErrorCode::Unauthorized,
                    "this server shows its status only with the admin token",
                );
            }
            let (reply, rx) = oneshot::channel();
            if shared.ledger.send(Command::Status { reply }).await.is_err() {
                return closed();
            }
            match rx.await {
                Ok(features) => Response::Status(StatusReply {
                    server_time: now().wall,
                    server_fingerprint: shared.key.public().fingerprint(),
                    features,
                }),
                Err(_) => closed(),
            }
        }
        Request::Admin(admin) => {
            if shared.admin_token.is_none() {
                warn!(%remote, conn = conn.0, "admin request refused over QUIC: admin operations are disabled");
                return error(
                    ErrorCode::AdminDisabled,
                    "admin operations are disabled: this server has no admin token",
                );
            }
            if !shared.is_admin(Some(&admin.token)) {
                // The source, never the token: a refusal is what an attack looks like.
                warn!(%remote, conn = conn.0, "admin request refused over QUIC: wrong admin token");
                return error(ErrorCode::Unauthorized, "admin token is wrong");
            }
            match admin.op {
                AdminOp::Reload => {
                    // Older clients read an `AdminReply` and print it with exit 0: a
                    // reload that refused anything must reach them as an error.
                    let outcome = reload(shared).await;
                    if outcome.ok() {
                        Response::Admin(AdminReply {
                            message: outcome.summary,
                            report: None,
                        })
                    } else {
                        error(ErrorCode::ReloadFailed, outcome_text(&outcome))
                    }
                }
                AdminOp::ReloadWithOutcome => Response::Reload(reload(shared).await),
                AdminOp::Remove { lease } => {
                    let (reply, rx) = oneshot::channel();
                    if shared
                        .ledger
                        .send(Command::Remove { lease, reply })
                        .await
                        .is_err()
                    {
                        return closed();
                    }
                    match rx.await {
                        Ok(true) => {
                            info!(%lease, "lease removed by the administrator");
                            Response::Admin(AdminReply {
                                message: removed_message(lease, shared.remove_holdoff),
                                report: None,
                            })
                        }
                        Ok(false) => error(
                            ErrorCode::UnknownLease,
                            format!("no lease {lease} is held on this server"),
                        ),
                        Err(_) => closed(),
                    }
                }
                AdminOp::Shutdown => {
                    // Stop after this answer has left, so the admin hears it.
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        shared.shutdown.notify_one();
                    });
                    Response::Admin(AdminReply {
                        message: "shutting down; leases are kept".into(),
                        report: None,
                    })
                }
                AdminOp::ExportReport => match request_export(shared).await {
                    Ok(exported) => {
                        info!(
                            report = exported.report_seq,
                            events = exported.events,
                            "usage report exported"
                        );
                        // A copy goes to the spool too, if there is one.
                        if let Some(dir) = &shared.reports.spool {
                            let path =
                                dir.join(format!("tally-report-{:08}.report", exported.report_seq));
                            if let Err(e) = write_report(&path, &exported.text) {
                                warn!(path = %path.display(), error = %e, "spool copy failed");
                            }
                            shared.upload_wake.notify_one();
                        }
                        Response::Admin(AdminReply {
                            message: format!(
                                "report {} with {}",
                                exported.report_seq,
                                plural(exported.events as u64, "event", "events")
                            ),
                            report: Some(exported.text),
                        })
                    }
                    Err(e) if e == SHUTTING_DOWN => error(ErrorCode::ShuttingDown, e),
                    Err(e) => {
                        // The store's error text names paths: the log has it, the
                        // client gets the kind of fault.
                        warn!(error = %e, "report export failed");
                        error(
                            ErrorCode::StorageUnavailable,
                            format!("export failed: {}", storage_fault(&e)),
                        )
                    }
                },
                _ => error(
                    ErrorCode::Unsupported,
                    "this admin operation is not supported by this tallyd",
                ),
            }
        }
        _ => error(
            ErrorCode::Unsupported,
            "this request is not supported by this tallyd",
        ),
    }
}

/// What a client is told about a storage fault: the kind of fault, if it is one people
/// can act on, never the store's paths or the storage engine's error text.
fn storage_fault(what: &str) -> String {
    const KNOWN: [&str; 8] = [
        "No space left on device",
        "Read-only file system",
        "Disk quota exceeded",
        "Input/output error",
        "Permission denied",
        "Too many open files",
        "files are missing",
        "closed",
    ];
    match KNOWN.iter().find(|k| what.contains(*k)) {
        Some(kind) => format!("the seat store: {kind}; held seats are kept"),
        None => "the seat store cannot be written (the server's log says why); held seats are kept"
            .to_string(),
    }
}

/// Compares secrets without an early exit, so timing does not reveal a prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What `tally admin remove` is told.
fn removed_message(lease: LeaseId, holdoff: Duration) -> String {
    if holdoff.is_zero() {
        format!("lease {lease} removed; its holder learns on its next heartbeat")
    } else {
        format!(
            "lease {lease} removed; its holder learns on its next heartbeat and gets no seat \
             of the feature on that host for {} s",
            holdoff.as_secs()
        )
    }
}

/// A reload's outcome as one text: the summary, then each refusal.
pub fn outcome_text(outcome: &ReloadOutcome) -> String {
    let mut text = outcome.summary.clone();
    for r in &outcome.refused {
        text.push_str(&format!("\n  refused: {r}"));
    }
    text
}

/// Re-reads the bundles and hands them to the ledger; every lease is kept. SIGHUP, the
/// admin request and the dashboard all come here, so they log the same lines: one per
/// refused file (file and reason), one for the outcome; and the operations endpoint
/// shows the outcome.
async fn reload(shared: &Shared) -> ReloadOutcome {
    let at = now().wall;
    let outcome = reload_bundles(shared).await;
    for r in &outcome.refused {
        // The same words as at the start and in `check-config`: FILE: refused: REASON.
        warn!("reload: {}: refused: {}", r.source, r.reason);
    }
    if outcome.ok() {
        info!(bundles = outcome.loaded.len(), "{}", outcome.summary);
    } else {
        warn!(
            bundles = outcome.loaded.len(),
            refused = outcome.refused.len(),
            "{}",
            outcome.summary
        );
    }
    let mut record = shared.metrics.reloads.lock().expect("metrics lock");
    if outcome.error.is_none() && outcome.policy_error.is_none() {
        // The directory was read: its refusals are the ones in force now.
        record.refused = outcome.refused.clone();
    }
    if outcome.ok() {
        record.last_success = Some(at);
    } else {
        record.failures += 1;
    }
    record.last = Some(LastReload {
        at,
        ok: outcome.ok(),
        summary: outcome.summary.clone(),
    });
    outcome
}

/// The reload itself; every way it can end is an outcome.
async fn reload_bundles(shared: &Shared) -> ReloadOutcome {
    let serving = || -> Vec<String> {
        shared
            .bundles
            .read()
            .expect("bundles lock")
            .iter()
            .map(|b| b.bundle.id.clone())
            .collect()
    };
    let failed = |error: String| ReloadOutcome {
        loaded: serving(),
        refused: Vec::new(),
        policy_error: None,
        summary: format!("reload failed: {error}; still serving the previous bundles and policy"),
        error: Some(error),
    };
    let _one_at_a_time = shared.reloading.lock().await;
    let Some(reloader) = shared.reloader.clone() else {
        return failed("this server has no bundle directory to reload from".into());
    };
    if shared.reloads_running.load(Ordering::Acquire) > 0 {
        return failed(
            "an earlier reload is still stuck reading the bundle directory or the policy \
             (a file on a hung mount?)"
                .into(),
        );
    }
    // A thread of its own, not tokio's blocking pool: the runtime waits for its
    // blocking tasks when it shuts down, and a stuck read must not keep tallyd alive.
    let (tx, rx) = oneshot::channel();
    let running = shared.reloads_running.clone();
    running.fetch_add(1, Ordering::AcqRel);
    let spawned = std::thread::Builder::new()
        .name("tallyd-reload".into())
        .spawn(move || {
            let result = reloader();
            running.fetch_sub(1, Ordering::AcqRel);
            let _ = tx.send(result);
        });
    if let Err(e) = spawned {
        shared.reloads_running.fetch_sub(1, Ordering::AcqRel);
        return failed(format!("cannot start the reload: {e}"));
    }
    let Reloaded {
        bundles,
        refused,
        policy,
    } = match tokio::time::timeout(RELOAD_DEADLINE, rx).await {
        Err(_) => {
            return failed(format!(
                "reading the bundles and the policy did not finish within {} s (a file that \
                 never answers?)",
                RELOAD_DEADLINE.as_secs()
            ))
        }
        Ok(Err(_)) => return failed("the reload ended without an answer".into()),
        Ok(Ok(Err(ReloadError::Other(e)))) => return failed(e),
        Ok(Ok(Err(ReloadError::Policy(broken)))) => {
            return ReloadOutcome {
                loaded: serving(),
                refused: Vec::new(),
                summary: format!(
                    "reload refused: the policy file {} is broken: {}; nothing was reloaded \
                     (the previous policy and bundles stay in force)",
                    broken.source, broken.reason
                ),
                policy_error: Some(broken),
                error: None,
            }
        }
        Ok(Ok(Ok(reloaded))) => reloaded,
    };
    let (done, wait) = oneshot::channel();
    let plain: Vec<_> = bundles.iter().map(|b| b.bundle.clone()).collect();
    // The set in force until now is the one shown in hello (one reload at a time).
    let before: Vec<_> = shared
        .bundles
        .read()
        .expect("bundles lock")
        .iter()
        .map(|b| b.bundle.clone())
        .collect();
    let changes = journal::bundle_changes(&before, &plain, "reload", now().wall);
    let sent = shared
        .ledger
        .send(Command::Reload {
            bundles: plain,
            changes,
            policy,
            done,
        })
        .await;
    if sent.is_err() || wait.await.is_err() {
        return failed("the server is shutting down".into());
    }
    let loaded: Vec<String> = bundles.iter().map(|b| b.bundle.id.clone()).collect();
    *shared.bundles.write().expect("bundles lock") = Arc::new(bundles);
    let count = loaded.len();
    let summary = if refused.is_empty() {
        format!("reloaded: serving {count} bundle(s); every lease kept")
    } else {
        format!(
            "reloaded: serving {count} bundle(s), {} bundle file(s) refused; every lease kept",
            refused.len()
        )
    };
    ReloadOutcome {
        loaded,
        refused,
        policy_error: None,
        error: None,
        summary,
    }
}

fn fresh_lease() -> Result<FreshLease, getrandom::Error> {
    let mut bytes = [0u8; 24];
    getrandom::getrandom(&mut bytes)?;
    let mut id = [0u8; 8];
    id.copy_from_slice(&bytes[..8]);
    let mut secret = [0u8; 16];
    secret.copy_from_slice(&bytes[8..]);
    Ok(FreshLease {
        id: LeaseId(u64::from_be_bytes(id)),
        secret: LeaseSecret(secret),
    })
}

/// The grant message with its signed token. Signing happens here, on the connection's
/// task, not in the ledger task, so that both cores share the signing work.
fn grant(record: &LeaseRecord, holder: &ClientIdentity, key: &SecretKey) -> LeaseGrant {
    let token = LeaseToken::V1 {
        id: record.id,
        feature: record.feature.clone(),
        count: record.count,
        holder: holder.to_string(),
        issued_at: record.granted_at,
        expires_at: record.borrowed_until,
    };
    LeaseGrant {
        id: record.id,
        secret: record.secret.clone(),
        feature: record.feature.clone(),
        count: record.count,
        ttl_secs: record.ttl_secs,
        overdraft: record.overdraft,
        borrowed_until: record.borrowed_until,
        token: Signed::sign(Domain::Lease, token.encode(), key),
    }
}

#[cfg(test)]
mod tests {
    use super::{storage_fault, Metrics};
    use tally_protocol::time::UnixTime;
    use tally_protocol::wire::{ClientIdentity, DenialReason, UNLICENSED_FEATURE};

    /// Issue 20, scenario 4: every denial, rate-limited ones included, added a counter
    /// under the name the client chose.
    #[test]
    fn denial_counters_are_keyed_by_licensed_names_only() {
        let m = Metrics::default();
        m.set_licensed(["solver".to_string()].into());
        // A reload that drops a feature keeps its counters' name.
        m.set_licensed(["viewer".to_string()].into());
        let who = ClientIdentity {
            user: "mallory".into(),
            host: "ws".into(),
            pid: 1,
            program: "p".into(),
            display: None,
        };
        let limited = DenialReason::RateLimited { retry_after_ms: 5 };
        for i in 0..1_000 {
            m.denied(UnixTime(0), &format!("junk-{i}"), &who, &limited);
        }
        m.denied(UnixTime(0), "solver", &who, &limited);
        m.denied(UnixTime(0), "viewer", &who, &limited);
        let denials = m.denials.lock().unwrap();
        let keys: Vec<&str> = denials.keys().map(|(f, _)| f.as_str()).collect();
        assert_eq!(keys, vec![UNLICENSED_FEATURE, "solver", "viewer"]);
        assert_eq!(
            denials[&(UNLICENSED_FEATURE.to_string(), "rate_limited".to_string())],
            1_000
        );
        assert_eq!(m.recent.lock().unwrap().len(), 50);
    }

    /// Issue 20, scenario 8: storage denials carried the store's path and sled's Debug
    /// text to every client.
    #[test]
    fn storage_faults_reach_clients_without_paths_or_debug_text() {
        let raw = "seat store /var/lib/tally/store: Io(Custom { kind: StorageFull, error: \"No space left on device (os error 28)\" })";
        let shown = storage_fault(raw);
        assert_eq!(
            shown,
            "the seat store: No space left on device; held seats are kept"
        );
        let shown = storage_fault(
            "opening the seat store: Read corrupted data at file offset None backtrace ()",
        );
        assert!(!shown.contains("offset") && !shown.contains('/'), "{shown}");
        assert!(shown.contains("the server's log says why"), "{shown}");
    }
}
