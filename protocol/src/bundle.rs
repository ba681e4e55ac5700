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
///
/// [`sign`] writes the oldest version that can say the bundle, so it keeps loading in
/// an older tally: version 1 whenever no feature carries [`LostSeatTerms`] and at most
/// one server is bound; version 2 when the vendor set terms that version 1 cannot
/// carry; version 3 only for a bundle that binds a cluster of servers; version 4 only
/// when a feature uses a licensing model older versions cannot say (shared seats, a
/// suite, components with their own versions or counts, tokens). An older tally refuses
/// a version it does not read by name rather than serving such a feature as plain seats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BundleBody {
    /// Format version 1: features without lost-seat terms.
    V1(BundleV1),
    /// Format version 2: features may carry [`LostSeatTerms`].
    V2(BundleV2),
    /// Format version 3: the bundle may bind a cluster of servers (several
    /// [`Binding`]s).
    V3(BundleV3),
    /// Format version 4: features may share seats, form suites, give components their
    /// own versions and counts, or draw tokens from a pool.
    V4(Bundle),
}

/// The newest format version [`verify`] reads.
pub const NEWEST_BUNDLE_VERSION: u32 = 4;

/// The body of a version-3 bundle, field for field as version 3 encoded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleV3 {
    /// See [`Bundle::id`].
    pub id: String,
    /// See [`Bundle::issued_at`].
    pub issued_at: UnixTime,
    /// See [`Bundle::vendor`].
    pub vendor: String,
    /// See [`Bundle::customer`].
    pub customer: Customer,
    /// See [`Bundle::binding`].
    pub binding: Vec<Binding>,
    /// See [`Bundle::supersedes`].
    pub supersedes: Vec<String>,
    /// See [`Bundle::valid_from`].
    pub valid_from: Option<UnixTime>,
    /// See [`Bundle::valid_until`].
    pub valid_until: Option<UnixTime>,
    /// See [`Bundle::features`].
    pub features: Vec<FeatureGrantV3>,
}

impl From<BundleV3> for Bundle {
    fn from(b: BundleV3) -> Bundle {
        Bundle {
            id: b.id,
            issued_at: b.issued_at,
            vendor: b.vendor,
            customer: b.customer,
            binding: b.binding,
            supersedes: b.supersedes,
            valid_from: b.valid_from,
            valid_until: b.valid_until,
            features: b.features.into_iter().map(FeatureGrant::from).collect(),
        }
    }
}

/// One feature of a version-2 or version-3 bundle, field for field as they encoded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureGrantV3 {
    /// See [`FeatureGrant::name`].
    pub name: String,
    /// See [`FeatureGrant::seats`].
    pub seats: Seats,
    /// See [`FeatureGrant::version_ceiling`].
    pub version_ceiling: Option<String>,
    /// See [`FeatureGrant::upgrade_from`].
    pub upgrade_from: Option<String>,
    /// See [`FeatureGrant::maintenance_until`].
    pub maintenance_until: Option<UnixTime>,
    /// See [`FeatureGrant::starts`].
    pub starts: Option<UnixTime>,
    /// See [`FeatureGrant::expires`].
    pub expires: Option<UnixTime>,
    /// See [`FeatureGrant::evaluation`].
    pub evaluation: bool,
    /// See [`FeatureGrant::overdraft`].
    pub overdraft: u32,
    /// See [`FeatureGrant::borrow_limit_secs`].
    pub borrow_limit_secs: u64,
    /// See [`FeatureGrant::linger_secs`].
    pub linger_secs: u64,
    /// See [`FeatureGrant::heartbeat_ttl_secs`].
    pub heartbeat_ttl_secs: Option<u64>,
    /// Component names (each with the package's terms).
    pub components: Vec<String>,
    /// See [`FeatureGrant::attributes`].
    pub attributes: BTreeMap<String, String>,
    /// See [`FeatureGrant::lost_seat`].
    pub lost_seat: Option<LostSeatTerms>,
}

impl From<FeatureGrantV3> for FeatureGrant {
    fn from(f: FeatureGrantV3) -> FeatureGrant {
        FeatureGrant {
            name: f.name,
            seats: f.seats,
            version_ceiling: f.version_ceiling,
            upgrade_from: f.upgrade_from,
            maintenance_until: f.maintenance_until,
            starts: f.starts,
            expires: f.expires,
            evaluation: f.evaluation,
            overdraft: f.overdraft,
            borrow_limit_secs: f.borrow_limit_secs,
            linger_secs: f.linger_secs,
            heartbeat_ttl_secs: f.heartbeat_ttl_secs,
            components: f.components.into_iter().map(Component::named).collect(),
            attributes: f.attributes,
            lost_seat: f.lost_seat,
            suite: false,
            share: None,
            tokens: None,
            named: None,
            deny_remote_sessions: false,
            deny_virtual_machines: false,
        }
    }
}

impl FeatureGrant {
    /// The grant in the version-3 layout, if it uses nothing newer.
    fn to_v3(&self) -> Option<FeatureGrantV3> {
        if self.suite
            || self.share.is_some()
            || self.tokens.is_some()
            || self.named.is_some()
            || self.deny_remote_sessions
            || self.deny_virtual_machines
            || self
                .components
                .iter()
                .any(|c| c.version.is_some() || c.count != 1)
        {
            return None;
        }
        Some(FeatureGrantV3 {
            name: self.name.clone(),
            seats: self.seats,
            version_ceiling: self.version_ceiling.clone(),
            upgrade_from: self.upgrade_from.clone(),
            maintenance_until: self.maintenance_until,
            starts: self.starts,
            expires: self.expires,
            evaluation: self.evaluation,
            overdraft: self.overdraft,
            borrow_limit_secs: self.borrow_limit_secs,
            linger_secs: self.linger_secs,
            heartbeat_ttl_secs: self.heartbeat_ttl_secs,
            components: self.components.iter().map(|c| c.name.clone()).collect(),
            attributes: self.attributes.clone(),
            lost_seat: self.lost_seat,
        })
    }
}

/// Most servers one bundle may bind (one cluster).
///
/// Raft needs a majority of the members to commit anything, so a cluster of an odd
/// size is the useful one: 3 survives one lost server, 5 two, 7 three; an even size
/// adds a server without surviving one more failure (4 needs 3, like 5 does). More
/// than 7 only slows every commit (each waits for a majority) without a site needing
/// to survive four lost servers. The check allows any size from 1 to this bound: the
/// odd-size advice is the vendor's to give, and a replacement procedure may pass
/// through an even size.
pub const MAX_CLUSTER: usize = 7;

/// The body of a version-2 bundle, field for field as version 2 encoded it (one
/// server bound at most).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleV2 {
    /// See [`Bundle::id`].
    pub id: String,
    /// See [`Bundle::issued_at`].
    pub issued_at: UnixTime,
    /// See [`Bundle::vendor`].
    pub vendor: String,
    /// See [`Bundle::customer`].
    pub customer: Customer,
    /// See [`Bundle::binding`]: version 2 binds one server at most.
    pub binding: Option<Binding>,
    /// See [`Bundle::supersedes`].
    pub supersedes: Vec<String>,
    /// See [`Bundle::valid_from`].
    pub valid_from: Option<UnixTime>,
    /// See [`Bundle::valid_until`].
    pub valid_until: Option<UnixTime>,
    /// See [`Bundle::features`].
    pub features: Vec<FeatureGrantV3>,
}

impl From<BundleV2> for Bundle {
    fn from(b: BundleV2) -> Bundle {
        Bundle {
            id: b.id,
            issued_at: b.issued_at,
            vendor: b.vendor,
            customer: b.customer,
            binding: b.binding.into_iter().collect(),
            supersedes: b.supersedes,
            valid_from: b.valid_from,
            valid_until: b.valid_until,
            features: b.features.into_iter().map(FeatureGrant::from).collect(),
        }
    }
}

/// The body of a version-1 bundle, field for field as version 1 encoded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleV1 {
    /// See [`Bundle::id`].
    pub id: String,
    /// See [`Bundle::issued_at`].
    pub issued_at: UnixTime,
    /// See [`Bundle::vendor`].
    pub vendor: String,
    /// See [`Bundle::customer`].
    pub customer: Customer,
    /// See [`Bundle::binding`].
    pub binding: Option<Binding>,
    /// See [`Bundle::supersedes`].
    pub supersedes: Vec<String>,
    /// See [`Bundle::valid_from`].
    pub valid_from: Option<UnixTime>,
    /// See [`Bundle::valid_until`].
    pub valid_until: Option<UnixTime>,
    /// The features, in the version-1 layout.
    pub features: Vec<FeatureGrantV1>,
}

/// One feature of a version-1 bundle, field for field as version 1 encoded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureGrantV1 {
    /// See [`FeatureGrant::name`].
    pub name: String,
    /// See [`FeatureGrant::seats`].
    pub seats: Seats,
    /// See [`FeatureGrant::version_ceiling`].
    pub version_ceiling: Option<String>,
    /// See [`FeatureGrant::upgrade_from`].
    pub upgrade_from: Option<String>,
    /// See [`FeatureGrant::maintenance_until`].
    pub maintenance_until: Option<UnixTime>,
    /// See [`FeatureGrant::starts`].
    pub starts: Option<UnixTime>,
    /// See [`FeatureGrant::expires`].
    pub expires: Option<UnixTime>,
    /// See [`FeatureGrant::evaluation`].
    pub evaluation: bool,
    /// See [`FeatureGrant::overdraft`].
    pub overdraft: u32,
    /// See [`FeatureGrant::borrow_limit_secs`].
    pub borrow_limit_secs: u64,
    /// See [`FeatureGrant::linger_secs`].
    pub linger_secs: u64,
    /// See [`FeatureGrant::heartbeat_ttl_secs`].
    pub heartbeat_ttl_secs: Option<u64>,
    /// See [`FeatureGrant::components`].
    pub components: Vec<String>,
    /// See [`FeatureGrant::attributes`].
    pub attributes: BTreeMap<String, String>,
}

impl From<BundleV1> for Bundle {
    fn from(b: BundleV1) -> Bundle {
        Bundle {
            id: b.id,
            issued_at: b.issued_at,
            vendor: b.vendor,
            customer: b.customer,
            binding: b.binding.into_iter().collect(),
            supersedes: b.supersedes,
            valid_from: b.valid_from,
            valid_until: b.valid_until,
            features: b.features.into_iter().map(FeatureGrant::from).collect(),
        }
    }
}

impl From<FeatureGrantV1> for FeatureGrant {
    fn from(f: FeatureGrantV1) -> FeatureGrant {
        FeatureGrant {
            name: f.name,
            seats: f.seats,
            version_ceiling: f.version_ceiling,
            upgrade_from: f.upgrade_from,
            maintenance_until: f.maintenance_until,
            starts: f.starts,
            expires: f.expires,
            evaluation: f.evaluation,
            overdraft: f.overdraft,
            borrow_limit_secs: f.borrow_limit_secs,
            linger_secs: f.linger_secs,
            heartbeat_ttl_secs: f.heartbeat_ttl_secs,
            components: f.components.into_iter().map(Component::named).collect(),
            attributes: f.attributes,
            // Version 1 had no way to say it: the default applies.
            lost_seat: None,
            suite: false,
            share: None,
            tokens: None,
            named: None,
            deny_remote_sessions: false,
            deny_virtual_machines: false,
        }
    }
}

impl Bundle {
    /// The one server binding that versions 1 and 2 can carry, if the bundle binds at
    /// most one server.
    fn single_binding(&self) -> Option<Option<Binding>> {
        match self.binding.as_slice() {
            [] => Some(None),
            [one] => Some(Some(one.clone())),
            _ => None,
        }
    }

    /// The bundle in the version-3 layout, if it fits (no feature uses a newer model).
    fn to_v3(&self) -> Option<BundleV3> {
        Some(BundleV3 {
            id: self.id.clone(),
            issued_at: self.issued_at,
            vendor: self.vendor.clone(),
            customer: self.customer.clone(),
            binding: self.binding.clone(),
            supersedes: self.supersedes.clone(),
            valid_from: self.valid_from,
            valid_until: self.valid_until,
            features: self
                .features
                .iter()
                .map(FeatureGrant::to_v3)
                .collect::<Option<_>>()?,
        })
    }

    /// The bundle in the version-2 layout, if it fits (at most one server bound, no
    /// newer model).
    fn to_v2(&self) -> Option<BundleV2> {
        let v3 = self.to_v3()?;
        Some(BundleV2 {
            id: v3.id,
            issued_at: v3.issued_at,
            vendor: v3.vendor,
            customer: v3.customer,
            binding: self.single_binding()?,
            supersedes: v3.supersedes,
            valid_from: v3.valid_from,
            valid_until: v3.valid_until,
            features: v3.features,
        })
    }

    /// The bundle in the version-1 layout, if it fits (no feature has lost-seat terms,
    /// at most one server bound).
    fn to_v1(&self) -> Option<BundleV1> {
        let binding = self.single_binding()?;
        let mut features = Vec::with_capacity(self.features.len());
        for f in &self.features {
            let f = f.to_v3()?;
            if f.lost_seat.is_some() {
                return None;
            }
            features.push(FeatureGrantV1 {
                name: f.name.clone(),
                seats: f.seats,
                version_ceiling: f.version_ceiling.clone(),
                upgrade_from: f.upgrade_from.clone(),
                maintenance_until: f.maintenance_until,
                starts: f.starts,
                expires: f.expires,
                evaluation: f.evaluation,
                overdraft: f.overdraft,
                borrow_limit_secs: f.borrow_limit_secs,
                linger_secs: f.linger_secs,
                heartbeat_ttl_secs: f.heartbeat_ttl_secs,
                components: f.components.clone(),
                attributes: f.attributes.clone(),
            });
        }
        Some(BundleV1 {
            id: self.id.clone(),
            issued_at: self.issued_at,
            vendor: self.vendor.clone(),
            customer: self.customer.clone(),
            binding,
            supersedes: self.supersedes.clone(),
            valid_from: self.valid_from,
            valid_until: self.valid_until,
            features,
        })
    }

    /// Whether the server with `key` is one of the servers the bundle binds.
    pub fn is_bound_to(&self, key: &PublicKey) -> bool {
        self.binding.iter().any(|b| b.server_key == *key)
    }

    /// The keys of the servers the bundle binds, in the vendor's order (empty for an
    /// unbound demo bundle).
    pub fn bound_keys(&self) -> Vec<PublicKey> {
        self.binding.iter().map(|b| b.server_key).collect()
    }

    /// The binding of the server with `key`, if the bundle binds it: its host
    /// fingerprint is the one that server must run on.
    pub fn binding_of(&self, key: &PublicKey) -> Option<&Binding> {
        self.binding.iter().find(|b| b.server_key == *key)
    }

    /// Checks the shape of the binding: at most [`MAX_CLUSTER`] servers, no key twice.
    /// A key twice would count one server as two members and let it outvote the
    /// others. The same host fingerprint twice is allowed: several servers on one
    /// machine (tests, a staging site) are still distinct keys.
    pub fn check_cluster(&self) -> Result<(), BundleError> {
        if self.binding.len() > MAX_CLUSTER {
            return Err(BundleError::Malformed(format!(
                "binds {} servers; at most {MAX_CLUSTER} may form one cluster",
                self.binding.len()
            )));
        }
        for (i, b) in self.binding.iter().enumerate() {
            if self.binding[..i]
                .iter()
                .any(|a| a.server_key == b.server_key)
            {
                return Err(BundleError::Malformed(format!(
                    "binds server key {} twice",
                    b.server_key.fingerprint()
                )));
            }
        }
        Ok(())
    }
}

/// What a licensed program must do once it has run without its seat (the lease lost,
/// or the server out of reach) for longer than the vendor's grace: the vendor's choice,
/// per feature, carried in the signed bundle so a customer cannot edit it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostSeatTerms {
    /// Seconds a program may go on without a seat before `action` applies.
    pub grace_secs: u64,
    /// What happens then.
    pub action: OnLostSeat,
}

/// The vendor's choice for a program that ran out of its grace without a seat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnLostSeat {
    /// Warn (`tally run` prints a warning and lets the program run).
    Warn,
    /// Stop the program (`tally run`: SIGTERM, then SIGKILL).
    Stop,
}

impl OnLostSeat {
    /// The word used in specs and messages: `warn` or `stop`.
    pub fn as_str(self) -> &'static str {
        match self {
            OnLostSeat::Warn => "warn",
            OnLostSeat::Stop => "stop",
        }
    }
}

impl LostSeatTerms {
    /// The terms of a feature whose bundle says nothing (every version-1 bundle): warn
    /// after five minutes without a seat, never stop. Five minutes covers a server
    /// restart or failover with room to spare; a warning, not a stop, because a vendor
    /// that never chose must not have its customers' runs killed by an upgrade of tally.
    pub const DEFAULT: LostSeatTerms = LostSeatTerms {
        grace_secs: 300,
        action: OnLostSeat::Warn,
    };

    /// The terms that apply to `feature` under `bundles`: those of every grant of the
    /// feature (or of a package that has it as a component) that sets terms, the most
    /// lenient of them (the longest grace, and `warn` over `stop`), since every bundle
    /// that sells the feature vouches for it; [`LostSeatTerms::DEFAULT`] when none does.
    pub fn for_feature<'a>(
        bundles: impl IntoIterator<Item = &'a Bundle>,
        feature: &str,
    ) -> LostSeatTerms {
        bundles
            .into_iter()
            .flat_map(|b| b.features.iter())
            .filter(|f| f.serves(feature))
            .filter_map(|f| f.lost_seat)
            .reduce(|a, b| LostSeatTerms {
                grace_secs: a.grace_secs.max(b.grace_secs),
                action: if a.action == OnLostSeat::Warn || b.action == OnLostSeat::Warn {
                    OnLostSeat::Warn
                } else {
                    OnLostSeat::Stop
                },
            })
            .unwrap_or(LostSeatTerms::DEFAULT)
    }
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
    /// The servers allowed to serve it: one, or the members of one cluster (at most
    /// [`MAX_CLUSTER`], each key once, each from its own activation request). Seats are
    /// those of the whole cluster, not of each member. Empty only for demo bundles.
    pub binding: Vec<Binding>,
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

/// Ties a bundle to one server (or to one member of a cluster), so that copying it to
/// a machine it does not name serves nothing.
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
    /// For a package: the features it grants (FlexLM's `COMPONENTS`).
    pub components: Vec<Component>,
    /// Free-form vendor attributes passed through to the application.
    pub attributes: BTreeMap<String, String>,
    /// What a program must do after running without its seat for a while; `None`:
    /// [`LostSeatTerms::DEFAULT`]. Format versions 2 and later carry it.
    pub lost_seat: Option<LostSeatTerms>,
    /// For a package: a suite (FlexLM's `OPTIONS=SUITE`). One seat of the package
    /// serves all its components for one user at a time: the user's first component
    /// takes a package seat, the others join it. Without it each component has seats of
    /// its own (the package's seats times the component's count). Version 4.
    pub suite: bool,
    /// Checkouts that share seats instead of taking new ones (FlexLM's `DUP_GROUP`,
    /// RLM's `share=`). Version 4.
    pub share: Option<Share>,
    /// A product that has no seats of its own but spends tokens from a pool feature
    /// (RLM token-based licences, LM-X tokens); `seats` is then not used. Version 4.
    pub tokens: Option<TokenDraw>,
    /// Licensed to at most so many named users or hosts, whom the site's policy lists
    /// (FlexLM's `USER_BASED`/`HOST_BASED`, RLM's named-user licences). Version 4.
    pub named: Option<Named>,
    /// Checkouts from remote sessions (a terminal server, an SSH or RDP login) are
    /// refused (FlexLM without `TS_OK`). Version 4.
    pub deny_remote_sessions: bool,
    /// Checkouts from virtual machines are refused (RLM's VM refusal). Version 4.
    pub deny_virtual_machines: bool,
}

/// Who may use a named-user or named-host feature: the site lists the names, the vendor
/// bounds how many and how often the list may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Named {
    /// Hosts are named (else users).
    pub hosts: bool,
    /// Most names at once.
    pub limit: u32,
    /// Days a name must stay on the list before it may be replaced; 0 any time.
    pub change_days: u32,
}

/// One component of a package: a feature name, with its own version ceiling and count
/// if the vendor gave them (`solver:2024.06:2`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    /// The component's feature name.
    pub name: String,
    /// Its version ceiling; `None` takes the package's.
    pub version: Option<String>,
    /// Seats of the component per package seat (at least 1). In a suite: how many
    /// checkouts of the component one user's suite seat covers.
    pub count: u32,
}

impl Component {
    /// A component with the package's version and a count of 1.
    pub fn named(name: impl Into<String>) -> Component {
        Component {
            name: name.into(),
            version: None,
            count: 1,
        }
    }
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)?;
        match (&self.version, self.count) {
            (None, 1) => Ok(()),
            (v, 1) => write!(f, ":{}", v.as_deref().unwrap_or("")),
            (v, n) => write!(f, ":{}:{n}", v.as_deref().unwrap_or("")),
        }
    }
}

/// Which checkouts share seats: those whose holders agree on every field set here and
/// ask for the same count (no field set: every checkout of the site, FlexLM's
/// `DUP_GROUP=SITE`). A group of sharers holds the seats of one checkout (times
/// the number of groups `limit` makes); its seats go back when its last member checks in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// Same login name.
    pub user: bool,
    /// Same host.
    pub host: bool,
    /// Same X display or terminal.
    pub display: bool,
    /// Most checkouts on one shared seat (RLM's `share=uh:4`); 0 is no limit.
    pub limit: u32,
}

impl Share {
    /// The spec form: `user+host`, and `:N` for a limit (as `describe` shows it).
    pub fn as_spec(&self) -> String {
        let mut by = Vec::new();
        if self.user {
            by.push("user");
        }
        if self.host {
            by.push("host");
        }
        if self.display {
            by.push("display");
        }
        let by = if by.is_empty() {
            "site".to_string()
        } else {
            by.join("+")
        };
        match self.limit {
            0 => by,
            n => format!("{by}, at most {n} per seat"),
        }
    }
}

/// Tokens a product spends from a pool: each seat of the product checked out takes
/// `per_seat` seats (tokens) of the feature named `pool`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenDraw {
    /// The pool feature (its seats are the tokens).
    pub pool: String,
    /// Tokens per seat of the product, at least 1.
    pub per_seat: u32,
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
            lost_seat: None,
            suite: false,
            share: None,
            tokens: None,
            named: None,
            deny_remote_sessions: false,
            deny_virtual_machines: false,
        }
    }

    /// Whether checking out `feature` is served by this grant: its own name or one of
    /// its components.
    pub fn serves(&self, feature: &str) -> bool {
        self.name == feature || self.components.iter().any(|c| c.name == feature)
    }

    /// The names this grant serves: its own, then its components'.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.name.as_str()).chain(self.components.iter().map(|c| c.name.as_str()))
    }
}

impl FeatureGrant {
    /// One line for people: `solver: 20 seats, versions up to 2027.2, until 2027-12-31`.
    /// Shared by `tallyd check-config` and `tally-publisher`, so customer IT and the
    /// vendor read a bundle the same way.
    pub fn describe(&self) -> String {
        let mut parts = vec![match (&self.tokens, self.seats) {
            (Some(t), _) => format!("{} tokens of {} per seat", t.per_seat, t.pool),
            (None, Seats::Counted(n)) => format!("{n} seats"),
            (None, Seats::Uncounted) => "uncounted".into(),
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
            let list: Vec<String> = self.components.iter().map(|c| c.to_string()).collect();
            parts.push(format!(
                "{} of {}",
                if self.suite { "suite" } else { "package" },
                list.join(", ")
            ));
        }
        if let Some(s) = &self.share {
            parts.push(format!("shared by {}", s.as_spec()));
        }
        if let Some(n) = &self.named {
            parts.push(format!(
                "{} named {}",
                n.limit,
                if n.hosts { "hosts" } else { "users" }
            ));
        }
        if self.deny_remote_sessions {
            parts.push("no remote sessions".into());
        }
        if self.deny_virtual_machines {
            parts.push("no virtual machines".into());
        }
        if let Some(t) = self.lost_seat {
            parts.push(format!(
                "without a seat: {} after {} s",
                t.action.as_str(),
                t.grace_secs
            ));
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
    /// Binds a cluster of servers this server is not a member of.
    #[error("binds servers {}; this server is {ours}", .bound.join(", "))]
    NotAMember {
        /// The keys of the cluster's servers.
        bound: Vec<String>,
        /// The key of the server checking it.
        ours: String,
    },
    /// The bundle is of a format version this build does not read.
    #[error("bundle format version {0} is newer than this tally understands (it reads versions 1 to 4); upgrade tally")]
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
///
/// The body is the oldest format version that can say the bundle, so that an older
/// tally still loads it: version 1 when it fits, version 2 when a feature carries
/// lost-seat terms, version 3 only when the bundle binds more than one server, version
/// 4 only when a feature uses a licensing model of version 4 (see [`BundleBody`]). The
/// caller checks [`Bundle::check_cluster`] first; [`verify`] refuses a bundle that
/// fails it.
pub fn sign(bundle: &Bundle, vendor: &SecretKey) -> Signed {
    let body = if let Some(v1) = bundle.to_v1() {
        crate::encode(&BundleBody::V1(v1))
    } else if let Some(v2) = bundle.to_v2() {
        crate::encode(&BundleBody::V2(v2))
    } else if let Some(v3) = bundle.to_v3() {
        crate::encode(&BundleBody::V3(v3))
    } else {
        crate::encode(&BundleBody::V4(bundle.clone()))
    };
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
        Some(&tag) if u32::from(tag) >= NEWEST_BUNDLE_VERSION => {
            return Err(BundleError::UnknownVersion(tag as u32 + 1))
        }
        _ => {}
    }
    // Older versions are migrated to the current form: what they could not say takes
    // its default.
    let bundle = match crate::decode::<BundleBody, MAX_BUNDLE_BODY>(&signed.body)
        .map_err(|e| BundleError::Malformed(e.0))?
    {
        BundleBody::V1(v1) => Bundle::from(v1),
        BundleBody::V2(v2) => Bundle::from(v2),
        BundleBody::V3(v3) => Bundle::from(v3),
        BundleBody::V4(bundle) => bundle,
    };
    bundle.check_cluster()?;
    Ok(VerifiedBundle {
        bundle,
        signed: signed.clone(),
    })
}

/// Checks that a verified bundle is bound to the server with `server_key` (for a
/// cluster bundle: that it is one of the members); an unbound bundle passes only when
/// `allow_unbound` (demo mode).
pub fn check_binding(
    bundle: &Bundle,
    server_key: &PublicKey,
    allow_unbound: bool,
) -> Result<(), BundleError> {
    match bundle.binding.as_slice() {
        _ if bundle.is_bound_to(server_key) => Ok(()),
        [one] => Err(BundleError::WrongServer {
            bound: one.server_key.fingerprint(),
            ours: server_key.fingerprint(),
        }),
        [] if allow_unbound => Ok(()),
        [] => Err(BundleError::Unbound),
        members => Err(BundleError::NotAMember {
            bound: members.iter().map(|b| b.server_key.fingerprint()).collect(),
            ours: server_key.fingerprint(),
        }),
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
            binding: vec![Binding {
                server_key: server,
                host_fingerprint: "h".into(),
            }],
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

    #[test]
    fn lost_seat_terms_need_version_2_and_version_1_reads_with_the_default() {
        let vendor = SecretKey::from_seed([3; 32]);
        let server = SecretKey::from_seed([4; 32]).public();
        // Without terms: written as version 1, exactly as before version 2 existed.
        let plain = sample(server);
        let v1 = sign(&plain, &vendor);
        assert_eq!(v1.body.first(), Some(&0));
        assert_eq!(
            v1.body,
            crate::encode(&BundleBody::V1(plain.to_v1().unwrap()))
        );
        let read = verify(&v1, &[vendor.public()]).unwrap().bundle;
        assert_eq!(read, plain);
        assert_eq!(
            LostSeatTerms::for_feature([&read], "solver"),
            LostSeatTerms::DEFAULT
        );
        // With terms: version 2, read back whole.
        let mut strict = sample(server);
        strict.features[0].lost_seat = Some(LostSeatTerms {
            grace_secs: 30,
            action: OnLostSeat::Stop,
        });
        let v2 = sign(&strict, &vendor);
        assert_eq!(v2.body.first(), Some(&1));
        let read = verify(&v2, &[vendor.public()]).unwrap().bundle;
        assert_eq!(read, strict);
        assert_eq!(
            LostSeatTerms::for_feature([&read], "solver"),
            LostSeatTerms {
                grace_secs: 30,
                action: OnLostSeat::Stop
            }
        );
        assert!(read.features[0].describe().contains("stop after 30 s"));
        // A version-2 body without terms (another issuer's choice) reads the same.
        let v2_plain = Signed::sign(
            Domain::Bundle,
            crate::encode(&BundleBody::V2(plain.to_v2().unwrap())),
            &vendor,
        );
        assert_eq!(verify(&v2_plain, &[vendor.public()]).unwrap().bundle, plain);
        // Version 5 is refused by name.
        let v5 = Signed::sign(Domain::Bundle, vec![4, 0, 0, 0], &vendor);
        let refusal = verify(&v5, &[vendor.public()]).unwrap_err();
        assert_eq!(refusal, BundleError::UnknownVersion(5));
        assert!(refusal.to_string().contains("format version 5"));
    }

    #[test]
    fn the_licensing_models_need_version_4_and_plain_bundles_stay_older() {
        let vendor = SecretKey::from_seed([3; 32]);
        let server = SecretKey::from_seed([4; 32]).public();
        let plain = sample(server);
        let mut package = FeatureGrant::counted("cae", 3);
        package.components = vec![Component::named("solver"), Component::named("mesher")];
        let mut b = plain.clone();
        b.features.push(package.clone());
        // Plain components are what versions 1 to 3 said.
        assert_eq!(sign(&b, &vendor).body[0], 0);
        let models: [fn(&mut FeatureGrant); 4] = [
            |f| f.components[0].count = 2,
            |f| f.suite = true,
            |f| {
                f.share = Some(Share {
                    user: true,
                    host: true,
                    display: false,
                    limit: 4,
                })
            },
            |f| {
                f.tokens = Some(TokenDraw {
                    pool: "solver".into(),
                    per_seat: 5,
                })
            },
        ];
        for model in models {
            let mut f = package.clone();
            model(&mut f);
            let mut b = plain.clone();
            b.features.push(f);
            let signed = sign(&b, &vendor);
            assert_eq!(signed.body[0], 3, "version 4 is tag 3");
            assert_eq!(verify(&signed, &[vendor.public()]).unwrap().bundle, b);
        }
    }

    #[test]
    fn the_most_lenient_terms_of_the_bundles_that_sell_a_feature_apply() {
        let server = SecretKey::from_seed([4; 32]).public();
        let mut a = sample(server);
        a.features[0].lost_seat = Some(LostSeatTerms {
            grace_secs: 60,
            action: OnLostSeat::Stop,
        });
        let mut b = sample(server);
        b.features = vec![FeatureGrant {
            components: vec![Component::named("solver")],
            lost_seat: Some(LostSeatTerms {
                grace_secs: 10,
                action: OnLostSeat::Stop,
            }),
            ..FeatureGrant::counted("suite", 2)
        }];
        // A package's terms apply to its components; the longer grace wins.
        assert_eq!(
            LostSeatTerms::for_feature([&a, &b], "solver").grace_secs,
            60
        );
        assert_eq!(LostSeatTerms::for_feature([&b], "solver").grace_secs, 10);
        // Warn over stop; a bundle that sets nothing does not override one that does.
        b.features[0].lost_seat = Some(LostSeatTerms {
            grace_secs: 5,
            action: OnLostSeat::Warn,
        });
        let plain = sample(server);
        assert_eq!(
            LostSeatTerms::for_feature([&a, &b, &plain], "solver"),
            LostSeatTerms {
                grace_secs: 60,
                action: OnLostSeat::Warn
            }
        );
        assert_eq!(
            LostSeatTerms::for_feature([&plain], "other"),
            LostSeatTerms::DEFAULT
        );
    }

    /// The version-2 layout as it was encoded before version 3 existed (the `Bundle`
    /// struct of that time, `binding: Option<Binding>`), to prove that bodies written
    /// by an older publisher still verify, byte for byte.
    #[derive(Serialize)]
    struct OldBundleV2 {
        id: String,
        issued_at: UnixTime,
        vendor: String,
        customer: Customer,
        binding: Option<Binding>,
        supersedes: Vec<String>,
        valid_from: Option<UnixTime>,
        valid_until: Option<UnixTime>,
        features: Vec<FeatureGrantV3>,
    }

    #[derive(Serialize)]
    #[allow(dead_code)]
    enum OldBody {
        V1(BundleV1),
        V2(OldBundleV2),
    }

    fn cluster(seeds: &[u8]) -> Vec<Binding> {
        seeds
            .iter()
            .map(|s| Binding {
                server_key: SecretKey::from_seed([*s; 32]).public(),
                host_fingerprint: format!("host-{s}"),
            })
            .collect()
    }

    #[test]
    fn a_version_2_bundle_of_an_older_publisher_still_verifies() {
        let vendor = SecretKey::from_seed([3; 32]);
        let server = SecretKey::from_seed([4; 32]).public();
        let mut b = sample(server);
        b.features[0].lost_seat = Some(LostSeatTerms {
            grace_secs: 30,
            action: OnLostSeat::Stop,
        });
        let old = OldBody::V2(OldBundleV2 {
            id: b.id.clone(),
            issued_at: b.issued_at,
            vendor: b.vendor.clone(),
            customer: b.customer.clone(),
            binding: Some(b.binding[0].clone()),
            supersedes: vec![],
            valid_from: None,
            valid_until: None,
            features: b.features.iter().map(|f| f.to_v3().unwrap()).collect(),
        });
        let body = crate::encode(&old);
        let signed = Signed::sign(Domain::Bundle, body.clone(), &vendor);
        let read = verify(&signed, &[vendor.public()]).unwrap().bundle;
        assert_eq!(read, b);
        assert!(read.is_bound_to(&server));
        // And today's publisher writes that very body for it: older tallyds load it.
        assert_eq!(sign(&b, &vendor).body, body);
        // An unbound version-2 bundle reads as binding nobody.
        let mut unbound = b.clone();
        unbound.binding.clear();
        let body = crate::encode(&OldBody::V2(OldBundleV2 {
            binding: None,
            ..match old {
                OldBody::V2(o) => o,
                OldBody::V1(_) => unreachable!(),
            }
        }));
        let signed = Signed::sign(Domain::Bundle, body, &vendor);
        assert_eq!(verify(&signed, &[vendor.public()]).unwrap().bundle, unbound);
    }

    #[test]
    fn a_cluster_bundle_is_version_3_and_binds_each_member() {
        let vendor = SecretKey::from_seed([3; 32]);
        let mut b = sample(SecretKey::from_seed([4; 32]).public());
        b.binding = cluster(&[10, 11, 12]);
        let signed = sign(&b, &vendor);
        assert_eq!(signed.body.first(), Some(&2));
        let read = verify(&signed, &[vendor.public()]).unwrap().bundle;
        assert_eq!(read, b);
        let keys = read.bound_keys();
        assert_eq!(keys.len(), 3);
        for k in &keys {
            assert!(read.is_bound_to(k));
            assert_eq!(check_binding(&read, k, false), Ok(()));
        }
        assert_eq!(
            read.binding_of(&keys[1]).unwrap().host_fingerprint,
            "host-11"
        );
        // A server that is not a member is refused, every member named.
        let outsider = SecretKey::from_seed([13; 32]).public();
        assert!(!read.is_bound_to(&outsider));
        let refusal = check_binding(&read, &outsider, true).unwrap_err();
        let text = refusal.to_string();
        for k in &keys {
            assert!(text.contains(&k.fingerprint()), "{text}");
        }
        assert!(
            text.contains(&format!("; this server is {}", outsider.fingerprint())),
            "{text}"
        );
        // With lost-seat terms too, still version 3 (the only one that binds several).
        b.features[0].lost_seat = Some(LostSeatTerms::DEFAULT);
        let signed = sign(&b, &vendor);
        assert_eq!(signed.body.first(), Some(&2));
        assert_eq!(verify(&signed, &[vendor.public()]).unwrap().bundle, b);
        // One member, or none (demo), stays version 1.
        b.features[0].lost_seat = None;
        b.binding.truncate(1);
        assert_eq!(sign(&b, &vendor).body.first(), Some(&0));
        b.binding.clear();
        assert_eq!(sign(&b, &vendor).body.first(), Some(&0));
    }

    #[test]
    fn a_key_twice_or_too_many_members_is_refused() {
        let vendor = SecretKey::from_seed([3; 32]);
        let mut b = sample(SecretKey::from_seed([4; 32]).public());
        b.binding = cluster(&[10, 11, 10]);
        // The same key on another host is still the same server.
        b.binding[2].host_fingerprint = "elsewhere".into();
        let refusal = verify(&sign(&b, &vendor), &[vendor.public()]).unwrap_err();
        assert!(refusal.to_string().contains("twice"), "{refusal}");
        assert_eq!(b.check_cluster(), Err(refusal));
        // The same host twice with distinct keys is fine (servers sharing a machine).
        b.binding = cluster(&[10, 11, 12]);
        for m in &mut b.binding {
            m.host_fingerprint = "one-host".into();
        }
        assert!(verify(&sign(&b, &vendor), &[vendor.public()]).is_ok());
        let seeds: Vec<u8> = (20..20 + MAX_CLUSTER as u8).collect();
        b.binding = cluster(&seeds);
        assert!(verify(&sign(&b, &vendor), &[vendor.public()]).is_ok());
        b.binding = cluster(&(20..21 + MAX_CLUSTER as u8).collect::<Vec<_>>());
        let refusal = verify(&sign(&b, &vendor), &[vendor.public()]).unwrap_err();
        assert!(refusal.to_string().contains("at most 7"), "{refusal}");
    }
}
