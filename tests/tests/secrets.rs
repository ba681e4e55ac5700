//! No secret in logs or error messages: a real daemon at debug level, the `tally` tool
//! at debug level, and a day's operations through them (checkouts, borrows, returns,
//! admin operations with the right and a wrong token over QUIC and HTTP, a usage
//! report). Then every log line and every message is scanned for the admin token, the
//! server key and the lease secrets, in the forms they could leak in.
//!
//! Alone in its file: it sets RUST_LOG for the daemons it starts.

use base64::Engine;
use std::time::Duration;
use tally_client::{ClientConfig, Session, Trust};
use tally_tests::Daemon;

fn forms(secret: &[u8]) -> Vec<String> {
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    vec![
        hex.clone(),
        hex.to_uppercase(),
        base64::engine::general_purpose::STANDARD.encode(secret),
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(secret),
        format!("{secret:?}"),
    ]
}

#[test]
fn no_secret_reaches_a_log_or_an_error_message() {
    // The daemon logs at debug level, its dependencies (quinn, rustls) included.
    std::env::set_var("RUST_LOG", "debug");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cache = dir.path().join("cache");
    let daemon = Daemon::start(&data, "127.0.0.1:0", &[]);
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let token = token.trim().to_string();
    let token_file = data.join("admin.token");
    let wrong_file = dir.path().join("wrong.token");
    // A mistyped token that shares most of the real one must not be echoed either.
    let wrong = format!("{}x", &token[..token.len() - 1]);
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&wrong_file)
            .unwrap();
        f.write_all(wrong.as_bytes()).unwrap();
    }
    let mut messages = String::new();
    let mut tally = |args: &[&str]| {
        let out = daemon
            .tally()
            .env("TALLY_LOG", "debug")
            .env("TALLY_CACHE_DIR", &cache)
            .args(args)
            .output()
            .unwrap();
        messages.push_str(&String::from_utf8_lossy(&out.stdout));
        messages.push_str(&String::from_utf8_lossy(&out.stderr));
        out.status.code()
    };
    let token_arg = token_file.display().to_string();
    let wrong_arg = wrong_file.display().to_string();
    let report = dir.path().join("r.report").display().to_string();
    assert_eq!(tally(&["run", "solver", "--", "true"]), Some(0));
    assert_eq!(tally(&["borrow", "solver", "--for", "1d"]), Some(0));
    assert_eq!(tally(&["return", "solver"]), Some(0));
    assert_eq!(tally(&["status", "--json"]), Some(0));
    assert_eq!(
        tally(&["admin", "--admin-token-file", &wrong_arg, "reload"]),
        Some(77)
    );
    assert_eq!(
        tally(&[
            "admin",
            "--admin-token-file",
            &token_arg,
            "report",
            "--out",
            &report
        ]),
        Some(0)
    );
    let (code, body) = daemon.http("POST", "/api/admin/remove/L0000000000000001", Some(&wrong));
    assert_eq!(code, 401);
    messages.push_str(&body);

    // Lease secrets the daemon handed out, taken from a client of its own.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    rt.block_on(async {
        let mut config = ClientConfig::new(vec![daemon.addr.to_string()], Trust::Demo);
        config.request_timeout = Duration::from_secs(10);
        let session = Session::connect(&config).await.unwrap();
        for feature in ["solver", "viewer", "viewer"] {
            let lease = session
                .checkout(&tally_tests::one_seat(feature))
                .await
                .unwrap();
            secrets.push(lease.lease_ref().secret.0.to_vec());
            session.heartbeat(&[lease.lease_ref()]).await.unwrap();
            session.checkin(&[lease.lease_ref()]).await.unwrap();
        }
        session.close().await;
    });
    let key_text = std::fs::read_to_string(data.join("server.key")).unwrap();
    daemon.signal("TERM");
    assert!(daemon.wait_exit(Duration::from_secs(30)));
    let log = daemon.log_text();
    assert!(
        log.contains("DEBUG"),
        "the daemon did not log at debug level"
    );
    assert!(messages.contains("admin token"), "{messages}");

    let mut needles: Vec<(String, String)> = vec![
        ("admin token".into(), token.clone()),
        ("mistyped admin token".into(), wrong.clone()),
    ];
    // The key file's armoured body, line by line (any line of it is key material).
    for line in key_text
        .lines()
        .filter(|l| l.len() >= 16 && !l.starts_with("-----"))
    {
        needles.push(("server key file".into(), line.to_string()));
    }
    for s in &secrets {
        for form in forms(s) {
            needles.push(("lease secret".into(), form));
        }
    }
    for (what, needle) in &needles {
        assert!(
            !log.contains(needle.as_str()),
            "the daemon log holds the {what}"
        );
        assert!(
            !messages.contains(needle.as_str()),
            "a message of the tally tool holds the {what}"
        );
    }
    println!(
        "scanned {} log bytes and {} message bytes for {} secret forms",
        log.len(),
        messages.len(),
        needles.len()
    );
}
