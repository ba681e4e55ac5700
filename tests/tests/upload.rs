//! Report upload against a local HTTPS receiver on loopback: the first attempt is
//! refused (503) and the report stays in the spool; the retry is acknowledged and only
//! then does the report leave the spool. The receiver gets the report byte for byte.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tally_tests::{wait_until, Daemon};

/// A minimal HTTPS server: answers 503 to the first `refuse` requests, then 200, and keeps
/// the bodies it accepted.
/// Requests seen, and the bodies accepted.
type Seen = Arc<Mutex<(usize, Vec<String>)>>;

fn receiver(refuse: usize) -> (std::net::SocketAddr, String, Seen) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let pem = cert.pem();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let config = Arc::new(config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new((0usize, Vec::new())));
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(20) {
            let Ok(stream) = stream else { continue };
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, stream);
            let mut raw = Vec::new();
            let mut buf = [0u8; 65536];
            let (head_end, length) = loop {
                let Ok(n) = tls.read(&mut buf) else {
                    break (0, 0);
                };
                if n == 0 {
                    break (0, 0);
                }
                raw.extend_from_slice(&buf[..n]);
                if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&raw[..i]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0usize);
                    break (i + 4, len);
                }
            };
            if head_end == 0 {
                continue;
            }
            while raw.len() < head_end + length {
                let Ok(n) = tls.read(&mut buf) else { break };
                if n == 0 {
                    break;
                }
                raw.extend_from_slice(&buf[..n]);
            }
            let body = String::from_utf8_lossy(&raw[head_end..]).into_owned();
            let mut seen = record.lock().unwrap();
            seen.0 += 1;
            let reply = if seen.0 <= refuse {
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            } else {
                seen.1.push(body);
                "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            };
            drop(seen);
            let _ = tls.write_all(reply.as_bytes());
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    (addr, pem, seen)
}

#[test]
fn reports_are_uploaded_and_only_acknowledged_ones_leave_the_spool() {
    let (addr, pem, seen) = receiver(1);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let spool = dir.path().join("spool");
    let ca = dir.path().join("vendor-ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let url = format!("https://{addr}/reports");
    let (spool_arg, ca_arg) = (spool.display().to_string(), ca.display().to_string());
    let daemon = Daemon::start(
        &data,
        "127.0.0.1:0",
        &[
            "--report-dir",
            &spool_arg,
            "--report-upload-url",
            &url,
            "--report-upload-ca",
            &ca_arg,
        ],
    );
    assert!(daemon
        .tally()
        .args(["run", "solver", "--", "true"])
        .output()
        .unwrap()
        .status
        .success());
    let out_file = dir.path().join("r1.report");
    let out = daemon
        .tally()
        .args(["admin", "--admin-token-file"])
        .arg(data.join("admin.token"))
        .args(["report", "--out"])
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The first attempt is refused: the report stays in the spool.
    assert!(wait_until(Duration::from_secs(30), || seen
        .lock()
        .unwrap()
        .0
        >= 1));
    let spooled = spool.join("tally-report-00000001.report");
    assert!(spooled.exists() || spool.join("sent/tally-report-00000001.report").exists());
    // The retry (after a 1 s backoff) is acknowledged; then it moves to sent/.
    assert!(
        wait_until(Duration::from_secs(30), || spool
            .join("sent/tally-report-00000001.report")
            .exists()),
        "not uploaded; log:\n{}",
        daemon.log_text()
    );
    assert!(!spooled.exists());
    let seen = seen.lock().unwrap();
    assert_eq!(seen.0, 2, "one refusal, one success");
    assert_eq!(seen.1, vec![std::fs::read_to_string(&out_file).unwrap()]);
    assert!(daemon
        .log_text()
        .contains("the vendor's server answered 503"));
}
