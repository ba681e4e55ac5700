//! Activation requests and return proofs as `tally-publisher` reads them: armour,
//! envelope, signature by the key they name, body.
//!
//! Input: file text (either kind; the armour label decides), or `0xff`, a selector byte
//! (even: request, odd: return proof) and a body that the target signs with a fixed
//! server key. Property: no panic; what verifies re-signs and reads back unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_fuzz::{classify, server_key, Input};
use tally_protocol::activation::{self, REQUEST_LABEL, RETURN_LABEL};
use tally_protocol::signed::{self, Domain, Signed};

fn read(text: &str) {
    let key = server_key();
    match activation::request_from_armored(text) {
        Ok(request) => {
            assert_eq!(
                signed::from_armored(REQUEST_LABEL, text).map(|s| s.signer),
                Ok(request.server_key)
            );
            let _ = request.server_key.fingerprint();
            let mut ours = request.clone();
            ours.server_key = key.public();
            let again = activation::request_to_armored(&ours, &key);
            assert_eq!(activation::request_from_armored(&again), Ok(ours));
        }
        Err(e) => drop(e.to_string()),
    }
    match activation::return_from_armored(text) {
        Ok(proof) => {
            let mut ours = proof.clone();
            ours.server_key = key.public();
            let again = activation::return_to_armored(&ours, &key);
            assert_eq!(activation::return_from_armored(&again), Ok(ours));
        }
        Err(e) => drop(e.to_string()),
    }
}

fuzz_target!(|data: &[u8]| {
    match classify(data) {
        Input::Text(text) => read(text),
        Input::Raw(raw) => {
            let Some((&which, body)) = raw.split_first() else {
                return;
            };
            let (domain, label) = if which % 2 == 0 {
                (Domain::ActivationRequest, REQUEST_LABEL)
            } else {
                (Domain::ReturnProof, RETURN_LABEL)
            };
            let signed = Signed::sign(domain, body.to_vec(), &server_key());
            read(&signed::to_armored(label, &signed));
        }
        Input::Other => {}
    }
});
