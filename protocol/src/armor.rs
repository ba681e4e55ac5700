//! Text-safe armour for tally files, in the manner of PEM.
//!
//! Bundles, activation requests and reports cross e-mail, ticket systems and USB sticks.
//! Armour keeps them 7-bit text with short lines, and its label says what a file is before
//! anything is decoded, so a report handed in where a bundle was expected is named as such.

use base64::Engine;
use std::fmt::Write;

/// Longest armoured file we accept, so reading a hostile file stays bounded.
pub const MAX_ARMORED_LEN: usize = 16 * 1024 * 1024;

/// Why armoured text could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ArmorError {
    /// No `-----BEGIN TALLY ...-----` line was found.
    #[error("no '-----BEGIN TALLY {0}-----' line: this is not a tally {0} file")]
    MissingBegin(&'static str),
    /// The file is armoured but holds another kind of tally file.
    #[error("this is a tally {found} file, expected a tally {expected} file")]
    WrongLabel {
        /// The label that was expected.
        expected: &'static str,
        /// The label found in the file.
        found: String,
    },
    /// The END line is missing: the file was truncated.
    #[error("no '-----END TALLY {0}-----' line: the file is truncated")]
    MissingEnd(&'static str),
    /// The text between BEGIN and END is not valid base64.
    #[error("line {line}: not valid base64")]
    BadBase64 {
        /// 1-based line number in the file.
        line: usize,
    },
    /// The file is larger than the limit for its kind.
    #[error("file is larger than the limit for its kind")]
    TooLarge,
}

/// Wraps `bytes` in armour with the given label (`BUNDLE`, `SECRET KEY`, ...).
pub fn armor(label: &str, bytes: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 80);
    let _ = writeln!(out, "-----BEGIN TALLY {label}-----");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    let _ = writeln!(out, "-----END TALLY {label}-----");
    out
}

/// Reads the first armoured block labelled `label` from `text`.
///
/// Text before BEGIN and after END is ignored (e-mail quoting, a note from the vendor);
/// blank lines and surrounding white space inside the block are tolerated.
pub fn dearmor(label: &'static str, text: &str) -> Result<Vec<u8>, ArmorError> {
    dearmor_limited(label, text, MAX_ARMORED_LEN)
}

/// [`dearmor`] with a caller-chosen size limit, for files that are legitimately large
/// (usage reports).
pub fn dearmor_limited(label: &'static str, text: &str, max: usize) -> Result<Vec<u8>, ArmorError> {
    if text.len() > max {
        return Err(ArmorError::TooLarge);
    }
    let mut lines = text.lines().enumerate();
    let mut found_other = None;
    loop {
        let Some((_, line)) = lines.next() else {
            return Err(match found_other {
                Some(found) => ArmorError::WrongLabel {
                    expected: label,
                    found,
                },
                None => ArmorError::MissingBegin(label),
            });
        };
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("-----BEGIN TALLY ") {
            let found = rest.trim_end_matches('-');
            if found == label {
                break;
            }
            found_other.get_or_insert_with(|| found.to_string());
        }
    }
    let end = format!("-----END TALLY {label}-----");
    let mut b64 = String::new();
    for (index, line) in lines {
        let line = line.trim();
        if line == end {
            return base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|_| ArmorError::BadBase64 { line: index + 1 });
        }
        if line.is_empty() {
            continue;
        }
        if !line
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
        {
            return Err(ArmorError::BadBase64 { line: index + 1 });
        }
        b64.push_str(line);
    }
    Err(ArmorError::MissingEnd(label))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let text = armor("BUNDLE", &data);
        assert!(text
            .lines()
            .all(|l| l.len() <= 64 || l.starts_with("-----")));
        assert_eq!(dearmor("BUNDLE", &text).unwrap(), data);
        let quoted = format!("Hello,\nhere is your bundle:\n\n{text}\nregards\n");
        assert_eq!(dearmor("BUNDLE", &quoted).unwrap(), data);
        assert!(matches!(
            dearmor("REPORT", &text),
            Err(ArmorError::WrongLabel { .. })
        ));
        let truncated = &text[..text.len() / 2];
        assert_eq!(
            dearmor("BUNDLE", truncated),
            Err(ArmorError::MissingEnd("BUNDLE"))
        );
        assert_eq!(
            dearmor("BUNDLE", "nothing here"),
            Err(ArmorError::MissingBegin("BUNDLE"))
        );
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        lines[2].replace_range(0..1, "*");
        let bad = lines.join("\n");
        assert!(matches!(
            dearmor("BUNDLE", &bad),
            Err(ArmorError::BadBase64 { line: 3 })
        ));
    }
}
