//! `tally-publisher inspect`: what a tally file is and says.
//!
//! The body of the subcommand, apart from the binary so that it can be tested: [`read`]
//! recognises the file by its armour label and checks it against its own signer
//! (whether the signer is *trusted* is what `verify` checks); [`Inspected::json`] and
//! [`Inspected::text`] are the two ways it is shown. The binary reads the file, prints
//! and maps [`InspectError`] to an exit code.

use serde_json::Value;
use tally_protocol::activation::{
    self, ActivationRequest, ReturnProof, REQUEST_LABEL, RETURN_LABEL,
};
use tally_protocol::bundle::{self, Bundle, Seats, BUNDLE_LABEL};
use tally_protocol::keys::{self, PublicKey, PUBLIC_KEY_LABEL, SECRET_KEY_LABEL};
use tally_protocol::report::{self, VerifiedReport, REPORT_LABEL};

/// Appends a formatted line to a `String` (which cannot fail).
macro_rules! outln {
    ($out:ident, $($arg:tt)*) => {{
        $out.push_str(&format!($($arg)*));
        $out.push('\n');
    }};
}

/// A tally file, checked against its own signer.
#[derive(Debug)]
pub enum Inspected {
    /// An entitlement bundle and the key that signed it.
    Bundle {
        /// The vendor key that signed it.
        signer: PublicKey,
        /// The bundle.
        bundle: Bundle,
    },
    /// A server's activation request.
    Request(ActivationRequest),
    /// A server's return proof.
    Return(ReturnProof),
    /// A usage report.
    Report(Box<VerifiedReport>),
    /// A public key.
    PublicKey(PublicKey),
}

/// Why a file cannot be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// No armour line: not a tally file.
    #[error("not a tally file (no BEGIN TALLY line)")]
    NotTally,
    /// A secret key: never shown.
    #[error("a secret key; its contents are not shown")]
    SecretKey,
    /// A tally file of a kind this version does not know.
    #[error("a tally {0} file, which this version cannot inspect")]
    UnknownKind(String),
    /// The file is of a known kind but does not parse or verify.
    #[error(transparent)]
    Invalid(Box<dyn std::error::Error + Send + Sync>),
}

fn invalid(e: impl std::error::Error + Send + Sync + 'static) -> InspectError {
    InspectError::Invalid(Box::new(e))
}

/// The armour label of a file, if any.
pub fn label_of(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.trim()
            .strip_prefix("-----BEGIN TALLY ")
            .map(|r| r.trim_end_matches('-').to_string())
    })
}

/// Recognises and checks a tally file's text.
pub fn read(text: &str) -> Result<Inspected, InspectError> {
    let label = label_of(text).ok_or(InspectError::NotTally)?;
    match label.as_str() {
        BUNDLE_LABEL => {
            let signed = bundle::from_armored(text).map_err(invalid)?;
            // Self-consistency only: whether the signer is *trusted* is what `verify` checks.
            let verified = bundle::verify(&signed, &[signed.signer]).map_err(invalid)?;
            Ok(Inspected::Bundle {
                signer: signed.signer,
                bundle: verified.bundle,
            })
        }
        REQUEST_LABEL => Ok(Inspected::Request(
            activation::request_from_armored(text).map_err(invalid)?,
        )),
        RETURN_LABEL => Ok(Inspected::Return(
            activation::return_from_armored(text).map_err(invalid)?,
        )),
        REPORT_LABEL => Ok(Inspected::Report(Box::new(
            report::read(text).map_err(invalid)?,
        ))),
        PUBLIC_KEY_LABEL => Ok(Inspected::PublicKey(
            keys::public_key_from_armored(text).map_err(invalid)?,
        )),
        SECRET_KEY_LABEL => Err(InspectError::SecretKey),
        other => Err(InspectError::UnknownKind(other.to_string())),
    }
}

impl Inspected {
    /// The file as `inspect --json` shows it; `None` for a public key, which has only
    /// the text form.
    pub fn json(&self) -> Option<Value> {
        Some(match self {
            Inspected::Bundle { signer, bundle: b } => serde_json::json!({
                "kind": "bundle",
                "signature": "valid",
                "signed_by": signer.fingerprint(),
                "id": b.id,
                "issued_at": b.issued_at.to_string(),
                "vendor": b.vendor,
                "customer": {"id": b.customer.id, "name": b.customer.name},
                // One server: `binding` as before; a cluster: `binding` is null and
                // `cluster` lists the members (a script reading `binding` must not
                // mistake one member for the only server).
                "binding": match b.binding.as_slice() {
                    [x] => serde_json::json!({
                        "server_key": x.server_key.fingerprint(),
                        "host_fingerprint": x.host_fingerprint,
                    }),
                    _ => Value::Null,
                },
                "servers_bound": b.binding.len(),
                "cluster": (b.binding.len() > 1).then(|| b.binding.iter().map(|x| serde_json::json!({
                    "server_key": x.server_key.fingerprint(),
                    "host_fingerprint": x.host_fingerprint,
                })).collect::<Vec<_>>()),
                "supersedes": b.supersedes,
                "valid_from": b.valid_from.map(|t| t.date()),
                "valid_until": b.valid_until.map(|t| t.last_day()),
                "features": b.features.iter().map(|f| serde_json::json!({
                    "name": f.name,
                    "seats": match f.seats { Seats::Counted(n) => serde_json::json!(n), Seats::Uncounted => serde_json::json!("uncounted") },
                    "version_ceiling": f.version_ceiling,
                    "upgrade_from": f.upgrade_from,
                    "maintenance_until": f.maintenance_until.map(|t| t.date()),
                    "starts": f.starts.map(|t| t.date()),
                    "expires": f.expires.map(|t| t.last_day()),
                    "evaluation": f.evaluation,
                    "overdraft": f.overdraft,
                    "borrow_limit_secs": f.borrow_limit_secs,
                    "linger_secs": f.linger_secs,
                    "heartbeat_ttl_secs": f.heartbeat_ttl_secs,
                    "lost_seat_grace_secs": f.lost_seat.map(|t| t.grace_secs),
                    "on_lost_seat": f.lost_seat.map(|t| t.action.as_str()),
                    "components": f.components,
                    "attributes": f.attributes,
                })).collect::<Vec<_>>(),
            }),
            Inspected::Request(r) => serde_json::json!({
                "kind": "activation request",
                "signature": "valid",
                "server_key": r.server_key.fingerprint(),
                "host_fingerprint": r.host_fingerprint,
                "hostname": r.hostname,
                "os": r.os,
                "virtualization": r.virtualization,
                "customer_reference": r.customer_reference,
                "created_at": r.created_at.to_string(),
            }),
            Inspected::Return(p) => serde_json::json!({
                "kind": "return proof",
                "signature": "valid",
                "bundle_id": p.bundle_id,
                "server_key": p.server_key.fingerprint(),
                "host_fingerprint": p.host_fingerprint,
                "returned_at": p.returned_at.to_string(),
                "leases_outstanding": p.leases_outstanding,
                "released": p.released.as_ref().map(|r| serde_json::json!({
                    "retired": r.retired,
                    "stopped_serving": r.stopped_serving.iter().map(|g| serde_json::json!({
                        "bundle": g.bundle,
                        "feature": g.feature,
                        "seats": match g.seats { Seats::Counted(n) => serde_json::json!(n), Seats::Uncounted => serde_json::json!("uncounted") },
                        "grant": g.description,
                    })).collect::<Vec<_>>(),
                })),
            }),
            Inspected::Report(v) => {
                let r = &v.report;
                serde_json::json!({
                    "kind": "usage report",
                    "signature": "valid",
                    "report": r.report_seq,
                    "server_key": r.server_key.fingerprint(),
                    "host_fingerprint": r.host_fingerprint,
                    "customers": r.customers,
                    "bundles": r.bundle_ids,
                    "bundles_at_start": r.bundles_at_start.as_ref().map(|b| b.iter().map(|x| x.bundle.clone()).collect::<Vec<_>>()),
                    "period_from": r.period_from.to_string(),
                    "period_to": r.period_to.to_string(),
                    "first_event": r.first_event,
                    "last_event": r.last_event,
                    "events": r.events.len(),
                    "open_at_start": r.open_at_start.len(),
                    "summaries": r.summaries.iter().map(|s| serde_json::json!({
                        "feature": s.feature, "grants": s.grants, "denials": s.denials,
                        "peak_in_use": s.peak_in_use, "seat_hours": s.seat_seconds as f64 / 3600.0,
                    })).collect::<Vec<_>>(),
                })
            }
            Inspected::PublicKey(_) => return None,
        })
    }

    /// The file as `inspect` shows it, one line per fact.
    pub fn text(&self) -> String {
        let mut out = String::new();
        match self {
            Inspected::Bundle { signer, bundle: b } => {
                outln!(out, "tally bundle {}", b.id);
                outln!(
                    out,
                    "  signature  valid, signed by vendor key {}",
                    signer.fingerprint()
                );
                outln!(out, "  issued     {}", b.issued_at);
                outln!(out, "  vendor     {}", b.vendor);
                outln!(out, "  customer   {} ({})", b.customer.name, b.customer.id);
                match b.binding.as_slice() {
                    [x] => outln!(
                        out,
                        "  bound to   server key {}, host {}",
                        x.server_key.fingerprint(),
                        x.host_fingerprint
                    ),
                    [] => outln!(out, "  bound to   nothing (demo bundle)"),
                    members => {
                        outln!(
                            out,
                            "  bound to   {} servers (one cluster; seats count once for it)",
                            members.len()
                        );
                        for x in members {
                            outln!(
                                out,
                                "             server key {}, host {}",
                                x.server_key.fingerprint(),
                                x.host_fingerprint
                            );
                        }
                    }
                }
                if !b.supersedes.is_empty() {
                    outln!(out, "  supersedes {}", b.supersedes.join(", "));
                }
                if let Some(f) = b.valid_from {
                    outln!(out, "  valid from {}", f.date());
                }
                if let Some(u) = b.valid_until {
                    outln!(out, "  valid until {}", u.last_day());
                }
                for f in &b.features {
                    outln!(out, "  feature   {}", f.describe());
                }
            }
            Inspected::Request(r) => {
                outln!(out, "tally activation request (signature valid)");
                outln!(out, "  server key  {}", r.server_key.fingerprint());
                outln!(out, "  host        {} ({})", r.hostname, r.host_fingerprint);
                outln!(out, "  os          {}", r.os);
                outln!(
                    out,
                    "  virtual     {}",
                    r.virtualization
                        .as_deref()
                        .unwrap_or("no sign of a VM or container")
                );
                if let Some(c) = &r.customer_reference {
                    outln!(out, "  reference   {c}");
                }
                outln!(out, "  created     {}", r.created_at);
            }
            Inspected::Return(p) => {
                outln!(out, "tally return proof (signature valid)");
                outln!(out, "  bundle      {}", p.bundle_id);
                outln!(out, "  server key  {}", p.server_key.fingerprint());
                outln!(out, "  returned    {}", p.returned_at);
                outln!(
                    out,
                    "  seats still recorded as held: {}",
                    p.leases_outstanding
                );
                match &p.released {
                    Some(r) => {
                        for g in &r.stopped_serving {
                            outln!(out, "  stopped     {} (bundle {})", g.description, g.bundle);
                        }
                        if !r.retired.is_empty() {
                            outln!(out, "  retired     {}", r.retired.join(", "));
                        }
                    }
                    None => outln!(out, "  (format version 1: does not say what was released)"),
                }
            }
            Inspected::Report(v) => {
                let r = &v.report;
                outln!(out, "tally usage report {} (signature valid)", r.report_seq);
                outln!(out, "  server key  {}", r.server_key.fingerprint());
                outln!(out, "  period      {} to {}", r.period_from, r.period_to);
                outln!(
                    out,
                    "  events      {} ({})",
                    crate::reconcile::numbered_span("event", "events", r.first_event, r.last_event),
                    r.events.len()
                );
                outln!(out, "  bundles     {}", r.bundle_ids.join(", "));
                match &r.bundles_at_start {
                    Some(b) => outln!(
                        out,
                        "  at start    {}",
                        b.iter()
                            .map(|x| x.bundle.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    None => outln!(
                        out,
                        "  at start    (not said: a report without bundle history)"
                    ),
                }
                for s in &r.summaries {
                    outln!(
                        out,
                        "  feature     {}: {} grant(s), {} denial(s), peak {}, {:.2} seat-hours",
                        s.feature,
                        s.grants,
                        s.denials,
                        s.peak_in_use,
                        s.seat_seconds as f64 / 3600.0
                    );
                }
            }
            Inspected::PublicKey(k) => outln!(out, "tally public key {}", k.fingerprint()),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_protocol::bundle::{Customer, FeatureGrant};
    use tally_protocol::keys::SecretKey;
    use tally_protocol::time::UnixTime;

    fn bundle_text(vendor: &SecretKey) -> String {
        let b = Bundle {
            id: "acme-2027".into(),
            issued_at: UnixTime(1_800_000_000),
            vendor: "V".into(),
            customer: Customer {
                id: "acme".into(),
                name: "Acme".into(),
            },
            binding: vec![],
            supersedes: vec!["acme-2026".into()],
            valid_from: None,
            valid_until: None,
            features: vec![FeatureGrant::counted("solver", 4)],
        };
        bundle::to_armored(&bundle::sign(&b, vendor))
    }

    /// A bundle is checked against its own signer and shown with that signer, in
    /// both forms.
    #[test]
    fn a_bundle_is_shown_with_its_signer() {
        let vendor = SecretKey::from_seed([4; 32]);
        let inspected = read(&bundle_text(&vendor)).unwrap();
        let text = inspected.text();
        assert!(text.starts_with("tally bundle acme-2027\n"), "{text}");
        assert!(
            text.contains(&format!(
                "signed by vendor key {}",
                vendor.public().fingerprint()
            )),
            "{text}"
        );
        assert!(text.contains("  supersedes acme-2026\n"), "{text}");
        assert!(text.contains("  feature   solver"), "{text}");
        let doc = inspected.json().unwrap();
        assert_eq!(doc["kind"], "bundle");
        assert_eq!(doc["features"][0]["seats"], 4);
    }

    /// A public key has only its text form; a secret key is never shown; an unknown
    /// label, a file without armour and a tampered bundle are refused, each as such.
    #[test]
    fn keys_unknown_kinds_and_tampered_files() {
        let vendor = SecretKey::from_seed([4; 32]);
        let public = read(&keys::public_key_to_armored(&vendor.public())).unwrap();
        assert!(public.json().is_none());
        assert_eq!(
            public.text(),
            format!("tally public key {}\n", vendor.public().fingerprint())
        );
        let secret = "-----BEGIN TALLY SECRET KEY-----\nAAAA\n-----END TALLY SECRET KEY-----\n";
        assert!(matches!(read(secret), Err(InspectError::SecretKey)));
        let other = "-----BEGIN TALLY WIDGET-----\nAAAA\n-----END TALLY WIDGET-----\n";
        let e = read(other).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a tally WIDGET file, which this version cannot inspect"
        );
        assert!(matches!(read("hello"), Err(InspectError::NotTally)));
        let text = bundle_text(&vendor);
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        let body = &mut lines[1];
        let flipped = if body.starts_with('A') { "B" } else { "A" };
        body.replace_range(0..1, flipped);
        let tampered = lines.join("\n");
        assert!(matches!(read(&tampered), Err(InspectError::Invalid(_))));
    }
}
