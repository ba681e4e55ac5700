//! Usage reports as the vendor's `tally-publisher verify-report` and `reconcile` read
//! them: armour, envelope, signature by the server key the report names, body, then the
//! chain checks and the reconciliation against the bundle.
//!
//! A report is signed by the customer's own server key, so its contents are only as
//! trustworthy as the customer: every field may be hostile.
//!
//! Input: report text, or `0xff` + a report body that the target signs with a fixed
//! server key. Property: no panic; a report that verifies re-signs to one that reads
//! back unchanged, with the digest `sign` announced.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_fuzz::{classify, encode, server_key, Input};
use tally_protocol::armor::armor;
use tally_protocol::bundle::{Binding, Bundle, Component, Customer, FeatureGrant, Seats};
use tally_protocol::report::{self, Report, REPORT_LABEL};
use tally_protocol::signed::{Domain, Signed};
use tally_protocol::time::{UnixTime, DAY};
use tally_publisher::reconcile::{self, ReportFile};

/// The bundle the reports are reconciled against: bound to the fuzz server key.
fn bundle() -> Bundle {
    let mut suite = FeatureGrant::counted("suite", 2);
    suite.components = vec![Component::named("solver"), Component::named("viewer")];
    let mut upgrade = FeatureGrant::counted("solver", 1);
    upgrade.upgrade_from = Some("1".into());
    upgrade.version_ceiling = Some("2".into());
    Bundle {
        id: "b".into(),
        issued_at: UnixTime(0),
        vendor: "v".into(),
        customer: Customer {
            id: "c".into(),
            name: "C".into(),
        },
        binding: vec![Binding {
            server_key: server_key().public(),
            host_fingerprint: "h".into(),
        }],
        supersedes: vec![],
        valid_from: None,
        valid_until: None,
        features: vec![
            FeatureGrant::counted("solver", 5),
            FeatureGrant {
                seats: Seats::Uncounted,
                ..FeatureGrant::counted("viewer", 0)
            },
            suite,
            upgrade,
        ],
    }
}

fn reconcile_chain(files: &[ReportFile]) {
    let bundle = bundle();
    match reconcile::verify_chain(&bundle, files) {
        Ok(links) => {
            assert_eq!(links.len(), files.len());
            let r = reconcile::reconcile(&bundle, &links);
            let _ = reconcile::to_csv(&r);
            let _ = reconcile::to_html(&r);
        }
        Err(problems) => assert!(!problems.is_empty()),
    }
}

fn read(text: &str) {
    let verified = match report::read(text) {
        Ok(verified) => verified,
        Err(e) => return drop(e.to_string()),
    };
    let key = server_key();
    let mut ours = verified.report.clone();
    ours.server_key = key.public();
    let (again, digest) = report::sign(&ours, &key);
    let back = report::read(&again).expect("a freshly signed report reads back");
    assert_eq!(back.report, ours);
    assert_eq!(back.digest, digest);

    // The vendor's path: the report alone, then followed by a well-formed next report.
    let first = ReportFile {
        name: "1.report".into(),
        text: again,
    };
    reconcile_chain(std::slice::from_ref(&first));
    let from = ours.period_to;
    let next = Report {
        report_seq: ours.report_seq.wrapping_add(1),
        previous_digest: digest,
        first_event: ours.last_event.wrapping_add(1),
        last_event: ours.last_event,
        period_from: from,
        period_to: from.plus_secs(DAY),
        open_at_start: report::replay_open(&ours.open_at_start, &ours.events),
        events: vec![],
        summaries: vec![],
        ..ours
    };
    let second = ReportFile {
        name: "2.report".into(),
        text: report::sign(&next, &key).0,
    };
    reconcile_chain(&[first, second]);
}

fuzz_target!(|data: &[u8]| {
    match classify(data) {
        Input::Text(text) => read(text),
        Input::Raw(body) => {
            let signed = Signed::sign(Domain::Report, body.to_vec(), &server_key());
            read(&armor(REPORT_LABEL, &encode(&signed)));
        }
        Input::Other => {}
    }
});
