//! The activation request a server sends its vendor, and the return proof it sends when
//! it gives a bundle back.
//!
//! Both are signed by the server's identity key: the request proves that whoever asks
//! for a bundle holds the key the bundle will be bound to; the return proof proves that
//! the bound server itself stopped serving the bundle, so the vendor can issue to new
//! hardware without trusting anybody's word.

use crate::keys::PublicKey;
use crate::signed::{self, Domain, Signed, SignedFileError};
use crate::time::UnixTime;
use serde::{Deserialize, Serialize};

/// Armour label of activation requests.
pub const REQUEST_LABEL: &str = "ACTIVATION REQUEST";
/// Armour label of return proofs.
pub const RETURN_LABEL: &str = "RETURN PROOF";

/// What a server tells the vendor about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationRequest {
    /// The server identity key the bundle should be bound to.
    pub server_key: PublicKey,
    /// The host fingerprint the bundle should be bound to.
    pub host_fingerprint: String,
    /// Host name, for the vendor's records.
    pub hostname: String,
    /// Operating system and architecture.
    pub os: String,
    /// `vm (QEMU)`, `container`, or `None` for bare metal as far as can be told.
    pub virtualization: Option<String>,
    /// A reference the customer gave (order number, contract).
    pub customer_reference: Option<String>,
    /// When the request was made.
    pub created_at: UnixTime,
}

/// Proof that a server stopped serving a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReturnProof {
    /// The returned bundle's id.
    pub bundle_id: String,
    /// The returning server's key (must equal the bundle's binding).
    pub server_key: PublicKey,
    /// The returning server's host fingerprint.
    pub host_fingerprint: String,
    /// When it stopped serving the bundle.
    pub returned_at: UnixTime,
    /// Leases of the bundle's features that were still recorded when it was returned.
    pub leases_outstanding: u32,
    /// What the server gave back with the bundle; `None` in proofs of format version 1,
    /// which did not say (and whose server may count superseded bundles again).
    pub released: Option<Released>,
}

/// What a return took out of service on the returning server, for the vendor to check
/// before issuing the seats to new hardware.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    /// Bundles the returned one superseded, directly or through others: the server
    /// recorded that it never counts them again.
    pub retired: Vec<String>,
    /// The grants the server stopped serving with the return, bundle by bundle.
    pub stopped_serving: Vec<ReleasedGrant>,
}

/// One feature grant a server stopped serving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasedGrant {
    /// The bundle it came from.
    pub bundle: String,
    /// The grant as people read it (`solver: 10 seats, versions up to 2027.2, ...`).
    pub description: String,
    /// The feature.
    pub feature: String,
    /// Its seats.
    pub seats: crate::bundle::Seats,
}

/// Version 1 of the return proof, as older tallyd wrote it.
#[derive(Serialize, Deserialize)]
struct ReturnProofV1 {
    bundle_id: String,
    server_key: PublicKey,
    host_fingerprint: String,
    returned_at: UnixTime,
    leases_outstanding: u32,
}

#[derive(Serialize, Deserialize)]
enum RequestBody {
    V1(ActivationRequest),
}

#[derive(Serialize, Deserialize)]
enum ReturnBody {
    V1(ReturnProofV1),
    /// Version 2 says what the return released ([`Released`]).
    V2(ReturnProof),
}

/// Why a request or proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ActivationError {
    /// The file could not be read.
    #[error(transparent)]
    File(#[from] SignedFileError),
    /// The signature does not verify.
    #[error("signature does not verify (the file was edited or corrupted)")]
    BadSignature,
    /// Signed by another key than the one it names.
    #[error("signed by key {signer}, but it names server key {named}")]
    WrongSigner {
        /// Who signed.
        signer: String,
        /// Whom the contents name.
        named: String,
    },
    /// The contents do not decode.
    #[error("malformed contents: {0}")]
    Malformed(String),
}

/// Signs an activation request with the server key and armours it.
pub fn request_to_armored(request: &ActivationRequest, key: &crate::keys::SecretKey) -> String {
    let body = crate::encode(&RequestBody::V1(request.clone()));
    signed::to_armored(
        REQUEST_LABEL,
        &Signed::sign(Domain::ActivationRequest, body, key),
    )
}

/// Reads and verifies an activation request: signed by the very key it asks to bind.
pub fn request_from_armored(text: &str) -> Result<ActivationRequest, ActivationError> {
    let signed = signed::from_armored(REQUEST_LABEL, text)?;
    signed
        .verify(Domain::ActivationRequest)
        .map_err(|_| ActivationError::BadSignature)?;
    let RequestBody::V1(request) = crate::decode::<RequestBody, 65536>(&signed.body)
        .map_err(|e| ActivationError::Malformed(e.0))?;
    if request.server_key != signed.signer {
        return Err(ActivationError::WrongSigner {
            signer: signed.signer.fingerprint(),
            named: request.server_key.fingerprint(),
        });
    }
    Ok(request)
}

/// Signs a return proof with the server key and armours it.
pub fn return_to_armored(proof: &ReturnProof, key: &crate::keys::SecretKey) -> String {
    let body = crate::encode(&ReturnBody::V2(proof.clone()));
    signed::to_armored(RETURN_LABEL, &Signed::sign(Domain::ReturnProof, body, key))
}

/// Reads and verifies a return proof against its own signer; the caller checks that the
/// signer is the server the bundle was bound to.
pub fn return_from_armored(text: &str) -> Result<ReturnProof, ActivationError> {
    let signed = signed::from_armored(RETURN_LABEL, text)?;
    signed
        .verify(Domain::ReturnProof)
        .map_err(|_| ActivationError::BadSignature)?;
    let proof = match crate::decode::<ReturnBody, 65536>(&signed.body)
        .map_err(|e| ActivationError::Malformed(e.0))?
    {
        ReturnBody::V1(p) => ReturnProof {
            bundle_id: p.bundle_id,
            server_key: p.server_key,
            host_fingerprint: p.host_fingerprint,
            returned_at: p.returned_at,
            leases_outstanding: p.leases_outstanding,
            released: None,
        },
        ReturnBody::V2(p) => p,
    };
    if proof.server_key != signed.signer {
        return Err(ActivationError::WrongSigner {
            signer: signed.signer.fingerprint(),
            named: proof.server_key.fingerprint(),
        });
    }
    Ok(proof)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;

    #[test]
    fn request_round_trip_and_tamper() {
        let key = SecretKey::from_seed([8; 32]);
        let request = ActivationRequest {
            server_key: key.public(),
            host_fingerprint: "abcd".into(),
            hostname: "lic1".into(),
            os: "linux x86_64".into(),
            virtualization: Some("vm (QEMU)".into()),
            customer_reference: Some("PO-77".into()),
            created_at: UnixTime(1_800_000_000),
        };
        let text = request_to_armored(&request, &key);
        assert_eq!(request_from_armored(&text).unwrap(), request);
        // Re-sign the same contents with another key: refused, the key is named.
        let other = SecretKey::from_seed([9; 32]);
        let forged = request_to_armored(&request, &other);
        assert!(matches!(
            request_from_armored(&forged),
            Err(ActivationError::WrongSigner { .. })
        ));
    }

    #[test]
    fn return_proofs_of_version_1_still_read_and_version_2_says_what_was_released() {
        let key = SecretKey::from_seed([8; 32]);
        let old = ReturnProofV1 {
            bundle_id: "b-1".into(),
            server_key: key.public(),
            host_fingerprint: "h".into(),
            returned_at: UnixTime(1_800_000_000),
            leases_outstanding: 2,
        };
        let body = crate::encode(&ReturnBody::V1(old));
        let text = signed::to_armored(RETURN_LABEL, &Signed::sign(Domain::ReturnProof, body, &key));
        let read = return_from_armored(&text).unwrap();
        assert_eq!(
            (read.bundle_id.as_str(), read.leases_outstanding),
            ("b-1", 2)
        );
        assert_eq!(read.released, None);
        let mut new = read;
        new.released = Some(Released {
            retired: vec!["b-0".into()],
            stopped_serving: vec![ReleasedGrant {
                bundle: "b-1".into(),
                description: "solver: 10 seats, permanent".into(),
                feature: "solver".into(),
                seats: crate::bundle::Seats::Counted(10),
            }],
        });
        let text = return_to_armored(&new, &key);
        assert_eq!(return_from_armored(&text).unwrap(), new);
    }
}
