//! The policy file as `tallyd` reads it: `Policy::parse`.
//!
//! Property: no panic on any text; an accepted policy keeps the promises `parse` makes
//! (groups named by rules exist, MAX has user/group subjects, seats where needed,
//! timeouts of at least 10 s, lowwater and linger of at least 1), and error messages
//! name the file.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use tally_config::policy::{Policy, Subject};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/tally/policy.toml");
    match Policy::parse(path, text) {
        Ok(p) => {
            let all = p
                .reserve
                .iter()
                .chain(&p.max)
                .chain(&p.include)
                .chain(&p.exclude)
                .chain(&p.include_borrow)
                .chain(&p.exclude_borrow)
                .map(|r| &r.subject)
                .chain(&p.include_all)
                .chain(&p.exclude_all);
            for subject in all {
                match subject {
                    Subject::Group(g) => assert!(p.groups.contains_key(g)),
                    Subject::HostGroup(g) => assert!(p.host_groups.contains_key(g)),
                    _ => {}
                }
                let _ = p.matches(subject, "ana", "ws-1");
            }
            let _ = p.access("solver", "Ana", "ws-1");
            let _ = p.borrow_access("solver", "Ana", "ws-1");
            for rule in p.reserve.iter().chain(&p.max) {
                assert!(rule.seats >= 1);
            }
            for rule in &p.max {
                assert!(matches!(rule.subject, Subject::User(_) | Subject::Group(_)));
            }
            assert!(p.timeout_secs.values().all(|&s| s >= 10));
            assert!(p.timeout_all_secs.is_none_or(|s| s >= 10));
            assert!(p.borrow_lowwater.values().all(|&n| n >= 1));
            assert!(p.linger_secs.values().all(|&s| s >= 1));
        }
        Err(e) => assert!(e.to_string().starts_with("/etc/tally/policy.toml"), "{e}"),
    }
});
