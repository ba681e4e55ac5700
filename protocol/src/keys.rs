//! Keys: the vendor key that signs bundles, the server key that signs leases and reports
//! and identifies the server in TLS, their fingerprints, and the file format of a secret key.

use crate::armor::{armor, dearmor, ArmorError};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// An ed25519 public key as carried on the wire and in files.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// A short, stable, human-comparable name for this key: the first 16 bytes of its
    /// SHA-256 in hex groups. Admins read it aloud to a vendor's support on the phone.
    pub fn fingerprint(&self) -> String {
        fingerprint_of(&self.0)
    }

    /// Verifies `signature` over `message` with this key.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), KeyError> {
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| KeyError::InvalidPublicKey)?;
        let signature = Signature::from_slice(signature).map_err(|_| KeyError::BadSignature)?;
        // verify_strict refuses weak keys and non-canonical signatures, so one message has
        // exactly one valid signature per key.
        key.verify_strict(message, &signature)
            .map_err(|_| KeyError::BadSignature)
    }

    /// The server's id in its site's Raft cluster: the first 8 bytes of the key's
    /// SHA-256, big-endian, so in hex it reads as the first four groups of the
    /// fingerprint. Derived from the key, a server replaced with a new key is a new
    /// member, and a wiped data directory can never rejoin under its old id.
    pub fn node_id(&self) -> u64 {
        let digest = Sha256::digest(self.0);
        u64::from_be_bytes(digest[..8].try_into().expect("8 bytes of a 32-byte digest"))
    }

    /// Lower-case hex of the 32 key bytes.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

/// The fingerprint format shared by keys and hosts: SHA-256, first 16 bytes, hex in
/// groups of four separated by `:`.
pub fn fingerprint_of(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let hex = hex(&digest[..16]);
    hex.as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).expect("hex is ASCII"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Lower-case hex encoding.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// An ed25519 secret key: the vendor's signing key or a server's identity.
///
/// Debug output never shows the key material, so a stray `{:?}` cannot leak it to a log.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A key from its 32-byte seed. Callers draw the seed from the OS random source.
    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey(SigningKey::from_bytes(&seed))
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// The 32-byte seed; handle with care.
    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// Signs `message`, returning the 64-byte signature.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.0.sign(message).to_bytes().to_vec()
    }

    /// The key as a PKCS#8 v2 document (RFC 8410 with the public key), the form rustls
    /// and rcgen take, so the TLS certificate is made from this very key.
    pub fn to_pkcs8_der(&self) -> Vec<u8> {
        let mut der = vec![
            0x30, 0x53, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&self.seed());
        der.extend_from_slice(&[0xa1, 0x23, 0x03, 0x21, 0x00]);
        der.extend_from_slice(&self.public().0);
        der
    }

    /// The armoured file form (`-----BEGIN TALLY SECRET KEY-----`), versioned.
    pub fn to_armored(&self) -> String {
        let body = crate::encode(&StoredSecretKey::V1 { seed: self.seed() });
        armor(SECRET_KEY_LABEL, &body)
    }

    /// Reads the armoured file form.
    pub fn from_armored(text: &str) -> Result<SecretKey, KeyError> {
        let bytes = dearmor(SECRET_KEY_LABEL, text)?;
        match crate::decode::<StoredSecretKey, 256>(&bytes).map_err(|e| KeyError::Malformed(e.0))? {
            StoredSecretKey::V1 { seed } => Ok(SecretKey::from_seed(seed)),
        }
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public {})", self.public().fingerprint())
    }
}

/// The armour label of secret key files.
pub const SECRET_KEY_LABEL: &str = "SECRET KEY";
/// The armour label of public key files.
pub const PUBLIC_KEY_LABEL: &str = "PUBLIC KEY";

/// Encodes a public key file (`-----BEGIN TALLY PUBLIC KEY-----`).
pub fn public_key_to_armored(key: &PublicKey) -> String {
    armor(
        PUBLIC_KEY_LABEL,
        &crate::encode(&StoredPublicKey::V1 { key: *key }),
    )
}

/// Decodes a public key file.
pub fn public_key_from_armored(text: &str) -> Result<PublicKey, KeyError> {
    let bytes = dearmor(PUBLIC_KEY_LABEL, text)?;
    match crate::decode::<StoredPublicKey, 256>(&bytes).map_err(|e| KeyError::Malformed(e.0))? {
        StoredPublicKey::V1 { key } => Ok(key),
    }
}

/// Secret key file contents; the enum tag is the format version.
#[derive(Serialize, Deserialize)]
enum StoredSecretKey {
    V1 { seed: [u8; 32] },
}

/// Public key file contents; the enum tag is the format version.
#[derive(Serialize, Deserialize)]
enum StoredPublicKey {
    V1 { key: PublicKey },
}

/// Why a key or signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The 32 bytes are not a valid ed25519 point.
    #[error("not a valid ed25519 public key")]
    InvalidPublicKey,
    /// The signature does not verify with the key.
    #[error("signature does not verify")]
    BadSignature,
    /// The key file's armour is damaged.
    #[error(transparent)]
    Armor(#[from] ArmorError),
    /// The key file's contents are damaged or of an unknown format version.
    #[error("malformed key file: {0}")]
    Malformed(String),
}

/// The built-in demo vendor key.
///
/// Its secret is in this source file, so anyone can sign a bundle with it: that is the
/// point of a demo. Clients refuse it unless the application explicitly opts in to demo
/// trust, and a production `tallyd` never loads demo bundles.
pub mod demo {
    use super::{PublicKey, SecretKey};

    /// The demo vendor's seed. Public on purpose; see the module documentation.
    const DEMO_VENDOR_SEED: [u8; 32] = *b"tally demo vendor key, not secrt";

    /// The demo vendor's signing key, used by `tallyd demo` to issue itself a bundle.
    pub fn vendor_secret() -> SecretKey {
        SecretKey::from_seed(DEMO_VENDOR_SEED)
    }

    /// The demo vendor's public key, trusted by clients only in demo mode.
    pub fn vendor_public() -> PublicKey {
        vendor_secret().public()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_id_reads_as_the_start_of_the_fingerprint() {
        let key = SecretKey::from_seed([3; 32]).public();
        let hex = format!("{:016x}", key.node_id());
        let fingerprint: String = key.fingerprint().replace(':', "");
        assert_eq!(hex, fingerprint[..16]);
        assert_ne!(
            key.node_id(),
            SecretKey::from_seed([4; 32]).public().node_id()
        );
    }

    #[test]
    fn sign_verify_and_files() {
        let key = SecretKey::from_seed([7; 32]);
        let sig = key.sign(b"hello");
        assert_eq!(key.public().verify(b"hello", &sig), Ok(()));
        assert_eq!(
            key.public().verify(b"hellO", &sig),
            Err(KeyError::BadSignature)
        );
        let text = key.to_armored();
        assert_eq!(SecretKey::from_armored(&text).unwrap().seed(), [7; 32]);
        assert!(!format!("{key:?}").contains(&hex(&[7; 32])));
        let public = public_key_to_armored(&key.public());
        assert_eq!(public_key_from_armored(&public).unwrap(), key.public());
        assert!(SecretKey::from_armored(&public).is_err());
        assert_eq!(key.public().fingerprint().len(), 39);
    }
}
