//! Named users and named hosts (FlexLM's `USER_BASED`/`HOST_BASED`, RLM's named-user
//! licences): the vendor's grant says how many names ([`Named`]), the site's policy lists
//! which (`[[named]]`), and only those names, the first `limit` of the list in file
//! order, may check the feature out.
//!
//! The vendor may limit how often the list changes (`change_days`): a name that used the
//! feature keeps its place on the licence that many days ([`NamedSeat`]), also when the
//! policy drops it, so a new name waits for the place to free. The ledger keeps these
//! seats in [`Seats`] and the shell stores them like the removal hold-offs.

use std::collections::BTreeMap;
use tally_config::policy::NamedList;
use tally_config::Policy;
use tally_protocol::bundle::Named;
use tally_protocol::replicate::NamedSeat;
use tally_protocol::time::UnixTime;
use tally_protocol::wire::{ClientIdentity, DenialReason};

/// Seconds in a day, for `change_days`.
const DAY_SECS: u64 = 86_400;

/// The named seats the ledger knows of: by feature, the names that used it and until
/// when their places stay taken. Only places still taken are kept (those freed are
/// dropped when the feature takes a new one), so there are at most as many per feature
/// as the licence's limit plus the names the policy dropped in the last `change_days`.
#[derive(Debug, Default)]
pub struct Seats {
    held: BTreeMap<String, Vec<NamedSeat>>,
    /// Seats taken and not yet handed to the shell to write.
    new: Vec<NamedSeat>,
}

impl Seats {
    /// The seats of `feature` whose places are still taken at `now`.
    fn live(&self, feature: &str, now: UnixTime) -> impl Iterator<Item = &NamedSeat> {
        (self.held.get(feature).into_iter().flatten()).filter(move |s| s.until > now)
    }

    /// Notes that `holder` was granted `feature`, licensed to `named` names: with a
    /// change period, its name takes a place until `change_days` from now unless it
    /// holds one already.
    pub fn used(
        &mut self,
        policy: &Policy,
        feature: &str,
        named: Named,
        holder: &ClientIdentity,
        now: UnixTime,
    ) {
        if named.change_days == 0 {
            return;
        }
        let name = name_of(named, holder);
        let seats = self.held.entry(feature.to_string()).or_default();
        seats.retain(|s| s.until > now);
        if seats
            .iter()
            .any(|s| policy.same_name(named.hosts, &s.name, name))
        {
            return;
        }
        let seat = NamedSeat {
            feature: feature.to_string(),
            name: name.to_string(),
            since: now,
            until: now.plus_secs(u64::from(named.change_days).saturating_mul(DAY_SECS)),
        };
        seats.push(seat.clone());
        self.new.push(seat);
    }

    /// The seats taken since the last call, for the shell to write.
    pub fn take_new(&mut self) -> Vec<NamedSeat> {
        std::mem::take(&mut self.new)
    }

    /// Every seat whose place is still taken at `now`, by feature and name.
    pub fn all(&self, now: UnixTime) -> Vec<NamedSeat> {
        let mut out: Vec<NamedSeat> = (self.held.values().flatten())
            .filter(|s| s.until > now)
            .cloned()
            .collect();
        out.sort_by(|a, b| (&a.feature, &a.name).cmp(&(&b.feature, &b.name)));
        out
    }

    /// Restores stored seats whose places are still taken at `now` (by the wall clock,
    /// the only one that survives a restart).
    pub fn restore(&mut self, now: UnixTime, stored: Vec<NamedSeat>) {
        for seat in stored.into_iter().filter(|s| s.until > now) {
            let seats = self.held.entry(seat.feature.clone()).or_default();
            seats.retain(|s| s.name != seat.name);
            seats.push(seat);
        }
    }
}

/// The name `named` licenses for `holder`: its host or its user.
fn name_of(named: Named, holder: &ClientIdentity) -> &str {
    if named.hosts {
        &holder.host
    } else {
        &holder.user
    }
}

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
/// host) must be among the names that count. Names the policy dropped whose places are
/// still taken ([`Seats`]) count first; then the policy's names, those already on the
/// licence before the others, in file order, up to `limit`. The refusal says who the
/// names are, when a place frees, and what to do.
pub fn check(
    policy: &Policy,
    feature: &str,
    named: Named,
    holder: &ClientIdentity,
    seats: &Seats,
    now: UnixTime,
) -> Result<(), DenialReason> {
    let kind = if named.hosts { "host" } else { "user" };
    let name = name_of(named, holder);
    let same = |a: &str, b: &str| policy.same_name(named.hosts, a, b);
    let mut names = listed(policy, feature, named);
    let live: Vec<&NamedSeat> = seats.live(feature, now).collect();
    let mut locked: Vec<&NamedSeat> = (live.iter().copied())
        .filter(|s| !names.iter().any(|n| same(n, &s.name)))
        .collect();
    locked.sort_by_key(|s| s.until);
    // Names on the licence already keep their places before newly listed ones.
    names.sort_by_key(|n| !live.iter().any(|s| same(&s.name, n)));
    let places = (named.limit as usize).saturating_sub(locked.len());
    let counted = &names[..names.len().min(places)];
    if counted.iter().any(|n| same(n, name)) {
        return Ok(());
    }
    let mut holding: Vec<String> = counted.iter().map(|n| n.to_string()).collect();
    holding.extend((locked.iter()).map(|s| format!("{} until {}", s.name, s.until.date())));
    let licensed = format!(
        "'{feature}' is licensed to {} {}",
        named.limit,
        if named.limit == 1 {
            format!("named {kind}")
        } else {
            format!("named {kind}s")
        }
    );
    let listed_here = names.iter().any(|n| same(n, name));
    let why = if holding.is_empty() {
        format!("{licensed} and the site's policy lists none")
    } else if let (true, Some(first)) = (listed_here, locked.first()) {
        format!(
            "{licensed} ({}); {name} waits for a place: {}'s place frees on {}",
            holding.join(", "),
            first.name,
            first.until.date()
        )
    } else if listed_here {
        format!(
            "{licensed} ({}); {name} is listed after them, beyond the limit",
            holding.join(", ")
        )
    } else {
        format!(
            "{licensed} ({}); {name} is not one of them",
            holding.join(", ")
        )
    };
    Err(DenialReason::Excluded {
        feature: feature.to_string(),
        rule: format!("{kind} {name}: {why}: ask your administrator"),
    })
}
