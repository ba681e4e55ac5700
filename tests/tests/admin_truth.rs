//! Issue 15, "reload tells the truth" and "`tally admin remove` sticks", through the real
//! `tallyd run` and `tally` binaries with vendor-signed bundles from `tally-publisher`.
//!
//! - A reload that refuses bundle files (dropped into the bundle directory) exits 65 and
//!   prints each refusal; SIGHUP logs each refusal with its file and reason; bundles
//!   refused at start count; `/api/status` and `/metrics` show the refusals and the
//!   last reload; a broken policy is named as the policy.
//! - A removed holder is told "removed by the administrator", its automatic retry is
//!   refused for the configured hold-off while a waiter gets the seat, and after the
//!   hold-off the same holder gets a seat again.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tally_tests::{dashboard_dom, wait_until, Daemon, Holder, VendorSite};

fn scrape(daemon: &Daemon) -> prometheus_parse::Scrape {
    let (code, body) = daemon.http("GET", "/metrics", None);
    assert_eq!(code, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("valid Prometheus text")
}

fn metric(daemon: &Daemon, name: &str) -> f64 {
    let m = scrape(daemon);
    let sample = m
        .samples
        .iter()
        .find(|s| s.metric == name)
        .unwrap_or_else(|| panic!("no {name} in /metrics"));
    match sample.value {
        prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Counter(v) => v,
        ref other => panic!("{name} is {other:?}, not a gauge or counter"),
    }
}

fn api_status(daemon: &Daemon) -> serde_json::Value {
    let (code, body) = daemon.http("GET", "/api/status", None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("status JSON")
}

/// The `source` of each refused bundle in `/api/status`, by file name.
fn refused_files(status: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = status["refused_bundles"]
        .as_array()
        .expect("refused_bundles is a list")
        .iter()
        .map(|r| {
            assert!(
                !r["reason"].as_str().unwrap_or("").is_empty(),
                "a refusal without a reason: {r}"
            );
            let source = r["source"].as_str().expect("source");
            Path::new(source)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

fn admin(daemon: &Daemon, site: &VendorSite, args: &[&str]) -> Output {
    daemon
        .tally()
        .args(["admin", "--admin-token-file"])
        .arg(site.path("data/admin.token"))
        .args(args)
        .output()
        .expect("running tally admin")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Rewrites the site's config: the operations endpoint on a free port, a policy file,
/// and `extra` lines.
fn configure(site: &VendorSite, extra: &str) {
    let path = site.path("tallyd.toml");
    let config = std::fs::read_to_string(&path).unwrap().replace(
        "http = false\n",
        "http = true\nhttp_listen = \"127.0.0.1:0\"\n",
    );
    std::fs::write(
        &path,
        format!(
            "{config}policy = \"{}\"\n{extra}",
            site.path("policy.toml").display()
        ),
    )
    .unwrap();
    std::fs::write(
        site.path("policy.toml"),
        "[groups]\ncfd = [\"ana\", \"bo\"]\n",
    )
    .unwrap();
}

#[test]
fn reload_names_every_refusal_in_its_exit_code_log_status_and_metrics() {
    let site = VendorSite::new();
    configure(&site, "");
    let good = site.issue("B-1", &[], &[("solver", 2)]);
    // Refused at start: text that is no bundle at all.
    std::fs::write(site.path("bundles/junk.bundle"), "not a bundle\n").unwrap();
    let daemon = site.daemon();
    assert!(daemon.http.is_some(), "the config turns the endpoint on");

    // Bundles refused at start count: status, metrics; no reload yet.
    let status = api_status(&daemon);
    assert_eq!(refused_files(&status), ["junk.bundle"], "{status}");
    assert!(status["last_reload"].is_null(), "{status}");
    assert_eq!(metric(&daemon, "tally_bundles_refused"), 1.0);
    assert_eq!(metric(&daemon, "tally_reload_failures_total"), 0.0);
    assert_eq!(
        metric(&daemon, "tally_reload_last_success_timestamp_seconds"),
        0.0,
        "the start refused a bundle: no successful load yet"
    );

    // A second bad file: a valid bundle cut in half.
    let whole = std::fs::read_to_string(&good).unwrap();
    std::fs::write(site.path("bundles/cut.bundle"), &whole[..whole.len() / 2]).unwrap();
    let out = admin(&daemon, &site, &["reload"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(65),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    for file in ["junk.bundle", "cut.bundle"] {
        let path = site.path(&format!("bundles/{file}"));
        assert!(
            stderr.contains(&format!("refused: {}: ", path.display())),
            "{file} not named with its reason: {stderr}"
        );
    }
    assert!(
        stderr.contains("2 bundle file(s) refused"),
        "no summary: {stderr}"
    );
    let status = api_status(&daemon);
    assert_eq!(
        refused_files(&status),
        ["cut.bundle", "junk.bundle"],
        "{status}"
    );
    let last = &status["last_reload"];
    assert_eq!(last["ok"], false, "{status}");
    assert!(
        last["summary"]
            .as_str()
            .unwrap()
            .contains("2 bundle file(s) refused"),
        "{status}"
    );
    let at = last["at"].as_str().unwrap();
    assert!(
        at.len() == 20 && at.ends_with('Z') && at.as_bytes()[10] == b'T',
        "not ISO 8601: {at}"
    );
    assert_eq!(metric(&daemon, "tally_bundles_refused"), 2.0);
    assert_eq!(metric(&daemon, "tally_reload_failures_total"), 1.0);
    // The dashboard, in a browser, shows both.
    let dom = dashboard_dom(&daemon);
    let last = dom
        .split("id=\"last-reload\"")
        .nth(1)
        .and_then(|rest| rest.split("</p>").next())
        .unwrap_or_else(|| panic!("no last reload on the dashboard: {dom}"));
    assert!(
        last.contains("not ok") && last.contains("2 bundle file(s) refused"),
        "{last}"
    );
    let table = dom
        .split("id=\"refused\"")
        .nth(1)
        .and_then(|rest| rest.split("</table>").next())
        .unwrap_or_else(|| panic!("no refused bundles on the dashboard: {dom}"));
    for file in ["junk.bundle", "cut.bundle"] {
        assert!(table.contains(file), "{file} not listed: {table}");
    }
    // The good bundle is still served next to the refusals.
    assert_eq!(daemon.feature("solver")["total"], 2);

    // SIGHUP runs the same reload and logs one line per refused file and the outcome.
    let logged_before = daemon.log_text().len();
    daemon.signal("HUP");
    let hup_lines = || daemon.log_text()[logged_before..].to_string();
    assert!(
        wait_until(Duration::from_secs(30), || {
            let log = hup_lines();
            log.contains("2 bundle file(s) refused")
                && ["junk.bundle", "cut.bundle"].iter().all(|f| {
                    log.lines().any(|l| {
                        l.contains(&format!(
                            "reload: {}: refused: ",
                            site.path(&format!("bundles/{f}")).display()
                        ))
                    })
                })
        }),
        "SIGHUP did not log each refusal with its file and reason:\n{}",
        hup_lines()
    );
    assert!(
        wait_until(Duration::from_secs(10), || metric(
            &daemon,
            "tally_reload_failures_total"
        ) == 2.0),
        "the SIGHUP reload is not counted"
    );

    // All good again: exit 0, nothing refused, the success time set.
    std::fs::remove_file(site.path("bundles/junk.bundle")).unwrap();
    std::fs::remove_file(site.path("bundles/cut.bundle")).unwrap();
    site.issue("B-2", &[], &[("viewer", 1)]);
    let before = unix_now();
    let out = admin(&daemon, &site, &["reload"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("serving 2 bundle(s)"), "{stdout}");
    let status = api_status(&daemon);
    assert!(refused_files(&status).is_empty(), "{status}");
    assert_eq!(status["last_reload"]["ok"], true, "{status}");
    assert_eq!(metric(&daemon, "tally_bundles_refused"), 0.0);
    assert_eq!(metric(&daemon, "tally_reload_failures_total"), 2.0);
    let success = metric(&daemon, "tally_reload_last_success_timestamp_seconds");
    assert!(
        success >= before.floor() && success <= unix_now() + 1.0,
        "last success {success} is not the reload just done (at {before})"
    );

    // A broken policy is named as the policy; nothing is reloaded.
    std::fs::write(site.path("policy.toml"), "[[max]]\nfeature = \n").unwrap();
    let out = admin(&daemon, &site, &["reload"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(65),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let policy = site.path("policy.toml").display().to_string();
    assert!(
        stderr.contains(&format!("policy refused: {policy}")),
        "the policy is not named: {stderr}"
    );
    assert!(
        stderr.contains(&format!("the policy file {policy} is broken")),
        "{stderr}"
    );
    assert!(
        !stderr.contains("still serving the previous bundles"),
        "blames the bundles: {stderr}"
    );
    let status = api_status(&daemon);
    assert_eq!(status["last_reload"]["ok"], false, "{status}");
    assert!(
        status["last_reload"]["summary"]
            .as_str()
            .unwrap()
            .contains("policy file"),
        "{status}"
    );
    assert_eq!(metric(&daemon, "tally_reload_failures_total"), 3.0);
    // And in the log, for SIGHUP too.
    let logged_before = daemon.log_text().len();
    daemon.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(30), || daemon.log_text()
            [logged_before..]
            .contains(&format!("the policy file {policy} is broken"))),
        "SIGHUP with a broken policy:\n{}",
        &daemon.log_text()[logged_before..]
    );
}

/// `tally run USER` holding or waiting for `feature`, in its own process group, with
/// its stderr in `log`.
fn run_as(daemon: &Daemon, user: &str, args: &[&str], log: &Path) -> Holder {
    use std::os::unix::process::CommandExt;
    let child = daemon
        .tally()
        .env("USER", user)
        .arg("run")
        .args(args)
        .args(["--", "sleep", "300"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .process_group(0)
        .spawn()
        .expect("starting tally run");
    Holder::from_child(child)
}

fn users(daemon: &Daemon, key: &str) -> Vec<String> {
    daemon.feature("solver")[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["user"].as_str().unwrap().to_string())
        .collect()
}

fn try_once(daemon: &Daemon, user: &str) -> Output {
    daemon
        .tally()
        .env("USER", user)
        .args(["run", "solver", "--", "true"])
        .output()
        .expect("running tally run")
}

/// A site whose one seat of `solver` ana holds (her `tally run` logs to `ana.log`),
/// with a removal hold-off of `holdoff` seconds.
fn ana_holds_the_one_seat(holdoff: u64) -> (VendorSite, Daemon, Holder) {
    let site = VendorSite::new();
    configure(
        &site,
        &format!("heartbeat_secs = 1\nlease_ttl_secs = 10\nremove_holdoff_secs = {holdoff}\n"),
    );
    site.issue("B-1", &[], &[("solver", 1)]);
    let daemon = site.daemon();
    let ana = run_as(&daemon, "ana", &["solver"], &site.path("ana.log"));
    assert!(
        wait_until(Duration::from_secs(30), || users(&daemon, "holders")
            == ["ana"]),
        "ana holds no seat"
    );
    (site, daemon, ana)
}

#[test]
fn a_removed_holder_is_told_and_held_off_while_the_waiter_gets_the_seat() {
    const HOLDOFF: u64 = 40;
    let (site, daemon, _ana) = ana_holds_the_one_seat(HOLDOFF);
    let ana_log = site.path("ana.log");
    let mut bo = run_as(
        &daemon,
        "bo",
        &["solver", "--wait", "120"],
        &site.path("bo.log"),
    );
    assert!(
        wait_until(Duration::from_secs(30), || users(&daemon, "queue")
            == ["bo"]),
        "bo is not waiting"
    );
    let lease = daemon.feature("solver")["holders"][0]["lease"]
        .as_str()
        .unwrap()
        .to_string();

    let removing = Instant::now();
    let out = admin(&daemon, &site, &["remove", &lease]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.contains(&format!("for {HOLDOFF} s")),
        "the admin is not told of the hold-off: {stdout}"
    );
    // The waiter gets the seat, and ana's program is told why it lost its own.
    assert!(
        wait_until(Duration::from_secs(15), || users(&daemon, "holders")
            == ["bo"]),
        "the waiter did not get the seat: {}",
        daemon.feature("solver")
    );
    let ana_says = || std::fs::read_to_string(&ana_log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(15), || ana_says()
            .contains("removed by the administrator")
            && ana_says().contains("no seat for this user on this host until")),
        "ana's tally run was not told: {}",
        ana_says()
    );

    // bo leaves; the seat is free, and still not ana's.
    Command::new("kill")
        .args(["-TERM", &bo.child.id().to_string()])
        .status()
        .unwrap();
    let _ = bo.child.wait();
    assert!(
        wait_until(Duration::from_secs(15), || daemon.in_use("solver") == 0),
        "bo's seat was not checked in"
    );
    let out = try_once(&daemon, "ana");
    let (_, stderr) = text(&out);
    assert!(
        removing.elapsed() < Duration::from_secs(HOLDOFF - 2),
        "too slow to check the hold-off ({:?}); the rest proves nothing",
        removing.elapsed()
    );
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(
        stderr.contains("was removed by the administrator")
            && stderr.contains("for you on this host until"),
        "{stderr}"
    );
    assert_eq!(daemon.in_use("solver"), 0, "ana's retry took the seat");
    let denials = api_status(&daemon)["recent_denials"].clone();
    assert!(
        denials
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["user"] == "ana"
                && d["reason"]
                    .as_str()
                    .unwrap()
                    .contains("removed by the administrator")),
        "{denials}"
    );
    // Others are not held off.
    let out = try_once(&daemon, "cy");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);

    // After the hold-off, ana's running `tally run` gets a seat again by itself.
    assert!(
        wait_until(Duration::from_secs(HOLDOFF + 30), || users(
            &daemon, "holders"
        ) == ["ana"]),
        "ana did not get a seat after the hold-off: {}\n{}",
        daemon.feature("solver"),
        ana_says()
    );
    assert!(
        removing.elapsed() >= Duration::from_secs(HOLDOFF),
        "ana got a seat {:?} after the removal, inside the {HOLDOFF} s hold-off",
        removing.elapsed()
    );
    // The server lists ana as holder as it grants; her `tally run` says so a moment
    // later, once the answer reached it.
    assert!(
        wait_until(Duration::from_secs(15), || ana_says()
            .contains("got a seat of 'solver' again")),
        "{}",
        ana_says()
    );
}

/// A removal's hold-off is kept in the store: a restart of tallyd (SIGKILL) does not
/// hand the removed holder's retry the seat meant for the next in line.
#[test]
fn a_removal_hold_off_survives_a_restart_of_tallyd() {
    let (site, daemon, mut ana) = ana_holds_the_one_seat(300);
    let lease = daemon.feature("solver")["holders"][0]["lease"]
        .as_str()
        .unwrap()
        .to_string();
    let out = admin(&daemon, &site, &["remove", &lease]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    ana.kill_group();

    daemon.kill();
    let daemon = site.daemon();
    let out = try_once(&daemon, "ana");
    let (_, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(75),
        "ana got a seat after the restart: {stderr}"
    );
    assert!(
        stderr.contains("was removed by the administrator")
            && stderr.contains("for you on this host until"),
        "{stderr}"
    );
    assert_eq!(daemon.in_use("solver"), 0, "ana's retry took the seat");
    // Others are not held off.
    let out = try_once(&daemon, "cy");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
}
