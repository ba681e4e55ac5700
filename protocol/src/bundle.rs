//! The entitlement bundle: what a vendor sold to one customer site, signed by the vendor.
//!
//! A bundle travels as an armoured [`Signed`] envelope whose body is the encoded
//! [`BundleBody`]. The body's enum tag is the format version; a daemon that meets an
//! unknown version refuses the file by name instead of guessing.

use crate::armor::ArmorError;
use crate::keys::{KeyError, PublicKey, SecretKey};
use crate::signed::{Domain, Signed};
use crate::time::UnixTime;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The armour label of bundle files.
pub const BUNDLE_LABEL: &str = "BUNDLE";

/// Largest encoded bundle body we decode (a bundle with thousands of features fits).
pub const MAX_BUNDLE_BODY: usize = 1024 * 1024;

/// A bundle's body; the variant is the format version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BundleBody {
    /// Format version 1.
    V1(Bundle),
}

/// What a vendor sold to one site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// Unique id chosen by the vendor; later bundles name it in `supersedes`.
    pub id: String,
    /// When the vendor issued it.
    pub issued_at: UnixTime,
    /// The vendor's name as shown to users.
    pub vendor: String,
    /// Who bought it.
    pub customer: Customer,
    /// The one server allowed to serve it; `None` only for demo bundles.
    pub binding: Option<Binding>,
    /// Ids of earlier bundles this one replaces (renewal, upgrade, trial-to-paid).
    pub supersedes: Vec<String>,
    /// The bundle is not served before this time.
    pub valid_from: Option<UnixTime>,
    /// The bundle is not served from this time on (a term contract's end).
    pub valid_until: Option<UnixTime>,
    /// The features sold.
    pub features: Vec<FeatureGrant>,
}

/// The customer a bundle was sold to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    /// The vendor's customer id.
    pub id: String,
    /// The customer's name.
    pub name: String,
}

/// Ties a bundle to one server, so that copying it to a second machine serves nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// The server identity key; also the key of the server's TLS certificate.
    pub server_key: PublicKey,
    /// The host fingerprint from the activation request.
    pub host_fingerprint: String,
}

/// How many seats a feature has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Seats {
    /// At most this many seats in use at once.
    Counted(u32),
    /// A site licence: any number of seats, still recorded.
    Uncounted,
}

/// One feature of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureGrant {
    /// Feature name as the application asks for it (`solver`).
    pub name: String,
    /// Seat count.
    pub seats: Seats,
    /// Highest application version this grant serves, if limited.
    pub version_ceiling: Option<String>,
    /// For an upgrade: the ceiling of the seats it upgrades. That many seats (`seats`)
    /// move from this ceiling to `version_ceiling`, like FlexLM's UPGRADE line.
    pub upgrade_from: Option<String>,
    /// Builds dated after this are outside maintenance.
    pub maintenance_until: Option<UnixTime>,
    /// Not usable before this time.
    pub starts: Option<UnixTime>,
    /// Not usable from this time on; `None` is permanent.
    pub expires: Option<UnixTime>,
    /// An evaluation licence, shown as such to users and in reports.
    pub evaluation: bool,
    /// Seats beyond `seats` that may be used and are reported as overdraft.
    pub overdraft: u32,
    /// Longest borrow in seconds; 0 forbids borrowing.
    pub borrow_limit_secs: u64,
    /// Seconds a seat stays held after checkin.
    pub linger_secs: u64,
    /// Heartbeat time-to-live in seconds; `None` takes the server's default.
    pub heartbeat_ttl_secs: Option<u64>,
    /// For a package: the features it grants.
    pub components: Vec<String>,
    /// Free-form vendor attributes passed through to the application.
    pub attributes: BTreeMap<String, String>,
}

impl FeatureGrant {
    /// A plain counted, permanent grant with every option at its default.
    pub fn counted(name: &str, seats: u32) -> FeatureGrant {
        FeatureGrant {
            name: name.to_string(),
            seats: Seats::Counted(seats),
            version_ceiling: None,
            upgrade_from: None,
            maintenance_until: None,
            starts: None,
            expires: None,
            evaluation: false,
            overdraft: 0,
            borrow_limit_secs: 0,
            linger_secs: 0,
            heartbeat_ttl_secs: None,
            components: Vec::new(),
            attributes: BTreeMap::new(),
        }
    }
}

impl FeatureGrant {
    /// One line for people: `solver: 20 seats, versions up to 2027.2, until 2027-12-31`.
    /// Shared by `tallyd check-config` and `tally-publisher`, so customer IT and the
    /// vendor read a bundle the same way.
    pub fn describe(&self) -> String {
        let mut parts = vec![match self.seats {
            Seats::Counted(n) => format!("{n} seats"),
            Seats::Uncounted => "uncounted".into(),
        }];
        if let Some(v) = &self.version_ceiling {
            parts.push(format!("versions up to {v}"));
        }
        if let Some(v) = &self.upgrade_from {
            parts.push(format!("upgrades seats of version {v}"));
        }
        if let Some(m) = self.maintenance_until {
            parts.push(format!("updates until {}", m.date()));
        }
        if let Some(s) = self.starts {
            parts.push(format!("from {}", s.date()));
        }
        parts.push(match self.expires {
            Some(e) => format!("until {}", e.last_day()),
            None => "permanent".into(),
        });
        if self.evaluation {
            parts.push("evaluation".into());
        }
        if self.overdraft > 0 {
            parts.push(format!("overdraft {}", self.overdraft));
        }
        if !self.components.is_empty() {
            parts.push(format!("package of {}", self.components.join(", ")));
        }
        format!("{}: {}", self.name, parts.join(", "))
    }
}

/// Why a bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The armour is damaged or the file is not a bundle.
    #[error(transparent)]
    Armor(#[from] ArmorError),
    /// The envelope or body does not decode.
    #[error("malformed bundle: {0}")]
    Malformed(String),
    /// The vendor signature does not verify: the file was edited or corrupted.
    #[error("vendor signature does not verify (the file was edited or corrupted)")]
    BadSignature,
    /// Signed by a key that is not one of the trusted vendor keys.
    #[error("signed by key {0}, which is not a trusted vendor key")]
    UntrustedSigner(String),
    /// Bound to another server.
    #[error("bound to server key {bound}, but this server's key is {ours}")]
    WrongServer {
        /// The key in the bundle's binding.
        bound: String,
        /// The key of the server checking it.
        ours: String,
    },
    /// The bundle is of a format version this build does not read.
    #[error("bundle format version {0} is newer than this tally understands (it reads version 1); upgrade tallyd")]
    UnknownVersion(u32),
    /// A bundle without a binding outside demo mode.
    #[error("not bound to any server (only demo bundles may be unbound)")]
    Unbound,
}

impl From<KeyError> for BundleError {
    fn from(_: KeyError) -> BundleError {
        BundleError::BadSignature
    }
}

/// A bundle whose signature has been checked, with the envelope it came in (which the
/// server presents to clients so they can check it themselves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedBundle {
    /// The decoded bundle.
    pub bundle: Bundle,
    /// The signed envelope exactly as issued.
    pub signed: Signed,
}

/// Signs `bundle` with the vendor key and returns the envelope.
pub fn sign(bundle: &Bundle, vendor: &SecretKey) -> Signed {
    let body = crate::encode(&BundleBody::V1(bundle.clone()));
    Signed::sign(Domain::Bundle, body, vendor)
}

/// The armoured file form of a signed bundle.
pub fn to_armored(signed: &Signed) -> String {
    crate::signed::to_armored(BUNDLE_LABEL, signed)
}

/// Reads an armoured bundle file into its envelope, without trusting it yet.
pub fn from_armored(text: &str) -> Result<Signed, BundleError> {
    crate::signed::from_armored(BUNDLE_LABEL, text).map_err(|e| match e {
        crate::signed::SignedFileError::Armor(a) => BundleError::Armor(a),
        other => BundleError::Malformed(other.to_string()),
    })
}

/// Checks the envelope's signature and signer, then decodes the bundle.
///
/// The signer must be one of `trusted`; the signature must verify before a single byte of
/// the body is decoded, so a forged body never reaches the decoder's logic.
pub fn verify(signed: &Signed, trusted: &[PublicKey]) -> Result<VerifiedBundle, BundleError> {
    if !trusted.contains(&signed.signer) {
        return Err(BundleError::UntrustedSigner(signed.signer.fingerprint()));
    }
    signed.verify(Domain::Bundle)?;
    // The enum tag is the format version (bincode writes indices below 251 as one byte).
    match signed.body.first() {
        Some(0) | None => {}
        Some(&tag) => return Err(BundleError::UnknownVersion(tag as u32 + 1)),
    }
    // One format version so far; a second one becomes a match that migrates it.
    let BundleBody::V1(bundle) = crate::decode::<BundleBody, MAX_BUNDLE_BODY>(&signed.body)
        .map_err(|e| BundleError::Malformed(e.0))?;
    Ok(VerifiedBundle {
        bundle,
        signed: signed.clone(),
    })
}

/// Checks that a verified bundle is bound to the server with `server_key`; an unbound
/// bundle passes only when `allow_unbound` (demo mode).
pub fn check_binding(
    bundle: &Bundle,
    server_key: &PublicKey,
    allow_unbound: bool,
) -> Result<(), BundleError> {
    match &bundle.binding {
        Some(b) if b.server_key == *server_key => Ok(()),
        Some(b) => Err(BundleError::WrongServer {
            bound: b.server_key.fingerprint(),
            ours: server_key.fingerprint(),
        }),
        None if allow_unbound => Ok(()),
        None => Err(BundleError::Unbound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(server: PublicKey) -> Bundle {
        Bundle {
            id: "b-1".into(),
            issued_at: UnixTime(1_800_000_000),
            vendor: "Acme".into(),
            customer: Customer {
                id: "c-9".into(),
                name: "Example Corp".into(),
            },
            binding: Some(Binding {
                server_key: server,
                host_fingerprint: "h".into(),
            }),
            supersedes: vec![],
            valid_from: None,
            valid_until: None,
            features: vec![FeatureGrant::counted("solver", 20)],
        }
    }

    #[test]
    fn signed_file_round_trip_and_refusals() {
        let vendor = SecretKey::from_seed([3; 32]);
        let server = SecretKey::from_seed([4; 32]).public();
        let bundle = sample(server);
        let text = to_armored(&sign(&bundle, &vendor));
        let signed = from_armored(&text).unwrap();
        let verified = verify(&signed, &[vendor.public()]).unwrap();
        assert_eq!(verified.bundle, bundle);
        assert_eq!(check_binding(&verified.bundle, &server, false), Ok(()));
        let other = SecretKey::from_seed([5; 32]).public();
        assert!(matches!(
            check_binding(&verified.bundle, &other, false),
            Err(BundleError::WrongServer { .. })
        ));
        assert!(matches!(
            verify(&signed, &[other]),
            Err(BundleError::UntrustedSigner(_))
        ));
        // Flip each byte of the body in turn: every edit is caught.
        for i in 0..signed.body.len() {
            let mut edited = signed.clone();
            edited.body[i] ^= 0x01;
            assert!(verify(&edited, &[vendor.public()]).is_err(), "byte {i}");
        }
    }
}
