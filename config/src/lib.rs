//! `tallyd`'s configuration file.
//!
//! The file is TOML; every setting has a default, named here as a `DEFAULT_*` constant
//! so documentation, `tallyd demo` and the packaged example file agree. Errors name the
//! file and line, and validation catches settings that parse but cannot work together
//! (a heartbeat interval longer than the lease TTL) before any port is bound.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod options;
pub mod policy;

pub use policy::Policy;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Default QUIC listen address: every interface, port 27300.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:27300";
/// Default data directory (identity key, seat store).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/tally";
/// Default directory of bundle files.
pub const DEFAULT_BUNDLE_DIR: &str = "/etc/tally/bundles";
/// Default lease time-to-live without heartbeats, seconds. Three missed heartbeats.
pub const DEFAULT_LEASE_TTL_SECS: u64 = 90;
/// Default heartbeat interval the daemon asks clients for, seconds.
pub const DEFAULT_HEARTBEAT_SECS: u64 = 30;
/// Default QUIC idle timeout, seconds: how fast a vanished client's seat comes back.
/// Clients send keep-alives at a third of it.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 15;
/// Largest config file read, so a wrong path (a disk image) fails fast.
pub const MAX_CONFIG_LEN: u64 = 1024 * 1024;

/// The daemon configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// QUIC listen address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where the identity key and the seat store live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Where bundle files are loaded from.
    #[serde(default = "default_bundle_dir")]
    pub bundle_dir: PathBuf,
    /// Files holding the vendor public keys whose bundles this server accepts.
    #[serde(default)]
    pub vendor_keys: Vec<PathBuf>,
    /// Seconds without a heartbeat before a lease is reclaimed.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_secs: u64,
    /// Heartbeat interval asked of clients, seconds.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u64,
    /// QUIC idle timeout, seconds.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// The policy file (reservations, limits, include/exclude), if any.
    #[serde(default)]
    pub policy: Option<PathBuf>,
    /// Whether `status` needs the admin token (by default anyone may read it).
    #[serde(default)]
    pub status_needs_token: bool,
    /// Spool directory for usage reports; scheduled export is off without one.
    #[serde(default)]
    pub report_dir: Option<PathBuf>,
    /// How often a usage report is written into `report_dir`, seconds.
    #[serde(default = "default_report_interval")]
    pub report_interval_secs: u64,
    /// Exported journal events older than this many days are compacted away.
    #[serde(default = "default_retention")]
    pub journal_retention_days: u64,
    /// HTTPS URL the spooled reports are POSTed to; none: reports stay in `report_dir`.
    #[serde(default)]
    pub report_upload_url: Option<String>,
    /// Extra CA certificates (PEM) to trust for `report_upload_url`.
    #[serde(default)]
    pub report_upload_ca: Option<PathBuf>,
    /// Whether to serve the operations HTTP endpoint (metrics, status, dashboard).
    #[serde(default = "default_true")]
    pub http: bool,
    /// Its address; loopback by default, so exposing it is a decision.
    #[serde(default = "default_http_listen")]
    pub http_listen: SocketAddr,
    /// Host names the operations endpoint answers to, besides IP literals, `localhost`
    /// and this machine's own name: any other `Host` header is refused (421), so that
    /// a web page cannot reach the port through a name it controls (DNS rebinding).
    #[serde(default)]
    pub http_hosts: Vec<String>,
    /// Most client connections at once; more are refused, so a flood of connections
    /// cannot take the memory that held leases need.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most connections at once from one IP address (a terminal server counts once).
    #[serde(default = "default_max_connections_per_address")]
    pub max_connections_per_address: usize,
    /// Checkouts per second one IP address may ask for, on average; 0: no limit.
    /// Heartbeats and checkins are never limited.
    #[serde(default = "default_checkout_rate")]
    pub checkout_rate: u32,
    /// Checkouts one IP address may ask for in a burst above the rate.
    #[serde(default = "default_checkout_burst")]
    pub checkout_burst: u32,
    /// After `tally admin remove`, seconds the removed lease's user gets no seat of that
    /// feature on that host (so the seat goes to someone else, not to the holder's
    /// automatic retry); 0: no hold-off.
    #[serde(default = "default_remove_holdoff")]
    pub remove_holdoff_secs: u64,
    /// A file that gets every log line too (appended, created 0640), for sites without
    /// journald; reopened on SIGHUP so that logrotate can move it away.
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    /// The servers of a three-server site (`[[cluster]]` tables), this one included:
    /// each member's key fingerprint and the address its peers reach it at. Empty: a
    /// single server. Every member must be bound by the bundle the site serves.
    #[serde(default)]
    pub cluster: Vec<ClusterMember>,
    /// This server joins a cluster that runs already (it replaces a lost member, or
    /// the site grows): at its first start, with an empty data directory, it waits to
    /// be added by `tally admin cluster add` on the leader instead of forming a
    /// cluster with the `[[cluster]]` members (a new member forming one of its own
    /// would hold elections the others refuse and disturb them). Moot once it holds
    /// the cluster's log.
    #[serde(default)]
    pub join_cluster: bool,
}

/// A server of a site that runs several as one (`[[cluster]]` in `tallyd.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterMember {
    /// The member's key fingerprint, as `tallyd init` and `tallyd request` print it.
    pub key: String,
    /// The address (host:port of its `listen` port) the other members and clients
    /// reach it at: clients and peers share the one UDP port.
    pub addr: SocketAddr,
}

/// Most servers of a cluster (the bundle format's bound, too): Raft wants an odd number,
/// 3 or 5; 7 tolerates three failures at the cost of slower commits.
pub const MAX_CLUSTER_MEMBERS: usize = 7;

/// Default hold-off after an admin removal: five minutes, as long as a user takes to
/// notice and as short as a mistaken removal can be borne.
pub const DEFAULT_REMOVE_HOLDOFF_SECS: u64 = 300;

fn default_remove_holdoff() -> u64 {
    DEFAULT_REMOVE_HOLDOFF_SECS
}

/// Default most connections at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
/// Default most connections from one address.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 2_000;
/// Default checkouts per second per address.
pub const DEFAULT_CHECKOUT_RATE: u32 = 100;
/// Default checkout burst per address.
pub const DEFAULT_CHECKOUT_BURST: u32 = 200;

fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_max_connections_per_address() -> usize {
    DEFAULT_MAX_CONNECTIONS_PER_ADDRESS
}
fn default_checkout_rate() -> u32 {
    DEFAULT_CHECKOUT_RATE
}
fn default_checkout_burst() -> u32 {
    DEFAULT_CHECKOUT_BURST
}

/// Default address of the operations HTTP endpoint.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:27301";

fn default_true() -> bool {
    true
}
fn default_http_listen() -> SocketAddr {
    DEFAULT_HTTP_LISTEN
        .parse()
        .expect("default HTTP address parses")
}

/// Default report interval: daily.
pub const DEFAULT_REPORT_INTERVAL_SECS: u64 = 86_400;
/// Default journal retention after export, days.
pub const DEFAULT_JOURNAL_RETENTION_DAYS: u64 = 30;

fn default_report_interval() -> u64 {
    DEFAULT_REPORT_INTERVAL_SECS
}
fn default_retention() -> u64 {
    DEFAULT_JOURNAL_RETENTION_DAYS
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN
        .parse()
        .expect("default listen address parses")
}
fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}
fn default_bundle_dir() -> PathBuf {
    PathBuf::from(DEFAULT_BUNDLE_DIR)
}
fn default_lease_ttl() -> u64 {
    DEFAULT_LEASE_TTL_SECS
}
fn default_heartbeat() -> u64 {
    DEFAULT_HEARTBEAT_SECS
}
fn default_idle_timeout() -> u64 {
    DEFAULT_IDLE_TIMEOUT_SECS
}

impl Default for DaemonConfig {
    fn default() -> DaemonConfig {
        DaemonConfig {
            listen: default_listen(),
            data_dir: default_data_dir(),
            bundle_dir: default_bundle_dir(),
            vendor_keys: Vec::new(),
            lease_ttl_secs: DEFAULT_LEASE_TTL_SECS,
            heartbeat_secs: DEFAULT_HEARTBEAT_SECS,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            policy: None,
            status_needs_token: false,
            report_dir: None,
            report_interval_secs: DEFAULT_REPORT_INTERVAL_SECS,
            journal_retention_days: DEFAULT_JOURNAL_RETENTION_DAYS,
            http: true,
            http_listen: default_http_listen(),
            http_hosts: Vec::new(),
            report_upload_url: None,
            report_upload_ca: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            checkout_rate: DEFAULT_CHECKOUT_RATE,
            checkout_burst: DEFAULT_CHECKOUT_BURST,
            remove_holdoff_secs: DEFAULT_REMOVE_HOLDOFF_SECS,
            log_file: None,
            cluster: Vec::new(),
            join_cluster: false,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    // `cause`, not `source`: the message already holds it, and an error chain (`{:#}`)
    // would print it twice ("No such file or directory" twice in one line).
    #[error("{path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        cause: std::io::Error,
    },
    /// The file is larger than [`MAX_CONFIG_LEN`].
    #[error("{path}: larger than {MAX_CONFIG_LEN} bytes, not a tally config file")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The TOML does not parse or has a wrong or unknown key.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The settings parse but cannot work together.
    #[error("{path}: {message}")]
    Invalid {
        /// The file, or `<command line>`.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
}

impl DaemonConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<DaemonConfig, ConfigError> {
        let read = |cause| ConfigError::Read {
            path: path.to_path_buf(),
            cause,
        };
        let len = std::fs::metadata(path).map_err(read)?.len();
        if len > MAX_CONFIG_LEN {
            return Err(ConfigError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        DaemonConfig::parse(path, &text)
    }

    /// Parses and validates config text; `path` is used in messages only.
    pub fn parse(path: &Path, text: &str) -> Result<DaemonConfig, ConfigError> {
        let config: DaemonConfig = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(1);
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                message: e.message().to_string(),
            }
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Checks settings that parse but cannot work together.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message,
            })
        };
        if self.heartbeat_secs == 0 {
            return invalid("heartbeat_secs must be at least 1".into());
        }
        if self.lease_ttl_secs < 2 * self.heartbeat_secs {
            return invalid(format!(
                "lease_ttl_secs ({}) must be at least twice heartbeat_secs ({}), or one \
                 delayed heartbeat would cost a user the seat",
                self.lease_ttl_secs, self.heartbeat_secs
            ));
        }
        if let Some(url) = &self.report_upload_url {
            if !url.starts_with("https://") {
                return invalid(format!("report_upload_url ({url}) must be an https:// URL"));
            }
            if self.report_dir.is_none() {
                return invalid(
                    "report_upload_url needs report_dir (reports are uploaded from the spool)"
                        .into(),
                );
            }
        }
        if self.report_interval_secs < 60 {
            return invalid(format!(
                "report_interval_secs ({}) must be at least 60",
                self.report_interval_secs
            ));
        }
        if self.cluster.len() > MAX_CLUSTER_MEMBERS {
            return invalid(format!(
                "[[cluster]] names {} servers; at most {MAX_CLUSTER_MEMBERS}",
                self.cluster.len()
            ));
        }
        if self.join_cluster && self.cluster.is_empty() {
            return invalid(
                "join_cluster is set but [[cluster]] names no members: a server joins the \
                 cluster its [[cluster]] tables name"
                    .into(),
            );
        }
        for (i, m) in self.cluster.iter().enumerate() {
            if let Some(other) = self.cluster[..i]
                .iter()
                .find(|o| o.key == m.key || o.addr == m.addr)
            {
                return invalid(format!(
                    "[[cluster]] names the server {} at {} twice (also as {} at {}): each \
                     member once, with its own key and address",
                    m.key, m.addr, other.key, other.addr
                ));
            }
            if m.addr.ip().is_unspecified() || m.addr.port() == 0 {
                return invalid(format!(
                    "[[cluster]] address {} of {} is not one a peer can reach: give the \
                     server's own address and port",
                    m.addr, m.key
                ));
            }
        }
        if self.max_connections == 0 || self.max_connections_per_address == 0 {
            return invalid(
                "max_connections and max_connections_per_address must be at least 1".into(),
            );
        }
        if self.checkout_rate > 0 && self.checkout_burst == 0 {
            return invalid(
                "checkout_burst must be at least 1 when checkout_rate limits checkouts".into(),
            );
        }
        if self.idle_timeout_secs < 3 {
            return invalid(format!(
                "idle_timeout_secs ({}) must be at least 3",
                self.idle_timeout_secs
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = DaemonConfig::parse(Path::new("t.toml"), "").unwrap();
        assert_eq!(c, DaemonConfig::default());
        let c = DaemonConfig::parse(
            Path::new("t.toml"),
            "listen = \"127.0.0.1:4000\"\nlease_ttl_secs = 60\nheartbeat_secs = 20\n",
        )
        .unwrap();
        assert_eq!(c.listen.port(), 4000);
        assert_eq!(c.lease_ttl_secs, 60);
    }

    #[test]
    fn errors_name_file_and_line() {
        let err = DaemonConfig::parse(
            Path::new("/etc/tally/tallyd.toml"),
            "# comment\nlisten = \"127.0.0.1:4000\"\nlease_tll_secs = 60\n",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("/etc/tally/tallyd.toml:3: "), "{text}");
        assert!(text.contains("lease_tll_secs"), "{text}");

        let err = DaemonConfig::parse(Path::new("c.toml"), "listen = \"nowhere\"\n").unwrap_err();
        assert!(err.to_string().starts_with("c.toml:1: "), "{err}");

        let err = DaemonConfig::parse(
            Path::new("c.toml"),
            "lease_ttl_secs = 30\nheartbeat_secs = 30\n",
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { .. }), "{err}");
    }

    #[test]
    fn cluster_members_parse_and_each_is_named_once_at_a_reachable_address() {
        let member =
            |key: &str, addr: &str| format!("[[cluster]]\nkey = \"{key}\"\naddr = \"{addr}\"\n");
        let three = [
            ("a", "10.0.0.1:27300"),
            ("b", "10.0.0.2:27300"),
            ("c", "10.0.0.3:27300"),
        ];
        let text: String = three.iter().map(|(k, a)| member(k, a)).collect();
        let c = DaemonConfig::parse(Path::new("t.toml"), &text).unwrap();
        assert_eq!(c.cluster.len(), 3);
        assert_eq!(c.cluster[1].key, "b");
        assert_eq!(c.cluster[2].addr.port(), 27300);
        for (bad, why) in [
            (
                member("a", "10.0.0.1:27300") + &member("a", "10.0.0.2:27300"),
                "twice",
            ),
            (
                member("a", "10.0.0.1:27300") + &member("b", "10.0.0.1:27300"),
                "twice",
            ),
            (member("a", "0.0.0.0:27300"), "not one a peer can reach"),
            (member("a", "10.0.0.1:0"), "not one a peer can reach"),
        ] {
            let err = DaemonConfig::parse(Path::new("t.toml"), &bad).unwrap_err();
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
        let eight: String = (0..8)
            .map(|i| member(&i.to_string(), &format!("10.0.0.{i}:1")))
            .collect();
        let err = DaemonConfig::parse(Path::new("t.toml"), &eight).unwrap_err();
        assert!(err.to_string().contains("at most 7"), "{err}");
        // A server joins the cluster its members name, never none.
        let joining =
            DaemonConfig::parse(Path::new("t.toml"), &format!("join_cluster = true\n{text}"))
                .unwrap();
        assert!(joining.join_cluster && !c.join_cluster);
        let err = DaemonConfig::parse(Path::new("t.toml"), "join_cluster = true\n").unwrap_err();
        assert!(err.to_string().contains("names no members"), "{err}");
    }

    #[test]
    fn load_reports_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = DaemonConfig::load(&dir.path().join("missing.toml")).unwrap_err();
        assert!(err.to_string().contains("missing.toml"), "{err}");
        // The OS error is in the message, not also in the chain, so a chain printer
        // (`{:#}`) says it once.
        assert!(std::error::Error::source(&err).is_none(), "{err}");
    }
}

#[cfg(test)]
mod packaged {
    use super::*;

    /// The packaged example file parses and states exactly the defaults.
    #[test]
    fn packaged_example_is_valid_and_shows_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/tallyd.toml");
        let config = DaemonConfig::load(&path).unwrap();
        assert_eq!(config, DaemonConfig::default());
    }
}
