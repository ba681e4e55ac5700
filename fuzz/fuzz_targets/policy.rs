//! The policy file as `tallyd` reads it: `Policy::parse`.
//!
//! Property: no panic on any text; an accepted policy keeps the promises `parse` makes
//! (groups named by rules exist, MAX has user/group subjects, seats where needed,
//! timeouts of at least 10 s), and error messages name the file.

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
                .chain(&p.exclude);
            for rule in all {
                match &rule.subject {
                    Subject::Group(g) => assert!(p.groups.contains_key(g)),
                    Subject::HostGroup(g) => assert!(p.host_groups.contains_key(g)),
                    _ => {}
                }
                let _ = p.matches(&rule.subject, "ana", "ws-1");
            }
            for rule in p.reserve.iter().chain(&p.max) {
                assert!(rule.seats >= 1);
            }
            for rule in &p.max {
                assert!(matches!(rule.subject, Subject::User(_) | Subject::Group(_)));
            }
            assert!(p.timeout_secs.values().all(|&s| s >= 10));
        }
        Err(e) => assert!(e.to_string().starts_with("/etc/tally/policy.toml"), "{e}"),
    }
});
