//! What the servers of a site replicate through the Raft log: the changes of the seat
//! store, batch by batch, and the whole store as a snapshot.
//!
//! A batch is the write set the leader's commit pipeline produced for one group of
//! decisions (see ARCHITECTURE.md, "Cluster"): leases granted and released, ends of
//! detached leases, journal entries, the clock mark, the report chain's state and a
//! compaction of the journal. Applying it writes exactly those records; it reads no
//! clock (the leader stamped the time) and decides nothing, so every server that
//! applies the same log holds the same store. Every change is keyed (a lease id, a
//! journal number), so applying a batch twice leaves the store as applying it once:
//! after a crash the entries after the last snapshot are applied again.
//!
//! Both types are kept in the Raft log and snapshots, so they carry a format version
//! (the enum tag), like every stored type.

use crate::lease::{LeaseId, LeaseRecord};
use crate::report::{JournalEntry, ReportState};
use crate::time::UnixTime;
use crate::wire::ClientIdentity;
use serde::{Deserialize, Serialize};

/// One Raft log command; the variant is the format version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StoreCommand {
    /// Format version 1 (read only: written by a tallyd that kept removal hold-offs in
    /// memory).
    V1(StoreBatchV1),
    /// Format version 2 (read only: written by a tallyd that did not keep named
    /// seats): with the removal hold-offs and the checkout queues.
    V2(StoreBatchV2),
    /// Format version 3: with the named seats.
    V3(StoreBatch),
}

impl StoreCommand {
    /// The batch the command carries, in the current form.
    pub fn batch(&self) -> std::borrow::Cow<'_, StoreBatch> {
        match self {
            StoreCommand::V1(old) => std::borrow::Cow::Owned(old.clone().into()),
            StoreCommand::V2(old) => std::borrow::Cow::Owned(old.clone().into()),
            StoreCommand::V3(batch) => std::borrow::Cow::Borrowed(batch),
        }
    }
}

/// A hold-off after an administrator's removal: `user` on `host` gets no seat of
/// `feature` until `until`. Replicated (and stored) so that neither a restart nor a
/// new leader hands the removed holder's automatic retry the seat meant for the next
/// in line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holdoff {
    /// The feature.
    pub feature: String,
    /// The removed lease's user.
    pub user: String,
    /// The removed lease's host.
    pub host: String,
    /// When the hold-off ends (wall clock).
    pub until: UnixTime,
}

/// A name that has used a feature licensed to named users or hosts, and so keeps its
/// place on the licence until `until` (the vendor's `named_change_days` after `since`),
/// even when the site's policy drops it before then. Replicated (and stored) so that
/// neither a restart nor a new leader frees the place early.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedSeat {
    /// The feature.
    pub feature: String,
    /// The user or host name, as the client gave it.
    pub name: String,
    /// When the name first used the feature (this time on the licence).
    pub since: UnixTime,
    /// When its place frees (wall clock).
    pub until: UnixTime,
}

/// A named seat as the seat store keeps it; the variant is the format version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StoredNamedSeat {
    /// Format version 1.
    V1(NamedSeat),
}

impl StoredNamedSeat {
    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        crate::encode(self)
    }

    /// Decodes from the store, bounded (two names of at most
    /// [`crate::wire::MAX_NAME_LEN`] bytes and two times).
    pub fn decode(bytes: &[u8]) -> Result<StoredNamedSeat, crate::DecodeError> {
        crate::decode::<StoredNamedSeat, 4096>(bytes)
    }
}

/// A place in a feature's checkout queue: who waits, for what, since when. Replicated
/// (and stored) so that a waiter whose server restarts, or whose leader changes, gets
/// its place back when it asks again, instead of the place its reconnect happens to
/// win.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePlace {
    /// The place's number: places are served in this order.
    pub seq: u64,
    /// The feature waited for.
    pub feature: String,
    /// Seats asked for.
    pub count: u32,
    /// Who waits (its process id tells two waiters of one user on one host apart).
    pub holder: ClientIdentity,
    /// When it started waiting.
    pub since: UnixTime,
    /// When its wait ends.
    pub until: UnixTime,
}

/// A change of the stored checkout queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueChange {
    /// A waiter joined its feature's queue.
    Joined(QueuePlace),
    /// The place ended (granted, timed out, withdrawn, or not taken back in time).
    Left(u64),
}

/// A queue place as the seat store keeps it; the variant is the format version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StoredPlace {
    /// Format version 1.
    V1(QueuePlace),
}

impl StoredPlace {
    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        crate::encode(self)
    }

    /// Decodes from the store, bounded (names of at most [`crate::wire::MAX_NAME_LEN`]
    /// bytes each).
    pub fn decode(bytes: &[u8]) -> Result<StoredPlace, crate::DecodeError> {
        crate::decode::<StoredPlace, 8192>(bytes)
    }
}

/// A hold-off as the seat store keeps it; the variant is the format version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StoredHoldoff {
    /// Format version 1.
    V1(Holdoff),
}

impl StoredHoldoff {
    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        crate::encode(self)
    }

    /// Decodes from the store, bounded (three names of at most
    /// [`crate::wire::MAX_NAME_LEN`] bytes and a time).
    pub fn decode(bytes: &[u8]) -> Result<StoredHoldoff, crate::DecodeError> {
        crate::decode::<StoredHoldoff, 4096>(bytes)
    }
}

/// The batch of format version 1: [`StoreBatch`] without hold-offs, field for field
/// as it was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreBatchV1 {
    /// See [`StoreBatch::at`].
    pub at: UnixTime,
    /// See [`StoreBatch::leases`].
    pub leases: Vec<LeaseChange>,
    /// See [`StoreBatch::detached`].
    pub detached: Vec<DetachedChange>,
    /// See [`StoreBatch::journal`].
    pub journal: Vec<JournalEntry>,
    /// See [`StoreBatch::clock`].
    pub clock: Option<UnixTime>,
    /// See [`StoreBatch::report`].
    pub report: Option<ReportState>,
    /// See [`StoreBatch::compact`].
    pub compact: Option<Compaction>,
}

impl From<StoreBatchV1> for StoreBatch {
    fn from(old: StoreBatchV1) -> StoreBatch {
        StoreBatch {
            at: old.at,
            leases: old.leases,
            detached: old.detached,
            journal: old.journal,
            clock: old.clock,
            report: old.report,
            compact: old.compact,
            holdoffs: Vec::new(),
            queue: Vec::new(),
            named: Vec::new(),
        }
    }
}

/// The batch of format version 2: [`StoreBatch`] without named seats, field for field
/// as it was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreBatchV2 {
    /// See [`StoreBatch::at`].
    pub at: UnixTime,
    /// See [`StoreBatch::leases`].
    pub leases: Vec<LeaseChange>,
    /// See [`StoreBatch::detached`].
    pub detached: Vec<DetachedChange>,
    /// See [`StoreBatch::journal`].
    pub journal: Vec<JournalEntry>,
    /// See [`StoreBatch::clock`].
    pub clock: Option<UnixTime>,
    /// See [`StoreBatch::report`].
    pub report: Option<ReportState>,
    /// See [`StoreBatch::compact`].
    pub compact: Option<Compaction>,
    /// See [`StoreBatch::holdoffs`].
    pub holdoffs: Vec<Holdoff>,
    /// See [`StoreBatch::queue`].
    pub queue: Vec<QueueChange>,
}

impl From<StoreBatchV2> for StoreBatch {
    fn from(old: StoreBatchV2) -> StoreBatch {
        StoreBatch {
            at: old.at,
            leases: old.leases,
            detached: old.detached,
            journal: old.journal,
            clock: old.clock,
            report: old.report,
            compact: old.compact,
            holdoffs: old.holdoffs,
            queue: old.queue,
            named: Vec::new(),
        }
    }
}

/// The changes of the seat store decided together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreBatch {
    /// The leader's wall-clock time when it cut the batch.
    pub at: UnixTime,
    /// Leases granted (written) and ended (removed), in order.
    pub leases: Vec<LeaseChange>,
    /// Ends of restored leases stored or cleared, in order.
    pub detached: Vec<DetachedChange>,
    /// Journal entries, consecutive, as the leader numbered them.
    pub journal: Vec<JournalEntry>,
    /// The clock mark, when it was due.
    pub clock: Option<UnixTime>,
    /// The report chain's new state, after an export.
    pub report: Option<ReportState>,
    /// Journal entries an export made redundant.
    pub compact: Option<Compaction>,
    /// Hold-offs started by removals; applying them also forgets those ended by `at`.
    pub holdoffs: Vec<Holdoff>,
    /// Places taken and left in the checkout queues, in order.
    pub queue: Vec<QueueChange>,
    /// Named seats taken (a name's first use of a named feature); applying them also
    /// forgets those whose place freed by `at`.
    pub named: Vec<NamedSeat>,
}

impl StoreBatch {
    /// A batch cut at `at` that changes nothing yet.
    pub fn new(at: UnixTime) -> StoreBatch {
        StoreBatch {
            at,
            leases: Vec::new(),
            detached: Vec::new(),
            journal: Vec::new(),
            clock: None,
            report: None,
            compact: None,
            holdoffs: Vec::new(),
            queue: Vec::new(),
            named: Vec::new(),
        }
    }

    /// Whether applying the batch would change nothing.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
            && self.detached.is_empty()
            && self.journal.is_empty()
            && self.clock.is_none()
            && self.report.is_none()
            && self.compact.is_none()
            && self.holdoffs.is_empty()
            && self.queue.is_empty()
            && self.named.is_empty()
    }
}

/// A change of the lease tree.
// Most changes of a batch are grants (`Put`): boxing them would cost an allocation per
// grant to save space on the fewer removals.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseChange {
    /// The lease is held (granted, or given back after a lapse).
    Put(LeaseRecord),
    /// The lease ended (checkin, reclaim, expiry, removal, rollback).
    Remove(LeaseId),
}

/// A change of the stored ends of detached leases (`detached/v1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DetachedChange {
    /// The lease ends by `until` unless its holder re-attaches.
    Until {
        /// The lease.
        id: LeaseId,
        /// When it ends (wall clock).
        until: UnixTime,
    },
    /// The stored end is forgotten (re-attached, or the lease ended).
    Cleared {
        /// The lease.
        id: LeaseId,
    },
}

/// Journal entries removed after an export: numbers up to `upto` recorded before
/// `before` (the store's `compact_journal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compaction {
    /// The last number exported.
    pub upto: u64,
    /// Entries from this time on stay (the report period's end).
    pub before: UnixTime,
}

/// The whole seat store, as a snapshot sends it to a server that is too far behind;
/// the variant is the format version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StoreSnapshot {
    /// Format version 1 (read only): without hold-offs.
    V1(StoreImageV1),
    /// Format version 2 (read only): with the removal hold-offs and queues, without
    /// named seats.
    V2(StoreImageV2),
    /// Format version 3: with the named seats.
    V3(StoreImage),
}

impl StoreSnapshot {
    /// The image the snapshot carries, in the current form.
    pub fn into_image(self) -> StoreImage {
        match self {
            StoreSnapshot::V1(old) => StoreImage {
                leases: old.leases,
                detached: old.detached,
                journal: old.journal,
                clock: old.clock,
                report: old.report,
                holdoffs: Vec::new(),
                queue: Vec::new(),
                named: Vec::new(),
            },
            StoreSnapshot::V2(old) => StoreImage {
                leases: old.leases,
                detached: old.detached,
                journal: old.journal,
                clock: old.clock,
                report: old.report,
                holdoffs: old.holdoffs,
                queue: old.queue,
                named: Vec::new(),
            },
            StoreSnapshot::V3(image) => image,
        }
    }
}

/// The image of format version 1: [`StoreImage`] without hold-offs, field for field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreImageV1 {
    /// See [`StoreImage::leases`].
    pub leases: Vec<LeaseRecord>,
    /// See [`StoreImage::detached`].
    pub detached: Vec<(LeaseId, UnixTime)>,
    /// See [`StoreImage::journal`].
    pub journal: Vec<JournalEntry>,
    /// See [`StoreImage::clock`].
    pub clock: Option<UnixTime>,
    /// See [`StoreImage::report`].
    pub report: ReportState,
}

/// The image of format version 2: [`StoreImage`] without named seats, field for field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreImageV2 {
    /// See [`StoreImage::leases`].
    pub leases: Vec<LeaseRecord>,
    /// See [`StoreImage::detached`].
    pub detached: Vec<(LeaseId, UnixTime)>,
    /// See [`StoreImage::journal`].
    pub journal: Vec<JournalEntry>,
    /// See [`StoreImage::clock`].
    pub clock: Option<UnixTime>,
    /// See [`StoreImage::report`].
    pub report: ReportState,
    /// See [`StoreImage::holdoffs`].
    pub holdoffs: Vec<Holdoff>,
    /// See [`StoreImage::queue`].
    pub queue: Vec<QueuePlace>,
}

/// Everything the seat store holds that the servers share.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreImage {
    /// The leases held, by id.
    pub leases: Vec<LeaseRecord>,
    /// The stored ends of detached leases.
    pub detached: Vec<(LeaseId, UnixTime)>,
    /// The journal not yet compacted, in order.
    pub journal: Vec<JournalEntry>,
    /// The clock mark.
    pub clock: Option<UnixTime>,
    /// Where the report chain stands.
    pub report: ReportState,
    /// The hold-offs after removals, ended or not (the reader judges by its clock).
    pub holdoffs: Vec<Holdoff>,
    /// The checkout queues' places, in order.
    pub queue: Vec<QueuePlace>,
    /// The named seats, their places freed or not (the reader judges by its clock).
    pub named: Vec<NamedSeat>,
}

/// Largest snapshot we decode (the journal is compacted after each export; a million
/// events take well under this).
pub const MAX_SNAPSHOT: usize = 1 << 30;

impl StoreSnapshot {
    /// Encodes for the Raft snapshot.
    pub fn encode(&self) -> Vec<u8> {
        crate::encode(self)
    }

    /// Decodes a snapshot, bounded.
    pub fn decode(bytes: &[u8]) -> Result<StoreSnapshot, crate::DecodeError> {
        crate::decode::<StoreSnapshot, MAX_SNAPSHOT>(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_round_trips_and_a_newer_format_is_refused() {
        let image = StoreImage {
            detached: vec![(LeaseId(7), UnixTime(100))],
            clock: Some(UnixTime(99)),
            ..StoreImage::default()
        };
        let bytes = StoreSnapshot::V3(image.clone()).encode();
        assert_eq!(
            StoreSnapshot::decode(&bytes).unwrap(),
            StoreSnapshot::V3(image)
        );
        // A tag this tally does not know (a later format) is an error, not a panic.
        let mut later = bytes.clone();
        later[0] = 9;
        assert!(StoreSnapshot::decode(&later).is_err());
    }

    #[test]
    fn a_version_1_command_and_snapshot_still_read_without_holdoffs() {
        let old = StoreBatchV1 {
            at: UnixTime(5),
            leases: vec![LeaseChange::Remove(LeaseId(1))],
            detached: Vec::new(),
            journal: Vec::new(),
            clock: Some(UnixTime(4)),
            report: None,
            compact: None,
        };
        let bytes = crate::encode(&StoreCommand::V1(old.clone()));
        let read: StoreCommand = crate::decode::<_, MAX_SNAPSHOT>(&bytes).unwrap();
        let batch = read.batch().into_owned();
        assert_eq!(batch.leases, old.leases);
        assert_eq!(batch.clock, Some(UnixTime(4)));
        assert!(batch.holdoffs.is_empty());

        let image = StoreImageV1 {
            detached: vec![(LeaseId(7), UnixTime(100))],
            ..StoreImageV1::default()
        };
        let bytes = StoreSnapshot::V1(image).encode();
        let read = StoreSnapshot::decode(&bytes).unwrap().into_image();
        assert_eq!(read.detached, vec![(LeaseId(7), UnixTime(100))]);
        assert!(read.holdoffs.is_empty());
    }

    fn holdoff() -> Holdoff {
        Holdoff {
            feature: "solver".into(),
            user: "ana".into(),
            host: "ws".into(),
            until: UnixTime(9),
        }
    }

    #[test]
    fn a_version_2_command_and_snapshot_still_read_without_named_seats() {
        let old = StoreBatchV2 {
            at: UnixTime(5),
            leases: vec![LeaseChange::Remove(LeaseId(1))],
            detached: Vec::new(),
            journal: Vec::new(),
            clock: Some(UnixTime(4)),
            report: None,
            compact: None,
            holdoffs: vec![holdoff()],
            queue: vec![QueueChange::Left(3)],
        };
        let bytes = crate::encode(&StoreCommand::V2(old.clone()));
        let read: StoreCommand = crate::decode::<_, MAX_SNAPSHOT>(&bytes).unwrap();
        let batch = read.batch().into_owned();
        assert_eq!(batch.leases, old.leases);
        assert_eq!(batch.holdoffs, vec![holdoff()]);
        assert_eq!(batch.queue, vec![QueueChange::Left(3)]);
        assert!(batch.named.is_empty());

        let image = StoreImageV2 {
            detached: vec![(LeaseId(7), UnixTime(100))],
            holdoffs: vec![holdoff()],
            ..StoreImageV2::default()
        };
        let bytes = StoreSnapshot::V2(image).encode();
        let read = StoreSnapshot::decode(&bytes).unwrap().into_image();
        assert_eq!(read.detached, vec![(LeaseId(7), UnixTime(100))]);
        assert_eq!(read.holdoffs, vec![holdoff()]);
        assert!(read.named.is_empty());

        // Version 3 carries them.
        let seat = NamedSeat {
            feature: "solver".into(),
            name: "bo".into(),
            since: UnixTime(10),
            until: UnixTime(20),
        };
        let batch = StoreBatch {
            named: vec![seat.clone()],
            ..StoreBatch::new(UnixTime(10))
        };
        assert!(!batch.is_empty());
        let bytes = crate::encode(&StoreCommand::V3(batch));
        let read: StoreCommand = crate::decode::<_, MAX_SNAPSHOT>(&bytes).unwrap();
        assert_eq!(read.batch().named, vec![seat.clone()]);
        let stored = StoredNamedSeat::V1(seat.clone()).encode();
        assert_eq!(
            StoredNamedSeat::decode(&stored).unwrap(),
            StoredNamedSeat::V1(seat)
        );
    }

    #[test]
    fn an_empty_batch_says_so() {
        assert!(StoreBatch::new(UnixTime(5)).is_empty());
        let batch = StoreBatch {
            leases: vec![LeaseChange::Remove(LeaseId(1))],
            ..StoreBatch::new(UnixTime(5))
        };
        assert!(!batch.is_empty());
    }
}
