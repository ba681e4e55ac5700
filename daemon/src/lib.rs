//! `tallyd`, the tally license server.
//!
//! - [`ledger`]: the seat ledger, a sans-IO state machine.
//! - [`store`]: the sled seat store.
//! - [`disk`]: the store as the ledger task holds it, broken and reopened on disk faults.
//! - [`server`]: the QUIC shell: binding, start, supervision, stop.
//! - `conn`, `handlers`, `ledger_task`, `shared`: connections and streams, one handler
//!   per request type, the task that owns the ledger and the store, their shared state.
//! - [`metrics`], [`ops`], [`reload`], [`reports`], [`clock`]: counters, what the
//!   operations endpoint may ask, reloads, usage reports and the spool, the clock.
//! - [`params`]: what the server needs to start, with defaults.
//! - [`admission`]: connection, handshake and checkout-rate limits.
//! - [`identity`] and [`tls`]: the server key and the certificate made from it.
//! - [`bundles`]: loading and combining bundle files.
//! - [`host`]: host fingerprint and facts for activation requests.
//! - [`journal`]: the usage journal and report export.
//! - [`http`]: metrics, status API and dashboard.
//! - [`upload`]: HTTPS upload of spooled reports.
//! - [`files`]: files written whole or not at all.
//! - [`logfile`]: the log file for sites without journald.
//! - [`demo`]: the self-issued demo bundle of `tallyd demo`.
//! - [`diagnose`]: `tallyd diagnose`, the support file (redacted config, log tail).
//! - [`returns`]: `tallyd return`, giving a bundle back with a signed proof.
//! - [`signals`]: graceful shutdown on SIGTERM/SIGINT.
//! - [`start`]: the bodies of `tallyd init`, `check-config` and `run` (load a site,
//!   report it, serve it), with [`start::StartError`].
//! - [`error`]: the daemon's [`Error`], and what a client is told of it.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admission;
pub mod bundles;
pub mod clock;
mod commit;
mod conn;
pub mod consensus;
pub mod demo;
pub mod diagnose;
pub mod disk;
pub mod error;
pub mod files;
mod handlers;
pub mod host;
pub mod http;
pub mod identity;
pub mod journal;
pub mod ledger;
mod ledger_task;
pub mod logfile;
pub mod metrics;
pub mod named;
pub mod ops;
pub mod params;
pub mod reload;
pub mod replicated;
pub mod reports;
pub mod returns;
pub mod server;
pub mod sessions;
mod shared;
pub mod signals;
pub mod start;
pub mod store;
pub mod tls;
pub mod upload;

pub use error::Error;
