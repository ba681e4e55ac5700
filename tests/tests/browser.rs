//! The dashboard in a real browser: headless Chromium, driven through chromedriver's
//! WebDriver protocol, loads the page of a `tallyd run` serving a vendor's bundle, shows
//! the seats the daemon holds (overdraft, an uncounted feature's users, the bundles),
//! refuses a wrong admin token and takes the right one, removes a lease with its button
//! and reloads an add-on with its. A screenshot is kept in
//! `target/test-artifacts/dashboard.png`.

use base64::Engine;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tally_tests::{wait_until, Daemon, Holder, OVERDRAFT_AND_UNCOUNTED_SPEC};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Installs Debian's chromium and chromium-driver when they are missing and we may
/// (root with apt-get: this machine kind and CI); otherwise says what to install.
fn ensure_browser() {
    if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() {
        return;
    }
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    assert!(
        root,
        "the dashboard test needs Chromium: apt-get install chromium chromium-driver"
    );
    for args in [
        &["update", "-qq"][..],
        &["install", "-y", "-qq", "chromium", "chromium-driver"][..],
    ] {
        let ok = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "apt-get {args:?} failed: install chromium chromium-driver"
        );
    }
}

struct Driver {
    child: Child,
    addr: SocketAddr,
    session: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start(profile: &Path) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        assert!(
            wait_until(Duration::from_secs(30), || TcpStream::connect(addr).is_ok()),
            "chromedriver did not start"
        );
        let mut d = Driver {
            child,
            addr,
            session: String::new(),
        };
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        }}});
        let v = d
            .call("POST", "/session", Some(caps))
            .expect("creating a browser session");
        d.session = v["sessionId"].as_str().expect("session id").to_string();
        d
    }

    /// One WebDriver call; Ok(value) or Err(error text).
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut s = TcpStream::connect(self.addr).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60))).ok();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .map_err(|e| e.to_string())?;
        // chromedriver may keep the connection open: read the head, then exactly the body.
        let mut raw = Vec::new();
        let mut buf = [0u8; 8192];
        let head_end = loop {
            let n = s.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed before the response head".into());
            }
            raw.extend_from_slice(&buf[..n]);
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        let chunked = head.contains("transfer-encoding: chunked");
        loop {
            let have = raw.len() - head_end;
            let done = match length {
                Some(n) => have >= n,
                None if chunked => raw.ends_with(b"0\r\n\r\n"),
                None => false,
            };
            if done {
                break;
            }
            let n = s.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
        let body = String::from_utf8_lossy(&raw[head_end..]).into_owned();
        let payload = if chunked { dechunk(&body) } else { body };
        let v: Value = serde_json::from_str(&payload).map_err(|e| format!("{e}: {payload}"))?;
        if v["value"]["error"].is_string() {
            return Err(v["value"]["message"]
                .as_str()
                .unwrap_or("error")
                .to_string());
        }
        Ok(v["value"].clone())
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn find(&self, css: &str) -> Result<String, String> {
        let v = self.session_call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(|id| id.as_str())
            .map(String::from)
            .ok_or_else(|| "no element id".to_string())
    }

    fn text(&self, css: &str) -> Option<String> {
        let id = self.find(css).ok()?;
        self.session_call("GET", &format!("/element/{id}/text"), None)
            .ok()?
            .as_str()
            .map(String::from)
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// An add-on delivered while the server runs, loaded by the dashboard's reload button.
const ADD_ON: &str = r#"id = "acme-2031-0008"
vendor = "Acme Simulation"
[customer]
id = "C-1001"
name = "Example Corp"
[[feature]]
name = "mesher"
seats = 4
"#;

impl Driver {
    fn click(&self, css: &str) {
        let id = self.find(css).unwrap_or_else(|e| panic!("no {css}: {e}"));
        self.session_call("POST", &format!("/element/{id}/click"), Some(json!({})))
            .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
    }

    fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).unwrap();
        self.session_call(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        )
        .unwrap();
    }

    fn displayed(&self, css: &str) -> bool {
        self.find(css)
            .ok()
            .and_then(|id| {
                self.session_call("GET", &format!("/element/{id}/displayed"), None)
                    .ok()
            })
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    }

    /// Waits (30 s at most) until the text at `css` satisfies `ok`; the text last seen.
    fn wait_text(&self, css: &str, ok: impl Fn(&str) -> bool) -> Result<String, String> {
        let mut last = None;
        let found = wait_until(Duration::from_secs(30), || {
            last = self.text(css);
            last.as_deref().is_some_and(&ok)
        });
        let last = last.unwrap_or_else(|| "(no such element)".into());
        if found {
            Ok(last)
        } else {
            Err(last)
        }
    }
}

/// Every lease id `tally status` shows.
fn leases(daemon: &Daemon) -> Vec<String> {
    daemon.status()["features"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| f["holders"].as_array().unwrap().clone())
        .map(|h| h["lease"].as_str().unwrap().to_string())
        .collect()
}

/// Issue 15: the dashboard of a `tallyd run` with a vendor's bundle, in headless
/// Chromium: the overdraft in a feature's row (`3 / 2 (+1 overdraft)`), the users of an
/// uncounted feature instead of a percentage, customer, vendor and bundle ids; the
/// token login (a wrong token refused and no admin buttons), the remove button (the
/// lease gone from `tally status`) and the reload button (an add-on delivered while
/// running is served, and the page says the reload happened).
#[test]
fn the_dashboard_shows_overdraft_users_and_bundles_and_its_buttons_work() {
    ensure_browser();
    let site = tally_tests::VendorSite::new();
    site.enable_http();
    site.issue_spec("site", OVERDRAFT_AND_UNCOUNTED_SPEC);
    let daemon = site.daemon();
    let http = daemon.http.expect("dashboard address");
    let _two = Holder::start_with(&daemon, &["solver", "--count", "2"], 600);
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 2));
    let _overdraft = Holder::start_with(&daemon, &["solver"], 600);
    let _viewer = Holder::start_with(&daemon, &["viewer"], 600);
    assert!(wait_until(Duration::from_secs(30), || daemon
        .in_use("solver")
        == 3
        && daemon.in_use("viewer") == 1));
    let solver = daemon.feature("solver");
    assert_eq!(solver["overdraft_in_use"], 1);
    let one = solver["holders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["count"] == 1)
        .expect("the one-seat holder")["lease"]
        .as_str()
        .unwrap()
        .to_string();
    let viewer = &daemon.feature("viewer")["holders"][0];
    let user = format!(
        "{}@{}",
        viewer["user"].as_str().unwrap(),
        viewer["host"].as_str().unwrap()
    );

    let profile = tempfile::tempdir().unwrap();
    let driver = Driver::start(profile.path());
    driver
        .session_call(
            "POST",
            "/url",
            Some(json!({"url": format!("http://{http}/")})),
        )
        .expect("loading the dashboard");

    // What an admin reads.
    let usage = "tr[data-feature=\"solver\"] td.usage";
    driver
        .wait_text(usage, |t| t.trim() == "3 / 2 (+1 overdraft)")
        .unwrap_or_else(|t| panic!("the solver row does not show the overdraft: {t:?}"));
    assert_eq!(
        driver
            .text("tr[data-feature=\"solver\"] td.in-use")
            .as_deref(),
        Some("3")
    );
    assert_eq!(
        driver
            .text("tr[data-feature=\"solver\"] td.total")
            .as_deref(),
        Some("2")
    );
    assert_eq!(
        driver
            .text("tr[data-feature=\"solver\"] td.expires")
            .as_deref(),
        Some("last day 2031-06-30")
    );
    assert_eq!(
        driver
            .text("tr[data-feature=\"solver\"] td.bundles")
            .as_deref(),
        Some("acme-2031-0007")
    );
    let viewer_usage = driver
        .text("tr[data-feature=\"viewer\"] td.usage")
        .unwrap_or_default();
    assert_eq!(viewer_usage.trim(), format!("1 user: {user}"));
    assert_eq!(
        driver
            .text("tr[data-feature=\"viewer\"] td.total")
            .as_deref(),
        Some("uncounted")
    );
    let meta = driver.text("#meta").unwrap_or_default();
    assert!(
        meta.contains("Example Corp (customer C-1001)") && meta.contains("vendor Acme Simulation"),
        "{meta}"
    );
    let bundle = driver
        .text("tr[data-bundle=\"acme-2031-0007\"]")
        .unwrap_or_default();
    assert!(
        bundle.contains("Acme Simulation") && bundle.contains("Example Corp (C-1001)"),
        "{bundle}"
    );

    screenshot(&driver, "dashboard-overdraft.png");

    // Login: a wrong token is refused and shows no admin buttons; the right one does.
    let button = format!("button.remove[data-lease=\"{one}\"]");
    assert!(
        driver.find(&button).is_err(),
        "a remove button before login"
    );
    assert!(!driver.displayed("#reload"), "a reload button before login");
    driver.type_into("#token", "not-the-admin-token");
    driver.click("#login");
    driver
        .wait_text("#message", |t| t == "refused: wrong admin token")
        .unwrap_or_else(|t| panic!("a wrong token was not refused: {t:?}"));
    assert!(
        driver.find(&button).is_err(),
        "a remove button for a wrong token"
    );
    assert!(
        !driver.displayed("#reload"),
        "a reload button for a wrong token"
    );
    let token = std::fs::read_to_string(site.path("data/admin.token")).unwrap();
    driver.type_into("#token", token.trim());
    driver.click("#login");
    driver
        .wait_text("#message", |t| t == "signed in as administrator")
        .unwrap_or_else(|t| panic!("the token was not taken: {t:?}"));
    assert!(
        wait_until(Duration::from_secs(30), || driver.find(&button).is_ok()
            && driver.displayed("#reload")),
        "no admin buttons after logging in"
    );

    // Remove: the lease is gone from the server, and the page says so.
    driver.click(&button);
    assert!(
        wait_until(Duration::from_secs(30), || !leases(&daemon).contains(&one)),
        "the remove button did not remove {one}"
    );
    assert_eq!(daemon.in_use("solver"), 2);
    driver
        .wait_text("#message", |t| t == format!("removed {one}"))
        .unwrap_or_else(|t| panic!("the page does not report the removal: {t:?}"));
    driver
        .wait_text(usage, |t| t.trim() == "2 / 2 (100 %)")
        .unwrap_or_else(|t| panic!("the page does not show the seat free: {t:?}"));
    assert!(
        wait_until(Duration::from_secs(30), || driver
            .find(&format!("tr[data-lease=\"{one}\"]"))
            .is_err()),
        "the removed lease is still listed"
    );

    // Reload: an add-on delivered while running is served after the button.
    site.issue_spec("add-on", ADD_ON);
    assert!(
        daemon.status()["features"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["name"] != "mesher"),
        "mesher served before the reload"
    );
    driver.click("#reload");
    // The page shows the server's answer (its wording is the server's, so only its
    // gist is checked here).
    driver
        .wait_text("#message", |t| {
            t.to_lowercase().contains("reloaded") && !t.starts_with("refused")
        })
        .unwrap_or_else(|t| panic!("the page does not report the reload: {t:?}"));
    assert_eq!(daemon.feature("mesher")["total"], 4);
    driver
        .wait_text("tr[data-feature=\"mesher\"] td.total", |t| t == "4")
        .unwrap_or_else(|t| panic!("the page does not show the add-on: {t:?}"));
    assert!(driver.find("tr[data-bundle=\"acme-2031-0008\"]").is_ok());
    // Every lease kept across the reload.
    assert_eq!(daemon.in_use("solver"), 2);

    screenshot(&driver, "dashboard.png");
}

/// Keeps a screenshot of the page in `target/test-artifacts/NAME`.
fn screenshot(driver: &Driver, name: &str) {
    let shot = driver.session_call("GET", "/screenshot", None).unwrap();
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot.as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    std::fs::write(artifacts.join(name), &png).unwrap();
}
