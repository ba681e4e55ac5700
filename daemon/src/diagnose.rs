//! `tallyd diagnose`: the support file a site sends its vendor.
//!
//! The body of the subcommand, apart from the binary so that it can be tested: what
//! goes into the file, what is redacted, how much of the log is read. The binary reads
//! the config, loads the site, writes the document (0600) and prints where.

use crate::bundles::Loaded;
use crate::store::{Store, StoreError};
use serde_json::{json, Value};
use std::path::Path;
use tally_protocol::keys::PublicKey;
use tally_protocol::time::UnixTime;

/// How much of a log file's end is read: a log file grows without bound between
/// rotations.
const LOG_WINDOW: u64 = 256 * 1024;
/// Log lines a support file carries.
const LOG_LINES: usize = 200;

/// What `tallyd diagnose` learnt of the site, when its config loads.
pub struct SiteFacts<'a> {
    /// The server's public key.
    pub server_key: PublicKey,
    /// The bundles as `tallyd run` would load them.
    pub loaded: &'a Loaded,
    /// The data directory (its seat store is summarised when tallyd does not hold it).
    pub data_dir: &'a Path,
}

/// The support document. `config_text` is the config file as read (shown redacted);
/// `site` is what loading it gave, or why it failed (said with its causes, as the
/// operator's terminal would); `log_file` is the config's
/// `log_file`, whose tail is attached (else journald's, if `journalctl` answers).
/// Keys and the admin token live in the data directory and are never read here.
pub fn document(
    config_path: &Path,
    config_text: &str,
    site: Result<SiteFacts<'_>, &dyn std::error::Error>,
    log_file: Option<&Path>,
    created: UnixTime,
) -> Result<Value, StoreError> {
    let mut doc = json!({
        "tallyd_version": env!("CARGO_PKG_VERSION"),
        "created": created.to_string(),
        "host": {
            "name": crate::host::hostname(),
            "fingerprint": crate::host::fingerprint(),
            "os": crate::host::os(),
            "virtualization": crate::host::virtualization(),
        },
        // The config names files; what it may hold itself (credentials in an upload
        // URL, a value under a token-like key) is redacted.
        "config_file": config_path.display().to_string(),
        "config": redact_config(config_text),
    });
    match site {
        Err(e) => doc["config_error"] = json!(with_causes(e)),
        Ok(site) => {
            doc["server_key"] = json!(site.server_key.fingerprint());
            doc["bundles"] = json!(site
                .loaded
                .served
                .iter()
                .map(|(path, b)| json!({
                    "file": path.display().to_string(),
                    "id": b.bundle.id,
                    "customer": b.bundle.customer.id,
                    "valid_until": b.bundle.valid_until.map(|t| t.last_day()),
                    "features": b.bundle.features.iter().map(|f| f.describe()).collect::<Vec<_>>(),
                }))
                .collect::<Vec<_>>());
            doc["refused_bundles"] = json!(site
                .loaded
                .refused
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>());
            doc["notes"] = json!(site.loaded.notes);
            doc["ledger"] = ledger_summary(site.data_dir)?;
        }
    }
    doc["recent_log"] = recent_log(log_file);
    Ok(doc)
}

/// An error and its causes on one line, `what: why: ...` (as a chain printer's `{:#}` says it).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// The seat store in numbers. The store is locked while tallyd runs; then the running
/// daemon's status (`tally status --json`) is the ledger summary to attach.
fn ledger_summary(data_dir: &Path) -> Result<Value, StoreError> {
    let store = match Store::open(&data_dir.join("store")) {
        Ok(store) => store,
        Err(e) => {
            return Ok(
                json!({ "unavailable": format!("{e} (tallyd is running; attach `tally status --json`)") }),
            )
        }
    };
    let (leases, unreadable) = store.load_leases()?;
    let mut per: std::collections::BTreeMap<String, u32> = Default::default();
    for l in &leases {
        *per.entry(l.feature.clone()).or_default() += l.count;
    }
    let state = store.report_state()?;
    Ok(json!({
        "leases": leases.len(),
        "seats_by_feature": per,
        "unreadable_records": unreadable.len(),
        "reports_exported": state.report_seq,
        "last_exported_event": state.last_event,
        "store_bytes": store.size_on_disk().ok(),
    }))
}

/// The log's last lines: from the log file when the site has one (it has no journald,
/// or chose not to use it), else from journald.
fn recent_log(log_file: Option<&Path>) -> Value {
    match log_file {
        Some(path) => match log_tail(path, LOG_LINES) {
            Ok(lines) => json!(lines),
            Err(e) => json!(format!("log file {}: {e}", path.display())),
        },
        None => {
            let journal = std::process::Command::new("journalctl")
                .args(["-u", "tallyd", "-n", "200", "--no-pager", "-o", "short-iso"])
                .output();
            match journal {
                Ok(o) if o.status.success() => json!(String::from_utf8_lossy(&o.stdout)),
                _ => json!("journalctl not available: attach tallyd's log output"),
            }
        }
    }
}

/// The last `lines` lines of a log file, read from its last 256 KiB only.
pub fn log_tail(path: &Path, lines: usize) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking and checked on the descriptor: a FIFO at that path must not hang
    // the support bundle.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let len = meta.len();
    file.seek(SeekFrom::Start(len.saturating_sub(LOG_WINDOW)))?;
    let mut bytes = Vec::new();
    file.take(LOG_WINDOW).read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    Ok(all[all.len().saturating_sub(lines)..].join("\n"))
}

/// The config file as a support file may show it: credentials in URLs (`user:pass@`,
/// query strings) and the values of token-, password- or secret-like keys replaced by
/// `REDACTED`, line by line, so comments and layout stay readable.
pub fn redact_config(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let key = line
            .split_once('=')
            .map(|(k, _)| k.trim().trim_start_matches('#').trim().to_ascii_lowercase());
        let secret_key = key.as_deref().is_some_and(|k| {
            [
                "token",
                "password",
                "passwd",
                "secret",
                "credential",
                "auth",
            ]
            .iter()
            .any(|w| k.contains(w))
                && !k.ends_with("_file")
        });
        if secret_key {
            let (k, _) = line.split_once('=').expect("checked above");
            out.push_str(k);
            out.push_str("= \"REDACTED\"");
        } else {
            out.push_str(&redact_urls(line));
        }
        out.push('\n');
    }
    out
}

/// `line` with the user information and query of every URL in it replaced.
fn redact_urls(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        rest = &rest[i + 3..];
        let end = rest
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ','))
            .unwrap_or(rest.len());
        let (url, after) = rest.split_at(end);
        let (authority, path) = url.split_at(url.find('/').unwrap_or(url.len()));
        match authority.rsplit_once('@') {
            Some((_, host)) => {
                out.push_str("REDACTED@");
                out.push_str(host);
            }
            None => out.push_str(authority),
        }
        match path.split_once('?') {
            Some((p, _)) => {
                out.push_str(p);
                out.push_str("?REDACTED");
            }
            None => out.push_str(path),
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 20, scenario 8: `diagnose` copied credentials verbatim.
    #[test]
    fn diagnose_redacts_credentials() {
        let text = "data_dir = \"/var/lib/tally\"\n\
                    report_upload_url = \"https://ana:s3cret@vendor.example/up?sig=abc123\"\n\
                    # admin_token = \"hunter2\"\n\
                    upload_password = \"pw\"\n";
        let shown = redact_config(text);
        for secret in ["s3cret", "ana:", "abc123", "hunter2", "\"pw\""] {
            assert!(!shown.contains(secret), "{secret} left in:\n{shown}");
        }
        assert!(
            shown.contains("https://REDACTED@vendor.example/up?REDACTED"),
            "{shown}"
        );
        assert!(shown.contains("data_dir = \"/var/lib/tally\""), "{shown}");
    }

    /// A `*_file` key names a file, not a secret: it stays, as do other settings,
    /// comments and the number of lines.
    #[test]
    fn file_names_and_layout_stay() {
        let text = "listen = \"0.0.0.0:27300\"\n\
                    # a comment\n\
                    admin_token_file = \"/etc/tally/token\"\n";
        let shown = redact_config(text);
        assert_eq!(shown, text);
    }

    /// The tail is the last lines of the last 256 KiB; a FIFO is refused at once
    /// rather than blocking the support bundle.
    #[test]
    fn the_log_tail_is_bounded_and_a_fifo_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("tallyd.log");
        let mut text = String::new();
        for i in 0..20_000 {
            text.push_str(&format!("line {i} {}\n", "x".repeat(40)));
        }
        std::fs::write(&log, &text).unwrap();
        let tail = log_tail(&log, 3).unwrap();
        let lines: Vec<_> = tail.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[2].starts_with("line 19999 "), "{tail}");
        let all = log_tail(&log, usize::MAX).unwrap();
        assert!(all.len() as u64 <= LOG_WINDOW, "{} bytes", all.len());
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let e = log_tail(&fifo, 10).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    /// A config that does not load still gives a document: the error, the redacted
    /// config and the log, without bundles or ledger.
    #[test]
    fn a_config_that_does_not_load_is_reported_with_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("tallyd.log");
        std::fs::write(&log, "started\nstopped\n").unwrap();
        let error = std::io::Error::other("vendor_keys is empty");
        let doc = document(
            Path::new("/etc/tally/tallyd.toml"),
            "admin_token = \"t0ken\"\n",
            Err(&error),
            Some(&log),
            UnixTime(1_800_000_000),
        )
        .unwrap();
        assert_eq!(doc["config_error"], "vendor_keys is empty");
        assert_eq!(doc["created"], UnixTime(1_800_000_000).to_string());
        assert!(!doc["config"].as_str().unwrap().contains("t0ken"));
        assert_eq!(doc["recent_log"], "started\nstopped");
        assert!(doc.get("bundles").is_none() && doc.get("ledger").is_none());
    }
}
