//! A site of several servers for end-to-end tests: a vendor key, `n` activated servers
//! (`s0`, `s1`, ...; `tallyd init` and `tallyd request` each), one bundle issued with
//! every request, and a `tallyd.toml` per server. [`ClusterSite::configure`] makes them
//! one cluster (`[[cluster]]` with every member's key and address); without it each
//! server runs on its own (the binding tests).

use crate::{bin, ok, run, Daemon};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};

/// The vendor and the servers of one site.
pub struct ClusterSite {
    root: tempfile::TempDir,
    nodes: usize,
}

impl ClusterSite {
    /// A vendor key and `nodes` activated servers, each configured to run alone on a
    /// loopback port of its own (`listen = 127.0.0.1:0`).
    pub fn new(nodes: usize) -> ClusterSite {
        let c = ClusterSite {
            root: tempfile::tempdir().unwrap(),
            nodes,
        };
        ok(run(Command::new(bin("tally-publisher"))
            .arg("keygen")
            .arg("--out")
            .arg(c.path("vendor"))));
        for i in 0..nodes {
            std::fs::create_dir_all(c.path(&format!("s{i}/bundles"))).unwrap();
            ok(run(Command::new(bin("tallyd"))
                .arg("init")
                .arg("--data-dir")
                .arg(c.data_dir(i))));
            ok(run(Command::new(bin("tallyd"))
                .arg("request")
                .arg("--data-dir")
                .arg(c.data_dir(i))
                .arg("--out")
                .arg(c.request(i))));
            c.write_config(i, "127.0.0.1:0", "");
        }
        c
    }

    /// A path in the site's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// Server `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.path(&format!("s{i}/data"))
    }

    /// Server `i`'s activation request.
    pub fn request(&self, i: usize) -> PathBuf {
        self.path(&format!("s{i}.req"))
    }

    /// Server `i`'s config file.
    pub fn config(&self, i: usize) -> PathBuf {
        self.path(&format!("s{i}/tallyd.toml"))
    }

    fn write_config(&self, i: usize, listen: &str, extra: &str) {
        std::fs::write(
            self.config(i),
            format!(
                "listen = \"{listen}\"\nhttp_listen = \"127.0.0.1:0\"\nlease_ttl_secs = 60\nheartbeat_secs = 2\n\
                 idle_timeout_secs = 5\ndata_dir = \"{}\"\nbundle_dir = \"{}\"\n\
                 vendor_keys = [\"{}\"]\n{extra}",
                self.data_dir(i).display(),
                self.path(&format!("s{i}/bundles")).display(),
                self.path("vendor.pub").display()
            ),
        )
        .unwrap();
    }

    /// The server key of node `i`, as its activation request names it.
    pub fn key(&self, i: usize) -> String {
        let out = ok(run(Command::new(bin("tally-publisher"))
            .arg("inspect")
            .arg("--json")
            .arg(self.request(i))));
        let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
        doc["server_key"].as_str().unwrap().to_string()
    }

    /// `tally-publisher issue` of a bundle of `seats` seats of `solver` with the given
    /// requests, to the file `out` in the site's directory.
    pub fn issue_seats(&self, requests: &[PathBuf], out: &str, seats: u32) -> Output {
        let spec = self.path("spec.toml");
        std::fs::write(
            &spec,
            format!(
                "id = \"site-ha-1\"\nvendor = \"Acme Simulation\"\n[customer]\nid = \"C-1001\"\n\
                 name = \"Example Corp\"\n[[feature]]\nname = \"solver\"\nseats = {seats}\n"
            ),
        )
        .unwrap();
        let mut cmd = Command::new(bin("tally-publisher"));
        cmd.arg("issue")
            .arg("--vendor-key")
            .arg(self.path("vendor.key"))
            .arg("--spec")
            .arg(&spec);
        for r in requests {
            cmd.arg("--request").arg(r);
        }
        run(cmd.arg("--out").arg(self.path(out)))
    }

    /// [`ClusterSite::issue_seats`] with 5 seats.
    pub fn issue(&self, requests: &[PathBuf], out: &str) -> Output {
        self.issue_seats(requests, out, 5)
    }

    /// Every server's activation request.
    pub fn all_requests(&self) -> Vec<PathBuf> {
        (0..self.nodes).map(|i| self.request(i)).collect()
    }

    /// Node `i`'s admin token file.
    pub fn admin_token(&self, i: usize) -> PathBuf {
        self.data_dir(i).join("admin.token")
    }

    /// Puts the bundle file `name` into node `i`'s bundle directory.
    pub fn install(&self, name: &str, i: usize) {
        std::fs::copy(self.path(name), self.path(&format!("s{i}/bundles/{name}"))).unwrap();
    }

    /// Makes the servers one cluster: each listens on its address of `addrs` and names
    /// every member (key and address) under `[[cluster]]`. `peer_addrs(i, j)` is the
    /// address server `i` reaches member `j` at (its real address, or a relay's).
    pub fn configure(&self, addrs: &[SocketAddr], peer_addrs: impl Fn(usize, usize) -> SocketAddr) {
        let all: Vec<usize> = (0..self.nodes).collect();
        for i in 0..self.nodes {
            self.configure_member(
                i,
                &all,
                |j| if i == j { addrs[j] } else { peer_addrs(i, j) },
                false,
            );
        }
    }

    /// Writes server `i`'s config as a member of the cluster of the servers `members`
    /// (server `j` at `addr(j)`, `i` listening at its own), joining a running cluster
    /// (`join_cluster`) if `join`.
    pub fn configure_member(
        &self,
        i: usize,
        members: &[usize],
        addr: impl Fn(usize) -> SocketAddr,
        join: bool,
    ) {
        let tables: String = members
            .iter()
            .map(|&j| {
                format!(
                    "\n[[cluster]]\nkey = \"{}\"\naddr = \"{}\"\n",
                    self.key(j),
                    addr(j)
                )
            })
            .collect();
        let join = if join { "join_cluster = true\n" } else { "" };
        self.write_config(i, &addr(i).to_string(), &format!("{join}{tables}"));
    }

    /// `tallyd check-config` of node `i`.
    pub fn check_config(&self, i: usize) -> Output {
        run(Command::new(bin("tallyd"))
            .arg("check-config")
            .arg("--config")
            .arg(self.config(i)))
    }

    /// `tallyd run` of node `i`.
    pub fn daemon(&self, i: usize) -> Daemon {
        Daemon::run(&self.config(i), &self.path("vendor.pub"))
    }

    /// `tally` with every address of `addrs` as its servers, trusting the vendor.
    pub fn tally(&self, addrs: &[SocketAddr]) -> Command {
        let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        let mut c = Command::new(bin("tally"));
        c.arg("--server")
            .arg(list.join(","))
            .arg("--vendor-pub")
            .arg(self.path("vendor.pub"))
            .env_remove("TALLY_SERVER");
        c
    }
}

/// `n` loopback UDP addresses free a moment ago (bound to port 0 and let go), for
/// servers whose addresses must be known before they start.
pub fn free_udp_addrs(n: usize) -> Vec<SocketAddr> {
    let sockets: Vec<std::net::UdpSocket> = (0..n)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    sockets.iter().map(|s| s.local_addr().unwrap()).collect()
}
