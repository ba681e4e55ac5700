//! The policy file: the customer's own rules on top of what the vendor sold.
//!
//! The semantics are those of FlexLM's options file, so admins recognise them: GROUP and
//! HOST_GROUP name sets of users and hosts; RESERVE keeps seats for a user, group, host or
//! host group; MAX caps a user's or a group's seats; INCLUDE limits a feature to the
//! listed subjects and EXCLUDE keeps subjects out (EXCLUDE wins); TIMEOUT lengthens the
//! lease TTL of a feature (never below the vendor's); BORROW shortens the longest borrow.
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
//! ```

use crate::ConfigError;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
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
}

impl Policy {
    /// Whether `subject` covers the client `user`@`host`.
    pub fn matches(&self, subject: &Subject, user: &str, host: &str) -> bool {
        match subject {
            Subject::User(u) => u == user,
            Subject::Host(h) => h.eq_ignore_ascii_case(host),
            Subject::Group(g) => self
                .groups
                .get(g)
                .is_some_and(|members| members.iter().any(|m| m == user)),
            Subject::HostGroup(g) => self
                .host_groups
                .get(g)
                .is_some_and(|members| members.iter().any(|m| m.eq_ignore_ascii_case(host))),
        }
    }

    /// Every feature a rule names, with the rule's kind (`reserve`, `max`, `include`,
    /// `exclude`, `timeout`, `borrow`), in file order per kind. The policy cannot know
    /// which features exist; the daemon compares these with its bundles, so a misspelt
    /// feature is a warning rather than a rule that silently never applies.
    pub fn named_features(&self) -> Vec<(&'static str, &str)> {
        let mut out = Vec::new();
        for (kind, rules) in [
            ("reserve", &self.reserve),
            ("max", &self.max),
            ("include", &self.include),
            ("exclude", &self.exclude),
        ] {
            out.extend(rules.iter().map(|r| (kind, r.feature.as_str())));
        }
        out.extend(self.timeout_secs.keys().map(|f| ("timeout", f.as_str())));
        out.extend(
            self.borrow_limit_secs
                .keys()
                .map(|f| ("borrow", f.as_str())),
        );
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
        Ok(policy)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
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
        let e = Policy::parse(
            Path::new("p.toml"),
            "[[max]]\nfeature = \"solver\"\nuser = \"a\"\n",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("p.toml:2: max for 'solver' needs seats"),
            "{e}"
        );
        let e = Policy::parse(
            Path::new("p.toml"),
            "[[exclude]]\nfeature = \"s\"\nuser = \"a\"\ngroup = \"g\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("exactly one of"), "{e}");
        let e = Policy::parse(Path::new("p.toml"), "[[reserv]]\nfeature = \"s\"\n").unwrap_err();
        assert!(e.to_string().starts_with("p.toml:1: "), "{e}");
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
    }
}
