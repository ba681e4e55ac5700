//! What the server needs to start: [`ServerParams`] and the settings it carries.
//!
//! Plain data, apart from the server, so that the shell's modules, `tallyd`, the tests
//! and the bench all name the same settings without importing the shell (and the shell
//! does not import them back). [`ServerParams::new`] takes what has no sensible default
//! (address, key, bundles, store) and fills the rest with the defaults a `tallyd.toml`
//! without those settings gets, so a caller spells only what it changes:
//! `ServerParams { admin_token, ..ServerParams::new(listen, key, bundles, store) }`.

use crate::admission::Limits;
use crate::store::Store;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tally_config::Policy;
use tally_protocol::bundle::VerifiedBundle;
use tally_protocol::keys::SecretKey;
use tally_protocol::wire::Refused;
use tokio::sync::mpsc;

/// Everything the server needs to start.
pub struct ServerParams {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// The server identity key.
    pub identity: SecretKey,
    /// The bundles to serve, already verified and checked against this server.
    pub bundles: Vec<VerifiedBundle>,
    /// The opened seat store.
    pub store: Store,
    /// The site's servers when it runs several as one (`[[cluster]]`), this one
    /// included, with their keys from the bundle; empty for a single server.
    pub cluster: Vec<tally_cluster::net::PeerNode>,
    /// Whether this server joins a running cluster (`join_cluster`): with a new log it
    /// waits to be added instead of forming the cluster.
    pub join_cluster: bool,
    /// Default lease TTL.
    pub lease_ttl: Duration,
    /// Heartbeat interval asked of clients.
    pub heartbeat: Duration,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// Demo mode (demo vendor key).
    pub demo: bool,
    /// Re-reads the bundles (on SIGHUP or an admin reload); `None` if reloading is not
    /// possible (no bundle directory).
    pub reloader: Option<Reloader>,
    /// The admin token; admin requests are refused when `None`.
    pub admin_token: Option<String>,
    /// Fires when the bundles should be reloaded (SIGHUP).
    pub reload_signal: Option<mpsc::Receiver<()>>,
    /// The site's policy.
    pub policy: Policy,
    /// Whether status needs the admin token.
    pub status_needs_token: bool,
    /// Usage reports: spool directory, schedule, journal retention.
    pub reports: ReportSettings,
    /// The operations HTTP endpoint (metrics, status, dashboard); `None` for none.
    pub http_listen: Option<SocketAddr>,
    /// Connection, handshake and checkout-rate limits.
    pub limits: Limits,
    /// After an admin removal, how long the removed user gets no seat of that feature
    /// on that host (`remove_holdoff_secs`); zero: none.
    pub remove_holdoff: Duration,
    /// Bundle files refused when the server started: shown in `/api/status` and
    /// `/metrics` until a reload reads the directory again.
    pub refused: Vec<Refused>,
}

impl ServerParams {
    /// Parameters with the given address, key, bundles and store and every other
    /// setting at the default of a `tallyd.toml` that does not name it (lease TTL,
    /// heartbeat, idle timeout, removal hold-off, limits; default policy; no reloader,
    /// no admin token, no HTTP endpoint, no scheduled reports).
    pub fn new(
        listen: SocketAddr,
        identity: SecretKey,
        bundles: Vec<VerifiedBundle>,
        store: Store,
    ) -> ServerParams {
        ServerParams {
            listen,
            identity,
            bundles,
            store,
            cluster: Vec::new(),
            join_cluster: false,
            lease_ttl: Duration::from_secs(tally_config::DEFAULT_LEASE_TTL_SECS),
            heartbeat: Duration::from_secs(tally_config::DEFAULT_HEARTBEAT_SECS),
            idle_timeout: Duration::from_secs(tally_config::DEFAULT_IDLE_TIMEOUT_SECS),
            demo: false,
            reloader: None,
            admin_token: None,
            reload_signal: None,
            policy: Policy::default(),
            status_needs_token: false,
            reports: ReportSettings::default(),
            http_listen: None,
            limits: Limits::default(),
            remove_holdoff: Duration::from_secs(tally_config::DEFAULT_REMOVE_HOLDOFF_SECS),
            refused: Vec::new(),
        }
    }
}

/// Where and when usage reports are written.
#[derive(Debug, Clone)]
pub struct ReportSettings {
    /// The host fingerprint named in reports.
    pub host_fingerprint: String,
    /// Spool directory for scheduled reports (and a copy of admin exports).
    pub spool: Option<std::path::PathBuf>,
    /// Export a report this often into the spool; `None` only on request.
    pub interval: Option<Duration>,
    /// Exported journal events older than this are compacted away.
    pub retention: Duration,
    /// Uploads spooled reports to the vendor, if configured.
    pub uploader: Option<Arc<crate::upload::Uploader>>,
}

impl Default for ReportSettings {
    fn default() -> Self {
        ReportSettings {
            host_fingerprint: String::new(),
            spool: None,
            interval: None,
            retention: Duration::from_secs(30 * 86_400),
            uploader: None,
        }
    }
}

/// Loads the current bundles and policy from wherever they live.
pub type Reloader = Arc<dyn Fn() -> Result<Reloaded, ReloadError> + Send + Sync>;

/// What a [`Reloader`] read.
pub struct Reloaded {
    /// The bundles to serve.
    pub bundles: Vec<VerifiedBundle>,
    /// Bundle files refused, each with its reason.
    pub refused: Vec<Refused>,
    /// The policy.
    pub policy: Policy,
    /// A cluster member's `[[cluster]]` members as the config names them now, with
    /// their keys (`None`: a single server).
    pub cluster: Option<Vec<tally_cluster::net::PeerNode>>,
}

/// Why a [`Reloader`] read nothing to serve.
#[derive(Debug)]
pub enum ReloadError {
    /// The policy file is broken: a half-read policy is worse than the old one, so the
    /// whole reload is given up.
    Policy(Refused),
    /// Something else (the bundle directory cannot be listed, the returned list).
    Other(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_config::DaemonConfig;

    /// `new` must give what `tallyd run` gives for a config file that names nothing:
    /// a test or bench built on it then measures the server a site gets by default.
    #[test]
    fn new_has_the_defaults_of_an_empty_config() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let config = DaemonConfig::default();
        let params = ServerParams::new(
            "127.0.0.1:0".parse().unwrap(),
            SecretKey::from_seed([1; 32]),
            Vec::new(),
            store,
        );
        assert_eq!(params.lease_ttl, Duration::from_secs(config.lease_ttl_secs));
        assert_eq!(params.heartbeat, Duration::from_secs(config.heartbeat_secs));
        assert_eq!(
            params.idle_timeout,
            Duration::from_secs(config.idle_timeout_secs)
        );
        assert_eq!(
            params.remove_holdoff,
            Duration::from_secs(config.remove_holdoff_secs)
        );
        assert_eq!(params.limits, Limits::from_config(&config));
        assert_eq!(params.status_needs_token, config.status_needs_token);
        assert_eq!(params.policy, Policy::default());
        assert!(params.admin_token.is_none() && params.http_listen.is_none());
        assert!(params.reloader.is_none() && params.reload_signal.is_none());
        assert!(!params.demo && params.refused.is_empty() && params.reports.interval.is_none());
    }
}
