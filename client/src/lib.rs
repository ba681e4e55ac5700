//! The tally client library.
//!
//! [`Session::connect`] tries the configured servers in order (like a FlexLM license
//! search path), checks each server's trust chain (see [`trust`]) and introduces the
//! client. A session then checks seats out, heartbeats, checks them in and reads status.
//! Every call has a deadline: a license server that does not answer never hangs the
//! application.
//!
//! Most applications use [`Client`] (or [`blocking::Client`], or the C ABI in [`ffi`]):
//! it checks out leases that heartbeat in the background, reconnects and re-attaches
//! them after a network blip or a server restart, checks them in when dropped, and
//! honours borrowed leases from the per-user [`cache`] when no server is reachable.
//!
//! Logging: the library logs its steps with `tracing` (targets `tally_client::*`) at
//! debug level. A Rust program shows them with its own subscriber (for a `TALLY_LOG`
//! value, [`log_directive`] gives the `EnvFilter` directive the `tally` command uses); a
//! C program sets `TALLY_LOG` and the C ABI logs to stderr ([`logging`]).

// Unsafe code lives only in `ffi`, the C ABI, where raw pointers cross the boundary.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod blocking;
pub mod cache;
mod client;
pub mod doctor;
pub mod ffi;
pub mod grace;
pub mod info;
pub mod logging;
pub mod observe;
pub mod trust;

pub use client::{Client, LeaseHandle, LeaseStatus, Want};
pub use info::FeatureInfo;
// The types an application meets in this API, so that it need not depend on
// `tally-protocol` itself (which stays reachable as `tally_client::protocol`).
use quinn::crypto::rustls::QuicClientConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
pub use tally_protocol as protocol;
use tally_protocol::bundle::VerifiedBundle;
use tally_protocol::frame::{self, HEADER_LEN, MAX_RESPONSE_LEN};
pub use tally_protocol::keys::KeyError;
pub use tally_protocol::keys::PublicKey;
pub use tally_protocol::lease::LeaseId;
use tally_protocol::observed::ClientFacts;
use tally_protocol::signed::Domain;
pub use tally_protocol::time::UnixTime;
use tally_protocol::wire::*;
pub use tally_protocol::wire::{ClientIdentity, Denial, DenialReason, StatusReply};
pub use trust::Trust;

/// Default time allowed to reach a server, complete the handshake and say hello.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time allowed for one request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an abandoned checkout's reply is still read for, so that a grant in flight
/// is checked in rather than lost (see `UnreadReply`).
const SALVAGE_WINDOW: Duration = Duration::from_secs(1);
/// Default [`ClientConfig::checkin_grace`]: a restart of tallyd takes about a second.
pub const DEFAULT_CHECKIN_GRACE: Duration = Duration::from_secs(10);
/// Keep-alive interval; must stay below the server's idle timeout (15 s by default,
/// 5 s at the least) so an idle but healthy client is never dropped.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);

/// How to reach and whom to trust.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Servers as `host:port` (port 27300 when omitted), tried in order.
    pub servers: Vec<String>,
    /// The vendor keys to trust.
    pub trust: Trust,
    /// Who this client is.
    pub identity: ClientIdentity,
    /// Deadline for connecting to one server.
    pub connect_timeout: Duration,
    /// Deadline for one request.
    pub request_timeout: Duration,
    /// Local address to connect from (a multi-homed host whose licence traffic must
    /// leave by one interface); `None`: the system chooses.
    pub local_address: Option<std::net::IpAddr>,
    /// How long a checkin keeps trying while no server answers (a server restarting):
    /// [`LeaseHandle::checkin`] and [`Client::close`] wait up to this long, so the seat
    /// of a job that ends during a restart returns when the server is back instead of
    /// after its TTL. A dropped handle keeps trying in the background for as long.
    pub checkin_grace: Duration,
}

/// The environment variable naming the license servers when the application gives none
/// (`host:port` entries separated by commas), like FlexLM's `LM_LICENSE_FILE`.
pub const SERVER_ENV: &str = "TALLY_SERVER";

/// The servers named by [`SERVER_ENV`] (empty when unset or blank).
pub fn servers_from_env() -> Vec<String> {
    std::env::var(SERVER_ENV)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

impl ClientConfig {
    /// A configuration with default timeouts and this process's identity. With an empty
    /// `servers`, the servers come from `TALLY_SERVER` ([`servers_from_env`]), so a site
    /// can point every product at its servers without the product asking.
    pub fn new(servers: Vec<String>, trust: Trust) -> ClientConfig {
        let servers = if servers.is_empty() {
            servers_from_env()
        } else {
            servers
        };
        ClientConfig {
            servers,
            trust,
            identity: local_identity(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            local_address: None,
            checkin_grace: DEFAULT_CHECKIN_GRACE,
        }
    }
}

/// This process as a [`ClientIdentity`]: login name, host name, pid, program name.
pub fn local_identity() -> ClientIdentity {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(login_name_from_passwd)
        .unwrap_or_else(|| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into());
    let program = std::env::args()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let display = std::env::var("DISPLAY").ok().filter(|d| !d.is_empty());
    let clip = |mut s: String| {
        if s.len() > MAX_NAME_LEN {
            let mut end = MAX_NAME_LEN;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
        }
        s
    };
    ClientIdentity {
        user: clip(user),
        host: clip(host),
        pid: std::process::id(),
        program: clip(program),
        display: display.map(clip),
    }
}

/// The login name of this process's real uid, from `/proc/self/status` and
/// `/etc/passwd`; services and cron jobs often run without `USER` set.
fn login_name_from_passwd() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .to_string();
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        (fields.next()? == uid).then(|| name.to_string())
    })
}

/// What went wrong, in terms an application can act on.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No configured server could be reached and trusted.
    #[error("no license server available: {}", .0.join("; "))]
    NoServer(Vec<String>),
    /// The server answered but is not vouched for by a trusted vendor key.
    #[error("{0}")]
    Untrusted(String),
    /// The server refused the checkout.
    #[error("{0}")]
    Denied(Denial),
    /// The server did not answer in time.
    #[error("{} timed out after {} s", .0, .1.as_secs_f64())]
    Timeout(&'static str, Duration),
    /// The connection failed or closed.
    #[error("connection to {server} failed: {message}")]
    Connection {
        /// The server.
        server: SocketAddr,
        /// What happened.
        message: String,
    },
    /// The server answered with something that does not fit the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server could not serve the request; programs branch on its
    /// [`ServerError::code`](tally_protocol::wire::ServerError), never on the message.
    #[error("{0}")]
    Server(tally_protocol::wire::ServerError),
    /// A configuration problem on the client side.
    #[error("{0}")]
    Config(String),
    /// A borrowed seat cannot be given back while a program on this machine uses it
    /// (the server would hand it out again while the program still runs on it).
    #[error("{0}")]
    SeatInUse(String),
}

impl ClientError {
    /// True if retrying on a new connection may help.
    pub fn is_connection_loss(&self) -> bool {
        matches!(
            self,
            ClientError::Connection { .. } | ClientError::Timeout(..) | ClientError::NoServer(_)
        )
    }
}

/// A granted lease, as held by the client.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The grant as the server sent it, token included.
    pub grant: LeaseGrant,
}

impl Lease {
    /// The reference used to heartbeat and check in this lease.
    pub fn lease_ref(&self) -> LeaseRef {
        LeaseRef {
            id: self.grant.id,
            secret: self.grant.secret.clone(),
        }
    }

    /// The lease id.
    pub fn id(&self) -> LeaseId {
        self.grant.id
    }
}

/// A verified connection to one server.
pub struct Session {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    server: SocketAddr,
    server_key: PublicKey,
    hello: HelloReply,
    bundles: Vec<VerifiedBundle>,
    request_timeout: Duration,
    /// The server did not understand [`Request::ObservedCheckout`] (it is older than
    /// it): checkouts go as [`Request::Checkout`].
    plain_checkout: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("server", &self.server)
            .field("server_key", &self.server_key)
            .finish_non_exhaustive()
    }
}

/// How long [`Session::connect`] gives one address before it also tries the next.
pub const FAILOVER_STAGGER: Duration = Duration::from_millis(250);
/// How long an address that did not answer is tried after the others.
pub const DEAD_SERVER_MEMORY: Duration = Duration::from_secs(60);

/// Addresses that failed lately, with when (process-wide: every client of the process
/// profits from what one learned).
fn dead_servers(
) -> &'static std::sync::Mutex<std::collections::HashMap<SocketAddr, std::time::Instant>> {
    static DEAD: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<SocketAddr, std::time::Instant>>,
    > = std::sync::OnceLock::new();
    DEAD.get_or_init(Default::default)
}

fn mark_server(addr: SocketAddr, alive: bool) {
    let mut dead = dead_servers().lock().unwrap_or_else(|e| e.into_inner());
    if alive {
        dead.remove(&addr);
    } else {
        dead.insert(addr, std::time::Instant::now());
    }
}

/// Moves addresses that failed within [`DEAD_SERVER_MEMORY`] to the end, keeping the
/// configured order otherwise.
fn dead_servers_last(addrs: &mut [SocketAddr]) {
    let dead = dead_servers().lock().unwrap_or_else(|e| e.into_inner());
    let now = std::time::Instant::now();
    addrs.sort_by_key(|a| {
        dead.get(a)
            .is_some_and(|t| now.saturating_duration_since(*t) < DEAD_SERVER_MEMORY)
    });
}

/// Why a configured server name gave no address.
#[derive(Debug, thiserror::Error)]
enum ResolveError {
    /// The resolver failed.
    #[error("{server}: cannot resolve: {source}")]
    Lookup {
        /// The name as configured.
        server: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// The name resolved to nothing.
    #[error("{server}: no address")]
    NoAddress {
        /// The name as configured.
        server: String,
    },
}

/// Parses `host[:port]` and resolves it.
async fn resolve(server: &str) -> Result<Vec<SocketAddr>, ResolveError> {
    let with_port = if server.parse::<SocketAddr>().is_ok() || has_port(server) {
        server.to_string()
    } else {
        format!("{server}:{DEFAULT_PORT}")
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&with_port)
        .await
        .map_err(|source| ResolveError::Lookup {
            server: server.to_string(),
            source,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(ResolveError::NoAddress {
            server: server.to_string(),
        });
    }
    Ok(addrs)
}

fn has_port(server: &str) -> bool {
    // `host:port` or `[v6]:port`; a bare IPv6 address has several colons and no port.
    match server.rsplit_once(':') {
        Some((host, port)) => {
            port.parse::<u16>().is_ok() && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    }
}

/// The QUIC client configuration tally uses: TLS 1.3 with the ring provider, ALPN
/// `tally/1`, [`trust::ServerKeyVerifier`] and keep-alives. Public so that tools and
/// tests can speak raw frames over the same kind of connection.
pub fn quic_client_config() -> Result<quinn::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(trust::ServerKeyVerifier::new()))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| ClientError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// How long a member that had no leader to name is left before it is asked again.
const ELECTION_PAUSE: Duration = Duration::from_millis(500);

/// Most attempts one connect makes (the configured addresses, the leaders they name,
/// and members asked again while their cluster elects a leader: at one attempt per
/// [`FAILOVER_STAGGER`], about 16 s of asking).
const MAX_ADDRESSES: usize = 64;

impl Session {
    /// Connects to a server of `config.servers` that answers and whose trust chain
    /// holds. The servers are tried in order, but without waiting out a dead one: each
    /// further address is tried [`FAILOVER_STAGGER`] after the previous one started (at
    /// once when it failed), the attempts run side by side, and the first to succeed
    /// wins. Addresses that did not answer lately are tried after the others (see
    /// [`DEAD_SERVER_MEMORY`]), so a dead first entry costs nothing on a reconnect. A
    /// member of a cluster that does not lead refuses the session and names the leader,
    /// which is tried next. Each failure is named in [`ClientError::NoServer`].
    pub async fn connect(config: &ClientConfig) -> Result<Session, ClientError> {
        if config.servers.is_empty() {
            return Err(ClientError::Config(
                "no server given (use --server HOST:PORT or TALLY_SERVER)".into(),
            ));
        }
        let mut failures = Vec::new();
        let mut addrs = Vec::new();
        for server in &config.servers {
            match resolve(server).await {
                Ok(a) => addrs.extend(a),
                Err(e) => failures.push(e.to_string()),
            }
        }
        dead_servers_last(&mut addrs);
        tracing::debug!(servers = ?config.servers, addresses = ?addrs, "connecting");
        let mut attempts = tokio::task::JoinSet::new();
        let mut next = 0;
        // Members asked again while their cluster elects (see below), by position; the
        // addresses being asked now, and those that did not answer.
        let mut again = std::collections::HashSet::new();
        let mut pending = std::collections::HashSet::new();
        let mut unreachable = std::collections::HashSet::new();
        loop {
            if next < addrs.len() {
                let addr = addrs[next];
                tracing::debug!(%addr, "trying server");
                let config = config.clone();
                let pause = again.contains(&next).then_some(ELECTION_PAUSE);
                pending.insert(addr);
                attempts.spawn(async move {
                    if let Some(pause) = pause {
                        tokio::time::sleep(pause).await;
                    }
                    let result = tokio::time::timeout(
                        config.connect_timeout,
                        Self::connect_one(addr, &config),
                    )
                    .await;
                    (addr, result)
                });
                next += 1;
            }
            if attempts.is_empty() {
                break;
            }
            let more = next < addrs.len();
            let finished = tokio::select! {
                done = attempts.join_next() => done,
                _ = tokio::time::sleep(FAILOVER_STAGGER), if more => continue,
            };
            let Some(Ok((addr, result))) = finished else {
                continue;
            };
            pending.remove(&addr);
            if !matches!(&result, Ok(Err(ClientError::Server(_))) | Ok(Ok(_))) {
                unreachable.insert(addr);
            }
            match result {
                Ok(Ok(session)) => {
                    mark_server(addr, true);
                    tracing::debug!(server = %addr, "connected");
                    return Ok(session);
                }
                // A server that proves to be untrusted is not skipped silently: it is
                // the one thing an admin must hear about.
                Ok(Err(ClientError::Untrusted(e))) if config.servers.len() == 1 => {
                    return Err(ClientError::Untrusted(e))
                }
                // A member of a cluster that does not lead: alive, and it names the
                // leader, which is tried next (once: a hint is not followed in circles).
                Ok(Err(ClientError::Server(e))) if e.code == ErrorCode::NotLeader => {
                    tracing::debug!(server = %addr, leader = ?e.leader_hint(), "not the leader");
                    failures.push(format!("{addr}: {e}"));
                    // The leader it names, unless that one is being asked now or did
                    // not answer (a member names the leader it last heard of, which may
                    // be the one that just died); a member that answered "not the
                    // leader" before may lead by now.
                    let mut named = Vec::new();
                    if let Some(hint) = e.leader_hint() {
                        if let Ok(found) = resolve(hint).await {
                            named.extend(found.into_iter().filter(|l| {
                                !unreachable.contains(l)
                                    && !addrs[next..].contains(l)
                                    && !pending.contains(l)
                            }));
                        }
                    }
                    // This member is asked again a moment later (a bounded number of
                    // times, while the other attempts go on): an election may be
                    // running, and the leader it named may be one that just failed.
                    if addrs.len() < MAX_ADDRESSES && !addrs[next..].contains(&addr) {
                        again.insert(addrs.len());
                        addrs.push(addr);
                    }
                    for leader in named {
                        if !addrs[next..].contains(&leader) && addrs.len() < MAX_ADDRESSES {
                            addrs.insert(next, leader);
                        }
                    }
                }
                Ok(Err(e)) => {
                    mark_server(addr, false);
                    tracing::debug!(server = %addr, error = %e, "server failed");
                    failures.push(format!("{addr}: {e}"));
                }
                Err(_) => {
                    mark_server(addr, false);
                    tracing::debug!(server = %addr, "server did not answer in time");
                    failures.push(format!(
                        "{addr}: no answer within {} s",
                        config.connect_timeout.as_secs_f64()
                    ));
                }
            }
        }
        Err(ClientError::NoServer(failures))
    }

    async fn connect_one(addr: SocketAddr, config: &ClientConfig) -> Result<Session, ClientError> {
        let conn_err = |message: String| ClientError::Connection {
            server: addr,
            message,
        };
        let bind: SocketAddr = match config.local_address {
            Some(ip) => SocketAddr::new(ip, 0),
            None if addr.is_ipv6() => "[::]:0".parse().expect("literal"),
            None => "0.0.0.0:0".parse().expect("literal"),
        };
        let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| conn_err(e.to_string()))?;
        endpoint.set_default_client_config(quic_client_config()?);
        let connection = endpoint
            .connect(addr, "tally")
            .map_err(|e| conn_err(e.to_string()))?
            .await
            .map_err(|e| conn_err(e.to_string()))?;
        let server_key = connection
            .peer_identity()
            .and_then(|id| {
                id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|certs| certs.first().cloned())
            .ok_or_else(|| ClientError::Protocol("server sent no certificate".into()))
            .and_then(|cert| {
                tally_protocol::cert::ed25519_key(cert.as_ref())
                    .map_err(|e| ClientError::Protocol(e.to_string()))
            })?;
        tracing::debug!(
            server = %addr,
            key = %server_key.fingerprint(),
            "QUIC/TLS handshake done; the server proved this key"
        );
        let mut session = Session {
            endpoint,
            connection,
            server: addr,
            server_key,
            hello: HelloReply {
                server_version: String::new(),
                bundles: Vec::new(),
                server_time: tally_protocol::time::UnixTime(0),
                heartbeat_secs: 30,
                demo: false,
            },
            bundles: Vec::new(),
            request_timeout: config.request_timeout,
            plain_checkout: std::sync::atomic::AtomicBool::new(false),
        };
        let hello = match session
            .request(Request::Hello(Hello {
                client: config.identity.clone(),
            }))
            .await?
        {
            Response::Hello(h) => h,
            other => return Err(unexpected(&other)),
        };
        tracing::debug!(
            server = %addr,
            version = %hello.server_version,
            bundles = hello.bundles.len(),
            demo = hello.demo,
            "hello answered"
        );
        session.bundles =
            trust::check_server(&server_key, &hello.bundles, &config.trust).map_err(|e| {
                tracing::debug!(server = %addr, error = %e, "trust check failed");
                ClientError::Untrusted(e.to_string())
            })?;
        tracing::debug!(
            server = %addr,
            verified = session.bundles.len(),
            "trust chain holds: bundles signed by a trusted vendor key bind the server key"
        );
        session.hello = hello;
        Ok(session)
    }

    /// The server this session talks to.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The server key proven in TLS and vouched for by a bundle.
    pub fn server_key(&self) -> PublicKey {
        self.server_key
    }

    /// The keys whose lease tokens this session accepts: the server's own and, when a
    /// verified bundle binds it as a member of a cluster, every member of that cluster.
    /// A lease granted by one member stays valid when the client re-attaches through
    /// another; the vendor's signature on the bundle vouches for each member key.
    pub fn lease_signers(&self) -> Vec<PublicKey> {
        let mut keys = vec![self.server_key];
        for k in self.bundles.iter().flat_map(|b| b.bundle.bound_keys()) {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        keys
    }

    /// The server's hello: version, heartbeat interval, demo flag.
    pub fn hello(&self) -> &HelloReply {
        &self.hello
    }

    /// The verified bundles this server serves.
    pub fn bundles(&self) -> &[VerifiedBundle] {
        &self.bundles
    }

    /// How often to heartbeat, as the server asked.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(self.hello.heartbeat_secs.max(1))
    }

    /// Sends one request on its own stream and reads the response, within the deadline.
    pub async fn request(&self, request: Request) -> Result<Response, ClientError> {
        tokio::time::timeout(self.request_timeout, self.request_inner(&request))
            .await
            .map_err(|_| ClientError::Timeout("request", self.request_timeout))?
    }

    async fn request_inner(&self, request: &Request) -> Result<Response, ClientError> {
        tracing::debug!(server = %self.server, request = request_name(request), "sending");
        let mut recv = send_request(&self.connection, self.server, request).await?;
        let response = read_response(&mut recv, self.server).await;
        log_response(self.server, &response);
        response
    }

    /// A checkout whose answer is not lost if the caller stops waiting for it: see
    /// [`UnreadReply`].
    async fn checkout_exchange(&self, request: &Request) -> Result<Response, ClientError> {
        if let Request::Checkout(c)
        | Request::ObservedCheckout(ObservedCheckout { request: c, .. }) = request
        {
            tracing::debug!(
                server = %self.server,
                feature = %c.feature,
                count = c.count,
                version = ?c.version,
                wait_secs = c.wait_secs,
                borrow_secs = c.borrow_secs,
                "sending checkout"
            );
        }
        let recv = send_request(&self.connection, self.server, request).await?;
        let mut pending = UnreadReply {
            recv: Some(recv),
            connection: self.connection.clone(),
            server: self.server,
        };
        let recv = pending.recv.as_mut().expect("just set");
        let response = read_response(recv, self.server).await;
        pending.recv = None;
        log_response(self.server, &response);
        response
    }

    /// Checks out seats. A denial is [`ClientError::Denied`]. The lease token is
    /// verified against the server key before the lease is returned.
    /// What this process observes about where it runs ([`observe::facts`]: a virtual
    /// machine, a remote session) goes with it, for features whose vendor refuses those.
    pub async fn checkout(&self, request: &CheckoutRequest) -> Result<Lease, ClientError> {
        self.checkout_with(request, observe::facts()).await
    }

    /// [`Session::checkout`] reporting `facts` about where the program runs. A server
    /// older than these reports gets a plain checkout (and this session sends it plain
    /// from then on); such a server applies no rule on them.
    pub async fn checkout_with(
        &self,
        request: &CheckoutRequest,
        facts: ClientFacts,
    ) -> Result<Lease, ClientError> {
        use std::sync::atomic::Ordering;
        // A checkout that may wait in the queue gets its wait on top of the usual deadline.
        let deadline = self.request_timeout + Duration::from_secs(request.wait_secs as u64);
        let exchange = |message: Request| async move {
            tokio::time::timeout(deadline, self.checkout_exchange(&message))
                .await
                .map_err(|_| ClientError::Timeout("checkout", deadline))?
        };
        let response = if self.plain_checkout.load(Ordering::Relaxed) {
            exchange(Request::Checkout(request.clone())).await?
        } else {
            let observed = Request::ObservedCheckout(ObservedCheckout {
                request: request.clone(),
                facts,
            });
            match exchange(observed).await {
                // An older server cannot decode the request (so it granted nothing).
                Err(ClientError::Server(e))
                    if e.code == ErrorCode::BadRequest
                        && e.message.starts_with("malformed message") =>
                {
                    tracing::debug!(server = %self.server, "the server predates observed checkouts; sending plain ones");
                    self.plain_checkout.store(true, Ordering::Relaxed);
                    exchange(Request::Checkout(request.clone())).await?
                }
                other => other?,
            }
        };
        match response {
            Response::Checkout(CheckoutReply::Granted(grant)) => {
                verify_grant_by(&self.lease_signers(), &grant)?;
                Ok(Lease { grant })
            }
            Response::Checkout(CheckoutReply::Denied(denial)) => Err(ClientError::Denied(denial)),
            other => Err(unexpected(&other)),
        }
    }

    /// The vendor attributes of `feature` from the verified bundles (like FlexLM's
    /// VENDOR_STRING): what edition, which add-ons; merged over all bundles.
    pub fn attributes(&self, feature: &str) -> std::collections::BTreeMap<String, String> {
        self.bundles
            .iter()
            .flat_map(|b| b.bundle.features.iter())
            .filter(|f| f.serves(feature))
            .flat_map(|f| f.attributes.clone())
            .collect()
    }

    /// The vendor's terms for a program of `feature` that runs without its seat (see
    /// [`grace`]), from the verified bundles: the most lenient of the bundles that set
    /// terms for it, [`grace::LostSeatTerms::DEFAULT`] when none does.
    pub fn lost_seat_terms(&self, feature: &str) -> grace::LostSeatTerms {
        grace::LostSeatTerms::for_feature(self.bundles.iter().map(|b| &b.bundle), feature)
    }

    /// Runs an administrative operation with the admin token; returns the message.
    pub async fn admin(&self, token: &str, op: AdminOp) -> Result<String, ClientError> {
        Ok(self.admin_reply(token, op).await?.message)
    }

    /// Runs an administrative operation with the admin token; returns the whole reply
    /// (an exported report comes in it).
    pub async fn admin_reply(&self, token: &str, op: AdminOp) -> Result<AdminReply, ClientError> {
        let request = Request::Admin(AdminRequest {
            token: token.to_string(),
            op,
        });
        match self.request(request).await? {
            Response::Admin(reply) => Ok(reply),
            other => Err(unexpected(&other)),
        }
    }

    /// Reloads the server's bundles and policy with the admin token; the outcome names
    /// every bundle file loaded and refused, and a broken policy.
    pub async fn admin_reload(&self, token: &str) -> Result<ReloadOutcome, ClientError> {
        let request = Request::Admin(AdminRequest {
            token: token.to_string(),
            op: AdminOp::ReloadWithOutcome,
        });
        match self.request(request).await? {
            Response::Reload(outcome) => Ok(outcome),
            other => Err(unexpected(&other)),
        }
    }

    /// Heartbeats leases (and re-attaches them to this connection).
    pub async fn heartbeat(&self, leases: &[LeaseRef]) -> Result<Vec<LeaseState>, ClientError> {
        let request = Request::Heartbeat(HeartbeatRequest {
            leases: leases.to_vec(),
        });
        match self.request(request).await? {
            Response::Heartbeat(r) if r.leases.len() == leases.len() => Ok(r.leases),
            other => Err(unexpected(&other)),
        }
    }

    /// Checks leases in.
    pub async fn checkin(&self, leases: &[LeaseRef]) -> Result<Vec<bool>, ClientError> {
        let request = Request::Checkin(CheckinRequest {
            leases: leases.to_vec(),
        });
        match self.request(request).await? {
            Response::Checkin(r) if r.released.len() == leases.len() => Ok(r.released),
            other => Err(unexpected(&other)),
        }
    }

    /// Features, seats, holders and queues. `admin_token` is needed only where the
    /// server is configured to show its status to admins alone.
    pub async fn status(&self, admin_token: Option<&str>) -> Result<StatusReply, ClientError> {
        let request = Request::Status(StatusRequest {
            admin_token: admin_token.map(str::to_string),
        });
        match self.request(request).await? {
            Response::Status(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// Resolves when the connection closes, for whatever reason (the server stopped or
    /// restarted, an idle timeout, a network error). The background task of [`Client`]
    /// waits on it so that a lost connection is noticed at once, not at the next
    /// heartbeat.
    pub async fn closed(&self) {
        self.connection.closed().await;
    }

    /// Closes the connection politely (so the server releases nothing by timeout) and
    /// waits briefly for the close to reach the server.
    pub async fn close(self) {
        self.close_shared().await;
    }

    /// [`Session::close`] for a session that others may still hold (an `Arc`): their
    /// requests fail from now on. Used where the process is about to exit, so that the
    /// server sees the connection close at once instead of after its idle timeout.
    pub async fn close_shared(&self) {
        self.connection.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Opens a stream, sends `request` and finishes the sending side.
/// The log filter for a `TALLY_LOG` value, in `tracing_subscriber::EnvFilter` syntax.
///
/// A bare level (`debug`, `trace`, ...) means tally's own steps at that level, and the
/// libraries under it (quinn, rustls) at `warn` at most: their internals are a flood a
/// user did not ask for. Anything else (`debug,quinn=debug`, `tally_client=trace`) is
/// taken as it is, so asking for quinn's lines gets them. Unset or empty: `warn`.
pub fn log_directive(value: Option<&str>) -> String {
    const OURS: [&str; 3] = ["tally", "tally_client", "tally_protocol"];
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let value = value.map(str::trim).unwrap_or("");
    if value.is_empty() {
        return "warn".into();
    }
    let level = value.to_ascii_lowercase();
    let Some(rank) = LEVELS.iter().position(|l| *l == level) else {
        return value.to_string();
    };
    // Others at the quieter of the level asked for and `warn`.
    let others = LEVELS[rank.min(2)];
    let mut directive = others.to_string();
    for target in OURS {
        directive.push_str(&format!(",{target}={level}"));
    }
    directive
}

/// A request's kind for the debug log: never its fields, which hold lease secrets and
/// the admin token.
fn request_name(request: &Request) -> &'static str {
    match request {
        Request::Hello(_) => "hello",
        Request::Checkout(_) | Request::ObservedCheckout(_) => "checkout",
        Request::Heartbeat(_) => "heartbeat",
        Request::Checkin(_) => "checkin",
        Request::Status(_) => "status",
        Request::Admin(_) => "admin",
        _ => "other",
    }
}

/// The debug line of an answer: what it says, without tokens or secrets.
fn log_response(server: SocketAddr, response: &Result<Response, ClientError>) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    match response {
        Ok(Response::Checkout(CheckoutReply::Granted(g))) => tracing::debug!(
            %server,
            lease = %g.id,
            feature = %g.feature,
            count = g.count,
            "checkout granted"
        ),
        Ok(Response::Checkout(CheckoutReply::Denied(d))) => {
            tracing::debug!(%server, reason = %d.reason, "checkout denied")
        }
        Ok(Response::Heartbeat(h)) => {
            tracing::debug!(%server, leases = h.leases.len(), "heartbeat answered")
        }
        Ok(Response::Error(e)) => tracing::debug!(%server, error = %e.message, "error answer"),
        // Said by `connect_one` with what it holds.
        Ok(Response::Hello(_)) => {}
        Ok(Response::Checkin(_)) => tracing::debug!(%server, "checkin answer"),
        Ok(Response::Status(_)) => tracing::debug!(%server, "status answer"),
        Ok(Response::Admin(_)) => tracing::debug!(%server, "admin answer"),
        Ok(_) => tracing::debug!(%server, "answer"),
        Err(e) => tracing::debug!(%server, error = %e, "request failed"),
    }
}

async fn send_request(
    connection: &quinn::Connection,
    server: SocketAddr,
    request: &Request,
) -> Result<quinn::RecvStream, ClientError> {
    let conn_err = |message: String| ClientError::Connection { server, message };
    let (mut send, recv) = connection
        .open_bi()
        .await
        .map_err(|e| conn_err(e.to_string()))?;
    send.write_all(&frame::encode_request(request))
        .await
        .map_err(|e| conn_err(e.to_string()))?;
    send.finish().map_err(|e| conn_err(e.to_string()))?;
    Ok(recv)
}

/// Reads one response frame, bounded by [`MAX_RESPONSE_LEN`].
async fn read_response(
    recv: &mut quinn::RecvStream,
    server: SocketAddr,
) -> Result<Response, ClientError> {
    let conn_err = |message: String| ClientError::Connection { server, message };
    let mut header = [0u8; HEADER_LEN];
    recv.read_exact(&mut header)
        .await
        .map_err(|e| conn_err(e.to_string()))?;
    let header = frame::parse_header(&header, MAX_RESPONSE_LEN)
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut payload = vec![0u8; header.payload_len];
    recv.read_exact(&mut payload)
        .await
        .map_err(|e| conn_err(e.to_string()))?;
    match frame::decode_response(header.version, &payload)
        .map_err(|e| ClientError::Protocol(e.to_string()))?
    {
        Response::Failed(e) => Err(ClientError::Server(e)),
        // A version-1 answer carries no code.
        Response::Error(e) => Err(ClientError::Server(tally_protocol::wire::ServerError::new(
            tally_protocol::wire::ErrorCode::Unknown(0),
            e.message,
        ))),
        response => Ok(response),
    }
}

/// The reply stream of a checkout whose caller stopped waiting (dropped the future, or
/// its deadline passed) before the answer was read. A grant may be on its way or
/// already here: dropping the stream would lose it, and the seat would stay with this
/// connection until it closes. So on drop, a task reads on for [`SALVAGE_WINDOW`]: a
/// grant that arrives is checked in at once; if none arrives, the stream is stopped,
/// which tells the server to take the request out of its queue (and to take back a
/// grant it can then no longer deliver). Stopping at once would race: a grant already
/// in flight is discarded by the stop, while the server may count it delivered once
/// its packet is acknowledged.
struct UnreadReply {
    recv: Option<quinn::RecvStream>,
    connection: quinn::Connection,
    server: SocketAddr,
}

impl Drop for UnreadReply {
    fn drop(&mut self) {
        let Some(mut recv) = self.recv.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime left: dropping the stream stops it.
            return;
        };
        let connection = self.connection.clone();
        let server = self.server;
        runtime.spawn(async move {
            let arrived =
                tokio::time::timeout(SALVAGE_WINDOW, read_response(&mut recv, server)).await;
            match arrived {
                Ok(Ok(Response::Checkout(CheckoutReply::Granted(grant)))) => {
                    let checkin = Request::Checkin(CheckinRequest {
                        leases: vec![LeaseRef {
                            id: grant.id,
                            secret: grant.secret,
                        }],
                    });
                    let exchange = async {
                        let mut recv = send_request(&connection, server, &checkin).await?;
                        read_response(&mut recv, server).await
                    };
                    let _ = tokio::time::timeout(DEFAULT_REQUEST_TIMEOUT, exchange).await;
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = recv.stop(frame::STOP_ABANDONED.into());
                }
            }
        });
    }
}

/// Checks a grant's lease token: signed by `server_key` (the key proven in TLS and
/// vouched for by the vendor), intact, and saying what the grant says. A token that fails
/// any of these is refused, so a tampered or substituted token never becomes a lease.
pub fn verify_grant(server_key: &PublicKey, grant: &LeaseGrant) -> Result<(), ClientError> {
    verify_grant_by(std::slice::from_ref(server_key), grant)
}

/// Checks a grant's lease token like [`verify_grant`], accepting a token signed by any
/// of `signers` (the members of the server's cluster, [`Session::lease_signers`]).
pub fn verify_grant_by(signers: &[PublicKey], grant: &LeaseGrant) -> Result<(), ClientError> {
    let token = &grant.token;
    if !signers.contains(&token.signer) {
        return Err(ClientError::Protocol(
            "lease token is not signed by the server key (nor by another server its bundle binds)"
                .into(),
        ));
    }
    token
        .verify(Domain::Lease)
        .map_err(|_| ClientError::Protocol("lease token signature does not verify".into()))?;
    match LeaseToken::decode(&token.body) {
        Ok(LeaseToken::V1 {
            id,
            feature,
            count,
            expires_at,
            ..
        }) if id == grant.id
            && feature == grant.feature
            && count == grant.count
            && expires_at == grant.borrowed_until =>
        {
            Ok(())
        }
        Ok(_) => Err(ClientError::Protocol(
            "lease token does not match the grant".into(),
        )),
        Err(e) => Err(ClientError::Protocol(format!("lease token: {e}"))),
    }
}

fn unexpected(response: &Response) -> ClientError {
    let kind = match response {
        Response::Hello(_) => "hello",
        Response::Checkout(_) => "checkout",
        Response::Heartbeat(_) => "heartbeat",
        Response::Checkin(_) => "checkin",
        Response::Status(_) => "status",
        Response::Admin(_) => "admin",
        Response::Error(_) | Response::Failed(_) => "error",
        _ => "unknown",
    };
    ClientError::Protocol(format!("unexpected {kind} response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_that_failed_lately_are_tried_last_in_their_order() {
        let a: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:1002".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:1003".parse().unwrap();
        let mut addrs = vec![a, b, c];
        mark_server(a, false);
        dead_servers_last(&mut addrs);
        assert_eq!(addrs, vec![b, c, a]);
        mark_server(a, true);
        let mut addrs = vec![a, b, c];
        dead_servers_last(&mut addrs);
        assert_eq!(addrs, vec![a, b, c]);
    }

    fn grant_signed_by(key: &tally_protocol::keys::SecretKey) -> LeaseGrant {
        let id = tally_protocol::lease::LeaseId(7);
        let body = LeaseToken::V1 {
            id,
            feature: "solver".into(),
            count: 1,
            holder: "ana@ws1".into(),
            issued_at: tally_protocol::time::UnixTime(1_800_000_000),
            expires_at: None,
        }
        .encode();
        LeaseGrant {
            id,
            secret: tally_protocol::lease::LeaseSecret([1; 16]),
            feature: "solver".into(),
            count: 1,
            ttl_secs: 60,
            overdraft: false,
            borrowed_until: None,
            token: tally_protocol::signed::Signed::sign(Domain::Lease, body, key),
        }
    }

    #[test]
    fn a_lease_token_of_any_member_of_the_cluster_is_accepted_and_no_other() {
        use tally_protocol::keys::SecretKey;
        let [here, peer, stranger] = [10u8, 11, 12].map(|s| SecretKey::from_seed([s; 32]));
        let members = [here.public(), peer.public()];
        // Granted by another member (the lease re-attached through this server).
        let grant = grant_signed_by(&peer);
        assert!(verify_grant(&here.public(), &grant).is_err());
        assert!(verify_grant_by(&members, &grant).is_ok());
        // Signed by a key the bundle does not bind: refused.
        let forged = grant_signed_by(&stranger);
        let why = verify_grant_by(&members, &forged).unwrap_err().to_string();
        assert!(why.contains("not signed by the server key"), "{why}");
        // A member's token whose body was edited still fails its signature.
        let mut edited = grant_signed_by(&peer);
        let last = edited.token.body.len() - 1;
        edited.token.body[last] ^= 1;
        assert!(verify_grant_by(&members, &edited).is_err());
    }
}
