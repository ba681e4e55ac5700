//! The signed envelope: the bytes of a value, who signed them, and the signature.
//!
//! The signature covers a domain tag and the exact body bytes as they travel, never a
//! re-encoding, so a one-byte edit anywhere fails verification and a signature made for
//! one kind of document (a lease) can never be passed off as another (a bundle).

use crate::keys::{KeyError, PublicKey, SecretKey};
use serde::{Deserialize, Serialize};

/// What a signature is for; part of the signed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Domain {
    /// An entitlement bundle, signed by a vendor key.
    Bundle,
    /// A lease token, signed by a server key.
    Lease,
}

impl Domain {
    fn tag(self) -> &'static [u8] {
        match self {
            Domain::Bundle => b"tally/bundle/v1\0",
            Domain::Lease => b"tally/lease/v1\0",
        }
    }
}

/// A body with its signer and signature. Versioned by its enum tag in the encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    /// The encoded value that was signed.
    pub body: Vec<u8>,
    /// The public key of the signer.
    pub signer: PublicKey,
    /// ed25519 signature over the domain tag followed by `body`.
    pub signature: Vec<u8>,
}

impl Signed {
    /// Signs `body` for `domain` with `key`.
    pub fn sign(domain: Domain, body: Vec<u8>, key: &SecretKey) -> Signed {
        let signature = key.sign(&message(domain, &body));
        Signed {
            body,
            signer: key.public(),
            signature,
        }
    }

    /// Verifies the signature for `domain` against the signer named in the envelope.
    /// Whether that signer is trusted is the caller's decision.
    pub fn verify(&self, domain: Domain) -> Result<(), KeyError> {
        self.signer
            .verify(&message(domain, &self.body), &self.signature)
    }
}

fn message(domain: Domain, body: &[u8]) -> Vec<u8> {
    let tag = domain.tag();
    let mut m = Vec::with_capacity(tag.len() + body.len());
    m.extend_from_slice(tag);
    m.extend_from_slice(body);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_do_not_mix() {
        let key = SecretKey::from_seed([1; 32]);
        let s = Signed::sign(Domain::Lease, b"body".to_vec(), &key);
        assert!(s.verify(Domain::Lease).is_ok());
        assert!(s.verify(Domain::Bundle).is_err());
        let mut edited = s.clone();
        edited.body[0] ^= 1;
        assert!(edited.verify(Domain::Lease).is_err());
    }
}
