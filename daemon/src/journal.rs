//! The usage journal and report export, as pure functions over entries and state.
//!
//! The shell numbers and stores the entries (in the same flush as the lease changes
//! they describe); building a report needs nothing but the entries, the chain state and
//! the server's key, so tests drive it with made-up times.

use crate::ledger::{Event, ReleaseReason};
use tally_protocol::keys::SecretKey;
use tally_protocol::report::{self, JournalEntry, Report, ReportState, UsageEvent};
use tally_protocol::time::UnixTime;

/// The usage event for a ledger event.
pub fn usage_event(event: &Event) -> UsageEvent {
    match event {
        Event::Granted(r) => UsageEvent::Granted {
            lease: r.id,
            feature: r.feature.clone(),
            count: r.count,
            overdraft: r.overdraft,
            user: r.holder.user.clone(),
            host: r.holder.host.clone(),
            borrowed_until: r.borrowed_until,
        },
        Event::Released {
            id,
            feature,
            count,
            why,
            ..
        } => UsageEvent::Released {
            lease: *id,
            feature: feature.clone(),
            count: *count,
            why: release_code(*why).into(),
        },
    }
}

fn release_code(why: ReleaseReason) -> &'static str {
    match why {
        ReleaseReason::Checkin => "checkin",
        ReleaseReason::ConnectionClosed => "connection_closed",
        ReleaseReason::Expired => "expired",
        ReleaseReason::LingerEnded => "linger_ended",
        ReleaseReason::Removed => "removed",
        ReleaseReason::BorrowEnded => "borrow_ended",
    }
}

/// Who the server is, for report headers.
#[derive(Debug, Clone)]
pub struct ReportIdentity {
    /// The server key.
    pub key: SecretKey,
    /// The host fingerprint.
    pub host_fingerprint: String,
    /// Customer ids of the bundles served.
    pub customers: Vec<String>,
    /// Bundle ids served.
    pub bundle_ids: Vec<String>,
}

/// A built report: its text, and the state the chain moves to once it is stored.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The armoured, signed report.
    pub text: String,
    /// The report's number.
    pub report_seq: u64,
    /// Events it covers.
    pub events: usize,
    /// The new chain state.
    pub state: ReportState,
}

/// Builds the next report of the chain from `entries` (the journal after
/// `state.last_event`, in order) at time `now`.
pub fn build_report(
    identity: &ReportIdentity,
    state: &ReportState,
    entries: Vec<JournalEntry>,
    now: UnixTime,
) -> Exported {
    let first_event = state.last_event + 1;
    let last_event = entries.last().map(|e| e.seq).unwrap_or(state.last_event);
    let period_from = state
        .period_end
        .or_else(|| entries.first().map(|e| e.at))
        .unwrap_or(now);
    let period_to = now.max(period_from);
    let open_end = report::replay_open(&state.open, &entries);
    let summaries = report::summarize(&state.open, &entries, period_from, period_to);
    let events = entries.len();
    let report = Report {
        report_seq: state.report_seq + 1,
        server_key: identity.key.public(),
        host_fingerprint: identity.host_fingerprint.clone(),
        customers: identity.customers.clone(),
        bundle_ids: identity.bundle_ids.clone(),
        period_from,
        period_to,
        first_event,
        last_event,
        previous_digest: state.digest,
        open_at_start: state.open.clone(),
        events: entries,
        summaries,
    };
    let (text, digest) = report::sign(&report, &identity.key);
    Exported {
        text,
        report_seq: report.report_seq,
        events,
        state: ReportState {
            report_seq: report.report_seq,
            last_event,
            digest,
            period_end: Some(period_to),
            open: open_end,
        },
    }
}
