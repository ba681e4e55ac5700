//! The bodies of `tallyd init`, `check-config` and `run`, apart from the binary so that
//! they can be tested: loading a site (config, key, vendor keys, bundles, policy) before
//! any port is bound, what `check-config` reports, the reloader SIGHUP and admins use,
//! and starting the server. The binary keeps argument parsing, logging and the exit code
//! each [`StartError`] gets.

use crate::bundles::{self, BundleRules, Loaded};
use crate::error::Error;
use crate::identity::{self, IdentityError};
use crate::params::{ReloadError, Reloaded, Reloader, ReportSettings, ServerParams};
use crate::server::Server;
use crate::signals::{self, SignalError};
use crate::store::{Store, StoreError};
use crate::upload::{UploadError, Uploader};
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tally_config::{ConfigError, DaemonConfig, Policy};
use tally_protocol::keys::SecretKey;
use tally_protocol::time::UnixTime;
use tally_protocol::wire::{plural, Refused};

/// Why `tallyd` could not start (or stopped serving). The texts name the files; which
/// exit code each gets is the binary's choice.
// Causes are held in the message (no `source` chain), so `{:#}` says each once.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration or the policy file.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory has no server key.
    #[error("{}: no server identity; run `tallyd init` first", .0.display())]
    NoIdentity(PathBuf),
    /// The server key, the admin token or the data directory.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A vendor key file cannot be read or is not a public key.
    #[error("vendor key {}: {cause}", .path.display())]
    VendorKey {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The configuration names no vendor key.
    #[error(
        "{}: vendor_keys is empty: name the vendor's public key file(s) whose bundles \
         this server accepts",
        .0.display()
    )]
    NoVendorKeys(PathBuf),
    /// The list of returned bundles in the data directory cannot be read.
    #[error("{}: {cause}", .data_dir.display())]
    Returns {
        /// The data directory.
        data_dir: PathBuf,
        /// The IO error.
        cause: std::io::Error,
    },
    /// The bundle directory cannot be listed.
    #[error("bundle directory {}: {cause}", .dir.display())]
    BundleDir {
        /// The directory.
        dir: PathBuf,
        /// The IO error.
        cause: std::io::Error,
    },
    /// `check-config`: bundle files were refused (each said on its own line before).
    #[error("{0} bundle file(s) refused; the others would be served")]
    Refused(usize),
    /// The log file cannot be opened.
    #[error("log file {}: {cause}", .path.display())]
    LogFile {
        /// The file.
        path: PathBuf,
        /// The IO error.
        cause: std::io::Error,
    },
    /// The report uploader cannot be set up.
    #[error(transparent)]
    Upload(#[from] UploadError),
    /// Another tallyd holds the seat store of this data directory.
    #[error(
        "another tallyd is using {} (its seat store {} is locked); stop that tallyd \
         first, or give this one a data directory of its own",
        .data_dir.display(),
        .store.display()
    )]
    InUse {
        /// The data directory.
        data_dir: PathBuf,
        /// The store's directory.
        store: PathBuf,
    },
    /// The seat store cannot be opened.
    #[error("opening the seat store: {0}")]
    Store(StoreError),
    /// The async runtime cannot start.
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    /// Signal handling cannot be set up.
    #[error(transparent)]
    Signal(#[from] SignalError),
    /// The server cannot be set up (restore, bind, TLS).
    #[error(transparent)]
    Bind(Error),
    /// The server failed while serving.
    #[error(transparent)]
    Serve(Error),
    /// `[[cluster]]` in the config does not fit this server or the served bundles.
    #[error("{}: [[cluster]]: {message}", .config.display())]
    Cluster {
        /// The config file.
        config: PathBuf,
        /// What does not fit.
        message: String,
    },
}

/// Everything `run` and `check-config` load before serving.
pub struct Site {
    /// The config file it was read from.
    pub config_path: PathBuf,
    /// The configuration.
    pub config: DaemonConfig,
    /// The server key.
    pub key: SecretKey,
    /// What the bundles were judged by.
    pub rules: BundleRules,
    /// The bundles served and refused.
    pub loaded: Loaded,
    /// The policy (the default when the config names none).
    pub policy: Policy,
}

/// Loads the site of a config file: config, key, vendor keys, returned bundles, bundles
/// and policy, before anything is bound.
pub fn load_site(config_path: &Path) -> Result<Site, StartError> {
    let config = DaemonConfig::load(config_path)?;
    let key = load_identity(&config.data_dir)?;
    let mut vendor_keys = Vec::new();
    for path in &config.vendor_keys {
        let failed = |cause: Box<dyn std::error::Error + Send + Sync>| StartError::VendorKey {
            path: path.clone(),
            cause,
        };
        let text =
            crate::files::read_regular_text(path, 64 * 1024).map_err(|e| failed(e.into()))?;
        let key =
            tally_protocol::keys::public_key_from_armored(&text).map_err(|e| failed(e.into()))?;
        vendor_keys.push(key);
    }
    if vendor_keys.is_empty() {
        return Err(StartError::NoVendorKeys(config_path.to_path_buf()));
    }
    let returns = bundles::read_returns(&config.data_dir).map_err(|cause| StartError::Returns {
        data_dir: config.data_dir.clone(),
        cause,
    })?;
    let rules = BundleRules {
        vendor_keys,
        server_key: key.public(),
        host_fingerprint: crate::host::fingerprint(),
        returned: returns.returned,
        retired: returns.retired,
        cluster: config.cluster.iter().map(|m| m.key.clone()).collect(),
    };
    let loaded =
        bundles::load_dir(&config.bundle_dir, &rules, UnixTime::now()).map_err(|cause| {
            StartError::BundleDir {
                dir: config.bundle_dir.clone(),
                cause,
            }
        })?;
    let policy = load_policy(config.policy.as_deref())?;
    Ok(Site {
        config_path: config_path.to_path_buf(),
        config,
        key,
        rules,
        loaded,
        policy,
    })
}

/// The server key of a data directory, which `tallyd init` must have created.
pub fn load_identity(data_dir: &Path) -> Result<SecretKey, StartError> {
    let path = data_dir.join(identity::IDENTITY_FILE);
    if !path.exists() {
        return Err(StartError::NoIdentity(path));
    }
    Ok(identity::load(&path)?)
}

/// The policy file, or the default policy when there is none.
pub fn load_policy(path: Option<&Path>) -> Result<Policy, StartError> {
    match path {
        Some(p) => Ok(Policy::load(p)?),
        None => Ok(Policy::default()),
    }
}

/// What `tallyd init` made or found.
pub struct Initialized {
    /// The server key file.
    pub identity_file: PathBuf,
    /// Whether the key was created now (else it existed).
    pub identity_created: bool,
    /// The admin token file.
    pub token_file: PathBuf,
    /// Whether the token was created now.
    pub token_created: bool,
    /// This host's fingerprint (for the activation request).
    pub host_fingerprint: String,
    /// The server key's fingerprint.
    pub server_key: String,
}

impl fmt::Display for Initialized {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = |c| if c { "created" } else { "exists" };
        writeln!(
            f,
            "server identity {}: {}",
            verb(self.identity_created),
            self.identity_file.display()
        )?;
        writeln!(
            f,
            "admin token {}: {}",
            verb(self.token_created),
            self.token_file.display()
        )?;
        writeln!(f, "host fingerprint: {}", self.host_fingerprint)?;
        write!(f, "server key fingerprint: {}", self.server_key)
    }
}

/// `tallyd init`: the data directory (0700), the server key and the admin token (0600),
/// each created unless it exists.
pub fn init(data_dir: &Path) -> Result<Initialized, StartError> {
    identity::create_private_dir(data_dir)?;
    let (key, identity_created) = identity::load_or_create(data_dir)?;
    let (_, token_created) = identity::load_or_create_admin_token(data_dir)?;
    Ok(Initialized {
        identity_file: data_dir.join(identity::IDENTITY_FILE),
        identity_created,
        token_file: data_dir.join(identity::ADMIN_TOKEN_FILE),
        token_created,
        host_fingerprint: crate::host::fingerprint(),
        server_key: key.public().fingerprint(),
    })
}

/// What `tallyd check-config` found: the report for stdout, and the refused bundle
/// files (said on stderr; any makes the check fail).
pub struct Checked {
    /// What would be served, with notes and warnings.
    pub report: String,
    /// The refused bundle files, one line each.
    pub refused: Vec<String>,
}

impl Checked {
    /// Fails when a bundle file was refused: the others would be served, but a check
    /// is for finding out before a restart.
    pub fn verdict(&self) -> Result<(), StartError> {
        match self.refused.len() {
            0 => Ok(()),
            n => Err(StartError::Refused(n)),
        }
    }
}

/// `tallyd check-config`: loads the site as `run` would and says what would be served.
pub fn check_config(config_path: &Path) -> Result<Checked, StartError> {
    let site = load_site(config_path)?;
    let mut out = String::new();
    let c = &site.config;
    let _ = writeln!(out, "configuration {} is valid", config_path.display());
    let _ = writeln!(out, "  listen        {} (UDP)", c.listen);
    let _ = writeln!(out, "  data dir      {}", c.data_dir.display());
    let _ = writeln!(out, "  server key    {}", site.key.public().fingerprint());
    let _ = writeln!(out, "  host          {}", site.rules.host_fingerprint);
    let _ = writeln!(
        out,
        "  timing        lease TTL {} s, heartbeat {} s, idle timeout {} s",
        c.lease_ttl_secs, c.heartbeat_secs, c.idle_timeout_secs
    );
    // The members as `run` resolves them: a member no served bundle binds fails here too.
    let members = cluster_members(&site)?;
    if !members.is_empty() {
        let _ = writeln!(
            out,
            "  cluster       {} as one{}",
            plural(members.len() as u64, "server", "servers"),
            if c.join_cluster {
                "; this one joins it (join_cluster: waits to be added by the leader)"
            } else {
                ""
            }
        );
        let ours = site.key.public();
        for m in &members {
            let this = if m.key == ours { " (this server)" } else { "" };
            let _ = writeln!(out, "    {} at {}{this}", m.key.fingerprint(), m.addr);
        }
    }
    let _ = writeln!(out, "  bundles from  {}", c.bundle_dir.display());
    describe_bundles(&mut out, &site.loaded);
    if let Some(path) = &c.policy {
        let _ = writeln!(out, "  policy        {}", path.display());
        describe_policy(&mut out, &site.policy);
    }
    if let Some(path) = &c.log_file {
        let _ = writeln!(out, "  log file      {} (and stderr)", path.display());
    }
    for note in &site.loaded.notes {
        let _ = writeln!(out, "  note: {note}");
    }
    // Warnings do not fail the check: the configuration serves, a rule just does nothing.
    for warning in policy_warnings(c.policy.as_deref(), &site.policy, &site.loaded) {
        let _ = writeln!(out, "  warning: {warning}");
    }
    Ok(Checked {
        report: out,
        refused: site.loaded.refused.iter().map(|r| r.to_string()).collect(),
    })
}

/// The served bundles and their features, for `check-config`.
fn describe_bundles(out: &mut String, loaded: &Loaded) {
    for (path, b) in &loaded.served {
        let b = &b.bundle;
        let until = b
            .valid_until
            .map(|u| format!("until {}", u.last_day()))
            .unwrap_or_else(|| "no end date".into());
        let _ = writeln!(
            out,
            "    {}: bundle {} for {} ({until})",
            path.display(),
            b.id,
            b.customer.name
        );
        for f in &b.features {
            let _ = writeln!(out, "      {}", f.describe());
        }
    }
}

/// The policy's rules, for `check-config`.
fn describe_policy(out: &mut String, p: &Policy) {
    for (kind, rules) in [
        ("reserve", &p.reserve),
        ("max", &p.max),
        ("include", &p.include),
        ("exclude", &p.exclude),
    ] {
        for r in rules.iter() {
            let seats = if r.seats > 0 {
                format!(" {}", plural(r.seats, "seat", "seats"))
            } else {
                String::new()
            };
            let _ = writeln!(out, "    {kind} {}{seats} for {}", r.feature, r.subject);
        }
    }
    for (feature, secs) in &p.timeout_secs {
        let _ = writeln!(out, "    timeout {feature} {secs} s");
    }
    for (feature, secs) in &p.borrow_limit_secs {
        let _ = writeln!(out, "    borrow {feature} at most {} h", secs / 3600);
    }
    // The rules that came with options-file migration (`tallyd import-options`).
    for (kind, rules) in [
        ("include_borrow", &p.include_borrow),
        ("exclude_borrow", &p.exclude_borrow),
    ] {
        for r in rules.iter() {
            let _ = writeln!(out, "    {kind} {} for {}", r.feature, r.subject);
        }
    }
    for (kind, subjects) in [
        ("include_all", &p.include_all),
        ("exclude_all", &p.exclude_all),
    ] {
        for s in subjects.iter() {
            let _ = writeln!(out, "    {kind} for {s}");
        }
    }
    for (feature, seats) in &p.borrow_lowwater {
        let seats = plural(*seats, "seat", "seats");
        let _ = writeln!(out, "    borrow_lowwater {feature} {seats} never borrowed");
    }
    for (feature, secs) in &p.linger_secs {
        let _ = writeln!(out, "    linger {feature} {secs} s");
    }
    if let Some(secs) = p.timeout_all_secs {
        let _ = writeln!(out, "    timeout_all {secs} s");
    }
    if p.case_insensitive_users {
        let _ = writeln!(out, "    user names compared without case");
    }
    for n in &p.named {
        let kind = if n.hosts { "hosts" } else { "users" };
        let _ = writeln!(
            out,
            "    named {} {kind}: {}",
            n.feature,
            n.names.join(", ")
        );
    }
}

/// A policy error as one line without the file name (the refusal names the file):
/// `FILE:LINE: message` becomes `line LINE: message`, line breaks become "; ".
pub fn policy_reason(path: &Path, error: &str) -> String {
    let one_line = error
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let prefix = format!("{}:", path.display());
    match one_line
        .strip_prefix(&prefix)
        .and_then(|rest| rest.split_once(": "))
    {
        Some((line, message)) if line.parse::<u64>().is_ok() => format!("line {line}: {message}"),
        _ => one_line
            .strip_prefix(&prefix)
            .map_or(one_line.clone(), |r| r.trim().to_string()),
    }
}

/// The refused bundle files of a load, as the server shows them.
pub fn refusals(loaded: &Loaded) -> Vec<Refused> {
    loaded
        .refused
        .iter()
        .map(|r| Refused {
            source: r.path.display().to_string(),
            reason: r.reason.clone(),
        })
        .collect()
}

/// Warnings about a policy that parses but names features no served bundle has (a
/// misspelt name, or a bundle not loaded): such a rule never applies, which an admin
/// wants to hear at load, not when a reservation fails to hold.
pub fn policy_warnings(
    policy_path: Option<&Path>,
    policy: &Policy,
    loaded: &Loaded,
) -> Vec<String> {
    let Some(path) = policy_path else {
        return Vec::new();
    };
    let served: std::collections::BTreeSet<&str> = loaded
        .served
        .iter()
        .flat_map(|(_, b)| b.bundle.features.iter())
        .flat_map(|f| f.names())
        .collect();
    let mut warnings: Vec<String> = policy
        .named_features()
        .into_iter()
        .filter(|(_, feature)| !served.contains(feature))
        .map(|(kind, feature)| {
            format!(
                "policy {}: {kind} rule for feature '{feature}', which no served bundle has \
                 (misspelt, or its bundle is not loaded): the rule does nothing",
                path.display()
            )
        })
        .collect();
    warnings.extend(named_warnings(path, policy, loaded));
    warnings
}

/// Warnings about `[[named]]` lists the vendor's named grants do not fit: more names
/// than the licence allows (the ones refused, named), or users listed for a feature
/// licensed to named hosts (or the reverse).
fn named_warnings(path: &Path, policy: &Policy, loaded: &Loaded) -> Vec<String> {
    let mut warnings = Vec::new();
    for list in &policy.named {
        let grants = (loaded.served.iter())
            .flat_map(|(_, b)| b.bundle.features.iter())
            .filter(|f| f.names().any(|n| n == list.feature));
        let grants: Vec<_> = grants.collect();
        let Some(named) = crate::named::combine(grants.iter().map(|f| f.named)) else {
            // Not served at all: the misspelt-feature warning says so already.
            if !grants.is_empty() {
                warnings.push(format!(
                    "policy {}:{}: named for '{}': the feature is not licensed to named \
                     users or hosts, so the list does nothing (anyone may use it)",
                    path.display(),
                    list.line,
                    list.feature
                ));
            }
            continue;
        };
        let (want, have) = match (named.hosts, list.hosts) {
            (true, false) => ("hosts", "users"),
            (false, true) => ("users", "hosts"),
            _ => {
                let beyond = crate::named::beyond_limit(policy, list, named.limit);
                if !beyond.is_empty() {
                    warnings.push(format!(
                        "policy {}:{}: named for '{}' lists more names than the {} the licence \
                         allows; the first {} count, these are refused: {}",
                        path.display(),
                        list.line,
                        list.feature,
                        named.limit,
                        named.limit,
                        beyond.join(", ")
                    ));
                }
                continue;
            }
        };
        warnings.push(format!(
            "policy {}:{}: named for '{}' lists {have}, but the feature is licensed to named \
             {want}: nobody may use it until the list names {want}",
            path.display(),
            list.line,
            list.feature
        ));
    }
    warnings
}

/// Opens the seat store of `data_dir` for serving: another tallyd holding it is said as
/// such ([`StartError::InUse`]).
pub fn open_store(data_dir: &Path) -> Result<Store, StartError> {
    Store::open_for_serving(&data_dir.join("store")).map_err(|e| match e {
        StoreError::InUse { path } => StartError::InUse {
            data_dir: data_dir.to_path_buf(),
            store: path,
        },
        e => StartError::Store(e),
    })
}

/// Re-reads the site's bundles and policy, for SIGHUP and admin reloads. A broken
/// policy file fails the whole reload: half a policy is worse than the old one.
pub fn reloader(site: &Site) -> Reloader {
    let rules = site.rules.clone();
    let bundle_dir = site.config.bundle_dir.clone();
    let data_dir = site.config.data_dir.clone();
    let policy_path = site.config.policy.clone();
    // A cluster member reads its `[[cluster]]` again: replacing a lost member changes it
    // (with the vendor's bundle binding the new member) while the others serve on.
    let cluster_config = (!site.config.cluster.is_empty()).then(|| site.config_path.clone());
    let key = site.key.clone();
    Arc::new(move || {
        let policy = match &policy_path {
            Some(p) => Policy::load(p).map_err(|e| {
                ReloadError::Policy(Refused {
                    source: p.display().to_string(),
                    reason: policy_reason(p, &e.to_string()),
                })
            })?,
            None => Policy::default(),
        };
        let mut rules = rules.clone();
        let members = match &cluster_config {
            Some(path) => {
                let members = reread_members(path)?;
                rules.cluster = members.iter().map(|m| m.key.clone()).collect();
                Some(members)
            }
            None => None,
        };
        let returns = bundles::read_returns(&data_dir)
            .map_err(|e| ReloadError::Other(format!("{}: {e}", data_dir.display())))?;
        rules.returned = returns.returned;
        rules.retired = returns.retired;
        let loaded = bundles::load_dir(&bundle_dir, &rules, UnixTime::now()).map_err(|e| {
            ReloadError::Other(format!("bundle directory {}: {e}", bundle_dir.display()))
        })?;
        // Refusals are logged by the server with the outcome, the same for SIGHUP and
        // an admin reload.
        for note in &loaded.notes {
            tracing::info!("{note}");
        }
        for warning in policy_warnings(policy_path.as_deref(), &policy, &loaded) {
            tracing::warn!("{warning}");
        }
        let cluster = match members {
            Some(members) => Some(resolve_members(&members, &loaded, &key).map_err(|e| {
                ReloadError::Other(format!(
                    "{}: [[cluster]]: {e}",
                    cluster_config.as_deref().unwrap_or(Path::new("")).display()
                ))
            })?),
            None => None,
        };
        Ok(Reloaded {
            bundles: loaded.bundles(),
            refused: refusals(&loaded),
            policy,
            cluster,
        })
    })
}

/// The `[[cluster]]` members of the config at `path`, read again for a reload. A
/// config that no longer parses, or names no members, is refused as a whole (nothing
/// is reloaded): a member turns into a single server only by a restart.
fn reread_members(path: &Path) -> Result<Vec<tally_config::ClusterMember>, ReloadError> {
    let config = DaemonConfig::load(path).map_err(|e| ReloadError::Other(e.to_string()))?;
    if config.cluster.is_empty() {
        return Err(ReloadError::Other(format!(
            "{}: [[cluster]] names no members now: a cluster member becomes a single \
             server only by a restart",
            path.display()
        )));
    }
    Ok(config.cluster)
}

/// Where a started server listens, for the lines `tallyd run` prints once it serves.
pub struct Listening {
    /// The UDP address bound.
    pub addr: SocketAddr,
    /// The operations endpoint's address, if it has one.
    pub http: Option<SocketAddr>,
    /// How many bundles are served.
    pub bundles: usize,
    /// The server key's fingerprint.
    pub server_key: String,
}

/// `tallyd run`: opens the log file, loads the site, opens the store and serves until
/// SIGTERM/SIGINT (or an admin shutdown). `ready` is called once the ports are bound,
/// before systemd hears READY.
pub fn run(
    config_path: &Path,
    log_file: Option<&Path>,
    ready: impl FnOnce(&Listening),
) -> Result<(), StartError> {
    // The log file first, so that a site reading it learns of every later failure; its
    // path comes from the config, which `load_site` reads again (and reports).
    let log_file = log_file.map(Path::to_path_buf).or_else(|| {
        DaemonConfig::load(config_path)
            .ok()
            .and_then(|c| c.log_file)
    });
    if let Some(path) = &log_file {
        crate::logfile::LOG_FILE
            .open(path)
            .map_err(|cause| StartError::LogFile {
                path: path.clone(),
                cause,
            })?;
    }
    let site = load_site(config_path)?;
    log_site(&site);
    let params = server_params(&site)?;
    let runtime = tokio::runtime::Runtime::new().map_err(StartError::Runtime)?;
    runtime.block_on(serve(params, &site, ready))
}

/// What the log says of a site at start: refused files, notes, policy warnings, and
/// that nothing is served when no bundle is valid.
fn log_site(site: &Site) {
    for refusal in &site.loaded.refused {
        tracing::warn!("{refusal}");
    }
    for note in &site.loaded.notes {
        tracing::info!("{note}");
    }
    for warning in policy_warnings(site.config.policy.as_deref(), &site.policy, &site.loaded) {
        tracing::warn!("{warning}");
    }
    if site.loaded.served.is_empty() {
        tracing::warn!(
            dir = %site.config.bundle_dir.display(),
            "no valid bundle: serving no features until bundles are added and reloaded (SIGHUP)"
        );
    }
}

/// The server's start settings from a site's config (the store opened, the uploader
/// set up, the admin token read if there is one); the reload signal is added by
/// [`serve`], which needs the runtime for it.
fn server_params(site: &Site) -> Result<ServerParams, StartError> {
    let config = &site.config;
    let uploader = match (&config.report_upload_url, &config.report_dir) {
        (Some(url), Some(dir)) => Some(Arc::new(Uploader::new(
            url,
            config.report_upload_ca.as_deref(),
            dir,
        )?)),
        _ => None,
    };
    let cluster = cluster_members(site)?;
    let store = open_store(&config.data_dir)?;
    let admin_token = identity::load_admin_token(&config.data_dir.join(identity::ADMIN_TOKEN_FILE))
        .map_err(|e| tracing::warn!("admin operations disabled: {e}"))
        .ok();
    Ok(ServerParams {
        lease_ttl: Duration::from_secs(config.lease_ttl_secs),
        heartbeat: Duration::from_secs(config.heartbeat_secs),
        idle_timeout: Duration::from_secs(config.idle_timeout_secs),
        reloader: Some(reloader(site)),
        admin_token,
        remove_holdoff: Duration::from_secs(config.remove_holdoff_secs),
        refused: refusals(&site.loaded),
        policy: site.policy.clone(),
        status_needs_token: config.status_needs_token,
        http_listen: config.http.then_some(config.http_listen),
        limits: crate::admission::Limits::from_config(config),
        reports: ReportSettings {
            host_fingerprint: site.rules.host_fingerprint.clone(),
            spool: config.report_dir.clone(),
            interval: Some(Duration::from_secs(config.report_interval_secs)),
            retention: Duration::from_secs(config.journal_retention_days * 86_400),
            uploader,
        },
        cluster,
        join_cluster: config.join_cluster,
        ..ServerParams::new(
            config.listen,
            site.key.clone(),
            site.loaded.bundles(),
            store,
        )
    })
}

/// The members `[[cluster]]` names, with their keys from the served bundles (which bind
/// exactly them: see `bundles`); this server must be one of them.
fn cluster_members(site: &Site) -> Result<Vec<tally_cluster::net::PeerNode>, StartError> {
    resolve_members(&site.config.cluster, &site.loaded, &site.key).map_err(|message| {
        StartError::Cluster {
            config: site.config_path.clone(),
            message,
        }
    })
}

/// `members` with their keys from the bundles `loaded` serves; `Err` says why not (this
/// server is not among them, or a member is bound by no served bundle).
fn resolve_members(
    members: &[tally_config::ClusterMember],
    loaded: &Loaded,
    key: &SecretKey,
) -> Result<Vec<tally_cluster::net::PeerNode>, String> {
    if members.is_empty() {
        return Ok(Vec::new());
    }
    let ours = key.public().fingerprint();
    if !members.iter().any(|m| m.key == ours) {
        return Err(format!(
            "this server's key {ours} is not among the members; add it with its address"
        ));
    }
    let bound: Vec<tally_protocol::keys::PublicKey> = loaded
        .served
        .iter()
        .flat_map(|(_, b)| b.bundle.bound_keys())
        .collect();
    members
        .iter()
        .map(|m| {
            let key = bound
                .iter()
                .find(|k| k.fingerprint() == m.key)
                .ok_or_else(|| {
                    format!(
                        "member {} is bound by no served bundle (the vendor's bundle for \
                         the cluster binds every member's key: see `tallyd request`)",
                        m.key
                    )
                })?;
            Ok(tally_cluster::net::PeerNode {
                addr: m.addr.to_string(),
                key: *key,
            })
        })
        .collect()
}

/// Binds and serves until a stop signal; systemd hears READY once bound and STOPPING
/// when the signal came.
async fn serve(
    mut params: ServerParams,
    site: &Site,
    ready: impl FnOnce(&Listening),
) -> Result<(), StartError> {
    let shutdown = signals::shutdown_requested()?;
    params.reload_signal = Some(signals::hangups()?);
    let server = Server::bind(params).await.map_err(StartError::Bind)?;
    ready(&Listening {
        addr: server.local_addr().map_err(StartError::Serve)?,
        http: server.http_addr(),
        bundles: site.loaded.served.len(),
        server_key: site.key.public().fingerprint(),
    });
    signals::notify_systemd("READY=1");
    server
        .run(async {
            shutdown.await;
            signals::notify_systemd("STOPPING=1");
        })
        .await
        .map_err(StartError::Serve)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A site on disk: config naming a data dir, bundle dir, vendor key and policy.
    fn site(dir: &Path, vendor_keys: bool) -> PathBuf {
        let data = dir.join("data");
        let bundles = dir.join("bundles");
        std::fs::create_dir_all(&bundles).unwrap();
        let vendor = SecretKey::from_seed([3; 32]).public();
        let key_file = dir.join("vendor.pub");
        std::fs::write(
            &key_file,
            tally_protocol::keys::public_key_to_armored(&vendor),
        )
        .unwrap();
        let policy = dir.join("policy.toml");
        std::fs::write(
            &policy,
            "[[max]]\nfeature = \"solvr\"\nseats = 1\nuser = \"ann\"\n",
        )
        .unwrap();
        let keys = if vendor_keys {
            format!("vendor_keys = [{:?}]\n", key_file)
        } else {
            String::new()
        };
        let config = dir.join("tallyd.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\nbundle_dir = {:?}\npolicy = {:?}\n{keys}",
                data, bundles, policy
            ),
        )
        .unwrap();
        config
    }

    /// `init` makes the key and the token once, private; a second run finds them.
    #[test]
    fn init_creates_the_key_and_the_token_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = init(&data).unwrap();
        assert!(first.identity_created && first.token_created);
        for file in [&first.identity_file, &first.token_file] {
            let mode = std::fs::metadata(file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", file.display());
        }
        let second = init(&data).unwrap();
        assert!(!second.identity_created && !second.token_created);
        assert_eq!(first.server_key, second.server_key);
        let text = second.to_string();
        assert!(text.starts_with("server identity exists: "), "{text}");
        assert!(text.contains(&format!("server key fingerprint: {}", first.server_key)));
    }

    /// A site is loaded only with a key and a vendor key, and says which is missing.
    #[test]
    fn a_site_needs_a_server_key_and_a_vendor_key() {
        let dir = tempfile::tempdir().unwrap();
        let config = site(dir.path(), true);
        let e = load_site(&config).err().expect("no server key yet");
        assert!(matches!(e, StartError::NoIdentity(_)), "{e}");
        assert!(e.to_string().ends_with("run `tallyd init` first"), "{e}");
        init(&dir.path().join("data")).unwrap();
        let config = site(dir.path(), false);
        let e = load_site(&config).err().expect("no vendor key");
        assert!(matches!(e, StartError::NoVendorKeys(_)), "{e}");
    }

    /// `check-config` reports what would be served with the policy's warnings, and
    /// fails (exit 65 in the binary) when a bundle file is refused.
    #[test]
    fn check_config_reports_the_site_and_fails_on_a_refused_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let config = site(dir.path(), true);
        init(&dir.path().join("data")).unwrap();
        let checked = check_config(&config).unwrap();
        let report = &checked.report;
        assert!(
            report.starts_with(&format!("configuration {} is valid\n", config.display())),
            "{report}"
        );
        assert!(report.contains("    max solvr 1 seat for"), "{report}");
        assert!(
            report.contains("warning: policy") && report.contains("'solvr'"),
            "{report}"
        );
        assert!(checked.verdict().is_ok());
        std::fs::write(dir.path().join("bundles/broken.bundle"), "not a bundle").unwrap();
        let checked = check_config(&config).unwrap();
        assert_eq!(checked.refused.len(), 1, "{:?}", checked.refused);
        assert!(
            checked.refused[0].contains("broken.bundle"),
            "{:?}",
            checked.refused
        );
        let e = checked.verdict().unwrap_err();
        assert!(matches!(e, StartError::Refused(1)), "{e}");
        assert_eq!(
            e.to_string(),
            "1 bundle file(s) refused; the others would be served"
        );
    }

    /// `check-config` lists the rules options files brought too.
    #[test]
    fn check_config_lists_the_options_file_rules() {
        let text = "case_insensitive_users = true\ntimeout_all_secs = 600\n\
                    [groups]\ncfd = [\"ana\"]\n\
                    [[include_borrow]]\nfeature = \"solver\"\ngroup = \"cfd\"\n\
                    [[exclude_borrow]]\nfeature = \"solver\"\nuser = \"bo\"\n\
                    [[include_all]]\ngroup = \"cfd\"\n[[exclude_all]]\nhost = \"kiosk\"\n\
                    [[borrow_lowwater]]\nfeature = \"solver\"\nseats = 2\n\
                    [[linger]]\nfeature = \"viewer\"\nsecs = 120\n";
        let p = Policy::parse(Path::new("p.toml"), text).unwrap();
        let mut out = String::new();
        describe_policy(&mut out, &p);
        assert_eq!(
            out,
            "    include_borrow solver for group cfd\n    exclude_borrow solver for user bo\n    \
             include_all for group cfd\n    exclude_all for host kiosk\n    \
             borrow_lowwater solver 2 seats never borrowed\n    linger viewer 120 s\n    \
             timeout_all 600 s\n    user names compared without case\n"
        );
    }

    /// Issue 15: a broken policy's reload refusal spanned two log lines and named the
    /// file twice.
    #[test]
    fn a_policy_error_is_one_line_naming_the_line() {
        let p = Path::new("/etc/tally/policy.toml");
        assert_eq!(
            policy_reason(p, "/etc/tally/policy.toml:3: invalid string\nexpected `\"`"),
            "line 3: invalid string; expected `\"`"
        );
        assert_eq!(
            policy_reason(p, "/etc/tally/policy.toml: No such file or directory"),
            "No such file or directory"
        );
    }
}
