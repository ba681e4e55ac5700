//! Import of FlexLM (FlexNet Publisher) license files into a bundle spec.
//!
//! The path for a vendor moving a product line off FlexLM: the license files already at
//! customer sites say what each customer bought. This reads them (SERVER, VENDOR/DAEMON,
//! USE_SERVER, FEATURE, INCREMENT, UPGRADE, PACKAGE lines, backslash continuations,
//! quoted attributes, `permanent`, `uncounted`, dates like `1-jan-2027`, comments) and
//! writes a spec for the vendor to review and sign. Whatever has no tally equivalent is
//! listed as a comment with its line number, never dropped silently.

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
    /// Things that were not mapped, one line each (also in the spec as comments).
    pub unmapped: Vec<String>,
}

/// One feature entry of the spec being built.
#[derive(Debug, Default)]
struct Entry {
    origin: String,
    name: String,
    seats: Option<u32>,
    version_ceiling: Option<String>,
    upgrade_from: Option<String>,
    starts: Option<String>,
    expires: Option<String>,
    overdraft: u32,
    borrow_limit_hours: u64,
    components: Vec<String>,
    attributes: BTreeMap<String, String>,
}

/// A logical line: continuations joined, with the line number it starts on.
struct Logical {
    line: usize,
    text: String,
}

fn logical_lines(text: &str) -> Vec<Logical> {
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
enum Token {
    Word(String),
    Pair(String, String),
}

fn tokenize(text: &str, line: usize) -> Result<Vec<Token>, ImportError> {
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

/// Parses a FlexLM date (`31-dec-2027`, `1-jan-0`, `permanent`) into `YYYY-MM-DD`, or
/// `None` for permanent.
pub fn parse_date(text: &str) -> Result<Option<String>, String> {
    let lower = text.to_ascii_lowercase();
    if lower == "permanent" {
        return Ok(None);
    }
    let parts: Vec<&str> = lower.split('-').collect();
    let [day, month, year] = parts.as_slice() else {
        return Err(format!("'{text}' is not a date like 31-dec-2027"));
    };
    let year: u32 = year
        .parse()
        .map_err(|_| format!("'{text}': year is not a number"))?;
    if year == 0 {
        return Ok(None);
    }
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    let month = MONTHS
        .iter()
        .position(|m| *m == *month)
        .ok_or_else(|| format!("'{text}': unknown month"))?
        + 1;
    let day: u32 = day
        .parse()
        .map_err(|_| format!("'{text}': day is not a number"))?;
    let date = format!("{year:04}-{month:02}-{day:02}");
    tally_protocol::time::UnixTime::from_date(&date)
        .map(|_| Some(date))
        .ok_or_else(|| format!("'{text}' is not a calendar date"))
}

fn seats(text: &str, line: usize) -> Result<Option<u32>, ImportError> {
    if text.eq_ignore_ascii_case("uncounted") || text == "0" {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| ImportError {
        line,
        message: format!("'{text}' is not a license count"),
    })
}

/// Imports a license file; `source` names it in the output.
pub fn import(source: &str, text: &str) -> Result<Import, ImportError> {
    if text.len() > MAX_LICENSE_FILE {
        return Err(ImportError {
            line: 1,
            message: format!("larger than {MAX_LICENSE_FILE} bytes, not a license file"),
        });
    }
    let mut header: Vec<String> = Vec::new();
    let mut unmapped: Vec<String> = Vec::new();
    let mut vendor: Option<String> = None;
    let mut entries: Vec<Entry> = Vec::new();
    let mut packages: Vec<(usize, String, Vec<String>, Vec<String>)> = Vec::new();
    for logical in logical_lines(text) {
        let line = logical.line;
        let tokens = tokenize(&logical.text, line)?;
        let words: Vec<&str> = tokens
            .iter()
            .map_while(|t| match t {
                Token::Word(w) => Some(w.as_str()),
                Token::Pair(..) => None,
            })
            .collect();
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
            "SERVER" => header.push(format!(
                "line {line}: {} -> the server is bound by its activation request, not a host id",
                logical.text
            )),
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
                e.expires =
                    parse_date(words[i + 1]).map_err(|message| ImportError { line, message })?;
                e.seats = seats(words[i + 2], line)?;
                if upgrade && e.seats.is_none() {
                    return Err(ImportError {
                        line,
                        message: "an UPGRADE must move a number of seats".into(),
                    });
                }
                for extra in &words[n..] {
                    unmapped.push(format!(
                        "line {line}: {keyword} {}: '{extra}' (an old-style license key; the tally bundle is signed instead)",
                        e.name
                    ));
                }
                for (key, value) in pairs {
                    map_pair(&mut e, &keyword, key, value, line, &mut unmapped)?;
                }
                if keyword == "FEATURE"
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
                let mut notes = Vec::new();
                for (key, value) in &pairs {
                    match key.to_ascii_uppercase().as_str() {
                        "COMPONENTS" => {
                            for c in value.split_whitespace() {
                                // name[:version[:count]]
                                let mut parts = c.split(':');
                                let name = parts.next().unwrap_or_default().to_string();
                                if parts.next().is_some() {
                                    notes.push(format!(
                                        "line {line}: PACKAGE {}: component '{c}' carries a version or count; tally gives components the package's terms",
                                        words[1]
                                    ));
                                }
                                components.push(name);
                            }
                        }
                        "OPTIONS" if value.eq_ignore_ascii_case("SUITE") => notes.push(format!(
                            "line {line}: PACKAGE {}: OPTIONS=SUITE (one seat shared by all components) is not supported; each component gets the package's seats",
                            words[1]
                        )),
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
                packages.push((line, words[1].to_string(), components, notes));
            }
            _ => unmapped.push(format!(
                "line {line}: '{}' lines are not understood: {}",
                words[0], logical.text
            )),
        }
    }
    for (line, name, components, notes) in packages {
        unmapped.extend(notes);
        let mut found = false;
        for e in entries.iter_mut().filter(|e| e.name == name) {
            e.components = components.clone();
            found = true;
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
    Ok(Import {
        spec: render(
            source,
            vendor.as_deref().unwrap_or(""),
            &header,
            &unmapped,
            &entries,
        ),
        features: entries.len(),
        unmapped,
    })
}

fn map_pair(
    e: &mut Entry,
    keyword: &str,
    key: &str,
    value: &str,
    line: usize,
    unmapped: &mut Vec<String>,
) -> Result<(), ImportError> {
    let upper = key.to_ascii_uppercase();
    let attribute = |e: &mut Entry, name: &str| {
        e.attributes.insert(name.to_string(), value.to_string());
    };
    match upper.as_str() {
        "VENDOR_STRING" => attribute(e, "vendor_string"),
        "ISSUER" => attribute(e, "issuer"),
        "NOTICE" => attribute(e, "notice"),
        "ISSUED" => attribute(e, "issued"),
        "SN" => attribute(e, "serial_number"),
        "ASSET_INFO" => attribute(e, "asset_info"),
        "DIST_INFO" => attribute(e, "dist_info"),
        "USER_INFO" => attribute(e, "user_info"),
        "VENDOR_INFO" => attribute(e, "vendor_info"),
        "START" => {
            e.starts = parse_date(value).map_err(|message| ImportError { line, message })?;
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
        "SIGN" | "SIGN2" | "CK" | "AUTH" => unmapped.push(format!(
            "line {line}: {keyword} {}: {key} (a FlexLM signature; the tally bundle carries the vendor's signature instead)",
            e.name
        )),
        "HOSTID" => unmapped.push(format!(
            "line {line}: {keyword} {}: HOSTID={value} (tally binds the whole bundle to the server of the activation request)",
            e.name
        )),
        "SUPERSEDE" => unmapped.push(format!(
            "line {line}: {keyword} {}: SUPERSEDE (tally replaces whole bundles: list the old bundle ids in `supersedes`)",
            e.name
        )),
        _ => unmapped.push(format!(
            "line {line}: {keyword} {}: {key}={value} has no tally equivalent",
            e.name
        )),
    }
    Ok(())
}

/// Text from the license file made safe for a TOML comment: TOML forbids control
/// characters other than tab there (a stray CR or NUL would make the whole spec
/// unreadable), so they are shown escaped, as `\u0001`, for the reviewer to see.
fn comment(text: &str) -> String {
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

fn render(
    source: &str,
    vendor: &str,
    header: &[String],
    unmapped: &[String],
    entries: &[Entry],
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Bundle spec imported from {} by tally-publisher import-flexlm.",
        comment(source)
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
    if !unmapped.is_empty() {
        let _ = writeln!(out, "#\n# Not mapped, to review:");
        for u in unmapped {
            let _ = writeln!(out, "#   {}", comment(u));
        }
    }
    let _ = writeln!(out, "\nvendor = {}", toml_string(vendor));
    let _ = writeln!(out, "\n[customer]");
    let _ = writeln!(
        out,
        "id = \"\"    # fill in: the license file does not say who the customer is"
    );
    let _ = writeln!(out, "name = \"\"  # fill in");
    for e in entries {
        let _ = writeln!(out, "\n[[feature]]\n# {}", comment(&e.origin));
        let _ = writeln!(out, "name = {}", toml_string(&e.name));
        match e.seats {
            Some(n) => {
                let _ = writeln!(out, "seats = {n}");
            }
            None => {
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
}
