//! FlexLM options file → tally policy file (`tallyd import-options`).
//!
//! A site moving off FlexLM brings years of options-file rules; this turns them into a
//! policy file ([`crate::policy`]) to review, rule by rule: every rule written carries
//! the options-file line it came from as a comment, and every line that could not be
//! mapped is returned (and written at the end of the file) with its line number and why.
//! Nothing is dropped without a word, and nothing is widened: a rule tally cannot say
//! exactly (a `feature:VERSION=2.0` qualifier, an IP-address subject) is listed, not
//! turned into a broader one.
//!
//! Read as FlexLM reads it: keywords and subject types without case, `#` comment lines,
//! a trailing `\` continues a line, double quotes group a name with spaces, several GROUP
//! (or HOST_GROUP) lines of one name add up. The text is pure input: the conversion
//! does no IO, so it is tested as a function.

use crate::policy::Policy;
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;

/// Largest options file read: the bound of every configuration file.
pub const MAX_OPTIONS_LEN: u64 = crate::MAX_CONFIG_LEN;

/// An options-file line that has no policy equivalent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmapped {
    /// 1-based line where the (possibly continued) line starts.
    pub line: usize,
    /// The line as read, continuations joined.
    pub text: String,
    /// Why it was not mapped.
    pub reason: String,
}

/// The result of a conversion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    /// The policy file text (TOML with review comments); [`Policy::parse`] accepts it.
    pub policy: String,
    /// How many options-file lines became policy settings.
    pub mapped: usize,
    /// The lines not mapped, in file order.
    pub unmapped: Vec<Unmapped>,
}

/// A file that is not a readable options file; the message names the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct OptionsError {
    /// The file, as named to the converter.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// One logical line: continuations joined, tokens unquoted.
struct Logical {
    line: usize,
    text: String,
    tokens: Vec<String>,
}

/// Converts the bytes of an options file, refusing text that is not UTF-8 (naming the
/// line) or longer than [`MAX_OPTIONS_LEN`].
pub fn convert_bytes(file: &str, bytes: &[u8]) -> Result<Converted, OptionsError> {
    if bytes.len() as u64 > MAX_OPTIONS_LEN {
        return Err(OptionsError {
            file: file.to_string(),
            line: 1,
            message: format!("larger than {MAX_OPTIONS_LEN} bytes, not an options file"),
        });
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => convert(file, text),
        Err(e) => Err(OptionsError {
            file: file.to_string(),
            line: bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1,
            message: "not UTF-8 text: not an options file (convert a Latin-1 file with \
                      iconv -f latin1 -t utf8 first)"
                .to_string(),
        }),
    }
}

/// Converts the text of a FlexLM options file into policy TOML. `file` names it in
/// messages and in the policy's header.
pub fn convert(file: &str, text: &str) -> Result<Converted, OptionsError> {
    let garbled = |line: usize, message: String| OptionsError {
        file: file.to_string(),
        line,
        message,
    };
    if text.len() as u64 > MAX_OPTIONS_LEN {
        return Err(garbled(
            1,
            format!("larger than {MAX_OPTIONS_LEN} bytes, not an options file"),
        ));
    }
    // Windows editors start a UTF-8 file with a byte-order mark; it is not a keyword.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines = logical_lines(text).map_err(|(line, message)| garbled(line, message))?;
    let mut out = Output::default();

    // Groups first: FlexLM lets a rule name a group defined further down.
    for l in &lines {
        let keyword = l.tokens[0].to_ascii_uppercase();
        let groups = match keyword.as_str() {
            "GROUP" => &mut out.groups,
            "HOST_GROUP" => &mut out.host_groups,
            _ => continue,
        };
        let [_, name, members @ ..] = l.tokens.as_slice() else {
            return Err(garbled(
                l.line,
                format!("{keyword} needs a name and members"),
            ));
        };
        if members.is_empty() {
            return Err(garbled(
                l.line,
                format!("{keyword} {name} lists no members"),
            ));
        }
        let group = groups.entry(name.clone()).or_default();
        group.lines.push((l.line, l.text.clone()));
        for m in members {
            // A set beside the list: a 1 MiB file of members stays linear.
            if group.seen.insert(m.clone()) {
                group.members.push(m.clone());
            }
        }
        out.mapped += 1;
    }

    for l in &lines {
        let keyword = l.tokens[0].to_ascii_uppercase();
        let args = &l.tokens[1..];
        let shape = |expected: &str| garbled(l.line, format!("{keyword} takes {expected}"));
        match keyword.as_str() {
            "GROUP" | "HOST_GROUP" => {}
            "GROUPCASEINSENSITIVE" => {
                let on = match args {
                    [v] if v.eq_ignore_ascii_case("on") => true,
                    [v] if v.eq_ignore_ascii_case("off") => false,
                    _ => return Err(shape("ON or OFF")),
                };
                out.top_level(l, "case_insensitive_users", on.to_string());
            }
            "INCLUDE" | "EXCLUDE" | "INCLUDE_BORROW" | "EXCLUDE_BORROW" => {
                let [feature, kind, name] = args else {
                    return Err(shape("FEATURE TYPE NAME"));
                };
                let table = keyword.to_ascii_lowercase();
                out.rule(l, &table, Some(feature), None, (kind, name), "")
                    .map_err(|m| garbled(l.line, m))?;
            }
            "INCLUDEALL" | "EXCLUDEALL" => {
                let [kind, name] = args else {
                    return Err(shape("TYPE NAME"));
                };
                let table = if keyword == "INCLUDEALL" {
                    "include_all"
                } else {
                    "exclude_all"
                };
                out.rule(l, table, None, None, (kind, name), "")
                    .map_err(|m| garbled(l.line, m))?;
            }
            "RESERVE" | "MAX" => {
                let [count, feature, kind, name] = args else {
                    return Err(shape("COUNT FEATURE TYPE NAME"));
                };
                let seats = number(count).ok_or_else(|| {
                    garbled(
                        l.line,
                        format!("{keyword}: '{count}' is not a number of seats"),
                    )
                })?;
                let subject_is_host = ["HOST", "HOST_GROUP"]
                    .iter()
                    .any(|t| kind.eq_ignore_ascii_case(t));
                let lower = keyword.to_ascii_lowercase();
                let table = match (keyword.as_str(), seats) {
                    ("RESERVE", 0) => {
                        out.unmapped(l, "RESERVE 0 reserves nothing");
                        continue;
                    }
                    // MAX 0 lets the subject have no seat at all: an exclude rule.
                    ("MAX", 0) => "exclude",
                    ("MAX", _) if subject_is_host => {
                        out.unmapped(
                            l,
                            "MAX for a host or host group has no tally equivalent yet \
                             (tally's MAX caps users and groups)",
                        );
                        continue;
                    }
                    _ => lower.as_str(),
                };
                let seats = (table != "exclude").then_some(seats);
                let note = if seats.is_none() {
                    "# MAX 0: no seat at all, as an exclude rule\n"
                } else {
                    ""
                };
                out.rule(l, table, Some(feature), seats, (kind, name), note)
                    .map_err(|m| garbled(l.line, m))?;
            }
            "TIMEOUT" | "MAX_BORROW_HOURS" | "BORROW_LOWWATER" | "LINGER" => {
                let [feature, value] = args else {
                    return Err(shape("FEATURE NUMBER"));
                };
                let n = number(value).ok_or_else(|| {
                    garbled(l.line, format!("{keyword}: '{value}' is not a number"))
                })?;
                if let Some(q) = qualifier(feature) {
                    out.unmapped(l, &q);
                    continue;
                }
                let (table, key) = match keyword.as_str() {
                    "TIMEOUT" if n < 10 => {
                        out.unmapped(l, "below tally's 10 s minimum lease TTL");
                        continue;
                    }
                    "TIMEOUT" => ("timeout", "secs"),
                    "MAX_BORROW_HOURS" => ("borrow", "max_hours"),
                    "BORROW_LOWWATER" if n == 0 => {
                        out.unmapped(l, "BORROW_LOWWATER 0 keeps no seat from borrowing");
                        continue;
                    }
                    "BORROW_LOWWATER" => ("borrow_lowwater", "seats"),
                    _ if n == 0 => {
                        out.unmapped(l, "LINGER 0 adds no linger");
                        continue;
                    }
                    _ => ("linger", "secs"),
                };
                let mut body = format!("[[{table}]]\nfeature = {}\n{key} = {n}\n", q(feature));
                if table == "timeout" {
                    body.insert_str(0, TIMEOUT_NOTE);
                }
                out.push_rule(l, body);
            }
            "TIMEOUTALL" => {
                let [value] = args else {
                    return Err(shape("SECONDS"));
                };
                let n = number(value).ok_or_else(|| {
                    garbled(l.line, format!("{keyword}: '{value}' is not a number"))
                })?;
                if n < 10 {
                    out.unmapped(l, "below tally's 10 s minimum lease TTL");
                    continue;
                }
                out.top_level(l, "timeout_all_secs", n.to_string());
            }
            k if LICENSE_KEYWORDS.contains(&k) => {
                return Err(garbled(
                    l.line,
                    format!(
                        "{k} is a license-file line: this is a FlexLM license file, not an \
                         options file (tally-publisher import-flexlm reads those)"
                    ),
                ))
            }
            k => match UNMAPPED_KEYWORDS.iter().find(|(name, _)| *name == k) {
                Some((_, reason)) => out.unmapped(l, reason),
                None => out.unmapped(l, "not an options-file keyword tally knows"),
            },
        }
    }
    let policy = out.render(file);
    // Review comments make the policy longer than its source: tallyd reads no policy over
    // the bound, so say it here rather than at its start.
    if policy.len() as u64 > crate::MAX_CONFIG_LEN {
        return Err(garbled(
            1,
            format!(
                "the converted policy would be {} bytes, more than the {} tallyd reads; \
                 split the options file",
                policy.len(),
                crate::MAX_CONFIG_LEN
            ),
        ));
    }
    // The output is only useful if tallyd takes it: check it as tallyd will.
    if let Err(e) = Policy::parse(Path::new("import-options output"), &policy) {
        return Err(garbled(
            1,
            format!("the converted policy does not parse, a bug in import-options: {e}"),
        ));
    }
    Ok(Converted {
        policy,
        mapped: out.mapped,
        unmapped: out.unmapped,
    })
}

/// Said above every converted TIMEOUT and TIMEOUTALL.
const TIMEOUT_NOTE: &str =
    "# review: FlexLM's TIMEOUT frees a licence its program left idle; tally's \
                            is how long a\n# holder that stopped heartbeating (crashed, cut off) \
                            keeps its seat. A running\n# program is never timed out by tally.\n";

/// Keywords of license files, not options files: such a file is the wrong input.
const LICENSE_KEYWORDS: &[&str] = &[
    "SERVER",
    "VENDOR",
    "DAEMON",
    "FEATURE",
    "INCREMENT",
    "UPGRADE",
    "PACKAGE",
    "USE_SERVER",
];

/// Options-file keywords with no policy equivalent, and why.
const UNMAPPED_KEYWORDS: &[(&str, &str)] = &[
    (
        "NOLOG",
        "tally's log has no per-event switches: its level is RUST_LOG, its file log_file in tallyd.toml",
    ),
    (
        "REPORTLOG",
        "tally's usage reports are signed files in report_dir (tallyd.toml), not a report log",
    ),
    (
        "DEBUGLOG",
        "tally logs to stderr and to log_file in tallyd.toml",
    ),
    (
        "MAX_OVERDRAFT",
        "the overdraft is the vendor's (in the bundle); a site cap on it has no tally equivalent yet",
    ),
    (
        "FQDN_MATCHING",
        "host names are matched as clients send them, without case; there is no FQDN switch",
    ),
    (
        "ACTIVATION_LOWWATER",
        "FlexNet activation has no tally equivalent (tally activates with tallyd request)",
    ),
    (
        "ACTIVATION_EXPIRY_DAYS",
        "FlexNet activation has no tally equivalent (tally activates with tallyd request)",
    ),
    (
        "INCLUDE_ENTITLEMENT",
        "entitlement rules (FlexNet activation) have no tally equivalent",
    ),
    (
        "EXCLUDE_ENTITLEMENT",
        "entitlement rules (FlexNet activation) have no tally equivalent",
    ),
    (
        "INCLUDEALL_ENTITLEMENT",
        "entitlement rules (FlexNet activation) have no tally equivalent",
    ),
    (
        "EXCLUDEALL_ENTITLEMENT",
        "entitlement rules (FlexNet activation) have no tally equivalent",
    ),
];

/// A group as read: its members in first-seen order and every line that added to it.
#[derive(Default)]
struct Group {
    members: Vec<String>,
    seen: HashSet<String>,
    lines: Vec<(usize, String)>,
}

/// The policy being built.
#[derive(Default)]
struct Output {
    /// Top-level settings: (line, source text, key, value).
    top: Vec<(usize, String, &'static str, String)>,
    groups: BTreeMap<String, Group>,
    host_groups: BTreeMap<String, Group>,
    /// Rule tables in file order, each with its source comment.
    rules: Vec<String>,
    mapped: usize,
    unmapped: Vec<Unmapped>,
}

impl Output {
    fn unmapped(&mut self, l: &Logical, reason: &str) {
        self.unmapped.push(Unmapped {
            line: l.line,
            text: l.text.clone(),
            reason: reason.to_string(),
        });
    }

    /// A top-level setting; a later line setting it again wins, as in FlexLM, and the
    /// earlier one is listed.
    fn top_level(&mut self, l: &Logical, key: &'static str, value: String) {
        if let Some(i) = self.top.iter().position(|t| t.2 == key) {
            let (line, text, ..) = self.top.remove(i);
            self.mapped -= 1;
            self.unmapped.push(Unmapped {
                line,
                text,
                reason: format!("line {} sets it again; that one is used", l.line),
            });
        }
        self.top.push((l.line, l.text.clone(), key, value));
        self.mapped += 1;
    }

    fn push_rule(&mut self, l: &Logical, body: String) {
        self.rules
            .push(format!("# line {}: {}\n{body}", l.line, l.text));
        self.mapped += 1;
    }

    /// A rule about one subject: mapped, listed as unmapped, or an error for a type
    /// FlexLM does not have either.
    fn rule(
        &mut self,
        l: &Logical,
        table: &str,
        feature: Option<&String>,
        seats: Option<u32>,
        (kind, name): (&str, &str),
        note: &str,
    ) -> Result<(), String> {
        let key = match kind.to_ascii_uppercase().as_str() {
            "USER" => "user",
            "HOST" => "host",
            "GROUP" if self.groups.contains_key(name) => "group",
            "HOST_GROUP" if self.host_groups.contains_key(name) => "host_group",
            "GROUP" | "HOST_GROUP" => {
                let kind = kind.to_ascii_uppercase();
                self.unmapped(l, &format!("no {kind} {name} in this file"));
                return Ok(());
            }
            "DISPLAY" => {
                self.unmapped(
                    l,
                    "DISPLAY rules have no tally equivalent (rules match user and host names)",
                );
                return Ok(());
            }
            "INTERNET" => {
                self.unmapped(
                    l,
                    "INTERNET (IP address) rules have no tally equivalent: limit which \
                     addresses reach tallyd's UDP port with a firewall",
                );
                return Ok(());
            }
            "PROJECT" => {
                self.unmapped(l, "PROJECT (LM_PROJECT) rules have no tally equivalent");
                return Ok(());
            }
            _ => {
                return Err(format!(
                    "unknown type '{kind}' (USER, HOST, DISPLAY, GROUP, HOST_GROUP, INTERNET \
                     or PROJECT)"
                ))
            }
        };
        if let Some(reason) = feature.and_then(|f| qualifier(f)) {
            self.unmapped(l, &reason);
            return Ok(());
        }
        let mut body = format!("{note}[[{table}]]\n");
        if let Some(f) = feature {
            let _ = writeln!(body, "feature = {}", q(f));
        }
        if let Some(n) = seats {
            let _ = writeln!(body, "seats = {n}");
        }
        let _ = writeln!(body, "{key} = {}", q(name));
        self.push_rule(l, body);
        Ok(())
    }

    fn render(&self, file: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# tally policy converted by `tallyd import-options` from the FlexLM options file\n\
             # {}\n\
             # Review every rule (each names the line it came from), then name this file as\n\
             # `policy` in tallyd.toml and run `tallyd check-config`.\n\
             # {} line(s) mapped, {} not mapped (listed at the end).",
            comment_safe(file),
            self.mapped,
            self.unmapped.len()
        );
        for (line, text, key, value) in &self.top {
            let note = if *key == "timeout_all_secs" {
                TIMEOUT_NOTE
            } else {
                ""
            };
            let _ = write!(s, "\n# line {line}: {text}\n{note}{key} = {value}\n");
        }
        for (title, groups) in [("groups", &self.groups), ("host_groups", &self.host_groups)] {
            if groups.is_empty() {
                continue;
            }
            let _ = write!(s, "\n[{title}]\n");
            for (name, g) in groups {
                for (line, text) in &g.lines {
                    let _ = writeln!(s, "# line {line}: {text}");
                }
                let members: Vec<String> = g.members.iter().map(|m| q(m)).collect();
                let _ = writeln!(s, "{} = [{}]", q(name), members.join(", "));
            }
        }
        for r in &self.rules {
            let _ = write!(s, "\n{r}");
        }
        if !self.unmapped.is_empty() {
            let _ = write!(s, "\n# Not mapped (review by hand):\n");
            for u in &self.unmapped {
                let _ = writeln!(s, "# line {}: {} -- {}", u.line, u.text, u.reason);
            }
        }
        s
    }
}

/// Why a `feature:KEYWORD=value` spec cannot be mapped, if it has a qualifier.
fn qualifier(feature: &str) -> Option<String> {
    let (name, qualifier) = feature.split_once(':')?;
    Some(format!(
        "the qualifier '{qualifier}' (feature:KEYWORD=value) has no tally equivalent; a rule \
         for all of '{name}' would not be the same rule"
    ))
}

/// A count: digits only (FlexLM reads no sign, no unit).
fn number(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// `text` as a TOML basic string.
fn q(text: &str) -> String {
    let mut s = String::with_capacity(text.len() + 2);
    s.push('"');
    for c in text.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(s, "\\u{:04X}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// `text` without the characters a TOML comment may not hold.
fn comment_safe(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
        .collect()
}

/// Splits the text into logical lines: comments and blank lines skipped, continuations
/// joined, tokens split at unquoted white space with quotes removed, a `#` that starts
/// a token ending the line. Errors are (line, message).
fn logical_lines(text: &str) -> Result<Vec<Logical>, (usize, String)> {
    let physical: Vec<&str> = text.lines().collect();
    for (i, l) in physical.iter().enumerate() {
        if let Some(c) = l.chars().find(|c| c.is_control() && *c != '\t') {
            return Err((
                i + 1,
                format!(
                    "control character U+{:04X}: not a text options file",
                    c as u32
                ),
            ));
        }
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < physical.len() {
        let start = i;
        let first = physical[i].trim();
        i += 1;
        if first.is_empty() || first.starts_with('#') {
            continue;
        }
        let mut joined = String::new();
        let mut current = first;
        loop {
            match current.strip_suffix('\\') {
                Some(head) if i < physical.len() => {
                    joined.push_str(head.trim_end());
                    joined.push(' ');
                    current = physical[i].trim();
                    i += 1;
                }
                Some(head) => {
                    joined.push_str(head.trim_end());
                    break;
                }
                None => {
                    joined.push_str(current);
                    break;
                }
            }
        }
        let tokens = tokens(&joined).map_err(|m| (start + 1, m))?;
        if tokens.is_empty() {
            continue;
        }
        out.push(Logical {
            line: start + 1,
            text: joined.trim().to_string(),
            tokens,
        });
    }
    Ok(out)
}

/// White-space separated tokens; `"..."` keeps spaces and is unquoted; an unquoted
/// `#` at the start of a token comments out the rest.
fn tokens(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut in_token = false;
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_token = true;
            }
            '#' if !quoted && !in_token => break,
            c if c.is_whitespace() && !quoted => {
                if in_token {
                    out.push(std::mem::take(&mut current));
                    in_token = false;
                }
            }
            c => {
                current.push(c);
                in_token = true;
            }
        }
    }
    if quoted {
        return Err("a quote (\") is not closed".to_string());
    }
    if in_token {
        out.push(current);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real-shaped options file: comments, continuations, quoting, mixed case, several
    /// GROUP lines of one group, a rule before its group, RESERVE for a HOST_GROUP, MAX
    /// for a GROUP, the borrow rules, TIMEOUTALL, and lines tally cannot say.
    pub(crate) const SAMPLE: &str = r#"# Options for the CFD department
# maintained by IT, ticket 4711

GROUPCASEINSENSITIVE OFF
TIMEOUTALL 3600
GroupCaseInsensitive on
reserve 2 solver host_group render_farm
GROUP cfd ana bo
GROUP cfd cy \
      dee
group   interns  eve
HOST_GROUP render_farm rf-01 rf-02
MAX 1 solver GROUP interns
INCLUDE "mesher" USER ana   # the mesher pilot
EXCLUDE solver USER mallory
INCLUDE_BORROW solver GROUP cfd
EXCLUDE_BORROW solver USER bo
INCLUDEALL GROUP cfd
INCLUDEALL GROUP interns
EXCLUDEALL HOST kiosk
MAX_BORROW_HOURS solver 72
BORROW_LOWWATER solver 1
LINGER viewer 120
TIMEOUT solver 7200
INCLUDE solver INTERNET 10.1.2.*
RESERVE 1 solver:VERSION=2.0 USER ana
MAX 0 viewer USER guest
MAX 2 viewer HOST ws-9
NOLOG IN
REPORTLOG +/var/log/lmgrd/report.log
"#;

    #[test]
    fn a_real_shaped_options_file_converts_and_lists_what_it_cannot_say() {
        let c = convert("cfd.opt", SAMPLE).unwrap();
        let p = Policy::parse(Path::new("out.toml"), &c.policy).unwrap_or_else(|e| {
            panic!("{e}\n{}", c.policy);
        });
        assert!(p.case_insensitive_users);
        assert_eq!(p.timeout_all_secs, Some(3600));
        assert_eq!(p.groups["cfd"], ["ana", "bo", "cy", "dee"]);
        assert_eq!(p.groups["interns"], ["eve"]);
        assert_eq!(p.host_groups["render_farm"], ["rf-01", "rf-02"]);
        use crate::policy::{Rule, Subject};
        let rule = |f: &str, s: Subject, seats| Rule {
            feature: f.into(),
            subject: s,
            seats,
        };
        assert_eq!(
            p.reserve,
            [rule("solver", Subject::HostGroup("render_farm".into()), 2)]
        );
        assert_eq!(p.max, [rule("solver", Subject::Group("interns".into()), 1)]);
        assert_eq!(p.include, [rule("mesher", Subject::User("ana".into()), 0)]);
        assert_eq!(
            p.exclude,
            [
                rule("solver", Subject::User("mallory".into()), 0),
                rule("viewer", Subject::User("guest".into()), 0)
            ]
        );
        assert_eq!(
            p.include_borrow,
            [rule("solver", Subject::Group("cfd".into()), 0)]
        );
        assert_eq!(
            p.exclude_borrow,
            [rule("solver", Subject::User("bo".into()), 0)]
        );
        assert_eq!(
            p.include_all,
            [
                Subject::Group("cfd".into()),
                Subject::Group("interns".into())
            ]
        );
        assert_eq!(p.exclude_all, [Subject::Host("kiosk".into())]);
        assert_eq!(p.borrow_limit_secs["solver"], 72 * 3600);
        assert_eq!(p.borrow_lowwater["solver"], 1);
        assert_eq!(p.linger_secs["viewer"], 120);
        assert_eq!(p.timeout_secs["solver"], 7200);

        let listed: Vec<(usize, &str)> = c
            .unmapped
            .iter()
            .map(|u| (u.line, u.text.as_str()))
            .collect();
        assert_eq!(
            listed,
            [
                (4, "GROUPCASEINSENSITIVE OFF"),
                (25, "INCLUDE solver INTERNET 10.1.2.*"),
                (26, "RESERVE 1 solver:VERSION=2.0 USER ana"),
                (28, "MAX 2 viewer HOST ws-9"),
                (29, "NOLOG IN"),
                (30, "REPORTLOG +/var/log/lmgrd/report.log"),
            ]
        );
        assert_eq!(
            c.unmapped[0].reason,
            "line 6 sets it again; that one is used"
        );
        assert!(c.unmapped[1].reason.contains("INTERNET"));
        assert!(c.unmapped[2].reason.contains("'VERSION=2.0'"));
        assert!(c.unmapped[5].reason.contains("report_dir"));
        // 26 rule lines in all: 20 mapped (5 group lines among them), 6 listed.
        assert_eq!(c.mapped, 20);
        // Each rule names its source line; the continued GROUP line by its first line.
        assert!(c
            .policy
            .contains("# line 7: reserve 2 solver host_group render_farm\n[[reserve]]"));
        assert!(c.policy.contains("# line 9: GROUP cfd cy dee\n"));
        assert!(c
            .policy
            .contains("# line 27: MAX 0 viewer USER guest\n# MAX 0: no seat"));
        assert!(c
            .policy
            .contains("# line 25: INCLUDE solver INTERNET 10.1.2.* -- INTERNET"));
    }

    #[test]
    fn garbled_files_name_the_line() {
        let e = |text: &str| convert("o.opt", text).unwrap_err().to_string();
        assert_eq!(
            e("# ok\nINCLUDE \"solver USER ana\n"),
            "o.opt:2: a quote (\") is not closed"
        );
        assert_eq!(
            e("\n\nRESERVE two solver USER ana\n"),
            "o.opt:3: RESERVE: 'two' is not a number of seats"
        );
        assert_eq!(
            e("INCLUDE solver USER\n"),
            "o.opt:1: INCLUDE takes FEATURE TYPE NAME"
        );
        assert!(e("EXCLUDE solver PERSON ana\n").starts_with("o.opt:1: unknown type 'PERSON'"));
        assert!(e("GROUP cfd\n").starts_with("o.opt:1: GROUP cfd lists no members"));
        assert!(e("SERVER lic1 0123456789ab 27000\nVENDOR acme\n")
            .starts_with("o.opt:1: SERVER is a license-file line"));
        assert!(e("GROUP a b\n\u{0}\u{1}ELF\n").starts_with("o.opt:2: control character"));
        let bytes = b"GROUP a b\nGROUP c d\xe9\n";
        assert!(convert_bytes("o.opt", bytes)
            .unwrap_err()
            .to_string()
            .starts_with("o.opt:2: not UTF-8"));
        let big = "#".repeat(MAX_OPTIONS_LEN as usize + 1);
        assert!(convert_bytes("o.opt", big.as_bytes()).is_err());
    }

    #[test]
    fn a_file_at_the_size_bound_converts_quickly_or_is_refused_by_name() {
        // One group of ~100,000 members (1 MiB): linear, and within tallyd's bound.
        let mut text = String::from("GROUP big");
        let mut i = 0;
        while text.len() < MAX_OPTIONS_LEN as usize - 16 {
            let _ = write!(text, " u{i}");
            i += 1;
        }
        let start = std::time::Instant::now();
        let result = convert("big.opt", &text);
        assert!(start.elapsed() < std::time::Duration::from_secs(20));
        // The members fill the bound: with the header, the policy is over it.
        let e = result.unwrap_err().to_string();
        assert!(e.contains("more than the 1048576 tallyd reads"), "{e}");
        // Rules by the thousand: each line with its comment, still under the bound.
        let rules: String = (0..5_000)
            .map(|i| format!("EXCLUDE f{i} USER u{i}\n"))
            .collect();
        let c = convert("many.opt", &rules).unwrap();
        assert_eq!((c.mapped, c.unmapped.len()), (5_000, 0));
    }

    #[test]
    fn names_that_need_quoting_survive_and_unknown_groups_are_listed() {
        let text =
            "GROUP \"Team A\" \"Ana Lima\" back\\slash 'q'\nINCLUDE solver GROUP \"Team A\"\n\
                    EXCLUDE solver GROUP nobody\nFOO bar\n";
        let c = convert("o.opt", text).unwrap();
        let p = Policy::parse(Path::new("out.toml"), &c.policy).unwrap();
        assert_eq!(p.groups["Team A"], ["Ana Lima", "back\\slash", "'q'"]);
        assert_eq!(
            p.include[0].subject,
            crate::policy::Subject::Group("Team A".into())
        );
        assert_eq!(
            c.unmapped.iter().map(|u| u.line).collect::<Vec<_>>(),
            [3, 4]
        );
        assert!(c.unmapped[0].reason.contains("no GROUP nobody"));
        // A byte-order mark and CRLF line ends, as Windows editors write them.
        let c = convert(
            "o.opt",
            "\u{feff}EXCLUDE solver USER bo\r\nINCLUDE viewer HOST ws\r\n",
        )
        .unwrap();
        assert_eq!((c.mapped, c.unmapped.len()), (2, 0), "{:?}", c.unmapped);
        // An empty file is an empty policy.
        let c = convert("o.opt", "# nothing\n\n").unwrap();
        assert_eq!(
            Policy::parse(Path::new("x"), &c.policy).unwrap(),
            Policy::default()
        );
    }
}
