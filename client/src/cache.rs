//! The per-user cache of borrowed leases.
//!
//! A borrowed lease must work on a laptop with no server in reach, so the client keeps
//! everything needed to prove it: the lease token (signed by the server key) and the
//! bundle that vouches for that server key (signed by the vendor). Nothing in the file is
//! trusted as written: the token and bundle are verified on every use, and the readable
//! fields (feature, end date) must agree with the signed token, so an edited cache file
//! is refused rather than believed.
//!
//! The file is `$TALLY_CACHE_DIR/borrowed.json`, else `$XDG_CACHE_HOME/tally/...`, else
//! `~/.cache/tally/...`; the directory is 0700 and the file 0600 (it holds lease secrets).

use crate::trust::Trust;
use crate::{verify_grant, Lease};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use tally_protocol::bundle;
use tally_protocol::keys::PublicKey;
use tally_protocol::lease::{LeaseId, LeaseSecret};
use tally_protocol::signed::{self, Signed};
use tally_protocol::time::UnixTime;
use tally_protocol::wire::{LeaseGrant, LeaseRef, LeaseToken};

/// Armour label of lease tokens in the cache.
pub const TOKEN_LABEL: &str = "LEASE TOKEN";
/// Largest cache file read.
const MAX_CACHE_FILE: u64 = 4 * 1024 * 1024;

/// Why the cache could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The cache file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// An entry does not verify: the file was edited or corrupted.
    #[error("{path}: borrowed lease {lease} refused: {reason}")]
    Refused {
        /// The cache file.
        path: PathBuf,
        /// The lease id as written.
        lease: String,
        /// What did not verify.
        reason: String,
    },
    /// No home directory to keep the cache in.
    #[error("no cache directory: set TALLY_CACHE_DIR, XDG_CACHE_HOME or HOME")]
    NoDirectory,
}

/// A borrowed lease that verified.
#[derive(Debug, Clone)]
pub struct BorrowedLease {
    /// The lease, as granted.
    pub lease: Lease,
    /// The server that granted it.
    pub server_key: PublicKey,
    /// When it ends.
    pub until: UnixTime,
    /// Id and secret, to return it early.
    pub lease_ref: LeaseRef,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    leases: Vec<CachedLease>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CachedLease {
    feature: String,
    count: u32,
    lease_id: String,
    secret: String,
    borrowed_until: String,
    token: String,
    bundle: String,
}

/// The cache file's path.
pub fn path() -> Result<PathBuf, CacheError> {
    let dir = std::env::var_os("TALLY_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("tally")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/tally")))
        .ok_or(CacheError::NoDirectory)?;
    Ok(dir.join("borrowed.json"))
}

fn read() -> Result<(PathBuf, CacheFile), CacheError> {
    let path = path()?;
    let io = |source| CacheError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((
                path,
                CacheFile {
                    version: 1,
                    leases: vec![],
                },
            ))
        }
        Err(e) => return Err(io(e)),
        Ok(m) if m.len() > MAX_CACHE_FILE => {
            return Err(io(std::io::Error::other("cache file is too large")))
        }
        Ok(_) => {}
    }
    let text = std::fs::read_to_string(&path).map_err(io)?;
    let file: CacheFile = serde_json::from_str(&text).map_err(|e| {
        io(std::io::Error::other(format!(
            "not a tally cache file: {e}"
        )))
    })?;
    if file.version != 1 {
        return Err(io(std::io::Error::other(format!(
            "cache format version {} is not understood",
            file.version
        ))));
    }
    Ok((path, file))
}

fn write(path: &PathBuf, file: &CacheFile) -> Result<(), CacheError> {
    let io = |source| CacheError::Io {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
    }
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    let text = serde_json::to_string_pretty(file).map_err(|e| io(std::io::Error::other(e)))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Adds a borrowed lease (with the bundle that vouches for its server) to the cache.
pub fn store(lease: &Lease, vouching_bundle: &Signed) -> Result<(), CacheError> {
    let (path, mut file) = read()?;
    let g = &lease.grant;
    let until = g.borrowed_until.unwrap_or(UnixTime(0));
    file.leases.retain(|l| l.lease_id != g.id.to_string());
    file.leases.push(CachedLease {
        feature: g.feature.clone(),
        count: g.count,
        lease_id: g.id.to_string(),
        secret: tally_protocol::keys::hex(&g.secret.0),
        borrowed_until: until.to_string(),
        token: signed::to_armored(TOKEN_LABEL, &g.token),
        bundle: bundle::to_armored(vouching_bundle),
    });
    write(&path, &file)
}

/// Verifies one entry completely.
fn verify(entry: &CachedLease, trust: Option<&Trust>) -> Result<BorrowedLease, String> {
    let token = signed::from_armored(TOKEN_LABEL, &entry.token).map_err(|e| e.to_string())?;
    let body = LeaseToken::decode(&token.body).map_err(|e| e.to_string())?;
    let LeaseToken::V1 {
        id,
        feature,
        count,
        expires_at,
        ..
    } = body
    else {
        return Err("unknown lease token format".into());
    };
    let until = expires_at.ok_or("not a borrowed lease")?;
    if feature != entry.feature
        || count != entry.count
        || id.to_string() != entry.lease_id
        || until.to_string() != entry.borrowed_until
    {
        return Err("the file's fields do not match the signed lease token (edited)".into());
    }
    let secret = decode_secret(&entry.secret).ok_or("the lease secret is malformed")?;
    let grant = LeaseGrant {
        id,
        secret: secret.clone(),
        feature,
        count,
        ttl_secs: 0,
        overdraft: false,
        borrowed_until: Some(until),
        token: token.clone(),
    };
    verify_grant(&token.signer, &grant).map_err(|e| e.to_string())?;
    if let Some(trust) = trust {
        let signed_bundle = bundle::from_armored(&entry.bundle).map_err(|e| e.to_string())?;
        let verified = bundle::verify(&signed_bundle, &trust.keys()).map_err(|e| e.to_string())?;
        bundle::check_binding(&verified.bundle, &token.signer, false).map_err(|e| e.to_string())?;
    }
    Ok(BorrowedLease {
        lease: Lease { grant },
        server_key: token.signer,
        until,
        lease_ref: LeaseRef { id, secret },
    })
}

fn decode_secret(hex: &str) -> Option<LeaseSecret> {
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(LeaseSecret(out))
}

/// The valid borrowed lease of `feature`, if any: verified against `trust` and not
/// ended at `now`. An entry of that feature that does not verify is an error.
pub fn find(
    trust: &Trust,
    feature: &str,
    now: UnixTime,
) -> Result<Option<BorrowedLease>, CacheError> {
    let (path, file) = read()?;
    for entry in file.leases.iter().filter(|l| l.feature == feature) {
        let borrowed = verify(entry, Some(trust)).map_err(|reason| CacheError::Refused {
            path: path.clone(),
            lease: entry.lease_id.clone(),
            reason,
        })?;
        if borrowed.until > now {
            return Ok(Some(borrowed));
        }
    }
    Ok(None)
}

/// Every structurally valid entry of `feature` (to return them; the server checks the
/// secrets).
pub fn entries_for(feature: &str) -> Result<Vec<BorrowedLease>, CacheError> {
    let (path, file) = read()?;
    file.leases
        .iter()
        .filter(|l| l.feature == feature)
        .map(|entry| {
            verify(entry, None).map_err(|reason| CacheError::Refused {
                path: path.clone(),
                lease: entry.lease_id.clone(),
                reason,
            })
        })
        .collect()
}

/// Removes a lease from the cache.
pub fn remove(id: LeaseId) -> Result<(), CacheError> {
    let (path, mut file) = read()?;
    file.leases.retain(|l| l.lease_id != id.to_string());
    write(&path, &file)
}
