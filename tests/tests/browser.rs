//! The dashboard in a real browser: headless Chromium, driven through chromedriver's
//! WebDriver protocol, loads the page, shows the seats the daemon holds, takes the admin
//! token, removes a lease with its button and shows the seat free. A screenshot is kept
//! in `target/test-artifacts/dashboard.png`.

use base64::Engine;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tally_tests::{wait_until, Daemon};

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

#[test]
fn the_dashboard_shows_the_seats_and_removes_a_lease() {
    ensure_browser();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let daemon = Daemon::start(&data, "127.0.0.1:0", &[]);
    let http = daemon.http.expect("dashboard address");
    // A borrowed seat is held by no process: removing it frees it for good.
    let cache = dir.path().join("cache");
    let out = daemon
        .tally()
        .env("TALLY_CACHE_DIR", &cache)
        .args(["borrow", "solver", "--for", "1d"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(daemon.in_use("solver"), 1);
    let lease = daemon.feature("solver")["holders"][0]["lease"]
        .as_str()
        .unwrap()
        .to_string();

    let driver = Driver::start(&dir.path().join("profile"));
    driver
        .session_call(
            "POST",
            "/url",
            Some(json!({"url": format!("http://{http}/")})),
        )
        .expect("loading the dashboard");
    let cell = "tr[data-feature=\"solver\"] td.in-use";
    assert!(
        wait_until(Duration::from_secs(30), || driver.text(cell).as_deref()
            == Some("1")),
        "the page does not show the seat the daemon holds: {:?}",
        driver.text(cell)
    );
    assert_eq!(
        driver
            .text("tr[data-feature=\"solver\"] td.total")
            .as_deref(),
        Some("5")
    );
    assert_eq!(
        driver
            .text("tr[data-feature=\"viewer\"] td.total")
            .as_deref(),
        Some("20")
    );

    // No remove button before logging in with the token.
    let button = format!("button.remove[data-lease=\"{lease}\"]");
    assert!(driver.find(&button).is_err());
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let field = driver.find("#token").unwrap();
    driver
        .session_call(
            "POST",
            &format!("/element/{field}/value"),
            Some(json!({"text": token.trim()})),
        )
        .unwrap();
    let login = driver.find("#login").unwrap();
    driver
        .session_call("POST", &format!("/element/{login}/click"), Some(json!({})))
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || driver.find(&button).is_ok()),
        "no remove button after logging in"
    );
    let id = driver.find(&button).unwrap();
    driver
        .session_call("POST", &format!("/element/{id}/click"), Some(json!({})))
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || daemon.in_use("solver") == 0),
        "the click did not free the seat"
    );
    assert!(
        wait_until(Duration::from_secs(30), || driver.text(cell).as_deref()
            == Some("0")),
        "the page does not show the seat free"
    );
    let shot = driver.session_call("GET", "/screenshot", None).unwrap();
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot.as_str().unwrap())
        .unwrap();
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    std::fs::write(artifacts.join("dashboard.png"), &png).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
}
