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
pub mod ops;
pub mod store;

use std::io::Cursor; // the snapshot data type `declare_raft_types!` defaults to
use tally_protocol::replicate::StoreCommand;

openraft::declare_raft_types!(
    /// The Raft of a tally site: commands are the seat store's batches (applied by each
    /// server's state machine to its own store), node ids are derived from node keys
    /// (`PublicKey::node_id`), a node is its address and key.
    pub Site:
        D = StoreCommand,
        R = (),
        NodeId = u64,
        Node = net::PeerNode,
);
