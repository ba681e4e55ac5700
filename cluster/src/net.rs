//! Raft RPCs between the servers of a site over QUIC, with mutual TLS pinned to node keys.
//!
//! - [`tls`]: the peer TLS configurations; only nodes whose keys the site's bundle binds
//!   take part ([`PeerKeys`]), and a dialler talks only to the node it dialled.
//! - [`frame`]: the length-prefixed, versioned bincode frames an RPC travels in.
//! - [`transport`]: openraft's network factory over quinn ([`QuicNetwork`]) and the
//!   accepting side ([`serve_peer`]).
//!
//! # Wire format
//!
//! - **Connection**: QUIC with TLS 1.3 on tallyd's UDP port, ALPN `tally-raft/1` (clients
//!   use `tally/1` on the same endpoint). Both sides present a certificate self-signed by
//!   their ed25519 node key; the acceptor requires one whose key the site binds, the
//!   dialler requires the key of the node it dialled. One connection per pair of nodes
//!   and direction, kept alive every 2 s, dropped after 10 s of silence.
//! - **RPC**: one bidirectional stream per RPC; the dialler writes one request frame and
//!   finishes its half, the acceptor answers with one frame and finishes. A request the
//!   acceptor cannot read has its stream reset with a code from [`transport::codes`]
//!   (1 too large, 2 unreadable); a connection from a key that is not (or no longer) a
//!   node is closed with code 3.
//! - **Frame**: `[u32 length][u16 version][bincode payload]`, big-endian, `length`
//!   counting version and payload, at most [`frame::MAX_FRAME`] (16 MiB), judged before
//!   anything is allocated. The payload is bincode 2 (serde, standard config) of
//!   [`transport::PeerRequest`] or [`transport::PeerResponse`]: openraft's own RPC types,
//!   so the enum tag says which RPC. Snapshots travel in openraft's chunks.
//! - **Versioning**: a change to the payload's layout bumps the frame version; a peer
//!   reading a version it does not know resets the stream (the RPC fails, openraft
//!   retries), so nodes of a site are upgraded one at a time only across compatible
//!   versions. A change that cannot coexist gets a new ALPN (`tally-raft/2`), offered
//!   next to the old one during a rolling upgrade.

pub mod frame;
pub mod tls;
pub mod transport;

pub use tls::{is_peer_connection, peer_key, PeerIdentity, PeerKeys, PeerTlsError, PEER_ALPN};
pub use transport::{serve_peer, PeerError, PeerNode, QuicNetwork};
