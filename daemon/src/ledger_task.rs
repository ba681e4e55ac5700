//! The ledger task: the one task that owns the [`Ledger`] and the store. It takes
//! requests in batches, so all grants of a batch share one flush (group commit), and it
//! answers a grant only after the flush that covers it: a client never hears "granted"
//! for a seat the store could lose.

use crate::clock::{now, StallWatch};
use crate::disk::Disk;
use crate::journal::{self, Exported, ReportIdentity};
use crate::ledger::{Checkout, ConnId, Event, FreshLease, Ledger, WaiterId};
use crate::metrics::Metrics;
use crate::reports::export;
use crate::store::Store;
use std::sync::Arc;
use std::time::Duration;
use tally_config::Policy;
use tally_protocol::lease::{LeaseId, LeaseRecord};
use tally_protocol::report::{JournalEntry, UsageEvent};
use tally_protocol::wire::*;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// Most requests the ledger task takes into one batch (one flush).
const MAX_BATCH: usize = 256;
/// Queue of requests waiting for the ledger task; when full, connection tasks wait,
/// which pushes back on clients through QUIC flow control.
const LEDGER_QUEUE: usize = 4096;
/// How often the clock mark (the last time the daemon is known to have been alive) is
/// written; a lease attached when the daemon died ends at the latest this long after
/// the mark plus its TTL.
pub(crate) const CLOCK_SAVE_SECS: u64 = 10;

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
    /// place, and later a seat nobody would use, until its timeout.
    pub(crate) async fn checkout(
        &self,
        (conn, holder): (ConnId, ClientIdentity),
        request: CheckoutRequest,
        (fresh, waiter): (FreshLease, WaiterId),
        abandoned: impl std::future::Future<Output = ()>,
    ) -> Result<Result<LeaseRecord, DenialReason>, NoAnswer> {
        let (reply, rx) = oneshot::channel();
        self.tell(Command::Checkout {
            conn,
            holder,
            request,
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
    ) -> Result<Result<Exported, String>, NoAnswer> {
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
            policy,
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
pub(crate) async fn run_ledger(
    mut ledger: Ledger,
    store: Store,
    Inbox(mut rx): Inbox,
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
