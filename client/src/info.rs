//! What the licence says about a feature, for the application to act on (FlexLM's
//! `lc_auth_data`, RLM's `rlm_license_stat`): expiry, evaluation, maintenance end,
//! version ceiling and the vendor's attributes (edition, max cores). Read from the
//! bundles the server presented, which the client has verified against the vendor key,
//! so a server cannot make them up.

use std::collections::BTreeMap;
use tally_protocol::bundle::{FeatureGrant, VerifiedBundle};
use tally_protocol::time::UnixTime;

/// The licence terms of one feature on the connected server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FeatureInfo {
    /// The first instant the feature is no longer licensed (the latest end of the terms
    /// considered); `None`: at least one of them is permanent.
    pub expires: Option<UnixTime>,
    /// True if every term considered is an evaluation licence.
    pub evaluation: bool,
    /// The latest build date covered by maintenance; `None`: some term has no limit.
    pub maintenance_until: Option<UnixTime>,
    /// The highest version licensed; `None`: some term has no ceiling.
    pub version_ceiling: Option<String>,
    /// The vendor's attributes (`edition = "pro"`, `max_cores = "16"`), merged over the
    /// bundles (a later bundle's value wins).
    pub attributes: BTreeMap<String, String>,
}

/// The terms of `feature` in `bundles` at `now`: the terms in force then, or every term
/// of the feature when none is (so an expired licence still says when it ended).
/// `None` if no bundle names the feature.
pub fn feature_info(
    bundles: &[VerifiedBundle],
    feature: &str,
    now: UnixTime,
) -> Option<FeatureInfo> {
    // (grant, its start, its end): a bundle's own validity bounds each of its grants.
    let terms: Vec<(&FeatureGrant, Option<UnixTime>, Option<UnixTime>)> = bundles
        .iter()
        .flat_map(|b| {
            b.bundle
                .features
                .iter()
                .filter(|f| f.serves(feature))
                .map(|f| {
                    let start = f.starts.max(b.bundle.valid_from);
                    let end = match (f.expires, b.bundle.valid_until) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    (f, start, end)
                })
        })
        .collect();
    if terms.is_empty() {
        return None;
    }
    let in_force: Vec<_> = terms
        .iter()
        .filter(|(_, start, end)| {
            start.filter(|&s| s > now).is_none() && end.filter(|&e| e <= now).is_none()
        })
        .copied()
        .collect();
    let considered = if in_force.is_empty() { terms } else { in_force };
    let latest = |values: Vec<Option<UnixTime>>| -> Option<UnixTime> {
        if values.iter().any(Option::is_none) {
            None
        } else {
            values.into_iter().flatten().max()
        }
    };
    let version_ceiling = if considered
        .iter()
        .any(|(f, _, _)| f.version_ceiling.is_none())
    {
        None
    } else {
        considered
            .iter()
            .filter_map(|(f, _, _)| f.version_ceiling.clone())
            .max_by(|a, b| tally_protocol::version::compare(a, b))
    };
    Some(FeatureInfo {
        expires: latest(considered.iter().map(|(_, _, end)| *end).collect()),
        evaluation: considered.iter().all(|(f, _, _)| f.evaluation),
        maintenance_until: latest(
            considered
                .iter()
                .map(|(f, _, _)| f.maintenance_until)
                .collect(),
        ),
        version_ceiling,
        attributes: considered
            .iter()
            .flat_map(|(f, _, _)| f.attributes.clone())
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_protocol::bundle::{Bundle, Customer};
    use tally_protocol::keys::SecretKey;

    fn verified(features: Vec<FeatureGrant>, valid_until: Option<UnixTime>) -> VerifiedBundle {
        let vendor = SecretKey::from_seed([7; 32]);
        let bundle = Bundle {
            id: "b".into(),
            issued_at: UnixTime(0),
            vendor: "v".into(),
            customer: Customer {
                id: "c".into(),
                name: "c".into(),
            },
            binding: vec![],
            supersedes: Vec::new(),
            valid_from: None,
            valid_until,
            features,
        };
        let signed = tally_protocol::bundle::sign(&bundle, &vendor);
        tally_protocol::bundle::verify(&signed, &[vendor.public()]).unwrap()
    }

    #[test]
    fn an_evaluation_reports_its_end_and_an_expired_one_still_says_when() {
        let mut eval = FeatureGrant::counted("optimizer", 3);
        eval.evaluation = true;
        eval.expires = Some(UnixTime(1_000));
        eval.attributes.insert("edition".into(), "trial".into());
        let bundles = [verified(vec![eval], None)];
        let info = feature_info(&bundles, "optimizer", UnixTime(10)).unwrap();
        assert_eq!(info.expires, Some(UnixTime(1_000)));
        assert!(info.evaluation);
        assert_eq!(info.attributes["edition"], "trial");
        let later = feature_info(&bundles, "optimizer", UnixTime(2_000)).unwrap();
        assert_eq!(later.expires, Some(UnixTime(1_000)));
        assert_eq!(feature_info(&bundles, "nothing", UnixTime(10)), None);
    }

    #[test]
    fn a_permanent_term_in_force_makes_the_feature_permanent_and_bundle_ends_bound_grants() {
        let mut eval = FeatureGrant::counted("solver", 1);
        eval.evaluation = true;
        eval.expires = Some(UnixTime(500));
        let mut bought = FeatureGrant::counted("solver", 4);
        bought.maintenance_until = Some(UnixTime(300));
        bought.version_ceiling = Some("2027.1".into());
        let info = feature_info(
            &[
                verified(vec![eval.clone()], None),
                verified(vec![bought], None),
            ],
            "solver",
            UnixTime(10),
        )
        .unwrap();
        assert_eq!(info.expires, None);
        assert!(!info.evaluation, "one term is bought");
        assert_eq!(info.maintenance_until, None, "the evaluation has no limit");
        assert_eq!(info.version_ceiling, None);
        // A term contract (bundle valid_until) ends its grants earlier than their own end.
        let info = feature_info(
            &[verified(vec![eval], Some(UnixTime(200)))],
            "solver",
            UnixTime(10),
        )
        .unwrap();
        assert_eq!(info.expires, Some(UnixTime(200)));
    }
}
