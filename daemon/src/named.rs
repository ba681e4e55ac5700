//! Named users and named hosts (FlexLM's `USER_BASED`/`HOST_BASED`, RLM's named-user
//! licences): the vendor's grant says how many names ([`Named`]), the site's policy lists
//! which (`[[named]]`), and only those names, the first `limit` of the list in file
//! order, may check the feature out.
//!
//! Pure functions the ledger calls from its checks; no state of their own.

use tally_config::policy::NamedList;
use tally_config::Policy;
use tally_protocol::bundle::Named;
use tally_protocol::wire::{ClientIdentity, DenialReason};

/// The named-licence terms of the grants that serve a checkout together: `None` when any
/// of them is not named (plain seats serve anyone, so nothing restricts the names).
/// Several named grants (an add-on) add their limits up; the longest change period and
/// the first grant's kind (users or hosts) hold.
pub fn combine(terms: impl IntoIterator<Item = Option<Named>>) -> Option<Named> {
    let mut combined: Option<Named> = None;
    for named in terms {
        let named = named?;
        combined = Some(match combined {
            None => named,
            Some(c) => Named {
                hosts: c.hosts,
                limit: c.limit.saturating_add(named.limit),
                change_days: c.change_days.max(named.change_days),
            },
        });
    }
    combined
}

/// The policy's list of names for `feature` as `named` wants it (users or hosts): the
/// names without repeats, in file order. A list of the other kind counts as none.
pub fn listed<'p>(policy: &'p Policy, feature: &str, named: Named) -> Vec<&'p str> {
    let Some(list) = policy
        .named_list(feature)
        .filter(|l| l.hosts == named.hosts)
    else {
        return Vec::new();
    };
    let mut names: Vec<&str> = Vec::new();
    for n in &list.names {
        if !names.iter().any(|m| policy.same_name(named.hosts, m, n)) {
            names.push(n);
        }
    }
    names
}

/// The names of `list` beyond the vendor's `limit` (in file order): they are refused,
/// and `tallyd check-config` names them.
pub fn beyond_limit(policy: &Policy, list: &NamedList, limit: u32) -> Vec<String> {
    let named = Named {
        hosts: list.hosts,
        limit,
        change_days: 0,
    };
    listed(policy, &list.feature, named)
        .into_iter()
        .skip(limit as usize)
        .map(str::to_string)
        .collect()
}

/// Whether `holder` may check out `feature`, licensed to `named` names: its user (or
/// host) must be among the first `limit` names of the policy's list. The refusal says
/// who the names are and what to do.
pub fn check(
    policy: &Policy,
    feature: &str,
    named: Named,
    holder: &ClientIdentity,
) -> Result<(), DenialReason> {
    let (kind, name) = if named.hosts {
        ("host", holder.host.as_str())
    } else {
        ("user", holder.user.as_str())
    };
    let names = listed(policy, feature, named);
    let counted = &names[..names.len().min(named.limit as usize)];
    if counted
        .iter()
        .any(|n| policy.same_name(named.hosts, n, name))
    {
        return Ok(());
    }
    let licensed = format!(
        "'{feature}' is licensed to {} {}",
        named.limit,
        if named.limit == 1 {
            format!("named {kind}")
        } else {
            format!("named {kind}s")
        }
    );
    let why = if counted.is_empty() {
        format!("{licensed} and the site's policy lists none")
    } else if names.iter().any(|n| policy.same_name(named.hosts, n, name)) {
        format!(
            "{licensed} ({}); {name} is listed after them, beyond the limit",
            counted.join(", ")
        )
    } else {
        format!(
            "{licensed} ({}); {name} is not one of them",
            counted.join(", ")
        )
    };
    Err(DenialReason::Excluded {
        feature: feature.to_string(),
        rule: format!("{kind} {name}: {why}: ask your administrator"),
    })
}
