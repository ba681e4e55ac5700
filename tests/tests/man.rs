//! The manual pages the packages ship, written by the binaries' hidden `man` subcommand:
//! a page per command and subcommand (named as `--help` lists them), and tallyd.toml(5)
//! with every setting of the commented example configuration.

use std::path::Path;
use std::process::Command;
use tally_tests::bin;

/// Runs `BIN man --out DIR` and returns the file names it wrote, as it printed them.
fn write_pages(binary: &str, dir: &Path) -> Vec<String> {
    let out = Command::new(bin(binary))
        .args(["man", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{binary} man: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let path = Path::new(l);
            assert!(path.is_file(), "{binary} man printed {l}, which is no file");
            path.file_name().unwrap().to_string_lossy().into_owned()
        })
        .collect();
    assert!(!printed.is_empty(), "{binary} man wrote nothing");
    printed
}

/// The subcommands `BIN [ARGS] --help` lists, without clap's `help`.
fn subcommands(binary: &str, args: &[&str]) -> Vec<String> {
    let out = Command::new(bin(binary))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let names: Vec<String> = help
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(String::from)
        .collect();
    assert!(
        !names.is_empty(),
        "{binary} {args:?} --help lists no commands:\n{help}"
    );
    names
}

/// Each command's page lists every subcommand `--help` lists, and each of them (nested
/// ones too, such as `tally admin cluster add`) has its own page; `man` itself does not.
#[test]
fn every_command_and_subcommand_has_a_page() {
    for (binary, section) in [("tally", "1"), ("tally-publisher", "1"), ("tallyd", "8")] {
        let dir = tempfile::tempdir().unwrap();
        let written = write_pages(binary, dir.path());
        let main = std::fs::read_to_string(dir.path().join(format!("{binary}.{section}")))
            .unwrap_or_else(|e| panic!("{binary}.{section}: {e}; written: {written:?}"));
        assert!(
            main.contains(&format!("\n.TH {binary} {section} ")),
            "{main}"
        );
        // Every command, and below it every command that has commands of its own.
        let mut pending = vec![Vec::<String>::new()];
        let mut pages = 1;
        while let Some(path) = pending.pop() {
            let args: Vec<&str> = path.iter().map(String::as_str).collect();
            for sub in subcommands(binary, &args) {
                let mut sub_path = path.clone();
                sub_path.push(sub.clone());
                let page = format!("{binary}-{}.{section}", sub_path.join("-"));
                assert!(written.contains(&page), "no {page} in {written:?}");
                pages += 1;
                if path.is_empty() {
                    let reference = format!("{binary}-{sub}({section})").replace('-', "\\-");
                    assert!(
                        main.contains(&reference),
                        "{binary}.{section} lacks {reference}"
                    );
                }
                let nested = Command::new(bin(binary))
                    .args(&sub_path)
                    .arg("--help")
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&nested.stdout).contains("\nCommands:\n") {
                    pending.push(sub_path);
                }
            }
        }
        let commands: Vec<&String> = written.iter().filter(|w| !w.ends_with(".5")).collect();
        assert_eq!(commands.len(), pages, "{binary}: {written:?}");
        assert!(
            !written.iter().any(|w| w.contains("-man.")),
            "the hidden man subcommand got a page: {written:?}"
        );
    }
}

/// tallyd.toml(5) has an entry for every setting of packaging/tallyd.toml (those set and
/// those shown commented out), each followed by its comment's words.
#[test]
fn the_config_page_documents_every_setting() {
    let dir = tempfile::tempdir().unwrap();
    let written = write_pages("tallyd", dir.path());
    assert!(
        written.contains(&"tallyd.toml.5".to_string()),
        "{written:?}"
    );
    let page = std::fs::read_to_string(dir.path().join("tallyd.toml.5")).unwrap();
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/tallyd.toml"),
    )
    .unwrap();
    let mut keys = 0;
    for line in example.lines() {
        let setting = line.trim_start_matches("# ");
        let Some((key, _)) = setting.split_once(" = ") else {
            continue;
        };
        if !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            continue;
        }
        keys += 1;
        // An entry's tag: the setting in bold at the start of a line, as in the file.
        let tag = format!("\n\\fB{}", line.replace('-', "\\-"));
        assert!(page.contains(&tag), "tallyd.toml.5 has no entry {line:?}");
    }
    assert!(
        keys >= 25,
        "only {keys} settings found in packaging/tallyd.toml"
    );
    // The explanations are the file's comments.
    for words in [
        "UDP address for QUIC.",
        "Journal events already exported are deleted after this many days.",
    ] {
        assert!(page.contains(words), "tallyd.toml.5 lacks {words:?}");
    }
    assert!(page.contains("\n.SH SETTINGS\n"), "{page}");
}
