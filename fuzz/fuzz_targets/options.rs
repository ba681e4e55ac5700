//! FlexLM options files as `tallyd import-options` reads them.
//!
//! Property: no panic on any bytes; a conversion that succeeds writes a policy that
//! `Policy::parse` reads (tallyd's next step), and lists no more lines than the file has.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use tally_config::options;
use tally_config::Policy;

fuzz_target!(|data: &[u8]| {
    match options::convert_bytes("site.opt", data) {
        Ok(c) => {
            Policy::parse(Path::new("policy.toml"), &c.policy)
                .unwrap_or_else(|e| panic!("converted policy does not parse: {e}\n{}", c.policy));
            let lines = data.split(|&b| b == b'\n').count();
            assert!(c.mapped + c.unmapped.len() <= lines);
            assert!(c.unmapped.iter().all(|u| u.line >= 1 && u.line <= lines));
        }
        Err(e) => {
            let text = e.to_string();
            assert!(text.starts_with("site.opt:"), "{text}");
            assert!(!text.contains("a bug in import-options"), "{text}");
        }
    }
});
