//! The ledger task: the one task that owns the [`Ledger`] and the store. It takes
//! requests in batches, so all grants of a batch share one flush (group commit), and it
//! answers a grant only after the flush that covers it: a client never hears "granted"
//! for a seat the store could lose.

use crate::clock::{now, StallWatch};
use crate::commit::{Answer, Commit, Owed, Replies};
use crate::consensus::{self, Role};
use crate::consensus::{Node, NodeSetup};
use crate::disk::{Disk, DiskError, Flush, Places};
use crate::error::Error;
use crate::journal::{Exported, ReportIdentity};
use crate::ledger::{Checkout, ConnId, Event, FreshLease, Ledger, Now, WaiterId};
use crate::metrics::Metrics;
use crate::reports::export;
use crate::store::{Store, StoreError};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tally_config::Policy;
use tally_protocol::lease::{LeaseId, LeaseRecord};
use tally_protocol::observed::ClientFacts;
use tally_protocol::replicate::Compaction;
use tally_protocol::report::UsageEvent;
use tally_protocol::time::UnixTime;
use tally_protocol::wire::*;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

/// Most requests the ledger task takes into one batch (one flush).
const MAX_BATCH: usize = 256;
/// Queue of requests waiting for the ledger task; when full, connection tasks wait,
/// which pushes back on clients through QUIC flow control.
const LEDGER_QUEUE: usize = 4096;

/// A request to the ledger task; built only by [`LedgerHandle`].
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
        facts: Option<ClientFacts>,
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
        /// Boxed: the policy is the largest thing a command carries.
        policy: Box<Policy>,
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
        reply: oneshot::Sender<Result<Exported, Error>>,
    },
}

/// The ledger task has stopped (the server is shutting down), or the requester stopped
/// waiting for its answer: either way there is no answer to give.
#[derive(Debug)]
pub(crate) struct NoAnswer;

/// The way to the ledger task: one typed call per request, each sending its
/// [`Command`] and waiting for the answer. Cloned into every connection task.
#[derive(Clone)]
pub(crate) struct LedgerHandle(mpsc::Sender<Command>);

/// What the ledger task reads its requests from (see [`LedgerHandle::channel`]).
pub(crate) struct Inbox(mpsc::Receiver<Command>);

impl LedgerHandle {
    /// A handle and the inbox the ledger task reads; the queue is bounded, so a busy
    /// ledger task pushes back on clients through QUIC flow control.
    pub(crate) fn channel() -> (LedgerHandle, Inbox) {
        let (tx, rx) = mpsc::channel(LEDGER_QUEUE);
        (LedgerHandle(tx), Inbox(rx))
    }

    /// Sends a command that has no answer.
    async fn tell(&self, command: Command) -> Result<(), NoAnswer> {
        self.0.send(command).await.map_err(|_| NoAnswer)
    }

    /// Sends a command and waits for its answer.
    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NoAnswer> {
        let (reply, rx) = oneshot::channel();
        self.tell(command(reply)).await?;
        rx.await.map_err(|_| NoAnswer)
    }

    /// A checkout, granted, denied or (queued) waited for; a requester that stops
    /// waiting (`abandoned` completes) leaves the queue at once, instead of holding its
    /// place, and later a seat nobody would use, until its timeout. `facts`: what the
    /// client reported about where it runs (`None` from a client too old to).
    pub(crate) async fn checkout(
        &self,
        (conn, holder): (ConnId, ClientIdentity),
        (request, facts): (CheckoutRequest, Option<ClientFacts>),
        (fresh, waiter): (FreshLease, WaiterId),
        abandoned: impl std::future::Future<Output = ()>,
    ) -> Result<Result<LeaseRecord, DenialReason>, NoAnswer> {
        let (reply, rx) = oneshot::channel();
        self.tell(Command::Checkout {
            conn,
            holder,
            request,
            facts,
            fresh,
            waiter,
            reply,
        })
        .await?;
        tokio::select! {
            answer = rx => answer.map_err(|_| NoAnswer),
            _ = abandoned => {
                let _ = self.tell(Command::CancelWait { waiter }).await;
                Err(NoAnswer)
            }
        }
    }

    /// A heartbeat for `leases` over connection `conn` (re-attaching them to it).
    pub(crate) async fn heartbeat(
        &self,
        conn: ConnId,
        leases: Vec<LeaseRef>,
    ) -> Result<Vec<LeaseState>, NoAnswer> {
        self.ask(|reply| Command::Heartbeat {
            conn,
            leases,
            reply,
        })
        .await
    }

    /// Releases `leases`; for each, whether it was held.
    pub(crate) async fn checkin(&self, leases: Vec<LeaseRef>) -> Result<Vec<bool>, NoAnswer> {
        self.ask(|reply| Command::Checkin { leases, reply }).await
    }

    /// The features, their seats and holders.
    pub(crate) async fn status(&self) -> Result<Vec<FeatureStatus>, NoAnswer> {
        self.ask(|reply| Command::Status { reply }).await
    }

    /// Removes a lease (admin); whether it was held.
    pub(crate) async fn remove(&self, lease: LeaseId) -> Result<bool, NoAnswer> {
        self.ask(|reply| Command::Remove { lease, reply }).await
    }

    /// The next usage report, durable with the batch it was built in.
    pub(crate) async fn export(
        &self,
        identity: Box<ReportIdentity>,
        retention: Duration,
    ) -> Result<Result<Exported, Error>, NoAnswer> {
        self.ask(|reply| Command::Export {
            identity,
            retention,
            reply,
        })
        .await
    }

    /// Swaps the bundles' terms and the policy (leases untouched), journaling the
    /// served set's changes; returns once the ledger task has done it.
    pub(crate) async fn reload(
        &self,
        bundles: Vec<tally_protocol::bundle::Bundle>,
        changes: Vec<UsageEvent>,
        policy: Policy,
    ) -> Result<(), NoAnswer> {
        self.ask(|done| Command::Reload {
            bundles,
            changes,
            policy: Box::new(policy),
            done,
        })
        .await
    }

    /// Adds an event to the journal.
    pub(crate) async fn journal(&self, event: UsageEvent) -> Result<(), NoAnswer> {
        self.tell(Command::Journal { event }).await
    }

    /// A grant whose answer did not reach its client: the seat goes back at once.
    pub(crate) async fn unclaimed(&self, lease: LeaseId) -> Result<(), NoAnswer> {
        self.tell(Command::Unclaimed { lease }).await
    }

    /// A connection closed (`timed_out`: by the QUIC idle timeout).
    pub(crate) async fn closed(&self, conn: ConnId, timed_out: bool) -> Result<(), NoAnswer> {
        self.tell(Command::Closed { conn, timed_out }).await
    }

    /// Stops the ledger task after its final flush; returns once it is done.
    pub(crate) async fn shutdown(&self) -> Result<(), NoAnswer> {
        self.ask(|done| Command::Shutdown { done }).await
    }
}

/// Answers a checkout.
type GrantTx = oneshot::Sender<Result<LeaseRecord, DenialReason>>;
/// Answers a heartbeat.
type StatesTx = oneshot::Sender<Vec<LeaseState>>;
/// Answers an export.
type ExportTx = oneshot::Sender<Result<Exported, Error>>;

/// Builds a report against the store, on the blocking pool ([`export`]; a test may put
/// a gate in front of it to watch the ledger task serve while an export runs). It
/// writes nothing: the chain's move goes through the log with the next proposal.
type Exporter =
    Arc<dyn Fn(&Store, &ReportIdentity, (UnixTime, u64)) -> Result<Exported, Error> + Send + Sync>;

/// An export asked for: who signs, at what time, of the journal up to which entry (the
/// last one written when it was asked for), keeping how much, and whom to answer.
struct ExportJob {
    identity: Box<ReportIdentity>,
    at: UnixTime,
    upto: u64,
    retention: Duration,
    reply: ExportTx,
    /// The proposal that carries the journal up to `upto` (and the chain state the
    /// export before it moved): the export starts once it is in the store.
    needs: u64,
}

/// The export running on the blocking pool (one at a time: each moves the report
/// chain's state, so the next one starts from it).
struct Exporting {
    reply: ExportTx,
    /// When it was asked for, and how much of the journal it keeps.
    at: UnixTime,
    retention: Duration,
    job: tokio::task::JoinHandle<Result<Exported, Error>>,
}

/// The reply handles the commit pipeline carries for the ledger task.
struct Channels;

impl Replies for Channels {
    type Grant = GrantTx;
    type Heartbeat = StatesTx;
    type Export = ExportTx;
}

/// A reply a batch decided: sent at once, or (grants) owed to the commit pipeline.
enum Pending {
    Grant(GrantTx, Result<LeaseRecord, DenialReason>),
    Heartbeat(StatesTx, Vec<LeaseState>),
    /// A heartbeat that gave lapsed leases back: answered once they are durable.
    Regranted(StatesTx, Vec<(LeaseId, LeaseState)>, Vec<LeaseRecord>),
    Checkin(oneshot::Sender<Vec<bool>>, Vec<bool>),
    Status(oneshot::Sender<Vec<FeatureStatus>>, Vec<FeatureStatus>),
}

/// What one batch decided.
struct Decided {
    events: Vec<Event>,
    pending: Vec<Pending>,
    exports: Vec<(Box<ReportIdentity>, Duration, ExportTx)>,
    shutdown: Option<oneshot::Sender<()>>,
}

/// The ledger task: owns the ledger and the store. A short loop: a batch of requests,
/// a deadline, a flush or an export that ended, or the time to reopen a broken store.
///
/// A cluster member serves in terms: while another member leads it answers nothing
/// (its clients are sent to the leader at hello); when it takes the lead, it restores
/// a ledger from its store, which holds the whole log by then, giving every lease one
/// TTL from now (its holder's heartbeats went to the old leader), and serves until it
/// loses the lead or stops.
pub(crate) async fn run_ledger(
    ledger: Ledger,
    (store, node, setup, role): (
        Store,
        Result<Node, StoreError>,
        NodeSetup,
        watch::Sender<Role>,
    ),
    Inbox(mut rx): Inbox,
    startup: Vec<UsageEvent>,
    (metrics, idle_timeout): (Arc<Metrics>, Duration),
) {
    let disk = Disk::new(store, node, setup.clone(), metrics.clone());
    let mut task = LedgerTask::new(ledger, disk, startup, metrics, idle_timeout);
    if !setup.is_cluster() {
        serve(&mut task, &mut rx).await;
        return;
    }
    loop {
        role.send_replace(Role::Following { leader: None });
        if let Some(done) = follow(&mut task, &mut rx, &setup, &role).await {
            task.stop(None, None).await;
            if let Some(done) = done {
                let _ = done.send(());
            }
            return;
        }
        if let Err(e) = task.take_over().await {
            warn!(error = %e, "could not take the lead: the store cannot be read");
            // Not at once again: the store's fault does not pass that fast.
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        role.send_replace(Role::Leading);
        info!("leading the cluster: granting");
        match serve(&mut task, &mut rx).await {
            End::Stopped => return,
            End::LostLead => info!("no longer leading the cluster: clients are sent to the leader"),
        }
    }
}

/// Waits, as a member that does not lead, until this one leads with its log applied;
/// requests that come meanwhile get no answer (the connections that sent them are
/// being closed). Returns `Some` to stop (with whom to tell, for a shutdown request).
async fn follow(
    task: &mut LedgerTask,
    rx: &mut mpsc::Receiver<Command>,
    setup: &NodeSetup,
    role: &watch::Sender<Role>,
) -> Option<Option<oneshot::Sender<()>>> {
    loop {
        let node = task.disk.node().cloned();
        let retry_at = task.disk.retry_at();
        let mut metrics = node.as_ref().map(|n| n.metrics());
        // Never itself: a member that believes it leads but is not confirmed by a
        // majority (cut off from it) must not send clients back to itself.
        let leader = node
            .as_ref()
            .and_then(|n| consensus::leader_addr(n, setup.id()));
        role.send_if_modified(|r| {
            let now = Role::Following {
                leader: leader.clone(),
            };
            (*r != now).then(|| *r = now).is_some()
        });
        let changed = async {
            match metrics.as_mut() {
                Some(m) => {
                    let _ = m.changed().await;
                }
                None => std::future::pending().await,
            }
        };
        let lead = async {
            match &node {
                Some(n) => consensus::wait_to_lead(n, setup.id()).await,
                None => std::future::pending().await,
            }
        };
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            command = rx.recv() => match command {
                None => return Some(None),
                Some(Command::Shutdown { done }) => return Some(Some(done)),
                // Kept for the term this member may lead: the bundles and policy an
                // admin reloaded here are served then. Their changes are journaled by
                // the leader's own reload (a member that does not lead writes nothing).
                Some(Command::Reload { bundles, policy, done, .. }) => {
                    let at = now();
                    task.ledger.reload(at, &bundles);
                    task.ledger.set_policy(at, *policy);
                    let _ = done.send(());
                }
                Some(_) => {}
            },
            _ = lead => {
                // It leads by its own metrics; a leader cut off from the majority
                // believes that too, so the majority must confirm it first.
                if let Some(node) = &node {
                    if consensus::confirm_lead(node).await {
                        return None;
                    }
                    tokio::time::sleep(consensus::LEAD_CHECK).await;
                }
            }
            _ = changed => {}
            _ = retry => {
                task.disk.try_recover(None).await;
            }
        }
    }
}

/// How a term of serving ended.
enum End {
    /// The server stops (or the inbox closed).
    Stopped,
    /// This member no longer leads its cluster.
    LostLead,
}

/// The loop of [`run_ledger`].
async fn serve(task: &mut LedgerTask, rx: &mut mpsc::Receiver<Command>) -> End {
    // One watch for the whole term (its lead checks run on their own clock).
    let mut lost_lead = std::pin::pin!(task.disk.lost_lead());
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut flushing: Option<Flush> = None;
    let mut exporting: Option<Exporting> = None;
    loop {
        // Woken at least every tick, so that a stall of the daemon shows as a gap.
        let tick = task.stall.next_tick();
        let deadline = task.ledger.next_deadline().map_or(tick, |d| d.min(tick));
        // A broken store is reopened between flushes and exports (sled's files stay
        // locked while either holds the store), never under one.
        let idle = flushing.is_none() && exporting.is_none();
        let retry_at = task.disk.retry_at().filter(|_| idle);
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        let flushed = async {
            match flushing.as_mut() {
                Some(f) => f.await.unwrap_or_else(|e| Err(join_error(e))),
                None => std::future::pending().await,
            }
        };
        let exported = async {
            match exporting.as_mut() {
                Some(e) => (&mut e.job).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            n = rx.recv_many(&mut batch, MAX_BATCH) => if n == 0 { return End::Stopped },
            _ = &mut lost_lead => {
                task.end_term(flushing.take(), exporting.take()).await;
                return End::LostLead;
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {}
            result = flushed => {
                // A proposal not committed in time may still be: the ledger (which
                // rolled its changes back) and the log may disagree, so the term ends
                // here, and the next one restores from the store once the log is
                // settled (`consensus::wait_to_lead`).
                let undecided = matches!(result, Err(StoreError::NoMajority))
                    && task.disk.is_cluster();
                task.flushed(result);
                if undecided {
                    warn!(
                        "a write was not committed in time: this server cannot reach a \
                         majority of its cluster; it stops granting until it can"
                    );
                    task.end_term(None, exporting.take()).await;
                    return End::LostLead;
                }
                flushing = task.flush_if_owed();
                if exporting.is_none() {
                    exporting = task.start_export();
                }
                continue;
            }
            result = exported => {
                let done = exporting.take().expect("an export ran");
                task.exported(done, result);
                exporting = task.start_export();
                if flushing.is_none() {
                    flushing = task.flush_if_owed();
                }
                continue;
            }
            _ = retry => {
                task.disk.try_recover(Some(&task.ledger)).await;
                continue;
            }
        }
        let now = now();
        let decided = task.decide(now, batch.drain(..));
        if task
            .end_batch(now, decided, (&mut flushing, &mut exporting))
            .await
        {
            return End::Stopped;
        }
    }
}

/// The ledger task's state: the ledger decides, the commit pipeline says what to
/// write and whom to answer, the disk does the IO.
struct LedgerTask {
    ledger: Ledger,
    disk: Disk,
    commit: Commit<Channels>,
    /// Replies owed to checkouts waiting in a queue.
    waiting: HashMap<WaiterId, GrantTx>,
    /// What the waiters of `waiting` reported about where they run (for the journal's
    /// [`UsageEvent::Session`] at their grant).
    waiting_facts: HashMap<WaiterId, ClientFacts>,
    /// Exports asked for and not started yet, in order.
    exports: std::collections::VecDeque<ExportJob>,
    exporter: Exporter,
    stall: StallWatch,
    metrics: Arc<Metrics>,
}

impl LedgerTask {
    fn new(
        ledger: Ledger,
        disk: Disk,
        startup: Vec<UsageEvent>,
        metrics: Arc<Metrics>,
        idle_timeout: Duration,
    ) -> LedgerTask {
        let next_seq = match disk.store().map(Store::next_journal_seq) {
            Some(Ok(n)) => n,
            Some(Err(e)) => {
                warn!(error = %e, "cannot read the journal; usage events start a new range");
                1
            }
            None => 1,
        };
        let mut commit = Commit::new(next_seq, ledger.clock_high_water());
        let start = now().wall;
        for event in startup {
            commit.record(start, event);
        }
        LedgerTask {
            disk,
            ledger,
            commit,
            waiting: HashMap::new(),
            waiting_facts: HashMap::new(),
            exports: Default::default(),
            exporter: Arc::new(|store, identity, at| {
                export(store, identity, at).map_err(Error::from)
            }),
            stall: StallWatch::new(idle_timeout),
            metrics,
        }
    }

    /// Decides a batch of commands at one `now`.
    fn decide(&mut self, now: Now, commands: impl Iterator<Item = Command>) -> Decided {
        // Before anything else of this batch: connections that timed out while the
        // daemon stood still are its own fault, not their holders'.
        self.stall.observe(now, &mut self.ledger);
        self.ledger.observe_clock(now);
        // The ledger refuses new grants while the store cannot be written.
        match self.disk.outage() {
            Some((since, what)) => self.ledger.storage_unavailable(since, what),
            None => self.ledger.storage_available(),
        }
        let mut events = self.ledger.expire(now);
        events.extend(self.ledger.release_unclaimed(now));
        let mut d = Decided {
            events,
            pending: Vec::new(),
            exports: Vec::new(),
            shutdown: None,
        };
        for command in commands {
            self.command(now, command, &mut d);
        }
        self.waiter_outcomes(now, &mut d);
        d
    }

    fn command(&mut self, now: Now, command: Command, d: &mut Decided) {
        let ledger = &mut self.ledger;
        match command {
            Command::Checkout {
                conn,
                holder,
                request,
                facts,
                fresh,
                waiter,
                reply,
            } => self.checkout(
                now,
                (conn, holder, request),
                facts,
                (fresh, waiter),
                reply,
                d,
            ),
            Command::Remove { lease, reply } => {
                let removed = ledger.remove_lease(now, lease);
                let _ = reply.send(removed.is_some());
                d.events.extend(removed);
            }
            Command::Heartbeat {
                conn,
                leases,
                reply,
            } => {
                let states = ledger.heartbeat(now, conn, &leases);
                let regranted = ledger.take_regranted();
                if regranted.is_empty() {
                    d.pending.push(Pending::Heartbeat(reply, states));
                } else {
                    // A lapsed lease given back is a grant: stored before the
                    // holder hears it is active again.
                    for record in &regranted {
                        info!(lease = %record.id, feature = %record.feature, holder = %record.holder, "lapsed lease re-attached");
                        d.events.push(Event::Granted(record.clone()));
                    }
                    let states = leases.iter().map(|r| r.id).zip(states).collect();
                    d.pending.push(Pending::Regranted(reply, states, regranted));
                }
            }
            Command::Checkin { leases, reply } => {
                let (released, ev) = ledger.checkin(now, &leases);
                d.events.extend(ev);
                d.pending.push(Pending::Checkin(reply, released));
            }
            Command::Status { reply } => d
                .pending
                .push(Pending::Status(reply, ledger.status(now.wall))),
            Command::Closed { conn, timed_out } => {
                if timed_out && self.stall.recent(now) {
                    ledger.connection_lost(now, conn);
                } else if timed_out {
                    d.events.extend(ledger.connection_timed_out(now, conn));
                } else {
                    d.events.extend(ledger.connection_closed(now, conn));
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
                self.commit.reloaded(now.wall, &bundles, changes);
                ledger.reload(now, &bundles);
                self.metrics.set_licensed(ledger.feature_names());
                ledger.set_policy(now, *policy);
                let _ = done.send(());
            }
            Command::Shutdown { done } => d.shutdown = Some(done),
            Command::Journal { event } => self.commit.record(now.wall, event),
            Command::Export {
                identity,
                retention,
                reply,
            } => d.exports.push((identity, retention, reply)),
        }
    }

    /// A checkout: granted, denied (and journaled) or queued.
    fn checkout(
        &mut self,
        now: Now,
        (conn, holder, request): (ConnId, ClientIdentity, CheckoutRequest),
        facts: Option<ClientFacts>,
        (fresh, waiter): (FreshLease, WaiterId),
        reply: GrantTx,
        d: &mut Decided,
    ) {
        // While the store cannot be written the ledger refuses (see `decide`).
        let decided = self.ledger.checkout_observed(
            now,
            conn,
            &holder,
            &request,
            facts.as_ref(),
            fresh,
            waiter,
        );
        match decided {
            Checkout::Granted(granted) => {
                let (record, event) = *granted;
                if let Some(facts) = &facts {
                    self.commit.observed(record.id, facts);
                }
                d.events.push(event);
                d.pending.push(Pending::Grant(reply, Ok(record)));
            }
            Checkout::Denied(reason) => {
                info!(feature = %request.feature, holder = %holder, %reason, "denied");
                self.metrics
                    .denied(now.wall, &request.feature, &holder, &reason);
                let counted_as = self.metrics.counted_as(&request.feature);
                self.commit.denied(now.wall, counted_as, &reason, &holder);
                d.pending.push(Pending::Grant(reply, Err(reason)));
            }
            Checkout::Queued { position } => {
                info!(feature = %request.feature, holder = %holder, position, "queued");
                self.commit.queued(now.wall, &request.feature, &holder);
                self.waiting.insert(waiter, reply);
                if let Some(facts) = facts {
                    self.waiting_facts.insert(waiter, facts);
                }
            }
        }
    }

    /// Waits that ended in this batch: granted, timed out, or cancelled.
    fn waiter_outcomes(&mut self, now: Now, d: &mut Decided) {
        for outcome in self.ledger.take_waiter_outcomes() {
            let reply = self.waiting.remove(&outcome.waiter);
            if let (Some(facts), Some(Event::Granted(record))) =
                (self.waiting_facts.remove(&outcome.waiter), &outcome.event)
            {
                self.commit.observed(record.id, &facts);
            }
            d.events.extend(outcome.event);
            let Some(reply) = reply else {
                // A grant with nobody to answer is stored (its event above) and then
                // released at once, never left to a TTL.
                if let Some(Ok(record)) = &outcome.result {
                    self.ledger.unclaimed(record.id);
                }
                continue;
            };
            if let Some(result) = outcome.result {
                if let Err(reason) = &result {
                    info!(%reason, "wait ended");
                    self.commit.wait_denied(now.wall, reason);
                }
                d.pending.push(Pending::Grant(reply, result));
            }
        }
    }

    /// Writes the batch, answers what needs no flush, owes the rest to the pipeline and
    /// starts a flush if one is owed; true once stopped (after the final flush).
    async fn end_batch(
        &mut self,
        now: Now,
        d: Decided,
        (flushing, exporting): (&mut Option<Flush>, &mut Option<Exporting>),
    ) -> bool {
        let Decided {
            events,
            pending,
            exports,
            shutdown,
        } = d;
        let seats = self.ledger.take_seat_changes();
        self.commit.batch_events(now.wall, &events, &seats);
        let detachments = self.ledger.take_detachments();
        if shutdown.is_some() {
            // Waiters are told the server is shutting down and go: their places go
            // with them (a place kept after a stop would hold seats for nobody).
            self.ledger.give_up_places();
        }
        let places = Places {
            holdoffs: self.ledger.take_holdoffs(),
            queue: self.ledger.take_queue_changes(),
            named: self.ledger.take_named_seats(),
        };
        let changes = !events.is_empty()
            || !detachments.is_empty()
            || !places.holdoffs.is_empty()
            || !places.queue.is_empty()
            || !places.named.is_empty();
        let clock = self.ledger.clock_high_water();
        let (journal, clock) = self.commit.batch_write(changes, clock, shutdown.is_some());
        let written = self
            .disk
            .write(journal, (&events, &detachments, places), clock);
        self.commit.written(&written, clock);
        let failure = written.err();
        for event in &events {
            if !matches!(event, Event::Granted(_)) {
                log_event(event, true);
            }
        }
        // Exports see the journal up to this batch, and are built on the blocking pool
        // while the ledger task goes on serving (a large journal takes a while); each
        // answer comes back as the export's end and waits for the flush after it.
        for (identity, retention, reply) in exports {
            match &failure {
                Some(e) => drop(
                    self.commit
                        .owe(Owed::Export(reply, Err(Error::Disk(e.clone()))), None),
                ),
                None => self.exports.push_back(ExportJob {
                    identity,
                    at: now.wall,
                    upto: self.commit.last_seq(),
                    retention,
                    reply,
                    needs: self.disk.written_mark(),
                }),
            }
        }
        if exporting.is_none() {
            *exporting = self.start_export();
        }
        for p in pending {
            self.answer(p, failure.as_ref());
        }
        if let Some(done) = shutdown {
            self.stop(flushing.take(), exporting.take()).await;
            let _ = done.send(());
            return true;
        }
        if flushing.is_none() {
            *flushing = self.flush_if_owed();
        }
        if self.commit.journal_rolled_back(now.wall) {
            let _ = self
                .disk
                .write(self.commit.journal(), (&[], &[], Places::default()), None);
        }
        false
    }

    /// Starts the next export asked for, if any and if the store holds what it must
    /// see, on the blocking pool (call it when none runs). While the store cannot be
    /// written there is none: each export asked for is failed with the reason.
    fn start_export(&mut self) -> Option<Exporting> {
        while let Some(job) = self.exports.pop_front() {
            let Some(store) = self.disk.store().cloned() else {
                let why = Error::Disk(self.disk.fault().unwrap_or(DiskError::Closed));
                drop(self.commit.owe(Owed::Export(job.reply, Err(why)), None));
                continue;
            };
            if self.disk.applied() < job.needs {
                // Its journal is still on its way through the log: it starts when the
                // proposal carrying it ended (see `serve`).
                self.exports.push_front(job);
                return None;
            }
            let exporter = self.exporter.clone();
            let ExportJob {
                identity,
                at,
                upto,
                retention,
                reply,
                needs: _,
            } = job;
            let job = tokio::task::spawn_blocking(move || exporter(&store, &identity, (at, upto)));
            return Some(Exporting {
                reply,
                at,
                retention,
                job,
            });
        }
        None
    }

    /// An export ended: the chain's move (and the compaction it allows) goes into the
    /// next proposal, and the answer waits for it. The next export waits for it too.
    fn exported(
        &mut self,
        Exporting {
            reply,
            at,
            retention,
            ..
        }: Exporting,
        result: Result<Result<Exported, Error>, tokio::task::JoinError>,
    ) {
        let result = result.unwrap_or_else(|e| Err(Error::ExportStopped(e.to_string())));
        if let Ok(exported) = &result {
            let before = UnixTime(at.0.saturating_sub(retention.as_secs()));
            let compact = Compaction {
                upto: exported.state.last_event,
                before,
            };
            self.disk.write_report(exported.state.clone(), compact);
            let needs = self.disk.written_mark();
            for job in &mut self.exports {
                job.needs = job.needs.max(needs);
            }
        }
        drop(self.commit.owe(Owed::Export(reply, result), None));
    }

    /// Sends a reply that needs no flush; owes the others (grants) to the pipeline.
    /// Only grants wait for the disk: a checkin or reclaim lost to a crash comes back
    /// as a restored lease that expires on its TTL, costing nobody a seat for long.
    fn answer(&mut self, pending: Pending, failure: Option<&DiskError>) {
        let owed = match pending {
            Pending::Grant(reply, Ok(record)) => Owed::Grant(reply, record),
            Pending::Regranted(reply, states, records) => Owed::Regranted(reply, states, records),
            Pending::Grant(reply, denied) => return drop(reply.send(denied)),
            Pending::Heartbeat(reply, r) => return drop(reply.send(r)),
            Pending::Checkin(reply, r) => return drop(reply.send(r)),
            Pending::Status(reply, r) => return drop(reply.send(r)),
        };
        if let Some(answer) = self.commit.owe(owed, failure) {
            self.apply(answer);
        }
    }

    /// Does what the pipeline says with an answer it let go.
    fn apply(&mut self, answer: Answer<Channels>) {
        match answer {
            Answer::Granted(reply, record) => {
                log_event(&Event::Granted(record.clone()), true);
                if let Err(Ok(record)) = reply.send(Ok(record)) {
                    // Nobody is left to hear of it: the requester stopped waiting (or
                    // its connection closed) after the grant was decided.
                    self.ledger.unclaimed(record.id);
                }
            }
            Answer::NotRecorded(reply, record, what) => {
                self.ledger.rollback(record.id);
                let what = what.to_string();
                let _ = reply.send(Err(DenialReason::StorageUnavailable { what }));
            }
            Answer::States(reply, states, undone) => {
                for id in undone {
                    self.ledger.rollback(id);
                }
                let _ = reply.send(states);
            }
            Answer::Export(reply, result) => {
                let _ = reply.send(result);
            }
        }
    }

    /// Starts a flush if the pipeline owes one (call it when none runs). While the store
    /// is broken there is no flush, and the answers waiting for one are failed at once.
    fn flush_if_owed(&mut self) -> Option<Flush> {
        if !self.commit.flush_due() {
            return None;
        }
        match self.disk.start_flush() {
            Some(flush) => {
                self.commit.flush_started();
                Some(flush)
            }
            None => {
                for answer in self.commit.flush_refused(self.disk.fault()) {
                    self.apply(answer);
                }
                None
            }
        }
    }

    /// The running flush ended: the answers it covered go out (or are rolled back).
    fn flushed(&mut self, result: Result<(), StoreError>) {
        let result = self.disk.flushed(result);
        for answer in self.commit.flushed(result) {
            self.apply(answer);
        }
    }

    /// The final flush at a stop: a store that failed keeps nothing more (its backlog
    /// is lost with the process, as the log says).
    async fn stop(&mut self, running: Option<Flush>, exporting: Option<Exporting>) {
        // Exports asked for still end (and their chain state is in the final
        // proposal); each waits for the proposal carrying what it must see.
        let mut running = running;
        let mut exporting = exporting.or_else(|| self.start_export());
        loop {
            if let Some(mut e) = exporting.take() {
                let result = (&mut e.job).await;
                self.exported(e, result);
            } else if let Some(flush) = running.take() {
                let result = flush.await.unwrap_or_else(|e| Err(join_error(e)));
                self.flushed(result);
            } else if !self.exports.is_empty() && self.disk.store().is_some() {
                running = self.flush_if_owed().or_else(|| self.disk.start_flush());
                if running.is_none() {
                    break;
                }
            } else {
                break;
            }
            exporting = self.start_export();
        }
        let result = self.disk.close().await;
        if let Err(e) = &result {
            warn!(error = %e, "final flush failed");
        }
        for answer in self.commit.closed(result) {
            self.apply(answer);
        }
    }
}

impl LedgerTask {
    /// Ends a term as leader: the proposal under way ends (committed or not, it says),
    /// answers still owed are failed, waiting checkouts and exports are let go.
    async fn end_term(&mut self, running: Option<Flush>, exporting: Option<Exporting>) {
        if let Some(running) = running {
            let result = running.await.unwrap_or_else(|e| Err(join_error(e)));
            self.flushed(result);
        }
        let not_leader = DiskError::Store(Arc::new(StoreError::NotLeader { leader: None }));
        for answer in self.commit.flush_refused(Some(not_leader)) {
            self.apply(answer);
        }
        if let Some(e) = exporting {
            e.job.abort();
        }
        self.exports.clear();
        self.waiting.clear();
        self.waiting_facts.clear();
        self.disk.forget_pending();
    }

    /// Takes the lead: a new ledger (the same terms) restored from the store, which
    /// holds the whole log now; every lease gets one TTL from now. The journal goes on
    /// from the store's last entry.
    async fn take_over(&mut self) -> Result<(), StoreError> {
        let Some(store) = self.disk.store().cloned() else {
            return Err(StoreError::NotLeader { leader: None });
        };
        let mut ledger = self.ledger.successor();
        let start = now();
        if let Some(t) = store.load_clock()? {
            ledger.set_clock_high_water(t);
        }
        let (records, unreadable) = store.load_leases()?;
        for bad in &unreadable {
            warn!(key = ?bad.key, error = %bad.error, "lease record in the store could not be read; left in place");
        }
        // Every lease gets one TTL from now, whatever end an earlier term stored for
        // it: each term change closes every client connection, so holders re-attach
        // only after their reconnect backoff. (Keeping a stored end lost leases: a
        // leader that stepped down for a moment 50 s after taking over restored the
        // ends it had stored then, 10 s away, and holders still reconnecting lost their
        // seats. A single server's restart keeps stored ends: that is a crash loop's
        // bound.) The new ends are stored again by `restore_with`.
        let facts = crate::ledger::RestoreFacts {
            detached: Default::default(),
            alive: None,
        };
        let restored = records.len();
        ledger.restore_with(start, records, &facts);
        ledger.restore_holdoffs(start, store.load_holdoffs()?);
        ledger.restore_named_seats(start, store.load_named()?);
        ledger.restore_queue(start, store.load_queue()?);
        self.stall.restart(start.mono);
        self.ledger = ledger;
        self.commit = Commit::new(store.next_journal_seq()?, self.ledger.clock_high_water());
        self.metrics.set_licensed(self.ledger.feature_names());
        info!(leases = restored, "took the lead: leases restored from the replicated store; holders re-attach by heartbeat");
        Ok(())
    }
}

fn join_error(e: tokio::task::JoinError) -> StoreError {
    StoreError::Task(e)
}

/// Logs a ledger event; a grant only once it is durable.
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

#[cfg(test)]
mod tests {
    //! The ledger task with a real sled store in a temp dir.

    use super::*;
    use tally_protocol::keys::SecretKey;
    use tally_protocol::lease::LeaseSecret;

    /// How long the test waits for anything before it gives up (a bound, not a
    /// measurement: a slow machine is far faster than this).
    const PATIENCE: Duration = Duration::from_secs(60);

    fn ledger() -> Ledger {
        crate::ledger::Ledger::for_tests(5)
    }

    async fn checkout(ledger: &LedgerHandle, n: u64) -> LeaseRecord {
        let holder = ClientIdentity {
            user: "ann".into(),
            host: "ws1".into(),
            pid: 1,
            program: "p".into(),
            display: None,
        };
        let request = CheckoutRequest {
            feature: "solver".into(),
            count: 1,
            version: None,
            build_date: None,
            wait_secs: 0,
            borrow_secs: 0,
        };
        let fresh = FreshLease {
            id: LeaseId(n),
            secret: LeaseSecret([n as u8; 16]),
        };
        let asked = ledger.checkout(
            (ConnId(1), holder),
            (request, None),
            (fresh, WaiterId(n)),
            std::future::pending(),
        );
        let answer = tokio::time::timeout(PATIENCE, asked).await;
        answer
            .expect("the checkout was answered while the export ran")
            .map_err(|_| "no answer")
            .unwrap()
            .expect("granted")
    }

    /// An export held at its start (a gate in front of the real one) does not hold the
    /// ledger task: a checkout and a heartbeat asked for after it are answered before
    /// the export ends; the report covers the journal as it was when it was asked for,
    /// and comes back once the gate opens.
    #[tokio::test]
    async fn the_ledger_task_serves_while_an_export_runs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let endpoint = quinn::Endpoint::client((std::net::Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        let setup = NodeSetup::new(SecretKey::from_seed([3; 32]), endpoint, Vec::new());
        let node = setup.start(&store).await;
        let metrics = Arc::new(Metrics::default());
        let mut task = LedgerTask::new(
            ledger(),
            Disk::new(store, node, setup, metrics.clone()),
            Vec::new(),
            metrics,
            Duration::from_secs(15),
        );
        let order = Arc::new(std::sync::Mutex::new(Vec::<&str>::new()));
        let (started_tx, started) = oneshot::channel::<()>();
        let started_tx = std::sync::Mutex::new(Some(started_tx));
        let (open_gate, gate) = std::sync::mpsc::channel::<()>();
        let gate = std::sync::Mutex::new(gate);
        let seen = order.clone();
        task.exporter = Arc::new(move |store, identity, at| {
            seen.lock().unwrap().push("export started");
            if let Some(tx) = started_tx.lock().unwrap().take() {
                let _ = tx.send(());
            }
            // Bounded: a gate never opened fails the export, not the test run.
            gate.lock()
                .unwrap()
                .recv_timeout(PATIENCE)
                .map_err(|e| Error::ExportStopped(format!("gate: {e}")))?;
            let exported = export(store, identity, at).map_err(Error::from);
            seen.lock().unwrap().push("export ended");
            exported
        });
        let (ledger, inbox) = LedgerHandle::channel();
        let serving = tokio::spawn(async move {
            let (mut task, Inbox(mut rx)) = (task, inbox);
            serve(&mut task, &mut rx).await;
        });

        let first = checkout(&ledger, 1).await;
        let identity = Box::new(ReportIdentity {
            key: SecretKey::from_seed([7; 32]),
            host_fingerprint: "h".into(),
            customers: vec!["c".into()],
            bundle_ids: vec!["b1".into()],
        });
        let asked = ledger.clone();
        let exporting =
            tokio::spawn(async move { asked.export(identity, Duration::from_secs(3600)).await });
        tokio::time::timeout(PATIENCE, started)
            .await
            .expect("the export started")
            .unwrap();

        checkout(&ledger, 2).await;
        let lease = LeaseRef {
            id: first.id,
            secret: first.secret.clone(),
        };
        let states = tokio::time::timeout(PATIENCE, ledger.heartbeat(ConnId(1), vec![lease]))
            .await
            .expect("the heartbeat was answered while the export ran")
            .map_err(|_| "no answer")
            .unwrap();
        assert_eq!(states, vec![LeaseState::Active]);
        order
            .lock()
            .unwrap()
            .push("checkout and heartbeat answered");

        open_gate.send(()).unwrap();
        let exported = tokio::time::timeout(PATIENCE, exporting)
            .await
            .expect("the export ended")
            .unwrap()
            .map_err(|_| "no answer")
            .unwrap()
            .expect("exported");
        assert_eq!(
            *order.lock().unwrap(),
            [
                "export started",
                "checkout and heartbeat answered",
                "export ended"
            ]
        );
        assert_eq!(
            exported.events, 1,
            "the report covers the first grant, not the one decided while it ran"
        );
        ledger.shutdown().await.map_err(|_| "no answer").unwrap();
        serving.await.unwrap();
    }
}
