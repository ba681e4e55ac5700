//! Bundle files as `tallyd` loads them: armour, envelope, vendor signature against the
//! demo vendor key, body, binding.
//!
//! Input: bundle file text, or `0xff` + a bundle body that the target signs with the demo
//! vendor key (see `tally_fuzz`), so the body decoder behind the signature is reached.
//! Property: no panic; armour and signature round trips hold; a verified bundle re-signed
//! verifies to the same bundle.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_fuzz::{classify, server_key, Input};
use tally_protocol::bundle;
use tally_protocol::keys::demo;
use tally_protocol::signed::{Domain, Signed};

fn load(text: &str) {
    let trusted = [demo::vendor_public()];
    let signed = match bundle::from_armored(text) {
        Ok(signed) => signed,
        Err(e) => return drop(e.to_string()),
    };
    // The envelope survives armouring unchanged.
    assert_eq!(
        bundle::from_armored(&bundle::to_armored(&signed)).as_ref(),
        Ok(&signed)
    );
    match bundle::verify(&signed, &trusted) {
        Ok(verified) => {
            assert_eq!(verified.signed, signed);
            let b = &verified.bundle;
            let _ = bundle::check_binding(b, &server_key().public(), false);
            let _ = bundle::check_binding(b, &server_key().public(), true);
            for f in &b.features {
                let _ = f.describe();
            }
            if let Some(until) = b.valid_until {
                let _ = until.last_day();
            }
            // Re-signing the decoded bundle gives a bundle that verifies to itself.
            let again = bundle::sign(b, &demo::vendor_secret());
            assert_eq!(
                bundle::verify(&again, &trusted).map(|v| v.bundle).as_ref(),
                Ok(b)
            );
        }
        Err(e) => drop(e.to_string()),
    }
}

fuzz_target!(|data: &[u8]| {
    match classify(data) {
        Input::Text(text) => load(text),
        Input::Raw(body) => {
            let signed = Signed::sign(Domain::Bundle, body.to_vec(), &demo::vendor_secret());
            load(&bundle::to_armored(&signed));
        }
        Input::Other => {}
    }
});
