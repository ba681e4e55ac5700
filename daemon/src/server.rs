//! The QUIC shell around the ledger: binds the endpoint, restores the ledger from the
//! store, starts the ledger task and the helpers around it (operations endpoint,
//! scheduled reports, reloads on SIGHUP, the uploader), admits connections, and stops
//! all of it in order. What each part does lives in its own module:
//!
//! - `conn`: connections and streams (frames in, answers out);
//! - `handlers`: one handler per request type;
//! - `ledger_task`: the task that owns the ledger and the store (group commit);
//! - `shared`: the state connection tasks share;
//! - [`crate::reload`], [`crate::reports`], [`crate::metrics`], [`crate::ops`],
//!   [`crate::clock`].

use crate::admission::{Admission, Verdict};
use crate::commit::CLOCK_SAVE_SECS;
use crate::conn::serve_connection;
use crate::consensus::{Node, NodeSetup, Role};
use crate::error::Error;
use crate::journal;
use crate::ledger::{ConnId, Ledger};
use crate::ledger_task::{run_ledger, Inbox, LedgerHandle};
use crate::reload::Reloads;
use crate::reports::Reports;
use crate::shared::Shared;
use crate::store::{Store, StoreError};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tally_protocol::replicate::StoreBatch;
use tally_protocol::report::UsageEvent;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

pub use crate::clock::now;
pub use crate::metrics::{LastReload, Metrics, RecentDenial, ReloadRecord};
pub use crate::ops::OpsHandle;
pub use crate::params::{ReloadError, Reloaded, Reloader, ReportSettings, ServerParams};
pub use crate::reload::outcome_text;

/// A bound server, ready to run.
#[must_use = "a server does nothing until run"]
pub struct Server {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    ledger_rx: Inbox,
    ledger: Ledger,
    store: Store,
    node: Result<Node, StoreError>,
    setup: NodeSetup,
    role: watch::Sender<Role>,
    reload_signal: Option<mpsc::Receiver<()>>,
    startup: Vec<UsageEvent>,
    http: Option<tokio::net::TcpListener>,
    idle_timeout: Duration,
}

impl Server {
    /// Binds the UDP port, starts this server's Raft node over the store (which
    /// applies what the store missed) and restores the ledger from the store.
    pub async fn bind(params: ServerParams) -> Result<Server, Error> {
        let peers = (!params.cluster.is_empty())
            .then(|| tally_cluster::net::PeerKeys::new(params.cluster.iter().map(|m| m.key)));
        let config =
            crate::tls::server_config(&params.identity, params.idle_timeout, peers.clone())?;
        let socket = std::net::UdpSocket::bind(params.listen).map_err(|cause| Error::Bind {
            what: "UDP",
            addr: params.listen,
            cause,
        })?;
        let endpoint = quinn::Endpoint::new(
            crate::tls::endpoint_config(&params.identity),
            Some(config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|cause| Error::Quic {
            addr: params.listen,
            cause,
        })?;
        let setup = NodeSetup::new(
            params.identity.clone(),
            endpoint.clone(),
            params.cluster.clone(),
        )
        .joining(params.join_cluster);
        // A store that cannot be written (served from a copy) still has its log applied
        // to it first, so that the ledger restores every lease that was acknowledged;
        // the node is stopped again by the disk, which starts broken.
        let node = match setup.start(&params.store).await {
            // A store that can be written whose log cannot is a fault to fix first.
            Err(e) if params.store.fault().is_none() => return Err(Error::Store(e)),
            node => node,
        };
        let settings = crate::ledger::LedgerSettings {
            default_ttl: params.lease_ttl,
            remove_holdoff: params.remove_holdoff,
        };
        let bundles: Vec<_> = params.bundles.iter().map(|b| b.bundle.clone()).collect();
        let mut ledger = Ledger::new(settings, &bundles);
        let start = now();
        ledger.set_policy(start, params.policy);
        // A cluster member restores its ledger when it takes the lead (see
        // `ledger_task`); until then it only reads the clock mark and says it started.
        let writable = node
            .as_ref()
            .ok()
            .filter(|_| params.store.fault().is_none() && !setup.is_cluster());
        let startup = restore(&mut ledger, &params.store, writable, &bundles, start).await?;
        let (tx, rx) = LedgerHandle::channel();
        let (role_tx, role) = watch::channel(match setup.is_cluster() {
            false => Role::Leading,
            true => Role::Following { leader: None },
        });
        let shared = Arc::new(Shared {
            role,
            node: setup.slot(),
            peers,
            members: RwLock::new(params.cluster),
            ledger: tx,
            key: params.identity,
            bundles: RwLock::new(Arc::new(params.bundles)),
            heartbeat_secs: params.heartbeat.as_secs().max(1),
            demo: params.demo,
            next_conn: AtomicU64::new(1),
            reloads: Reloads::new(params.reloader),
            admin_token: params.admin_token,
            status_needs_token: params.status_needs_token,
            next_waiter: AtomicU64::new(1),
            remove_holdoff: params.remove_holdoff,
            shutdown: tokio::sync::Notify::new(),
            reports: Reports::new(params.reports),
            metrics: Arc::new(Metrics::default()),
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
            Some(addr) => Some(bind_http(addr)?),
            None => None,
        };
        Ok(Server {
            endpoint,
            shared,
            ledger_rx: rx,
            ledger,
            store: params.store,
            node,
            setup,
            role: role_tx,
            reload_signal: params.reload_signal,
            startup,
            http,
            idle_timeout: params.idle_timeout,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.endpoint.local_addr().map_err(|cause| Error::Io {
            what: "the address the server is bound to".into(),
            cause,
        })
    }

    /// The operations endpoint's address, if it has one.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` completes, then stops the ledger (flushing the store)
    /// before closing connections, so that closing them does not release their leases:
    /// leases outlive a restart.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let Server {
            endpoint,
            shared,
            ledger_rx,
            ledger,
            store,
            node,
            setup,
            role,
            reload_signal,
            startup,
            http,
            idle_timeout,
        } = self;
        let ledger_task = tokio::spawn(run_ledger(
            ledger,
            (store, node, setup, role),
            ledger_rx,
            startup,
            (shared.metrics.clone(), idle_timeout),
        ));
        // Every task the server spawns is owned here and ended at the stop: the
        // helpers when `stopping` turns true, the connection tasks once the endpoint
        // closed.
        let (stopping, stop_rx) = watch::channel(false);
        let mut helpers = spawn_helpers(&shared, http, reload_signal, stop_rx);
        let mut connections = JoinSet::new();
        tokio::select! {
            _ = accept(endpoint.clone(), shared.clone(), &mut connections) => {}
            _ = shutdown => info!("shutting down"),
            _ = shared.shutdown.notified() => info!("shutting down on an admin request"),
        }
        // Helpers first: a scheduled report or a reload under way finishes (they stop
        // only between runs), and the HTTP endpoint shuts down gracefully.
        let _ = stopping.send(true);
        join_all(&mut helpers, HELPERS_STOP).await;
        stop(&shared).await;
        endpoint.close(0u32.into(), b"server shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        join_all(&mut connections, Duration::from_secs(2)).await;
        let _ = ledger_task.await;
        info!("stopped; leases are kept in the store");
        Ok(())
    }
}

/// The operations endpoint's listener on `addr`.
fn bind_http(addr: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    let bind = |cause| Error::Bind {
        what: "the HTTP endpoint on",
        addr,
        cause,
    };
    let std_listener = std::net::TcpListener::bind(addr).map_err(bind)?;
    std_listener.set_nonblocking(true).map_err(bind)?;
    tokio::net::TcpListener::from_std(std_listener).map_err(bind)
}

/// Restores the ledger from the store: the clock mark (a clock moved back is said and
/// journaled), the leases with the deadlines they had, made durable (through `node`'s
/// log, when the store can be written) before serving; returns the start's journal
/// events.
pub(crate) async fn restore(
    ledger: &mut Ledger,
    store: &Store,
    node: Option<&Node>,
    bundles: &[tally_protocol::bundle::Bundle],
    start: crate::ledger::Now,
) -> Result<Vec<UsageEvent>, StoreError> {
    let mut startup = vec![UsageEvent::DaemonStarted {
        version: env!("CARGO_PKG_VERSION").to_string(),
    }];
    startup.extend(bundles.iter().map(|b| UsageEvent::BundleLoaded {
        bundle: b.id.clone(),
    }));
    startup.extend(journal::bundles_at_start(bundles));
    if let Some(t) = store.load_clock()? {
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
    let (records, unreadable) = store.load_leases()?;
    for bad in &unreadable {
        warn!(key = ?bad.key, error = %bad.error, "lease record in the store could not be read; left in place");
    }
    let restored = records.len();
    // A restored lease keeps the deadline it had: its stored end if an earlier run
    // restored it already, else its TTL from the last moment the previous run is
    // known to have been alive.
    let facts = crate::ledger::RestoreFacts {
        detached: store.load_detached()?,
        alive: store
            .load_clock()?
            .map(|t| (t, Duration::from_secs(CLOCK_SAVE_SECS))),
    };
    ledger.restore_with(now(), records, &facts);
    // Removal hold-offs keep running across the restart: the removed holder's retry
    // must not take the seat meant for the next in line.
    ledger.restore_holdoffs(now(), store.load_holdoffs()?);
    // Named users' places too: a restart must not free a place the vendor's change
    // period still holds.
    ledger.restore_named_seats(now(), store.load_named()?);
    // So do the queues: a waiter asking again gets the place it had.
    ledger.restore_queue(now(), store.load_queue()?);
    let detachments = ledger.take_detachments();
    if let (false, Some(node)) = (detachments.is_empty(), node) {
        // Durable before serving: a crash right after this start must not let the
        // next start compute a later end from a newer clock mark.
        let mut batch = StoreBatch::new(start.wall);
        batch.detached = detachments.iter().map(|&change| change.into()).collect();
        crate::consensus::propose(node, batch, store.path()).await?;
    }
    if restored > 0 {
        info!(
            leases = restored,
            "restored leases from the store; holders re-attach by heartbeat"
        );
    }
    Ok(startup)
}

/// How long the stop waits for the helper tasks (a scheduled export under way, the
/// HTTP endpoint's open requests) before it aborts them.
const HELPERS_STOP: Duration = Duration::from_secs(5);

/// Waits (bounded) for every task in `tasks` to end, then aborts what is left.
async fn join_all(tasks: &mut JoinSet<()>, bound: Duration) {
    let all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(bound, all).await.is_err() {
        debug!(
            left = tasks.len(),
            "tasks still running at the stop; aborted"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Starts the tasks around the ledger: the uploader, the operations endpoint, the
/// scheduled reports and the reloads on SIGHUP; each ends when `stop` turns true (the
/// reports and reloads between runs, never in the middle of one).
fn spawn_helpers(
    shared: &Arc<Shared>,
    http: Option<tokio::net::TcpListener>,
    reload_signal: Option<mpsc::Receiver<()>>,
    stop: watch::Receiver<bool>,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    let stopped = |mut stop: watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let reports = &shared.reports;
    if let Some(uploader) = reports.settings.uploader.clone() {
        let upload = crate::upload::run(uploader, reports.upload_wake.clone());
        let stop = stopped(stop.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = upload => {}
                _ = stop => {}
            }
        });
    }
    if let Some(listener) = http {
        let ops = OpsHandle::new(shared.clone());
        let hosts = shared.admission.limits().http_hosts.clone();
        let stop = stopped(stop.clone());
        tasks.spawn(async move {
            if let Err(e) = crate::http::serve(listener, ops, hosts, stop).await {
                warn!(error = %e, "the HTTP endpoint stopped");
            }
        });
    }
    if let (Some(_), Some(every)) = (&reports.settings.spool, reports.settings.interval) {
        let shared = shared.clone();
        let mut stop = stop.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                match shared.export_to_spool().await {
                    Ok(Some(path)) => info!(path = %path.display(), "usage report written"),
                    Ok(None) => {}
                    Err(e) => warn!("scheduled usage report failed: {e}"),
                }
            }
        });
    }
    if let Some(mut signal) = reload_signal {
        let shared = shared.clone();
        let mut stop = stop.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    received = signal.recv() => if received.is_none() { return },
                    _ = stop.wait_for(|s| *s) => return,
                }
                // Logged by `reload`, the same way as an admin reload.
                shared.reload().await;
            }
        });
    }
    tasks
}

/// Accepts connections as the admission limits allow, a task for each.
async fn accept(endpoint: quinn::Endpoint, shared: Arc<Shared>, tasks: &mut JoinSet<()>) {
    while let Some(incoming) = endpoint.accept().await {
        // Ended connections' tasks are reaped as new ones come, so the set stays small.
        while tasks.try_join_next().is_some() {}
        let remote = incoming.remote_address();
        match shared.admission.admit(
            remote.ip(),
            incoming.remote_address_validated(),
            incoming.may_retry(),
        ) {
            Verdict::Accept(permit) => {
                let conn = ConnId(shared.next_conn.fetch_add(1, Ordering::Relaxed));
                tasks.spawn(serve_connection(
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

/// The stop before the connections close: the last report, the ledger task's final
/// flush, then (bounded) the answers still on their way.
async fn stop(shared: &Shared) {
    // The last report segment, so a stop loses nothing the vendor should see.
    if shared.reports.settings.spool.is_some() {
        let _ = shared.ledger.journal(UsageEvent::DaemonStopped).await;
        match shared.export_to_spool().await {
            Ok(Some(path)) => info!(path = %path.display(), "final usage report written"),
            Ok(None) => {}
            Err(e) => warn!("final usage report failed: {e}"),
        }
    }
    let _ = shared.ledger.shutdown().await;
    // The ledger answered every grant its final flush made durable; let the streams
    // deliver those answers (and any "shutting down") before the connections close,
    // or a client granted a moment before the stop never hears of its seat.
    let drained = tokio::time::Instant::now() + Duration::from_secs(2);
    while shared.answering.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < drained {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
