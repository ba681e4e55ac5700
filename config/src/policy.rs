//! The policy file: the customer's own rules on top of what the vendor sold.
//!
//! The semantics are those of FlexLM's options file, so admins recognise them: GROUP and
//! HOST_GROUP name sets of users and hosts; RESERVE keeps seats for a user, group, host or
//! host group; MAX caps a user's or a group's seats; INCLUDE limits a feature to the
//! listed subjects and EXCLUDE keeps subjects out (EXCLUDE wins); TIMEOUT lengthens the
//! lease TTL of a feature (never below the vendor's) and `timeout_all_secs` (TIMEOUTALL)
//! of every feature without its own; BORROW shortens the longest borrow; INCLUDE_BORROW
//! and EXCLUDE_BORROW say who may borrow; BORROW_LOWWATER keeps seats from being borrowed;
//! LINGER lengthens a feature's linger (never shortens the vendor's);
//! `case_insensitive_users` (GROUPCASEINSENSITIVE ON) compares user names without case.
//!
//! ```toml
//! [groups]
//! cfd = ["ana", "bo"]
//! [host_groups]
//! lab = ["ws-1", "ws-2"]
//!
//! [[reserve]]
//! feature = "solver"
//! seats = 2
//! group = "cfd"
//!
//! [[max]]
//! feature = "solver"
//! seats = 3
//! user = "ana"
//!
//! [[exclude]]
//! feature = "solver"
//! host_group = "lab"
//!
//! [[named]]
//! feature = "cad"
//! users = ["ana", "bo"]
//! ```
//!
//! `[[named]]` lists who may use a feature the vendor licenses to named users or hosts
//! (FlexLM's `USER_BASED`/`HOST_BASED`): the vendor's bundle says how many names, the
//! list says which, the first ones in file order counting.

use crate::ConfigError;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use toml::Spanned;

/// Who a rule is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// One login name.
    User(String),
    /// A group from `[groups]`.
    Group(String),
    /// One host name.
    Host(String),
    /// A host group from `[host_groups]`.
    HostGroup(String),
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::User(n) => write!(f, "user {n}"),
            Subject::Group(n) => write!(f, "group {n}"),
            Subject::Host(n) => write!(f, "host {n}"),
            Subject::HostGroup(n) => write!(f, "host group {n}"),
        }
    }
}

/// A rule that applies to one feature and one subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The feature.
    pub feature: String,
    /// Who.
    pub subject: Subject,
    /// Seats (RESERVE, MAX); 0 for INCLUDE/EXCLUDE.
    pub seats: u32,
}

/// The parsed, checked policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Group name to user names.
    pub groups: BTreeMap<String, Vec<String>>,
    /// Host group name to host names.
    pub host_groups: BTreeMap<String, Vec<String>>,
    /// RESERVE rules.
    pub reserve: Vec<Rule>,
    /// MAX rules (subject is a user or a group).
    pub max: Vec<Rule>,
    /// INCLUDE rules.
    pub include: Vec<Rule>,
    /// EXCLUDE rules.
    pub exclude: Vec<Rule>,
    /// Lease TTL per feature, seconds.
    pub timeout_secs: BTreeMap<String, u64>,
    /// Longest borrow per feature, seconds.
    pub borrow_limit_secs: BTreeMap<String, u64>,
    /// INCLUDE_BORROW rules: once a feature has one, only its subjects may borrow it.
    pub include_borrow: Vec<Rule>,
    /// EXCLUDE_BORROW rules: these subjects may not borrow the feature (wins over
    /// INCLUDE_BORROW).
    pub exclude_borrow: Vec<Rule>,
    /// TIMEOUTALL: lease TTL, seconds, of every feature without a `timeout` of its own.
    pub timeout_all_secs: Option<u64>,
    /// BORROW_LOWWATER: seats per feature that are never borrowed.
    pub borrow_lowwater: BTreeMap<String, u32>,
    /// LINGER: the site's linger per feature, seconds (only ever lengthens the vendor's).
    pub linger_secs: BTreeMap<String, u64>,
    /// INCLUDEALL rules: once there is one, only their subjects (and those of the
    /// feature's own INCLUDE rules) may use any feature.
    pub include_all: Vec<Subject>,
    /// EXCLUDEALL rules: these subjects may use no feature.
    pub exclude_all: Vec<Subject>,
    /// GROUPCASEINSENSITIVE ON: user names in groups and rules match the client's without
    /// regard to case (host names always do).
    pub case_insensitive_users: bool,
    /// `[[named]]` lists, one per feature, in file order.
    pub named: Vec<NamedList>,
}

/// The names a `[[named]]` entry lists for one feature: users or hosts, in file order
/// (the order decides who counts when the list is longer than the vendor's limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedList {
    /// The feature.
    pub feature: String,
    /// The names are host names (else user names).
    pub hosts: bool,
    /// The names, in file order.
    pub names: Vec<String>,
    /// The line of the entry, for warnings.
    pub line: usize,
}

/// Why [`Policy::access`] refuses a checkout or [`Policy::borrow_access`] a borrow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// An EXCLUDE (EXCLUDEALL, EXCLUDE_BORROW) rule names the client.
    Excluded(Subject),
    /// The feature has INCLUDE (INCLUDEALL, INCLUDE_BORROW) rules and none names the
    /// client.
    NotIncluded,
}

impl Policy {
    /// Whether `subject` covers the client `user`@`host`.
    pub fn matches(&self, subject: &Subject, user: &str, host: &str) -> bool {
        match subject {
            Subject::User(u) => self.same_user(u, user),
            Subject::Host(h) => h.eq_ignore_ascii_case(host),
            Subject::Group(g) => self
                .groups
                .get(g)
                .is_some_and(|members| members.iter().any(|m| self.same_user(m, user))),
            Subject::HostGroup(g) => self
                .host_groups
                .get(g)
                .is_some_and(|members| members.iter().any(|m| m.eq_ignore_ascii_case(host))),
        }
    }

    /// The `[[named]]` list of `feature`, if the policy has one.
    pub fn named_list(&self, feature: &str) -> Option<&NamedList> {
        self.named.iter().find(|n| n.feature == feature)
    }

    /// Whether two names of a named list are the same one: host names without case,
    /// user names as [`Policy::matches`] compares them.
    pub fn same_name(&self, hosts: bool, a: &str, b: &str) -> bool {
        if hosts {
            a.eq_ignore_ascii_case(b)
        } else {
            self.same_user(a, b)
        }
    }

    /// Whether two user names are the same one: exactly, or without case under
    /// `case_insensitive_users` (full Unicode case folding, no allocation).
    fn same_user(&self, a: &str, b: &str) -> bool {
        if self.case_insensitive_users {
            a.chars()
                .flat_map(char::to_lowercase)
                .eq(b.chars().flat_map(char::to_lowercase))
        } else {
            a == b
        }
    }

    /// Whether the client `user`@`host` may use `feature` at all: EXCLUDE and EXCLUDEALL
    /// first (they win), then INCLUDE and INCLUDEALL (once either names subjects for the
    /// feature, only those subjects may use it; FlexLM's meaning).
    pub fn access(&self, feature: &str, user: &str, host: &str) -> Result<(), Refusal> {
        let named = |s: &&Subject| self.matches(s, user, host);
        let mut excluded = (self.exclude.iter())
            .filter(|r| r.feature == feature)
            .map(|r| &r.subject)
            .chain(&self.exclude_all);
        if let Some(subject) = excluded.find(named) {
            return Err(Refusal::Excluded(subject.clone()));
        }
        let mut included = (self.include.iter())
            .filter(|r| r.feature == feature)
            .map(|r| &r.subject)
            .chain(&self.include_all)
            .peekable();
        if included.peek().is_some() && !included.any(|s| named(&s)) {
            return Err(Refusal::NotIncluded);
        }
        Ok(())
    }

    /// Whether the client `user`@`host` may borrow `feature`: EXCLUDE_BORROW first (it
    /// wins), then INCLUDE_BORROW (a feature with such rules lends only to their
    /// subjects). Nothing here lengthens what the vendor allows; it only narrows it.
    pub fn borrow_access(&self, feature: &str, user: &str, host: &str) -> Result<(), Refusal> {
        if let Some(rule) = self
            .exclude_borrow
            .iter()
            .find(|r| r.feature == feature && self.matches(&r.subject, user, host))
        {
            return Err(Refusal::Excluded(rule.subject.clone()));
        }
        let mut includes = self
            .include_borrow
            .iter()
            .filter(|r| r.feature == feature)
            .peekable();
        if includes.peek().is_some() && !includes.any(|r| self.matches(&r.subject, user, host)) {
            return Err(Refusal::NotIncluded);
        }
        Ok(())
    }

    /// Whether borrowing `count` more seats of `feature`, of `seats` licensed with
    /// `borrowed` already out on borrow, leaves the BORROW_LOWWATER seats unborrowed.
    /// Without a rule for the feature, the policy sets no limit (the seats do).
    pub fn borrow_fits(&self, feature: &str, seats: u32, borrowed: u32, count: u32) -> bool {
        let Some(&keep) = self.borrow_lowwater.get(feature) else {
            return true;
        };
        u64::from(borrowed) + u64::from(count) + u64::from(keep) <= u64::from(seats)
    }

    /// The lease TTL of `feature`: the site's `timeout` for it, else `timeout_all_secs`,
    /// never below the vendor's TTL; without either, the vendor's TTL or else `default`.
    pub fn ttl_for(&self, feature: &str, vendor: Option<Duration>, default: Duration) -> Duration {
        match self
            .timeout_secs
            .get(feature)
            .or(self.timeout_all_secs.as_ref())
        {
            Some(&secs) => Duration::from_secs(secs).max(vendor.unwrap_or_default()),
            None => vendor.unwrap_or(default),
        }
    }

    /// The linger of `feature`: the site's LINGER may lengthen the vendor's, never
    /// shorten it (the vendor's linger is part of what was sold).
    pub fn linger_for(&self, feature: &str, vendor: Duration) -> Duration {
        match self.linger_secs.get(feature) {
            Some(&secs) => vendor.max(Duration::from_secs(secs)),
            None => vendor,
        }
    }

    /// Every feature a rule names, with the rule's kind (`reserve`, `max`, `include`,
    /// `exclude`, `include_borrow`, `exclude_borrow`, `timeout`, `borrow`,
    /// `borrow_lowwater`, `linger`), in file order per kind. The policy cannot know
    /// which features exist; the daemon compares these with its bundles, so a misspelt
    /// feature is a warning rather than a rule that silently never applies.
    pub fn named_features(&self) -> Vec<(&'static str, &str)> {
        let mut out = Vec::new();
        for (kind, rules) in [
            ("reserve", &self.reserve),
            ("max", &self.max),
            ("include", &self.include),
            ("exclude", &self.exclude),
            ("include_borrow", &self.include_borrow),
            ("exclude_borrow", &self.exclude_borrow),
        ] {
            out.extend(rules.iter().map(|r| (kind, r.feature.as_str())));
        }
        out.extend(self.timeout_secs.keys().map(|f| ("timeout", f.as_str())));
        out.extend(
            self.borrow_limit_secs
                .keys()
                .map(|f| ("borrow", f.as_str())),
        );
        out.extend(
            self.borrow_lowwater
                .keys()
                .map(|f| ("borrow_lowwater", f.as_str())),
        );
        out.extend(self.linger_secs.keys().map(|f| ("linger", f.as_str())));
        out.extend(self.named.iter().map(|n| ("named", n.feature.as_str())));
        out
    }

    /// Reads and checks a policy file.
    pub fn load(path: &Path) -> Result<Policy, ConfigError> {
        let read = |cause| ConfigError::Read {
            path: path.to_path_buf(),
            cause,
        };
        let len = std::fs::metadata(path).map_err(read)?.len();
        if len > crate::MAX_CONFIG_LEN {
            return Err(ConfigError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Policy::parse(path, &text)
    }

    /// Parses and checks policy text; `path` is used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Policy, ConfigError> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let raw: RawPolicy = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            line: e.span().map(|s| line_of(s.start)).unwrap_or(1),
            message: e.message().to_string(),
        })?;
        let mut policy = Policy {
            groups: raw.groups,
            host_groups: raw.host_groups,
            case_insensitive_users: raw.case_insensitive_users,
            ..Policy::default()
        };
        let err = |span: std::ops::Range<usize>, message: String| ConfigError::Parse {
            path: path.to_path_buf(),
            line: line_of(span.start),
            message,
        };
        let rules = |list: Vec<RawRule>, kind: &str, needs_seats: bool| {
            let mut out = Vec::new();
            for r in list {
                let span = r.feature.span();
                let feature = r.feature.into_inner();
                let subjects: Vec<Subject> = [
                    r.user.map(Subject::User),
                    r.group.map(Subject::Group),
                    r.host.map(Subject::Host),
                    r.host_group.map(Subject::HostGroup),
                ]
                .into_iter()
                .flatten()
                .collect();
                let [subject] = subjects.as_slice() else {
                    return Err(err(
                        span,
                        format!(
                            "{kind} for '{feature}' needs exactly one of user, group, host, host_group"
                        ),
                    ));
                };
                match subject {
                    Subject::Group(g) if !policy.groups.contains_key(g) => {
                        return Err(err(
                            span,
                            format!("{kind} for '{feature}': no group '{g}' in [groups]"),
                        ))
                    }
                    Subject::HostGroup(g) if !policy.host_groups.contains_key(g) => {
                        return Err(err(
                            span,
                            format!("{kind} for '{feature}': no host group '{g}' in [host_groups]"),
                        ))
                    }
                    _ => {}
                }
                let seats = match (needs_seats, r.seats) {
                    (true, Some(0)) | (true, None) => {
                        return Err(err(
                            span,
                            format!("{kind} for '{feature}' needs seats of at least 1"),
                        ))
                    }
                    (true, Some(n)) => n,
                    (false, Some(_)) => {
                        return Err(err(span, format!("{kind} for '{feature}' takes no seats")))
                    }
                    (false, None) => 0,
                };
                out.push(Rule {
                    feature,
                    subject: subject.clone(),
                    seats,
                });
            }
            Ok(out)
        };
        let reserve = rules(raw.reserve, "reserve", true)?;
        let max = rules(raw.max, "max", true)?;
        let include = rules(raw.include, "include", false)?;
        let exclude = rules(raw.exclude, "exclude", false)?;
        let include_borrow = rules(raw.include_borrow, "include_borrow", false)?;
        let exclude_borrow = rules(raw.exclude_borrow, "exclude_borrow", false)?;
        for m in &max {
            if matches!(m.subject, Subject::Host(_) | Subject::HostGroup(_)) {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    message: format!("max for '{}': MAX applies to a user or a group", m.feature),
                });
            }
        }
        policy.reserve = reserve;
        policy.max = max;
        policy.include = include;
        policy.exclude = exclude;
        policy.include_borrow = include_borrow;
        policy.exclude_borrow = exclude_borrow;
        for (kind, list, out) in [
            ("include_all", raw.include_all, &mut policy.include_all),
            ("exclude_all", raw.exclude_all, &mut policy.exclude_all),
        ] {
            for r in list {
                let span = r.span();
                let r = r.into_inner();
                let subjects: Vec<Subject> = [
                    r.user.map(Subject::User),
                    r.group.map(Subject::Group),
                    r.host.map(Subject::Host),
                    r.host_group.map(Subject::HostGroup),
                ]
                .into_iter()
                .flatten()
                .collect();
                let [subject] = subjects.as_slice() else {
                    return Err(err(
                        span,
                        format!("{kind} needs exactly one of user, group, host, host_group"),
                    ));
                };
                match subject {
                    Subject::Group(g) if !policy.groups.contains_key(g) => {
                        return Err(err(span, format!("{kind}: no group '{g}' in [groups]")))
                    }
                    Subject::HostGroup(g) if !policy.host_groups.contains_key(g) => {
                        return Err(err(
                            span,
                            format!("{kind}: no host group '{g}' in [host_groups]"),
                        ))
                    }
                    _ => out.push(subject.clone()),
                }
            }
        }
        if let Some(all) = raw.timeout_all_secs {
            if all.get_ref() < &10 {
                return Err(err(
                    all.span(),
                    "timeout_all_secs: at least 10 seconds".to_string(),
                ));
            }
            policy.timeout_all_secs = Some(all.into_inner());
        }
        for t in raw.timeout {
            let span = t.feature.span();
            let feature = t.feature.into_inner();
            if t.secs < 10 {
                return Err(err(
                    span,
                    format!("timeout for '{feature}': at least 10 seconds"),
                ));
            }
            policy.timeout_secs.insert(feature, t.secs);
        }
        for b in raw.borrow {
            policy
                .borrow_limit_secs
                .insert(b.feature.into_inner(), b.max_hours.saturating_mul(3600));
        }
        for w in raw.borrow_lowwater {
            let span = w.feature.span();
            let feature = w.feature.into_inner();
            if w.seats == 0 {
                return Err(err(
                    span,
                    format!("borrow_lowwater for '{feature}' needs seats of at least 1"),
                ));
            }
            policy.borrow_lowwater.insert(feature, w.seats);
        }
        for l in raw.linger {
            let span = l.feature.span();
            let feature = l.feature.into_inner();
            if l.secs == 0 {
                return Err(err(
                    span,
                    format!("linger for '{feature}': at least 1 second"),
                ));
            }
            policy.linger_secs.insert(feature, l.secs);
        }
        for n in raw.named {
            let span = n.feature.span();
            let line = line_of(span.start);
            let feature = n.feature.into_inner();
            let (hosts, names) = match (n.users, n.hosts) {
                (Some(users), None) => (false, users),
                (None, Some(hosts)) => (true, hosts),
                _ => {
                    return Err(err(
                        span,
                        format!("named for '{feature}' needs exactly one of users, hosts"),
                    ))
                }
            };
            if let Some(first) = policy.named_list(&feature) {
                return Err(err(
                    span,
                    format!(
                        "named for '{feature}': a second list (the first is on line {})",
                        first.line
                    ),
                ));
            }
            policy.named.push(NamedList {
                feature,
                hosts,
                names,
                line,
            });
        }
        Ok(policy)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    case_insensitive_users: bool,
    #[serde(default)]
    timeout_all_secs: Option<Spanned<u64>>,
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    host_groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    reserve: Vec<RawRule>,
    #[serde(default)]
    max: Vec<RawRule>,
    #[serde(default)]
    include: Vec<RawRule>,
    #[serde(default)]
    exclude: Vec<RawRule>,
    #[serde(default)]
    timeout: Vec<RawTimeout>,
    #[serde(default)]
    borrow: Vec<RawBorrow>,
    #[serde(default)]
    include_borrow: Vec<RawRule>,
    #[serde(default)]
    exclude_borrow: Vec<RawRule>,
    #[serde(default)]
    borrow_lowwater: Vec<RawLowwater>,
    #[serde(default)]
    linger: Vec<RawTimeout>,
    #[serde(default)]
    include_all: Vec<Spanned<RawSubject>>,
    #[serde(default)]
    exclude_all: Vec<Spanned<RawSubject>>,
    #[serde(default)]
    named: Vec<RawNamed>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamed {
    feature: Spanned<String>,
    users: Option<Vec<String>>,
    hosts: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubject {
    user: Option<String>,
    group: Option<String>,
    host: Option<String>,
    host_group: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLowwater {
    feature: Spanned<String>,
    seats: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    feature: Spanned<String>,
    seats: Option<u32>,
    user: Option<String>,
    group: Option<String>,
    host: Option<String>,
    host_group: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeout {
    feature: Spanned<String>,
    secs: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBorrow {
    feature: Spanned<String>,
    max_hours: u64,
}

/// The error `Policy::parse` gives for `text` read as `p.toml` (tests of refused policies).
#[cfg(test)]
fn parse_err(text: &str) -> ConfigError {
    Policy::parse(Path::new("p.toml"), text).expect_err("the policy must be refused")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rules_and_matches_subjects() {
        let p = Policy::parse(
            Path::new("policy.toml"),
            r#"
[groups]
cfd = ["ana", "bo"]
[host_groups]
lab = ["WS-1"]
[[reserve]]
feature = "solver"
seats = 2
group = "cfd"
[[max]]
feature = "solver"
seats = 1
user = "cy"
[[exclude]]
feature = "solver"
host_group = "lab"
[[timeout]]
feature = "solver"
secs = 300
"#,
        )
        .unwrap();
        assert_eq!(p.reserve[0].seats, 2);
        assert!(p.matches(&p.reserve[0].subject, "bo", "x"));
        assert!(!p.matches(&p.reserve[0].subject, "cy", "x"));
        assert!(p.matches(&p.exclude[0].subject, "cy", "ws-1"));
        assert_eq!(p.timeout_secs["solver"], 300);
    }

    #[test]
    fn errors_name_the_line() {
        let text = "[groups]\ncfd = [\"ana\"]\n\n[[reserve]]\nfeature = \"solver\"\nseats = 2\ngroup = \"cdf\"\n";
        let e = Policy::parse(Path::new("/etc/tally/policy.toml"), text).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/tally/policy.toml:5: reserve for 'solver': no group 'cdf' in [groups]"
        );
        let e = parse_err("[[max]]\nfeature = \"solver\"\nuser = \"a\"\n");
        assert!(
            e.to_string()
                .starts_with("p.toml:2: max for 'solver' needs seats"),
            "{e}"
        );
        let e = parse_err("[[exclude]]\nfeature = \"s\"\nuser = \"a\"\ngroup = \"g\"\n");
        assert!(e.to_string().contains("exactly one of"), "{e}");
        let e = Policy::parse(Path::new("p.toml"), "[[reserv]]\nfeature = \"s\"\n").unwrap_err();
        assert!(e.to_string().starts_with("p.toml:1: "), "{e}");
    }
}

#[cfg(test)]
mod options_rules {
    use super::*;

    const RULES: &str = r#"
case_insensitive_users = true
timeout_all_secs = 1800
[groups]
cfd = ["Ana", "bo"]
[[include_borrow]]
feature = "solver"
group = "cfd"
[[exclude_borrow]]
feature = "solver"
user = "BO"
[[exclude_borrow]]
feature = "mesher"
host = "kiosk"
[[borrow_lowwater]]
feature = "solver"
seats = 2
[[linger]]
feature = "solver"
secs = 120
[[timeout]]
feature = "viewer"
secs = 600
"#;

    fn rules() -> Policy {
        Policy::parse(Path::new("p.toml"), RULES).unwrap()
    }

    #[test]
    fn borrow_access_excludes_first_then_limits_to_the_include_list() {
        let p = rules();
        assert_eq!(p.borrow_access("solver", "ana", "h"), Ok(()));
        assert_eq!(
            p.borrow_access("solver", "bo", "h"),
            Err(Refusal::Excluded(Subject::User("BO".into())))
        );
        assert_eq!(
            p.borrow_access("solver", "cy", "h"),
            Err(Refusal::NotIncluded)
        );
        // No include list for mesher: anyone but the excluded host.
        assert_eq!(p.borrow_access("mesher", "cy", "h"), Ok(()));
        assert!(p.borrow_access("mesher", "cy", "KIOSK").is_err());
        assert_eq!(p.borrow_access("viewer", "cy", "kiosk"), Ok(()));
    }

    #[test]
    fn user_names_match_without_case_only_when_asked() {
        let p = rules();
        let cfd = Subject::Group("cfd".into());
        assert!(p.matches(&cfd, "ANA", "h"));
        assert!(p.matches(&Subject::User("BO".into()), "bo", "h"));
        let exact = Policy {
            case_insensitive_users: false,
            ..p.clone()
        };
        assert!(!exact.matches(&cfd, "ANA", "h"));
        assert!(exact.matches(&cfd, "Ana", "h"));
        assert!(!exact.matches(&Subject::User("BO".into()), "bo", "h"));
        // Not a prefix or an ASCII-only fold: whole names, Unicode case.
        assert!(!p.matches(&Subject::User("an".into()), "ana", "h"));
        assert!(p.matches(&Subject::User("ÉLISE".into()), "élise", "h"));
    }

    #[test]
    fn lowwater_keeps_seats_from_borrowing() {
        let p = rules();
        // 5 seats, 2 never borrowed: 3 may be out on borrow.
        assert!(p.borrow_fits("solver", 5, 0, 3));
        assert!(!p.borrow_fits("solver", 5, 0, 4));
        assert!(p.borrow_fits("solver", 5, 2, 1));
        assert!(!p.borrow_fits("solver", 5, 3, 1));
        assert!(!p.borrow_fits("solver", 1, 0, 1));
        // No rule: no limit from the policy (the seats and overdraft decide).
        assert!(p.borrow_fits("mesher", 5, 4, 1));
        assert!(p.borrow_fits("mesher", 5, 5, 1));
        assert!(!p.borrow_fits("solver", u32::MAX, u32::MAX, u32::MAX));
    }

    #[test]
    fn timeouts_and_linger_only_ever_lengthen_the_vendors() {
        let p = rules();
        let s = Duration::from_secs;
        // Per-feature timeout wins over TIMEOUTALL.
        assert_eq!(p.ttl_for("viewer", None, s(90)), s(600));
        assert_eq!(p.ttl_for("solver", None, s(90)), s(1800));
        assert_eq!(p.ttl_for("solver", Some(s(3600)), s(90)), s(3600));
        assert_eq!(Policy::default().ttl_for("solver", None, s(90)), s(90));
        assert_eq!(
            Policy::default().ttl_for("solver", Some(s(40)), s(90)),
            s(40)
        );
        assert_eq!(p.linger_for("solver", s(0)), s(120));
        assert_eq!(p.linger_for("solver", s(300)), s(300));
        assert_eq!(p.linger_for("mesher", s(30)), s(30));
        let named = p.named_features();
        for kind in [
            "include_borrow",
            "exclude_borrow",
            "borrow_lowwater",
            "linger",
        ] {
            assert!(named.iter().any(|(k, _)| *k == kind), "{kind}: {named:?}");
        }
    }

    #[test]
    fn includeall_and_excludeall_apply_to_every_feature() {
        let p = Policy::parse(
            Path::new("p.toml"),
            r#"
[groups]
staff = ["ana", "bo"]
[[include_all]]
group = "staff"
[[exclude_all]]
host = "kiosk"
[[include]]
feature = "viewer"
user = "guest"
[[exclude]]
feature = "solver"
user = "bo"
"#,
        )
        .unwrap();
        assert_eq!(p.access("solver", "ana", "ws"), Ok(()));
        assert_eq!(p.access("mesher", "cy", "ws"), Err(Refusal::NotIncluded));
        // A feature's own INCLUDE adds to INCLUDEALL's subjects.
        assert_eq!(p.access("viewer", "guest", "ws"), Ok(()));
        assert_eq!(p.access("viewer", "bo", "ws"), Ok(()));
        assert_eq!(
            p.access("solver", "bo", "ws"),
            Err(Refusal::Excluded(Subject::User("bo".into())))
        );
        assert_eq!(
            p.access("viewer", "ana", "KIOSK"),
            Err(Refusal::Excluded(Subject::Host("kiosk".into())))
        );
        assert_eq!(Policy::default().access("solver", "x", "y"), Ok(()));
        let e = Policy::parse(Path::new("p.toml"), "\n[[exclude_all]]\ngroup = \"nope\"\n")
            .unwrap_err();
        assert!(e.to_string().starts_with("p.toml:"), "{e}");
        assert!(
            e.to_string().contains("exclude_all: no group 'nope'"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_their_line() {
        let e = parse_err(
            "timeout_all_secs = 5
",
        );
        assert_eq!(
            e.to_string(),
            "p.toml:1: timeout_all_secs: at least 10 seconds"
        );
        let e = parse_err("\n[[borrow_lowwater]]\nfeature = \"s\"\nseats = 0\n");
        assert_eq!(
            e.to_string(),
            "p.toml:3: borrow_lowwater for 's' needs seats of at least 1"
        );
        let e = parse_err("[[exclude_borrow]]\nfeature = \"s\"\nseats = 1\nuser = \"a\"\n");
        assert_eq!(
            e.to_string(),
            "p.toml:2: exclude_borrow for 's' takes no seats"
        );
        let e = parse_err("[[include_borrow]]\nfeature = \"s\"\ngroup = \"nope\"\n");
        assert!(e.to_string().contains("no group 'nope'"), "{e}");
        let e = parse_err("[[linger]]\nfeature = \"s\"\nsecs = 0\n");
        assert_eq!(e.to_string(), "p.toml:2: linger for 's': at least 1 second");
    }
}

#[cfg(test)]
mod named_lists {
    use super::*;

    #[test]
    fn named_lists_parse_in_file_order_and_errors_name_the_line() {
        let p = Policy::parse(
            Path::new("p.toml"),
            "[[named]]\nfeature = \"solver\"\nusers = [\"bo\", \"ana\"]\n\n[[named]]\nfeature = \"cad\"\nhosts = [\"WS-1\"]\n",
        )
        .unwrap();
        let solver = p.named_list("solver").unwrap();
        assert_eq!((solver.hosts, solver.line), (false, 2));
        assert_eq!(solver.names, ["bo", "ana"]);
        assert!(p.named_list("cad").unwrap().hosts);
        assert!(p.named_list("mesher").is_none());
        assert!(p.same_name(true, "WS-1", "ws-1"));
        assert!(!p.same_name(false, "Bo", "bo"));
        assert!(p.named_features().contains(&("named", "cad")));
        let e = parse_err("[[named]]\nfeature = \"s\"\nusers = [\"a\"]\nhosts = [\"h\"]\n");
        assert_eq!(
            e.to_string(),
            "p.toml:2: named for 's' needs exactly one of users, hosts"
        );
        let e = parse_err(
            "[[named]]\nfeature = \"s\"\nusers = []\n[[named]]\nfeature = \"s\"\nusers = [\"a\"]\n",
        );
        assert_eq!(
            e.to_string(),
            "p.toml:5: named for 's': a second list (the first is on line 2)"
        );
    }
}

#[cfg(test)]
mod packaged {
    use super::*;

    /// The packaged example policy parses and holds one rule of each kind.
    #[test]
    fn packaged_example_policy_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/policy.example.toml");
        let p = Policy::load(&path).unwrap();
        assert_eq!(
            (
                p.reserve.len(),
                p.max.len(),
                p.include.len(),
                p.exclude.len()
            ),
            (1, 1, 1, 1)
        );
        assert_eq!(p.borrow_limit_secs["solver"], 72 * 3600);
        assert!(p.case_insensitive_users);
        assert_eq!(p.timeout_all_secs, Some(600));
        assert_eq!((p.include_borrow.len(), p.exclude_borrow.len()), (1, 1));
        assert_eq!(p.borrow_lowwater["solver"], 1);
        assert_eq!(p.linger_secs["viewer"], 120);
    }
}
