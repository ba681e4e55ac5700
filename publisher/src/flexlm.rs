//! Import of FlexLM (FlexNet Publisher) license files into a bundle spec.
//!
//! The path for a vendor moving a product line off FlexLM: the license files already at
//! customer sites say what each customer bought. This reads them (SERVER, VENDOR/DAEMON,
//! USE_SERVER, FEATURE, INCREMENT, UPGRADE, PACKAGE lines, backslash continuations,
//! quoted attributes, `permanent`, `uncounted`, dates like `1-jan-2027`, comments) and
//! writes a spec for the vendor to review and sign. Whatever has no tally equivalent is
//! listed as a comment with its line number, never dropped silently.
//!
//! Keywords keep FlexLM's meaning: `LINGER=n` is `linger_secs`; `SUPERSEDE[="f1 f2"]`
//! drops the lines of the same (or the listed) features issued before this line's
//! `ISSUED=` date (else its `START=` date), as FlexLM's license server does; bare
//! keywords (`TS_OK`, `FLOAT_OK`, `USER_BASED`, ...) are keywords, not license keys.
//! `DUP_GROUP=U/H/D` and their combinations are `share`, `SITE` is `share = "site"` (`V`
//! is listed, `NONE` shares nothing); a PACKAGE's `COMPONENTS` keep each component's version and
//! count (`solver:2024.06:2`) and `OPTIONS=SUITE` is `suite = true`.
//!
//! The reading of lines (continuations, quoting), dates, the review comments and the
//! SUPERSEDE rule are shared with the RLM importer (`rlm.rs`).
//! Lines already expired are flagged, and a file with three SERVER lines is named as a
//! three-server redundant site, with what tally offers instead.

use crate::spec::toml_string;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Largest license file read.
pub const MAX_LICENSE_FILE: usize = 4 * 1024 * 1024;

/// Why a license file could not be imported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ImportError {
    /// 1-based line of the problem.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// The result of an import.
#[derive(Debug, Clone)]
pub struct Import {
    /// The spec, as TOML with review comments.
    pub spec: String,
    /// Feature entries written.
    pub features: usize,
    /// Things that were not mapped (every dropped keyword among them), one line each
    /// (also in the spec as comments).
    pub unmapped: Vec<String>,
    /// Keywords mapped to a tally key whose meaning differs in part, one line each saying
    /// what differs (also in the spec, above the feature).
    pub approximated: Vec<String>,
    /// Lines left out because a later line's `SUPERSEDE` replaces them, one line each
    /// naming both lines.
    pub superseded: Vec<String>,
    /// Lines whose expiry date is already past (written to the spec, flagged there too).
    pub expired: Vec<String>,
    /// Notes about the site as a whole (a three-server redundant site and what tally
    /// offers instead).
    pub site: Vec<String>,
}

/// One feature entry of the spec being built (shared with the RLM importer).
#[derive(Debug, Default)]
pub(crate) struct Entry {
    pub(crate) origin: String,
    /// The line it comes from.
    pub(crate) line: usize,
    pub(crate) name: String,
    /// `None` is uncounted (or, with `token`, no `seats` key at all).
    pub(crate) seats: Option<u32>,
    pub(crate) version_ceiling: Option<String>,
    pub(crate) upgrade_from: Option<String>,
    pub(crate) starts: Option<String>,
    pub(crate) expires: Option<String>,
    pub(crate) overdraft: u32,
    pub(crate) borrow_limit_hours: u64,
    pub(crate) linger_secs: u64,
    /// `share`: the holder fields (`user`, `host`, `display`, joined by `+`) on which
    /// checkouts share a seat.
    pub(crate) share: Option<String>,
    /// `share_limit`: most processes on one shared seat.
    pub(crate) share_limit: Option<u32>,
    /// `suite = true`: one seat of the package serves all its components for one user.
    pub(crate) suite: bool,
    /// `token_pool` and `tokens`: the seats of this product are tokens of that pool.
    pub(crate) token: Option<(String, u32)>,
    /// `named` (`user` or `host`) and `named_limit`: licensed to named users or hosts.
    pub(crate) named: Option<(&'static str, Option<u32>)>,
    /// `remote_sessions` as written (`allow` / `deny`).
    pub(crate) remote_sessions: Option<&'static str>,
    /// `virtual_machines` as written (`allow` / `deny`).
    pub(crate) virtual_machines: Option<&'static str>,
    /// `ISSUED=` as `YYYY-MM-DD`, when it reads as a date.
    pub(crate) issued: Option<String>,
    /// `SUPERSEDE` on this line: `Some(empty)` for the line's own feature, else the
    /// features named in `SUPERSEDE="f1 f2"`.
    pub(crate) supersede: Option<Vec<String>>,
    /// `name[:version[:count]]`, as FlexLM's COMPONENTS writes them.
    pub(crate) components: Vec<String>,
    pub(crate) attributes: BTreeMap<String, String>,
    /// Set when the line is already expired: the review note.
    pub(crate) expired: Option<String>,
    /// Review comments written above the entry's keys (a mapping that differs in part).
    pub(crate) notes: Vec<String>,
}

impl Entry {
    /// The date FlexLM orders lines by for `SUPERSEDE`: `ISSUED=`, else `START=`.
    pub(crate) fn issue_date(&self) -> Option<&str> {
        self.issued.as_deref().or(self.starts.as_deref())
    }
}

/// Keywords FlexLM allows without `=value` on FEATURE/INCREMENT/UPGRADE lines: a bare word
/// after the count that is one of these is that keyword, not an old-style license key.
const BARE_KEYWORDS: [&str; 9] = [
    "SUPERSEDE",
    "TS_OK",
    "ONE_TS_OK",
    "FLOAT_OK",
    "BORROW",
    "USER_BASED",
    "HOST_BASED",
    "CAPACITY",
    "MINIMUM",
];

/// A logical line: continuations joined, with the line number it starts on.
pub(crate) struct Logical {
    pub(crate) line: usize,
    pub(crate) text: String,
}

/// Joins backslash continuations; `#` lines outside a continuation are comments.
pub(crate) fn logical_lines(text: &str) -> Vec<Logical> {
    let mut out = Vec::new();
    let mut current: Option<Logical> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_end_matches('\r');
        let trimmed = line.trim();
        if current.is_none() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        let (body, continues) = match trimmed.strip_suffix('\\') {
            Some(b) => (b, true),
            None => (trimmed, false),
        };
        let entry = current.get_or_insert_with(|| Logical {
            line: i + 1,
            text: String::new(),
        });
        if !entry.text.is_empty() {
            entry.text.push(' ');
        }
        entry.text.push_str(body.trim());
        if !continues {
            out.extend(current.take());
        }
    }
    out.extend(current);
    out
}

/// A token: a bare word, or `KEY=VALUE` with the value unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Token {
    Word(String),
    Pair(String, String),
}

/// Splits a logical line into words and `KEY=VALUE` pairs; a quoted value keeps its
/// spaces.
pub(crate) fn tokenize(text: &str, line: usize) -> Result<Vec<Token>, ImportError> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(tokens);
        }
        let mut word = String::new();
        let mut value: Option<String> = None;
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                break;
            }
            chars.next();
            if value.is_none() && c == '=' {
                value = Some(String::new());
                continue;
            }
            match (&mut value, c) {
                (Some(v), '"') if v.is_empty() => {
                    // A quoted value runs to the closing quote, spaces included.
                    let mut closed = false;
                    for q in chars.by_ref() {
                        if q == '"' {
                            closed = true;
                            break;
                        }
                        v.push(q);
                    }
                    if !closed {
                        return Err(ImportError {
                            line,
                            message: "unterminated quoted value".into(),
                        });
                    }
                }
                (Some(v), c) => v.push(c),
                (None, '"') => {
                    for q in chars.by_ref() {
                        if q == '"' {
                            break;
                        }
                        word.push(q);
                    }
                }
                (None, c) => word.push(c),
            }
        }
        tokens.push(match value {
            Some(v) => Token::Pair(word, v),
            None => Token::Word(word),
        });
    }
}

/// Why a FlexLM date did not parse; the text quotes the date as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DateError {
    /// Not three parts separated by `-`.
    #[error("'{0}' is not a date like 31-dec-2027")]
    Shape(String),
    /// The year is not a number.
    #[error("'{0}': year is not a number")]
    Year(String),
    /// The month is not one of `jan`..`dec`.
    #[error("'{0}': unknown month")]
    Month(String),
    /// The day is not a number.
    #[error("'{0}': day is not a number")]
    Day(String),
    /// No such day in the calendar (31-feb).
    #[error("'{0}' is not a calendar date")]
    NotInCalendar(String),
}

/// Parses a FlexLM date (`31-dec-2027`, `1-jan-0`, `permanent`) into `YYYY-MM-DD`, or
/// `None` for permanent.
pub fn parse_date(text: &str) -> Result<Option<String>, DateError> {
    let lower = text.to_ascii_lowercase();
    if lower == "permanent" {
        return Ok(None);
    }
    let parts: Vec<&str> = lower.split('-').collect();
    let [day, month, year] = parts.as_slice() else {
        return Err(DateError::Shape(text.to_string()));
    };
    let year: u32 = year
        .parse()
        .map_err(|_| DateError::Year(text.to_string()))?;
    if year == 0 {
        return Ok(None);
    }
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    let month = MONTHS
        .iter()
        .position(|m| *m == *month)
        .ok_or_else(|| DateError::Month(text.to_string()))?
        + 1;
    let day: u32 = day.parse().map_err(|_| DateError::Day(text.to_string()))?;
    let date = format!("{year:04}-{month:02}-{day:02}");
    tally_protocol::time::UnixTime::from_date(&date)
        .map(|_| Some(date))
        .ok_or_else(|| DateError::NotInCalendar(text.to_string()))
}

pub(crate) fn seats(text: &str, line: usize) -> Result<Option<u32>, ImportError> {
    if text.eq_ignore_ascii_case("uncounted") || text == "0" {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| ImportError {
        line,
        message: format!("'{text}' is not a license count"),
    })
}

/// Imports a license file; `source` names it in the output. Lines are judged expired
/// against today's date (the system clock).
pub fn import(source: &str, text: &str) -> Result<Import, ImportError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    import_at(source, text, tally_protocol::time::UnixTime(now))
}

/// Refuses a text larger than any license file.
pub(crate) fn check_size(text: &str) -> Result<(), ImportError> {
    if text.len() > MAX_LICENSE_FILE {
        return Err(ImportError {
            line: 1,
            message: format!("larger than {MAX_LICENSE_FILE} bytes, not a license file"),
        });
    }
    Ok(())
}

/// The bare words a line starts with (its keyword and positional fields), up to the
/// first `key=value`.
pub(crate) fn leading_words(tokens: &[Token]) -> Vec<&str> {
    tokens
        .iter()
        .map_while(|t| match t {
            Token::Word(w) => Some(w.as_str()),
            Token::Pair(..) => None,
        })
        .collect()
}

/// [`import`] with today given: a line whose last valid day is before `today`'s date is
/// flagged as expired.
pub fn import_at(
    source: &str,
    text: &str,
    today: tally_protocol::time::UnixTime,
) -> Result<Import, ImportError> {
    check_size(text)?;
    let mut header: Vec<String> = Vec::new();
    let mut unmapped: Vec<String> = Vec::new();
    let mut vendor: Option<String> = None;
    let mut entries: Vec<Entry> = Vec::new();
    let mut packages: Vec<Package> = Vec::new();
    let mut servers: Vec<(usize, String)> = Vec::new();
    for logical in logical_lines(text) {
        let line = logical.line;
        let tokens = tokenize(&logical.text, line)?;
        let words = leading_words(&tokens);
        let pairs: Vec<(&str, &str)> = tokens
            .iter()
            .filter_map(|t| match t {
                Token::Pair(k, v) => Some((k.as_str(), v.as_str())),
                Token::Word(_) => None,
            })
            .collect();
        let Some(keyword) = words.first().map(|w| w.to_ascii_uppercase()) else {
            unmapped.push(format!("line {line}: unreadable line '{}'", logical.text));
            continue;
        };
        let need = |n: usize, form: &str| -> Result<(), ImportError> {
            if words.len() < n {
                Err(ImportError {
                    line,
                    message: format!("{keyword} needs the form: {form}"),
                })
            } else {
                Ok(())
            }
        };
        match keyword.as_str() {
            "SERVER" => {
                servers.push((line, words.get(1).unwrap_or(&"").to_string()));
                header.push(format!(
                    "line {line}: {} -> the server is bound by its activation request, not a host id",
                    logical.text
                ))
            }
            "VENDOR" | "DAEMON" => {
                need(2, "VENDOR name [path] [options] [port]")?;
                vendor.get_or_insert_with(|| words[1].to_string());
                header.push(format!(
                    "line {line}: {} -> vendor daemon '{}'; tally needs no vendor daemon",
                    logical.text, words[1]
                ));
            }
            "USE_SERVER" => header.push(format!(
                "line {line}: USE_SERVER -> clients are given the server address instead"
            )),
            "FEATURE" | "INCREMENT" | "UPGRADE" => {
                let upgrade = keyword == "UPGRADE";
                // `n` counts the words of the form, keyword included: the count is the
                // last of them, so a line without it is refused, not read past its end.
                let (form, n) = if upgrade {
                    (
                        "UPGRADE name vendor from_version to_version exp_date count",
                        7,
                    )
                } else {
                    ("FEATURE name vendor version exp_date count", 6)
                };
                need(n, form)?;
                let mut e = Entry {
                    origin: format!("line {line}: {}", words[..n].join(" ")),
                    line,
                    name: words[1].to_string(),
                    ..Entry::default()
                };
                vendor.get_or_insert_with(|| words[2].to_string());
                let mut i = 3;
                if upgrade {
                    e.upgrade_from = Some(words[3].to_string());
                    i = 4;
                }
                e.version_ceiling = Some(words[i].to_string());
                e.expires = parse_date(words[i + 1]).map_err(|e| ImportError {
                    line,
                    message: e.to_string(),
                })?;
                e.seats = seats(words[i + 2], line)?;
                if upgrade && e.seats.is_none() {
                    return Err(ImportError {
                        line,
                        message: "an UPGRADE must move a number of seats".into(),
                    });
                }
                // Everything after the form, in order: `KEY=VALUE` pairs, bare keywords
                // (`SUPERSEDE`, `TS_OK`, ...) wherever they stand, and an old-style
                // license key right after the count.
                for (k, token) in tokens[n..].iter().enumerate() {
                    match token {
                        Token::Pair(key, value) => {
                            map_pair(&mut e, &keyword, key, Some(value), line, &mut unmapped)?
                        }
                        Token::Word(w) if BARE_KEYWORDS.contains(&w.to_ascii_uppercase().as_str()) => {
                            map_pair(&mut e, &keyword, w, None, line, &mut unmapped)?
                        }
                        Token::Word(w) if k == 0 || w.chars().all(|c| c.is_ascii_hexdigit()) => unmapped.push(format!(
                            "line {line}: {keyword} {}: '{w}' (an old-style license key; the tally bundle is signed instead)",
                            e.name
                        )),
                        Token::Word(w) => unmapped.push(format!(
                            "line {line}: {keyword} {}: '{w}' is not a FlexLM keyword tally knows; dropped",
                            e.name
                        )),
                    }
                }
                e.expired = expired_note(&e, &keyword, today);
                if keyword == "FEATURE"
                    && e.supersede.is_none()
                    && entries
                        .iter()
                        .any(|x| x.name == e.name && x.upgrade_from.is_none())
                {
                    unmapped.push(format!(
                        "line {line}: a second FEATURE line for '{}': FlexLM serves one of them, tally adds both; review",
                        e.name
                    ));
                }
                entries.push(e);
            }
            "PACKAGE" => {
                need(2, "PACKAGE name vendor [version] COMPONENTS=\"...\"")?;
                let mut components = Vec::new();
                let mut suite = false;
                let mut notes = Vec::new();
                for (key, value) in &pairs {
                    match key.to_ascii_uppercase().as_str() {
                        "COMPONENTS" => {
                            for c in value.split_whitespace() {
                                components.push(component(c).map_err(|message| ImportError {
                                    line,
                                    message: format!("PACKAGE {}: {message}", words[1]),
                                })?);
                            }
                        }
                        "OPTIONS" if value.eq_ignore_ascii_case("SUITE") => suite = true,
                        "SIGN" | "SIGN2" | "CK" => notes.push(format!(
                            "line {line}: PACKAGE {}: {key} (a FlexLM signature; the tally bundle carries the vendor's signature instead)",
                            words[1]
                        )),
                        _ => notes.push(format!(
                            "line {line}: PACKAGE {}: {key}={value} has no tally equivalent",
                            words[1]
                        )),
                    }
                }
                if suite {
                    // FlexLM allows a count only outside a suite: one suite seat serves
                    // each component once.
                    for c in &mut components {
                        if let [name, version, count] = c.splitn(3, ':').collect::<Vec<_>>()[..] {
                            notes.push(format!(
                                "line {line}: PACKAGE {}: component '{c}' of a suite carries a count ({count}), which FlexLM allows only outside a suite; written without it",
                                words[1]
                            ));
                            *c = format!("{name}:{version}");
                        }
                    }
                }
                packages.push((line, words[1].to_string(), components, suite, notes));
            }
            _ => unmapped.push(format!(
                "line {line}: '{}' lines are not understood: {}",
                words[0], logical.text
            )),
        }
    }
    for (line, name, components, suite, notes) in packages {
        unmapped.extend(notes);
        let mut found = false;
        for e in entries.iter_mut().filter(|e| e.name == name) {
            e.components = components.clone();
            e.suite = suite;
            found = true;
            if suite && e.share.take().is_some() {
                // FlexLM's enabling line of a suite usually carries DUP_GROUP; a tally
                // suite already shares its seat among one user's checkouts.
                e.share_limit = None;
                unmapped.push(format!(
                    "line {}: {name}: DUP_GROUP on a suite's seats; a tally suite shares each seat among one user's checkouts of its components, so no other share is written",
                    e.line
                ));
            }
        }
        if !found {
            unmapped.push(format!(
                "line {line}: PACKAGE {name} has no FEATURE/INCREMENT line giving it seats; nothing imported for it"
            ));
        }
    }
    if entries.is_empty() {
        return Err(ImportError {
            line: 1,
            message: "no FEATURE, INCREMENT or UPGRADE line: nothing to import".into(),
        });
    }
    let (entries, superseded) = apply_supersede(entries, &mut unmapped, &FLEXLM_SUPERSEDE);
    let expired: Vec<String> = entries.iter().filter_map(|e| e.expired.clone()).collect();
    let site = site_notes(&servers);
    Ok(Import {
        spec: render(
            source,
            vendor.as_deref().unwrap_or(""),
            &Review {
                command: "import-flexlm",
                superseded_title: "Left out, superseded (FlexLM's SUPERSEDE):",
                header: &header,
                site: &site,
                unmapped: &unmapped,
                approximated: &[],
                superseded: &superseded,
                expired: &expired,
                customer_name: None,
            },
            &entries,
        ),
        features: entries.len(),
        unmapped,
        approximated: Vec::new(),
        superseded,
        expired,
        site,
    })
}

/// How a license format names its "this line replaces older lines" keyword, for
/// [`apply_supersede`]'s notes, and which date orders the lines.
pub(crate) struct Supersede {
    /// The keyword as the format writes it (`SUPERSEDE`, `replace`).
    pub(crate) keyword: &'static str,
    /// What a line left out is (`superseded`, `replaced`).
    pub(crate) done: &'static str,
    /// The date keywords the order is taken from (`ISSUED= or START=`, `issued=`).
    pub(crate) dates: &'static str,
    /// The date a line is ordered by (`YYYY-MM-DD`).
    pub(crate) date_of: fn(&Entry) -> Option<&str>,
}

/// FlexLM's: ordered by `ISSUED=`, else `START=`.
pub(crate) const FLEXLM_SUPERSEDE: Supersede = Supersede {
    keyword: "SUPERSEDE",
    done: "superseded",
    dates: "ISSUED= or START=",
    date_of: Entry::issue_date,
};

/// FlexLM's `SUPERSEDE`: a line with it replaces every line of the same feature (or of
/// the features `SUPERSEDE="f1 f2"` names) issued before its own `ISSUED=` date (else its
/// `START=` date). Lines issued on the same date are pooled, not superseded; a line with
/// neither date counts as issued before any dated one. Returns the entries kept and one
/// note per line left out. `words` names the keyword and the date (RLM's `replace`
/// works the same way on `issued=`).
pub(crate) fn apply_supersede(
    entries: Vec<Entry>,
    unmapped: &mut Vec<String>,
    words: &Supersede,
) -> (Vec<Entry>, Vec<String>) {
    // Per feature, the latest SUPERSEDE naming it (date, line): a line of that feature
    // issued before it is left out. One pass each way, so a file of many thousands of
    // SUPERSEDE lines costs no more than its length.
    let date_of = words.date_of;
    let mut latest: BTreeMap<String, (String, usize)> = BTreeMap::new();
    for s in &entries {
        let Some(names) = &s.supersede else {
            continue;
        };
        let Some(date) = date_of(s) else {
            unmapped.push(format!(
                "line {}: {}: {} without {} {} nothing (the date is needed); review",
                s.line,
                s.name,
                words.keyword,
                words.dates,
                if words.keyword == "SUPERSEDE" {
                    "supersedes"
                } else {
                    "replaces"
                }
            ));
            continue;
        };
        let targets: Vec<&str> = if names.is_empty() {
            vec![s.name.as_str()]
        } else {
            names.iter().map(String::as_str).collect()
        };
        for target in targets {
            // Dates are `YYYY-MM-DD`, so text order is date order.
            let slot = latest
                .entry(target.to_string())
                .or_insert((date.to_string(), s.line));
            if date > slot.0.as_str() {
                *slot = (date.to_string(), s.line);
            }
        }
    }
    let mut notes = Vec::new();
    let mut kept = Vec::new();
    for e in entries {
        let by = latest.get(e.name.as_str()).filter(|(date, line)| {
            *line != e.line && date_of(&e).is_none_or(|d| d < date.as_str())
        });
        match by {
            Some((date, line)) => notes.push(format!(
                "line {}: {} {} left out: {} by line {line} ({}, issued {date}; this line {})",
                e.line,
                e.origin.split_whitespace().nth(2).unwrap_or("FEATURE"),
                e.name,
                words.done,
                words.keyword,
                match date_of(&e) {
                    Some(d) => format!("issued {d}"),
                    None => format!("has no {} date", words.dates),
                }
            )),
            None => kept.push(e),
        }
    }
    (kept, notes)
}

/// What the SERVER lines say about the site: FlexLM serves from one server or from a
/// redundant triad (two of three must be up); tally's equivalent is a three-server
/// cluster (one bundle binding the three, seats counted once).
fn site_notes(servers: &[(usize, String)]) -> Vec<String> {
    let hosts: Vec<String> = servers
        .iter()
        .map(|(line, host)| format!("{host} (line {line})"))
        .collect();
    match servers.len() {
        0 | 1 => Vec::new(),
        3 => vec![format!(
            "three SERVER lines: a three-server redundant site ({}; FlexLM serves while two of the three are up). \
             tally's equivalent is a three-server cluster: run tallyd on each server ([[cluster]] in tallyd.toml), \
             issue one bundle with the three activation requests (issue --request a.req --request b.req --request c.req; \
             the seats counted once for the site) and give clients all three (TALLY_SERVER=a,b,c): it serves while \
             two of the three are up",
            hosts.join(", ")
        )],
        n => vec![format!(
            "{n} SERVER lines ({}): FlexLM serves from one server or a redundant three; review. tally serves a \
             site from one server or a cluster of an odd number of servers (one bundle binding them all)",
            hosts.join(", ")
        )],
    }
}

/// The review note of a line whose last valid day (`expires`) is before `today`.
pub(crate) fn expired_note(
    e: &Entry,
    keyword: &str,
    today: tally_protocol::time::UnixTime,
) -> Option<String> {
    let last_day = e.expires.as_deref()?;
    let end = tally_protocol::time::UnixTime::from_date(last_day)
        .map(|t| t.plus_secs(tally_protocol::time::DAY))?;
    (end <= today).then(|| {
        format!(
            "line {}: {keyword} {} expired on {last_day} (today is {}): a bundle with it serves no seats of it",
            e.line,
            e.name,
            today.date()
        )
    })
}

/// A PACKAGE line: its line, name, components, `OPTIONS=SUITE`, and review notes.
type Package = (usize, String, Vec<String>, bool, Vec<String>);

/// One component of FlexLM's `COMPONENTS="..."`: `name[:version[:count]]`, checked and
/// kept as written (the version is the component's own ceiling, the count the seats
/// per package seat; left out, they come from the FEATURE line enabling the package).
pub(crate) fn component(text: &str) -> Result<String, String> {
    let parts: Vec<&str> = text.split(':').collect();
    let bad = || format!("component '{text}' is not name[:version[:count]]");
    match parts[..] {
        [name] if !name.is_empty() => Ok(text.to_string()),
        [name, version] if !name.is_empty() && !version.is_empty() => Ok(text.to_string()),
        [name, version, count] if !name.is_empty() && !version.is_empty() => {
            match count.parse::<u32>() {
                Ok(n) if n > 0 => Ok(text.to_string()),
                _ => Err(format!(
                    "component '{text}': count '{count}' is not a number of seats above 0"
                )),
            }
        }
        _ => Err(bad()),
    }
}

/// Maps one keyword of a FEATURE/INCREMENT/UPGRADE line (`value` is `None` for a bare
/// keyword) into the entry, or names it in `unmapped` with why it is dropped.
fn map_pair(
    e: &mut Entry,
    keyword: &str,
    key: &str,
    value: Option<&str>,
    line: usize,
    unmapped: &mut Vec<String>,
) -> Result<(), ImportError> {
    let upper = key.to_ascii_uppercase();
    let shown = match value {
        Some(v) => format!("{key}={v}"),
        None => key.to_string(),
    };
    let value = value.unwrap_or("");
    let name = e.name.clone();
    let mut note = |shown: &str, why: &str| {
        unmapped.push(format!("line {line}: {keyword} {name}: {shown} ({why})"));
    };
    let mut drop = |why: &str| note(&shown, why);
    let attribute = |e: &mut Entry, name: &str| {
        e.attributes.insert(name.to_string(), value.to_string());
    };
    match upper.as_str() {
        "VENDOR_STRING" => attribute(e, "vendor_string"),
        "ISSUER" => attribute(e, "issuer"),
        "NOTICE" => attribute(e, "notice"),
        "ISSUED" => {
            attribute(e, "issued");
            e.issued = parse_date(value).ok().flatten();
        }
        "SN" => attribute(e, "serial_number"),
        "ASSET_INFO" => attribute(e, "asset_info"),
        "DIST_INFO" => attribute(e, "dist_info"),
        "USER_INFO" => attribute(e, "user_info"),
        "VENDOR_INFO" => attribute(e, "vendor_info"),
        "START" => {
            e.starts = parse_date(value).map_err(|e| ImportError {
                line,
                message: e.to_string(),
            })?;
        }
        "OVERDRAFT" => {
            e.overdraft = value.parse().map_err(|_| ImportError {
                line,
                message: format!("OVERDRAFT={value} is not a number"),
            })?;
        }
        "BORROW" => {
            // FlexLM's default borrow period is 168 hours.
            e.borrow_limit_hours = if value.is_empty() {
                168
            } else {
                value.parse().map_err(|_| ImportError {
                    line,
                    message: format!("BORROW={value} is not a number of hours"),
                })?
            };
        }
        "LINGER" => {
            // FlexLM's LINGER is seconds a seat stays held after checkin: tally's linger.
            e.linger_secs = value.parse().map_err(|_| ImportError {
                line,
                message: format!("LINGER={value} is not a number of seconds"),
            })?;
        }
        "SUPERSEDE" => {
            // Applied once every line is read (`apply_supersede`).
            e.supersede = Some(value.split_whitespace().map(str::to_string).collect());
        }
        "SIGN" | "SIGN2" | "CK" | "AUTH" => note(
            key,
            "a FlexLM signature; the tally bundle carries the vendor's signature instead",
        ),
        "HOSTID" => drop("tally binds the whole bundle to the server of the activation request"),
        // Remote sessions are allowed unless the vendor says `deny`; written so the
        // review sees the choice.
        "TS_OK" => e.remote_sessions = Some("allow"),
        "ONE_TS_OK" => {
            e.remote_sessions = Some("allow");
            drop("FlexLM allows one terminal-server session per user; tally allows remote sessions without a count (remote_sessions = \"allow\")")
        }
        "FLOAT_OK" => drop("tally seats always float: a node-locked licence to float is the default"),
        // USER_BASED[=n]: only the users the site names (INCLUDE in FlexLM's options
        // file, `[[named]]` in tally's policy), at most n (default: the seats).
        "USER_BASED" | "HOST_BASED" => {
            let limit = match value {
                "" => None,
                n => Some(n.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    ImportError {
                        line,
                        message: format!("{shown}: not a number of names above 0"),
                    }
                })?),
            };
            let kind = if upper == "USER_BASED" { "user" } else { "host" };
            let limit = limit.or(e.named.and_then(|(_, n)| n));
            e.named = Some((kind, limit));
        }
        "DUP_GROUP" => match dup_group(value) {
            Ok(share) => e.share = share,
            Err(why) => drop(&why),
        },
        "SUITE_DUP_GROUP" => drop(
            "a grouping for the suite's own seat; a tally suite's seat serves one user at a time (as SUITE_DUP_GROUP=U), with no other grouping",
        ),
        "SUPERSEDE_SIGN" => drop(
            "supersedes by signature; tally replaces whole bundles: list the old bundle ids in `supersedes`",
        ),
        "PLATFORMS" => drop("tally does not limit seats by platform"),
        "CAPACITY" | "MINIMUM" => drop("FlexLM's checkout multipliers; tally counts the seats asked for"),
        "SORT" => drop("FlexLM's line order; tally adds the seats of every grant"),
        _ => drop("no tally equivalent"),
    }
    Ok(())
}

/// FlexLM's `DUP_GROUP` as tally's `share`: `U`, `H`, `D` and their combinations are the
/// holder fields that must agree (`UHD` is `user+host+display`); `SITE` is every
/// checkout of the site (`site`); `NONE` shares nothing. `V` (the vendor-defined
/// string) has no equivalent: the error says why, and nothing is written, since sharing
/// on fewer fields than FlexLM compares would let more checkouts share a seat than the
/// license allows.
pub(crate) fn dup_group(value: &str) -> Result<Option<String>, String> {
    let upper = value.trim().to_ascii_uppercase();
    match upper.as_str() {
        "NONE" => return Ok(None),
        "SITE" => return Ok(Some("site".into())),
        "" => return Err("an empty DUP_GROUP; no share is written".into()),
        _ => {}
    }
    share_fields(&upper, "UHD", "V").map(Some)
}

/// The `share` value for a set of letters (`U` user, `H` host, `D` display): the fields
/// in that fixed order, joined by `+`. `allowed` are the letters with an equivalent;
/// `vendor` the format's letter for a vendor-defined field (FlexLM's `V`, RLM's `I`).
pub(crate) fn share_fields(letters: &str, allowed: &str, vendor: &str) -> Result<String, String> {
    let upper = letters.to_ascii_uppercase();
    if let Some(c) = upper.chars().find(|c| vendor.contains(*c)) {
        return Err(format!(
            "'{c}' groups by a vendor-defined string, which tally has no equivalent for; sharing on the other fields alone would let more checkouts share a seat than the license allows, so no share is written"
        ));
    }
    if let Some(c) = upper.chars().find(|c| !allowed.contains(*c)) {
        return Err(format!(
            "'{c}' is not a grouping letter; no share is written"
        ));
    }
    let fields: Vec<&str> = [('U', "user"), ('H', "host"), ('D', "display")]
        .iter()
        .filter(|(c, _)| upper.contains(*c))
        .map(|(_, f)| *f)
        .collect();
    Ok(fields.join("+"))
}

/// Text from the license file made safe for a TOML comment: TOML forbids control
/// characters other than tab there (a stray CR or NUL would make the whole spec
/// unreadable), so they are shown escaped, as `\u0001`, for the reviewer to see.
pub(crate) fn comment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// The review notes written at the top of the spec.
pub(crate) struct Review<'a> {
    /// The subcommand that wrote the spec (`import-flexlm`).
    pub(crate) command: &'a str,
    /// The title of the superseded list, naming the keyword that left lines out.
    pub(crate) superseded_title: &'a str,
    pub(crate) header: &'a [String],
    pub(crate) site: &'a [String],
    pub(crate) unmapped: &'a [String],
    pub(crate) approximated: &'a [String],
    pub(crate) superseded: &'a [String],
    pub(crate) expired: &'a [String],
    /// The customer's name when the license file says it (RLM's `customer=`).
    pub(crate) customer_name: Option<&'a str>,
}

/// The spec: review notes as comments at the top, then the vendor, the customer to fill
/// in and one `[[feature]]` per entry.
pub(crate) fn render(source: &str, vendor: &str, review: &Review, entries: &[Entry]) -> String {
    let header = review.header;
    let unmapped = review.unmapped;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Bundle spec imported from {} by tally-publisher {}.",
        comment(source),
        review.command
    );
    let _ = writeln!(
        out,
        "# Review every line and fill in the customer, then sign it with:"
    );
    let _ = writeln!(
        out,
        "#   tally-publisher issue --vendor-key vendor.key --spec THIS_FILE --request activation.req --out customer.bundle"
    );
    if !header.is_empty() {
        let _ = writeln!(out, "#\n# From the license file:");
        for h in header {
            let _ = writeln!(out, "#   {}", comment(h));
        }
    }
    for (title, notes) in [
        ("The site:", review.site),
        ("Not mapped, to review:", unmapped),
        (
            "Mapped, but not exactly the same, to review:",
            review.approximated,
        ),
        (review.superseded_title, review.superseded),
        ("EXPIRED already, to review:", review.expired),
    ] {
        if !notes.is_empty() {
            let _ = writeln!(out, "#\n# {title}");
            for u in notes {
                let _ = writeln!(out, "#   {}", comment(u));
            }
        }
    }
    let _ = writeln!(out, "\nvendor = {}", toml_string(vendor));
    let _ = writeln!(out, "\n[customer]");
    let _ = writeln!(
        out,
        "id = \"\"    # fill in: the license file does not say who the customer is"
    );
    match review.customer_name {
        Some(name) => {
            let _ = writeln!(
                out,
                "name = {}  # from the license file's customer=; review",
                toml_string(name)
            );
        }
        None => {
            let _ = writeln!(out, "name = \"\"  # fill in");
        }
    }
    for e in entries {
        let _ = writeln!(out, "\n[[feature]]\n# {}", comment(&e.origin));
        if let Some(note) = &e.expired {
            let _ = writeln!(out, "# EXPIRED: {}", comment(note));
        }
        for note in &e.notes {
            let _ = writeln!(out, "# {}", comment(note));
        }
        let _ = writeln!(out, "name = {}", toml_string(&e.name));
        match (&e.token, e.seats) {
            (Some((pool, tokens)), _) => {
                let _ = writeln!(out, "token_pool = {}", toml_string(pool));
                let _ = writeln!(out, "tokens = {tokens}");
            }
            (None, Some(n)) => {
                let _ = writeln!(out, "seats = {n}");
            }
            (None, None) => {
                let _ = writeln!(out, "seats = \"uncounted\"");
            }
        }
        if let Some(v) = &e.version_ceiling {
            let _ = writeln!(out, "version_ceiling = {}", toml_string(v));
        }
        if let Some(v) = &e.upgrade_from {
            let _ = writeln!(out, "upgrade_from = {}", toml_string(v));
        }
        if let Some(v) = &e.starts {
            let _ = writeln!(out, "starts = {}", toml_string(v));
        }
        let _ = writeln!(
            out,
            "expires = {}",
            toml_string(e.expires.as_deref().unwrap_or("permanent"))
        );
        if e.overdraft > 0 {
            let _ = writeln!(out, "overdraft = {}", e.overdraft);
        }
        if e.borrow_limit_hours > 0 {
            let _ = writeln!(out, "borrow_limit_hours = {}", e.borrow_limit_hours);
        }
        if e.linger_secs > 0 {
            let _ = writeln!(out, "linger_secs = {}", e.linger_secs);
        }
        if let Some(share) = &e.share {
            let _ = writeln!(out, "share = {}", toml_string(share));
        }
        if let Some(limit) = e.share_limit {
            let _ = writeln!(out, "share_limit = {limit}");
        }
        if e.suite {
            let _ = writeln!(out, "suite = true");
        }
        if let Some((kind, limit)) = e.named {
            let _ = writeln!(out, "named = {}", toml_string(kind));
            if let Some(n) = limit {
                let _ = writeln!(out, "named_limit = {n}");
            }
        }
        if let Some(v) = e.remote_sessions {
            let _ = writeln!(out, "remote_sessions = {}", toml_string(v));
        }
        if let Some(v) = e.virtual_machines {
            let _ = writeln!(out, "virtual_machines = {}", toml_string(v));
        }
        if !e.components.is_empty() {
            let list: Vec<String> = e.components.iter().map(|c| toml_string(c)).collect();
            let _ = writeln!(out, "components = [{}]", list.join(", "));
        }
        if !e.attributes.is_empty() {
            let _ = writeln!(out, "[feature.attributes]");
            for (k, v) in &e.attributes {
                let _ = writeln!(out, "{k} = {}", toml_string(v));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(
            parse_date("31-dec-2027").unwrap().as_deref(),
            Some("2027-12-31")
        );
        assert_eq!(
            parse_date("1-JAN-2027").unwrap().as_deref(),
            Some("2027-01-01")
        );
        assert_eq!(parse_date("1-jan-0").unwrap(), None);
        assert_eq!(parse_date("permanent").unwrap(), None);
        assert!(parse_date("31-feb-2027").is_err());
        assert!(parse_date("2027-12-31").is_err());
    }

    #[test]
    fn tokens_keep_quoted_spaces() {
        let t = tokenize(
            r#"FEATURE f v 1.0 permanent 4 VENDOR_STRING="a b c" SIGN="00 11""#,
            1,
        )
        .unwrap();
        assert_eq!(t[6], Token::Pair("VENDOR_STRING".into(), "a b c".into()));
        assert_eq!(t[7], Token::Pair("SIGN".into(), "00 11".into()));
        assert!(tokenize(r#"FEATURE f X="open"#, 3).is_err());
    }

    fn at(text: &str) -> Import {
        import_at("t.lic", text, UnixTime::from_date("2026-12-01").unwrap()).unwrap()
    }

    /// The spec's features as (name, seats) pairs, in order.
    fn features(import: &Import) -> Vec<(String, String)> {
        let spec: toml::Value = toml::from_str(&import.spec).unwrap();
        spec["feature"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let seats = match &f["seats"] {
                    toml::Value::Integer(n) => n.to_string(),
                    other => other.as_str().unwrap_or("?").to_string(),
                };
                (f["name"].as_str().unwrap().into(), seats)
            })
            .collect()
    }

    use tally_protocol::time::UnixTime;

    #[test]
    fn supersede_drops_lines_of_the_feature_issued_before_it() {
        let import = at("INCREMENT f v 1 permanent 2 ISSUED=1-jan-2024\n\
             INCREMENT f v 1 permanent 5 SUPERSEDE ISSUED=1-jan-2025\n\
             INCREMENT f v 1 permanent 1 ISSUED=1-jan-2026\n\
             INCREMENT g v 1 permanent 3\n");
        assert_eq!(
            features(&import),
            vec![
                ("f".into(), "5".into()),
                ("f".into(), "1".into()),
                ("g".into(), "3".into())
            ]
        );
        assert_eq!(import.superseded.len(), 1, "{:?}", import.superseded);
        assert!(
            import.superseded[0].starts_with("line 1: INCREMENT f left out: superseded by line 2")
        );
        // SUPERSEDE is a keyword, never an old-style license key.
        assert!(!import.spec.contains("license key"), "{}", import.spec);
    }

    #[test]
    fn supersede_pools_lines_of_one_date_and_names_other_features() {
        let import = at("FEATURE a v 1 permanent 1 ISSUED=1-jan-2024\n\
             FEATURE b v 1 permanent 1\n\
             FEATURE c v 1 permanent 4 SUPERSEDE=\"a b\" ISSUED=2-jan-2025\n\
             INCREMENT c v 1 permanent 3 ISSUED=2-jan-2025 SUPERSEDE\n");
        // b has no date: older than any dated line. The two c lines share a date: pooled.
        assert_eq!(
            features(&import),
            vec![("c".into(), "4".into()), ("c".into(), "3".into())]
        );
        assert_eq!(import.superseded.len(), 2, "{:?}", import.superseded);
    }

    #[test]
    fn a_superseding_line_is_superseded_by_a_later_one() {
        let import = at("INCREMENT f v 1 permanent 2 SUPERSEDE ISSUED=1-jan-2024\n\
             INCREMENT f v 1 permanent 5 SUPERSEDE ISSUED=1-jan-2026\n\
             INCREMENT f v 1 permanent 1 ISSUED=1-jan-2025\n");
        assert_eq!(features(&import), vec![("f".into(), "5".into())]);
        assert!(
            import
                .superseded
                .iter()
                .all(|s| s.contains("superseded by line 2")),
            "{:?}",
            import.superseded
        );
    }

    #[test]
    fn supersede_without_a_date_supersedes_nothing_and_says_so() {
        let import = at("FEATURE a v 1 permanent 1\nINCREMENT a v 1 permanent 2 SUPERSEDE\n");
        assert_eq!(features(&import).len(), 2);
        assert!(
            import
                .unmapped
                .iter()
                .any(|u| u.contains("SUPERSEDE without ISSUED= or START=")),
            "{:?}",
            import.unmapped
        );
        // START= stands in for ISSUED=.
        let import = at("FEATURE a v 1 permanent 1 START=1-jan-2024\n\
             INCREMENT a v 1 permanent 2 SUPERSEDE START=1-feb-2024\n");
        assert_eq!(features(&import), vec![("a".into(), "2".into())]);
    }

    #[test]
    fn linger_bare_keywords_and_expired_lines() {
        let import = at("FEATURE a v 1 30-nov-2026 1 LINGER=120 SIGN=00 TS_OK\n\
             FEATURE b v 1 1-dec-2026 1 BORROW\n");
        let spec: toml::Value = toml::from_str(&import.spec).unwrap();
        assert_eq!(spec["feature"][0]["linger_secs"].as_integer(), Some(120));
        assert_eq!(
            spec["feature"][1]["borrow_limit_hours"].as_integer(),
            Some(168)
        );
        // TS_OK after a KEY=VALUE pair is still seen: remote sessions allowed.
        assert_eq!(
            spec["feature"][0]["remote_sessions"].as_str(),
            Some("allow"),
            "{}",
            import.spec
        );
        assert!(spec["feature"][1].get("remote_sessions").is_none());
        // USER_BASED=n and HOST_BASED are named users and hosts.
        let named = at("FEATURE a v 1 permanent 10 USER_BASED=4 SIGN=00\n\
             FEATURE b v 1 permanent 3 HOST_BASED SIGN=00\n");
        let spec: toml::Value = toml::from_str(&named.spec).unwrap();
        assert_eq!(spec["feature"][0]["named"].as_str(), Some("user"));
        assert_eq!(spec["feature"][0]["named_limit"].as_integer(), Some(4));
        assert_eq!(spec["feature"][1]["named"].as_str(), Some("host"));
        assert!(spec["feature"][1].get("named_limit").is_none());
        // a's last day was yesterday; b's is today.
        assert_eq!(import.expired.len(), 1, "{:?}", import.expired);
        assert!(
            import.expired[0].contains("expired on 2026-11-30"),
            "{:?}",
            import.expired
        );
        assert!(import.spec.contains("# EXPIRED: line 1"), "{}", import.spec);
        assert!(import_at("t", "FEATURE a v 1 permanent 1 LINGER=soon\n", UnixTime(0)).is_err());
    }

    #[test]
    fn dup_group_is_the_fields_that_must_agree() {
        for (value, share) in [
            ("U", "user"),
            ("h", "host"),
            ("D", "display"),
            ("UH", "user+host"),
            ("HU", "user+host"),
            ("UHD", "user+host+display"),
            ("dhu", "user+host+display"),
            ("HD", "host+display"),
            ("SITE", "site"),
        ] {
            assert_eq!(dup_group(value).unwrap().as_deref(), Some(share), "{value}");
        }
        assert_eq!(dup_group("NONE").unwrap(), None);
        for (value, why) in [
            ("V", "vendor-defined"),
            ("UHV", "vendor-defined"),
            ("UX", "'X' is not a grouping letter"),
            ("", "empty"),
        ] {
            let err = dup_group(value).unwrap_err();
            assert!(err.contains(why), "{value}: {err}");
        }
    }

    #[test]
    fn three_server_lines_are_a_redundant_site() {
        let import =
            at("SERVER a 1 27000\nSERVER b 2 27000\nSERVER c 3 27000\nFEATURE f v 1 permanent 1\n");
        assert_eq!(import.site.len(), 1);
        assert!(import.site[0].starts_with("three SERVER lines: a three-server redundant site"));
        assert!(import.site[0].contains("TALLY_SERVER"), "{:?}", import.site);
        assert!(import.spec.contains("three-server redundant site"));
        assert!(at("SERVER a 1\nFEATURE f v 1 permanent 1\n")
            .site
            .is_empty());
        assert!(
            at("SERVER a 1\nSERVER b 2\nFEATURE f v 1 permanent 1\n").site[0]
                .starts_with("2 SERVER lines")
        );
    }
}
