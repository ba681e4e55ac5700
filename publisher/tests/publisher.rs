//! The vendor's tool: keys, issue, inspect, verify, FlexLM import, end to end through the
//! real `tally-publisher` binary and its library.

use std::path::{Path, PathBuf};
use std::process::Command;
use tally_protocol::activation::{self, ActivationRequest};
use tally_protocol::bundle::{self, Seats};
use tally_protocol::keys::{self, SecretKey};
use tally_protocol::time::{UnixTime, DAY};
use tally_publisher::{flexlm, spec::Spec};

/// Asserts that the importer listed a line holding `needle` among what it could not map.
fn assert_unmapped(import: &flexlm::Import, needle: &str) {
    assert!(
        import.unmapped.iter().any(|u| u.contains(needle)),
        "{needle:?} not in {:#?}",
        import.unmapped
    );
}

fn publisher() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tally-publisher"))
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn request_file(dir: &Path, server: &SecretKey) -> PathBuf {
    let request = ActivationRequest {
        server_key: server.public(),
        host_fingerprint: "host-fp".into(),
        hostname: "lic1".into(),
        os: "Debian (x86_64)".into(),
        virtualization: None,
        customer_reference: Some("PO-1".into()),
        created_at: UnixTime(1_800_000_000),
    };
    let path = dir.join("activation.req");
    std::fs::write(&path, activation::request_to_armored(&request, server)).unwrap();
    path
}

#[test]
fn keygen_issue_inspect_verify() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("vendor");
    let out = publisher()
        .arg("keygen")
        .arg("--out")
        .arg(&prefix)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = prefix.with_extension("key");
    assert_eq!(
        std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Never overwrites a key.
    let again = publisher()
        .arg("keygen")
        .arg("--out")
        .arg(&prefix)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(64));

    let server = SecretKey::from_seed([4; 32]);
    let request = request_file(dir.path(), &server);
    let spec = dir.path().join("spec.toml");
    std::fs::write(
        &spec,
        r#"
vendor = "Acme"
valid_until = "2027-12-31"
[customer]
id = "C-1"
name = "Example Corp"
[[feature]]
name = "solver"
seats = 20
version_ceiling = "2027.2"
maintenance_until = "2027-06-30"
expires = "2027-12-31"
[feature.attributes]
edition = "pro"
[[feature]]
name = "viewer"
seats = "uncounted"
"#,
    )
    .unwrap();
    let bundle_path = dir.path().join("c1.bundle");
    let out = publisher()
        .arg("issue")
        .arg("--vendor-key")
        .arg(&secret)
        .arg("--spec")
        .arg(&spec)
        .arg("--request")
        .arg(&request)
        .arg("--out")
        .arg(&bundle_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let signed = bundle::from_armored(&std::fs::read_to_string(&bundle_path).unwrap()).unwrap();
    let vendor = keys::public_key_from_armored(
        &std::fs::read_to_string(prefix.with_extension("pub")).unwrap(),
    )
    .unwrap();
    let b = bundle::verify(&signed, &[vendor]).unwrap().bundle;
    assert_eq!(b.binding[0].server_key, server.public());
    assert_eq!(b.binding[0].host_fingerprint, "host-fp");
    assert_eq!(b.features[0].seats, Seats::Counted(20));
    assert_eq!(b.features[1].seats, Seats::Uncounted);
    // "until 2027-12-31" means through that day.
    let end = UnixTime::from_date("2027-12-31").unwrap().plus_secs(DAY);
    assert_eq!(b.features[0].expires, Some(end));
    assert_eq!(b.valid_until, Some(end));
    assert_eq!(b.features[0].attributes["edition"], "pro");

    let out = publisher()
        .arg("inspect")
        .arg("--json")
        .arg(&bundle_path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["features"][0]["expires"], "2027-12-31");
    assert_eq!(doc["customer"]["name"], "Example Corp");
    let out = publisher().arg("inspect").arg(&request).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("lic1"));

    let out = publisher()
        .arg("verify")
        .arg("--vendor-pub")
        .arg(prefix.with_extension("pub"))
        .arg(&bundle_path)
        .output()
        .unwrap();
    assert!(out.status.success());
    // One edited character in the body: refused with exit 65, naming the file.
    let text = std::fs::read_to_string(&bundle_path).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let line = &mut lines[3];
    let c = line.remove(10);
    line.insert(10, if c == 'A' { 'B' } else { 'A' });
    let edited = dir.path().join("edited.bundle");
    std::fs::write(&edited, lines.join("\n") + "\n").unwrap();
    let out = publisher()
        .arg("verify")
        .arg("--vendor-pub")
        .arg(prefix.with_extension("pub"))
        .arg(&edited)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stderr).contains("edited.bundle"));
}

#[test]
fn spec_errors_name_what_is_wrong() {
    let server = SecretKey::from_seed([4; 32]);
    let request = ActivationRequest {
        server_key: server.public(),
        host_fingerprint: "h".into(),
        hostname: "h".into(),
        os: "linux".into(),
        virtualization: None,
        customer_reference: None,
        created_at: UnixTime(0),
    };
    let p = Path::new("spec.toml");
    let err = Spec::parse(p, "vendor = \"A\"\n[customer]\nid = \"c\"\nname = \"n\"\n[[feature]]\nname = \"f\"\nseat = 3\n").unwrap_err();
    assert!(err.to_string().contains("line 7"), "{err}");
    let spec = Spec::parse(p, "vendor = \"A\"\n[customer]\nid = \"c\"\nname = \"n\"\n[[feature]]\nname = \"f\"\nseats = \"lots\"\n").unwrap();
    let err = spec
        .to_bundle(p, &request, "x".into(), UnixTime(0))
        .unwrap_err();
    assert!(
        err.to_string().contains("feature 'f': seats: 'lots'"),
        "{err}"
    );
    let spec = Spec::parse(p, "vendor = \"A\"\n[customer]\nid = \"\"\nname = \"\"\n[[feature]]\nname = \"f\"\nseats = 1\n").unwrap();
    assert!(spec
        .to_bundle(p, &request, "x".into(), UnixTime(0))
        .is_err());
}

#[test]
fn lost_seat_terms_go_from_the_spec_into_a_version_2_bundle() {
    use tally_protocol::bundle::{LostSeatTerms, OnLostSeat};
    let server = SecretKey::from_seed([4; 32]);
    let vendor = SecretKey::from_seed([5; 32]);
    let request = ActivationRequest {
        server_key: server.public(),
        host_fingerprint: "h".into(),
        hostname: "h".into(),
        os: "linux".into(),
        virtualization: None,
        customer_reference: None,
        created_at: UnixTime(0),
    };
    let p = Path::new("spec.toml");
    let head = "vendor = \"A\"\n[customer]\nid = \"c\"\nname = \"n\"\n";
    let build = |features: &str| {
        Spec::parse(p, &format!("{head}{features}"))
            .unwrap()
            .to_bundle(p, &request, "x".into(), UnixTime(0))
    };
    let b = build(
        "[[feature]]\nname = \"solver\"\nseats = 2\nlost_seat_grace_secs = 90\non_lost_seat = \"stop\"\n\
         [[feature]]\nname = \"viewer\"\nseats = 2\non_lost_seat = \"warn\"\n\
         [[feature]]\nname = \"plain\"\nseats = 2\n",
    )
    .unwrap();
    assert_eq!(
        b.features[0].lost_seat,
        Some(LostSeatTerms {
            grace_secs: 90,
            action: OnLostSeat::Stop
        })
    );
    assert_eq!(b.features[1].lost_seat, Some(LostSeatTerms::DEFAULT));
    assert_eq!(b.features[2].lost_seat, None);
    // The terms survive signing (as format version 2) and verification.
    let signed = bundle::sign(&b, &vendor);
    assert_eq!(signed.body.first(), Some(&1));
    assert_eq!(
        bundle::verify(&signed, &[vendor.public()]).unwrap().bundle,
        b
    );
    // A spec without terms still makes a version-1 bundle an older tally reads.
    let plain = build("[[feature]]\nname = \"plain\"\nseats = 2\n").unwrap();
    assert_eq!(bundle::sign(&plain, &vendor).body.first(), Some(&0));
    // A word that is neither is refused, naming the feature and the key.
    let err =
        build("[[feature]]\nname = \"solver\"\nseats = 2\non_lost_seat = \"kill\"\n").unwrap_err();
    assert!(
        err.to_string()
            .contains("feature 'solver': on_lost_seat: 'kill' is neither"),
        "{err}"
    );
}

/// Parses an imported spec as the vendor would after filling in the customer.
fn reviewed(spec: &str) -> tally_protocol::bundle::Bundle {
    let filled = spec
        .replace("id = \"\"", "id = \"C-9\"")
        .replace("name = \"\"", "name = \"Example\"");
    let parsed = Spec::parse(Path::new("imported.toml"), &filled).unwrap();
    let request = ActivationRequest {
        server_key: SecretKey::from_seed([1; 32]).public(),
        host_fingerprint: "h".into(),
        hostname: "h".into(),
        os: "linux".into(),
        virtualization: None,
        customer_reference: None,
        created_at: UnixTime(0),
    };
    parsed
        .to_bundle(
            Path::new("imported.toml"),
            &request,
            "imported".into(),
            UnixTime(0),
        )
        .unwrap()
}

#[test]
fn import_served_license_with_continuations_increment_and_upgrade() {
    let text = std::fs::read_to_string(data("acme-served.lic")).unwrap();
    let import = flexlm::import("acme-served.lic", &text).unwrap();
    assert_eq!(import.features, 4);
    let b = reviewed(&import.spec);
    assert_eq!(b.vendor, "acmed");
    let solver: Vec<_> = b.features.iter().filter(|f| f.name == "solver").collect();
    assert_eq!(solver.len(), 3);
    assert_eq!(solver[0].seats, Seats::Counted(20));
    assert_eq!(solver[0].version_ceiling.as_deref(), Some("2027.1"));
    assert_eq!(solver[0].overdraft, 2);
    assert_eq!(solver[0].borrow_limit_secs, 72 * 3600);
    assert_eq!(
        solver[0].attributes["vendor_string"],
        "edition=pro;cores=64"
    );
    assert_eq!(solver[0].attributes["serial_number"], "AC-2026-0042");
    assert_eq!(solver[0].attributes["notice"], "Example Corp - PO 4471");
    assert_eq!(
        solver[0].expires,
        Some(UnixTime::from_date("2028-01-01").unwrap())
    );
    assert_eq!(solver[1].seats, Seats::Counted(5));
    assert_eq!(solver[1].starts, UnixTime::from_date("2026-06-01"));
    assert_eq!(solver[2].upgrade_from.as_deref(), Some("2026.0"));
    assert_eq!(solver[2].seats, Seats::Counted(3));
    let viewer = b.features.iter().find(|f| f.name == "viewer").unwrap();
    assert_eq!(viewer.seats, Seats::Uncounted);
    assert_eq!(viewer.expires, None);
    // Nothing is dropped silently: signatures, host ids and the server line are named.
    for needle in ["SIGN", "HOSTID=ANY", "SERVER lichost", "VENDOR acmed"] {
        assert!(
            import.spec.contains(needle),
            "{needle} not mentioned:\n{}",
            import.spec
        );
    }
    assert_unmapped(&import, "line 8: FEATURE solver: SIGN");
}

/// The imported spec's `[[feature]]` tables named `name`, read as plain TOML: the new
/// keys (`share`, `suite`, component counts) are checked as written, before the spec
/// parser knows them.
fn features_named<'a>(spec: &'a toml::Value, name: &str) -> Vec<&'a toml::Value> {
    spec["feature"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["name"].as_str() == Some(name))
        .collect()
}

/// A real-shaped engineering license file: a suite, a package with component versions
/// and counts, DUP_GROUP in every form FlexLM has, keywords in lower case, continuations
/// and quoted values with spaces.
#[test]
fn import_packages_suites_and_dup_groups() {
    let text = std::fs::read_to_string(data("suite-package.lic")).unwrap();
    let import = flexlm::import_at(
        "suite-package.lic",
        &text,
        UnixTime::from_date("2026-12-01").unwrap(),
    )
    .unwrap();
    let spec: toml::Value = toml::from_str(&import.spec).unwrap();
    let strings = |v: &toml::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect()
    };
    // OPTIONS=SUITE: one seat of the package serves all its components for one user.
    let suite = features_named(&spec, "design_suite");
    assert_eq!(suite.len(), 1);
    let suite = suite[0];
    assert_eq!(suite["suite"].as_bool(), Some(true), "{}", import.spec);
    assert_eq!(
        strings(&suite["components"]),
        ["modeler:3.0", "drafter", "renderer"]
    );
    assert_eq!(suite["seats"].as_integer(), Some(10));
    assert_eq!(suite["expires"].as_str(), Some("permanent"), "1-jan-0");
    // DUP_GROUP=UH on a suite's seats: a tally suite already shares by user.
    assert!(suite.get("share").is_none(), "{}", import.spec);
    assert_unmapped(&import, "design_suite: DUP_GROUP on a suite");
    // A package that is not a suite keeps each component's version and count: 3 package
    // seats give solver 3 x 2 seats at ceiling 2024.06 and mesher 3 seats at 3.1.
    let pack = features_named(&spec, "sim_pack")[0];
    assert_eq!(
        strings(&pack["components"]),
        ["solver:2024.06:2", "mesher:3.1", "viewer"]
    );
    assert_eq!(pack["seats"].as_integer(), Some(3));
    assert!(pack.get("suite").is_none(), "{}", import.spec);
    assert!(pack.get("share").is_none(), "DUP_GROUP=NONE shares nothing");
    // Every DUP_GROUP combination, in any order or case, as the fields it compares.
    let solver = features_named(&spec, "solver");
    assert_eq!(solver.len(), 2);
    assert_eq!(solver[0]["share"].as_str(), Some("user"));
    assert_eq!(solver[0]["seats"].as_integer(), Some(15));
    assert_eq!(
        solver[0]["attributes"]["vendor_string"].as_str(),
        Some("tier=gold; site=Lyon")
    );
    assert_eq!(solver[1]["upgrade_from"].as_str(), Some("2023.0"));
    assert_eq!(
        solver[1]["share"].as_str(),
        Some("user+host"),
        "DUP_GROUP=HU"
    );
    let mesher = features_named(&spec, "mesher")[0];
    assert_eq!(mesher["share"].as_str(), Some("user+host+display"));
    // V has no equivalent: no share, and the reason is listed; SITE is the whole site.
    assert!(features_named(&spec, "plotter")[0].get("share").is_none());
    assert_eq!(
        features_named(&spec, "lic_admin")[0]["share"].as_str(),
        Some("site")
    );
    assert_unmapped(
        &import,
        "line 16: FEATURE plotter: DUP_GROUP=UHV ('V' groups by a vendor-defined string",
    );
    // Named users and hosts, and TS_OK, have their keys.
    let plotter = features_named(&spec, "plotter")[0];
    assert_eq!(plotter["named"].as_str(), Some("user"));
    assert!(plotter.get("named_limit").is_none(), "the seats");
    let admin = features_named(&spec, "lic_admin")[0];
    assert_eq!(admin["named"].as_str(), Some("host"));
    assert_eq!(admin["named_limit"].as_integer(), Some(3));
    let renderer = features_named(&spec, "renderer");
    assert!(renderer
        .iter()
        .any(|r| r.get("remote_sessions").and_then(|v| v.as_str()) == Some("allow")));
    // What is now mapped is no longer listed as dropped.
    for gone in [
        "OPTIONS=SUITE",
        "DUP_GROUP=UH ",
        "DUP_GROUP=U ",
        "DUP_GROUP=NONE",
        "carries a version",
    ] {
        assert!(
            !import.unmapped.iter().any(|u| u.contains(gone)),
            "{gone:?} still listed: {:#?}",
            import.unmapped
        );
    }
}

/// A suite's components carry no count (FlexLM allows none there); a malformed
/// component is refused by line.
#[test]
fn import_suite_counts_dropped_and_bad_components_refused() {
    let now = UnixTime::from_date("2026-12-01").unwrap();
    let import = flexlm::import_at(
        "t.lic",
        "PACKAGE s v 1.0 COMPONENTS=\"a:1.0:2 b\" OPTIONS=SUITE\nFEATURE s v 1.0 permanent 4\n",
        now,
    )
    .unwrap();
    let spec: toml::Value = toml::from_str(&import.spec).unwrap();
    let s = features_named(&spec, "s")[0];
    assert_eq!(
        s["components"][0].as_str(),
        Some("a:1.0"),
        "{}",
        import.spec
    );
    assert_unmapped(
        &import,
        "component 'a:1.0:2' of a suite carries a count (2)",
    );
    for bad in ["a:1.0:x", "a::2", ":1.0", "a:1:0", "a:1:2:3"] {
        let err = flexlm::import_at(
            "t.lic",
            &format!("FEATURE p v 1 permanent 1\nPACKAGE p v 1 COMPONENTS=\"ok {bad}\"\n"),
            now,
        )
        .unwrap_err();
        assert_eq!(err.line, 2, "{bad}: {err}");
        assert!(err.message.contains(bad), "{err}");
    }
}

/// `import-rlm` through the real binary on a real-shaped RLM file: continuations (with
/// and without a backslash), comments, quoting, keywords in any case, share, hold and
/// min_checkout, tokens, replace, and what has no equivalent listed by line.
#[test]
fn import_rlm_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("spec.toml");
    let out = publisher()
        .arg("import-rlm")
        .arg(data("rlm-served.lic"))
        .arg("--out")
        .arg(&out_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("7 feature entries written to"),
        "{stdout}"
    );
    for needle in [
        "line 22: LICENSE viewer: hostid=0050569a9999 (node-locks",
        "line 26: LICENSE rlm_roam (enables roaming",
        "line 18: LICENSE optimizer: token alternative <solver 2027.1 1>",
        "mapped, not exactly the same: 2",
        "line 10: LICENSE solver: hold=120 -> linger_secs = 120",
        "line 15: LICENSE mesher: min_checkout=600 -> linger_secs = 600: RLM keeps",
        "line 7: LICENSE solver left out: replaced by line 10 (replace, issued 2026-03-02",
        "line 24: LICENSE trial_tool expired on 2026-06-30",
    ] {
        assert!(stdout.contains(needle), "{needle:?} not in:\n{stdout}");
    }
    // Signature data goes without a word; so does nothing else.
    for quiet in ["sig=", "SIG=", "_ck", "60PG451"] {
        assert!(!stdout.contains(quiet), "{quiet:?} in:\n{stdout}");
    }
    let spec_text = std::fs::read_to_string(&out_path).unwrap();
    let spec: toml::Value = toml::from_str(&spec_text).unwrap();
    assert_eq!(spec["vendor"].as_str(), Some("acme"));
    assert_eq!(spec["customer"]["name"].as_str(), Some("Example Corp"));
    let solver = features_named(&spec, "solver");
    assert_eq!(solver.len(), 1, "the 2025 line is replaced: {spec_text}");
    let solver = solver[0];
    assert_eq!(solver["seats"].as_integer(), Some(20));
    assert_eq!(solver["share"].as_str(), Some("user+host"));
    assert_eq!(solver["share_limit"].as_integer(), Some(4));
    assert_eq!(solver["linger_secs"].as_integer(), Some(120));
    assert_eq!(solver["borrow_limit_hours"].as_integer(), Some(72));
    assert_eq!(solver["expires"].as_str(), Some("2099-12-31"));
    assert_eq!(
        solver["attributes"]["options"].as_str(),
        Some("edition=pro; cores=64")
    );
    assert_eq!(solver["attributes"]["contract"].as_str(), Some("PO-4471"));
    let mesher = features_named(&spec, "mesher")[0];
    assert_eq!(mesher["share"].as_str(), Some("user"));
    assert_eq!(mesher["linger_secs"].as_integer(), Some(600));
    assert_eq!(
        features_named(&spec, "credits")[0]["seats"].as_integer(),
        Some(100)
    );
    for (product, tokens) in [("optimizer", 5), ("postproc", 2)] {
        let f = features_named(&spec, product)[0];
        assert!(f.get("seats").is_none(), "{spec_text}");
        assert_eq!(f["token_pool"].as_str(), Some("credits"));
        assert_eq!(f["tokens"].as_integer(), Some(tokens));
    }
    assert_eq!(
        features_named(&spec, "viewer")[0]["seats"].as_str(),
        Some("uncounted")
    );
    let viewer = features_named(&spec, "viewer")[0];
    assert_eq!(viewer["named"].as_str(), Some("user"));
    assert_eq!(viewer["named_limit"].as_integer(), Some(5));
    let trial = features_named(&spec, "trial_tool")[0];
    assert_eq!(trial["starts"].as_str(), Some("2026-06-01"));
    assert_eq!(trial["remote_sessions"].as_str(), Some("deny"));
    assert!(features_named(&spec, "rlm_roam").is_empty());
    assert!(
        spec_text.contains("by tally-publisher import-rlm"),
        "{spec_text}"
    );
    assert!(spec_text.contains("# EXPIRED: line 24"), "{spec_text}");

    // Without --out: the same spec on standard output, the review on standard error.
    let piped = publisher()
        .arg("import-rlm")
        .arg(data("rlm-served.lic"))
        .output()
        .unwrap();
    assert_eq!(piped.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&piped.stdout), spec_text);
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(stderr.contains("written to standard output"), "{stderr}");
    assert!(stderr.contains("line 26: LICENSE rlm_roam"), "{stderr}");

    // An existing output file is never overwritten (64); a bad line names the file and
    // the line (65), nothing written.
    let again = publisher()
        .arg("import-rlm")
        .arg(data("rlm-served.lic"))
        .arg("--out")
        .arg(&out_path)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(64));
    let broken = dir.path().join("broken.lic");
    std::fs::write(
        &broken,
        "HOST h ANY 5053\nISV acme\n# fine so far\nLICENSE acme solver 1.0 31-feb-2027 5 sig=\"00\"\n",
    )
    .unwrap();
    let bad_out = dir.path().join("never.toml");
    let bad = publisher()
        .arg("import-rlm")
        .arg(&broken)
        .arg("--out")
        .arg(&bad_out)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(65));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("broken.lic") && stderr.contains("line 4"),
        "{stderr}"
    );
    assert!(stderr.contains("31-feb-2027"), "{stderr}");
    assert!(!bad_out.exists());
}

/// An RLM file without the new licensing keys gives a spec the spec parser reads and
/// turns into a bundle, as the vendor's next step does.
#[test]
fn import_rlm_plain_file_round_trips_into_a_bundle() {
    let import = tally_publisher::rlm::import(
        "plain.lic",
        "HOST h 0050569a1b2c 5053\nISV acme\n\
         LICENSE acme solver 2027.1 31-dec-2099 8 hold=30 max_roam=2 start=1-jan-2026 \\\n\
         \tissued=1-dec-2025 issuer=\"Acme Sim\" sig=\"AB CD\"\n\
         UPGRADE acme solver 2026.0 2027.1 31-dec-2099 3 sig=EF\n\
         LICENSE acme viewer 1.0 permanent uncounted\n",
    )
    .unwrap();
    let b = reviewed(&import.spec);
    assert_eq!(b.vendor, "acme");
    assert_eq!(b.features.len(), 3);
    let solver = &b.features[0];
    assert_eq!(solver.seats, Seats::Counted(8));
    assert_eq!(solver.linger_secs, 30);
    assert_eq!(solver.borrow_limit_secs, 48 * 3600);
    assert_eq!(solver.starts, UnixTime::from_date("2026-01-01"));
    assert_eq!(solver.attributes["issuer"], "Acme Sim");
    assert_eq!(
        solver.expires,
        Some(UnixTime::from_date("2100-01-01").unwrap())
    );
    assert_eq!(b.features[1].upgrade_from.as_deref(), Some("2026.0"));
    assert_eq!(b.features[1].seats, Seats::Counted(3));
    assert_eq!(b.features[2].seats, Seats::Uncounted);
    assert!(import.unmapped.is_empty(), "{:?}", import.unmapped);
}

#[test]
fn import_old_style_keys_and_duplicate_features() {
    let text = std::fs::read_to_string(data("old-style.lic")).unwrap();
    let import = flexlm::import("old-style.lic", &text).unwrap();
    let b = reviewed(&import.spec);
    let mathlib: Vec<_> = b.features.iter().filter(|f| f.name == "mathlib").collect();
    assert_eq!(mathlib.len(), 2);
    assert_eq!(
        mathlib[0].expires,
        Some(UnixTime::from_date("2028-01-02").unwrap())
    );
    let plotter = b.features.iter().find(|f| f.name == "plotter").unwrap();
    assert_eq!(plotter.seats, Seats::Uncounted, "count 0 is uncounted");
    assert!(import.spec.contains("0123456789AB"), "old-style key named");
    assert!(import.spec.contains("a second FEATURE line for 'mathlib'"));
}

#[test]
fn import_refuses_impossible_dates_by_line() {
    let text = std::fs::read_to_string(data("broken.lic")).unwrap();
    let err = flexlm::import("broken.lic", &text).unwrap_err();
    assert_eq!(err.line, 2);
    assert!(err.message.contains("31-feb-2027"), "{err}");
    let out = publisher()
        .arg("import-flexlm")
        .arg(data("broken.lic"))
        .arg("--out")
        .arg(std::env::temp_dir().join("never-written.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stderr).contains("broken.lic"));
}

/// A vendor key pair (`vendor.key`, `vendor.pub`) and an activation request in `dir`.
fn vendor_and_request(dir: &Path) -> (PathBuf, PathBuf) {
    let out = publisher()
        .arg("keygen")
        .arg("--out")
        .arg(dir.join("vendor"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let request = request_file(dir, &SecretKey::from_seed([7; 32]));
    (dir.join("vendor.key"), request)
}

fn issue_cmd(key_flag: &str, key: &Path, spec: &Path, request: &Path, out: &Path) -> Command {
    let mut cmd = publisher();
    cmd.arg("issue")
        .arg(key_flag)
        .arg(key)
        .arg("--spec")
        .arg(spec)
        .arg("--request")
        .arg(request)
        .arg("--out")
        .arg(out);
    cmd
}

#[test]
fn issue_refuses_an_ended_feature_or_bundle_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let (key, request) = vendor_and_request(dir.path());
    let spec = dir.path().join("spec.toml");
    std::fs::write(
        &spec,
        r#"
vendor = "Acme"
valid_until = "2021-06-30"
[customer]
id = "C-1"
name = "Example"
[[feature]]
name = "solver"
seats = 2
expires = "2020-12-31"
[[feature]]
name = "viewer"
seats = 1
"#,
    )
    .unwrap();
    let out_path = dir.path().join("c1.bundle");
    let out = issue_cmd("--vendor-key", &key, &spec, &request, &out_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    assert!(stderr.contains("spec.toml"), "{stderr}");
    assert!(
        stderr.contains("feature 'solver' expired on 2020-12-31"),
        "{stderr}"
    );
    assert!(
        stderr.contains("the bundle ended on 2021-06-30 (valid_until)"),
        "{stderr}"
    );
    assert!(stderr.contains("--allow-expired"), "{stderr}");
    assert!(!stderr.contains("viewer"), "{stderr}");
    assert!(!out_path.exists(), "nothing written when refused");

    let out = issue_cmd("--vendor-key", &key, &spec, &request, &out_path)
        .arg("--allow-expired")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning:") && stderr.contains("feature 'solver' expired on 2020-12-31"),
        "{stderr}"
    );
    assert!(out_path.exists());

    // The rule itself, with made-up times: the last valid day is still valid, the next
    // instant is not.
    let spec = Spec::parse(
        Path::new("s.toml"),
        "vendor = \"A\"\n[customer]\nid = \"C\"\nname = \"N\"\n[[feature]]\nname = \"f\"\nseats = 1\nexpires = \"2027-12-31\"\n",
    )
    .unwrap();
    let req =
        activation::request_from_armored(&std::fs::read_to_string(&request).unwrap()).unwrap();
    let end = UnixTime::from_date("2028-01-01").unwrap();
    let b = spec
        .to_bundle(Path::new("s.toml"), &req, "id".into(), UnixTime(end.0 - 1))
        .unwrap();
    assert!(tally_publisher::spec::already_ended(&b, UnixTime(end.0 - 1)).is_empty());
    assert_eq!(
        tally_publisher::spec::already_ended(&b, end),
        vec!["feature 'f' expired on 2027-12-31, before today 2028-01-01".to_string()]
    );
}

#[test]
fn vendor_key_flags_are_one_spelling_and_old_ones_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let (key, request) = vendor_and_request(dir.path());
    let spec = dir.path().join("spec.toml");
    std::fs::write(
        &spec,
        "vendor = \"Acme\"\n[customer]\nid = \"C-1\"\nname = \"Example\"\n[[feature]]\nname = \"solver\"\nseats = 2\n",
    )
    .unwrap();
    // Help names `--vendor-key` (the .key file) and `--vendor-pub` (the .pub file) only.
    let help = publisher().args(["issue", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--vendor-key"), "{help}");
    assert!(!help.contains("--key "), "{help}");
    let help = publisher().args(["verify", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--vendor-pub"));
    // The old spelling `--key` still issues, for scripts written before.
    let old = dir.path().join("old.bundle");
    let out = issue_cmd("--key", &key, &spec, &request, &old)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = dir.path().join("new.bundle");
    let out = issue_cmd("--vendor-key", &key, &spec, &request, &new)
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = publisher()
        .arg("verify")
        .arg("--vendor-pub")
        .arg(dir.path().join("vendor.pub"))
        .arg(&new)
        .output()
        .unwrap();
    assert!(out.status.success());
}

/// Every key a spec may have (the fields of `Spec`, `CustomerSpec` and `FeatureSpec` in
/// src/spec.rs, which `deny_unknown_fields` makes the whole list) is named in the README.
#[test]
fn readme_documents_every_spec_key() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read_to_string(root.join("src/spec.rs")).unwrap();
    let readme = std::fs::read_to_string(root.join("../README.md")).unwrap();
    let mut keys = Vec::new();
    for name in [
        "pub struct Spec {",
        "pub struct CustomerSpec {",
        "pub struct FeatureSpec {",
    ] {
        let start = source
            .find(name)
            .unwrap_or_else(|| panic!("{name} in spec.rs"));
        let body = &source[start..start + source[start..].find("\n}").unwrap()];
        for line in body.lines() {
            if let Some(field) = line
                .trim()
                .strip_prefix("pub ")
                .and_then(|l| l.split_once(':'))
            {
                keys.push(field.0.trim().to_string());
            }
        }
    }
    assert!(keys.len() >= 20, "{keys:?}");
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| {
            let k = k.as_str();
            // As a TOML key in the example, or in backticks in the text.
            let named = readme
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{k} ")))
                || readme.contains(&format!("`{k}`"))
                || (k == "feature" && readme.contains("[[feature]]"))
                || (k == "customer" && readme.contains("[customer]"))
                || (k == "attributes" && readme.contains("[feature.attributes]"));
            !named
        })
        .collect();
    assert!(
        missing.is_empty(),
        "spec keys the README does not name: {missing:?}"
    );
}

/// The imported models sign into bundles that say them: a suite, shared seats, the
/// package's component versions and counts (FlexLM), a token product and a share
/// limit (RLM).
#[test]
fn imported_models_sign_into_bundles() {
    let text = std::fs::read_to_string(data("suite-package.lic")).unwrap();
    let import = flexlm::import_at(
        "suite-package.lic",
        &text,
        UnixTime::from_date("2026-12-01").unwrap(),
    )
    .unwrap();
    let b = reviewed(&import.spec);
    let named = |b: &tally_protocol::bundle::Bundle, n: &str| {
        b.features.iter().find(|f| f.name == n).cloned().unwrap()
    };
    let suite = named(&b, "design_suite");
    assert!(suite.suite && suite.components.len() == 3, "{suite:?}");
    let pack = named(&b, "sim_pack");
    let solver = &pack.components[0];
    assert_eq!(
        (
            solver.name.as_str(),
            solver.version.as_deref(),
            solver.count
        ),
        ("solver", Some("2024.06"), 2)
    );
    assert!(pack.share.is_none(), "DUP_GROUP=NONE shares nothing");
    assert!(b
        .features
        .iter()
        .any(|f| f.share.is_some_and(|s| s.user && s.host)));

    let text = std::fs::read_to_string(data("rlm-served.lic")).unwrap();
    let import = tally_publisher::rlm::import("rlm-served.lic", &text).unwrap();
    let b = reviewed(&import.spec);
    let optimizer = named(&b, "optimizer");
    let tokens = optimizer.tokens.expect("a token product");
    assert_eq!((tokens.pool.as_str(), tokens.per_seat), ("credits", 5));
    let share = named(&b, "solver").share.expect("share=uh:4");
    assert_eq!((share.user, share.host, share.limit), (true, true, 4));
}
