//! Issue 19, alert rules and dashboard: every metric that `packaging/prometheus`'s alert
//! rules and Grafana dashboard query is one a real `tallyd` serves on `/metrics` (a rule
//! over a name tallyd does not export would never fire, and a dashboard panel would stay
//! empty, without anyone noticing). The names are read from the files as shipped: the
//! rules' `expr` fields and the dashboard's `expr` and variable queries, each taken apart
//! by a small PromQL tokenizer.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;
use tally_tests::cluster::{free_udp_addrs, ClusterSite};
use tally_tests::{ok, wait_until, Daemon, Holder, OVERDRAFT_AND_UNCOUNTED_SPEC};

/// Series Prometheus makes itself for every target (not tallyd's): the rules may name them.
const PROMETHEUS_OWN: [&str; 1] = ["up"];

/// The prefix of the cluster gauges, which only a member of a three-server site serves.
const CLUSTER: &str = "tally_cluster_";

/// How long a three-server site may take to elect and report its members' lag.
const PATIENCE: Duration = Duration::from_secs(60);

fn packaging(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/prometheus")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `expr` fields of a Prometheus rules file: inline (`expr: a > 1`, quoted or not)
/// or block scalars (`expr: |` and the lines indented below it).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let indent = line.len() - line.trim_start().len();
            let mut block = String::new();
            while i < lines.len()
                && (lines[i].trim().is_empty()
                    || lines[i].len() - lines[i].trim_start().len() > indent)
            {
                block.push_str(lines[i].trim());
                block.push(' ');
                i += 1;
            }
            exprs.push(block);
        } else {
            let unquoted = value
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .map(|v| v.replace("''", "'"))
                .or_else(|| {
                    value
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .map(|v| v.replace("\\\"", "\""))
                })
                .unwrap_or_else(|| value.to_string());
            exprs.push(unquoted);
        }
    }
    exprs
}

/// The queries of a Grafana dashboard: every `expr` (panel targets, at any depth) and
/// the query variables' `query` and `definition`.
fn dashboard_exprs(json: &serde_json::Value) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&json["panels"], &mut out);
    for var in json["templating"]["list"]
        .as_array()
        .expect("templating.list")
    {
        if var["type"] != "query" {
            continue;
        }
        for q in [&var["query"]["query"], &var["query"], &var["definition"]] {
            if let Some(q) = q.as_str() {
                out.push(q.to_string());
            }
        }
    }
    out
}

/// The metric names a PromQL expression (or a Grafana `label_values(SELECTOR, label)`)
/// selects: identifiers outside strings, label matchers `{..}`, ranges `[..]` and
/// Grafana variables `$x`, that are not a function or aggregation (followed by `(`), a
/// keyword or aggregation, or a label in a `by`/`without`/`on`/`ignoring`/`group_*` list.
fn metric_names(expr: &str) -> Vec<String> {
    // Aggregations too: `sum by (job) (x)` puts their `(` after the label list.
    const KEYWORDS: [&str; 21] = [
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "atan2",
        "group_left",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    const WITH_LABELS: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let expr = expr.trim();
    // label_values(selector, label): only the selector names a metric.
    let expr = match expr.strip_prefix("label_values(") {
        Some(rest) => rest.rsplit_once(',').map_or("", |(selector, _)| selector),
        None => expr,
    };
    let c: Vec<char> = expr.chars().collect();
    // The index just past the bracket that closes the one at `open` (quotes respected).
    let close = |open: usize, end: char| {
        let mut i = open + 1;
        let mut quote = None;
        while i < c.len() {
            match (quote, c[i]) {
                (Some(_), '\\') => i += 1,
                (Some(q), ch) if ch == q => quote = None,
                (None, '"' | '\'' | '`') => quote = Some(c[i]),
                (None, ch) if ch == end => return i + 1,
                _ => {}
            }
            i += 1;
        }
        c.len()
    };
    let ident = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':';
    let mut names = Vec::new();
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            '"' | '\'' | '`' => {
                let q = c[i];
                i += 1;
                while i < c.len() && c[i] != q {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' => i = close(i, '}'),
            '[' => i = close(i, ']'),
            '$' | '0'..='9' | '.' => {
                i += 1;
                while i < c.len() && (ident(c[i]) || c[i] == '.') {
                    i += 1;
                }
            }
            ch if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' => {
                let start = i;
                while i < c.len() && ident(c[i]) {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let mut next = i;
                while next < c.len() && c[next].is_whitespace() {
                    next += 1;
                }
                let call = c.get(next) == Some(&'(');
                if call && WITH_LABELS.contains(&word.as_str()) {
                    i = close(next, ')');
                } else if !call && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                    names.push(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// Every metric name the shipped rules and dashboard query, with where: (name, source).
fn queried_names() -> Vec<(String, String)> {
    let rules = packaging("tally-alerts.yml");
    let dashboard: serde_json::Value =
        serde_json::from_str(&packaging("tally-dashboard.json")).expect("dashboard JSON");
    let mut named = Vec::new();
    let rule_exprs = rule_exprs(&rules);
    assert_eq!(
        rule_exprs.len(),
        rules.matches("- alert:").count(),
        "one expr per alert: {rule_exprs:#?}"
    );
    for e in &rule_exprs {
        let names = metric_names(e);
        assert!(!names.is_empty(), "no metric found in the rule `{e}`");
        named.extend(
            names
                .into_iter()
                .map(|n| (n, format!("tally-alerts.yml: {e}"))),
        );
    }
    let queries = dashboard_exprs(&dashboard);
    assert!(
        queries.len() >= 10,
        "too few dashboard queries: {queries:?}"
    );
    for q in &queries {
        let names = metric_names(q);
        assert!(
            !names.is_empty(),
            "no metric found in the dashboard query `{q}`"
        );
        named.extend(
            names
                .into_iter()
                .map(|n| (n, format!("tally-dashboard.json: {q}"))),
        );
    }
    named
}

/// Names on a `/metrics` page: each sample's (`x_bucket` of a histogram included) and
/// each family's.
fn served_names(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(family) => family.split_whitespace().next(),
            None if l.starts_with('#') => None,
            None => l.split(['{', ' ']).next(),
        })
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect()
}

/// The queried names not on `page`, with where each is queried.
fn missing<'a>(
    named: &'a [(String, String)],
    page: &str,
    which: impl Fn(&str) -> bool,
) -> Vec<&'a (String, String)> {
    let served = served_names(page);
    named
        .iter()
        .filter(|(n, _)| which(n) && !PROMETHEUS_OWN.contains(&n.as_str()))
        .filter(|(n, _)| !served.contains(n))
        .collect()
}

/// A single server after one checkout and one denial serves every name the rules and
/// the dashboard query, the cluster gauges aside (see the next test). A misspelt name
/// is caught by the same check.
#[test]
fn every_metric_the_alert_rules_and_dashboard_query_is_served_by_tallyd() {
    let named = queried_names();
    let site = tally_tests::VendorSite::new();
    site.enable_http();
    site.issue_spec("site", OVERDRAFT_AND_UNCOUNTED_SPEC);
    let daemon = site.daemon();
    assert!(
        daemon.http.is_some(),
        "tallyd run prints its dashboard address"
    );

    // One checkout (held) and one denial (a feature no bundle serves).
    let _holder = Holder::start(&daemon, "solver", 600);
    assert!(
        wait_until(Duration::from_secs(30), || daemon.in_use("solver") == 1),
        "the checkout was not granted"
    );
    let denied = daemon
        .tally()
        .args(["run", "mesher", "--", "true"])
        .output()
        .unwrap();
    assert!(!denied.status.success(), "mesher was granted: {denied:?}");

    let mut page = String::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            let (code, body) = daemon.http("GET", "/metrics", None);
            page = body;
            code == 200 && page.contains("tally_denials_total{")
        }),
        "/metrics never counted the denial: {page}"
    );
    let gone = missing(&named, &page, |n| !n.starts_with(CLUSTER));
    assert!(
        gone.is_empty(),
        "queried but not served by tallyd: {gone:#?}\n/metrics:\n{page}"
    );
    // A single server has no cluster gauges: those are checked on a three-server site.
    assert!(!page.contains(CLUSTER), "{page}");
    assert!(
        named.iter().any(|(n, _)| n.starts_with(CLUSTER)),
        "the rules name no cluster metric"
    );

    // The check fails on a name tallyd does not export: a rules file with one misspelt.
    let rules =
        packaging("tally-alerts.yml").replace("tally_store_writable", "tally_store_writeable");
    let misspelt: Vec<(String, String)> = rule_exprs(&rules)
        .iter()
        .flat_map(|e| metric_names(e))
        .map(|n| (n, String::new()))
        .collect();
    let gone: Vec<&str> = missing(&misspelt, &page, |n| !n.starts_with(CLUSTER))
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(gone, ["tally_store_writeable"]);
    daemon.stop();
}

/// A three-server site: the cluster gauges the rules and the dashboard query are served
/// (the role by every member, the replication lag by the leader).
#[test]
fn every_cluster_metric_the_alert_rules_and_dashboard_query_is_served_by_a_member() {
    let named = queried_names();
    let c = ClusterSite::new(3);
    ok(c.issue_seats(&c.all_requests(), "ha.bundle", 5));
    let addrs = free_udp_addrs(3);
    for i in 0..3 {
        c.install("ha.bundle", i);
    }
    c.configure(&addrs, |_, j| addrs[j]);
    let daemons: Vec<Daemon> = (0..3).map(|i| c.daemon(i)).collect();

    // Once a leader has heard from both others, its page has every cluster gauge.
    let mut pages = Vec::new();
    let all_served = wait_until(PATIENCE, || {
        pages = daemons
            .iter()
            .map(|d| d.http("GET", "/metrics", None).1)
            .collect();
        pages
            .iter()
            .any(|p| missing(&named, p, |n| n.starts_with(CLUSTER)).is_empty())
    });
    let gone: Vec<_> = pages
        .iter()
        .map(|p| missing(&named, p, |n| n.starts_with(CLUSTER)))
        .collect();
    assert!(
        all_served,
        "no member serves every queried cluster gauge; missing per member: {gone:#?}\npages:\n{}",
        pages.join("\n----\n")
    );
    for d in daemons {
        d.stop();
    }
}
