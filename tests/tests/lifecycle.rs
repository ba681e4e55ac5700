//! Issue 14's lifecycle test: the real `tally-publisher`, `tallyd` and `tally` driven
//! through a random sequence of what happens to a licence server over its life — bundles
//! issued (add-ons, renewals superseding earlier bundles, terms that start or end within
//! seconds), reloads (SIGHUP and `tally admin reload`), returns (`tallyd return`),
//! jobs that hold seats or wait in the queue, signals to them (INT, TERM, HUP, KILL),
//! borrowing and offline use of borrowed seats, SIGTERM and SIGKILL of tallyd and
//! restarts — while the test keeps a model: the vendor's records (every bundle issued,
//! which the server has installed, which were returned and what they retired), the jobs
//! and borrows it started and ended, and what it saw.
//!
//! After every step, against the server's status (asked through the client library on one
//! kept connection; at the end `tally status --json` must show the same):
//! - the seats the server offers equal what the vendor's records allow at that second;
//! - the leases held never add up to more than the records allowed when the last of them
//!   was granted (each lease's grant second is in the status), so no grant exceeded the
//!   vendor's terms, also across shrinking renewals, expiries and returns;
//! - a job the test ended holds no lease longer than the reconnect window allows: a
//!   checkin at once, a killed client its connection's idle timeout, across a restart
//!   the lease TTL plus the clock mark's slack;
//! - a live job keeps its one lease (same id) across restarts; nobody waits in the
//!   queue while the seats its head needs are free; borrowed leases are the ones the
//!   test borrowed and did not return;
//! - a denial comes only when the seats were not free.
//!
//! Jobs are `tally run solver -- sh -c 'wait for a stop file'`, each as its own user
//! (`USER=jN`), so the status says which job holds which lease.
//!
//! At the end the reports exported along the way are reconciled with every bundle the
//! vendor issued, and compared with what the test knows for sure (see `reconcile`).
//!
//! The seed is printed first and in every failure: `TALLY_LIFECYCLE_SEED=N` replays a
//! run (the same steps; timing may differ), `TALLY_LIFECYCLE_STEPS=N` sets its length.
//!
//! Terms that start or end a few seconds into the run are signed with the library that
//! `tally-publisher issue` uses (`Spec::to_bundle`, `bundle::sign`) and then given
//! second-resolution dates: the spec language only has days, and this avoids a wall
//! clock hook in `tallyd`. Every other bundle is issued by the `tally-publisher` binary.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tally_protocol::time::UnixTime;
use tally_tests::{bin, wait_until, Daemon, Holder};

const FEATURE: &str = "solver";
/// Daemon timing (config): short, so that every reclaim path ends within seconds.
const HEARTBEAT_SECS: u64 = 2;
const TTL_SECS: u64 = 12;
const IDLE_SECS: u64 = 5;
/// `CLOCK_SAVE_SECS` in daemon/src/server.rs: how stale the "last alive" mark may be; a
/// lease restored after a restart ends at most this much after its TTL would have.
const CLOCK_SLACK_SECS: u64 = 10;
/// Slack for process starts, QUIC handshakes and polling on a busy two-core machine.
const MARGIN_SECS: u64 = 8;
/// Seats of the base bundle, which is never superseded or returned (so the feature
/// always has terms and always shows in the status).
const BASE_SEATS: u32 = 1;

/// splitmix64: small, seedable, good enough to choose steps.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `2026-12-01T15:20:00Z` (how `tally status --json` shows times) to Unix seconds.
fn parse_time(text: &str) -> u64 {
    let day = UnixTime::from_date(text.get(..10).unwrap_or_default())
        .unwrap_or_else(|| panic!("not a time: {text}"));
    let hms: Vec<u64> = text
        .get(11..19)
        .unwrap_or_default()
        .split(':')
        .map(|p| p.parse().unwrap_or_else(|_| panic!("not a time: {text}")))
        .collect();
    assert_eq!(hms.len(), 3, "not a time: {text}");
    day.0 + hms[0] * 3600 + hms[1] * 60 + hms[2]
}

/// A bundle as the vendor's records hold it (all of them sell `solver` only).
#[derive(Clone, Debug)]
struct Issued {
    id: String,
    seats: u32,
    supersedes: Vec<String>,
    valid_from: Option<u64>,
    valid_until: Option<u64>,
    /// The feature's own `expires`.
    expires: Option<u64>,
}

impl Issued {
    fn end(&self) -> Option<u64> {
        match (self.expires, self.valid_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn active(&self, t: u64) -> bool {
        self.valid_from.is_none_or(|s| s <= t) && self.end().is_none_or(|e| t < e)
    }
}

/// What the server has installed (read at its last start or reload) and what it
/// returned: the vendor's records say what that allows.
#[derive(Clone, Debug, Default, PartialEq)]
struct Installed {
    bundles: BTreeSet<String>,
    returned: BTreeSet<String>,
    retired: BTreeSet<String>,
}

/// The vendor's rule: a bundle counts while it is installed, not returned, not retired
/// by a return, not superseded by any installed bundle (whatever that one's dates or
/// state: a renewal that ended or was returned does not bring back what it replaced),
/// and within its dates.
fn allowed(issued: &BTreeMap<String, Issued>, inst: &Installed, t: u64) -> u32 {
    let superseded: BTreeSet<&String> = inst
        .bundles
        .iter()
        .filter_map(|id| issued.get(id))
        .flat_map(|b| b.supersedes.iter())
        .collect();
    inst.bundles
        .iter()
        .filter(|id| {
            !inst.returned.contains(*id) && !inst.retired.contains(*id) && !superseded.contains(id)
        })
        .filter_map(|id| issued.get(id))
        .filter(|b| b.active(t))
        .map(|b| b.seats)
        .sum()
}

/// How a job was ended.
#[derive(Clone, Copy, Debug, PartialEq)]
enum EndHow {
    /// Its command finished (the stop file appeared).
    File,
    /// A signal to `tally run`, which forwards it (or leaves the queue) and checks in.
    Signal(&'static str),
    /// SIGKILL to the whole process group: no checkin, no close.
    Kill,
    /// `tally run` exited on its own: denied, or its checkout's answer was lost when
    /// tallyd stopped (the grant was stored, so it is restored and held by nobody until
    /// its TTL from the last sign of life runs out).
    Vanished,
}

#[derive(Debug)]
struct Ended {
    at: Instant,
    how: EndHow,
    /// The daemon run (start count) it ended in, and whether the daemon was up.
    run: u32,
    up: bool,
}

/// A `tally run` the test started.
struct Job {
    user: String,
    count: u32,
    holder: Holder,
    stop: PathBuf,
    err: PathBuf,
    /// Lease ids seen held by this job's user.
    leases: BTreeSet<String>,
    ended: Option<Ended>,
    exited: Option<Option<i32>>,
    /// The daemon was down longer than a TTL while this job held a seat: it may have lost
    /// it (honestly).
    may_lose: bool,
    /// Its `tally run` exited without the test ending it.
    self_exit: bool,
}

/// A borrow the test made.
struct Borrow {
    user: String,
    cache: PathBuf,
    lease: String,
    returned: bool,
}

/// What one status call showed.
#[derive(Clone)]
struct Seen {
    /// Unix seconds just before and just after the call (the server's second is within).
    t0: u64,
    t1: u64,
    at: Instant,
    total: u64,
    in_use: u64,
    /// (lease, user, count, granted at, borrowed)
    holders: Vec<(String, String, u32, u64, bool)>,
    /// (user, count), in queue order.
    queue: Vec<(String, u32)>,
}

struct World {
    seed: u64,
    root: tempfile::TempDir,
    addr: String,
    daemon: Option<Daemon>,
    /// Daemon starts so far, and when the current run came up.
    run: u32,
    up_since: Instant,
    down_since: Instant,
    issued: BTreeMap<String, Issued>,
    /// Bundle files in the server's bundle directory.
    in_dir: BTreeSet<String>,
    returned: BTreeSet<String>,
    retired: BTreeSet<String>,
    /// The installed set, with the Unix-second window in which it came into force.
    history: Vec<(u64, u64, Installed)>,
    jobs: Vec<Job>,
    borrows: Vec<Borrow>,
    next_id: u32,
    reports: Vec<PathBuf>,
    /// Ground truth gathered along the way.
    leases_seen: BTreeSet<String>,
    users_seen: BTreeSet<String>,
    /// Grants the test may not have seen (a waiter ended while queued may have been
    /// granted a seat in the same instant).
    unseen_possible: u64,
    denials_seen: u64,
    /// Jobs started with `--wait`.
    waits_started: u64,
    /// When each seen denial came, and how many came just before a SIGKILL of tallyd.
    denial_times: Vec<Instant>,
    denials_maybe_lost: u64,
    peak_seen: u64,
    /// Upper bound of seats that can have been held at once: jobs and borrows not known
    /// to be released.
    peak_possible: u64,
    steps_log: Vec<String>,
    step: usize,
    vendor_key: tally_protocol::keys::SecretKey,
    request: tally_protocol::activation::ActivationRequest,
    /// One kept client connection for status.
    client: std::cell::RefCell<Option<tally_client::blocking::Client>>,
    /// The last status checked (at the end of the previous step).
    last: Option<Seen>,
    /// `tally status` calls and the time they took.
    status_calls: std::cell::Cell<(u32, Duration)>,
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A free UDP port on loopback for the daemon, kept across restarts so that clients
/// reconnect to the same address.
fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl World {
    fn new(seed: u64) -> World {
        let root = tempfile::tempdir().unwrap();
        let p = |n: &str| root.path().join(n);
        std::fs::create_dir_all(p("bundles")).unwrap();
        std::fs::create_dir_all(p("issued")).unwrap();
        std::fs::create_dir_all(p("specs")).unwrap();
        ok(
            Command::new(bin("tallyd"))
                .arg("init")
                .arg("--data-dir")
                .arg(p("data"))
                .output()
                .unwrap(),
            "tallyd init",
        );
        ok(
            Command::new(bin("tallyd"))
                .arg("request")
                .arg("--data-dir")
                .arg(p("data"))
                .arg("--out")
                .arg(p("activation.req"))
                .output()
                .unwrap(),
            "tallyd request",
        );
        ok(
            Command::new(bin("tally-publisher"))
                .arg("keygen")
                .arg("--out")
                .arg(p("vendor"))
                .output()
                .unwrap(),
            "tally-publisher keygen",
        );
        let addr = format!("127.0.0.1:{}", free_port());
        std::fs::write(
            p("tallyd.toml"),
            format!(
                "listen = \"{addr}\"\nhttp = false\ndata_dir = \"{}\"\nbundle_dir = \"{}\"\n\
                 vendor_keys = [\"{}\"]\nheartbeat_secs = {HEARTBEAT_SECS}\n\
                 lease_ttl_secs = {TTL_SECS}\nidle_timeout_secs = {IDLE_SECS}\n",
                p("data").display(),
                p("bundles").display(),
                p("vendor.pub").display()
            ),
        )
        .unwrap();
        let vendor_key = tally_protocol::keys::SecretKey::from_armored(
            &std::fs::read_to_string(p("vendor.key")).unwrap(),
        )
        .unwrap();
        let request = tally_protocol::activation::request_from_armored(
            &std::fs::read_to_string(p("activation.req")).unwrap(),
        )
        .unwrap();
        World {
            seed,
            root,
            addr,
            daemon: None,
            run: 0,
            up_since: Instant::now(),
            down_since: Instant::now(),
            issued: BTreeMap::new(),
            in_dir: BTreeSet::new(),
            returned: BTreeSet::new(),
            retired: BTreeSet::new(),
            history: Vec::new(),
            jobs: Vec::new(),
            borrows: Vec::new(),
            next_id: 0,
            reports: Vec::new(),
            leases_seen: BTreeSet::new(),
            users_seen: BTreeSet::new(),
            unseen_possible: 0,
            denials_seen: 0,
            waits_started: 0,
            denial_times: Vec::new(),
            denials_maybe_lost: 0,
            peak_seen: 0,
            peak_possible: 0,
            steps_log: Vec::new(),
            step: 0,
            vendor_key,
            request,
            status_calls: std::cell::Cell::new((0, Duration::ZERO)),
            last: None,
            client: std::cell::RefCell::new(None),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// Context for every assertion: the seed to replay, the last steps, the daemon log.
    fn ctx(&self) -> String {
        let tail: Vec<&String> = self.steps_log.iter().rev().take(12).rev().collect();
        let log = self
            .daemon
            .as_ref()
            .map(|d| d.log_text())
            .unwrap_or_default();
        let log_tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>();
        format!(
            "\n  replay: TALLY_LIFECYCLE_SEED={} cargo test -p tally-tests --test lifecycle\n  step {}; last steps:\n    {}\n  daemon log (last lines, newest first):\n    {}",
            self.seed,
            self.step,
            tail.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n    "),
            log_tail.join("\n    ")
        )
    }

    fn note(&mut self, what: String) {
        let t = UnixTime(unix_now());
        eprintln!(
            "[lifecycle seed {} step {} {t}] {what}",
            self.seed, self.step
        );
        self.steps_log.push(format!("{} {t}: {what}", self.step));
    }

    fn tally(&self) -> Command {
        let mut c = Command::new(bin("tally"));
        c.env_remove("TALLY_SERVER")
            .args(["--server", &self.addr, "--vendor-key"])
            .arg(self.path("vendor.pub"))
            .env("TALLY_CACHE_DIR", self.path("no-borrows"));
        c
    }

    fn installed_now(&self) -> Installed {
        Installed {
            bundles: self.in_dir.clone(),
            returned: self.returned.clone(),
            retired: self.retired.clone(),
        }
    }

    /// Seats the vendor's records allow at `t` given the installed set then: one value,
    /// or two when `t` falls within a reload or start (either set may have counted).
    fn allowed_options(&self, t: u64) -> BTreeSet<u32> {
        // The last set in force before `t`, and every set that came in within `t`'s
        // second (changes are timed to the second, and several can share one).
        let before = self.history.iter().rev().find(|(_, hi, _)| *hi < t);
        let mut options: BTreeSet<u32> = before
            .map(|(_, _, inst)| allowed(&self.issued, inst, t))
            .into_iter()
            .collect();
        if before.is_none() {
            options.insert(0);
        }
        for (lo, hi, inst) in &self.history {
            if *lo <= t && t <= *hi {
                options.insert(allowed(&self.issued, inst, t));
            }
        }
        options
    }

    /// The most seats the vendor's records can have allowed at `t`.
    fn allowed_at(&self, t: u64) -> u32 {
        self.allowed_options(t).into_iter().max().unwrap_or(0)
    }

    /// A second at which some served term starts or ends.
    fn boundary_near(&self, from: u64, to: u64) -> bool {
        self.issued.values().any(|b| {
            [b.valid_from, b.end()]
                .into_iter()
                .flatten()
                .any(|e| e + 1 >= from && e <= to + 1)
        })
    }

    // ----- bundles -----

    fn new_id(&mut self, kind: &str) -> String {
        self.next_id += 1;
        format!("C-1001-{kind}-{}", self.next_id)
    }

    /// Issues a bundle into the vendor's records and the server's bundle directory.
    fn issue(&mut self, b: Issued) {
        let supersedes: Vec<String> = b.supersedes.iter().map(|s| format!("\"{s}\"")).collect();
        let spec = format!(
            "id = \"{}\"\nvendor = \"Acme Simulation\"\nsupersedes = [{}]\n[customer]\nid = \"C-1001\"\nname = \"Example Corp\"\n\
             [[feature]]\nname = \"{FEATURE}\"\nseats = {}\nborrow_limit_hours = 48\n",
            b.id,
            supersedes.join(", "),
            b.seats
        );
        let spec_path = self.path(&format!("specs/{}.toml", b.id));
        std::fs::write(&spec_path, &spec).unwrap();
        let issued = self.path(&format!("issued/{}.bundle", b.id));
        if b.valid_from.is_none() && b.valid_until.is_none() && b.expires.is_none() {
            ok(
                Command::new(bin("tally-publisher"))
                    .arg("issue")
                    .arg("--vendor-key")
                    .arg(self.path("vendor.key"))
                    .arg("--spec")
                    .arg(&spec_path)
                    .arg("--request")
                    .arg(self.path("activation.req"))
                    .arg("--out")
                    .arg(&issued)
                    .output()
                    .unwrap(),
                "tally-publisher issue",
            );
        } else {
            // Dates to the second: what `tally-publisher issue` does, then the dates.
            let parsed = tally_publisher::spec::Spec::parse(&spec_path, &spec).unwrap();
            let mut bundle = parsed
                .to_bundle(
                    &spec_path,
                    &self.request,
                    b.id.clone(),
                    UnixTime(unix_now()),
                )
                .unwrap();
            bundle.valid_from = b.valid_from.map(UnixTime);
            bundle.valid_until = b.valid_until.map(UnixTime);
            bundle.features[0].expires = b.expires.map(UnixTime);
            let signed = tally_protocol::bundle::sign(&bundle, &self.vendor_key);
            std::fs::write(&issued, tally_protocol::bundle::to_armored(&signed)).unwrap();
        }
        std::fs::copy(&issued, self.path(&format!("bundles/{}.bundle", b.id))).unwrap();
        self.in_dir.insert(b.id.clone());
        self.issued.insert(b.id.clone(), b);
    }

    /// The bundles the server serves now by the vendor's rule (for returns).
    fn served_now(&self, t: u64) -> Vec<String> {
        let inst = self.installed_now();
        let superseded: BTreeSet<&String> = inst
            .bundles
            .iter()
            .filter_map(|id| self.issued.get(id))
            .flat_map(|b| b.supersedes.iter())
            .collect();
        inst.bundles
            .iter()
            .filter(|id| {
                !self.returned.contains(*id)
                    && !self.retired.contains(*id)
                    && !superseded.contains(id)
                    && id.as_str() != "C-1001-base"
            })
            .filter(|id| {
                let b = &self.issued[*id];
                // Comfortably within its validity (the return reads the directory at
                // its own second).
                b.valid_until.is_none_or(|u| u > t + 3)
            })
            .cloned()
            .collect()
    }

    // ----- the daemon -----

    fn start_daemon(&mut self) {
        let lo = unix_now();
        let daemon = Daemon::run(&self.path("tallyd.toml"), &self.path("vendor.pub"));
        assert_eq!(daemon.addr.to_string(), self.addr, "{}", self.ctx());
        let hi = unix_now();
        let down = self.down_since.elapsed();
        self.run += 1;
        self.up_since = Instant::now();
        self.daemon = Some(daemon);
        self.history.push((lo, hi, self.installed_now()));
        if self.run > 1 && down >= Duration::from_secs(TTL_SECS - 2) {
            // Down for about a TTL: a live holder's lease may end before it re-attaches.
            for j in self.jobs.iter_mut().filter(|j| j.ended.is_none()) {
                j.may_lose = true;
            }
        }
        self.note(format!(
            "tallyd started (run {}, down {:?})",
            self.run, down
        ));
    }

    fn stop_daemon(&mut self, kill: bool) {
        self.client.borrow_mut().take();
        // A job whose grant the status shows but whose command has not started may not
        // have heard of the grant yet (answered after the group commit's flush); if
        // tallyd stops now, that answer is lost and the lease is held by nobody until
        // its TTL (reported in SECURITY.md): the job may lose it.
        for j in self.jobs.iter_mut().filter(|j| j.ended.is_none()) {
            if !j.stop.with_extension("started").exists() {
                j.may_lose = true;
            }
        }
        let d = self.daemon.take().expect("daemon up");
        if kill {
            self.denials_maybe_lost += self
                .denial_times
                .iter()
                .filter(|t| t.elapsed() < Duration::from_secs(3))
                .count() as u64;
            d.kill();
        } else {
            d.stop();
        }
        self.down_since = Instant::now();
        self.note(format!(
            "tallyd {}",
            if kill {
                "SIGKILLed"
            } else {
                "stopped (SIGTERM)"
            }
        ));
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon up")
    }

    fn admin(&self) -> Command {
        let mut c = self.tally();
        c.args(["admin", "--admin-token-file"])
            .arg(self.path("data/admin.token"));
        c
    }

    fn reload(&mut self, signal: bool) {
        let lo = unix_now();
        if signal {
            let d = self.daemon();
            let before = d.log_text().matches("reloaded: serving").count();
            d.signal("HUP");
            let done = wait_until(Duration::from_secs(20), || {
                d.log_text().matches("reloaded: serving").count() > before
            });
            assert!(done, "SIGHUP: no reload within 20 s{}", self.ctx());
        } else {
            // 65: a file in the directory is refused (a bundle past its end, a returned
            // one), which the model allows for; the served set is checked after.
            let out = self.admin().arg("reload").output().unwrap();
            assert!(
                matches!(out.status.code(), Some(0 | 65)),
                "tally admin reload: exit {:?}\nstderr: {}{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr),
                self.ctx()
            );
        }
        let hi = unix_now();
        self.history.push((lo, hi, self.installed_now()));
        self.note(format!(
            "reload by {}: installed {:?}",
            if signal {
                "SIGHUP"
            } else {
                "tally admin reload"
            },
            self.in_dir
        ));
    }

    fn export(&mut self) {
        let path = self.path(&format!("usage-{:03}.report", self.reports.len() + 1));
        ok(
            self.admin()
                .args(["report", "--out"])
                .arg(&path)
                .output()
                .unwrap(),
            "tally admin report",
        );
        self.reports.push(path);
        self.note(format!("report {} exported", self.reports.len()));
    }

    // ----- observation and invariants -----

    /// The server's status through the client library on one kept connection (a
    /// `tally status` process per step would cost a QUIC and TLS handshake each time);
    /// after a restart the connection is made again.
    fn status_reply(&self) -> tally_protocol::wire::StatusReply {
        let mut last = String::new();
        for _ in 0..5 {
            let mut slot = self.client.borrow_mut();
            if slot.is_none() {
                let vendor = tally_protocol::keys::public_key_from_armored(
                    &std::fs::read_to_string(self.path("vendor.pub")).unwrap(),
                )
                .unwrap();
                let mut config = tally_client::ClientConfig::new(
                    vec![self.addr.clone()],
                    tally_client::Trust::Vendor(vec![vendor]),
                );
                config.connect_timeout = Duration::from_secs(5);
                match tally_client::blocking::Client::connect(config) {
                    Ok(c) => *slot = Some(c),
                    Err(e) => {
                        last = e.to_string();
                        drop(slot);
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                }
            }
            match slot.as_ref().unwrap().status() {
                Ok(reply) => return reply,
                Err(e) => {
                    last = e.to_string();
                    *slot = None;
                }
            }
        }
        panic!("no status from tallyd: {last}{}", self.ctx());
    }

    fn status(&self) -> Seen {
        let at = Instant::now();
        let t0 = unix_now();
        let reply = self.status_reply();
        let t1 = unix_now();
        let (n, spent) = self.status_calls.get();
        self.status_calls.set((n + 1, spent + at.elapsed()));
        let f = reply
            .features
            .iter()
            .find(|f| f.name == FEATURE)
            .unwrap_or_else(|| panic!("{FEATURE} not in the status: {reply:?}{}", self.ctx()));
        Seen {
            t0,
            t1,
            at,
            total: f.total.unwrap_or(0) as u64,
            in_use: f.in_use as u64,
            holders: f
                .holders
                .iter()
                .map(|h| {
                    (
                        h.lease.to_string(),
                        h.client.user.clone(),
                        h.count,
                        h.since.0,
                        h.borrowed_until.is_some(),
                    )
                })
                .collect(),
            queue: f
                .queue
                .iter()
                .map(|q| (q.client.user.clone(), q.count))
                .collect(),
        }
    }

    /// `tally status --json` as people and scripts see it: the same seats.
    fn check_cli_status(&self) {
        let out = self.tally().args(["status", "--json"]).output().unwrap();
        let doc: serde_json::Value = serde_json::from_str(&ok(out, "tally status --json")).unwrap();
        let f = doc["features"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == FEATURE)
            .cloned()
            .unwrap_or_default();
        let s = self.status();
        assert_eq!(f["in_use"].as_u64(), Some(s.in_use), "{f}{}", self.ctx());
        assert_eq!(f["total"].as_u64(), Some(s.total), "{f}{}", self.ctx());
        for h in f["holders"].as_array().unwrap() {
            let since = parse_time(h["since"].as_str().unwrap());
            assert!(
                s.holders.iter().any(|x| x.0 == h["lease"] && x.3 == since),
                "{h}{}",
                self.ctx()
            );
        }
    }

    /// Reaps jobs whose `tally run` exited.
    fn reap(&mut self) {
        let (run, up) = (self.run, self.daemon.is_some());
        let mut notes = Vec::new();
        for j in &mut self.jobs {
            if j.exited.is_none() {
                if let Ok(Some(status)) = j.holder.child.try_wait() {
                    j.exited = Some(status.code());
                    if j.ended.is_none() {
                        j.self_exit = true;
                        // It ended on its own (a wait that failed across a restart): it
                        // holds nothing from now on, like a job that checked in.
                        notes.push(format!(
                            "job {} exited on its own ({:?}): {}",
                            j.user,
                            status.code(),
                            std::fs::read_to_string(&j.err).unwrap_or_default().trim()
                        ));
                        j.ended = Some(Ended {
                            at: Instant::now(),
                            how: EndHow::Vanished,
                            run,
                            up,
                        });
                    }
                }
            }
        }
        for n in notes {
            self.note(n);
        }
    }

    /// The latest moment by which an ended job's leases must be gone.
    fn release_deadline(&self, e: &Ended) -> Instant {
        let margin = Duration::from_secs(MARGIN_SECS);
        if e.up && e.run == self.run && self.daemon.is_some() && e.how != EndHow::Vanished {
            let after = match e.how {
                // A checkin (or, queued, a closed connection): at once.
                EndHow::File | EndHow::Signal(_) => Duration::ZERO,
                // Nobody says goodbye: the connection's idle timeout.
                EndHow::Kill | EndHow::Vanished => Duration::from_secs(IDLE_SECS),
            };
            e.at + after + margin
        } else {
            // A restart came between (or the client vanished): the client delivers its
            // checkin when the server is back, or the restored lease ends by the previous
            // run's last sign of life + the clock mark's slack + the TTL.
            e.at.max(self.up_since)
                + Duration::from_secs(TTL_SECS + CLOCK_SLACK_SECS + IDLE_SECS)
                + margin
        }
    }

    /// Takes a status and checks every invariant against it; returns it.
    fn check(&mut self) -> Seen {
        self.reap();
        let s = self.status();
        let ctx = || {
            format!(
                "\n  status: total {} in use {} holders {:?} queue {:?}",
                s.total, s.in_use, s.holders, s.queue
            )
        };
        // 1. The seats offered are what the vendor's records allow at that second.
        let expect: BTreeSet<u64> = (s.t0.saturating_sub(1)..=s.t1)
            .flat_map(|t| self.allowed_options(t))
            .map(u64::from)
            .collect();
        assert!(
            expect.contains(&s.total),
            "the server offers {} seats of {FEATURE} at {}..={}; the vendor's records allow {:?} (installed {:?}, returned {:?}, retired {:?}; last changes {:?}){}{}",
            s.total,
            s.t0,
            s.t1,
            expect,
            self.in_dir,
            self.returned,
            self.retired,
            self.history.iter().rev().take(3).collect::<Vec<_>>(),
            ctx(),
            self.ctx()
        );
        // 2. No grant beyond the terms: the leases held now were all held when the last
        // of them (by grant second) was granted.
        let sum: u64 = s.holders.iter().map(|h| h.2 as u64).sum();
        assert_eq!(
            sum,
            s.in_use,
            "in_use is the sum of holders{}{}",
            ctx(),
            self.ctx()
        );
        let mut by_grant: Vec<&(String, String, u32, u64, bool)> = s.holders.iter().collect();
        by_grant.sort_by_key(|h| h.3);
        let mut held = 0u64;
        for (i, h) in by_grant.iter().enumerate() {
            held += h.2 as u64;
            if by_grant.get(i + 1).is_some_and(|n| n.3 == h.3) {
                continue;
            }
            // A lease seen before this step is judged as before; new ones must fit.
            let allowed = self.allowed_at(h.3) as u64;
            assert!(
                held <= allowed,
                "{held} seats held at once after lease {} was granted at {}, but the vendor's records allowed {allowed} then{}{}",
                h.0,
                UnixTime(h.3),
                ctx(),
                self.ctx()
            );
        }
        self.peak_seen = self.peak_seen.max(s.in_use);
        // 3. Ended jobs hold nothing beyond their deadline; live ones keep their lease.
        for j in &self.jobs {
            let mine: Vec<&(String, String, u32, u64, bool)> =
                s.holders.iter().filter(|h| h.1 == j.user).collect();
            assert!(
                mine.len() <= 1,
                "job {} holds {} leases{}{}",
                j.user,
                mine.len(),
                ctx(),
                self.ctx()
            );
            if let Some(e) = &j.ended {
                let deadline = self.release_deadline(e);
                assert!(
                    mine.is_empty() || s.at <= deadline,
                    "job {} ended ({:?}) {:?} ago still holds {:?}; it had to be released by {:?} after its end{}{}",
                    j.user,
                    e.how,
                    e.at.elapsed(),
                    mine,
                    deadline - e.at,
                    ctx(),
                    self.ctx()
                );
            } else if !j.leases.is_empty() && !j.may_lose {
                assert!(
                    mine.len() == 1 && j.leases.contains(&mine[0].0),
                    "live job {} held lease(s) {:?} and now holds {:?}{}{}",
                    j.user,
                    j.leases,
                    mine,
                    ctx(),
                    self.ctx()
                );
            }
        }
        // 4. Borrowed leases: exactly the ones borrowed and not returned.
        let borrowed: BTreeSet<&String> = s.holders.iter().filter(|h| h.4).map(|h| &h.0).collect();
        let model: BTreeSet<&String> = self
            .borrows
            .iter()
            .filter(|b| !b.returned)
            .map(|b| &b.lease)
            .collect();
        assert_eq!(borrowed, model, "borrowed leases{}{}", ctx(), self.ctx());
        // Learn: leases and users seen.
        for h in &s.holders {
            self.leases_seen.insert(h.0.clone());
            self.users_seen.insert(h.1.clone());
            if let Some(j) = self.jobs.iter_mut().find(|j| j.user == h.1) {
                j.leases.insert(h.0.clone());
            }
        }
        self.last = Some(s.clone());
        s
    }

    /// Checks that nobody waits while the seats the queue's head needs are free: the
    /// server serves the queue as seats free (allowing it a moment to do so).
    fn check_queue(&mut self) {
        let fits = |s: &Seen| {
            let free = s.total.saturating_sub(s.in_use);
            s.queue.first().is_none_or(|head| (head.1 as u64) > free)
        };
        if self.last.as_ref().is_some_and(fits) {
            return;
        }
        let mut last = None;
        let served = wait_until(Duration::from_secs(5), || {
            let s = self.status();
            let free = s.total.saturating_sub(s.in_use);
            let ok = s.queue.first().is_none_or(|head| (head.1 as u64) > free);
            last = Some((s.total, s.in_use, s.queue));
            ok
        });
        assert!(
            served,
            "the queue's head waits though its seats are free: {last:?}{}",
            self.ctx()
        );
    }

    fn possible_now(&self) -> u64 {
        let jobs: u64 = self
            .jobs
            .iter()
            .filter(|j| {
                // Not known released: alive, or ended recently enough to hold still.
                j.ended.is_none()
                    || j.ended
                        .as_ref()
                        .is_some_and(|e| Instant::now() <= self.release_deadline(e))
            })
            .map(|j| j.count as u64)
            .sum();
        let borrows = self.borrows.iter().filter(|b| !b.returned).count() as u64;
        jobs + borrows
    }

    // ----- steps -----

    fn start_job(&mut self, rng: &mut Rng) {
        let count = 1 + rng.below(2) as u32;
        let waits = rng.chance(40);
        self.next_id += 1;
        let user = format!("j{}", self.next_id);
        let stop = self.path(&format!("{user}.stop"));
        let err = self.path(&format!("{user}.err"));
        let before = self.last.clone().expect("a status before");
        let started = self.path(&format!("{user}.started"));
        let script = format!(
            "touch '{}'; while [ ! -e '{}' ]; do sleep 0.1; done",
            started.display(),
            stop.display()
        );
        let mut args = vec![
            "run".to_string(),
            FEATURE.into(),
            "--count".into(),
            count.to_string(),
        ];
        if waits {
            args.extend(["--wait".into(), "600".into()]);
            self.waits_started += 1;
        }
        args.extend(["--".into(), "sh".into(), "-c".into(), script]);
        let child = self
            .tally()
            .env("USER", &user)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .process_group(0)
            .spawn()
            .unwrap();
        self.jobs.push(Job {
            user: user.clone(),
            count,
            holder: Holder::from_child(child),
            stop,
            err,
            leases: BTreeSet::new(),
            ended: None,
            exited: None,
            may_lose: false,
            self_exit: false,
        });
        self.peak_possible = self.peak_possible.max(self.possible_now());
        // Wait until it holds, waits in the queue, or was denied.
        let mut outcome = "";
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let j = self.jobs.last_mut().unwrap();
            if let Ok(Some(status)) = j.holder.child.try_wait() {
                j.exited = Some(status.code());
            }
            let j = self.jobs.last().unwrap();
            if let Some(code) = j.exited {
                assert_eq!(
                    code,
                    Some(75),
                    "job {user} exited at once: {}{}",
                    std::fs::read_to_string(&j.err).unwrap_or_default(),
                    self.ctx()
                );
                outcome = "denied";
                break;
            }
            let s = self.status();
            if s.holders.iter().any(|h| h.1 == user) {
                outcome = "holds";
                break;
            }
            if s.queue.iter().any(|q| q.0 == user) {
                outcome = "queued";
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            !outcome.is_empty(),
            "job {user} neither held, waited nor was denied within 30 s{}",
            self.ctx()
        );
        if outcome == "denied" {
            self.denials_seen += 1;
            self.denial_times.push(Instant::now());
            let free = before.total.saturating_sub(before.in_use);
            let t = unix_now();
            // Seats only free up between the status and the checkout (nobody else asks),
            // unless a term ended meanwhile.
            assert!(
                !(before.queue.is_empty()
                    && free >= count as u64
                    && !self.boundary_near(before.t0, t)),
                "job {user} (count {count}) denied though {free} seats were free and nobody waited: {}{}",
                std::fs::read_to_string(&self.jobs.last().unwrap().err).unwrap_or_default(),
                self.ctx()
            );
            let j = self.jobs.last_mut().unwrap();
            j.ended = Some(Ended {
                at: Instant::now(),
                how: EndHow::File,
                run: self.run,
                up: true,
            });
        }
        self.note(format!(
            "job {user}: tally run --count {count}{}: {outcome}",
            if waits { " --wait 600" } else { "" }
        ));
    }

    fn end_job(&mut self, rng: &mut Rng) {
        self.reap();
        let live: Vec<usize> = (0..self.jobs.len())
            .filter(|&i| self.jobs[i].ended.is_none())
            .collect();
        if live.is_empty() {
            return;
        }
        let i = live[rng.below(live.len() as u64) as usize];
        let up = self.daemon.is_some();
        // Whether it is queued (no lease seen): only signals end a waiter.
        let queued = self.jobs[i].leases.is_empty();
        let how = match rng.below(if queued { 3 } else { 5 }) {
            0 => EndHow::Kill,
            1 => EndHow::Signal("INT"),
            2 => EndHow::Signal("TERM"),
            3 => EndHow::Signal("HUP"),
            _ => EndHow::File,
        };
        let j = &mut self.jobs[i];
        match how {
            EndHow::File => std::fs::write(&j.stop, b"").unwrap(),
            EndHow::Signal(sig) => {
                let _ = Command::new("kill")
                    .arg(format!("-{sig}"))
                    .arg(j.holder.child.id().to_string())
                    .status();
            }
            EndHow::Kill | EndHow::Vanished => j.holder.kill_group(),
        }
        j.ended = Some(Ended {
            at: Instant::now(),
            how,
            run: self.run,
            up,
        });
        if queued {
            // A seat may have gone to it in the instant it was signalled.
            self.unseen_possible += 1;
        }
        let user = j.user.clone();
        self.note(format!(
            "job {user} ended by {how:?}{} (daemon {})",
            if queued { " while queued" } else { "" },
            if up { "up" } else { "down" }
        ));
    }

    fn borrow(&mut self) {
        let before = self.last.clone().expect("a status before");
        self.next_id += 1;
        let user = format!("b{}", self.next_id);
        let cache = self.path(&format!("cache-{user}"));
        let out = self
            .tally()
            .env("USER", &user)
            .env("TALLY_CACHE_DIR", &cache)
            .args(["borrow", FEATURE, "--for", "1d"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        match out.status.code() {
            Some(0) => {
                let lease = stdout
                    .split("(lease ")
                    .nth(1)
                    .and_then(|r| r.split(')').next())
                    .unwrap_or_else(|| panic!("no lease id in {stdout}{}", self.ctx()))
                    .to_string();
                self.note(format!("borrow {user}: lease {lease}"));
                self.borrows.push(Borrow {
                    user,
                    cache,
                    lease,
                    returned: false,
                });
                self.peak_possible = self.peak_possible.max(self.possible_now());
            }
            Some(75) => {
                self.denials_seen += 1;
                self.denial_times.push(Instant::now());
                let free = before.total.saturating_sub(before.in_use);
                assert!(
                    !(before.queue.is_empty()
                        && free >= 1
                        && !self.boundary_near(before.t0, unix_now())),
                    "borrow denied though {free} seats were free: {}{}",
                    String::from_utf8_lossy(&out.stderr),
                    self.ctx()
                );
                self.note(format!("borrow {user}: denied"));
            }
            other => panic!(
                "tally borrow: exit {other:?}: {}{}",
                String::from_utf8_lossy(&out.stderr),
                self.ctx()
            ),
        }
    }

    fn return_borrow(&mut self, rng: &mut Rng) {
        let open: Vec<usize> = (0..self.borrows.len())
            .filter(|&i| !self.borrows[i].returned)
            .collect();
        if open.is_empty() {
            return;
        }
        let i = open[rng.below(open.len() as u64) as usize];
        let out = self
            .tally()
            .env("TALLY_CACHE_DIR", &self.borrows[i].cache)
            .args(["return", FEATURE])
            .output()
            .unwrap();
        ok(out, "tally return");
        self.borrows[i].returned = true;
        let b = &self.borrows[i];
        let what = format!("borrow {} returned (lease {})", b.user, b.lease);
        self.note(what);
    }

    /// With the daemon down: a borrowed seat serves offline, nothing else does.
    fn offline_use(&mut self, rng: &mut Rng) {
        let open: Vec<usize> = (0..self.borrows.len())
            .filter(|&i| !self.borrows[i].returned)
            .collect();
        let (cache, expect) = if !open.is_empty() && rng.chance(75) {
            let b = &self.borrows[open[rng.below(open.len() as u64) as usize]];
            (b.cache.clone(), 0)
        } else {
            (self.path("no-borrows"), 69)
        };
        let started = Instant::now();
        let out = self
            .tally()
            .env("TALLY_CACHE_DIR", &cache)
            .args(["run", FEATURE, "--", "true"])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(expect),
            "offline tally run with cache {}: {}{}",
            cache.display(),
            String::from_utf8_lossy(&out.stderr),
            self.ctx()
        );
        if expect == 0 {
            assert!(
                String::from_utf8_lossy(&out.stderr)
                    .contains("using the seat of 'solver' borrowed until"),
                "{}{}",
                String::from_utf8_lossy(&out.stderr),
                self.ctx()
            );
        }
        self.note(format!(
            "offline tally run with {}: exit {expect} in {:?}",
            cache.file_name().unwrap().to_string_lossy(),
            started.elapsed()
        ));
    }

    fn return_bundle(&mut self, rng: &mut Rng) {
        let t = unix_now();
        let candidates = self.served_now(t);
        if candidates.is_empty() {
            return;
        }
        let id = candidates[rng.below(candidates.len() as u64) as usize].clone();
        let proof = self.path(&format!("{id}.return"));
        ok(
            Command::new(bin("tallyd"))
                .arg("return")
                .arg("--config")
                .arg(self.path("tallyd.toml"))
                .args(["--bundle", &id, "--out"])
                .arg(&proof)
                .output()
                .unwrap(),
            "tallyd return",
        );
        // Everything it superseded, transitively, is retired with it.
        let mut todo = vec![id.clone()];
        while let Some(next) = todo.pop() {
            for old in self.issued[&next].supersedes.clone() {
                if old != id && self.retired.insert(old.clone()) {
                    todo.push(old);
                }
            }
        }
        self.returned.insert(id.clone());
        // `tallyd return` journals the set the directory serves after the return.
        self.history.push((t, unix_now(), self.installed_now()));
        // The vendor checks the proof.
        ok(
            Command::new(bin("tally-publisher"))
                .arg("verify-return")
                .arg("--bundle")
                .arg(self.path(&format!("issued/{id}.bundle")))
                .arg(&proof)
                .output()
                .unwrap(),
            "tally-publisher verify-return",
        );
        self.note(format!(
            "bundle {id} returned; retired now {:?}",
            self.retired
        ));
    }

    fn new_bundle(&mut self, rng: &mut Rng) {
        let now = unix_now();
        let renewal = rng.chance(50);
        let id = self.new_id(if renewal { "renewal" } else { "addon" });
        let supersedes: Vec<String> = if renewal {
            // One or two of the bundles the server has (never the base one).
            let mut pool: Vec<String> = self
                .in_dir
                .iter()
                .filter(|b| b.as_str() != "C-1001-base")
                .cloned()
                .collect();
            let mut chosen = Vec::new();
            for _ in 0..2 {
                if pool.is_empty() {
                    break;
                }
                chosen.push(pool.remove(rng.below(pool.len() as u64) as usize));
                if rng.chance(50) {
                    break;
                }
            }
            chosen
        } else {
            Vec::new()
        };
        let seats = if renewal {
            1 + rng.below(6)
        } else {
            1 + rng.below(3)
        } as u32;
        let mut b = Issued {
            id,
            seats,
            supersedes,
            valid_from: None,
            valid_until: None,
            expires: None,
        };
        match rng.below(6) {
            // An add-on whose feature ends within the run.
            0 if !renewal => b.expires = Some(now + 5 + rng.below(40)),
            // A term contract that ends within the run.
            1 => b.valid_until = Some(now + 8 + rng.below(40)),
            // Delivered early: starts within the run.
            2 => b.valid_from = Some(now + 3 + rng.below(20)),
            _ => {}
        }
        let what = format!("{b:?}");
        self.issue(b);
        self.note(format!("issued {what}"));
    }

    /// Polls until every ended job's leases are gone (each by its own deadline).
    fn settle(&mut self) {
        let latest = self
            .jobs
            .iter()
            .filter_map(|j| j.ended.as_ref())
            .map(|e| self.release_deadline(e))
            .max();
        if let Some(latest) = latest {
            let ended: BTreeSet<String> = self
                .jobs
                .iter()
                .filter(|j| j.ended.is_some())
                .map(|j| j.user.clone())
                .collect();
            let mut last = Vec::new();
            let gone = wait_until(
                latest.saturating_duration_since(Instant::now()) + Duration::from_secs(1),
                || {
                    let s = self.status();
                    last = s
                        .holders
                        .iter()
                        .filter(|h| ended.contains(&h.1))
                        .cloned()
                        .collect();
                    last.is_empty()
                },
            );
            assert!(gone, "ended jobs still hold {last:?}{}", self.ctx());
        }
        self.check();
        self.note("settled: no ended job holds a seat".into());
    }
}

#[test]
fn random_lifecycles_keep_seats_within_the_vendors_records() {
    let seed = std::env::var("TALLY_LIFECYCLE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let steps: usize = std::env::var("TALLY_LIFECYCLE_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    eprintln!("lifecycle: TALLY_LIFECYCLE_SEED={seed} TALLY_LIFECYCLE_STEPS={steps}");
    let started = Instant::now();
    let mut rng = Rng(seed);
    let mut w = World::new(seed);
    w.issue(Issued {
        id: "C-1001-base".into(),
        seats: BASE_SEATS,
        supersedes: Vec::new(),
        valid_from: None,
        valid_until: None,
        expires: None,
    });
    w.new_bundle(&mut rng);
    w.start_daemon();
    w.check();

    while w.step < steps {
        w.step += 1;
        let live = w.jobs.iter().filter(|j| j.ended.is_none()).count();
        match rng.below(100) {
            0..=29 if live < 8 => w.start_job(&mut rng),
            0..=44 => w.end_job(&mut rng),
            45..=56 => w.new_bundle(&mut rng),
            57..=66 => {
                let signal = rng.chance(50);
                w.reload(signal)
            }
            67..=72 => w.borrow(),
            73..=77 => w.return_borrow(&mut rng),
            78..=81 => {
                // SIGTERM (as systemctl restart does) or SIGKILL; while tallyd is down a
                // few things happen, then it is back. The downtime stays well under a
                // TTL (an offline run alone spends the client's 5 s connect timeout),
                // so live holders keep their leases.
                let kill = rng.chance(40);
                w.stop_daemon(kill);
                if rng.chance(40) {
                    w.offline_use(&mut rng);
                }
                if rng.chance(40) {
                    w.return_bundle(&mut rng);
                }
                if rng.chance(30) {
                    w.end_job(&mut rng);
                }
                w.start_daemon();
            }
            82..=85 => w.export(),
            86..=87 => w.settle(),
            _ => {
                // A second passes, and with it terms may start and end.
                // The step itself, not a wait for a condition.
                std::thread::sleep(Duration::from_secs(1));
                w.note("time passes".into());
            }
        }
        if w.daemon.is_some() {
            w.check();
            w.check_queue();
        }
        w.peak_possible = w.peak_possible.max(w.possible_now());
    }
    // End every job and borrow, let the server release them, export the last report.
    for i in 0..w.jobs.len() {
        if w.jobs[i].ended.is_none() {
            std::fs::write(&w.jobs[i].stop, b"").unwrap();
            let queued = w.jobs[i].leases.is_empty();
            if queued {
                w.jobs[i].holder.kill_group();
                w.unseen_possible += 1;
            }
            w.jobs[i].ended = Some(Ended {
                at: Instant::now(),
                how: if queued { EndHow::Kill } else { EndHow::File },
                run: w.run,
                up: true,
            });
        }
    }
    for i in 0..w.borrows.len() {
        if !w.borrows[i].returned {
            ok(
                w.tally()
                    .env("TALLY_CACHE_DIR", &w.borrows[i].cache)
                    .args(["return", FEATURE])
                    .output()
                    .unwrap(),
                "tally return",
            );
            w.borrows[i].returned = true;
        }
    }
    w.settle();
    w.check_cli_status();
    let end = w.check();
    assert_eq!(
        end.in_use,
        0,
        "seats held after everything ended{}",
        w.ctx()
    );
    // The last events must be journaled in an earlier second than the export.
    let t = unix_now();
    wait_until(Duration::from_secs(3), || unix_now() > t);
    w.export();
    let final_allowed = w.allowed_at(unix_now()) as u64;
    w.reconcile(final_allowed);
    let (calls, spent) = w.status_calls.get();
    let gave_up = w.jobs.iter().filter(|j| j.self_exit).count();
    eprintln!("lifecycle: {gave_up} tally run(s) exited without the test ending them");
    eprintln!(
        "lifecycle: seed {seed}: {steps} steps, {} daemon runs, {} bundles, {} jobs, {} borrows, {} reports, {calls} status calls ({spent:?}) in {:?}",
        w.run,
        w.issued.len(),
        w.jobs.len(),
        w.borrows.len(),
        w.reports.len(),
        started.elapsed()
    );
}

impl World {
    /// `tally-publisher reconcile` over every report, with every bundle the vendor
    /// issued, against what the test knows for sure. Times in reports are whole seconds
    /// and a job's grant happens somewhere inside the test's step, so the exact figures
    /// are counts, not times:
    /// - grants: every lease the test saw, plus at most one per waiter ended while queued
    ///   (it may have been granted in that instant, unseen);
    /// - distinct users: likewise;
    /// - peak: at least the most seats the test saw in use at once, at most what the
    ///   jobs and borrows not known released could hold together;
    /// - denials: the denied checkouts and borrows the test saw (exit 75);
    /// - licensed now: what the vendor's records allow now.
    fn reconcile(&mut self, final_allowed: u64) {
        let out = Command::new(bin("tally-publisher"))
            .args(["reconcile", "--format", "json", "--bundle"])
            .arg(self.path("issued"))
            .args(&self.reports)
            .output()
            .unwrap();
        let text = ok(out, "tally-publisher reconcile");
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let f = doc["features"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["feature"] == FEATURE)
            .cloned()
            .unwrap_or_else(|| panic!("{FEATURE} not reconciled: {doc}{}", self.ctx()));
        let total = &f["total"];
        let grants = total["grants"].as_u64().unwrap();
        let seen = self.leases_seen.len() as u64;
        assert!(
            seen <= grants && grants <= seen + self.unseen_possible,
            "reconcile counts {grants} grants; the test saw {seen} leases and at most {} more can have been granted unseen{}",
            self.unseen_possible,
            self.ctx()
        );
        let users = total["distinct_users"].as_u64().unwrap();
        let seen_users = self.users_seen.len() as u64;
        assert!(
            seen_users <= users && users <= seen_users + self.unseen_possible,
            "reconcile counts {users} users; the test saw {seen_users}{}",
            self.ctx()
        );
        let peak = total["peak"].as_u64().unwrap();
        // No grant exceeds what the records allowed then, so neither can the peak.
        let first = self.history.first().map_or(0, |h| h.0);
        let max_allowed = (first..=unix_now())
            .map(|t| self.allowed_at(t) as u64)
            .max()
            .unwrap_or(0);
        let bound = self.peak_possible.min(max_allowed);
        assert!(
            self.peak_seen <= peak && peak <= bound,
            "reconcile's peak {peak}; the test saw {} in use, and at most {} can have been held (jobs and borrows {}, most seats ever allowed {max_allowed}){}",
            self.peak_seen,
            bound,
            self.peak_possible,
            self.ctx()
        );
        let denials: u64 = total["denials"]
            .as_object()
            .map(|d| d.values().filter_map(|v| v.as_u64()).sum())
            .unwrap_or(0);
        // A wait that ends without a seat is journaled as a denial (a waiter signalled,
        // one whose wait broke with a restart, ...): the test does not see every wait's
        // end, so each `--wait` job may add one.
        let unsure = self.waits_started;
        // A denial is answered at once and made durable by the next flush: a SIGKILL in
        // that instant loses it (ARCHITECTURE.md, group commit).
        let lost = self.denials_maybe_lost;
        assert!(
            self.denials_seen <= denials + lost && denials <= self.denials_seen + unsure,
            "reconcile's denials {}: the test saw {} ({unsure} waits may have ended unseen, {lost} came just before a SIGKILL){}",
            total["denials"],
            self.denials_seen,
            self.ctx()
        );
        assert_eq!(
            total["licensed"].as_u64(),
            Some(final_allowed),
            "licensed at the end: {total}{}",
            self.ctx()
        );
        // Licensed seats over time: every step the reports show must be a value the
        // vendor's records allowed at that second.
        for step in total["licensed_steps"].as_array().unwrap() {
            let from = step["from_unix"].as_u64().unwrap();
            let seats = step["seats"].as_u64();
            let expect: BTreeSet<u64> = (from.saturating_sub(1)..=from + 1)
                .flat_map(|t| self.allowed_options(t))
                .map(u64::from)
                .collect();
            assert!(
                seats.is_some_and(|s| expect.contains(&s)),
                "reconcile's licensed step {step}: the vendor's records allowed {expect:?} then{}",
                self.ctx()
            );
        }
        eprintln!(
            "lifecycle: reconcile: grants {grants} (seen {seen}, unseen possible {}), peak {peak} (seen {}, bound {}), denials {denials}, licensed steps {}",
            self.unseen_possible,
            self.peak_seen,
            self.peak_possible.min(max_allowed),
            total["licensed_steps"].as_array().unwrap().len()
        );
    }
}
