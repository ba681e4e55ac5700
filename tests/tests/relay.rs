//! The fault-injecting relay of the partition tests (`tally_tests::relay`), checked with
//! real QUIC (quinn) on loopback: what passes, what a cut does to a live connection and
//! to a new one, what a flap does and that it ends by itself, that the relay's threads
//! and sockets go with it.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{ClientConfig, Connection, ConnectionError, Endpoint, ServerConfig, TransportConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tally_tests::relay::{LinkCounts, Relay};
use tally_tests::wait_until;

/// How long any single step may take before the test fails (far above what it needs).
const DEADLINE: Duration = Duration::from_secs(5);

/// Server and client configs trusting one self-signed `localhost` certificate, with the
/// given idle timeout and keep-alive (short, so a cut shows within a second).
fn configs(idle: Duration, keep_alive: Duration) -> (ServerConfig, ClientConfig) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let mut transport = TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle.try_into().unwrap()))
        .keep_alive_interval(Some(keep_alive))
        // quinn gives up on a handshake after max(idle timeout, 3 PTO); with the default
        // initial RTT (333 ms) that is 3 s on a cut link. Loopback's RTT is far below 10 ms.
        .initial_rtt(Duration::from_millis(10));
    let transport = Arc::new(transport);
    let mut server = ServerConfig::with_single_cert(vec![cert.clone()], key).unwrap();
    server.transport_config(Arc::clone(&transport));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut client = ClientConfig::with_root_certificates(Arc::new(roots)).unwrap();
    client.transport_config(transport);
    (server, client)
}

/// A node: one endpoint on loopback that accepts (answering each stream with `name:`
/// and what it read) and dials, like a tallyd peer on its one UDP port.
fn node(name: &'static str, (server, client): &(ServerConfig, ClientConfig)) -> Endpoint {
    let mut endpoint =
        Endpoint::server(server.clone(), SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
    endpoint.set_default_client_config(client.clone());
    let acceptor = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = acceptor.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let Ok(got) = recv.read_to_end(64 * 1024).await else {
                        return;
                    };
                    let mut answer = format!("{name}:").into_bytes();
                    answer.extend_from_slice(&got);
                    let _ = send.write_all(&answer).await;
                    let _ = send.finish();
                }
            });
        }
    });
    endpoint
}

fn addr(endpoint: &Endpoint) -> SocketAddr {
    endpoint.local_addr().unwrap()
}

/// Dials `to` from `from`, with the test's deadline on top of QUIC's own idle timeout.
async fn connect(from: &Endpoint, to: SocketAddr) -> Result<Connection, ConnectionError> {
    let connecting = from.connect(to, "localhost").unwrap();
    tokio::time::timeout(DEADLINE, connecting)
        .await
        .expect("a connection attempt ends (up or timed out) within the deadline")
}

/// Sends `msg` on a new stream and returns the answer.
async fn exchange(conn: &Connection, msg: &str) -> String {
    let round = async {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(msg.as_bytes()).await.unwrap();
        send.finish().unwrap();
        recv.read_to_end(64 * 1024).await.unwrap()
    };
    let answer = tokio::time::timeout(DEADLINE, round)
        .await
        .expect("a stream round trip within the deadline");
    String::from_utf8(answer).unwrap()
}

#[tokio::test]
async fn quic_passes_through_the_relay_and_each_link_counts_its_datagrams() {
    let cfg = configs(Duration::from_secs(5), Duration::from_millis(500));
    let (a, b) = (node("a", &cfg), node("b", &cfg));
    let relay = Relay::start(&[addr(&a), addr(&b)]);
    assert_eq!(relay.nodes(), 2);
    assert_eq!(relay.peer_addrs(0), vec![(1, relay.addr_of(0, 1))]);

    let conn = connect(&a, relay.addr_of(0, 1)).await.unwrap();
    assert_eq!(exchange(&conn, "ping").await, "b:ping");
    // Handshake and stream, both ways through link 0->1 (a link counts a datagram just
    // after sending it: poll).
    assert!(
        wait_until(DEADLINE, || relay.counts(0, 1).forwarded >= 4),
        "{:?}",
        relay.counts(0, 1)
    );
    assert_eq!(relay.counts(0, 1).dropped, 0);
    assert_eq!(
        relay.counts(1, 0),
        LinkCounts::default(),
        "b dialled nobody yet"
    );

    let back = connect(&b, relay.addr_of(1, 0)).await.unwrap();
    assert_eq!(exchange(&back, "pong").await, "a:pong");
    assert!(wait_until(DEADLINE, || relay.counts(1, 0).forwarded >= 4));
    assert_eq!(relay.total().dropped, 0);
}

/// Plain UDP: a datagram of nearly 64 KiB passes whole each way, the far node sees the
/// link's upstream socket (not the sender), and the reply comes from the address the
/// sender dialled.
#[test]
fn a_datagram_of_nearly_64_kib_passes_whole_both_ways() {
    let bind = || {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        socket.set_read_timeout(Some(DEADLINE)).unwrap();
        socket
    };
    let (a, b) = (bind(), bind());
    let relay = Relay::start(&[a.local_addr().unwrap(), b.local_addr().unwrap()]);
    let big: Vec<u8> = (0..65_000u32).map(|i| (i % 251) as u8).collect();
    let mut buf = vec![0u8; 64 * 1024];

    a.send_to(&big, relay.addr_of(0, 1)).unwrap();
    let (len, upstream) = b.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..len], &big[..]);
    assert_ne!(upstream, a.local_addr().unwrap(), "b sees the relay, not a");

    b.send_to(&big[..40_000], upstream).unwrap();
    let (len, from) = a.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..len], &big[..40_000]);
    assert_eq!(
        from,
        relay.addr_of(0, 1),
        "the reply comes from the address a dialled"
    );
    // A link counts a datagram just after sending it: poll.
    let both = LinkCounts {
        forwarded: 2,
        dropped: 0,
    };
    assert!(
        wait_until(DEADLINE, || relay.counts(0, 1) == both),
        "{:?}",
        relay.counts(0, 1)
    );
}

/// Nodes on kernel-picked ports: the links to a node drop (and count) until the relay
/// is told its address, then carry.
#[test]
fn an_unrouted_relay_drops_until_it_knows_where_a_node_listens() {
    let bind = || {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        socket.set_read_timeout(Some(DEADLINE)).unwrap();
        socket
    };
    let relay = Relay::unrouted(2);
    let (a, b) = (bind(), bind());
    a.send_to(b"early", relay.addr_of(0, 1)).unwrap();
    let dropped = LinkCounts {
        forwarded: 0,
        dropped: 1,
    };
    assert!(
        wait_until(DEADLINE, || relay.counts(0, 1) == dropped),
        "{:?}",
        relay.counts(0, 1)
    );

    relay.retarget(1, b.local_addr().unwrap());
    a.send_to(b"routed", relay.addr_of(0, 1)).unwrap();
    let mut buf = [0u8; 16];
    let (len, _) = b.recv_from(&mut buf).unwrap();
    assert_eq!(
        &buf[..len],
        b"routed",
        "the early datagram was dropped, not queued"
    );
}

#[tokio::test]
async fn a_cut_times_out_the_connection_and_new_ones_until_healed() {
    let cfg = configs(Duration::from_secs(1), Duration::from_millis(200));
    let (a, b) = (node("a", &cfg), node("b", &cfg));
    let relay = Relay::start(&[addr(&a), addr(&b)]);
    let conn = connect(&a, relay.addr_of(0, 1)).await.unwrap();
    assert_eq!(exchange(&conn, "before").await, "b:before");

    relay.cut(0, 1);
    assert!(
        relay.is_cut(0, 1) && relay.is_cut(1, 0),
        "a cut is both ways"
    );
    let cut_at = Instant::now();
    // The live connection dies of its idle timeout and a new one cannot be made: both
    // watched at once, each within the deadline.
    let (closed, fresh, from_b) = tokio::join!(
        tokio::time::timeout(DEADLINE, conn.closed()),
        connect(&a, relay.addr_of(0, 1)),
        connect(&b, relay.addr_of(1, 0)),
    );
    let closed = closed.expect("the cut connection closes within the deadline");
    assert!(matches!(closed, ConnectionError::TimedOut), "{closed:?}");
    assert!(
        matches!(fresh, Err(ConnectionError::TimedOut)),
        "a connection through a cut link must not come up: {:?}",
        fresh.map(|c| c.remote_address())
    );
    println!("cut noticed after {:?}", cut_at.elapsed());
    let during = relay.counts(0, 1);
    assert!(
        during.dropped > 0,
        "keep-alives and handshakes dropped: {during:?}"
    );
    // Both directions are cut, including the way b would dial a.
    assert!(matches!(from_b, Err(ConnectionError::TimedOut)));
    assert!(relay.counts(1, 0).dropped > 0);
    // Link 1->0 carried nothing before the cut, so any datagram forwarded passed the cut.
    assert_eq!(relay.counts(1, 0).forwarded, 0, "nothing passes a cut");

    relay.heal(0, 1);
    assert!(!relay.is_cut(0, 1) && !relay.is_cut(1, 0));
    let conn = connect(&a, relay.addr_of(0, 1)).await.unwrap();
    assert_eq!(exchange(&conn, "after").await, "b:after");
    assert!(relay.counts(0, 1).forwarded > during.forwarded);
}

#[tokio::test]
async fn a_flap_alternates_drops_and_ends_by_itself() {
    // Down phases (150 ms) far shorter than the idle timeout: the connection must live
    // through the flap, as a Raft peer connection lives through short losses.
    let cfg = configs(Duration::from_secs(3), Duration::from_millis(50));
    let (a, b) = (node("a", &cfg), node("b", &cfg));
    let relay = Relay::start(&[addr(&a), addr(&b)]);
    let conn = connect(&a, relay.addr_of(0, 1)).await.unwrap();
    assert_eq!(exchange(&conn, "before").await, "b:before");
    let before = relay.counts(0, 1);

    let until = Instant::now() + Duration::from_millis(1200);
    relay.flap(0, 1, Duration::from_millis(150), until);
    let (mut cut_seen, mut up_seen) = (0, 0);
    // Sample the link (and keep streams going) until the flap's end: a bounded loop.
    while Instant::now() < until {
        if relay.is_cut(0, 1) {
            cut_seen += 1;
        } else {
            up_seen += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        cut_seen > 0 && up_seen > 0,
        "cut {cut_seen}, up {up_seen} samples"
    );
    assert!(
        !relay.is_cut(0, 1) && !relay.is_cut(1, 0),
        "up again at `until`"
    );
    let after = relay.counts(0, 1);
    assert!(
        after.dropped > before.dropped && after.forwarded > before.forwarded,
        "a flap both drops and forwards: {before:?} -> {after:?}"
    );

    // It stays up with no further call: the old connection still works, a new one comes
    // up, and nothing more is dropped.
    assert_eq!(exchange(&conn, "through").await, "b:through");
    let fresh = connect(&a, relay.addr_of(0, 1)).await.unwrap();
    assert_eq!(exchange(&fresh, "new").await, "b:new");
    assert_eq!(relay.counts(0, 1).dropped, after.dropped);
}

#[tokio::test]
async fn isolate_cuts_one_node_from_all_and_heal_all_restores_it() {
    let cfg = configs(Duration::from_secs(1), Duration::from_millis(100));
    let nodes = [node("n0", &cfg), node("n1", &cfg), node("n2", &cfg)];
    let relay = Relay::start(&nodes.iter().map(addr).collect::<Vec<_>>());
    relay.isolate(0);
    for (from, to, cut) in [(0, 1, true), (1, 0, true), (0, 2, true), (2, 0, true)] {
        assert_eq!(relay.is_cut(from, to), cut, "{from}->{to}");
    }
    assert!(
        !relay.is_cut(1, 2) && !relay.is_cut(2, 1),
        "the majority stays connected"
    );

    let dial = |from: usize, to: usize| connect(&nodes[from], relay.addr_of(from, to));
    let (r01, r10, r20, r12) = tokio::join!(dial(0, 1), dial(1, 0), dial(2, 0), dial(1, 2));
    for (name, r) in [("0->1", r01), ("1->0", r10), ("2->0", r20)] {
        assert!(
            matches!(r, Err(ConnectionError::TimedOut)),
            "{name} through an isolated node's link"
        );
    }
    assert_eq!(exchange(&r12.unwrap(), "majority").await, "n2:majority");

    relay.heal_all();
    let (r01, r20) = tokio::join!(dial(0, 1), dial(2, 0));
    assert_eq!(exchange(&r01.unwrap(), "back").await, "n1:back");
    assert_eq!(exchange(&r20.unwrap(), "back").await, "n0:back");
}

#[tokio::test]
async fn a_link_follows_nodes_restarted_on_other_ports() {
    let cfg = configs(Duration::from_secs(5), Duration::from_millis(500));
    let (a, b) = (node("a", &cfg), node("b", &cfg));
    let relay = Relay::start(&[addr(&a), addr(&b)]);
    let front = relay.addr_of(0, 1);
    assert_eq!(
        exchange(&connect(&a, front).await.unwrap(), "x").await,
        "b:x"
    );

    let b2 = node("b2", &cfg);
    relay.retarget(1, addr(&b2));
    assert_eq!(relay.addr_of(0, 1), front, "the peer address a uses stays");
    assert_eq!(
        exchange(&connect(&a, front).await.unwrap(), "y").await,
        "b2:y"
    );

    // Node 0 restarted on another port dials the same peer address: the replies follow
    // it (the link answers the last source it saw).
    let a2 = node("a2", &cfg);
    let conn = connect(&a2, front).await.unwrap();
    assert_eq!(exchange(&conn, "z").await, "b2:z");
}

#[test]
fn dropping_the_relay_stops_its_threads_and_closes_its_sockets() {
    let real: Vec<SocketAddr> = (0..3)
        .map(|_| {
            UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
                .unwrap()
                .local_addr()
                .unwrap()
        })
        .collect();
    let relay = Relay::start(&real);
    let fronts: Vec<SocketAddr> = (0..3)
        .flat_map(|i| relay.peer_addrs(i))
        .map(|(_, a)| a)
        .collect();
    assert_eq!(fronts.len(), 6);
    let started = Instant::now();
    drop(relay);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "drop took {:?}",
        started.elapsed()
    );
    // Each link thread holds its sockets: a port is free again only once every thread
    // of its link has ended.
    for front in fronts {
        UdpSocket::bind(front).unwrap_or_else(|e| panic!("{front} still held after drop: {e}"));
    }
}
