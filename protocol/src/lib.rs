//! tally's wire protocol and file formats.
//!
//! This crate is pure data and cryptography: it opens no socket, reads no file and no
//! clock. Time is always an argument ([`time::UnixTime`]; [`time::UnixTime::now`] is the
//! wall clock the binaries and libraries share, never called here). Everything that tally puts on
//! the wire or on disk is defined here, so that one crate decides what the bytes mean.
//!
//! - [`wire`]: request and response messages, versioned.
//! - [`frame`]: length-prefixed frames with bounded decoding.
//! - [`bundle`]: the vendor-signed entitlement bundle.
//! - [`signed`]: the signed envelope that bundles (and later requests and reports) travel in.
//! - [`keys`]: public keys, fingerprints, the demo vendor key.
//! - [`armor`]: text-safe armour so files survive e-mail and copy-paste.
//! - [`cert`]: the small piece of X.509 the client needs: the key of a server certificate.
//! - [`lease`]: the lease record as the daemon persists it.
//! - [`observed`]: what a client observes about where it runs (VM, remote session).
//! - [`activation`]: the activation request a server sends its vendor, and the return proof.
//! - [`version`]: ordering of application versions.
//! - [`report`]: the usage journal and signed, hash-chained usage reports.
//! - [`replicate`]: the seat store's changes and snapshot as the servers of a site replicate them.
//! - [`exit`]: the sysexits codes all three commands exit with.
//! - `cli` (feature `cli`): the command-line preamble the three commands share.
//! - `man` (feature `cli`): their manual pages, from the clap definitions and the
//!   commented example configuration.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod activation;
pub mod armor;
pub mod bundle;
pub mod cert;
#[cfg(feature = "cli")]
pub mod cli;
pub mod exit;
pub mod frame;
pub mod keys;
pub mod lease;
#[cfg(feature = "cli")]
pub mod man;
pub mod observed;
pub mod replicate;
pub mod report;
pub mod signed;
pub mod time;
pub mod version;
pub mod wire;

/// The bincode configuration every tally encoding uses, bounded to `LIMIT` bytes of
/// allocation while decoding so a hostile length prefix cannot make us allocate gigabytes.
pub(crate) fn bincode_config<const LIMIT: usize>() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<LIMIT>()
}

/// Encodes any tally value with the shared configuration.
pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Encoding into a Vec cannot fail for our types: they hold no maps with non-string
    // keys and no sequences of unknown length.
    bincode::serde::encode_to_vec(value, bincode::config::standard())
        .expect("encoding tally types into a Vec cannot fail")
}

/// Decodes a value, requiring that the whole input is consumed.
pub(crate) fn decode<T: serde::de::DeserializeOwned, const LIMIT: usize>(
    bytes: &[u8],
) -> Result<T, DecodeError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, bincode_config::<LIMIT>())
        .map_err(|e| DecodeError(e.to_string()))?;
    if used != bytes.len() {
        return Err(DecodeError(format!(
            "{} trailing bytes after the value",
            bytes.len() - used
        )));
    }
    Ok(value)
}

/// A value could not be decoded from its bytes; the text says what bincode found wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed encoding: {0}")]
pub struct DecodeError(pub String);
