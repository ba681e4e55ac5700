//! Manual pages, generated so that nothing is written twice (feature `cli`): a command's
//! pages come from its clap definition, a configuration file's page from the commented
//! example file that documents it. The three commands write them with their hidden
//! `man --out DIR` subcommand; the packages ship them.

use clap_mangen::roff::{bold, roman, Inline, Roff};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The manual the pages belong to (the centre of a page's footer).
const MANUAL: &str = "tally manual";

/// An empty date argument of `.TH`, quoted: unquoted, an empty argument vanishes and the
/// source would be read as the date. No date, so that a page is the same in every build.
const NO_DATE: &str = "\"\"";

/// Writes the page of `cmd` and one page per (nested) visible subcommand into `out_dir`,
/// in manual `section`: `tally.1`, `tally-run.1`, `tally-admin-remove.1`, ... The main
/// page's SUBCOMMANDS section names them (`tally-run(1)`). Returns the files written.
pub fn write_command_pages(
    cmd: clap::Command,
    section: &str,
    out_dir: &Path,
) -> std::io::Result<Vec<PathBuf>> {
    fn write(
        cmd: clap::Command,
        section: &str,
        out_dir: &Path,
        written: &mut Vec<PathBuf>,
    ) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub.clone(), section, out_dir, written)?;
        }
        let source = format!("tally {}", cmd.get_version().unwrap_or_default());
        let page = clap_mangen::Man::new(cmd)
            .section(section)
            .date(NO_DATE)
            .source(source)
            .manual(MANUAL);
        written.push(page.generate_to(out_dir)?);
        Ok(())
    }
    // `help` is clap's, not a command of ours; building names the subcommands
    // `tally-run` (their page names) and their synopses `tally run`.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    write(cmd, section, out_dir, &mut written)?;
    Ok(written)
}

/// The manual page of a configuration file, made from the commented example file that
/// documents it. `example` is TOML in blocks separated by blank lines; a block is comment
/// lines that say what the settings after them do, and those settings (`key = value`,
/// or `# key = value` for one that is off by default, shown so, and `# [[table]]`
/// headers). The
/// first comment line of the file, before any block, is the page's description.
pub fn config_page(page: &ConfigPage<'_>, example: &str) -> String {
    let mut roff = Roff::new();
    roff.control(
        "TH",
        [
            page.name.to_uppercase().as_str(),
            page.section,
            NO_DATE,
            &format!("tally {}", page.version),
            MANUAL,
        ],
    );
    roff.control("SH", ["NAME"]);
    roff.text([roman(format!("{} - {}", page.name, page.summary))]);
    roff.control("SH", ["SYNOPSIS"]);
    roff.text([bold(page.path)]);
    roff.control("SH", ["DESCRIPTION"]);
    let mut blocks = example
        .split("\n\n")
        .map(str::trim)
        .filter(|b| !b.is_empty());
    let intro = blocks.next().unwrap_or_default();
    roff.text(inline_code(&comment_text(intro.lines())));
    for para in page.description {
        roff.control("PP", []);
        roff.text(inline_code(para));
    }
    roff.control("SH", ["SETTINGS"]);
    for (comments, settings) in blocks.flat_map(entries) {
        for (i, setting) in settings.iter().enumerate() {
            // The first setting opens the entry; `TQ` stacks the others under it.
            roff.control(if i == 0 { "TP" } else { "TQ" }, []);
            // Kept as written: `# key = value` says the setting is off by default.
            roff.text([bold(*setting)]);
        }
        if settings.is_empty() {
            roff.control("PP", []);
        }
        if !comments.is_empty() {
            roff.text(inline_code(&comment_text(comments.into_iter())));
        }
    }
    if !page.see_also.is_empty() {
        roff.control("SH", ["SEE ALSO"]);
        roff.text([roman(page.see_also.join(", "))]);
    }
    roff.render()
}

/// What [`config_page`] needs besides the example file.
pub struct ConfigPage<'a> {
    /// The page's name, such as `tallyd.toml`.
    pub name: &'a str,
    /// Its manual section, such as `5`.
    pub section: &'a str,
    /// The release it documents.
    pub version: &'a str,
    /// The NAME line after the dash.
    pub summary: &'a str,
    /// Where the file is (the SYNOPSIS).
    pub path: &'a str,
    /// Paragraphs of the description after the example file's first comment.
    pub description: &'a [&'a str],
    /// Related pages, such as `tallyd(8)`.
    pub see_also: &'a [&'a str],
}

/// A block's entries: each run of comment lines with the settings after it (a comment
/// after a setting starts the next entry, for the settings after it).
fn entries(block: &str) -> Vec<(Vec<&str>, Vec<&str>)> {
    let mut entries: Vec<(Vec<&str>, Vec<&str>)> = Vec::new();
    for line in block.lines().map(str::trim) {
        let setting = is_setting(line);
        match entries.last_mut() {
            Some((_, settings)) if setting => settings.push(line),
            Some((comments, settings)) if settings.is_empty() => comments.push(line),
            _ if setting => entries.push((Vec::new(), vec![line])),
            _ => entries.push((vec![line], Vec::new())),
        }
    }
    entries
}

/// Whether a line of the example file is a setting (on, or off by default and shown
/// commented out) or a table header, rather than a line of explanation.
fn is_setting(line: &str) -> bool {
    let line = line.trim_start_matches('#').trim_start();
    if line.starts_with("[[") || (line.starts_with('[') && line.ends_with(']')) {
        return true;
    }
    match line.split_once(" = ") {
        Some((key, _)) => {
            !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        }
        None => false,
    }
}

/// The text of comment lines, joined into one paragraph.
fn comment_text<'a>(lines: impl Iterator<Item = &'a str>) -> String {
    lines
        .map(|l| l.trim().trim_start_matches('#').trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Text with `code` spans set in bold, as man pages set commands and names.
fn inline_code(text: &str) -> Vec<Inline> {
    text.split('`')
        .enumerate()
        .filter(|(_, part)| !part.is_empty())
        .map(|(i, part)| if i % 2 == 1 { bold(part) } else { roman(part) })
        .collect()
}

/// Writes `text` to `dir/name`, replacing a page written before.
pub fn write_page(dir: &Path, name: &str, text: &str) -> std::io::Result<PathBuf> {
    let path = dir.join(name);
    let mut file = std::fs::File::create(&path)?;
    file.write_all(text.as_bytes())?;
    file.flush()?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "# demo configuration. Every setting is optional.\n\n\
        # UDP address, `port` 1.\nlisten = \"0.0.0.0:1\"\n\n\
        # Off by default: a file.\n# log_file = \"/x\"\n\n\
        # Members.\n# [[cluster]]\n# key = \"ab\"\n# addr = \"10.0.0.1:1\"\n\n\
        # The endpoint.\nhttp = true\n# Its names.\nhttp_hosts = []\n";

    fn page() -> String {
        config_page(
            &ConfigPage {
                name: "demo.toml",
                section: "5",
                version: "1.0",
                summary: "demo configuration",
                path: "/etc/demo.toml",
                description: &["Read at start."],
                see_also: &["demo(8)"],
            },
            EXAMPLE,
        )
    }

    /// Every setting, on or off by default, and every table header is an entry's tag,
    /// with its explanation after it; code spans are bold.
    #[test]
    fn config_page_has_an_entry_per_setting() {
        let page = page();
        // The date is empty, quoted, so that the source stays the source.
        assert!(
            page.contains("\n.TH DEMO.TOML 5 \"\" \"tally 1.0\" \"tally manual\"\n"),
            "{page}"
        );
        for tag in [
            "\\fBlisten = \"0.0.0.0:1\"\\fR",
            "\\fB# log_file = \"/x\"\\fR",
            "\\fB# [[cluster]]\\fR",
            "\\fB# key = \"ab\"\\fR",
        ] {
            assert!(page.contains(&format!("\n{tag}\n")), "{tag} in {page}");
        }
        assert!(page.contains("UDP address, \\fBport\\fR 1."), "{page}");
        assert!(page.contains("Off by default: a file."), "{page}");
        assert!(page.contains("demo configuration. Every setting is optional."));
        // The explanation is not also a setting, nor a setting an explanation.
        assert_eq!(page.matches(".TP").count(), 5, "{page}");
        // A comment between two settings explains the second.
        assert!(
            page.contains("\n.TP\n\\fBhttp_hosts = []\\fR\nIts names.\n"),
            "{page}"
        );
        assert_eq!(page.matches(".TQ").count(), 2, "{page}");
    }

    /// Explanations are not settings, even when they quote one.
    #[test]
    fn prose_is_not_a_setting() {
        assert!(is_setting("# report_dir = \"/var\""));
        assert!(is_setting("listen = \"x\""));
        assert!(!is_setting(
            "# on demand, `tally admin report --out FILE` exports one"
        ));
        assert!(!is_setting("# lease_ttl_secs must be at least twice this."));
        assert!(!is_setting(
            "# A three-server site (README: \"A three-server site\")"
        ));
    }

    /// A command's page and one per subcommand, named as the SUBCOMMANDS section says.
    #[test]
    fn command_pages_cover_the_subcommands() {
        let cmd = clap::Command::new("demo")
            .version("1.0")
            .subcommand(clap::Command::new("run").about("Run it"))
            .subcommand(clap::Command::new("secret").hide(true))
            .subcommand(
                clap::Command::new("admin").subcommand(clap::Command::new("remove").about("x")),
            );
        let dir = tempdir();
        let mut names: Vec<String> = write_command_pages(cmd, "8", &dir)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "demo-admin-remove.8",
                "demo-admin.8",
                "demo-run.8",
                "demo.8"
            ]
        );
        let main = std::fs::read_to_string(dir.join("demo.8")).unwrap();
        assert!(main.contains("demo\\-run(8)"), "{main}");
        assert!(!main.contains("secret"), "{main}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A fresh directory under the system's temp dir (this crate has no tempfile).
    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tally-man-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
