//! `tallyd return`: giving a bundle back to the vendor, with a signed proof.
//!
//! The body of the subcommand, apart from the binary so that it can be tested: the
//! binary loads the site, calls [`return_bundle`], prints what it says and maps
//! [`ReturnError`] to an exit code.

use crate::bundles::{self, BundleRules, Loaded};
use crate::store::{Store, StoreError};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tally_protocol::activation::{self, ReleasedGrant, ReturnProof};
use tally_protocol::keys::SecretKey;
use tally_protocol::report::JournalEntry;
use tally_protocol::time::UnixTime;

/// What a return reads: the site as `tallyd run` would serve it.
pub struct ReturnSite<'a> {
    /// The data directory (seat store, returned list).
    pub data_dir: &'a Path,
    /// The bundle directory, read again to learn what stops being served.
    pub bundle_dir: &'a Path,
    /// The server key, which signs the proof.
    pub key: &'a SecretKey,
    /// The rules the bundles were loaded with.
    pub rules: &'a BundleRules,
    /// The bundles as loaded now.
    pub loaded: &'a Loaded,
}

/// A return that was recorded and whose proof was written.
#[derive(Debug)]
pub struct Returned {
    /// The returned bundle's file.
    pub file: PathBuf,
    /// The proof written (signed by the server key).
    pub proof: ReturnProof,
    /// Bundles it superseded, directly or transitively, which never count here again.
    pub retired: Vec<String>,
    /// The grants the server stopped serving.
    pub stopped_serving: Vec<ReleasedGrant>,
    /// Seats still recorded as held in the returned bundle's features.
    pub outstanding: u32,
    /// Why the return could not be journaled for usage reports, if it could not (the
    /// return itself is recorded; the reports then miss only its moment).
    pub journal_error: Option<StoreError>,
}

/// Why a bundle could not be returned. Nothing is recorded when any of these happens
/// before [`ReturnError::Record`].
#[derive(Debug, thiserror::Error)]
pub enum ReturnError {
    /// No served bundle has that id.
    #[error("no served bundle with id {id} in {}", bundle_dir.display())]
    NotServed {
        /// The id asked for.
        id: String,
        /// The bundle directory read.
        bundle_dir: PathBuf,
    },
    /// The seat store cannot be opened: while tallyd runs, sled's lock refuses it,
    /// which makes "stop tallyd, then return" an enforced order.
    #[error("{0}; stop tallyd before returning a bundle")]
    StoreOpen(StoreError),
    /// The seat store cannot be read.
    #[error(transparent)]
    Store(StoreError),
    /// The bundle directory cannot be read again.
    #[error("bundle directory {}", dir.display())]
    BundleDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The returned list cannot be written.
    #[error("recording the return in {}", data_dir.display())]
    Record {
        /// The data directory.
        data_dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The proof file cannot be written (the return is recorded).
    #[error("writing {}", path.display())]
    WriteProof {
        /// The proof file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl ReturnError {
    /// Another tallyd holds the data directory (try again once it stopped).
    pub fn is_in_use(&self) -> bool {
        matches!(self, ReturnError::StoreOpen(StoreError::InUse { .. }))
    }

    /// The return failed after it was decided (recording it or writing the proof): a
    /// failure at run time rather than a wrong command line or site.
    pub fn is_runtime(&self) -> bool {
        matches!(
            self,
            ReturnError::Record { .. } | ReturnError::WriteProof { .. }
        )
    }
}

/// Returns bundle `id`: counts the leases still recorded for its features, records it
/// and every bundle it supersedes transitively in the returned list (one fsynced
/// write), journals the new served set, and writes the signed proof to `out` (0644: it
/// goes to the vendor). `when` is the return's time, as the proof and journal say it.
pub fn return_bundle(
    site: &ReturnSite<'_>,
    id: &str,
    out: &Path,
    when: UnixTime,
) -> Result<Returned, ReturnError> {
    let Some((path, bundle)) = site.loaded.served.iter().find(|(_, b)| b.bundle.id == id) else {
        return Err(ReturnError::NotServed {
            id: id.to_string(),
            bundle_dir: site.bundle_dir.to_path_buf(),
        });
    };
    let store = Store::open(&site.data_dir.join("store")).map_err(ReturnError::StoreOpen)?;
    let (leases, _) = store.load_leases().map_err(ReturnError::Store)?;
    let features: BTreeSet<&str> = bundle
        .bundle
        .features
        .iter()
        .flat_map(|f| f.names())
        .collect();
    let outstanding: u32 = leases
        .iter()
        .filter(|l| features.contains(l.feature.as_str()))
        .map(|l| l.count)
        .sum();
    // Everything the bundle replaced, directly or through the bundles it replaced, is
    // given back with it: recorded so that it never counts here again, also if the
    // returned file is deleted later.
    let retired = bundles::superseded_closure(id, &site.loaded.supersedes);
    let mut after_rules = site.rules.clone();
    after_rules.returned.insert(id.to_string());
    for old in &retired {
        after_rules.retired.insert(old.clone(), id.to_string());
    }
    let after = bundles::load_dir(site.bundle_dir, &after_rules, when).map_err(|source| {
        ReturnError::BundleDir {
            dir: site.bundle_dir.to_path_buf(),
            source,
        }
    })?;
    let stopped_serving = stopped_serving(site.loaded, &after);
    bundles::record_return(site.data_dir, id, &retired).map_err(|source| ReturnError::Record {
        data_dir: site.data_dir.to_path_buf(),
        source,
    })?;
    // The usage journal says when the served set changed, so reports show the vendor
    // that these seats stopped counting here.
    let after_plain: Vec<_> = after.served.iter().map(|(_, b)| b.bundle.clone()).collect();
    let journal_error = store
        .next_journal_seq()
        .and_then(|seq| {
            store.append_journal(&[JournalEntry {
                seq,
                at: when,
                event: crate::journal::returned(id, &after_plain),
            }])?;
            store.flush_blocking()
        })
        .err();
    let proof = ReturnProof {
        bundle_id: id.to_string(),
        server_key: site.key.public(),
        host_fingerprint: site.rules.host_fingerprint.clone(),
        returned_at: when,
        leases_outstanding: outstanding,
        released: Some(activation::Released {
            retired: retired.clone(),
            stopped_serving: stopped_serving.clone(),
        }),
    };
    crate::files::write_atomic(
        out,
        activation::return_to_armored(&proof, site.key).as_bytes(),
        0o644,
    )
    .map_err(|source| ReturnError::WriteProof {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(Returned {
        file: path.clone(),
        proof,
        retired,
        stopped_serving,
        outstanding,
        journal_error,
    })
}

/// The grants of the bundles served `before` and no longer `after`.
fn stopped_serving(before: &Loaded, after: &Loaded) -> Vec<ReleasedGrant> {
    let still: BTreeSet<&str> = after
        .served
        .iter()
        .map(|(_, b)| b.bundle.id.as_str())
        .collect();
    before
        .served
        .iter()
        .filter(|(_, b)| !still.contains(b.bundle.id.as_str()))
        .flat_map(|(_, b)| {
            b.bundle.features.iter().map(|f| ReleasedGrant {
                bundle: b.bundle.id.clone(),
                description: f.describe(),
                feature: f.name.clone(),
                seats: f.seats,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_protocol::bundle::{self, Binding, Bundle, Customer, FeatureGrant};

    const NOW: UnixTime = UnixTime(1_800_000_000);

    struct Fixture {
        dir: tempfile::TempDir,
        key: SecretKey,
        rules: BundleRules,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("bundles")).unwrap();
            let vendor = SecretKey::from_seed([7; 32]);
            let key = SecretKey::from_seed([8; 32]);
            let rules = BundleRules {
                vendor_keys: vec![vendor.public()],
                server_key: key.public(),
                host_fingerprint: "host-1".into(),
                returned: Default::default(),
                retired: Default::default(),
                cluster: Default::default(),
            };
            Fixture { dir, key, rules }
        }

        fn data_dir(&self) -> &Path {
            self.dir.path()
        }

        fn bundle_dir(&self) -> PathBuf {
            self.dir.path().join("bundles")
        }

        /// Writes a bundle file for this server: `id` with `seats` of `feature`,
        /// superseding `supersedes`.
        fn add(&self, id: &str, feature: &str, seats: u32, supersedes: &[&str]) {
            let b = Bundle {
                id: id.into(),
                issued_at: UnixTime(NOW.0 - 86_400),
                vendor: "v".into(),
                customer: Customer {
                    id: "c".into(),
                    name: "C".into(),
                },
                binding: vec![Binding {
                    server_key: self.key.public(),
                    host_fingerprint: "host-1".into(),
                }],
                supersedes: supersedes.iter().map(|s| s.to_string()).collect(),
                valid_from: None,
                valid_until: None,
                features: vec![FeatureGrant::counted(feature, seats)],
            };
            let signed = bundle::sign(&b, &SecretKey::from_seed([7; 32]));
            std::fs::write(
                self.bundle_dir().join(format!("{id}.bundle")),
                bundle::to_armored(&signed),
            )
            .unwrap();
        }

        fn load(&self) -> Loaded {
            let returns = bundles::read_returns(self.data_dir()).unwrap();
            let mut rules = self.rules.clone();
            rules.returned = returns.returned;
            rules.retired = returns.retired;
            bundles::load_dir(&self.bundle_dir(), &rules, NOW).unwrap()
        }

        fn give_back(&self, id: &str, out: &Path) -> Result<Returned, ReturnError> {
            let loaded = self.load();
            let bundle_dir = self.bundle_dir();
            let site = ReturnSite {
                data_dir: self.data_dir(),
                bundle_dir: &bundle_dir,
                key: &self.key,
                rules: &self.rules,
                loaded: &loaded,
            };
            return_bundle(&site, id, out, NOW)
        }
    }

    /// A renewal returned takes the bundle it superseded with it: both are recorded,
    /// neither is served after, and the signed proof names what stopped being served.
    #[test]
    fn a_return_retires_what_the_bundle_superseded_and_proves_it() {
        let f = Fixture::new();
        f.add("old", "solver", 2, &[]);
        f.add("new", "solver", 5, &["old"]);
        f.add("other", "mesher", 1, &[]);
        let out = f.dir.path().join("new.return");
        let returned = f.give_back("new", &out).unwrap();
        assert_eq!(returned.retired, vec!["old".to_string()]);
        assert_eq!(returned.outstanding, 0);
        assert!(returned.journal_error.is_none());
        let stopped: Vec<_> = returned
            .stopped_serving
            .iter()
            .map(|g| g.bundle.as_str())
            .collect();
        assert_eq!(stopped, vec!["new"]);
        // The proof on disk verifies and says the same.
        let text = std::fs::read_to_string(&out).unwrap();
        let proof = activation::return_from_armored(&text).unwrap();
        assert_eq!(proof.bundle_id, "new");
        assert_eq!(proof.server_key, f.key.public());
        assert_eq!(proof.returned_at, NOW);
        assert_eq!(proof.released.unwrap().retired, vec!["old".to_string()]);
        // What is served afterwards: neither the returned bundle nor the one it replaced.
        let ids: Vec<_> = f
            .load()
            .served
            .iter()
            .map(|(_, b)| b.bundle.id.clone())
            .collect();
        assert_eq!(ids, vec!["other".to_string()]);
    }

    /// An id no served bundle has is refused, and nothing is recorded.
    #[test]
    fn an_unknown_id_is_refused_and_nothing_is_recorded() {
        let f = Fixture::new();
        f.add("a", "solver", 2, &[]);
        let out = f.dir.path().join("x.return");
        let e = f.give_back("missing", &out).unwrap_err();
        assert!(matches!(e, ReturnError::NotServed { .. }), "{e}");
        assert!(
            e.to_string().contains("no served bundle with id missing"),
            "{e}"
        );
        assert!(!out.exists());
        assert!(bundles::read_returns(f.data_dir())
            .unwrap()
            .returned
            .is_empty());
    }

    /// While tallyd holds the store, the return is refused as "in use" and nothing is
    /// recorded.
    #[test]
    fn a_store_in_use_refuses_the_return() {
        let f = Fixture::new();
        f.add("a", "solver", 2, &[]);
        let _running = Store::open_for_serving(&f.data_dir().join("store")).unwrap();
        let out = f.dir.path().join("a.return");
        let e = f.give_back("a", &out).unwrap_err();
        assert!(e.is_in_use(), "{e}");
        assert!(
            e.to_string().contains("stop tallyd before returning"),
            "{e}"
        );
        assert!(!out.exists());
        assert!(bundles::read_returns(f.data_dir())
            .unwrap()
            .returned
            .is_empty());
    }
}
