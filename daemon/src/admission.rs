//! Who may connect and how fast they may ask for seats: the limits that keep a flood,
//! a buggy client in a loop or a hostile one from starving everybody else.
//!
//! - Connections: at most `max_connections` in all and `max_connections_per_address`
//!   from one IP address; beyond, new ones are refused (QUIC CONNECTION_REFUSED) and the
//!   client library retries with backoff. Held leases never depend on a new connection
//!   being accepted quickly: a lease lives for its TTL.
//! - Handshakes: past a few dozen in progress, a new one must first prove its source
//!   address with a stateless QUIC retry (a spoofed flood then costs one packet each);
//!   past a hard cap, new ones are refused. The cap is shared fairly: one address may
//!   hold at most an eighth of it in progress, one network (its /24 for IPv4, /64 for
//!   IPv6) at most half, so a source that opens handshakes and goes silent (they
//!   last until the idle timeout) cannot shut the rest of the network out. Past its
//!   share, a source's unproven attempt is asked to retry and a proven one refused.
//! - Checkouts: a token bucket per IP address. Heartbeats and checkins are never
//!   limited: they are what keeps held seats alive.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The limits, from the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Most connections at once.
    pub max_connections: usize,
    /// Most connections at once from one IP address.
    pub max_connections_per_address: usize,
    /// Checkouts per second per address, on average; 0: no limit.
    pub checkout_rate: u32,
    /// Checkouts per address in a burst.
    pub checkout_burst: u32,
    /// Handshakes in progress before new ones must validate their address.
    pub handshakes_before_retry: usize,
    /// Handshakes in progress beyond which new ones are refused.
    pub max_handshakes: usize,
    /// Handshakes in progress one IP address may hold (a share of `max_handshakes`).
    pub max_handshakes_per_address: usize,
    /// Handshakes in progress one network (/24 for IPv4, /64 for IPv6) may hold.
    pub max_handshakes_per_network: usize,
    /// Host names the HTTP endpoint answers to besides IP literals, `localhost` and
    /// this machine's name (`http_hosts` in the config).
    pub http_hosts: Vec<String>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: tally_config::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: tally_config::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            checkout_rate: tally_config::DEFAULT_CHECKOUT_RATE,
            checkout_burst: tally_config::DEFAULT_CHECKOUT_BURST,
            handshakes_before_retry: 64,
            max_handshakes: 1024,
            max_handshakes_per_address: 128,
            max_handshakes_per_network: 512,
            http_hosts: Vec::new(),
        }
    }
}

impl Limits {
    /// The limits a configuration sets.
    pub fn from_config(config: &tally_config::DaemonConfig) -> Limits {
        Limits {
            max_connections: config.max_connections,
            max_connections_per_address: config.max_connections_per_address,
            checkout_rate: config.checkout_rate,
            checkout_burst: config.checkout_burst,
            http_hosts: config.http_hosts.clone(),
            ..Limits::default()
        }
    }
}

/// What to do with a new connection attempt.
#[derive(Debug)]
pub enum Verdict {
    /// Serve it; the permit counts it until dropped.
    Accept(Permit),
    /// Ask the client to prove its address first (stateless retry).
    Retry,
    /// Refuse it, for the reason given (logged at debug level, counted in metrics).
    Refuse(&'static str),
}

/// Connection and handshake counts.
#[derive(Debug, Default)]
struct Counts {
    connections: usize,
    handshakes: usize,
    per_address: HashMap<IpAddr, usize>,
    /// Handshakes in progress by address and by network ([`network`]); entries go
    /// when they reach zero, so a flood of sources leaves nothing behind.
    handshakes_by_address: HashMap<IpAddr, usize>,
    handshakes_by_network: HashMap<IpAddr, usize>,
}

/// The network an address belongs to for handshake fairness: its /24 (IPv4, also
/// IPv4-mapped IPv6) or its /64 (IPv6), where one party usually holds all addresses.
pub fn network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(std::net::Ipv4Addr::from(u32::from(v4) & 0xffff_ff00)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => network(IpAddr::V4(v4)),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
    }
}

/// Adds `n` (+1 or -1) to `key`'s count, removing it at zero.
fn bump(map: &mut HashMap<IpAddr, usize>, key: IpAddr, up: bool) {
    if up {
        *map.entry(key).or_default() += 1;
    } else if let Some(n) = map.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            map.remove(&key);
        }
    }
}

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets kept before idle (full) ones are dropped.
const MAX_BUCKETS: usize = 4096;

/// The admission state shared by the accept loop and the connection tasks.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    counts: Mutex<Counts>,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl Admission {
    /// Admission under `limits`.
    pub fn new(limits: Limits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            counts: Mutex::new(Counts::default()),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Decides on a connection attempt from `ip`; `validated` says whether its address
    /// is proven (it answered a retry), `may_retry` whether a retry can still be asked.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, validated: bool, may_retry: bool) -> Verdict {
        let mut c = self.counts.lock().expect("admission lock");
        if c.connections >= self.limits.max_connections {
            return Verdict::Refuse("the server has its maximum number of connections");
        }
        if c.per_address.get(&ip).copied().unwrap_or(0) >= self.limits.max_connections_per_address {
            return Verdict::Refuse("this address has its maximum number of connections");
        }
        if c.handshakes >= self.limits.max_handshakes {
            return Verdict::Refuse("too many handshakes in progress");
        }
        let net = network(ip);
        let over_share = c.handshakes_by_address.get(&ip).copied().unwrap_or(0)
            >= self.limits.max_handshakes_per_address
            || c.handshakes_by_network.get(&net).copied().unwrap_or(0)
                >= self.limits.max_handshakes_per_network;
        if over_share {
            // A retry costs one stateless packet; only a proven source is refused.
            if !validated && may_retry {
                return Verdict::Retry;
            }
            return Verdict::Refuse("this source has its share of the handshakes in progress");
        }
        if c.handshakes >= self.limits.handshakes_before_retry && !validated && may_retry {
            return Verdict::Retry;
        }
        c.connections += 1;
        c.handshakes += 1;
        *c.per_address.entry(ip).or_default() += 1;
        bump(&mut c.handshakes_by_address, ip, true);
        bump(&mut c.handshakes_by_network, net, true);
        Verdict::Accept(Permit {
            admission: self.clone(),
            ip,
            handshaking: true,
        })
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.counts.lock().expect("admission lock").connections
    }

    /// Takes one checkout from `ip`'s bucket; `Err(wait)` when it is empty.
    pub fn checkout(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let rate = f64::from(self.limits.checkout_rate);
        if rate == 0.0 {
            return Ok(());
        }
        let burst = f64::from(self.limits.checkout_burst.max(1));
        let mut buckets = self.buckets.lock().expect("admission lock");
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&ip) {
            // Full buckets carry no state worth keeping.
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
        }
        let bucket = buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }
}

/// Counts one admitted connection until dropped.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    ip: IpAddr,
    handshaking: bool,
}

impl Permit {
    /// The handshake finished (either way): it no longer counts as in progress.
    pub fn handshake_done(&mut self) {
        if std::mem::replace(&mut self.handshaking, false) {
            let mut c = self.admission.counts.lock().expect("admission lock");
            c.handshakes -= 1;
            bump(&mut c.handshakes_by_address, self.ip, false);
            bump(&mut c.handshakes_by_network, network(self.ip), false);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.handshake_done();
        let mut c = self.admission.counts.lock().expect("admission lock");
        c.connections -= 1;
        if let Some(n) = c.per_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_address.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn connection_limits_count_until_the_permit_drops() {
        let a = Admission::new(Limits {
            max_connections: 3,
            max_connections_per_address: 2,
            handshakes_before_retry: 100,
            max_handshakes: 100,
            ..Limits::default()
        });
        let p1 = match a.admit(ip(1), true, false) {
            Verdict::Accept(p) => p,
            v => panic!("{v:?}"),
        };
        let _p2 = a.admit(ip(1), true, false);
        assert!(matches!(a.admit(ip(1), true, false), Verdict::Refuse(r) if r.contains("address")));
        let _p3 = a.admit(ip(2), true, false);
        assert!(matches!(a.admit(ip(3), true, false), Verdict::Refuse(r) if r.contains("server")));
        drop(p1);
        assert_eq!(a.connections(), 2);
        assert!(matches!(a.admit(ip(1), true, false), Verdict::Accept(_)));
    }

    #[test]
    fn handshakes_past_the_threshold_must_validate_and_past_the_cap_are_refused() {
        let a = Admission::new(Limits {
            handshakes_before_retry: 1,
            max_handshakes: 2,
            ..Limits::default()
        });
        let mut first = match a.admit(ip(1), false, true) {
            Verdict::Accept(p) => p,
            v => panic!("{v:?}"),
        };
        assert!(matches!(a.admit(ip(2), false, true), Verdict::Retry));
        let _second = a.admit(ip(2), true, false);
        assert!(matches!(a.admit(ip(3), true, false), Verdict::Refuse(_)));
        first.handshake_done();
        assert!(matches!(a.admit(ip(3), true, false), Verdict::Accept(_)));
    }

    #[test]
    fn one_source_holds_only_its_share_of_the_handshakes_in_progress() {
        let a = Admission::new(Limits {
            handshakes_before_retry: 1_000,
            max_handshakes: 1_000,
            max_handshakes_per_address: 2,
            max_handshakes_per_network: 3,
            ..Limits::default()
        });
        let accept = |ip: IpAddr| match a.admit(ip, true, false) {
            Verdict::Accept(p) => p,
            v => panic!("{ip}: {v:?}"),
        };
        let mut first = accept(ip(2));
        let _second = accept(ip(2));
        // The address is at its share: unproven attempts retry, proven ones are refused.
        assert!(matches!(a.admit(ip(2), false, true), Verdict::Retry));
        assert!(matches!(a.admit(ip(2), true, false), Verdict::Refuse(r) if r.contains("share")));
        // Its /24 has room for one more, from another address; then it is full too.
        let _third = accept(ip(1));
        assert!(matches!(a.admit(ip(1), true, false), Verdict::Refuse(_)));
        // Other networks are not affected.
        let _other = accept(IpAddr::from([10, 0, 0, 1]));
        // A finished handshake gives its place back.
        first.handshake_done();
        let _again = accept(ip(2));
        // IPv6: the /64 is the network.
        let v6 = |last: u16| IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, last]);
        let _v1 = accept(v6(1));
        let _v2 = accept(v6(2));
        let _v3 = accept(v6(3));
        assert!(matches!(a.admit(v6(4), true, false), Verdict::Refuse(_)));
        assert!(matches!(
            a.admit(IpAddr::from([0x2001, 0xdb8, 0, 2, 0, 0, 0, 1]), true, false),
            Verdict::Accept(_)
        ));
        assert_eq!(network(v6(9)), network(v6(1)));
        assert_eq!(
            network("::ffff:192.0.2.7".parse().unwrap()),
            IpAddr::from([192, 0, 2, 0])
        );
    }

    #[test]
    fn checkout_buckets_refill_at_the_rate_and_cap_at_the_burst() {
        let a = Admission::new(Limits {
            checkout_rate: 10,
            checkout_burst: 3,
            ..Limits::default()
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(a.checkout(ip(1), t0).is_ok());
        }
        let wait = a.checkout(ip(1), t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        // Another address has its own bucket.
        assert!(a.checkout(ip(2), t0).is_ok());
        // 100 ms later, one token is back; a long pause refills to the burst only.
        assert!(a.checkout(ip(1), t0 + Duration::from_millis(100)).is_ok());
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(a.checkout(ip(1), later).is_ok());
        }
        assert!(a.checkout(ip(1), later).is_err());
    }

    #[test]
    fn a_zero_rate_means_no_limit() {
        let a = Admission::new(Limits {
            checkout_rate: 0,
            ..Limits::default()
        });
        let t0 = Instant::now();
        assert!((0..10_000).all(|_| a.checkout(ip(1), t0).is_ok()));
    }
}
