//! The daemon's clock: the ledger's `now` (tokio's clock, so paused-time tests drive
//! it) and the watch that notices when the daemon itself stood still.

use crate::ledger::{Ledger, Now};
use std::time::Duration;
use tally_protocol::time::UnixTime;
use tracing::warn;

/// The ledger task wakes at least this often, so that a gap between two wakes longer
/// than [`STALL_THRESHOLD`] shows that the daemon itself did not run.
const LEDGER_TICK: Duration = Duration::from_millis(500);
/// A gap between ledger wakes above this is a stall of the daemon (SIGSTOP, a paused
/// VM, a machine that froze), not of its clients.
const STALL_THRESHOLD: Duration = Duration::from_secs(3);

/// The current time for the ledger. Uses tokio's clock so paused-time tests drive it.
pub fn now() -> Now {
    Now {
        mono: tokio::time::Instant::now().into_std(),
        wall: UnixTime::now(),
    }
}

/// Notices that the daemon itself stood still: the ledger task wakes at least every
/// [`LEDGER_TICK`], so a longer gap between two wakes means the process did not run.
/// Time it did not run does not count against lease holders ([`Ledger::forgive`]), and
/// connections that time out during or shortly after such a stall keep their leases
/// ([`Ledger::connection_lost`]): their clients are most likely alive and reconnecting,
/// and handing their seats to others would put two programs on one seat.
pub(crate) struct StallWatch {
    last: std::time::Instant,
    /// When the last stall ended.
    ended: Option<std::time::Instant>,
    idle_timeout: Duration,
}

impl StallWatch {
    pub(crate) fn new(idle_timeout: Duration) -> StallWatch {
        StallWatch {
            last: std::time::Instant::now(),
            ended: None,
            idle_timeout,
        }
    }

    /// Starts watching afresh at `now` (a term as the cluster's leader begins: the time
    /// it followed was no stall).
    pub(crate) fn restart(&mut self, now: std::time::Instant) {
        self.last = now;
        self.ended = None;
    }

    pub(crate) fn next_tick(&self) -> std::time::Instant {
        self.last + LEDGER_TICK
    }

    pub(crate) fn observe(&mut self, now: Now, ledger: &mut Ledger) {
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
    pub(crate) fn recent(&self, now: Now) -> bool {
        self.ended.is_some_and(|e| {
            now.mono.saturating_duration_since(e) <= self.idle_timeout + STALL_THRESHOLD
        })
    }
}
