//! Mutual TLS between the servers of a site, pinned to node keys.
//!
//! Each tallyd proves its ed25519 identity key in TLS with a certificate self-signed by that
//! key (as it does for clients). On a peer link both sides present one:
//! - the accepting side requires a client certificate and accepts it only if the key in its
//!   SubjectPublicKeyInfo is one of the site's node keys ([`PeerKeys`]); rustls then checks
//!   the handshake signature with that key, so the peer holds its private half;
//! - the dialling side accepts the server only if its key is the key of the node it dialled
//!   (never "any node of the site": a node answering for another would confuse Raft ids).
//!
//! There is no CA and no name check; the bundle that binds the node keys is the authority,
//! and a bundle reload may change the set at run time ([`PeerKeys::replace`]).

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tally_protocol::keys::{PublicKey, SecretKey};

/// The ALPN of Raft RPCs between tally servers; told apart from clients' `tally/1` on the
/// same UDP port and quinn endpoint.
pub const PEER_ALPN: &[u8] = b"tally-raft/1";

/// The server name a peer dials with. Names prove nothing here (the key is pinned), but
/// QUIC needs one.
pub const PEER_SERVER_NAME: &str = "tally-peer";

/// How long a silent peer connection lives: a dead peer is noticed within this, and the
/// next RPC re-dials.
const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Keep-alives well inside the idle timeout, so that a healthy but quiet link (a follower
/// between heartbeats) is not closed as idle.
const PEER_KEEP_ALIVE: Duration = Duration::from_secs(2);

/// RPC streams a peer may have open at once: openraft sends one replication stream and
/// votes per peer, so a few suffice; the bound keeps a broken peer's cost small.
const PEER_MAX_STREAMS: u32 = 64;

/// Why a peer TLS configuration could not be built (a bug or a broken build, not something
/// an operator did).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerTlsError {
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
    #[error("peer QUIC TLS configuration: {0}")]
    Quic(NoInitialCipherSuite),
}

/// The node keys allowed to take part in the site's Raft group, shared by every verifier
/// made from it and replaceable at run time: a bundle reload that changes membership calls
/// [`PeerKeys::replace`], and the next handshake sees the new set.
#[derive(Clone, Default)]
pub struct PeerKeys(Arc<RwLock<Arc<BTreeSet<PublicKey>>>>);

impl PeerKeys {
    /// A set holding `keys`.
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> PeerKeys {
        PeerKeys(Arc::new(RwLock::new(Arc::new(keys.into_iter().collect()))))
    }

    /// Replaces the set; connections already established are re-checked by `serve_peer`
    /// on each RPC stream, so a removed node loses its say at its next RPC.
    pub fn replace(&self, keys: impl IntoIterator<Item = PublicKey>) {
        let new = Arc::new(keys.into_iter().collect());
        // A poisoned lock still holds a whole set (a write is a single pointer swap).
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = new;
    }

    /// Whether `key` is allowed now.
    pub fn contains(&self, key: &PublicKey) -> bool {
        self.current().contains(key)
    }

    /// The set as it is now.
    pub fn current(&self) -> Arc<BTreeSet<PublicKey>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl std::fmt::Debug for PeerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.current().iter()).finish()
    }
}

/// This node's certificate and key as TLS presents them, made once from the identity key.
pub struct PeerIdentity {
    key: PublicKey,
    cert: CertificateDer<'static>,
    pkcs8: Vec<u8>,
}

impl PeerIdentity {
    /// Self-signs a certificate carrying `key`'s public half (the same shape as the one
    /// tallyd shows clients).
    pub fn new(key: &SecretKey) -> Result<PeerIdentity, PeerTlsError> {
        let rcgen = |what| move |cause| PeerTlsError::Certificate { what, cause };
        let pkcs8 = key.to_pkcs8_der();
        let key_pair = rcgen::KeyPair::try_from(pkcs8.as_slice())
            .map_err(rcgen("turning the identity key into a certificate key"))?;
        let params = rcgen::CertificateParams::new(vec!["tally".to_string()])
            .map_err(rcgen("certificate parameters"))?;
        let cert = params
            .self_signed(&key_pair)
            .map_err(rcgen("self-signing the peer certificate"))?;
        Ok(PeerIdentity {
            key: key.public(),
            cert: cert.der().clone(),
            pkcs8,
        })
    }

    /// The public key this identity proves.
    pub fn public(&self) -> PublicKey {
        self.key
    }

    fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.clone()]
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.clone()))
    }
}

impl std::fmt::Debug for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("PeerIdentity")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

fn ring_algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

fn cert_key(cert: &CertificateDer<'_>) -> Result<PublicKey, rustls::Error> {
    tally_protocol::cert::ed25519_key(cert.as_ref())
        .map_err(|e| rustls::Error::General(format!("peer certificate: {e}")))
}

/// The accepting side's verifier: a client certificate whose ed25519 key is in the allowed
/// set; rustls checks the handshake signature with that key.
#[derive(Debug)]
pub struct PeerClientVerifier {
    allowed: PeerKeys,
    mandatory: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PeerClientVerifier {
    /// A verifier that refuses a handshake without a certificate of an allowed node: for an
    /// endpoint (or a test) that serves peers only.
    pub fn required(allowed: PeerKeys) -> PeerClientVerifier {
        PeerClientVerifier {
            allowed,
            mandatory: true,
            algorithms: ring_algorithms(),
        }
    }

    /// A verifier for the endpoint clients and peers share: a client (ALPN `tally/1`)
    /// presents no certificate and passes; a certificate that *is* presented must be an
    /// allowed node's. `serve_peer` then refuses a peer connection that presented none,
    /// so "no certificate" never reaches Raft.
    pub fn optional(allowed: PeerKeys) -> PeerClientVerifier {
        PeerClientVerifier {
            mandatory: false,
            ..PeerClientVerifier::required(allowed)
        }
    }
}

impl ClientCertVerifier for PeerClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No CA: there is nothing to hint.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let key = cert_key(end_entity)?;
        if !self.allowed.contains(&key) {
            tracing::warn!(
                key = %key.fingerprint(),
                "peer refused: its key is not one of this site's node keys"
            );
            return Err(rustls::Error::General(format!(
                "peer key {} is not one of this site's node keys",
                key.fingerprint()
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configs enable TLS 1.3 only; reaching this is a peer bug.
        Err(rustls::Error::General(
            "TLS 1.2 is not used by tally".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The dialling side's verifier: the server's certificate must carry exactly the key of
/// the node dialled; rustls checks the handshake signature with it.
#[derive(Debug)]
pub struct PinnedPeerVerifier {
    expected: PublicKey,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedPeerVerifier {
    /// Accepts only a server proving `expected`.
    pub fn new(expected: PublicKey) -> PinnedPeerVerifier {
        PinnedPeerVerifier {
            expected,
            algorithms: ring_algorithms(),
        }
    }
}

impl ServerCertVerifier for PinnedPeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let key = cert_key(end_entity)?;
        if key != self.expected {
            return Err(rustls::Error::General(format!(
                "peer answered with key {}, expected {}",
                key.fingerprint(),
                self.expected.fingerprint()
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "TLS 1.2 is not used by tally".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The rustls server configuration of a peer-only listener: TLS 1.3, ALPN `tally-raft/1`,
/// a client certificate of an allowed node required. (An endpoint shared with clients
/// builds its own with [`PeerClientVerifier::optional`] and both ALPNs.)
pub fn server_crypto(
    identity: &PeerIdentity,
    allowed: PeerKeys,
) -> Result<rustls::ServerConfig, PeerTlsError> {
    let rustls = |what| move |cause| PeerTlsError::Rustls { what, cause };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(rustls("TLS 1.3 with the ring provider"))?
        .with_client_cert_verifier(Arc::new(PeerClientVerifier::required(allowed)))
        .with_single_cert(identity.cert_chain(), identity.private_key())
        .map_err(rustls("installing the peer certificate"))?;
    tls.alpn_protocols = vec![PEER_ALPN.to_vec()];
    Ok(tls)
}

/// The rustls server configuration of an endpoint that clients and peers share (tallyd's
/// one UDP port): `other_alpns` (clients' `tally/1`) and `tally-raft/1` offered, a client
/// certificate asked for but not required (clients have none), and one that is presented
/// accepted only from an allowed node. The daemon hands connections whose ALPN is
/// `tally-raft/1` to `serve_peer`, which refuses those that presented no certificate.
pub fn shared_server_crypto(
    identity: &PeerIdentity,
    allowed: PeerKeys,
    other_alpns: &[&[u8]],
) -> Result<rustls::ServerConfig, PeerTlsError> {
    let rustls = |what| move |cause| PeerTlsError::Rustls { what, cause };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(rustls("TLS 1.3 with the ring provider"))?
        .with_client_cert_verifier(Arc::new(PeerClientVerifier::optional(allowed)))
        .with_single_cert(identity.cert_chain(), identity.private_key())
        .map_err(rustls("installing the server certificate"))?;
    tls.alpn_protocols = other_alpns.iter().map(|a| a.to_vec()).collect();
    tls.alpn_protocols.push(PEER_ALPN.to_vec());
    Ok(tls)
}

/// The quinn server configuration of a peer-only listener (see [`server_crypto`]).
pub fn server_config(
    identity: &PeerIdentity,
    allowed: PeerKeys,
) -> Result<quinn::ServerConfig, PeerTlsError> {
    let crypto = QuicServerConfig::try_from(server_crypto(identity, allowed)?)
        .map_err(PeerTlsError::Quic)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport()));
    Ok(config)
}

/// The quinn client configuration for dialling the node whose key is `peer`: our
/// certificate presented, the server's key pinned to `peer`, ALPN `tally-raft/1`.
pub fn client_config(
    identity: &PeerIdentity,
    peer: PublicKey,
) -> Result<quinn::ClientConfig, PeerTlsError> {
    let rustls = |what| move |cause| PeerTlsError::Rustls { what, cause };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(rustls("TLS 1.3 with the ring provider"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedPeerVerifier::new(peer)))
        .with_client_auth_cert(identity.cert_chain(), identity.private_key())
        .map_err(rustls("installing the peer client certificate"))?;
    tls.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(PeerTlsError::Quic)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport()));
    Ok(config)
}

/// Peer links are few and busy: keep-alives so that a quiet healthy link stays up and a
/// dead one is noticed within the idle timeout.
pub fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(PEER_MAX_STREAMS.into())
        .max_concurrent_uni_streams(0u32.into())
        .keep_alive_interval(Some(PEER_KEEP_ALIVE))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(PEER_IDLE_TIMEOUT).expect("10 s fits a QUIC varint"),
        ));
    t
}

/// Whether `conn` was opened with the peer ALPN `tally-raft/1` (the daemon's accept loop
/// sends those to `serve_peer` and the rest to its client handler).
pub fn is_peer_connection(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol)
        .is_some_and(|alpn| alpn == PEER_ALPN)
}

/// The node key a connection's peer proved in TLS, if it presented a certificate.
pub fn peer_key(conn: &quinn::Connection) -> Option<PublicKey> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let first = certs.first()?;
    tally_protocol::cert::ed25519_key(first.as_ref()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddr};

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    fn endpoint(server: Option<quinn::ServerConfig>) -> quinn::Endpoint {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        match server {
            Some(config) => quinn::Endpoint::server(config, addr).unwrap(),
            None => quinn::Endpoint::client(addr).unwrap(),
        }
    }

    /// Dials `server` as `client_key` expecting `expected`; returns how the dialler and the
    /// acceptor each ended: Ok(peer key the acceptor saw) or the error text.
    async fn handshake(
        server_key: &SecretKey,
        allowed: PeerKeys,
        client_key: &SecretKey,
        expected: PublicKey,
    ) -> (Result<(), String>, Result<Option<PublicKey>, String>) {
        let server_identity = PeerIdentity::new(server_key).unwrap();
        let server = endpoint(Some(server_config(&server_identity, allowed).unwrap()));
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let incoming = server.accept().await.expect("an attempt");
            let out = match incoming.await {
                Ok(conn) => {
                    // The dialler proves it got through by writing on a stream.
                    match conn.accept_bi().await {
                        Ok((mut send, mut recv)) => match recv.read_to_end(16).await {
                            Ok(_) => {
                                let _ = send.write_all(b"ok").await;
                                let _ = send.finish();
                                // The dialler closes once it has read the answer.
                                conn.closed().await;
                                Ok(peer_key(&conn))
                            }
                            Err(e) => Err(e.to_string()),
                        },
                        Err(e) => Err(e.to_string()),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            server.close(0u32.into(), b"done");
            out
        });
        let client = endpoint(None);
        let config = client_config(&PeerIdentity::new(client_key).unwrap(), expected).unwrap();
        let dial = async {
            let conn = client
                .connect_with(config, addr, PEER_SERVER_NAME)
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            // TLS 1.3: the client may finish before the server has judged its certificate;
            // a refused client learns so on its first stream.
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            send.write_all(b"hi").await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            let answer = recv.read_to_end(16).await.map_err(|e| e.to_string())?;
            conn.close(0u32.into(), b"done");
            if answer == b"ok" {
                Ok(())
            } else {
                Err(format!("unexpected answer {answer:?}"))
            }
        };
        let dialled = tokio::time::timeout(Duration::from_secs(10), dial)
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
        let accepted = tokio::time::timeout(Duration::from_secs(10), accept)
            .await
            .expect("the acceptor ends")
            .expect("the acceptor does not panic");
        client.close(0u32.into(), b"done");
        (dialled, accepted)
    }

    #[tokio::test]
    async fn allowed_nodes_complete_the_handshake_and_see_each_others_keys() {
        let (a, b) = (key(1), key(2));
        let allowed = PeerKeys::new([a.public(), b.public()]);
        let (dialled, accepted) = handshake(&a, allowed, &b, a.public()).await;
        assert_eq!(accepted, Ok(Some(b.public())));
        assert_eq!(dialled, Ok(()));
    }

    #[tokio::test]
    async fn a_node_with_an_unknown_key_is_refused_by_the_acceptor() {
        let (a, b, stranger) = (key(1), key(2), key(9));
        let allowed = PeerKeys::new([a.public(), b.public()]);
        let (dialled, accepted) = handshake(&a, allowed, &stranger, a.public()).await;
        let err = accepted.expect_err("the acceptor refuses the stranger");
        assert!(err.contains("not one of this site's node keys"), "{err}");
        assert!(dialled.is_err(), "the stranger gets no stream through");
    }

    #[tokio::test]
    async fn a_server_with_another_key_than_the_one_dialled_is_refused_by_the_dialler() {
        let (a, b, impostor) = (key(1), key(2), key(9));
        // The impostor would even accept `b`; `b` dialled `a` and must not talk to it.
        let allowed = PeerKeys::new([a.public(), b.public(), impostor.public()]);
        let (dialled, accepted) = handshake(&impostor, allowed, &b, a.public()).await;
        let err = dialled.expect_err("the dialler refuses the impostor");
        assert!(err.contains("expected"), "{err}");
        assert!(accepted.is_err(), "no connection is established");
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused() {
        let a = key(1);
        let allowed = PeerKeys::new([a.public()]);
        let server = endpoint(Some(
            server_config(&PeerIdentity::new(&a).unwrap(), allowed).unwrap(),
        ));
        let addr = server.local_addr().unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedPeerVerifier::new(a.public())))
            .with_no_client_auth();
        tls.alpn_protocols = vec![PEER_ALPN.to_vec()];
        let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
        let client = endpoint(None);
        let connecting = client.connect_with(config, addr, PEER_SERVER_NAME).unwrap();
        let accept = async { server.accept().await.expect("an attempt").await };
        let (_dialled, accepted) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(connecting, accept)
        })
        .await
        .expect("both sides end");
        assert!(accepted.is_err(), "a certificate is required");
    }

    #[tokio::test]
    async fn replacing_the_allowed_keys_takes_effect_at_the_next_handshake() {
        let (a, b) = (key(1), key(2));
        let allowed = PeerKeys::new([a.public(), b.public()]);
        let verifier = PeerClientVerifier::required(allowed.clone());
        let b_cert = PeerIdentity::new(&b).unwrap().cert;
        assert!(verifier
            .verify_client_cert(&b_cert, &[], UnixTime::now())
            .is_ok());
        allowed.replace([a.public()]);
        let err = verifier
            .verify_client_cert(&b_cert, &[], UnixTime::now())
            .unwrap_err();
        assert!(err.to_string().contains("not one of this site's node keys"));
    }
}
