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
    /// An activation request, signed by the requesting server's key.
    ActivationRequest,
    /// A return proof, signed by the returning server's key.
    ReturnProof,
    /// A usage report, signed by the server key.
    Report,
}

impl Domain {
    fn tag(self) -> &'static [u8] {
        match self {
            Domain::Bundle => b"tally/bundle/v1\0",
            Domain::Lease => b"tally/lease/v1\0",
            Domain::ActivationRequest => b"tally/activation-request/v1\0",
            Domain::ReturnProof => b"tally/return-proof/v1\0",
            Domain::Report => b"tally/usage-report/v1\0",
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

/// The outer format of every signed tally file; the variant is the envelope's version.
#[derive(Serialize, Deserialize)]
enum SignedFile {
    V1(Signed),
}

/// Why a signed file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignedFileError {
    /// The armour is damaged or labels another kind of file.
    #[error(transparent)]
    Armor(#[from] crate::armor::ArmorError),
    /// The envelope does not decode (truncated, edited, or an unknown format version).
    #[error("malformed or unknown file format: {0}")]
    Malformed(String),
}

/// The armoured file form of a signed envelope.
pub fn to_armored(label: &str, signed: &Signed) -> String {
    crate::armor::armor(label, &crate::encode(&SignedFile::V1(signed.clone())))
}

/// Reads an armoured signed file; its signature is not checked yet.
pub fn from_armored(label: &'static str, text: &str) -> Result<Signed, SignedFileError> {
    let bytes = crate::armor::dearmor(label, text)?;
    let SignedFile::V1(signed) = crate::decode::<SignedFile, { 4 * 1024 * 1024 }>(&bytes)
        .map_err(|e| SignedFileError::Malformed(e.0))?;
    Ok(signed)
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
