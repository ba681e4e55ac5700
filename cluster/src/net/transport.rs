//! openraft's network over quinn: [`QuicNetwork`] dials peers, [`serve_peer`] answers them.
//!
//! One connection per peer, opened at the first RPC and shared by every RPC to that peer
//! (openraft makes a client per replication stream and per election); a connection that
//! failed is dropped and the next RPC dials again. Each RPC is one bidirectional stream:
//! a request frame, an answer frame (see [`super::frame`]).

use super::frame::{self, FrameError};
use super::tls::{self, PeerIdentity, PeerKeys, PeerTlsError};
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{NodeId, Raft, RaftTypeConfig};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tally_protocol::keys::PublicKey;

/// A member of the site's Raft group as the transport needs it: where to dial and which
/// key must answer there. It is openraft's `Node` type for tally, so membership carries
/// both and every node agrees on them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    /// `host:port` of the node's tallyd (the UDP port it serves clients on).
    pub addr: String,
    /// The node's identity key, bound by the site's bundle.
    pub key: PublicKey,
}

impl Default for PeerNode {
    /// openraft asks for a default; a node nobody can dial and no key can prove.
    fn default() -> Self {
        PeerNode {
            addr: String::new(),
            key: PublicKey([0; 32]),
        }
    }
}

impl fmt::Debug for PeerNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for PeerNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (key {})", self.addr, self.key.fingerprint())
    }
}

/// A Raft RPC as it travels from the dialler to the acceptor.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
#[non_exhaustive]
pub enum PeerRequest<C: RaftTypeConfig> {
    /// Replication and heartbeats.
    AppendEntries(AppendEntriesRequest<C>),
    /// An election.
    Vote(VoteRequest<C::NodeId>),
    /// One chunk of a snapshot.
    InstallSnapshot(InstallSnapshotRequest<C>),
}

/// The acceptor's answer to a [`PeerRequest`].
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
#[non_exhaustive]
pub enum PeerResponse<NID: NodeId> {
    /// openraft's answer to an append-entries.
    AppendEntries(Result<AppendEntriesResponse<NID>, RaftError<NID>>),
    /// openraft's answer to a vote.
    Vote(Result<VoteResponse<NID>, RaftError<NID>>),
    /// openraft's answer to a snapshot chunk.
    InstallSnapshot(Result<InstallSnapshotResponse<NID>, RaftError<NID, InstallSnapshotError>>),
}

/// Application error codes on a peer stream or connection the acceptor gives up on.
pub mod codes {
    /// The request frame was larger than the bound.
    pub const TOO_LARGE: u32 = 1;
    /// The request frame could not be read or decoded.
    pub const BAD_REQUEST: u32 = 2;
    /// The dialler is not (or no longer) one of the site's nodes.
    pub const NOT_A_NODE: u32 = 3;
}

/// Why an RPC to a peer failed, before openraft's error types take over.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The peer's address did not resolve.
    #[error("peer address {addr}: {cause}")]
    Resolve {
        /// The address as configured.
        addr: String,
        /// Why it did not resolve.
        cause: std::io::Error,
    },
    /// The TLS configuration for the peer could not be built.
    #[error(transparent)]
    Tls(#[from] PeerTlsError),
    /// quinn would not start the connection.
    #[error("dialling {addr}: {cause}")]
    Connect {
        /// The address dialled.
        addr: String,
        /// quinn's reason.
        cause: quinn::ConnectError,
    },
    /// The connection failed or was refused (TLS included).
    #[error("connection to peer: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A frame could not be exchanged.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The acceptor answered with another RPC's answer (a bug on one side).
    #[error("peer answered a {0} request with another kind of answer")]
    Mismatch(RPCTypes),
    /// The connecting peer presented no certificate of a site node.
    #[error("peer connection without a node key: {0}")]
    NotANode(String),
}

/// The shared connection to one peer; `None` until dialled and after a failure.
type Slot = Arc<tokio::sync::Mutex<Option<quinn::Connection>>>;

/// A peer as last dialled: its node (address and key), connection and reachability.
type Known = (PeerNode, Slot, Arc<Reach>);

/// RPCs in a row that found a peer unreachable before that is logged: three heartbeat
/// intervals, so that one lost datagram or a peer restarting is not news.
const FAILURES_BEFORE_DOWN: u32 = 3;

/// Whether a peer answers, so that a peer going away and coming back is logged once
/// each, in one line that names it (openraft logs every failed RPC, twice a second).
#[derive(Default)]
struct Reach {
    failures: std::sync::atomic::AtomicU32,
    down: std::sync::atomic::AtomicBool,
}

impl Reach {
    fn answered(&self, node: &PeerNode) {
        use std::sync::atomic::Ordering;
        self.failures.store(0, Ordering::Relaxed);
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!(peer = %node, "cluster member answers again");
        }
    }

    fn failed(&self, node: &PeerNode, why: &dyn fmt::Display) {
        use std::sync::atomic::Ordering;
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= FAILURES_BEFORE_DOWN && !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(peer = %node, "cluster member does not answer: {why}; asking on");
        }
    }
}

/// openraft's network factory over QUIC: one per node, handed to `Raft::new`.
#[derive(Clone)]
pub struct QuicNetwork<NID: NodeId> {
    id: NID,
    endpoint: quinn::Endpoint,
    identity: Arc<PeerIdentity>,
    connections: Arc<Mutex<HashMap<NID, Known>>>,
}

impl<NID: NodeId> QuicNetwork<NID> {
    /// Dials peers from `endpoint` (tallyd's own, shared with its clients) as node `id`,
    /// proving `identity`.
    pub fn new(id: NID, endpoint: quinn::Endpoint, identity: Arc<PeerIdentity>) -> Self {
        QuicNetwork {
            id,
            endpoint,
            identity,
            connections: Arc::default(),
        }
    }

    /// The connection slot of `target`; a node whose address or key changed gets a new one.
    fn slot(&self, target: NID, node: &PeerNode) -> (Slot, Arc<Reach>) {
        let mut map = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&target) {
            Some((known, slot, reach)) if known == node => (slot.clone(), reach.clone()),
            _ => {
                let (slot, reach) = (Slot::default(), Arc::<Reach>::default());
                map.insert(target, (node.clone(), slot.clone(), reach.clone()));
                (slot, reach)
            }
        }
    }
}

impl<C> RaftNetworkFactory<C> for QuicNetwork<C::NodeId>
where
    C: RaftTypeConfig<Node = PeerNode>,
{
    type Network = PeerClient<C>;

    async fn new_client(&mut self, target: C::NodeId, node: &PeerNode) -> PeerClient<C> {
        let (slot, reach) = self.slot(target.clone(), node);
        PeerClient {
            id: self.id.clone(),
            target: target.clone(),
            node: node.clone(),
            endpoint: self.endpoint.clone(),
            identity: self.identity.clone(),
            slot,
            reach,
            _config: std::marker::PhantomData,
        }
    }
}

/// openraft's client to one peer (see [`QuicNetwork`]).
pub struct PeerClient<C: RaftTypeConfig> {
    id: C::NodeId,
    target: C::NodeId,
    node: PeerNode,
    endpoint: quinn::Endpoint,
    identity: Arc<PeerIdentity>,
    slot: Slot,
    reach: Arc<Reach>,
    _config: std::marker::PhantomData<fn() -> C>,
}

/// How an RPC failed, before it is said in openraft's terms.
enum CallError {
    /// No connection could be had: openraft backs off.
    Unreachable(PeerError),
    /// The connection is up but this RPC failed: openraft retries.
    Network(PeerError),
    /// The request does not fit a frame.
    TooLarge,
    /// The RPC's deadline passed.
    Timeout(Duration),
}

impl<C: RaftTypeConfig<Node = PeerNode>> PeerClient<C> {
    /// The connection to the peer, dialled if there is none or the last one failed.
    async fn connection(&self) -> Result<quinn::Connection, PeerError> {
        let mut slot = self.slot.lock().await;
        if let Some(conn) = slot.as_ref() {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        *slot = None;
        let addr = tokio::net::lookup_host(self.node.addr.as_str())
            .await
            .map_err(|cause| PeerError::Resolve {
                addr: self.node.addr.clone(),
                cause,
            })?
            .next()
            .ok_or_else(|| PeerError::Resolve {
                addr: self.node.addr.clone(),
                cause: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
            })?;
        let config = tls::client_config(&self.identity, self.node.key)?;
        let conn = self
            .endpoint
            .connect_with(config, addr, tls::PEER_SERVER_NAME)
            .map_err(|cause| PeerError::Connect {
                addr: self.node.addr.clone(),
                cause,
            })?
            .await?;
        tracing::debug!(peer = %self.node, "peer connection established");
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets `conn` if it is still the peer's connection, closing it, so the next RPC
    /// dials again.
    async fn forget(&self, conn: &quinn::Connection) {
        let mut slot = self.slot.lock().await;
        if slot.as_ref().map(|c| c.stable_id()) == Some(conn.stable_id()) {
            conn.close(0u32.into(), b"rpc failed");
            *slot = None;
        }
    }

    async fn exchange(
        &self,
        conn: &quinn::Connection,
        request: &[u8],
    ) -> Result<PeerResponse<C::NodeId>, CallError> {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| CallError::Unreachable(e.into()))?;
        let lost = |e: FrameError| {
            if e.is_connection_lost() {
                CallError::Unreachable(e.into())
            } else {
                CallError::Network(e.into())
            }
        };
        send.write_all(request)
            .await
            .map_err(|e| lost(FrameError::from(e)))?;
        send.finish()
            .map_err(|e| CallError::Network(FrameError::from(e).into()))?;
        let answer = frame::read(&mut recv).await.map_err(lost)?;
        Ok(answer)
    }

    /// One RPC, its outcome counted for [`Reach`].
    async fn call(
        &self,
        request: PeerRequest<C>,
        option: &RPCOption,
    ) -> Result<PeerResponse<C::NodeId>, CallError> {
        let answer = self.call_once(request, option).await;
        match &answer {
            Ok(_) => self.reach.answered(&self.node),
            Err(CallError::Unreachable(e)) => self.reach.failed(&self.node, e),
            Err(CallError::Timeout(d)) => self.reach.failed(
                &self.node,
                &format!("no answer within {} ms", d.as_millis()),
            ),
            Err(_) => {}
        }
        answer
    }

    async fn call_once(
        &self,
        request: PeerRequest<C>,
        option: &RPCOption,
    ) -> Result<PeerResponse<C::NodeId>, CallError> {
        let bytes = match frame::encode(&request) {
            Ok(bytes) => bytes,
            Err(FrameError::TooLarge { .. }) => return Err(CallError::TooLarge),
            Err(e) => return Err(CallError::Network(e.into())),
        };
        let deadline = option.hard_ttl();
        let started = tokio::time::Instant::now();
        let conn = match tokio::time::timeout(deadline, self.connection()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(CallError::Unreachable(e)),
            Err(_) => return Err(CallError::Timeout(deadline)),
        };
        let left = deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, self.exchange(&conn, &bytes)).await {
            Ok(Err(CallError::Unreachable(e))) => {
                self.forget(&conn).await;
                Err(CallError::Unreachable(e))
            }
            Ok(answer) => answer,
            Err(_) => {
                // A peer that restarted leaves our old connection silent until the idle
                // timeout; dialling afresh at the next RPC finds the new process at once.
                self.forget(&conn).await;
                Err(CallError::Timeout(deadline))
            }
        }
    }

    fn error<E: std::error::Error>(
        &self,
        action: RPCTypes,
        error: CallError,
        entries: usize,
    ) -> RPCError<C::NodeId, PeerNode, E> {
        match error {
            CallError::Unreachable(e) => {
                tracing::debug!(peer = %self.node, %action, "peer unreachable: {e}");
                RPCError::Unreachable(Unreachable::new(&e))
            }
            CallError::Network(e) => {
                tracing::debug!(peer = %self.node, %action, "peer RPC failed: {e}");
                RPCError::Network(NetworkError::new(&e))
            }
            CallError::TooLarge => {
                let hint = (entries / 2).max(1) as u64;
                RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(hint))
            }
            CallError::Timeout(timeout) => RPCError::Timeout(Timeout {
                action,
                id: self.id.clone(),
                target: self.target.clone(),
                timeout,
            }),
        }
    }

    fn remote<E: std::error::Error>(&self, error: E) -> RPCError<C::NodeId, PeerNode, E> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target.clone(),
            self.node.clone(),
            error,
        ))
    }

    /// The acceptor answered another kind of RPC than asked: a bug on one side, which a
    /// retry will not cure but must not crash Raft either.
    fn unexpected<E: std::error::Error>(
        &self,
        action: RPCTypes,
    ) -> RPCError<C::NodeId, PeerNode, E> {
        self.error(action, CallError::Network(PeerError::Mismatch(action)), 0)
    }
}

impl<C> RaftNetwork<C> for PeerClient<C>
where
    C: RaftTypeConfig<Node = PeerNode>,
{
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C::NodeId>, RPCError<C::NodeId, PeerNode, RaftError<C::NodeId>>>
    {
        let action = RPCTypes::AppendEntries;
        let entries = rpc.entries.len();
        match self.call(PeerRequest::AppendEntries(rpc), &option).await {
            Ok(PeerResponse::AppendEntries(Ok(answer))) => Ok(answer),
            Ok(PeerResponse::AppendEntries(Err(e))) => Err(self.remote(e)),
            Ok(_) => Err(self.unexpected(action)),
            Err(e) => Err(self.error(action, e, entries)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<C>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<C::NodeId>,
        RPCError<C::NodeId, PeerNode, RaftError<C::NodeId, InstallSnapshotError>>,
    > {
        let action = RPCTypes::InstallSnapshot;
        match self.call(PeerRequest::InstallSnapshot(rpc), &option).await {
            Ok(PeerResponse::InstallSnapshot(Ok(answer))) => Ok(answer),
            Ok(PeerResponse::InstallSnapshot(Err(e))) => Err(self.remote(e)),
            Ok(_) => Err(self.unexpected(action)),
            Err(e) => Err(self.error(action, e, 0)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<C::NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<C::NodeId>, RPCError<C::NodeId, PeerNode, RaftError<C::NodeId>>> {
        let action = RPCTypes::Vote;
        match self.call(PeerRequest::Vote(rpc), &option).await {
            Ok(PeerResponse::Vote(Ok(answer))) => Ok(answer),
            Ok(PeerResponse::Vote(Err(e))) => Err(self.remote(e)),
            Ok(_) => Err(self.unexpected(action)),
            Err(e) => Err(self.error(action, e, 0)),
        }
    }
}

/// How long the acceptor waits for a request frame once a stream is open: a peer that
/// opens streams and sends nothing does not hold tasks forever.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Answers a peer's Raft RPCs on `conn` until the connection ends: the daemon calls it for
/// each connection whose ALPN is `tally-raft/1`.
///
/// The connection must have presented the certificate of a node in `allowed` (the peer
/// verifier checked it during the handshake; this refuses a connection that presented
/// none, which the verifier of an endpoint shared with clients lets through), and each
/// stream is checked again so a node removed by a bundle reload loses its say at once.
/// A stream with an oversized or undecodable request is reset with an error code; the
/// connection and other streams go on.
pub async fn serve_peer<C>(
    conn: quinn::Connection,
    raft: Raft<C>,
    allowed: PeerKeys,
) -> Result<(), PeerError>
where
    C: RaftTypeConfig,
{
    let key = match tls::peer_key(&conn) {
        Some(key) if allowed.contains(&key) => key,
        other => {
            let why = match other {
                Some(key) => format!("key {} is not one of this site's nodes", key.fingerprint()),
                None => "no node certificate presented".to_string(),
            };
            tracing::warn!(remote = %conn.remote_address(), "peer connection refused: {why}");
            conn.close(codes::NOT_A_NODE.into(), b"not a node of this site");
            return Err(PeerError::NotANode(why));
        }
    };
    tracing::debug!(remote = %conn.remote_address(), key = %key.fingerprint(), "peer connected");
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(key = %key.fingerprint(), "peer connection ended: {e}");
                return Ok(());
            }
        };
        if !allowed.contains(&key) {
            tracing::warn!(key = %key.fingerprint(), "peer no longer a node of this site");
            conn.close(codes::NOT_A_NODE.into(), b"no longer a node of this site");
            return Err(PeerError::NotANode(format!(
                "key {} was removed from this site's nodes",
                key.fingerprint()
            )));
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(send, recv, &raft).await {
                tracing::warn!(key = %key.fingerprint(), "peer RPC failed: {e}");
            }
        });
    }
}

/// Reads one request, hands it to Raft, writes the answer.
async fn answer<C: RaftTypeConfig>(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    raft: &Raft<C>,
) -> Result<(), FrameError> {
    let request = match tokio::time::timeout(REQUEST_READ_TIMEOUT, frame::read(&mut recv)).await {
        Ok(Ok(request)) => request,
        Ok(Err(e)) => {
            let code = match e {
                FrameError::TooLarge { .. } => codes::TOO_LARGE,
                _ => codes::BAD_REQUEST,
            };
            // Neither half is of use any more; the dialler sees the reset as its error.
            let _ = recv.stop(code.into());
            let _ = send.reset(code.into());
            return Err(e);
        }
        Err(_) => {
            tracing::debug!("peer opened a stream and sent no whole request in time");
            let _ = recv.stop(codes::BAD_REQUEST.into());
            let _ = send.reset(codes::BAD_REQUEST.into());
            return Ok(());
        }
    };
    let response: PeerResponse<C::NodeId> = match request {
        PeerRequest::AppendEntries(rpc) => {
            PeerResponse::AppendEntries(raft.append_entries(rpc).await)
        }
        PeerRequest::Vote(rpc) => PeerResponse::Vote(raft.vote(rpc).await),
        PeerRequest::InstallSnapshot(rpc) => {
            PeerResponse::InstallSnapshot(raft.install_snapshot(rpc).await)
        }
    };
    frame::write(&mut send, &response).await?;
    send.finish()?;
    Ok(())
}
