//! Loading bundle files: verify, check the binding, combine.
//!
//! Each refused file yields one line naming the file and the reason; the valid files are
//! served regardless. Combination rules: bundles for the same feature add up (add-ons);
//! a bundle that names others in `supersedes` replaces them (renewal, upgrade,
//! trial-to-paid); the same bundle found twice counts once; a bundle the server
//! returned is never loaded again, and what it superseded (directly or through other
//! bundles) stays superseded: a return gives all of it back for good.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use tally_protocol::bundle::{self, VerifiedBundle};
use tally_protocol::keys::PublicKey;
use tally_protocol::time::UnixTime;

/// Largest bundle file read.
pub const MAX_BUNDLE_FILE: u64 = 4 * 1024 * 1024;
/// Largest list of returned bundles read (ids and retired lines: far more than any
/// site returns).
pub const MAX_RETURNED_FILE: u64 = 16 * 1024 * 1024;
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
    /// Ids of bundles superseded by a returned one, with the returned bundle's id: they
    /// never count again here, even when the returned bundle's file is gone.
    pub retired: BTreeMap<String, String>,
    /// Key fingerprints of the servers `[[cluster]]` names (this one included); empty
    /// for a single server. A cluster serves the bundles that bind exactly its members.
    pub cluster: BTreeSet<String>,
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
    /// What each bundle file that verified (served, superseded or returned) supersedes,
    /// by id: the graph a return follows to retire everything it replaced.
    pub supersedes: BTreeMap<String, Vec<String>>,
}

impl Loaded {
    /// The served bundles alone.
    pub fn bundles(&self) -> Vec<VerifiedBundle> {
        self.served.iter().map(|(_, b)| b.clone()).collect()
    }
}

/// Why one bundle file is not served (the text is the reason of a [`Refusal`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleFileError {
    /// The file is larger than [`MAX_BUNDLE_FILE`].
    #[error("larger than {MAX_BUNDLE_FILE} bytes, not a bundle")]
    TooLarge,
    /// The file could not be read (missing, not a regular file, I/O error).
    #[error(transparent)]
    Read(std::io::Error),
    /// The file is not UTF-8.
    #[error("not a text file")]
    NotText,
    /// Not a bundle, not signed by a trusted vendor key, or bound to another server key.
    #[error(transparent)]
    Bundle(#[from] bundle::BundleError),
    /// Bound to another host.
    #[error("bound to host {bound}, but this host is {ours} (a bundle serves only the machine it was issued for)")]
    OtherHost {
        /// The host fingerprint the bundle names.
        bound: String,
        /// This host's fingerprint.
        ours: String,
    },
    /// A bundle of a site of several servers, on a tallyd not configured as one of
    /// them: its seats count once across the servers, and unless they run as one
    /// cluster each would serve all of them (three servers, three times the seats).
    #[error(
        "binds a site of {servers} servers, this one among them; its seats count once \
         across the servers, which needs them running as one cluster, and this tallyd's \
         config names no [[cluster]] members, so it serves none of them"
    )]
    ClusterNotRunning {
        /// How many servers the bundle binds.
        servers: usize,
    },
    /// A bundle whose bound servers are not the members `[[cluster]]` names: the
    /// members share one ledger, so each bundle must bind every one of them (a bundle
    /// of one member would vanish when another leads).
    #[error(
        "binds the servers {bound}, but this cluster's members ([[cluster]] in the \
         config) are {configured}: a cluster serves only bundles that bind exactly its \
         members"
    )]
    OtherCluster {
        /// Fingerprints the bundle binds.
        bound: String,
        /// Fingerprints the config names.
        configured: String,
    },
    /// This server returned the bundle.
    #[error("bundle {0} was returned by this server and is never loaded again")]
    Returned(String),
    /// Past its `valid_until`.
    #[error("bundle {id} expired at the end of {}", .until.last_day())]
    Expired {
        /// The bundle id.
        id: String,
        /// Its `valid_until`.
        until: UnixTime,
    },
}

/// Loads and judges one bundle file.
pub fn load_file(
    path: &Path,
    rules: &BundleRules,
    now: UnixTime,
) -> Result<VerifiedBundle, BundleFileError> {
    match judge_file(path, rules, now) {
        Judged::Load(v) => Ok(v),
        Judged::Returned(v) => Err(BundleFileError::Returned(v.bundle.id)),
        Judged::Expired(_, reason) | Judged::Refused(reason) => Err(reason),
    }
}

/// What [`judge_file`] makes of a file.
enum Judged {
    Load(VerifiedBundle),
    /// Genuine and bound here, but returned: not served, yet its `supersedes` still hold.
    Returned(VerifiedBundle),
    /// Genuine and bound here, but past its `valid_until`: not served, yet its
    /// `supersedes` still hold (an ended renewal does not bring back what it replaced).
    Expired(VerifiedBundle, BundleFileError),
    Refused(BundleFileError),
}

fn judge_file(path: &Path, rules: &BundleRules, now: UnixTime) -> Judged {
    let verified = match verify_file(path, rules) {
        Ok(v) => v,
        Err(reason) => return Judged::Refused(reason),
    };
    let b = &verified.bundle;
    if rules.returned.contains(&b.id) {
        return Judged::Returned(verified);
    }
    if let Some(until) = b.valid_until {
        if until <= now {
            let reason = BundleFileError::Expired {
                id: b.id.clone(),
                until,
            };
            return Judged::Expired(verified, reason);
        }
    }
    Judged::Load(verified)
}

/// Reads a bundle file and checks signature, signer and binding (dates aside).
fn verify_file(path: &Path, rules: &BundleRules) -> Result<VerifiedBundle, BundleFileError> {
    // Without blocking, regular files only, bounded by the bytes read: a FIFO hung
    // every load, and `/dev/zero` (metadata length 0) was read to gigabytes.
    let bytes = crate::files::read_regular(path, MAX_BUNDLE_FILE).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => BundleFileError::TooLarge,
        _ => BundleFileError::Read(e),
    })?;
    let text = String::from_utf8(bytes).map_err(|_| BundleFileError::NotText)?;
    let signed = bundle::from_armored(&text)?;
    let verified = bundle::verify(&signed, &rules.vendor_keys)?;
    let b = &verified.bundle;
    bundle::check_binding(b, &rules.server_key, false)?;
    // A cluster bundle: the member with this server's key names the host it runs on.
    if let Some(binding) = b.binding_of(&rules.server_key) {
        if binding.host_fingerprint != rules.host_fingerprint {
            return Err(BundleFileError::OtherHost {
                bound: binding.host_fingerprint.clone(),
                ours: rules.host_fingerprint.clone(),
            });
        }
    }
    let bound: BTreeSet<String> = b.bound_keys().iter().map(|k| k.fingerprint()).collect();
    if rules.cluster.is_empty() && b.binding.len() > 1 {
        return Err(BundleFileError::ClusterNotRunning {
            servers: b.binding.len(),
        });
    }
    if !rules.cluster.is_empty() && bound != rules.cluster {
        return Err(BundleFileError::OtherCluster {
            bound: bound.into_iter().collect::<Vec<_>>().join(", "),
            configured: rules.cluster.iter().cloned().collect::<Vec<_>>().join(", "),
        });
    }
    Ok(verified)
}

/// Loads every `*.bundle` file of `dir` and applies the combination rules: each file
/// judged, then who supersedes whom, then what is served.
pub fn load_dir(dir: &Path, rules: &BundleRules, now: UnixTime) -> std::io::Result<Loaded> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "bundle"))
        .collect();
    paths.sort();
    let Judging {
        mut loaded,
        by_id,
        returned,
        expired,
    } = judge_files(paths, rules, now);
    loaded.supersedes = by_id
        .iter()
        .map(|(id, (_, v))| (id.clone(), v.bundle.supersedes.clone()))
        .chain(expired.clone())
        .chain(returned.clone())
        .collect();
    let superseded = superseded(rules, &by_id, &returned, &expired);
    loaded.served = served(by_id, &superseded, now, &mut loaded.notes);
    Ok(loaded)
}

/// The bundle files of a directory, judged one by one.
#[derive(Default)]
struct Judging {
    /// Refusals and notes so far.
    loaded: Loaded,
    /// Bundles that may be served, by id, with the first file that holds each.
    by_id: BTreeMap<String, (PathBuf, VerifiedBundle)>,
    /// Returned bundles still in the directory, with what they superseded: not served,
    /// but what they superseded stays superseded (a return gives back everything the
    /// bundle replaced).
    returned: BTreeMap<String, Vec<String>>,
    /// Expired bundles still in the directory, likewise (else a reload after a
    /// renewal's end would serve the paid bundle it replaced, which the running server
    /// no longer counted).
    expired: BTreeMap<String, Vec<String>>,
}

/// Judges each file (in `paths`' order): refused, returned, expired, or a candidate;
/// the same bundle twice counts once, the same id with other contents is refused.
fn judge_files(paths: Vec<PathBuf>, rules: &BundleRules, now: UnixTime) -> Judging {
    let mut j = Judging::default();
    for path in paths {
        match judge_file(&path, rules, now) {
            Judged::Returned(v) => {
                j.loaded.refused.push(Refusal {
                    path,
                    reason: BundleFileError::Returned(v.bundle.id.clone()).to_string(),
                });
                j.returned
                    .insert(v.bundle.id.clone(), v.bundle.supersedes.clone());
            }
            Judged::Load(v) => match j.by_id.get(&v.bundle.id) {
                Some((first, existing)) if existing.signed == v.signed => {
                    j.loaded.notes.push(format!(
                        "{}: same bundle as {}; counted once",
                        path.display(),
                        first.display()
                    ))
                }
                Some((first, _)) => j.loaded.refused.push(Refusal {
                    path: path.clone(),
                    reason: format!(
                        "bundle id {} is already used by {} with different contents",
                        v.bundle.id,
                        first.display()
                    ),
                }),
                None => {
                    j.by_id.insert(v.bundle.id.clone(), (path, v));
                }
            },
            Judged::Expired(v, reason) => {
                let reason = reason.to_string();
                j.loaded.refused.push(Refusal { path, reason });
                j.expired
                    .insert(v.bundle.id.clone(), v.bundle.supersedes.clone());
            }
            Judged::Refused(reason) => j.loaded.refused.push(Refusal {
                path,
                reason: reason.to_string(),
            }),
        }
    }
    j
}

/// Who supersedes whom, with a note on how: a return (earlier or still in the
/// directory) first, then a served bundle, then one that has ended.
fn superseded(
    rules: &BundleRules,
    by_id: &BTreeMap<String, (PathBuf, VerifiedBundle)>,
    returned: &BTreeMap<String, Vec<String>>,
    expired: &BTreeMap<String, Vec<String>>,
) -> BTreeMap<String, String> {
    let mut superseded: BTreeMap<String, String> = BTreeMap::new();
    for (old, by) in &rules.retired {
        superseded.insert(
            old.clone(),
            format!("bundle {by}, which this server returned: it never counts here again"),
        );
    }
    for (id, olds) in returned {
        for old in olds {
            superseded.insert(
                old.clone(),
                format!("bundle {id}, which this server returned: it never counts here again"),
            );
        }
    }
    for (_, v) in by_id.values() {
        for old in &v.bundle.supersedes {
            superseded
                .entry(old.clone())
                .or_insert_with(|| format!("bundle {}", v.bundle.id));
        }
    }
    for (id, olds) in expired {
        for old in olds {
            superseded
                .entry(old.clone())
                .or_insert_with(|| format!("bundle {id}, which has ended"));
        }
    }
    superseded
}

/// The candidates not superseded, in file order; a note for each superseded one and
/// each not valid yet (its seats count from its start).
fn served(
    by_id: BTreeMap<String, (PathBuf, VerifiedBundle)>,
    superseded: &BTreeMap<String, String>,
    now: UnixTime,
    notes: &mut Vec<String>,
) -> Vec<(PathBuf, VerifiedBundle)> {
    let mut served: Vec<(PathBuf, VerifiedBundle)> = Vec::new();
    for (id, (path, v)) in by_id {
        if let Some(by) = superseded.get(&id) {
            notes.push(format!(
                "{}: bundle {id} is superseded by {by}",
                path.display()
            ));
            continue;
        }
        if let Some(from) = v.bundle.valid_from.filter(|f| *f > now) {
            notes.push(format!(
                "{}: bundle {id} is not valid yet; its seats count from {}",
                path.display(),
                from.date()
            ));
        }
        served.push((path, v));
    }
    served.sort_by(|a, b| a.0.cmp(&b.0));
    served
}

/// Line prefix in [`RETURNED_FILE`] of a bundle retired by a return: `retired OLD by ID`.
const RETIRED_PREFIX: &str = "retired ";

/// What the returned list in the data directory says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Returns {
    /// Ids of returned bundles.
    pub returned: BTreeSet<String>,
    /// Bundles superseded by a returned one (id → the returned bundle's id).
    pub retired: BTreeMap<String, String>,
}

/// Reads the ids of returned bundles from the data directory.
pub fn read_returned(data_dir: &Path) -> std::io::Result<BTreeSet<String>> {
    Ok(read_returns(data_dir)?.returned)
}

/// Reads the returned list: one returned bundle id per line, and `retired OLD by ID`
/// for each bundle a return retired (bundle ids hold no spaces; `#` starts a comment).
/// Lists written before retired lines existed hold ids only and read the same.
pub fn read_returns(data_dir: &Path) -> std::io::Result<Returns> {
    let text =
        match crate::files::read_regular_text(&data_dir.join(RETURNED_FILE), MAX_RETURNED_FILE) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Returns::default()),
            Err(e) => return Err(e),
        };
    let mut out = Returns::default();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        match line
            .strip_prefix(RETIRED_PREFIX)
            .and_then(|rest| rest.split_once(" by "))
        {
            Some((old, by)) => {
                out.retired
                    .insert(old.trim().to_string(), by.trim().to_string());
            }
            None => {
                out.returned.insert(line.to_string());
            }
        }
    }
    Ok(out)
}

/// Every bundle `id` supersedes, directly or through the bundles it supersedes, in id
/// order (bounded by the graph: each id is visited once).
pub fn superseded_closure(id: &str, supersedes: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut todo: Vec<&str> = vec![id];
    while let Some(next) = todo.pop() {
        for old in supersedes.get(next).into_iter().flatten() {
            if old != id && seen.insert(old.clone()) {
                todo.push(old);
            }
        }
    }
    seen.into_iter().collect()
}

/// Adds a bundle id to the returned list, durably.
pub fn record_returned(data_dir: &Path, id: &str) -> std::io::Result<()> {
    record_return(data_dir, id, &[])
}

/// Adds a returned bundle and the bundles it retires to the returned list, durably,
/// in one write.
pub fn record_return(data_dir: &Path, id: &str, retired: &[String]) -> std::io::Result<()> {
    use std::io::Write;
    let mut text = format!("{id}\n");
    for old in retired {
        text.push_str(&format!("{RETIRED_PREFIX}{old} by {id}\n"));
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data_dir.join(RETURNED_FILE))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}
