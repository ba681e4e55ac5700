//! A fault-injecting UDP relay between the nodes of a cluster, for partition tests.
//!
//! The nodes of a three-server site talk Raft over QUIC on UDP. A partition test puts a
//! [`Relay`] between them so that it can cut, restore and flap the links while the real
//! `tallyd` processes run, without network namespaces or root:
//!
//! 1. Start the relay: `Relay::unrouted(3)` when the nodes will listen on ports the
//!    kernel picks (`--listen 127.0.0.1:0`), or `Relay::start(&real)` when each node's
//!    real address `real[i]` is known beforehand.
//! 2. Configure node `i` with the peer address `relay.addr_of(i, j)` for every other node
//!    `j` (`relay.peer_addrs(i)` lists them): node `i` then reaches `j` only through the
//!    link `i -> j`, and `j` reaches `i` only through the link `j -> i`. Clients still
//!    talk to each node's real address, so a partition cuts servers from each other, not
//!    clients from servers.
//! 3. Start the nodes; with `unrouted`, tell the relay where each one listens
//!    (`relay.retarget(i, daemon.addr)`, the address its banner printed): until then the
//!    links to node `i` drop what they get, as an unreachable peer would. Then
//!    [`Relay::cut`] / [`Relay::heal`] a pair, [`Relay::isolate`]
//!    a node (the leader, a minority), [`Relay::flap`] a pair until a deadline, and
//!    [`Relay::heal_all`] at the end; [`Relay::counts`] says what each link carried and
//!    dropped, which shows that a partition really happened.
//! 4. A node restarted or replaced on another port is reached again after
//!    [`Relay::retarget`]; a node that dials from a new port gets the replies there.
//!
//! ```
//! use std::net::UdpSocket;
//! use std::time::{Duration, Instant};
//! use tally_tests::relay::Relay;
//!
//! let relay = Relay::unrouted(3);
//! // Node i's peer list: node j at relay.addr_of(i, j).
//! let peers_of_0 = relay.peer_addrs(0);
//! assert_eq!(peers_of_0.iter().map(|&(j, _)| j).collect::<Vec<_>>(), [1, 2]);
//! // Each node started (here a bare socket stands for tallyd on its UDP port):
//! let nodes: Vec<UdpSocket> = (0..3).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
//! for (i, node) in nodes.iter().enumerate() {
//!     relay.retarget(i, node.local_addr().unwrap());
//! }
//! relay.isolate(0); // the leader, say
//! assert!(relay.is_cut(0, 1) && relay.is_cut(2, 0) && !relay.is_cut(1, 2));
//! relay.heal_all();
//! relay.flap(1, 2, Duration::from_millis(200), Instant::now() + Duration::from_secs(5));
//! // ... assert no split brain, no over-grant; relay.counts(i, j) shows the drops.
//! ```
//!
//! How a link works: link `i -> j` owns a front socket (`addr_of(i, j)`, which node `i`
//! dials as `j`) and an upstream socket. A datagram arriving on the front socket is sent
//! from the upstream socket to `j`'s real address; a datagram `j` sends back to the
//! upstream socket goes out of the front socket to the last source address seen on it
//! (node `i`'s UDP port). Node `j` therefore sees node `i` at the upstream socket's
//! address; the cluster's peers authenticate each other by key (mutual TLS), not by
//! address, so that is enough. Each link runs two threads, one per direction; a
//! datagram is received into one 64 KiB buffer and sent (or dropped) before the next is
//! read, so nothing is queued beyond the kernel's socket buffers. Dropping the relay
//! stops and joins every thread and closes every socket.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The largest UDP payload; one buffer of this size per direction of a link.
const MAX_DATAGRAM: usize = 64 * 1024;

/// How long a link thread blocks in `recv` before it looks at the stop flag: the upper
/// bound of how long dropping a [`Relay`] takes.
const POLL: Duration = Duration::from_millis(20);

/// What a link does with datagrams at a given moment.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Forwarded.
    Up,
    /// Dropped.
    Down,
    /// Dropped in the first `period` after `start`, forwarded in the next, and so on;
    /// forwarded from `until` on. Computed from the clock at each datagram, so a flap
    /// needs no thread of its own and ends by itself.
    Flap {
        start: Instant,
        period: Duration,
        until: Instant,
    },
}

impl Mode {
    /// Whether a datagram passes at `now`.
    fn passes(self, now: Instant) -> bool {
        match self {
            Mode::Up => true,
            Mode::Down => false,
            Mode::Flap {
                start,
                period,
                until,
            } => {
                if now >= until {
                    return true;
                }
                let phase = now.saturating_duration_since(start).as_nanos() / period.as_nanos();
                phase % 2 == 1
            }
        }
    }
}

/// Datagrams one link carried and dropped, both directions together (node `i` to node
/// `j` and `j`'s replies back to `i`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCounts {
    /// Datagrams passed on (either direction).
    pub forwarded: u64,
    /// Datagrams dropped because the link was cut (or flapping and down), node `j`'s
    /// address was not known yet ([`Relay::unrouted`]), or a send failed.
    pub dropped: u64,
}

/// One ordered link `from -> to`.
struct Link {
    /// The socket node `from` dials as node `to`.
    front: UdpSocket,
    /// The socket the link sends to node `to` from.
    upstream: UdpSocket,
    /// Node `to`'s real address (set and changed by [`Relay::retarget`]); `None`: not
    /// known yet, datagrams for it are dropped.
    target: Mutex<Option<SocketAddr>>,
    /// The last source address seen on `front`: where replies go.
    client: Mutex<Option<SocketAddr>>,
    mode: Mutex<Mode>,
    forwarded: AtomicU64,
    dropped: AtomicU64,
}

/// Locks `m`; a panic in another holder (a test assertion) leaves plain data behind, so
/// poisoning is ignored rather than spread to every link thread.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Link {
    fn passes(&self) -> bool {
        lock(&self.mode).passes(Instant::now())
    }

    fn count(&self, sent: bool) {
        let counter = if sent { &self.forwarded } else { &self.dropped };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Node `from` -> node `to`, until `stop`.
    fn pump_out(&self, stop: &AtomicBool) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        while !stop.load(Ordering::Relaxed) {
            // Timeouts (the stop check) and transient errors alike: read again.
            let Ok((len, source)) = self.front.recv_from(&mut buf) else {
                continue;
            };
            *lock(&self.client) = Some(source);
            let target = *lock(&self.target);
            let sent = match target {
                Some(target) => self.passes() && self.upstream.send_to(&buf[..len], target).is_ok(),
                None => false,
            };
            self.count(sent);
        }
    }

    /// Node `to`'s replies -> node `from`, until `stop`.
    fn pump_back(&self, stop: &AtomicBool) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        while !stop.load(Ordering::Relaxed) {
            let Ok((len, source)) = self.upstream.recv_from(&mut buf) else {
                continue;
            };
            // Only the node this link leads to may answer through it (not a node that
            // used to listen on a port since retargeted, not a stray sender).
            if Some(source) != *lock(&self.target) {
                continue;
            }
            let client = *lock(&self.client);
            let sent = match client {
                Some(client) => self.passes() && self.front.send_to(&buf[..len], client).is_ok(),
                None => false,
            };
            self.count(sent);
        }
    }
}

/// A UDP relay with one link per ordered pair of nodes; see the [module doc](self) for
/// how a partition test uses it. Dropping it stops every link.
pub struct Relay {
    /// Number of nodes.
    n: usize,
    /// Link `i -> j` at `i * n + j`; `None` on the diagonal.
    links: Vec<Option<Arc<Link>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn bind_loopback() -> UdpSocket {
    let socket =
        UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("relay: bind a loopback UDP socket");
    socket
        .set_read_timeout(Some(POLL))
        .expect("relay: set the socket's read timeout");
    socket
}

impl Relay {
    /// Starts a relay between the nodes whose real addresses are `real` (node `i` at
    /// `real[i]`), every link up. Panics if a loopback socket cannot be bound (a test
    /// cannot go on without its relay).
    pub fn start(real: &[SocketAddr]) -> Relay {
        let relay = Relay::unrouted(real.len());
        for (node, &addr) in real.iter().enumerate() {
            relay.retarget(node, addr);
        }
        relay
    }

    /// Starts a relay between `n` nodes whose addresses are not known yet (nodes that
    /// will listen on a port the kernel picks), every link up: what a link gets for node
    /// `j` is dropped (and counted) until [`Relay::retarget`]`(j, addr)`. Panics as
    /// [`Relay::start`] does.
    pub fn unrouted(n: usize) -> Relay {
        let stop = Arc::new(AtomicBool::new(false));
        let mut links = Vec::with_capacity(n * n);
        let mut threads = Vec::with_capacity(2 * n * n);
        for from in 0..n {
            for to in 0..n {
                if from == to {
                    links.push(None);
                    continue;
                }
                let link = Arc::new(Link {
                    front: bind_loopback(),
                    upstream: bind_loopback(),
                    target: Mutex::new(None),
                    client: Mutex::new(None),
                    mode: Mutex::new(Mode::Up),
                    forwarded: AtomicU64::new(0),
                    dropped: AtomicU64::new(0),
                });
                for out in [true, false] {
                    let (link, stop) = (Arc::clone(&link), Arc::clone(&stop));
                    let direction = if out { "out" } else { "back" };
                    let thread = std::thread::Builder::new()
                        .name(format!("relay {from}->{to} {direction}"))
                        .spawn(move || {
                            if out {
                                link.pump_out(&stop)
                            } else {
                                link.pump_back(&stop)
                            }
                        })
                        .expect("relay: spawn a link thread");
                    threads.push(thread);
                }
                links.push(Some(link));
            }
        }
        Relay {
            n,
            links,
            stop,
            threads,
        }
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.n
    }

    fn link(&self, from: usize, to: usize) -> &Link {
        assert!(
            from < self.n && to < self.n && from != to,
            "relay: no link {from} -> {to} among {} nodes",
            self.n
        );
        self.links[from * self.n + to]
            .as_deref()
            .expect("relay: every off-diagonal link exists")
    }

    /// The address node `from` must use for node `to` (the front socket of link
    /// `from -> to`).
    pub fn addr_of(&self, from: usize, to: usize) -> SocketAddr {
        self.link(from, to)
            .front
            .local_addr()
            .expect("relay: a bound socket has an address")
    }

    /// Every other node `j` with the address node `from` must use for it: what node
    /// `from`'s peer list is configured with.
    pub fn peer_addrs(&self, from: usize) -> Vec<(usize, SocketAddr)> {
        (0..self.n)
            .filter(|&to| to != from)
            .map(|to| (to, self.addr_of(from, to)))
            .collect()
    }

    /// Points every link to node `node` at `addr`: the node's first address (after
    /// [`Relay::unrouted`]) or its new one (restarted or replaced on another port). The
    /// addresses the other nodes use for it do not change.
    pub fn retarget(&self, node: usize, addr: SocketAddr) {
        for from in (0..self.n).filter(|&from| from != node) {
            *lock(&self.link(from, node).target) = Some(addr);
        }
    }

    fn set(&self, a: usize, b: usize, mode: Mode) {
        *lock(&self.link(a, b).mode) = mode;
        *lock(&self.link(b, a).mode) = mode;
    }

    /// Cuts nodes `a` and `b` apart: both links between them drop every datagram, either
    /// way. Ends a flap of the pair.
    pub fn cut(&self, a: usize, b: usize) {
        self.set(a, b, Mode::Down);
    }

    /// Restores both links between `a` and `b`. Ends a flap of the pair.
    pub fn heal(&self, a: usize, b: usize) {
        self.set(a, b, Mode::Up);
    }

    /// Cuts node `node` from every other node.
    pub fn isolate(&self, node: usize) {
        for other in (0..self.n).filter(|&other| other != node) {
            self.cut(node, other);
        }
    }

    /// Restores every link (and ends every flap).
    pub fn heal_all(&self) {
        for a in 0..self.n {
            for b in (a + 1)..self.n {
                self.heal(a, b);
            }
        }
    }

    /// Flaps both links between `a` and `b` from now: cut for `period`, up for `period`,
    /// and so on until `until`, from when they stay up. Needs no further call; `cut`,
    /// `heal` or `heal_all` of the pair ends it early. Panics on a zero `period`.
    pub fn flap(&self, a: usize, b: usize, period: Duration, until: Instant) {
        assert!(!period.is_zero(), "relay: a flap needs a non-zero period");
        self.set(
            a,
            b,
            Mode::Flap {
                start: Instant::now(),
                period,
                until,
            },
        );
    }

    /// Whether the link `from -> to` drops datagrams now (cut, or flapping and down).
    pub fn is_cut(&self, from: usize, to: usize) -> bool {
        !self.link(from, to).passes()
    }

    /// What link `from -> to` has carried and dropped so far.
    pub fn counts(&self, from: usize, to: usize) -> LinkCounts {
        let link = self.link(from, to);
        LinkCounts {
            forwarded: link.forwarded.load(Ordering::Relaxed),
            dropped: link.dropped.load(Ordering::Relaxed),
        }
    }

    /// The sum of [`Relay::counts`] over every link.
    pub fn total(&self) -> LinkCounts {
        self.links
            .iter()
            .flatten()
            .fold(LinkCounts::default(), |sum, link| LinkCounts {
                forwarded: sum.forwarded + link.forwarded.load(Ordering::Relaxed),
                dropped: sum.dropped + link.dropped.load(Ordering::Relaxed),
            })
    }
}

impl Drop for Relay {
    /// Stops every link thread and waits for it (each notices within 20 ms), so no
    /// thread outlives the relay and every socket is closed when this returns.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            // A link thread does not panic on its own; if one did, the test already failed.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flap starts cut, alternates every period, and is up from `until` on: checked on
    /// made-up instants, so the phases are exact.
    #[test]
    fn a_flap_alternates_from_cut_and_ends_up() {
        let start = Instant::now();
        let period = Duration::from_millis(100);
        let until = start + Duration::from_millis(450);
        let mode = Mode::Flap {
            start,
            period,
            until,
        };
        let at = |ms| mode.passes(start + Duration::from_millis(ms));
        assert!(!at(0) && !at(99), "first period cut");
        assert!(at(100) && at(199), "second period up");
        assert!(!at(200) && !at(299) && at(300) && !at(400) && !at(449));
        assert!(at(450) && at(10_000), "up from `until` on, for good");
        assert!(Mode::Up.passes(start) && !Mode::Down.passes(start));
    }
}
