//! The vendor's rules on where a feature may run: from remote sessions (FlexLM's
//! `TS_OK` missing) and from virtual machines (RLM's VM refusal), judged on what the
//! client reported ([`ClientFacts`]). The ledger asks [`SessionRules::check`] before
//! its other rules; this module is sans-IO.
//!
//! A client reports these facts itself; a modified client can lie (SECURITY.md).

use std::collections::HashMap;
use tally_protocol::bundle::Bundle;
use tally_protocol::observed::ClientFacts;
use tally_protocol::wire::DenialReason;

/// Which features refuse remote sessions or virtual machines, from the bundles served.
#[derive(Debug, Clone, Default)]
pub struct SessionRules {
    /// Feature (or suite component) name to (refuses remote sessions, refuses VMs).
    by_feature: HashMap<String, (bool, bool)>,
}

impl SessionRules {
    /// The rules of `bundles`. A feature refuses remote sessions (or VMs) when every
    /// grant serving it says so: a grant that allows them is enough to serve them,
    /// as any grant admitting a version is.
    pub fn of(bundles: &[Bundle]) -> SessionRules {
        let mut by_feature: HashMap<String, (bool, bool)> = HashMap::new();
        for grant in bundles.iter().flat_map(|b| b.features.iter()) {
            for name in grant.names() {
                let rule = by_feature.entry(name.to_string()).or_insert((true, true));
                rule.0 &= grant.deny_remote_sessions;
                rule.1 &= grant.deny_virtual_machines;
            }
        }
        by_feature.retain(|_, (remote, vm)| *remote || *vm);
        SessionRules { by_feature }
    }

    /// Whether a checkout of `feature` by a client that reported `facts` (`None`: a
    /// client too old to report any) may go on. A client that cannot say where it runs
    /// does not pass a feature that asks: it is told to upgrade, in a reason every
    /// client decodes.
    pub fn check(&self, feature: &str, facts: Option<&ClientFacts>) -> Result<(), DenialReason> {
        let Some(&(deny_remote, deny_vm)) = self.by_feature.get(feature) else {
            return Ok(());
        };
        let Some(facts) = facts else {
            let what = match (deny_remote, deny_vm) {
                (true, true) => "remote sessions and virtual machines",
                (true, false) => "remote sessions",
                _ => "virtual machines",
            };
            return Err(DenialReason::InvalidRequest {
                what: format!(
                    "'{feature}' may not be used from {what}, and this client is too old to \
                     report where it runs; upgrade the program's tally client library"
                ),
            });
        };
        if deny_remote {
            if let Some(session) = facts.remote_session() {
                return Err(DenialReason::RemoteSessionRefused {
                    feature: feature.to_string(),
                    session: session.to_string(),
                });
            }
        }
        if deny_vm {
            if let Some(hypervisor) = facts.virtual_machine() {
                return Err(DenialReason::VirtualMachineRefused {
                    feature: feature.to_string(),
                    hypervisor: hypervisor.to_string(),
                });
            }
        }
        Ok(())
    }
}
