//! `tallyd demo`: the embedded default that runs with no set-up at all.
//!
//! It issues itself a bundle signed with the built-in demo vendor key (see
//! `tally_protocol::keys::demo`), bound to its own server key like any real bundle, so
//! the whole trust chain runs for real; only the vendor key is a public one. The bundle
//! is written to the data directory once and reused, so a restarted demo keeps the same
//! evaluation expiry and its leases.

use std::path::{Path, PathBuf};
use tally_protocol::bundle::{
    self, Binding, Bundle, BundleError, Customer, FeatureGrant, VerifiedBundle,
};
use tally_protocol::keys::{demo, hex, SecretKey};
use tally_protocol::time::{UnixTime, DAY};

/// File name of the demo bundle in the data directory.
pub const DEMO_BUNDLE_FILE: &str = "demo.bundle";

/// Days the demo's evaluation feature runs.
pub const DEMO_EVALUATION_DAYS: u64 = 30;

/// The demo bundle's features: two counted products and a 30-day evaluation.
pub fn demo_bundle(server: &SecretKey, now: UnixTime) -> Bundle {
    let mut evaluation = FeatureGrant::counted("optimizer", 3);
    evaluation.evaluation = true;
    evaluation.expires = Some(now.plus_secs(DEMO_EVALUATION_DAYS * DAY));
    let server_key = server.public();
    Bundle {
        id: format!("demo-{}", &hex(&server_key.0)[..12]),
        issued_at: now,
        vendor: "tally demo vendor".into(),
        customer: Customer {
            id: "demo".into(),
            name: "Demo site".into(),
        },
        binding: vec![Binding {
            server_key,
            host_fingerprint: crate::host::fingerprint(),
        }],
        supersedes: Vec::new(),
        valid_from: None,
        valid_until: None,
        features: vec![
            {
                // Laptops may take a solver seat along for up to a week.
                let mut solver = FeatureGrant::counted("solver", 5);
                solver.borrow_limit_secs = 7 * DAY;
                solver
            },
            FeatureGrant::counted("viewer", 20),
            evaluation,
        ],
    }
}

/// Why the demo bundle could not be loaded or issued. The texts name the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// The demo bundle file could not be read.
    #[error("reading {path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// The file is not a demo bundle of this server (edited, or another server's).
    #[error("{path}: {cause}")]
    Bundle {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        cause: BundleError,
    },
    /// The new demo bundle could not be written.
    #[error("writing {path}: {cause}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// The bundle just issued does not verify (a bug).
    #[error(transparent)]
    Issued(BundleError),
}

/// Loads the demo bundle from `data_dir`, issuing and writing it on first start.
pub fn load_or_issue(
    data_dir: &Path,
    server: &SecretKey,
    now: UnixTime,
) -> Result<VerifiedBundle, DemoError> {
    let path = data_dir.join(DEMO_BUNDLE_FILE);
    let trusted = [demo::vendor_public()];
    if path.exists() {
        let text = std::fs::read_to_string(&path).map_err(|cause| DemoError::Read {
            path: path.clone(),
            cause,
        })?;
        let bad = |cause| DemoError::Bundle {
            path: path.clone(),
            cause,
        };
        let signed = bundle::from_armored(&text).map_err(bad)?;
        let verified = bundle::verify(&signed, &trusted).map_err(bad)?;
        bundle::check_binding(&verified.bundle, &server.public(), false).map_err(bad)?;
        return Ok(verified);
    }
    let signed = bundle::sign(&demo_bundle(server, now), &demo::vendor_secret());
    crate::files::create_atomic(&path, bundle::to_armored(&signed).as_bytes(), 0o644).map_err(
        |cause| DemoError::Write {
            path: path.clone(),
            cause,
        },
    )?;
    bundle::verify(&signed, &trusted).map_err(DemoError::Issued)
}
