//! The QUIC server in-process on loopback, talked to by the real client library and by
//! raw frames: version negotiation, bad frames, and the trust chain.

use std::net::SocketAddr;
use std::time::Duration;
use tally_client::{ClientConfig, ClientError, Session, Trust};
use tally_daemon::server::{Server, ServerParams};
use tally_daemon::store::Store;
use tally_protocol::bundle::{self, Binding, Bundle, Customer, FeatureGrant};
use tally_protocol::frame::{self, FrameError};
use tally_protocol::keys::{demo, SecretKey};
use tally_protocol::time::UnixTime;
use tally_protocol::wire::*;
use tokio::sync::oneshot;

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = self.task.await;
    }
}

fn bundle_for(
    server: &SecretKey,
    vendor: &SecretKey,
    bound_to: Option<&SecretKey>,
) -> bundle::VerifiedBundle {
    let b = Bundle {
        id: "b-1".into(),
        issued_at: UnixTime(1_700_000_000),
        vendor: "Acme".into(),
        customer: Customer {
            id: "c".into(),
            name: "Example".into(),
        },
        binding: vec![Binding {
            server_key: bound_to.unwrap_or(server).public(),
            host_fingerprint: "h".into(),
        }],
        supersedes: vec![],
        valid_from: None,
        valid_until: None,
        features: vec![{
            let mut f = FeatureGrant::counted("solver", 2);
            f.attributes.insert("edition".into(), "pro".into());
            f
        }],
    };
    let signed = bundle::sign(&b, vendor);
    bundle::verify(&signed, &[vendor.public()]).unwrap()
}

async fn start(server_key: SecretKey, bundle: bundle::VerifiedBundle) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let server = Server::bind(ServerParams::new(
        "127.0.0.1:0".parse().unwrap(),
        server_key,
        vec![bundle],
        store,
    ))
    .await
    .unwrap();
    let addr = server.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .run(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Running {
        addr,
        stop: Some(tx),
        task,
        _dir: dir,
    }
}

fn config(addr: SocketAddr, trust: Trust) -> ClientConfig {
    ClientConfig::new(vec![addr.to_string()], trust)
}

async fn raw_connection(addr: SocketAddr) -> quinn::Connection {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(tally_client::quic_client_config().unwrap());
    endpoint.connect(addr, "tally").unwrap().await.unwrap()
}

async fn exchange(conn: &quinn::Connection, bytes: &[u8]) -> Vec<u8> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    recv.read_to_end(1 << 20).await.unwrap()
}

#[tokio::test]
async fn unknown_version_and_bad_frames_get_clear_answers_on_a_live_connection() {
    let server_key = SecretKey::from_seed([1; 32]);
    let vendor = SecretKey::from_seed([2; 32]);
    let running = start(server_key.clone(), bundle_for(&server_key, &vendor, None)).await;
    let conn = raw_connection(running.addr).await;

    // A client from the future: answered with the versions we speak.
    let answer = exchange(&conn, &frame::encode_frame(7, b"hello from v7")).await;
    match frame::decode_response_frame(&answer) {
        Err(FrameError::PeerRejectedVersion { message, .. }) => {
            assert!(
                message.contains("version 7") && message.contains("1 to 2"),
                "{message}"
            )
        }
        other => panic!("{other:?}"),
    }
    // An oversize length prefix: refused before the payload is read.
    let answer = exchange(&conn, &[0x7f, 0xff, 0xff, 0xff, 0, 1]).await;
    match frame::decode_response_frame(&answer) {
        Ok(Response::Error(e)) => assert!(e.message.contains("exceeds the limit"), "{}", e.message),
        other => panic!("{other:?}"),
    }
    // Garbage under a valid header.
    let answer = exchange(&conn, &frame::encode_frame(1, &[250, 1, 2, 3])).await;
    assert!(matches!(
        frame::decode_response_frame(&answer),
        Ok(Response::Error(_))
    ));
    // Checkout before hello.
    let checkout = Request::Checkout(CheckoutRequest {
        feature: "solver".into(),
        count: 1,
        version: None,
        build_date: None,
        wait_secs: 0,
        borrow_secs: 0,
    });
    let answer = exchange(&conn, &frame::encode_request(&checkout)).await;
    match frame::decode_response_frame(&answer) {
        Ok(Response::Failed(e)) => {
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(e.message.contains("hello"), "{}", e.message)
        }
        other => panic!("{other:?}"),
    }
    // The same from a protocol-version-1 client: answered in version 1, which has no
    // codes, with the same message.
    // (Requests have the same layout in both versions: only the header differs.)
    let mut v1 = frame::encode_request(&checkout);
    v1[4..6].copy_from_slice(&1u16.to_be_bytes());
    let answer = exchange(&conn, &v1).await;
    assert_eq!(u16::from_be_bytes([answer[4], answer[5]]), 1);
    match frame::decode_response_frame(&answer) {
        Ok(Response::Error(e)) => assert!(e.message.contains("hello"), "{}", e.message),
        other => panic!("{other:?}"),
    }
    // The connection survived all of that: a status still works.
    let answer = exchange(
        &conn,
        &frame::encode_request(&Request::Status(StatusRequest { admin_token: None })),
    )
    .await;
    assert!(matches!(
        frame::decode_response_frame(&answer),
        Ok(Response::Status(_))
    ));
    running.stop().await;
}

#[tokio::test]
async fn the_client_trusts_only_servers_the_vendor_bound() {
    let server_key = SecretKey::from_seed([1; 32]);
    let vendor = SecretKey::from_seed([2; 32]);
    let other_vendor = SecretKey::from_seed([3; 32]);

    // The genuine server: accepted with the vendor's key, refused with another vendor's
    // key or with demo trust.
    let genuine = start(server_key.clone(), bundle_for(&server_key, &vendor, None)).await;
    let session = Session::connect(&config(genuine.addr, Trust::Vendor(vec![vendor.public()])))
        .await
        .unwrap();
    assert_eq!(session.server_key(), server_key.public());
    // Vendor attributes reach the application from the verified bundle.
    assert_eq!(session.attributes("solver")["edition"], "pro");
    let lease = session
        .checkout(&CheckoutRequest {
            feature: "solver".into(),
            count: 1,
            version: None,
            build_date: None,
            wait_secs: 0,
            borrow_secs: 0,
        })
        .await
        .unwrap();
    assert_eq!(lease.grant.token.signer, server_key.public());
    session.close().await;
    for trust in [Trust::Vendor(vec![other_vendor.public()]), Trust::Demo] {
        match Session::connect(&config(genuine.addr, trust)).await {
            Err(ClientError::Untrusted(why)) => {
                assert!(why.contains("not a trusted vendor key"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }
    genuine.stop().await;

    // A clone: another machine presenting the genuine bundle (bound to the genuine key)
    // with its own TLS key. Refused.
    let clone_key = SecretKey::from_seed([9; 32]);
    let clone = start(
        clone_key.clone(),
        bundle_for(&clone_key, &vendor, Some(&server_key)),
    )
    .await;
    match Session::connect(&config(clone.addr, Trust::Vendor(vec![vendor.public()]))).await {
        Err(ClientError::Untrusted(why)) => assert!(why.contains("bound to server key"), "{why}"),
        other => panic!("{other:?}"),
    }
    clone.stop().await;

    // A fake server that signs its own bundle with the public demo key: refused by a
    // production client.
    let fake_key = SecretKey::from_seed([5; 32]);
    let fake = start(
        fake_key.clone(),
        bundle_for(&fake_key, &demo::vendor_secret(), None),
    )
    .await;
    assert!(matches!(
        Session::connect(&config(fake.addr, Trust::Vendor(vec![vendor.public()]))).await,
        Err(ClientError::Untrusted(_))
    ));
    fake.stop().await;
}

#[tokio::test]
async fn servers_are_tried_in_order() {
    let server_key = SecretKey::from_seed([1; 32]);
    let vendor = SecretKey::from_seed([2; 32]);
    let running = start(server_key.clone(), bundle_for(&server_key, &vendor, None)).await;
    // The first entry is a port where nothing listens: the client moves on.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let mut cfg = ClientConfig::new(
        vec![dead_addr.to_string(), running.addr.to_string()],
        Trust::Vendor(vec![vendor.public()]),
    );
    // A dead first entry is not waited out: with a one-minute connect timeout the
    // second server still answers at once (the attempts are staggered, not serial), and
    // on the next connect the dead one is tried last.
    cfg.connect_timeout = Duration::from_secs(60);
    for _ in 0..2 {
        let started = std::time::Instant::now();
        let session = Session::connect(&cfg).await.unwrap();
        assert_eq!(session.server(), running.addr);
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the dead first server was waited out ({:?})",
            started.elapsed()
        );
        session.close().await;
    }
    running.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_waiting_leaves_the_queue_and_gets_no_seat() {
    let server_key = SecretKey::from_seed([1; 32]);
    let vendor = SecretKey::from_seed([2; 32]);
    let running = start(server_key.clone(), bundle_for(&server_key, &vendor, None)).await;
    let trust = || Trust::Vendor(vec![vendor.public()]);
    let holder = Session::connect(&config(running.addr, trust()))
        .await
        .unwrap();
    let waiter = Session::connect(&config(running.addr, trust()))
        .await
        .unwrap();
    let want = |count, wait_secs| CheckoutRequest {
        feature: "solver".into(),
        count,
        version: None,
        build_date: None,
        wait_secs,
        borrow_secs: 0,
    };
    let both = holder.checkout(&want(2, 0)).await.unwrap();
    let queue_len = |status: tally_protocol::wire::StatusReply| {
        status
            .features
            .iter()
            .find(|f| f.name == "solver")
            .map(|f| (f.queue.len(), f.in_use))
            .unwrap()
    };
    // The waiting checkout is given up on the client side; its connection stays.
    let gave_up =
        tokio::time::timeout(Duration::from_millis(500), waiter.checkout(&want(1, 60))).await;
    assert!(gave_up.is_err(), "the checkout did not wait");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (queued, _) = queue_len(waiter.status(None).await.unwrap());
        if queued == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the abandoned wait is still queued"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The seats come back and stay free: nobody is waiting for them.
    holder.checkin(&[both.lease_ref()]).await.unwrap();
    assert_eq!(queue_len(waiter.status(None).await.unwrap()), (0, 0));
    running.stop().await;
}

/// A grant decided in the instant its requester stops waiting (the checkin that frees
/// the seat and the cancel cross in flight) reaches nobody: the server takes it back at
/// once instead of leaving the seat with the requester's connection (which stays open)
/// until it closes or the TTL runs out. The race is driven many times; each round must
/// end with every seat free.
#[tokio::test]
async fn a_grant_that_reaches_nobody_is_taken_back_at_once() {
    let server_key = SecretKey::from_seed([1; 32]);
    let vendor = SecretKey::from_seed([2; 32]);
    let running = start(server_key.clone(), bundle_for(&server_key, &vendor, None)).await;
    let trust = || Trust::Vendor(vec![vendor.public()]);
    let holder = Session::connect(&config(running.addr, trust()))
        .await
        .unwrap();
    let waiter = std::sync::Arc::new(
        Session::connect(&config(running.addr, trust()))
            .await
            .unwrap(),
    );
    let want = |count, wait_secs| CheckoutRequest {
        feature: "solver".into(),
        count,
        version: None,
        build_date: None,
        wait_secs,
        borrow_secs: 0,
    };
    let solver = |status: StatusReply| {
        status
            .features
            .iter()
            .find(|f| f.name == "solver")
            .map(|f| (f.queue.len(), f.in_use))
            .unwrap()
    };
    for round in 0..40 {
        let both = holder.checkout(&want(2, 0)).await.unwrap();
        let w = waiter.clone();
        let task = tokio::spawn(async move { w.checkout(&want(1, 60)).await });
        let task = task.abort_handle();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while solver(holder.status(None).await.unwrap()).0 == 0 {
            assert!(tokio::time::Instant::now() < deadline, "never queued");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The seat is freed while the waiter gives up: either may reach the ledger first.
        let refs = [both.lease_ref()];
        if round % 2 == 0 {
            task.abort();
            holder.checkin(&refs).await.unwrap();
        } else {
            let (checked_in, ()) = tokio::join!(holder.checkin(&refs), async {
                tokio::task::yield_now().await;
                task.abort();
            });
            checked_in.unwrap();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (queued, in_use) = solver(holder.status(None).await.unwrap());
            if (queued, in_use) == (0, 0) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: {in_use} seat(s) held by a grant nobody received ({queued} queued)"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    running.stop().await;
}
