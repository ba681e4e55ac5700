//! Records as `tallyd` reads them back from its sled store at start, at export and after
//! a repair: leases, journal entries and chunks, the report chain state, the clock
//! high-water mark. A store is local, but a disk, a crash or a bug can leave any bytes
//! there, and the daemon must then report the record instead of crashing.
//!
//! Input: one byte choosing the record type, then the stored value. Property: no panic
//! and no allocation past the decoder's bound; a value that decodes encodes to one that
//! decodes to the same value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_protocol::lease::{StoredClock, StoredLease};
use tally_protocol::report::{StoredJournal, StoredJournalChunk, StoredReportState};

/// Decodes, and checks that what decoded survives a round trip.
macro_rules! round_trip {
    ($ty:ty, $bytes:expr) => {
        if let Ok(value) = <$ty>::decode($bytes) {
            assert_eq!(<$ty>::decode(&value.encode()).unwrap(), value);
        }
    };
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 5 {
        0 => round_trip!(StoredLease, bytes),
        1 => round_trip!(StoredJournal, bytes),
        2 => round_trip!(StoredJournalChunk, bytes),
        3 => round_trip!(StoredReportState, bytes),
        _ => round_trip!(StoredClock, bytes),
    }
});
