//! The replicated ledger of a three-server tally site.
//!
//! tally runs a site's servers as one on openraft, an existing Raft implementation
//! (used in production by Databend's meta service, tested with Jepsen): we do not write
//! consensus of our own. This crate holds what openraft asks of an application — the
//! Raft log, vote and snapshots persisted in sled, and the Raft RPCs carried over QUIC —
//! kept generic over the command type so that the daemon's ledger plugs in as the state
//! machine. A single server is a cluster of one: there is one durable path.

pub mod durable;
pub mod net;
pub mod store;
