//! Inputs found by `cargo fuzz run flexlm` (see fuzz/README.md), kept so they stay fixed.

use std::path::Path;
use tally_publisher::flexlm;
use tally_publisher::spec::Spec;

/// An import that succeeds must give a spec the vendor can parse.
fn spec_parses(source: &str, text: &str) -> flexlm::Import {
    let import = flexlm::import(source, text).unwrap();
    let spec = Spec::parse(Path::new("imported.toml"), &import.spec)
        .unwrap_or_else(|e| panic!("{e}\n{}", import.spec));
    assert_eq!(spec.feature.len(), import.features);
    import
}

/// A FEATURE/INCREMENT/UPGRADE line without its count read one word past the end
/// (index out of bounds, a panic) instead of naming the form it needs.
#[test]
fn feature_line_without_count_is_refused_by_line() {
    for (text, form) in [
        (
            &b"INCREMENT n t . 5-sep-2027"[..],
            "INCREMENT needs the form",
        ),
        (
            b"FEATURE solver acmed 2027.1 31-dec-2027\n",
            "FEATURE needs the form",
        ),
        (
            b"SERVER h ANY\n\nUPGRADE solver acmed 2026.0 2027.1 31-dec-2027 SIGN=00\n",
            "UPGRADE needs the form",
        ),
    ] {
        let text = std::str::from_utf8(text).unwrap();
        let err = flexlm::import("t.lic", text).unwrap_err();
        assert!(err.message.starts_with(form), "{err}");
        assert_eq!(err.line, text.lines().count(), "{err}");
    }
}

/// With the count now part of the form, it is no longer listed as an old-style key.
#[test]
fn count_is_not_taken_for_an_old_style_key() {
    let import = spec_parses(
        "t.lic",
        "FEATURE f v 1.0 permanent 4 0123456789AB\nUPGRADE f v 1.0 2.0 permanent 3\n",
    );
    assert!(import.unmapped.iter().any(|u| u.contains("'0123456789AB'")));
    assert!(
        !import.unmapped.iter().any(|u| u.contains("'4'")),
        "{:?}",
        import.unmapped
    );
    assert!(
        !import.unmapped.iter().any(|u| u.contains("'3'")),
        "{:?}",
        import.unmapped
    );
    assert!(
        import
            .spec
            .contains("# line 1: FEATURE f v 1.0 permanent 4\n"),
        "{}",
        import.spec
    );
}

/// Control characters from the license file ended up verbatim in the spec's comments,
/// where TOML forbids them: the import "succeeded" with a spec nobody could parse.
/// (Found as `... HOSTID=000c29aabbcc ck\x01\0\0\0\0\0\0\0=123`.)
#[test]
fn control_characters_are_escaped_in_comments() {
    let import = spec_parses(
        "t.lic",
        "FEATURE plotter mathd 1.5 permanent 0 HOSTID=000c29aabbcc ck\x01\0\0\0\0\0\0\0=123\n",
    );
    assert!(import.spec.contains("ck\\u0001\\u0000"), "{}", import.spec);
    spec_parses(
        "t.lic",
        "SERVER a\rb ANY\nVENDOR v\x7f\nFEATURE f v 1 permanent 2 X\x1b=1\n",
    );
    // The file name is shown too, and names can hold anything.
    spec_parses("odd\nname\r.lic", "FEATURE f v 1 permanent 2\n");
}

mod reconcile_hostile_reports {
    //! Reports are signed by the customer's own server key, so a customer can sign any
    //! contents: `cargo fuzz run report` feeds them to `verify_chain` and `reconcile`.

    use tally_protocol::bundle::{Binding, Bundle, Customer, FeatureGrant};
    use tally_protocol::keys::SecretKey;
    use tally_protocol::lease::LeaseId;
    use tally_protocol::report::{self, JournalEntry, Report, UsageEvent};
    use tally_protocol::time::UnixTime;
    use tally_publisher::reconcile::{self, ChainLink, ReportFile};

    fn key() -> SecretKey {
        SecretKey::from_seed([3; 32])
    }

    fn bundle() -> Bundle {
        Bundle {
            id: "b".into(),
            issued_at: UnixTime(0),
            vendor: "v".into(),
            customer: Customer {
                id: "c".into(),
                name: "C".into(),
            },
            binding: vec![Binding {
                server_key: key().public(),
                host_fingerprint: "h".into(),
            }],
            supersedes: vec![],
            valid_from: None,
            valid_until: None,
            features: vec![FeatureGrant::counted("solver", 5)],
        }
    }

    fn grant(seq: u64, lease: u64, count: u32) -> JournalEntry {
        JournalEntry {
            seq,
            at: UnixTime(150),
            event: UsageEvent::Granted {
                lease: LeaseId(lease),
                feature: "solver".into(),
                count,
                overdraft: false,
                user: "u".into(),
                host: "h".into(),
                borrowed_until: None,
            },
        }
    }

    fn report(seq: u64, first_event: u64, events: Vec<JournalEntry>) -> Report {
        Report {
            report_seq: seq,
            server_key: key().public(),
            host_fingerprint: "h".into(),
            customers: vec![],
            bundle_ids: vec![],
            period_from: UnixTime(100),
            period_to: UnixTime(1000),
            first_event,
            last_event: events.last().map_or(first_event.wrapping_sub(1), |e| e.seq),
            previous_digest: [0; 32],
            open_at_start: vec![],
            events,
            summaries: vec![],
            bundles_at_start: None,
        }
    }

    fn file(name: &str, r: &Report) -> ReportFile {
        ReportFile {
            name: name.into(),
            text: report::sign(r, &key()).0,
        }
    }

    /// Seat counts adding up past u32::MAX overflowed (a panic with overflow checks, a
    /// wrapped and wrong figure without).
    #[test]
    fn seat_counts_saturate() {
        let r = report(1, 1, vec![grant(1, 1, u32::MAX), grant(2, 2, u32::MAX)]);
        let links = reconcile::verify_chain(&bundle(), &[file("1", &r)]).unwrap();
        let rec = reconcile::reconcile(&bundle(), &links);
        assert_eq!(rec.features[0].total.peak, u32::MAX);
        assert!(reconcile::to_csv(&rec).contains(&u32::MAX.to_string()));
    }

    /// Event numbers at u64::MAX overflowed the chain checks.
    #[test]
    fn event_numbers_at_the_end_of_u64_are_checked_not_overflowed() {
        let r = report(5, u64::MAX, vec![grant(u64::MAX, 1, 1)]);
        assert!(reconcile::verify_chain(&bundle(), &[file("5", &r)]).is_ok());
        let r = report(5, u64::MAX, vec![grant(u64::MAX, 1, 1), grant(0, 2, 1)]);
        let problems = reconcile::verify_chain(&bundle(), &[file("5", &r)]).unwrap_err();
        assert!(
            problems[0].contains("event 0 follows event 18446744073709551615"),
            "{problems:?}"
        );

        let (text, digest) = report::sign(&report(5, 7, vec![grant(u64::MAX, 1, 1)]), &key());
        let mut next = report(6, 0, vec![]);
        next.previous_digest = digest;
        let first = ReportFile {
            name: "5".into(),
            text,
        };
        let problems = reconcile::verify_chain(&bundle(), &[first, file("6", &next)]).unwrap_err();
        assert!(
            problems.iter().any(|p| p.contains("6: cannot follow 5")),
            "{problems:?}"
        );
    }

    /// A period that ends before it starts: refused when read, and `reconcile` (whose
    /// links are public) does not panic on one either.
    #[test]
    fn inverted_period_is_refused_and_does_not_panic() {
        let mut r = report(1, 1, vec![grant(1, 1, 2)]);
        r.period_from = UnixTime(1000);
        r.period_to = UnixTime(100);
        let problems = reconcile::verify_chain(&bundle(), &[file("1", &r)]).unwrap_err();
        assert!(problems[0].contains("before it starts"), "{problems:?}");
        let (_, digest) = report::sign(&r, &key());
        let link = ChainLink {
            name: "1".into(),
            report: report::VerifiedReport { report: r, digest },
        };
        let rec = reconcile::reconcile(&bundle(), &[link]);
        let _ = reconcile::to_html(&rec);
    }
}
