//! Issue 15, the vendor's side, through the real `tally-publisher`:
//! - `reconcile --dir` over a tree of two customers' reports (from real `tallyd` runs)
//!   gives one summary table (customer, feature, licensed, peak, overdraft seat-hours,
//!   denials) in JSON, CSV and HTML; a report that does not verify, or that no bundle
//!   binds, is named and nothing is reconciled (exit 65).
//! - The reconcile HTML can be read by a billing analyst: a seat axis with ticks, time
//!   ticks with dates, the licensed seats as a step line from the bundle history,
//!   features in sorted order, a table of overdraft periods; nothing fetched.
//! - `import-flexlm` reads LINGER, SUPERSEDE and bare keywords with FlexLM's meaning,
//!   flags expired lines and names a three-server redundant site.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tally_tests::{bin, ok, run, wait_until, Daemon, Holder, VendorSite};

fn publisher() -> Command {
    Command::new(bin("tally-publisher"))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Waits for the wall clock to reach the next second (journal times are whole seconds).
fn next_second() {
    let t = unix_now();
    assert!(wait_until(Duration::from_secs(3), || unix_now() > t));
}

/// A spec for `customer` (id, name) with features (name, seats, overdraft).
fn spec(customer: (&str, &str), id: &str, features: &[(&str, u32, u32)]) -> String {
    let mut s = format!(
        "id = \"{id}\"\nvendor = \"Acme Simulation\"\n[customer]\nid = \"{}\"\nname = \"{}\"\n",
        customer.0, customer.1
    );
    for (name, seats, overdraft) in features {
        s.push_str(&format!(
            "[[feature]]\nname = \"{name}\"\nseats = {seats}\noverdraft = {overdraft}\n"
        ));
    }
    s
}

fn admin(daemon: &Daemon, site: &VendorSite) -> Command {
    let mut c = daemon.tally();
    c.args(["admin", "--admin-token-file"])
        .arg(site.path("data/admin.token"));
    c
}

/// Exports the daemon's next report to `to` (its directory created).
fn export(daemon: &Daemon, site: &VendorSite, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    next_second();
    ok(run(admin(daemon, site).args(["report", "--out"]).arg(to)));
}

fn wait_in_use(daemon: &Daemon, feature: &str, n: u64) {
    assert!(
        wait_until(Duration::from_secs(20), || daemon.in_use(feature) == n),
        "{feature}: {} in use, waited for {n}",
        daemon.in_use(feature)
    );
}

/// Ends a holder the way a user does: SIGTERM to `tally run`, which passes it to the
/// command and checks the seat in (exit 143).
fn end(mut h: Holder) {
    let pid = h.child.id().to_string();
    ok(run(Command::new("kill").args(["-TERM", &pid])));
    let status = h.child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "tally run after SIGTERM");
}

/// A `tally run` that must be denied (exit 75).
fn denied(daemon: &Daemon, feature: &str) {
    let out = run(daemon.tally().args(["run", feature, "--", "true"]));
    assert_eq!(out.status.code(), Some(75), "{out:?}");
}

/// Example Corp (C-1001): solver 2 seats with 1 overdraft, mesher 1. Report 1: three
/// solver seats held (one in overdraft) and a fourth denied. Then an add-on brings
/// solver to 4 by a reload; report 2: four seats used. Returns the report paths.
fn example_corp(site: &VendorSite, reports: &Path) -> Vec<PathBuf> {
    let customer = ("C-1001", "Example Corp");
    site.issue_spec(
        "C-1001-2026",
        &spec(
            customer,
            "C-1001-2026",
            &[("solver", 2, 1), ("mesher", 1, 0)],
        ),
    );
    let daemon = site.daemon();
    next_second();
    let a = Holder::start(&daemon, "solver", 600);
    let b = Holder::start(&daemon, "solver", 600);
    wait_in_use(&daemon, "solver", 2);
    let c = Holder::start(&daemon, "solver", 600);
    wait_in_use(&daemon, "solver", 3);
    denied(&daemon, "solver");
    // The overdraft seat is held across at least one second boundary.
    next_second();
    end(c);
    wait_in_use(&daemon, "solver", 2);
    end(a);
    end(b);
    wait_in_use(&daemon, "solver", 0);
    let first = reports.join("2026-11/tally-report-00000001.report");
    export(&daemon, site, &first);
    site.issue_spec(
        "C-1001-addon",
        &spec(customer, "C-1001-addon", &[("solver", 2, 0)]),
    );
    next_second();
    ok(run(admin(&daemon, site).arg("reload")));
    next_second();
    ok(run(daemon
        .tally()
        .args(["run", "solver", "--count", "4", "--", "true"])));
    let second = reports.join("2026-12/tally-report-00000002.report");
    export(&daemon, site, &second);
    daemon.stop();
    vec![first, second]
}

/// Nordwerk GmbH (C-2002): mesher 1 seat, held once with a denial, used once more.
/// Report 2 lies where a path sort puts it before report 1.
fn nordwerk(site: &VendorSite, dir: &Path) -> Vec<PathBuf> {
    site.issue_spec(
        "C-2002-2026",
        &spec(
            ("C-2002", "Nordwerk GmbH"),
            "C-2002-2026",
            &[("mesher", 1, 0)],
        ),
    );
    let daemon = site.daemon();
    next_second();
    let h = Holder::start(&daemon, "mesher", 600);
    wait_in_use(&daemon, "mesher", 1);
    denied(&daemon, "mesher");
    end(h);
    wait_in_use(&daemon, "mesher", 0);
    let first = dir.join("tally-report-1.report");
    export(&daemon, site, &first);
    next_second();
    ok(run(daemon.tally().args(["run", "mesher", "--", "true"])));
    let second = dir.join("late/tally-report-2.report");
    export(&daemon, site, &second);
    daemon.stop();
    vec![first, second]
}

fn copy_bundles(site: &VendorSite, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(site.path("bundles")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

// ---- a small XML reader: the HTML is written well-formed so it can be checked here ----

#[derive(Debug, Default)]
struct El {
    name: String,
    attrs: BTreeMap<String, String>,
    children: Vec<Node>,
}

#[derive(Debug)]
enum Node {
    El(El),
    Text(String),
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#183;", "·")
        .replace("&amp;", "&")
}

/// Parses the page; panics on a tag closed out of order or left open.
fn parse(html: &str) -> El {
    let mut rest = html.trim_start();
    if let Some(r) = rest.strip_prefix("<!DOCTYPE html>") {
        rest = r;
    }
    let mut stack: Vec<El> = vec![El::default()];
    while !rest.is_empty() {
        let Some(lt) = rest.find('<') else {
            stack
                .last_mut()
                .unwrap()
                .children
                .push(Node::Text(unescape(rest)));
            break;
        };
        if lt > 0 {
            stack
                .last_mut()
                .unwrap()
                .children
                .push(Node::Text(unescape(&rest[..lt])));
        }
        let gt = lt + rest[lt..].find('>').expect("unclosed tag");
        let tag = &rest[lt + 1..gt];
        rest = &rest[gt + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            let el = stack.pop().unwrap();
            assert_eq!(el.name, name.trim(), "closing tag out of order");
            stack.last_mut().unwrap().children.push(Node::El(el));
            continue;
        }
        let self_closing = tag.ends_with('/');
        let tag = tag.trim_end_matches('/');
        let (name, mut attrs_text) = tag.split_once(' ').unwrap_or((tag, ""));
        let mut el = El {
            name: name.to_string(),
            ..El::default()
        };
        loop {
            attrs_text = attrs_text.trim_start();
            let Some(eq) = attrs_text.find("=\"") else {
                assert!(
                    attrs_text.is_empty(),
                    "attribute without value: {attrs_text}"
                );
                break;
            };
            let key = attrs_text[..eq].to_string();
            let after = &attrs_text[eq + 2..];
            let end = after.find('"').expect("unterminated attribute");
            el.attrs.insert(key, unescape(&after[..end]));
            attrs_text = &after[end + 1..];
        }
        if self_closing {
            stack.last_mut().unwrap().children.push(Node::El(el));
        } else {
            stack.push(el);
        }
    }
    assert_eq!(
        stack.len(),
        1,
        "tags left open: {:?}",
        stack.last().map(|e| &e.name)
    );
    stack.pop().unwrap()
}

impl El {
    fn has_class(&self, class: &str) -> bool {
        self.attrs
            .get("class")
            .is_some_and(|c| c.split_whitespace().any(|x| x == class))
    }

    /// Every element below (depth first) with this tag name and class ("" for any).
    fn all<'a>(&'a self, name: &str, class: &str) -> Vec<&'a El> {
        let mut out = Vec::new();
        for c in &self.children {
            if let Node::El(e) = c {
                if e.name == name && (class.is_empty() || e.has_class(class)) {
                    out.push(e);
                }
                out.extend(e.all(name, class));
            }
        }
        out
    }

    fn one<'a>(&'a self, name: &str, class: &str) -> &'a El {
        let all = self.all(name, class);
        assert_eq!(all.len(), 1, "{name}.{class}: {} found", all.len());
        all[0]
    }

    fn text(&self) -> String {
        self.children
            .iter()
            .map(|c| match c {
                Node::Text(t) => t.clone(),
                Node::El(e) => e.text(),
            })
            .collect()
    }

    /// The cells of each body row of a table.
    fn rows(&self) -> Vec<Vec<String>> {
        self.one("tbody", "")
            .all("tr", "")
            .iter()
            .map(|tr| tr.all("td", "").iter().map(|td| td.text()).collect())
            .collect()
    }

    fn attr(&self, name: &str) -> &str {
        self.attrs
            .get(name)
            .unwrap_or_else(|| panic!("{} without {name}", self.name))
    }
}

/// The y coordinates a path's `d` visits.
fn path_ys(d: &str) -> Vec<String> {
    d.split(['M', 'L'])
        .filter_map(|p| p.trim().split_once(','))
        .map(|(_, y)| y.trim().to_string())
        .collect()
}

fn date_of(unix: u64) -> String {
    tally_protocol::time::UnixTime(unix).date()
}

#[test]
fn reconcile_dir_sums_up_many_customers_in_one_table() {
    let tree = tempfile::tempdir().unwrap();
    let example = VendorSite::new();
    let nord = VendorSite::new();
    example_corp(&example, &tree.path().join("example-corp/reports"));
    copy_bundles(&example, &tree.path().join("example-corp/bundles"));
    let nord_reports = nordwerk(&nord, &tree.path().join("nordwerk"));
    copy_bundles(&nord, &tree.path().join("nordwerk"));

    let reconcile = |format: &str| {
        ok(run(publisher()
            .args(["reconcile", "--format", format, "--dir"])
            .arg(tree.path())))
    };
    let doc: serde_json::Value = serde_json::from_str(&reconcile("json")).unwrap();
    let rows = doc["rows"].as_array().unwrap();
    let key = |r: &serde_json::Value| {
        (
            r["customer_id"].as_str().unwrap().to_string(),
            r["feature"].as_str().unwrap().to_string(),
        )
    };
    assert_eq!(
        rows.iter().map(key).collect::<Vec<_>>(),
        [
            ("C-1001", "mesher"),
            ("C-1001", "solver"),
            ("C-2002", "mesher")
        ]
        .map(|(c, f)| (c.to_string(), f.to_string()))
    );
    let row = |i: usize| &rows[i];
    // Example Corp's solver: licensed 4 at the end (2 + the add-on), peak 4; one seat
    // in overdraft for as long as the third holder ran; the fourth denied.
    let solver = row(1);
    assert_eq!(solver["customer"], "Example Corp", "{solver}");
    assert_eq!(solver["licensed"], 4, "{solver}");
    assert_eq!(solver["peak"], 4, "{solver}");
    assert_eq!(solver["overdraft_peak"], 1, "{solver}");
    assert_eq!(solver["denials"], 1, "{solver}");
    assert_eq!(solver["reports"], 2, "{solver}");
    let over = solver["overdraft_seat_hours"].as_f64().unwrap();
    assert!(over > 0.0 && over <= 10.0 / 3600.0, "{solver}");
    // It equals the overdraft periods of that chain's reconciliation.
    let example_rec = &doc["reconciliations"][0];
    let solver_total = &example_rec["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["feature"] == "solver")
        .unwrap()["total"];
    let periods = solver_total["overdraft_periods"].as_array().unwrap();
    assert_eq!(periods.len(), 1, "{solver_total}");
    assert_eq!(periods[0]["seats"], 1);
    let secs =
        periods[0]["end_unix"].as_u64().unwrap() - periods[0]["start_unix"].as_u64().unwrap();
    assert!((1..=10).contains(&secs), "{periods:?}");
    assert!(
        (over - secs as f64 / 3600.0).abs() < 1e-9,
        "{over} vs {secs} s"
    );
    let mesher = row(0);
    assert_eq!(
        (&mesher["licensed"], &mesher["peak"], &mesher["denials"]),
        (
            &serde_json::json!(1),
            &serde_json::json!(0),
            &serde_json::json!(0)
        )
    );
    // Nordwerk: two reports, found in a tree where path order is not report order.
    let nm = row(2);
    assert_eq!(nm["customer"], "Nordwerk GmbH", "{nm}");
    assert_eq!(nm["licensed"], 1, "{nm}");
    assert_eq!(nm["peak"], 1, "{nm}");
    assert_eq!(nm["denials"], 1, "{nm}");
    assert_eq!(nm["reports"], 2, "{nm}");
    assert_eq!(nm["overdraft_seat_hours"], 0.0, "{nm}");

    // CSV: the same table, one line per row.
    let csv = reconcile("csv");
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "customer,customer_id,server,feature,from,to,licensed,peak,seat_hours,overdraft_seat_hours,overdraft_peak,denials,reports,grants_from_virtual_machines,grants_from_remote_sessions"
    );
    let csv_rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(csv_rows.len(), 3, "{csv}");
    for (cells, r) in csv_rows.iter().zip(rows) {
        assert_eq!(cells[0], r["customer"].as_str().unwrap());
        assert_eq!(cells[1], r["customer_id"].as_str().unwrap());
        assert_eq!(cells[3], r["feature"].as_str().unwrap());
        assert_eq!(cells[6], r["licensed"].to_string());
        assert_eq!(cells[7], r["peak"].to_string());
        let o: f64 = cells[9].parse().unwrap();
        assert!((o - r["overdraft_seat_hours"].as_f64().unwrap()).abs() < 1e-4);
        assert_eq!(cells[11], r["denials"].to_string());
    }

    // HTML: the summary table with the same rows, then each customer's charts.
    let page = parse(&reconcile("html"));
    let summary = page.one("table", "summary");
    let html_rows = summary.rows();
    assert_eq!(html_rows.len(), 3);
    for (cells, r) in html_rows.iter().zip(rows) {
        assert_eq!(cells[0], r["customer"].as_str().unwrap());
        assert_eq!(cells[3], r["feature"].as_str().unwrap());
        assert_eq!(cells[6], r["licensed"].to_string());
        assert_eq!(cells[7], r["peak"].to_string());
        assert_eq!(cells[11], r["denials"].to_string());
    }
    assert_eq!(page.all("svg", "chart").len(), 3);

    // A report that does not verify: named, exit 65, nothing reconciled.
    let text = std::fs::read_to_string(&nord_reports[0]).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mid = lines.len() / 2;
    let flipped: String = lines[mid]
        .chars()
        .enumerate()
        .map(|(i, c)| match (i, c) {
            (10, 'A') => 'B',
            (10, _) => 'A',
            (_, c) => c,
        })
        .collect();
    lines[mid] = flipped;
    let forged = tree.path().join("nordwerk/forged/tally-report-1.report");
    std::fs::create_dir_all(forged.parent().unwrap()).unwrap();
    std::fs::write(&forged, lines.join("\n") + "\n").unwrap();
    let out = run(publisher()
        .args(["reconcile", "--format", "csv", "--dir"])
        .arg(tree.path()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    assert!(stderr.contains(&forged.display().to_string()), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing reconciled");
    std::fs::remove_file(&forged).unwrap();

    // Reports of a server none of the bundles binds: named, exit 65.
    std::fs::remove_file(tree.path().join("nordwerk/C-2002-2026.bundle")).unwrap();
    let out = run(publisher().args(["reconcile", "--dir"]).arg(tree.path()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    assert!(
        stderr.contains(&nord_reports[0].display().to_string())
            && stderr.contains("none of the given bundles binds"),
        "{stderr}"
    );
    // ... and given with --bundle, they count again.
    let doc: serde_json::Value = serde_json::from_str(&ok(run(publisher()
        .args(["reconcile", "--dir"])
        .arg(tree.path())
        .arg("--bundle")
        .arg(nord.path("bundles")))))
    .unwrap();
    assert_eq!(doc["rows"].as_array().unwrap().len(), 3);
}

#[test]
fn reconcile_html_is_readable_by_a_billing_analyst() {
    let site = VendorSite::new();
    let reports = example_corp(&site, &site.path("reports"));
    let reconcile = |format: &str| {
        ok(run(publisher()
            .args(["reconcile", "--format", format, "--bundle"])
            .arg(site.path("bundles"))
            .args(&reports)))
    };
    let doc: serde_json::Value = serde_json::from_str(&reconcile("json")).unwrap();
    let html = reconcile("html");
    // Kept for a look: target/test-artifacts/reconcile.html.
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    if std::fs::create_dir_all(&artifacts).is_ok() {
        let _ = std::fs::write(artifacts.join("reconcile.html"), &html);
    }
    // Self-contained: nothing to fetch.
    for needle in ["src=", "href=", "url(", "@import", "<script", "<link"] {
        assert!(!html.contains(needle), "{needle} in the page");
    }
    let page = parse(&html);
    let sections = page.all("section", "feature");
    let names: Vec<&str> = sections.iter().map(|s| s.attr("data-feature")).collect();
    assert_eq!(names, ["mesher", "solver"], "features in sorted order");
    let feature = |name: &str| {
        doc["features"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["feature"] == name)
            .unwrap()
            .clone()
    };
    let solver = feature("solver");
    let total = &solver["total"];
    let section = sections[1];
    let svg = section.one("svg", "chart");

    // The y-axis: seats, ticks from 0 up to at least the peak and the licence.
    let y_axis = svg.one("g", "y-axis");
    assert_eq!(y_axis.one("text", "axis-title").text(), "seats");
    let ticks: Vec<u32> = y_axis
        .all("text", "tick-label")
        .iter()
        .map(|t| t.text().parse().unwrap())
        .collect();
    assert!(ticks.len() >= 3, "{ticks:?}");
    assert_eq!(ticks[0], 0);
    assert!(ticks.windows(2).all(|w| w[0] < w[1]), "{ticks:?}");
    assert!(*ticks.last().unwrap() >= 4, "{ticks:?}");
    let grid_y: BTreeMap<u32, String> = y_axis
        .all("line", "grid")
        .iter()
        .map(|l| {
            (
                l.attr("data-seats").parse().unwrap(),
                l.attr("y1").to_string(),
            )
        })
        .collect();

    // The time axis: ticks inside the period, labelled with the time and the date.
    let from = total["licensed_steps"][0]["from_unix"].as_u64().unwrap();
    let x_axis = svg.one("g", "x-axis");
    let labels = x_axis.all("text", "tick-label");
    assert!(labels.len() >= 2, "{} time ticks", labels.len());
    let end = doc["features"][0]["timeline"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()[0]
        .as_u64()
        .unwrap();
    for l in &labels {
        let t: u64 = l.attr("data-unix").parse().unwrap();
        assert!((from..=end).contains(&t), "tick {t} outside {from}..{end}");
        let s = t % 86_400;
        let clock = [s / 3600, s / 60 % 60, s % 60].map(|v| format!("{v:02}"));
        assert!(
            l.text() == clock.join(":") || l.text() == clock[..2].join(":"),
            "tick at {t} labelled {}",
            l.text()
        );
    }
    let dates: Vec<String> = x_axis
        .all("text", "tick-date")
        .iter()
        .map(|d| d.text())
        .collect();
    assert!(
        dates.contains(&date_of(labels[0].attr("data-unix").parse().unwrap())),
        "{dates:?}"
    );
    assert!(x_axis
        .one("text", "axis-title")
        .text()
        .contains(&date_of(from)));

    // Licensed as a step line from the bundle history: 2 seats, then 4 after the reload.
    let licensed_ys: std::collections::BTreeSet<String> =
        path_ys(svg.one("path", "licensed").attr("d"))
            .into_iter()
            .collect();
    assert_eq!(
        licensed_ys,
        [&grid_y[&2], &grid_y[&4]].into_iter().cloned().collect(),
        "licensed line at the 2 and 4 seat grid lines"
    );
    let steps: Vec<Vec<String>> = section.one("table", "licensed").rows();
    assert_eq!(
        steps.iter().map(|r| r[1].as_str()).collect::<Vec<_>>(),
        ["2", "4"]
    );
    assert!(svg.all("path", "in-use").len() == 1);
    let legend = svg.one("g", "legend").text();
    assert!(
        legend.contains("seats in use") && legend.contains("seats licensed"),
        "{legend}"
    );

    // The overdraft periods: start, end, seats, as the JSON has them.
    let rows = section.one("table", "overdraft").rows();
    let periods = total["overdraft_periods"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows.len(), periods.len());
    assert_eq!(rows[0][0], periods[0]["start"].as_str().unwrap());
    assert_eq!(rows[0][1], periods[0]["end"].as_str().unwrap());
    assert_eq!(rows[0][2], "1");
    assert_eq!(svg.all("rect", "overdraft").len(), 1);
    // mesher was never overdrawn.
    assert_eq!(sections[0].one("table", "overdraft").rows(), [["none"]]);

    // Chromium reads the same page: its DOM has every chart element this reader found,
    // and a screenshot is kept next to the page.
    const CHROMIUM: &str = "/usr/bin/chromium";
    assert!(
        Path::new(CHROMIUM).exists(),
        "this test renders the page in Chromium: apt-get install chromium"
    );
    let page_path = site.path("reconcile.html");
    std::fs::write(&page_path, &html).unwrap();
    let profile = tempfile::tempdir().unwrap();
    let chromium = |extra: &str| {
        let out = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ])
            .args(["--disable-background-networking", "--window-size=1000,1400"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(extra)
            .arg(format!("file://{}", page_path.display()))
            .output()
            .expect("running chromium");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dom = chromium("--dump-dom");
    for needle in [
        "class=\"tick-label\"",
        "class=\"licensed\"",
        "class=\"in-use\"",
        "class=\"overdraft\"",
        "<svg",
    ] {
        assert_eq!(
            dom.matches(needle).count(),
            html.matches(needle).count(),
            "{needle} in Chromium's DOM"
        );
    }
    chromium(&format!(
        "--screenshot={}",
        artifacts.join("reconcile.png").display()
    ));
}

#[test]
fn import_flexlm_reads_flexlm_meaning() {
    let dir = tempfile::tempdir().unwrap();
    let license =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../publisher/tests/data/triad-supersede.lic");
    let out_path = dir.path().join("spec.toml");
    let out = ok(run(publisher()
        .arg("import-flexlm")
        .arg(&license)
        .arg("--out")
        .arg(&out_path)));
    // The site, every dropped keyword with its line, what was superseded and expired.
    for needle in [
        "three SERVER lines: a three-server redundant site",
        "TALLY_SERVER",
        "line 18: FEATURE cfd_suite: FLOAT_OK (",
        "line 17: FEATURE viewer: HOSTID=ANY (",
        "line 7: INCREMENT solver left out: superseded by line 9",
        "line 16: FEATURE mesher left out: superseded by line 18",
        "line 17: FEATURE viewer left out: superseded by line 18",
        "line 21: INCREMENT trial_tool expired on 2025-06-30",
    ] {
        assert!(out.contains(needle), "{needle:?} not in:\n{out}");
    }
    // SUPERSEDE and TS_OK are keywords, not license keys.
    assert!(!out.contains("license key"), "{out}");
    let spec = std::fs::read_to_string(&out_path).unwrap();
    assert!(spec.contains("# EXPIRED: line 21"), "{spec}");
    // TS_OK allows remote sessions; USER_BASED is named users: both mapped, not dropped.
    assert!(
        !out.contains("TS_OK") && !out.contains("USER_BASED"),
        "{out}"
    );
    assert!(spec.contains("remote_sessions = \"allow\""), "{spec}");
    assert!(spec.contains("named = \"user\""), "{spec}");
    // DUP_GROUP=UHD is duplicate grouping on the three fields, no longer dropped.
    assert!(!out.contains("DUP_GROUP"), "{out}");
    assert!(
        spec.contains("name = \"cfd_suite\"") && spec.contains("share = \"user+host+display\""),
        "{spec}"
    );
    let filled = spec
        .replace("id = \"\"", "id = \"C-9\"")
        .replace("name = \"\"", "name = \"Example\"");
    let parsed = tally_publisher::spec::Spec::parse(&out_path, &filled).unwrap();
    let features: Vec<(&str, String, u64)> = parsed
        .feature
        .iter()
        .map(|f| (f.name.as_str(), format!("{:?}", f.seats), f.linger_secs))
        .collect();
    let names: Vec<&str> = features.iter().map(|f| f.0).collect();
    // The 2024 solver line, mesher and viewer are superseded; the rest is kept.
    assert_eq!(
        names,
        ["solver", "solver", "solver", "cfd_suite", "trial_tool"],
        "{spec}"
    );
    assert_eq!(features[0].2, 300, "LINGER=300 is linger_secs: {spec}");
    assert!(features[0].1.contains("12"), "{features:?}");
    assert!(features[1].1.contains('3'), "{features:?}");
    assert!(features[2].1.contains('1'), "{features:?}");
}
