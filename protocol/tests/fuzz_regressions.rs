//! Inputs found by the cargo-fuzz targets in `fuzz/` (see fuzz/README.md), kept so they
//! stay fixed. Raw inputs are stored in `tests/fuzz-findings/` exactly as the fuzzer
//! wrote them.

use tally_protocol::armor::armor;
use tally_protocol::keys::SecretKey;
use tally_protocol::lease::LeaseId;
use tally_protocol::report::{self, JournalEntry, ReportError, UsageEvent, REPORT_LABEL};
use tally_protocol::signed::{Domain, Signed};
use tally_protocol::time::UnixTime;

/// The key the fuzz targets sign raw bodies with (`tally_fuzz::server_key`).
fn fuzz_key() -> SecretKey {
    SecretKey::from_seed(*b"tally fuzz server key, public!!!")
}

/// What the `report` target does with an input starting with 0xff: sign the rest as a
/// report body with the fuzz key and armour it.
fn report_text(input: &[u8]) -> String {
    let body = input
        .strip_prefix(&[0xff])
        .expect("a raw-body input")
        .to_vec();
    let signed = Signed::sign(Domain::Report, body, &fuzz_key());
    let bytes = bincode::serde::encode_to_vec(&signed, bincode::config::standard()).unwrap();
    armor(REPORT_LABEL, &bytes)
}

/// `cargo fuzz run report`: a validly signed report whose period ends before it starts
/// made reconciliation panic (`u64::clamp` with min > max). Reading it now refuses it.
#[test]
fn report_whose_period_ends_before_it_starts_is_refused() {
    let input = include_bytes!("fuzz-findings/report-period-ends-before-start");
    let err = report::read(&report_text(input)).unwrap_err();
    assert!(
        matches!(&err, ReportError::Malformed(m) if m.contains("ends") && m.contains("before it starts")),
        "{err}"
    );
}

/// `summarize` itself takes an inverted period without panicking.
#[test]
fn summarize_takes_an_inverted_period() {
    let events = [JournalEntry {
        seq: 1,
        at: UnixTime(150),
        event: UsageEvent::Granted {
            lease: LeaseId(1),
            feature: "solver".into(),
            count: 1,
            overdraft: false,
            user: "u".into(),
            host: "h".into(),
            borrowed_until: None,
        },
    }];
    let s = report::summarize(&[], &events, UnixTime(200), UnixTime(100));
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].grants, 1);
}
