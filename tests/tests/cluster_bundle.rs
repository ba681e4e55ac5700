//! One bundle for a cluster of servers, with the real binaries: three `tallyd init` data
//! dirs, three `tallyd request`, one `tally-publisher issue` with `--request` repeated;
//! the publisher shows the members, and refuses a tampered request or the same server
//! twice; each member's tallyd loads the bundle and a fourth server refuses it. The
//! servers are not configured as a cluster here (`[[cluster]]`): the tests check the
//! binding, and that a server not configured as a member serves none of its seats.
//! tests/tests/cluster.rs runs them as one.

use std::path::PathBuf;
use std::process::{Command, Output};
use tally_tests::cluster::ClusterSite as Cluster;
use tally_tests::{bin, ok, run};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn one_bundle_binds_three_servers_with_seats_counted_once() {
    let c = Cluster::new(3);
    let keys: Vec<String> = (0..3).map(|i| c.key(i)).collect();
    let out = ok(c.issue(&c.all_requests(), "ha.bundle"));
    assert!(out.contains("bound to  3 servers"), "{out}");
    for k in &keys {
        assert!(out.contains(k), "issue names every member: {out}");
    }
    // inspect: every member, and the seats as the spec says them (not times three).
    let text = ok(run(Command::new(bin("tally-publisher"))
        .arg("inspect")
        .arg(c.path("ha.bundle"))));
    assert!(text.contains("bound to   3 servers"), "{text}");
    for k in &keys {
        assert!(text.contains(&format!("server key {k}")), "{text}");
    }
    assert!(text.contains("solver: 5 seats"), "{text}");
    let json = ok(run(Command::new(bin("tally-publisher"))
        .arg("inspect")
        .arg("--json")
        .arg(c.path("ha.bundle"))));
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["servers_bound"], 3, "{doc}");
    assert_eq!(doc["binding"], serde_json::Value::Null, "{doc}");
    let members: Vec<&str> = doc["cluster"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["server_key"].as_str().unwrap())
        .collect();
    assert_eq!(members, keys);
    assert_eq!(doc["features"][0]["seats"], 5, "{doc}");

    // One request works as before: one server, `binding` as it always was.
    let out = ok(c.issue(&c.all_requests()[..1], "one.bundle"));
    assert!(
        out.contains(&format!("bound to  server key {}", keys[0])),
        "{out}"
    );
    let json = ok(run(Command::new(bin("tally-publisher"))
        .arg("inspect")
        .arg("--json")
        .arg(c.path("one.bundle"))));
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["binding"]["server_key"], keys[0].as_str(), "{doc}");
    assert_eq!(doc["servers_bound"], 1, "{doc}");
}

#[test]
fn the_same_server_twice_a_tampered_request_or_too_many_are_refused() {
    let c = Cluster::new(2);
    // The same request twice: one server cannot be two members.
    let twice = [c.request(0), c.request(1), c.request(0)];
    let out = c.issue(&twice, "twice.bundle");
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    let why = stderr(&out);
    assert!(why.contains("same server"), "{why}");
    assert!(why.contains(&c.key(0)), "{why}");
    assert!(!c.path("twice.bundle").exists());

    // A request edited after signing: its signature no longer verifies.
    let text = std::fs::read_to_string(c.request(1)).unwrap();
    let edited = c.path("edited.req");
    std::fs::write(&edited, flip_one_body_char(&text)).unwrap();
    let out = c.issue(&[c.request(0), edited.clone()], "edited.bundle");
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&edited.display().to_string()),
        "names the file: {}",
        stderr(&out)
    );
    assert!(!c.path("edited.bundle").exists());

    // More than seven servers: a usage error before any file is read.
    let eight: Vec<PathBuf> = (0..8).map(|_| c.request(0)).collect();
    let out = c.issue(&eight, "eight.bundle");
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("at most 7"), "{}", stderr(&out));
}

/// The armoured text with one character of its base64 body changed.
fn flip_one_body_char(text: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let i = lines
        .iter()
        .position(|l| !l.starts_with("-----") && !l.contains(':') && l.len() > 20)
        .expect("a body line");
    let mid = lines[i].len() / 2;
    let c = lines[i].as_bytes()[mid];
    let new = if c == b'A' { 'B' } else { 'A' };
    lines[i].replace_range(mid..mid + 1, &new.to_string());
    lines.join("\n") + "\n"
}

#[test]
fn each_member_recognises_the_cluster_bundle_and_none_serves_it_unless_configured_as_one() {
    let c = Cluster::new(4);
    let keys: Vec<String> = (0..4).map(|i| c.key(i)).collect();
    // Bound to the first three; the fourth is a server of the same site left out.
    ok(c.issue(&c.all_requests()[..3], "ha.bundle"));
    for i in 0..4 {
        c.install("ha.bundle", i);
    }
    // Each member recognises the bundle as its own (key and host) and still refuses to
    // serve it: until the servers run as one cluster, each would count the seats on its
    // own ledger, and three servers would serve three times the seats sold.
    for i in 0..3 {
        let out = c.check_config(i);
        assert_eq!(out.status.code(), Some(65), "node {i}: {}", stderr(&out));
        let why = stderr(&out);
        assert!(
            why.contains("binds a site of 3 servers, this one among them"),
            "node {i}: {why}"
        );
    }
    let out = c.check_config(3);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    let why = stderr(&out);
    let expected = format!(
        "{}: refused: binds servers {}, {}, {}; this server is {}",
        c.path("s3/bundles/ha.bundle").display(),
        keys[0],
        keys[1],
        keys[2],
        keys[3]
    );
    assert!(why.contains(&expected), "{why}\nexpected: {expected}");

    // Running, the members serve none of its seats and say why; the fourth names the
    // members and itself. A client gets no seat from any of the four.
    for i in 0..4 {
        let d = c.daemon(i);
        let log = d.log_text();
        if i < 3 {
            assert!(
                log.contains("names no [[cluster]] members"),
                "node {i}: {log}"
            );
        } else {
            assert!(
                log.contains(&format!("this server is {}", keys[3])),
                "{log}"
            );
        }
        let out = run(d.tally().args(["run", "solver", "--", "true"]));
        assert!(
            !out.status.success(),
            "node {i} granted a seat of a cluster bundle"
        );
    }
}
