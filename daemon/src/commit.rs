//! The commit pipeline, sans-IO (in the manner of quinn-proto): it numbers the journal,
//! decides what each batch writes (journal entries, the clock mark when due), keeps the
//! answers that wait for durability, and says, when a flush finishes or fails, whom to
//! answer and what to roll back. It does no IO and reads no clock: the ledger task
//! writes and flushes the store and feeds the results back in, so the pipeline's rules
//! are tested with virtual flushes (see the tests below).
//!
//! It also holds the rules of what is journaled (grants, releases, denials, waits,
//! reloads: see [`Commit::batch_events`] and its neighbours), and the bookkeeping of an
//! outage of the store ([`Outage`]: the journal kept in memory, when to try reopening),
//! with time as an input, so the durability state machine runs on virtual time in tests.
//!
//! Group commit, pipelined: one flush runs at a time; answers owed by batches written
//! while it runs wait for the next one. An answer goes out only once a flush that
//! started after its writes has finished.

use crate::disk::DiskError;
use crate::error::Error;
use crate::journal::{self, Exported};
use crate::ledger::{Event, SeatChange};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use tally_protocol::bundle::Bundle;
use tally_protocol::lease::{LeaseId, LeaseRecord};
use tally_protocol::observed::ClientFacts;
use tally_protocol::report::{JournalEntry, UsageEvent};
use tally_protocol::time::UnixTime;
use tally_protocol::wire::{ClientIdentity, DenialReason, LeaseState};

/// How often the clock mark (the last time the daemon is known to have been alive) is
/// written; a lease attached when the daemon died ends at the latest this long after
/// the mark plus its TTL.
pub(crate) const CLOCK_SAVE_SECS: u64 = 10;
/// Journal entries kept in memory while the store cannot be written (about 100 bytes
/// each). Past this, the oldest kept ones are dropped and the report shows the gap.
const MAX_BACKLOG: usize = 200_000;
/// First wait before reopening a broken store; doubled after each failed try.
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Longest wait between tries.
const MAX_RETRY: Duration = Duration::from_secs(10);

/// The types of the reply handles the pipeline carries but never looks into (oneshot
/// senders in the ledger task, plain numbers in tests).
pub(crate) trait Replies {
    /// Answers a checkout.
    type Grant;
    /// Answers a heartbeat.
    type Heartbeat;
    /// Answers an export.
    type Export;
}

/// An answer that waits for the flush covering its writes.
pub(crate) enum Owed<R: Replies> {
    /// A grant (fresh or from the queue).
    Grant(R::Grant, LeaseRecord),
    /// A heartbeat that gave lapsed leases back: the states by lease, and the leases
    /// given back (grants like any other).
    Regranted(R::Heartbeat, Vec<(LeaseId, LeaseState)>, Vec<LeaseRecord>),
    /// A report export, durable with the flush that follows it.
    Export(R::Export, Result<Exported, Error>),
}

/// What the ledger task must do with an answer the pipeline lets go.
pub(crate) enum Answer<R: Replies> {
    /// Durable: tell the requester (a grant nobody hears of goes back at once).
    Granted(R::Grant, LeaseRecord),
    /// Not durable: take the lease back (`Ledger::rollback`) and deny the request with
    /// `StorageUnavailable` (why: the store's failure).
    NotRecorded(R::Grant, LeaseRecord, DiskError),
    /// Heartbeat states; the leases listed are taken back first (they read `Unknown`).
    States(R::Heartbeat, Vec<LeaseState>, Vec<LeaseId>),
    /// An export's result.
    Export(R::Export, Result<Exported, Error>),
}

/// The pipeline's state between batches.
pub(crate) struct Commit<R: Replies> {
    /// The number of the next journal entry.
    next_seq: u64,
    /// Journal entries not yet handed to the store.
    journal: Vec<JournalEntry>,
    /// Answers whose writes no flush has covered yet.
    unflushed: Vec<Owed<R>>,
    /// Answers the running flush covers.
    in_flight: Vec<Owed<R>>,
    /// Whether a flush runs.
    flushing: bool,
    /// Writes since the last flush started that no answer waits for (checkins,
    /// reclaims, denials in the journal): flushed promptly all the same, so a crash
    /// loses at most one flush's worth of them.
    dirty: bool,
    /// Journal events of grants taken back (the store failed under them), journaled
    /// with the next batch.
    rolled_back: Vec<UsageEvent>,
    /// The clock mark last written.
    clock_saved: UnixTime,
    /// [`UsageEvent::Session`]s of this batch's grants, by lease, journaled right after
    /// each grant (see [`Commit::observed`]).
    observed: HashMap<LeaseId, UsageEvent>,
}

impl<R: Replies> Commit<R> {
    /// A pipeline whose journal continues at `next_seq`, with the clock mark last
    /// written at `clock_saved`.
    pub(crate) fn new(next_seq: u64, clock_saved: UnixTime) -> Commit<R> {
        Commit {
            next_seq,
            journal: Vec::new(),
            unflushed: Vec::new(),
            in_flight: Vec::new(),
            flushing: false,
            dirty: false,
            rolled_back: Vec::new(),
            clock_saved,
            observed: HashMap::new(),
        }
    }

    /// Journals `event` at `at` with the next number.
    pub(crate) fn record(&mut self, at: UnixTime, event: UsageEvent) {
        self.journal.push(JournalEntry {
            seq: self.next_seq,
            at,
            event,
        });
        self.next_seq += 1;
    }

    /// The number of the last journal entry recorded (0: none yet).
    pub(crate) fn last_seq(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }

    /// Journals a batch's ledger events (grants, releases), in order, at `at`, then the
    /// seat sets the licensing models opened and closed in it (see [`SeatChange`]):
    /// the grants and releases of their members count no seats of their own.
    pub(crate) fn batch_events(&mut self, at: UnixTime, events: &[Event], seats: &[SeatChange]) {
        let mut observed = std::mem::take(&mut self.observed);
        let members: std::collections::HashSet<LeaseId> = seats
            .iter()
            .filter_map(|c| match c {
                SeatChange::Member(id) => Some(*id),
                _ => None,
            })
            .collect();
        for event in events {
            let mut entry = journal::usage_event(event);
            match &mut entry {
                UsageEvent::Granted { lease, count, .. }
                | UsageEvent::Released { lease, count, .. }
                    if members.contains(lease) =>
                {
                    *count = 0
                }
                _ => {}
            }
            let session = match &entry {
                UsageEvent::Granted { lease, .. } => observed.remove(lease),
                _ => None,
            };
            self.record(at, entry);
            if let Some(session) = session {
                self.record(at, session);
            }
        }
        for change in seats {
            if let Some(entry) = journal::seat_set_event(change) {
                self.record(at, entry);
            }
        }
    }

    /// Notes what the client of the grant of `lease` (in this batch) said about where
    /// it runs: journaled right after the grant as [`UsageEvent::Session`] when it
    /// reported a virtual machine or a remote session. Notes of grants not in the batch
    /// are dropped with it.
    pub(crate) fn observed(&mut self, lease: LeaseId, facts: &ClientFacts) {
        let (vm, remote) = (facts.virtual_machine(), facts.remote_session());
        if vm.is_none() && remote.is_none() {
            return;
        }
        self.observed.insert(
            lease,
            UsageEvent::Session {
                lease,
                virtual_machine: vm.map(str::to_string),
                remote: remote.map(str::to_string),
            },
        );
    }

    /// Journals a checkout denied at the door. The fact of the denial is kept; the
    /// name is the one it is counted as (`counted_as`: a name no bundle licenses is
    /// not kept, since clients can make up any number).
    pub(crate) fn denied(
        &mut self,
        at: UnixTime,
        counted_as: &str,
        reason: &DenialReason,
        holder: &ClientIdentity,
    ) {
        self.record(
            at,
            UsageEvent::Denied {
                feature: counted_as.to_string(),
                reason: reason.code().into(),
                user: holder.user.clone(),
                host: holder.host.clone(),
            },
        );
    }

    /// Journals a checkout that waits in its feature's queue.
    pub(crate) fn queued(&mut self, at: UnixTime, feature: &str, holder: &ClientIdentity) {
        self.record(
            at,
            UsageEvent::Queued {
                feature: feature.to_string(),
                user: holder.user.clone(),
                host: holder.host.clone(),
            },
        );
    }

    /// Journals a wait that ended denied: only a queue timeout is (waits that end
    /// otherwise were journaled when they started); the waiter is not named.
    pub(crate) fn wait_denied(&mut self, at: UnixTime, reason: &DenialReason) {
        if let DenialReason::QueueTimeout { feature, .. } = reason {
            self.record(
                at,
                UsageEvent::Denied {
                    feature: feature.clone(),
                    reason: reason.code().into(),
                    user: String::new(),
                    host: String::new(),
                },
            );
        }
    }

    /// Journals a reload: each bundle loaded, then how the served set changed
    /// (`journal::bundle_changes`).
    pub(crate) fn reloaded(&mut self, at: UnixTime, bundles: &[Bundle], changes: Vec<UsageEvent>) {
        for b in bundles {
            self.record(
                at,
                UsageEvent::BundleLoaded {
                    bundle: b.id.clone(),
                },
            );
        }
        for event in changes {
            self.record(at, event);
        }
    }

    /// Ends a batch: whether the clock mark `clock` is due (every few seconds and at a
    /// stop, not once a request), and the journal entries to write with the batch's
    /// lease `changes` (the store takes them from the vector).
    pub(crate) fn batch_write(
        &mut self,
        changes: bool,
        clock: UnixTime,
        stopping: bool,
    ) -> (&mut Vec<JournalEntry>, Option<UnixTime>) {
        let save_clock = clock.0 >= self.clock_saved.0.saturating_add(CLOCK_SAVE_SECS) || stopping;
        self.dirty |= !self.journal.is_empty() || changes || save_clock;
        (&mut self.journal, save_clock.then_some(clock))
    }

    /// The batch's writes ended: `clock` (as [`Commit::batch_write`] gave it) is saved if
    /// they succeeded.
    pub(crate) fn written(&mut self, result: &Result<(), DiskError>, clock: Option<UnixTime>) {
        if let (Ok(()), Some(clock)) = (result, clock) {
            self.clock_saved = clock;
        }
    }

    /// An answer owed by a batch whose writes ended with `failure` (`None`: written).
    /// Written, it waits for a flush; not written, it is let go at once as a failure.
    /// An export waits either way (its result already says whether it was built).
    pub(crate) fn owe(&mut self, owed: Owed<R>, failure: Option<&DiskError>) -> Option<Answer<R>> {
        match (owed, failure) {
            (owed @ Owed::Export(..), _) | (owed, None) => {
                self.unflushed.push(owed);
                None
            }
            (owed, Some(what)) => Some(self.settle(owed, Some(what))),
        }
    }

    /// Whether a flush should start now: none runs, and answers or writes wait for one.
    pub(crate) fn flush_due(&self) -> bool {
        !self.flushing && (!self.unflushed.is_empty() || self.dirty)
    }

    /// A flush started: it covers every answer owed so far.
    pub(crate) fn flush_started(&mut self) {
        self.dirty = false;
        self.flushing = true;
        self.in_flight = std::mem::take(&mut self.unflushed);
    }

    /// No flush could start (the store is broken: `why`): the answers owed are let go,
    /// as failures if there is a reason.
    pub(crate) fn flush_refused(&mut self, why: Option<DiskError>) -> Vec<Answer<R>> {
        self.dirty = false;
        let owed = std::mem::take(&mut self.unflushed);
        self.settle_all(owed, why.as_ref())
    }

    /// The running flush finished (`Ok`) or failed: the answers it covered are let go.
    pub(crate) fn flushed(&mut self, result: Result<(), DiskError>) -> Vec<Answer<R>> {
        self.flushing = false;
        let owed = std::mem::take(&mut self.in_flight);
        self.settle_all(owed, result.err().as_ref())
    }

    /// At a stop: the answers no flush covered yet, let go by the final flush's result.
    pub(crate) fn closed(&mut self, result: Result<(), DiskError>) -> Vec<Answer<R>> {
        let owed = std::mem::take(&mut self.unflushed);
        self.settle_all(owed, result.err().as_ref())
    }

    /// Journals the grants taken back since the last call (at `at`); true if there were
    /// any: then the journal is to be written, and a flush is owed.
    pub(crate) fn journal_rolled_back(&mut self, at: UnixTime) -> bool {
        if self.rolled_back.is_empty() {
            return false;
        }
        for event in std::mem::take(&mut self.rolled_back) {
            self.record(at, event);
        }
        self.dirty = true;
        true
    }

    /// The journal entries not yet handed to the store.
    pub(crate) fn journal(&mut self) -> &mut Vec<JournalEntry> {
        &mut self.journal
    }

    fn settle_all(&mut self, owed: Vec<Owed<R>>, failure: Option<&DiskError>) -> Vec<Answer<R>> {
        owed.into_iter().map(|o| self.settle(o, failure)).collect()
    }

    /// Lets one answer go, by whether its writes are durable; grants not durable are
    /// taken back and the journal says so.
    fn settle(&mut self, owed: Owed<R>, failure: Option<&DiskError>) -> Answer<R> {
        match (owed, failure) {
            (Owed::Grant(reply, record), None) => Answer::Granted(reply, record),
            (Owed::Grant(reply, record), Some(what)) => {
                self.rolled_back.push(not_recorded(&record));
                Answer::NotRecorded(reply, record, what.clone())
            }
            (Owed::Export(reply, result), None) => Answer::Export(reply, result),
            (Owed::Export(reply, _), Some(what)) => {
                Answer::Export(reply, Err(Error::Disk(what.clone())))
            }
            (Owed::Regranted(reply, states, _), None) => Answer::States(
                reply,
                states.into_iter().map(|(_, s)| s).collect(),
                Vec::new(),
            ),
            (Owed::Regranted(reply, states, records), Some(_)) => {
                // Lapsed leases given back but not stored read as unknown to their
                // holder, and the journal says they were not recorded.
                let undone: Vec<LeaseId> = records.iter().map(|r| r.id).collect();
                let set: std::collections::HashSet<LeaseId> = undone.iter().copied().collect();
                for record in &records {
                    self.rolled_back.push(not_recorded(record));
                }
                let states = states
                    .into_iter()
                    .map(|(id, state)| {
                        if set.contains(&id) {
                            LeaseState::Unknown
                        } else {
                            state
                        }
                    })
                    .collect();
                Answer::States(reply, states, undone)
            }
        }
    }
}

/// An outage of the store, sans IO: since when, the journal entries not known to be
/// durable (kept in memory, in order, to be written once the store is reopened), and
/// when to try reopening it (backing off from [`FIRST_RETRY`] to [`MAX_RETRY`]). The
/// disk does the IO; times are inputs, so tests run it on virtual time.
#[derive(Debug)]
pub(crate) struct Outage {
    since: UnixTime,
    retry_at: Instant,
    backoff: Duration,
    backlog: VecDeque<JournalEntry>,
    /// Most entries kept; past it the oldest go.
    cap: usize,
    /// Entries dropped because the backlog was full.
    dropped: u64,
}

impl Outage {
    /// An outage that began at `since` (wall) / `now` (monotonic): the first try to
    /// reopen comes [`FIRST_RETRY`] later.
    pub(crate) fn new(since: UnixTime, now: Instant) -> Outage {
        Outage {
            since,
            retry_at: now + FIRST_RETRY,
            backoff: FIRST_RETRY,
            backlog: VecDeque::new(),
            cap: MAX_BACKLOG,
            dropped: 0,
        }
    }

    /// Keeps journal entries that could not be written (or not made durable); past the
    /// cap the oldest go, and are counted.
    pub(crate) fn keep(&mut self, entries: impl IntoIterator<Item = JournalEntry>) {
        for entry in entries {
            if self.backlog.len() >= self.cap {
                self.backlog.pop_front();
                self.dropped += 1;
            }
            self.backlog.push_back(entry);
        }
    }

    /// When the outage began (wall clock).
    pub(crate) fn since(&self) -> UnixTime {
        self.since
    }

    /// When to try reopening the store.
    pub(crate) fn retry_at(&self) -> Instant {
        self.retry_at
    }

    /// A try to reopen failed at `now`: the next one waits twice as long (at most
    /// [`MAX_RETRY`]).
    pub(crate) fn retry_failed(&mut self, now: Instant) {
        self.backoff = (self.backoff * 2).min(MAX_RETRY);
        self.retry_at = now + self.backoff;
    }

    /// The journal entries owed to the store, oldest first.
    pub(crate) fn backlog(&mut self) -> &[JournalEntry] {
        self.backlog.make_contiguous()
    }

    /// How many entries were dropped because the backlog was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }
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

#[cfg(test)]
mod tests {
    //! The pipeline driven with virtual flushes: the tests play the ledger task, say
    //! when writes and flushes end and how, and check whom the pipeline answers.

    use super::*;
    use crate::store::StoreError;
    use std::sync::Arc;
    use tally_protocol::lease::LeaseSecret;
    use tally_protocol::wire::ClientIdentity;

    /// Replies are plain request numbers.
    struct Ids;

    impl Replies for Ids {
        type Grant = u32;
        type Heartbeat = u32;
        type Export = u32;
    }

    fn record(id: u64) -> LeaseRecord {
        LeaseRecord {
            id: LeaseId(id),
            secret: LeaseSecret([0; 16]),
            feature: "solver".into(),
            count: 1,
            holder: ClientIdentity {
                user: "ann".into(),
                host: "ws1".into(),
                pid: 1,
                program: "p".into(),
                display: None,
            },
            granted_at: UnixTime(1_000),
            ttl_secs: 60,
            version: None,
            linger_secs: 0,
            overdraft: false,
            borrowed_until: None,
        }
    }

    /// A store failure of the OS error `errno` (28: disk full, 30: read-only).
    fn fault(errno: i32) -> DiskError {
        DiskError::Store(Arc::new(StoreError::Io {
            path: "/data/store".into(),
            cause: std::io::Error::from_raw_os_error(errno),
        }))
    }

    /// What the ledger task would do with each answer, as text.
    fn told(answers: Vec<Answer<Ids>>) -> Vec<String> {
        answers
            .into_iter()
            .map(|a| match a {
                Answer::Granted(to, r) => format!("{to}: granted {}", r.id.0),
                Answer::NotRecorded(to, r, what) => {
                    format!("{to}: roll back {}, denied ({what})", r.id.0)
                }
                Answer::States(to, states, undone) => {
                    format!("{to}: states {states:?}, roll back {undone:?}")
                }
                Answer::Export(to, result) => format!("{to}: export ok={}", result.is_ok()),
            })
            .collect()
    }

    /// The store as far as the tests need it: what was written, in order.
    fn write(commit: &mut Commit<Ids>, written: &mut Vec<JournalEntry>, at: u64) {
        let (journal, clock) = commit.batch_write(true, UnixTime(at), false);
        written.append(journal);
        commit.written(&Ok(()), clock);
    }

    fn rolled_back(journal: &[JournalEntry]) -> Vec<(u64, LeaseId)> {
        journal
            .iter()
            .filter_map(|e| match &e.event {
                UsageEvent::Released { lease, why, .. } if why == "not_recorded" => {
                    Some((e.seq, *lease))
                }
                _ => None,
            })
            .collect()
    }

    /// A flush that fails after grants (and a lapsed lease given back) were decided and
    /// written: nobody hears "granted", each lease is taken back, the heartbeat reads
    /// the lease given back as unknown, and the journal says "not recorded" once each.
    #[test]
    fn a_flush_that_fails_after_grants_were_decided_takes_them_back() {
        let mut commit = Commit::<Ids>::new(1, UnixTime(0));
        let mut disk = Vec::new();
        commit.record(UnixTime(1_000), UsageEvent::DaemonStopped);
        write(&mut commit, &mut disk, 1_000);
        assert!(commit.owe(Owed::Grant(1, record(10)), None).is_none());
        let states = vec![
            (LeaseId(11), LeaseState::Active),
            (LeaseId(12), LeaseState::Removed),
        ];
        assert!(commit
            .owe(Owed::Regranted(2, states, vec![record(11)]), None)
            .is_none());
        assert!(commit.flush_due());
        commit.flush_started();
        assert!(!commit.flush_due(), "one flush at a time");
        let answers = told(commit.flushed(Err(fault(28))));
        assert_eq!(
            answers,
            vec![
                format!("1: roll back 10, denied ({})", fault(28)),
                format!(
                    "2: states {:?}, roll back {:?}",
                    [LeaseState::Unknown, LeaseState::Removed],
                    [LeaseId(11)]
                ),
            ]
        );
        assert!(commit.journal_rolled_back(UnixTime(1_001)));
        assert!(commit.flush_due(), "the journal's word is owed a flush");
        write(&mut commit, &mut disk, 1_001);
        assert_eq!(rolled_back(&disk), vec![(2, LeaseId(10)), (3, LeaseId(11))]);
        assert!(!commit.journal_rolled_back(UnixTime(1_002)), "said once");
    }

    /// A flush that finishes while the next batch is being decided answers only what it
    /// covered; the next batch's grant waits for a flush of its own, and a batch whose
    /// write failed meanwhile is denied at once without touching the running flush.
    #[test]
    fn a_flush_that_finishes_while_the_next_batch_is_decided_answers_only_its_own() {
        let mut commit = Commit::<Ids>::new(1, UnixTime(0));
        let mut disk = Vec::new();
        write(&mut commit, &mut disk, 1_000);
        assert!(commit.owe(Owed::Grant(1, record(10)), None).is_none());
        commit.flush_started();
        // The next batch is decided and written while the flush runs.
        write(&mut commit, &mut disk, 1_000);
        assert!(commit.owe(Owed::Grant(2, record(20)), None).is_none());
        assert!(commit
            .owe(Owed::Export(3, Err(Error::ShuttingDown)), None)
            .is_none());
        // A third batch's write fails: denied now, the flush running is not its own.
        let failed = commit.owe(Owed::Grant(4, record(40)), Some(&fault(30)));
        assert_eq!(
            told(failed.into_iter().collect()),
            vec![format!("4: roll back 40, denied ({})", fault(30))]
        );
        assert!(!commit.flush_due(), "a flush runs");
        assert_eq!(told(commit.flushed(Ok(()))), vec!["1: granted 10"]);
        assert!(commit.flush_due());
        commit.flush_started();
        assert!(
            told(commit.closed(Ok(()))).is_empty(),
            "all in the running flush"
        );
        assert_eq!(
            told(commit.flushed(Ok(()))),
            vec!["2: granted 20", "3: export ok=false"]
        );
        assert!(!commit.flush_due());
    }

    /// A crash between write and flush: nobody was told of the grant written, and the
    /// restart (a pipeline made from what was written) numbers the journal on without
    /// reusing a number.
    #[test]
    fn a_crash_between_write_and_flush_answers_nobody_and_numbering_continues() {
        let mut commit = Commit::<Ids>::new(7, UnixTime(0));
        let mut disk = Vec::new();
        commit.record(UnixTime(1_000), UsageEvent::DaemonStopped);
        commit.record(UnixTime(1_000), UsageEvent::DaemonStopped);
        write(&mut commit, &mut disk, 1_000);
        assert!(commit.owe(Owed::Grant(1, record(10)), None).is_none());
        commit.flush_started();
        drop(commit); // SIGKILL: the flush never reports back, no answer went out.
        let seqs: Vec<u64> = disk.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![7, 8]);
        let next = disk.last().map_or(1, |e| e.seq + 1);
        let mut restarted = Commit::<Ids>::new(next, UnixTime(1_000));
        restarted.record(UnixTime(1_005), UsageEvent::DaemonStopped);
        write(&mut restarted, &mut disk, 1_005);
        let seqs: Vec<u64> = disk.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![7, 8, 9]);
        assert!(
            restarted.flush_due(),
            "what the restart wrote is owed a flush"
        );
    }

    /// The clock mark is written every `CLOCK_SAVE_SECS` and at a stop, and only counts
    /// as saved once its write succeeded.
    #[test]
    fn the_clock_mark_is_written_every_few_seconds_and_at_a_stop() {
        let mut commit = Commit::<Ids>::new(1, UnixTime(1_000));
        let (_, clock) = commit.batch_write(false, UnixTime(1_005), false);
        assert_eq!(clock, None);
        let (_, clock) = commit.batch_write(false, UnixTime(1_010), false);
        assert_eq!(clock, Some(UnixTime(1_010)));
        commit.written(&Err(fault(5)), clock);
        let (_, clock) = commit.batch_write(false, UnixTime(1_011), false);
        assert_eq!(clock, Some(UnixTime(1_011)), "a failed write is retried");
        commit.written(&Ok(()), clock);
        let (_, clock) = commit.batch_write(false, UnixTime(1_012), false);
        assert_eq!(clock, None);
        let (_, clock) = commit.batch_write(false, UnixTime(1_012), true);
        assert_eq!(clock, Some(UnixTime(1_012)), "at a stop");
    }

    /// A ledger with two seats of "solver".
    fn ledger() -> crate::ledger::Ledger {
        crate::ledger::Ledger::for_tests(2)
    }

    /// Checkout number `n` of one "solver" seat by ann, waiting up to `wait_secs`.
    fn checkout(
        ledger: &mut crate::ledger::Ledger,
        now: crate::ledger::Now,
        n: u64,
        wait_secs: u32,
    ) -> crate::ledger::Checkout {
        use crate::ledger::{ConnId, FreshLease, WaiterId};
        use tally_protocol::lease::LeaseSecret;
        let request = tally_protocol::wire::CheckoutRequest {
            feature: "solver".into(),
            count: 1,
            version: None,
            build_date: None,
            wait_secs,
            borrow_secs: 0,
        };
        let fresh = FreshLease {
            id: LeaseId(n),
            secret: LeaseSecret([n as u8; 16]),
        };
        let ann = record(0).holder;
        ledger.checkout_or_wait(now, ConnId(1), &ann, &request, fresh, WaiterId(n))
    }

    /// The backlog as (number, reason or why) pairs.
    fn kept(outage: &mut Outage) -> Vec<(u64, String)> {
        let kept = outage.backlog().iter().map(|e| match &e.event {
            UsageEvent::Denied { reason, .. } => (e.seq, reason.clone()),
            UsageEvent::Released { why, .. } => (e.seq, why.clone()),
            other => panic!("{other:?}"),
        });
        kept.collect()
    }

    /// The durability state machine on virtual time (no disk): the store "fails" at
    /// 10 s and the ledger is told; new checkouts (also ones that would wait) are
    /// refused naming the fault, while a release is accepted and journaled, with the
    /// denial, to the outage's backlog; reopening is tried on a doubling backoff; once
    /// the store is back the backlog is what is written and checkouts are served again.
    #[test]
    fn a_storage_outage_refuses_grants_keeps_releases_and_ends_on_virtual_time() {
        use crate::ledger::{Checkout, Now};
        use tally_protocol::wire::LeaseRef;

        let start = Instant::now();
        let at = |ms: u64| Now {
            mono: start + Duration::from_millis(ms),
            wall: UnixTime(1_800_000_000 + ms / 1_000),
        };
        let mut ledger = ledger();
        let mut commit = Commit::<Ids>::new(1, UnixTime(0));
        let ann = record(0).holder;

        // Served while the store is writable.
        let Checkout::Granted(granted) = checkout(&mut ledger, at(0), 1, 0) else {
            panic!("granted while the store is writable");
        };
        let (held, event) = *granted;
        commit.batch_events(at(0).wall, &[event], &[]);
        let mut disk = Vec::new();
        write(&mut commit, &mut disk, 1_800_000_000);
        assert_eq!(disk.len(), 1);

        // The store fails at 10 s; the ledger is told, and told again with a newer
        // reason (the outage still began at 10 s).
        let failed = at(10_000);
        let mut outage = Outage::new(failed.wall, failed.mono);
        ledger.storage_unavailable(failed.wall, "No space left on device".into());
        ledger.storage_unavailable(at(10_200).wall, "Read-only file system".into());
        assert_eq!(
            ledger.storage_down(),
            Some((failed.wall, "Read-only file system"))
        );
        let refused = DenialReason::StorageUnavailable {
            what: "Read-only file system".into(),
        };
        for wait_secs in [0, 30] {
            assert_eq!(
                checkout(&mut ledger, at(10_300), 2, wait_secs),
                Checkout::Denied(refused.clone()),
                "no grant and no wait while the store cannot be written"
            );
            commit.denied(at(10_300).wall, "solver", &refused, &ann);
        }
        assert_eq!(ledger.in_use("solver"), 1);

        // A release is accepted and journaled; its batch's write fails, so the journal
        // goes to the backlog.
        let lease = LeaseRef {
            id: held.id,
            secret: held.secret.clone(),
        };
        let (released, events) = ledger.checkin(at(10_400), &[lease]);
        assert_eq!(released, vec![true]);
        assert_eq!(ledger.in_use("solver"), 0);
        commit.batch_events(at(10_400).wall, &events, &[]);
        let (journal, _) = commit.batch_write(true, at(10_400).wall, false);
        outage.keep(journal.drain(..));
        assert_eq!(
            kept(&mut outage),
            vec![
                (2, "storage_unavailable".to_string()),
                (3, "storage_unavailable".to_string()),
                (4, "checkin".to_string())
            ]
        );

        // Reopening is tried 0.5 s after the failure, then after 1 s, 2 s, ... at most
        // 10 s apart; each failed try is an input at its (virtual) time.
        let mut tries = Vec::new();
        for _ in 0..7 {
            let when = outage.retry_at();
            tries.push((when - start).as_millis());
            outage.retry_failed(when);
        }
        assert_eq!(
            tries,
            vec![10_500, 11_500, 13_500, 17_500, 25_500, 35_500, 45_500]
        );
        assert_eq!(
            checkout(&mut ledger, at(45_000), 3, 0),
            Checkout::Denied(refused),
            "still refused until the store is back"
        );

        // The store is back: the backlog is what the reopened store is written first,
        // and checkouts are served again.
        disk.extend(outage.backlog().iter().cloned());
        assert_eq!(disk.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
        ledger.storage_available();
        assert_eq!(ledger.storage_down(), None);
        assert!(matches!(
            checkout(&mut ledger, at(45_600), 4, 0),
            Checkout::Granted(_)
        ));
    }

    /// The backlog is bounded: past its cap the oldest entries go, and are counted.
    #[test]
    fn an_outage_backlog_drops_its_oldest_entries_past_its_cap() {
        let mut outage = Outage::new(UnixTime(1_000), Instant::now());
        outage.cap = 2;
        let entry = |seq| JournalEntry {
            seq,
            at: UnixTime(1_000),
            event: UsageEvent::DaemonStopped,
        };
        outage.keep([entry(1), entry(2), entry(3)]);
        let seqs: Vec<u64> = outage.backlog().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![2, 3]);
        assert_eq!(outage.dropped(), 1);
    }

    /// A grant whose client reported a virtual machine or a remote session is followed
    /// in the journal by its `Session` event; one that reported neither is not, and a
    /// note of a grant not in the batch does not outlive it.
    #[test]
    fn the_session_a_client_reported_is_journaled_right_after_its_grant() {
        let mut commit = Commit::<Ids>::new(1, UnixTime(0));
        let vm = ClientFacts::new(Some("KVM/QEMU".into()), None);
        let ssh = ClientFacts::new(None, Some("SSH from 10.0.0.5".into()));
        commit.observed(LeaseId(1), &vm);
        commit.observed(LeaseId(2), &ClientFacts::new(None, None));
        commit.observed(LeaseId(3), &ssh);
        commit.observed(LeaseId(9), &vm);
        let events: Vec<Event> = [1, 2, 3].map(|n| Event::Granted(record(n))).into();
        commit.batch_events(UnixTime(5), &events, &[]);
        let journal: Vec<(u64, UsageEvent)> = commit
            .journal()
            .drain(..)
            .map(|e| (e.seq, e.event))
            .collect();
        let shape: Vec<String> = journal
            .iter()
            .map(|(seq, e)| match e {
                UsageEvent::Granted { lease, .. } => format!("{seq} granted {}", lease.0),
                UsageEvent::Session {
                    lease,
                    virtual_machine,
                    remote,
                } => format!("{seq} session {} {virtual_machine:?} {remote:?}", lease.0),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            shape,
            [
                "1 granted 1",
                "2 session 1 Some(\"KVM/QEMU\") None",
                "3 granted 2",
                "4 granted 3",
                "5 session 3 None Some(\"SSH from 10.0.0.5\")",
            ]
        );
        // Lease 9's note went with its batch.
        commit.batch_events(UnixTime(6), &[Event::Granted(record(9))], &[]);
        assert_eq!(commit.journal().len(), 1);
    }
}
