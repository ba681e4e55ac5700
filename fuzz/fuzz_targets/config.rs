//! `tallyd.toml` as `tallyd` reads it: `DaemonConfig::parse` (TOML, defaults, validation).
//!
//! Property: no panic on any text; an accepted config also passes `validate` again and
//! its error messages name the file.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use tally_config::DaemonConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/tally/tallyd.toml");
    match DaemonConfig::parse(path, text) {
        Ok(config) => {
            assert!(config.validate(path).is_ok());
            assert!(config.heartbeat_secs >= 1);
            assert!(config.lease_ttl_secs >= 2 * config.heartbeat_secs);
        }
        Err(e) => assert!(e.to_string().starts_with("/etc/tally/tallyd.toml"), "{e}"),
    }
});
