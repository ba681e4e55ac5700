//! RLM license files as `tally-publisher import-rlm` reads them.
//!
//! Property: no panic on any text; an import that succeeds writes a spec that
//! `Spec::parse` reads back (the vendor's next step), with one `[[feature]]` per entry.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use tally_publisher::rlm;
use tally_publisher::spec::Spec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match rlm::import("license.lic", text) {
        Ok(import) => {
            let spec = Spec::parse(Path::new("imported.toml"), &import.spec)
                .unwrap_or_else(|e| panic!("imported spec does not parse: {e}\n{}", import.spec));
            assert_eq!(spec.feature.len(), import.features);
        }
        Err(e) => drop(e.to_string()),
    }
});
