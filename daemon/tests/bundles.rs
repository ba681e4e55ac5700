//! Loading bundle files: every refusal is one line naming the file and the reason, and
//! the valid files are served regardless.

use std::collections::BTreeSet;
use std::path::Path;
use tally_daemon::bundles::{load_dir, BundleRules};
use tally_protocol::bundle::{self, Binding, Bundle, Customer, FeatureGrant};
use tally_protocol::keys::SecretKey;
use tally_protocol::signed::{Domain, Signed};
use tally_protocol::time::UnixTime;

const NOW: UnixTime = UnixTime(1_800_000_000);

fn server() -> SecretKey {
    SecretKey::from_seed([1; 32])
}

fn vendor() -> SecretKey {
    SecretKey::from_seed([2; 32])
}

fn rules() -> BundleRules {
    BundleRules {
        vendor_keys: vec![vendor().public()],
        server_key: server().public(),
        host_fingerprint: "this-host".into(),
        returned: BTreeSet::from(["given-back".to_string()]),
        retired: Default::default(),
        cluster: Default::default(),
    }
}

fn bundle(id: &str, seats: u32) -> Bundle {
    Bundle {
        id: id.into(),
        issued_at: NOW,
        vendor: "Acme".into(),
        customer: Customer {
            id: "c".into(),
            name: "Example".into(),
        },
        binding: vec![Binding {
            server_key: server().public(),
            host_fingerprint: "this-host".into(),
        }],
        supersedes: vec![],
        valid_from: None,
        valid_until: None,
        features: vec![FeatureGrant::counted("solver", seats)],
    }
}

fn write(dir: &Path, name: &str, b: &Bundle, key: &SecretKey) -> String {
    let text = bundle::to_armored(&bundle::sign(b, key));
    std::fs::write(dir.join(name), &text).unwrap();
    text
}

fn reason_for(loaded: &tally_daemon::bundles::Loaded, file: &str) -> String {
    let r = loaded
        .refused
        .iter()
        .find(|r| r.path.ends_with(file))
        .unwrap_or_else(|| panic!("{file} was not refused: {:?}", loaded.refused));
    let line = r.to_string();
    assert!(line.contains(file) && !line.contains('\n'), "{line}");
    r.reason.clone()
}

#[test]
fn each_bad_bundle_is_refused_by_name_and_the_good_ones_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "10-good.bundle", &bundle("good", 5), &vendor());

    let text = write(d, "20-tampered.bundle", &bundle("tampered", 5), &vendor());
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let c = lines[2].remove(20);
    lines[2].insert(20, if c == 'Q' { 'R' } else { 'Q' });
    std::fs::write(d.join("20-tampered.bundle"), lines.join("\n")).unwrap();

    write(
        d,
        "30-unknown-key.bundle",
        &bundle("forged", 50),
        &SecretKey::from_seed([7; 32]),
    );

    let mut other = bundle("other-server", 5);
    other.binding[0].server_key = SecretKey::from_seed([9; 32]).public();
    write(d, "40-other-server.bundle", &other, &vendor());

    let mut other_host = bundle("other-host", 5);
    other_host.binding[0].host_fingerprint = "elsewhere".into();
    write(d, "45-other-host.bundle", &other_host, &vendor());

    let mut expired = bundle("expired", 5);
    expired.valid_until = Some(NOW);
    write(d, "50-expired.bundle", &expired, &vendor());

    // The enum tag of the version after the newest.
    let next = bundle::NEWEST_BUNDLE_VERSION as u8;
    let future = Signed::sign(Domain::Bundle, vec![next, 0, 0, 0], &vendor());
    std::fs::write(d.join("60-future.bundle"), bundle::to_armored(&future)).unwrap();

    let full = bundle::to_armored(&bundle::sign(&bundle("cut", 5), &vendor()));
    std::fs::write(d.join("70-truncated.bundle"), &full[..full.len() / 2]).unwrap();

    write(d, "80-returned.bundle", &bundle("given-back", 5), &vendor());

    let mut later = bundle("later", 2);
    later.valid_from = Some(NOW.plus_secs(86_400));
    write(d, "90-later.bundle", &later, &vendor());
    std::fs::write(d.join("README.txt"), "not a bundle, not read").unwrap();

    let loaded = load_dir(d, &rules(), NOW).unwrap();
    let served: Vec<&str> = loaded
        .served
        .iter()
        .map(|(_, b)| b.bundle.id.as_str())
        .collect();
    assert_eq!(served, vec!["good", "later"]);
    assert!(reason_for(&loaded, "20-tampered.bundle").contains("does not verify"));
    assert!(reason_for(&loaded, "30-unknown-key.bundle").contains("not a trusted vendor key"));
    assert!(reason_for(&loaded, "40-other-server.bundle").contains("bound to server key"));
    assert!(reason_for(&loaded, "45-other-host.bundle").contains("bound to host elsewhere"));
    assert!(reason_for(&loaded, "50-expired.bundle").contains("expired"));
    assert!(reason_for(&loaded, "60-future.bundle").contains(&format!(
        "format version {}",
        bundle::NEWEST_BUNDLE_VERSION + 1
    )));
    assert!(reason_for(&loaded, "70-truncated.bundle").contains("truncated"));
    assert!(reason_for(&loaded, "80-returned.bundle").contains("returned"));
    assert_eq!(loaded.refused.len(), 8);
    assert!(
        loaded.notes.iter().any(|n| n.contains("not valid yet")),
        "{:?}",
        loaded.notes
    );
}

#[test]
fn supersede_replaces_and_a_copied_file_counts_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "trial.bundle", &bundle("trial", 3), &vendor());
    let mut paid = bundle("paid", 20);
    paid.supersedes = vec!["trial".into()];
    write(d, "paid.bundle", &paid, &vendor());
    let addon = bundle("addon", 5);
    write(d, "addon.bundle", &addon, &vendor());
    write(d, "addon-copy.bundle", &addon, &vendor());
    let loaded = load_dir(d, &rules(), NOW).unwrap();
    let mut served: Vec<&str> = loaded
        .served
        .iter()
        .map(|(_, b)| b.bundle.id.as_str())
        .collect();
    served.sort();
    assert_eq!(served, vec!["addon", "paid"]);
    assert!(loaded
        .notes
        .iter()
        .any(|n| n.contains("superseded by bundle paid")));
    assert!(loaded.notes.iter().any(|n| n.contains("counted once")));
    assert!(loaded.refused.is_empty());
}

#[test]
fn a_returned_bundle_keeps_what_it_superseded_out_also_from_an_old_returned_list() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "trial.bundle", &bundle("trial", 2), &vendor());
    let mut paid = bundle("paid", 4);
    paid.supersedes = vec!["trial".into()];
    write(d, "paid.bundle", &paid, &vendor());
    write(d, "addon.bundle", &bundle("addon", 3), &vendor());
    let mut renewal = bundle("renewal", 10);
    renewal.supersedes = vec!["paid".into(), "addon".into()];
    write(d, "renewal.bundle", &renewal, &vendor());
    let ids = |l: &tally_daemon::bundles::Loaded| -> Vec<String> {
        l.served.iter().map(|(_, b)| b.bundle.id.clone()).collect()
    };
    // A returned list as tallyd wrote it before returns retired anything: the id alone.
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("returned-bundles"), "renewal\n").unwrap();
    let returns = tally_daemon::bundles::read_returns(data.path()).unwrap();
    let mut rules = rules();
    rules.returned = returns.returned;
    rules.retired = returns.retired;
    let loaded = load_dir(d, &rules, NOW).unwrap();
    assert!(ids(&loaded).is_empty(), "{:?}", ids(&loaded));
    assert!(reason_for(&loaded, "renewal.bundle").contains("returned"));
    // What a return retires: everything below it in the supersede graph.
    let closure = tally_daemon::bundles::superseded_closure("renewal", &loaded.supersedes);
    assert_eq!(closure, vec!["addon", "paid", "trial"]);
    // Recorded, it holds without the returned file.
    tally_daemon::bundles::record_return(data.path(), "renewal", &closure).unwrap();
    std::fs::remove_file(d.join("renewal.bundle")).unwrap();
    let returns = tally_daemon::bundles::read_returns(data.path()).unwrap();
    assert_eq!(returns.returned, BTreeSet::from(["renewal".to_string()]));
    assert_eq!(returns.retired.len(), 3);
    rules.returned = returns.returned;
    rules.retired = returns.retired;
    let loaded = load_dir(d, &rules, NOW).unwrap();
    assert!(ids(&loaded).is_empty(), "{:?}", ids(&loaded));
    assert!(loaded.refused.is_empty(), "{:?}", loaded.refused);
    assert!(loaded
        .notes
        .iter()
        .any(|n| n.contains("superseded by bundle renewal, which this server returned")));
    // Without the return, the same directory serves the chain's live bundles again.
    let mut fresh = self::rules();
    fresh.returned.clear();
    write(d, "renewal.bundle", &renewal, &vendor());
    assert_eq!(ids(&load_dir(d, &fresh, NOW).unwrap()), vec!["renewal"]);
}

/// Found by the lifecycle test (tests/tests/lifecycle.rs): a renewal whose term ended
/// used to stop superseding once a reload or restart refused it as expired, so the
/// bundle it replaced came back (seats that changed with a restart and nothing else).
/// An ended bundle serves nothing, and what it replaced stays replaced, as after a
/// return.
#[test]
fn an_expired_renewal_keeps_what_it_superseded_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "paid.bundle", &bundle("paid", 4), &vendor());
    let mut renewal = bundle("renewal", 10);
    renewal.supersedes = vec!["paid".into()];
    renewal.valid_until = Some(NOW.plus_secs(60));
    write(d, "renewal.bundle", &renewal, &vendor());
    let ids = |l: &tally_daemon::bundles::Loaded| -> Vec<String> {
        l.served.iter().map(|(_, b)| b.bundle.id.clone()).collect()
    };
    assert_eq!(ids(&load_dir(d, &rules(), NOW).unwrap()), vec!["renewal"]);
    // After the renewal's end: nothing served, the paid bundle still superseded.
    let later = NOW.plus_secs(61);
    let loaded = load_dir(d, &rules(), later).unwrap();
    assert!(ids(&loaded).is_empty(), "{:?}", ids(&loaded));
    assert!(reason_for(&loaded, "renewal.bundle").contains("expired"));
    assert!(
        loaded
            .notes
            .iter()
            .any(|n| n.contains("bundle paid is superseded by bundle renewal")),
        "{:?}",
        loaded.notes
    );
    // A return of a later bundle retires through the ended one.
    assert_eq!(
        loaded.supersedes.get("renewal"),
        Some(&vec!["paid".to_string()])
    );
}

#[test]
fn a_cluster_bundle_is_recognised_on_its_member_and_refused_everywhere_until_clusters_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let peers = [
        SecretKey::from_seed([20; 32]),
        SecretKey::from_seed([21; 32]),
    ];
    let member = |key: &SecretKey, host: &str| Binding {
        server_key: key.public(),
        host_fingerprint: host.into(),
    };
    // This server is the middle member of three.
    let mut ours = bundle("cluster", 5);
    ours.binding = vec![
        member(&peers[0], "host-a"),
        member(&server(), "this-host"),
        member(&peers[1], "host-c"),
    ];
    write(d, "10-cluster.bundle", &ours, &vendor());
    // This server's key, but the member names another host: a copied data dir.
    let mut elsewhere = bundle("cluster-elsewhere", 5);
    elsewhere.binding = vec![member(&peers[0], "host-a"), member(&server(), "other-host")];
    write(d, "20-elsewhere.bundle", &elsewhere, &vendor());
    // A cluster this server is not a member of: every member named, and this server.
    let mut theirs = bundle("not-ours", 5);
    theirs.binding = vec![member(&peers[0], "host-a"), member(&peers[1], "host-c")];
    write(d, "30-not-ours.bundle", &theirs, &vendor());

    let loaded = load_dir(d, &rules(), NOW).unwrap();
    let served: Vec<&str> = loaded
        .served
        .iter()
        .map(|(_, v)| v.bundle.id.as_str())
        .collect();
    // Recognised as ours (key and host), and still not served: three servers that do
    // not share a ledger would each serve all five seats.
    assert!(served.is_empty(), "{served:?}");
    assert!(
        reason_for(&loaded, "10-cluster.bundle")
            .contains("binds a site of 3 servers, this one among them"),
        "{}",
        reason_for(&loaded, "10-cluster.bundle")
    );
    assert!(reason_for(&loaded, "20-elsewhere.bundle").contains("bound to host other-host"));
    let why = reason_for(&loaded, "30-not-ours.bundle");
    assert_eq!(
        why,
        format!(
            "binds servers {}, {}; this server is {}",
            peers[0].public().fingerprint(),
            peers[1].public().fingerprint(),
            server().public().fingerprint()
        )
    );
}
