//! `TALLY_LOG` for programs that use the library through the C ABI: a small stderr
//! logger, so that a C product's support can see the client's steps without the
//! `tracing-subscriber` dependency in the library (it stays in the `tally` command).
//!
//! Rust programs install their own subscriber; [`crate::log_directive`] turns a
//! `TALLY_LOG` value into an `EnvFilter` directive with the same meaning as here.

use std::fmt::Write as _;
use std::io::Write as _;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata};

/// Installs the stderr logger if `TALLY_LOG` is set and the process has no tracing
/// subscriber yet (a Rust host program's own comes first). Idempotent.
pub fn init_from_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(value) = std::env::var("TALLY_LOG") else {
            return;
        };
        if value.trim().is_empty() || tracing::dispatcher::has_been_set() {
            return;
        }
        let logger = StderrLogger {
            filter: Filter::parse(&crate::log_directive(Some(&value))),
        };
        let _ = tracing::subscriber::set_global_default(logger);
    });
}

/// `target=level` directives and a default level, as `EnvFilter` reads them (without
/// span or field filters): the longest matching target prefix decides.
#[derive(Debug)]
struct Filter {
    default: Option<Level>,
    targets: Vec<(String, Option<Level>)>,
}

/// A level name; `None` for `off`, `Err` for anything else.
fn level(name: &str) -> Result<Option<Level>, ()> {
    match name.trim().to_ascii_lowercase().as_str() {
        "off" => Ok(None),
        "error" => Ok(Some(Level::ERROR)),
        "warn" => Ok(Some(Level::WARN)),
        "info" => Ok(Some(Level::INFO)),
        "debug" => Ok(Some(Level::DEBUG)),
        "trace" => Ok(Some(Level::TRACE)),
        _ => Err(()),
    }
}

impl Filter {
    fn parse(directive: &str) -> Filter {
        let mut filter = Filter {
            default: Some(Level::WARN),
            targets: Vec::new(),
        };
        for part in directive
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            match part.split_once('=') {
                Some((target, l)) => {
                    if let Ok(l) = level(l) {
                        filter.targets.push((target.trim().to_string(), l));
                    }
                }
                None => match level(part) {
                    Ok(l) => filter.default = l,
                    // A bare target means all of its levels, as in EnvFilter.
                    Err(()) => filter.targets.push((part.to_string(), Some(Level::TRACE))),
                },
            }
        }
        // Longest first: the most specific directive wins.
        filter
            .targets
            .sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
        filter
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        self.allows(meta.target(), *meta.level())
    }

    fn allows(&self, target: &str, level: Level) -> bool {
        let max = self
            .targets
            .iter()
            .find(|(t, _)| {
                target == t
                    || target
                        .strip_prefix(t.as_str())
                        .is_some_and(|rest| rest.starts_with("::"))
            })
            .map_or(self.default, |(_, l)| *l);
        // `Level`'s order: TRACE is the greatest, i.e. the most verbose.
        max.is_some_and(|max| level <= max)
    }
}

/// Writes each enabled event as one line on stderr: level, target, message, fields.
struct StderrLogger {
    filter: Filter,
}

/// Collects an event's fields into one line.
struct Line(String);

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value}");
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl tracing::Subscriber for StderrLogger {
    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        self.filter.enabled(meta)
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        // Spans are not shown; one id serves them all.
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &Event<'_>) {
        let meta = event.metadata();
        let mut line = Line(format!("tally {:>5} {}:", meta.level(), meta.target()));
        event.record(&mut line);
        line.0.push('\n');
        // One write per line, so lines of several threads do not interleave.
        let _ = std::io::stderr().lock().write_all(line.0.as_bytes());
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled(filter: &Filter, target: &str, level: Level) -> bool {
        filter.allows(target, level)
    }

    #[test]
    fn a_bare_level_is_tallys_own_lines_and_quinn_stays_at_warn() {
        let f = Filter::parse(&crate::log_directive(Some("debug")));
        assert!(enabled(&f, "tally_client::client", Level::DEBUG));
        assert!(enabled(&f, "tally_client", Level::DEBUG));
        assert!(!enabled(&f, "quinn_proto::connection", Level::DEBUG));
        assert!(enabled(&f, "quinn_proto::connection", Level::WARN));
        // Asked for by name: shown.
        let f = Filter::parse(&crate::log_directive(Some("debug,quinn_proto=trace")));
        assert!(enabled(&f, "quinn_proto::connection", Level::TRACE));
        assert!(!enabled(&f, "tally_client_x", Level::TRACE));
    }
}
