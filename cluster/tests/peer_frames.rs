//! What `serve_peer` does with a peer that sends garbage: the stream is reset with an
//! error code, nothing panics, the claimed size is never allocated, and the connection
//! goes on answering good requests. Also: a connection through the endpoint shared with
//! clients that presented no node certificate never reaches Raft.

mod support;

use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::VoteRequest;
use openraft::{Config, Raft, Vote};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::TestConfig;
use tally_cluster::net::frame::{self, FRAME_VERSION, MAX_FRAME};
use tally_cluster::net::transport::{codes, PeerRequest, PeerResponse};
use tally_cluster::net::{
    is_peer_connection, serve_peer, tls, PeerError, PeerIdentity, PeerKeys, PeerNode, QuicNetwork,
};
use tally_protocol::keys::SecretKey;

/// Records the largest single allocation, so the test can show that a claimed length of
/// gigabytes was never allocated.
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Largest = Largest;

const DEADLINE: Duration = Duration::from_secs(20);

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// A one-node cluster (node 1) whose endpoint takes `server` and serves every connection
/// with `serve_peer`; `outcomes` gets what each `serve_peer` returned.
async fn single_node(
    server: quinn::ServerConfig,
    allowed: PeerKeys,
) -> (
    Raft<TestConfig>,
    quinn::Endpoint,
    tokio::sync::mpsc::UnboundedReceiver<Result<(), PeerError>>,
    tempfile::TempDir,
) {
    let endpoint = quinn::Endpoint::server(server, loopback()).unwrap();
    let identity = Arc::new(PeerIdentity::new(&key(1)).unwrap());
    let config = Arc::new(Config::default().validate().unwrap());
    let network = QuicNetwork::new(1, endpoint.clone(), identity);
    let stored = support::open_store();
    let raft = Raft::new(1, config, network, stored.log, stored.machine)
        .await
        .unwrap();
    let node = PeerNode {
        addr: endpoint.local_addr().unwrap().to_string(),
        key: key(1).public(),
    };
    raft.initialize(BTreeMap::from([(1, node)])).await.unwrap();
    raft.wait(Some(DEADLINE))
        .current_leader(1, "a one-node cluster leads itself")
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn({
        let (endpoint, raft) = (endpoint.clone(), raft.clone());
        async move {
            while let Some(incoming) = endpoint.accept().await {
                let (raft, allowed, tx) = (raft.clone(), allowed.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        assert!(is_peer_connection(&conn));
                        let _ = tx.send(serve_peer(conn, raft, allowed).await);
                    }
                });
            }
        }
    });
    (raft, endpoint, rx, stored.dir)
}

/// Sends `bytes` on a fresh stream and returns how the acceptor ended the answer.
async fn send_raw(
    conn: &quinn::Connection,
    bytes: &[u8],
) -> Result<Vec<u8>, quinn::ReadToEndError> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // The acceptor may stop reading before all is written; that is its answer too.
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    tokio::time::timeout(DEADLINE, recv.read_to_end(MAX_FRAME))
        .await
        .expect("the acceptor answers or resets")
}

fn reset_with(result: Result<Vec<u8>, quinn::ReadToEndError>, code: u32) {
    match result {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(c))) => {
            assert_eq!(c, code.into(), "reset code")
        }
        other => panic!("expected a reset with code {code}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_reset_their_stream_only() {
    let allowed = PeerKeys::new([key(1).public(), key(2).public()]);
    let server = tls::server_config(&PeerIdentity::new(&key(1)).unwrap(), allowed.clone()).unwrap();
    let (raft, endpoint, _outcomes, _dir) = single_node(server, allowed).await;
    let addr = endpoint.local_addr().unwrap();

    // Node 2 (an allowed key) dials by hand to send what no tally would.
    let client = quinn::Endpoint::client(loopback()).unwrap();
    let config = tls::client_config(&PeerIdentity::new(&key(2)).unwrap(), key(1).public()).unwrap();
    let conn = client
        .connect_with(config, addr, tls::PEER_SERVER_NAME)
        .unwrap()
        .await
        .unwrap();

    let before = LARGEST.load(Ordering::Relaxed);
    // A length of almost 4 GiB.
    let mut huge = (u32::MAX - 1).to_be_bytes().to_vec();
    huge.extend_from_slice(&FRAME_VERSION.to_be_bytes());
    huge.extend_from_slice(&[0; 64]);
    reset_with(send_raw(&conn, &huge).await, codes::TOO_LARGE);
    // Just above the bound.
    let over = ((MAX_FRAME + 1) as u32).to_be_bytes();
    reset_with(send_raw(&conn, &over).await, codes::TOO_LARGE);
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest <= before.max(MAX_FRAME),
        "the claimed size was allocated: largest allocation {largest} bytes"
    );

    // Bytes that are no request.
    let mut garbage = 8u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&FRAME_VERSION.to_be_bytes());
    garbage.extend_from_slice(&[0xff; 6]);
    reset_with(send_raw(&conn, &garbage).await, codes::BAD_REQUEST);
    // A frame of a future version.
    let mut future = frame::encode(&PeerRequest::<TestConfig>::Vote(VoteRequest::new(
        Vote::new(1, 2),
        None,
    )))
    .unwrap();
    future[4..6].copy_from_slice(&(FRAME_VERSION + 1).to_be_bytes());
    reset_with(send_raw(&conn, &future).await, codes::BAD_REQUEST);
    // A frame cut short.
    reset_with(
        send_raw(&conn, &100u32.to_be_bytes()).await,
        codes::BAD_REQUEST,
    );

    // The connection still carries good requests, answered by Raft.
    let vote = frame::encode(&PeerRequest::<TestConfig>::Vote(VoteRequest::new(
        Vote::new(0, 2),
        None,
    )))
    .unwrap();
    let answer = send_raw(&conn, &vote).await.expect("an answer");
    let answer: PeerResponse<u64> = frame::decode(&answer[4..]).unwrap();
    match answer {
        PeerResponse::Vote(Ok(vote)) => assert!(!vote.vote_granted, "a stale vote is denied"),
        _ => panic!("expected Raft's answer to the vote"),
    }
    assert_eq!(raft.current_leader().await, Some(1));
    client.close(0u32.into(), b"done");
    raft.shutdown().await.unwrap();
    endpoint.close(0u32.into(), b"done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_shared_endpoint_a_peer_without_a_node_certificate_never_reaches_raft() {
    let allowed = PeerKeys::new([key(1).public(), key(2).public()]);
    let crypto = tls::shared_server_crypto(
        &PeerIdentity::new(&key(1)).unwrap(),
        allowed.clone(),
        &[b"tally/1"],
    )
    .unwrap();
    let server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(crypto).unwrap(),
    ));
    let (raft, endpoint, mut outcomes, _dir) = single_node(server, allowed).await;
    let addr = endpoint.local_addr().unwrap();

    // A client without a certificate, asking for the peer ALPN (the handshake passes:
    // tally's clients present none on this endpoint).
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(tls::PinnedPeerVerifier::new(key(1).public())))
        .with_no_client_auth();
    tls_config.alpn_protocols = vec![tls::PEER_ALPN.to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls_config).unwrap(),
    ));
    let client = quinn::Endpoint::client(loopback()).unwrap();
    let conn = client
        .connect_with(config, addr, tls::PEER_SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let outcome = tokio::time::timeout(DEADLINE, outcomes.recv())
        .await
        .expect("serve_peer ends")
        .expect("an outcome");
    assert!(
        matches!(outcome, Err(PeerError::NotANode(_))),
        "{outcome:?}"
    );
    let closed = tokio::time::timeout(DEADLINE, conn.closed()).await.unwrap();
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == codes::NOT_A_NODE.into()),
        "{closed:?}"
    );

    // A node with its certificate gets through the same endpoint.
    let stranger_free = PeerNode {
        addr: addr.to_string(),
        key: key(1).public(),
    };
    let mut network = QuicNetwork::new(
        2,
        client.clone(),
        Arc::new(PeerIdentity::new(&key(2)).unwrap()),
    );
    let mut peer =
        RaftNetworkFactory::<TestConfig>::new_client(&mut network, 1, &stranger_free).await;
    let answer = peer
        .vote(
            VoteRequest::new(Vote::new(0, 2), None),
            RPCOption::new(DEADLINE),
        )
        .await
        .expect("a node's RPC is answered");
    assert!(!answer.vote_granted);
    client.close(0u32.into(), b"done");
    raft.shutdown().await.unwrap();
    endpoint.close(0u32.into(), b"done");
}
