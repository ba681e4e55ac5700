//! The usage journal and report export, as pure functions over entries and state.
//!
//! The shell numbers and stores the entries (in the same flush as the lease changes
//! they describe); building a report needs nothing but the entries, the chain state and
//! the server's key, so tests drive it with made-up times.

use crate::ledger::{Event, ReleaseReason, SeatChange};
use tally_protocol::bundle::Bundle;
use tally_protocol::keys::SecretKey;
use tally_protocol::report::{
    self, JournalEntry, Report, ReportState, ServedBundle, UsageEvent, Withdrawn,
};
use tally_protocol::time::UnixTime;

/// The events that say which bundles a starting daemon serves: the terms of each, then
/// the set in force.
pub fn bundles_at_start(bundles: &[Bundle]) -> Vec<UsageEvent> {
    let mut out: Vec<UsageEvent> = bundles.iter().flat_map(terms_events).collect();
    out.push(UsageEvent::BundlesInForce {
        why: "start".into(),
        bundles: bundles.iter().map(|b| b.id.clone()).collect(),
        withdrawn: Vec::new(),
    });
    out
}

/// The `BundleTerms` events of one bundle, in parts of bounded size.
fn terms_events(b: &Bundle) -> Vec<UsageEvent> {
    ServedBundle::of(b)
        .parts()
        .into_iter()
        .map(|bundle| UsageEvent::BundleTerms { bundle })
        .collect()
}

/// The events for a change of the served set from `before` to `after` at `now` (a
/// reload): the terms of each bundle that is new or changed, then the new set with the
/// bundles that left it and why. Nothing when the set and its terms are unchanged.
pub fn bundle_changes(
    before: &[Bundle],
    after: &[Bundle],
    why: &str,
    now: UnixTime,
) -> Vec<UsageEvent> {
    let mut out: Vec<UsageEvent> = Vec::new();
    for b in after {
        let served = ServedBundle::of(b);
        let known = before.iter().find(|p| p.id == b.id).map(ServedBundle::of);
        if known.as_ref() != Some(&served) {
            out.extend(terms_events(b));
        }
    }
    let withdrawn: Vec<Withdrawn> = before
        .iter()
        .filter(|p| !after.iter().any(|b| b.id == p.id))
        .map(|p| Withdrawn {
            bundle: p.id.clone(),
            why: match after.iter().find(|b| b.supersedes.contains(&p.id)) {
                Some(by) => format!("superseded by {}", by.id),
                None if p.valid_until.is_some_and(|u| u <= now) => "expired".into(),
                None => "no longer served (removed, refused or returned: see the log)".into(),
            },
        })
        .collect();
    if out.is_empty() && withdrawn.is_empty() && before.len() == after.len() {
        return out;
    }
    out.push(UsageEvent::BundlesInForce {
        why: why.into(),
        bundles: after.iter().map(|b| b.id.clone()).collect(),
        withdrawn,
    });
    out
}

/// The event `tallyd return` journals: bundle `id` left the served set, `after` stays.
pub fn returned(id: &str, after: &[Bundle]) -> UsageEvent {
    UsageEvent::BundlesInForce {
        why: format!("returned {id}"),
        bundles: after.iter().map(|b| b.id.clone()).collect(),
        withdrawn: vec![Withdrawn {
            bundle: id.into(),
            why: "returned".into(),
        }],
    }
}

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

/// The usage event of a seat set a licensing model opened or closed: a grant or
/// release of the pool with an empty user and host (it counts seats, not a checkout).
pub fn seat_set_event(change: &SeatChange) -> Option<UsageEvent> {
    match change {
        SeatChange::Member(_) => None,
        SeatChange::Opened { id, pool, seats } => Some(UsageEvent::Granted {
            lease: *id,
            feature: pool.clone(),
            count: *seats,
            overdraft: false,
            user: String::new(),
            host: String::new(),
            borrowed_until: None,
        }),
        SeatChange::Closed { id, pool, seats } => Some(UsageEvent::Released {
            lease: *id,
            feature: pool.clone(),
            count: *seats,
            why: "seat_set_closed".into(),
        }),
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
        ReleaseReason::Unclaimed => "unclaimed",
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
    let bundles_end = report::replay_bundles(state.bundles.as_deref(), &entries);
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
        bundles_at_start: state.bundles.clone(),
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
            bundles: bundles_end,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_protocol::bundle::{Customer, FeatureGrant};

    fn bundle(id: &str, supersedes: &[&str], until: Option<u64>) -> Bundle {
        Bundle {
            id: id.into(),
            issued_at: UnixTime(0),
            vendor: "Acme".into(),
            customer: Customer {
                id: "C-1".into(),
                name: "Example".into(),
            },
            binding: vec![],
            supersedes: supersedes.iter().map(|s| s.to_string()).collect(),
            valid_from: None,
            valid_until: until.map(UnixTime),
            features: vec![FeatureGrant::counted("solver", 2)],
        }
    }

    #[test]
    fn a_reload_journals_new_terms_and_why_each_bundle_left() {
        let trial = bundle("trial", &[], None);
        let eval = bundle("eval", &[], Some(50));
        let gone = bundle("gone", &[], None);
        let paid = bundle("paid", &["trial"], None);
        let before = [trial.clone(), eval, gone];
        let events = bundle_changes(&before, std::slice::from_ref(&paid), "reload", UnixTime(60));
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(
            events[0],
            UsageEvent::BundleTerms {
                bundle: ServedBundle::of(&paid)
            }
        );
        let UsageEvent::BundlesInForce {
            why,
            bundles,
            withdrawn,
        } = &events[1]
        else {
            panic!("{events:?}")
        };
        assert_eq!(
            (why.as_str(), bundles.clone()),
            ("reload", vec!["paid".to_string()])
        );
        let whys: Vec<(&str, &str)> = withdrawn
            .iter()
            .map(|w| (w.bundle.as_str(), w.why.as_str()))
            .collect();
        assert_eq!(whys[0], ("trial", "superseded by paid"));
        assert_eq!(whys[1], ("eval", "expired"));
        assert!(whys[2].0 == "gone" && whys[2].1.starts_with("no longer served"));
        // Nothing changed, nothing journaled.
        let same = std::slice::from_ref(&trial);
        assert!(bundle_changes(same, same, "reload", UnixTime(60)).is_empty());
    }
}
