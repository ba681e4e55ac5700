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
//!
//! A borrowed lease serves only what was borrowed, whoever asks ([`claim`] is the one
//! place that decides): its feature; versions, build dates and dates the licence terms
//! admit, read from the vendor-signed bundles kept with it (refused with the server's own
//! wording); at most its seat count per checkout; and at most its seat count at a time on
//! this machine. The last is enforced with one `flock`ed file per seat
//! (`lease-<id>.<seat>.lock`, 0600, next to the cache file): a process holds the locks of
//! the seats it uses for as long as it uses them, and the kernel releases them when it
//! exits or dies, so a crash never leaves a seat stuck.

use crate::trust::Trust;
use crate::{verify_grant, Lease, Want};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use tally_protocol::bundle::{self, Bundle};
use tally_protocol::keys::PublicKey;
use tally_protocol::lease::{LeaseId, LeaseSecret};
use tally_protocol::signed::{self, Signed};
use tally_protocol::time::UnixTime;
use tally_protocol::version;
use tally_protocol::wire::{DenialReason, LeaseGrant, LeaseRef, LeaseToken};

/// Armour label of lease tokens in the cache.
pub const TOKEN_LABEL: &str = "LEASE TOKEN";
/// Largest cache file read.
const MAX_CACHE_FILE: u64 = 4 * 1024 * 1024;
/// The cache file format written. Version 2 added `bundles` (every bundle with terms for
/// the lease's feature); version 1 files are still read, with their one vouching bundle
/// as the terms.
const CACHE_VERSION: u32 = 2;
/// Seat lock files per borrowed lease: a lease of more seats serves at most this many at
/// a time on one machine (bounds the files one lease can make).
pub const MAX_SEAT_LOCKS: u32 = 1024;

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
        reason: EntryError,
    },
    /// No home directory to keep the cache in.
    #[error("no cache directory: set TALLY_CACHE_DIR, XDG_CACHE_HOME or HOME")]
    NoDirectory,
}

/// Why one cache entry does not verify (the text is what `tally` prints after
/// "borrowed lease ID refused: ").
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// The lease token is not a readable signed file.
    #[error(transparent)]
    TokenFile(#[from] signed::SignedFileError),
    /// The lease token's body does not decode.
    #[error(transparent)]
    TokenBody(#[from] tally_protocol::DecodeError),
    /// The token is of a format this client does not know.
    #[error("unknown lease token format")]
    UnknownTokenFormat,
    /// The token grants no borrow (no end date).
    #[error("not a borrowed lease")]
    NotBorrowed,
    /// The readable fields disagree with the signed token.
    #[error("the file's fields do not match the signed lease token (edited)")]
    Edited,
    /// The lease secret is not 32 hex digits.
    #[error("the lease secret is malformed")]
    MalformedSecret,
    /// The token is not signed by its server key or says something else than the grant.
    #[error(transparent)]
    Grant(#[from] crate::ClientError),
    /// A bundle kept with the lease is malformed, not vendor-signed or bound elsewhere.
    #[error(transparent)]
    Bundle(#[from] bundle::BundleError),
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
    /// The application version the borrow was granted for, if one was given: the lease
    /// serves no version above it. (Kept unsigned in the cache, so an edit can at most
    /// widen it to what the signed licence terms allow, which are checked as well.)
    pub version: Option<String>,
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
    /// The bundle that vouches for the server key.
    bundle: String,
    /// Format version 2: every bundle the server served with terms for `feature`
    /// (version ceilings, maintenance and licence dates), checked offline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    bundles: Vec<String>,
    /// Format version 2: the application version the borrow was granted for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<String>,
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
                    version: CACHE_VERSION,
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
    if !(1..=CACHE_VERSION).contains(&file.version) {
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

/// Adds a borrowed lease to the cache with the bundles that vouch for its server and
/// hold its licence terms (the first vouches; pass every bundle the server serves with
/// terms for the feature, so versions and dates can be checked offline), and the
/// application version it was borrowed for, if any.
pub fn store(lease: &Lease, bundles: &[Signed], version: Option<&str>) -> Result<(), CacheError> {
    let (path, mut file) = read()?;
    let vouching = bundles.first().ok_or_else(|| CacheError::Io {
        path: path.clone(),
        source: std::io::Error::other("no bundle vouches for the server"),
    })?;
    let g = &lease.grant;
    let until = g.borrowed_until.unwrap_or(UnixTime(0));
    file.version = CACHE_VERSION;
    file.leases.retain(|l| l.lease_id != g.id.to_string());
    file.leases.push(CachedLease {
        feature: g.feature.clone(),
        count: g.count,
        lease_id: g.id.to_string(),
        secret: tally_protocol::keys::hex(&g.secret.0),
        borrowed_until: until.to_string(),
        token: signed::to_armored(TOKEN_LABEL, &g.token),
        bundle: bundle::to_armored(vouching),
        bundles: bundles.iter().map(bundle::to_armored).collect(),
        version: version.map(str::to_string),
    });
    write(&path, &file)
}

/// Verifies one entry completely; with `trust`, also returns the verified bundles that
/// hold its licence terms.
fn verify(
    entry: &CachedLease,
    trust: Option<&Trust>,
) -> Result<(BorrowedLease, Vec<Bundle>), EntryError> {
    let token = signed::from_armored(TOKEN_LABEL, &entry.token)?;
    let body = LeaseToken::decode(&token.body)?;
    let LeaseToken::V1 {
        id,
        feature,
        count,
        expires_at,
        ..
    } = body
    else {
        return Err(EntryError::UnknownTokenFormat);
    };
    let until = expires_at.ok_or(EntryError::NotBorrowed)?;
    if feature != entry.feature
        || count != entry.count
        || id.to_string() != entry.lease_id
        || until.to_string() != entry.borrowed_until
    {
        return Err(EntryError::Edited);
    }
    let secret = decode_secret(&entry.secret).ok_or(EntryError::MalformedSecret)?;
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
    verify_grant(&token.signer, &grant)?;
    let mut terms = Vec::new();
    if let Some(trust) = trust {
        let keys = trust.keys();
        // Every bundle is checked like the vouching one: a bundle of another vendor or
        // bound to another server must not widen what the lease serves.
        let texts = std::iter::once(&entry.bundle).chain(&entry.bundles);
        for (i, text) in texts.enumerate() {
            let signed_bundle = bundle::from_armored(text)?;
            let verified = bundle::verify(&signed_bundle, &keys)?;
            bundle::check_binding(&verified.bundle, &token.signer, false)?;
            // Version 1 entries have only the vouching bundle; version 2 lists it again.
            if i > 0 || entry.bundles.is_empty() {
                terms.push(verified.bundle);
            }
        }
    }
    Ok((
        BorrowedLease {
            lease: Lease { grant },
            server_key: token.signer,
            until,
            lease_ref: LeaseRef { id, secret },
            version: entry.version.clone(),
        },
        terms,
    ))
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
/// ended at `now`. An entry of that feature that does not verify is an error. This only
/// looks: to use a borrowed seat, [`claim`] it (count, version and seat locks).
pub fn find(
    trust: &Trust,
    feature: &str,
    now: UnixTime,
) -> Result<Option<BorrowedLease>, CacheError> {
    let (path, file) = read()?;
    for entry in file.leases.iter().filter(|l| l.feature == feature) {
        let (borrowed, _) = verify(entry, Some(trust)).map_err(|reason| CacheError::Refused {
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

/// Every borrowed lease in the cache, of any feature, verified against `trust` and not
/// ended at `now` (what `tally status` shows with no server). An entry that does not
/// verify is an error.
pub fn list(trust: &Trust, now: UnixTime) -> Result<Vec<BorrowedLease>, CacheError> {
    let (path, file) = read()?;
    let mut out = Vec::new();
    for entry in &file.leases {
        let (borrowed, _) = verify(entry, Some(trust)).map_err(|reason| CacheError::Refused {
            path: path.clone(),
            lease: entry.lease_id.clone(),
            reason,
        })?;
        if borrowed.until > now {
            out.push(borrowed);
        }
    }
    Ok(out)
}

/// Every structurally valid entry of `feature` (to return them; the server checks the
/// secrets).
pub fn entries_for(feature: &str) -> Result<Vec<BorrowedLease>, CacheError> {
    let (path, file) = read()?;
    file.leases
        .iter()
        .filter(|l| l.feature == feature)
        .map(|entry| {
            verify(entry, None)
                .map(|(b, _)| b)
                .map_err(|reason| CacheError::Refused {
                    path: path.clone(),
                    lease: entry.lease_id.clone(),
                    reason,
                })
        })
        .collect()
}

/// Removes a lease from the cache, and its seat lock files.
pub fn remove(id: LeaseId) -> Result<(), CacheError> {
    let (path, mut file) = read()?;
    file.leases.retain(|l| l.lease_id != id.to_string());
    write(&path, &file)?;
    // Best effort: a lease no longer in the cache is claimed by nobody new, so a lock
    // file still held by a running program may go too.
    if let Some(Ok(dir)) = path.parent().map(std::fs::read_dir) {
        let prefix = format!("lease-{id}.");
        for e in dir.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && name.ends_with(".lock") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// Why no borrowed lease in the cache serves a checkout. Online the client asks the
/// server instead; offline it is the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The licence terms kept with the lease refuse the request (a version above the
    /// ceiling, a build past maintenance, an expired licence), in the server's words.
    Terms {
        /// The borrowed lease.
        lease: LeaseId,
        /// What the server would have answered.
        reason: DenialReason,
    },
    /// A version above the one the lease was borrowed for.
    Version {
        /// The borrowed lease.
        lease: LeaseId,
        /// The feature.
        feature: String,
        /// The version asked for.
        requested: String,
        /// The version it was borrowed for.
        borrowed_for: String,
    },
    /// More seats asked for than were borrowed.
    Count {
        /// The borrowed lease.
        lease: LeaseId,
        /// The feature.
        feature: String,
        /// Seats borrowed.
        borrowed: u32,
        /// Seats asked for.
        requested: u32,
    },
    /// Every seat of the lease is used by other programs on this machine.
    InUse {
        /// The borrowed lease.
        lease: LeaseId,
        /// The feature.
        feature: String,
        /// Seats borrowed.
        borrowed: u32,
    },
}

impl Refusal {
    /// How close the lease came to serving: the refusal shown is the closest one.
    fn rank(&self) -> u8 {
        match self {
            Refusal::Terms { .. } => 0,
            Refusal::Version { .. } => 1,
            Refusal::Count { .. } => 2,
            Refusal::InUse { .. } => 3,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Terms { lease, reason } => write!(f, "{reason} (borrowed lease {lease})"),
            Refusal::Version {
                lease,
                feature,
                requested,
                borrowed_for,
            } => write!(
                f,
                "version {requested} of '{feature}' is above version {borrowed_for}, which borrowed lease {lease} was borrowed for"
            ),
            Refusal::Count {
                lease,
                feature,
                borrowed,
                requested,
            } => write!(
                f,
                "borrowed lease {lease} of '{feature}' has {}; {requested} requested",
                tally_protocol::wire::plural(*borrowed, "seat", "seats")
            ),
            Refusal::InUse {
                lease,
                feature,
                borrowed,
            } => {
                if *borrowed == 1 {
                    write!(
                        f,
                        "borrowed lease {lease} of '{feature}' is in use by another program on this machine"
                    )
                } else {
                    write!(
                        f,
                        "borrowed lease {lease} of '{feature}' is in use by other programs on this machine \
                         (all {borrowed} seats, or too few free for this request)"
                    )
                }
            }
        }
    }
}

/// The seat locks a process holds on a borrowed lease; dropping them frees the seats
/// (and so does the process exiting or dying).
#[derive(Debug)]
pub struct SeatLocks {
    _files: Vec<std::fs::File>,
}

/// A borrowed lease that serves a checkout, with its seats locked for this process.
#[derive(Debug)]
pub struct Claimed {
    /// The lease.
    pub borrowed: BorrowedLease,
    /// The locks of the seats in use; keep them as long as the seats are used.
    pub seats: SeatLocks,
}

/// What the cache offers for a checkout.
#[derive(Debug)]
pub enum Claim {
    /// A borrowed lease serves it; its seats are locked until the claim is dropped.
    Held(Claimed),
    /// Borrowed leases of the feature exist, but none serves this request.
    Refused(Refusal),
    /// Nothing of the feature is borrowed (or everything borrowed has ended).
    NotBorrowed,
}

/// The one place that decides whether a borrowed lease serves `want`, for the library
/// and the `tally` command alike: a lease of `want.feature` (from `server`, when given),
/// verified against `trust`, not ended at `now`, whose licence terms admit the version,
/// build date and date, with at least `want.count` seats, of which `want.count` are free
/// on this machine; those seats are locked before it is returned. An entry of the
/// feature that does not verify is an error, never skipped.
pub fn claim(
    trust: &Trust,
    want: &Want,
    server: Option<&PublicKey>,
    now: UnixTime,
) -> Result<Claim, CacheError> {
    let (path, file) = read()?;
    let mut closest: Option<Refusal> = None;
    for entry in file.leases.iter().filter(|l| l.feature == want.feature) {
        let (borrowed, terms) =
            verify(entry, Some(trust)).map_err(|reason| CacheError::Refused {
                path: path.clone(),
                lease: entry.lease_id.clone(),
                reason,
            })?;
        if borrowed.until <= now || server.is_some_and(|k| *k != borrowed.server_key) {
            continue;
        }
        let refusal = match serves(&borrowed, &terms, want, now) {
            Err(refusal) => refusal,
            Ok(()) => match lock_seats(&path, &borrowed, want.count) {
                Ok(Some(seats)) => return Ok(Claim::Held(Claimed { borrowed, seats })),
                Ok(None) => Refusal::InUse {
                    lease: borrowed.lease_ref.id,
                    feature: want.feature.clone(),
                    borrowed: borrowed.lease.grant.count,
                },
                Err((lock, source)) => return Err(CacheError::Io { path: lock, source }),
            },
        };
        if closest.as_ref().is_none_or(|c| c.rank() < refusal.rank()) {
            closest = Some(refusal);
        }
    }
    Ok(closest.map_or(Claim::NotBorrowed, Claim::Refused))
}

/// Whether `borrowed` may serve `want` by its terms and count (not yet its locks).
fn serves(
    borrowed: &BorrowedLease,
    terms: &[Bundle],
    want: &Want,
    now: UnixTime,
) -> Result<(), Refusal> {
    let lease = borrowed.lease_ref.id;
    if want.count == 0 {
        return Err(Refusal::Terms {
            lease,
            reason: DenialReason::InvalidRequest {
                what: "count must be at least 1".into(),
            },
        });
    }
    if let Err(reason) = terms_admit(
        terms,
        &want.feature,
        want.version.as_deref(),
        want.build_date,
        now,
    ) {
        return Err(Refusal::Terms { lease, reason });
    }
    if let (Some(requested), Some(borrowed_for)) = (&want.version, &borrowed.version) {
        if !version::within(requested, borrowed_for) {
            return Err(Refusal::Version {
                lease,
                feature: want.feature.clone(),
                requested: requested.clone(),
                borrowed_for: borrowed_for.clone(),
            });
        }
    }
    let count = borrowed.lease.grant.count;
    if want.count > count {
        return Err(Refusal::Count {
            lease,
            feature: want.feature.clone(),
            borrowed: count,
            requested: want.count,
        });
    }
    Ok(())
}

/// One feature's term as a bundle states it (a package's term counts for each component).
struct Term<'a> {
    starts: Option<UnixTime>,
    expires: Option<UnixTime>,
    ceiling: Option<&'a str>,
    maintenance_until: Option<UnixTime>,
}

/// The licence checks the server makes before counting seats (dates, version ceiling,
/// maintenance), made over `bundles` with the server's reasons, so that a borrowed lease
/// answers offline what the server would answer online. Keep in step with the ledger's
/// `decide` (daemon/src/ledger.rs).
pub fn terms_admit(
    bundles: &[Bundle],
    feature: &str,
    version: Option<&str>,
    build_date: Option<UnixTime>,
    now: UnixTime,
) -> Result<(), DenialReason> {
    let mut terms = Vec::new();
    for b in bundles {
        for f in &b.features {
            if f.serves(feature) {
                terms.push(Term {
                    starts: max_opt(f.starts, b.valid_from),
                    expires: min_opt(f.expires, b.valid_until),
                    ceiling: f.version_ceiling.as_deref(),
                    maintenance_until: f.maintenance_until,
                });
            }
        }
    }
    if terms.is_empty() {
        return Err(DenialReason::NotLicensed {
            feature: feature.to_string(),
        });
    }
    let active: Vec<&Term> = terms
        .iter()
        .filter(|t| t.starts.is_none_or(|s| s <= now) && t.expires.is_none_or(|e| now < e))
        .collect();
    if active.is_empty() {
        if let Some(starts) = terms
            .iter()
            .filter_map(|t| t.starts.filter(|s| *s > now))
            .min()
        {
            return Err(DenialReason::NotYetValid {
                feature: feature.to_string(),
                starts,
            });
        }
        return Err(DenialReason::Expired {
            feature: feature.to_string(),
            expired: terms.iter().filter_map(|t| t.expires).max().unwrap_or(now),
        });
    }
    let admits_version = |t: &Term| match (version, t.ceiling) {
        (Some(v), Some(c)) => version::within(v, c),
        _ => true,
    };
    let admits_build = |t: &Term| match (build_date, t.maintenance_until) {
        (Some(b), Some(m)) => b <= m,
        _ => true,
    };
    if !active.iter().any(|t| admits_version(t)) {
        let ceiling = active
            .iter()
            .filter_map(|t| t.ceiling)
            .max_by(|a, b| version::compare(a, b))
            .unwrap_or("?");
        return Err(DenialReason::VersionAboveCeiling {
            feature: feature.to_string(),
            requested: version.unwrap_or("?").to_string(),
            ceiling: ceiling.to_string(),
        });
    }
    if !active.iter().any(|t| admits_version(t) && admits_build(t)) {
        return Err(DenialReason::MaintenanceExpired {
            feature: feature.to_string(),
            build_date: build_date.unwrap_or(now),
            maintenance_until: active
                .iter()
                .filter(|t| admits_version(t))
                .filter_map(|t| t.maintenance_until)
                .max()
                .unwrap_or(now),
        });
    }
    Ok(())
}

fn max_opt(a: Option<UnixTime>, b: Option<UnixTime>) -> Option<UnixTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn min_opt(a: Option<UnixTime>, b: Option<UnixTime>) -> Option<UnixTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Locks every seat of `borrowed` for the caller, to give the lease back: `None` while a
/// program on this machine runs on one of them. Returning a seat in use would let the
/// server hand it to someone else while the program goes on using it (it heard of no
/// server when it started, and hears of none now).
pub fn lock_all(borrowed: &BorrowedLease) -> Result<Option<SeatLocks>, CacheError> {
    let cache = path()?;
    let seats = borrowed.lease.grant.count.min(MAX_SEAT_LOCKS);
    lock_seats(&cache, borrowed, seats).map_err(|(path, source)| CacheError::Io { path, source })
}

/// The lock file of one seat of a borrowed lease.
fn seat_lock_path(cache_file: &Path, lease: LeaseId, seat: u32) -> PathBuf {
    cache_file.with_file_name(format!("lease-{lease}.{seat}.lock"))
}

/// Locks `count` free seats of `borrowed` for this process, or `None` if fewer are free.
/// `flock` (through `File::try_lock`) locks belong to the open file, so they also keep
/// two users in one process apart, and end with the process.
fn lock_seats(
    cache_file: &Path,
    borrowed: &BorrowedLease,
    count: u32,
) -> Result<Option<SeatLocks>, (PathBuf, std::io::Error)> {
    if let Some(dir) = cache_file.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| (dir.to_path_buf(), e))?;
    }
    let seats = borrowed.lease.grant.count.min(MAX_SEAT_LOCKS);
    let mut held = Vec::new();
    for seat in 0..seats {
        if held.len() as u32 == count {
            break;
        }
        let path = seat_lock_path(cache_file, borrowed.lease_ref.id, seat);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| (path.clone(), e))?;
        match file.try_lock() {
            Ok(()) => held.push(file),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => return Err((path, e)),
        }
    }
    Ok((held.len() as u32 == count).then_some(SeatLocks { _files: held }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_protocol::bundle::{Component, Customer, FeatureGrant};

    fn bundle(features: Vec<FeatureGrant>) -> Bundle {
        Bundle {
            id: "b".into(),
            issued_at: UnixTime(0),
            vendor: "v".into(),
            customer: Customer {
                id: "c".into(),
                name: "c".into(),
            },
            binding: vec![],
            supersedes: vec![],
            valid_from: None,
            valid_until: None,
            features,
        }
    }

    fn solver(ceiling: &str, maintenance: u64) -> FeatureGrant {
        let mut f = FeatureGrant::counted("solver", 1);
        f.version_ceiling = Some(ceiling.into());
        f.maintenance_until = Some(UnixTime(maintenance));
        f
    }

    #[test]
    fn terms_answer_what_the_server_answers() {
        let now = UnixTime(1_000);
        let base = bundle(vec![solver("2027.1", 500)]);
        let ok = |b: &[Bundle], v: Option<&str>, d: Option<u64>| {
            terms_admit(b, "solver", v, d.map(UnixTime), now)
        };
        let base_only = std::slice::from_ref(&base);
        assert_eq!(ok(base_only, Some("2027.1"), Some(500)), Ok(()));
        assert_eq!(ok(base_only, None, None), Ok(()));
        let above = ok(base_only, Some("2099.1"), None).unwrap_err();
        assert_eq!(
            above.to_string(),
            "version 2099.1 of 'solver' is above the licensed version 2027.1"
        );
        assert!(matches!(
            ok(base_only, Some("2027"), Some(501)),
            Err(DenialReason::MaintenanceExpired { .. })
        ));
        assert!(matches!(
            terms_admit(base_only, "viewer", None, None, now),
            Err(DenialReason::NotLicensed { .. })
        ));
        // A second bundle (an upgrade or add-on) raises the ceiling and maintenance.
        let addon = bundle(vec![solver("2028", 2_000)]);
        let both = [base.clone(), addon];
        assert_eq!(ok(&both, Some("2028"), Some(1_500)), Ok(()));
        // A package grants its components with its own terms.
        let mut suite = solver("2030", 2_000);
        suite.name = "suite".into();
        suite.components = vec![Component::named("solver")];
        assert_eq!(ok(&[bundle(vec![suite])], Some("2030"), None), Ok(()));
        // Dates: an expired term serves nothing; one not started yet says when.
        let mut expired = solver("2027.1", 500);
        expired.expires = Some(UnixTime(900));
        assert!(matches!(
            ok(&[bundle(vec![expired])], None, None),
            Err(DenialReason::Expired { .. })
        ));
        let mut later = bundle(vec![solver("2027.1", 500)]);
        later.valid_from = Some(UnixTime(5_000));
        assert!(matches!(
            ok(&[later], None, None),
            Err(DenialReason::NotYetValid { .. })
        ));
    }
}
