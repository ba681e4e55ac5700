//! Raft RPCs between the servers of a site over QUIC, with mutual TLS pinned to node keys.
//!
//! - [`tls`]: the peer TLS configurations; only nodes whose keys the site's bundle binds
//!   take part ([`PeerKeys`]), and a dialler talks only to the node it dialled.
//! - [`frame`]: the length-prefixed, versioned bincode frames an RPC travels in.
//! - [`transport`]: openraft's network factory over quinn ([`QuicNetwork`]) and the
//!   accepting side ([`serve_peer`]).

pub mod frame;
pub mod tls;
pub mod transport;

pub use tls::{peer_key, PeerIdentity, PeerKeys, PeerTlsError, PEER_ALPN};
pub use transport::{serve_peer, PeerError, PeerNode, QuicNetwork};
