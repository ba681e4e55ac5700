//! Raft RPCs between the servers of a site over QUIC, with mutual TLS pinned to node keys.
//!
//! - [`tls`]: the peer TLS configurations; only nodes whose keys the site's bundle binds
//!   take part ([`PeerKeys`]), and a dialler talks only to the node it dialled.

pub mod tls;

pub use tls::{peer_key, PeerIdentity, PeerKeys, PeerTlsError, PEER_ALPN};
