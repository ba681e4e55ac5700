//! The vendor's lost-seat grace: how long a program may go on without its seat.
//!
//! A vendor sets, per feature in the signed bundle, a grace and what happens when it runs
//! out ([`LostSeatTerms`]: stop the program, or only warn). [`Session::lost_seat_terms`]
//! reads the terms for a feature from the server's verified bundles; [`SeatGrace`] keeps
//! the clock: fed every [`LeaseStatus`] the application sees, it says when the grace
//! runs out. It is pure (time is an argument) so that it is tested with made-up times,
//! and it leaves the decision to the application: `tally run` stops its command or
//! warns, a program linking the library can save its work first.
//!
//! [`Session::lost_seat_terms`]: crate::Session::lost_seat_terms

use crate::LeaseStatus;
use std::time::{Duration, Instant};
pub use tally_protocol::bundle::{LostSeatTerms, OnLostSeat};

/// Tracks how long a program has been without its seat under the vendor's terms.
///
/// "Without a seat" is [`LeaseStatus::Reconnecting`] (the server out of reach, the seat
/// perhaps still held) and [`LeaseStatus::Lost`]; [`LeaseStatus::Active`] and
/// [`LeaseStatus::Borrowed`] are a seat. The clock starts at the first status without a
/// seat and stops at the next one with a seat (a lease re-attached, or a new one).
#[derive(Debug, Clone)]
pub struct SeatGrace {
    terms: LostSeatTerms,
    without_since: Option<Instant>,
}

impl SeatGrace {
    /// A clock under `terms`, starting with a seat.
    pub fn new(terms: LostSeatTerms) -> SeatGrace {
        SeatGrace {
            terms,
            without_since: None,
        }
    }

    /// The vendor's terms.
    pub fn terms(&self) -> LostSeatTerms {
        self.terms
    }

    /// Feeds a status seen at `now`.
    pub fn observe(&mut self, status: &LeaseStatus, now: Instant) {
        match status {
            LeaseStatus::Active | LeaseStatus::Borrowed { .. } => self.without_since = None,
            LeaseStatus::Reconnecting | LeaseStatus::Lost(_) => {
                self.without_since.get_or_insert(now);
            }
        }
    }

    /// Since when the program has been without its seat; `None` while it holds one.
    pub fn without_seat_since(&self) -> Option<Instant> {
        self.without_since
    }

    /// When the grace runs out; `None` while a seat is held, or when the grace is too
    /// long for the clock to represent (which is as good as never).
    pub fn deadline(&self) -> Option<Instant> {
        self.without_since?
            .checked_add(Duration::from_secs(self.terms.grace_secs))
    }

    /// Whether the grace has run out at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_runs_only_without_a_seat_and_restarts_after_one() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut g = SeatGrace::new(LostSeatTerms {
            grace_secs: 10,
            action: OnLostSeat::Stop,
        });
        g.observe(&LeaseStatus::Active, s(0));
        assert_eq!(g.deadline(), None);
        assert!(!g.expired(s(1000)));
        // Lost at 5: the grace runs to 15, whatever else is seen meanwhile.
        g.observe(&LeaseStatus::Reconnecting, s(5));
        g.observe(&LeaseStatus::Lost("removed".into()), s(8));
        assert_eq!(g.without_seat_since(), Some(s(5)));
        assert_eq!(g.deadline(), Some(s(15)));
        assert!(!g.expired(s(14)));
        assert!(g.expired(s(15)));
        // A seat again at 12: the clock stops; the next loss starts a full grace.
        g.observe(&LeaseStatus::Active, s(12));
        assert!(!g.expired(s(20)));
        g.observe(&LeaseStatus::Reconnecting, s(30));
        assert_eq!(g.deadline(), Some(s(40)));
        g.observe(
            &LeaseStatus::Borrowed {
                until: tally_protocol::time::UnixTime(1),
            },
            s(31),
        );
        assert_eq!(g.deadline(), None);
    }

    #[test]
    fn a_grace_too_long_for_the_clock_never_runs_out() {
        let mut g = SeatGrace::new(LostSeatTerms {
            grace_secs: u64::MAX,
            action: OnLostSeat::Stop,
        });
        let now = Instant::now();
        g.observe(&LeaseStatus::Reconnecting, now);
        assert_eq!(g.deadline(), None);
        assert!(!g.expired(now + Duration::from_secs(1 << 40)));
    }
}
