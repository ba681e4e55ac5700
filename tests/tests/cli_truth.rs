//! The `tally` command tells the truth: exit codes as the README lists them, messages
//! people can act on, no panic on a closed pipe, no Rust syntax in what users read.
//! Real `tallyd` and `tally` processes on loopback.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tally_protocol::bundle::{Binding, Bundle, Customer, FeatureGrant};
use tally_protocol::time::{UnixTime, DAY};
use tally_tests::{bin, ok, run, wait_until, Daemon, Holder, VendorSite};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Text users read must not look like Rust: no `Some(..)`, ranges, `{:?}` of structs,
/// `seat(s)`.
fn assert_no_rust_syntax(text: &str) {
    for bad in [
        "Some(", "None", "..=", " { ", "(s)", "Duration", "Ok(", "Err(",
    ] {
        assert!(!text.contains(bad), "'{bad}' in what users read:\n{text}");
    }
}

/// An address where no server answers (a bound UDP socket that never replies).
fn dead_server() -> (std::net::UdpSocket, String) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap().to_string();
    (socket, addr)
}

#[test]
fn a_wrong_admin_token_is_77_and_removing_an_unknown_lease_names_it_65() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let daemon = Daemon::start(&data, "127.0.0.1:0", &[]);
    let wrong = dir.path().join("wrong.token");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    for op in [
        &["reload"][..],
        &["remove", "L00000000deadbeef"],
        &["shutdown"],
    ] {
        let out = run(daemon
            .tally()
            .args(["admin", "--admin-token-file"])
            .arg(&wrong)
            .args(op));
        assert_eq!(out.status.code(), Some(77), "{op:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("admin token is wrong"),
            "{}",
            stderr(&out)
        );
    }
    let token = data.join("admin.token");
    let out = run(daemon
        .tally()
        .args(["admin", "--admin-token-file"])
        .arg(&token)
        .args(["remove", "L00000000deadbeef"]));
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no lease L00000000deadbeef is held on this server"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("server error"), "{}", stderr(&out));
    // A status for admins only, asked without the token: 77 as well.
    let site = VendorSite::new();
    site.issue("C-1001-2027", &[], &[("solver", 5)]);
    let config = std::fs::read_to_string(site.path("tallyd.toml")).unwrap();
    std::fs::write(
        site.path("tallyd.toml"),
        format!("{config}status_needs_token = true\n"),
    )
    .unwrap();
    let locked = site.daemon();
    let out = run(locked.tally().arg("status"));
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("only with the admin token"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_closed_stdout_ends_tally_quietly_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("data"), "127.0.0.1:0", &[]);
    let _holder = Holder::start(&daemon, "solver", 60);
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 1));
    // The reading end is closed before `tally` writes a byte, so its first write to
    // stdout meets EPIPE, every time.
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["status", "solver"],
        &["doctor", "solver"],
        &["completions", "bash"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = daemon
            .tally()
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{args:?}: {err}"
        );
    }
    // The way people meet it: `tally status | head -1` through a shell.
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#""$0" --server "$1" --demo status | head -1"#)
        .arg(bin("tally"))
        .arg(daemon.addr.to_string())
        .output()
        .unwrap();
    assert!(stdout(&out).starts_with("server "), "{}", stdout(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[test]
fn a_zero_count_and_a_version_that_is_not_one_are_usage_errors_before_anything_is_sent() {
    // No server answers here: a command that tried to connect would exit 69.
    let (_socket, dead) = dead_server();
    let tally = |args: &[&str]| {
        run(Command::new(bin("tally"))
            .args(["--server", &dead, "--demo"])
            .args(args)
            .env_remove("TALLY_SERVER"))
    };
    for args in [
        &["run", "solver", "--count", "0", "--", "true"][..],
        &["borrow", "solver", "--for", "1d", "--count", "0"],
    ] {
        let out = tally(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("the seat count must be at least 1"),
            "{}",
            stderr(&out)
        );
        assert_no_rust_syntax(&stderr(&out));
    }
    let out = tally(&["run", "solver", "--count", "many", "--", "true"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("'many' is not a seat count"),
        "{}",
        stderr(&out)
    );
    for args in [
        &["run", "solver", "--version", "banana", "--", "true"][..],
        &["borrow", "solver", "--for", "1d", "--version", "banana"],
    ] {
        let out = tally(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("'banana' is not a version"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn doctor_exits_69_only_when_no_server_answered() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("data"), "127.0.0.1:0", &[]);
    assert_eq!(
        run(daemon.tally().args(["doctor", "solver"])).status.code(),
        Some(0)
    );
    // The server answered; the feature is not licensed there: not "unavailable".
    let out = run(daemon.tally().args(["doctor", "mesher"]));
    assert_eq!(out.status.code(), Some(75), "{}", stdout(&out));
    assert!(stdout(&out).contains("not licensed"), "{}", stdout(&out));
    // Nobody answered: 69.
    let (_socket, dead) = dead_server();
    let out = run(Command::new(bin("tally"))
        .args(["--server", &dead, "--demo", "doctor"])
        .env_remove("TALLY_SERVER"));
    assert_eq!(out.status.code(), Some(69), "{}", stdout(&out));
    assert_no_rust_syntax(&stdout(&out));
}

#[test]
fn more_seats_than_exist_are_denied_at_once_and_never_queued() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("data"), "127.0.0.1:0", &[]);
    let started = Instant::now();
    let out = run(daemon.tally().args([
        "run", "solver", "--count", "6", "--wait", "60", "--", "true",
    ]));
    // Denied at once, not after the 60 s wait.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("only 5 seats of 'solver' exist; 6 requested"),
        "{}",
        stderr(&out)
    );
    assert_no_rust_syntax(&stderr(&out));
    // The same while every seat is held and someone waits: still not queued.
    let _holders: Vec<Holder> = (0..5)
        .map(|_| Holder::start(&daemon, "solver", 60))
        .collect();
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 5));
    let mut waiter = Holder::start_with(&daemon, &["solver", "--wait", "60"], 60);
    assert!(wait_until(Duration::from_secs(30), || daemon
        .feature("solver")["queue"]
        .as_array()
        .is_some_and(|q| q.len() == 1)));
    let out = run(daemon.tally().args([
        "run", "solver", "--count", "6", "--wait", "60", "--", "true",
    ]));
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(stderr(&out).contains("only 5 seats"), "{}", stderr(&out));
    assert_eq!(
        daemon.feature("solver")["queue"].as_array().unwrap().len(),
        1
    );
    waiter.kill_group();
}

/// A site whose bundle has a version ceiling, overdraft seats and an expired feature,
/// signed with the library `tally-publisher issue` uses (its spec has no expired dates).
fn site_with_terms() -> (VendorSite, String) {
    let site = VendorSite::new();
    let vendor = tally_protocol::keys::SecretKey::from_armored(
        &std::fs::read_to_string(site.path("vendor.key")).unwrap(),
    )
    .unwrap();
    let request = tally_protocol::activation::request_from_armored(
        &std::fs::read_to_string(site.path("activation.req")).unwrap(),
    )
    .unwrap();
    let now = unix_now();
    let mut solver = FeatureGrant::counted("solver", 5);
    solver.version_ceiling = Some("2027".into());
    let mut mesher = FeatureGrant::counted("mesher", 2);
    mesher.overdraft = 1;
    let mut trial = FeatureGrant::counted("trial", 3);
    trial.starts = Some(UnixTime(now - 40 * DAY));
    trial.expires = Some(UnixTime(now - 10 * DAY));
    let expired_day = UnixTime(now - 10 * DAY).last_day();
    let bundle = Bundle {
        id: "C-1001-terms".into(),
        issued_at: UnixTime(now - 40 * DAY),
        vendor: "Acme Simulation".into(),
        customer: Customer {
            id: "C-1001".into(),
            name: "Example Corp".into(),
        },
        binding: vec![Binding {
            server_key: request.server_key,
            host_fingerprint: request.host_fingerprint.clone(),
        }],
        supersedes: vec![],
        valid_from: None,
        valid_until: None,
        features: vec![solver, mesher, trial],
    };
    let signed = tally_protocol::bundle::sign(&bundle, &vendor);
    std::fs::write(
        site.path("bundles/C-1001-terms.bundle"),
        tally_protocol::bundle::to_armored(&signed),
    )
    .unwrap();
    std::fs::write(
        site.path("policy.toml"),
        "[[reserve]]\nfeature = \"solver\"\nseats = 2\nuser = \"ana\"\n",
    )
    .unwrap();
    let config = std::fs::read_to_string(site.path("tallyd.toml")).unwrap();
    std::fs::write(
        site.path("tallyd.toml"),
        format!(
            "{config}policy = \"{}\"\n",
            site.path("policy.toml").display()
        ),
    )
    .unwrap();
    (site, expired_day)
}

#[test]
fn status_of_one_feature_and_a_table_that_says_what_the_licence_says() {
    let (site, expired_day) = site_with_terms();
    let daemon = site.daemon();
    // Two seats of mesher and the one overdraft seat.
    let _holders: Vec<Holder> = (0..3)
        .map(|_| Holder::start(&daemon, "mesher", 60))
        .collect();
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("mesher")
        == 3));

    let all = ok(run(daemon.tally().arg("status")));
    assert_no_rust_syntax(&all);
    let header = all.lines().nth(1).unwrap();
    for column in [
        "FEATURE", "IN USE", "TOTAL", "RESERVED", "VERSIONS", "EXPIRES",
    ] {
        assert!(header.contains(column), "{header}");
    }
    let row = |text: &str, name: &str| -> String {
        text.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{text}"))
            .to_string()
    };
    let solver = row(&all, "solver");
    let cells: Vec<&str> = solver.split_whitespace().collect();
    // name, in use, total, reserved, versions..., expiry
    assert_eq!(&cells[..4], ["solver", "0", "5", "2"], "{solver}");
    assert!(solver.contains("up to 2027"), "{solver}");
    assert!(solver.contains("permanent"), "{solver}");
    let trial = row(&all, "trial");
    assert!(
        trial.contains(&format!("expired {expired_day}")),
        "{trial}\n(expected 'expired {expired_day}')"
    );
    assert!(!trial.contains("permanent"), "{trial}");
    let mesher = row(&all, "mesher");
    assert!(mesher.contains("(1 in overdraft)"), "{mesher}");
    let holder_lines: Vec<&str> = all
        .lines()
        .skip_while(|l| !l.starts_with("mesher "))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .collect();
    assert_eq!(holder_lines.len(), 3, "{all}");
    assert!(
        holder_lines.iter().all(|l| l.contains(" 1 seat since ")),
        "{all}"
    );
    assert_eq!(
        holder_lines
            .iter()
            .filter(|l| l.contains("(overdraft)"))
            .count(),
        1,
        "{all}"
    );

    // `tally status FEATURE`: that feature alone.
    let one = ok(run(daemon.tally().args(["status", "trial"])));
    assert!(one.contains("trial "), "{one}");
    assert!(!one.contains("solver") && !one.contains("mesher"), "{one}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(run(daemon.tally().args(["status", "trial", "--json"])))).unwrap();
    assert_eq!(json["features"][0]["expired"], true, "{json}");
    assert_eq!(
        json["features"][0]["expires"],
        expired_day.as_str(),
        "{json}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(run(daemon
        .tally()
        .args(["status", "solver", "--json"]))))
    .unwrap();
    let names: Vec<&str> = json["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["solver"]);
    // A feature the server does not have: 65, said plainly.
    let out = run(daemon.tally().args(["status", "nosuch"]));
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("feature 'nosuch' is not licensed on server"),
        "{}",
        stderr(&out)
    );

    // A denial in overdraft says so.
    let out = run(daemon.tally().args(["run", "mesher", "--", "true"]));
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.contains("'mesher' is in overdraft: 2 seats licensed + 1 overdraft, 3 held")
            && said.contains("none free; 1 requested"),
        "{said}"
    );
    assert_no_rust_syntax(&said);
    // More than licensed + overdraft: denied at once, naming both.
    let out = run(daemon.tally().args([
        "run", "mesher", "--count", "4", "--wait", "60", "--", "true",
    ]));
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "only 3 seats of 'mesher' can ever be held at once (2 licensed + 1 overdraft); 4 requested"
        ),
        "{}",
        stderr(&out)
    );
}
