//! Helpers for end-to-end tests that run the real `tallyd` and `tally` binaries.
//!
//! The binaries are the ones `cargo test --workspace` builds next to the test executables
//! (the daemon and client crates have integration tests, which makes cargo build their
//! binaries before any test runs).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod c;
pub mod cluster;
pub mod relay;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Path of a workspace binary in the target directory of the running test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    // target/debug/deps/e2e-hash -> target/debug/NAME
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` so the binaries are built",
        path.display()
    );
    path
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A running `tallyd`; killed when dropped.
pub struct Daemon {
    child: Child,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its log file (stderr).
    pub log: PathBuf,
    /// The trust arguments `tally` needs for this daemon (`--demo` or `--vendor-key F`).
    pub trust: Vec<String>,
    /// The operations HTTP endpoint, if the daemon printed one.
    pub http: Option<SocketAddr>,
}

impl Daemon {
    /// Starts `tallyd demo` on `listen` with `data_dir`, plus `extra` arguments, and waits
    /// for its banner (at most 30 s).
    pub fn start(data_dir: &Path, listen: &str, extra: &[&str]) -> Daemon {
        let mut args: Vec<std::ffi::OsString> = vec!["demo".into(), "--data-dir".into()];
        args.push(data_dir.into());
        args.extend(["--listen".into(), listen.into()]);
        args.extend(extra.iter().map(Into::into));
        Daemon::spawn(
            &args,
            &data_dir.with_extension("log"),
            vec!["--demo".into()],
        )
    }

    /// Starts `tallyd run --config CONFIG`; `tally` trusts `vendor_pub`.
    pub fn run(config: &Path, vendor_pub: &Path) -> Daemon {
        let args: Vec<std::ffi::OsString> = vec!["run".into(), "--config".into(), config.into()];
        Daemon::spawn(
            &args,
            &config.with_extension("log"),
            vec!["--vendor-pub".into(), vendor_pub.display().to_string()],
        )
    }

    /// Starts `tallyd` with `args` and waits for its "listening on" line (at most 30 s).
    pub fn spawn(args: &[std::ffi::OsString], log_base: &Path, trust: Vec<String>) -> Daemon {
        let log = log_base.with_extension(format!("log.{}", nanos()));
        let mut child = Command::new(bin("tallyd"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("daemon log file"))
            .spawn()
            .expect("starting tallyd");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some((_, rest)) = line.split_once("listening on ") {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(("quic", addr));
                } else if let Some((_, rest)) = line
                    .contains("dashboard")
                    .then(|| line.split_once("http://"))
                    .flatten()
                {
                    let addr = rest.split('/').next().unwrap_or("").to_string();
                    let _ = tx.send(("http", addr));
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(("quic", a)) => a.parse().expect("banner address parses"),
            _ => {
                let _ = child.kill();
                panic!(
                    "tallyd printed no 'listening on' line within 30 s; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        // The dashboard line follows the banner when the endpoint is on.
        let http = match rx.recv_timeout(Duration::from_secs(2)) {
            Ok(("http", a)) => a.parse().ok(),
            _ => None,
        };
        Daemon {
            child,
            addr,
            log,
            trust,
            http,
        }
    }

    /// An HTTP request to the operations endpoint: (status code, body).
    pub fn http(&self, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
        use std::io::{Read, Write};
        let addr = self.http.expect("this daemon has no HTTP endpoint");
        let mut stream =
            std::net::TcpStream::connect(addr).expect("connecting to the HTTP endpoint");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .expect("writing the request");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .expect("reading the response");
        let code = response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    }

    /// The daemon's process id (to send it signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`HUP`, `TERM`) and returns at once.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits up to `timeout` for the daemon to exit on its own.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        // `try_wait` needs `&mut`; poll the process table instead.
        let proc = PathBuf::from(format!("/proc/{}/stat", self.pid()));
        wait_until(timeout, || {
            std::fs::read_to_string(&proc)
                .map(|s| s.split_whitespace().nth(2) == Some("Z"))
                .unwrap_or(true)
        })
    }

    /// Sends SIGTERM and waits (at most 30 s) for a clean exit.
    pub fn stop(mut self) {
        self.signal("TERM");
        let stopped = wait_until(Duration::from_secs(30), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        assert!(stopped, "tallyd did not stop on SIGTERM");
    }

    /// Kills the daemon with SIGKILL and waits for it to be gone.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A `tally` command pointed at this daemon, trusting what this daemon needs.
    pub fn tally(&self) -> Command {
        let mut c = Command::new(bin("tally"));
        c.arg("--server")
            .arg(self.addr.to_string())
            .args(&self.trust);
        c.env_remove("TALLY_SERVER");
        c
    }

    /// `tally status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = self
            .tally()
            .args(["status", "--json"])
            .output()
            .expect("running tally status");
        assert!(
            out.status.success(),
            "tally status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// Seats of `feature` in use, per `tally status --json`.
    pub fn in_use(&self, feature: &str) -> u64 {
        self.feature(feature)["in_use"].as_u64().expect("in_use")
    }

    /// One feature's entry in the status.
    pub fn feature(&self, feature: &str) -> serde_json::Value {
        self.status()["features"]
            .as_array()
            .expect("features")
            .iter()
            .find(|f| f["name"] == feature)
            .cloned()
            .unwrap_or_else(|| panic!("feature {feature} not in status"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A `tally run` holder in its own process group, so that killing it can also kill the
/// command it runs.
pub struct Holder {
    /// The `tally` process.
    pub child: Child,
    killed: bool,
}

impl Holder {
    /// Wraps a `tally run` child started in its own process group.
    pub fn from_child(child: Child) -> Holder {
        Holder {
            child,
            killed: false,
        }
    }

    /// Starts `tally run FEATURE -- sleep SECS` against `daemon`.
    pub fn start(daemon: &Daemon, feature: &str, secs: u32) -> Holder {
        Holder::start_with(daemon, &[feature], secs)
    }

    /// Starts `tally run ARGS -- sleep SECS` (ARGS: the feature and options).
    pub fn start_with(daemon: &Daemon, run_args: &[&str], secs: u32) -> Holder {
        Holder::start_as(daemon, None, run_args, secs)
    }

    /// Starts `tally run ARGS -- sleep SECS` as `user` (the `USER` the client reports;
    /// `None`: the test's own).
    pub fn start_as(daemon: &Daemon, user: Option<&str>, run_args: &[&str], secs: u32) -> Holder {
        use std::os::unix::process::CommandExt;
        let mut tally = daemon.tally();
        if let Some(user) = user {
            tally.env("USER", user);
        }
        let child = tally
            .arg("run")
            .args(run_args)
            .args(["--", "sleep", &secs.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("starting tally run");
        Holder {
            child,
            killed: false,
        }
    }

    /// SIGKILLs the holder and the command it runs (its whole process group).
    pub fn kill_group(&mut self) {
        if std::mem::replace(&mut self.killed, true) {
            return;
        }
        let pgid = self.child.id();
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// A checkout of one seat of `feature`, no version, no wait, no borrow.
pub fn one_seat(feature: &str) -> tally_protocol::wire::CheckoutRequest {
    tally_protocol::wire::CheckoutRequest {
        feature: feature.into(),
        count: 1,
        version: None,
        build_date: None,
        wait_secs: 0,
        borrow_secs: 0,
    }
}

/// The output of a command that must succeed (panics with both streams otherwise).
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command to its end.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("running a tally binary")
}

/// A customer site with a vendor key and an activated server (`tallyd init`, `request`,
/// a vendor key from `tally-publisher keygen`, a `tallyd.toml`), for tests that issue
/// vendor-signed bundles with the real tools.
pub struct VendorSite {
    root: tempfile::TempDir,
}

impl VendorSite {
    /// Sets the site up in a new temporary directory.
    #[allow(clippy::new_without_default)]
    pub fn new() -> VendorSite {
        let site = VendorSite {
            root: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(site.path("bundles")).unwrap();
        ok(run(Command::new(bin("tallyd"))
            .arg("init")
            .arg("--data-dir")
            .arg(site.path("data"))));
        ok(run(Command::new(bin("tallyd"))
            .arg("request")
            .arg("--data-dir")
            .arg(site.path("data"))
            .arg("--out")
            .arg(site.path("activation.req"))));
        ok(run(Command::new(bin("tally-publisher"))
            .arg("keygen")
            .arg("--out")
            .arg(site.path("vendor"))));
        std::fs::write(
            site.path("tallyd.toml"),
            format!(
                "listen = \"127.0.0.1:0\"\nhttp = false\ndata_dir = \"{}\"\nbundle_dir = \"{}\"\nvendor_keys = [\"{}\"]\n",
                site.path("data").display(),
                site.path("bundles").display(),
                site.path("vendor.pub").display()
            ),
        )
        .unwrap();
        site
    }

    /// A path inside the site.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// Issues bundle `id` with `features` (`name = seats`) into the bundle directory.
    pub fn issue(&self, id: &str, supersedes: &[&str], features: &[(&str, u32)]) -> PathBuf {
        let supersedes: Vec<String> = supersedes.iter().map(|s| format!("\"{s}\"")).collect();
        let mut spec = format!(
            "id = \"{id}\"\nvendor = \"Acme Simulation\"\nsupersedes = [{}]\n[customer]\nid = \"C-1001\"\nname = \"Example Corp\"\n",
            supersedes.join(", ")
        );
        for (name, seats) in features {
            spec.push_str(&format!(
                "[[feature]]\nname = \"{name}\"\nseats = {seats}\n"
            ));
        }
        self.issue_spec(id, &spec)
    }

    /// Issues bundle `id` from the spec text `spec` into the bundle directory.
    pub fn issue_spec(&self, id: &str, spec: &str) -> PathBuf {
        let spec_path = self.path(&format!("{id}.toml"));
        std::fs::write(&spec_path, spec).unwrap();
        let out = self.path(&format!("bundles/{id}.bundle"));
        ok(run(Command::new(bin("tally-publisher"))
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

    /// Turns the operations endpoint (metrics, dashboard) on, on a free loopback port.
    pub fn enable_http(&self) {
        let config = std::fs::read_to_string(self.path("tallyd.toml")).unwrap();
        std::fs::write(
            self.path("tallyd.toml"),
            config.replace("http = false", "http_listen = \"127.0.0.1:0\""),
        )
        .unwrap();
    }

    /// `tallyd run` with the site's config.
    pub fn daemon(&self) -> Daemon {
        Daemon::run(&self.path("tallyd.toml"), &self.path("vendor.pub"))
    }

    /// Exports a usage report from `daemon` (this site's, by its admin token) and
    /// returns `tally-publisher reconcile --format json` of it against bundle `bundle_id`.
    pub fn report_reconciled(&self, daemon: &Daemon, bundle_id: &str) -> serde_json::Value {
        let report = self.path(&format!("{bundle_id}.report"));
        ok(run(daemon
            .tally()
            .args(["admin", "--admin-token-file"])
            .arg(self.path("data/admin.token"))
            .args(["report", "--out"])
            .arg(&report)));
        let out = ok(run(Command::new(bin("tally-publisher"))
            .args(["reconcile", "--format", "json", "--bundle"])
            .arg(self.path(&format!("bundles/{bundle_id}.bundle")))
            .arg(&report)));
        serde_json::from_str(&out).expect("reconcile's JSON")
    }

    /// `tallyd check-config` with the site's config.
    pub fn check_config(&self) -> Output {
        run(Command::new(bin("tallyd"))
            .arg("check-config")
            .arg("--config")
            .arg(self.path("tallyd.toml")))
    }
}

/// `tally run ARGS` as `user` (the `USER` the client reports), to its end; ARGS without a
/// `-- COMMAND` of their own run `true`.
pub fn run_as(daemon: &Daemon, user: &str, args: &[&str]) -> Output {
    let mut tally = daemon.tally();
    tally.env("USER", user).arg("run").args(args);
    if !args.contains(&"--") {
        tally.args(["--", "true"]);
    }
    tally.output().expect("running tally")
}

/// Asserts that `out` is `tally run`'s refusal (exit 75) and that its message holds `needle`.
pub fn assert_denied(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains(needle), "expected '{needle}' in: {stderr}");
}

/// The `total` object of `feature`'s row in `tally-publisher reconcile --format json`'s
/// output `doc`.
pub fn reconciled_total<'a>(doc: &'a serde_json::Value, feature: &str) -> &'a serde_json::Value {
    let row = doc["features"]
        .as_array()
        .expect("reconcile's features")
        .iter()
        .find(|f| f["feature"] == feature)
        .unwrap_or_else(|| panic!("no row {feature}: {doc}"));
    &row["total"]
}

/// A site's bundle spec with a counted feature that has overdraft and an end (`solver`:
/// 2 seats + 1 overdraft, last day 2031-06-30) and an uncounted one (`viewer`): the
/// cases the metrics and the dashboard must show differently.
pub const OVERDRAFT_AND_UNCOUNTED_SPEC: &str = r#"id = "acme-2031-0007"
vendor = "Acme Simulation"
[customer]
id = "C-1001"
name = "Example Corp"
[[feature]]
name = "solver"
seats = 2
overdraft = 1
expires = "2031-06-30"
[[feature]]
name = "viewer"
seats = "uncounted"
"#;

/// The dashboard's DOM after its script ran, from headless Chromium (bounded: 60 s).
pub fn dashboard_dom(daemon: &Daemon) -> String {
    const CHROMIUM: &str = "/usr/bin/chromium";
    assert!(
        Path::new(CHROMIUM).exists(),
        "the dashboard check needs Chromium: apt-get install chromium"
    );
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("http://{}/", daemon.http.unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting chromium");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut dom = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut dom).map(|_| dom)
    });
    let done = wait_until(Duration::from_secs(60), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !done {
        let _ = child.kill();
        let _ = child.wait();
        panic!("chromium did not finish within 60 s");
    }
    reader.join().unwrap().expect("reading chromium's output")
}
