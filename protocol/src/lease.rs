//! Leases: the ids and secrets that name a seat, and the record the daemon persists.

use crate::time::UnixTime;
use crate::wire::ClientIdentity;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A lease's id, unique per server. Shown to admins (to remove a lease) and in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LeaseId(pub u64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "L{:016x}", self.0)
    }
}

/// The secret that lets a holder re-attach its lease from a new connection.
///
/// Only the holder and the server know it; lease ids are visible to everyone who can see
/// the status, so the id alone must never be enough to take over a seat.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseSecret(pub [u8; 16]);

impl LeaseSecret {
    /// Compares in constant time, so response timing reveals nothing about the secret.
    pub fn matches(&self, other: &LeaseSecret) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl fmt::Debug for LeaseSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeaseSecret(..)")
    }
}

/// A lease as persisted by the daemon; the variant is the format version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StoredLease {
    /// Format version 1.
    V1(LeaseRecord),
}

/// Everything the daemon must remember about a granted lease to honour it after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The lease id.
    pub id: LeaseId,
    /// The holder's re-attach secret.
    pub secret: LeaseSecret,
    /// The feature the seats are of.
    pub feature: String,
    /// How many seats.
    pub count: u32,
    /// Who holds it.
    pub holder: ClientIdentity,
    /// When it was granted (wall clock).
    pub granted_at: UnixTime,
    /// Heartbeat time-to-live in seconds.
    pub ttl_secs: u64,
    /// The application version it was granted for (version ceilings).
    pub version: Option<String>,
    /// Seconds the seat stays held after checkin.
    pub linger_secs: u64,
    /// Seats beyond the licensed count.
    pub overdraft: bool,
    /// For a borrowed lease: when it ends.
    pub borrowed_until: Option<UnixTime>,
}

/// The clock high-water mark as persisted; the variant is the format version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StoredClock {
    /// Format version 1: the latest wall-clock time the server has seen.
    V1(UnixTime),
}

impl StoredClock {
    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        crate::encode(self)
    }

    /// Decodes from the store, bounded.
    pub fn decode(bytes: &[u8]) -> Result<StoredClock, crate::DecodeError> {
        crate::decode::<StoredClock, 64>(bytes)
    }
}

/// The stored end of a restored lease that no holder has re-attached yet (tree
/// `detached/v1`); the variant is the format version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StoredDeadline {
    /// Format version 1: the wall-clock time the lease ends by.
    V1(UnixTime),
}

impl StoredDeadline {
    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        crate::encode(self)
    }

    /// Decodes from the store, bounded.
    pub fn decode(bytes: &[u8]) -> Result<StoredDeadline, crate::DecodeError> {
        crate::decode::<StoredDeadline, 64>(bytes)
    }
}

/// Largest stored lease record we decode.
pub const MAX_STORED_LEASE: usize = 16 * 1024;

impl StoredLease {
    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        crate::encode(self)
    }

    /// Decodes from the store, bounded.
    pub fn decode(bytes: &[u8]) -> Result<StoredLease, crate::DecodeError> {
        crate::decode::<StoredLease, MAX_STORED_LEASE>(bytes)
    }
}
