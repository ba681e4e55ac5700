//! The commit pipeline, sans-IO (in the manner of quinn-proto): it numbers the journal,
//! decides what each batch writes (journal entries, the clock mark when due), keeps the
//! answers that wait for durability, and says, when a flush finishes or fails, whom to
//! answer and what to roll back. It does no IO and reads no clock: the ledger task
//! writes and flushes the store and feeds the results back in, so the pipeline's rules
//! are tested with virtual flushes (see the tests below).
//!
//! Group commit, pipelined: one flush runs at a time; answers owed by batches written
//! while it runs wait for the next one. An answer goes out only once a flush that
//! started after its writes has finished.

use crate::disk::DiskError;
use crate::error::Error;
use crate::journal::Exported;
use tally_protocol::lease::{LeaseId, LeaseRecord};
use tally_protocol::report::{JournalEntry, UsageEvent};
use tally_protocol::time::UnixTime;
use tally_protocol::wire::LeaseState;

/// How often the clock mark (the last time the daemon is known to have been alive) is
/// written; a lease attached when the daemon died ends at the latest this long after
/// the mark plus its TTL.
pub(crate) const CLOCK_SAVE_SECS: u64 = 10;

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
    /// A report export, durable with the batch it was built in.
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
}
