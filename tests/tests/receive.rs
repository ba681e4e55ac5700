//! `tally-publisher receive` with tallyd's real uploader, both real processes on loopback
//! over HTTPS (a certificate made with rcgen, trusted by tallyd via `report_upload_ca`):
//! reports arrive in order and are stored once; a retried upload (tallyd stopped between
//! the 2xx and moving the report to `sent/`) is acknowledged and not stored twice; a
//! forged report is refused with 4xx and its reason and stays in tallyd's spool. A second
//! test posts to the receiver directly to read each refusal's status and reason: forged,
//! unknown server, out of order, a fork of the stored chain, too large, not a POST.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tally_tests::{bin, ok, run, wait_until, Daemon, VendorSite};

/// A running `tally-publisher receive`; killed when dropped.
struct Receiver {
    child: Child,
    /// `https://127.0.0.1:PORT/reports`.
    url: String,
    log: PathBuf,
}

impl Receiver {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A self-signed certificate for 127.0.0.1: (cert.pem, key.pem with mode 0600).
fn certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join("receiver.pem"), dir.join("receiver.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (cert_path, key_path)
}

fn start_receiver(dir: &Path, bundles: &Path, cert: &Path, key: &Path, extra: &[&str]) -> Receiver {
    let mut options: Vec<std::ffi::OsString> = vec![
        "--tls-cert".into(),
        cert.into(),
        "--tls-key".into(),
        key.into(),
    ];
    options.extend(extra.iter().map(Into::into));
    spawn_receiver(dir, bundles, &options, "https")
}

/// `tally-publisher receive` on 127.0.0.1 with `options`; waits for its banner.
fn spawn_receiver(
    dir: &Path,
    bundles: &Path,
    options: &[std::ffi::OsString],
    scheme: &'static str,
) -> Receiver {
    let log = dir.with_extension(format!("receiver-{scheme}.log"));
    let mut child = Command::new(bin("tally-publisher"))
        .arg("receive")
        .args(["--listen", "127.0.0.1:0", "--dir"])
        .arg(dir)
        .arg("--bundles")
        .arg(bundles)
        .args(options)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some((_, rest)) = line.split_once(&format!(" on {scheme}://")) {
                let addr = rest.split('/').next().unwrap_or("").to_string();
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| {
            panic!(
                "receiver did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
    Receiver {
        child,
        url: format!("{scheme}://{addr}/reports"),
        log,
    }
}

/// The customer site with reports spooled in `spool`, uploaded to `upload` if given.
fn site_config(site: &VendorSite, spool: &Path, upload: Option<(&str, &Path)>) {
    let mut config = std::fs::read_to_string(site.path("tallyd.toml")).unwrap();
    config.push_str(&format!("report_dir = \"{}\"\n", spool.display()));
    if let Some((url, ca)) = upload {
        config.push_str(&format!(
            "report_upload_url = \"{url}\"\nreport_upload_ca = \"{}\"\n",
            ca.display()
        ));
    }
    std::fs::write(site.path("tallyd.toml"), config).unwrap();
}

/// The vendor's copy of the customer's bundles, one directory per customer.
fn vendor_bundles(vendor: &Path, site: &VendorSite, customer: &str) {
    let dir = vendor.join("issued").join(customer);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(site.path("bundles")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
}

/// Uses a seat, then exports a report (into the spool, and to `out`).
fn use_and_report(daemon: &Daemon, site: &VendorSite, out: &Path) -> String {
    ok(run(daemon.tally().args(["run", "solver", "--", "true"])));
    ok(run(daemon
        .tally()
        .args(["admin", "--admin-token-file"])
        .arg(site.path("data/admin.token"))
        .args(["report", "--out"])
        .arg(out)));
    std::fs::read_to_string(out).unwrap()
}

/// The reports stored for the one server under the receiver's directory, by name.
fn stored(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(customers) = std::fs::read_dir(dir) else {
        return out;
    };
    for customer in customers {
        let customer = customer.unwrap().path();
        if !customer.is_dir() {
            continue; // the receiver's lock file
        }
        for server in std::fs::read_dir(customer).unwrap() {
            for file in std::fs::read_dir(server.unwrap().path()).unwrap() {
                let path = file.unwrap().path();
                out.push((
                    path.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read_to_string(&path).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

fn names(dir: &Path) -> Vec<String> {
    stored(dir).into_iter().map(|(n, _)| n).collect()
}

/// One character of the signed body changed: the signature no longer verifies.
fn tampered(report: &str) -> String {
    let mut lines: Vec<String> = report.lines().map(String::from).collect();
    let line = &mut lines[5];
    let c = line.remove(7);
    line.insert(7, if c == 'x' { 'y' } else { 'x' });
    lines.join("\n") + "\n"
}

#[test]
fn tallyd_uploads_are_stored_once_and_a_forged_report_is_refused_and_stays_spooled() {
    let site = VendorSite::new();
    site.issue("C-1001-2027", &[], &[("solver", 2)]);
    let vendor = tempfile::tempdir().unwrap();
    let inbox = vendor.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    vendor_bundles(vendor.path(), &site, "C-1001");
    let (cert, key) = certificate(vendor.path());
    let receiver = start_receiver(&inbox, &vendor.path().join("issued"), &cert, &key, &[]);
    let spool = site.path("spool");
    site_config(&site, &spool, Some((&receiver.url, &cert)));
    let daemon = site.daemon();
    let sent = |n: u32| spool.join(format!("sent/tally-report-{n:08}.report"));

    // Report 1 arrives, byte for byte, and only then leaves tallyd's spool.
    let r1 = use_and_report(&daemon, &site, &site.path("r1.report"));
    assert!(
        wait_until(Duration::from_secs(30), || sent(1).exists()),
        "report 1 not acknowledged\ntallyd:\n{}\nreceiver:\n{}",
        daemon.log_text(),
        receiver.log_text()
    );
    assert_eq!(
        stored(&inbox),
        vec![("tally-report-00000001.report".to_string(), r1.clone())]
    );
    assert!(receiver
        .log_text()
        .contains("201 tally-report-00000001.report: report 1 of server"));

    // tallyd stopped after the receiver stored report 1 but before it moved the file to
    // sent/: at the next pass it uploads report 1 again. Acknowledged, not stored twice.
    std::fs::copy(sent(1), spool.join("tally-report-00000001.report")).unwrap();
    let r2 = use_and_report(&daemon, &site, &site.path("r2.report"));
    assert!(
        wait_until(Duration::from_secs(30), || sent(2).exists()
            && !spool.join("tally-report-00000001.report").exists()),
        "tallyd:\n{}\nreceiver:\n{}",
        daemon.log_text(),
        receiver.log_text()
    );
    assert_eq!(
        stored(&inbox),
        vec![
            ("tally-report-00000001.report".to_string(), r1.clone()),
            ("tally-report-00000002.report".to_string(), r2.clone()),
        ],
        "each report stored once, nothing else (no temp file) in the directory"
    );
    assert!(
        receiver
            .log_text()
            .contains("200 tally-report-00000001.report: report 1 of server"),
        "{}",
        receiver.log_text()
    );
    assert!(receiver
        .log_text()
        .contains("already stored; not stored twice"));

    // A forged report in the spool, ahead of report 3 in name order. The receiver refuses
    // it with 400 and says why; tallyd keeps it spooled and, since upload.rs stops a pass
    // at its first failure so that the chain goes in order, report 3 waits behind it.
    let forged = spool.join("tally-report-00000002-forged.report");
    std::fs::write(&forged, tampered(&r2)).unwrap();
    let r3 = use_and_report(&daemon, &site, &site.path("r3.report"));
    assert!(
        wait_until(Duration::from_secs(30), || {
            receiver.log_text().contains(
            "400 tally-report-00000002-forged.report: refused: not a valid usage report: signature does not verify"
        )
        }),
        "receiver:\n{}",
        receiver.log_text()
    );
    assert!(wait_until(Duration::from_secs(30), || daemon
        .log_text()
        .contains("the vendor's server answered 400")));
    assert!(forged.exists(), "a refused report stays in the spool");
    assert!(!spool
        .join("sent/tally-report-00000002-forged.report")
        .exists());
    assert!(spool.join("tally-report-00000003.report").exists());
    assert_eq!(names(&inbox).len(), 2, "nothing stored for the forged one");

    // Once the site's admin takes the forged file out, the retry (backoff 2 s, 4 s, ...)
    // delivers report 3.
    std::fs::remove_file(&forged).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || sent(3).exists()),
        "tallyd:\n{}",
        daemon.log_text()
    );
    assert_eq!(
        stored(&inbox)[2],
        ("tally-report-00000003.report".to_string(), r3)
    );

    // What was stored is one chain that verify-report accepts against the vendor's bundles.
    let server_dir = std::fs::read_dir(inbox.join("C-1001"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut reports: Vec<PathBuf> = std::fs::read_dir(&server_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    reports.sort();
    let out = ok(run(Command::new(bin("tally-publisher"))
        .arg("verify-report")
        .arg("--bundle")
        .arg(vendor.path().join("issued/C-1001"))
        .args(&reports)));
    assert!(out.contains("3 reports verified"), "{out}");
    assert_eq!(
        server_dir.parent().unwrap().file_name().unwrap(),
        "C-1001",
        "stored under the customer's id"
    );
    // And the receiver's tree is what `reconcile --dir` sums up (its lock file aside).
    let out = ok(run(Command::new(bin("tally-publisher"))
        .args(["reconcile", "--format", "csv", "--dir"])
        .arg(&inbox)
        .arg("--bundle")
        .arg(vendor.path().join("issued/C-1001"))));
    assert!(out.contains("C-1001") && out.contains("solver"), "{out}");
}

/// A POST of `body` to the receiver: (status, reason text).
fn post(agent: &ureq::Agent, url: &str, body: &str) -> (u16, String) {
    match agent
        .post(url)
        .set("Content-Type", "text/plain; charset=utf-8")
        .send_string(body)
    {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("upload failed: {e}"),
    }
}

fn agent(cert: &Path) -> ureq::Agent {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    ureq::AgentBuilder::new()
        .tls_config(Arc::new(tls))
        .timeout(Duration::from_secs(30))
        .build()
}

#[test]
fn each_refusal_is_a_4xx_with_its_reason_and_nothing_is_stored_for_it() {
    let site = VendorSite::new();
    site.issue("C-1001-2027", &[], &[("solver", 2)]);
    let spool = site.path("spool");
    site_config(&site, &spool, None);
    // The customer's server writes report 1 (admin) and report 2 (at its stop); its data
    // dir is copied while it is stopped; it writes report 3 on its next run, and the copy,
    // started as the same server, writes a different report 3: a fork of the chain.
    let daemon = site.daemon();
    use_and_report(&daemon, &site, &site.path("r1.report"));
    daemon.stop();
    let spooled = |n: u32| {
        std::fs::read_to_string(spool.join(format!("tally-report-{n:08}.report")))
            .unwrap_or_else(|e| panic!("report {n} not in the spool: {e}"))
    };
    let (r1, r2) = (spooled(1), spooled(2));
    let copy = site.path("data-copy");
    ok(run(Command::new("cp")
        .arg("-a")
        .arg(site.path("data"))
        .arg(&copy)));
    let daemon = site.daemon();
    let r3 = use_and_report(&daemon, &site, &site.path("r3.report"));
    assert_eq!(r3, spooled(3));
    drop(daemon);
    let config = std::fs::read_to_string(site.path("tallyd.toml"))
        .unwrap()
        .replace(
            &site.path("data").display().to_string(),
            &copy.display().to_string(),
        )
        .replace(
            &spool.display().to_string(),
            &site.path("spool-copy").display().to_string(),
        );
    std::fs::write(site.path("tallyd-copy.toml"), config).unwrap();
    let forked_daemon = Daemon::run(&site.path("tallyd-copy.toml"), &site.path("vendor.pub"));
    ok(run(forked_daemon
        .tally()
        .args(["run", "solver", "--count", "2", "--", "true"])));
    ok(run(forked_daemon
        .tally()
        .args(["admin", "--admin-token-file"])
        .arg(copy.join("admin.token"))
        .args(["report", "--out"])
        .arg(site.path("r3-forked.report"))));
    let r3_forked = std::fs::read_to_string(site.path("r3-forked.report")).unwrap();
    assert!(site
        .path("spool-copy/tally-report-00000003.report")
        .exists());
    drop(forked_daemon);
    // Another server (VendorSite names every customer C-1001), whose bundle the vendor's
    // directory does not hold.
    let other = VendorSite::new();
    other.issue("C-2002-2027", &[], &[("solver", 1)]);
    site_config(&other, &other.path("spool"), None);
    let other_daemon = other.daemon();
    let foreign = use_and_report(&other_daemon, &other, &other.path("o1.report"));
    drop(other_daemon);

    let vendor = tempfile::tempdir().unwrap();
    let inbox = vendor.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    vendor_bundles(vendor.path(), &site, "C-1001");
    let (cert, key) = certificate(vendor.path());
    let receiver = start_receiver(
        &inbox,
        &vendor.path().join("issued"),
        &cert,
        &key,
        &["--max-report-mib", "1"],
    );
    let agent = agent(&cert);
    let url = &receiver.url;

    let (code, why) = post(&agent, url, &r2);
    assert_eq!(code, 409, "{why}");
    assert!(
        why.contains("out of order") && why.contains("report 1 comes first"),
        "{why}"
    );

    assert_eq!(post(&agent, url, &r1).0, 201);
    let (code, why) = post(&agent, url, &r1);
    assert_eq!(code, 200, "a retry is acknowledged: {why}");
    assert!(why.contains("already stored; not stored twice"), "{why}");

    let (code, why) = post(&agent, url, &tampered(&r2));
    assert_eq!(code, 400, "{why}");
    assert!(why.contains("signature does not verify"), "{why}");

    let (code, why) = post(&agent, url, &foreign);
    assert_eq!(code, 403, "{why}");
    assert!(
        why.contains("unknown server: no bundle in the vendor's bundle directory binds server key"),
        "{why}"
    );

    let (code, why) = post(&agent, url, "hello");
    assert_eq!(code, 400, "{why}");

    // A gap: report 3 while the last stored is report 1.
    let (code, why) = post(&agent, url, &r3);
    assert_eq!(code, 409, "{why}");
    assert!(
        why.contains("the last stored is report 1, so report 2 comes next"),
        "{why}"
    );

    let (code, why) = post(&agent, url, &r2);
    assert_eq!(code, 201, "{why}");
    let (code, why) = post(&agent, url, &r3);
    assert_eq!(code, 201, "{why}");
    let (code, why) = post(&agent, url, &r3_forked);
    assert_eq!(code, 409, "{why}");
    assert!(
        why.contains("report 3 of server") && why.contains("forks the chain"),
        "{why}"
    );

    // Larger than --max-report-mib 1: refused before it is read whole.
    let (code, why) = post(&agent, url, &"x".repeat(2 * 1024 * 1024));
    assert_eq!(code, 413, "{why}");
    assert!(why.contains("larger than 1048576 bytes"), "{why}");

    let r = agent.get(url).call();
    assert!(matches!(r, Err(ureq::Error::Status(405, _))));

    // Only reports 1, 2 and 3, once each.
    assert_eq!(
        stored(&inbox),
        vec![
            ("tally-report-00000001.report".to_string(), r1),
            ("tally-report-00000002.report".to_string(), r2),
            ("tally-report-00000003.report".to_string(), r3.clone()),
        ]
    );
    drop(receiver);

    // Plain HTTP on loopback, as behind the vendor's TLS proxy: same inbox, same answers.
    let plain = spawn_receiver(&inbox, &vendor.path().join("issued"), &[], "http");
    let (code, why) = post(&ureq::Agent::new(), &plain.url, &r3);
    assert_eq!(code, 200, "{why}");
    drop(plain);

    // One receiver per directory.
    let first = spawn_receiver(&inbox, &vendor.path().join("issued"), &[], "http");
    let out = run(Command::new(bin("tally-publisher"))
        .arg("receive")
        .args(["--listen", "127.0.0.1:0", "--dir"])
        .arg(&inbox)
        .arg("--bundles")
        .arg(vendor.path().join("issued")));
    assert_eq!(out.status.code(), Some(75));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another tally-publisher receive is using")
    );
    drop(first);

    // A TLS key others can read is refused.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(Command::new(bin("tally-publisher"))
        .arg("receive")
        .args(["--listen", "127.0.0.1:0", "--dir"])
        .arg(&inbox)
        .arg("--bundles")
        .arg(vendor.path().join("issued"))
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key));
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));

    // Plain HTTP is for a proxy on the same machine only.
    let out = run(Command::new(bin("tally-publisher"))
        .arg("receive")
        .args(["--listen", "0.0.0.0:0", "--dir"])
        .arg(&inbox)
        .arg("--bundles")
        .arg(vendor.path().join("issued")));
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}
