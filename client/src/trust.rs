//! The client's half of the trust chain.
//!
//! 1. TLS: [`ServerKeyVerifier`] accepts a certificate only if it carries an ed25519 key,
//!    and rustls checks that the server's handshake signature verifies with that key. So
//!    after the handshake we know the server holds the private half of the key in its
//!    certificate. There is no CA and no host name check: names prove nothing here.
//! 2. Bundles: [`check_server`] requires that at least one bundle the server presents is
//!    signed by a vendor key the application trusts *and* bound to that same key (for a
//!    bundle that binds a cluster: the key is one of its members). A fake server with
//!    its own key has no vendor signature on it; a clone that copied a real bundle lacks
//!    the private key of every server the bundle names.
//! 3. Leases: a lease token must be signed by the server's key or by another member of
//!    a cluster a verified bundle binds it in ([`crate::Session::lease_signers`]), so a
//!    lease granted by one member stays valid when re-attached through another.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tally_protocol::bundle::{self, VerifiedBundle};
use tally_protocol::keys::{demo, PublicKey};
use tally_protocol::signed::Signed;

/// Which vendor keys the application trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The vendor's public keys, compiled into the application.
    Vendor(Vec<PublicKey>),
    /// The built-in demo vendor key; only for trying tally out. Never ship this.
    Demo,
}

impl Trust {
    /// The vendor public keys this trust accepts.
    pub fn keys(&self) -> Vec<PublicKey> {
        match self {
            Trust::Vendor(keys) => keys.clone(),
            Trust::Demo => vec![demo::vendor_public()],
        }
    }
}

/// Why a server is not trusted: no bundle it presents is vendor-signed and bound to the
/// key it proved in TLS.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "server key {} is not vouched for by a trusted vendor: {}{}",
    .server_key.fingerprint(),
    untrusted_why(.reasons),
    if *.demo_trust { " (demo trust accepts only the demo vendor's bundles)" } else { "" }
)]
pub struct UntrustedServer {
    /// The key the server proved in TLS.
    pub server_key: PublicKey,
    /// Why each presented bundle was refused (empty: it presented none).
    pub reasons: Vec<bundle::BundleError>,
    /// The application trusted only the demo vendor key.
    pub demo_trust: bool,
}

fn untrusted_why(reasons: &[bundle::BundleError]) -> String {
    if reasons.is_empty() {
        "it presents no bundle".to_string()
    } else {
        let texts: Vec<String> = reasons.iter().map(ToString::to_string).collect();
        texts.join("; ")
    }
}

/// Checks the bundles a server presented against the key it proved in TLS; returns the
/// bundles that are vendor-signed and bound to that key.
pub fn check_server(
    server_key: &PublicKey,
    bundles: &[Signed],
    trust: &Trust,
) -> Result<Vec<VerifiedBundle>, UntrustedServer> {
    let trusted = trust.keys();
    let mut good = Vec::new();
    let mut reasons = Vec::new();
    for signed in bundles {
        match bundle::verify(signed, &trusted)
            .and_then(|v| bundle::check_binding(&v.bundle, server_key, false).map(|_| v))
        {
            Ok(v) => good.push(v),
            Err(e) => reasons.push(e),
        }
    }
    if good.is_empty() {
        return Err(UntrustedServer {
            server_key: *server_key,
            reasons,
            demo_trust: matches!(trust, Trust::Demo),
        });
    }
    Ok(good)
}

/// Accepts a certificate that carries an ed25519 key and lets rustls check the handshake
/// signature with it; trust is decided afterwards by [`check_server`].
#[derive(Debug)]
pub struct ServerKeyVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerKeyVerifier {
    /// A verifier using the ring provider's signature algorithms.
    pub fn new() -> ServerKeyVerifier {
        ServerKeyVerifier {
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }
}

impl Default for ServerKeyVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerCertVerifier for ServerKeyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        tally_protocol::cert::ed25519_key(end_entity.as_ref())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The client config enables TLS 1.3 only; reaching this is a peer bug.
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

impl Trust {
    /// Trusts the vendor public key in `armored` (the text of a `.pub` file from
    /// `tally-publisher keygen`), typically compiled in with `include_str!`: a key read
    /// from a file at run time is a key the customer can replace with their own.
    pub fn from_armored(armored: &str) -> Result<Trust, tally_protocol::keys::KeyError> {
        Ok(Trust::Vendor(vec![
            tally_protocol::keys::public_key_from_armored(armored)?,
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_protocol::bundle::{Binding, Bundle, Customer, FeatureGrant};
    use tally_protocol::keys::SecretKey;
    use tally_protocol::time::UnixTime;

    #[test]
    fn any_member_of_a_cluster_bundle_is_vouched_for_and_a_clone_is_not() {
        let vendor = SecretKey::from_seed([30; 32]);
        let members: Vec<PublicKey> = [31u8, 32, 33]
            .iter()
            .map(|s| SecretKey::from_seed([*s; 32]).public())
            .collect();
        let b = Bundle {
            id: "ha".into(),
            issued_at: UnixTime(1_800_000_000),
            vendor: "Acme".into(),
            customer: Customer {
                id: "c".into(),
                name: "Example".into(),
            },
            binding: members
                .iter()
                .map(|k| Binding {
                    server_key: *k,
                    host_fingerprint: "h".into(),
                })
                .collect(),
            supersedes: vec![],
            valid_from: None,
            valid_until: None,
            features: vec![FeatureGrant::counted("solver", 5)],
        };
        let signed = bundle::sign(&b, &vendor);
        let trust = Trust::Vendor(vec![vendor.public()]);
        for k in &members {
            let good = check_server(k, std::slice::from_ref(&signed), &trust).unwrap();
            assert_eq!(good[0].bundle.bound_keys(), members);
        }
        // A server with its own key presenting the copied cluster bundle.
        let clone = SecretKey::from_seed([34; 32]).public();
        let refusal = check_server(&clone, &[signed], &trust).unwrap_err();
        let text = refusal.to_string();
        assert!(text.contains("binds servers"), "{text}");
        assert!(
            text.contains(&format!("this server is {}", clone.fingerprint())),
            "{text}"
        );
    }
}
