//! The one piece of X.509 tally needs: the ed25519 key inside a server certificate.
//!
//! The client compares the key that signed the TLS handshake with the key the vendor
//! bound in the bundle. It must read the key from the certificate's real
//! SubjectPublicKeyInfo, walking the DER structure field by field: searching the bytes
//! for a key-shaped pattern could be fooled by a certificate carrying another server's
//! key in its subject name.

use crate::keys::PublicKey;

/// Why a certificate's key could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The DER structure is broken where the text says.
    #[error("malformed certificate: {0}")]
    Malformed(&'static str),
    /// The certificate's key is not an ed25519 key.
    #[error("certificate key is not ed25519 (tally servers use ed25519 identity keys)")]
    NotEd25519,
}

const SEQUENCE: u8 = 0x30;
const VERSION_TAG: u8 = 0xa0;
const INTEGER: u8 = 0x02;
const OID: u8 = 0x06;
const BIT_STRING: u8 = 0x03;
const ED25519_OID: &[u8] = &[0x2b, 0x65, 0x70];

/// Returns the ed25519 public key of an X.509 certificate in DER.
pub fn ed25519_key(der: &[u8]) -> Result<PublicKey, CertError> {
    let (cert, _) = expect(der, SEQUENCE, "certificate is not a SEQUENCE")?;
    let (tbs, _) = expect(cert, SEQUENCE, "tbsCertificate is not a SEQUENCE")?;
    let mut rest = tbs;
    if rest.first() == Some(&VERSION_TAG) {
        rest = tlv(rest)?.2;
    }
    rest = expect(rest, INTEGER, "serialNumber missing")?.1;
    for what in [
        "signature algorithm missing",
        "issuer missing",
        "validity missing",
        "subject missing",
    ] {
        rest = expect(rest, SEQUENCE, what)?.1;
    }
    let (spki, _) = expect(rest, SEQUENCE, "subjectPublicKeyInfo missing")?;
    let (algorithm, after_alg) = expect(spki, SEQUENCE, "key algorithm missing")?;
    let (oid, params) = expect(algorithm, OID, "key algorithm OID missing")?;
    // RFC 8410: the ed25519 AlgorithmIdentifier has the OID and no parameters.
    if oid != ED25519_OID || !params.is_empty() {
        return Err(CertError::NotEd25519);
    }
    let (bits, _) = expect(after_alg, BIT_STRING, "subjectPublicKey missing")?;
    match bits {
        [0, key @ ..] if key.len() == 32 => {
            let mut out = [0u8; 32];
            out.copy_from_slice(key);
            Ok(PublicKey(out))
        }
        _ => Err(CertError::NotEd25519),
    }
}

/// Reads one TLV whose tag must be `tag`; returns (contents, rest).
fn expect<'a>(
    input: &'a [u8],
    tag: u8,
    what: &'static str,
) -> Result<(&'a [u8], &'a [u8]), CertError> {
    let (found, contents, rest) = tlv(input).map_err(|_| CertError::Malformed(what))?;
    if found != tag {
        return Err(CertError::Malformed(what));
    }
    Ok((contents, rest))
}

/// Reads one DER tag-length-value; returns (tag, contents, rest).
fn tlv(input: &[u8]) -> Result<(u8, &[u8], &[u8]), CertError> {
    let truncated = CertError::Malformed("truncated");
    let (&tag, rest) = input.split_first().ok_or(truncated.clone())?;
    let (&first, mut rest) = rest.split_first().ok_or(truncated.clone())?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        // A certificate over 16 MiB is not a certificate; refuse longer length forms.
        if n == 0 || n > 3 || rest.len() < n {
            return Err(CertError::Malformed("bad length"));
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| acc << 8 | *b as usize);
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return Err(truncated);
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused_without_panic() {
        for input in [
            &[][..],
            &[0x30],
            &[0x30, 0x85, 1, 2, 3, 4, 5],
            &[0x30, 0x03, 0x30, 0x01, 0x00],
            &[0x30, 0x82, 0xff, 0xff],
        ] {
            assert!(ed25519_key(input).is_err());
        }
    }
}
