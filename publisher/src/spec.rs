//! Bundle specs: what a customer bought, in TOML a person reads and reviews.
//!
//! ```toml
//! vendor = "Acme Simulation"
//! valid_until = "2027-12-31"
//! supersedes = ["acme-2026-0042"]
//!
//! [customer]
//! id = "C-1001"
//! name = "Example Corp"
//!
//! [[feature]]
//! name = "solver"
//! seats = 20                      # or "uncounted"
//! version_ceiling = "2027.2"
//! maintenance_until = "2027-06-30"
//! expires = "2027-12-31"          # last valid day, or "permanent" (the default)
//! lost_seat_grace_secs = 120       # a program may run this long without its seat,
//! on_lost_seat = "stop"            # then is stopped ("stop") or only warned ("warn")
//! share = "user+host"              # one user's runs on one host share a seat
//!
//! [[feature]]
//! name = "cae-suite"
//! seats = 3
//! suite = true                     # one package seat serves all components per user
//! components = ["solver:2024.06:2", "mesher:3.1"]   # name[:version[:count]]
//!
//! [[feature]]
//! name = "credits"                 # a token pool: its seats are tokens
//! seats = 100
//! [[feature]]
//! name = "optimizer"               # spends 5 tokens of `credits` per seat
//! token_pool = "credits"
//! tokens = 5
//! ```
//!
//! End dates (`expires`, `valid_until`) name the last day that is still valid; start dates
//! (`starts`, `valid_from`) the first; `maintenance_until` the last build date covered.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use tally_protocol::activation::ActivationRequest;
use tally_protocol::bundle::{
    Binding, Bundle, Component, Customer, FeatureGrant, LostSeatTerms, Named, OnLostSeat, Seats,
    Share, TokenDraw,
};
use tally_protocol::time::UnixTime;

/// A bundle spec as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Bundle id; generated when omitted.
    pub id: Option<String>,
    /// The vendor's name.
    pub vendor: String,
    /// The customer.
    pub customer: CustomerSpec,
    /// Ids of bundles this one replaces.
    #[serde(default)]
    pub supersedes: Vec<String>,
    /// `YYYY-MM-DD`: not served before.
    pub valid_from: Option<String>,
    /// `YYYY-MM-DD`: not served from this day on.
    pub valid_until: Option<String>,
    /// The features.
    #[serde(default)]
    pub feature: Vec<FeatureSpec>,
}

/// The customer part of a spec.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerSpec {
    /// The vendor's customer id.
    pub id: String,
    /// The customer's name.
    pub name: String,
}

/// Seats: a count or `"uncounted"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SeatsSpec {
    /// A number of seats.
    Count(u32),
    /// `"uncounted"`.
    Word(String),
}

/// One feature of a spec.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// Feature name.
    pub name: String,
    /// Seats; absent only for a product that spends tokens (`token_pool`).
    pub seats: Option<SeatsSpec>,
    /// Highest version served.
    pub version_ceiling: Option<String>,
    /// For an upgrade: the ceiling whose seats move to `version_ceiling`.
    pub upgrade_from: Option<String>,
    /// `YYYY-MM-DD`: builds after this date are outside maintenance.
    pub maintenance_until: Option<String>,
    /// `YYYY-MM-DD`.
    pub starts: Option<String>,
    /// `YYYY-MM-DD` or `permanent`.
    pub expires: Option<String>,
    /// An evaluation licence.
    #[serde(default)]
    pub evaluation: bool,
    /// Extra seats reported as overdraft.
    #[serde(default)]
    pub overdraft: u32,
    /// Longest borrow, hours.
    #[serde(default)]
    pub borrow_limit_hours: u64,
    /// Seconds a seat stays held after checkin.
    #[serde(default)]
    pub linger_secs: u64,
    /// Heartbeat TTL, seconds.
    pub heartbeat_ttl_secs: Option<u64>,
    /// Seconds a program may run without its seat (lost, or the server out of reach)
    /// before `on_lost_seat` applies; default 300 when only `on_lost_seat` is given.
    pub lost_seat_grace_secs: Option<u64>,
    /// `"stop"` or `"warn"`: what happens after the grace; default `"warn"` when only
    /// the grace is given. Either key makes the bundle format version 2.
    pub on_lost_seat: Option<String>,
    /// For a package: the features it grants, `name[:version[:count]]` as FlexLM's
    /// `COMPONENTS` writes them.
    #[serde(default)]
    pub components: Vec<String>,
    /// A suite: one package seat serves all the components for one user.
    #[serde(default)]
    pub suite: bool,
    /// Checkouts that share seats: `user`, `host`, `display`, or several joined by `+`;
    /// `site`: every checkout of the site.
    pub share: Option<String>,
    /// Most checkouts on one shared seat; absent is no limit.
    pub share_limit: Option<u32>,
    /// The pool feature whose seats (tokens) this product spends.
    pub token_pool: Option<String>,
    /// Tokens per seat of this product.
    pub tokens: Option<u32>,
    /// `"user"` or `"host"`: licensed to named users or hosts the site lists.
    pub named: Option<String>,
    /// Most names; default the feature's seats.
    pub named_limit: Option<u32>,
    /// Days a name stays on the list before it may be replaced; default 0 (any time).
    #[serde(default)]
    pub named_change_days: u32,
    /// `"allow"` (the default) or `"deny"`: checkouts from remote sessions.
    pub remote_sessions: Option<String>,
    /// `"allow"` (the default) or `"deny"`: checkouts from virtual machines.
    pub virtual_machines: Option<String>,
    /// Free-form attributes passed to the application.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// Why a spec was refused; the text names the file, and the line or feature.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SpecError {
    /// The spec file.
    pub path: String,
    /// What is wrong (with `line N:` where known).
    pub message: String,
}

impl Spec {
    /// Parses a spec; `path` is used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Spec, SpecError> {
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(1);
            SpecError {
                path: path.display().to_string(),
                message: format!("line {line}: {}", e.message()),
            }
        })
    }

    /// Builds the bundle, bound to the server of `request`.
    pub fn to_bundle(
        &self,
        path: &Path,
        request: &ActivationRequest,
        id: String,
        now: UnixTime,
    ) -> Result<Bundle, SpecError> {
        self.to_cluster_bundle(path, std::slice::from_ref(request), id, now)
    }

    /// Builds the bundle, bound to the servers of `requests` (one server, or the
    /// members of one cluster, in the order given). The seats are the spec's, for the
    /// whole cluster: a cluster serves one ledger, so they are not multiplied by the
    /// number of servers. The caller checks the requests are distinct
    /// ([`Bundle::check_cluster`]).
    pub fn to_cluster_bundle(
        &self,
        path: &Path,
        requests: &[ActivationRequest],
        id: String,
        now: UnixTime,
    ) -> Result<Bundle, SpecError> {
        let err = |message: String| SpecError {
            path: path.display().to_string(),
            message,
        };
        if self.customer.id.trim().is_empty() || self.customer.name.trim().is_empty() {
            return Err(err("customer.id and customer.name must be filled in".into()));
        }
        if self.vendor.trim().is_empty() {
            return Err(err("vendor must be filled in".into()));
        }
        if self.feature.is_empty() {
            return Err(err("no [[feature]]: a bundle must sell something".into()));
        }
        let date = |what: &str, value: &Option<String>| -> Result<Option<UnixTime>, SpecError> {
            match value.as_deref() {
                None | Some("permanent") => Ok(None),
                Some(text) => UnixTime::from_date(text)
                    .map(Some)
                    .ok_or_else(|| err(format!("{what}: '{text}' is not a date like 2027-12-31"))),
            }
        };
        // Vendors write the last day a thing is valid ("until 2027-12-31"); the bundle
        // stores the first instant it is not, the start of the next day.
        let end = |what: &str, value: &Option<String>| -> Result<Option<UnixTime>, SpecError> {
            Ok(date(what, value)?.map(|d| d.plus_secs(tally_protocol::time::DAY)))
        };
        let mut features = Vec::new();
        for f in &self.feature {
            let ctx = |field: &str| format!("feature '{}': {field}", f.name);
            if f.name.trim().is_empty() || f.name.len() > 64 {
                return Err(err(
                    "a feature name is empty or longer than 64 characters".into()
                ));
            }
            let tokens = match (&f.token_pool, f.tokens, &f.seats) {
                (None, None, _) => None,
                (Some(pool), Some(per_seat), None) if per_seat > 0 => Some(TokenDraw {
                    pool: pool.clone(),
                    per_seat,
                }),
                (Some(_), Some(_), None) => {
                    return Err(err(format!("{}: at least 1", ctx("tokens"))))
                }
                (Some(_), Some(_), Some(_)) => {
                    return Err(err(format!(
                        "{}: a product that spends tokens has no seats of its own",
                        ctx("seats")
                    )))
                }
                _ => {
                    return Err(err(format!(
                        "{}: token_pool and tokens go together",
                        ctx("tokens")
                    )))
                }
            };
            let seats = match &f.seats {
                None if tokens.is_some() => Seats::Counted(0),
                None => return Err(err(format!("{}: missing", ctx("seats")))),
                Some(SeatsSpec::Count(n)) => Seats::Counted(*n),
                Some(SeatsSpec::Word(w)) if w == "uncounted" => Seats::Uncounted,
                Some(SeatsSpec::Word(w)) => {
                    return Err(err(format!(
                        "{}: '{w}' is neither a number nor \"uncounted\"",
                        ctx("seats")
                    )))
                }
            };
            let components = f
                .components
                .iter()
                .map(|c| parse_component(c).map_err(|m| err(format!("{}: {m}", ctx("components")))))
                .collect::<Result<Vec<_>, _>>()?;
            if f.suite && components.is_empty() {
                return Err(err(format!("{}: a suite needs components", ctx("suite"))));
            }
            let share = match (&f.share, f.share_limit) {
                (None, None) => None,
                (None, Some(_)) => return Err(err(format!("{}: needs share", ctx("share_limit")))),
                (Some(by), limit) => Some(
                    parse_share(by, limit.unwrap_or(0))
                        .map_err(|m| err(format!("{}: {m}", ctx("share"))))?,
                ),
            };
            let named = match (f.named.as_deref(), f.named_limit) {
                (None, None) if f.named_change_days == 0 => None,
                (None, _) => {
                    return Err(err(format!(
                        "{}: named_limit and named_change_days need named",
                        ctx("named")
                    )))
                }
                (Some(kind @ ("user" | "host")), limit) => {
                    let limit = match (limit, seats) {
                        (Some(n), _) if n > 0 => n,
                        (None, Seats::Counted(n)) if n > 0 => n,
                        _ => {
                            return Err(err(format!(
                                "{}: named_limit must be at least 1 (it defaults to the seats)",
                                ctx("named_limit")
                            )))
                        }
                    };
                    Some(Named {
                        hosts: kind == "host",
                        limit,
                        change_days: f.named_change_days,
                    })
                }
                (Some(other), _) => {
                    return Err(err(format!(
                        "{}: '{other}' is neither \"user\" nor \"host\"",
                        ctx("named")
                    )))
                }
            };
            let deny = |key: &str, value: &Option<String>| match value.as_deref() {
                None | Some("allow") => Ok(false),
                Some("deny") => Ok(true),
                Some(other) => Err(err(format!(
                    "{}: '{other}' is neither \"allow\" nor \"deny\"",
                    ctx(key)
                ))),
            };
            let deny_remote_sessions = deny("remote_sessions", &f.remote_sessions)?;
            let deny_virtual_machines = deny("virtual_machines", &f.virtual_machines)?;
            if f.suite && share.is_some() {
                return Err(err(format!(
                    "{}: a suite already shares its seats by user",
                    ctx("share")
                )));
            }
            if f.upgrade_from.is_some() && f.version_ceiling.is_none() {
                return Err(err(format!(
                    "{}: an upgrade needs version_ceiling (the version it upgrades to)",
                    ctx("upgrade_from")
                )));
            }
            let starts = date(&ctx("starts"), &f.starts)?;
            let expires = end(&ctx("expires"), &f.expires)?;
            if let (Some(s), Some(e)) = (starts, expires) {
                if e <= s.plus_secs(tally_protocol::time::DAY) {
                    return Err(err(format!("{}: expires before it starts", ctx("expires"))));
                }
            }
            let action = match f.on_lost_seat.as_deref() {
                None | Some("warn") => OnLostSeat::Warn,
                Some("stop") => OnLostSeat::Stop,
                Some(other) => {
                    return Err(err(format!(
                        "{}: '{other}' is neither \"stop\" nor \"warn\"",
                        ctx("on_lost_seat")
                    )))
                }
            };
            let lost_seat =
                (f.lost_seat_grace_secs.is_some() || f.on_lost_seat.is_some()).then(|| {
                    LostSeatTerms {
                        grace_secs: f
                            .lost_seat_grace_secs
                            .unwrap_or(LostSeatTerms::DEFAULT.grace_secs),
                        action,
                    }
                });
            features.push(FeatureGrant {
                name: f.name.clone(),
                seats,
                version_ceiling: f.version_ceiling.clone(),
                upgrade_from: f.upgrade_from.clone(),
                maintenance_until: date(&ctx("maintenance_until"), &f.maintenance_until)?,
                starts,
                expires,
                evaluation: f.evaluation,
                overdraft: f.overdraft,
                borrow_limit_secs: f.borrow_limit_hours.saturating_mul(3600),
                linger_secs: f.linger_secs,
                heartbeat_ttl_secs: f.heartbeat_ttl_secs,
                components,
                attributes: f.attributes.clone(),
                lost_seat,
                suite: f.suite,
                share,
                tokens,
                named,
                deny_remote_sessions,
                deny_virtual_machines,
            });
        }
        for f in &features {
            if let Some(t) = &f.tokens {
                // The pool must be sold in this bundle: a product spending tokens of a
                // pool the site may never have would be a grant of nothing.
                let pool = features
                    .iter()
                    .find(|p| p.name == t.pool && p.tokens.is_none() && p.components.is_empty());
                if pool.is_none() {
                    return Err(err(format!(
                        "feature '{}': token_pool '{}' is not a plain feature of this spec",
                        f.name, t.pool
                    )));
                }
            }
        }
        Ok(Bundle {
            id: self.id.clone().unwrap_or(id),
            issued_at: now,
            vendor: self.vendor.clone(),
            customer: Customer {
                id: self.customer.id.clone(),
                name: self.customer.name.clone(),
            },
            binding: requests
                .iter()
                .map(|request| Binding {
                    server_key: request.server_key,
                    host_fingerprint: request.host_fingerprint.clone(),
                })
                .collect(),
            supersedes: self.supersedes.clone(),
            valid_from: date("valid_from", &self.valid_from)?,
            valid_until: end("valid_until", &self.valid_until)?,
            features,
        })
    }
}

/// What of `bundle` has already ended at `now`: the bundle's `valid_until` and each
/// feature's `expires`, said as the spec says them (the last valid day). Empty when
/// everything is still valid.
pub fn already_ended(bundle: &Bundle, now: UnixTime) -> Vec<String> {
    let mut ended = Vec::new();
    if let Some(until) = bundle.valid_until.filter(|u| *u <= now) {
        ended.push(format!(
            "the bundle ended on {} (valid_until), before today {}",
            until.last_day(),
            now.date()
        ));
    }
    for f in &bundle.features {
        if let Some(expires) = f.expires.filter(|e| *e <= now) {
            ended.push(format!(
                "feature '{}' expired on {}, before today {}",
                f.name,
                expires.last_day(),
                now.date()
            ));
        }
    }
    ended
}

/// Reads a component as FlexLM writes it: `name[:version[:count]]`.
pub fn parse_component(text: &str) -> Result<Component, String> {
    let mut parts = text.split(':');
    let name = parts.next().unwrap_or("").trim();
    if name.is_empty() || name.len() > 64 {
        return Err(format!(
            "'{text}': the name is empty or longer than 64 characters"
        ));
    }
    let version = parts
        .next()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string);
    let count = match parts.next() {
        None => 1,
        Some(n) => match n.trim().parse::<u32>() {
            Ok(n) if n >= 1 => n,
            _ => {
                return Err(format!(
                    "'{text}': the count '{n}' is not a number of at least 1"
                ))
            }
        },
    };
    if parts.next().is_some() {
        return Err(format!("'{text}': more than name:version:count"));
    }
    Ok(Component {
        name: name.to_string(),
        version,
        count,
    })
}

/// Reads a share rule: `user`, `host`, `display`, or several joined by `+`; `site`
/// alone shares among every checkout of the site (FlexLM's `DUP_GROUP=SITE`).
pub fn parse_share(text: &str, limit: u32) -> Result<Share, String> {
    let mut share = Share {
        user: false,
        host: false,
        display: false,
        limit,
    };
    if text.trim() == "site" {
        return Ok(share);
    }
    for word in text.split('+').map(str::trim) {
        match word {
            "user" => share.user = true,
            "host" => share.host = true,
            "display" => share.display = true,
            other => {
                return Err(format!(
                    "'{other}' is not user, host or display (join several with +), or site"
                ))
            }
        }
    }
    Ok(share)
}

/// Quotes a string as a TOML basic string.
pub fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
