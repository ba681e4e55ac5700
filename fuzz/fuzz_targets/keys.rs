//! Key material from files and from the network: the server certificate a client takes
//! from the TLS handshake (`cert::ed25519_key`, DER from a peer), and the armoured secret
//! and public key files `tallyd` and `tally-publisher` read.
//!
//! Property: no panic on any input; a key that reads also writes back to text that
//! reads as the same key.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_protocol::cert;
use tally_protocol::keys::{public_key_from_armored, public_key_to_armored, SecretKey};

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = cert::ed25519_key(data) {
        assert_eq!(
            public_key_from_armored(&public_key_to_armored(&key)).unwrap(),
            key
        );
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(secret) = SecretKey::from_armored(text) {
        let again = SecretKey::from_armored(&secret.to_armored()).unwrap();
        assert_eq!(again.public(), secret.public());
    }
    if let Ok(public) = public_key_from_armored(text) {
        assert_eq!(
            public_key_from_armored(&public_key_to_armored(&public)).unwrap(),
            public
        );
    }
});
