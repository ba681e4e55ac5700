//! The QUIC/TLS side of the server identity: a self-signed certificate made from the
//! identity key, and the quinn server configuration around it.
//!
//! There is no CA. The certificate exists only to carry the identity key through TLS;
//! clients trust it because the vendor-signed bundle binds that key (see ARCHITECTURE.md).

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::sync::Arc;
use std::time::Duration;
use tally_protocol::keys::SecretKey;
use tally_protocol::wire::ALPN;

/// Streams a client may have open at once; a checkout, a heartbeat and a status fit
/// with room to spare, and the bound keeps a misbehaving client's cost small.
const MAX_CONCURRENT_STREAMS: u32 = 16;

/// Why the TLS configuration could not be built (each is a bug or a broken build, not
/// something an operator did).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rcgen could not make the self-signed certificate.
    #[error("{what}: {cause}")]
    Certificate {
        /// The step that failed.
        what: &'static str,
        /// rcgen's error.
        cause: rcgen::Error,
    },
    /// rustls refused the configuration.
    #[error("{what}: {cause}")]
    Rustls {
        /// The step that failed.
        what: &'static str,
        /// rustls's error.
        cause: rustls::Error,
    },
    /// quinn found no cipher suite it can start a connection with.
    #[error("QUIC TLS configuration: {0}")]
    Quic(NoInitialCipherSuite),
    /// The cluster's peer TLS (node certificate, member verifier) could not be built.
    #[error("cluster peer TLS: {0}")]
    Peers(String),
    /// The idle timeout does not fit QUIC's variable-length integer.
    #[error("idle timeout out of range: {0}")]
    IdleTimeout(quinn::VarIntBoundsExceeded),
}

/// Builds the quinn server configuration for `key`; with `peers` (a cluster member),
/// the port takes the other members' Raft connections too (ALPN `tally-raft/1`, mutual
/// TLS with the member keys: see `tally_cluster::net::tls`).
pub fn server_config(
    key: &SecretKey,
    idle_timeout: Duration,
    peers: Option<tally_cluster::net::PeerKeys>,
) -> Result<quinn::ServerConfig, TlsError> {
    let tls = match peers {
        None => client_only_crypto(key)?,
        Some(peers) => {
            let identity = tally_cluster::net::PeerIdentity::new(key)
                .map_err(|e| TlsError::Peers(e.to_string()))?;
            tally_cluster::net::tls::shared_server_crypto(&identity, peers, &[ALPN])
                .map_err(|e| TlsError::Peers(e.to_string()))?
        }
    };
    let crypto = QuicServerConfig::try_from(tls).map_err(TlsError::Quic)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport(idle_timeout)?));
    // Connection attempts not yet taken by the accept loop, and the early data they may
    // buffer, are bounded well below quinn's defaults (65,536 and 100 MB): tally uses
    // no 0-RTT data, and the accept loop takes attempts as fast as they come.
    config
        .max_incoming(4096)
        .incoming_buffer_size(16 * 1024)
        .incoming_buffer_size_total(8 * 1024 * 1024);
    Ok(config)
}

/// The rustls configuration of a single server: clients only, no client certificates.
fn client_only_crypto(key: &SecretKey) -> Result<rustls::ServerConfig, TlsError> {
    let rcgen = |what| move |cause| TlsError::Certificate { what, cause };
    let rustls = |what| move |cause| TlsError::Rustls { what, cause };
    let pkcs8 = key.to_pkcs8_der();
    let key_pair = rcgen::KeyPair::try_from(pkcs8.as_slice())
        .map_err(rcgen("turning the identity key into a certificate key"))?;
    let params = rcgen::CertificateParams::new(vec!["tally".to_string()])
        .map_err(rcgen("certificate parameters"))?;
    let cert = params
        .self_signed(&key_pair)
        .map_err(rcgen("self-signing the server certificate"))?;
    let cert_der: CertificateDer<'static> = cert.der().clone();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8));

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(rustls("TLS 1.3 with the ring provider"))?
        .with_no_client_auth()
        .with_single_cert(vec![cert_der], key_der)
        .map_err(rustls("installing the server certificate"))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// Endpoint settings with a stateless-reset key derived from the identity key.
///
/// quinn draws a random reset key by default, so after a restart the new process cannot
/// tell clients that their old connections are gone, and each client waits for its idle
/// timeout before reconnecting. With a key that survives restarts the daemon answers
/// packets of pre-restart connections with a stateless reset, clients notice within one
/// round trip, reconnect and re-attach their leases.
pub fn endpoint_config(key: &SecretKey) -> quinn::EndpointConfig {
    // One derivation for both keys; neither reveals the identity key.
    let mut material = b"tally/stateless-reset/v1".to_vec();
    material.extend_from_slice(&key.seed());
    let derived = ring::digest::digest(&ring::digest::SHA256, &material);
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref());
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    // quinn's connection ids carry a keyed check that is random per process by default:
    // a restarted daemon would drop pre-restart packets as invalid instead of resetting.
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&derived.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

/// Transport settings for many small, mostly idle connections (see limits.md: this
/// brings an idle connection from ~152 KiB to ~62 KiB).
///
/// Path MTU discovery is off: tally's messages are a few hundred bytes, so the 1,200-byte
/// packets QUIC starts with carry them whole, and the probes' larger send buffers cost
/// about 3 KiB per connection (tallyd at 2,000 connections: 114.5 → 108.6 MiB; the bare
/// QUIC baseline 78 → 74 MiB). It also spares idle connections the probe traffic.
fn transport(idle_timeout: Duration) -> Result<quinn::TransportConfig, TlsError> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(MAX_CONCURRENT_STREAMS.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window((64u32 * 1024).into())
        .receive_window((256u32 * 1024).into())
        .send_window(256 * 1024)
        .datagram_receive_buffer_size(None)
        .mtu_discovery_config(None)
        .max_idle_timeout(Some(
            idle_timeout.try_into().map_err(TlsError::IdleTimeout)?,
        ));
    Ok(t)
}
