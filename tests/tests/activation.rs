//! The whole life of a bundle with the real binaries: init, activation request, vendor
//! key, issue, load, checkout with version and maintenance gating, add-on by SIGHUP,
//! renewal by admin reload, check-config, and return to the vendor.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use tally_tests::{bin, wait_until, Daemon, Holder};

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("running a tally binary")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

struct Site {
    root: tempfile::TempDir,
}

impl Site {
    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn publisher(&self) -> Command {
        Command::new(bin("tally-publisher"))
    }

    fn issue(&self, spec: &str, name: &str) -> PathBuf {
        let spec_path = self.path(&format!("{name}.toml"));
        std::fs::write(&spec_path, spec).unwrap();
        let out = self.path(&format!("bundles/{name}.bundle"));
        ok(run(self
            .publisher()
            .arg("issue")
            .arg("--vendor-key")
            .arg(self.path("vendor.key"))
            .arg("--spec")
            .arg(&spec_path)
            .arg("--request")
            .arg(self.path("activation.req"))
            .arg("--out")
            .arg(&out)));
        out
    }
}

fn spec(id: &str, supersedes: &[&str], seats: u32) -> String {
    let supersedes: Vec<String> = supersedes.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        r#"
id = "{id}"
vendor = "Acme Simulation"
supersedes = [{}]
[customer]
id = "C-1001"
name = "Example Corp"
[[feature]]
name = "solver"
seats = {seats}
version_ceiling = "2027.1"
maintenance_until = "2027-06-30"
[feature.attributes]
edition = "pro"
"#,
        supersedes.join(", ")
    )
}

fn total(daemon: &Daemon) -> u64 {
    daemon.feature("solver")["total"].as_u64().unwrap()
}

fn holders(daemon: &Daemon) -> Vec<String> {
    daemon.feature("solver")["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["lease"].as_str().unwrap().to_string())
        .collect()
}

/// Writes a tallyd.toml for `data`, the site's bundles and vendor key.
fn write_config(site: &Site, path: &Path, data: &Path, listen: bool) {
    let listen = if listen {
        "listen = \"127.0.0.1:0\"\n"
    } else {
        ""
    };
    std::fs::write(
        path,
        format!(
            "{listen}http_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nbundle_dir = \"{}\"\nvendor_keys = [\"{}\"]\n",
            data.display(),
            site.path("bundles").display(),
            site.path("vendor.pub").display()
        ),
    )
    .unwrap();
}

fn init_server(data: &Path) {
    ok(run(Command::new(bin("tallyd"))
        .arg("init")
        .arg("--data-dir")
        .arg(data)));
}

#[test]
fn init_request_issue_load_checkout_reload_and_return() {
    let site = Site {
        root: tempfile::tempdir().unwrap(),
    };
    let data = site.path("data");
    std::fs::create_dir_all(site.path("bundles")).unwrap();
    init_server(&data);
    let out = ok(run(Command::new(bin("tallyd"))
        .arg("request")
        .arg("--data-dir")
        .arg(&data)
        .arg("--out")
        .arg(site.path("activation.req"))
        .args(["--customer-ref", "PO-4471"])));
    assert!(out.contains("send it to your vendor"), "{out}");
    ok(run(site
        .publisher()
        .arg("keygen")
        .arg("--out")
        .arg(site.path("vendor"))));
    let inspected = ok(run(site
        .publisher()
        .arg("inspect")
        .arg("--json")
        .arg(site.path("activation.req"))));
    assert!(inspected.contains("PO-4471"));
    site.issue(&spec("base", &[], 2), "base");

    let config = site.path("tallyd.toml");
    write_config(&site, &config, &data, true);
    let summary = ok(run(Command::new(bin("tallyd"))
        .arg("check-config")
        .arg("--config")
        .arg(&config)));
    assert!(
        summary.contains("solver: 2 seats, versions up to 2027.1"),
        "{summary}"
    );

    let daemon = Daemon::run(&config, &site.path("vendor.pub"));
    // Version and maintenance gating through real checkouts.
    let out = run(daemon.tally().args([
        "run",
        "solver",
        "--version",
        "2027.1",
        "--build-date",
        "2027-06-30",
        "--",
        "true",
    ]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(daemon
        .tally()
        .args(["run", "solver", "--version", "2028.0", "--", "true"]));
    assert_eq!(out.status.code(), Some(75));
    assert!(
        stderr(&out).contains("above the licensed version 2027.1"),
        "{}",
        stderr(&out)
    );
    let out =
        run(daemon
            .tally()
            .args(["run", "solver", "--build-date", "2027-07-01", "--", "true"]));
    assert_eq!(out.status.code(), Some(75));
    assert!(
        stderr(&out).contains("maintenance expired"),
        "{}",
        stderr(&out)
    );
    // A client that trusts only the demo key refuses this server.
    let out = run(Command::new(bin("tally"))
        .arg("--server")
        .arg(daemon.addr.to_string())
        .args(["--demo", "status"]));
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));

    // Both seats held; a third is denied.
    let _holder = Holder::start_with(&daemon, &["solver", "--count", "2"], 120);
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 2));
    let held = holders(&daemon);
    let out = run(daemon.tally().args(["run", "solver", "--", "true"]));
    assert_eq!(out.status.code(), Some(75));

    // Add-on: a second bundle for the same feature, picked up on SIGHUP.
    site.issue(&spec("addon", &[], 3), "addon");
    daemon.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(30), || total(&daemon) == 5),
        "the add-on was not loaded; log:\n{}",
        daemon.log_text()
    );
    assert_eq!(holders(&daemon), held, "a reload keeps every lease");
    let out = run(daemon.tally().args(["run", "solver", "--", "true"]));
    assert_eq!(out.status.code(), Some(0));

    // Renewal: a bundle that supersedes the base, loaded by an admin reload. A tampered
    // file next to it is refused by name and does not stop the others.
    site.issue(&spec("renewal", &["base"], 10), "renewal");
    std::fs::write(
        site.path("bundles/tampered.bundle"),
        "-----BEGIN TALLY BUNDLE-----\nAAAA\n",
    )
    .unwrap();
    let out = run(daemon
        .tally()
        .args(["admin", "--admin-token-file"])
        .arg(data.join("admin.token"))
        .arg("reload"));
    // The others are served, and the refusal is the answer: exit 65 with the file named.
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("every lease kept"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("tally: refused: ") && stderr(&out).contains("tampered.bundle: "),
        "{}",
        stderr(&out)
    );
    assert_eq!(total(&daemon), 13);
    assert_eq!(holders(&daemon), held);
    assert!(daemon.log_text().contains("tampered.bundle: refused"));
    let out = run(daemon
        .tally()
        .args(["admin", "--admin-token-file"])
        .arg(site.path("vendor.pub"))
        .arg("reload"));
    assert_eq!(out.status.code(), Some(77), "a wrong token is refused");
    assert!(stderr(&out).contains("admin token is wrong"));
    let out = run(Command::new(bin("tallyd"))
        .arg("check-config")
        .arg("--config")
        .arg(&config));
    assert_eq!(out.status.code(), Some(65));
    assert!(
        stderr(&out).contains("tampered.bundle: refused"),
        "{}",
        stderr(&out)
    );
    std::fs::remove_file(site.path("bundles/tampered.bundle")).unwrap();

    // Return the add-on: with tallyd stopped, `tallyd return` writes a proof the vendor
    // verifies; the bundle is never loaded again.
    daemon.stop();
    // A support bundle for the vendor: what is served, the ledger, and no secrets.
    let support = site.path("support.json");
    ok(run(Command::new(bin("tallyd"))
        .arg("diagnose")
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(&support)));
    let text = std::fs::read_to_string(&support).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<&str> = doc["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["addon", "renewal"]);
    assert_eq!(doc["ledger"]["seats_by_feature"]["solver"], 2);
    let admin_token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    assert!(!text.contains(admin_token.trim()) && !text.contains("SECRET KEY"));
    let proof = site.path("addon.return");
    let out = ok(run(Command::new(bin("tallyd"))
        .arg("return")
        .arg("--config")
        .arg(&config)
        .args(["--bundle", "addon", "--out"])
        .arg(&proof)));
    assert!(out.contains("never load it again"), "{out}");
    let addon = site.path("bundles/addon.bundle");
    let out = ok(run(site
        .publisher()
        .arg("verify-return")
        .arg("--bundle")
        .arg(&addon)
        .arg(&proof)));
    assert!(out.contains("may issue its seats"), "{out}");
    // An edited proof is refused.
    let text = std::fs::read_to_string(&proof).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let c = lines[1].remove(30);
    lines[1].insert(30, if c == 'A' { 'B' } else { 'A' });
    std::fs::write(site.path("edited.return"), lines.join("\n")).unwrap();
    let out = run(site
        .publisher()
        .arg("verify-return")
        .arg("--bundle")
        .arg(&addon)
        .arg(site.path("edited.return")));
    assert_eq!(out.status.code(), Some(65));
    // A proof signed by another server is refused.
    let other = site.path("other-data");
    init_server(&other);
    let other_config = site.path("other.toml");
    write_config(&site, &other_config, &other, false);
    let out = run(Command::new(bin("tallyd"))
        .arg("return")
        .arg("--config")
        .arg(&other_config)
        .args(["--bundle", "addon", "--out"])
        .arg(site.path("other.return")));
    assert_eq!(
        out.status.code(),
        Some(64),
        "the other server does not serve the bundle"
    );
    assert!(
        stderr(&out).contains("no served bundle with id addon"),
        "{}",
        stderr(&out)
    );

    // A proof for the same bundle made and signed by another server's key is refused.
    let forged = tally_protocol::activation::ReturnProof {
        bundle_id: "addon".into(),
        server_key: tally_protocol::keys::SecretKey::from_seed([7; 32]).public(),
        host_fingerprint: "somewhere".into(),
        returned_at: tally_protocol::time::UnixTime(1_800_000_000),
        leases_outstanding: 0,
        released: None,
    };
    let forged_text = tally_protocol::activation::return_to_armored(
        &forged,
        &tally_protocol::keys::SecretKey::from_seed([7; 32]),
    );
    std::fs::write(site.path("forged.return"), forged_text).unwrap();
    let out = run(site
        .publisher()
        .arg("verify-return")
        .arg("--bundle")
        .arg(&addon)
        .arg(site.path("forged.return")));
    assert_eq!(out.status.code(), Some(65));
    assert!(
        stderr(&out).contains("but bundle addon is bound to server key"),
        "{}",
        stderr(&out)
    );

    let daemon = Daemon::run(&config, &site.path("vendor.pub"));
    assert_eq!(total(&daemon), 10, "the returned add-on no longer counts");
    assert!(daemon.log_text().contains("was returned by this server"));
}

#[test]
fn a_bundle_copied_to_a_second_server_serves_nothing_there() {
    let site = Site {
        root: tempfile::tempdir().unwrap(),
    };
    std::fs::create_dir_all(site.path("bundles")).unwrap();
    let first = site.path("first");
    init_server(&first);
    ok(run(Command::new(bin("tallyd"))
        .arg("request")
        .arg("--data-dir")
        .arg(&first)
        .arg("--out")
        .arg(site.path("activation.req"))));
    ok(run(site
        .publisher()
        .arg("keygen")
        .arg("--out")
        .arg(site.path("vendor"))));
    site.issue(&spec("base", &[], 2), "base");
    let second = site.path("second");
    init_server(&second);
    let config = site.path("second.toml");
    write_config(&site, &config, &second, true);
    let out = run(Command::new(bin("tallyd"))
        .arg("check-config")
        .arg("--config")
        .arg(&config));
    assert_eq!(out.status.code(), Some(65));
    assert!(
        stderr(&out).contains("base.bundle: refused: bound to server key"),
        "{}",
        stderr(&out)
    );
    let daemon = Daemon::run(&config, &site.path("vendor.pub"));
    // The clone serves no feature, and clients refuse it: it has no bundle bound to it.
    let out = run(daemon.tally().args(["run", "solver", "--", "true"]));
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
}
