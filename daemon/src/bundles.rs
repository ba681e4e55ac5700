//! Loading bundle files: verify, check the binding, combine.
//!
//! Each refused file yields one line naming the file and the reason; the valid files are
//! served regardless. Combination rules: bundles for the same feature add up (add-ons);
//! a bundle that names others in `supersedes` replaces them (renewal, upgrade,
//! trial-to-paid); the same bundle found twice counts once; a bundle the server
//! returned is never loaded again.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use tally_protocol::bundle::{self, VerifiedBundle};
use tally_protocol::keys::PublicKey;
use tally_protocol::time::UnixTime;

/// Largest bundle file read.
pub const MAX_BUNDLE_FILE: u64 = 4 * 1024 * 1024;
/// File name of the list of returned bundle ids in the data directory.
pub const RETURNED_FILE: &str = "returned-bundles";

/// What a server needs to judge bundle files.
#[derive(Debug, Clone)]
pub struct BundleRules {
    /// Vendor keys whose signatures are accepted.
    pub vendor_keys: Vec<PublicKey>,
    /// This server's identity key.
    pub server_key: PublicKey,
    /// This host's fingerprint.
    pub host_fingerprint: String,
    /// Ids of bundles this server returned.
    pub returned: BTreeSet<String>,
}

/// A file that was not loaded, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The file.
    pub path: PathBuf,
    /// Why, in one line.
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: refused: {}", self.path.display(), self.reason)
    }
}

/// The outcome of loading a bundle directory.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Bundles to serve, in file name order.
    pub served: Vec<(PathBuf, VerifiedBundle)>,
    /// Files refused.
    pub refused: Vec<Refusal>,
    /// Notes for the admin: superseded bundles, duplicates, bundles not valid yet.
    pub notes: Vec<String>,
}

impl Loaded {
    /// The served bundles alone.
    pub fn bundles(&self) -> Vec<VerifiedBundle> {
        self.served.iter().map(|(_, b)| b.clone()).collect()
    }
}

/// Loads and judges one bundle file.
pub fn load_file(
    path: &Path,
    rules: &BundleRules,
    now: UnixTime,
) -> Result<VerifiedBundle, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.len() > MAX_BUNDLE_FILE {
        return Err(format!("larger than {MAX_BUNDLE_FILE} bytes, not a bundle"));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let text = String::from_utf8(bytes).map_err(|_| "not a text file".to_string())?;
    let signed = bundle::from_armored(&text).map_err(|e| e.to_string())?;
    let verified = bundle::verify(&signed, &rules.vendor_keys).map_err(|e| e.to_string())?;
    let b = &verified.bundle;
    bundle::check_binding(b, &rules.server_key, false).map_err(|e| e.to_string())?;
    if let Some(binding) = &b.binding {
        if binding.host_fingerprint != rules.host_fingerprint {
            return Err(format!(
                "bound to host {}, but this host is {} (a bundle serves only the machine it was issued for)",
                binding.host_fingerprint, rules.host_fingerprint
            ));
        }
    }
    if let Some(until) = b.valid_until {
        if until <= now {
            return Err(format!(
                "bundle {} expired at the end of {}",
                b.id,
                until.last_day()
            ));
        }
    }
    if rules.returned.contains(&b.id) {
        return Err(format!(
            "bundle {} was returned by this server and is never loaded again",
            b.id
        ));
    }
    Ok(verified)
}

/// Loads every `*.bundle` file of `dir` and applies the combination rules.
pub fn load_dir(dir: &Path, rules: &BundleRules, now: UnixTime) -> std::io::Result<Loaded> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "bundle"))
        .collect();
    paths.sort();
    let mut loaded = Loaded::default();
    let mut by_id: BTreeMap<String, (PathBuf, VerifiedBundle)> = BTreeMap::new();
    for path in paths {
        match load_file(&path, rules, now) {
            Ok(v) => match by_id.get(&v.bundle.id) {
                Some((first, existing)) if existing.signed == v.signed => {
                    loaded.notes.push(format!(
                        "{}: same bundle as {}; counted once",
                        path.display(),
                        first.display()
                    ))
                }
                Some((first, _)) => loaded.refused.push(Refusal {
                    path: path.clone(),
                    reason: format!(
                        "bundle id {} is already used by {} with different contents",
                        v.bundle.id,
                        first.display()
                    ),
                }),
                None => {
                    by_id.insert(v.bundle.id.clone(), (path, v));
                }
            },
            Err(reason) => loaded.refused.push(Refusal { path, reason }),
        }
    }
    let superseded: BTreeMap<String, String> = by_id
        .values()
        .flat_map(|(_, v)| {
            v.bundle
                .supersedes
                .iter()
                .map(|old| (old.clone(), v.bundle.id.clone()))
        })
        .collect();
    let mut served: Vec<(PathBuf, VerifiedBundle)> = Vec::new();
    for (id, (path, v)) in by_id {
        if let Some(by) = superseded.get(&id) {
            loaded.notes.push(format!(
                "{}: bundle {id} is superseded by bundle {by}",
                path.display()
            ));
            continue;
        }
        if let Some(from) = v.bundle.valid_from.filter(|f| *f > now) {
            loaded.notes.push(format!(
                "{}: bundle {id} is not valid yet; its seats count from {}",
                path.display(),
                from.date()
            ));
        }
        served.push((path, v));
    }
    served.sort_by(|a, b| a.0.cmp(&b.0));
    loaded.served = served;
    Ok(loaded)
}

/// Reads the ids of returned bundles from the data directory.
pub fn read_returned(data_dir: &Path) -> std::io::Result<BTreeSet<String>> {
    match std::fs::read_to_string(data_dir.join(RETURNED_FILE)) {
        Ok(text) => Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(e),
    }
}

/// Adds a bundle id to the returned list, durably.
pub fn record_returned(data_dir: &Path, id: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data_dir.join(RETURNED_FILE))?;
    writeln!(file, "{id}")?;
    file.sync_all()
}
